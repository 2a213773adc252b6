//! Next-token sampling for generation (kernels/sample.cu, `sample_f32`): greedy, or temperature
//! + top-p with a counter-based draw keyed by (seed, step).
//!
//! The rule ([`sample_row`] is its reference, the CPU path uses it too), per row of logits x
//! over V tokens:
//! - temperature 0: the argmax, ties to the lowest id;
//! - else w[i] = exp((x[i] - max x) / temperature), Z = sum w (p = w / Z). The kept set K is the
//!   shortest prefix of the tokens ordered by (w descending, id ascending) whose mass reaches
//!   top_p * Z (top_p = 1 keeps all). With u = [`sample_uniform`]`(seed, step)`, the draw is the
//!   first id of K, in increasing id order, whose cumulative kept mass exceeds u * (mass of K).
//!
//! The device finds K without sorting (bisection on the threshold weight) and sums in f32; the
//! reference sums in f64. They pick the same id except when a decision lies within rounding of a
//! boundary; [`SampleDraw::margin`] says how far the reference's decisions were from theirs.

use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::backend::ops::common::at_least;
use crate::rng::splitmix64;
use crate::{Error, Result};

/// Domain separation of the sampling stream from other users of splitmix64 (`SAMPLE_SALT` in
/// kernels/sample.cu).
pub const SAMPLE_SALT: u64 = 0x7361_6d70_6c65_2121;

/// Most threads per block of `sample_f32`.
const MAX_THREADS: u32 = 1024;

/// Temperature, nucleus and seed of a sampling call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// >= 0, finite; 0 = greedy (top_p and seed unused).
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
}

impl SampleParams {
    /// Greedy decoding.
    pub const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_p: 1.0, seed: 0 };

    /// Errors unless temperature is finite and >= 0 and top_p in (0, 1].
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!("sampling: temperature {} must be finite and >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!("sampling: top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// The uniform draw of decode step `step` under `seed`, in [0, 1): the top 24 bits of
/// splitmix64(seed ^ splitmix64(step as u32 ^ SAMPLE_SALT)), divided by 2^24 (exact in f32).
/// It depends on (seed, step) only, never on a row's place in a batch: rows that must draw
/// independently at the same step need different seeds. `sample_uniform` in kernels/sample.cu
/// is bit-identical.
pub fn sample_uniform(seed: u64, step: i32) -> f32 {
    let h = splitmix64(seed ^ splitmix64(step as u32 as u64 ^ SAMPLE_SALT));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// The token drawn from one row, with the reference's distance to a different answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleDraw {
    pub id: i32,
    /// How close the closest decision was to flipping, as a relative quantity: the smallest of
    /// (a) |cumulative mass - u * kept mass| at the chosen token's two ends, / Z;
    /// (b) for top_p < 1, |mass of the kept prefix - top_p * Z| at the last kept token and the
    ///     one before it, / Z;
    /// (c) for top_p < 1, |w[j] - W| / W over tokens j whose logit differs from that of the last
    ///     kept token (weight W): how near another token was to swapping places with it.
    ///
    /// An implementation whose weights and sums carry relative errors below `margin` picks the
    /// same id. Infinite for greedy rows (exact comparisons only).
    pub margin: f64,
}

/// Reference semantics of one row: the token of logits `x` (V = x.len() >= 1) drawn with
/// uniform `u` in [0, 1) (see the module documentation for the rule). f64 math; logits are
/// finite or -inf (at least one finite). Sorts the row when top_p < 1.
pub fn sample_row(x: &[f32], temperature: f32, top_p: f32, u: f32) -> SampleDraw {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    if temperature == 0.0 {
        return SampleDraw { id: best as i32, margin: f64::INFINITY };
    }
    let m = x[best] as f64;
    let t = temperature as f64;
    let w: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / t).exp()).collect();
    let z: f64 = w.iter().sum();

    let mut keep = vec![true; x.len()];
    let mut margin = f64::INFINITY;
    if top_p < 1.0 {
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&i, &j| w[j].total_cmp(&w[i]).then(i.cmp(&j)));
        let target = top_p as f64 * z;
        let mut cum = 0.0f64;
        let mut k_last = order.len() - 1;
        for (k, &i) in order.iter().enumerate() {
            let prev = cum;
            cum += w[i];
            if cum >= target {
                k_last = k;
                margin = margin.min((cum - target) / z).min((target - prev) / z);
                break;
            }
        }
        keep.fill(false);
        order[..=k_last].iter().for_each(|&i| keep[i] = true);
        let last = order[k_last];
        let big_w = w[last];
        for (j, &wj) in w.iter().enumerate() {
            if x[j] != x[last] {
                margin = margin.min((wj - big_w).abs() / big_w);
            }
        }
    }

    let mass: f64 = (0..x.len()).filter(|&i| keep[i]).map(|i| w[i]).sum();
    let thresh = u as f64 * mass;
    let mut cum = 0.0f64;
    let mut pick = None;
    let mut last_kept = best;
    for i in (0..x.len()).filter(|&i| keep[i] && w[i] > 0.0) {
        let prev = cum;
        cum += w[i];
        last_kept = i;
        if cum > thresh {
            margin = margin.min((thresh - prev) / z).min((cum - thresh) / z);
            pick = Some(i);
            break;
        }
    }
    SampleDraw { id: pick.unwrap_or(last_kept) as i32, margin }
}

