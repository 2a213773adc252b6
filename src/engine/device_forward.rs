//! The forward pass on a device (the CUDA backend's host code): the same steps as the CPU
//! reference in `forward.rs`, as launches of patchbay's kernels and bf16 GEMMs through the
//! `Driver` interface, so it runs unchanged on a GPU (cudarc) and on the emulated device.
//!
//! Numerics (DESIGN.md section 5): weights bf16 on the device, GEMM operands bf16 with f32
//! accumulation, the residual stream and every site f32, the KV cache bf16 (paged).
//! Interventions and captures at a site become a `DeviceSitePlan` applied inside the kernel
//! that produces the site where one exists (norms, activation) and by the standalone site
//! kernel otherwise; all captures of a call land in one device arena downloaded at the end.

use std::sync::{Arc, Mutex, MutexGuard};

use half::bf16;

use crate::backend::device::{DeviceBuffer, DevPtr, Driver};
use crate::backend::ops::act::{ActMul, act_mul};
use crate::backend::ops::attention::{AttnParams, PagedBatch, PagedSeq, PatternOut, PatternRequest, attention};
use crate::backend::ops::elementwise::{bias_add, count_nonfinite, gather_rows_bf16, gather_rows_f32_bf16, head_mask, softcap, sum_heads, to_bf16};
use crate::backend::ops::embed::embed_tokens;
use crate::backend::ops::norm::{AddNorm, add_norm};
use crate::backend::ops::metrics::{LabelMetrics, label_metrics};
use crate::backend::ops::kv::{SlotCopies, kv_copy_slots, kv_write};
use crate::backend::ops::norm::qk_norm;
use crate::backend::ops::rope::{RopeTables, rope};
use crate::backend::ops::site_ops::{DeviceSitePlan, SitePlanBuilder, site_ops};
use crate::engine::{CleanRun, DecodeSeq, Engine, Segment};
use crate::engine::forward::{RunOutput, RunRequest, metric_columns};
use crate::intervene::{Held, Hooks, Op, RowMap};
use crate::logits::LabelMetricsRow;
use crate::model::Model;
use crate::model::checkpoint::{Linear, Weight};
use crate::model::config::{ModelConfig, NormWeight};
use crate::sites::{Site, SiteKind};
use crate::{Error, Result};

/// Positions per KV cache block.
pub const BLOCK_SIZE: usize = 16;

/// A rough rate of a device forward, in FLOP/s: a GPU's bf16 tensor cores at a fraction of
/// their peak (`Engine::forward_flops_per_s`; the emulator is planned as the GPU it stands for).
pub const DEVICE_FLOPS_PER_S: f64 = 1e14;

/// Bytes a kept device clean run of `len` positions holds: bf16 keys and values in whole
/// blocks and f32 resid_pre, per layer.
pub fn clean_run_bytes(cfg: &ModelConfig, len: usize) -> usize {
    len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE * 2 * cfg.kv_width() * 2 * cfg.n_layers + len * cfg.d_model * 4 * cfg.n_layers
}

/// A linear layer on the device: w `[out, in]` bf16, b `[out]` f32.
struct DeviceLinear {
    w: DeviceBuffer<bf16>,
    b: Option<DeviceBuffer<f32>>,
    out: usize,
    inp: usize,
}

struct DeviceLayer {
    attn_norm: Option<DeviceBuffer<f32>>,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    q_norm: Option<DeviceBuffer<f32>>,
    k_norm: Option<DeviceBuffer<f32>>,
    o: DeviceLinear,
    attn_post_norm: Option<DeviceBuffer<f32>>,
    mlp_norm: Option<DeviceBuffer<f32>>,
    /// The gate and up projections stacked (one GEMM): w `[2 d_mlp, d_model]`, no bias here.
    gate_up: DeviceLinear,
    /// `[d_mlp]` their biases, added by the activation kernel.
    gate_b: Option<DeviceBuffer<f32>>,
    up_b: Option<DeviceBuffer<f32>>,
    down: DeviceLinear,
    mlp_post_norm: Option<DeviceBuffer<f32>>,
}

/// The device's paged KV cache (DESIGN.md section 1): per layer one buffer of keys and one of
/// values, `n_blocks * BLOCK_SIZE` slots each, and the free blocks. A call takes blocks for its
/// new rows and gives them back at its end; a kept clean run holds its blocks until dropped,
/// and resumed segments read its full prefix blocks in place.
struct KvPool {
    k: Vec<DeviceBuffer<bf16>>, // per layer [n_blocks * BLOCK_SIZE, kv_width]
    v: Vec<DeviceBuffer<bf16>>, // per layer [n_blocks * BLOCK_SIZE, kv_width]
    n_blocks: usize,
    free: Vec<u32>,
    kv_width: usize,
}

impl KvPool {
    fn new(driver: &Arc<dyn Driver>, n_layers: usize, kv_width: usize) -> Result<KvPool> {
        let empty = || DeviceBuffer::alloc(driver, 0);
        Ok(KvPool { k: (0..n_layers).map(|_| empty()).collect::<Result<_>>()?, v: (0..n_layers).map(|_| empty()).collect::<Result<_>>()?, n_blocks: 0, free: Vec::new(), kv_width })
    }

