//! Ridge regression for several targets at once: scikit-learn's `Ridge(alpha)` with an
//! intercept (features and targets centred on the training rows, intercept not penalised):
//!
//!   minimise  ||y - X w - b||^2 + alpha ||w||^2
//!
//! Solved in f64 by Cholesky, in the primal (d x d Gram) when d <= n, else in the dual (n x n).
//! For k-fold evaluation the primal Gram of each training set is the total Gram minus the
//! held-out fold's, so the cost is one pass over the data plus one factorisation per fold.

use super::linalg::{View, matmul, solve_spd};

/// A fitted model: `y = W x + b` for each target.
#[derive(Clone, Debug)]
pub struct Ridge {
    /// [r, d]
    pub w: Vec<f64>,
    /// [r]
    pub b: Vec<f64>,
    pub r: usize,
    pub d: usize,
}

impl Ridge {
    /// Predictions `[n, r]` for x `[n, d]` (f64).
    pub fn predict(&self, x: &[f64], n: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; n * self.r];
        matmul(&mut out, View::rows(x, n, self.d), View::rows(&self.w, self.r, self.d).t(), false, false);
        for row in out.chunks_mut(self.r) {
            row.iter_mut().zip(&self.b).for_each(|(o, b)| *o += b);
        }
        out
    }
}

/// The standard deviation used to scale a feature; constant features keep scale 1 (as
/// scikit-learn's StandardScaler does).
pub fn feature_scale(std: f64, mean: f64) -> f64 {
    if std <= 1e-12 * (1.0 + mean.abs()) { 1.0 } else { std }
}

/// Sufficient statistics of a set of rows: sums and uncentred cross products.
#[derive(Clone)]
pub struct Moments {
    pub n: usize,
    pub d: usize,
    pub r: usize,
    /// sum of x, [d]
    pub sx: Vec<f64>,
    /// sum of y, [r]
    pub sy: Vec<f64>,
    /// X^T X, [d, d]
    pub xx: Vec<f64>,
    /// X^T Y, [d, r]
    pub xy: Vec<f64>,
}

