//! Generation (src/experiments/generate.rs) on every family's test model: batched KV-cache
//! decoding == recomputing each prompt's whole sequence at every step (greedy, sampled, with
//! steering on all tokens or generated ones only); zero steering == none; strong steering
//! changes the tokens; eos stops a prompt without touching the others; bad input is refused.

mod common;

use common::*;
use indicatif::ProgressBar;
use patchbay::backend::ops::sample::{SampleParams, sample_row, sample_uniform};
use patchbay::engine::{Engine, RunRequest};
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, TokenScope, generate, prompt_seed};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::rng::gaussian;
use patchbay::model::Model;
use patchbay::model::config::RopeScaling;
use patchbay::sites::{Positions, Site, SiteKind};

/// The simple path: per prompt, each new token from a fresh forward over the whole sequence,
/// the steering added at every position it covers (all, or the generated tokens fed so far).
fn generate_by_recompute(model: &Model, prompts: &[Vec<u32>], spec: &GenerateSpec, steer: &[StepIntervention]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let mut seq = prompt.clone();
            let mut new: Vec<u32> = Vec::new();
            while new.len() < spec.max_new_tokens {
                let ivs: Vec<Intervention> = steer
                    .iter()
                    .filter_map(|s| {
                        let generated: Vec<i64> = if s.scope.generated { (prompt.len()..seq.len()).map(|p| p as i64).collect() } else { Vec::new() };
                        let prompt_pos: Vec<i64> = match &s.scope.prompt {
                            Some(p) => p.resolve(prompt.len()).unwrap().into_iter().map(|p| p as i64).collect(),
                            None => Vec::new(),
                        };
                        let all: Vec<i64> = prompt_pos.into_iter().chain(generated).collect();
                        (!all.is_empty()).then_some((s, Positions::List(all)))
                    })
                    .map(|(s, positions)| Intervention {
                        site: s.site,
                        prompts: None,
                        positions,
                        units: s.units.clone(),
                        op: s.op.clone(),
                    })
                    .collect();
                let req = RunRequest { interventions: &ivs, logits_at: Some(&Positions::List(vec![-1])), ..Default::default() };
                let logits = model.run_prompts(std::slice::from_ref(&seq), &req).unwrap().logits;
                let u = sample_uniform(prompt_seed(spec.sample.seed, i), new.len() as i32);
                let id = sample_row(&logits, spec.sample.temperature, spec.sample.top_p, u).id as u32;
                seq.push(id);
                new.push(id);
                if spec.eos_ids.contains(&id) {
                    break;
                }
            }
            new
        })
        .collect()
}

fn run(model: &Model, prompts: &[Vec<u32>], spec: &GenerateSpec, steer: &[StepIntervention]) -> Vec<Vec<u32>> {
    generate(model, prompts, spec, steer, &ProgressBar::hidden()).unwrap()
}

/// A seeded unit vector of `n` values.
fn direction(n: usize, seed: u64) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|i| gaussian(seed, 0, i as u64)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// Mean norm of the rows of `site` over the prompts' tokens.
fn mean_norm(model: &Model, site: Site, prompts: &[Vec<u32>]) -> f32 {
    let req = RunRequest { captures: &[Capture { site, positions: Positions::All }], ..Default::default() };
    let data = &model.run_prompts(prompts, &req).unwrap().captured[0].data;
    let rows: Vec<f32> = data.chunks(model.cfg.d_model).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
    rows.iter().sum::<f32>() / rows.len() as f32
}

/// The fixture's prompts, without those whose generation would cross longrope's switch from
/// short to long factors: there a cache holds keys rotated with the short factors (as in Hugging
/// Face) and a recompute does not.
fn prompts_for(model: &Model, family: &str, max_new: usize) -> Vec<Vec<u32>> {
    let mut prompts = prompt_ids(family);
    if let RopeScaling::LongRope { original_max_position: m, .. } = model.cfg.rope_scaling {
        prompts.retain(|p| p.len() > m || p.len() + max_new - 1 <= m);
    }
    prompts
}

#[test]
fn cached_generation_equals_recompute() {
    let max_new = 8;
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let prompts = prompts_for(&model, family, max_new);
        assert!(prompts.len() >= 2, "{family}: too few prompts left");
        let resid = Site::new(0, SiteKind::ResidPost);
        let greedy = GenerateSpec { max_new_tokens: max_new, sample: SampleParams::GREEDY, eos_ids: Vec::new() };
        // Steering from the residual's norm there up, until it changes the greedy tokens (so
        // that the comparisons below check something).
        let plain = run(&model, &prompts, &greedy, &[]);
        let mut beta = mean_norm(&model, resid, &prompts);
        while run(&model, &prompts, &greedy, &[StepIntervention::steer(resid, direction(cfg.d_model, 1), beta, TokenScope::all())]) == plain {
            beta *= 4.0;
            assert!(beta < 1e6, "{family}: no steering changes the greedy tokens");
        }
        let heads = Site::new(0, SiteKind::Z);
        let sampled = GenerateSpec { sample: SampleParams { temperature: 0.8, top_p: 0.9, seed: 7 }, ..greedy.clone() };
        let cases: Vec<(&str, &GenerateSpec, Vec<StepIntervention>)> = vec![
            ("greedy", &greedy, vec![]),
            ("greedy, steered everywhere", &greedy, vec![StepIntervention::steer(resid, direction(cfg.d_model, 1), beta, TokenScope::all())]),
            (
                "sampled, steered on generated tokens, head 1 ablated",
                &sampled,
                vec![
                    StepIntervention::steer(resid, direction(cfg.d_model, 2), beta, TokenScope::generated()),
                    StepIntervention { site: heads, units: Some(vec![1]), op: Op::Zero, scope: TokenScope::all() },
                ],
            ),
            ("sampled", &sampled, vec![]),
            (
                "greedy, steered on the last 2 prompt tokens only",
                &greedy,
                vec![StepIntervention::steer(resid, direction(cfg.d_model, 1), beta, TokenScope { prompt: Some(Positions::List(vec![-1, -2])), generated: false })],
            ),
        ];
        let mut outs = Vec::new();
        for (name, spec, steer) in cases {
            let cached = run(&model, &prompts, spec, &steer);
            let recomputed = generate_by_recompute(&model, &prompts, spec, &steer);
            assert_eq!(cached, recomputed, "{family}, {name}: cached generation differs from recompute");
            assert!(cached.iter().all(|t| t.len() == max_new), "{family}, {name}: no eos ids, so every prompt runs to max_new_tokens");
            outs.push(cached);
        }
        assert_ne!(outs[2], outs[3], "{family}: steering and ablation changed no sampled token");
    }
}