    /// `n` free blocks, growing the pool (at least doubling, contents kept) when short.
    fn take(&mut self, driver: &Arc<dyn Driver>, n: usize) -> Result<Vec<u32>> {
        if self.free.len() < n {
            let n_blocks = (2 * self.n_blocks).max(self.n_blocks + n - self.free.len());
            to_u32(n_blocks * BLOCK_SIZE, "KV pool slots")?;
            for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
                // New blocks hold NaN (0xFFFF) until written: a read of a slot nobody wrote
                // shows in the results instead of passing silently.
                let grown = DeviceBuffer::<bf16>::filled(driver, n_blocks * BLOCK_SIZE * self.kv_width, 0xFF)?;
                driver.dtod(grown.ptr(), buf.ptr(), self.n_blocks * BLOCK_SIZE * self.kv_width * 2)?;
                *buf = grown;
            }
            self.free.extend((self.n_blocks as u32..n_blocks as u32).rev());
            self.n_blocks = n_blocks;
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    fn give_back(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
    }
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::input(format!("{what} = {v} does not fit 32-bit indices")))
}

/// A device clean run: its KV blocks in the pool and its resid_pre rows.
struct DeviceClean {
    pool: Arc<Mutex<KvPool>>,
    /// Blocks of positions 0..len.
    blocks: Vec<u32>,
    /// resid_pre of the run's whole call: [n_layers, call_rows, d_model], shared by its prompts.
    resid: Arc<DeviceBuffer<f32>>,
    call_rows: usize,
    /// This prompt's first row in the call.
    row0: usize,
}

impl Drop for DeviceClean {
    fn drop(&mut self) {
        lock(&self.pool).give_back(&self.blocks);
    }
}

/// Captures held on the device (`RunRequest::hold_captures`): the call's capture arena.
struct DeviceHeld {
    /// The engine's pool: identifies the engine that made them.
    pool: Arc<Mutex<KvPool>>,
    /// Every capture of the call, each from its base: [sum over captures of rows x width].
    arena: DeviceBuffer<f32>,
    /// Float offset of each capture in `arena`.
    bases: Vec<usize>,
}

/// What one device forward call returns besides the captures (left in `Hooks`).
struct CallOut {
    /// [n_logit_rows, vocab or n_tokens]
    logits: Vec<f32>,
    /// (sequence, absolute position) of each logits row.
    logit_rows: Vec<(usize, usize)>,
    /// resid_pre of every layer when `Call::keep_resid`: [n_layers, T, d_model].
    kept: Option<DeviceBuffer<f32>>,
    /// NaN and +-Inf among the logits and captures (counted on the device).
    nonfinite: u64,
    /// The captures held on the device, when asked.
    held: Option<Held>,
    /// The label metrics of the logits rows, when asked.
    metrics: Vec<LabelMetricsRow>,
}

/// A device sequence being decoded: the pool blocks of its positions, given back on drop.
struct DeviceDecode {
    pool: Arc<Mutex<KvPool>>,
    /// Blocks of positions 0..len (the last one partly filled).
    blocks: Vec<u32>,
}

impl Drop for DeviceDecode {
    fn drop(&mut self) {
        lock(&self.pool).give_back(&self.blocks);
    }
}

fn lock(pool: &Mutex<KvPool>) -> MutexGuard<'_, KvPool> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one sequence of a device forward call feeds.
enum CallInput<'a> {
    /// New tokens (the call starts at layer 0).
    Tokens(&'a [u32]),
    /// The residual entering the start layer for the new rows, `[n_new, d_model]` f32 here.
    Resid(DevPtr),
}

/// One sequence of a device forward call.
struct CallSeq<'a> {
    input: CallInput<'a>,
    /// Positions already in the cache; the new rows are pos0..pos0 + n_new.
    pos0: usize,
    n_new: usize,
    /// Pool blocks of positions 0..pos0 + n_new (a clean prefix's blocks, then the call's own).
    blocks: Vec<u32>,
}

/// A device forward call.
struct Call<'a> {
    start_layer: usize,
    seqs: Vec<CallSeq<'a>>,
    /// Slot copies (source, destination) applied to every layer's cache from the start layer
    /// on before it is read: resumed segments' partial prefix blocks.
    copies: Vec<(usize, usize)>,
    /// Keep resid_pre of every layer (start layer on): [n_layers, T, d_model].
    keep_resid: bool,
}

/// A model's weights on a device.
pub struct DeviceModel {
    driver: Arc<dyn Driver>,
    pool: Arc<Mutex<KvPool>>,
    pub cfg: ModelConfig,
    embed: DeviceBuffer<bf16>, // [vocab, d_model]
    /// [vocab, d_model]; None when tied to the embedding.
    lm_head: Option<DeviceBuffer<bf16>>,
    final_norm: DeviceBuffer<f32>, // [d_model]
    layers: Vec<DeviceLayer>,
}

/// Uploads weights as bf16, stacked (the rows of each after the previous one's), converting
/// from their stored dtype a chunk at a time (never a whole f32 copy of the model on the host).
fn upload_weights(driver: &Arc<dyn Driver>, parts: &[&Weight]) -> Result<DeviceBuffer<bf16>> {
    let buf = DeviceBuffer::<bf16>::alloc(driver, parts.iter().map(|w| w.numel()).sum())?;
    let mut at = 0; // elements uploaded so far
    for w in parts {
        let n = w.numel();
        if w.dtype == crate::model::config::DType::BF16 {
            driver.htod(buf.ptr().offset(at * 2), w.bytes())?;
            at += n;
            continue;
        }
        const CHUNK: usize = 1 << 20;
        let mut f = vec![0.0f32; CHUNK.min(n)];
        let mut h = vec![bf16::ZERO; CHUNK.min(n)];
        let mut i = 0;
        while i < n {
            let m = CHUNK.min(n - i);
            w.to_f32_range(i, i + m, &mut f[..m]);
            h[..m].iter_mut().zip(&f[..m]).for_each(|(h, f)| *h = bf16::from_f32(*f));
            driver.htod(buf.ptr().offset((at + i) * 2), bytemuck::cast_slice(&h[..m]))?;
            i += m;
        }
        at += n;
    }
    Ok(buf)
}

