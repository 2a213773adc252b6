//! `cost`: what a planned experiment will cost, before it runs: FLOPs and bytes of every forward
//! call the engine would make, peak memory, and a roofline estimate of the time on a named device.
//!
//! The model, in one place:
//! - **Calls.** A workload is enumerated into the exact forward calls the engine makes. For a
//!   patch sweep, `run_sweep` itself runs against a recording engine ([`Planner`]) that computes
//!   nothing, so the plan is the code's own (clean runs, target groups under the memory budget,
//!   segment batches, or one forward per experiment for the naive method); `capture`/`probe`
//!   are batches of prompts. Each call is a start layer, per sequence (cached positions, new
//!   rows), its logit rows and width, its captures, the layers where head_out is hooked, and
//!   what is held meanwhile.
//! - **FLOPs** are counted as `forward.rs` computes them: per row and layer the q/k/v/o and
//!   gate/up/down GEMMs (2*m*n*k; o_proj once per head where head_out is hooked), attention
//!   (QK^T and PV: 4 * d_head * n_heads per visible key, causal with sliding windows), the
//!   lm_head rows that are read (label tokens only where labels are used). Norms, RoPE,
//!   activations and softmax are not counted as FLOPs (their bytes are).
//! - **Bytes** depend on the path: the CPU reference (`forward.rs`: weights in their stored
//!   dtype, f32 GEMM operands and KV cache, a resumed segment's KV prefix copied per layer) or
//!   the device forward (`device_forward.rs`: bf16 weights, GEMM operands and KV, f32 residual).
//! - **Time** of a call = sum over its ops (layer GEMMs, lm_head, attention, elementwise) of
//!   max(FLOPs / throughput, bytes / bandwidth) on a GPU (the roofline: each op's time goes to
//!   the term that bounds it), or of both terms on the CPU (`matmul_t` converts a weight tile,
//!   then multiplies it: streaming and compute do not overlap), plus a fixed cost per dispatched
//!   op (GPU: a kernel launch; CPU: a parallel op's fork-join). The largest of compute, memory
//!   and overhead is "dominant".
//! - **Devices**: GPUs from their datasheets (see [`GPUS`]); the CPU measured on this machine
//!   with the engine's own kernels at the model's shapes ([`calibrate_cpu`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::cpu;
use crate::engine::forward::RunOutput;
use crate::engine::{CleanRun, Engine, RunRequest, Segment};
use crate::experiments::bench::{PatchBenchSpec, PatchWorkload};
use crate::experiments::patch::{Experiment, Method, Pair, RunSettings, SweepSpec, experiments, run_sweep};
use crate::intervene::{Hooks, RowMap};
use crate::model::checkpoint::{Checkpoint, Weight};
use crate::model::Model;
use crate::model::config::{DType, ModelConfig};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

/// Which forward executes the work; it sets element sizes and how ops are dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// The CPU reference (`forward.rs`): f32 math on weights in their stored dtype (converted
    /// tile by tile inside the GEMM), f32 KV cache, each resumed segment's KV prefix copied per
    /// layer, each sequence's attention its own parallel op.
    Cpu,
    /// The device forward (`device_forward.rs`): bf16 weights, GEMM operands and KV cache, f32
    /// residual and GEMM outputs, paged KV (no copies), one varlen attention launch per layer.
    Gpu,
}

/// Throughputs of one device, as the roofline uses them.
#[derive(Clone, Debug, Serialize)]
pub struct Hardware {
    pub name: String,
    pub path: Path,
    /// GEMM throughput, FLOP/s (GPU: dense bf16 tensor-core peak; CPU: measured at the
    /// largest row count of `gemm_curve`).
    pub gemm_flops: f64,
    /// CPU: (rows, FLOP/s) of the GEMM's multiply measured at several row counts (the weight
    /// stream excluded), interpolated in log(rows) at each call's rows; empty: `gemm_flops`
    /// at any row count.
    pub gemm_curve: Vec<(f64, f64)>,
    /// The compute and memory terms of an op overlap (GPU: the roofline max) or add (CPU:
    /// `matmul_t` converts a weight tile, then multiplies it, one after the other).
    pub overlap: bool,
    /// Attention throughput, FLOP/s (GPU: the same peak; CPU: measured on the engine's attention).
    pub attention_flops: f64,
    /// Bytes/s at which weights stream through the GEMMs (GPU: memory bandwidth; CPU: measured
    /// with the engine's GEMM on one row, which includes the conversion to f32).
    pub weight_bandwidth: f64,
    /// Bytes/s for every other byte (GPU: memory bandwidth; CPU: a measured copy).
    pub bandwidth: f64,
    /// Seconds per dispatched op (GPU: a kernel launch; CPU: a parallel op's fork-join).
    pub op_overhead_s: f64,
    /// Seconds per sequence and layer (CPU: each sequence's attention is a nested parallel op;
    /// GPU: 0, one varlen launch serves every sequence).
    pub seq_overhead_s: f64,
    /// Memory capacity in bytes (None: not checked).
    pub memory_bytes: Option<f64>,
    /// Where the numbers come from.
    pub source: String,
}

