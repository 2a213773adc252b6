//! RoPE on the varlen batch, per-sequence frequency tables (as longrope needs):
//! `kernels/rope.cu`, and its CPU reference [`rope_ref`].

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::device::{DevPtr, DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::backend::ops::attention::PagedBatch;
use crate::backend::ops::common::to_i32;
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


/// In place: rotate-half RoPE of every row of `batch` at its absolute position, with its
/// sequence's frequencies, on the first `tables.rotary_dim()` dims of each head (as
/// [`rope_ref`]) of `q` (`[T, n_heads, d_head]` f32, T = batch.n_rows()) and, in the same launch,
/// of `k` when given (`(k, n_kv_heads)`, `[T, n_kv_heads, d_head]`).
pub fn rope(driver: &dyn Driver, q: &mut DeviceBuffer<f32>, n_heads: usize, k: Option<(&mut DeviceBuffer<f32>, usize)>, batch: &PagedBatch, tables: &RopeTables, d_head: usize) -> Result<()> {
    let t = batch.n_rows();
    if tables.n_seqs != batch.n_seqs() {
        return Err(Error::input(format!("rope: {} frequency tables for a batch of {} sequences", tables.n_seqs, batch.n_seqs())));
    }
    let rd = tables.rotary_dim;
    if rd > d_head {
        return Err(Error::input(format!("rope: rotary_dim {rd} exceeds d_head {d_head}")));
    }
    let n_kv = k.as_ref().map_or(0, |k| k.1);
    for (name, x, heads) in [("q", Some(&*q), n_heads), ("k", k.as_ref().map(|k| &*k.0), n_kv)] {
        let width = heads.checked_mul(d_head).ok_or_else(|| Error::input(format!("rope: {name} width overflows")))?;
        if let Some(x) = x
            && t.checked_mul(width) != Some(x.len())
        {
            return Err(Error::input(format!("rope: {name} has {} elements, expected [{t}, {heads}, {d_head}]", x.len())));
        }
        to_i32(width, "rope: row width")?;
    }
    if t == 0 || rd == 0 || n_heads + n_kv == 0 {
        return Ok(());
    }
    let (t_i, hq_i, hk_i, d_i, rd_i) = (to_i32(t, "rope: rows")?, to_i32(n_heads, "rope: heads")?, to_i32(n_kv, "rope: kv heads")?, to_i32(d_head, "rope: d_head")?, to_i32(rd, "rope: rotary_dim")?);
    to_i32((n_heads + n_kv) * rd / 2, "rope: pairs per row")?;
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: (rd * 4) as u32 };
    // SAFETY: q holds [T, n_heads, d_head] and k (when given) [T, n_kv_heads, d_head] (checked;
    // null with n_k = 0 otherwise); pos and row_seq are the batch's [T] arrays with row_seq < S =
    // the tables' sequence count (checked), inv_freq is [S, rotary_dim / 2] and attn_factor [S];
    // rotary_dim <= d_head; shared memory = rotary_dim f32.
    unsafe {
        KernelArgs::new()
            .ptr(q.ptr())
            .ptr(k.map_or(DevPtr::NULL, |k| k.0.ptr()))
            .ptr(batch.d_pos().ptr())
            .ptr(batch.d_row_seq().ptr())
            .ptr(tables.inv_freq.ptr())
            .ptr(tables.attn_factor.ptr())
            .i32(t_i)
            .i32(hq_i)
            .i32(hk_i)
            .i32(d_i)
            .i32(rd_i)
            .launch(driver, entry::ROPE_F32, cfg)
    }
}

/// Rotates the first `2 * inv_freq.len()` dims of each head (rotate-half convention):
/// out[i] = x[i] cos - x[i+h] sin, out[i+h] = x[i+h] cos + x[i] sin, angle = pos * inv_freq[i],
/// cos/sin multiplied by `attn_factor`.  x: [rows, n_heads, d_head], positions: (rows).
pub fn rope_ref(x: &mut [f32], n_heads: usize, d_head: usize, positions: &[usize], inv_freq: &[f32], attn_factor: f32) {
    let half = inv_freq.len();
    if n_heads * d_head == 0 {
        return; // no heads: nothing to rotate
    }
    x.par_chunks_mut(n_heads * d_head).zip(positions.par_iter()).for_each(|(row, &pos)| {
        for i in 0..half {
            let angle = pos as f32 * inv_freq[i];
            let (c, s) = (angle.cos() * attn_factor, angle.sin() * attn_factor);
            for h in 0..n_heads {
                let base = h * d_head;
                let (a, b) = (row[base + i], row[base + i + half]);
                row[base + i] = a * c - b * s;
                row[base + i + half] = b * c + a * s;
            }
        }
    });
}
