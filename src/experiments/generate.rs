//! Generation with interventions applied at every step (steering, ablation during decoding) on
//! the CPU reference: one prefill forward over the prompts, then one token per step for every
//! prompt still running, each step a forward of the new tokens after the KV caches.
//!
//! CPU only: the `Engine` trait runs whole prompts with fresh caches, and generation needs a
//! cache that persists across calls (decode), which only the CPU reference exposes so far.
//!
//! Sampling follows the rule of `backend::ops::sample` ([`sample_row`]): greedy at temperature
//! 0, else temperature + top-p with the uniform draw of (the prompt's seed, its step), so a
//! prompt's tokens do not depend on the batch it runs in.

use indicatif::ProgressBar;

use crate::backend::ops::sample::{SampleParams, sample_row, sample_uniform};
use crate::engine::RunRequest;
use crate::engine::forward::{KvCache, SeqInput};
use crate::intervene::{Hooks, Intervention, Op, RowMap};
use crate::rng::splitmix64;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::sites::{Positions, Site};
use crate::{Error, Result};

/// How many tokens to generate, how to pick them, when to stop.
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    /// At most this many new tokens per prompt.
    pub max_new_tokens: usize,
    pub sample: SampleParams,
    /// A prompt stops at the first of these it generates (kept as its last token).
    pub eos_ids: Vec<u32>,
}

impl GenerateSpec {
    /// Greedy decoding stopping at the checkpoint's eos ids (config.json, replaced by
    /// generation_config.json's when it has them).
    pub fn greedy(cfg: &ModelConfig, max_new_tokens: usize) -> GenerateSpec {
        GenerateSpec { max_new_tokens, sample: SampleParams::GREEDY, eos_ids: cfg.eos_token_ids.clone() }
    }
}

/// Which tokens a step intervention acts on: prompt positions (at prefill) and/or every
/// generated token (when it is fed back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenScope {
    /// Positions of the prompt (None: the prompt runs clean).
    pub prompt: Option<Positions>,
    /// Every generated token.
    pub generated: bool,
}

impl TokenScope {
    /// Every token: the whole prompt and each generated one.
    pub const fn all() -> TokenScope {
        TokenScope { prompt: Some(Positions::All), generated: true }
    }
    /// Generated tokens only (the prompt runs clean).
    pub const fn generated() -> TokenScope {
        TokenScope { prompt: None, generated: true }
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

/// The sampling seed of prompt `prompt` (index in the batch) under `seed`: prompts draw
/// independently, and a prompt's draws do not depend on the others.
pub fn prompt_seed(seed: u64, prompt: usize) -> u64 {
    splitmix64(seed ^ splitmix64(prompt as u64))
}

/// Generates from every prompt (batched): returns each prompt's new tokens, ending at its eos
/// id or after `max_new_tokens`. `progress` counts steps.
pub fn generate(model: &Model, prompts: &[Vec<u32>], spec: &GenerateSpec, steps: &[StepIntervention], progress: &ProgressBar) -> Result<Vec<Vec<u32>>> {
    let cfg = &model.cfg;
    spec.sample.check()?;
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::input(format!("generate: prompt {i} is empty")));
    }
    // Prefill: each intervention at its prompt positions. Decode: those acting on generated
    // tokens, on the one new row (position -1).
    if let Some(i) = steps.iter().position(|s| s.scope.prompt.is_none() && !s.scope.generated) {
        return Err(Error::input(format!("generate: intervention {i} acts on no token (neither prompt positions nor generated tokens)")));
    }
    let prefill_ivs: Vec<Intervention> = steps.iter().filter_map(|s| s.scope.prompt.clone().map(|p| s.at(p))).collect();
    let decode_ivs: Vec<Intervention> = steps.iter().filter(|s| s.scope.generated).map(|s| s.at(Positions::List(vec![-1]))).collect();
    // Check sites, units and operands once against a one-row call, before any work.
    let every_step: Vec<Intervention> = steps.iter().map(|s| s.at(Positions::List(vec![-1]))).collect();
    Hooks::new(cfg, &RowMap::new(vec![0], vec![1]), &every_step, &[], None)?;
    // Prompt positions must exist in every prompt.
    for (i, p) in prompts.iter().enumerate() {
        for pos in steps.iter().filter_map(|s| s.scope.prompt.as_ref()) {
            pos.resolve(p.len()).map_err(|e| Error::input(format!("generate: prompt {i}: {e}")))?;
        }
    }

    let vocab = cfg.vocab_size;
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(cfg.n_layers)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut running: Vec<bool> = vec![spec.max_new_tokens > 0; prompts.len()];
    let last = Positions::List(vec![-1]);
    progress.set_length(spec.max_new_tokens as u64);
    for step in 0..spec.max_new_tokens {
        let active: Vec<usize> = (0..prompts.len()).filter(|&i| running[i]).collect();
        if active.is_empty() {
            break;
        }
        let interventions = if step == 0 { &prefill_ivs } else { &decode_ivs };
        let mut seqs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(prompts.iter().zip(&out))
            .zip(&running)
            .filter(|(_, run)| **run)
            .map(|((cache, (prompt, new)), _)| {
                // Step 0 feeds the prompt, later steps the token the previous step generated.
                let rows = if step == 0 { prompt.as_slice() } else { &new[new.len() - 1..] };
                SeqInput::tokens(rows, cache)
            })
            .collect();
        let logits = model.run_from(0, &mut seqs, &RunRequest { interventions, logits_at: Some(&last), ..Default::default() })?.logits; // [n_active, vocab]
        for (&i, row) in active.iter().zip(logits.chunks_exact(vocab)) {
            let u = sample_uniform(prompt_seed(spec.sample.seed, i), out[i].len() as i32);
            let id = sample_row(row, spec.sample.temperature, spec.sample.top_p, u).id as u32;
            out[i].push(id);
            running[i] = !spec.eos_ids.contains(&id) && out[i].len() < spec.max_new_tokens;
        }
        progress.inc(1);
    }
    Ok(out)
}