/// Kernel launch cost assumed on GPUs: the host-side latency of one launch without CUDA graphs
/// (a few microseconds; an assumption, not a measurement).
pub const GPU_LAUNCH_S: f64 = 4e-6;

/// Datasheet figures: (name, dense bf16 FLOP/s, memory bandwidth B/s, memory bytes, source).
pub const GPUS: [(&str, f64, f64, f64, &str); 3] = [
    ("a100", 312e12, 2.0e12, 80e9, "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense bf16 tensor core, 2.0 TB/s HBM2e, 80 GB"),
    ("h100", 989e12, 3.35e12, 80e9, "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16 tensor core (1979 with sparsity), 3.35 TB/s HBM3, 80 GB"),
    ("h200", 989e12, 4.8e12, 141e9, "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense bf16 tensor core, 4.8 TB/s HBM3e, 141 GB"),
];

/// Device names `--device` accepts.
pub const DEVICE_NAMES: [&str; 4] = ["cpu", "a100", "h100", "h200"];

/// A GPU of [`GPUS`], or None for another name.
pub fn gpu(name: &str) -> Option<Hardware> {
    GPUS.iter().find(|g| g.0 == name).map(|&(name, flops, bw, mem, source)| Hardware {
        name: name.into(),
        path: Path::Gpu,
        gemm_flops: flops,
        gemm_curve: Vec::new(),
        overlap: true,
        attention_flops: flops,
        weight_bandwidth: bw,
        bandwidth: bw,
        op_overhead_s: GPU_LAUNCH_S,
        seq_overhead_s: 0.0,
        memory_bytes: Some(mem),
        source: format!("{source}; {:.0} us per kernel launch assumed", GPU_LAUNCH_S * 1e6),
    })
}

/// The devices named in `spec` (`all`, or a comma list of cpu, a100, h100, h200); the CPU is
/// calibrated once per process and model shape.
pub fn devices(spec: &str, cfg: &ModelConfig, weight_dtype: DType) -> Result<Vec<Hardware>> {
    let names: Vec<&str> = if spec.trim() == "all" { DEVICE_NAMES.to_vec() } else { spec.split(',').map(str::trim).collect() };
    let mut out: Vec<Hardware> = Vec::new();
    for name in names {
        if out.iter().any(|h| h.name == name) {
            continue;
        }
        out.push(match name {
            "cpu" => cpu_hardware(cfg, weight_dtype)?,
            _ => gpu(name).ok_or_else(|| Error::input(format!("unknown device `{name}` (known: {}, or all)", DEVICE_NAMES.join(", "))))?,
        });
    }
    Ok(out)
}

/// The shapes the CPU calibration runs at: the model's MLP up-projection [d_mlp, d_model]
/// (capped at [2048, 2048] so that it stays near half a second), and its attention heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CalibrationShape {
    n: usize,
    k: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    weight_dtype: DTypeKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DTypeKey(usize);

impl CalibrationShape {
    fn new(cfg: &ModelConfig, weight_dtype: DType) -> Self {
        CalibrationShape {
            n: cfg.d_mlp.clamp(1, 2048),
            k: cfg.d_model.clamp(1, 2048),
            n_heads: cfg.n_heads.max(1),
            n_kv_heads: cfg.n_kv_heads.max(1),
            d_head: cfg.d_head.max(1),
            weight_dtype: DTypeKey(weight_dtype.size()),
        }
    }
}

/// The CPU calibrated for `cfg` (measured once per process and shape).
pub fn cpu_hardware(cfg: &ModelConfig, weight_dtype: DType) -> Result<Hardware> {
    static CACHE: Mutex<Vec<(CalibrationShape, Hardware)>> = Mutex::new(Vec::new());
    let shape = CalibrationShape::new(cfg, weight_dtype);
    if let Some((_, h)) = CACHE.lock().ok().and_then(|c| c.iter().find(|(s, _)| *s == shape).cloned()) {
        return Ok(h);
    }
    let h = calibrate_cpu(cfg, weight_dtype)?;
    if let Ok(mut c) = CACHE.lock() {
        c.push((shape, h.clone()));
    }
    Ok(h)
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median wall time of `reps` runs of `f` (after one warm-up run).
fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64().max(1e-9)
        })
        .collect();
    median(&mut t)
}

