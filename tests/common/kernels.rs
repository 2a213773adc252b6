//! Helpers of the kernel tests (tests/kernel_*.rs, tests/device_forward.rs; `common::kernels`):
//! the devices under test, buffers, bf16 rounding, a seeded RNG for fresh random inputs, and a
//! host mirror of a site plan that applies `site_op_ref` (`intervene::apply_op`) as the reference.
//!
//! The device: by default the emulator in forward and reverse fiber order; with
//! `PATCHBAY_TEST_DEVICE=cuda` (or `cuda:N`) that GPU instead. The inputs: fresh from the clock
//! every run, the seed printed; `PATCHBAY_TEST_SEED=<seed>` replays a run.
#![allow(dead_code)]

use std::sync::Arc;

use patchbay::backend::DeviceSpec;
use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::emu::{EmuDriver, FiberOrder};
use patchbay::backend::ops::site_ops::{SitePlanBuilder, site_op_ref};
use patchbay::intervene::Op;
use patchbay::rng::splitmix64;

/// The devices the kernel tests run on, each with its name for messages: the emulator in
/// forward and reverse fiber order (`fwd`, `rev`: a missing barrier shows in one of them), or
/// the GPU of `PATCHBAY_TEST_DEVICE` alone (`cuda:N`).
pub fn test_drivers() -> Vec<(String, Arc<dyn Driver>)> {
    match gpu_under_test() {
        Some(gpu) => vec![gpu],
        None => [FiberOrder::Forward, FiberOrder::Reverse].into_iter().map(emulator).collect(),
    }
}

/// One device to run on, with its name: the GPU of `PATCHBAY_TEST_DEVICE` when set, else the
/// emulator in fiber order `order`.
pub fn test_driver(order: FiberOrder) -> (String, Arc<dyn Driver>) {
    gpu_under_test().unwrap_or_else(|| emulator(order))
}

fn emulator(order: FiberOrder) -> (String, Arc<dyn Driver>) {
    (order.to_string(), Arc::new(EmuDriver::with_order(order)))
}

/// The GPU named by `PATCHBAY_TEST_DEVICE` (`cuda`, `cuda:N`), opened; None when the variable is
/// unset, empty or `emu`. Panics when it names anything else or the GPU cannot be opened.
fn gpu_under_test() -> Option<(String, Arc<dyn Driver>)> {
    const VAR: &str = "PATCHBAY_TEST_DEVICE";
    let s = match std::env::var(VAR) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) | Err(std::env::VarError::NotPresent) => return None,
        Err(e) => panic!("{VAR}: {e}"),
    };
    let spec: DeviceSpec = s.parse().unwrap_or_else(|e| panic!("{VAR}={s}: {e}"));
    match spec {
        DeviceSpec::Emu => None,
        DeviceSpec::Cpu => panic!("{VAR}={s}: the kernel tests need a device: cuda, cuda:N or emu"),
        DeviceSpec::Cuda(_) => {
            let drv = spec.driver().unwrap_or_else(|e| panic!("{VAR}={s}: {e}")).expect("a GPU has a driver");
            Some((spec.to_string(), drv))
        }
    }
}

/// A buffer of `n` elements poisoned with 0xFF bytes (NaN as f32 and bf16, -1 as i32).
pub fn poisoned<T: bytemuck::Pod>(drv: &Arc<dyn Driver>, n: usize) -> DeviceBuffer<T> {
    DeviceBuffer::filled(drv, n, 0xFF).unwrap()
}

pub fn upload<T: bytemuck::Pod>(drv: &Arc<dyn Driver>, v: &[T]) -> DeviceBuffer<T> {
    DeviceBuffer::from_slice(drv, v).unwrap()
}

/// Rounds like __float2bfloat16 (nearest even), back to f32.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

