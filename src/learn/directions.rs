//! Steering directions from activations: class-mean differences (one-vs-rest or one-vs-a-class)
//! and Wang et al.'s context-averaged differences.
//!
//! Rows are row-major f32 (`[n, d]` activations, `[k, d]` directions); sums and means are
//! computed in f64.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// What a class-mean direction is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versus {
    /// The rows of every other class: mean(x | c) - mean(x | not c).
    Rest,
    /// The rows of one reference class (such as neutral): mean(x | c) - mean(x | reference).
    Class(usize),
}

/// Per-class sums (`[k][d]`, f64) and row counts (`[k]`) of the rows `(row [d], class)`.
fn class_sums<'a>(rows: impl Iterator<Item = (&'a [f32], usize)>, d: usize, k: usize) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut sums = vec![vec![0.0f64; d]; k];
    let mut counts = vec![0usize; k];
    for (row, c) in rows {
        sums[c].iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
        counts[c] += 1;
    }
    (sums, counts)
}

/// Checks that `x` holds one `[d]` row per entry of `classes` and that every class is `< k`.
fn check_rows(x: &[f32], d: usize, classes: &[usize], k: usize) -> Result<()> {
    if x.len() != classes.len() * d {
        return Err(Error::input(format!("{} activation values for {} rows of width {d}", x.len(), classes.len())));
    }
    match classes.iter().position(|&c| c >= k) {
        Some(i) => Err(Error::input(format!("row {i} has class {}, but there are {k} classes", classes[i]))),
        None => Ok(()),
    }
}

/// For each class `c < k`: mean(x | c) minus the mean of the rows `versus` names, over the rows
/// of `x` (`[n, d]`, row `i` of class `classes[i]`). None when class `c` or the rows it is
/// measured against have no row, and for the reference class itself under [`Versus::Class`].
/// Err when the shapes disagree or a class (or the reference) is not below `k`.
pub fn class_mean_directions(x: &[f32], d: usize, classes: &[usize], k: usize, versus: Versus) -> Result<Vec<Option<Vec<f32>>>> {
    check_rows(x, d, classes, k)?;
    if let Versus::Class(r) = versus
        && r >= k
    {
        return Err(Error::input(format!("reference class {r} is out of range ({k} classes)")));
    }
    // sums: [k][d] per-class sums, total: [d]
    let (sums, counts) = class_sums(x.chunks(d).zip(classes.iter().copied()), d, k);
    let total: Vec<f64> = (0..d).map(|j| sums.iter().map(|s| s[j]).sum()).collect();
    let n = classes.len();
    Ok((0..k)
        .map(|c| {
            // The rows subtracted: their count and their sum ([d]).
            let (other_n, other_sum): (usize, Vec<f64>) = match versus {
                Versus::Rest => (n - counts[c], (0..d).map(|j| total[j] - sums[c][j]).collect()),
                Versus::Class(r) => (if r == c { 0 } else { counts[r] }, sums[r].clone()),
            };
            let nc = counts[c];
            (nc > 0 && other_n > 0).then(|| (0..d).map(|j| (sums[c][j] / nc as f64 - other_sum[j] / other_n as f64) as f32).collect())
        })
        .collect())
}