/// A `[n, k]` weight of `dtype` with small deterministic values, memory-mapped from a
/// temporary safetensors file exactly as checkpoint weights are.
fn calibration_weight(n: usize, k: usize, dtype: DType) -> Result<Weight> {
    let dir = std::env::temp_dir().join(format!("patchbay-cost-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let values = (0..n * k).map(|i| ((crate::rng::splitmix64(i as u64) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1);
    let (st_dtype, bytes): (safetensors::Dtype, Vec<u8>) = match dtype {
        DType::F32 => (safetensors::Dtype::F32, values.flat_map(f32::to_le_bytes).collect()),
        DType::BF16 => (safetensors::Dtype::BF16, values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()),
        DType::F16 => (safetensors::Dtype::F16, values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()),
    };
    let path = dir.join("model.safetensors");
    let view = safetensors::tensor::TensorView::new(st_dtype, vec![n, k], &bytes).map_err(|e| Error::input(format!("calibration tensor: {e}")))?;
    let written = safetensors::serialize_to_file([("w", view)], None, &path).map_err(|e| Error::file(&path, format!("cannot write: {e}")));
    let weight = written.and_then(|_| Checkpoint::open(&dir)).and_then(|ck| ck.get("w", &[n, k]));
    // The mapping outlives the file (Linux keeps unlinked mapped files).
    let _ = std::fs::remove_dir_all(&dir);
    weight
}

/// Row counts the CPU GEMM is calibrated at.
const CALIBRATION_ROWS: [usize; 5] = [1, 4, 16, 64, 256];

/// Measures the CPU path on this machine with the engine's own kernels (about half a second):
/// - the fork-join cost of a parallel op: `cpu::attention` of one row over one key;
/// - weight bandwidth: `cpu::matmul_t` of one row through the model's MLP up-projection shape
///   (streaming and converting the weight), less one fork-join;
/// - GEMM FLOP/s at 4..256 rows: the same GEMM, less its one-row time (the multiply alone:
///   the weight stream is its own term), the row counts interleaved in rounds;
/// - attention FLOP/s: `cpu::attention` of 32 new rows over 64 keys with the model's heads;
/// - bandwidth: a 64 MiB copy (bytes read + written);
/// - the per-sequence cost of attention nested in a parallel loop over sequences (what each
///   resumed segment pays per layer).
///
/// Each figure is a median of several runs: the machine may be shared, and the estimate should
/// describe it as it runs now.
pub fn calibrate_cpu(cfg: &ModelConfig, weight_dtype: DType) -> Result<Hardware> {
    let s = CalibrationShape::new(cfg, weight_dtype);
    let (qw, kvw) = (s.n_heads * s.d_head, s.n_kv_heads * s.d_head);
    let (new, ctx) = (32, 64);
    let q = vec![0.1f32; new * qw]; // [new, n_heads, d_head]
    let kv = vec![0.1f32; ctx * kvw]; // [ctx, n_kv_heads, d_head]
    let attn = |q: &[f32], kv: &[f32], z: &mut [f32], start: usize| crate::backend::ops::attention::attention_ref(q, kv, kv, z, None, ctx, start, s.n_heads, s.n_kv_heads, s.d_head, 0.1, None, None);

    // Fork-join: attention of one row over one key (work negligible), top-level and nested.
    let mut z1 = vec![0.0f32; qw]; // [1, n_heads, d_head]
    let t_op = median_time(101, || attn(&q[..qw], &kv[..kvw], &mut z1, 0));
    let n_seq = 64;
    let t_seq = median_time(5, || {
        (0..n_seq).into_par_iter().for_each(|_| {
            let mut z = vec![0.0f32; qw]; // [1, n_heads, d_head]
            attn(&q[..qw], &kv[..kvw], &mut z, 0);
        })
    }) / n_seq as f64;

    let w = calibration_weight(s.n, s.k, weight_dtype)?;
    let m_max = CALIBRATION_ROWS[CALIBRATION_ROWS.len() - 1];
    let x = vec![0.25f32; m_max * s.k]; // [m, k]
    let mut y = vec![0.0f32; m_max * s.n]; // [m, n]
    // Row counts interleaved in rounds, so that a burst of load from other processes falls on
    // all of them alike; per row count the median of the rounds.
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); CALIBRATION_ROWS.len()];
    for round in 0..6 {
        for (i, &m) in CALIBRATION_ROWS.iter().enumerate() {
            let t0 = Instant::now();
            cpu::matmul_t(&x[..m * s.k], m, &w, &mut y[..m * s.n]);
            if round > 0 {
                rounds[i].push(t0.elapsed().as_secs_f64().max(1e-9));
            }
        }
    }
    let times: Vec<f64> = rounds.iter_mut().map(|t| median(t)).collect();
    let t_row = times[0];
    let mut gemm_curve: Vec<(f64, f64)> = CALIBRATION_ROWS
        .iter()
        .zip(&times)
        .skip(1)
        .map(|(&m, &t)| (m as f64, 2.0 * (m * s.n * s.k) as f64 / (t - t_row).max(t / 10.0)))
        .collect();
    // More rows never multiply slower: at few rows the multiply is a small difference of two
    // times, and its noise is clipped to the next row count's throughput.
    for i in (0..gemm_curve.len() - 1).rev() {
        gemm_curve[i].1 = gemm_curve[i].1.min(gemm_curve[i + 1].1);
    }

    let mut z = vec![0.0f32; new * qw]; // [new, n_heads, d_head]
    let t_attn = median_time(3, || attn(&q, &kv, &mut z, ctx - new));
    let attn_flops = 4.0 * (s.d_head * s.n_heads) as f64 * keys_sum(ctx - new, new, None);

    let src = vec![1.0f32; 1 << 24]; // 64 MiB
    let mut dst = vec![0.0f32; 1 << 24];
    let t_copy = median_time(3, || dst.copy_from_slice(std::hint::black_box(&src)));
    std::hint::black_box(&dst);

    Ok(Hardware {
        name: "cpu".into(),
        path: Path::Cpu,
        gemm_flops: gemm_curve[gemm_curve.len() - 1].1,
        gemm_curve,
        overlap: false,
        attention_flops: attn_flops / (t_attn - t_op).max(t_attn / 4.0),
        weight_bandwidth: (s.n * s.k * weight_dtype.size()) as f64 / (t_row - t_op).max(t_row / 4.0),
        bandwidth: 2.0 * (src.len() * 4) as f64 / t_copy,
        op_overhead_s: t_op,
        seq_overhead_s: t_seq,
        memory_bytes: None,
        source: format!(
            "measured on this machine ({} threads) with the engine's kernels: matmul_t of 1..{m_max} rows through [{}, {}] ({} weights), attention {} heads x {} over {ctx} keys, a 64 MiB copy; medians",
            rayon::current_num_threads(),
            s.n,
            s.k,
            weight_dtype.name(),
            s.n_heads,
            s.d_head
        ),
    })
}

