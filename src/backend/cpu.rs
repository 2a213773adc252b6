//! The CPU engine's GEMMs, multithreaded with rayon over tiles of output columns; weights stay
//! in their stored dtype and are converted tile by tile inside the GEMM (no converted copy of
//! the model ever exists). Two precisions ([`Precision`]):
//! - f32 (the reference, [`matmul_t`]): weight tiles converted to f32, multiplied with the
//!   `gemm` crate.
//! - bf16 ([`matmul_t_bf16`]): the device's GEMM numerics, bf16 operands (activations rounded
//!   to nearest even; a bf16 checkpoint's weights read as stored) and f32 accumulation. Where
//!   the CPU has AVX512-BF16 and the GEMM has few rows (decode, small batches: bound by the
//!   weights' bytes), a `vdpbf16ps` microkernel reads both operands in bf16, half the bytes of
//!   f32; otherwise the f32 GEMM of the rounded operands (the same products, exact in f32,
//!   summed in another order). Why not `vdpbf16ps` everywhere: on the Xeon (Emerald Rapids,
//!   AMX not exposed) this was written on, it retires about a third as many instructions per
//!   second as f32 FMA (32 vs 16 multiply-adds each), so at 64 rows and more the f32 FMA GEMM
//!   is as fast or faster (measured: 4 rows 2.8x faster with `vdpbf16ps`, 64 rows even, 256
//!   rows 10% slower).
//!
//! The other references sit next to their kernels' launchers: `ops/<op>.rs` `<op>_ref`.

use half::bf16;
use rayon::prelude::*;

use crate::backend::Precision;
use crate::backend::ops::elementwise::bias_add_ref;
use crate::model::checkpoint::{Linear, Weight};
use crate::model::config::DType;

/// Output columns (rows of W) per GEMM task.
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

/// y = x W^T in f32.  x: [m, k], W: [n, k], y: [m, n]. Each tile of W is converted to f32 and
/// multiplied with the `gemm` crate.
pub fn matmul_t(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    matmul_f32_tiles(x, m, w, y, false);
}

/// y = x W^T with bf16 operands and f32 accumulation.  x: [m, k] (rounded to bf16 here),
/// W: [n, k] (rounded to bf16 unless stored so), y: [m, n]. The `vdpbf16ps` microkernel for
/// fewer than [`DOT_MAX_ROWS`] rows where the CPU has AVX512-BF16, else the f32 GEMM of the
/// rounded operands.
///
/// Against [`matmul_t`] of the unrounded x (bf16 weights), each output differs by at most
/// 2^-8 sum_i |x_i w_i| from the rounding of x (one bf16 rounding, relative error <= 2^-8 per
/// element) plus the f32 summation error of both (about k 2^-24 sum_i |x_i w_i| each).
pub fn matmul_t_bf16(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    matmul_t_bf16_on(x, m, w, y, has_avx512bf16());
}

/// Rounds every element to bf16 (nearest even), in place: the device's bf16 buffers (KV cache,
/// embedding table) on the CPU.
pub fn round_to_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

/// Rows from which [`matmul_t_bf16`] runs the f32 GEMM of the rounded operands rather than
/// the `vdpbf16ps` microkernel (see the module's notes).
pub const DOT_MAX_ROWS: usize = 64;

