//! Dense linear algebra for the probes: GEMM through the `gemm` crate (checked views, so no
//! caller writes `unsafe`), a blocked Cholesky factorisation and triangular solves (f64).

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        View { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "{what}: view [{} x {}] (rs {}, cs {}) exceeds {} elements", self.rows, self.cols, self.rs, self.cs, self.data.len());
        }
    }
}

/// Element types the GEMM takes.
pub trait Float: Copy + Default + Send + Sync + 'static + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
}
impl Float for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}
impl Float for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

/// dst (`[a.rows, b.cols]`, row-major) = a b, or dst += a b when `accumulate`. Multithreaded
/// (rayon) when `parallel`. Panics on inconsistent shapes: a programming error, not user input.
pub fn matmul<T: Float>(dst: &mut [T], a: View<T>, b: View<T>, accumulate: bool, parallel: bool) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions {} and {}", a.cols, b.rows);
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(dst.len(), m * n, "matmul: destination has {} elements, expected {m} x {n}", dst.len());
    a.check("matmul lhs");
    b.check("matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return;
    }
    let par = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the views were checked to lie inside their slices; dst is [m, n] row-major
    // (checked) and borrowed mutably, so nothing else reads or writes it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}

/// Block size of the Cholesky factorisation.
const NB: usize = 96;

/// In-place Cholesky of a symmetric positive definite `[n, n]` row-major matrix: on return the
/// lower triangle holds L with A = L L^T (the strict upper triangle is garbage). Err(i) when the
/// pivot at i is not positive.
pub fn cholesky(a: &mut [f64], n: usize, parallel: bool) -> Result<(), usize> {
    assert_eq!(a.len(), n * n);
    let mut k0 = 0;
    while k0 < n {
        let kb = NB.min(n - k0);
        let k1 = k0 + kb;
        // Unblocked factorisation of the diagonal block (its trailing updates from earlier
        // panels were already applied).
        for j in k0..k1 {
            let mut d = a[j * n + j];
            for p in k0..j {
                d -= a[j * n + p] * a[j * n + p];
            }
            if d.is_nan() || d <= 0.0 || !d.is_finite() {
                return Err(j);
            }
            let d = d.sqrt();
            a[j * n + j] = d;
            for i in j + 1..k1 {
                let mut s = a[i * n + j];
                for p in k0..j {
                    s -= a[i * n + p] * a[j * n + p];
                }
                a[i * n + j] = s / d;
            }
        }
        if k1 < n {
            // Panel below: L21 = A21 L11^-T, row by row (forward substitution).
            let (top, bottom) = a.split_at_mut(k1 * n);
            let l11 = &top[..];
            use rayon::prelude::*;
            let solve_row = |row: &mut [f64]| {
                for j in k0..k1 {
                    let mut s = row[j];
                    for p in k0..j {
                        s -= row[p] * l11[j * n + p];
                    }
                    row[j] = s / l11[j * n + j];
                }
            };
            if parallel {
                bottom.par_chunks_mut(n).for_each(solve_row);
            } else {
                bottom.chunks_mut(n).for_each(solve_row);
            }
            // Trailing update: A22 -= L21 L21^T.
            let m = n - k1;
            let l21: Vec<f64> = bottom.chunks(n).flat_map(|r| r[k0..k1].iter().map(|v| -v)).collect(); // [m, kb], negated
            let l21_pos: Vec<f64> = bottom.chunks(n).flat_map(|r| r[k0..k1].iter().copied()).collect(); // [m, kb]
            let mut upd = vec![0.0f64; m * m];
            matmul(&mut upd, View::rows(&l21, m, kb), View::rows(&l21_pos, m, kb).t(), false, parallel);
            for (i, row) in bottom.chunks_mut(n).enumerate() {
                for (x, u) in row[k1..].iter_mut().zip(&upd[i * m..(i + 1) * m]) {
                    *x += u;
                }
            }
        }
        k0 = k1;
    }
    Ok(())
}

/// Solves (L L^T) X = B in place for B `[n, r]` row-major, L from [`cholesky`].
pub fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64], r: usize) {
    assert_eq!(b.len(), n * r);
    // L Y = B
    for i in 0..n {
        for p in 0..i {
            let lip = l[i * n + p];
            if lip != 0.0 {
                for c in 0..r {
                    b[i * r + c] -= lip * b[p * r + c];
                }
            }
        }
        let d = l[i * n + i];
        for c in 0..r {
            b[i * r + c] /= d;
        }
    }
    // L^T X = Y
    for i in (0..n).rev() {
        for c in 0..r {
            b[i * r + c] /= l[i * n + i];
        }
        for p in 0..i {
            let lip = l[i * n + p];
            if lip != 0.0 {
                for c in 0..r {
                    b[p * r + c] -= lip * b[i * r + c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: View<f64>, b: View<f64>) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs]).sum();
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_with_transposes() {
        for &(m, k, n) in &[(1, 1, 1), (7, 19, 5), (33, 3, 17)] {
            let a = rand_vec(m * k, 1);
            let b = rand_vec(k * n, 2);
            let bt: Vec<f64> = (0..n).flat_map(|j| (0..k).map(move |p| (j, p))).map(|(j, p)| b[p * n + j]).collect();
            let want = naive(View::rows(&a, m, k), View::rows(&b, k, n));
            let mut got = vec![0.0; m * n];
            matmul(&mut got, View::rows(&a, m, k), View::rows(&bt, n, k).t(), false, false);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{g} vs {w}");
            }
            matmul(&mut got, View::rows(&a, m, k), View::rows(&b, k, n), true, true);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn cholesky_solves_spd_systems_of_awkward_sizes() {
        for &n in &[1usize, 2, 95, 96, 97, 211] {
            let x = rand_vec(n * (n + 3), n as u64);
            // A = X X^T + I (SPD)
            let mut a = naive(View::rows(&x, n, n + 3), View::rows(&x, n, n + 3).t());
            for i in 0..n {
                a[i * n + i] += 1.0;
            }
            let a0 = a.clone();
            let b = rand_vec(n * 3, 7);
            let mut sol = b.clone();
            cholesky(&mut a, n, n > 100).unwrap();
            cholesky_solve(&a, n, &mut sol, 3);
            let back = naive(View::rows(&a0, n, n), View::rows(&sol, n, 3));
            for (g, w) in back.iter().zip(&b) {
                assert!((g - w).abs() < 1e-8, "n {n}: {g} vs {w}");
            }
        }
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky(&mut bad, 2, false), Err(1));
    }
}
