//! Varlen causal attention over the paged bf16 KV cache: `kernels/attention.cu`.
//!
//! A batch is a set of sequences (segments). Sequence s has `n_new` query rows at absolute
//! positions `pos0 .. pos0 + n_new`, and keys/values at positions `0 .. pos0 + n_new` in a
//! paged cache: position p lives in slot `blocks[p / block_size] * block_size + p % block_size`.
//! A resumed segment's table starts with its target's clean prefix blocks (shared between the
//! segments of one target) and continues with blocks of its own for its new rows.
//!
//! [`PagedBatch`] is that description, validated on the host once per forward and uploaded
//! once; rope, kv_write and attention of every layer read it. The kernels trust its device
//! copies (the fields are private, so they can only come from [`PagedBatch::new`]).
//!
//! CPU reference: [`attention_ref`], one sequence over contiguous K/V.

use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::backend::ops::common::{exactly, to_i32};
use crate::{Error, Result};

/// Query rows (warps) per block of `attention_f32` (ATT_WARPS in the kernel).
const ATT_WARPS: usize = 4;
/// Keys per shared-memory tile (ATT_BK in the kernel).
const ATT_BK: usize = 32;
/// Largest supported head dimension (32 * ATT_MAXR in the kernel).
pub const MAX_D_HEAD: usize = 256;
/// Threads per block of `attention_pattern_f32`.
const PATTERN_THREADS: u32 = 128;

/// One sequence of a [`PagedBatch`].
#[derive(Clone, Copy, Debug)]
pub struct PagedSeq<'a> {
    /// Absolute position of the first new row (= the number of cached positions before it).
    pub pos0: usize,
    /// Number of new rows (query rows of this call); may be 0.
    pub n_new: usize,
    /// Cache block of each block of positions; at least `ceil((pos0 + n_new) / block_size)`.
    pub blocks: &'a [u32],
}

/// A validated varlen batch over a paged KV cache, with its index arrays on the device.
pub struct PagedBatch {
    block_size: usize,
    n_cache_blocks: usize,
    max_blocks: usize,
    /// Host copies: [S + 1], [S], per row (sequence, position).
    q_start: Vec<usize>,
    pos0: Vec<usize>,
    max_rows: usize,
    /// Device copies read by the kernels.
    d_q_start: DeviceBuffer<i32>, // [S + 1]
    d_pos0: DeviceBuffer<i32>,        // [S]
    d_block_table: DeviceBuffer<i32>, // [S, max_blocks]
    d_pos: DeviceBuffer<i32>,         // [T] absolute position of each row
    d_row_seq: DeviceBuffer<i32>,     // [T] sequence of each row
    d_slot: DeviceBuffer<i32>,        // [T] cache slot of each row
}

