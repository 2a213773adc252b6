//! Multinomial logistic regression with an L2 penalty, fitted by L-BFGS: the model and
//! objective of scikit-learn's `LogisticRegression(C=C)` (lbfgs, multinomial, intercept not
//! penalised), so the two agree on the same data:
//!
//!   minimise  (1/n) sum_i [logsumexp(z_i) - z_i[y_i]] + ||W||^2 / (2 C n),   z_i = W x_i + b
//!
//! with K weight vectors (the symmetric parametrisation). Features are f32 and the two GEMMs
//! per evaluation run in f32; the loss, gradient bookkeeping and L-BFGS state are f64.

use super::linalg::{View, matmul};
use crate::logits::argmax;

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LogRegParams {
    pub max_iter: usize,
    /// Stop when the largest gradient component is below this.
    pub tol: f64,
}

impl Default for LogRegParams {
    fn default() -> Self {
        LogRegParams { max_iter: 500, tol: 1e-5 }
    }
}

/// A fitted model: `z = W x + b`.
#[derive(Clone, Debug)]
pub struct LogReg {
    /// [k, d]
    pub w: Vec<f32>,
    /// [k]
    pub b: Vec<f32>,
    pub k: usize,
    pub d: usize,
    pub iterations: usize,
    pub converged: bool,
}

impl LogReg {
    /// Scores `[n, k]` of x `[n, d]`.
    pub fn decision(&self, x: &[f32], n: usize, parallel: bool) -> Vec<f32> {
        let mut z = vec![0.0f32; n * self.k];
        matmul(&mut z, View::rows(x, n, self.d), View::rows(&self.w, self.k, self.d).t(), false, parallel);
        for row in z.chunks_mut(self.k) {
            row.iter_mut().zip(&self.b).for_each(|(z, b)| *z += b);
        }
        z
    }

    /// The argmax class of each row (ties to the lowest index, as numpy's argmax).
    pub fn predict(&self, x: &[f32], n: usize, parallel: bool) -> Vec<usize> {
        self.decision(x, n, parallel).chunks(self.k).map(argmax).collect()
    }
}

/// The objective and its gradient at `theta` = [W (k*d), b (k)].
struct Problem<'a> {
    x: &'a [f32],
    y: &'a [usize],
    n: usize,
    d: usize,
    k: usize,
    /// 1 / (C n)
    l2: f64,
    parallel: bool,
    evals: usize,
}

