//! Patching sweeps: resumed segments equal the naive full-forward method for every site kind,
//! windows of 1 and 5 layers, one and several positions, prompts of different lengths, every
//! family (random 6-layer checkpoints with each fixture's config).

mod common;

use std::collections::HashSet;

use common::*;
use indicatif::ProgressBar;
use patchbay::experiments::patch::{ExperimentResult, Method, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep};
use patchbay::model::Model;
use patchbay::sites::SiteKind;

fn sweep(model: &Model, prompts: &[Vec<u32>], spec: &SweepSpec, pairs: &[Pair], method: Method, batch_rows: usize, mem_budget: usize) -> Vec<ExperimentResult> {
    let exps = experiments(pairs, spec, model.cfg.n_layers).unwrap();
    let mut out = Vec::new();
    let settings = RunSettings { method, skip: &HashSet::new(), batch_rows, mem_budget, progress: &ProgressBar::hidden() };
    run_sweep(model, prompts, spec, &exps, &settings, &mut |r| {
        out.push(r);
        Ok(())
    })
    .unwrap();
    out.sort_by_key(|r| r.id);
    assert_eq!(out.len(), exps.len());
    out
}

fn assert_same(tag: &str, resumed: &[ExperimentResult], naive: &[ExperimentResult]) {
    for (r, n) in resumed.iter().zip(naive) {
        let name = format!("{tag}: experiment {} ({} centre {} pair {}->{})", r.id, r.site, r.center, r.source, r.target);
        assert_close(&name, &r.patched, &n.patched, F32_ATOL, F32_RTOL);
        assert_close(&format!("{name} clean target"), &r.clean_target, &n.clean_target, F32_ATOL, F32_RTOL);
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
                let naive = sweep(&model, &prompts, &spec, &pairs, Method::Naive, 0, 0);
                // Small batches and a memory budget that forces several target groups.
                let resumed = sweep(&model, &prompts, &spec, &pairs, Method::Resumed, 7, 1);
                assert_same(&format!("{family} {sites:?} W{window}"), &resumed, &naive);
                // Patching changes something (the test can fail).
                assert!(naive.iter().any(|r| r.patched != r.clean_target), "{family}: no patch changed the logits");
            }
        }
    }
}

#[test]
fn windows_and_centres() {
    use patchbay::experiments::patch::window_layers;
    assert_eq!(all_centers(5, 16), (2..=13).collect::<Vec<_>>());
    assert_eq!(window_layers(2, 5, 16), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(window_layers(14, 5, 16), None);
    assert_eq!(all_centers(1, 4), vec![0, 1, 2, 3]);
}
