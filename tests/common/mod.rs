//! Shared test helpers: fixture discovery, tolerance table, tensor comparison, checkpoint copies
//! in other storage layouts; `kernels`: the devices, inputs and references of the kernel tests.
#![allow(dead_code)]

pub mod kernels;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// Families with a generated fixture (tests/fixtures/<family>, made by scripts/golden).
pub const FAMILIES: [&str; 6] = ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"];

/// The tolerance table: |got - want| <= atol + rtol * |want|.
/// f32 reference path vs Hugging Face float32 eager: HF's own eager vs sdpa differ by ~4e-6;
/// our summation order differs from torch's, so 1e-4 absolute on O(1) activations. The values
/// are `patchbay check`'s (experiments::check), which grades the applicability map with them.
pub const F32_ATOL: f32 = patchbay::experiments::check::F32_ATOL as f32;
pub const F32_RTOL: f32 = patchbay::experiments::check::F32_RTOL as f32;
/// An f32 kernel vs the CPU reference on the same f32 inputs (O(1) values): only the order of
/// reductions (block sums of squares, warp dot products) and fma contraction differ, a few ulp
/// over widths of a few thousand.
pub const KERNEL_F32_ATOL: f32 = 1e-5;
pub const KERNEL_F32_RTOL: f32 = 1e-5;
/// A bf16 output vs the reference rounded to bf16 the same way: the f32 values before rounding
/// differ within KERNEL_F32_*, which can move a value across a rounding boundary: one bf16 ulp,
/// at most 2^-7 of the value. (Kernel tests also check the bf16 output bit for bit against the
/// kernel's own f32 output where it has one.)
pub const BF16_ATOL: f32 = 1e-5;
pub const BF16_RTOL: f32 = 1.0 / 128.0;

/// SmolLM2-135M-Instruct, the real GGUF (scripts/fetch-smollm2.sh, which scripts/test.sh runs);
/// None, with a printed notice, where it could not be fetched.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!("SKIPPED: {} is absent (scripts/fetch-smollm2.sh fetches it)", p.display());
        None
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

pub fn fixture(family: &str) -> PathBuf {
    fixtures_dir().join(family)
}

/// Reads every tensor of a safetensors file as f32 (f32, bf16, f16, i64 accepted).
pub fn read_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.iter()
        .map(|(name, v)| {
            let d = v.data();
            let data: Vec<f32> = match v.dtype() {
                Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name.to_string(), (v.shape().to_vec(), data))
        })
        .collect()
}

/// Compares element-wise; returns the max abs error. Panics naming the worst index when any
/// element is out of tolerance or not finite.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: {} values, expected {}", got.len(), want.len());
    let mut worst: Option<(usize, f32)> = None;
    let mut max_abs = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let bad = !g.is_finite() || !(err <= atol + rtol * w.abs());
        if g.is_finite() {
            max_abs = max_abs.max(err);
        }
        let excess = if g.is_finite() { err - (atol + rtol * w.abs()) } else { f32::INFINITY };
        if bad && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{name}: out of tolerance (atol {atol}, rtol {rtol}); worst at index {i}: got {}, want {}; max abs err {max_abs}", got[i], want[i]);
    }
    max_abs
}

/// Copies a model directory (all small files) to `dst`, rewriting the weights with every
/// float tensor converted to `dtype`, into `n_shards` files (with an index when > 1).
pub fn copy_checkpoint(src: &Path, dst: &Path, dtype: Dtype, n_shards: usize) {
    copy_checkpoint_edited(src, dst, dtype, n_shards, |_| {});
}

/// As [`copy_checkpoint`], with the tensors (name -> (shape, f32 values)) changed by `edit`
/// before they are written (hostile checkpoints: NaN, Inf, overflowing weights).
pub fn copy_checkpoint_edited(src: &Path, dst: &Path, dtype: Dtype, n_shards: usize, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if !name.ends_with(".safetensors") && !name.ends_with(".index.json") {
            std::fs::copy(e.path(), dst.join(&name)).unwrap();
        }
    }
    let mut tensors = read_tensors(&src.join("model.safetensors"));
    edit(&mut tensors);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let per = names.len().div_ceil(n_shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if n_shards == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards) };
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let (shape, data) = &tensors[*n];
                let bytes: Vec<u8> = match dtype {
                    Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Dtype::BF16 => data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                    Dtype::F16 => data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                    other => panic!("unsupported {other:?}"),
                };
                ((*n).clone(), shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            encoded.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dst.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    if n_shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dst.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    }
}