impl PagedBatch {
    /// Validates `seqs` against a cache of `n_cache_blocks` blocks of `block_size` slots and
    /// uploads the index arrays. Errors (never panics) on: a table too short for its
    /// positions, a block id outside the cache, a block listed twice in one table, a block that
    /// one sequence writes (holds one of its new rows) and another reads (would race: the
    /// writer must own it), sizes beyond 32-bit indices.
    pub fn new(driver: &Arc<dyn Driver>, seqs: &[PagedSeq], block_size: usize, n_cache_blocks: usize) -> Result<PagedBatch> {
        if block_size == 0 {
            return Err(Error::input("paged batch: block_size must be at least 1"));
        }
        let n_slots = n_cache_blocks.checked_mul(block_size).ok_or_else(|| Error::input("paged batch: cache size overflows"))?;
        to_i32(n_slots, "paged batch: cache slots (n_cache_blocks * block_size)")?;
        to_i32(seqs.len(), "paged batch: number of sequences")?;
        let max_blocks = seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(0).max(1);

        let mut q_start = Vec::with_capacity(seqs.len() + 1);
        let mut pos0 = Vec::with_capacity(seqs.len());
        let mut table = vec![0i32; seqs.len() * max_blocks];
        // Writer of each cache block (the sequence whose new rows it holds).
        let mut writer: Vec<Option<usize>> = vec![None; n_cache_blocks];
        let mut t = 0usize;
        for (s, seq) in seqs.iter().enumerate() {
            let len = seq.pos0.checked_add(seq.n_new).ok_or_else(|| Error::input(format!("paged batch: sequence {s}: length overflows")))?;
            to_i32(len, &format!("paged batch: sequence {s}: length"))?;
            let need = len.div_ceil(block_size);
            if seq.blocks.len() < need {
                return Err(Error::input(format!(
                    "paged batch: sequence {s}: {len} positions need {need} blocks of {block_size}, the table has {}",
                    seq.blocks.len()
                )));
            }
            for (i, &b) in seq.blocks.iter().enumerate() {
                if b as usize >= n_cache_blocks {
                    return Err(Error::input(format!("paged batch: sequence {s}: block {i} is {b}, the cache has {n_cache_blocks} blocks")));
                }
                table[s * max_blocks + i] = b as i32;
            }
            let used = &seq.blocks[..need];
            let mut sorted = used.to_vec();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::input(format!("paged batch: sequence {s}: cache block {} is listed twice", w[0])));
            }
            if seq.n_new > 0 {
                for &b in &used[seq.pos0 / block_size..] {
                    writer[b as usize] = Some(s);
                }
            }
            q_start.push(t);
            pos0.push(seq.pos0);
            t = t.checked_add(seq.n_new).ok_or_else(|| Error::input("paged batch: row count overflows"))?;
        }
        q_start.push(t);
        to_i32(t, "paged batch: rows")?;
        for (s, seq) in seqs.iter().enumerate() {
            let need = (seq.pos0 + seq.n_new).div_ceil(block_size);
            for &b in &seq.blocks[..need] {
                if let Some(w) = writer[b as usize]
                    && w != s
                {
                    return Err(Error::input(format!(
                        "paged batch: cache block {b} holds new rows of sequence {w} and is read by sequence {s}; a block written in a call must belong to one sequence"
                    )));
                }
            }
        }

        let mut pos = Vec::with_capacity(t);
        let mut row_seq = Vec::with_capacity(t);
        let mut slot = Vec::with_capacity(t);
        for (s, seq) in seqs.iter().enumerate() {
            for p in seq.pos0..seq.pos0 + seq.n_new {
                pos.push(p as i32);
                row_seq.push(s as i32);
                slot.push((seq.blocks[p / block_size] as usize * block_size + p % block_size) as i32);
            }
        }
        let max_rows = seqs.iter().map(|s| s.n_new).max().unwrap_or(0);
        let q_start_i: Vec<i32> = q_start.iter().map(|&v| v as i32).collect();
        let pos0_i: Vec<i32> = pos0.iter().map(|&v| v as i32).collect();
        Ok(PagedBatch {
            block_size,
            n_cache_blocks,
            max_blocks,
            q_start,
            pos0,
            max_rows,
            d_q_start: DeviceBuffer::from_slice(driver, &q_start_i)?,
            d_pos0: DeviceBuffer::from_slice(driver, &pos0_i)?,
            d_block_table: DeviceBuffer::from_slice(driver, &table)?,
            d_pos: DeviceBuffer::from_slice(driver, &pos)?,
            d_row_seq: DeviceBuffer::from_slice(driver, &row_seq)?,
            d_slot: DeviceBuffer::from_slice(driver, &slot)?,
        })
    }

    pub fn n_seqs(&self) -> usize {
        self.pos0.len()
    }
    /// Total new rows T.
    pub fn n_rows(&self) -> usize {
        self.q_start[self.pos0.len()]
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Cache capacity in slots (n_cache_blocks * block_size): a cache buffer of one layer holds
    /// at least this many rows of kv_width.
    pub fn n_slots(&self) -> usize {
        self.n_cache_blocks * self.block_size
    }
    /// (sequence, absolute position) of batch row `r`, or None past the batch.
    pub fn row(&self, r: usize) -> Option<(usize, usize)> {
        if r >= self.n_rows() {
            return None;
        }
        let s = self.q_start.partition_point(|&q| q <= r) - 1;
        Some((s, self.pos0[s] + r - self.q_start[s]))
    }
    /// Device [T] absolute position of each row.
    pub(crate) fn d_pos(&self) -> &DeviceBuffer<i32> {
        &self.d_pos
    }
    /// Device [T] sequence of each row.
    pub(crate) fn d_row_seq(&self) -> &DeviceBuffer<i32> {
        &self.d_row_seq
    }
    /// Device [T] cache slot of each row.
    pub(crate) fn d_slot(&self) -> &DeviceBuffer<i32> {
        &self.d_slot
    }
}

