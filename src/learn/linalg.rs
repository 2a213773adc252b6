//! Dense linear algebra for the probes: GEMM through the `gemm` crate (checked views, so no
//! caller writes `unsafe`) and symmetric positive definite solves through faer (f64).

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

/// Solves A X = B in place for a symmetric positive definite A (`[n, n]` row-major) and B
/// (`[n, r]` row-major), through faer's Cholesky factorisation A = L L^T. Err(i) when the
/// pivot at i is not positive (A is not positive definite to working precision).
pub fn solve_spd(a: &[f64], n: usize, b: &mut [f64], r: usize) -> Result<(), usize> {
    use faer::linalg::solvers::Solve;
    assert_eq!(a.len(), n * n, "solve_spd: A has {} elements, expected {n} x {n}", a.len());
    assert_eq!(b.len(), n * r, "solve_spd: B has {} elements, expected {n} x {r}", b.len());
    let llt = faer::MatRef::from_row_major_slice(a, n, n).llt(faer::Side::Lower).map_err(|e| match e {
        faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => index,
    })?;
    llt.solve_in_place(faer::MatMut::from_row_major_slice_mut(b, n, r));
    Ok(())
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
        let mut uniform = crate::rng::lcg_uniform(seed);
        uniform(); // the stream's first value is not used
        (0..n).map(|_| uniform() - 0.5).collect()
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
    fn solve_spd_solves_spd_systems_of_awkward_sizes() {
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
            solve_spd(&a, n, &mut sol, 3).unwrap();
            let back = naive(View::rows(&a0, n, n), View::rows(&sol, n, 3));
            for (g, w) in back.iter().zip(&b) {
                assert!((g - w).abs() < 1e-8, "n {n}: {g} vs {w}");
            }
        }
        assert_eq!(solve_spd(&[1.0, 2.0, 2.0, 1.0], 2, &mut [1.0, 1.0], 1), Err(1));
    }
}
