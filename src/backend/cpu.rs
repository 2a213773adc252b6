//! The CPU reference's GEMMs: f32 math, weights converted from their stored dtype tile by tile
//! inside the GEMM (no f32 copy of the model ever exists), multithreaded with rayon. The other
//! references sit next to their kernels' launchers: `ops/<op>.rs` `<op>_ref`.

use rayon::prelude::*;

use crate::backend::ops::elementwise::bias_add_ref;
use crate::model::checkpoint::{Linear, Weight};

/// Output rows of W converted per GEMM task.
const TILE_N: usize = 64;

/// y = x W^T (+ b).  x: [m, k], W: [n, k] (stored dtype), y: [m, n].
pub fn linear(x: &[f32], m: usize, lin: &Linear, y: &mut [f32]) {
    matmul_t(x, m, &lin.w, y);
    if let Some(b) = &lin.b {
        bias_add_ref(y, b);
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
