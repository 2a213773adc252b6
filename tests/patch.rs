//! Patching sweeps: resumed segments equal the naive full-forward method for every site kind,
//! windows of 1 and 5 layers, one and several positions, prompts of different lengths, every
//! family (random 6-layer checkpoints with each fixture's config), on the CPU reference and on the
//! device (the emulator, or the GPU of PATCHBAY_TEST_DEVICE).

mod common;

use common::kernels::test_driver;
use common::*;
use patchbay::backend::emu::{EmuDriver, FiberOrder};
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::device_forward::BLOCK_SIZE;
use patchbay::engine::{Engine, RunRequest, Segment};
use patchbay::experiments::cost;
use patchbay::intervene::{Intervention, Op};
use patchbay::sites::{Positions, Site};
use std::collections::HashSet;

use patchbay::experiments::patch::{CleanSchedule, ExperimentResult, Method, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep};
use patchbay::model::Model;
use patchbay::sites::SiteKind;

fn assert_same(tag: &str, resumed: &[ExperimentResult], naive: &[ExperimentResult]) {
    assert_same_within(tag, resumed, naive, F32_ATOL, F32_RTOL);
}

fn assert_same_within(tag: &str, resumed: &[ExperimentResult], naive: &[ExperimentResult], atol: f32, rtol: f32) {
    for (r, n) in resumed.iter().zip(naive) {
        let name = format!("{tag}: experiment {} ({} centre {} pair {}->{})", r.id, r.site, r.center, r.source, r.target);
        assert_close(&name, &r.patched, &n.patched, atol, rtol);
        assert_close(&format!("{name} clean target"), &r.clean_target, &n.clean_target, atol, rtol);
        assert_eq!((r.pred, r.target_pred, r.source_pred, &r.layers, &r.positions), (n.pred, n.target_pred, n.source_pred, &n.layers, &n.positions), "{name}");
    }
}

#[test]
fn resumed_equals_naive_on_every_family_and_site() {
    for (fi, family) in FAMILIES.iter().enumerate() {
        let dir = synth_family(family, 6, 11 + fi as u64);
        let model = Model::load(dir.path()).unwrap();
        let vocab = model.cfg.vocab_size;
        let prompts = random_prompts(5, &[9, 13, 6, 17, 11], vocab, fi as u64);
        let pairs = [Pair { source: 0, target: 1 }, Pair { source: 3, target: 2 }, Pair { source: 1, target: 4 }, Pair { source: 4, target: 3 }];
        let labels = vec![3u32, 50, 7, 200, 99];
        for (sites, units) in [
            (vec![SiteKind::ResidPre, SiteKind::ResidPost, SiteKind::AttnOut, SiteKind::MlpOut], None),
            (vec![SiteKind::Z], Some(vec![1, 3])),
            (vec![SiteKind::MlpPost], Some(vec![0, 5, 40])),
        ] {
            for (window, positions) in [(1, vec![-1]), (5, vec![-1, -3])] {
                let spec = SweepSpec { sites: sites.clone(), units: units.clone(), window, centers: all_centers(window, 6), positions, label_tokens: labels.clone() };
                let naive = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Naive, 0, 0);
                // Small batches and a memory budget that forces several target groups.
                let resumed = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Resumed, 7, 1);
                assert_same(&format!("{family} {sites:?} W{window}"), &resumed, &naive);
                // Patching changes something (the test can fail).
                assert!(naive.iter().any(|r| r.patched != r.clean_target), "{family}: no patch changed the logits");
            }
        }
    }
}

/// Prompts crossing KV block boundaries (16 positions) so segments share full clean prefix
/// blocks, copy partial ones, and start exactly at a block boundary (17 - 1 = 16).
const DEVICE_LENS: [usize; 5] = [21, 35, 17, 9, 33];

