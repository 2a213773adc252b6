//! Steering directions from activations: class-mean differences (one-vs-rest or one-vs-a-class).
//!
//! Rows are row-major f32 (`[n, d]` activations, `[k, d]` directions); sums and means are
//! computed in f64.

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
}