fn upload_weight(driver: &Arc<dyn Driver>, w: &Weight) -> Result<DeviceBuffer<bf16>> {
    upload_weights(driver, &[w])
}

fn upload_f32(driver: &Arc<dyn Driver>, v: &Option<Vec<f32>>) -> Result<Option<DeviceBuffer<f32>>> {
    v.as_ref().map(|v| DeviceBuffer::from_slice(driver, v)).transpose()
}

fn upload_linear(driver: &Arc<dyn Driver>, l: &Linear) -> Result<DeviceLinear> {
    Ok(DeviceLinear { w: upload_weight(driver, &l.w)?, b: upload_f32(driver, &l.b)?, out: l.w.shape[0], inp: l.w.shape[1] })
}

impl DeviceModel {
    /// Copies the model's weights to the device (bf16 matrices, f32 norms and biases).
    pub fn upload(model: &Model, driver: Arc<dyn Driver>) -> Result<DeviceModel> {
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|lw| {
                Ok(DeviceLayer {
                    attn_norm: upload_f32(&driver, &lw.attn_norm)?,
                    q: upload_linear(&driver, &lw.q)?,
                    k: upload_linear(&driver, &lw.k)?,
                    v: upload_linear(&driver, &lw.v)?,
                    q_norm: upload_f32(&driver, &lw.q_norm)?,
                    k_norm: upload_f32(&driver, &lw.k_norm)?,
                    o: upload_linear(&driver, &lw.o)?,
                    attn_post_norm: upload_f32(&driver, &lw.attn_post_norm)?,
                    mlp_norm: upload_f32(&driver, &lw.mlp_norm)?,
                    gate_up: DeviceLinear { w: upload_weights(&driver, &[&lw.gate.w, &lw.up.w])?, b: None, out: 2 * lw.gate.w.shape[0], inp: lw.gate.w.shape[1] },
                    gate_b: upload_f32(&driver, &lw.gate.b)?,
                    up_b: upload_f32(&driver, &lw.up.b)?,
                    down: upload_linear(&driver, &lw.down)?,
                    mlp_post_norm: upload_f32(&driver, &lw.mlp_post_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceModel {
            embed: upload_weight(&driver, &w.embed)?,
            lm_head: if model.cfg.tie_embeddings { None } else { Some(upload_weight(&driver, &w.lm_head)?) },
            final_norm: DeviceBuffer::from_slice(&driver, &w.final_norm)?,
            layers,
            pool: Arc::new(Mutex::new(KvPool::new(&driver, model.cfg.n_layers, model.cfg.kv_width())?)),
            cfg: model.cfg.clone(),
            driver,
        })
    }

    /// KV pool blocks (in use, allocated): what kept clean runs and decoded sequences hold.
    pub fn kv_blocks(&self) -> (usize, usize) {
        let pool = lock(&self.pool);
        (pool.n_blocks - pool.free.len(), pool.n_blocks)
    }

    fn lm_head(&self) -> &DeviceBuffer<bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// y[t, out] = x[t, in] W^T (+ b): bf16 operands, f32 accumulation.
    fn linear(&self, x: &DeviceBuffer<bf16>, t: usize, l: &DeviceLinear, y: &DeviceBuffer<f32>) -> Result<()> {
        self.driver.gemm_bf16(t, l.out, l.inp, x.ptr(), l.inp, l.w.ptr(), l.inp, y.ptr(), l.out, 0.0)?;
        if let Some(b) = &l.b {
            bias_add(&*self.driver, y, b, t, l.out)?;
        }
        Ok(())
    }

    /// `label_metrics_f32` over the label logits `logits` (`[n, l]`, on the device) with the
    /// per-row label indices `cols` (a, b, c columns, `[n]` each): only the metrics come back.
    fn label_metrics(&self, logits: &DeviceBuffer<f32>, n: usize, l: usize, cols: &[Vec<i32>; 3]) -> Result<Vec<LabelMetricsRow>> {
        let drv = &self.driver;
        let up = |k: usize| DeviceBuffer::from_slice(drv, &cols[k]);
        let (a, b, c) = (up(0)?, up(1)?, up(2)?); // [n] each
        let pred = DeviceBuffer::<i32>::alloc(drv, n)?; // [n]
        let out = || DeviceBuffer::<f32>::alloc(drv, n);
        let (logit_diff, prob, logsumexp) = (out()?, out()?, out()?); // [n] each
        label_metrics(&**drv, &LabelMetrics { logits, n, l, a: &a, b: &b, c: &c, pred: &pred, logit_diff: &logit_diff, prob: &prob, logsumexp: &logsumexp })?;
        let (pred, logit_diff, prob, logsumexp) = (pred.download()?, logit_diff.download()?, prob.download()?, logsumexp.download()?);
        Ok((0..n).map(|r| LabelMetricsRow { pred: pred[r], logit_diff: logit_diff[r], prob: prob[r], logsumexp: logsumexp[r] }).collect())
    }

    /// One forward call over `call.seqs` from `call.start_layer` on, with its KV blocks in
    /// `pool`, applying `hooks`. Returns the logits at `req.logits_at` (positions relative to
    /// each sequence's length), their (sequence, position), resid_pre when `call.keep_resid`,
    /// the number of NaN and +-Inf among the logits and captures (counted on the device), and
    /// with `req.hold_captures` the captures held on the device (downloaded into `hooks` only
    /// when one is not finite).
    fn forward(&self, call: &Call, pool: &mut KvPool, rows: &RowMap, hooks: &mut Hooks, req: &RunRequest) -> Result<CallOut> {
        let (logits_at, logit_tokens) = (req.logits_at, req.logit_tokens);
        let cfg = &self.cfg;
        let drv = &self.driver;
        let (d, qw, kvw, dm) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
        let t = rows.n_rows();
        let start = call.start_layer;
        if t == 0 {
            return Err(Error::input("empty input: no tokens to run"));
        }
        if start >= cfg.n_layers {
            return Err(Error::input(format!("start layer {start} is out of range (the model has {} layers)", cfg.n_layers)));
        }
        for (s, seq) in call.seqs.iter().enumerate() {
            match seq.input {
                CallInput::Tokens(p) => {
                    if start != 0 {
                        return Err(Error::input(format!("prompt {s}: tokens can only start at layer 0 (give residual rows to resume)")));
                    }
                    if let Some(&bad) = p.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                        return Err(Error::input(format!("prompt {s}: token id {bad} is out of range (vocab_size {})", cfg.vocab_size)));
                    }
                }
                CallInput::Resid(_) => {}
            }
        }
        let from_tokens = call.seqs.iter().all(|s| matches!(s.input, CallInput::Tokens(_)));
        if !from_tokens && call.seqs.iter().any(|s| matches!(s.input, CallInput::Tokens(_))) {
            return Err(Error::input("a device call feeds either tokens or residual rows, not both"));
        }
        let seqs: Vec<PagedSeq> = call.seqs.iter().map(|s| PagedSeq { pos0: s.pos0, n_new: s.n_new, blocks: &s.blocks }).collect();
        let batch = PagedBatch::new(drv, &seqs, BLOCK_SIZE, pool.n_blocks)?;
        let copies = SlotCopies::new(drv, &call.copies, pool.n_blocks * BLOCK_SIZE)?;
        let rope_tables = RopeTables::new(drv, &(0..call.seqs.len()).map(|s| cfg.rope_freqs(rows.total_len(s))).collect::<Vec<_>>())?;

        // Buffers, one per meaning.
        let resid = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] residual stream
        let a = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] sublayer input (attn_in, mlp_in, final_norm)
        let a16 = DeviceBuffer::<bf16>::alloc(drv, t * d)?; // [T, d_model] the same, GEMM operand
        let mut q = DeviceBuffer::<f32>::alloc(drv, t * qw)?; // [T, n_heads, d_head]
        let mut k = DeviceBuffer::<f32>::alloc(drv, t * kvw)?; // [T, n_kv_heads, d_head]
        let v = DeviceBuffer::<f32>::alloc(drv, t * kvw)?; // [T, n_kv_heads, d_head]
        let mut z = DeviceBuffer::<f32>::alloc(drv, t * qw)?; // [T, n_heads, d_head]
        let z16 = DeviceBuffer::<bf16>::alloc(drv, t * qw)?; // [T, n_heads * d_head] o_proj operand
        let o = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] sublayer output
        let gate_up = DeviceBuffer::<f32>::alloc(drv, t * 2 * dm)?; // [T, 2 d_mlp] gate then up per row; then act(gate) * up in the gate half
        let post16 = DeviceBuffer::<bf16>::alloc(drv, t * dm)?; // [T, d_mlp] down_proj operand
        let kept = if call.keep_resid { Some(DeviceBuffer::<f32>::alloc(drv, cfg.n_layers * t * d)?) } else { None }; // [n_layers, T, d_model]