pub fn bf16_to_f32(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The seed of this run: PATCHBAY_TEST_SEED when set (to replay a failure), else fresh from the
/// clock. Tests print it (in their messages, or with `Rng::seeded`).
pub fn test_seed() -> u64 {
    match std::env::var("PATCHBAY_TEST_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("PATCHBAY_TEST_SEED={s} is not a u64")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
    }
}

/// A splitmix64 stream: fresh random inputs without a dependency, reproducible from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Fresh inputs for one test: the run's seed (printed, shown with a failure) mixed with `tag`.
    pub fn seeded(tag: u64) -> Rng {
        let seed = test_seed();
        eprintln!("inputs from seed {seed} (replay: PATCHBAY_TEST_SEED={seed})");
        Rng(seed ^ tag)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    /// A standard normal draw (Box-Muller on two 24-bit uniforms).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.unit() + 1e-7).min(1.0);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// One call on a site plan builder, kept on the host to replay with `site_op_ref`.
pub enum RefEntry {
    Op { row: usize, pos: usize, op: Arc<Op>, operand_row: usize, slices: Vec<(usize, usize)> },
    Capture { row: usize, offset: usize },
}

/// A site plan as a list of builder calls: builds the device plan and applies the reference.
#[derive(Default)]
pub struct RefPlan {
    pub entries: Vec<RefEntry>,
}

impl RefPlan {
    pub fn builder(&self) -> SitePlanBuilder {
        let mut b = SitePlanBuilder::new();
        for e in &self.entries {
            match e {
                RefEntry::Op { row, pos, op, operand_row, slices } => b.add_op(*row, *pos, op, *operand_row, slices).unwrap(),
                RefEntry::Capture { row, offset } => b.add_capture(*row, *offset).unwrap(),
            }
        }
        b
    }

    /// As `Hooks::apply`: per row, the interventions in the order added (gather the selected
    /// ranges, `apply_op`, scatter), then the captures of the whole row.
    pub fn apply(&self, x: &mut [f32], width: usize, capture: &mut [f32]) {
        for e in &self.entries {
            if let RefEntry::Op { row, pos, op, operand_row, slices } = e {
                let r = &mut x[row * width..(row + 1) * width];
                let mut sel: Vec<f32> = slices.iter().flat_map(|&(a, n)| r[a..a + n].to_vec()).collect();
                site_op_ref(op, &mut sel, *operand_row, *pos);
                let mut o = 0;
                for &(a, n) in slices {
                    r[a..a + n].copy_from_slice(&sel[o..o + n]);
                    o += n;
                }
            }
        }
        for e in &self.entries {
            if let RefEntry::Capture { row, offset } = e {
                capture[*offset..*offset + width].copy_from_slice(&x[row * width..(row + 1) * width]);
            }
        }
    }

    pub fn n_ops(&self) -> usize {
        self.entries.len()
    }
}

/// Disjoint selected ranges of a row of `width`, in a random order of one of three shapes:
/// the whole row, adjacent units in order (merged by the builder), or scattered ranges.
pub fn random_slices(rng: &mut Rng, width: usize) -> Vec<(usize, usize)> {
    match rng.below(3) {
        0 => vec![(0, width)],
        1 => {
            let u = 1 + rng.below(width.min(8));
            let n_units = width / u;
            let k = 1 + rng.below(n_units.min(4));
            let first = rng.below(n_units - k + 1);
            (first..first + k).map(|i| (i * u, u)).collect()
        }
        _ => {
            let m = 1 + rng.below(width.div_ceil(2).min(4));
            let mut cuts: Vec<usize> = Vec::new();
            while cuts.len() < 2 * m {
                let c = rng.below(width + 1);
                if !cuts.contains(&c) {
                    cuts.push(c);
                }
            }
            cuts.sort_unstable();
            let mut s: Vec<(usize, usize)> = cuts.chunks(2).map(|c| (c[0], c[1] - c[0])).collect();
            rng.shuffle(&mut s);
            s
        }
    }
}

/// An op of kind `kind` (0..7, the order of `Op`) over a selection of width `w`; a per-row Patch
/// gets `n_src` source rows.
pub fn random_op(rng: &mut Rng, kind: usize, w: usize, n_src: usize) -> Op {
    match kind {
        0 => {
            let n = if rng.coin() { w } else { n_src * w };
            Op::Patch { values: rng.normals(n) }
        }
        1 => Op::Add { beta: rng.uniform(-2.0, 2.0), v: rng.normals(w), normalize: rng.coin() },
        2 => {
            // P = U V^T with orthonormal columns (rank k): a map onto a subspace like the
            // projections the op is for (|P x| <= |x|), not symmetric, so a transposed index shows.
            let k = 1 + rng.below(w.clamp(1, 3));
            let (u, v) = (orthonormal(rng, w, k), orthonormal(rng, w, k));
            let p = (0..w * w).map(|ij| (0..k).map(|c| u[c][ij / w] * v[c][ij % w]).sum::<f64>() as f32).collect();
            Op::ProjectSet { beta: rng.uniform(-1.0, 2.0), p, v: rng.normals(w) }
        }
        3 => Op::Zero,
        4 => Op::Mean { mean: rng.normals(w) },
        5 => Op::RandomEqualNorm { seed: rng.next_u64() },
        _ => Op::Scale { alpha: rng.uniform(-3.0, 3.0) },
    }
}

/// `k` orthonormal random vectors of length `w` (Gram-Schmidt in f64; k <= w).
pub fn orthonormal(rng: &mut Rng, w: usize, k: usize) -> Vec<Vec<f64>> {
    let mut cols: Vec<Vec<f64>> = Vec::new();
    while cols.len() < k {
        let mut c: Vec<f64> = (0..w).map(|_| rng.normal() as f64).collect();
        for q in &cols {
            let d: f64 = c.iter().zip(q).map(|(a, b)| a * b).sum();
            c.iter_mut().zip(q).for_each(|(a, b)| *a -= d * b);
        }
        let n = c.iter().map(|a| a * a).sum::<f64>().sqrt();
        if n > 1e-6 {
            cols.push(c.iter().map(|a| a / n).collect());
        }
    }
    cols
}

/// A random plan on `n_rows` rows of `width`: about a third of the rows (at least one) get 1-3
/// interventions of every kind in turn (`*kind` advances), some of them shared between rows
/// (same `Op`, same selection), and half of them a capture (sometimes added before an
/// intervention: captures still come after). Captures take consecutive regions of `width` from
/// `*cap_len` on. Positions are `pos0 + row`.
pub fn random_plan(rng: &mut Rng, n_rows: usize, width: usize, pos0: usize, kind: &mut usize, cap_len: &mut usize) -> RefPlan {
    let mut plan = RefPlan::default();
    let mut rows: Vec<usize> = (0..n_rows).filter(|_| rng.below(3) == 0).collect();
    if rows.is_empty() {
        rows.push(rng.below(n_rows));
    }
    rng.shuffle(&mut rows); // rows added out of order: the builder groups them
    let shared_slices = random_slices(rng, width);
    let shared_w: usize = shared_slices.iter().map(|s| s.1).sum();
    let shared_kind = 1 + rng.below(2) * 3; // Add or Mean
    let shared = Arc::new(random_op(rng, shared_kind, shared_w, 1));
    for &row in &rows {
        let capture_first = rng.below(4) == 0;
        if capture_first {
            plan.entries.push(RefEntry::Capture { row, offset: *cap_len });
            *cap_len += width;
        }
        for _ in 0..1 + rng.below(3) {
            if rng.below(4) == 0 {
                plan.entries.push(RefEntry::Op { row, pos: pos0 + row, op: shared.clone(), operand_row: 0, slices: shared_slices.clone() });
                continue;
            }
            let slices = random_slices(rng, width);
            let w: usize = slices.iter().map(|s| s.1).sum();
            let n_src = 1 + rng.below(3);
            let op = random_op(rng, *kind % 7, w, n_src);
            *kind += 1;
            plan.entries.push(RefEntry::Op { row, pos: pos0 + row, op: Arc::new(op), operand_row: rng.below(n_src), slices });
        }
        if !capture_first && rng.coin() {
            plan.entries.push(RefEntry::Capture { row, offset: *cap_len });
            *cap_len += width;
        }
    }
    plan
}
