//! Patching sweeps: resumed segments equal the naive full-forward method for every site kind,
//! windows of 1 and 5 layers, one and several positions, prompts of different lengths, every
//! family (random 6-layer checkpoints with each fixture's config), on the CPU reference and on the
//! device (the emulator, or the GPU of PATCHBAY_TEST_DEVICE).

mod common;

use common::kernels::test_driver;
use common::*;
use patchbay::backend::emu::{EmuDriver, FiberOrder};
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{Engine, RunRequest, Segment};
use patchbay::experiments::cost;
use patchbay::intervene::{Intervention, Op};
use patchbay::logits::label_metrics_row;
use patchbay::sites::{Positions, Site};
use std::collections::HashSet;

use patchbay::experiments::patch::{CleanSchedule, ExperimentResult, Method, Overflow, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep};
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
/// groups only. The others are spilled from the clean pass to a file and read back in their
/// group, or recomputed then (the device, planned as a GPU, recomputes by default): every way
/// equals the naive method, and a resumed or sharded run of the later groups gives the same
/// bits as the whole run. (Not the same bits as when every clean run is held: the budget also
/// cuts the target groups, so the segments are batched differently.)
#[test]
fn resumed_equals_naive_when_the_budget_forces_spilling_or_recomputing() {
    let dir = synth_family("llama", 6, 31);
    let model = Model::load(dir.path()).unwrap();
    let (_, dev) = counted_device(&model);
    let prompts = random_prompts(8, &[33, 41, 30, 37, 35, 40, 32, 36], model.cfg.vocab_size, 7);
    // Each target's source lies in another group, before or after it.
    let pairs: Vec<Pair> = (0..8).flat_map(|t| [Pair { source: (t + 5) % 8, target: t }, Pair { source: (t + 2) % 8, target: t }]).collect();
    let spec = SweepSpec { sites: vec![SiteKind::ResidPost, SiteKind::MlpOut], units: None, window: 3, centers: all_centers(3, 6), positions: vec![-1, -2], label_tokens: vec![3, 50, 7, 200] };
    let exps = experiments(&pairs, &spec, 6).unwrap();
    // The device in `auto` recomputes (planned as a GPU); each engine also runs the other way.
    let runs: [(&dyn Engine, Overflow, &str, f32, f32); 4] = [
        (&model, Overflow::Spill, "spill", F32_ATOL, F32_RTOL),
        (&model, Overflow::Recompute, "recompute", F32_ATOL, F32_RTOL),
        (&dev, Overflow::Auto, "recompute", DEVICE_SAME_ATOL, DEVICE_SAME_RTOL),
        (&dev, Overflow::Spill, "spill", DEVICE_SAME_ATOL, DEVICE_SAME_RTOL),
    ];
    for (engine, overflow, mode, atol, rtol) in runs {
        let name = format!("{} {overflow:?}", engine.device_name());
        let sweep = |mem_budget: usize, method: Method, skip: &HashSet<usize>| {
            let settings = RunSettings { method, skip, batch_rows: 20, mem_budget, overflow, progress: &indicatif::ProgressBar::hidden() };
            let mut out = Vec::new();
            run_sweep(engine, &prompts, &spec, &exps, &settings, &mut |r| {
                out.push(r);
                Ok(())
            })
            .unwrap();
            out.sort_by_key(|r| r.id);
            out
        };
        // Room for the source values and the clean runs of about two targets.
        let all = CleanSchedule::new(engine, &prompts, &exps, &spec, usize::MAX, overflow);
        let budget = all.source_bytes + 2 * engine.clean_run_bytes(41);
        let tight = CleanSchedule::new(engine, &prompts, &exps, &spec, budget, overflow);
        assert!(tight.groups.len() > 2, "{name}: {tight:?}");
        assert!(!tight.held.is_empty() && tight.not_held() > 0, "{name}: {tight:?}");
        assert_eq!((all.held.len(), all.not_held()), (8, 0));
        assert_eq!(tight.summary()["target_clean_runs"], mode, "{name}: {}", tight.summary());
        let none = HashSet::new();
        let naive = sweep(0, Method::Naive, &none);
        let resumed = sweep(budget, Method::Resumed, &none);
        let held = sweep(usize::MAX, Method::Resumed, &none);
        assert_same_within(&name, &resumed, &naive, atol, rtol);
        assert_same_within(&format!("{name} held"), &held, &naive, atol, rtol);
        // Resumed with the first groups done (skipped), and as a shard of the later groups: the
        // passes left to run give the same bits as the whole run.
        let later: HashSet<usize> = tight.groups[1..].iter().flatten().copied().collect();
        let skip: HashSet<usize> = exps.iter().filter(|e| !later.contains(&e.pair.target)).map(|e| e.id).collect();
        let rest = sweep(budget, Method::Resumed, &skip);
        assert_eq!(rest.len(), exps.len() - skip.len());
        for r in &rest {
            assert_eq!(r, &resumed[r.id], "{name}: experiment {}", r.id);
        }
        assert!(naive.iter().any(|r| r.patched != r.clean_target), "no patch changed the logits");
    }
    assert_eq!(dev.kv_blocks().0, 0, "every spilled or recomputed clean run gave its KV blocks back");
}

