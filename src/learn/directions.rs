//! Steering directions from activations: class-mean differences (one-vs-rest or one-vs-a-class),
//! Wang et al.'s context-averaged differences, Tak et al.'s unique-effect vectors, and the
//! orthogonal projector onto a subspace with the update x <- x - beta P x + v that uses it.
//!
//! Rows are row-major f32 (`[n, d]` activations, `[k, d]` directions); sums, means and the QR
//! factorisations are computed in f64.

use std::collections::BTreeMap;

use faer::{Mat, MatRef};

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

/// A direction whose component orthogonal to the directions before it is at most this fraction
/// of its norm counts as linearly dependent on them (f32 inputs: well above their rounding).
pub const RANK_TOL: f64 = 1e-5;

/// How errors name direction `i` of a set (`direction 3`, or a caller's name such as `` `joy` ``).
type Label<'a> = &'a dyn Fn(usize) -> String;

/// Directions named by their index.
fn by_index(i: usize) -> String {
    format!("direction {i}")
}

/// The directions (`[k, d]` row-major f32) as the columns of a `[d, k]` f64 matrix, after
/// checking the shape, 1 <= k <= d, and that every value is finite and no direction is zero.
fn columns(directions: &[f32], d: usize, label: Label) -> Result<Mat<f64>> {
    if d == 0 || !directions.len().is_multiple_of(d) {
        return Err(Error::input(format!("{} direction values are not whole rows of width {d}", directions.len())));
    }
    let k = directions.len() / d;
    if k == 0 || k > d {
        return Err(Error::input(format!("{k} directions of width {d}: need between 1 and {d} (more than {d} are linearly dependent)")));
    }
    for (i, v) in directions.chunks(d).enumerate() {
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::input(format!("{} holds a non-finite value ({}) at element {j}", label(i), v[j])));
        }
        if v.iter().all(|&x| x == 0.0) {
            return Err(Error::input(format!("{} is zero", label(i))));
        }
    }
    Ok(Mat::from_fn(d, k, |r, c| directions[c * d + r] as f64))
}

/// The thin Q (`[d, k]`, orthonormal columns spanning the columns of `a` `[d, k]`) of the QR
/// factorisation a = Q R. Err(j) for the first column whose component orthogonal to the columns
/// before it (|R_jj|) is within [`RANK_TOL`] of its norm: the columns are linearly dependent.
fn orthonormal_basis(a: MatRef<f64>) -> std::result::Result<Mat<f64>, usize> {
    let qr = a.qr();
    let r = qr.thin_R();
    match (0..a.ncols()).find(|&j| r[(j, j)].abs() <= RANK_TOL * a.col(j).norm_l2()) {
        Some(j) => Err(j),
        None => Ok(qr.compute_thin_Q()),
    }
}

/// The error for direction `i` lying (within [`RANK_TOL`]) in the span of the others.
fn dependent(i: usize, label: Label) -> Error {
    Error::input(format!("directions are linearly dependent: {} lies in the span of the directions before it", label(i)))
}

/// Tak et al.'s unique-effect vectors: each of the `k` directions (`[k, d]` row-major, k <= d)
/// projected onto the orthogonal complement of the span of the other k - 1, u_i = v_i - Q Q^T v_i
/// with Q the thin Q of the others' QR factorisation. Returns `[k, d]`. Err naming a direction
/// when they are linearly dependent (rank < k), on a zero or non-finite direction, k > d, or a
/// length that is not whole rows.
pub fn unique_effect(directions: &[f32], d: usize) -> Result<Vec<f32>> {
    unique_effect_labelled(directions, d, &by_index).map(|u| u.vectors)
}

/// A set's unique-effect vectors and the subspace it spans.
#[derive(Clone, Debug, PartialEq)]
pub struct UniqueEffect {
    /// `[k, d]`: row i is direction i's unique effect (see [`unique_effect`]).
    pub vectors: Vec<f32>,
    /// `[k, d]`: orthonormal rows spanning the directions (the thin Q of their QR factorisation,
    /// transposed); [`projector`] of it is the projector onto the set's span.
    pub basis: Vec<f32>,
}

/// [`unique_effect`] and an orthonormal basis of the set's span, with errors naming the
/// directions by `names` (one per direction: `` `joy` is zero ``, `` `joy` lies in the span of
/// the directions before it ``).
pub fn unique_effect_named(directions: &[f32], d: usize, names: &[String]) -> Result<UniqueEffect> {
    if directions.len() != names.len() * d {
        return Err(Error::input(format!("{} direction values for {} names of width {d}", directions.len(), names.len())));
    }
    unique_effect_labelled(directions, d, &|i| format!("`{}`", names[i]))
}

