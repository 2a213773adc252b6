//! Patching sweeps against an independent Hugging Face implementation (forward hooks on the HF
//! modules): every family's fixture model, every patchable site kind (resid_pre, resid_post,
//! attn_out, mlp_out, z heads, mlp_post neurons), windows of 1 and 2 layers, one and several
//! positions, prompts of different lengths, both methods (resumed with one batch per start
//! layer and with many small batches and target groups), on the CPU reference (f32 tolerances)
//! and resumed on the device (the emulator or PATCHBAY_TEST_DEVICE's GPU; bf16 forward tolerances).
//! Goldens: tests/fixtures/<family>/patch_golden.json, made by scripts/golden/make_patch_goldens.py.

mod common;

use common::*;
use common::kernels::test_driver;
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::experiments::check::{PatchGolden as Golden, PatchGoldenSweep as GoldenSweep};
use patchbay::experiments::patch::{ExperimentResult, Method, Pair, SweepSpec};
use patchbay::model::Model;
use patchbay::sites::SiteKind;

/// Compares every experiment of one method with the golden; returns the max abs error.
fn compare(tag: &str, golden: &Golden, gs: &GoldenSweep, results: &[ExperimentResult]) -> f32 {
    assert_eq!(results.len(), gs.experiments.len(), "{tag}: experiment count");
    let mut worst = 0.0f32;
    for (r, want) in results.iter().zip(&gs.experiments) {
        let name = format!("{tag}: experiment {} ({} layers {:?} pair {}->{})", r.id, r.site, r.layers, r.source, r.target);
        assert_eq!(
            (r.source, r.target, r.site.as_str(), &r.layers, &r.positions),
            (want.source, want.target, want.site.as_str(), &want.layers, &want.positions),
            "{name}: not the golden's experiment"
        );
        worst = worst
            .max(assert_close(&format!("{name} patched"), &r.patched, &want.patched, F32_ATOL, F32_RTOL))
            .max(assert_close(&format!("{name} clean target"), &r.clean_target, &golden.clean[r.target], F32_ATOL, F32_RTOL))
            .max(assert_close(&format!("{name} clean source"), &r.clean_source, &golden.clean[r.source], F32_ATOL, F32_RTOL));
    }
    worst
}

fn check_family(family: &str) {
    let dir = fixture(family);
    let path = dir.join("patch_golden.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/golden/make_patch_goldens.py)", path.display()));
    let golden: Golden = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let recorded = prompt_ids(family);
    assert_eq!(golden.prompts[..recorded.len()], recorded[..], "{family}: golden prompts are not the fixture's");
    let model = Model::load(&dir).unwrap();
    let (dev_name, driver) = test_driver(FiberOrder::Forward);
    let dev = DeviceModel::upload(&model, driver).unwrap();
    let mut worst = 0.0f32;
    let mut n = 0;
    for (i, gs) in golden.sweeps.iter().enumerate() {
        let tag = format!("{family} sweep {i} ({:?} W{} {:?})", gs.sites, gs.window, gs.positions);
        let sites = gs.sites.iter().map(|s| SiteKind::from_short_name(s).unwrap_or_else(|| panic!("{tag}: unknown site {s}"))).collect();
        let spec = SweepSpec { sites, units: gs.units.clone(), window: gs.window, centers: gs.centers.clone(), positions: gs.positions.clone(), label_tokens: golden.labels.clone() };
        let pairs: Vec<Pair> = gs.pairs.iter().map(|&(source, target)| Pair { source, target }).collect();
        for (method, batch_rows, mem_budget) in [
            (Method::Naive, 0, 0),
            (Method::Resumed, usize::MAX, usize::MAX),
            // Several batches per start layer and one target per group.
            (Method::Resumed, 7, 1),
        ] {
            let results = run_patch_sweep(&model, &golden.prompts, &spec, &pairs, method, batch_rows, mem_budget);
            worst = worst.max(compare(&format!("{tag} {method:?} rows {batch_rows}"), &golden, gs, &results));
        }
        // The device's resumed path (pool blocks, copy-on-write partial blocks) in small batches.
        let results = run_patch_sweep(&dev, &golden.prompts, &spec, &pairs, Method::Resumed, 7, 1);
        let got: Vec<f32> = results.iter().flat_map(|r| r.patched.iter().copied()).collect();
        let want: Vec<f32> = gs.experiments.iter().flat_map(|e| e.patched.iter().copied()).collect();
        assert_forward_close(&format!("{tag} resumed on {dev_name}"), &got, &want);
        n += gs.experiments.len();
    }
    println!("{family}: {n} naive and resumed: max abs error {worst:.3e} vs HF hooks");
}

#[test]
fn llama_patching_matches_hf() {
    check_family("llama");
}
#[test]
fn mistral_patching_matches_hf() {
    check_family("mistral");
}
#[test]
fn qwen2_patching_matches_hf() {
    check_family("qwen2");
}
#[test]
fn gemma2_patching_matches_hf() {
    check_family("gemma2");
}
#[test]
fn phi3_patching_matches_hf() {
    check_family("phi3");
}
#[test]
fn olmo2_patching_matches_hf() {
    check_family("olmo2");
}
