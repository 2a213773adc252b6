//! The plain CPU reference: f32 math, weights converted from their stored dtype tile by tile
//! inside the GEMM (no f32 copy of the model ever exists), multithreaded with rayon.
//! Every fast path is checked against these functions.

use rayon::prelude::*;

use crate::model::checkpoint::{Linear, Weight};
use crate::model::config::{Activation, NormWeight};

/// Output rows of W converted per GEMM task.
const TILE_N: usize = 64;

/// y = x W^T (+ b).  x: [m, k], W: [n, k] (stored dtype), y: [m, n].
pub fn linear(x: &[f32], m: usize, lin: &Linear, y: &mut [f32]) {
    matmul_t(x, m, &lin.w, y);
    if let Some(b) = &lin.b {
        let n = b.len();
        y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
}

/// y = x W^T.  x: [m, k], W: [n, k], y: [m, n]. Parallel over tiles of TILE_N output columns;
/// each tile of W is converted to f32 and multiplied with the `gemm` crate.
pub fn matmul_t(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert!(x.len() == m * k && y.len() == m * n, "matmul_t: x {} (m {m} k {k}), y {} (n {n})", x.len(), y.len());
    if m == 0 {
        return;
    }
    let y_addr = y.as_mut_ptr() as usize;
    (0..n.div_ceil(TILE_N)).into_par_iter().for_each_init(Vec::new, |tile: &mut Vec<f32>, t| {
        let n0 = t * TILE_N;
        let nb = TILE_N.min(n - n0);
        tile.resize(nb * k, 0.0);
        w.to_f32_range(n0 * k, (n0 + nb) * k, tile);
        // SAFETY: x is [m, k] and tile is [nb, k], both fully initialised; the destination is
        // columns n0..n0+nb of y ([m, n], checked above), which no other task writes.
        unsafe {
            gemm::gemm(
                m,
                nb,
                k,
                (y_addr as *mut f32).add(n0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                tile.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// out = x / sqrt(mean(x^2) + eps) * w  (or * (1 + w)), row by row.  x, out: [rows, n], w: (n).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, kind: NormWeight, out: &mut [f32]) {
    let n = w.len();
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ms + eps).sqrt();
        match kind {
            NormWeight::Plain => o.iter_mut().zip(x).zip(w).for_each(|((o, x), w)| *o = w * (x * r)),
            NormWeight::OnePlus => o.iter_mut().zip(x).zip(w).for_each(|((o, x), w)| *o = (x * r) * (1.0 + w)),
        }
    });
}

/// In place: x <- act(x) * up.  x (gate), up: [rows, d_mlp].
pub fn act_mul(gate: &mut [f32], up: &[f32], act: Activation) {
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, u) in g.iter_mut().zip(u) {
            let a = match act {
                Activation::Silu => *g / (1.0 + (-*g).exp()),
                Activation::GeluTanh => {
                    let x = *g;
                    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
                }
            };
            *g = a * u;
        }
    });
}

/// Rotates the first `2 * inv_freq.len()` dims of each head (rotate-half convention):
/// out[i] = x[i] cos - x[i+h] sin, out[i+h] = x[i+h] cos + x[i] sin, angle = pos * inv_freq[i],
/// cos/sin multiplied by `attn_factor`.  x: [rows, n_heads, d_head], positions: (rows).
pub fn rope(x: &mut [f32], n_heads: usize, d_head: usize, positions: &[usize], inv_freq: &[f32], attn_factor: f32) {
    let half = inv_freq.len();
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

/// Attention of one sequence.  q: [t_new, n_heads, d_head] (positions start..start+t_new),
/// k, v: [t_total, n_kv_heads, d_head] (all positions 0..t_total), z: [t_new, n_heads, d_head],
/// probs (optional): [t_new, n_heads, n_keys] with n_keys >= t_total, zero past the visible keys.
#[allow(clippy::too_many_arguments)]
pub fn attention(
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
    window: Option<usize>,
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
        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
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