/// The device's resumed segments (pool blocks shared with clean runs, partial blocks copied on
/// write, residual rows kept on the device) equal its naive full forwards; both equal the CPU
/// reference within the bf16 forward tolerances.
#[test]
fn resumed_equals_naive_on_the_device() {
    for (fi, family) in FAMILIES.iter().enumerate() {
        let dir = synth_family(family, 6, 11 + fi as u64);
        let model = Model::load(dir.path()).unwrap();
        let (dev_name, driver) = test_driver(if fi % 2 == 0 { FiberOrder::Forward } else { FiberOrder::Reverse });
        let dev = DeviceModel::upload(&model, driver).unwrap();
        let prompts = random_prompts(5, &DEVICE_LENS, model.cfg.vocab_size, 100 + fi as u64);
        let pairs = [Pair { source: 0, target: 1 }, Pair { source: 1, target: 4 }, Pair { source: 4, target: 3 }];
        let labels = vec![3u32, 50, 7, 200, 99];
        for (sites, units, window, positions) in [
            (vec![SiteKind::ResidPre, SiteKind::ResidPost, SiteKind::AttnOut, SiteKind::MlpOut], None, 1, vec![-1]),
            (vec![SiteKind::Z], Some(vec![1, 3]), 5, vec![-1, -3]),
            (vec![SiteKind::MlpPost], Some(vec![0, 5, 40]), 1, vec![-2]),
        ] {
            let spec = SweepSpec { sites: sites.clone(), units: units.clone(), window, centers: all_centers(window, 6), positions, label_tokens: labels.clone() };
            let tag = format!("{family} ({dev_name}) {sites:?} W{window}");
            let naive = run_patch_sweep(&dev, &prompts, &spec, &pairs, Method::Naive, 0, 0);
            // Small batches and target groups (blocks given back and reused), then one batch.
            let small = run_patch_sweep(&dev, &prompts, &spec, &pairs, Method::Resumed, 40, 1);
            let whole = run_patch_sweep(&dev, &prompts, &spec, &pairs, Method::Resumed, 1 << 20, usize::MAX);
            // Same bf16 KV and weights on both paths; only GEMM batch shapes differ.
            assert_same_within(&format!("{tag} small batches"), &small, &naive, DEVICE_SAME_ATOL, DEVICE_SAME_RTOL);
            assert_same_within(&format!("{tag} one batch"), &whole, &naive, DEVICE_SAME_ATOL, DEVICE_SAME_RTOL);
            let cpu = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Resumed, 1 << 20, usize::MAX);
            let flat = |rs: &[ExperimentResult]| rs.iter().flat_map(|r| r.patched.iter().copied()).collect::<Vec<f32>>();
            assert_forward_close(&format!("{tag} device vs cpu"), &flat(&small), &flat(&cpu));
            assert!(naive.iter().any(|r| r.patched != r.clean_target), "{tag}: no patch changed the logits");
        }
    }
}

/// Resumed vs naive on one device: identical bf16 weights and KV, f32 residual; the paths differ
/// only in GEMM row counts (and so possibly in cuBLAS's summation order on a GPU).
const DEVICE_SAME_ATOL: f32 = 1e-3;
const DEVICE_SAME_RTOL: f32 = 1e-3;

/// Sources and targets interleave across target groups (group 0's sources are targets of later
/// groups and the other way round) and the memory budget holds the clean runs of the first
/// groups only, so the others are recomputed in their group: still equal to the naive method,
/// with the same numbers as when every clean run is held.
#[test]
fn resumed_equals_naive_when_the_budget_forces_recomputing() {
    let dir = synth_family("llama", 6, 31);
    let model = Model::load(dir.path()).unwrap();
    let prompts = random_prompts(8, &[33, 41, 30, 37, 35, 40, 32, 36], model.cfg.vocab_size, 7);
    // Each target's source lies in another group, before or after it.
    let pairs: Vec<Pair> = (0..8).flat_map(|t| [Pair { source: (t + 5) % 8, target: t }, Pair { source: (t + 2) % 8, target: t }]).collect();
    let spec = SweepSpec { sites: vec![SiteKind::ResidPost, SiteKind::MlpOut], units: None, window: 3, centers: all_centers(3, 6), positions: vec![-1, -2], label_tokens: vec![3, 50, 7, 200] };
    let exps = experiments(&pairs, &spec, 6).unwrap();
    // Room for the source values and the clean runs of about two targets.
    let all = CleanSchedule::new(&model, &prompts, &exps, &spec, usize::MAX);
    let budget = all.source_bytes + 2 * model.clean_run_bytes(41);
    let tight = CleanSchedule::new(&model, &prompts, &exps, &spec, budget);
    assert!(tight.groups.len() > 2, "{tight:?}");
    assert!(!tight.held.is_empty() && tight.recomputed() > 0, "{tight:?}");
    assert_eq!((all.held.len(), all.recomputed()), (8, 0));
    assert_eq!(tight.summary()["target_clean_runs"], "recompute");
    let naive = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Naive, 0, 0);
    let recomputed = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Resumed, 20, budget);
    let held = run_patch_sweep(&model, &prompts, &spec, &pairs, Method::Resumed, 20, usize::MAX);
    assert_same("recomputed", &recomputed, &naive);
    assert_same("held", &held, &naive);
    // Resumed with the first groups done (skipped), and as a shard of the later groups: the
    // passes left to run give the same bits as the whole run.
    let later: HashSet<usize> = tight.groups[1..].iter().flatten().copied().collect();
    let skip: HashSet<usize> = exps.iter().filter(|e| !later.contains(&e.pair.target)).map(|e| e.id).collect();
    let settings = RunSettings { method: Method::Resumed, skip: &skip, batch_rows: 20, mem_budget: budget, progress: &indicatif::ProgressBar::hidden() };
    let mut rest = Vec::new();
    run_sweep(&model, &prompts, &spec, &exps, &settings, &mut |r| {
        rest.push(r);
        Ok(())
    })
    .unwrap();
    assert_eq!(rest.len(), exps.len() - skip.len());
    for r in &rest {
        assert_eq!(r, &recomputed[r.id], "experiment {}", r.id);
    }
    assert!(naive.iter().any(|r| r.patched != r.clean_target), "no patch changed the logits");
}

