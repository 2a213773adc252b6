//! Generation (src/experiments/generate.rs) on every family's test model: batched KV-cache
//! decoding == recomputing each prompt's whole sequence at every step (greedy, sampled, with
//! steering on all tokens or generated ones only); zero steering == none; strong steering
//! changes the tokens; eos stops a prompt without touching the others; the batch size changes
//! no token; bad input is refused. `Engine::decode` (tokens appended in chunks, interventions
//! at absolute positions) == one forward over the whole sequence, on the CPU and the emulated
//! device; on the device, greedy generation gives the CPU's tokens and gives its KV blocks back.

mod common;

use common::kernels::test_driver;
use common::*;
use indicatif::ProgressBar;
use patchbay::backend::emu::FiberOrder;
use patchbay::backend::ops::sample::{SampleParams, sample_row, sample_uniform};
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{DecodeSeq, Engine, RunRequest};
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, StopReason, generate, prompt_seed};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::rng::gaussian;
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};

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

fn run(engine: &dyn Engine, prompts: &[Vec<u32>], spec: &GenerateSpec, steer: &[StepIntervention]) -> Vec<Vec<u32>> {
    generate(engine, prompts, spec, steer, None, &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap().into_iter().map(|g| g.tokens).collect()
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

#[test]
fn cached_generation_equals_recompute() {
    let max_new = 8;
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let prompts = prompt_ids(family);
        assert!(prompts.len() >= 2, "{family}: too few prompts left");
        let resid = Site::new(0, SiteKind::ResidPost);
        let greedy = GenerateSpec { max_new_tokens: max_new, sample: SampleParams::GREEDY, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 8 };
        // Steering from the residual's norm there up, until it changes the greedy tokens (so
        // that the comparisons below check something).
        let plain = run(&model, &prompts, &greedy, &[]);
        let mut beta = mean_norm(&model, resid, &prompts);
        while run(&model, &prompts, &greedy, &[StepIntervention::steer(resid, direction(cfg.d_model, 1), beta, TokenScope::all())]) == plain {
            beta *= 4.0;
            assert!(beta < 1e6, "{family}: no steering changes the greedy tokens");
        }
        let heads = Site::new(0, SiteKind::Z);
        // Batches of 2: a prompt's seed is its index in the whole input (as in the recompute).
        let sampled = GenerateSpec { sample: SampleParams { temperature: 0.8, top_p: 0.9, seed: 7 }, batch_size: 2, ..greedy.clone() };
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
    let spec = GenerateSpec { max_new_tokens: 10, sample: SampleParams::GREEDY, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 8 };
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
    let spec = GenerateSpec { max_new_tokens: 12, sample: SampleParams { temperature: 1.0, top_p: 1.0, seed: 3 }, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 8 };
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
    let err = |prompts: &[Vec<u32>], spec: &GenerateSpec, steer: &[StepIntervention]| generate(&model, prompts, spec, steer, None, &bar, &mut |_, _| Ok(())).unwrap_err().to_string();
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

#[test]
fn the_batch_size_changes_no_token_and_batches_arrive_in_order() {
    let model = Model::load(&fixture("gemma2")).unwrap();
    let prompts: Vec<Vec<u32>> = prompt_ids("gemma2").into_iter().chain(random_prompts(4, &[3, 9, 1, 17], model.cfg.vocab_size, 5)).collect();
    let spec = GenerateSpec { max_new_tokens: 6, sample: SampleParams { temperature: 0.9, top_p: 0.95, seed: 11 }, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 1 };
    let steer = [StepIntervention::steer(Site::new(1, SiteKind::ResidPre), direction(model.cfg.d_model, 4), 2.0, TokenScope::all())];
    let all = |batch_size: usize| {
        let mut firsts = Vec::new();
        let gens = generate(&model, &prompts, &GenerateSpec { batch_size, ..spec.clone() }, &steer, None, &ProgressBar::hidden(), &mut |first, g| {
            firsts.push((first, g.len()));
            Ok(())
        })
        .unwrap();
        (gens, firsts)
    };
    let (one, firsts) = all(1);
    assert_eq!(firsts, (0..7).map(|i| (i, 1)).collect::<Vec<_>>());
    let (three, firsts) = all(3);
    assert_eq!(firsts, vec![(0, 3), (3, 3), (6, 1)]);
    assert_eq!(one, three, "batch size 1 and 3 give different generations");
    assert!(one.iter().enumerate().all(|(i, g)| g.seed == prompt_seed(11, i) && g.stop == StopReason::Length && g.tokens.len() == 6 && g.text.is_none()));
}

#[test]
fn stop_strings_cut_the_text_and_the_context_ends_generation() {
    let dir = fixture("llama");
    let model = Model::load(&dir).unwrap();
    let tok = patchbay::model::tokenizer::PromptTokenizer::load(&dir).unwrap();
    let prompts = prompt_ids("llama");
    let spec = GenerateSpec { max_new_tokens: 12, sample: SampleParams { temperature: 1.0, top_p: 1.0, seed: 2 }, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 2 };
    let bar = ProgressBar::hidden();
    let run_tok = |spec: &GenerateSpec, prompts: &[Vec<u32>]| generate(&model, prompts, spec, &[], Some(&tok), &bar, &mut |_, _| Ok(())).unwrap();
    let free = run_tok(&spec, &prompts);
    for g in &free {
        assert_eq!(g.text.as_deref(), Some(tok.decode(&g.tokens).unwrap().as_str()));
    }
    // A stop string: the text of prompt 0's third token onwards, so prompt 0 stops at its 3rd
    // token at the latest, its text cut before the string.
    let (head, three) = (tok.decode(&free[0].tokens[..2]).unwrap(), tok.decode(&free[0].tokens[..3]).unwrap());
    let stop_str = three.strip_prefix(head.as_str()).unwrap().to_string();
    assert!(!stop_str.is_empty());
    let stopped = run_tok(&GenerateSpec { stop: vec![stop_str.clone()], ..spec.clone() }, &prompts);
    for (s, f) in stopped.iter().zip(&free) {
        let text = tok.decode(&f.tokens).unwrap();
        match text.find(&stop_str) {
            Some(at) => {
                assert_eq!(s.stop, StopReason::StopString);
                assert_eq!(s.text.as_deref(), Some(&text[..at]));
                assert!(s.tokens.len() <= f.tokens.len() && f.tokens.starts_with(&s.tokens));
                assert!(tok.decode(&s.tokens).unwrap().contains(&stop_str) && !tok.decode(&s.tokens[..s.tokens.len() - 1]).unwrap().contains(&stop_str), "stopped at the first token completing the string");
            }
            None => assert_eq!(s, f),
        }
    }
    assert_eq!(stopped[0].stop, StopReason::StopString);
    assert!(stopped[0].tokens.len() <= 3);
    // Eos: kept as the last token, not in the text.
    let eos = free[1].tokens[4];
    let ended = run_tok(&GenerateSpec { eos_ids: vec![eos], ..spec.clone() }, &prompts);
    let at = free[1].tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!((ended[1].stop, ended[1].tokens.as_slice()), (StopReason::Eos, &free[1].tokens[..=at]));
    assert_eq!(ended[1].text.as_deref(), Some(tok.decode(&free[1].tokens[..at]).unwrap().as_str()));
    // The context (max_position_embeddings) ends a prompt: it holds max_position tokens.
    let max = model.cfg.max_position;
    let long = vec![vec![5u32; max - 3]];
    let g = run_tok(&spec, &long);
    assert_eq!((g[0].tokens.len(), g[0].stop), (3, StopReason::Length));
    // No new tokens: an empty text.
    let none = run_tok(&GenerateSpec { max_new_tokens: 0, ..spec.clone() }, &prompts[..1]);
    assert_eq!((none[0].tokens.len(), none[0].text.as_deref(), none[0].stop), (0, Some(""), StopReason::Length));
    let err = generate(&model, &[vec![5u32; max]], &spec, &[], None, &bar, &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("prompt 0 has 256 tokens") && err.contains("context"), "{err}");
    let err = generate(&model, &prompts, &GenerateSpec { stop: vec!["x".into()], ..spec.clone() }, &[], None, &bar, &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("stop strings need the tokenizer"), "{err}");
    let err = generate(&model, &prompts, &GenerateSpec { batch_size: 0, ..spec }, &[], None, &bar, &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("batch size"), "{err}");
}

/// `model` on the test device (the emulator unless PATCHBAY_TEST_DEVICE names a GPU).
fn device(model: &Model) -> DeviceModel {
    DeviceModel::upload(model, test_driver(FiberOrder::Forward).1).unwrap()
}

/// Appends each sequence's tokens to fresh decoded sequences in chunks of `chunks` (cycled),
/// with interventions at absolute positions (each call gets those its sequences reach);
/// returns the logits of every position, per sequence ([len, vocab] each).
fn decode_in_chunks(engine: &dyn Engine, seqs_tokens: &[Vec<u32>], chunks: &[usize], ivs: &[Intervention]) -> Vec<Vec<f32>> {
    let mut seqs: Vec<DecodeSeq> = seqs_tokens.iter().map(|_| engine.start_decode().unwrap()).collect();
    let mut logits: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    let v = engine.config().vocab_size;
    for step in 0.. {
        // Sequences that still have tokens; each takes its next chunk.
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].len() < seqs_tokens[i].len()).collect();
        if live.is_empty() {
            break;
        }
        let tokens: Vec<&[u32]> = live
            .iter()
            .map(|&i| {
                let at = seqs[i].len();
                &seqs_tokens[i][at..(at + chunks[(step + i) % chunks.len()]).min(seqs_tokens[i].len())]
            })
            .collect();
        let mut call_ivs = Vec::new();
        for (s, (&i, t)) in live.iter().zip(&tokens).enumerate() {
            let len = seqs[i].len() + t.len();
            for iv in ivs {
                let Positions::List(pos) = &iv.positions else { panic!("absolute positions only") };
                let reached: Vec<i64> = pos.iter().copied().filter(|&p| (p as usize) < len).collect();
                if !reached.is_empty() {
                    call_ivs.push(Intervention { prompts: Some(vec![s]), positions: Positions::List(reached), ..iv.clone() });
                }
            }
        }
        let mut refs: Vec<&mut DecodeSeq> = seqs.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, s)| s).collect();
        let out = engine.decode(&mut refs, &tokens, &RunRequest { interventions: &call_ivs, logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
        let mut rows = out.logits.chunks_exact(v);
        for (&(s, _), row) in out.logit_rows.iter().zip(rows.by_ref()) {
            logits[live[s]].extend_from_slice(row);
        }
    }
    logits
}

#[test]
fn decode_in_chunks_equals_one_forward_on_cpu_and_device() {
    for family in ["llama", "gemma2", "olmo2"] {
        let model = Model::load(&fixture(family)).unwrap();
        let dev = device(&model);
        // Lengths crossing the device's 16-position KV blocks as they grow.
        let prompts = random_prompts(3, &[37, 18, 21], model.cfg.vocab_size, 9);
        let d = model.cfg.d_model;
        let ivs = vec![
            Intervention { site: Site::new(0, SiteKind::ResidPost), prompts: None, positions: Positions::List(vec![3, 17]), units: None, op: Op::Add { beta: 30.0, v: direction(d, 5), normalize: false } },
            Intervention { site: Site::new(1, SiteKind::Z), prompts: None, positions: Positions::List(vec![4]), units: Some(vec![0]), op: Op::Zero },
        ];
        for (name, engine) in [("cpu", &model as &dyn Engine), ("device", &dev)] {
            let whole = engine.run_prompts(&prompts, &RunRequest { interventions: &ivs, logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
            let v = model.cfg.vocab_size;
            let mut at = 0;
            let decoded = decode_in_chunks(engine, &prompts, &[1, 3, 16, 2], &ivs);
            for (p, got) in decoded.iter().enumerate() {
                let want = &whole.logits[at * v..(at + prompts[p].len()) * v];
                at += prompts[p].len();
                let what = format!("{family} ({name}), prompt {p}: decoded logits vs one forward");
                if name == "cpu" { assert_close(&what, got, want, F32_ATOL, F32_RTOL); } else { assert_forward_close(&what, got, want); }
            }
            // The interventions changed the logits (the comparison checks them).
            let clean = engine.run_prompts(&prompts, &RunRequest { logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
            assert!(clean.logits.iter().zip(&whole.logits).any(|(a, b)| (a - b).abs() > 0.1), "{family}: the interventions changed nothing");
        }
        assert_eq!(dev.kv_blocks().0, 0, "{family}: decoded sequences kept KV blocks after they were dropped");
    }
}

/// Device greedy tokens vs the CPU's (`steer` acting on every token): equal, or, where a
/// prompt's first differ, a near-tie of the CPU's logits of the two tokens (within the bf16
/// forward tolerance of the row's largest logit), after which that prompt is not compared. At
/// least 3/4 of the tokens must be compared.
fn greedy_agree(what: &str, model: &Model, prompts: &[Vec<u32>], steer: &[StepIntervention], cpu: &[Vec<u32>], dev: &[Vec<u32>]) {
    let mut compared = 0;
    for (p, (c, d)) in cpu.iter().zip(dev).enumerate() {
        assert_eq!(c.len(), d.len());
        let Some(k) = c.iter().zip(d).position(|(a, b)| a != b) else {
            compared += c.len();
            continue;
        };
        compared += k;
        let seq = [&prompts[p][..], &c[..k]].concat();
        let ivs: Vec<Intervention> = steer.iter().map(|s| Intervention { site: s.site, prompts: None, positions: Positions::All, units: s.units.clone(), op: s.op.clone() }).collect();
        let l = model.run_prompts(&[seq], &RunRequest { interventions: &ivs, logits_at: Some(&Positions::List(vec![-1])), ..Default::default() }).unwrap().logits;
        let max = l.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let margin = l[c[k] as usize] - l[d[k] as usize];
        assert!(margin <= FORWARD_BF16_REL * max, "{what}, prompt {p}, token {k}: the device chose {} over the CPU's {} by a margin of {margin} (logits up to {max})", d[k], c[k]);
    }
    let total: usize = cpu.iter().map(Vec::len).sum();
    let same = cpu.iter().flatten().zip(dev.iter().flatten()).filter(|(a, b)| a == b).count();
    println!("{what}: {same} of {total} greedy tokens equal, {compared} compared");
    assert!(4 * compared >= 3 * total, "{what}: only {compared} of {total} greedy tokens compared");
}

#[test]
fn device_generation_matches_cpu_and_gives_its_blocks_back() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let dev = device(&model);
        let max_new = 6;
        let prompts = prompt_ids(family);
        let site = Site::new(0, SiteKind::ResidPost);
        let spec = GenerateSpec { max_new_tokens: max_new, sample: SampleParams::GREEDY, eos_ids: Vec::new(), stop: Vec::new(), batch_size: 2 };
        let steer = |v: Vec<f32>, beta: f32| [StepIntervention::steer(site, v, beta, TokenScope::all())];
        let strong = steer(direction(model.cfg.d_model, 1), 4.0 * mean_norm(&model, site, &prompts));
        let cpu_plain = run(&model, &prompts, &spec, &[]);
        let cpu_steered = run(&model, &prompts, &spec, &strong);
        assert_ne!(cpu_plain, cpu_steered, "{family}: steering changed no greedy token");
        let dev_plain = run(&dev, &prompts, &spec, &[]);
        greedy_agree(&format!("{family}, plain"), &model, &prompts, &[], &cpu_plain, &dev_plain);
        greedy_agree(&format!("{family}, steered"), &model, &prompts, &strong, &cpu_steered, &run(&dev, &prompts, &spec, &strong));
        if family == "llama" {
            let zero = steer(vec![0.0; model.cfg.d_model], 1.0);
            assert_eq!(run(&dev, &prompts, &spec, &zero), dev_plain, "{family}: a zero vector changed the device's tokens");
            // Sampled: the device's logits are bf16-close, so only most tokens need agree.
            let sampled = GenerateSpec { sample: SampleParams { temperature: 0.7, top_p: 0.9, seed: 5 }, ..spec.clone() };
            let (c, g) = (run(&model, &prompts, &sampled, &[]), run(&dev, &prompts, &sampled, &[]));
            let same = c.iter().flatten().zip(g.iter().flatten()).filter(|(a, b)| a == b).count();
            assert!(same * 4 >= 3 * c.iter().flatten().count(), "{family}: sampled tokens: only {same} agree");
        }
        assert_eq!(dev.kv_blocks().0, 0, "{family}: generation kept KV blocks");
        assert!(dev.kv_blocks().1 > 0);
        // A failed call (a token out of range) gives its blocks back too and breaks the sequence.
        let mut seq = dev.start_decode().unwrap();
        dev.decode(&mut [&mut seq], &[&prompts[0]], &RunRequest::default()).unwrap();
        let held = dev.kv_blocks().0;
        assert!(held > 0);
        let bad = [u32::MAX];
        assert!(dev.decode(&mut [&mut seq], &[&bad], &RunRequest::default()).err().unwrap().to_string().contains("out of range"));
        assert_eq!(dev.kv_blocks().0, held);
        let err = dev.decode(&mut [&mut seq], &[&prompts[0][..1]], &RunRequest::default()).err().unwrap().to_string();
        assert!(err.contains("earlier decode call"), "{err}");
        let mut cpu_seq = model.start_decode().unwrap();
        let err = dev.decode(&mut [&mut cpu_seq], &[&prompts[0][..1]], &RunRequest::default()).err().unwrap().to_string();
        assert!(err.contains("engine (device) that made it"), "{err}");
        drop(seq);
        assert_eq!(dev.kv_blocks().0, 0);
    }
}