fn unique_effect_labelled(directions: &[f32], d: usize, label: Label) -> Result<UniqueEffect> {
    let a = columns(directions, d, label)?;
    let k = a.ncols();
    let q_all = orthonormal_basis(a.as_ref()).map_err(|j| dependent(j, label))?;
    let mut vectors = Vec::with_capacity(k * d);
    for i in 0..k {
        // others: [d, k - 1], the columns of a but column i
        let others = Mat::from_fn(d, k - 1, |r, c| a[(r, if c < i { c } else { c + 1 })]);
        // Independent, as all k are: a subset's residuals are no smaller than the whole set's.
        let q = orthonormal_basis(others.as_ref()).map_err(|j| dependent(if j < i { j } else { j + 1 }, label))?;
        let v = a.col(i);
        let u = v - &q * (q.transpose() * v);
        vectors.extend(u.iter().map(|&x| x as f32));
    }
    let basis = (0..k * d).map(|e| q_all[(e % d, e / d)] as f32).collect();
    Ok(UniqueEffect { vectors, basis })
}

/// The orthogonal projection P (`[d, d]` row-major) onto the span of the `k` directions
/// (`[k, d]` row-major, k <= d): P = Q Q^T with Q the thin Q of their QR factorisation. This is
/// the `p` of [`crate::intervene::Op::ProjectSet`]. Err as [`unique_effect`] on dependent, zero
/// or non-finite directions.
pub fn projector(directions: &[f32], d: usize) -> Result<Vec<f32>> {
    let a = columns(directions, d, &by_index)?;
    let q = orthonormal_basis(a.as_ref()).map_err(|j| dependent(j, &by_index))?;
    let p = &q * q.transpose();
    Ok((0..d * d).map(|e| p[(e / d, e % d)] as f32).collect())
}

