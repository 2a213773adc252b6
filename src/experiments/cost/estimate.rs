//! Estimates: the calls of each method summed per phase, on every device.

use serde::Serialize;

use super::calls::{call_work, weight_bytes};
use super::plan::{Phase, pass_calls, sweep_calls};
use super::{Bytes, DeviceTime, Flops, Hardware, Memory, PassSpec, PatchPlan, Path};
use crate::experiments::patch::{Experiment, Method, experiments};
use crate::model::config::{DType, ModelConfig};
use crate::{Error, Result};

/// Bytes on each path.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PathBytes {
    pub cpu: Bytes,
    pub gpu: Bytes,
}

/// Peak memory on each path.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PathMemory {
    pub cpu: Memory,
    pub gpu: Memory,
}

/// Cost of a group of calls.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseCost {
    pub name: String,
    /// Forward calls.
    pub calls: usize,
    /// Rows x layers computed (a one-token step through one block counts 1).
    pub row_layers: f64,
    pub flops: Flops,
    pub bytes: PathBytes,
    /// Per device, in the order of `Estimate::devices`.
    pub time: Vec<DeviceTime>,
}

/// Cost of one method (or of the one way a forward workload runs).
#[derive(Clone, Debug, Serialize)]
pub struct MethodCost {
    /// "resumed", "naive" or "forward".
    pub method: String,
    /// Experiments covered (patch), or prompts.
    pub items: usize,
    pub phases: Vec<PhaseCost>,
    pub total: PhaseCost,
    pub peak_memory: PathMemory,
}

/// Model facts the estimate used.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub params: usize,
    /// The dtype weights are read in on the CPU path.
    pub weight_dtype: String,
}

/// naive / resumed, per quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub flops: f64,
    pub bytes_cpu: f64,
    pub bytes_gpu: f64,
    /// Per device, in the order of `Estimate::devices`.
    pub time: Vec<(String, f64)>,
}

/// The answer of `patchbay cost`.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    /// "patch", "probe", "capture" or "forward".
    pub command: String,
    pub model: ModelInfo,
    /// The planned workload, as parsed.
    pub workload: serde_json::Value,
    pub devices: Vec<Hardware>,
    pub methods: Vec<MethodCost>,
    /// Patch with both methods: naive / resumed.
    pub naive_over_resumed: Option<Ratio>,
}

impl Estimate {
    pub fn method(&self, name: &str) -> Option<&MethodCost> {
        self.methods.iter().find(|m| m.method == name)
    }
}

fn add_flops(a: &mut Flops, b: &Flops) {
    a.gemm += b.gemm;
    a.attention += b.attention;
    a.lm_head += b.lm_head;
    a.total += b.total;
}

fn add_bytes(a: &mut Bytes, b: &Bytes) {
    a.weights += b.weights;
    a.kv += b.kv;
    a.activations += b.activations;
    a.captures += b.captures;
    a.total += b.total;
}

fn add_time(a: &mut DeviceTime, (c, m, o): (f64, f64, f64)) {
    a.compute_s += c;
    a.memory_s += m;
    a.overhead_s += o;
    a.seconds = a.compute_s + a.memory_s + a.overhead_s;
    let terms = [("compute", a.compute_s), ("memory", a.memory_s), ("overhead", a.overhead_s)];
    a.dominant = terms.iter().max_by(|x, y| x.1.total_cmp(&y.1)).map_or("", |t| t.0).to_string();
}

fn add_phase(total: &mut PhaseCost, p: &PhaseCost) {
    total.calls += p.calls;
    total.row_layers += p.row_layers;
    add_flops(&mut total.flops, &p.flops);
    add_bytes(&mut total.bytes.cpu, &p.bytes.cpu);
    add_bytes(&mut total.bytes.gpu, &p.bytes.gpu);
    for (t, pt) in total.time.iter_mut().zip(&p.time) {
        add_time(t, (pt.compute_s, pt.memory_s, pt.overhead_s));
    }
}

