//! Timing of the probe stage at the study's scale (ignored by default; run with
//! `cargo test --release --test probe_scale -- --ignored --nocapture`).
//!
//! Synthetic activations shaped like crowd-enVENT on Llama-3.2-1B: N examples x P positions x
//! D features per site, 13 classes with class-dependent means, 21 numeric targets linear in a
//! few features plus noise. It times `run_probes` on S sites and extrapolates to 16 layers x 3
//! sites. Sizes from the environment: PB_N (6600), PB_D (2048), PB_P (5), PB_SITES (2),
//! PB_FOLDS (0 = held-out 0.2), PB_R (21 numeric targets; 0 = no ridge), PB_CLS (1; 0 = no
//! classifier).

use std::collections::BTreeMap;
use std::time::Instant;

use indicatif::ProgressBar;
use patchbay::experiments::probe::{ProbeParams, ProbeTargets, run_probes};
use patchbay::experiments::shards::ShardMeta;
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, write};
use patchbay::learn::logreg::LogRegParams;
use patchbay::learn::penalty::Penalty;
use patchbay::learn::split::{Eval, Split};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
#[ignore]
fn probe_stage_at_envent_scale() {
    let (n, d, p, s, folds) = (env("PB_N", 6600), env("PB_D", 2048), env("PB_P", 5), env("PB_SITES", 2), env("PB_FOLDS", 0));
    let (k, r) = (13usize, env("PB_R", 21));
    let dir = tempfile::tempdir().unwrap();
    let acts = dir.path().join("acts");
    std::fs::create_dir_all(&acts).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let classes: Vec<usize> = (0..n).map(|i| i % k).collect();
    let t0 = Instant::now();
    // Class means (weak signal) and a gaussian-ish noise from sums of uniforms.
    let means: Vec<f32> = (0..k * d).map(|_| rng.random_range(-0.15f32..0.15)).collect();
    let mut noise = || (0..4).map(|_| rng.random_range(-0.866f32..0.866)).sum::<f32>();
    let mut sites = Vec::new();
    let mut tensors_data: Vec<Vec<f32>> = Vec::new();
    for si in 0..s {
        let mut x = vec![0.0f32; n * p * d];
        for i in 0..n {
            for q in 0..p {
                let row = &mut x[(i * p + q) * d..(i * p + q + 1) * d];
                for (j, v) in row.iter_mut().enumerate() {
                    *v = means[classes[i] * d + j] * (1.0 + si as f32 * 0.5) + noise() + if j % 97 == 0 { 20.0 } else { 0.0 };
                }
            }
        }
        sites.push(format!("blocks.{si}.hook_resid_post"));
        tensors_data.push(x);
    }
    // Numeric targets: 1..5 ratings from a few features of the first site, position 0.
    let numeric: Vec<f64> = (0..n)
        .flat_map(|i| {
            let x0 = &tensors_data[0][i * p * d..i * p * d + d];
            (0..r).map(move |c| (3.0 + x0[c] as f64 * 0.8 + x0[c + 100] as f64 * 0.4).round().clamp(1.0, 5.0)).collect::<Vec<_>>()
        })
        .collect();
    let index: Vec<i64> = (0..n as i64).collect();
    let n_tokens = vec![40i64; n];
    let mut tensors: Vec<(String, Vec<usize>, TensorData)> = sites.iter().zip(&tensors_data).map(|(name, x)| (name.clone(), vec![n, p, d], TensorData::F32(x, OutDtype::F32))).collect();
    tensors.push(("index".into(), vec![n], TensorData::I64(&index)));
    tensors.push(("n_tokens".into(), vec![n], TensorData::I64(&n_tokens)));
    write(&ShardMeta::shard_path(&acts, 0), &tensors, &BTreeMap::new()).unwrap();
    drop(tensors);
    drop(tensors_data);
    let meta = ShardMeta {
        format: "patchbay-shards-1".into(),
        model: "synthetic".into(),
        config_sha256: "0".repeat(64),
        patchbay_version: env!("CARGO_PKG_VERSION").into(),
        prompts_sha256: "0".repeat(64),
        n_prompts: n,
        sites: sites.clone(),
        site_kinds: vec!["resid_post".into(); s],
        site_layers: (0..s).collect(),
        token_shapes: vec![vec![d]; s],
        positions: (1..=p as i64).map(|q| -q).collect(),
        dtype: "f32".into(),
        label_token_ids: Vec::new(),
        shard_rows: n,
        n_shards: 1,
    };
    std::fs::write(acts.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    eprintln!("synthetic activations: {s} sites x [{n}, {p}, {d}] in {:.1} s", t0.elapsed().as_secs_f64());

    let targets = ProbeTargets {
        examples: (0..n).collect(),
        class_names: (0..k).map(|c| format!("c{c}")).collect(),
        classes: (env("PB_CLS", 1) == 1).then(|| classes.clone()),
        numeric_names: (0..r).map(|c| format!("a{c}")).collect(),
        numeric,
    };
    let eval = if folds > 1 { Eval::KFold(folds) } else { Eval::Holdout(0.2) };
    let split = Split::new(n, Some(&classes), eval, 0).unwrap();
    assert!(targets.classes.is_some() || r > 0, "nothing to probe");
    let params = ProbeParams { eval, seed: 0, c: Penalty::Fixed(1.0), logreg: LogRegParams::default(), alpha: Penalty::Fixed(1.0), inner_folds: 5, standardize: true, bootstrap: 1000 };
    let t = Instant::now();
    let run = run_probes(&acts, &targets, &split, &params, &dir.path().join("probes"), &ProgressBar::hidden()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let per_site = secs / s as f64;
    eprintln!(
        "probe stage: {s} sites x {p} positions ({} LR fits, {} stopped at max_iter, {} ridge fits of {r} targets) in {secs:.1} s on {} threads = {per_site:.1} s per site-layer; 16 layers x 3 sites: {:.1} min",
        run.fits,
        run.unconverged,
        s * p,
        rayon::current_num_threads(),
        per_site * 48.0 / 60.0
    );
    let acc: Vec<f64> = run.rows.iter().filter(|r| r.metric == "accuracy").map(|r| r.value).collect();
    eprintln!("accuracies {acc:.3?}");
    assert!(acc.iter().all(|&a| a > 1.5 / k as f64), "the synthetic classes should be learnable");
    let r2: Vec<f64> = run.rows.iter().filter(|r| r.metric == "r2:a1").map(|r| r.value).collect();
    eprintln!("R^2 of a1 {r2:.3?}");
}