/// [`sample_row`] for each row of `logits` (`[n, v]`), row r drawing
/// `sample_uniform(params.seed, step[r])`.
pub fn sample_ref(logits: &[f32], v: usize, params: &SampleParams, step: &[i32]) -> Result<Vec<i32>> {
    params.check()?;
    if v == 0 || !logits.len().is_multiple_of(v) || logits.len() / v != step.len() {
        return Err(Error::input(format!("sampling: {} logits are not {} rows of {v} tokens", logits.len(), step.len())));
    }
    Ok(logits.chunks_exact(v).zip(step).map(|(x, &s)| sample_row(x, params.temperature, params.top_p, sample_uniform(params.seed, s)).id).collect())
}

/// The operands of one [`sample`] launch. Buffers may be longer than needed.
pub struct Sample<'a> {
    /// `[n, v]` logits.
    pub logits: &'a DeviceBuffer<f32>,
    pub n: usize,
    pub v: usize,
    pub params: SampleParams,
    /// `[n]` the decode step of each row (keys its draw).
    pub step: &'a DeviceBuffer<i32>,
    /// `[n]` out: the sampled token ids.
    pub out: &'a DeviceBuffer<i32>,
}

/// Threads per block for rows of `v` tokens: about 4 tokens per thread, a multiple of 32, at
/// most 1024.
fn block_threads(v: usize) -> u32 {
    (v.div_ceil(4).div_ceil(32) * 32).clamp(32, MAX_THREADS as usize) as u32
}

/// Launches `sample_f32` (one block per row) after checking the parameters, the shape and
/// every buffer's length. n = 0 is a no-op.
pub fn sample(driver: &dyn Driver, op: &Sample) -> Result<()> {
    op.params.check()?;
    let (n, v) = (op.n, op.v);
    if v == 0 || v > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::input(format!("sample: bad shape [{n}, {v}] (need 1 <= V, both < 2^31)")));
    }
    let nv = n.checked_mul(v).ok_or_else(|| Error::input(format!("sample: [{n}, {v}] overflows")))?;
    at_least("sample", "logits", op.logits, nv)?;
    at_least("sample", "step", op.step, n)?;
    at_least("sample", "out", op.out, n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig { grid: (n as u32, 1, 1), block: (block_threads(v), 1, 1), shared_bytes: 0 };
    // SAFETY: logits holds n x V floats, step and out n elements each (checked above);
    // temperature and top_p are in range; the block is a multiple of 32 up to 1024 threads.
    unsafe {
        KernelArgs::new()
            .ptr(op.logits.ptr())
            .i32(n as i32)
            .i32(v as i32)
            .f32(op.params.temperature)
            .f32(op.params.top_p)
            .u64(op.params.seed)
            .ptr(op.step.ptr())
            .ptr(op.out.ptr())
            .launch(driver, entry::SAMPLE_F32, cfg)
    }
}
