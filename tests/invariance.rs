//! Invariances of the reference forward on every family's test model:
//! KV-cache decode == full recompute, batched == one by one, no-op interventions == none,
//! self-patch == clean.

mod common;

use common::*;
use patchbay::engine::RunRequest;
use patchbay::engine::Engine;
use patchbay::engine::forward::{KvCache, RunOutput, SeqInput};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::model::Model;
use patchbay::model::config::RopeScaling;
use patchbay::sites::{Positions, Site, SiteKind};

fn run(model: &Model, prompts: &[Vec<u32>], ivs: &[Intervention], caps: &[Capture]) -> RunOutput {
    model.run_prompts(prompts, &RunRequest { interventions: ivs, captures: caps, logits_at: Some(&Positions::All), ..Default::default() }).unwrap()
}

fn all_captures(model: &Model) -> Vec<Capture> {
    Site::all(&model.cfg).into_iter().map(|site| Capture { site, positions: Positions::All }).collect()
}

fn for_each_family(f: impl Fn(&str, &Model)) {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap_or_else(|e| panic!("{family}: {e}"));
        f(family, &model);
    }
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for_each_family(|family, model| {
        let mut prompt = prompt_ids(family).into_iter().max_by_key(Vec::len).unwrap();
        // longrope picks its frequencies by sequence length: a cache made while the sequence was
        // short holds keys rotated with the short factors, as in Hugging Face. Stay on one side.
        if let RopeScaling::LongRope { original_max_position, .. } = &model.cfg.rope_scaling {
            prompt.truncate(*original_max_position);
        }
        let full = run(model, std::slice::from_ref(&prompt), &[], &[]);
        let vocab = model.cfg.vocab_size;
        let prefill = 5;
        let mut cache = KvCache::new(model.cfg.n_layers);
        let mut got = Vec::new();
        let mut pos = 0;
        for chunk in [&prompt[..prefill]].into_iter().chain(prompt[prefill..].chunks(1)) {
            let mut seqs = [SeqInput::tokens(chunk, &mut cache)];
            let out = model.run(&mut seqs, &[], &[], Some(&Positions::All), None).unwrap();
            assert_eq!(out.logit_rows.first().map(|r| r.1), Some(pos), "{family}: decode rows start at the cache length");
            pos += chunk.len();
            got.extend_from_slice(&out.logits);
        }
        assert_eq!(cache.len, prompt.len());
        let err = assert_close(&format!("{family}: decode vs full"), &got, &full.logits, F32_ATOL, F32_RTOL);
        assert_eq!(got.len(), prompt.len() * vocab);
        println!("{family}: decode vs full max abs err {err:.2e}");
    });
}

#[test]
fn batched_equals_one_by_one() {
    for_each_family(|family, model| {
        let prompts = prompt_ids(family);
        let caps = all_captures(model);
        // Pattern rows are padded to the batch's longest prompt; compare the other sites.
        let caps: Vec<Capture> = caps.into_iter().filter(|c| c.site.kind != SiteKind::Pattern).collect();
        let batched = run(model, &prompts, &[], &caps);
        let mut logits = Vec::new();
        let mut per_site: Vec<Vec<f32>> = vec![Vec::new(); caps.len()];
        for p in &prompts {
            let one = run(model, std::slice::from_ref(p), &[], &caps);
            logits.extend_from_slice(&one.logits);
            for (acc, c) in per_site.iter_mut().zip(one.captured) {
                acc.extend_from_slice(&c.data);
            }
        }
        assert_close(&format!("{family}: batched logits"), &batched.logits, &logits, 1e-5, 1e-5);
        for ((c, b), one) in caps.iter().zip(&batched.captured).zip(&per_site) {
            assert_close(&format!("{family}: batched {}", c.site), &b.data, one, 1e-5, 1e-5);
        }
    });
}

#[test]
fn no_op_interventions_change_nothing() {
    for_each_family(|family, model| {
        let prompts = prompt_ids(family);
        let clean = run(model, &prompts, &[], &[]);
        let cfg = &model.cfg;
        let mut ivs = Vec::new();
        for site in Site::all(cfg).into_iter().filter(|s| s.kind != SiteKind::Pattern) {
            let (n, w) = site.kind.units(cfg, 0);
            ivs.push(Intervention { site, prompts: None, positions: Positions::All, units: None, op: Op::Scale { alpha: 1.0 } });
            ivs.push(Intervention { site, prompts: None, positions: Positions::List(vec![-1]), units: Some(vec![n - 1]), op: Op::Add { beta: 0.0, v: vec![1.0; w], normalize: false } });
            ivs.push(Intervention { site, prompts: Some(vec![0]), positions: Positions::List(vec![0]), units: Some(vec![0]), op: Op::ProjectSet { beta: 0.0, p: vec![0.5; w * w], v: vec![0.0; w] } });
        }
        // Hooking HeadOut computes o_proj as a sum of per-head products (another summation
        // order): exact elsewhere, within f32 tolerance there.
        let (head_out, exact): (Vec<Intervention>, Vec<Intervention>) = ivs.into_iter().partition(|iv| iv.site.kind == SiteKind::HeadOut);
        let out = run(model, &prompts, &exact, &[]);
        assert_eq!(out.logits, clean.logits, "{family}: no-op interventions changed the logits");
        let out = run(model, &prompts, &head_out, &[]);
        assert_close(&format!("{family}: no-op at attn.hook_result"), &out.logits, &clean.logits, 1e-5, 1e-5);
    });
}

#[test]
fn self_patch_equals_clean() {
    for_each_family(|family, model| {
        let prompts = prompt_ids(family);
        let cfg = &model.cfg;
        let sites: Vec<Site> = Site::all(cfg).into_iter().filter(|s| s.kind != SiteKind::Pattern).collect();
        let caps: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::List(vec![-1, 0]) }).collect();
        let clean = run(model, &prompts, &[], &caps);
        // Patch every site with its own clean activation: nothing may change.
        let ivs: Vec<Intervention> = clean
            .captured
            .iter()
            .map(|c| Intervention { site: c.site, prompts: None, positions: Positions::List(vec![-1, 0]), units: None, op: Op::Patch { values: c.data.clone() } })
            .collect();
        let patched = run(model, &prompts, &ivs, &[]);
        assert_eq!(patched.logits, clean.logits, "{family}: self-patch changed the logits");
        // And a patch from another prompt does change them (the test can fail).
        let last = clean.captured.iter().find(|c| c.site == Site::new(0, SiteKind::ResidPost)).unwrap();
        let width = cfg.d_model;
        let donor = last.data[2 * 2 * width..(2 * 2 + 1) * width].to_vec(); // prompt 2, position -1
        let iv = Intervention { site: last.site, prompts: Some(vec![0]), positions: Positions::List(vec![-1]), units: None, op: Op::Patch { values: donor } };
        let other = run(model, &prompts, &[iv], &[]);
        assert_ne!(other.logits, clean.logits, "{family}: patching from another prompt changed nothing");
    });
}
