//! Small element-wise helpers of the forward (kernels/elementwise.cu): bias add, f32 -> bf16,
//! per-head masking for HeadOut, the per-head sum, soft-capping, row gathers; each with its CPU
//! reference `<name>_ref`.

use half::bf16;
use rayon::prelude::*;

use super::common::{at_least, at_least_opt, fit_i32};
use super::site_ops::{opt_ptr, row_block};
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::{Kernel, entry};
use crate::{Error, Result};

fn rows_cfg(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig { grid: (rows as u32, 1, 1), block: (row_block(n), 1, 1), shared_bytes: 0 }
}

/// Grid-stride launch over `n` elements: 256 threads, at most 8192 blocks.
fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 }
}

/// x[r, :] += b for the first `t` rows of x (`[t, n]`).
pub fn bias_add(driver: &dyn Driver, x: &DeviceBuffer<f32>, b: &DeviceBuffer<f32>, t: usize, n: usize) -> Result<()> {
    fit_i32("bias_add", &[t, n])?;
    at_least("bias_add", "x", x, t * n)?;
    at_least("bias_add", "b", b, n)?;
    if t == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: x holds t x n floats and b n, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).ptr(b.ptr()).i32(t as i32).i32(n as i32).launch(driver, entry::BIAS_ADD_F32, rows_cfg(t, n)) }
}

/// y[..n] = bf16(x[..n]) (round to nearest even).
pub fn to_bf16(driver: &dyn Driver, x: &DeviceBuffer<f32>, y: &DeviceBuffer<bf16>, n: usize) -> Result<()> {
    at_least("to_bf16", "x", x, n)?;
    at_least("to_bf16", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x and y hold n elements, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).ptr(y.ptr()).value(n as i64).launch(driver, entry::TO_BF16_F32, flat_cfg(n)) }
}

/// out (`[t, h, dh]` bf16) = z (`[t, h, dh]` f32) with every head but `head` zeroed: the operand
/// of the per-head o_proj GEMM (HeadOut).
pub fn head_mask(driver: &dyn Driver, z: &DeviceBuffer<f32>, out: &DeviceBuffer<bf16>, t: usize, h: usize, dh: usize, head: usize) -> Result<()> {
    fit_i32("head_mask", &[t, h * dh])?;
    if head >= h {
        return Err(Error::input(format!("head_mask: head {head} is out of range (0..{h})")));
    }
    at_least("head_mask", "z", z, t * h * dh)?;
    at_least("head_mask", "out", out, t * h * dh)?;
    if t == 0 || dh == 0 {
        return Ok(());
    }
    // SAFETY: z and out hold t x h x dh elements, checked above.
    unsafe {
        KernelArgs::new()
            .ptr(z.ptr())
            .ptr(out.ptr())
            .i32(t as i32)
            .i32(h as i32)
            .i32(dh as i32)
            .i32(head as i32)
            .launch(driver, entry::HEAD_MASK_BF16, rows_cfg(t, h * dh))
    }
}

/// out[r, :] = sum over heads of result[r, h, :] (+ bias): o_proj's output from per-head parts.
/// result `[t, h, d]`, bias `[d]`, out `[t, d]`.
pub fn sum_heads(driver: &dyn Driver, result: &DeviceBuffer<f32>, bias: Option<&DeviceBuffer<f32>>, out: &DeviceBuffer<f32>, t: usize, h: usize, d: usize) -> Result<()> {
    fit_i32("sum_heads", &[t, h, d])?;
    at_least("sum_heads", "result", result, t * h * d)?;
    at_least("sum_heads", "out", out, t * d)?;
    at_least_opt("sum_heads", "bias", bias, d)?;
    if t == 0 || d == 0 {
        return Ok(());
    }
    // SAFETY: result holds t x h x d floats, out t x d, bias d (or null), checked above.
    unsafe {
        KernelArgs::new()
            .ptr(result.ptr())
            .ptr(opt_ptr(bias))
            .ptr(out.ptr())
            .i32(t as i32)
            .i32(h as i32)
            .i32(d as i32)
            .launch(driver, entry::SUM_HEADS_F32, rows_cfg(t, d))
    }
}

/// x[..n] = tanh(x / cap) * cap (Gemma 2 final logit soft-capping).
pub fn softcap(driver: &dyn Driver, x: &DeviceBuffer<f32>, n: usize, cap: f32) -> Result<()> {
    at_least("softcap", "x", x, n)?;
    if !(cap.is_finite() && cap > 0.0) {
        return Err(Error::input(format!("softcap: cap must be finite and positive, got {cap}")));
    }
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x holds n floats, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).value(n as i64).f32(cap).launch(driver, entry::SOFTCAP_F32, flat_cfg(n)) }
}

/// count[0] += the number of NaN and +-Inf among x[..n] (one pass; what a device forward
/// counts in the logits and captures it returns, read once per call).
pub fn count_nonfinite(driver: &dyn Driver, x: &DeviceBuffer<f32>, n: usize, count: &DeviceBuffer<u64>) -> Result<()> {
    at_least("count_nonfinite", "x", x, n)?;
    at_least("count_nonfinite", "count", count, 1)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x holds n floats and count one u64, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).value(n as i64).ptr(count.ptr()).launch(driver, entry::COUNT_NONFINITE_F32, flat_cfg(n)) }
}