/// Wang et al.'s context-averaged directions: rows of `x` (`[n, d]`) are grouped by scenario
/// (`scenarios[i]`, any ids) and class (`classes[i] < k`); x(s, c) is the mean of the rows of
/// scenario s and class c (usually one). For each class c != `neutral`: x(s, c) - x(s, neutral)
/// averaged over the scenarios s that have both (in scenario id order). None for `neutral` and
/// for classes with no row. Err when a class has rows but no scenario with a neutral row, or
/// when the shapes disagree.
pub fn context_averaged_directions(x: &[f32], d: usize, scenarios: &[usize], classes: &[usize], k: usize, neutral: usize) -> Result<Vec<Option<Vec<f32>>>> {
    check_rows(x, d, classes, k)?;
    if scenarios.len() != classes.len() {
        return Err(Error::input(format!("{} scenario ids for {} rows", scenarios.len(), classes.len())));
    }
    if neutral >= k {
        return Err(Error::input(format!("neutral class {neutral} is out of range ({k} classes)")));
    }
    let mut by_scenario: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    scenarios.iter().enumerate().for_each(|(i, &s)| by_scenario.entry(s).or_default().push(i));
    // acc: [k][d] sums of per-scenario differences; pairs: [k] scenarios summed; seen: [k] rows.
    let mut acc = vec![vec![0.0f64; d]; k];
    let mut pairs = vec![0usize; k];
    let mut seen = vec![false; k];
    for rows in by_scenario.values() {
        let (sums, counts) = class_sums(rows.iter().map(|&i| (&x[i * d..(i + 1) * d], classes[i])), d, k);
        rows.iter().for_each(|&i| seen[classes[i]] = true);
        if counts[neutral] == 0 {
            continue;
        }
        let base: Vec<f64> = sums[neutral].iter().map(|s| s / counts[neutral] as f64).collect();
        for c in (0..k).filter(|&c| c != neutral && counts[c] > 0) {
            acc[c].iter_mut().zip(&sums[c]).zip(&base).for_each(|((a, s), b)| *a += s / counts[c] as f64 - b);
            pairs[c] += 1;
        }
    }
    (0..k)
        .map(|c| match (c == neutral || !seen[c], pairs[c]) {
            (true, _) => Ok(None),
            (false, 0) => Err(Error::input(format!("class {c} has no scenario with a neutral (class {neutral}) row, so it has no context-averaged direction"))),
            (false, m) => Ok(Some(acc[c].iter().map(|a| (a / m as f64) as f32).collect())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian;

    /// `[rows, d]` standard normal draws of stream `seed`.
    fn normals(seed: u64, rows: usize, d: usize) -> Vec<f32> {
        (0..rows * d).map(|e| gaussian(seed, (e / d) as u64, (e % d) as u64)).collect()
    }

    #[test]
    fn class_mean_directions_against_a_class() {
        let (n, d, k) = (40, 6, 4);
        let x = normals(41, n, d);
        let classes: Vec<usize> = (0..n).map(|i| if i < 36 { i % 3 } else { 1 }).collect(); // class 3 is empty
        let mean = |c: usize| -> Vec<f64> {
            let rows: Vec<usize> = (0..n).filter(|&i| classes[i] == c).collect();
            (0..d).map(|j| rows.iter().map(|&i| x[i * d + j] as f64).sum::<f64>() / rows.len() as f64).collect()
        };
        let dirs = class_mean_directions(&x, d, &classes, k, Versus::Class(2)).unwrap();
        assert!(dirs[2].is_none() && dirs[3].is_none());
        for c in [0, 1] {
            let (a, b) = (mean(c), mean(2));
            let got = dirs[c].as_ref().unwrap();
            assert!((0..d).all(|j| (got[j] as f64 - (a[j] - b[j])).abs() < 1e-6), "class {c}: {got:?}");
        }
        // Against an empty class: nothing; against the rest, the empty class still has none.
        assert!(class_mean_directions(&x, d, &classes, k, Versus::Class(3)).unwrap().iter().all(Option::is_none));
        assert!(class_mean_directions(&x, d, &classes, k, Versus::Rest).unwrap()[3].is_none());
        let msg = |r: Result<Vec<Option<Vec<f32>>>>| r.unwrap_err().to_string();
        assert_eq!(msg(class_mean_directions(&x, d, &classes, k, Versus::Class(4))), "reference class 4 is out of range (4 classes)");
        assert_eq!(msg(class_mean_directions(&x, d, &classes, 2, Versus::Rest)), "row 2 has class 2, but there are 2 classes");
        assert_eq!(msg(class_mean_directions(&x[1..], d, &classes, k, Versus::Rest)), "239 activation values for 40 rows of width 6");
    }

    #[test]
    fn context_averaged_directions_by_hand() {
        // (scenario, class, row): neutral is class 0; class 3 has no row.
        let rows: [(usize, usize, [f32; 2]); 8] = [
            (7, 0, [1.0, 1.0]),
            (7, 1, [3.0, 0.0]),
            (7, 2, [0.0, 5.0]),
            (2, 1, [1.0, 2.0]),
            (2, 0, [0.0, 0.0]),
            (2, 1, [3.0, 2.0]), // scenario 2's class 1 is the mean (2, 2)
            (9, 2, [100.0, 100.0]), // no neutral in scenario 9: not used
            (4, 2, [2.0, 3.0]),
        ];
        let mut rows = rows.to_vec();
        rows.push((4, 0, [2.0, 2.0]));
        let x: Vec<f32> = rows.iter().flat_map(|r| r.2).collect();
        let scenarios: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let classes: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let dirs = context_averaged_directions(&x, 2, &scenarios, &classes, 4, 0).unwrap();
        // class 1: scenario 2 (2, 2) - (0, 0), scenario 7 (3, 0) - (1, 1): mean (2, 0.5)
        // class 2: scenario 4 (2, 3) - (2, 2), scenario 7 (0, 5) - (1, 1): mean (-0.5, 2.5)
        assert_eq!(dirs, vec![None, Some(vec![2.0, 0.5]), Some(vec![-0.5, 2.5]), None]);
        // A class whose only rows are in a scenario without a neutral row.
        let mut lone = classes.clone();
        lone[6] = 3;
        let msg = context_averaged_directions(&x, 2, &scenarios, &lone, 4, 0).unwrap_err().to_string();
        assert_eq!(msg, "class 3 has no scenario with a neutral (class 0) row, so it has no context-averaged direction");
        assert!(context_averaged_directions(&x, 2, &scenarios[1..], &classes, 4, 0).unwrap_err().to_string().contains("8 scenario ids for 9 rows"));
        assert!(context_averaged_directions(&x, 2, &scenarios, &classes, 4, 4).unwrap_err().to_string().contains("neutral class 4 is out of range"));
    }
}
