//! kernels/metrics.cu (`label_metrics_f32`) against `label_metrics_row` on fresh random label
//! logits: odd label counts (1, 2, 13, 19, 111, 1000), row counts that are not multiples of the
//! rows per block, rows with tied maxima (argmax must take the lowest index), masked (-inf)
//! labels, b = -1 (difference to the best other label). Outputs are poisoned with NaN; the
//! out-of-range-index case, whose expected outputs are NaN, runs on zero-filled outputs instead
//! so that a NaN must have been written. Run in two fiber orders.

mod common;

use std::sync::Arc;

use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::metrics::{LabelMetrics, label_metrics, label_metrics_ref};
use patchbay::logits::{DIFF_VS_MAX_OTHER, LabelMetricsRow, label_metrics_row};

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use common::kernels::*;

/// Random label logits: most rows N(0, 3^2); one in four rounded to multiples of 0.5 (ties,
/// often at the max); one in eight with about a third of the labels masked to -inf, never
/// label `a[row]` (so no difference is -inf - -inf).
fn random_logits(rng: &mut Rng, n: usize, l: usize, a: &[i32]) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * l);
    for _ in 0..n {
        let mut row: Vec<f32> = (0..l).map(|_| 3.0 * rng.normal()).collect();
        let keep = a[x.len() / l] as usize;
        match rng.below(8) {
            0 | 1 => row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
            2 => {
                for (j, v) in row.iter_mut().enumerate() {
                    if j != keep && rng.below(3) == 0 {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            _ => {}
        }
        x.extend(row);
    }
    x
}

/// Indices in range: a, c in [0, L); b = -1 half the time, else in [0, L).
fn random_indices(rng: &mut Rng, n: usize, l: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let a = (0..n).map(|_| rng.below(l) as i32).collect();
    let b = (0..n).map(|_| if rng.below(2) == 0 { DIFF_VS_MAX_OTHER } else { rng.below(l) as i32 }).collect();
    let c = (0..n).map(|_| rng.below(l) as i32).collect();
    (a, b, c)
}

struct Outputs {
    pred: DeviceBuffer<i32>,
    logit_diff: DeviceBuffer<f32>,
    prob: DeviceBuffer<f32>,
    logsumexp: DeviceBuffer<f32>,
}

fn run(drv: &Arc<dyn Driver>, x: &[f32], n: usize, l: usize, idx: &(Vec<i32>, Vec<i32>, Vec<i32>), fill: u8) -> Vec<LabelMetricsRow> {
    let logits = upload(drv, x);
    let (a, b, c) = (upload(drv, &idx.0), upload(drv, &idx.1), upload(drv, &idx.2));
    let out = Outputs {
        pred: DeviceBuffer::filled(drv, n, fill).unwrap(),
        logit_diff: DeviceBuffer::filled(drv, n, fill).unwrap(),
        prob: DeviceBuffer::filled(drv, n, fill).unwrap(),
        logsumexp: DeviceBuffer::filled(drv, n, fill).unwrap(),
    };
    let op =
        LabelMetrics { logits: &logits, n, l, a: &a, b: &b, c: &c, pred: &out.pred, logit_diff: &out.logit_diff, prob: &out.prob, logsumexp: &out.logsumexp };
    label_metrics(drv.as_ref(), &op).unwrap();
    let (pred, diff, prob, lse) =
        (out.pred.download().unwrap(), out.logit_diff.download().unwrap(), out.prob.download().unwrap(), out.logsumexp.download().unwrap());
    (0..n).map(|r| LabelMetricsRow { pred: pred[r], logit_diff: diff[r], prob: prob[r], logsumexp: lse[r] }).collect()
}

/// Non-finite expected values must be matched exactly (same infinity, or NaN for NaN); the
/// finite ones within the kernel tolerance (a NaN or infinity where a finite value is expected
/// fails in `assert_close`).
fn compare_f32(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (i, (&gv, &wv)) in got.iter().zip(want).enumerate() {
        if wv.is_finite() {
            g.push(gv);
            w.push(wv);
        } else {
            let same = if wv.is_nan() { gv.is_nan() } else { gv == wv };
            assert!(same, "{name}: row {i}: got {gv}, want {wv}");
        }
    }
    assert_close(name, &g, &w, atol, rtol);
}

fn check(name: &str, got: &[LabelMetricsRow], want: &[LabelMetricsRow]) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.pred, w.pred, "{name}: pred of row {r}");
    }
    let col = |v: &[LabelMetricsRow], f: fn(&LabelMetricsRow) -> f32| v.iter().map(f).collect::<Vec<f32>>();
    // The difference of two logits (or of a logit and the max of others) is one exact f32
    // subtraction in both: bit-exact.
    compare_f32(&format!("{name}: logit_diff"), &col(got, |m| m.logit_diff), &col(want, |m| m.logit_diff), 0.0, 0.0);
    compare_f32(&format!("{name}: prob"), &col(got, |m| m.prob), &col(want, |m| m.prob), KERNEL_F32_ATOL, KERNEL_F32_RTOL);
    compare_f32(&format!("{name}: logsumexp"), &col(got, |m| m.logsumexp), &col(want, |m| m.logsumexp), KERNEL_F32_ATOL, KERNEL_F32_RTOL);
}

#[test]
fn label_metrics_random() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    for &l in &[1usize, 2, 13, 19, 111, 1000] {
        for &n in &[1usize, 7, 19, 37] {
            let idx = random_indices(&mut rng, n, l);
            let x = random_logits(&mut rng, n, l, &idx.0);
            let want = label_metrics_ref(&x, l, &idx.0, &idx.1, &idx.2).unwrap();
            for (order, drv) in test_drivers() {
                let got = run(&drv, &x, n, l, &idx, 0xFF);
                check(&format!("L {l} n {n} [{order}, seed {seed}]"), &got, &want);
            }
        }
    }
}

