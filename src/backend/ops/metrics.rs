//! Logit metrics over a label set, reduced on device (kernels/metrics.cu, `label_metrics_f32`).
//!
//! For each of n rows of label logits `[n, L]` (the final rows multiplied by the gathered
//! lm_head rows of the L label tokens, soft-capping applied): the predicted label (argmax, ties
//! to the lowest index as numpy), a logit difference, the softmax probability of one label and
//! the log-sum-exp, all over the L labels. [`label_metrics_row`] (in `crate::logits`, where the
//! experiments read it too) is the reference semantics of one row; [`label_metrics_ref`] applies
//! it to every row, and the CPU path uses it.

use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::backend::ops::common::at_least;
use crate::logits::{LabelMetricsRow, label_metrics_row};
use crate::{Error, Result};

/// Rows per block of `label_metrics_f32` (one warp each); `METRICS_WARPS` in the kernel.
const WARPS_PER_BLOCK: u32 = 4;

/// The operands of one [`label_metrics`] launch. Buffers may be longer than needed.
pub struct LabelMetrics<'a> {
    /// `[n, l]` label logits.
    pub logits: &'a DeviceBuffer<f32>,
    pub n: usize,
    pub l: usize,
    /// `[n]` label index of the first term of the logit difference.
    pub a: &'a DeviceBuffer<i32>,
    /// `[n]` label index subtracted, or [`DIFF_VS_MAX_OTHER`](crate::logits::DIFF_VS_MAX_OTHER).
    pub b: &'a DeviceBuffer<i32>,
    /// `[n]` label whose probability is reported.
    pub c: &'a DeviceBuffer<i32>,
    /// `[n]` out: argmax label.
    pub pred: &'a DeviceBuffer<i32>,
    /// `[n]` out.
    pub logit_diff: &'a DeviceBuffer<f32>,
    /// `[n]` out.
    pub prob: &'a DeviceBuffer<f32>,
    /// `[n]` out.
    pub logsumexp: &'a DeviceBuffer<f32>,
}

/// [`label_metrics_row`] for each row of `logits` (`[n, l]`, n = logits.len() / l), with the
/// per-row indices `a`, `b`, `c` (`[n]` each).
pub fn label_metrics_ref(logits: &[f32], l: usize, a: &[i32], b: &[i32], c: &[i32]) -> Result<Vec<LabelMetricsRow>> {
    if l == 0 || !logits.len().is_multiple_of(l) {
        return Err(Error::input(format!("label metrics: {} logits are not rows of {l} labels", logits.len())));
    }
    let n = logits.len() / l;
    if a.len() != n || b.len() != n || c.len() != n {
        return Err(Error::input(format!("label metrics: {n} rows but {}, {}, {} label indices", a.len(), b.len(), c.len())));
    }
    Ok(logits.chunks_exact(l).enumerate().map(|(r, x)| label_metrics_row(x, a[r], b[r], c[r])).collect())
}

/// Launches `label_metrics_f32` after checking the shape and every buffer's length. n = 0 is a
/// no-op. Index values are not checked here (they live on the device): out-of-range ones give
/// NaN outputs, as in [`label_metrics_row`].
pub fn label_metrics(driver: &dyn Driver, op: &LabelMetrics) -> Result<()> {
    let (n, l) = (op.n, op.l);
    if l == 0 || l > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::input(format!("label_metrics: bad shape [{n}, {l}] (need 1 <= L, both < 2^31)")));
    }
    let nl = n.checked_mul(l).ok_or_else(|| Error::input(format!("label_metrics: [{n}, {l}] overflows")))?;
    at_least("label_metrics", "logits", op.logits, nl)?;
    at_least("label_metrics", "a", op.a, n)?;
    at_least("label_metrics", "b", op.b, n)?;
    at_least("label_metrics", "c", op.c, n)?;
    at_least("label_metrics", "pred", op.pred, n)?;
    at_least("label_metrics", "logit_diff", op.logit_diff, n)?;
    at_least("label_metrics", "prob", op.prob, n)?;
    at_least("label_metrics", "logsumexp", op.logsumexp, n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig { grid: ((n as u32).div_ceil(WARPS_PER_BLOCK), 1, 1), block: (32 * WARPS_PER_BLOCK, 1, 1), shared_bytes: 0 };
    // SAFETY: logits holds n x L floats and a, b, c, pred, logit_diff, prob, logsumexp hold n
    // elements each (checked above); the kernel reads label indices only after range checks.
    unsafe {
        KernelArgs::new()
            .ptr(op.logits.ptr())
            .i32(n as i32)
            .i32(l as i32)
            .ptr(op.a.ptr())
            .ptr(op.b.ptr())
            .ptr(op.c.ptr())
            .ptr(op.pred.ptr())
            .ptr(op.logit_diff.ptr())
            .ptr(op.prob.ptr())
            .ptr(op.logsumexp.ptr())
            .launch(driver, entry::LABEL_METRICS_F32, cfg)
    }
}