impl Hardware {
    /// GEMM FLOP/s at `rows` rows: `gemm_curve` interpolated in log(rows), clamped at its ends.
    pub fn gemm_flops_at(&self, rows: f64) -> f64 {
        let c = &self.gemm_curve;
        if c.is_empty() {
            return self.gemm_flops;
        }
        match c.iter().position(|&(m, _)| m >= rows) {
            Some(0) => c[0].1,
            None => c[c.len() - 1].1,
            Some(i) => {
                let ((m0, f0), (m1, f1)) = (c[i - 1], c[i]);
                let a = (rows.ln() - m0.ln()) / (m1.ln() - m0.ln());
                f0 + a * (f1 - f0)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calls and their work
// ---------------------------------------------------------------------------------------------

/// One forward call of the engine, as the cost model sees it.
#[derive(Clone, Debug, Default)]
pub struct Call {
    /// First block computed (0: the call embeds tokens).
    pub start_layer: usize,
    /// Per sequence: (positions already in its cache, new rows).
    pub seqs: Vec<(usize, usize)>,
    /// The caches continue clean prefixes (resumed segments: the CPU path copies the prefix).
    pub resumed: bool,
    /// Rows of logits and their width (label tokens, or the vocabulary).
    pub logit_rows: usize,
    pub logit_width: usize,
    /// The lm_head rows are gathered (label tokens) rather than the whole matrix used.
    pub gathered_head: bool,
    /// f32 values the call captures, and of those the values kept to resume from (a clean
    /// run's resid_pre at every layer).
    pub captured: usize,
    pub kept: usize,
    /// Layers (among those computed) where head_out is hooked: o_proj runs once per head there.
    pub head_out_layers: usize,
    /// State held while the call runs, besides its own: bytes of kept clean runs (KV caches
    /// and residuals to resume from), and f32 values of captures or patch sources.
    pub held_clean_bytes: usize,
    pub held_captures: usize,
}

impl Call {
    fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.1).sum()
    }
}

/// FLOPs (path-independent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Flops {
    /// The q/k/v/o and gate/up/down GEMMs of every computed layer.
    pub gemm: f64,
    /// QK^T and PV over the visible keys.
    pub attention: f64,
    /// The lm_head rows read (label tokens or the vocabulary) at the logit rows.
    pub lm_head: f64,
    pub total: f64,
}

/// Bytes moved on one path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Bytes {
    /// Weights read (layers, embedding rows, lm_head rows).
    pub weights: f64,
    /// KV cache written and read (and, on the CPU path, resumed prefixes copied).
    pub kv: f64,
    /// Activations read and written by GEMMs, attention and elementwise ops.
    pub activations: f64,
    /// Captured values written (and, for clean runs, the residuals kept).
    pub captures: f64,
    pub total: f64,
}

/// Estimated time on one device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceTime {
    pub device: String,
    pub seconds: f64,
    /// Time of the ops bound by FLOPs, by bytes, and the per-op fixed costs.
    pub compute_s: f64,
    pub memory_s: f64,
    pub overhead_s: f64,
    /// "compute", "memory" or "overhead": the largest of the three.
    pub dominant: String,
}

/// Peak memory on one path, at the call where it peaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub weights: f64,
    /// Clean KV caches and residuals held (to resume from), plus the call's own KV cache.
    pub kv_caches: f64,
    /// The call's buffers (one per meaning, as the forward allocates them) and logits.
    pub activations: f64,
    /// Captured values and patch sources held.
    pub captures: f64,
    pub total: f64,
}

