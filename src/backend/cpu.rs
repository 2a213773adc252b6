//! The CPU engine's GEMMs, multithreaded with rayon over tiles of output columns; weights stay
//! in their stored dtype and are converted tile by tile inside the GEMM (no converted copy of
//! the model ever exists). Two precisions ([`Precision`]):
//! - f32 (the reference, [`matmul_t`]): f32 operands, f32 accumulation.
//! - bf16 ([`matmul_t_bf16`]): the device's GEMM numerics, bf16 operands (activations rounded
//!   to nearest even; a bf16 checkpoint's weights read as stored) and f32 accumulation, computed
//!   as the f32 GEMM of the rounded operands (their products are exact in f32).
//!
//! Both run the same kernels, by row count, where the CPU has AVX-512 (F, BW, VL):
//! - from [`PANEL_MIN_ROWS`] rows (prefill, patching batches; compute-bound) the panel
//!   microkernel: x packed once per call as transposed panels of 64 rows, each weight broadcast
//!   against 4 vectors of rows (6 x 4 accumulators), every output one FMA chain in depth order.
//!   Measured on the Xeon (Emerald Rapids, 2 cores) this was written on: about 240 GFLOP/s at
//!   256 x 2048 x 2048, where the `gemm` crate reaches about 155 (the FMA units' limit is
//!   2 x 189);
//! - below (decode, small batches; bound by the weights' bytes) the dot microkernel, reading W
//!   in bf16 (a bf16 checkpoint's bytes as stored) and widening it to f32 in registers: decode
//!   2.2x faster than converting each weight tile to f32 first. f32 weights at f32 take the
//!   `gemm` crate here, as every GEMM does on other CPUs.
//!
//! Why not `vdpbf16ps` (AVX512-BF16) for bf16: on that Xeon (AMX not exposed) one core retires
//! 1.4 G `vdpbf16ps` per second against 5.9 G f32 FMA (32 vs 16 multiply-adds each: 88 vs 189
//! GFLOP/s). A `vdpbf16ps` dot microkernel (this module until 2026-12-05) read both operands in
//! bf16 and was 1.3x slower than the dot microkernel at 4 rows and 1.2x slower than the panel
//! one at 48; the weights' bytes, which bound decode, are the same bf16 in both.
//!
//! The other references sit next to their kernels' launchers: `ops/<op>.rs` `<op>_ref`.

use half::bf16;
use rayon::prelude::*;

use crate::backend::Precision;
use crate::backend::ops::elementwise::bias_add_ref;
use crate::model::checkpoint::{Linear, Weight};
use crate::model::config::DType;

/// Output columns (rows of W) per GEMM task of the `gemm` crate and dot microkernel paths.
const TILE_N: usize = 64;

/// y = x W^T (+ b) at `precision`.  x: [m, k], W: [n, k] (stored dtype), y: [m, n].
pub fn linear(x: &[f32], m: usize, lin: &Linear, y: &mut [f32], precision: Precision) {
    matmul(x, m, &lin.w, y, precision);
    if let Some(b) = &lin.b {
        bias_add_ref(y, b);
    }
}

/// y = x W^T at `precision`: [`matmul_t`] or [`matmul_t_bf16`].
pub fn matmul(x: &[f32], m: usize, w: &Weight, y: &mut [f32], precision: Precision) {
    match precision {
        Precision::F32 => matmul_t(x, m, w, y),
        Precision::Bf16 => matmul_t_bf16(x, m, w, y),
    }
}

/// y = x W^T in f32.  x: [m, k], W: [n, k], y: [m, n].
pub fn matmul_t(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    gemm_on(x, m, w, y, false, has_avx512());
}

/// y = x W^T with bf16 operands and f32 accumulation.  x: [m, k] (rounded to bf16 here),
/// W: [n, k] (rounded to bf16 unless stored so), y: [m, n]: the f32 GEMM of the rounded
/// operands (their products are exact in f32).
///
/// Against [`matmul_t`] of the unrounded x (bf16 weights), each output differs by at most
/// 2^-8 sum_i |x_i w_i| from the rounding of x (one bf16 rounding, relative error <= 2^-8 per
/// element) plus the f32 summation error of both (about k 2^-24 sum_i |x_i w_i| each).
pub fn matmul_t_bf16(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    gemm_on(x, m, w, y, true, has_avx512());
}

