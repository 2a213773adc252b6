//! Seeded evaluation splits, stratified by class when there are classes.
//!
//! A split is `test_fold` per example, as scikit-learn's PredefinedSplit reads it: k-fold gives
//! each example its fold 0..k; held-out gives 0 to test examples and -1 to training examples
//! (one fold). Within each class the examples are shuffled (ChaCha8, seeded) and dealt round
//! robin over the folds, continuing the deal across classes so folds stay balanced.

use rand::seq::SliceRandom;

use crate::rng::chacha;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Eval {
    KFold(usize),
    /// Fraction of each class held out for testing.
    Holdout(f64),
}

impl Eval {
    pub fn describe(&self) -> String {
        match self {
            Eval::KFold(k) => format!("{k}-fold"),
            Eval::Holdout(f) => format!("held-out {f}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Split {
    pub eval: Eval,
    pub seed: u64,
    /// Per example: fold (k-fold), or 0 = test / -1 = train (held-out).
    pub test_fold: Vec<i64>,
    pub n_folds: usize,
}

impl Split {
    /// Splits n examples; `classes` (one per example) stratifies when given.
    pub fn new(n: usize, classes: Option<&[usize]>, eval: Eval, seed: u64) -> Result<Split> {
        let mut rng = chacha(seed);
        let groups: Vec<Vec<usize>> = match classes {
            Some(c) => {
                let k = c.iter().max().map_or(0, |m| m + 1);
                let mut g = vec![Vec::new(); k];
                for (i, &ci) in c.iter().enumerate() {
                    g[ci].push(i);
                }
                g.into_iter().filter(|g| !g.is_empty()).collect()
            }
            None => vec![(0..n).collect()],
        };
        let mut test_fold = vec![-1i64; n];
        match eval {
            Eval::KFold(k) => {
                if k < 2 {
                    return Err(Error::input(format!("--folds {k}: need at least 2")));
                }
                if n < k {
                    return Err(Error::input(format!("{k}-fold evaluation needs at least {k} examples; there are {n}")));
                }
                let mut next = 0usize;
                for mut g in groups {
                    g.shuffle(&mut rng);
                    for i in g {
                        test_fold[i] = (next % k) as i64;
                        next += 1;
                    }
                }
                Ok(Split { eval, seed, test_fold, n_folds: k })
            }
            Eval::Holdout(f) => {
                if f.is_nan() || f <= 0.0 || f >= 1.0 {
                    return Err(Error::input(format!("--test-fraction {f}: must be between 0 and 1")));
                }
                for mut g in groups {
                    g.shuffle(&mut rng);
                    let n_test = if g.len() < 2 { 0 } else { ((g.len() as f64 * f).round() as usize).clamp(1, g.len() - 1) };
                    for &i in &g[..n_test] {
                        test_fold[i] = 0;
                    }
                }
                if test_fold.iter().all(|&f| f < 0) {
                    return Err(Error::input(format!("held-out evaluation of {n} examples leaves no test example")));
                }
                Ok(Split { eval, seed, test_fold, n_folds: 1 })
            }
        }
    }

    /// (train, test) indices of fold f.
    pub fn fold(&self, f: usize) -> (Vec<usize>, Vec<usize>) {
        let mut train = Vec::new();
        let mut test = Vec::new();
        for (i, &t) in self.test_fold.iter().enumerate() {
            if t == f as i64 { test.push(i) } else { train.push(i) }
        }
        (train, test)
    }

    /// Every fit of this evaluation: each fold (k-fold; fold 0 is the training part of
    /// held-out), then, for k-fold, None: the refit on every example.
    pub fn fits(&self) -> Vec<Option<usize>> {
        (0..self.n_folds).map(Some).chain(matches!(self.eval, Eval::KFold(_)).then_some(None)).collect()
    }

    /// (train, test) indices of fit `fold`: [`Split::fold`], or every example and no test for
    /// None.
    pub fn fit_rows(&self, fold: Option<usize>) -> (Vec<usize>, Vec<usize>) {
        match fold {
            Some(f) => self.fold(f),
            None => ((0..self.test_fold.len()).collect(), Vec::new()),
        }
    }

    /// The training rows of fit `fold` (None: every example, the model k-fold evaluation
    /// refits on all of them) and their inner k-fold split, stratified by class when `classes`
    /// (one per example) are given, seeded from this split's seed and the fit. The inner
    /// split's examples are the training rows in order: `inner.test_fold[j]` belongs to
    /// `train[j]`. Used to choose a penalty on the training rows only.
    pub fn inner(&self, fold: Option<usize>, classes: Option<&[usize]>, k: usize) -> Result<(Vec<usize>, Split)> {
        let train = self.fit_rows(fold).0;
        let sub: Option<Vec<usize>> = classes.map(|c| train.iter().map(|&i| c[i]).collect());
        let seed = self.seed ^ 0x5bd1_e995_u64.wrapping_mul(fold.map_or(0, |f| f as u64 + 1));
        let inner = Split::new(train.len(), sub.as_deref(), Eval::KFold(k), seed)
            .map_err(|e| Error::input(format!("choosing --C/--alpha by inner cross-validation: {e}")))?;
        Ok((train, inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified_balanced_and_seeded() {
        let classes: Vec<usize> = (0..103).map(|i| if i < 60 { 0 } else if i < 90 { 1 } else { 2 }).collect();
        let s = Split::new(103, Some(&classes), Eval::KFold(5), 7).unwrap();
        assert_eq!(s, Split::new(103, Some(&classes), Eval::KFold(5), 7).unwrap());
        assert_ne!(s.test_fold, Split::new(103, Some(&classes), Eval::KFold(5), 8).unwrap().test_fold);
        for f in 0..5 {
            let (train, test) = s.fold(f);
            assert_eq!(train.len() + test.len(), 103);
            assert!((20..=21).contains(&test.len()), "fold {f}: {}", test.len());
            assert_eq!(test.iter().filter(|&&i| classes[i] == 0).count(), 12);
        }
        let h = Split::new(103, Some(&classes), Eval::Holdout(0.2), 0).unwrap();
        assert_eq!(h.fold(0).1.len(), 12 + 6 + 3);
        assert!(Split::new(3, None, Eval::KFold(5), 0).is_err());
    }
}
