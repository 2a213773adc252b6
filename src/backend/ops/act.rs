//! Gated MLP activation with the MlpPost site ops (kernels/act.cu, `act_mul_f32`) on the output
//! of the stacked gate and up projections (one GEMM): gate <- act(gate + gate_b) * (up + up_b),
//! then site ops, then a bf16 copy for the down GEMM.
//! CPU reference: [`act_mul_ref`].

use half::bf16;
use rayon::prelude::*;

use super::common::{at_least, at_least_opt};
use super::site_ops::{DeviceSitePlan, SitePlan, opt_ptr, row_block};
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::model::config::Activation;
use crate::{Error, Result};

/// The operands of one [`act_mul`] launch. Buffers may be longer than `t` rows.
pub struct ActMul<'a> {
    /// `[t, 2i]` in: per row the gate projection, then the up projection; out: the first i
    /// of each row <- act(gate) * up after site ops (the up half is left as it was).
    pub gate_up: &'a DeviceBuffer<f32>,
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
    at_least("act_mul", "gate_up", a.gate_up, 2 * tn)?;
    at_least_opt("act_mul", "gate_b", a.gate_b, n)?;
    at_least_opt("act_mul", "up_b", a.up_b, n)?;
    at_least_opt("act_mul", "out_bf16", a.out_bf16, tn)?;
    let site = a.site.map_or(Ok(SitePlan::EMPTY), |p| p.bind(t, n, a.capture))?;
    if t == 0 {
        return Ok(());
    }
    let act = match a.act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    };
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (row_block(n), 1, 1), shared_bytes: 0 };
    // SAFETY: gate_up holds t x 2i elements, out_bf16 t x i, biases i, checked above; absent
    // ones are null, which the kernel tests; the site plan was bound to [t, i] and the capture
    // arena (it reads and writes the first i of each row).
    unsafe {
        KernelArgs::new()
            .ptr(a.gate_up.ptr())
            .ptr(opt_ptr(a.gate_b))
            .ptr(opt_ptr(a.up_b))
            .ptr(opt_ptr(a.out_bf16))
            .i32(t as i32)
            .i32(n as i32)
            .i32(act)
            .value(site)
            .launch(driver, entry::ACT_MUL_F32, cfg)
    }
}

/// In place: x <- act(x) * up.  x (gate), up: [rows, d_mlp].
pub fn act_mul_ref(gate: &mut [f32], up: &[f32], act: Activation) {
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, u) in g.iter_mut().zip(u) {
            let a = match act {
                Activation::Silu => *g / (1.0 + (-*g).exp()),
                Activation::GeluTanh => {
                    let x = *g;
                    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
                }
            };
            *g = a * u;
        }
    });
}