/// Rounds every element to bf16 (nearest even), in place: the device's bf16 buffers (KV cache,
/// embedding table) on the CPU.
pub fn round_to_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

/// Whether this CPU runs the microkernels (AVX512-F, -BW and -VL).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn check_shapes(x: &[f32], m: usize, w: &Weight, y: &[f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert!(x.len() == m * k && y.len() == m * n, "matmul: x {} (m {m} k {k}), y {} (n {n})", x.len(), y.len());
}

/// y = x W^T in f32; with `bf16_operands`, of x and W rounded to bf16 (x as it is packed or
/// copied, W tile by tile unless stored so). Where `simd` (the caller has checked
/// [`has_avx512`]): the panel microkernel from [`PANEL_MIN_ROWS`] rows; below, the dot
/// microkernel, on W in bf16 (a bf16 checkpoint's bytes as stored, or a rounded tile). f32
/// weights in f32 below PANEL_MIN_ROWS, and every GEMM without `simd`: W converted to f32 tile by
/// tile and multiplied with the `gemm` crate.
fn gemm_on(x: &[f32], m: usize, w: &Weight, y: &mut [f32], bf16_operands: bool, simd: bool) {
    let (n, k) = (w.shape[0], w.shape[1]);
    check_shapes(x, m, w, y);
    if m == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd && m >= PANEL_MIN_ROWS {
        // SAFETY: `simd`: the caller checked has_avx512.
        unsafe { avx512::panel_gemm(x, m, w, y, bf16_operands) };
        return;
    }
    let x_rounded: Vec<f32>; // [m, k]
    let x = if bf16_operands {
        x_rounded = x.par_iter().with_min_len(1 << 16).map(|&v| bf16::from_f32(v).to_f32()).collect();
        &x_rounded
    } else {
        x
    };
    #[cfg(target_arch = "x86_64")]
    if simd && (bf16_operands || w.dtype == DType::BF16) {
        // SAFETY: `simd`: the caller checked has_avx512.
        unsafe { avx512::dot_gemm(x, m, w, y) };
        return;
    }
    let round_w = bf16_operands && w.dtype != DType::BF16;
    par_tiles(n, TILE_N, y, Vec::new, |tile: &mut Vec<f32>, n0, nb, y_cols| {
        tile.resize(nb * k, 0.0);
        w.to_f32_range(n0 * k, (n0 + nb) * k, tile);
        if round_w {
            round_to_bf16(tile);
        }
        // SAFETY: x is [m, k] and tile is [nb, k], both fully initialised; y_cols is columns
        // n0..n0+nb of y ([m, n], row stride n), which no other task writes.
        unsafe {
            gemm::gemm(m, nb, k, y_cols, 1, n as isize, false, x.as_ptr(), 1, k as isize, tile.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        }
    });
}

/// Runs `f(state, n0, nb, y_cols)` for every tile of `tile_n` output columns `n0..n0 + nb` of
/// y (`[m, n]`), tiles in parallel, each task with its own `state`; y_cols points at column n0
/// of y's first row. Each call may write only its own columns.
fn par_tiles<S>(n: usize, tile_n: usize, y: &mut [f32], init: impl Fn() -> S + Sync + Send, f: impl Fn(&mut S, usize, usize, *mut f32) + Sync + Send) {
    let y_addr = y.as_mut_ptr() as usize;
    (0..n.div_ceil(tile_n)).into_par_iter().for_each_init(init, |state, t| {
        let n0 = t * tile_n;
        f(state, n0, tile_n.min(n - n0), (y_addr as *mut f32).wrapping_add(n0));
    });
}

/// Rows from which the GEMMs run the panel microkernel rather than the dot one (measured in
/// prefill on the Xeon this was written on: the dot one 1.3x faster at 24 rows, the panel 1.05x
/// at 48; against the `gemm` crate the panel is even at 16 rows, 1.7x faster at 32, 1.5x at 64
/// and more).
pub const PANEL_MIN_ROWS: usize = 32;

/// The AVX-512 microkernels (x86-64 only; callers check [`has_avx512`] at run time).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::bf16;
    use rayon::prelude::*;

    use super::{TILE_N, par_tiles, round_to_bf16};
    use crate::model::checkpoint::Weight;
    use crate::model::config::DType;

    /// y = x W^T with the dot microkernel, W in bf16: a bf16 checkpoint's bytes as stored, else
    /// each tile converted and rounded to bf16 (only the bf16 GEMM calls it so).
    ///
    /// # Safety
    /// The CPU has AVX512-F, -BW and -VL.
    pub(super) unsafe fn dot_gemm(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
        let (n, k) = (w.shape[0], w.shape[1]);
        let stored = (w.dtype == DType::BF16).then(|| w.bytes().as_ptr() as usize);
        par_tiles(n, TILE_N, y, <(Vec<f32>, Vec<u16>)>::default, |(f, h), n0, nb, y_cols| {
            let w_tile = match stored {
                // The checkpoint's bytes, read by unaligned loads only.
                Some(base) => (base + n0 * k * 2) as *const u16,
                None => {
                    f.resize(nb * k, 0.0);
                    w.to_f32_range(n0 * k, (n0 + nb) * k, f);
                    h.clear();
                    h.extend(f.iter().map(|&v| bf16::from_f32(v).to_bits()));
                    h.as_ptr()
                }
            };
            // SAFETY: the CPU has the features (this fn's contract); x is [m, k], w_tile [nb, k]
            // (rows n0..n0+nb of W), y_cols columns n0..n0+nb of y ([m, n], row stride n).
            unsafe { dot_tile(x.as_ptr(), m, k, w_tile, nb, y_cols, n) };
        });
    }

    /// Rows of x per packed panel: the 16 lanes of 4 AVX-512 vectors.
    const PANEL: usize = 64;
    /// Rows of W per panel microkernel call: GROUP x 4 accumulators of the 32 vector registers.
    const GROUP: usize = 6;
    /// Output columns per panel GEMM task, a multiple of GROUP.
    const PANEL_TILE_N: usize = 96;
    /// Depth per pass of the panel GEMM: the pass's slices of x's panel (512 KiB) and of W's tile
    /// (768 KiB) stay in L2 while every group of W rows streams past the panel.
    const PANEL_KC: usize = 2048;

    /// y = x W^T with the panel microkernel. x is packed once, transposed by panels of PANEL rows
    /// (`xp[panel][p][row]`); each task converts one tile of W to f32 (rows padded with zeros to a
    /// multiple of GROUP) and, per panel, runs GROUP rows of W at a time against the panel:
    /// broadcast w[j, p], multiply-add the panel's 4 vectors of x[.., p]. Every output is one
    /// chain of fused multiply-adds over p in order, so a row's result does not depend on the
    /// other rows of the call (among calls of PANEL_MIN_ROWS rows or more: below, the dot
    /// microkernel sums in another order). With `bf16_operands`, x is rounded as it is packed.
    ///
    /// # Safety
    /// The CPU has AVX512-F.
    pub(super) unsafe fn panel_gemm(x: &[f32], m: usize, w: &Weight, y: &mut [f32], bf16_operands: bool) {
        let (n, k) = (w.shape[0], w.shape[1]);
        let panels = m.div_ceil(PANEL);
        let mut xp = vec![0.0f32; panels * k * PANEL]; // [panels, k, PANEL]: x^T by panels, zero past row m
        xp.par_chunks_mut(k * PANEL).enumerate().for_each(|(b, panel)| {
            for r in 0..PANEL.min(m - b * PANEL) {
                for (p, &v) in x[(b * PANEL + r) * k..][..k].iter().enumerate() {
                    panel[p * PANEL + r] = if bf16_operands { bf16::from_f32(v).to_f32() } else { v };
                }
            }
        });
        let round_w = bf16_operands && w.dtype != DType::BF16;
        par_tiles(n, PANEL_TILE_N, y, <(Vec<f32>, Vec<f32>)>::default, |(tile, acc), n0, nb, y_cols| {
            let rows_w = nb.div_ceil(GROUP) * GROUP;
            tile.resize(rows_w * k, 0.0); // [rows_w, k]: rows n0..n0+nb of W, then zeros
            w.to_f32_range(n0 * k, (n0 + nb) * k, &mut tile[..nb * k]);
            tile[nb * k..].fill(0.0);
            if round_w {
                round_to_bf16(&mut tile[..nb * k]);
            }
            acc.resize(rows_w * PANEL, 0.0); // [rows_w, PANEL]: y^T of one panel
            for b in 0..panels {
                let rows = PANEL.min(m - b * PANEL);
                for k0 in (0..k).step_by(PANEL_KC) {
                    let kc = PANEL_KC.min(k - k0);
                    for j in (0..rows_w).step_by(GROUP) {
                        let (xb, wb, ab) = (xp[b * k * PANEL + k0 * PANEL..].as_ptr(), tile[j * k + k0..].as_ptr(), acc[j * PANEL..].as_mut_ptr());
                        // SAFETY: the CPU has avx512f (this fn's contract); xb covers kc rows of PANEL,
                        // wb GROUP rows of stride k from depth k0 (k0 + kc <= k), ab GROUP rows of
                        // PANEL (j + GROUP <= rows_w).
                        unsafe {
                            match rows.div_ceil(16) {
                                1 => panel_block::<1>(xb, kc, wb, k, ab, k0 == 0),
                                2 => panel_block::<2>(xb, kc, wb, k, ab, k0 == 0),
                                3 => panel_block::<3>(xb, kc, wb, k, ab, k0 == 0),
                                _ => panel_block::<4>(xb, kc, wb, k, ab, k0 == 0),
                            }
                        }
                    }
                }
                for r in 0..rows {
                    // SAFETY: y_cols is columns n0..n0+nb of y ([m, n], row stride n), which no
                    // other task writes; row b * PANEL + r < m.
                    let y_row = unsafe { std::slice::from_raw_parts_mut(y_cols.add((b * PANEL + r) * n), nb) };
                    for (j, v) in y_row.iter_mut().enumerate() {
                        *v = acc[j * PANEL + r];
                    }
                }
            }
        });
    }

    /// acc[j][16 v + l] (+)= sum_{p < kc} w[j, p] xp[p][16 v + l] for j < GROUP, v < V, l < 16
    /// (w row stride `ldw`, xp row stride PANEL, acc row stride PANEL); starts from zero when
    /// `first`, else from acc.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers cover the shapes above.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn panel_block<const V: usize>(xp: *const f32, kc: usize, w: *const f32, ldw: usize, acc: *mut f32, first: bool) {
        use std::arch::x86_64::*;
        unsafe {
            let mut a = [[_mm512_setzero_ps(); V]; GROUP];
            if !first {
                for (j, row) in a.iter_mut().enumerate() {
                    for (v, r) in row.iter_mut().enumerate() {
                        *r = _mm512_loadu_ps(acc.add(j * PANEL + 16 * v));
                    }
                }
            }
            for p in 0..kc {
                let mut xv = [_mm512_setzero_ps(); V];
                for (v, r) in xv.iter_mut().enumerate() {
                    *r = _mm512_loadu_ps(xp.add(p * PANEL + 16 * v));
                }
                for (j, row) in a.iter_mut().enumerate() {
                    let s = _mm512_set1_ps(*w.add(j * ldw + p));
                    for (r, xr) in row.iter_mut().zip(&xv) {
                        *r = _mm512_fmadd_ps(s, *xr, *r);
                    }
                }
            }
            for (j, row) in a.iter().enumerate() {
                for (v, r) in row.iter().enumerate() {
                    _mm512_storeu_ps(acc.add(j * PANEL + 16 * v), *r);
                }
            }
        }
    }

    /// Rows of x per microkernel block.
    const MR: usize = 4;
    /// Rows of W per microkernel block.
    const NR: usize = 4;
    /// Depth per pass: a block's MR rows of KC f32 and NR of KC bf16 (48 KiB) stay in L1/L2 while
    /// it runs.
    const KC: usize = 2048;

    /// y[i, j] = sum_p x[i, p] w[j, p] for i < m, j < nb; x `[m, k]` f32 and w `[nb, k]` bf16
    /// bits, y row stride `ldy`. Loops: depth passes of KC, then MR x NR blocks, W rows outer so a
    /// block of W stays in L1 while every row of x streams past it.
    ///
    /// # Safety
    /// The CPU has AVX512-F, -BW and -VL; the pointers cover the shapes above.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dot_tile(x: *const f32, m: usize, k: usize, w: *const u16, nb: usize, y: *mut f32, ldy: usize) {
        unsafe {
            for i in 0..m {
                std::ptr::write_bytes(y.add(i * ldy), 0, nb);
            }
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for j in (0..nb).step_by(NR) {
                    let nr = NR.min(nb - j);
                    for i in (0..m).step_by(MR) {
                        let mr = MR.min(m - i);
                        let (xb, wb, yb) = (x.add(i * k + k0), w.add(j * k + k0), y.add(i * ldy + j));
                        match (mr == MR, nr == NR) {
                            (true, true) => block::<MR, NR>(xb, wb, k, kc, yb, ldy),
                            (true, false) => (0..nr).for_each(|jj| block::<MR, 1>(xb, wb.add(jj * k), k, kc, yb.add(jj), ldy)),
                            (false, true) => (0..mr).for_each(|ii| block::<1, NR>(xb.add(ii * k), wb, k, kc, yb.add(ii * ldy), ldy)),
                            (false, false) => (0..mr).for_each(|ii| (0..nr).for_each(|jj| block::<1, 1>(xb.add(ii * k), wb.add(jj * k), k, kc, yb.add(ii * ldy + jj), ldy))),
                        }
                    }
                }
            }
        }
    }

    /// y[i, j] += sum_{p < kc} x[i, p] w[j, p] for i < R, j < C (x, w row stride `ld` elements):
    /// R x C accumulators of 16 f32 lanes; each step widens 16 bf16 weights to f32 (exact: a
    /// shift) and multiply-adds them with 16 elements of x. The last partial step loads under a
    /// mask (masked-off elements read as 0 and never touch memory).
    ///
    /// # Safety
    /// As [`dot_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn block<const R: usize, const C: usize>(x: *const f32, w: *const u16, ld: usize, kc: usize, y: *mut f32, ldy: usize) {
        use std::arch::x86_64::*;
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for p in (0..kc).step_by(16) {
                let mask: __mmask16 = if kc - p >= 16 { !0 } else { (1u16 << (kc - p)) - 1 };
                let mut wv = [_mm512_setzero_ps(); C];
                for (j, v) in wv.iter_mut().enumerate() {
                    let bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w.add(j * ld + p) as *const i16));
                    *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * ld + p));
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, a) in row.iter().enumerate() {
                    *y.add(i * ldy + j) += _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn round(v: &[f32]) -> Vec<f32> {
        let mut r = v.to_vec();
        round_to_bf16(&mut r);
        r
    }

    /// The first output with |got - want| > rel * sum_p |x_p w_p|, described.
    #[allow(clippy::too_many_arguments)]
    fn violation(got: &[f32], want: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, rel: f32) -> Option<String> {
        (0..m * n).find_map(|o| {
            let (i, j) = (o / n, o % n);
            let mag: f32 = (0..k).map(|p| (x[i * k + p] * w[j * k + p]).abs()).sum();
            let (g, e) = (got[o], want[o]);
            ((g - e).abs() > rel * mag || g.is_nan()).then(|| format!("y[{i}, {j}] = {g}, want {e} (bound {} of magnitude {mag})", rel * mag))
        })
    }

    /// y = x W^T summed in f64, rounded once to f32: what the GEMMs are held to.
    fn plain(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        (0..m * n).map(|o| (0..k).map(|p| x[o / n * k + p] as f64 * w[o % n * k + p] as f64).sum::<f64>() as f32).collect()
    }

    /// A fresh seed each run (PATCHBAY_TEST_SEED replays one, as for the kernel tests).
    fn seeded() -> (u64, rand_chacha::ChaCha8Rng) {
        let seed: u64 = std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
        (seed, rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// The microkernels where the CPU has them, and the `gemm` crate path always.
    fn paths() -> Vec<bool> {
        if has_avx512() { vec![true, false] } else { vec![false] }
    }

    /// Awkward shapes for every path: m = 1, rows off a dot block (MR), a vector and a panel,
    /// on both sides of PANEL_MIN_ROWS; k odd, below one step of 16 and past a depth pass (KC,
    /// PANEL_KC); n off a block, a group and a tile.
    const SHAPES: [(usize, usize, usize); 14] =
        [(1, 1, 1), (1, 33, 67), (3, 7, 5), (5, 31, 130), (4, 64, 64), (9, 257, 70), (6, 2048 + 37, 9), (31, 300, 70), (32, 1, 1), (33, 7, 5), (47, 300, 97), (64, 2048 + 37, 13), (130, 129, 200), (65, 17, 2 * 96 + 5)];

    /// The f32 GEMM (panel microkernel from PANEL_MIN_ROWS rows, dot microkernel below for bf16
    /// weights, the `gemm` crate) against a plain f64 sum, on fresh random inputs and a y
    /// poisoned with NaN; and each row's bits are the same whatever other rows share the call
    /// (on the microkernel paths, when both calls take the same one).
    #[test]
    fn f32_gemm_matches_a_plain_sum_and_rows_are_independent() {
        let (seed, mut rng) = seeded();
        for &(m, k, n) in &SHAPES {
            let x = random(&mut rng, m * k);
            let w_vals = random(&mut rng, n * k);
            for dtype in [DType::F32, DType::BF16] {
                let w = Weight::from_f32(&w_vals, dtype, vec![n, k]);
                let w_used: Vec<f32> = if dtype == DType::BF16 { round(&w_vals) } else { w_vals.clone() };
                let want = plain(&x, &w_used, m, n, k);
                for simd in paths() {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_on(&x, m, &w, &mut got, false, simd);
                    let what = format!("seed {seed}: m {m} k {k} n {n} {dtype:?} simd {simd}");
                    let bad = violation(&got, &want, &x, &w_used, m, n, k, k as f32 * f32::EPSILON);
                    assert!(bad.is_none(), "{what}: {}", bad.unwrap_or_default());
                    // The last m - 3 rows alone, through the same microkernel as the whole call.
                    let same_kernel = simd && m > 3 && ((m - 3 >= PANEL_MIN_ROWS) || (m < PANEL_MIN_ROWS && dtype == DType::BF16));
                    if same_kernel {
                        let mut tail = vec![f32::NAN; (m - 3) * n];
                        gemm_on(&x[3 * k..], m - 3, &w, &mut tail, false, simd);
                        assert!(tail.iter().zip(&got[3 * n..]).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: rows 3.. alone differ from the same rows in the whole call");
                    }
                }
            }
        }
    }

    /// The bf16 GEMM on every path against plain f64 sums: of the same rounded operands (only
    /// the summation differs), and of the unrounded x (one bf16 rounding more).
    #[test]
    fn bf16_gemm_matches_the_f32_reference() {
        let (seed, mut rng) = seeded();
        for &(m, k, n) in &SHAPES {
            let x = random(&mut rng, m * k);
            let w_vals = random(&mut rng, n * k);
            let w_used = round(&w_vals); // what the bf16 GEMM multiplies by
            let xr = round(&x);
            let want_rounded = plain(&xr, &w_used, m, n, k);
            let want_exact = plain(&x, &w_used, m, n, k);
            for dtype in [DType::BF16, DType::F32] {
                let w = Weight::from_f32(&w_vals, dtype, vec![n, k]);
                for simd in paths() {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_on(&x, m, &w, &mut got, true, simd);
                    let what = format!("seed {seed}: m {m} k {k} n {n} {dtype:?} simd {simd}");
                    // Same operands, other summation order: k 2^-23 (k eps) of the magnitude.
                    let same = violation(&got, &want_rounded, &xr, &w_used, m, n, k, k as f32 * f32::EPSILON);
                    assert!(same.is_none(), "{what}: {}", same.unwrap_or_default());
                    // Against unrounded x: one bf16 rounding of x (8 significant bits, round to
                    // nearest: relative error <= 2^-8) and the summation.
                    let exact = violation(&got, &want_exact, &x, &w_used, m, n, k, 1.0 / 256.0 + k as f32 * f32::EPSILON);
                    assert!(exact.is_none(), "{what}: {}", exact.unwrap_or_default());
                }
            }
        }
    }

    /// The rounding of x is what the tolerance above is made of: an f32 GEMM of unrounded x
    /// must fall outside the tighter bound, or the first check could not fail.
    #[test]
    fn the_tight_bound_sees_an_unrounded_operand() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (m, k, n) = (3, 300, 5);
        let x = random(&mut rng, m * k);
        let w = round(&random(&mut rng, n * k));
        let wt = Weight::from_f32(&w, DType::F32, vec![n, k]);
        let (mut exact, mut rounded) = (vec![0.0; m * n], vec![0.0; m * n]);
        matmul_t(&x, m, &wt, &mut exact);
        matmul_t(&round(&x), m, &wt, &mut rounded);
        assert!(violation(&exact, &rounded, &round(&x), &w, m, n, k, k as f32 * f32::EPSILON).is_some(), "the f32 GEMM of unrounded x passed the same-operands bound");
    }
}
