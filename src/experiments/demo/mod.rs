//! The parts of `patchbay demo` that are not experiments of their own elsewhere: pairs of prompts
//! with different gold labels (for patching), and the demo's reading of its steering sweep (run
//! by `experiments::steer::label_sweep`, as `patchbay steer --mode labels` runs it): how far each
//! emotion's direction moves prompts of other emotions toward it, against a random direction of
//! the same norm.

pub mod pipeline;
mod report;

use serde::Serialize;

use crate::data::labels::LabelSet;
use crate::experiments::patch::Pair;
use crate::experiments::steer;
use crate::intervene::spec::Condition;
use crate::rng::{PairsOf, distinct_pairs};
use crate::{Error, Result};

/// Up to `n` distinct random (source, target) pairs of `eligible` prompts whose gold labels
/// differ (fewer when there are not that many), seeded: [`random_pairs`] without repeats.
pub fn contrast_pairs(gold: &[usize], eligible: &[usize], n: usize, seed: u64) -> Result<Vec<Pair>> {
    let mut keys = vec![None; gold.len()];
    eligible.iter().for_each(|&i| keys[i] = Some(gold[i]));
    let possible = PairsOf::Keys(&keys).count();
    if possible == 0 {
        return Err(Error::input("patching needs prompts of at least two different labels"));
    }
    Ok(distinct_pairs(PairsOf::Keys(&keys), n.min(possible), seed)?.into_iter().map(|(source, target)| Pair { source, target }).collect())
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

/// The outcome of one (label, direction kind, strength) over its prompts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TowardLabel {
    pub label: String,
    pub direction: DirectionKind,
    pub strength: f32,
    pub n: usize,
    /// Mean probability of the label (softmax over the label set's logits at the last token).
    pub mean_prob: f64,
    /// Fraction of the prompts whose prediction becomes the label.
    pub hit_rate: f64,
}

/// The demo's reading of a steering sweep (`experiments::steer::label_sweep`): each condition
/// steers toward the label its direction is named after (the first `n_steered` conditions; the
/// rest are their random controls, in the same order, as `steer::random_controls` makes them);
/// over the prompts whose gold label is another, the mean probability of that label (softmax
/// over the label set) and the share predicted as it. Rows in condition order.
pub fn toward_labels(conditions: &[Condition], n_steered: usize, rows: &[steer::SteerRow], labels: &LabelSet, gold: &[usize]) -> Result<Vec<TowardLabel>> {
    // Per condition: (prompts, sum of probabilities, hits).
    let mut acc = vec![(0usize, 0.0f64, 0usize); conditions.len()];
    let target = |c: usize| -> Result<usize> {
        let name = &conditions[c % n_steered.max(1)].direction;
        labels.index_of(name).ok_or_else(|| Error::input(format!("steering direction `{name}` is not a label")))
    };
    for r in rows {
        let label = target(r.condition)?;
        if gold[r.index] == label {
            continue;
        }
        let m = crate::logits::label_metrics_row(&r.label_logits, label as i32, crate::logits::DIFF_VS_MAX_OTHER, label as i32);
        let a = &mut acc[r.condition];
        a.0 += 1;
        a.1 += m.prob as f64;
        a.2 += usize::from(r.pred == label);
    }
    conditions
        .iter()
        .zip(acc)
        .enumerate()
        .map(|(c, (cond, (n, p, hits)))| {
            let frac = |v: f64| if n == 0 { f64::NAN } else { v / n as f64 };
            let direction = if c < n_steered { DirectionKind::ClassMean } else { DirectionKind::Random };
            Ok(TowardLabel { label: labels.names[target(c)?].clone(), direction, strength: cond.beta, n, mean_prob: frac(p), hit_rate: frac(hits as f64) })
        })
        .collect()
}
