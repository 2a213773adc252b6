//! Site operations on device (kernels/site_ops.cuh, kernels/site_ops.cu): the interventions
//! and captures of [`crate::intervene::apply_op`] as a flat plan the kernels read.
//!
//! A [`SitePlanBuilder`] collects ops for the rows of one site (one activation `[T, width]`)
//! straight from [`Op`], so the fast path's host side cannot drift from the reference enum;
//! [`SitePlanBuilder::upload`] makes a [`DeviceSitePlan`] (device buffers kept alive). A fused
//! kernel's checked entry point passes it through [`DeviceSitePlan::bind`], which checks it
//! against the activation's shape and the capture arena and gives the by-value [`SitePlan`]
//! the kernel takes; [`site_ops`] applies a plan on its own.

use std::collections::HashMap;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::backend::device::{DevPtr, DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::intervene::Op;
use crate::{Error, Result};

/// Op codes (SITE_* in site_ops.cuh).
pub const SITE_PATCH: i32 = 0;
pub const SITE_ADD: i32 = 1;
pub const SITE_PROJECT: i32 = 2;
pub const SITE_ZERO: i32 = 3;
pub const SITE_MEAN: i32 = 4;
pub const SITE_RANDOM: i32 = 5;
pub const SITE_SCALE: i32 = 6;
pub const SITE_CAPTURE: i32 = 7;

/// One op on one row; mirrors `struct SiteOp` of site_ops.cuh (field meanings there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct SiteOp {
    pub row: i32,
    pub code: i32,
    pub slice_begin: i32,
    pub n_slices: i32,
    pub width: i32,
    pub pos: i32,
    /// Float offset into `operands` (PATCH, ADD, MEAN, PROJECT) or into `capture` (CAPTURE).
    pub operand: i64,
    pub param: f32,
    pub pad: i32,
    /// RANDOM: the seed; PROJECT: float offset into `scratch`.
    pub seed: u64,
}

/// The by-value plan argument of the kernels; mirrors `struct SitePlan` of site_ops.cuh.
/// Pointers are device addresses (0 = null). [`SitePlan::EMPTY`] does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SitePlan {
    pub ops: u64,
    pub active_rows: u64,
    pub row_ops: u64,
    pub n_active: i32,
    pub pad: i32,
    pub slices: u64,
    pub operands: u64,
    pub capture: u64,
    pub scratch: u64,
}

const _: () = assert!(std::mem::size_of::<SiteOp>() == 48);
const _: () = assert!(std::mem::size_of::<SitePlan>() == 64);

impl SitePlan {
    /// No ops: null pointers, `n_active` 0.
    pub const EMPTY: SitePlan = SitePlan { ops: 0, active_rows: 0, row_ops: 0, n_active: 0, pad: 0, slices: 0, operands: 0, capture: 0, scratch: 0 };
}

/// Collects the ops of one site. Rows are rows of the activation the plan will be applied to;
/// within a row, interventions apply in the order added, then captures (as `Hooks::apply`).
#[derive(Default)]
pub struct SitePlanBuilder {
    ops: Vec<SiteOp>,
    /// (start, len) pairs, flattened.
    slices: Vec<i32>,
    slice_index: HashMap<Vec<(usize, usize)>, i32>,
    operands: Vec<f32>,
    /// Host address and length of an operand already copied -> its offsets (content checked on reuse).
    operand_index: HashMap<(usize, usize, usize), Vec<usize>>,
    scratch_len: usize,
    /// Largest end of a selected range over all ops (the row width must be at least this).
    max_slice_end: usize,
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::input(format!("site plan: {what} {v} does not fit in 32 bits")))
}