/// Ties: every row holds its maximum several times; pred is the first occurrence.
#[test]
fn label_metrics_ties_take_lowest_index() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    for &l in &[2usize, 19, 111, 1000] {
        let n = 19;
        let mut x = Vec::new();
        let mut first = Vec::new();
        for _ in 0..n {
            let mut row: Vec<f32> = (0..l).map(|_| rng.below(5) as f32).collect();
            let k = rng.below(l);
            row[k] = 7.0;
            row[l - 1] = 7.0;
            first.push(k as i32);
            x.extend(row);
        }
        let idx = random_indices(&mut rng, n, l);
        let want = label_metrics_ref(&x, l, &idx.0, &idx.1, &idx.2).unwrap();
        assert_eq!(want.iter().map(|m| m.pred).collect::<Vec<_>>(), first, "reference argmax");
        for (order, drv) in test_drivers() {
            let got = run(&drv, &x, n, l, &idx, 0xFF);
            check(&format!("ties L {l} [{order}, seed {seed}]"), &got, &want);
        }
    }
}

/// Hand-computed values, so that the reference itself is checked.
#[test]
fn label_metrics_reference_values() {
    let x = [1.0f32, 3.0, 2.0];
    let m = label_metrics_row(&x, 0, DIFF_VS_MAX_OTHER, 1);
    let s = (-2.0f32).exp() + 1.0 + (-1.0f32).exp();
    assert_eq!(m.pred, 1);
    assert_eq!(m.logit_diff, -2.0);
    assert!((m.prob - 1.0 / s).abs() < 1e-7);
    assert!((m.logsumexp - (3.0 + s.ln())).abs() < 1e-6);
    assert_eq!(label_metrics_row(&x, 1, DIFF_VS_MAX_OTHER, 0).logit_diff, 1.0);
    assert_eq!(label_metrics_row(&x, 2, 0, 0).logit_diff, 1.0);
    assert_eq!(label_metrics_row(&[5.0], 0, DIFF_VS_MAX_OTHER, 0).logit_diff, f32::INFINITY);
    assert_eq!(label_metrics_row(&[5.0], 0, DIFF_VS_MAX_OTHER, 0).prob, 1.0);
    let masked = label_metrics_row(&[f32::NEG_INFINITY, 0.0], 1, 0, 0);
    assert_eq!((masked.pred, masked.logit_diff, masked.prob, masked.logsumexp), (1, f32::INFINITY, 0.0, 0.0));
}

/// Out-of-range indices give NaN in the outputs that use them (and only those). The outputs
/// start at 0.0 here, so the NaNs must have been written by the kernel.
#[test]
fn label_metrics_out_of_range_indices_give_nan() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    let (n, l) = (19usize, 13usize);
    let (mut a, mut b, mut c) = random_indices(&mut rng, n, l);
    let x = random_logits(&mut rng, n, l, &a);
    let bad = [-1, -2, l as i32, i32::MAX, i32::MIN];
    for r in 0..n {
        match r % 4 {
            0 => a[r] = bad[rng.below(bad.len())],
            1 => b[r] = [-2, l as i32, i32::MAX, i32::MIN][rng.below(4)],
            2 => c[r] = bad[rng.below(bad.len())],
            _ => {}
        }
    }
    let idx = (a, b, c);
    let want = label_metrics_ref(&x, l, &idx.0, &idx.1, &idx.2).unwrap();
    for r in 0..n {
        assert_eq!(want[r].logit_diff.is_nan(), r % 4 < 2, "reference logit_diff of row {r}");
        assert_eq!(want[r].prob.is_nan(), r % 4 == 2, "reference prob of row {r}");
    }
    for (order, drv) in test_drivers() {
        let got = run(&drv, &x, n, l, &idx, 0x00);
        check(&format!("out of range [{order}, seed {seed}]"), &got, &want);
    }
}

#[test]
fn label_metrics_rejects_bad_shapes() {
    let (_, drv) = test_drivers().remove(0);
    let logits = poisoned::<f32>(&drv, 12);
    let i = upload(&drv, &[0i32; 4]);
    let short = upload(&drv, &[0i32; 3]);
    let (p, f) = (poisoned::<i32>(&drv, 4), poisoned::<f32>(&drv, 4));
    let op = |n, l, a| LabelMetrics { logits: &logits, n, l, a, b: &i, c: &i, pred: &p, logit_diff: &f, prob: &f, logsumexp: &f };
    assert!(label_metrics(drv.as_ref(), &op(4, 3, &i)).is_ok());
    assert!(label_metrics(drv.as_ref(), &op(0, 3, &i)).is_ok(), "n = 0 is a no-op");
    assert!(label_metrics(drv.as_ref(), &op(4, 0, &i)).is_err(), "L = 0");
    assert!(label_metrics(drv.as_ref(), &op(4, 4, &i)).is_err(), "logits too short");
    assert!(label_metrics(drv.as_ref(), &op(4, 3, &short)).is_err(), "a too short");
    assert!(label_metrics(drv.as_ref(), &op(usize::MAX / 2, 3, &i)).is_err(), "overflow");
    assert!(label_metrics_ref(&[0.0; 5], 3, &[0], &[0], &[0]).is_err());
    assert!(label_metrics_ref(&[0.0; 6], 3, &[0], &[0], &[0]).is_err());
}
