//! Interventions: one contract for everything (DESIGN.md section 3). At a site, for selected
//! rows (prompt, position) and selected units (heads, neurons, dimensions), an intervention maps
//! the activation to a new value. Captures copy the (possibly modified) value out.
//!
//! The functions here are the reference semantics every fast path reproduces. [`spec`] is the
//! grammar the command line and JSON spec files use to name interventions.

pub mod held;
pub mod spec;

use std::collections::HashMap;

use crate::learn::directions::project_set;
use crate::model::config::ModelConfig;
use crate::rng::gaussian;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};
pub use held::{Held, HeldRows};

/// What an intervention does to the selected slice `x` (width W = selected units x unit width).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// x <- source activation. `values` is `[n_rows, W]`, one row per selected (prompt, position)
    /// in prompt-major order, or `[W]` for the same value at every row.
    Patch { values: Vec<f32> },
    /// As `Patch`, from rows an engine holds (`RunRequest::hold_captures`): the selected
    /// elements of x <- the same elements of a held row of the same site kind (held rows are
    /// whole rows), one row per selected (prompt, position) in prompt-major order, or one for
    /// every row. Only the engine that holds them reads them in place; the CPU reference reads
    /// host-held rows (`Hooks::new` turns them into a `Patch`).
    PatchHeld { from: HeldRows },
    /// x <- x + beta * v, v (W) scaled to unit norm first when `normalize`.
    Add { beta: f32, v: Vec<f32>, normalize: bool },
    /// x <- x - beta * P x + v, P `[W, W]` row-major (a projection onto a subspace), v (W).
    ProjectSet { beta: f32, p: Vec<f32>, v: Vec<f32> },
    /// x <- 0
    Zero,
    /// x <- mean (W)
    Mean { mean: Vec<f32> },
    /// x <- a Gaussian vector rescaled to |x|; the noise depends only on (seed, position,
    /// element), so batching does not change it.
    RandomEqualNorm { seed: u64 },
    /// x <- alpha * x
    Scale { alpha: f32 },
}

