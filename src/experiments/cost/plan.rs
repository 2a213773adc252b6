//! Workloads -> calls: passes over prompts, and patch sweeps planned by `run_sweep` itself
//! against a recording engine ([`Planner`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::ProgressBar;

use super::{Call, Path};
use crate::engine::forward::{RunOutput, host_label_metrics};
use crate::engine::{CleanRun, DecodeSeq, Engine, RunRequest, Segment};
use crate::experiments::patch::{CleanSchedule, Experiment, Method, Overflow, Pair, RunSettings, SweepSpec, run_sweep};
use crate::intervene::{Held, Hooks, RowMap};
use crate::model::config::ModelConfig;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// Prompts run once each, `batch_size` per call (`capture`, `probe`, a plain forward).
#[derive(Clone, Debug)]
pub struct PassSpec {
    /// Sites captured.
    pub sites: Vec<Site>,
    /// Positions captured (resolved in each prompt).
    pub positions: Positions,
    /// Logits returned: at these positions, over this many tokens (the vocabulary, or labels).
    pub logits: Option<(Positions, usize)>,
    pub batch_size: usize,
    /// Captures held in memory at most this many bytes at once (probe shards); None: all of them
    /// until the end (capture).
    pub hold_bytes: Option<usize>,
}

/// A patching sweep as `patch` runs it.
#[derive(Clone, Debug)]
pub struct PatchPlan {
    pub pairs: Vec<Pair>,
    pub sweep: SweepSpec,
    pub batch_rows: usize,
    pub mem_budget: usize,
    pub overflow: Overflow,
}

/// A named group of calls (a phase of a method), in the order the calls are made.
pub(super) struct Phase {
    pub(super) name: &'static str,
    pub(super) calls: Vec<Call>,
}

