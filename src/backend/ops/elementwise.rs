//! Small element-wise helpers of the forward (kernels/elementwise.cu): bias add, f32 -> bf16,
//! per-head masking for HeadOut, the per-head sum, soft-capping, row gathers.

use half::bf16;

use super::site_ops::{opt_ptr, row_block};
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::{Error, Result};

fn need<T: bytemuck::Pod>(op: &str, name: &str, b: &DeviceBuffer<T>, want: usize) -> Result<()> {
    if b.len() < want {
        return Err(Error::input(format!("{op}: {name} has {} elements, expected at least {want}", b.len())));
    }
    Ok(())
}

fn fits_i32(op: &str, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&v| v > i32::MAX as usize) {
        return Err(Error::input(format!("{op}: dimensions {dims:?} do not fit in 32 bits")));
    }
    Ok(())
}

fn rows_cfg(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig { grid: (rows as u32, 1, 1), block: (row_block(n), 1, 1), shared_bytes: 0 }
}

/// Grid-stride launch over `n` elements: 256 threads, at most 8192 blocks.
fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 }
}

/// x[r, :] += b for the first `t` rows of x (`[t, n]`).
pub fn bias_add(driver: &dyn Driver, x: &DeviceBuffer<f32>, b: &DeviceBuffer<f32>, t: usize, n: usize) -> Result<()> {
    fits_i32("bias_add", &[t, n])?;
    need("bias_add", "x", x, t * n)?;
    need("bias_add", "b", b, n)?;
    if t == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: x holds t x n floats and b n, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).ptr(b.ptr()).i32(t as i32).i32(n as i32).launch(driver, "bias_add_f32", rows_cfg(t, n)) }
}

/// y[..n] = bf16(x[..n]) (round to nearest even).
pub fn to_bf16(driver: &dyn Driver, x: &DeviceBuffer<f32>, y: &DeviceBuffer<bf16>, n: usize) -> Result<()> {
    need("to_bf16", "x", x, n)?;
    need("to_bf16", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x and y hold n elements, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).ptr(y.ptr()).value(n as i64).launch(driver, "to_bf16_f32", flat_cfg(n)) }
}

/// out (`[t, h, dh]` bf16) = z (`[t, h, dh]` f32) with every head but `head` zeroed: the operand
/// of the per-head o_proj GEMM (HeadOut).
pub fn head_mask(driver: &dyn Driver, z: &DeviceBuffer<f32>, out: &DeviceBuffer<bf16>, t: usize, h: usize, dh: usize, head: usize) -> Result<()> {
    fits_i32("head_mask", &[t, h * dh])?;
    if head >= h {
        return Err(Error::input(format!("head_mask: head {head} is out of range (0..{h})")));
    }
    need("head_mask", "z", z, t * h * dh)?;
    need("head_mask", "out", out, t * h * dh)?;
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
            .launch(driver, "head_mask_bf16", rows_cfg(t, h * dh))
    }
}

/// out[r, :] = sum over heads of result[r, h, :] (+ bias): o_proj's output from per-head parts.
/// result `[t, h, d]`, bias `[d]`, out `[t, d]`.
pub fn sum_heads(driver: &dyn Driver, result: &DeviceBuffer<f32>, bias: Option<&DeviceBuffer<f32>>, out: &DeviceBuffer<f32>, t: usize, h: usize, d: usize) -> Result<()> {
    fits_i32("sum_heads", &[t, h, d])?;
    need("sum_heads", "result", result, t * h * d)?;
    need("sum_heads", "out", out, t * d)?;
    if let Some(b) = bias {
        need("sum_heads", "bias", b, d)?;
    }
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
            .launch(driver, "sum_heads_f32", rows_cfg(t, d))
    }
}

/// x[..n] = tanh(x / cap) * cap (Gemma 2 final logit soft-capping).
pub fn softcap(driver: &dyn Driver, x: &DeviceBuffer<f32>, n: usize, cap: f32) -> Result<()> {
    need("softcap", "x", x, n)?;
    if !(cap.is_finite() && cap > 0.0) {
        return Err(Error::input(format!("softcap: cap must be finite and positive, got {cap}")));
    }
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x holds n floats, checked above.
    unsafe { KernelArgs::new().ptr(x.ptr()).value(n as i64).f32(cap).launch(driver, "softcap_f32", flat_cfg(n)) }
}

fn check_rows(op: &str, rows: &DeviceBuffer<i32>, n: usize, d: usize, r: usize) -> Result<()> {
    fits_i32(op, &[n, d, r])?;
    need(op, "rows", rows, n)
}

/// out[k, :] = bf16(src[rows[k], :]) for k < n; src `[r, d]` f32, out `[n, d]` bf16 (the final rows
/// that need logits). Precondition (device indices, not checked): rows in `0..r`; an index outside
/// gives a NaN row, never an out-of-bounds read. [`upload_rows`] checks host indices.
pub fn gather_rows_f32_bf16(driver: &dyn Driver, src: &DeviceBuffer<f32>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    gather_rows(driver, "gather_rows_f32_bf16", src, r, rows, out, n, d)
}

/// out[k, :] = src[rows[k], :] for k < n; src `[r, d]` bf16 (lm_head rows of a label set), out
/// `[n, d]`. Same precondition as [`gather_rows_f32_bf16`].
pub fn gather_rows_bf16(driver: &dyn Driver, src: &DeviceBuffer<bf16>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    gather_rows(driver, "gather_rows_bf16", src, r, rows, out, n, d)
}

/// The launcher of both gathers (`kernel` takes src of element type T).
#[allow(clippy::too_many_arguments)]
fn gather_rows<T: bytemuck::Pod>(driver: &dyn Driver, kernel: &str, src: &DeviceBuffer<T>, r: usize, rows: &DeviceBuffer<i32>, out: &DeviceBuffer<bf16>, n: usize, d: usize) -> Result<()> {
    check_rows(kernel, rows, n, d, r)?;
    need(kernel, "src", src, r * d)?;
    need(kernel, "out", out, n * d)?;
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