impl SitePlanBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Copies `parts` (concatenated) into the operand buffer once per distinct host address and
    /// content; returns its float offset.
    fn intern(&mut self, parts: &[&[f32]]) -> usize {
        let key = (parts[0].as_ptr() as usize, parts.iter().map(|p| p.len()).sum::<usize>(), parts.last().map_or(0, |p| p.as_ptr() as usize));
        let same = |ops: &[f32], off: usize| {
            let mut o = off;
            parts.iter().all(|p| {
                let eq = bytemuck::cast_slice::<f32, u32>(&ops[o..o + p.len()]) == bytemuck::cast_slice::<f32, u32>(p);
                o += p.len();
                eq
            })
        };
        if let Some(offs) = self.operand_index.get(&key)
            && let Some(&off) = offs.iter().find(|&&off| same(&self.operands, off))
        {
            return off;
        }
        let off = self.operands.len();
        for p in parts {
            self.operands.extend_from_slice(p);
        }
        self.operand_index.entry(key).or_default().push(off);
        off
    }

    /// Interns a slice list (merged by [`merge_slices`]); returns (first pair, number of pairs).
    fn intern_slices(&mut self, merged: Vec<(usize, usize)>) -> Result<(i32, i32)> {
        let n = to_i32(merged.len(), "number of ranges")?;
        let end = merged.iter().map(|s| s.0 + s.1).max().unwrap_or(0);
        if let Some(&begin) = self.slice_index.get(&merged) {
            self.max_slice_end = self.max_slice_end.max(end);
            return Ok((begin, n));
        }
        let begin = to_i32(self.slices.len() / 2, "range index")?;
        self.max_slice_end = self.max_slice_end.max(end);
        for &(a, len) in &merged {
            self.slices.push(a as i32);
            self.slices.push(len as i32);
        }
        self.slice_index.insert(merged, begin);
        Ok((begin, n))
    }

    /// Adds `op` on row `row` (absolute position `pos`, the noise key of RandomEqualNorm) over the
    /// selected element ranges `slices` ((start, len), in the order of the selected vector).
    /// `operand_row` picks the row of a per-row Patch (`values` `[n_rows, W]`); ignored otherwise.
    /// Operand sizes are checked as `Hooks::new` does; `Add::normalize` is ignored, as in
    /// `apply_op` (`Hooks::new` normalises `v` beforehand).
    pub fn add_op(&mut self, row: usize, pos: usize, op: &Op, operand_row: usize, slices: &[(usize, usize)]) -> Result<()> {
        let (merged, w) = merge_slices(slices)?;
        let mut s = SiteOp { row: to_i32(row, "row")?, pos: to_i32(pos, "position")?, width: w as i32, ..SiteOp::default() };
        check_operands(op, w, operand_row)?;
        (s.slice_begin, s.n_slices) = self.intern_slices(merged)?;
        match op {
            Op::Patch { values } => {
                s.code = SITE_PATCH;
                let src = if values.len() == w { values.as_slice() } else { &values[operand_row * w..(operand_row + 1) * w] };
                s.operand = self.intern(&[src]) as i64;
            }
            Op::Add { beta, v, .. } => {
                s.code = SITE_ADD;
                s.param = *beta;
                s.operand = self.intern(&[v]) as i64;
            }
            Op::ProjectSet { beta, p, v } => {
                s.code = SITE_PROJECT;
                s.param = *beta;
                s.operand = self.intern(&[p, v]) as i64;
                s.seed = self.scratch_len as u64;
                self.scratch_len += w;
            }
            Op::Zero => s.code = SITE_ZERO,
            Op::Mean { mean } => {
                s.code = SITE_MEAN;
                s.operand = self.intern(&[mean]) as i64;
            }
            Op::RandomEqualNorm { seed } => {
                s.code = SITE_RANDOM;
                s.seed = *seed;
            }
            Op::Scale { alpha } => {
                s.code = SITE_SCALE;
                s.param = *alpha;
            }
        }
        self.ops.push(s);
        Ok(())
    }

    /// Copies the whole row `row` (after its interventions) to the capture arena at float offset
    /// `capture_offset` (row width floats; the arena is given at [`DeviceSitePlan::bind`]).
    pub fn add_capture(&mut self, row: usize, capture_offset: usize) -> Result<()> {
        let operand = i64::try_from(capture_offset).map_err(|_| Error::input(format!("site plan: capture offset {capture_offset} is too large")))?;
        self.ops.push(SiteOp { row: to_i32(row, "row")?, code: SITE_CAPTURE, operand, ..SiteOp::default() });
        Ok(())
    }

    /// Groups the ops by row (ascending; stable: insertion order within a row, captures after
    /// interventions) and copies the plan to the device.
    pub fn upload(&self, driver: &Arc<dyn Driver>) -> Result<DeviceSitePlan> {
        if self.ops.is_empty() {
            return Ok(DeviceSitePlan::empty());
        }
        let mut ops = self.ops.clone();
        ops.sort_by_key(|o| (o.row, o.code == SITE_CAPTURE)); // stable
        let mut active_rows: Vec<i32> = Vec::new();
        let mut row_ops: Vec<i32> = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            if active_rows.last() != Some(&o.row) {
                active_rows.push(o.row);
                row_ops.push(to_i32(i, "op index")?);
            }
        }
        row_ops.push(to_i32(ops.len(), "op count")?);
        let captures: Vec<usize> = ops.iter().filter(|o| o.code == SITE_CAPTURE).map(|o| o.operand as usize).collect();
        let buf_i32 = |v: &[i32]| DeviceBuffer::from_slice(driver, v);
        Ok(DeviceSitePlan {
            bufs: Some(PlanBuffers {
                ops: DeviceBuffer::from_slice(driver, &ops)?,
                active_rows: buf_i32(&active_rows)?,
                row_ops: buf_i32(&row_ops)?,
                slices: if self.slices.is_empty() { None } else { Some(buf_i32(&self.slices)?) },
                operands: if self.operands.is_empty() { None } else { Some(DeviceBuffer::from_slice(driver, &self.operands)?) },
                scratch: if self.scratch_len == 0 { None } else { Some(DeviceBuffer::alloc(driver, self.scratch_len)?) },
            }),
            n_active: active_rows.len(),
            max_row: *active_rows.last().unwrap_or(&0) as usize,
            max_slice_end: self.max_slice_end,
            max_capture_offset: captures.iter().copied().max(),
        })
    }
}