impl Problem<'_> {
    fn eval(&mut self, theta: &[f64], grad: &mut [f64]) -> f64 {
        self.evals += 1;
        let (n, d, k) = (self.n, self.d, self.k);
        let w: Vec<f32> = theta[..k * d].iter().map(|&v| v as f32).collect();
        let b = &theta[k * d..];
        let mut z = vec![0.0f32; n * k]; // [n, k]
        matmul(&mut z, View::rows(self.x, n, d), View::rows(&w, k, d).t(), false, self.parallel);
        let mut loss = 0.0f64;
        let inv_n = 1.0 / n as f64;
        let mut gb = vec![0.0f64; k];
        // z <- (softmax(z) - onehot(y)) / n, in place (f32 for the GEMM).
        for (i, row) in z.chunks_mut(k).enumerate() {
            let zz: Vec<f64> = row.iter().zip(b).map(|(&z, &b)| z as f64 + b).collect();
            let m = zz.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = zz.iter().map(|v| (v - m).exp()).sum();
            let lse = m + s.ln();
            loss += lse - zz[self.y[i]];
            for c in 0..k {
                let p = (zz[c] - lse).exp() - if c == self.y[i] { 1.0 } else { 0.0 };
                let g = p * inv_n;
                gb[c] += g;
                row[c] = g as f32;
            }
        }
        loss *= inv_n;
        // dW = G^T X + l2 W
        let mut gw = vec![0.0f32; k * d];
        matmul(&mut gw, View::rows(&z, n, k).t(), View::rows(self.x, n, d), false, self.parallel);
        let mut reg = 0.0f64;
        for i in 0..k * d {
            reg += theta[i] * theta[i];
            grad[i] = gw[i] as f64 + self.l2 * theta[i];
        }
        grad[k * d..].copy_from_slice(&gb);
        loss + 0.5 * self.l2 * reg
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// Fits on x `[n, d]` with classes `y` in `0..k` and inverse regularisation strength `c`
/// (scikit-learn's C). Every class should occur at least once.
pub fn fit(x: &[f32], y: &[usize], n: usize, d: usize, k: usize, c: f64, params: &LogRegParams, parallel: bool) -> LogReg {
    assert_eq!(x.len(), n * d);
    assert_eq!(y.len(), n);
    let dim = k * d + k;
    let mut prob = Problem { x, y, n, d, k, l2: 1.0 / (c * n as f64), parallel, evals: 0 };
    let mut theta = vec![0.0f64; dim];
    let mut g = vec![0.0f64; dim];
    let mut f = prob.eval(&theta, &mut g);
    // L-BFGS history.
    const M: usize = 10;
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut rho: Vec<f64> = Vec::new();
    let mut converged = max_abs(&g) <= params.tol;
    let mut iterations = 0;
    let mut g_new = vec![0.0f64; dim];
    let mut theta_new = vec![0.0f64; dim];
    while !converged && iterations < params.max_iter {
        iterations += 1;
        // Direction: -H g by the two-loop recursion.
        let mut q = g.clone();
        let mut alpha = vec![0.0f64; s_hist.len()];
        for i in (0..s_hist.len()).rev() {
            alpha[i] = rho[i] * dot(&s_hist[i], &q);
            q.iter_mut().zip(&y_hist[i]).for_each(|(q, y)| *q -= alpha[i] * y);
        }
        let gamma = match (s_hist.last(), y_hist.last()) {
            (Some(s), Some(y)) => dot(s, y) / dot(y, y),
            _ => 1.0 / max_abs(&g).max(1e-12).max(dot(&g, &g).sqrt()),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for i in 0..s_hist.len() {
            let beta = rho[i] * dot(&y_hist[i], &q);
            q.iter_mut().zip(&s_hist[i]).for_each(|(q, s)| *q += (alpha[i] - beta) * s);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &dir);
        if slope.is_nan() || slope >= 0.0 {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        // Backtracking line search (Armijo), with one extrapolation try when the full step is
        // accepted and the curvature is still strongly negative.
        let mut step = 1.0f64;
        let mut f_new;
        let mut tries = 0;
        loop {
            theta_new.iter_mut().zip(&theta).zip(&dir).for_each(|((t, x), d)| *t = x + step * d);
            f_new = prob.eval(&theta_new, &mut g_new);
            if f_new.is_finite() && f_new <= f + 1e-4 * step * slope {
                break;
            }
            tries += 1;
            if tries > 40 {
                break;
            }
            // Quadratic interpolation, kept within [0.1, 0.5] of the step.
            let denom = 2.0 * (f_new - f - slope * step);
            let t = if denom > 0.0 && f_new.is_finite() { -slope * step * step / denom } else { 0.5 * step };
            step = t.clamp(0.1 * step, 0.5 * step);
        }
        if tries > 40 {
            break; // no decrease possible at machine precision: as converged as it gets
        }
        let s: Vec<f64> = theta_new.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &yv);
        std::mem::swap(&mut theta, &mut theta_new);
        std::mem::swap(&mut g, &mut g_new);
        let f_old = f;
        f = f_new;
        if sy > 1e-12 * dot(&yv, &yv).max(1e-300) {
            if s_hist.len() == M {
                s_hist.remove(0);
                y_hist.remove(0);
                rho.remove(0);
            }
            rho.push(1.0 / sy);
            s_hist.push(s);
            y_hist.push(yv);
        }
        converged = max_abs(&g) <= params.tol || (f_old - f).abs() <= 1e-15 * f.abs().max(1.0);
    }
    LogReg { w: theta[..k * d].iter().map(|&v| v as f32).collect(), b: theta[k * d..].iter().map(|&v| v as f32).collect(), k, d, iterations, converged }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_gaussian_blobs_and_reaches_a_stationary_point() {
        // Three classes around distinct centres in 5 dimensions.
        let (n, d, k) = (300, 5, 3);
        let mut uniform = crate::rng::lcg_uniform(42);
        let mut rnd = || uniform() as f32 - 0.5;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % k;
            y.push(c);
            for j in 0..d {
                x.push(rnd() * 2.0 + if j == c { 1.5 } else { 0.0 });
            }
        }
        let m = fit(&x, &y, n, d, k, 1.0, &LogRegParams { max_iter: 1000, tol: 1e-7 }, false);
        assert!(m.converged, "not converged after {} iterations", m.iterations);
        let acc = m.predict(&x, n, false).iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / n as f64;
        assert!(acc > 0.8, "training accuracy {acc}");
        // Stationarity: the gradient of the objective vanishes.
        let mut p = Problem { x: &x, y: &y, n, d, k, l2: 1.0 / n as f64, parallel: false, evals: 0 };
        let theta: Vec<f64> = m.w.iter().chain(&m.b).map(|&v| v as f64).collect();
        let mut g = vec![0.0; theta.len()];
        p.eval(&theta, &mut g);
        assert!(max_abs(&g) < 1e-5, "gradient {}", max_abs(&g));
    }
}