/// The (row, query head) pairs whose attention probabilities are captured, on the device.
pub struct PatternRequest {
    pairs: Vec<(usize, usize)>,
    d_row: DeviceBuffer<i32>,  // [n_pat]
    d_head: DeviceBuffer<i32>, // [n_pat]
}

impl PatternRequest {
    /// `pairs`: (batch row, query head); checked against the batch and heads at each call.
    pub fn new(driver: &Arc<dyn Driver>, pairs: &[(usize, usize)]) -> Result<PatternRequest> {
        to_i32(pairs.len(), "pattern request: number of pairs")?;
        let rows = pairs.iter().map(|&(r, _)| to_i32(r, "pattern request: row")).collect::<Result<Vec<i32>>>()?;
        let heads = pairs.iter().map(|&(_, h)| to_i32(h, "pattern request: head")).collect::<Result<Vec<i32>>>()?;
        Ok(PatternRequest { pairs: pairs.to_vec(), d_row: DeviceBuffer::from_slice(driver, &rows)?, d_head: DeviceBuffer::from_slice(driver, &heads)? })
    }
    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Where captured patterns go: `out` is `[n_pat, n_keys]`, row i for pair i of `request`;
/// n_keys must cover every captured row's position + 1. Entries outside the visible keys are 0.
pub struct PatternOut<'a> {
    pub request: &'a PatternRequest,
    pub out: &'a mut DeviceBuffer<f32>,
    pub n_keys: usize,
}

/// Shape and numerics of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// Softmax scale (1/sqrt(query_pre_attn_scalar or d_head)).
    pub scale: f32,
    /// Gemma 2: s = cap * tanh(s / cap) after scaling, before the mask.
    pub softcap: Option<f32>,
    /// Sliding window: the query at p sees keys j with p - sliding_window < j <= p.
    pub sliding_window: Option<usize>,
}

/// Mirror of `struct AttnArgs` in kernels/attention.cuh (same order, 128 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnArgs {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    q_start: u64,
    pos0: u64,
    block_table: u64,
    z: u64,
    s: i32,
    h: i32,
    kv: i32,
    dh: i32,
    block_size: i32,
    max_blocks: i32,
    n_slots: i32,
    scale: f32,
    softcap: f32,
    sliding_window: i32,
    pat_row: u64,
    pat_head: u64,
    pat_out: u64,
    n_pat: i32,
    n_keys: i32,
}

// Size and every field offset as in attention.cuh (generated by build/layout.rs).
include!(concat!(env!("OUT_DIR"), "/layout/AttnArgs.rs"));

/// Dynamic shared memory of `attention_f32`: K and V tiles [ATT_BK, ks] bf16 + q rows
/// [ATT_WARPS, dh] f32 (ks as att_ks in the kernel).
fn attention_shared_bytes(dh: usize) -> usize {
    let ks = 2 * dh.div_ceil(2) + 2;
    2 * ATT_BK * ks * 2 + ATT_WARPS * dh * 4
}

