//! Resumed segments (DESIGN.md section 1) on the CPU reference: starting at layer L from the
//! clean residual, over a clean KV prefix shared by several segments, equals the full forward
//! with the same interventions.

mod common;

use std::sync::Arc;

use common::*;
use patchbay::engine::Engine;
use patchbay::engine::forward::{KvCache, RunRequest, SeqInput, SeqRows};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};

/// A deterministic pseudo-random vector.
fn vector(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| patchbay::rng::gaussian(seed, 7, i as u64)).collect()
}

#[test]
fn resumed_segments_equal_full_forward() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let d = cfg.d_model;
        let prompt = prompt_ids(family).into_iter().max_by_key(Vec::len).unwrap();
        let n = prompt.len();
        // Clean pass: keep the cache and resid_pre of every layer at every position.
        let mut clean_cache = KvCache::new(cfg.n_layers);
        let caps: Vec<Capture> = (0..cfg.n_layers).map(|l| Capture { site: Site::new(l, SiteKind::ResidPre), positions: Positions::All }).collect();
        let clean = model.run(&mut [SeqInput::tokens(&prompt, &mut clean_cache)], &[], &caps, None, None).unwrap();
        let clean_cache = Arc::new(clean_cache);
        for layer in 0..cfg.n_layers {
            for p0 in [n - 1, n - 4] {
                // Several segments resumed from the same clean prefix in one call.
                let experiments: Vec<Vec<Intervention>> = vec![
                    vec![Intervention { site: Site::new(layer, SiteKind::ResidPost), prompts: None, positions: Positions::List(vec![p0 as i64]), units: None, op: Op::Add { beta: 2.0, v: vector(d, layer as u64), normalize: false } }],
                    vec![Intervention { site: Site::new(layer, SiteKind::Z), prompts: None, positions: Positions::List(vec![-1, p0 as i64]), units: Some(vec![1]), op: Op::Zero }],
                    vec![Intervention { site: Site::new(cfg.n_layers - 1, SiteKind::MlpPost), prompts: None, positions: Positions::List(vec![-1]), units: Some(vec![0, 3]), op: Op::Scale { alpha: 3.0 } }],
                ];
                let mut caches: Vec<KvCache> = experiments.iter().map(|_| KvCache::resume(&clean_cache, layer, p0).unwrap()).collect();
                let x0 = &clean.captured[layer].data[p0 * d..n * d];
                let mut seqs: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { rows: SeqRows::Resid(x0), cache: c }).collect();
                // Each experiment's interventions apply to its own segment.
                let ivs: Vec<Intervention> = experiments
                    .iter()
                    .enumerate()
                    .flat_map(|(i, e)| e.iter().cloned().map(move |mut iv| {
                        iv.prompts = Some(vec![i]);
                        iv
                    }))
                    .collect();
                let last = Positions::List(vec![-1]);
                let req = RunRequest { interventions: &ivs, logits_at: Some(&last), ..Default::default() };
                let resumed = model.run_from(layer, &mut seqs, &req).unwrap();
                for (i, e) in experiments.iter().enumerate() {
                    let naive = model.run_prompts(std::slice::from_ref(&prompt), &RunRequest { interventions: e, logits_at: Some(&Positions::List(vec![-1])), ..Default::default() }).unwrap();
                    let v = cfg.vocab_size;
                    assert_close(&format!("{family}: layer {layer} p0 {p0} experiment {i}"), &resumed.logits[i * v..(i + 1) * v], &naive.logits, 1e-5, 1e-5);
                }
            }
        }
    }
}

#[test]
fn resume_rejects_bad_requests() {
    let model = Model::load(&fixture("llama")).unwrap();
    let prompt = prompt_ids("llama").remove(0);
    let mut cache = KvCache::new(model.cfg.n_layers);
    model.run(&mut [SeqInput::tokens(&prompt, &mut cache)], &[], &[], None, None).unwrap();
    let cache = Arc::new(cache);
    assert!(KvCache::resume(&cache, 0, prompt.len() + 1).is_err(), "prefix longer than the clean cache");
    let mut seg = KvCache::resume(&cache, 1, 2).unwrap();
    let x = vec![0.0; model.cfg.d_model];
    // Starting below the layer the segment was resumed at.
    let e = model.run_from(0, &mut [SeqInput { rows: SeqRows::Resid(&x), cache: &mut seg }], &RunRequest::default()).err().unwrap().to_string();
    assert!(e.contains("starts at layer 1"), "{e}");
    // Tokens cannot start mid-network.
    let e = model.run_from(1, &mut [SeqInput::tokens(&prompt, &mut seg)], &RunRequest::default()).err().unwrap().to_string();
    assert!(e.contains("layer 0"), "{e}");
}

#[test]
fn label_logits_are_the_columns_of_full_logits() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let prompts = prompt_ids(family);
        let last = Positions::List(vec![-1, -2]);
        let full = model.run_prompts(&prompts, &RunRequest { logits_at: Some(&last), ..Default::default() }).unwrap();
        let labels = [5u32, 300, 17, 5];
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(model.cfg.n_layers)).collect();
        let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
        let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(&labels), ..Default::default() };
        let sel = model.run_from(0, &mut seqs, &req).unwrap();
        let v = model.cfg.vocab_size;
        let want: Vec<f32> = (0..full.logit_rows.len()).flat_map(|r| labels.iter().map(move |&t| (r, t))).map(|(r, t)| full.logits[r * v + t as usize]).collect();
        assert_close(&format!("{family}: label logits"), &sel.logits, &want, 1e-6, 1e-6);
    }
}
