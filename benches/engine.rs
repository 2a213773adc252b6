//! Criterion benches of the engine's costs on a tiny random Llama-shaped checkpoint written at
//! start into a temporary directory (no weights are committed): the CPU GEMM at each precision
//! (decode and prefill row counts), prefill, decode after a KV cache, capture overhead, patching
//! resumed vs naive, generation with and without steering.
//! Each group holds the variants to compare. `cargo bench --bench engine`; `cargo test --benches`
//! runs every bench once as a test.
//!
//! `patchbay bench ...` measures the same workloads on any checkpoint, side by side, as JSON.

use std::collections::HashSet;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use patchbay::backend::Precision;
use patchbay::backend::cpu;
use patchbay::backend::ops::sample::SampleParams;
use patchbay::experiments::bench::{decode, prefill, prefilled};
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, generate};
use patchbay::experiments::patch::{Method, Overflow, SweepSpec, all_centers};
use patchbay::experiments::workload::{PatchWorkload, PatchWorkloadSpec, random_prompts};
use patchbay::intervene::Capture;
use patchbay::model::Model;
use patchbay::model::checkpoint::Weight;
use patchbay::model::config::DType;
use patchbay::model::synth::{preset, write_checkpoint};
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};

const BATCH: usize = 4;
const PROMPT_LEN: usize = 32;
const STEPS: usize = 8;

/// Llama 3.2's layout at a tiny size: 4 layers, d_model 256, 4 heads of 64 (2 kv heads), vocab 2048.
fn tiny_model() -> (tempfile::TempDir, Model) {
    let mut cfg = preset("llama-3.2-1b").expect("preset");
    let o = cfg.as_object_mut().expect("a JSON object");
    for (k, v) in [("hidden_size", 256), ("intermediate_size", 512), ("num_hidden_layers", 4), ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 64), ("vocab_size", 2048)] {
        o.insert(k.into(), v.into());
    }
    o.insert("bos_token_id".into(), 0.into());
    o.insert("eos_token_id".into(), 1.into());
    let dir = tempfile::tempdir().expect("a temporary directory");
    write_checkpoint(&cfg, dir.path(), 0).expect("the synthetic checkpoint");
    let model = Model::load(dir.path()).expect("the synthetic model");
    (dir, model)
}

fn benches(c: &mut Criterion) {
    let (_dir, model) = tiny_model();
    let cfg = &model.cfg;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompts = random_prompts(&mut rng, BATCH, PROMPT_LEN, cfg.vocab_size);
    let tokens = random_prompts(&mut rng, BATCH, STEPS, cfg.vocab_size); // [batch][steps]

    // The CPU GEMM y = x W^T, W [1024, 1024] bf16, at decode (4 rows: the dot microkernel) and
    // prefill (256 rows: the panel microkernel) row counts; throughput in FLOPs.
    let mut g = c.benchmark_group("gemm");
    g.sample_size(20);
    let (n, k) = (1024, 1024);
    let w_vals: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let w = Weight::from_f32(&w_vals, DType::BF16, vec![n, k]); // [n, k]
    for m in [4, 256] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 104_729) % 1999) as f32 / 999.0 - 1.0).collect(); // [m, k]
        let mut y = vec![0.0f32; m * n]; // [m, n]
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for precision in [Precision::F32, Precision::Bf16] {
            g.bench_function(format!("{m}_rows_{precision}"), |b| b.iter(|| cpu::matmul(black_box(&x), m, &w, &mut y, precision)));
        }
    }
    g.finish();

    let mut g = c.benchmark_group("forward");
    g.sample_size(20);
    g.throughput(Throughput::Elements((BATCH * PROMPT_LEN) as u64));
    g.bench_function("prefill", |b| b.iter(|| black_box(prefill(&model, &prompts, &[]).expect("prefill"))));
    g.throughput(Throughput::Elements((BATCH * STEPS) as u64));
    g.bench_function("decode", |b| b.iter_batched(|| prefilled(&model, &prompts).expect("prefill"), |mut s| decode(&model, &mut s, &tokens).expect("decode"), BatchSize::LargeInput));
    g.finish();

    let mut g = c.benchmark_group("capture");
    g.sample_size(20);
    g.throughput(Throughput::Elements((BATCH * PROMPT_LEN) as u64));
    let resid_post: Vec<Capture> = (0..cfg.n_layers).map(|l| Capture { site: Site::new(l, SiteKind::ResidPost), positions: Positions::All }).collect();
    for (name, caps) in [("none", &[][..]), ("resid_post", &resid_post[..])] {
        g.bench_function(name, |b| b.iter(|| black_box(prefill(&model, &prompts, caps).expect("prefill"))));
    }
    g.finish();

    let spec = PatchWorkloadSpec {
        n_prompts: 8,
        prompt_len: 16,
        n_pairs: 8,
        sweep: SweepSpec { sites: vec![SiteKind::AttnOut, SiteKind::MlpOut, SiteKind::ResidPost], units: None, window: 3, centers: all_centers(3, cfg.n_layers), positions: vec![-1], label_tokens: Vec::new() },
        n_labels: 8,
        seed: 0,
        naive_limit: None,
        batch_rows: 256,
        mem_budget: 1 << 30,
        overflow: Overflow::Auto,
    };
    let work = PatchWorkload::new(&spec, cfg).expect("the sweep");
    let mut g = c.benchmark_group("patch");
    g.sample_size(10);
    g.throughput(Throughput::Elements(work.exps.len() as u64));
    let (none, hidden) = (HashSet::new(), ProgressBar::hidden());
    for (name, method) in [("resumed", Method::Resumed), ("naive", Method::Naive)] {
        g.bench_function(name, |b| b.iter(|| black_box(work.run(&model, method, &none, &spec, &hidden).expect("sweep"))));
    }
    g.finish();

    let mut g = c.benchmark_group("generate");
    g.sample_size(10);
    g.throughput(Throughput::Elements((BATCH * STEPS) as u64));
    let gen_spec = GenerateSpec { max_new_tokens: STEPS, sample: SampleParams::GREEDY, eos_ids: Vec::new(), stop: Vec::new(), batch_size: BATCH };
    let steer = [StepIntervention::steer(Site::new(cfg.n_layers / 2, SiteKind::ResidPost), vec![0.5; cfg.d_model], 1.0, TokenScope::all())];
    for (name, steps) in [("plain", &[][..]), ("steered", &steer[..])] {
        g.bench_function(name, |b| b.iter(|| black_box(generate(&model, &prompts, &gen_spec, steps, None, &hidden, &mut |_, _| Ok(())).expect("generate"))));
    }
    g.finish();
}

criterion_group!(engine, benches);
criterion_main!(engine);
