//! Devices: GPUs from their datasheets, the CPU measured on this machine (calibration).

use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::keys_sum;
use crate::backend::cpu;
use crate::backend::ops::attention::attention_ref;
use crate::model::checkpoint::{Checkpoint, Weight};
use crate::model::config::{DType, ModelConfig};
use crate::{Error, Result};

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
/// - the fork-join cost of a parallel op: `attention_ref` of one row over one key;
/// - weight bandwidth: `cpu::matmul_t` of one row through the model's MLP up-projection shape
///   (streaming and converting the weight), less one fork-join;
/// - GEMM FLOP/s at 4..256 rows: the same GEMM, less its one-row time (the multiply alone:
///   the weight stream is its own term), the row counts interleaved in rounds;
/// - attention FLOP/s: `attention_ref` of 32 new rows over 64 keys with the model's heads;
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
    let attn = |q: &[f32], kv: &[f32], z: &mut [f32], start: usize| attention_ref(q, kv, kv, z, None, ctx, start, s.n_heads, s.n_kv_heads, s.d_head, 0.1, None, None);

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
            // At a calibrated row count its own rate (f0 + 1 * (f1 - f0) may round off f1).
            Some(i) if c[i].0 == rows => c[i].1,
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
