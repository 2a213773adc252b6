//! Benchmarks measured side by side in one run: every figure is a ratio of two methods on the
//! same inputs, plus absolute numbers with the device named.

use std::collections::HashSet;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::experiments::patch::{ExperimentResult, Method, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep};
use crate::intervene::splitmix64;
use crate::model::Model;
use crate::sites::SiteKind;
use crate::{Error, Result};

/// A random patching sweep: prompts, pairs and labels drawn from a seed.
#[derive(Clone, Debug)]
pub struct PatchBenchSpec {
    pub n_prompts: usize,
    pub prompt_len: usize,
    pub n_pairs: usize,
    pub sites: Vec<SiteKind>,
    pub window: usize,
    pub n_labels: usize,
    pub seed: u64,
    /// Experiments timed with the naive method (it is slow); None = all.
    pub naive_limit: Option<usize>,
    pub batch_rows: usize,
    pub mem_budget: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PatchBench {
    pub device: String,
    pub experiments: usize,
    pub resumed_experiments: usize,
    pub naive_experiments: usize,
    pub resumed_s: f64,
    pub naive_s: f64,
    pub resumed_per_s: f64,
    pub naive_per_s: f64,
    /// resumed_per_s / naive_per_s
    pub ratio: f64,
    /// Largest |resumed - naive| over the patched label logits both methods computed.
    pub max_abs_diff: f32,
    /// Peak resident memory of the process (bytes), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The sweep's inputs: random prompts, random pairs (source != target), random label tokens.
pub fn random_sweep(spec: &PatchBenchSpec, vocab: usize, n_layers: usize) -> Result<(Vec<Vec<u32>>, Vec<Pair>, SweepSpec)> {
    if spec.n_prompts < 2 || spec.prompt_len == 0 || spec.n_labels == 0 || spec.n_labels > vocab {
        return Err(Error::input("bench needs at least 2 prompts, a prompt length >= 1 and 1..=vocab labels"));
    }
    let mut state = spec.seed;
    let mut next = |m: usize| {
        state = splitmix64(state);
        (state % m as u64) as usize
    };
    let prompts: Vec<Vec<u32>> = (0..spec.n_prompts).map(|_| (0..spec.prompt_len).map(|_| next(vocab) as u32).collect()).collect();
    let pairs: Vec<Pair> = (0..spec.n_pairs)
        .map(|_| {
            let source = next(spec.n_prompts);
            let target = (source + 1 + next(spec.n_prompts - 1)) % spec.n_prompts;
            Pair { source, target }
        })
        .collect();
    let mut labels: Vec<u32> = Vec::new();
    while labels.len() < spec.n_labels {
        let t = next(vocab) as u32;
        if !labels.contains(&t) {
            labels.push(t);
        }
    }
    let sweep = SweepSpec { sites: spec.sites.clone(), units: None, window: spec.window, centers: all_centers(spec.window, n_layers), positions: vec![-1], label_tokens: labels };
    Ok((prompts, pairs, sweep))
}

/// Runs the same random sweep with the resumed and the naive method and compares.
pub fn bench_patch(model: &Model, spec: &PatchBenchSpec, progress: &ProgressBar) -> Result<PatchBench> {
    let (prompts, pairs, sweep) = random_sweep(spec, model.cfg.vocab_size, model.cfg.n_layers)?;
    let exps = experiments(&pairs, &sweep, model.cfg.n_layers)?;
    let n_naive = spec.naive_limit.unwrap_or(exps.len()).min(exps.len());
    progress.set_length((exps.len() + n_naive) as u64);
    let run = |method: Method, skip: &HashSet<usize>| -> Result<(f64, Vec<ExperimentResult>)> {
        let settings = RunSettings { method, skip, batch_rows: spec.batch_rows, mem_budget: spec.mem_budget, progress };
        let mut out = Vec::new();
        let t0 = Instant::now();
        run_sweep(model, &prompts, &sweep, &exps, &settings, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok((t0.elapsed().as_secs_f64(), out))
    };
    progress.set_message("resumed");
    let (resumed_s, resumed) = run(Method::Resumed, &HashSet::new())?;
    progress.set_message("naive");
    // The naive method runs the first n_naive experiments (by id) of the same sweep.
    let skip: HashSet<usize> = exps.iter().skip(n_naive).map(|e| e.id).collect();
    let (naive_s, naive) = run(Method::Naive, &skip)?;
    let mut max_abs_diff = 0.0f32;
    for n in &naive {
        if let Some(r) = resumed.iter().find(|r| r.id == n.id) {
            for (a, b) in r.patched.iter().zip(&n.patched) {
                max_abs_diff = max_abs_diff.max((a - b).abs());
            }
        }
    }
    let resumed_per_s = resumed.len() as f64 / resumed_s;
    let naive_per_s = naive.len() as f64 / naive_s;
    Ok(PatchBench {
        device: "cpu".into(),
        experiments: exps.len(),
        resumed_experiments: resumed.len(),
        naive_experiments: naive.len(),
        resumed_s,
        naive_s,
        resumed_per_s,
        naive_per_s,
        ratio: resumed_per_s / naive_per_s,
        max_abs_diff,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
