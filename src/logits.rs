//! Reading predictions off logits: the argmax and the metrics of a row of label logits. The
//! host helpers the experiments and the probes use, and the reference semantics of the device
//! reduction (`label_metrics_f32`, backend/ops/metrics.rs).

/// The index of the largest value, the lowest among equal maxima (numpy.argmax); 0 for an
/// empty row.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// `b` value meaning "subtract the max over the labels other than `a`".
pub const DIFF_VS_MAX_OTHER: i32 = -1;

/// The metrics of one row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LabelMetricsRow {
    pub pred: i32,
    pub logit_diff: f32,
    pub prob: f32,
    pub logsumexp: f32,
}

/// Reference semantics of one row `x` (the L label logits), as `label_metrics_f32` computes them:
/// - `pred` = argmax_j x[j], the lowest j among equal maxima (numpy.argmax);
/// - `logit_diff` = x[a] - x[b] for 0 <= b < L; for b = -1 ([`DIFF_VS_MAX_OTHER`]),
///   x[a] - max_{j != a} x[j] (+inf when L = 1: the max over no label is -inf);
/// - `prob` = softmax(x)[c] = exp(x[c] - m) / sum_j exp(x[j] - m) with m = max_j x[j];
/// - `logsumexp` = m + ln(sum_j exp(x[j] - m)).
///
/// An index out of range (a or c outside [0, L), b outside [-1, L)) makes the output that uses
/// it NaN. Logits are finite or -inf (masked labels); when all are -inf, logsumexp is -inf and
/// prob NaN. f32 math with an f32 sum, in index order (the kernel sums in another order: the
/// results agree to f32 rounding). `x` must not be empty.
pub fn label_metrics_row(x: &[f32], a: i32, b: i32, c: i32) -> LabelMetricsRow {
    let l = x.len();
    let best = argmax(x);
    let in_range = |i: i32| i >= 0 && (i as usize) < l;
    let logit_diff = if !in_range(a) {
        f32::NAN
    } else if b == DIFF_VS_MAX_OTHER {
        let other = x.iter().enumerate().filter(|&(j, _)| j != a as usize).fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
        x[a as usize] - other
    } else if in_range(b) {
        x[a as usize] - x[b as usize]
    } else {
        f32::NAN
    };
    let m = x[best];
    let shift = if m == f32::NEG_INFINITY { 0.0 } else { m };
    let s: f32 = x.iter().map(|&v| (v - shift).exp()).sum();
    let prob = if in_range(c) { (x[c as usize] - shift).exp() / s } else { f32::NAN };
    LabelMetricsRow { pred: best as i32, logit_diff, prob, logsumexp: shift + s.ln() }
}