/// The ops of a call, for the roofline: each is bound by its FLOPs or its bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Op {
    /// Rows of the GEMM (its M), for the CPU's row-dependent throughput.
    rows: f64,
    /// FLOPs at the GEMM rate, FLOPs at the attention rate.
    gemm_flops: f64,
    attn_flops: f64,
    /// Bytes at the weight bandwidth, bytes at the memory bandwidth.
    weight_bytes: f64,
    bytes: f64,
}

/// FLOPs, bytes and ops of one call on one path.
#[derive(Clone, Debug, Default)]
struct CallWork {
    flops: Flops,
    bytes: Bytes,
    ops: Vec<Op>,
    /// Dispatched ops, and (sequence, layer) pairs paying the per-sequence overhead.
    dispatches: f64,
    seq_dispatches: f64,
    memory: Memory,
}

/// Element sizes of a path.
struct Sizes {
    /// Weights as read by the GEMMs.
    weight: f64,
    /// GEMM input operands.
    operand: f64,
    /// KV cache.
    kv: f64,
}

fn sizes(path: Path, weight_dtype: DType) -> Sizes {
    match path {
        Path::Cpu => Sizes { weight: weight_dtype.size() as f64, operand: 4.0, kv: 4.0 },
        Path::Gpu => Sizes { weight: 2.0, operand: 2.0, kv: 2.0 },
    }
}

/// Sum over rows at positions `cached..cached+new` of the keys each row attends to:
/// min(pos + 1, window).
pub fn keys_sum(cached: usize, new: usize, window: Option<usize>) -> f64 {
    let end = cached + new;
    // sum over p in a..b of (p + 1)
    let tri = |a: usize, b: usize| (b * (b + 1) - a * (a + 1)) as f64 / 2.0;
    match window {
        None => tri(cached, end),
        Some(w) => {
            let split = w.clamp(cached, end);
            tri(cached, split) + ((end - split) * w) as f64
        }
    }
}

/// Keys a sequence's rows read together at one layer (from the first row's window start).
fn keys_read(cached: usize, new: usize, window: Option<usize>) -> usize {
    let lo = window.map_or(0, |w| (cached + 1).saturating_sub(w));
    cached + new - lo
}

