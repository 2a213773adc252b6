//! Regularisation strengths of the probes: one fixed value, or a grid chosen by inner
//! cross-validation on the training rows only, as scikit-learn's `GridSearchCV` (and so
//! `RidgeCV(cv=...)` / `LogisticRegressionCV`) chooses: every grid value is fitted on each inner
//! fold's training rows and scored on its held-out rows, and the value of the best mean score
//! wins, the first in grid order on a tie. Means that differ only by rounding (1e-12 relative:
//! the same fold scores summed in another order) are ties; scikit-learn compares the rounded
//! means exactly, so on such ties the two may pick different values of equal score.

use serde::Serialize;

use crate::{Error, Result};

/// The grid of `--C auto`: 10^-3 .. 10^2.
pub const C_GRID: [f64; 6] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];
/// The grid of `--alpha auto`: 10^-1 .. 10^5 (on standardised features the penalty that suits
/// a few hundred to a few thousand features lies well above scikit-learn's default range).
pub const ALPHA_GRID: [f64; 7] = [1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5];

/// A regularisation strength. Serialised as the number or the grid's list.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Penalty {
    Fixed(f64),
    /// Chosen per fit by inner cross-validation; ascending, distinct, at least two values.
    Grid(Vec<f64>),
}

impl Penalty {
    /// Parses `--NAME`: a positive number, `auto` (the default grid), or a comma-separated grid.
    pub fn parse(name: &str, text: &str, default_grid: &[f64]) -> Result<Penalty> {
        let bad = |why: &str| Error::input(format!("--{name} {text}: {why}; give a positive number, `auto` (the grid {}), or a comma-separated grid", describe_grid(default_grid)));
        let text_t = text.trim();
        if text_t.eq_ignore_ascii_case("auto") {
            return Ok(Penalty::Grid(default_grid.to_vec()));
        }
        let mut values = Vec::new();
        for part in text_t.split(',') {
            let v: f64 = part.trim().parse().map_err(|_| bad(&format!("`{}` is not a number", part.trim())))?;
            if !v.is_finite() || v <= 0.0 {
                return Err(bad(&format!("{v} is not a positive finite number")));
            }
            values.push(v);
        }
        values.sort_by(f64::total_cmp);
        values.dedup();
        Ok(if let [v] = values[..] { Penalty::Fixed(v) } else { Penalty::Grid(values) })
    }

    /// The values to try (one when fixed).
    pub fn values(&self) -> &[f64] {
        match self {
            Penalty::Fixed(v) => std::slice::from_ref(v),
            Penalty::Grid(g) => g,
        }
    }

    pub fn is_grid(&self) -> bool {
        matches!(self, Penalty::Grid(_))
    }

    /// `1` or `auto[0.1,1,10]`.
    pub fn describe(&self) -> String {
        match self {
            Penalty::Fixed(v) => v.to_string(),
            Penalty::Grid(g) => format!("auto{}", describe_grid(g)),
        }
    }
}

fn describe_grid(g: &[f64]) -> String {
    format!("[{}]", g.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","))
}

/// The grid index of the best mean score, the first on a tie (within rounding). `scores[g][f]`:
/// grid value g on inner fold f (higher is better).
pub fn best_index(scores: &[Vec<f64>]) -> usize {
    let mean = |s: &Vec<f64>| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let mut best = 0;
    for g in 1..scores.len() {
        let (m, b) = (mean(&scores[g]), mean(&scores[best]));
        if m - b > 1e-12 * b.abs().max(1e-300) {
            best = g;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_auto_and_grids_and_refuses_the_rest() {
        assert_eq!(Penalty::parse("C", "0.5", &C_GRID).unwrap(), Penalty::Fixed(0.5));
        assert_eq!(Penalty::parse("C", "auto", &C_GRID).unwrap(), Penalty::Grid(C_GRID.to_vec()));
        assert_eq!(Penalty::parse("alpha", "10, 1,10", &ALPHA_GRID).unwrap(), Penalty::Grid(vec![1.0, 10.0]));
        assert_eq!(Penalty::parse("alpha", "3,3", &ALPHA_GRID).unwrap(), Penalty::Fixed(3.0));
        for bad in ["-1", "0", "nan", "inf", "1,,2", "x", "", "1,-2"] {
            let e = Penalty::parse("C", bad, &C_GRID).unwrap_err().to_string();
            assert!(e.contains(&format!("--C {bad}")) && !e.contains('\n'), "{bad}: {e}");
        }
        assert_eq!(serde_json::to_string(&Penalty::Fixed(2.0)).unwrap(), "2.0");
        assert_eq!(serde_json::to_string(&Penalty::Grid(vec![1.0, 2.0])).unwrap(), "[1.0,2.0]");
    }

    #[test]
    fn best_index_takes_the_best_mean_and_the_first_on_ties() {
        assert_eq!(best_index(&[vec![0.5, 0.5], vec![0.9, 0.3], vec![0.7, 0.4]]), 1);
        assert_eq!(best_index(&[vec![0.6, 0.4], vec![0.5, 0.5], vec![0.4, 0.4]]), 0);
        assert_eq!(best_index(&[vec![1.0]]), 0);
        // The same fold scores in another order: a tie, whatever the rounding of the sums.
        let (a, b, c) = (0.1, 0.7, 0.2);
        assert_eq!(best_index(&[vec![a, b, c], vec![c, a, b], vec![b, c, a]]), 0);
        assert_eq!(best_index(&[vec![-2.5, -2.5], vec![-2.4999, -2.5]]), 1);
    }
}