        // Every capture of the call lands in one arena, each capture's rows at its own base.
        let mut bases = Vec::new();
        let mut arena_len = 0;
        for c in hooks.captured() {
            bases.push(arena_len);
            arena_len += c.data.len();
        }
        let arena = DeviceBuffer::<f32>::filled(drv, arena_len.max(1), 0)?;
        let nonfinite = DeviceBuffer::<u64>::filled(drv, 1, 0)?; // [1] NaN/Inf among what is returned
        if req.hold_captures && hooks.captured().iter().any(|c| c.site.kind == SiteKind::Pattern) {
            return Err(Error::input("attention patterns can be captured, not held on the device (they cannot be patched)"));
        }
        let plan = |site: Site| -> Result<DeviceSitePlan> {
            let mut b = SitePlanBuilder::new();
            for ro in hooks.row_ops(site, rows) {
                match ro.op {
                    // Read in place from the arena of the call that captured them.
                    Op::PatchHeld { from } => {
                        let held = from.held.state::<DeviceHeld>().filter(|h| Arc::ptr_eq(&h.pool, &self.pool));
                        let held = held.ok_or_else(|| Error::input("a patch reads held rows that another engine (device) holds"))?;
                        let (w, _) = from.held.shape(from.capture).unwrap_or_default();
                        let r = from.rows[if from.rows.len() == 1 { 0 } else { ro.operand_row }];
                        b.add_patch_row(ro.row, ro.pos, held.arena.ptr().offset((held.bases[from.capture] + r * w) * 4), w, ro.slices)?;
                    }
                    op => b.add_op(ro.row, ro.pos, op, ro.operand_row, ro.slices)?,
                }
            }
            if site.kind != SiteKind::Pattern {
                for rc in hooks.row_captures(site, rows) {
                    let w: usize = hooks.captured()[rc.capture].token_shape.iter().product();
                    b.add_capture(rc.row, bases[rc.capture] + rc.out_row * w)?;
                }
            }
            if b.is_empty() { Ok(DeviceSitePlan::empty()) } else { b.upload(drv) }
        };
        let one_plus = cfg.norm_weight == NormWeight::OnePlus;
        let norm = |resid_sites: [&DeviceSitePlan; 2], delta: Option<(&DeviceBuffer<f32>, Option<&DeviceBuffer<f32>>, &DeviceSitePlan)>, pre_w: Option<&DeviceBuffer<f32>>, out_site: &DeviceSitePlan| {
            add_norm(
                &**drv,
                &AddNorm {
                    resid: &resid,
                    delta: delta.map(|x| x.0),
                    post_w: delta.and_then(|x| x.1),
                    pre_w,
                    out_f32: &a,
                    out_bf16: Some(&a16),
                    t,
                    d,
                    eps: cfg.norm_eps,
                    one_plus,
                    delta_site: delta.map(|x| x.2),
                    resid_site0: Some(resid_sites[0]),
                    resid_site1: Some(resid_sites[1]),
                    out_site: Some(out_site),
                    capture: Some(&arena),
                },
            )
        };
        let empty = DeviceSitePlan::empty();