/// The work of `call` on `path`: FLOPs as `forward.rs` computes them; bytes, dispatches and
/// memory as the path's forward moves, launches and allocates them.
fn call_work(cfg: &ModelConfig, call: &Call, path: Path, weight_dtype: DType) -> CallWork {
    let sz = sizes(path, weight_dtype);
    let (d, qw, kvw, dm, nh) = (cfg.d_model as f64, cfg.q_width() as f64, cfg.kv_width() as f64, cfg.d_mlp as f64, cfg.n_heads as f64);
    let t = call.rows() as f64;
    let layers = cfg.n_layers.saturating_sub(call.start_layer);
    let nl = layers as f64;
    let ho = call.head_out_layers as f64;

    // Layer GEMMs: (n, k) of each linear; o_proj repeats per head where head_out is hooked.
    let linears = [(qw, d), (kvw, d), (kvw, d), (d, qw), (dm, d), (dm, d), (d, dm)];
    let params: f64 = linears.iter().map(|(n, k)| n * k).sum();
    let o_params = d * qw;
    let layer_params = nl * params + ho * (nh - 1.0) * o_params;
    let gemm_act: f64 = linears.iter().map(|(n, k)| t * (k * sz.operand + n * 4.0)).sum::<f64>() * nl + ho * (nh - 1.0) * t * (qw * sz.operand + d * 4.0);
    let gemm = Op { rows: t, gemm_flops: 2.0 * t * layer_params, weight_bytes: layer_params * sz.weight, bytes: gemm_act, ..Op::default() };

    // Attention: per layer and sequence, its visible keys; KV written once and read once.
    let mut attn_flops = 0.0;
    let mut kv_bytes = 0.0;
    for l in call.start_layer..cfg.n_layers {
        let window = cfg.layer_window[l];
        for &(cached, new) in &call.seqs {
            attn_flops += 4.0 * (cfg.d_head * cfg.n_heads) as f64 * keys_sum(cached, new, window);
            kv_bytes += 2.0 * kvw * sz.kv * (new + keys_read(cached, new, window)) as f64;
            if call.resumed {
                // Read + write, K and V: on the CPU KvCache::layer joins the clean prefix and the
                // segment's rows; on a device the prefix's partial block is copied (copy-on-write).
                let copied = match path {
                    Path::Cpu => cached + new,
                    Path::Gpu => cached % crate::engine::device_forward::BLOCK_SIZE,
                };
                kv_bytes += 2.0 * 2.0 * kvw * sz.kv * copied as f64;
            }
        }
    }
    let attention = Op { attn_flops, bytes: kv_bytes + nl * t * qw * 8.0, ..Op::default() };

    // Elementwise per layer (f32): two norms (read x, write a), two residual adds (read x and
    // o, write x), RoPE on q and k (read, write), act(gate) * up (read 2, write 1); the
    // optional q/k norms and post-norms likewise; the embedding rows and the final norm.
    let mut per_row = 2.0 * 2.0 * d + 2.0 * 3.0 * d + 2.0 * (qw + kvw) + 3.0 * dm;
    if cfg.qk_norm {
        per_row += 2.0 * (qw + kvw);
    }
    if cfg.post_norms {
        per_row += 2.0 * 2.0 * d;
    }
    let embed_rows = if call.start_layer == 0 { t } else { 0.0 };
    let captures = call.captured as f64 * 4.0;
    let elementwise = Op { weight_bytes: embed_rows * d * sz.weight, bytes: 4.0 * t * (nl * per_row + 2.0 * d) + embed_rows * d * 4.0 + captures, ..Op::default() };

    // lm_head: the rows read at the logit rows (gathered label rows are copied first on the CPU).
    let (n, width) = (call.logit_rows as f64, call.logit_width as f64);
    let gather = if call.gathered_head && path == Path::Cpu { 2.0 * width * d * sz.weight } else { 0.0 };
    let lm_head = Op { rows: n, gemm_flops: 2.0 * n * width * d, weight_bytes: width * d * sz.weight, bytes: gather + n * d * sz.operand + n * width * 4.0, ..Op::default() };

    let flops = Flops { gemm: gemm.gemm_flops, attention: attn_flops, lm_head: lm_head.gemm_flops, total: gemm.gemm_flops + attn_flops + lm_head.gemm_flops };
    let weights = gemm.weight_bytes + elementwise.weight_bytes + lm_head.weight_bytes;
    let activations = gemm.bytes + (attention.bytes - kv_bytes) + (elementwise.bytes - captures) + lm_head.bytes;
    let bytes = Bytes { weights, kv: kv_bytes, activations, captures, total: weights + kv_bytes + activations + captures };

    // Dispatches per layer (forward.rs: 2 norms, 7 GEMMs, RoPE, attention, 2 residual adds,
    // act; device_forward.rs: 7 GEMMs, 2 fused add+norms, 2 RoPE, KV write and copy, attention,
    // the bf16 cast of z, act), plus bias adds, q/k norms, post-norms and the per-head o_proj.
    let s = call.seqs.len() as f64;
    let bias = 3.0 * cfg.qkv_bias as u8 as f64 + cfg.o_bias as u8 as f64 + 3.0 * cfg.mlp_bias as u8 as f64;
    let extra = bias + 2.0 * cfg.qk_norm as u8 as f64 + 2.0 * cfg.post_norms as u8 as f64;
    let (per_layer, per_call, per_head, seq_dispatches) = match path {
        Path::Cpu => (14.0, 3.0, 1.0, s * nl),
        Path::Gpu => (16.0, 4.0, 2.0, 0.0),
    };
    let dispatches = nl * (per_layer + extra) + ho * per_head * nh + per_call;

    // Memory: the call's buffers and its own KV cache.
    let buffers = match path {
        Path::Cpu => t * 4.0 * (3.0 * d + 2.0 * qw + 2.0 * kvw + 2.0 * dm + qw.max(d)) + ho.min(1.0) * t * 4.0 * (nh * d + qw + d),
        Path::Gpu => t * 4.0 * (3.0 * d + 2.0 * qw + 2.0 * kvw + 2.0 * dm) + t * 2.0 * (d + qw + dm) + ho.min(1.0) * t * 4.0 * nh * d,
    };
    let prefix_copy = if path == Path::Cpu && call.resumed { call.seqs.iter().map(|&(c, n)| 2.0 * kvw * 4.0 * (c + n) as f64).sum() } else { 0.0 };
    let own_kv = t * 2.0 * kvw * sz.kv * nl;
    let memory = Memory {
        weights: 0.0,
        kv_caches: own_kv + call.held_clean_bytes as f64,
        activations: buffers + prefix_copy + n * width * 4.0,
        captures: (call.held_captures + call.captured) as f64 * 4.0,
        total: 0.0,
    };
    CallWork { flops, bytes, ops: vec![gemm, attention, elementwise, lm_head], dispatches, seq_dispatches, memory }
}

impl CallWork {
    /// (compute, memory, overhead) seconds on `hw`: per op the larger term where they overlap
    /// (the roofline), both where they do not.
    fn time(&self, hw: &Hardware) -> (f64, f64, f64) {
        let (mut compute, mut memory) = (0.0, 0.0);
        for op in &self.ops {
            let gemm = if op.gemm_flops > 0.0 { op.gemm_flops / hw.gemm_flops_at(op.rows) } else { 0.0 };
            let c = gemm + op.attn_flops / hw.attention_flops;
            let m = op.weight_bytes / hw.weight_bandwidth + op.bytes / hw.bandwidth;
            if !hw.overlap {
                compute += c;
                memory += m;
            } else if c >= m {
                compute += c;
            } else {
                memory += m;
            }
        }
        (compute, memory, self.dispatches * hw.op_overhead_s + self.seq_dispatches * hw.seq_overhead_s)
    }
}