/// Token ids recorded by the generator (`prompts.json`).
pub fn fixture_prompts(family: &str) -> serde_json::Value {
    let p = fixture(family).join("prompts.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

pub fn prompt_ids(family: &str) -> Vec<Vec<u32>> {
    serde_json::from_value(fixture_prompts(family)["ids"].clone()).unwrap()
}

/// A random checkpoint with the config of fixture `family` but `n_layers` layers, in a tempdir.
pub fn synth_family(family: &str, n_layers: usize, seed: u64) -> tempfile::TempDir {
    let text = std::fs::read_to_string(fixture(family).join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    obj.insert("num_hidden_layers".into(), n_layers.into());
    if let Some(types) = obj.get("layer_types").and_then(|t| t.as_array()).cloned() {
        let cycled: Vec<serde_json::Value> = (0..n_layers).map(|l| types[l % types.len()].clone()).collect();
        obj.insert("layer_types".into(), cycled.into());
    }
    let dir = tempfile::tempdir().unwrap();
    patchbay::model::synth::write_checkpoint(&cfg, dir.path(), seed).unwrap();
    dir
}

/// `n` prompts of random token ids with lengths in `lens` (cycled).
pub fn random_prompts(n: usize, lens: &[usize], vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = lens[i % lens.len()];
            (0..len).map(|j| (patchbay::rng::splitmix64(seed ^ ((i as u64) << 32) ^ j as u64) % vocab as u64) as u32).collect()
        })
        .collect()
}

/// The device forward (bf16 weights and GEMM operands, f32 accumulation and residual, bf16 KV
/// cache) vs f32 references, per tensor: max |got - want| <= FORWARD_BF16_REL * max |want| and
/// normalised MSE <= FORWARD_BF16_NMSE. Every bf16 rounding is 2^-9 relative; through two
/// layers of the tiny models the observed worst is ~2.4% of a tensor's range (attention
/// patterns and logits, which compound q, k and the residual).
pub const FORWARD_BF16_REL: f32 = patchbay::experiments::check::BF16_REL as f32;
pub const FORWARD_BF16_NMSE: f32 = patchbay::experiments::check::BF16_NMSE as f32;

/// Checks a device-forward tensor against an f32 reference with the bf16 forward tolerances;
/// returns (max abs error / max |ref|, NMSE).
pub fn assert_forward_close(name: &str, got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "{name}: {} values, expected {}", got.len(), want.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{name}: non-finite value {} at index {i}", got[i]);
    }
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if (a - b).abs() > worst {
            worst = (a - b).abs();
            at = i;
        }
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
    let nmse = (num / den) as f32;
    let rel = worst / max_ref;
    assert!(
        rel <= FORWARD_BF16_REL && nmse <= FORWARD_BF16_NMSE,
        "{name}: max abs err {worst} at index {at} (got {}, want {}) is {rel:.3e} of max |ref| {max_ref} (limit {FORWARD_BF16_REL}); NMSE {nmse:.3e} (limit {FORWARD_BF16_NMSE})",
        got[at],
        want[at]
    );
    (rel, nmse)
}

/// Runs a patching sweep with `method` on `engine`; results sorted by experiment id (every
/// experiment present).
pub fn run_patch_sweep(
    engine: &dyn patchbay::engine::Engine,
    prompts: &[Vec<u32>],
    spec: &patchbay::experiments::patch::SweepSpec,
    pairs: &[patchbay::experiments::patch::Pair],
    method: patchbay::experiments::patch::Method,
    batch_rows: usize,
    mem_budget: usize,
) -> Vec<patchbay::experiments::patch::ExperimentResult> {
    use patchbay::experiments::patch::{RunSettings, experiments, run_sweep};
    let exps = experiments(pairs, spec, engine.config().n_layers).unwrap();
    let mut out = Vec::new();
    let settings = RunSettings { method, skip: &std::collections::HashSet::new(), batch_rows, mem_budget, overflow: patchbay::experiments::patch::Overflow::Auto, progress: &indicatif::ProgressBar::hidden() };
    run_sweep(engine, prompts, spec, &exps, &settings, &mut |r| {
        out.push(r);
        Ok(())
    })
    .unwrap();
    out.sort_by_key(|r| r.id);
    assert_eq!(out.len(), exps.len());
    out
}

/// Runs the patchbay binary: (exit code, stderr).
pub fn patchbay_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the patchbay binary and asserts it succeeds.
pub fn patchbay_ok(args: &[&str]) {
    let (code, err) = patchbay_cli(args);
    assert_eq!(code, 0, "{args:?}: {err}");
}

/// The objects of a JSONL file.
pub fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Checks a judged summary.csv (`judge`, `steer --mode generate`, `circuit eval`) against the
/// judged rows it summarises: its keys (condition, direction, beta) are `keys`, in order, and
/// every n, accuracy and share of `labels` is recomputed from `judged` (clean rows count for
/// every direction).
pub fn assert_summary_recomputed(summary: &Path, judged: &[serde_json::Value], labels: &[&str], keys: &[&str]) {
    let csv = std::fs::read_to_string(summary).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.iter().map(|l| l[..3].join(",")).collect::<Vec<_>>(), keys);
    for l in &lines {
        let rows: Vec<&serde_json::Value> = judged
            .iter()
            .filter(|j| j["condition"] == l[0] && (l[0] == "clean" || j["target"] == l[1]) && (l[2].is_empty() || j["beta"].as_f64() == l[2].parse::<f64>().ok()))
            .collect();
        assert_eq!(l[3], rows.len().to_string(), "{l:?}");
        let hits = rows.iter().filter(|j| j["pred"] == l[1]).count();
        assert_eq!(l[6], format!("{:.4}", hits as f64 / rows.len() as f64), "{l:?}");
        for (k, name) in labels.iter().enumerate() {
            assert_eq!(l[7 + k], format!("{:.4}", rows.iter().filter(|j| j["pred"] == *name).count() as f64 / rows.len() as f64), "{l:?} share of {name}");
        }
    }
}
