//! Evaluation metrics with seeded bootstrap confidence intervals.

use rand::Rng;

use crate::rng::chacha;

/// Fraction of equal pairs.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// Coefficient of determination, 1 - SS_res / SS_tot (scikit-learn's r2_score: 1 when both
/// are 0, 0 when only SS_tot is).
pub fn r2(pred: &[f64], gold: &[f64]) -> f64 {
    let n = gold.len() as f64;
    if gold.is_empty() {
        return f64::NAN;
    }
    let mean = gold.iter().sum::<f64>() / n;
    let ss_tot: f64 = gold.iter().map(|y| (y - mean).powi(2)).sum();
    let ss_res: f64 = pred.iter().zip(gold).map(|(p, y)| (y - p).powi(2)).sum();
    if ss_tot == 0.0 {
        return if ss_res == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - ss_res / ss_tot
}

/// 95% percentile bootstrap interval of `metric` over resampled example indices.
pub fn bootstrap_ci(n: usize, seed: u64, resamples: usize, metric: impl Fn(&[usize]) -> f64) -> (f64, f64) {
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = chacha(seed);
    let mut idx = vec![0usize; n];
    let mut vals: Vec<f64> = (0..resamples)
        .map(|_| {
            idx.iter_mut().for_each(|i| *i = rng.random_range(0..n));
            metric(&idx)
        })
        .filter(|v| v.is_finite())
        .collect();
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    vals.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| vals[((vals.len() - 1) as f64 * f).round() as usize];
    (q(0.025), q(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_and_interval() {
        assert_eq!(accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]), 0.75);
        assert!((r2(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((r2(&[2.0, 2.0, 2.0], &[1.0, 2.0, 3.0])).abs() < 1e-12);
        let pred: Vec<usize> = (0..200).map(|i| usize::from(i % 4 == 0)).collect();
        let gold = vec![0usize; 200];
        let (lo, hi) = bootstrap_ci(200, 1, 500, |idx| idx.iter().filter(|&&i| pred[i] == gold[i]).count() as f64 / idx.len() as f64);
        assert!(lo < 0.75 && 0.75 < hi && hi - lo < 0.15, "{lo} {hi}");
    }
}