/// Parameter count of the model (tied embeddings counted once): (matrices, vectors: norms and
/// biases, kept as f32).
pub fn n_params(cfg: &ModelConfig) -> (usize, usize) {
    let (d, qw, kvw, dm) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
    let matrices = cfg.n_layers * (d * (qw + 2 * kvw) + qw * d + 3 * d * dm) + cfg.vocab_size * d * if cfg.tie_embeddings { 1 } else { 2 };
    let norms = cfg.n_layers * d * if cfg.pre_norms && cfg.post_norms { 4 } else { 2 } + d + cfg.qk_norm as usize * cfg.n_layers * (qw + kvw);
    let biases = cfg.n_layers * (cfg.qkv_bias as usize * (qw + 2 * kvw) + cfg.o_bias as usize * d + cfg.mlp_bias as usize * (2 * dm + d));
    (matrices, norms + biases)
}

fn weight_bytes(cfg: &ModelConfig, path: Path, weight_dtype: DType) -> f64 {
    let (matrices, vectors) = n_params(cfg);
    matrices as f64 * sizes(path, weight_dtype).weight + vectors as f64 * 4.0
}

// ---------------------------------------------------------------------------------------------
// Workloads -> calls
// ---------------------------------------------------------------------------------------------

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
}

/// A named group of calls (a phase of a method), in the order the calls are made.
struct Phase {
    name: &'static str,
    calls: Vec<Call>,
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
fn pass_calls(cfg: &ModelConfig, lens: &[usize], spec: &PassSpec) -> Result<Vec<Phase>> {
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

/// The f32 values a sweep holds after `calls`: every capture (patch sources) since the last
/// segments; `run_sweep` keeps the resumed method's sources per target group, dropped when the
/// next group starts, and the naive method's for the whole run.
fn captures_held(calls: &[(&'static str, Call)]) -> usize {
    calls.iter().rev().take_while(|(phase, _)| *phase != "segments").map(|(_, c)| c.captured - c.kept).sum()
}

impl Planner<'_> {
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
        Ok(RunOutput { logits: vec![0.0; logit_rows.len() * logit_width], logit_rows, captured })
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
        let runs = prompts
            .iter()
            .map(|p| {
                let bytes = self.clean_run_bytes(p.len());
                self.held_clean.fetch_add(bytes, Ordering::Relaxed);
                CleanRun::new(p.len(), PlannedClean { bytes, held: self.held_clean.clone() })
            })
            .collect();
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
}

/// The calls `run_sweep` makes for `method` on `path`, over prompts of lengths `lens`, running
/// the first `limit` experiments (by id) as `bench patch --naive-limit` does.
fn sweep_calls(cfg: &ModelConfig, path: Path, lens: &[usize], plan: &PatchPlan, exps: &[Experiment], method: Method, limit: usize) -> Result<Vec<Phase>> {
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| vec![0; n]).collect();
    let planner = Planner { cfg, path, calls: Mutex::new(Vec::new()), held_clean: Arc::new(AtomicUsize::new(0)) };
    let skip: HashSet<usize> = exps.iter().skip(limit).map(|e| e.id).collect();
    let progress = ProgressBar::hidden();
    let settings = RunSettings { method, skip: &skip, batch_rows: plan.batch_rows, mem_budget: plan.mem_budget, progress: &progress };
    run_sweep(&planner, &prompts, &plan.sweep, exps, &settings, &mut |_| Ok(()))?;
    Ok(phases(planner.calls.into_inner().map_err(|_| Error::input("cost planner: poisoned lock"))?))
}

// ---------------------------------------------------------------------------------------------
// Estimates
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------------

/// 1234567 -> "1.23 M" (k, M, G, T, P; SI).
pub fn si(v: f64) -> String {
    let units = [("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)];
    match units.iter().find(|(_, s)| v.abs() >= *s) {
        Some((u, s)) => format!("{:.3} {u}", v / s),
        None => format!("{v:.0} "),
    }
}

/// Bytes as GiB/MiB/KiB.
pub fn binary_bytes(v: f64) -> String {
    let units = [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match units.iter().find(|(_, s)| v >= *s as f64) {
        Some((u, s)) => format!("{:.2} {u}", v / *s as f64),
        None => format!("{v:.0} B"),
    }
}

/// Seconds as "850 us", "1.24 s", "3 m 05 s", "2 h 11 m".
pub fn duration(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.2} s")
    } else if s < 7200.0 {
        format!("{} m {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{} h {:02} m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// The human-readable report.
pub fn render(e: &Estimate) -> String {
    let mut s = String::new();
    let m = &e.model;
    s.push_str(&format!(
        "patchbay cost {}: {} ({} layers, d_model {}, d_mlp {}, vocab {}, {} parameters, {} weights)\n",
        e.command,
        m.name,
        m.n_layers,
        m.d_model,
        m.d_mlp,
        m.vocab_size,
        si(m.params as f64),
        m.weight_dtype
    ));
    s.push_str(&format!("workload: {}\n\n", e.workload));
    s.push_str(&format!("{:<22} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}\n", "", "calls", "row-layers", "FLOPs", "attn FLOPs", "bytes cpu", "bytes gpu"));
    for mc in &e.methods {
        for p in mc.phases.iter().chain(std::iter::once(&mc.total)) {
            s.push_str(&format!(
                "{:<22} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}\n",
                format!("{} {}", mc.method, p.name),
                p.calls,
                si(p.row_layers),
                si(p.flops.total),
                si(p.flops.attention),
                binary_bytes(p.bytes.cpu.total),
                binary_bytes(p.bytes.gpu.total)
            ));
        }
    }
    if let Some(r) = &e.naive_over_resumed {
        s.push_str(&format!("naive / resumed: {:.1}x FLOPs, {:.1}x bytes (cpu), {:.1}x bytes (gpu)\n", r.flops, r.bytes_cpu, r.bytes_gpu));
    }
    s.push_str("\npeak memory            weights     kv caches   activations  captures     total\n");
    for mc in &e.methods {
        for (path, mem) in [("cpu", &mc.peak_memory.cpu), ("gpu", &mc.peak_memory.gpu)] {
            s.push_str(&format!(
                "{:<22} {:>11} {:>11} {:>11} {:>11} {:>11}\n",
                format!("{} ({path})", mc.method),
                binary_bytes(mem.weights),
                binary_bytes(mem.kv_caches),
                binary_bytes(mem.activations),
                binary_bytes(mem.captures),
                binary_bytes(mem.total)
            ));
        }
    }
    s.push_str("\nestimated time");
    for mc in &e.methods {
        s.push_str(&format!("  | {:<28}", mc.method));
    }
    if e.naive_over_resumed.is_some() {
        s.push_str("  | naive/resumed");
    }
    s.push('\n');
    for (i, hw) in e.devices.iter().enumerate() {
        s.push_str(&format!("{:<14}", hw.name));
        for mc in &e.methods {
            let t = &mc.total.time[i];
            let mem = if hw.path == Path::Cpu { mc.peak_memory.cpu.total } else { mc.peak_memory.gpu.total };
            let fits = if hw.memory_bytes.is_some_and(|cap| mem > cap) { " OOM" } else { "" };
            s.push_str(&format!("  | {:<28}", format!("{} ({}){fits}", duration(t.seconds), t.dominant)));
        }
        if let Some(r) = &e.naive_over_resumed {
            s.push_str(&format!("  | {:.1}x", r.time[i].1));
        }
        s.push('\n');
    }
    s.push_str("\ndevices:\n");
    for hw in &e.devices {
        s.push_str(&format!(
            "  {}: GEMM {}, attention {}FLOP/s, weights {}B/s, memory {}B/s, {:.1} us per op{}; {}\n",
            hw.name,
            if hw.gemm_curve.is_empty() {
                format!("{}FLOP/s", si(hw.gemm_flops))
            } else {
                format!("FLOP/s by rows {}", hw.gemm_curve.iter().map(|(m, f)| format!("{m}: {}", si(*f))).collect::<Vec<_>>().join(", "))
            },
            si(hw.attention_flops),
            si(hw.weight_bandwidth),
            si(hw.bandwidth),
            hw.op_overhead_s * 1e6,
            if hw.seq_overhead_s > 0.0 { format!(" + {:.1} us per sequence and layer", hw.seq_overhead_s * 1e6) } else { String::new() },
            hw.source
        ));
    }
    s.push_str("time = per op max(FLOPs / throughput, bytes / bandwidth) on GPUs, their sum on the CPU, + a fixed cost per op; (dominant term); OOM: peak memory over the device's.\n");
    s
}

// ---------------------------------------------------------------------------------------------
// Measured check
// ---------------------------------------------------------------------------------------------

/// The plan of a `bench patch` workload (random prompts and pairs, every window, last token).
pub fn bench_plan(w: &PatchWorkload, spec: &PatchBenchSpec) -> PatchPlan {
    // Experiments are enumerated pair-major: one pair per (sites x centres) experiments.
    let per_pair = (w.sweep.sites.len() * w.sweep.centers.len()).max(1);
    let pairs = w.exps.iter().step_by(per_pair).map(|e| e.pair).collect();
    PatchPlan { pairs, sweep: w.sweep.clone(), batch_rows: spec.batch_rows, mem_budget: spec.mem_budget }
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
pub fn measure_sweep(model: &Model, weight_dtype: DType, w: &PatchWorkload, spec: &PatchBenchSpec, method: Method, limit: usize, progress: &ProgressBar) -> Result<Check> {
    let cfg = &model.cfg;
    let plan = bench_plan(w, spec);
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