/// A device with counters, and the model uploaded to it.
fn counted_device(model: &Model) -> (std::sync::Arc<EmuDriver>, DeviceModel) {
    let emu = std::sync::Arc::new(EmuDriver::with_order(FiberOrder::Forward));
    let dev = DeviceModel::upload(model, emu.clone()).unwrap();
    (emu, dev)
}

/// The device's segment forward dispatches per layer what `cost` counts (kernel launches,
/// GEMMs and device copies on the emulator's counter), with and without copies of partial
/// clean blocks, on families with and without biases, q/k norms and post-norms.
#[test]
fn segment_dispatches_per_layer_agree_with_cost() {
    for (fi, family) in ["llama", "qwen2", "gemma2", "olmo2"].into_iter().enumerate() {
        let dir = synth_family(family, 4, 40 + fi as u64);
        let model = Model::load(dir.path()).unwrap();
        let (emu, dev) = counted_device(&model);
        let prompts = random_prompts(2, &[21, 35], model.cfg.vocab_size, 3);
        let (runs, _) = dev.run_clean(&prompts, &RunRequest::default()).unwrap();
        let last = Positions::List(vec![-1]);
        let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(&[3, 50, 7]), ..Default::default() };
        for p0s in [[16, 32], [19, 30]] {
            let segs: Vec<Segment> = runs.iter().zip(p0s).map(|(clean, p0)| Segment { clean, p0 }).collect();
            // Once first: the KV pool grows (a device copy per layer) on its first segments.
            dev.run_segments(1, &segs, &req).unwrap();
            let dispatches = |start: usize| {
                let before = emu.traffic();
                dev.run_segments(start, &segs, &req).unwrap();
                emu.traffic().since(before).dispatches()
            };
            let per_layer = dispatches(1) - dispatches(2);
            let copies = p0s.iter().any(|p| p % BLOCK_SIZE != 0);
            assert_eq!(per_layer as f64, cost::layer_dispatches(&model.cfg, cost::Path::Gpu, copies), "{family}, segments from {p0s:?}");
        }
    }
}

/// A patched segment forward on the device brings back the label logits and the non-finite
/// count only: no activations are downloaded.
#[test]
fn patched_segments_download_only_label_logits() {
    let dir = synth_family("llama", 4, 9);
    let model = Model::load(dir.path()).unwrap();
    let (emu, dev) = counted_device(&model);
    let prompts = random_prompts(3, &[21, 35, 9], model.cfg.vocab_size, 4);
    let (runs, _) = dev.run_clean(&prompts, &RunRequest::default()).unwrap();
    let segs: Vec<Segment> = runs.iter().map(|clean| Segment { clean, p0: clean.len - 1 }).collect();
    let d = model.cfg.d_model;
    let ivs: Vec<Intervention> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| Intervention { site: Site::new(2, SiteKind::ResidPost), prompts: Some(vec![i]), positions: Positions::List(vec![r.len as i64 - 1]), units: None, op: Op::Patch { values: vec![0.25; d] } })
        .collect();
    let last = Positions::List(vec![-1]);
    let labels = [3u32, 50, 7, 200, 99];
    let req = RunRequest { interventions: &ivs, logits_at: Some(&last), logit_tokens: Some(&labels), ..Default::default() };
    let before = emu.traffic();
    let out = dev.run_segments(1, &segs, &req).unwrap();
    let t = emu.traffic().since(before);
    assert_eq!(out.logits.len(), segs.len() * labels.len());
    // The logits, then the count of non-finite values (one u64).
    assert_eq!((t.dtoh, t.dtoh_bytes), (2, (segs.len() * labels.len() * 4 + 8) as u64), "{t:?}");
}

#[test]
fn windows_and_centres() {
    use patchbay::experiments::patch::window_layers;
    assert_eq!(all_centers(5, 16), (2..=13).collect::<Vec<_>>());
    assert_eq!(window_layers(2, 5, 16), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(window_layers(14, 5, 16), None);
    assert_eq!(all_centers(1, 4), vec![0, 1, 2, 3]);
}
