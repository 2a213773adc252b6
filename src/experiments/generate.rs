//! Generation with interventions applied at every step (steering, ablation during decoding) on
//! any engine: per batch of prompts, one prefill call (the prompts, fresh decoded sequences),
//! then one call per step feeding each running prompt's last token after its KV cache
//! ([`Engine::decode`]).
//!
//! Sampling follows the rule of `backend::ops::sample` ([`sample_row`]): greedy at temperature
//! 0, else temperature + top-p with the uniform draw of (the prompt's seed, its step); the seed
//! of a prompt is that of its index in the whole input ([`prompt_seed`]), so a prompt's tokens
//! do not depend on the batch it runs in.

use indicatif::ProgressBar;
use serde::Serialize;

use crate::backend::ops::sample::{SampleParams, sample_row, sample_uniform};
use crate::engine::{DecodeSeq, Engine, RunRequest};
use crate::intervene::{Hooks, Intervention, Op, RowMap};
use crate::rng::splitmix64;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::PromptTokenizer;
use crate::sites::{Positions, Site, TokenScope};
use crate::{Error, Result};

/// How many tokens to generate, how to pick them, when to stop.
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    /// At most this many new tokens per prompt.
    pub max_new_tokens: usize,
    pub sample: SampleParams,
    /// A prompt stops at the first of these it generates (kept as its last token).
    pub eos_ids: Vec<u32>,
    /// A prompt stops when its decoded text contains one of these (needs the tokenizer).
    pub stop: Vec<String>,
    /// Prompts per batch.
    pub batch_size: usize,
}

impl GenerateSpec {
    /// Greedy decoding stopping at the checkpoint's eos ids (config.json, replaced by
    /// generation_config.json's when it has them).
    pub fn greedy(cfg: &ModelConfig, max_new_tokens: usize) -> GenerateSpec {
        GenerateSpec { max_new_tokens, sample: SampleParams::GREEDY, eos_ids: cfg.eos_token_ids.clone(), stop: Vec::new(), batch_size: 8 }
    }
}

/// An intervention applied by every forward of a generation to the rows that forward computes
/// (rows already in the KV cache keep the values they were computed with).
#[derive(Clone, Debug)]
pub struct StepIntervention {
    pub site: Site,
    /// Units selected (heads, neurons, dimensions); None = the whole row.
    pub units: Option<Vec<usize>>,
    /// Ops with per-row operands (multi-row patches) are refused: there is one row per step.
    pub op: Op,
    pub scope: TokenScope,
}

impl StepIntervention {
    /// Steering: x <- x + beta * v at `site` (whole rows).
    pub fn steer(site: Site, v: Vec<f32>, beta: f32, scope: TokenScope) -> StepIntervention {
        StepIntervention { site, units: None, op: Op::Add { beta, v, normalize: false }, scope }
    }

    fn at(&self, positions: Positions) -> Intervention {
        Intervention { site: self.site, prompts: None, positions, units: self.units.clone(), op: self.op.clone() }
    }
}

/// Why a prompt stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It generated an eos id.
    Eos,
    /// Its text contains a stop string.
    StopString,
    /// `max_new_tokens`, or the model's context (max_position_embeddings) is full.
    Length,
}

/// What one prompt generated.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Every generated token (an eos, or the token that completed a stop string, included).
    pub tokens: Vec<u32>,
    /// The decoded tokens (without a final eos, cut before a stop string), when the tokenizer
    /// was given.
    pub text: Option<String>,
    pub stop: StopReason,
    /// The prompt's sampling seed ([`prompt_seed`] of its index).
    pub seed: u64,
}

/// The sampling seed of prompt `prompt` (index in the whole input) under `seed`: prompts draw
/// independently, and a prompt's draws do not depend on the others.
pub fn prompt_seed(seed: u64, prompt: usize) -> u64 {
    splitmix64(seed ^ splitmix64(prompt as u64))
}

