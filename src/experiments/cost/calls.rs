//! Calls and their work: one forward call's FLOPs, bytes and time on a device.

use serde::Serialize;

use super::{Hardware, Path};
use crate::engine::device_forward::BLOCK_SIZE;
use crate::model::config::{DType, ModelConfig};

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
    pub(super) fn rows(&self) -> usize {
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

/// Ops dispatched per layer of a forward call without head_out hooks (forward.rs: 2 norms, 7
/// GEMMs, RoPE, attention, 2 residual adds, act, plus bias adds, q/k norms and post-norms;
/// device_forward.rs: 6 GEMMs (gate and up stacked in one), 2 fused add+norms with the
/// post-norms fused in, RoPE of q and k in one launch, the KV write, attention, the bf16 cast
/// of z, act (with the gate and up biases), plus the other bias adds and q/k norms; the copy of
/// the partial clean blocks where resumed segments start inside one is one launch per call for
/// all layers). The emulator's counter agrees on the GPU path (tests/patch.rs).
pub fn layer_dispatches(cfg: &ModelConfig, path: Path) -> f64 {
    let bias = |mlp_adds: f64| 3.0 * cfg.qkv_bias as u8 as f64 + cfg.o_bias as u8 as f64 + mlp_adds * cfg.mlp_bias as u8 as f64;
    let qk_norms = 2.0 * cfg.qk_norm as u8 as f64;
    qk_norms
        + match path {
            Path::Cpu => 14.0 + 2.0 * cfg.post_norms as u8 as f64 + bias(3.0),
            Path::Gpu => 13.0 + bias(1.0),
        }
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
pub(super) struct CallWork {
    pub(super) flops: Flops,
    pub(super) bytes: Bytes,
    ops: Vec<Op>,
    /// Dispatched ops, and (sequence, layer) pairs paying the per-sequence overhead.
    dispatches: f64,
    seq_dispatches: f64,
    pub(super) memory: Memory,
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
/// min(pos + 1, sliding_window).
pub fn keys_sum(cached: usize, new: usize, sliding_window: Option<usize>) -> f64 {
    let end = cached + new;
    // sum over p in a..b of (p + 1)
    let tri = |a: usize, b: usize| (b * (b + 1) - a * (a + 1)) as f64 / 2.0;
    match sliding_window {
        None => tri(cached, end),
        Some(w) => {
            let split = w.clamp(cached, end);
            tri(cached, split) + ((end - split) * w) as f64
        }
    }
}

/// Keys a sequence's rows read together at one layer (from the first row's window start).
fn keys_read(cached: usize, new: usize, sliding_window: Option<usize>) -> usize {
    let lo = sliding_window.map_or(0, |w| (cached + 1).saturating_sub(w));
    cached + new - lo
}

/// The work of `call` on `path`: FLOPs as `forward.rs` computes them; bytes, dispatches and
/// memory as the path's forward moves, launches and allocates them.
pub(super) fn call_work(cfg: &ModelConfig, call: &Call, path: Path, weight_dtype: DType) -> CallWork {
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
        let sliding_window = cfg.sliding_window[l];
        for &(cached, new) in &call.seqs {
            attn_flops += 4.0 * (cfg.d_head * cfg.n_heads) as f64 * keys_sum(cached, new, sliding_window);
            kv_bytes += 2.0 * kvw * sz.kv * (new + keys_read(cached, new, sliding_window)) as f64;
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

    let s = call.seqs.len() as f64;
    let (per_call, per_head, seq_dispatches) = match path {
        Path::Cpu => (3.0, 1.0, s * nl),
        Path::Gpu => (4.0, 2.0, 0.0),
    };
    let slot_copies = (path == Path::Gpu && call.resumed && call.seqs.iter().any(|s| s.0 % BLOCK_SIZE != 0)) as u8 as f64;
    let dispatches = nl * layer_dispatches(cfg, path) + ho * per_head * nh + per_call + slot_copies;

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
    pub(super) fn time(&self, hw: &Hardware) -> (f64, f64, f64) {
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

pub(super) fn weight_bytes(cfg: &ModelConfig, path: Path, weight_dtype: DType) -> f64 {
    let (matrices, vectors) = cfg.n_params();
    matrices as f64 * sizes(path, weight_dtype).weight + vectors as f64 * 4.0
}