impl Op {
    /// True when the op leaves every x unchanged (Add with beta 0, project-out with beta 0,
    /// Scale by 1): such a run is the clean run.
    pub fn is_identity(&self) -> bool {
        match self {
            Op::Add { beta, .. } => *beta == 0.0,
            Op::ProjectSet { beta, v, .. } => *beta == 0.0 && v.iter().all(|&x| x == 0.0),
            Op::Scale { alpha } => *alpha == 1.0,
            Op::Patch { .. } | Op::PatchHeld { .. } | Op::Zero | Op::Mean { .. } | Op::RandomEqualNorm { .. } => false,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Patch { .. } | Op::PatchHeld { .. } => "patch",
            Op::Add { .. } => "add",
            Op::ProjectSet { .. } => "project_set",
            Op::Zero => "zero",
            Op::Mean { .. } => "mean",
            Op::RandomEqualNorm { .. } => "random_equal_norm",
            Op::Scale { .. } => "scale",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Intervention {
    pub site: Site,
    /// Prompts of the batch it applies to (indices); None = every prompt.
    pub prompts: Option<Vec<usize>>,
    pub positions: Positions,
    /// Units selected (heads at head sites, neurons at mlp.hook_post, dimensions at d_model
    /// sites); None = the whole row.
    pub units: Option<Vec<usize>>,
    pub op: Op,
}

/// The interventions of a forward call that runs `prompts[batch]` of a list of prompts, given
/// for the whole list: each intervention's `prompts` are indices into `prompts` (None: all of
/// them), made relative to the call here; a Patch with one value row per (prompt, position)
/// keeps the rows of the call's prompts. Interventions that select none of the call's prompts
/// are left out. Errors name a prompt index out of range or a Patch whose row count is wrong.
pub fn for_batch(interventions: &[Intervention], cfg: &ModelConfig, prompts: &[Vec<u32>], batch: std::ops::Range<usize>) -> Result<Vec<Intervention>> {
    let mut out = Vec::new();
    for (i, iv) in interventions.iter().enumerate() {
        let what = || format!("intervention {i} ({} at {})", iv.op.name(), iv.site);
        let order: Vec<usize> = iv.prompts.clone().unwrap_or_else(|| (0..prompts.len()).collect());
        if let Some(&bad) = order.iter().find(|&&p| p >= prompts.len()) {
            return Err(Error::input(format!("{}: prompt {bad} is out of range ({} prompts)", what(), prompts.len())));
        }
        let in_batch: Vec<usize> = order.iter().copied().filter(|p| batch.contains(p)).collect();
        if in_batch.is_empty() {
            continue;
        }
        // A Patch (or PatchHeld) with one row per (prompt, position) keeps its rows of the batch.
        let op = match &iv.op {
            Op::Patch { .. } | Op::PatchHeld { .. } => {
                let (n_units, unit_w) = iv.site.kind.units(cfg, 0);
                let width = iv.units.as_ref().map_or(n_units, Vec::len) * unit_w;
                let one_row = match &iv.op {
                    Op::PatchHeld { from } => from.rows.len() == 1,
                    Op::Patch { values } => values.len() == width,
                    _ => false,
                };
                let rows = |p: usize| iv.positions.resolve(prompts[p].len()).map(|r| r.len()).map_err(|e| Error::input(format!("{}, prompt {p}: {e}", what())));
                if one_row {
                    iv.op.clone()
                } else {
                    let counts = order.iter().map(|&p| rows(p)).collect::<Result<Vec<_>>>()?;
                    let total: usize = counts.iter().sum();
                    let mut kept = Vec::new(); // operand rows of the batch's prompts
                    let mut row = 0;
                    for (&p, n) in order.iter().zip(counts) {
                        if batch.contains(&p) {
                            kept.extend(row..row + n);
                        }
                        row += n;
                    }
                    match &iv.op {
                        Op::Patch { values } if values.len() == total * width => Op::Patch { values: kept.iter().flat_map(|&r| values[r * width..(r + 1) * width].iter().copied()).collect() },
                        Op::Patch { values } => {
                            return Err(Error::input(format!("{}: patch values have {} elements, expected {width} (one row) or {total} x {width} (one row per prompt and position)", what(), values.len())));
                        }
                        Op::PatchHeld { from } if from.rows.len() == total => Op::PatchHeld { from: from.select(kept) },
                        Op::PatchHeld { from } => return Err(Error::input(format!("{}: {} held rows, expected 1 or {total} (one per prompt and position)", what(), from.rows.len()))),
                        op => op.clone(),
                    }
                }
            }
            op => op.clone(),
        };
        let local = (iv.prompts.is_some() || batch != (0..prompts.len())).then(|| in_batch.iter().map(|p| p - batch.start).collect());
        out.push(Intervention { site: iv.site, prompts: local, positions: iv.positions.clone(), units: iv.units.clone(), op });
    }
    Ok(out)
}

/// A request to copy a site out at the given positions of every prompt.
#[derive(Clone, Debug)]
pub struct Capture {
    pub site: Site,
    pub positions: Positions,
}

/// A captured tensor: `[n_rows, per-token shape...]` with rows in prompt-major order.
#[derive(Clone, Debug)]
pub struct Captured {
    pub site: Site,
    /// Per prompt, the absolute positions captured (row order within that prompt).
    pub positions: Vec<Vec<usize>>,
    /// Per-token shape (e.g. `[n_heads, d_head]`).
    pub token_shape: Vec<usize>,
    /// `[n_rows, prod(token_shape)]`
    pub data: Vec<f32>,
}

/// Interventions and captures resolved against one batch: rows are (prompt, absolute position).
pub struct Hooks {
    by_site: HashMap<Site, SiteHooks>,
    captured: Vec<Captured>,
    /// Key axis of Pattern rows (>= the longest sequence of the call).
    n_keys: usize,
}

#[derive(Default)]
struct SiteHooks {
    /// Indices into the intervention list, in the order given.
    interventions: Vec<ResolvedIntervention>,
    /// Indices into `Hooks::captured`.
    captures: Vec<usize>,
}

struct ResolvedIntervention {
    /// (prompt, position, operand row)
    rows: Vec<(usize, usize, usize)>,
    /// Element ranges of the row selected, in order: (start, len).
    slices: Vec<(usize, usize)>,
    op: Op,
}

/// One intervention on one row of a forward call.
pub struct RowOp<'a> {
    pub row: usize,
    /// Absolute position (the noise key of RandomEqualNorm).
    pub pos: usize,
    /// Row of the operand (patch values) for this (prompt, position).
    pub operand_row: usize,
    pub op: &'a Op,
    /// Element ranges (start, len) of the row the op acts on.
    pub slices: &'a [(usize, usize)],
}

/// One captured row of a forward call.
pub struct RowCapture {
    pub row: usize,
    /// Index into the captures.
    pub capture: usize,
    /// Row of the capture's output.
    pub out_row: usize,
}

/// Where the rows of one forward call sit: sequence `s` contributes positions
/// `cache_len[s] .. cache_len[s] + new_len[s]` at rows `row_start[s] ..`.
#[derive(Clone, Debug)]
pub struct RowMap {
    pub row_start: Vec<usize>,
    pub cache_len: Vec<usize>,
    pub new_len: Vec<usize>,
}

impl RowMap {
    pub fn new(cache_len: Vec<usize>, new_len: Vec<usize>) -> RowMap {
        let mut row_start = Vec::with_capacity(new_len.len());
        let mut r = 0;
        for &n in &new_len {
            row_start.push(r);
            r += n;
        }
        RowMap { row_start, cache_len, new_len }
    }
    pub fn n_rows(&self) -> usize {
        self.new_len.iter().sum()
    }
    pub fn n_seqs(&self) -> usize {
        self.new_len.len()
    }
    /// Total length of sequence `s` after this call.
    pub fn total_len(&self, s: usize) -> usize {
        self.cache_len[s] + self.new_len[s]
    }
    /// The row computing position `pos` of sequence `s`, if this call computes it.
    pub fn row(&self, s: usize, pos: usize) -> Option<usize> {
        (pos >= self.cache_len[s] && pos < self.total_len(s)).then(|| self.row_start[s] + pos - self.cache_len[s])
    }
    /// (sequence, position) of every row.
    pub fn row_positions(&self) -> Vec<(usize, usize)> {
        (0..self.n_seqs()).flat_map(|s| (self.cache_len[s]..self.total_len(s)).map(move |p| (s, p))).collect()
    }
    /// The (sequence, position) pairs of `positions` (relative to each sequence's total length)
    /// that this call computes, sequence-major; None selects nothing. `what` names the request
    /// in errors.
    pub fn select(&self, positions: Option<&Positions>, what: &str) -> Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        if let Some(p) = positions {
            for s in 0..self.n_seqs() {
                for pos in p.resolve(self.total_len(s)).map_err(|e| Error::input(format!("{what} of prompt {s}: {e}")))? {
                    if self.row(s, pos).is_some() {
                        out.push((s, pos));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Longest total length: the key count of Pattern rows.
    pub fn max_len(&self) -> usize {
        (0..self.n_seqs()).map(|s| self.total_len(s)).max().unwrap_or(0)
    }
}

impl Hooks {
    /// No interventions, no captures.
    pub fn none() -> Hooks {
        Hooks { by_site: HashMap::new(), captured: Vec::new(), n_keys: 0 }
    }

    /// Resolves positions against the sequence lengths (after this call) and checks every
    /// index and operand size, so the forward cannot fail half-way on bad input. Captured
    /// patterns have `n_keys` key columns (None: the longest sequence of the call).
    pub fn new(cfg: &ModelConfig, rows: &RowMap, interventions: &[Intervention], captures: &[Capture], n_keys: Option<usize>) -> Result<Hooks> {
        let n_seqs = rows.n_seqs();
        let n_keys = n_keys.unwrap_or(0).max(rows.max_len());
        let mut by_site: HashMap<Site, SiteHooks> = HashMap::new();
        for (i, iv) in interventions.iter().enumerate() {
            let what = format!("intervention {i} ({} at {})", iv.op.name(), iv.site);
            iv.site.check(cfg)?;
            if iv.site.kind == SiteKind::Pattern {
                return Err(Error::input(format!("{what}: attention patterns can be captured, not intervened on")));
            }
            let (n_units, unit_w) = iv.site.kind.units(cfg, n_keys);
            let slices: Vec<(usize, usize)> = match &iv.units {
                None => vec![(0, n_units * unit_w)],
                Some(u) => {
                    if u.is_empty() {
                        return Err(Error::input(format!("{what}: empty {} list", iv.site.kind.unit_name())));
                    }
                    let mut seen = vec![false; n_units];
                    for &h in u {
                        if h >= n_units {
                            return Err(Error::input(format!("{what}: {} {h} is out of range (0..{n_units})", iv.site.kind.unit_name())));
                        }
                        if std::mem::replace(&mut seen[h], true) {
                            return Err(Error::input(format!("{what}: {} {h} is listed twice", iv.site.kind.unit_name())));
                        }
                    }
                    u.iter().map(|&h| (h * unit_w, unit_w)).collect()
                }
            };
            let width: usize = slices.iter().map(|s| s.1).sum();
            let prompts: Vec<usize> = match &iv.prompts {
                None => (0..n_seqs).collect(),
                Some(p) => {
                    if let Some(&bad) = p.iter().find(|&&p| p >= n_seqs) {
                        return Err(Error::input(format!("{what}: prompt {bad} is out of range (the batch has {n_seqs})")));
                    }
                    p.clone()
                }
            };
            let mut resolved_rows = Vec::new();
            for &s in &prompts {
                for pos in iv.positions.resolve(rows.total_len(s)).map_err(|e| Error::input(format!("{what}, prompt {s}: {e}")))? {
                    let k = resolved_rows.len();
                    resolved_rows.push((s, pos, k));
                }
            }
            check_operands(&iv.op, width, resolved_rows.len()).map_err(|e| Error::input(format!("{what}: {e}")))?;
            let op = match &iv.op {
                Op::PatchHeld { from } => {
                    if from.width() != n_units * unit_w {
                        return Err(Error::input(format!("{what}: held rows of {} floats, the site's rows have {}", from.width(), n_units * unit_w)));
                    }
                    match from.gather(&slices) {
                        Some(values) => Op::Patch { values },
                        None => iv.op.clone(),
                    }
                }
                Op::Add { beta, v, normalize: true } => {
                    let n = norm(v);
                    if n == 0.0 {
                        return Err(Error::input(format!("{what}: cannot normalise a zero vector")));
                    }
                    Op::Add { beta: *beta, v: v.iter().map(|x| x / n).collect(), normalize: false }
                }
                op => op.clone(),
            };
            by_site.entry(iv.site).or_default().interventions.push(ResolvedIntervention { rows: resolved_rows, slices, op });
        }
        let mut captured = Vec::new();
        for c in captures {
            c.site.check(cfg)?;
            let positions = (0..n_seqs)
                .map(|s| c.positions.resolve(rows.total_len(s)).map_err(|e| Error::input(format!("capture of {}, prompt {s}: {e}", c.site))))
                .collect::<Result<Vec<_>>>()?;
            let n: usize = positions.iter().map(Vec::len).sum();
            let token_shape = c.site.kind.token_shape(cfg, n_keys);
            let width: usize = token_shape.iter().product();
            by_site.entry(c.site).or_default().captures.push(captured.len());
            captured.push(Captured { site: c.site, positions, token_shape, data: vec![0.0; n * width] });
        }
        Ok(Hooks { by_site, captured, n_keys })
    }

    pub fn n_keys(&self) -> usize {
        self.n_keys
    }

    /// True when a patch reads rows a device holds: only that device's forward applies it
    /// (`Hooks::new` turned host-held rows into plain patches).
    pub fn reads_device_held(&self) -> bool {
        self.by_site.values().flat_map(|h| &h.interventions).any(|iv| matches!(iv.op, Op::PatchHeld { .. }))
    }

    /// True when anything (intervention or capture) happens at `site`: the forward uses this to
    /// decide whether to materialise optional tensors (per-head outputs, patterns).
    pub fn touches(&self, site: Site) -> bool {
        self.by_site.contains_key(&site)
    }

    /// The interventions at `site` on the rows of this call, in application order.
    pub fn row_ops(&self, site: Site, rows: &RowMap) -> Vec<RowOp<'_>> {
        let Some(h) = self.by_site.get(&site) else { return Vec::new() };
        h.interventions
            .iter()
            .flat_map(|iv| {
                iv.rows.iter().filter_map(move |&(s, pos, k)| {
                    rows.row(s, pos).map(|row| RowOp { row, pos, operand_row: k, op: &iv.op, slices: &iv.slices })
                })
            })
            .collect()
    }

    /// The captures at `site` of the rows of this call: (row, capture index, output row).
    pub fn row_captures(&self, site: Site, rows: &RowMap) -> Vec<RowCapture> {
        let Some(h) = self.by_site.get(&site) else { return Vec::new() };
        let mut out = Vec::new();
        for &capture in &h.captures {
            let c = &self.captured[capture];
            let mut out_row = 0;
            for (s, poss) in c.positions.iter().enumerate() {
                for &pos in poss {
                    if let Some(row) = rows.row(s, pos) {
                        out.push(RowCapture { row, capture, out_row });
                    }
                    out_row += 1;
                }
            }
        }
        out
    }

    /// The captures (their data filled as sites pass).
    pub fn captured(&self) -> &[Captured] {
        &self.captured
    }

    pub fn captured_mut(&mut self, capture: usize) -> &mut Captured {
        &mut self.captured[capture]
    }

    /// Applies the interventions at `site` to `x` (`[n_rows, width]`), then captures.
    pub fn apply(&mut self, site: Site, rows: &RowMap, x: &mut [f32], width: usize) {
        let mut slice = Vec::new();
        for ro in self.row_ops(site, rows) {
            let row = &mut x[ro.row * width..(ro.row + 1) * width];
            slice.clear();
            for &(a, n) in ro.slices {
                slice.extend_from_slice(&row[a..a + n]);
            }
            apply_op(ro.op, &mut slice, ro.operand_row, ro.pos);
            let mut o = 0;
            for &(a, n) in ro.slices {
                row[a..a + n].copy_from_slice(&slice[o..o + n]);
                o += n;
            }
        }
        for rc in self.row_captures(site, rows) {
            let c = &mut self.captured[rc.capture];
            let w: usize = c.token_shape.iter().product();
            // Pattern rows may be narrower than the capture (keys of a shorter call).
            let n = w.min(width);
            c.data[rc.out_row * w..rc.out_row * w + n].copy_from_slice(&x[rc.row * width..rc.row * width + n]);
        }
    }

    /// The captures, in the order they were requested.
    pub fn into_captured(self) -> Vec<Captured> {
        self.captured
    }
}

/// The operand sizes [`apply_op`] relies on, for a selection of `width` values: a Patch holds
/// one row of `width` values or `n_rows` rows of them (one per resolved row), Add's v and Mean's
/// mean `width` values, ProjectSet's P `width x width` and v `width`. The error names the
/// operand; callers add where it was given. Used by [`Hooks::new`] and by the backend's device
/// site plans.
pub fn check_operands(op: &Op, width: usize, n_rows: usize) -> std::result::Result<(), String> {
    let want = |name: &str, got: usize, expect: usize| {
        if got == expect { Ok(()) } else { Err(format!("{name} has {got} values, expected {expect}")) }
    };
    match op {
        Op::Patch { values } => {
            if values.len() == width || values.len() == width * n_rows {
                Ok(())
            } else {
                Err(format!("patch values have {} elements, expected {width} (one row) or {n_rows} x {width}", values.len()))
            }
        }
        Op::PatchHeld { from } => {
            if from.rows.len() == 1 || from.rows.len() == n_rows {
                Ok(())
            } else {
                Err(format!("{} held rows, expected 1 or {n_rows}", from.rows.len()))
            }
        }
        Op::Add { v, .. } => want("v", v.len(), width),
        Op::ProjectSet { p, v, .. } => want("P", p.len(), width * width).and(want("v", v.len(), width)),
        Op::Mean { mean } => want("mean", mean.len(), width),
        Op::Zero | Op::RandomEqualNorm { .. } | Op::Scale { .. } => Ok(()),
    }
}

/// The reference semantics of every op on one selected slice `x` (W). `k` is the operand row
/// (for patches), `pos` the absolute position (for the noise).
pub fn apply_op(op: &Op, x: &mut [f32], k: usize, pos: usize) {
    let w = x.len();
    match op {
        Op::Patch { values } => {
            let src = if values.len() == w { values.as_slice() } else { &values[k * w..(k + 1) * w] };
            x.copy_from_slice(src);
        }
        // Host-held rows reach here as a Patch (`Hooks::new`); rows a device holds are read only
        // by that device's kernels, and the CPU forward refuses them. NaN, never stale values,
        // should one get here.
        Op::PatchHeld { .. } => x.fill(f32::NAN),
        Op::Add { beta, v, .. } => x.iter_mut().zip(v).for_each(|(x, v)| *x += beta * v),
        Op::ProjectSet { beta, p, v } => project_set(x, w, *beta, p, v),
        Op::Zero => x.fill(0.0),
        Op::Mean { mean } => x.copy_from_slice(mean),
        Op::RandomEqualNorm { seed } => {
            let target = norm(x);
            let r: Vec<f32> = (0..w).map(|i| gaussian(*seed, pos as u64, i as u64)).collect();
            let rn = norm(&r);
            let s = if rn > 0.0 { target / rn } else { 0.0 };
            x.iter_mut().zip(&r).for_each(|(x, r)| *x = r * s);
        }
        Op::Scale { alpha } => x.iter_mut().for_each(|x| *x *= alpha),
    }
}

/// f32 dot product (sequential sum).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}
