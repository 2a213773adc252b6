//! Patching sweeps: resumed segments equal the naive full-forward method for every site kind,
//! windows of 1 and 5 layers, one and several positions, prompts of different lengths, every
//! family (random 6-layer checkpoints with each fixture's config), on the CPU reference and on the
//! device (the emulator, or the GPU of PATCHBAY_TEST_DEVICE).

mod common;

use common::kernels::test_driver;
use common::*;
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::experiments::patch::{ExperimentResult, Method, Pair, SweepSpec, all_centers};
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

#[test]
fn windows_and_centres() {
    use patchbay::experiments::patch::window_layers;
    assert_eq!(all_centers(5, 16), (2..=13).collect::<Vec<_>>());
    assert_eq!(window_layers(2, 5, 16), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(window_layers(14, 5, 16), None);
    assert_eq!(all_centers(1, 4), vec![0, 1, 2, 3]);
}