        // x = embed_tokens(ids) (* sqrt(d_model)) or the given residual rows; ResidPre(start);
        // a = attn_norm(x); AttnIn(start).
        if from_tokens {
            let tokens: Vec<u32> = call.seqs.iter().flat_map(|s| match s.input {
                CallInput::Tokens(p) => p,
                CallInput::Resid(_) => &[],
            }).copied().collect();
            let ids = DeviceBuffer::<i32>::alloc(drv, t)?;
            embed_tokens(&**drv, &resid, &self.embed, cfg.vocab_size, d, &tokens, &ids, cfg.embed_scale.unwrap_or(1.0))?;
        } else {
            for (s, seq) in call.seqs.iter().enumerate() {
                if let CallInput::Resid(src) = seq.input {
                    drv.dtod(resid.ptr().offset(rows.row_start[s] * d * 4), src, seq.n_new * d * 4)?;
                }
            }
        }
        norm([&plan(Site::new(start, SiteKind::ResidPre))?, &empty], None, self.layers[start].attn_norm.as_ref(), &plan(Site::new(start, SiteKind::AttnIn))?)?;

        // Resumed segments' partial clean blocks, copied in every layer from the start layer on
        // (one launch) before any layer reads them.
        kv_copy_slots(drv, &mut pool.k[start..], &mut pool.v[start..], &copies, kvw)?;
        let mut patterns: Vec<(usize, Vec<f32>, Vec<(usize, usize, usize)>)> = Vec::new(); // (layer, [n_pat, n_keys], (capture, out_row, head))
        for (l, lw) in self.layers.iter().enumerate().skip(start) {
            let site = |kind| Site::new(l, kind);
            if let Some(kept) = &kept {
                drv.dtod(kept.ptr().offset(l * t * d * 4), resid.ptr(), t * d * 4)?;
            }
            let (k_cache, v_cache) = (&mut pool.k[l], &mut pool.v[l]);
            // ---- attention ----
            self.linear(&a16, t, &lw.q, &q)?;
            self.linear(&a16, t, &lw.k, &k)?;
            self.linear(&a16, t, &lw.v, &v)?;
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                qk_norm(&**drv, &mut q, qn, t, cfg.norm_eps)?;
                qk_norm(&**drv, &mut k, kn, t, cfg.norm_eps)?;
            }
            site_ops(&**drv, &q, t, qw, &plan(site(SiteKind::Q))?, Some(&arena))?;
            site_ops(&**drv, &k, t, kvw, &plan(site(SiteKind::K))?, Some(&arena))?;
            site_ops(&**drv, &v, t, kvw, &plan(site(SiteKind::V))?, Some(&arena))?;
            rope(&**drv, &mut q, cfg.n_heads, Some((&mut k, cfg.n_kv_heads)), &batch, &rope_tables, cfg.d_head)?;
            site_ops(&**drv, &q, t, qw, &plan(site(SiteKind::RotQ))?, Some(&arena))?;
            site_ops(&**drv, &k, t, kvw, &plan(site(SiteKind::RotK))?, Some(&arena))?;
            kv_write(&**drv, &k, &v, k_cache, v_cache, &batch, kvw)?;
            // Pattern captures: every head of each captured row.
            let pat_rows: Vec<(usize, usize, usize)> = hooks
                .row_captures(site(SiteKind::Pattern), rows)
                .into_iter()
                .flat_map(|rc| (0..cfg.n_heads).map(move |h| (rc.row, rc.capture, rc.out_row * cfg.n_heads + h)))
                .collect();
            let params = AttnParams { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, d_head: cfg.d_head, scale: cfg.attn_scale, softcap: cfg.attn_softcap, sliding_window: cfg.sliding_window[l] };
            if pat_rows.is_empty() {
                attention(&**drv, &batch, &params, &q, k_cache, v_cache, &mut z, None)?;
            } else {
                let pairs: Vec<(usize, usize)> = pat_rows.iter().map(|&(r, _, i)| (r, i % cfg.n_heads)).collect();
                let request = PatternRequest::new(drv, &pairs)?;
                let n_keys = hooks.n_keys();
                let mut out = DeviceBuffer::<f32>::alloc(drv, pairs.len() * n_keys)?;
                attention(&**drv, &batch, &params, &q, k_cache, v_cache, &mut z, Some(PatternOut { request: &request, out: &mut out, n_keys }))?;
                count_nonfinite(&**drv, &out, pairs.len() * n_keys, &nonfinite)?;
                patterns.push((l, out.download()?, pat_rows.iter().map(|&(_, c, i)| (c, i / cfg.n_heads, i % cfg.n_heads)).collect()));
            }
            site_ops(&**drv, &z, t, qw, &plan(site(SiteKind::Z))?, Some(&arena))?;
            // o = o_proj(z); with HeadOut hooked, per head (z_h W_O[h]^T) then summed.
            let head_plan = plan(site(SiteKind::HeadOut))?;
            if hooks.touches(site(SiteKind::HeadOut)) {
                let result = DeviceBuffer::<f32>::alloc(drv, t * cfg.n_heads * d)?; // [T, n_heads, d_model]
                for h in 0..cfg.n_heads {
                    head_mask(&**drv, &z, &z16, t, cfg.n_heads, cfg.d_head, h)?;
                    let c: DevPtr = result.ptr().offset(h * d * 4);
                    drv.gemm_bf16(t, d, qw, z16.ptr(), qw, lw.o.w.ptr(), qw, c, cfg.n_heads * d, 0.0)?;
                }
                site_ops(&**drv, &result, t, cfg.n_heads * d, &head_plan, Some(&arena))?;
                sum_heads(&**drv, &result, lw.o.b.as_ref(), &o, t, cfg.n_heads, d)?;
            } else {
                to_bf16(&**drv, &z, &z16, t * qw)?;
                self.linear(&z16, t, &lw.o, &o)?;
            }
            // attn_out = post_norm(o); AttnOut; x += attn_out; ResidMid; a = mlp_norm(x); MlpIn.
            norm(
                [&plan(site(SiteKind::ResidMid))?, &empty],
                Some((&o, lw.attn_post_norm.as_ref(), &plan(site(SiteKind::AttnOut))?)),
                lw.mlp_norm.as_ref(),
                &plan(site(SiteKind::MlpIn))?,
            )?;
            // ---- MLP ----
            self.linear(&a16, t, &lw.gate_up, &gate_up)?;
            act_mul(
                &**drv,
                &ActMul { gate_up: &gate_up, gate_b: lw.gate_b.as_ref(), up_b: lw.up_b.as_ref(), out_bf16: Some(&post16), t, i: dm, act: cfg.activation, site: Some(&plan(site(SiteKind::MlpPost))?), capture: Some(&arena) },
            )?;
            self.linear(&post16, t, &lw.down, &o)?;
            // mlp_out = post_norm(o); MlpOut; x += mlp_out; ResidPost; then the next layer's
            // ResidPre and attn_norm (AttnIn), or the final norm (FinalNorm).
            let last = l + 1 == cfg.n_layers;
            let (next_pre, next_norm, next_site) = if last {
                (DeviceSitePlan::empty(), Some(&self.final_norm), plan(Site::final_norm(cfg))?)
            } else {
                (plan(Site::new(l + 1, SiteKind::ResidPre))?, self.layers[l + 1].attn_norm.as_ref(), plan(Site::new(l + 1, SiteKind::AttnIn))?)
            };
            norm([&plan(site(SiteKind::ResidPost))?, &next_pre], Some((&o, lw.mlp_post_norm.as_ref(), &plan(site(SiteKind::MlpOut))?)), next_norm, &next_site)?;
        }

        // ---- logits at the requested rows (a now holds the final norm's output) ----
        let logit_rows = rows.select(logits_at, "logits")?;
        let metric_cols = metric_columns(req, logit_rows.len())?;
        let mut logits = Vec::new();
        let mut metrics = Vec::new();
        if !logit_rows.is_empty() {
            let n = logit_rows.len();
            let sel: Vec<i32> = logit_rows.iter().map(|&(s, p)| rows.row(s, p).unwrap_or_default() as i32).collect();
            let sel = DeviceBuffer::from_slice(drv, &sel)?;
            let x16 = DeviceBuffer::<bf16>::alloc(drv, n * d)?; // [n, d_model]
            gather_rows_f32_bf16(&**drv, &a, t, &sel, &x16, n, d)?;
            let gathered;
            let head: &DeviceBuffer<bf16> = match logit_tokens {
                None => self.lm_head(),
                Some(ids) => {
                    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                        return Err(Error::input(format!("logit token {bad} is out of range (vocab_size {})", cfg.vocab_size)));
                    }
                    let idx = DeviceBuffer::from_slice(drv, &ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
                    gathered = DeviceBuffer::<bf16>::alloc(drv, ids.len() * d)?;
                    gather_rows_bf16(&**drv, self.lm_head(), cfg.vocab_size, &idx, &gathered, ids.len(), d)?;
                    &gathered
                }
            };
            let n_out = head.len() / d;
            let out = DeviceBuffer::<f32>::alloc(drv, n * n_out)?; // [n, vocab or n_tokens]
            drv.gemm_bf16(n, n_out, d, x16.ptr(), d, head.ptr(), d, out.ptr(), n_out, 0.0)?;
            if let Some(c) = cfg.final_softcap {
                softcap(&**drv, &out, n * n_out, c)?;
            }
            count_nonfinite(&**drv, &out, n * n_out, &nonfinite)?;
            logits = out.download()?;
            if let Some(cols) = &metric_cols {
                metrics = self.label_metrics(&out, n, n_out, cols)?;
            }
        }

        // ---- captures back to the host (held ones only when one is not finite) ----
        count_nonfinite(&**drv, &arena, arena_len, &nonfinite)?;
        let nonfinite = nonfinite.download()?[0];
        let arena_host = if arena_len == 0 || (req.hold_captures && nonfinite == 0) { Vec::new() } else { arena.download()? }; // nothing captured: nothing comes back
        if req.hold_captures && arena_host.is_empty() {
            (0..hooks.captured().len()).for_each(|c| hooks.captured_mut(c).data = Vec::new());
        }
        for site in Site::all(cfg).into_iter().filter(|s| s.kind != SiteKind::Pattern && !arena_host.is_empty()) {
            for rc in hooks.row_captures(site, rows) {
                let c = hooks.captured_mut(rc.capture);
                let w: usize = c.token_shape.iter().product();
                let src = bases[rc.capture] + rc.out_row * w;
                c.data[rc.out_row * w..(rc.out_row + 1) * w].copy_from_slice(&arena_host[src..src + w]);
            }
        }
        let n_keys = hooks.n_keys();
        for (_, data, dests) in patterns {
            for (i, (capture, out_row, h)) in dests.into_iter().enumerate() {
                let c = hooks.captured_mut(capture);
                let at = (out_row * cfg.n_heads + h) * n_keys;
                c.data[at..at + n_keys].copy_from_slice(&data[i * n_keys..(i + 1) * n_keys]);
            }
        }
        self.driver.synchronize()?;
        let held = req.hold_captures.then(|| Held::new(hooks.captured(), DeviceHeld { pool: self.pool.clone(), arena, bases }));
        Ok(CallOut { logits, logit_rows, kept, nonfinite, held, metrics })
    }

    /// Runs `prompts` from layer 0 on fresh pool blocks; returns each prompt's blocks (the
    /// caller keeps or gives them back), the output and, with `keep_resid`, resid_pre.
    fn run_fresh(&self, pool: &mut KvPool, prompts: &[Vec<u32>], req: &RunRequest, keep_resid: bool) -> Result<(Vec<Vec<u32>>, RunOutput, Option<DeviceBuffer<f32>>)> {
        // One take for the whole call (nothing to give back if it fails), split per prompt.
        let mut free = pool.take(&self.driver, prompts.iter().map(|p| p.len().div_ceil(BLOCK_SIZE)).sum())?.into_iter();
        let seqs = prompts
            .iter()
            .map(|p| CallSeq { input: CallInput::Tokens(p), pos0: 0, n_new: p.len(), blocks: free.by_ref().take(p.len().div_ceil(BLOCK_SIZE)).collect() })
            .collect();
        let call = Call { start_layer: 0, seqs, copies: Vec::new(), keep_resid };
        let out = self.run_call(&call, pool, req);
        let blocks: Vec<Vec<u32>> = call.seqs.into_iter().map(|s| s.blocks).collect();
        match out {
            Ok((out, kept)) => Ok((blocks, out, kept)),
            Err(e) => {
                blocks.iter().for_each(|b| pool.give_back(b));
                Err(e)
            }
        }
    }

    /// Resolves the request's hooks against the call's rows and runs it.
    fn run_call(&self, call: &Call, pool: &mut KvPool, req: &RunRequest) -> Result<(RunOutput, Option<DeviceBuffer<f32>>)> {
        let rows = RowMap::new(call.seqs.iter().map(|s| s.pos0).collect(), call.seqs.iter().map(|s| s.n_new).collect());
        let mut hooks = Hooks::new(&self.cfg, &rows, req.interventions, req.captures, req.n_keys)?;
        let out = self.forward(call, pool, &rows, &mut hooks, req)?;
        Ok((RunOutput { logits: out.logits, logit_rows: out.logit_rows, captured: hooks.into_captured(), held: out.held, metrics: out.metrics, nonfinite: Some(out.nonfinite) }, out.kept))
    }
}

