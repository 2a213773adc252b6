//! Gated MLP activation with the MlpPost site ops (kernels/act.cu, `act_mul_f32`):
//! gate <- act(gate + gate_b) * (up + up_b), then site ops, then a bf16 copy for the down GEMM.

use half::bf16;

use super::site_ops::{DeviceSitePlan, SitePlan, opt_ptr, row_block};
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::model::config::Activation;
use crate::{Error, Result};

/// The operands of one [`act_mul`] launch. Buffers may be longer than `t` rows.
pub struct ActMul<'a> {
    /// `[t, i]` in: gate projection; out: act(gate) * up after site ops.
    pub gate: &'a DeviceBuffer<f32>,
    /// `[t, i]`
    pub up: &'a DeviceBuffer<f32>,
    /// `[i]` biases of the gate and up projections (added before the activation), if any.
    pub gate_b: Option<&'a DeviceBuffer<f32>>,
    pub up_b: Option<&'a DeviceBuffer<f32>>,
    /// `[t, i]` bf16 copy of the result, if wanted.
    pub out_bf16: Option<&'a DeviceBuffer<bf16>>,
    pub t: usize,
    pub i: usize,
    pub act: Activation,
    /// MlpPost ops and their capture arena.
    pub site: Option<&'a DeviceSitePlan>,
    pub capture: Option<&'a DeviceBuffer<f32>>,
}

/// Launches `act_mul_f32` after checking sizes and binding the site plan to `[t, i]`.
pub fn act_mul(driver: &dyn Driver, a: &ActMul) -> Result<()> {
    let (t, n) = (a.t, a.i);
    if n == 0 || n > i32::MAX as usize || t > i32::MAX as usize {
        return Err(Error::input(format!("act_mul: bad shape [{t}, {n}]")));
    }
    let tn = t * n;
    let short = |name: &str, got: usize, want: usize| Error::input(format!("act_mul: {name} has {got} elements, expected at least {want}"));
    for (name, len, want) in [
        ("gate", Some(a.gate.len()), tn),
        ("up", Some(a.up.len()), tn),
        ("gate_b", a.gate_b.map(|b| b.len()), n),
        ("up_b", a.up_b.map(|b| b.len()), n),
        ("out_bf16", a.out_bf16.map(|b| b.len()), tn),
    ] {
        if let Some(len) = len
            && len < want
        {
            return Err(short(name, len, want));
        }
    }
    let site = a.site.map_or(Ok(SitePlan::EMPTY), |p| p.bind(t, n, a.capture))?;
    if t == 0 {
        return Ok(());
    }
    let act = match a.act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    };
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (row_block(n), 1, 1), shared_bytes: 0 };
    // SAFETY: gate, up (and out_bf16) hold t x i elements, biases i, checked above; absent ones
    // are null, which the kernel tests; the site plan was bound to [t, i] and the capture arena.
    unsafe {
        KernelArgs::new()
            .ptr(a.gate.ptr())
            .ptr(a.up.ptr())
            .ptr(opt_ptr(a.gate_b))
            .ptr(opt_ptr(a.up_b))
            .ptr(opt_ptr(a.out_bf16))
            .i32(t as i32)
            .i32(n as i32)
            .i32(act)
            .value(site)
            .launch(driver, "act_mul_f32", cfg)
    }
}