/// z = softmax(q k^T * scale (soft-capped), causal + sliding window) v for every row of `batch`,
/// keys/values read from the paged cache (the new rows' K/V must already be written there,
/// see `ops::kv::kv_write`). Optionally captures the probabilities of the requested pairs.
///
/// Shapes: q, z `[T, n_heads, d_head]` f32 (T = batch.n_rows()); k_cache, v_cache
/// `[>= batch.n_slots(), n_kv_heads, d_head]` bf16.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    driver: &dyn Driver,
    batch: &PagedBatch,
    p: &AttnParams,
    q: &DeviceBuffer<f32>,
    k_cache: &DeviceBuffer<bf16>,
    v_cache: &DeviceBuffer<bf16>,
    z: &mut DeviceBuffer<f32>,
    pattern: Option<PatternOut>,
) -> Result<()> {
    let (h, kv, dh) = (p.n_heads, p.n_kv_heads, p.d_head);
    if h == 0 || kv == 0 || h % kv != 0 {
        return Err(Error::input(format!("attention: n_heads {h} must be a positive multiple of n_kv_heads {kv}")));
    }
    if dh == 0 || dh > MAX_D_HEAD {
        return Err(Error::input(format!("attention: d_head {dh} is outside 1..={MAX_D_HEAD}")));
    }
    if h > 65535 {
        return Err(Error::input(format!("attention: {h} heads exceed the grid's 65535")));
    }
    if !p.scale.is_finite() {
        return Err(Error::input(format!("attention: scale {} is not finite", p.scale)));
    }
    let softcap = match p.softcap {
        None => 0.0,
        Some(c) if c.is_finite() && c > 0.0 => c,
        Some(c) => return Err(Error::input(format!("attention: softcap {c} must be positive and finite"))),
    };
    let sliding_window = match p.sliding_window {
        None => 0,
        Some(0) => return Err(Error::input("attention: sliding_window 0 would hide every key; use None for full causal attention")),
        Some(w) => w.min(i32::MAX as usize) as i32,
    };
    let t = batch.n_rows();
    let kv_width = kv * dh;
    let q_len = t.checked_mul(h * dh).ok_or_else(|| Error::input("attention: q size overflows"))?;
    exactly("attention", "q", q, q_len, "[T, n_heads, d_head]")?;
    exactly("attention", "z", z, q_len, "[T, n_heads, d_head]")?;
    let cache_len = batch.n_slots().checked_mul(kv_width).ok_or_else(|| Error::input("attention: cache size overflows"))?;
    for (name, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        if c.len() < cache_len {
            return Err(Error::input(format!(
                "attention: {name} has {} elements, the batch addresses {} slots of {kv_width} ({cache_len})",
                c.len(),
                batch.n_slots()
            )));
        }
    }
    let (mut pat_row, mut pat_head, mut pat_out, mut n_pat, mut n_keys) = (0u64, 0u64, 0u64, 0usize, 0usize);
    if let Some(po) = &pattern {
        n_pat = po.request.len();
        n_keys = po.n_keys;
        to_i32(n_keys, "attention: pattern n_keys")?;
        let want = n_pat.checked_mul(n_keys).ok_or_else(|| Error::input("attention: pattern size overflows"))?;
        if po.out.len() != want {
            return Err(Error::input(format!("attention: pattern output has {} elements, expected {want} ([{n_pat} pairs, {n_keys} keys])", po.out.len())));
        }
        for (i, &(r, hh)) in po.request.pairs.iter().enumerate() {
            let Some((_, pos)) = batch.row(r) else {
                return Err(Error::input(format!("attention: pattern pair {i}: row {r} is past the batch's {t} rows")));
            };
            if hh >= h {
                return Err(Error::input(format!("attention: pattern pair {i}: head {hh} >= n_heads {h}")));
            }
            if pos >= n_keys {
                return Err(Error::input(format!("attention: pattern pair {i}: row {r} is at position {pos}, beyond n_keys {n_keys}")));
            }
        }
        pat_row = po.request.d_row.ptr().0;
        pat_head = po.request.d_head.ptr().0;
        pat_out = po.out.ptr().0;
    }
    if t == 0 && n_pat == 0 {
        return Ok(());
    }
    let tiles = batch.max_rows.div_ceil(ATT_WARPS);
    if tiles > 65535 {
        return Err(Error::input(format!("attention: a sequence of {} rows exceeds the grid's {} rows", batch.max_rows, 65535 * ATT_WARPS)));
    }
    let args = AttnArgs {
        q: q.ptr().0,
        k_cache: k_cache.ptr().0,
        v_cache: v_cache.ptr().0,
        q_start: batch.d_q_start.ptr().0,
        pos0: batch.d_pos0.ptr().0,
        block_table: batch.d_block_table.ptr().0,
        z: z.ptr().0,
        s: batch.n_seqs() as i32,
        h: h as i32,
        kv: kv as i32,
        dh: dh as i32,
        block_size: batch.block_size as i32,
        max_blocks: batch.max_blocks as i32,
        n_slots: batch.n_slots() as i32,
        scale: p.scale,
        softcap,
        sliding_window,
        pat_row,
        pat_head,
        pat_out,
        n_pat: n_pat as i32,
        n_keys: n_keys as i32,
    };
    if t > 0 {
        let cfg = LaunchConfig {
            grid: (batch.n_seqs() as u32, tiles as u32, h as u32),
            block: ((ATT_WARPS * 32) as u32, 1, 1),
            shared_bytes: attention_shared_bytes(dh) as u32,
        };
        // SAFETY: AttnArgs mirrors the kernel's struct (size and offsets asserted); q and z hold exactly
        // [T, H, dh], the caches at least n_slots * KV * dh; the index arrays come from a
        // validated PagedBatch (every table entry read is a block < n_cache_blocks, rows and
        // positions within the table), heads H % KV == 0, dh <= 256 (the kernel's accumulators).
        unsafe { KernelArgs::new().value(args).launch(driver, entry::ATTENTION_F32, cfg)? };
    }
    if n_pat > 0 {
        let cfg = LaunchConfig { grid: (n_pat as u32, 1, 1), block: (PATTERN_THREADS, 1, 1), shared_bytes: (dh * 4) as u32 };
        // SAFETY: as above; pat_out holds [n_pat, n_keys], every pair's row < T and head < H,
        // and every captured row's position < n_keys (checked above).
        unsafe { KernelArgs::new().value(args).launch(driver, entry::ATTENTION_PATTERN_F32, cfg)? };
    }
    Ok(())
}