/// A clean run written as bytes and made again from them is the same run: segments resumed from
/// either give the same bits, on the CPU and on the device; bytes of the wrong size are refused.
#[test]
fn clean_runs_round_trip_through_bytes() {
    let dir = synth_family("qwen2", 4, 17);
    let model = Model::load(dir.path()).unwrap();
    let (_, dev) = counted_device(&model);
    let prompts = random_prompts(2, &[21, 35], model.cfg.vocab_size, 6);
    let last = Positions::List(vec![-1]);
    let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(&[3, 50, 7]), ..Default::default() };
    let engines: [&dyn Engine; 2] = [&model, &dev];
    for engine in engines {
        let name = engine.device_name();
        let (runs, _) = engine.run_clean(&prompts, &RunRequest::default()).unwrap();
        let bytes = engine.clean_run_to_bytes(&runs[1]).unwrap();
        assert_eq!(engine.clean_run_from_bytes(35, &bytes[1..]).err().map(|e| e.to_string().contains("expected")), Some(true), "{name}");
        let again = engine.clean_run_from_bytes(35, &bytes).unwrap();
        assert_eq!(engine.clean_run_to_bytes(&again).unwrap(), bytes, "{name}: bytes of the restored run");
        for p0 in [16, 19, 34] {
            let seg = |clean| [Segment { clean, p0 }];
            let a = engine.run_segments(1, &seg(&runs[1]), &req).unwrap().logits;
            let b = engine.run_segments(1, &seg(&again), &req).unwrap().logits;
            assert_eq!(a, b, "{name}: segment from {p0}");
        }
    }
    let (runs, _) = model.run_clean(&prompts, &RunRequest::default()).unwrap();
    assert!(dev.clean_run_to_bytes(&runs[0]).is_err(), "a CPU clean run is not the device's to spill");
}

/// A device with counters, and the model uploaded to it.
fn counted_device(model: &Model) -> (std::sync::Arc<EmuDriver>, DeviceModel) {
    let emu = std::sync::Arc::new(EmuDriver::with_order(FiberOrder::Forward));
    let dev = DeviceModel::upload(model, emu.clone()).unwrap();
    (emu, dev)
}

/// The device's segment forward dispatches per layer what `cost` counts (kernel launches,
/// GEMMs and device copies on the emulator's counter), with and without copies of partial
/// clean blocks (one launch per call for every layer), on families with and without biases,
/// q/k norms and post-norms.
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
        let mut calls = Vec::new();
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
            assert_eq!(per_layer as f64, cost::layer_dispatches(&model.cfg, cost::Path::Gpu), "{family}, segments from {p0s:?}");
            calls.push(dispatches(1));
        }
        // The partial blocks' copies (segments from 19 and 30) are one launch for all layers.
        assert_eq!(calls[1], calls[0] + 1, "{family}: {calls:?}");
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