/// Whether this CPU runs the `vdpbf16ps` microkernel (AVX512-F, -BW and -BF16).
pub fn has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`matmul_t_bf16`] with the microkernel for fewer than DOT_MAX_ROWS rows when `simd` (which
/// the caller has checked the CPU runs), else the f32 GEMM of the rounded operands.
fn matmul_t_bf16_on(x: &[f32], m: usize, w: &Weight, y: &mut [f32], simd: bool) {
    let (n, k) = (w.shape[0], w.shape[1]);
    check_shapes(x, m, w, y);
    if m == 0 {
        return;
    }
    if !simd || m >= DOT_MAX_ROWS {
        let mut xr = x.to_vec(); // [m, k]
        xr.par_chunks_mut(4096).for_each(round_to_bf16);
        matmul_f32_tiles(&xr, m, w, y, w.dtype != DType::BF16);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let x16: Vec<u16> = x.par_iter().map(|&v| bf16::from_f32(v).to_bits()).collect(); // [m, k]
        let stored = (w.dtype == DType::BF16).then(|| w.bytes().as_ptr() as usize);
        par_tiles(n, y, <(Vec<f32>, Vec<u16>)>::default, |(f, h), n0, nb, y_cols| {
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
            // SAFETY: the caller checked the CPU features; x16 is [m, k], w_tile [nb, k] (rows
            // n0..n0+nb of W), y_cols columns n0..n0+nb of y ([m, n], row stride n).
            unsafe { dot_tile(x16.as_ptr(), m, k, w_tile, nb, y_cols, n) };
        });
    }
}

fn check_shapes(x: &[f32], m: usize, w: &Weight, y: &[f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert!(x.len() == m * k && y.len() == m * n, "matmul: x {} (m {m} k {k}), y {} (n {n})", x.len(), y.len());
}

/// y = x W^T with the `gemm` crate, W converted to f32 tile by tile (and rounded to bf16 when
/// `round_w`).
fn matmul_f32_tiles(x: &[f32], m: usize, w: &Weight, y: &mut [f32], round_w: bool) {
    let (n, k) = (w.shape[0], w.shape[1]);
    check_shapes(x, m, w, y);
    if m == 0 {
        return;
    }
    par_tiles(n, y, Vec::new, |tile: &mut Vec<f32>, n0, nb, y_cols| {
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

/// Runs `f(state, n0, nb, y_cols)` for every tile of TILE_N output columns `n0..n0 + nb` of
/// y (`[m, n]`), tiles in parallel, each task with its own `state`; y_cols points at column n0
/// of y's first row. Each call may write only its own columns.
fn par_tiles<S>(n: usize, y: &mut [f32], init: impl Fn() -> S + Sync + Send, f: impl Fn(&mut S, usize, usize, *mut f32) + Sync + Send) {
    let y_addr = y.as_mut_ptr() as usize;
    (0..n.div_ceil(TILE_N)).into_par_iter().for_each_init(init, |state, t| {
        let n0 = t * TILE_N;
        f(state, n0, TILE_N.min(n - n0), (y_addr as *mut f32).wrapping_add(n0));
    });
}

/// Rows of x per microkernel block.
#[cfg(target_arch = "x86_64")]
const MR: usize = 4;
/// Rows of W per microkernel block.
#[cfg(target_arch = "x86_64")]
const NR: usize = 4;
/// Depth per pass: a block's MR + NR rows of KC bf16 (32 KiB) stay in L1 while it runs.
#[cfg(target_arch = "x86_64")]
const KC: usize = 2048;

/// y[i, j] = sum_p x[i, p] w[j, p] for i < m, j < nb; x `[m, k]` and w `[nb, k]` bf16 bits,
/// y row stride `ldy`. Loops: depth passes of KC, then MR x NR blocks, W rows outer so a
/// block of W stays in L1 while every row of x streams past it.
///
/// # Safety
/// The CPU has AVX512-F, -BW and -BF16; the pointers cover the shapes above.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_tile(x: *const u16, m: usize, k: usize, w: *const u16, nb: usize, y: *mut f32, ldy: usize) {
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

/// y[i, j] += sum_{p < kc} x[i, p] w[j, p] for i < R, j < C (x, w row stride `ld`): R x C
/// accumulators of 16 f32 lanes, each `vdpbf16ps` adding 32 bf16 products pairwise; the last
/// partial step loads under a mask (masked-off elements read as 0 and never touch memory).
///
/// # Safety
/// As [`dot_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn block<const R: usize, const C: usize>(x: *const u16, w: *const u16, ld: usize, kc: usize, y: *mut f32, ldy: usize) {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for p in (0..kc).step_by(32) {
            let mask: __mmask32 = if kc - p >= 32 { !0 } else { (1u32 << (kc - p)) - 1 };
            let mut wv = [_mm512_setzero_si512(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, w.add(j * ld + p) as *const i16);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x.add(i * ld + p) as *const i16));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, std::mem::transmute::<__m512i, __m512bh>(*v));
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

    /// The bf16 GEMM (microkernel where the CPU has it, and the fallback) against the f32 GEMM
    /// on fresh random inputs of awkward shapes: m = 1 and not a multiple of MR, k odd, below
    /// one step of 32 and past a depth pass (KC), n not a multiple of the tile or the block.
    #[test]
    fn bf16_gemm_matches_the_f32_reference() {
        // A fresh seed each run (PATCHBAY_TEST_SEED replays one, as for the kernel tests).
        let seed: u64 = std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let paths: Vec<bool> = if has_avx512bf16() { vec![true, false] } else { vec![false] };
        for &(m, k, n) in &[(1, 1, 1), (1, 33, 67), (3, 7, 5), (5, 31, 130), (4, 64, 64), (9, 257, 70), (6, 2048 + 37, 9), (2, 4096, 3)] {
            let x = random(&mut rng, m * k);
            let w_vals = random(&mut rng, n * k);
            for dtype in [DType::BF16, DType::F32] {
                let w = Weight::from_f32(&w_vals, dtype, vec![n, k]);
                let w_used = round(&w_vals); // what the bf16 GEMM multiplies by
                let mut want_exact = vec![0.0; m * n]; // f32 GEMM of unrounded x
                matmul_t(&x, m, &Weight::from_f32(&w_used, DType::F32, vec![n, k]), &mut want_exact);
                let mut want_rounded = vec![0.0; m * n]; // f32 GEMM of the bf16 operands
                let xr = round(&x);
                matmul_t(&xr, m, &Weight::from_f32(&w_used, DType::F32, vec![n, k]), &mut want_rounded);
                for &simd in &paths {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_t_bf16_on(&x, m, &w, &mut got, simd);
                    let what = format!("seed {seed}: m {m} k {k} n {n} {dtype:?} simd {simd}");
                    // Same operands, other summation order: 2 k 2^-24 (k eps) of the magnitude.
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
