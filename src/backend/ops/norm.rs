//! Residual add + RMSNorm fused with site operations (kernels/norm.cu, `add_norm_f32`).
//!
//! Per row: dl = post_w ? rmsnorm(delta) : delta; delta_site ops; delta <- dl; resid += dl (when
//! delta is given); resid_site0, resid_site1 ops; o = pre_w ? rmsnorm(resid) : resid; out_site
//! ops; out_f32 <- o; out_bf16 <- bf16(o). The forward uses it after attention (AttnOut,
//! ResidMid, MlpIn), after the MLP (MlpOut, ResidPost, next ResidPre, AttnIn), at layer 0 with
//! no delta (ResidPre, AttnIn) and at the end (FinalNorm).

use bytemuck::{Pod, Zeroable};
use half::bf16;

use super::site_ops::{DeviceSitePlan, SitePlan, opt_ptr, row_block};
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::{Error, Result};

/// Mirrors `struct AddNormArgs` of kernels/norm.cu (320 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct AddNormArgs {
    pub resid: u64,
    pub delta: u64,
    pub post_w: u64,
    pub pre_w: u64,
    pub out_f32: u64,
    pub out_bf16: u64,
    pub t: i32,
    pub d: i32,
    pub eps: f32,
    pub one_plus: i32,
    pub delta_site: SitePlan,
    pub resid_site0: SitePlan,
    pub resid_site1: SitePlan,
    pub out_site: SitePlan,
}

const _: () = assert!(std::mem::size_of::<AddNormArgs>() == 64 + 4 * 64);

/// The operands of one [`add_norm`] launch. Buffers may be longer than `t` rows.
pub struct AddNorm<'a> {
    /// `[t, d]` residual stream, in/out.
    pub resid: &'a DeviceBuffer<f32>,
    /// `[t, d]` sublayer output, in/out (post-normed and site-op'd in place); None: no add.
    pub delta: Option<&'a DeviceBuffer<f32>>,
    /// `[d]` norm of delta before the add (Gemma 2, OLMo 2); needs `delta`.
    pub post_w: Option<&'a DeviceBuffer<f32>>,
    /// `[d]` norm of the new residual; None: out = resid.
    pub pre_w: Option<&'a DeviceBuffer<f32>>,
    /// `[t, d]` output after out_site ops.
    pub out_f32: &'a DeviceBuffer<f32>,
    /// `[t, d]` the same rounded to bf16 (the next GEMM's operand), if wanted.
    pub out_bf16: Option<&'a DeviceBuffer<bf16>>,
    pub t: usize,
    pub d: usize,
    pub eps: f32,
    /// x_hat * (1 + w) (Gemma) instead of x_hat * w.
    pub one_plus: bool,
    /// Ops on dl (AttnOut / MlpOut); need `delta`.
    pub delta_site: Option<&'a DeviceSitePlan>,
    /// Ops on the residual after the add, in this order (ResidMid; or ResidPost then ResidPre).
    pub resid_site0: Option<&'a DeviceSitePlan>,
    pub resid_site1: Option<&'a DeviceSitePlan>,
    /// Ops on the normalised output (AttnIn / MlpIn / FinalNorm).
    pub out_site: Option<&'a DeviceSitePlan>,
    /// Capture arena of the plans' captures.
    pub capture: Option<&'a DeviceBuffer<f32>>,
}

fn check_len<T: Pod>(name: &str, b: &DeviceBuffer<T>, want: usize) -> Result<()> {
    if b.len() < want {
        return Err(Error::input(format!("add_norm: {name} has {} elements, expected at least {want}", b.len())));
    }
    Ok(())
}

/// Launches `add_norm_f32` after checking every size, the null combinations and the site plans.
pub fn add_norm(driver: &dyn Driver, a: &AddNorm) -> Result<()> {
    let (t, d) = (a.t, a.d);
    if d == 0 || d > i32::MAX as usize || t > i32::MAX as usize {
        return Err(Error::input(format!("add_norm: bad shape [{t}, {d}]")));
    }
    let td = t * d;
    check_len("resid", a.resid, td)?;
    check_len("out_f32", a.out_f32, td)?;
    if let Some(b) = a.delta {
        check_len("delta", b, td)?;
    }
    if let Some(b) = a.out_bf16 {
        check_len("out_bf16", b, td)?;
    }
    if let Some(w) = a.post_w {
        check_len("post_w", w, d)?;
    }
    if let Some(w) = a.pre_w {
        check_len("pre_w", w, d)?;
    }
    if a.delta.is_none() && (a.post_w.is_some() || a.delta_site.is_some_and(|p| !p.is_empty())) {
        return Err(Error::input("add_norm: post_w and delta_site act on delta, which is not given"));
    }
    let bind = |p: Option<&DeviceSitePlan>| p.map_or(Ok(SitePlan::EMPTY), |p| p.bind(t, d, a.capture));
    let args = AddNormArgs {
        resid: a.resid.ptr().0,
        delta: opt_ptr(a.delta).0,
        post_w: opt_ptr(a.post_w).0,
        pre_w: opt_ptr(a.pre_w).0,
        out_f32: a.out_f32.ptr().0,
        out_bf16: opt_ptr(a.out_bf16).0,
        t: t as i32,
        d: d as i32,
        eps: a.eps,
        one_plus: a.one_plus as i32,
        delta_site: bind(a.delta_site)?,
        resid_site0: bind(a.resid_site0)?,
        resid_site1: bind(a.resid_site1)?,
        out_site: bind(a.out_site)?,
    };
    if t == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (row_block(d), 1, 1), shared_bytes: 0 };
    // SAFETY: every buffer given holds t x d (weights d) elements, checked above; absent ones are
    // null, which the kernel tests; the site plans were bound to [t, d] and the capture arena.
    unsafe { KernelArgs::new().value(args).launch(driver, "add_norm_f32", cfg) }
}
