//! Random workloads shared by `bench`, `cost` (its estimates and `--measure`) and the criterion
//! benches (benches/engine.rs): prompts of random token ids, and a random patching sweep
//! (prompts, pairs and label tokens drawn from one seed).

use std::collections::HashSet;
use std::time::Instant;

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::Engine;
use crate::experiments::patch::{Experiment, ExperimentResult, Method, Overflow, Pair, RunSettings, SweepSpec, experiments, run_sweep};
use crate::model::config::ModelConfig;
use crate::rng::{PairsOf, random_pairs};
use crate::{Error, Result};

/// `n` prompts of `len` token ids drawn uniformly below `vocab`.
pub fn random_prompts(rng: &mut impl Rng, n: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..n).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

/// `n` distinct random token ids (label tokens), n <= vocab.
pub fn random_labels(rng: &mut impl Rng, n: usize, vocab: usize) -> Vec<u32> {
    let mut labels: Vec<u32> = Vec::new();
    while labels.len() < n.min(vocab) {
        let t = rng.random_range(0..vocab as u32);
        if !labels.contains(&t) {
            labels.push(t);
        }
    }
    labels
}

/// A random patching sweep: prompts, pairs and labels drawn from a seed (prompts and labels
/// from one ChaCha8 stream, pairs from `rng::random_pairs`).
#[derive(Clone, Debug)]
pub struct PatchWorkloadSpec {
    pub n_prompts: usize,
    pub prompt_len: usize,
    pub n_pairs: usize,
    /// What is patched (sites, units, window, centres, positions); its label tokens are
    /// replaced by `n_labels` drawn ones.
    pub sweep: SweepSpec,
    pub n_labels: usize,
    pub seed: u64,
    /// Experiments timed with the naive method (it is slow); None = all.
    pub naive_limit: Option<usize>,
    pub batch_rows: usize,
    pub mem_budget: usize,
    pub overflow: Overflow,
}

/// A random patching sweep's inputs and experiments.
pub struct PatchWorkload {
    pub prompts: Vec<Vec<u32>>,
    pub sweep: SweepSpec,
    pub exps: Vec<Experiment>,
}

impl PatchWorkload {
    /// Random prompts, random pairs (source != target), random label tokens; the sites,
    /// windows and positions of `spec.sweep`.
    pub fn new(spec: &PatchWorkloadSpec, cfg: &ModelConfig) -> Result<PatchWorkload> {
        let vocab = cfg.vocab_size;
        if spec.n_prompts < 2 || spec.prompt_len == 0 || spec.n_labels == 0 || spec.n_labels > vocab {
            return Err(Error::input("bench needs at least 2 prompts, a prompt length >= 1 and 1..=vocab labels"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let prompts = random_prompts(&mut rng, spec.n_prompts, spec.prompt_len, vocab);
        // The pair sampler of `patch --random-pairs` (pairs may repeat, as there).
        let pairs: Vec<Pair> = random_pairs(PairsOf::<()>::Items(spec.n_prompts), spec.seed)?.take(spec.n_pairs).map(|(source, target)| Pair { source, target }).collect();
        let labels = random_labels(&mut rng, spec.n_labels, vocab);
        let sweep = SweepSpec { label_tokens: labels, ..spec.sweep.clone() };
        let exps = experiments(&pairs, &sweep, cfg.n_layers)?;
        Ok(PatchWorkload { prompts, sweep, exps })
    }

    /// Runs the experiments not in `skip` with `method`; returns the seconds and the results.
    pub fn run(&self, engine: &dyn Engine, method: Method, skip: &HashSet<usize>, spec: &PatchWorkloadSpec, progress: &ProgressBar) -> Result<(f64, Vec<ExperimentResult>)> {
        let settings = RunSettings { method, skip, batch_rows: spec.batch_rows, mem_budget: spec.mem_budget, overflow: spec.overflow, progress };
        let mut out = Vec::new();
        let t0 = Instant::now();
        run_sweep(engine, &self.prompts, &self.sweep, &self.exps, &settings, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok((t0.elapsed().as_secs_f64(), out))
    }
}