/// Generates from every prompt on `engine`, `spec.batch_size` prompts at a time (of any
/// lengths). `steps` act at every forward on the rows it computes. With `tok`, texts are
/// decoded (needed for stop strings). `on_batch(first, gens)` receives each batch's
/// generations as soon as it ends (`first`: the index of its first prompt), in input order.
/// `progress` counts tokens: each call adds its budget (prompts x max_new_tokens) to the bar's length, and a
/// prompt that stops early counts its unused budget.
pub fn generate(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    spec: &GenerateSpec,
    steps: &[StepIntervention],
    tok: Option<&PromptTokenizer>,
    progress: &ProgressBar,
    on_batch: &mut dyn FnMut(usize, &[Generation]) -> Result<()>,
) -> Result<Vec<Generation>> {
    let cfg = engine.config();
    spec.sample.check()?;
    if spec.batch_size == 0 {
        return Err(Error::input("generate: the batch size must be at least 1"));
    }
    if spec.stop.iter().any(String::is_empty) {
        return Err(Error::input("generate: a stop string is empty"));
    }
    if !spec.stop.is_empty() && tok.is_none() {
        return Err(Error::input("generate: stop strings need the tokenizer"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::input(format!("generate: prompt {i} is empty")));
        }
        if p.len() >= cfg.max_position {
            return Err(Error::input(format!("generate: prompt {i} has {} tokens, which leaves no room in the model's context of {} (max_position_embeddings)", p.len(), cfg.max_position)));
        }
    }
    let ivs = StepInterventions::new(cfg, prompts, steps)?;
    // Saturating: a budget past any context (--max-new-tokens 2^64-1) ends at the context instead.
    progress.inc_length((prompts.len() as u64).saturating_mul(spec.max_new_tokens as u64));
    let mut out = Vec::with_capacity(prompts.len());
    for (b, batch) in prompts.chunks(spec.batch_size).enumerate() {
        let first = b * spec.batch_size;
        let gens = generate_batch(engine, batch, first, spec, &ivs, tok, progress)?;
        on_batch(first, &gens)?;
        out.extend(gens);
    }
    Ok(out)
}

/// The interventions of the prefill call (each at its prompt positions) and of the decode calls
/// (those acting on generated tokens, at the one new row: position -1), checked once.
struct StepInterventions {
    prefill: Vec<Intervention>,
    decode: Vec<Intervention>,
    steps: Vec<StepIntervention>,
}

impl StepInterventions {
    fn new(cfg: &ModelConfig, prompts: &[Vec<u32>], steps: &[StepIntervention]) -> Result<StepInterventions> {
        if let Some(i) = steps.iter().position(|s| s.scope.prompt.is_none() && !s.scope.generated) {
            return Err(Error::input(format!("generate: intervention {i} acts on no token (neither prompt positions nor generated tokens)")));
        }
        // Sites, units and operands against a one-row call, before any work.
        let every_step: Vec<Intervention> = steps.iter().map(|s| s.at(Positions::List(vec![-1]))).collect();
        Hooks::new(cfg, &RowMap::new(vec![0], vec![1]), &every_step, &[], None)?;
        // Prompt positions must exist in every prompt.
        for (i, p) in prompts.iter().enumerate() {
            for pos in steps.iter().filter_map(|s| s.scope.prompt.as_ref()) {
                pos.resolve(p.len()).map_err(|e| Error::input(format!("generate: prompt {i}: {e}")))?;
            }
        }
        Ok(StepInterventions {
            prefill: steps.iter().filter_map(|s| s.scope.prompt.clone().map(|p| s.at(p))).collect(),
            decode: steps.iter().filter(|s| s.scope.generated).map(|s| s.at(Positions::List(vec![-1]))).collect(),
            steps: steps.to_vec(),
        })
    }

    /// The interventions of a call that feeds sequences again from the start (sequence j of the
    /// call: a prompt of `prompt_len` tokens, then `generated` tokens): each step intervention
    /// at its prompt positions and at the generated positions of its scope, per sequence, as
    /// the calls that first computed those rows applied them.
    fn refeed(&self, seqs: impl Iterator<Item = (usize, usize)>) -> Vec<Intervention> {
        let mut out = Vec::new();
        for (j, (prompt_len, generated)) in seqs.enumerate() {
            for s in &self.steps {
                let mut rows: Vec<i64> = s.scope.prompt.as_ref().map_or(Ok(Vec::new()), |p| p.resolve(prompt_len)).unwrap_or_default().into_iter().map(|p| p as i64).collect();
                if s.scope.generated {
                    rows.extend((prompt_len..prompt_len + generated).map(|p| p as i64));
                }
                if !rows.is_empty() {
                    out.push(Intervention { prompts: Some(vec![j]), ..s.at(Positions::List(rows)) });
                }
            }
        }
        out
    }
}