/// Costs a method from its calls on each path (`plans[0]` CPU, `plans[1]` GPU: the same calls
/// except where the engines group differently) on every device; peak memory per path. FLOPs,
/// calls and row-layers are those of the CPU plan.
fn method_cost(cfg: &ModelConfig, weight_dtype: DType, method: &str, items: usize, plans: [Vec<Phase>; 2], devices: &[Hardware]) -> MethodCost {
    let empty_time = || devices.iter().map(|h| DeviceTime { device: h.name.clone(), ..DeviceTime::default() }).collect::<Vec<_>>();
    let mut total = PhaseCost { name: "total".into(), time: empty_time(), ..PhaseCost::default() };
    let mut peak = PathMemory::default();
    let mut out: Vec<PhaseCost> = Vec::new();
    for (path, plan) in [Path::Cpu, Path::Gpu].into_iter().zip(plans) {
        let weights = weight_bytes(cfg, path, weight_dtype);
        let mem = if path == Path::Cpu { &mut peak.cpu } else { &mut peak.gpu };
        for phase in plan {
            let i = match out.iter().position(|p| p.name == phase.name) {
                Some(i) => i,
                None => {
                    out.push(PhaseCost { name: phase.name.into(), time: empty_time(), ..PhaseCost::default() });
                    out.len() - 1
                }
            };
            let pc = &mut out[i];
            for call in &phase.calls {
                let w = call_work(cfg, call, path, weight_dtype);
                if path == Path::Cpu {
                    pc.calls += 1;
                    pc.row_layers += (call.rows() * cfg.n_layers.saturating_sub(call.start_layer)) as f64;
                    add_flops(&mut pc.flops, &w.flops);
                }
                add_bytes(if path == Path::Cpu { &mut pc.bytes.cpu } else { &mut pc.bytes.gpu }, &w.bytes);
                let m = Memory { weights, total: weights + w.memory.kv_caches + w.memory.activations + w.memory.captures, ..w.memory };
                if m.total > mem.total {
                    *mem = m;
                }
                for (t, hw) in pc.time.iter_mut().zip(devices).filter(|(_, hw)| hw.path == path) {
                    add_time(t, w.time(hw));
                }
            }
        }
    }
    for pc in &out {
        add_phase(&mut total, pc);
    }
    MethodCost { method: method.into(), items, phases: out, total, peak_memory: peak }
}

/// What to estimate.
#[derive(Clone, Debug)]
pub enum Workload {
    Passes(PassSpec),
    Patch { plan: PatchPlan, resumed: bool, naive: bool },
}

/// Estimates `workload` on prompts of lengths `lens` for `devices`.
pub fn estimate(cfg: &ModelConfig, weight_dtype: DType, lens: &[usize], workload: &Workload, devices: &[Hardware]) -> Result<Vec<MethodCost>> {
    if lens.is_empty() || lens.contains(&0) {
        return Err(Error::input("every prompt needs at least one token"));
    }
    match workload {
        Workload::Passes(spec) => {
            let plans = [pass_calls(cfg, lens, spec)?, pass_calls(cfg, lens, spec)?];
            Ok(vec![method_cost(cfg, weight_dtype, "forward", lens.len(), plans, devices)])
        }
        Workload::Patch { plan, resumed, naive } => {
            let exps = patch_experiments(cfg, plan)?;
            let mut out = Vec::new();
            if *resumed {
                out.push(sweep_cost(cfg, weight_dtype, lens, plan, &exps, Method::Resumed, exps.len(), devices)?);
            }
            if *naive {
                out.push(sweep_cost(cfg, weight_dtype, lens, plan, &exps, Method::Naive, exps.len(), devices)?);
            }
            Ok(out)
        }
    }
}

/// A patch method on the first `limit` experiments of the sweep.
#[allow(clippy::too_many_arguments)]
pub fn sweep_cost(cfg: &ModelConfig, weight_dtype: DType, lens: &[usize], plan: &PatchPlan, exps: &[Experiment], method: Method, limit: usize, devices: &[Hardware]) -> Result<MethodCost> {
    let n = limit.min(exps.len());
    let plans = [sweep_calls(cfg, Path::Cpu, lens, plan, exps, method, n)?, sweep_calls(cfg, Path::Gpu, lens, plan, exps, method, n)?];
    let name = match method {
        Method::Resumed => "resumed",
        Method::Naive => "naive",
    };
    Ok(method_cost(cfg, weight_dtype, name, n, plans, devices))
}

/// The experiments of a patch plan (`run_sweep`, driven by the planner, checks the rest as a
/// real run would: positions, sites, units, prompt indices).
pub fn patch_experiments(cfg: &ModelConfig, plan: &PatchPlan) -> Result<Vec<Experiment>> {
    if plan.pairs.is_empty() {
        return Err(Error::input("no pairs"));
    }
    experiments(&plan.pairs, &plan.sweep, cfg.n_layers)
}

/// naive / resumed of two method costs.
pub fn ratio(resumed: &MethodCost, naive: &MethodCost) -> Ratio {
    let (r, n) = (&resumed.total, &naive.total);
    Ratio {
        flops: n.flops.total / r.flops.total,
        bytes_cpu: n.bytes.cpu.total / r.bytes.cpu.total,
        bytes_gpu: n.bytes.gpu.total / r.bytes.gpu.total,
        time: r.time.iter().zip(&n.time).map(|(a, b)| (a.device.clone(), b.seconds / a.seconds)).collect(),
    }
}