/// A whole resumed sweep on the device brings back the label logits of its calls (and each
/// call's non-finite count) and nothing else: the sources' values at the patched sites are held
/// on the device from the clean pass to the segments that read them, never downloaded, and not
/// uploaded again either (the uploads are a fraction of what the values would take).
#[test]
fn device_sweep_moves_no_activations_through_the_host() {
    let dir = synth_family("llama", 6, 12);
    let model = Model::load(dir.path()).unwrap();
    let (emu, dev) = counted_device(&model);
    let prompts = random_prompts(5, &DEVICE_LENS, model.cfg.vocab_size, 5);
    let pairs: Vec<Pair> = (0..5).flat_map(|s| (0..5).filter(move |&t| t != s).map(move |t| Pair { source: s, target: t })).collect();
    let labels = vec![3u32, 50, 7, 200, 99];
    let spec = SweepSpec { sites: vec![SiteKind::ResidPost, SiteKind::AttnOut, SiteKind::MlpOut], units: None, window: 3, centers: all_centers(3, 6), positions: vec![-1, -2], label_tokens: labels.clone() };
    let before = emu.traffic();
    let results = run_patch_sweep(&dev, &prompts, &spec, &pairs, Method::Resumed, 64, usize::MAX);
    let t = emu.traffic().since(before);
    // Per call the label logits and the non-finite count (one u64); a segment call also its
    // experiments' label metrics (pred, logit difference, probability, log-sum-exp: 4 x 4 bytes
    // each, 4 downloads). The clean pass reads every prompt's logits once.
    let (n_exp, l) = (results.len(), labels.len());
    let rest = t.dtoh_bytes as usize - (prompts.len() + n_exp) * l * 4 - n_exp * 16;
    assert_eq!(rest % 8, 0, "{t:?}");
    let calls = rest / 8;
    let segment_calls = (t.dtoh as usize - 2 * calls) / 4;
    assert!(segment_calls >= 1 && segment_calls < calls && t.dtoh as usize == 2 * calls + 4 * segment_calls, "{t:?}: {calls} calls");
    // The metrics came from the device's label_metrics kernel: they agree with the reference
    // on the logits that came back.
    for r in &results {
        let m = label_metrics_row(&r.patched, r.source_pred as i32, r.target_pred as i32, r.source_pred as i32);
        assert_eq!(r.pred, m.pred as usize, "experiment {}", r.id);
        assert_close(&format!("experiment {} metrics", r.id), &[r.logit_diff, r.source_prob], &[m.logit_diff, m.prob], 1e-6, 1e-5);
    }
    let source_bytes = results.len() * spec.window * spec.positions.len() * model.cfg.d_model * 4;
    eprintln!("sweep of {} experiments in {calls} calls: uploads {} B in {} copies; the patched values would be {source_bytes} B", results.len(), t.htod_bytes, t.htod);
    assert!((t.htod_bytes as usize) < source_bytes / 2, "{t:?}: {source_bytes} B of source values");
    assert!(results.iter().any(|r| r.patched != r.clean_target), "no patch changed the logits");
    // Metric indices must match the logits rows, on both engines.
    let last = Positions::List(vec![-1]);
    let bad = RunRequest { logits_at: Some(&last), logit_tokens: Some(&labels), label_metrics: Some(&[[0, 1, 0]; 2]), ..Default::default() };
    let engines: [&dyn Engine; 2] = [&model, &dev];
    for engine in engines {
        let err = engine.run_prompts(&prompts[..1], &bad).err().unwrap().to_string();
        assert!(err.contains("2 index triples for 1 logits rows"), "{}: {err}", engine.device_name());
    }
}

