//! The attention sublayer's per-row ops before attention: `kernels/rope.cu`.
//! OLMo 2 q/k RMSNorm over the whole projection, RoPE on the varlen batch (per-sequence
//! frequency tables, as longrope needs), and the write of the new rows' K/V into the paged
//! bf16 cache.

use std::sync::Arc;

use half::bf16;

use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::ops::attention::PagedBatch;
use crate::{Error, Result};

const THREADS: u32 = 256;

/// RoPE frequency tables of the sequences of one batch, on the device: inv_freq
/// `[S, rotary_dim / 2]` and attn_factor `[S]`.
pub struct RopeTables {
    rotary_dim: usize,
    n_seqs: usize,
    inv_freq: DeviceBuffer<f32>,
    attn_factor: DeviceBuffer<f32>,
}

impl RopeTables {
    /// One (inv_freq, attn_factor) per sequence, as `Model::rope_freqs` returns them; every
    /// inv_freq has the same length rotary_dim / 2.
    pub fn new(driver: &Arc<dyn Driver>, per_seq: &[(Vec<f32>, f32)]) -> Result<RopeTables> {
        let half = per_seq.first().map_or(0, |(f, _)| f.len());
        if let Some((s, (f, _))) = per_seq.iter().enumerate().find(|(_, (f, _))| f.len() != half) {
            return Err(Error::input(format!("rope tables: sequence {s} has {} frequencies, sequence 0 has {half}", f.len())));
        }
        let inv: Vec<f32> = per_seq.iter().flat_map(|(f, _)| f.iter().copied()).collect();
        let fac: Vec<f32> = per_seq.iter().map(|&(_, a)| a).collect();
        Ok(RopeTables {
            rotary_dim: 2 * half,
            n_seqs: per_seq.len(),
            inv_freq: DeviceBuffer::from_slice(driver, &inv)?,
            attn_factor: DeviceBuffer::from_slice(driver, &fac)?,
        })
    }
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }
}

fn rows_i32(t: usize, what: &str) -> Result<i32> {
    i32::try_from(t).map_err(|_| Error::input(format!("{what}: {t} does not fit the kernels' 32-bit indices")))
}

/// In place, row by row: x <- w * (x / sqrt(mean(x^2) + eps)) (OLMo 2 q_norm / k_norm, over
/// the whole projection width). x: `[rows, n]` f32, w: `[n]` f32.
pub fn qk_norm(driver: &dyn Driver, x: &mut DeviceBuffer<f32>, w: &DeviceBuffer<f32>, rows: usize, eps: f32) -> Result<()> {
    let n = w.len();
    if n == 0 {
        return Err(Error::input("qk_norm: empty norm weight"));
    }
    if rows.checked_mul(n) != Some(x.len()) {
        return Err(Error::input(format!("qk_norm: x has {} elements, expected {rows} rows of {n}", x.len())));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::input(format!("qk_norm: eps {eps} must be finite and >= 0")));
    }
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, n_i) = (rows_i32(rows, "qk_norm: rows")?, rows_i32(n, "qk_norm: width")?);
    let cfg = LaunchConfig { grid: (rows as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
    // SAFETY: x holds rows * n f32 and w n f32 (checked above); one block per row < rows.
    unsafe { KernelArgs::new().ptr(x.ptr()).ptr(w.ptr()).i32(rows_i).i32(n_i).f32(eps).launch(driver, "qk_norm_f32", cfg) }
}

/// In place: rotate-half RoPE of every row of `batch` at its absolute position, with its
/// sequence's frequencies, on the first `tables.rotary_dim()` dims of each head (as
/// `cpu::rope`). x: `[T, n_heads, d_head]` f32, T = batch.n_rows().
pub fn rope(driver: &dyn Driver, x: &mut DeviceBuffer<f32>, batch: &PagedBatch, tables: &RopeTables, n_heads: usize, d_head: usize) -> Result<()> {
    let t = batch.n_rows();
    if tables.n_seqs != batch.n_seqs() {
        return Err(Error::input(format!("rope: {} frequency tables for a batch of {} sequences", tables.n_seqs, batch.n_seqs())));
    }
    let rd = tables.rotary_dim;
    if rd > d_head {
        return Err(Error::input(format!("rope: rotary_dim {rd} exceeds d_head {d_head}")));
    }
    let width = n_heads.checked_mul(d_head).ok_or_else(|| Error::input("rope: width overflows"))?;
    if t.checked_mul(width) != Some(x.len()) {
        return Err(Error::input(format!("rope: x has {} elements, expected [{t}, {n_heads}, {d_head}]", x.len())));
    }
    if t == 0 || rd == 0 || n_heads == 0 {
        return Ok(());
    }
    let (t_i, h_i, d_i, rd_i) =
        (rows_i32(t, "rope: rows")?, rows_i32(n_heads, "rope: heads")?, rows_i32(d_head, "rope: d_head")?, rows_i32(rd, "rope: rotary_dim")?);
    rows_i32(width, "rope: row width")?;
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: (rd * 4) as u32 };
    // SAFETY: x holds [T, n_heads, d_head] (checked); pos and row_seq are the batch's [T]
    // arrays with row_seq < S = the tables' sequence count (checked), inv_freq is
    // [S, rotary_dim / 2] and attn_factor [S]; rotary_dim <= d_head; shared memory = rotary_dim f32.
    unsafe {
        KernelArgs::new()
            .ptr(x.ptr())
            .ptr(batch.d_pos().ptr())
            .ptr(batch.d_row_seq().ptr())
            .ptr(tables.inv_freq.ptr())
            .ptr(tables.attn_factor.ptr())
            .i32(t_i)
            .i32(h_i)
            .i32(d_i)
            .i32(rd_i)
            .launch(driver, "rope_f32", cfg)
    }
}