/// Attention of one sequence.  q: [t_new, n_heads, d_head] (positions start..start+t_new),
/// k, v: [t_total, n_kv_heads, d_head] (all positions 0..t_total), z: [t_new, n_heads, d_head],
/// probs (optional): [t_new, n_heads, n_keys] with n_keys >= t_total, zero past the visible keys.
/// sliding_window: the query at p sees keys j with p - sliding_window < j <= p (None: all j <= p).
#[allow(clippy::too_many_arguments)]
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    z: &mut [f32],
    mut probs: Option<&mut [f32]>,
    n_keys: usize,
    start: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    scale: f32,
    softcap: Option<f32>,
    sliding_window: Option<usize>,
) {
    let t_new = q.len() / (n_heads * d_head);
    let group = n_heads / n_kv_heads;
    let hd = n_heads * d_head;
    let kvd = n_kv_heads * d_head;
    // One task per (query row, head): rows of z and probs are disjoint.
    let z_rows: Vec<&mut [f32]> = z.chunks_mut(d_head).collect();
    let p_rows: Vec<Option<&mut [f32]>> = match probs.as_deref_mut() {
        Some(p) => p.chunks_mut(n_keys).map(Some).collect(),
        None => (0..t_new * n_heads).map(|_| None).collect(),
    };
    z_rows.into_par_iter().zip(p_rows).enumerate().for_each(|(idx, (zr, pr))| {
        let (i, h) = (idx / n_heads, idx % n_heads);
        let kh = h / group;
        let pos = start + i;
        let lo = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qr = &q[i * hd + h * d_head..i * hd + (h + 1) * d_head];
        let mut scores: Vec<f32> = (lo..=pos)
            .map(|j| {
                let kr = &k[j * kvd + kh * d_head..j * kvd + (kh + 1) * d_head];
                let s = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                match softcap {
                    Some(c) => (s / c).tanh() * c,
                    None => s,
                }
            })
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for s in scores.iter_mut() {
            *s /= sum;
        }
        zr.fill(0.0);
        for (jj, p) in scores.iter().enumerate() {
            let j = lo + jj;
            let vr = &v[j * kvd + kh * d_head..j * kvd + (kh + 1) * d_head];
            zr.iter_mut().zip(vr).for_each(|(z, v)| *z += p * v);
        }
        if let Some(pr) = pr {
            pr.fill(0.0);
            pr[lo..=pos].copy_from_slice(&scores);
        }
    });
}