/// Groups (phase, call) pairs into phases, phases in order of first appearance.
fn phases(calls: Vec<(&'static str, Call)>) -> Vec<Phase> {
    let mut out: Vec<Phase> = Vec::new();
    for (name, call) in calls {
        match out.iter_mut().find(|p| p.name == name) {
            Some(p) => p.calls.push(call),
            None => out.push(Phase { name, calls: vec![call] }),
        }
    }
    out
}

/// The calls of `capture` / `probe` / a plain forward: batches of `batch_size` prompts from
/// layer 0 (capture.rs and shards.rs), their captures accumulated until written.
pub(super) fn pass_calls(cfg: &ModelConfig, lens: &[usize], spec: &PassSpec) -> Result<Vec<Phase>> {
    if spec.batch_size == 0 {
        return Err(Error::input("batch size must be at least 1"));
    }
    for s in &spec.sites {
        s.check(cfg)?;
    }
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let head_out_layers = spec.sites.iter().filter(|s| s.kind == SiteKind::HeadOut).map(|s| s.layer).collect::<BTreeSet<_>>().len();
    let mut calls = Vec::new();
    let mut held = 0usize;
    for batch in lens.chunks(spec.batch_size) {
        let mut call = Call { seqs: batch.iter().map(|&n| (0, n)).collect(), head_out_layers, held_captures: held, ..Call::default() };
        for &len in batch {
            let rows = spec.positions.resolve(len)?.len();
            call.captured += spec.sites.iter().map(|&s| rows * site_width(cfg, s, max_len)).sum::<usize>();
            if let Some((at, width)) = &spec.logits {
                call.logit_rows += at.resolve(len)?.len();
                call.logit_width = *width;
            }
        }
        // Logits are kept with the captures (both are written at the end, or per shard).
        held += call.captured + call.logit_rows * call.logit_width;
        if spec.hold_bytes.is_some_and(|cap| held * 4 > cap) {
            held = 0;
        }
        calls.push(("batches", call));
    }
    Ok(phases(calls))
}

/// Captured f32 values per token of `site` (pattern rows have `n_keys` columns).
fn site_width(cfg: &ModelConfig, site: Site, n_keys: usize) -> usize {
    let (n, w) = site.kind.units(cfg, n_keys);
    n * w
}

/// Bytes a kept clean run of `len` positions holds, as each engine's `clean_run_bytes` reports
/// it: f32 keys, values and resid_pre per layer on the CPU; bf16 keys and values in whole
/// blocks and f32 resid_pre on a device. `run_sweep` groups targets by it.
pub fn clean_run_bytes(cfg: &ModelConfig, path: Path, len: usize) -> usize {
    match path {
        Path::Cpu => crate::engine::clean_run_bytes(cfg, len),
        Path::Gpu => crate::engine::device_forward::clean_run_bytes(cfg, len),
    }
}

/// A planned clean run: gives its bytes back when the sweep drops it.
struct PlannedClean {
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for PlannedClean {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// An engine that computes nothing: it records the forward calls the real experiment code
/// makes (rows, captures, logits, hooked sites, what is held meanwhile), resolving requests
/// with the engine's own `Hooks` and `RowMap` (so bad input fails as in a real run), and
/// answers with zeros of the right shapes. `run_sweep` driven by it plans exactly the calls it
/// would make on `path`, whatever its grouping and batching.
struct Planner<'a> {
    cfg: &'a ModelConfig,
    path: Path,
    calls: Mutex<Vec<(&'static str, Call)>>,
    held_clean: Arc<AtomicUsize>,
}

/// The f32 values a sweep holds after `calls`: every capture (patch sources), which `run_sweep`
/// keeps for the whole run (both methods).
fn captures_held(calls: &[(&'static str, Call)]) -> usize {
    calls.iter().map(|(_, c)| c.captured - c.kept).sum()
}

impl Planner<'_> {
    /// A planned clean run of `len` positions, counted as held until dropped.
    fn planned_clean(&self, len: usize) -> CleanRun {
        let bytes = self.clean_run_bytes(len);
        self.held_clean.fetch_add(bytes, Ordering::Relaxed);
        CleanRun::new(len, PlannedClean { bytes, held: self.held_clean.clone() })
    }

    /// Records one call; `kept` f32 values are kept besides the request's captures (clean runs).
    fn record(&self, phase: &'static str, start_layer: usize, seqs: Vec<(usize, usize)>, req: &RunRequest, kept: usize) -> Result<RunOutput> {
        let rows = RowMap::new(seqs.iter().map(|s| s.0).collect(), seqs.iter().map(|s| s.1).collect());
        let hooks = Hooks::new(self.cfg, &rows, req.interventions, req.captures, req.n_keys)?;
        let logit_rows = rows.select(req.logits_at, "logits")?;
        let logit_width = req.logit_tokens.map_or(self.cfg.vocab_size, <[u32]>::len);
        let head_out_layers = (start_layer..self.cfg.n_layers).filter(|&l| hooks.touches(Site::new(l, SiteKind::HeadOut))).count();
        let captured = hooks.into_captured();
        let n_captured: usize = captured.iter().map(|c| c.data.len()).sum();
        let mut calls = self.calls.lock().map_err(|_| Error::input("cost planner: poisoned lock"))?;
        let call = Call {
            start_layer,
            seqs,
            resumed: phase == "segments",
            logit_rows: logit_rows.len(),
            logit_width,
            gathered_head: req.logit_tokens.is_some(),
            captured: n_captured + kept,
            kept,
            head_out_layers,
            held_clean_bytes: self.held_clean.load(Ordering::Relaxed),
            held_captures: captures_held(&calls),
        };
        calls.push((phase, call));
        let logits = vec![0.0; logit_rows.len() * logit_width];
        let metrics = host_label_metrics(req, &logits, logit_rows.len())?;
        Ok(RunOutput { logits, logit_rows, held: req.hold_captures.then(|| Held::host(&captured)), captured, metrics, nonfinite: None })
    }
}

impl Engine for Planner<'_> {
    fn config(&self) -> &ModelConfig {
        self.cfg
    }
    fn device_name(&self) -> String {
        "plan".into()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        let phase = if req.interventions.is_empty() { "clean" } else { "experiments" };
        self.record(phase, 0, prompts.iter().map(|p| (0, p.len())).collect(), req, 0)
    }
    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)> {
        let positions: usize = prompts.iter().map(Vec::len).sum();
        let out = self.record("clean", 0, prompts.iter().map(|p| (0, p.len())).collect(), req, positions * self.cfg.d_model * self.cfg.n_layers)?;
        let runs = prompts.iter().map(|p| self.planned_clean(p.len())).collect();
        Ok((runs, out))
    }
    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput> {
        let mut seqs = Vec::with_capacity(segs.len());
        for s in segs {
            s.clean.state::<PlannedClean>()?;
            let new = s.clean.len.checked_sub(s.p0).ok_or_else(|| Error::input(format!("segment start {} is past its prompt's {} positions", s.p0, s.clean.len)))?;
            seqs.push((s.p0, new));
        }
        self.record("segments", start_layer, seqs, req, 0)
    }
    fn clean_run_bytes(&self, len: usize) -> usize {
        clean_run_bytes(self.cfg, self.path, len)
    }
    /// Nothing to write: a plan holds no values (the spill file stays empty).
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>> {
        run.state::<PlannedClean>()?;
        Ok(Vec::new())
    }
    fn clean_run_from_bytes(&self, len: usize, _: &[u8]) -> Result<CleanRun> {
        Ok(self.planned_clean(len))
    }
    /// As the engine on `path` says.
    fn forward_flops_per_s(&self) -> f64 {
        match self.path {
            Path::Cpu => crate::engine::cpu_forward_flops_per_s(),
            Path::Gpu => crate::engine::device_forward::DEVICE_FLOPS_PER_S,
        }
    }
    fn start_decode(&self) -> Result<DecodeSeq> {
        Ok(DecodeSeq::new(PlannedDecode))
    }
    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput> {
        let rows: Vec<(usize, usize)> = seqs.iter().zip(tokens).map(|(s, t)| (s.len(), t.len())).collect();
        DecodeSeq::begin::<PlannedDecode>(seqs, tokens)?;
        let out = self.record("decode", 0, rows, req, 0)?;
        DecodeSeq::grown(seqs, tokens);
        Ok(out)
    }
}

/// A planned decoded sequence (its length is all a plan needs).
struct PlannedDecode;

/// Where the resumed method's clean runs come from on `path` (as the manifest of `patch` says).
pub fn clean_schedule(cfg: &ModelConfig, path: Path, lens: &[usize], plan: &PatchPlan, exps: &[Experiment]) -> CleanSchedule {
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| vec![0; n]).collect();
    let planner = Planner { cfg, path, calls: Mutex::new(Vec::new()), held_clean: Arc::new(AtomicUsize::new(0)) };
    CleanSchedule::new(&planner, &prompts, exps, &plan.sweep, plan.mem_budget, plan.overflow)
}

/// The calls `run_sweep` makes for `method` on `path`, over prompts of lengths `lens`, running
/// the first `limit` experiments (by id) as `bench patch --naive-limit` does.
pub(super) fn sweep_calls(cfg: &ModelConfig, path: Path, lens: &[usize], plan: &PatchPlan, exps: &[Experiment], method: Method, limit: usize) -> Result<Vec<Phase>> {
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| vec![0; n]).collect();
    let planner = Planner { cfg, path, calls: Mutex::new(Vec::new()), held_clean: Arc::new(AtomicUsize::new(0)) };
    let skip: HashSet<usize> = exps.iter().skip(limit).map(|e| e.id).collect();
    let progress = ProgressBar::hidden();
    let settings = RunSettings { method, skip: &skip, batch_rows: plan.batch_rows, mem_budget: plan.mem_budget, overflow: plan.overflow, progress: &progress };
    run_sweep(&planner, &prompts, &plan.sweep, exps, &settings, &mut |_| Ok(()))?;
    Ok(phases(planner.calls.into_inner().map_err(|_| Error::input("cost planner: poisoned lock"))?))
}