/// One batch: prompt `i` of `prompts` is prompt `first + i` of the input.
fn generate_batch(engine: &dyn Engine, prompts: &[Vec<u32>], first: usize, spec: &GenerateSpec, ivs: &StepInterventions, tok: Option<&PromptTokenizer>, progress: &ProgressBar) -> Result<Vec<Generation>> {
    let cfg = engine.config();
    let vocab = cfg.vocab_size;
    let mut seqs: Vec<DecodeSeq> = prompts.iter().map(|_| engine.start_decode()).collect::<Result<_>>()?;
    let mut gens: Vec<Generation> = (0..prompts.len()).map(|i| Generation { tokens: Vec::new(), text: tok.map(|_| String::new()), stop: StopReason::Length, seed: prompt_seed(spec.sample.seed, first + i) }).collect();
    let mut running: Vec<bool> = vec![spec.max_new_tokens > 0; prompts.len()];
    let last = Positions::List(vec![-1]);
    for step in 0..spec.max_new_tokens {
        let active: Vec<usize> = (0..prompts.len()).filter(|&i| running[i]).collect();
        if active.is_empty() {
            break;
        }
        // Sequences whose cache the model's generation recomputes now (`recompute_cache_at`)
        // start afresh and feed their prompt and every generated token.
        let recompute: Vec<usize> = active.iter().copied().filter(|&i| step > 0 && cfg.recompute_cache_at == Some(seqs[i].len())).collect();
        for &i in &recompute {
            seqs[i] = engine.start_decode()?;
        }
        let extend: Vec<usize> = active.iter().copied().filter(|i| !recompute.contains(i)).collect();
        // Each call: the sequences it fed (in order) and their logits [n, vocab].
        let mut calls: Vec<(&[usize], Vec<f32>)> = Vec::new();
        for (group, fresh) in [(&extend[..], step == 0), (&recompute[..], true)] {
            if group.is_empty() {
                continue;
            }
            // Step 0 feeds the prompts, a recomputed sequence its prompt and every generated
            // token, any other the token it generated last.
            let refed: Vec<Vec<u32>> = if fresh && step > 0 { group.iter().map(|&i| [&prompts[i][..], &gens[i].tokens[..]].concat()).collect() } else { Vec::new() };
            let tokens: Vec<&[u32]> = match (fresh, step) {
                (_, 0) => group.iter().map(|&i| &prompts[i][..]).collect(),
                (false, _) => group.iter().map(|&i| &gens[i].tokens[gens[i].tokens.len() - 1..]).collect(),
                (true, _) => refed.iter().map(Vec::as_slice).collect(),
            };
            let recomputed: Vec<Intervention>;
            let interventions = match (fresh, step) {
                (_, 0) => &ivs.prefill,
                (false, _) => &ivs.decode,
                (true, _) => {
                    recomputed = ivs.refeed(group.iter().map(|&i| (prompts[i].len(), gens[i].tokens.len())));
                    &recomputed
                }
            };
            let mut live: Vec<&mut DecodeSeq> = seqs.iter_mut().enumerate().filter(|(i, _)| group.contains(i)).map(|(_, s)| s).collect();
            let logits = engine.decode(&mut live, &tokens, &RunRequest { interventions, logits_at: Some(&last), ..Default::default() }).map_err(|e| e.in_batch(|k| group[k]))?.logits;
            calls.push((group, logits));
        }
        for (&i, row) in calls.iter().flat_map(|(group, logits)| group.iter().zip(logits.chunks_exact(vocab))) {
            let len = seqs[i].len();
            let g = &mut gens[i];
            let u = sample_uniform(g.seed, g.tokens.len() as i32);
            let id = sample_row(row, spec.sample.temperature, spec.sample.top_p, u).id as u32;
            g.tokens.push(id);
            let eos = spec.eos_ids.contains(&id);
            let kept = &g.tokens[..g.tokens.len() - usize::from(eos)];
            // The text is decoded at every step only to look for stop strings.
            let mut text = tok.filter(|_| !spec.stop.is_empty()).map(|t| t.decode(kept)).transpose()?;
            let cut = text.as_deref().and_then(|t| spec.stop.iter().filter_map(|s| t.find(s.as_str())).min());
            let stop = if eos {
                Some(StopReason::Eos)
            } else if cut.is_some() {
                Some(StopReason::StopString)
            } else if g.tokens.len() == spec.max_new_tokens || len + 1 >= cfg.max_position {
                Some(StopReason::Length)
            } else {
                None
            };
            if stop.is_some() && text.is_none() {
                text = tok.map(|t| t.decode(kept)).transpose()?;
            }
            if let Some(t) = text {
                g.text = Some(t[..cut.unwrap_or(t.len())].to_string());
            }
            progress.inc(1);
            if let Some(stop) = stop {
                g.stop = stop;
                running[i] = false;
                progress.inc((spec.max_new_tokens - g.tokens.len()) as u64);
            }
        }
    }
    Ok(gens)
}