impl Engine for DeviceModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn device_name(&self) -> String {
        self.driver.name()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        let mut pool = lock(&self.pool);
        let (blocks, out, _) = self.run_fresh(&mut pool, prompts, req, false)?;
        blocks.iter().for_each(|b| pool.give_back(b));
        Ok(out)
    }

    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)> {
        let mut pool = lock(&self.pool);
        let (blocks, out, kept) = self.run_fresh(&mut pool, prompts, req, true)?;
        drop(pool);
        let resid = Arc::new(kept.ok_or_else(|| Error::device("the clean run kept no residual"))?);
        let call_rows: usize = prompts.iter().map(Vec::len).sum();
        let mut row0 = 0;
        let runs = prompts
            .iter()
            .zip(blocks)
            .map(|(p, blocks)| {
                let run = CleanRun::new(p.len(), DeviceClean { pool: self.pool.clone(), blocks, resid: resid.clone(), call_rows, row0 });
                row0 += p.len();
                run
            })
            .collect();
        Ok((runs, out))
    }

    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput> {
        let d = self.cfg.d_model;
        if start_layer >= self.cfg.n_layers {
            return Err(Error::input(format!("start layer {start_layer} is out of range (the model has {} layers)", self.cfg.n_layers)));
        }
        let mut pool = lock(&self.pool);
        let mut call = Call { start_layer, seqs: Vec::with_capacity(segs.len()), copies: Vec::new(), keep_resid: false };
        // Own blocks of each segment: from its first partly or wholly new block on.
        let mut own: Vec<Vec<u32>> = Vec::with_capacity(segs.len());
        let mut build = |pool: &mut KvPool| -> Result<()> {
            for (i, seg) in segs.iter().enumerate() {
                let len = seg.clean.len;
                let clean = seg.clean.state::<DeviceClean>()?;
                if !Arc::ptr_eq(&clean.pool, &self.pool) {
                    return Err(Error::input("a clean run can only be resumed by the engine (device) that made it"));
                }
                if seg.p0 > len {
                    return Err(Error::input(format!("segment {i}: start position {} is past its prompt's {len} positions", seg.p0)));
                }
                let full = seg.p0 / BLOCK_SIZE;
                let blocks = pool.take(&self.driver, len.div_ceil(BLOCK_SIZE) - full)?;
                // Copy-on-write of the partial block: its first positions are the clean run's.
                for j in 0..seg.p0 % BLOCK_SIZE {
                    call.copies.push((clean.blocks[full] as usize * BLOCK_SIZE + j, blocks[0] as usize * BLOCK_SIZE + j));
                }
                let src = clean.resid.ptr().offset((start_layer * clean.call_rows + clean.row0 + seg.p0) * d * 4);
                call.seqs.push(CallSeq { input: CallInput::Resid(src), pos0: seg.p0, n_new: len - seg.p0, blocks: [&clean.blocks[..full], &blocks[..]].concat() });
                own.push(blocks);
            }
            Ok(())
        };
        let built = build(&mut pool);
        let out = built.and_then(|()| self.run_call(&call, &mut pool, req));
        own.iter().for_each(|b| pool.give_back(b));
        Ok(out?.0)
    }

    fn clean_run_bytes(&self, len: usize) -> usize {
        clean_run_bytes(&self.cfg, len)
    }

    /// Per layer: the keys then the values of the run's whole blocks (bf16), then its resid_pre
    /// rows (f32).
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>> {
        let c = run.state::<DeviceClean>()?;
        if !Arc::ptr_eq(&c.pool, &self.pool) {
            return Err(Error::input("a clean run can only be spilled by the engine (device) that made it"));
        }
        let (d, kvw) = (self.cfg.d_model, self.cfg.kv_width());
        let block_bytes = BLOCK_SIZE * kvw * 2;
        let layer_bytes = 2 * c.blocks.len() * block_bytes + run.len * d * 4;
        let mut out = vec![0u8; self.cfg.n_layers * layer_bytes];
        let pool = lock(&self.pool);
        for (l, chunk) in out.chunks_exact_mut(layer_bytes).enumerate() {
            let (kv, resid) = chunk.split_at_mut(2 * c.blocks.len() * block_bytes);
            for (cache, part) in [&pool.k[l], &pool.v[l]].into_iter().zip(kv.chunks_exact_mut(c.blocks.len() * block_bytes)) {
                for (&b, dst) in c.blocks.iter().zip(part.chunks_exact_mut(block_bytes)) {
                    self.driver.dtoh(cache.ptr().offset(b as usize * block_bytes), dst)?;
                }
            }
            self.driver.dtoh(c.resid.ptr().offset((l * c.call_rows + c.row0) * d * 4), resid)?;
        }
        Ok(out)
    }

    fn clean_run_from_bytes(&self, len: usize, bytes: &[u8]) -> Result<CleanRun> {
        let (d, kvw, n_layers) = (self.cfg.d_model, self.cfg.kv_width(), self.cfg.n_layers);
        let n_blocks = len.div_ceil(BLOCK_SIZE);
        let block_bytes = BLOCK_SIZE * kvw * 2;
        let layer_bytes = 2 * n_blocks * block_bytes + len * d * 4;
        if bytes.len() != n_layers * layer_bytes {
            return Err(Error::input(format!("a spilled clean run of {len} positions has {} bytes, expected {}", bytes.len(), n_layers * layer_bytes)));
        }
        let resid = DeviceBuffer::<f32>::alloc(&self.driver, n_layers * len * d)?; // [n_layers, len, d_model]
        let mut pool = lock(&self.pool);
        let blocks = pool.take(&self.driver, n_blocks)?;
        let restore = |pool: &KvPool| -> Result<()> {
            for (l, chunk) in bytes.chunks_exact(layer_bytes).enumerate() {
                let (kv, rows) = chunk.split_at(2 * n_blocks * block_bytes);
                for (cache, part) in [&pool.k[l], &pool.v[l]].into_iter().zip(kv.chunks_exact(n_blocks * block_bytes)) {
                    for (&b, src) in blocks.iter().zip(part.chunks_exact(block_bytes)) {
                        self.driver.htod(cache.ptr().offset(b as usize * block_bytes), src)?;
                    }
                }
                self.driver.htod(resid.ptr().offset(l * len * d * 4), rows)?;
            }
            Ok(())
        };
        if let Err(e) = restore(&pool) {
            pool.give_back(&blocks);
            return Err(e);
        }
        drop(pool);
        Ok(CleanRun::new(len, DeviceClean { pool: self.pool.clone(), blocks, resid: Arc::new(resid), call_rows: len, row0: 0 }))
    }

    fn forward_flops_per_s(&self) -> f64 {
        DEVICE_FLOPS_PER_S
    }

    fn start_decode(&self) -> Result<DecodeSeq> {
        Ok(DecodeSeq::new(DeviceDecode { pool: self.pool.clone(), blocks: Vec::new() }))
    }

    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let states = DecodeSeq::begin::<DeviceDecode>(seqs, tokens)?;
        if states.iter().any(|s| !Arc::ptr_eq(&s.pool, &self.pool)) {
            return Err(Error::input("a decoded sequence can only be extended by the engine (device) that made it"));
        }
        let mut pool = lock(&self.pool);
        // Blocks each sequence lacks for its new rows, in one take (nothing to give back if it
        // fails), split per sequence.
        let need: Vec<usize> = states.iter().zip(&lens).zip(tokens).map(|((s, len), t)| (len + t.len()).div_ceil(BLOCK_SIZE) - s.blocks.len()).collect();
        let mut free = pool.take(&self.driver, need.iter().sum())?.into_iter();
        let new: Vec<Vec<u32>> = need.iter().map(|&n| free.by_ref().take(n).collect()).collect();
        let seqs_in = states
            .iter()
            .zip(&new)
            .zip(lens.iter().zip(tokens))
            .map(|((s, new), (&pos0, t))| CallSeq { input: CallInput::Tokens(t), pos0, n_new: t.len(), blocks: [&s.blocks[..], new].concat() })
            .collect();
        let call = Call { start_layer: 0, seqs: seqs_in, copies: Vec::new(), keep_resid: false };
        match self.run_call(&call, &mut pool, req) {
            Ok((out, _)) => {
                drop(pool);
                states.into_iter().zip(new).for_each(|(s, new)| s.blocks.extend(new));
                DecodeSeq::grown(seqs, tokens);
                Ok(out)
            }
            Err(e) => {
                new.iter().for_each(|b| pool.give_back(b));
                Err(e)
            }
        }
    }
}