/// `Op::PatchHeld` from captures held by the engine that made them equals `Op::Patch` with the
/// same values, on the CPU and on the device (where the captures do not come back when finite);
/// held rows can be selected per batch (`for_batch`); rows a device holds are refused by the CPU
/// and by another device's engine; host-held rows patch on a device (uploaded as a Patch).
#[test]
fn held_captures_patch_like_their_values() {
    use patchbay::intervene::{Capture, for_batch};
    let dir = synth_family("gemma2", 4, 21);
    let model = Model::load(dir.path()).unwrap();
    let (_, dev) = counted_device(&model);
    let (_, other) = counted_device(&model);
    let prompts = random_prompts(3, &[19, 26, 11], model.cfg.vocab_size, 8);
    let (site, units) = (Site::new(2, SiteKind::Z), Some(vec![1, 3]));
    let caps = [Capture { site, positions: Positions::List(vec![-1, -3]) }];
    let last = Positions::List(vec![-1]);
    let labels = [3u32, 50, 7];
    let engines: [(&str, &dyn Engine); 2] = [("cpu", &model), ("emu", &dev)];
    for (name, engine) in engines {
        let hold = RunRequest { captures: &caps, hold_captures: true, ..Default::default() };
        let out = engine.run_prompts(&prompts[..2], &hold).unwrap();
        let held = out.held.clone().unwrap();
        let values = model.run_prompts(&prompts[..2], &RunRequest { captures: &caps, ..Default::default() }).unwrap().captured.remove(0).data;
        assert_eq!(out.captured[0].data.is_empty(), name == "emu", "{name}: held captures come back on the CPU only");
        let w = values.len() / 4;
        // Prompt 2 patched at two positions from prompt 1's rows (rows 2, 3 of the capture).
        let patch = |op: Op| vec![Intervention { site, prompts: Some(vec![0]), positions: Positions::List(vec![-1, -4]), units: units.clone(), op }];
        let from = held.rows(0, vec![2, 3]).unwrap();
        let sel = |r: usize| [w / 4..w / 2, 3 * w / 4..w].into_iter().flat_map(|c| values[r * w..(r + 1) * w][c].to_vec()).collect::<Vec<f32>>();
        let host: Vec<f32> = [sel(2), sel(3)].concat();
        let run = |ivs: &[Intervention]| engine.run_prompts(&prompts[2..], &RunRequest { interventions: ivs, logits_at: Some(&last), logit_tokens: Some(&labels), ..Default::default() }).unwrap().logits;
        let (got, want) = (run(&patch(Op::PatchHeld { from: from.clone() })), run(&patch(Op::Patch { values: host })));
        // The device's own capture (bf16 forward) against the CPU's f32 values: close, not equal.
        assert_forward_close(&format!("{name}: held vs host patch"), &got, &want);
        assert_ne!(got, run(&[]), "{name}: the patch changed nothing");
        // for_batch keeps the held rows of the batch's prompts: one row each, for prompts 0 and 2 of 3.
        let iv = Intervention { site, prompts: None, positions: Positions::List(vec![-1]), units: None, op: Op::PatchHeld { from: held.rows(0, vec![0, 2, 1]).unwrap() } };
        let batch = for_batch(&[iv], &model.cfg, &prompts, 1..3).unwrap();
        assert!(matches!(&batch[0].op, Op::PatchHeld { from } if from.rows == [2, 1]), "{:?}", batch[0].op);
        let bad = Intervention { site, prompts: None, positions: Positions::List(vec![-1]), units: None, op: Op::PatchHeld { from: held.rows(0, vec![0, 1]).unwrap() } };
        assert!(for_batch(&[bad], &model.cfg, &prompts, 1..3).unwrap_err().to_string().contains("2 held rows, expected 1 or 3"));
        // A held row of another site's width.
        let wrong = vec![Intervention { site: Site::new(2, SiteKind::MlpOut), prompts: None, positions: last.clone(), units: None, op: Op::PatchHeld { from: held.rows(0, vec![2]).unwrap() } }];
        let err = engine.run_prompts(&prompts[2..], &RunRequest { interventions: &wrong, ..Default::default() }).err().unwrap().to_string();
        assert!(err.contains("held rows of") && err.contains("the site's rows have"), "{name}: {err}");
        if name == "emu" {
            let err = model.run_prompts(&prompts[2..], &RunRequest { interventions: &patch(Op::PatchHeld { from: from.clone() }), ..Default::default() }).err().unwrap().to_string();
            assert!(err.contains("rows a device holds"), "{err}");
            let err = other.run_prompts(&prompts[2..], &RunRequest { interventions: &patch(Op::PatchHeld { from: from.clone() }), ..Default::default() }).err().unwrap().to_string();
            assert!(err.contains("another engine"), "{err}");
            let pattern = [Capture { site: Site::new(0, SiteKind::Pattern), positions: last.clone() }];
            let err = dev.run_prompts(&prompts[..1], &RunRequest { captures: &pattern, hold_captures: true, ..Default::default() }).err().unwrap().to_string();
            assert!(err.contains("not held"), "{err}");
        } else {
            // Rows the CPU holds patch on a device too (they are uploaded).
            let on_dev = dev.run_prompts(&prompts[2..], &RunRequest { interventions: &patch(Op::PatchHeld { from: from.clone() }), logits_at: Some(&last), logit_tokens: Some(&labels), ..Default::default() }).unwrap().logits;
            assert_forward_close("cpu-held rows on the device", &on_dev, &got);
        }
    }
}