impl Moments {
    /// Moments of x `[n, d]`, y `[n, r]`.
    pub fn of(x: &[f64], y: &[f64], n: usize, d: usize, r: usize, parallel: bool) -> Moments {
        let mut xx = vec![0.0; d * d];
        matmul(&mut xx, View::rows(x, n, d).t(), View::rows(x, n, d), false, parallel);
        let mut xy = vec![0.0; d * r];
        matmul(&mut xy, View::rows(x, n, d).t(), View::rows(y, n, r), false, parallel);
        let mut sx = vec![0.0; d];
        for row in x.chunks(d) {
            sx.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        let mut sy = vec![0.0; r];
        for row in y.chunks(r.max(1)) {
            sy.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        Moments { n, d, r, sx, sy, xx, xy }
    }

    /// self - other (the moments of the rows of self not in other).
    pub fn minus(&self, o: &Moments) -> Moments {
        let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a - b).collect::<Vec<f64>>();
        Moments { n: self.n - o.n, d: self.d, r: self.r, sx: sub(&self.sx, &o.sx), sy: sub(&self.sy, &o.sy), xx: sub(&self.xx, &o.xx), xy: sub(&self.xy, &o.xy) }
    }
}

/// Fits from moments in the primal: (Xc^T Xc + alpha I) w = Xc^T yc.
/// With `standardize`, the features are scaled to unit variance (population, as scikit-learn's
/// StandardScaler) before the penalty applies; the returned weights act on raw features.
pub fn fit_moments(m: &Moments, alpha: f64, standardize: bool) -> Result<Ridge, String> {
    let (n, d, r) = (m.n as f64, m.d, m.r);
    if m.n == 0 {
        return Err("no training rows".into());
    }
    let mx: Vec<f64> = m.sx.iter().map(|v| v / n).collect();
    let my: Vec<f64> = m.sy.iter().map(|v| v / n).collect();
    let mut a = m.xx.clone();
    for i in 0..d {
        for j in 0..d {
            a[i * d + j] -= n * mx[i] * mx[j];
        }
    }
    let mut rhs = m.xy.clone();
    for i in 0..d {
        for c in 0..r {
            rhs[i * r + c] -= n * mx[i] * my[c];
        }
    }
    let scale: Vec<f64> = (0..d).map(|i| if standardize { feature_scale((a[i * d + i] / n).max(0.0).sqrt(), mx[i]) } else { 1.0 }).collect();
    for i in 0..d {
        for j in 0..d {
            a[i * d + j] /= scale[i] * scale[j];
        }
        a[i * d + i] += alpha;
        for c in 0..r {
            rhs[i * r + c] /= scale[i];
        }
    }
    solve_spd(&a, d, &mut rhs, r).map_err(|i| format!("the regularised Gram matrix is not positive definite at row {i} (alpha {alpha} too small?)"))?;
    // rhs is w^T [d, r] for the scaled features.
    let mut w = vec![0.0; r * d];
    for i in 0..d {
        for c in 0..r {
            w[c * d + i] = rhs[i * r + c] / scale[i];
        }
    }
    let b = (0..r).map(|c| my[c] - (0..d).map(|i| w[c * d + i] * mx[i]).sum::<f64>()).collect();
    Ok(Ridge { w, b, r, d })
}

/// Fits in the dual (for d > n): w = Xc^T (Xc Xc^T + alpha I)^-1 yc.
#[allow(clippy::too_many_arguments)]
pub fn fit_dual(x: &[f64], y: &[f64], n: usize, d: usize, r: usize, alpha: f64, standardize: bool, parallel: bool) -> Result<Ridge, String> {
    if n == 0 {
        return Err("no training rows".into());
    }
    let mx: Vec<f64> = (0..d).map(|j| x.iter().skip(j).step_by(d).sum::<f64>() / n as f64).collect();
    let my: Vec<f64> = (0..r).map(|c| y.iter().skip(c).step_by(r).sum::<f64>() / n as f64).collect();
    let scale: Vec<f64> = (0..d)
        .map(|j| if standardize { feature_scale((x.iter().skip(j).step_by(d).map(|v| (v - mx[j]).powi(2)).sum::<f64>() / n as f64).sqrt(), mx[j]) } else { 1.0 })
        .collect();
    let xc: Vec<f64> = x.chunks(d).flat_map(|row| row.iter().zip(&mx).zip(&scale).map(|((v, m), s)| (v - m) / s)).collect();
    let mut yc: Vec<f64> = y.chunks(r).flat_map(|row| row.iter().zip(&my).map(|(v, m)| v - m)).collect();
    let mut k = vec![0.0; n * n];
    matmul(&mut k, View::rows(&xc, n, d), View::rows(&xc, n, d).t(), false, parallel);
    for i in 0..n {
        k[i * n + i] += alpha;
    }
    solve_spd(&k, n, &mut yc, r).map_err(|i| format!("the regularised kernel matrix is not positive definite at row {i}"))?; // yc <- dual coefficients [n, r]
    let mut w = vec![0.0; r * d];
    matmul(&mut w, View::rows(&yc, n, r).t(), View::rows(&xc, n, d), false, parallel);
    for row in w.chunks_mut(d) {
        row.iter_mut().zip(&scale).for_each(|(w, s)| *w /= s);
    }
    let b = (0..r).map(|c| my[c] - (0..d).map(|i| w[c * d + i] * mx[i]).sum::<f64>()).collect();
    Ok(Ridge { w, b, r, d })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primal_dual_and_fold_moments_agree() {
        let (n, d, r) = (40, 6, 2);
        let mut uniform = crate::rng::lcg_uniform(3);
        let mut rnd = || uniform() - 0.5;
        let x: Vec<f64> = (0..n * d).map(|_| rnd() + 3.0).collect();
        let y: Vec<f64> = x.chunks(d).flat_map(|row| [row[0] * 2.0 - row[3] + 0.1, row[1] + 5.0]).collect();
        let all = Moments::of(&x, &y, n, d, r, false);
        let primal = fit_moments(&all, 0.5, false).unwrap();
        let dual = fit_dual(&x, &y, n, d, r, 0.5, false, false).unwrap();
        for (a, b) in primal.w.iter().zip(&dual.w).chain(primal.b.iter().zip(&dual.b)) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // Standardised, primal = dual.
        let (ps, ds) = (fit_moments(&all, 0.5, true).unwrap(), fit_dual(&x, &y, n, d, r, 0.5, true, false).unwrap());
        for (a, b) in ps.w.iter().zip(&ds.w).chain(ps.b.iter().zip(&ds.b)) {
            assert!((a - b).abs() < 1e-9, "standardised: {a} vs {b}");
        }
        // Train on rows 10.. via moment subtraction = direct fit.
        let head = Moments::of(&x[..10 * d], &y[..10 * r], 10, d, r, false);
        let via = fit_moments(&all.minus(&head), 0.5, true).unwrap();
        let direct = fit_moments(&Moments::of(&x[10 * d..], &y[10 * r..], n - 10, d, r, false), 0.5, true).unwrap();
        for (a, b) in via.w.iter().zip(&direct.w).chain(via.b.iter().zip(&direct.b)) {
            assert!((a - b).abs() < 1e-8, "{a} vs {b}");
        }
        // Nearly no penalty: the exact linear relation is recovered.
        let exact = fit_moments(&all, 1e-9, false).unwrap();
        assert!((exact.w[0] - 2.0).abs() < 1e-5 && (exact.w[3] + 1.0).abs() < 1e-5 && (exact.b[1] - 5.0).abs() < 1e-4);
    }
}