/// Merges adjacent ranges (in order), drops empty ones, rejects overlaps; returns the ranges and
/// the selected width.
fn merge_slices(slices: &[(usize, usize)]) -> Result<(Vec<(usize, usize)>, usize)> {
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(slices.len());
    for &(a, n) in slices {
        if n == 0 {
            continue;
        }
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == a => last.1 += n,
            _ => merged.push((a, n)),
        }
    }
    // Overlapping ranges would apply element-wise ops twice where the reference (gather, apply,
    // scatter) applies them once.
    let mut sorted = merged.clone();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(Error::input(format!("site plan: selected ranges {:?} and {:?} overlap", w[0], w[1])));
        }
    }
    let width: usize = merged.iter().map(|s| s.1).sum();
    to_i32(width, "selected width")?;
    if let Some(end) = merged.iter().map(|s| s.0.checked_add(s.1)).max() {
        to_i32(end.unwrap_or(usize::MAX), "selected range end")?;
    }
    Ok((merged, width))
}

/// The operand sizes `apply_op` relies on, for a selection of width `w` (as `Hooks::new`).
fn check_operands(op: &Op, w: usize, operand_row: usize) -> Result<()> {
    let bad = |what: &str, got: usize, want: String| Err(Error::input(format!("site plan: {} {what} has {got} values, expected {want}", op.name())));
    match op {
        Op::Patch { values } => {
            let per_row = w > 0 && values.len() % w == 0 && operand_row < values.len() / w;
            if values.len() != w && !per_row {
                return bad("values", values.len(), format!("{w}, or rows of {w} with row {operand_row} among them"));
            }
        }
        Op::Add { v, .. } if v.len() != w => return bad("v", v.len(), w.to_string()),
        Op::ProjectSet { p, .. } if p.len() != w * w => return bad("P", p.len(), format!("{w} x {w}")),
        Op::ProjectSet { v, .. } if v.len() != w => return bad("v", v.len(), w.to_string()),
        Op::Mean { mean } if mean.len() != w => return bad("mean", mean.len(), w.to_string()),
        _ => {}
    }
    Ok(())
}

struct PlanBuffers {
    ops: DeviceBuffer<SiteOp>,
    active_rows: DeviceBuffer<i32>,
    row_ops: DeviceBuffer<i32>,
    slices: Option<DeviceBuffer<i32>>,
    operands: Option<DeviceBuffer<f32>>,
    scratch: Option<DeviceBuffer<f32>>,
}

/// A site plan on the device. Holds its buffers; the capture arena is the caller's, given at
/// [`DeviceSitePlan::bind`]. A plan is applied by one launch at a time (PROJECT's scratch).
pub struct DeviceSitePlan {
    bufs: Option<PlanBuffers>,
    n_active: usize,
    max_row: usize,
    max_slice_end: usize,
    max_capture_offset: Option<usize>,
}

fn ptr_of<T: Pod>(b: &Option<DeviceBuffer<T>>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr().0)
}