/// Tak et al.'s update on every row of `x` (`[n, d]`): x <- x - beta P x + v, with P `[d, d]`
/// row-major (a projector, see [`projector`]) and v `[d]`. The reference semantics of
/// [`crate::intervene::Op::ProjectSet`] (its `apply_op` calls this with one row). Panics when
/// the shapes disagree (a programming error: callers check operands first); width 0 (an empty
/// selection, x empty) is a no-op.
pub fn project_set(x: &mut [f32], d: usize, beta: f32, p: &[f32], v: &[f32]) {
    assert!(x.len().is_multiple_of(d) && p.len() == d * d && v.len() == d, "project_set: x has {} values, P {}, v {}, width {d}", x.len(), p.len(), v.len());
    for x in x.chunks_mut(d.max(1)) {
        // px: [d]
        let px: Vec<f32> = (0..d).map(|i| p[i * d..(i + 1) * d].iter().zip(x.iter()).map(|(a, b)| a * b).sum()).collect();
        for i in 0..d {
            x[i] = x[i] - beta * px[i] + v[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian;

    /// `[rows, d]` standard normal draws of stream `seed`.
    fn normals(seed: u64, rows: usize, d: usize) -> Vec<f32> {
        (0..rows * d).map(|e| gaussian(seed, (e / d) as u64, (e % d) as u64)).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn norm(a: &[f32]) -> f64 {
        dot(a, a).sqrt()
    }

    /// P (`[d, d]`) times x (`[d]`), in f64.
    fn apply(p: &[f32], x: &[f32]) -> Vec<f32> {
        p.chunks(x.len()).map(|row| dot(row, x) as f32).collect()
    }

    /// The component of `w` orthogonal to the rows of `v` (`[k, d]`), by modified Gram-Schmidt in
    /// f64: an independent construction of vectors P must send to zero.
    fn orthogonal_part(v: &[f32], d: usize, w: &[f32]) -> Vec<f32> {
        let mut basis: Vec<Vec<f64>> = Vec::new();
        for row in v.chunks(d) {
            let mut e: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            for b in &basis {
                let c: f64 = e.iter().zip(b).map(|(x, y)| x * y).sum();
                e.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
            }
            let n = e.iter().map(|x| x * x).sum::<f64>().sqrt();
            basis.push(e.into_iter().map(|x| x / n).collect());
        }
        let mut r: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        for b in &basis {
            let c: f64 = r.iter().zip(b).map(|(x, y)| x * y).sum();
            r.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
        }
        r.into_iter().map(|x| x as f32).collect()
    }

    /// (k, d, seed) of the random direction sets, k = 1 and k = d included.
    const SHAPES: [(usize, usize, u64); 6] = [(1, 3, 11), (2, 2, 12), (3, 8, 13), (6, 64, 14), (17, 40, 15), (24, 24, 16)];

    #[test]
    fn unique_effect_vectors_are_orthogonal_to_the_other_directions() {
        for (k, d, seed) in SHAPES {
            let v = normals(seed, k, d);
            let u = unique_effect(&v, d).unwrap();
            assert_eq!(u.len(), k * d);
            for i in 0..k {
                let ui = &u[i * d..(i + 1) * d];
                for j in (0..k).filter(|&j| j != i) {
                    let vj = &v[j * d..(j + 1) * d];
                    let cos = dot(ui, vj) / (norm(ui) * norm(vj));
                    assert!(cos.abs() < 1e-5, "k {k} d {d}: unique effect {i} . direction {j} has cosine {cos}");
                }
                assert!(dot(ui, &v[i * d..(i + 1) * d]) > 0.0, "k {k} d {d}: unique effect {i} points away from its direction");
                // v_i - u_i lies in the span of the others: the projector onto them keeps it.
                let others: Vec<f32> = (0..k).filter(|&j| j != i).flat_map(|j| v[j * d..(j + 1) * d].iter().copied()).collect();
                let removed: Vec<f32> = v[i * d..(i + 1) * d].iter().zip(ui).map(|(a, b)| a - b).collect();
                if k > 1 {
                    let back = apply(&projector(&others, d).unwrap(), &removed);
                    let err = back.iter().zip(&removed).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(err < 1e-5 * norm(&v[i * d..(i + 1) * d]) as f32, "k {k} d {d}: v_{i} - u_{i} leaves the span of the others by {err}");
                } else {
                    assert!(removed.iter().all(|&x| x == 0.0), "one direction is its own unique effect");
                }
            }
        }
    }

    #[test]
    fn unique_effect_of_two_directions_in_the_plane() {
        // v0 = e0, v1 = e0 + e1: u0 = e0 - (e0 + e1) / 2, u1 = e1.
        let u = unique_effect(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0], 3).unwrap();
        let want = [0.5, -0.5, 0.0, 0.0, 1.0, 0.0];
        assert!(u.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{u:?}");
    }

    #[test]
    fn named_unique_effect_gives_an_orthonormal_basis_of_the_span_and_named_errors() {
        for (k, d, seed) in SHAPES {
            let v = normals(seed, k, d);
            let names: Vec<String> = (0..k).map(|i| format!("n{i}")).collect();
            let ue = unique_effect_named(&v, d, &names).unwrap();
            assert_eq!(ue.vectors, unique_effect(&v, d).unwrap());
            for i in 0..k {
                for j in 0..k {
                    let g = dot(&ue.basis[i * d..(i + 1) * d], &ue.basis[j * d..(j + 1) * d]);
                    assert!((g - f64::from(u8::from(i == j))).abs() < 1e-5, "k {k} d {d}: basis gram [{i},{j}] = {g}");
                }
            }
            let (a, b) = (projector(&ue.basis, d).unwrap(), projector(&v, d).unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "k {k} d {d}: the basis spans another subspace");
        }
        let names = ["joy".to_string(), "anger".to_string(), "fear".to_string()];
        let mut v = normals(34, 3, 5);
        v.copy_within(0..5, 10);
        assert_eq!(unique_effect_named(&v, 5, &names).unwrap_err().to_string(), "directions are linearly dependent: `fear` lies in the span of the directions before it");
        v[5..10].fill(0.0);
        assert_eq!(unique_effect_named(&v, 5, &names).unwrap_err().to_string(), "`anger` is zero");
        assert_eq!(unique_effect_named(&v[..10], 5, &names).unwrap_err().to_string(), "10 direction values for 3 names of width 5");
    }

    #[test]
    fn projector_is_symmetric_idempotent_and_projects_onto_the_span() {
        for (k, d, seed) in SHAPES {
            let v = normals(seed, k, d);
            let p = projector(&v, d).unwrap();
            assert_eq!(p.len(), d * d);
            let mut trace = 0.0f64;
            for i in 0..d {
                trace += p[i * d + i] as f64;
                for j in 0..d {
                    assert!((p[i * d + j] - p[j * d + i]).abs() < 1e-5, "k {k} d {d}: P[{i},{j}] != P[{j},{i}]");
                    let pp = dot(&p[i * d..(i + 1) * d], &(0..d).map(|r| p[r * d + j]).collect::<Vec<_>>());
                    assert!((pp - p[i * d + j] as f64).abs() < 1e-5, "k {k} d {d}: (PP)[{i},{j}] = {pp}, P = {}", p[i * d + j]);
                }
            }
            assert!((trace - k as f64).abs() < 1e-4, "k {k} d {d}: trace {trace} is not the rank");
            // In the span: a random combination of the directions.
            let c = normals(seed + 100, 1, k);
            let inside: Vec<f32> = (0..d).map(|j| (0..k).map(|i| c[i] * v[i * d + j]).sum()).collect();
            let got = apply(&p, &inside);
            let err = got.iter().zip(&inside).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5 * norm(&inside) as f32, "k {k} d {d}: |Pv - v| = {err}");
            // Orthogonal to the span (Gram-Schmidt, not P); none when k = d.
            let w = orthogonal_part(&v, d, &normals(seed + 200, 1, d));
            let pw = apply(&p, &w);
            assert!(pw.iter().all(|x| x.abs() < 1e-5), "k {k} d {d}: Pw = {pw:?}");
        }
    }

    #[test]
    fn project_set_projects_out_and_adds() {
        let (k, d, n) = (3, 16, 5);
        let v = normals(21, k, d);
        let p = projector(&v, d).unwrap();
        let x0 = normals(22, n, d);
        let add = normals(23, 1, d);
        project_set(&mut [], 0, 1.0, &[], &[]); // an empty selection, as apply_op may pass
        // beta = 1, v = 0: the rows lose their component in the span.
        let mut x = x0.clone();
        project_set(&mut x, d, 1.0, &p, &vec![0.0; d]);
        for (row, row0) in x.chunks(d).zip(x0.chunks(d)) {
            let want = orthogonal_part(&v, d, row0);
            assert!(row.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{row:?} vs {want:?}");
        }
        // x + v - beta P x, row by row.
        let mut x = x0.clone();
        project_set(&mut x, d, 0.5, &p, &add);
        for (row, row0) in x.chunks(d).zip(x0.chunks(d)) {
            let px = apply(&p, row0);
            for j in 0..d {
                assert!((row[j] - (row0[j] + add[j] - 0.5 * px[j])).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn dependent_zero_and_non_finite_directions_are_errors() {
        let d = 10;
        let v = normals(31, 3, d);
        let err = |dirs: &[f32]| {
            let a = unique_effect(dirs, d).unwrap_err().to_string();
            assert_eq!(a, projector(dirs, d).unwrap_err().to_string());
            assert!(!a.contains('\n'));
            a
        };
        // v2 = v0 + v1 (rounded to f32), and v1 = v0.
        let mut sum = v.clone();
        (0..d).for_each(|j| sum[2 * d + j] = v[j] + v[d + j]);
        assert!(err(&sum).contains("direction 2 lies in the span"), "{}", err(&sum));
        let mut twice = v.clone();
        twice.copy_within(0..d, d);
        assert!(err(&twice).contains("direction 1 lies in the span"));
        // Nearly dependent but not within the tolerance: accepted.
        let mut near = sum.clone();
        normals(32, 1, d).iter().enumerate().for_each(|(j, e)| near[2 * d + j] += 1e-3 * e);
        assert!(unique_effect(&near, d).is_ok() && projector(&near, d).is_ok());
        let mut zero = v.clone();
        zero[d..2 * d].fill(0.0);
        assert_eq!(err(&zero), "direction 1 is zero");
        let mut nan = v.clone();
        nan[2 * d + 4] = f32::NAN;
        assert!(err(&nan).contains("direction 2 holds a non-finite value (NaN) at element 4"));
        let wide = normals(33, 4, 3);
        assert_eq!(unique_effect(&wide, 3).unwrap_err().to_string(), "4 directions of width 3: need between 1 and 3 (more than 3 are linearly dependent)");
        assert_eq!(projector(&wide, 3).unwrap_err().to_string(), unique_effect(&wide, 3).unwrap_err().to_string());
        assert!(err(&v[..d + 1]).contains("11 direction values are not whole rows of width 10"));
        assert!(err(&[]).contains("0 directions"));
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