/// Writes the new rows' keys and values into the paged cache at the batch's slots, rounded to
/// bf16 (nearest even). k, v: `[T, kv_width]` f32; k_cache, v_cache: `[>= batch.n_slots(),
/// kv_width]` bf16 (one layer's cache).
pub fn kv_write(
    driver: &dyn Driver,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    k_cache: &mut DeviceBuffer<bf16>,
    v_cache: &mut DeviceBuffer<bf16>,
    batch: &PagedBatch,
    kv_width: usize,
) -> Result<()> {
    let t = batch.n_rows();
    for (name, b) in [("k", k), ("v", v)] {
        if t.checked_mul(kv_width) != Some(b.len()) {
            return Err(Error::input(format!("kv_write: {name} has {} elements, expected [{t}, {kv_width}]", b.len())));
        }
    }
    let need = batch.n_slots().checked_mul(kv_width).ok_or_else(|| Error::input("kv_write: cache size overflows"))?;
    for (name, c) in [("k_cache", &*k_cache), ("v_cache", &*v_cache)] {
        if c.len() < need {
            return Err(Error::input(format!("kv_write: {name} has {} elements, the batch addresses {} slots of {kv_width}", c.len(), batch.n_slots())));
        }
    }
    if t == 0 || kv_width == 0 {
        return Ok(());
    }
    let (t_i, w_i) = (rows_i32(t, "kv_write: rows")?, rows_i32(kv_width, "kv_write: kv_width")?);
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
    // SAFETY: k, v hold [T, kv_width] (checked); every slot of the validated batch is
    // < n_slots and the caches hold n_slots * kv_width; k_cache and v_cache are distinct
    // (two &mut), and no two rows of a batch share a slot (PagedBatch::new).
    unsafe {
        KernelArgs::new().ptr(k.ptr()).ptr(v.ptr()).ptr(k_cache.ptr()).ptr(v_cache.ptr()).ptr(batch.d_slot().ptr()).i32(t_i).i32(w_i).launch(
            driver,
            "kv_write_bf16",
            cfg,
        )
    }
}

/// Slot-to-slot copies inside a paged cache (`kv_copy_slots_bf16`), validated once on the host
/// and uploaded once, then applied to the caches of every layer: the copy-on-write of resumed
/// segments' partial prefix blocks.
pub struct SlotCopies {
    n: usize,
    n_slots: usize,
    src: DeviceBuffer<i32>, // [n]
    dst: DeviceBuffer<i32>, // [n]
}

impl SlotCopies {
    /// `pairs` of (source slot, destination slot) in a cache of `n_slots` slots. Errors on a slot
    /// out of range, a destination listed twice, or a destination that is also a source (the
    /// copies would race).
    pub fn new(driver: &Arc<dyn Driver>, pairs: &[(usize, usize)], n_slots: usize) -> Result<SlotCopies> {
        rows_i32(n_slots, "kv_copy_slots: cache slots")?;
        if let Some(&(s, d)) = pairs.iter().find(|&&(s, d)| s >= n_slots || d >= n_slots) {
            return Err(Error::input(format!("kv_copy_slots: copy {s} -> {d} is outside the cache of {n_slots} slots")));
        }
        let mut dsts: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        dsts.sort_unstable();
        if let Some(w) = dsts.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::input(format!("kv_copy_slots: slot {} is written twice", w[0])));
        }
        if let Some(&(s, _)) = pairs.iter().find(|p| dsts.binary_search(&p.0).is_ok()) {
            return Err(Error::input(format!("kv_copy_slots: slot {s} is both copied from and written")));
        }
        let src: Vec<i32> = pairs.iter().map(|p| p.0 as i32).collect();
        let dst: Vec<i32> = pairs.iter().map(|p| p.1 as i32).collect();
        Ok(SlotCopies { n: pairs.len(), n_slots, src: DeviceBuffer::from_slice(driver, &src)?, dst: DeviceBuffer::from_slice(driver, &dst)? })
    }
}

/// Applies `copies` to one layer's caches k_cache, v_cache `[>= n_slots, kv_width]` bf16.
pub fn kv_copy_slots(driver: &dyn Driver, k_cache: &mut DeviceBuffer<bf16>, v_cache: &mut DeviceBuffer<bf16>, copies: &SlotCopies, kv_width: usize) -> Result<()> {
    let need = copies.n_slots.checked_mul(kv_width).ok_or_else(|| Error::input("kv_copy_slots: cache size overflows"))?;
    for (name, c) in [("k_cache", &*k_cache), ("v_cache", &*v_cache)] {
        if c.len() < need {
            return Err(Error::input(format!("kv_copy_slots: {name} has {} elements, the copies address {} slots of {kv_width}", c.len(), copies.n_slots)));
        }
    }
    if copies.n == 0 || kv_width == 0 {
        return Ok(());
    }
    let (n_i, w_i, s_i) = (rows_i32(copies.n, "kv_copy_slots: copies")?, rows_i32(kv_width, "kv_copy_slots: kv_width")?, rows_i32(copies.n_slots, "kv_copy_slots: slots")?);
    let cfg = LaunchConfig { grid: (copies.n as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
    // SAFETY: every slot is < n_slots (checked in SlotCopies::new) and the caches hold n_slots x
    // kv_width; destinations are distinct and never sources, so no element is both read and
    // written; k_cache and v_cache are distinct (two &mut).
    unsafe {
        KernelArgs::new().ptr(k_cache.ptr()).ptr(v_cache.ptr()).ptr(copies.src.ptr()).ptr(copies.dst.ptr()).i32(n_i).i32(w_i).i32(s_i).launch(driver, "kv_copy_slots_bf16", cfg)
    }
}