impl DeviceSitePlan {
    /// No ops.
    pub fn empty() -> DeviceSitePlan {
        DeviceSitePlan { bufs: None, n_active: 0, max_row: 0, max_slice_end: 0, max_capture_offset: None }
    }

    pub fn is_empty(&self) -> bool {
        self.bufs.is_none()
    }

    /// Rows with ops (the standalone kernel's grid).
    pub fn n_active(&self) -> usize {
        self.n_active
    }

    /// True when the plan copies rows out (it then needs a capture arena at `bind`).
    pub fn has_captures(&self) -> bool {
        self.max_capture_offset.is_some()
    }

    /// The kernel argument without checks and without a capture arena (captures are skipped).
    /// Prefer [`DeviceSitePlan::bind`] in checked entry points.
    pub fn raw(&self) -> SitePlan {
        match &self.bufs {
            None => SitePlan::EMPTY,
            Some(b) => SitePlan {
                ops: b.ops.ptr().0,
                active_rows: b.active_rows.ptr().0,
                row_ops: b.row_ops.ptr().0,
                n_active: self.n_active as i32,
                pad: 0,
                slices: ptr_of(&b.slices),
                operands: ptr_of(&b.operands),
                capture: 0,
                scratch: ptr_of(&b.scratch),
            },
        }
    }

    /// Checks the plan against an activation of `n_rows` rows of `row_width` floats (every row
    /// < n_rows, every selected range within the row, every capture inside `capture`) and returns
    /// the kernel argument with the capture arena set. A plan with captures needs an arena.
    pub fn bind(&self, n_rows: usize, row_width: usize, capture: Option<&DeviceBuffer<f32>>) -> Result<SitePlan> {
        let mut raw = self.raw();
        if self.is_empty() {
            return Ok(raw);
        }
        if self.max_row >= n_rows {
            return Err(Error::input(format!("site plan: row {} is out of range (the activation has {n_rows} rows)", self.max_row)));
        }
        if self.max_slice_end > row_width {
            return Err(Error::input(format!("site plan: a selected range ends at {}, past the row width {row_width}", self.max_slice_end)));
        }
        if row_width > i32::MAX as usize {
            return Err(Error::input(format!("site plan: row width {row_width} does not fit in 32 bits")));
        }
        if let Some(off) = self.max_capture_offset {
            let Some(c) = capture else {
                return Err(Error::input("site plan: the plan captures rows but no capture buffer was given"));
            };
            if off + row_width > c.len() {
                return Err(Error::input(format!("site plan: a capture at offset {off} of a {row_width}-float row overruns the capture buffer ({} floats)", c.len())));
            }
            raw.capture = c.ptr().0;
        }
        Ok(raw)
    }
}

/// Threads per block for a row of `n` elements: a multiple of 32, at most 256 (site ops need
/// whole warps; 256 keeps every kernel launchable whatever its register count).
pub(crate) fn row_block(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Applies `plan` in place to `x` (`[n_rows, width]`; the buffer may be longer). Captures go to
/// `capture`. Does nothing (no launch) for an empty plan.
pub fn site_ops(driver: &dyn Driver, x: &DeviceBuffer<f32>, n_rows: usize, width: usize, plan: &DeviceSitePlan, capture: Option<&DeviceBuffer<f32>>) -> Result<()> {
    if x.len() < n_rows * width {
        return Err(Error::input(format!("site_ops: x has {} floats, expected {n_rows} x {width}", x.len())));
    }
    let raw = plan.bind(n_rows, width, capture)?;
    if plan.is_empty() {
        return Ok(());
    }
    let cfg = LaunchConfig { grid: (plan.n_active() as u32, 1, 1), block: (row_block(width), 1, 1), shared_bytes: 0 };
    // SAFETY: x holds n_rows x width floats; bind checked every row, range and capture of the
    // plan against that shape and the capture buffer; the plan's own buffers live in `plan`.
    unsafe { KernelArgs::new().ptr(x.ptr()).i32(width as i32).value(raw).launch(driver, "site_ops_f32", cfg) }
}

/// Device address of an optional buffer (null when None).
pub(crate) fn opt_ptr<T: Pod>(b: Option<&DeviceBuffer<T>>) -> DevPtr {
    b.map_or(DevPtr::NULL, |b| b.ptr())
}
