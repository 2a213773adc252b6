//! The parts of `patchbay demo` that are not experiments of their own elsewhere: pairs of prompts
//! with different gold labels (for patching), and steering: adding a direction (a class-mean
//! direction of `learn::directions`) to the residual stream at every position and reading the
//! label probabilities at the last token (with a random direction of the same norm as the
//! control).

pub mod pipeline;
mod report;

use std::collections::HashSet;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::engine::{Engine, RunRequest};
use crate::experiments::patch::Pair;
use crate::intervene::{Intervention, Op, norm};
use crate::rng::{PairsOf, gaussian, random_pairs};
use crate::sites::{Positions, Site};
use crate::{Error, Result};

/// Up to `n` distinct random (source, target) pairs of `eligible` prompts whose gold labels
/// differ (fewer when there are not that many), seeded: [`random_pairs`] without repeats.
pub fn contrast_pairs(gold: &[usize], eligible: &[usize], n: usize, seed: u64) -> Result<Vec<Pair>> {
    let possible: usize = eligible.iter().map(|&s| eligible.iter().filter(|&&t| gold[t] != gold[s]).count()).sum();
    if possible == 0 {
        return Err(Error::input("patching needs prompts of at least two different labels"));
    }
    let mut keys = vec![None; gold.len()];
    eligible.iter().for_each(|&i| keys[i] = Some(gold[i]));
    let mut seen = HashSet::new();
    Ok(random_pairs(PairsOf::Keys(&keys), seed)?.filter(|&p| seen.insert(p)).take(n.min(possible)).map(|(source, target)| Pair { source, target }).collect())
}

/// A Gaussian random vector with the norm of `v` (seeded).
pub fn random_like(v: &[f32], seed: u64) -> Vec<f32> {
    let r: Vec<f32> = (0..v.len()).map(|i| gaussian(seed, 0, i as u64)).collect();
    let scale = norm(v) / norm(&r).max(f32::MIN_POSITIVE);
    r.into_iter().map(|x| x * scale).collect()
}

/// Which direction a steering condition adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectionKind {
    /// The label's class-mean direction.
    ClassMean,
    /// A random direction of the same norm (the control).
    Random,
}

/// A steering direction towards one label and the prompts it is tried on (of other labels).
pub struct SteerTarget {
    pub label: usize,
    /// `[d_model]`
    pub direction: Vec<f32>,
    pub prompts: Vec<usize>,
}

/// The outcome of one (label, direction kind, strength) over its prompts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SteerRow {
    pub label: String,
    pub direction: DirectionKind,
    pub strength: f32,
    pub n: usize,
    /// Mean probability of the label (softmax over the label set's logits at the last token).
    pub mean_prob: f64,
    /// Fraction of the prompts whose prediction becomes the label.
    pub hit_rate: f64,
}

/// Steers every target's prompts with `strength * direction` added at `site` (every position),
/// for every strength, with the class-mean direction and with a random one of the same norm
/// (seeded by `seed` and the label); reads the label logits (`label_tokens`) at the last token.
/// Rows come strength-major, then direction kind, then target. The progress bar counts prompts.
#[allow(clippy::too_many_arguments)]
pub fn steer_sweep(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    site: Site,
    targets: &[SteerTarget],
    strengths: &[f32],
    label_names: &[String],
    label_tokens: &[u32],
    seed: u64,
    batch_size: usize,
    progress: &ProgressBar,
) -> Result<Vec<SteerRow>> {
    let cfg = engine.config();
    site.check(cfg)?;
    let k = label_tokens.len();
    if label_names.len() != k {
        return Err(Error::input(format!("{} label names for {k} label tokens", label_names.len())));
    }
    for t in targets {
        if t.label >= k || t.direction.len() != cfg.d_model {
            return Err(Error::input(format!("steering target {}: label index out of range or direction of width {} (d_model {})", t.label, t.direction.len(), cfg.d_model)));
        }
        if let Some(&bad) = t.prompts.iter().find(|&&p| p >= prompts.len()) {
            return Err(Error::input(format!("steering target {}: prompt {bad} is out of range ({} prompts)", t.label, prompts.len())));
        }
    }
    let randoms: Vec<Vec<f32>> = targets.iter().map(|t| random_like(&t.direction, seed ^ (t.label as u64 + 1))).collect();
    // Conditions (strength, kind, target) and every (condition, prompt) item, in row order.
    let kinds = [DirectionKind::ClassMean, DirectionKind::Random];
    let conditions: Vec<(f32, DirectionKind, usize)> = strengths.iter().flat_map(|&s| kinds.iter().flat_map(move |&kind| (0..targets.len()).map(move |t| (s, kind, t)))).collect();
    let items: Vec<(usize, usize)> = conditions.iter().enumerate().flat_map(|(c, &(_, _, t))| targets[t].prompts.iter().map(move |&p| (c, p))).collect();
    // Per condition: sum of probabilities, hits.
    let mut acc = vec![(0.0f64, 0usize); conditions.len()];
    let last = Positions::List(vec![-1]);
    for chunk in items.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&(_, p)| prompts[p].clone()).collect();
        // One intervention per condition present in the chunk, on its batch entries.
        let mut ivs: Vec<Intervention> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (j, &(c, _)) in chunk.iter().enumerate() {
            match owner.iter().position(|&o| o == c) {
                Some(i) => ivs[i].prompts.get_or_insert_with(Vec::new).push(j),
                None => {
                    let (strength, kind, t) = conditions[c];
                    let v = if kind == DirectionKind::ClassMean { &targets[t].direction } else { &randoms[t] };
                    ivs.push(Intervention { site, prompts: Some(vec![j]), positions: Positions::All, units: None, op: Op::Add { beta: strength, v: v.clone(), normalize: false } });
                    owner.push(c);
                }
            }
        }
        let out = engine.run_prompts(&batch, &RunRequest { interventions: &ivs, logits_at: Some(&last), logit_tokens: Some(label_tokens), ..Default::default() })?;
        if out.logits.len() != chunk.len() * k {
            return Err(Error::input(format!("engine returned {} label logits for {} prompts", out.logits.len(), chunk.len())));
        }
        for (&(c, _), logits) in chunk.iter().zip(out.logits.chunks(k)) {
            let label = targets[conditions[c].2].label;
            // softmax over the labels at `label`, and whether `label` is the argmax
            let m = crate::logits::label_metrics_row(logits, label as i32, crate::logits::DIFF_VS_MAX_OTHER, label as i32);
            acc[c].0 += m.prob as f64;
            acc[c].1 += usize::from(m.pred as usize == label);
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(conditions
        .iter()
        .zip(acc)
        .map(|(&(strength, direction, t), (p, hits))| {
            let n = targets[t].prompts.len();
            let label = label_names[targets[t].label].clone();
            let frac = |v: f64| if n == 0 { f64::NAN } else { v / n as f64 };
            SteerRow { label, direction, strength, n, mean_prob: frac(p), hit_rate: frac(hits as f64) }
        })
        .collect())
}