fn check_rows(op: &str, rows: &DeviceBuffer<i32>, n: usize, d: usize, r: usize) -> Result<()> {
    fit_i32(op, &[n, d, r])?;
    at_least(op, "rows", rows, n)
}

/// out[k, :] = bf16(src[rows[k], :]) for k < n; src `[r, d]` f32, out `[n, d]` bf16 (the final rows
/// that need logits). Precondition (device indices, not checked): rows in `0..r`; an index outside
/// gives a NaN row, never an out-of-bounds read. [`upload_rows`] checks host indices.
pub fn gather_rows_f32_bf16(driver: &dyn Driver, src: &DeviceBuffer<f32>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    gather_rows(driver, entry::GATHER_ROWS_F32_BF16, src, r, rows, out, n, d)
}

/// out[k, :] = src[rows[k], :] for k < n; src `[r, d]` bf16 (lm_head rows of a label set), out
/// `[n, d]`. Same precondition as [`gather_rows_f32_bf16`].
pub fn gather_rows_bf16(driver: &dyn Driver, src: &DeviceBuffer<bf16>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    gather_rows(driver, entry::GATHER_ROWS_BF16, src, r, rows, out, n, d)
}

/// The launcher of both gathers (`kernel` takes src of element type T).
#[allow(clippy::too_many_arguments)]
fn gather_rows<T: bytemuck::Pod>(driver: &dyn Driver, kernel: Kernel, src: &DeviceBuffer<T>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    let op = kernel.name();
    check_rows(op, rows, n, d, r)?;
    at_least(op, "src", src, r * d)?;
    at_least(op, "out", out, n * d)?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    // SAFETY: src holds r x d elements, rows n ints, out n x d; the kernel bounds every index by r.
    unsafe {
        KernelArgs::new()
            .ptr(src.ptr())
            .ptr(rows.ptr())
            .ptr(out.ptr())
            .i32(n as i32)
            .i32(d as i32)
            .i32(r as i32)
            .launch(driver, kernel, rows_cfg(n, d))
    }
}

/// Checks host row indices against `r` and uploads them into `dst` (at least `rows.len()` long).
pub fn upload_rows(rows: &[usize], r: usize, dst: &DeviceBuffer<i32>) -> Result<()> {
    if let Some(&bad) = rows.iter().find(|&&x| x >= r) {
        return Err(Error::input(format!("gather: row {bad} is out of range (0..{r})")));
    }
    if dst.len() < rows.len() || r > i32::MAX as usize {
        return Err(Error::input(format!("gather: {} indices into a buffer of {} (or {r} rows too many)", rows.len(), dst.len())));
    }
    let v: Vec<i32> = rows.iter().map(|&x| x as i32).collect();
    dst.upload(&v)
}

/// The reference of [`bias_add`]: x[r, :] += b for every row of x (`[rows, b.len()]`).
pub fn bias_add_ref(x: &mut [f32], b: &[f32]) {
    x.par_chunks_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(x, b)| *x += b));
}

/// The reference of [`to_bf16`]: every element rounded to bf16 (nearest even).
pub fn to_bf16_ref(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// The reference of [`head_mask`]: z (`[t, h, dh]`) in bf16 with every head but `head` zeroed.
pub fn head_mask_ref(z: &[f32], h: usize, dh: usize, head: usize) -> Vec<bf16> {
    z.iter().enumerate().map(|(i, &v)| if (i / dh) % h == head { bf16::from_f32(v) } else { bf16::ZERO }).collect()
}

/// The reference of [`sum_heads`]: per row of out (`[t, d]`), zero, add each head of result
/// (`[t, h, d]`) in order, then the bias (`[d]`).
pub fn sum_heads_ref(result: &[f32], bias: Option<&[f32]>, out: &mut [f32], h: usize, d: usize) {
    out.par_chunks_mut(d).zip(result.par_chunks(h * d)).for_each(|(o, res)| {
        o.fill(0.0);
        res.chunks(d).for_each(|r| o.iter_mut().zip(r).for_each(|(o, r)| *o += r));
        if let Some(b) = bias {
            o.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    });
}

/// The reference of [`softcap`]: x = tanh(x / cap) * cap.
pub fn softcap_ref(x: &mut [f32], cap: f32) {
    x.par_iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
}

/// The reference of [`count_nonfinite`]: NaN and +-Inf among x.
pub fn count_nonfinite_ref(x: &[f32]) -> u64 {
    x.iter().filter(|v| !v.is_finite()).count() as u64
}

/// The reference of [`gather_rows_bf16`] (and, followed by [`to_bf16_ref`], of
/// [`gather_rows_f32_bf16`]): rows `rows` of src (`[r, d]`), in order (`[rows.len(), d]`).
pub fn gather_rows_ref<T: Copy>(src: &[T], rows: &[usize], d: usize) -> Vec<T> {
    rows.iter().flat_map(|&k| src[k * d..(k + 1) * d].iter().copied()).collect()
}
