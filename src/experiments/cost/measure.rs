//! Measured check (`cost patch --measure`): the planned sweep run on the CPU and timed beside
//! its estimate.

use std::collections::HashSet;

use indicatif::ProgressBar;
use serde::Serialize;

use super::{PatchPlan, calibrate_cpu, sweep_cost};
use crate::experiments::patch::Method;
use crate::experiments::workload::{PatchWorkload, PatchWorkloadSpec};
use crate::model::Model;
use crate::model::config::DType;
use crate::Result;

/// The plan of a random patching workload (the one `bench patch` runs: random prompts and pairs).
pub fn workload_plan(w: &PatchWorkload, spec: &PatchWorkloadSpec) -> PatchPlan {
    // Experiments are enumerated pair-major: one pair per (sites x centres) experiments.
    let per_pair = (w.sweep.sites.len() * w.sweep.centers.len()).max(1);
    let pairs = w.exps.iter().step_by(per_pair).map(|e| e.pair).collect();
    PatchPlan { pairs, sweep: w.sweep.clone(), batch_rows: spec.batch_rows, mem_budget: spec.mem_budget, overflow: spec.overflow }
}

/// (running, waiting for a CPU) nanoseconds summed over this process's threads, from Linux's
/// per-thread schedstat; None where it is not available.
fn sched_ns() -> Option<(u64, u64)> {
    let mut sum = (0, 0);
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread may exit while we read: skip it.
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        let v: Vec<u64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 2 {
            sum = (sum.0 + v[0], sum.1 + v[1]);
        }
    }
    Some(sum)
}

/// Estimate vs a measured CPU run of the same experiments.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub method: String,
    pub experiments: usize,
    /// The estimate from a calibration just before and just after the run, and their mean.
    pub estimate_before_s: f64,
    pub estimate_after_s: f64,
    pub estimate_s: f64,
    pub measured_s: f64,
    /// measured / estimate
    pub ratio: f64,
    /// Share of the run's runnable thread time spent waiting for a CPU (taken by other
    /// processes), and the same during the two calibrations: near 0 on a quiet machine; on a
    /// shared one a run stretches by about 1 / (1 - wait). None off Linux.
    pub cpu_wait: Option<f64>,
    pub calibration_cpu_wait: Option<f64>,
}

/// Share of runnable time spent waiting for a CPU between two `sched_ns` readings.
fn wait_share(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    let (a, b) = (a?, b?);
    let (run, wait) = (b.0.checked_sub(a.0)?, b.1.checked_sub(a.1)?);
    (run + wait > 0).then(|| wait as f64 / (run + wait) as f64)
}

/// Runs the first `limit` experiments of a `bench patch` workload with `method` on the CPU and
/// checks the time against the estimate (calibrated just before and just after the run).
pub fn measure_sweep(model: &Model, weight_dtype: DType, w: &PatchWorkload, spec: &PatchWorkloadSpec, method: Method, limit: usize, progress: &ProgressBar) -> Result<Check> {
    let cfg = &model.cfg;
    let plan = workload_plan(w, spec);
    let lens: Vec<usize> = w.prompts.iter().map(Vec::len).collect();
    let limit = limit.min(w.exps.len());
    // (method name, estimated seconds, CPU wait share during the calibration)
    let estimate_now = || -> Result<(String, f64, Option<f64>)> {
        let s0 = sched_ns();
        let cpu = calibrate_cpu(cfg, weight_dtype)?;
        let wait = wait_share(s0, sched_ns());
        let est = sweep_cost(cfg, weight_dtype, &lens, &plan, &w.exps, method, limit, std::slice::from_ref(&cpu))?;
        Ok((est.method, est.total.time[0].seconds, wait))
    };
    let (name, before, wait0) = estimate_now()?;
    let skip: HashSet<usize> = w.exps.iter().skip(limit).map(|e| e.id).collect();
    progress.set_message(name.clone());
    let s0 = sched_ns();
    let (measured_s, results) = w.run(model, method, &skip, spec, progress)?;
    let cpu_wait = wait_share(s0, sched_ns());
    let (_, after, wait1) = estimate_now()?;
    let calibration_cpu_wait = wait0.zip(wait1).map(|(a, b)| (a + b) / 2.0);
    let estimate_s = (before + after) / 2.0;
    Ok(Check { method: name, experiments: results.len(), estimate_before_s: before, estimate_after_s: after, estimate_s, measured_s, ratio: measured_s / estimate_s, cpu_wait, calibration_cpu_wait })
}