#[test]
fn zero_steering_changes_nothing_and_strong_steering_changes_the_tokens() {
    let model = Model::load(&fixture("llama")).unwrap();
    let prompts = prompt_ids("llama");
    let spec = GenerateSpec { max_new_tokens: 10, sample: SampleParams::GREEDY, eos_ids: Vec::new() };
    let site = Site::new(0, SiteKind::ResidPost);
    let plain = run(&model, &prompts, &spec, &[]);
    for scope in [TokenScope::all(), TokenScope::generated()] {
        let zero = run(&model, &prompts, &spec, &[StepIntervention::steer(site, vec![0.0; model.cfg.d_model], 1.0, scope.clone())]);
        assert_eq!(zero, plain, "{scope:?}: a zero steering vector changed the tokens");
        let strong = run(&model, &prompts, &spec, &[StepIntervention::steer(site, direction(model.cfg.d_model, 3), 1000.0, scope.clone())]);
        for (p, (s, c)) in strong.iter().zip(&plain).enumerate() {
            assert_ne!(s, c, "{scope:?}, prompt {p}: steering with norm 1000 left the tokens unchanged");
        }
    }
}

#[test]
fn eos_stops_each_prompt_at_its_first_eos() {
    let model = Model::load(&fixture("qwen2")).unwrap();
    let prompts = prompt_ids("qwen2");
    let spec = GenerateSpec { max_new_tokens: 12, sample: SampleParams { temperature: 1.0, top_p: 1.0, seed: 3 }, eos_ids: Vec::new() };
    let free = run(&model, &prompts, &spec, &[]);
    // Two eos ids: a token prompt 0 generates early, and one prompt 1 generates.
    let eos = vec![free[0][2], free[1][5]];
    let stopped = run(&model, &prompts, &GenerateSpec { eos_ids: eos.clone(), ..spec.clone() }, &[]);
    for (p, (s, f)) in stopped.iter().zip(&free).enumerate() {
        let end = f.iter().position(|t| eos.contains(t)).map_or(f.len(), |i| i + 1);
        assert_eq!(s, &f[..end], "prompt {p}: not the free run cut after its first eos");
    }
    assert!(stopped[0].len() <= 3 && stopped[1].len() <= 6);
    // The checkpoint's eos ids are the default.
    assert_eq!(GenerateSpec::greedy(&model.cfg, 4).eos_ids, model.cfg.eos_token_ids);
    assert!(!model.cfg.eos_token_ids.is_empty());
    // No new tokens: nothing runs.
    assert_eq!(run(&model, &prompts, &GenerateSpec { max_new_tokens: 0, ..spec }, &[]), vec![Vec::<u32>::new(); prompts.len()]);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let model = Model::load(&fixture("llama")).unwrap();
    let spec = GenerateSpec::greedy(&model.cfg, 4);
    let bar = ProgressBar::hidden();
    let err = |prompts: &[Vec<u32>], spec: &GenerateSpec, steer: &[StepIntervention]| generate(&model, prompts, spec, steer, &bar).unwrap_err().to_string();
    let ok = vec![vec![1u32, 2, 3]];
    assert!(err(&[vec![1], vec![]], &spec, &[]).contains("prompt 1 is empty"));
    assert!(err(&[vec![1, 100_000]], &spec, &[]).contains("out of range"));
    let hot = GenerateSpec { sample: SampleParams { temperature: -1.0, top_p: 1.0, seed: 0 }, ..spec.clone() };
    assert!(err(&ok, &hot, &[]).contains("temperature"));
    let short = StepIntervention::steer(Site::new(0, SiteKind::ResidPost), vec![1.0; 3], 1.0, TokenScope::generated());
    assert!(err(&ok, &spec, &[short]).contains("expected 64"), "the operand is checked before the prompt runs clean");
    let deep = StepIntervention::steer(Site::new(9, SiteKind::ResidPost), vec![1.0; 64], 1.0, TokenScope::all());
    assert!(err(&ok, &spec, &[deep]).contains("out of range"));
    let nowhere = StepIntervention::steer(Site::new(0, SiteKind::ResidPost), vec![1.0; 64], 1.0, TokenScope { prompt: None, generated: false });
    assert!(err(&ok, &spec, &[nowhere]).contains("acts on no token"));
    let far = StepIntervention::steer(Site::new(0, SiteKind::ResidPost), vec![1.0; 64], 1.0, TokenScope { prompt: Some(Positions::List(vec![-5])), generated: true });
    assert!(err(&[vec![1, 2, 3, 4, 5, 6], vec![1, 2]], &spec, &[far]).contains("prompt 1: position -5 is out of range"));
}
