//! The CUDA emulator (emu/, src/backend/emu.rs) on its self-test kernels
//! (kernels/selftest/selftest.cu): every kernel in the fiber orders fwd, rev and rand:SEED
//! against a CPU reference on fresh random inputs, outputs poisoned (0xFF) before each run; the
//! planted bugs found (missing barrier) or reported as errors with file:line (divergent barrier,
//! shuffle on an exited lane, failed assert), never a hang; the CPU GEMM against an f32
//! reference; struct arguments through KernelArgs.
//!
//! Inputs come from a seed printed by each test; PATCHBAY_TEST_SEED=<seed> replays a failure.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchbay::backend::device::{DevPtr, DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use patchbay::backend::emu::{self, EmuDriver, FiberOrder};
use patchbay::backend::kernels::{self, Kernel, entry::selftest};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// splitmix64: reproducible inputs from the printed seed.
struct Rng(u64);

impl Rng {
    /// Fresh inputs for one test: the run's seed (printed) mixed with `tag`.
    fn seeded(tag: u64) -> Rng {
        let seed = match std::env::var("PATCHBAY_TEST_SEED") {
            Ok(s) => s.parse().expect("PATCHBAY_TEST_SEED is a u64"),
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        };
        eprintln!("inputs from seed {seed} (replay: PATCHBAY_TEST_SEED={seed})");
        Rng(seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// The three orders every kernel runs in; the random seed comes from the test's RNG.
fn orders(rng: &mut Rng) -> Vec<FiberOrder> {
    vec![FiberOrder::Forward, FiberOrder::Reverse, FiberOrder::Random(rng.next_u64() % 1_000_000)]
}

/// The emulated device in `order`, or None (with a note) in a build without the emulator.
fn device(order: FiberOrder) -> Option<Arc<dyn Driver>> {
    if !emu::available() {
        assert!(std::env::var("PATCHBAY_REQUIRE_NVRTC").as_deref() != Ok("1"), "PATCHBAY_REQUIRE_NVRTC=1 but this build has no emulator");
        eprintln!("skipped: this build has no CUDA emulator (run scripts/fetch-cuda.sh)");
        return None;
    }
    Some(Arc::new(EmuDriver::with_order(order)))
}

fn poisoned<T: bytemuck::Pod>(d: &Arc<dyn Driver>, n: usize) -> DeviceBuffer<T> {
    DeviceBuffer::filled(d, n, 0xFF).unwrap()
}

fn upload<T: bytemuck::Pod>(d: &Arc<dyn Driver>, v: &[T]) -> DeviceBuffer<T> {
    DeviceBuffer::from_slice(d, v).unwrap()
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid, block, shared_bytes }
}

/// Runs `f` on another thread; fails the test if it does not finish within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("no result within {secs} s: the emulator hangs"))
}

/// `|got - want| <= atol + rtol |want|` elementwise; reports the worst index.
fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g as f64 - w).abs() - (atol + rtol * w.abs());
        if excess.is_nan() || excess > worst.1 {
            worst = (i, if excess.is_nan() { f64::INFINITY } else { excess });
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: index {i}: got {}, want {} (atol {atol}, rtol {rtol})", got[i], want[i]);
}

/// The line of `kernels/selftest/selftest.cu` that carries the marker `ERROR-LINE: <tag>`.
fn error_line(tag: &str) -> String {
    let m = kernels::SELFTEST_MODULES.iter().find(|m| m.path.ends_with("selftest/selftest.cu")).expect("selftest module");
    let marker = format!("ERROR-LINE: {tag}");
    let n = m.source.lines().position(|l| l.contains(&marker)).unwrap_or_else(|| panic!("no `{marker}` in {}", m.path)) + 1;
    format!("{}:{n}", m.path)
}

/// Launches a kernel that must fail, within a timeout; returns the error message.
fn launch_error(order: FiberOrder, kernel: Kernel, c: LaunchConfig, args: impl FnOnce(&Arc<dyn Driver>) -> (KernelArgs, Vec<DeviceBuffer<f32>>) + Send + 'static) -> String {
    within(60, move || {
        let d = device(order).unwrap();
        let (a, _keep) = args(&d);
        // SAFETY: the arguments match the kernel's parameters and the buffers are large enough.
        let r = unsafe { a.launch(&*d, kernel, c) };
        let msg = r.expect_err("the launch must fail").to_string();
        eprintln!("{} ({order}): {msg}", kernel.name());
        msg
    })
}

// ---------------------------------------------------------------------------------------------
// Kernels against CPU references
// ---------------------------------------------------------------------------------------------

#[test]
fn block_reduce_matches_reference() {
    let mut rng = Rng::seeded(1);
    for (rows, n, threads) in [(64usize, 2048usize, 256u32), (7, 1999, 1024), (3, 5, 32), (1, 1, 64)] {
        let x = rng.vec(rows * n, -1.0, 1.0);
        let want: Vec<f64> = x.chunks(n).map(|r| r.iter().map(|&v| v as f64).sum()).collect();
        for order in orders(&mut rng) {
            let Some(d) = device(order) else { return };
            let xb = upload(&d, &x);
            let out = poisoned::<f32>(&d, rows);
            let args = KernelArgs::new().ptr(xb.ptr()).ptr(out.ptr()).i32(n as i32);
            // SAFETY: x is [rows, n], out is [rows]: the kernel's parameters.
            unsafe { args.launch(&*d, selftest::SELFTEST_BLOCK_REDUCE, cfg((rows as u32, 1, 1), (threads, 1, 1), 0)) }.unwrap();
            assert_close(&format!("block_reduce {rows}x{n} ({order})"), &out.download().unwrap(), &want, 2e-4, 1e-5);
        }
    }
}

#[test]
fn warp_ops_match_reference() {
    let mut rng = Rng::seeded(2);
    let rows = 37; // 4 warps per block: the last block has warps without a row
    let x: Vec<f32> = rng.vec(rows * 32, -1.0, 1.0);
    let rows_of = |r: usize| &x[r * 32..(r + 1) * 32];
    let sum: Vec<f64> = (0..rows).map(|r| rows_of(r).iter().map(|&v| v as f64).sum()).collect();
    let mx: Vec<f32> = (0..rows).map(|r| rows_of(r).iter().copied().fold(f32::MIN, f32::max)).collect();
    let ballot: Vec<u32> = (0..rows).map(|r| rows_of(r).iter().enumerate().map(|(l, &v)| ((v > 0.0) as u32) << l).sum()).collect();
    let scan: Vec<f64> = (0..rows)
        .flat_map(|r| rows_of(r).iter().scan(0.0f64, |acc, &v| { *acc += v as f64; Some(*acc) }).collect::<Vec<_>>())
        .collect();
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let xb = upload(&d, &x);
        let (s, m, b, aa, sc, tot) =
            (poisoned::<f32>(&d, rows), poisoned::<f32>(&d, rows), poisoned::<u32>(&d, rows), poisoned::<i32>(&d, rows * 2), poisoned::<f32>(&d, rows * 32), poisoned::<f32>(&d, rows));
        let args = KernelArgs::new().ptr(xb.ptr()).ptr(s.ptr()).ptr(m.ptr()).ptr(b.ptr()).ptr(aa.ptr()).ptr(sc.ptr()).ptr(tot.ptr()).i32(rows as i32);
        // SAFETY: buffers sized as the kernel's header says.
        unsafe { args.launch(&*d, selftest::SELFTEST_WARP_OPS, cfg((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0)) }.unwrap();
        assert_close(&format!("warp sum ({order})"), &s.download().unwrap(), &sum, 1e-5, 1e-5);
        assert_eq!(m.download().unwrap(), mx, "warp max ({order})");
        assert_eq!(b.download().unwrap(), ballot, "ballot ({order})");
        let aa = aa.download().unwrap();
        for r in 0..rows {
            assert_eq!(aa[2 * r], (ballot[r] != 0) as i32, "any, row {r} ({order})");
            assert_eq!(aa[2 * r + 1], 1, "all, row {r} ({order})");
        }
        let sc = sc.download().unwrap();
        assert_close(&format!("warp scan ({order})"), &sc, &scan, 1e-5, 1e-5);
        let tot = tot.download().unwrap();
        for r in 0..rows {
            assert_eq!(tot[r].to_bits(), sc[r * 32 + 31].to_bits(), "broadcast of lane 31, row {r} ({order})");
        }
    }
}

#[test]
fn dynamic_shared_memory_aliases_and_is_bounded() {
    let mut rng = Rng::seeded(3);
    let (rows, n, threads) = (5usize, 300usize, 128u32);
    let x = rng.vec(rows * n, -10.0, 10.0);
    let want: Vec<f64> = x.chunks(n).flat_map(|r| r.iter().rev().map(|&v| v as f64).collect::<Vec<_>>()).collect();
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let xb = upload(&d, &x);
        let out = poisoned::<f32>(&d, rows * n);
        let counts = poisoned::<i32>(&d, rows);
        let args = KernelArgs::new().ptr(xb.ptr()).ptr(out.ptr()).ptr(counts.ptr()).i32(n as i32);
        // SAFETY: x, out are [rows, n], counts [rows]; shared = n floats + 1 int.
        unsafe { args.launch(&*d, selftest::SELFTEST_DYNAMIC_SMEM, cfg((rows as u32, 1, 1), (threads, 1, 1), (n * 4 + 4) as u32)) }.unwrap();
        assert_close(&format!("reversed row ({order})"), &out.download().unwrap(), &want, 0.0, 0.0);
        assert_eq!(counts.download().unwrap(), vec![threads as i32; rows], "shared counter ({order})");
    }
    // One int short: the counter lies past the launch's shared memory, on the guard page.
    let msg = launch_error(FiberOrder::Forward, selftest::SELFTEST_DYNAMIC_SMEM, cfg((1, 1, 1), (32, 1, 1), (n * 4) as u32), move |d| {
        let xb = upload(d, &vec![0.0f32; n]);
        let out = poisoned::<f32>(d, n);
        let counts = poisoned::<f32>(d, 1);
        (KernelArgs::new().ptr(xb.ptr()).ptr(out.ptr()).ptr(counts.ptr()).i32(n as i32), vec![xb, out, counts])
    });
    assert!(msg.contains("dynamic shared memory"), "{msg}");
}

#[test]
fn atomics_across_blocks() {
    let mut rng = Rng::seeded(4);
    let n = 100_003usize;
    let x = rng.vec(n, 0.0, 1.0);
    let q: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 2_000_001) as i32 - 1_000_000).collect();
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let (xb, qb) = (upload(&d, &x), upload(&d, &q));
        let acc = upload(&d, &[0.0f32]);
        let count = upload(&d, &[0u32]);
        let (imax, imin) = (upload(&d, &[i32::MIN]), upload(&d, &[i32::MAX]));
        let ull = upload(&d, &[0u64]);
        let (cas, exch) = (upload(&d, &[0i32]), upload(&d, &[0i32]));
        let args = KernelArgs::new()
            .ptr(xb.ptr())
            .ptr(qb.ptr())
            .i32(n as i32)
            .ptr(acc.ptr())
            .ptr(count.ptr())
            .ptr(imax.ptr())
            .ptr(imin.ptr())
            .ptr(ull.ptr())
            .ptr(cas.ptr())
            .ptr(exch.ptr());
        // SAFETY: x, q are [n]; the rest single values.
        unsafe { args.launch(&*d, selftest::SELFTEST_ATOMICS, cfg((n.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0)) }.unwrap();
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        assert_close(&format!("atomicAdd float ({order})"), &acc.download().unwrap(), &[sum], 0.0, 1e-4);
        assert_eq!(count.download().unwrap(), [n as u32], "atomicAdd unsigned ({order})");
        assert_eq!(imax.download().unwrap(), [*q.iter().max().unwrap()], "atomicMax ({order})");
        assert_eq!(imin.download().unwrap(), [*q.iter().min().unwrap()], "atomicMin ({order})");
        assert_eq!(ull.download().unwrap(), [(n as u64) * (n as u64 - 1) / 2], "atomicAdd u64 ({order})");
        assert_eq!(cas.download().unwrap(), [n as i32], "atomicCAS loop ({order})");
        assert_eq!(exch.download().unwrap(), [1], "atomicExch ({order})");
    }
}

#[test]
fn bf16_and_fp16_round_like_the_half_crate() {
    let mut rng = Rng::seeded(5);
    // Random bit patterns (NaN excluded: CUDA makes a canonical NaN, the half crate keeps the
    // payload), exact ties, the ends of the ranges, subnormals, zeros and infinities.
    let mut x: Vec<f32> = Vec::new();
    while x.len() < 3000 {
        let v = f32::from_bits(rng.next_u64() as u32);
        if !v.is_nan() {
            x.push(v);
        }
    }
    for _ in 0..500 {
        let hi = (rng.next_u64() as u32) & 0xFFFF_0000;
        let v = f32::from_bits(hi | 0x8000); // halfway between two bf16 values
        if !v.is_nan() {
            x.push(v);
        }
    }
    x.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-40, -1e-45, 65504.0, 65520.0, 3.0e38, 1.0 + 1.0 / 256.0]);
    x.extend(rng.vec(600, -100.0, 100.0));
    let n = x.len();
    let y = rng.vec(n, -100.0, 100.0);
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let (xb, yb) = (upload(&d, &x), upload(&d, &y));
        let b = poisoned::<u16>(&d, n);
        let back = poisoned::<f32>(&d, n);
        let h = poisoned::<u16>(&d, n);
        let sum2 = poisoned::<u32>(&d, n);
        let args = KernelArgs::new().ptr(xb.ptr()).ptr(yb.ptr()).ptr(b.ptr()).ptr(back.ptr()).ptr(h.ptr()).ptr(sum2.ptr()).i32(n as i32);
        // SAFETY: every buffer has n elements.
        unsafe { args.launch(&*d, selftest::SELFTEST_BF16, cfg((n.div_ceil(128) as u32, 1, 1), (128, 1, 1), 0)) }.unwrap();
        let (b, back, h, sum2) = (b.download().unwrap(), back.download().unwrap(), h.download().unwrap(), sum2.download().unwrap());
        for i in 0..n {
            let want = half::bf16::from_f32(x[i]);
            assert_eq!(b[i], want.to_bits(), "__float2bfloat16({:e} = {:#010x}) ({order})", x[i], x[i].to_bits());
            assert_eq!(back[i].to_bits(), want.to_f32().to_bits(), "__bfloat162float ({order})");
            assert_eq!(h[i], half::f16::from_f32(x[i]).to_bits(), "__float2half({:e}) ({order})", x[i]);
            let (bx, by) = (half::bf16::from_f32(x[i]).to_f32(), half::bf16::from_f32(y[i]).to_f32());
            let s = half::bf16::from_f32(bx + by).to_bits() as u32;
            assert_eq!(sum2[i], s | (s << 16), "__hadd2 of bf16 pairs, x={} y={} ({order})", x[i], y[i]);
        }
    }
}

#[test]
fn struct_argument_and_builtins_of_3d_launches() {
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct SelftestParams {
        scale: f32,
        n: i32,
        x: u64,
        y: u64,
        flags: u32,
        _pad: u32,
        bias: f64,
    }
    let mut rng = Rng::seeded(6);
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 2u32, 3u32));
    let total = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
    let n = total - 38;
    let x = rng.vec(total, -5.0, 5.0);
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let xb = upload(&d, &x);
        let y = poisoned::<f32>(&d, total);
        let ids = poisoned::<u32>(&d, total);
        let p = SelftestParams { scale: 1.5, n: n as i32, x: xb.ptr().0, y: y.ptr().0, flags: 1, _pad: 0, bias: 0.25 };
        let args = KernelArgs::new().value(p).ptr(ids.ptr());
        // SAFETY: SelftestParams mirrors the kernel's struct; x, y, ids have `total` elements.
        unsafe { args.launch(&*d, selftest::SELFTEST_STRUCT_ARG, cfg(grid, block, 0)) }.unwrap();
        assert_eq!(ids.download().unwrap(), (0..total as u32).collect::<Vec<_>>(), "thread/block indices ({order})");
        let y = y.download().unwrap();
        for g in 0..total {
            if g < n {
                assert_eq!(y[g], x[g] * 1.5 + 0.25f64 as f32 + 1.0, "y[{g}] ({order})");
            } else {
                assert!(y[g].is_nan(), "y[{g}] past n must stay poisoned ({order})");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Planted bugs
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_barrier_is_exposed() {
    let mut rng = Rng::seeded(7);
    let (blocks, threads) = (8usize, 64usize);
    let x = rng.vec(blocks * threads, -1.0, 1.0);
    let want: Vec<f64> = (0..blocks * threads).map(|i| x[(i / threads) * threads + (i % threads + 1) % threads] as f64).collect();
    for order in orders(&mut rng) {
        let Some(d) = device(order) else { return };
        let xb = upload(&d, &x);
        for (kernel, correct) in [(selftest::SELFTEST_NEIGHBOUR, true), (selftest::SELFTEST_MISSING_BARRIER, false)] {
            let out = poisoned::<f32>(&d, blocks * threads);
            let args = KernelArgs::new().ptr(xb.ptr()).ptr(out.ptr());
            // SAFETY: x and out are [blocks, threads].
            unsafe { args.launch(&*d, kernel, cfg((blocks as u32, 1, 1), (threads as u32, 1, 1), 0)) }.unwrap();
            let got = out.download().unwrap();
            let wrong = got.iter().zip(&want).filter(|(g, w)| **g as f64 != **w).count();
            if correct {
                assert_eq!(wrong, 0, "{} ({order}): {wrong} wrong values", kernel.name());
            } else {
                assert!(wrong > 0, "{} ({order}): the missing barrier went unnoticed", kernel.name());
            }
        }
    }
}

#[test]
fn divergent_barrier_is_an_error_with_its_line() {
    let line = error_line("divergent_barrier");
    for order in [FiberOrder::Forward, FiberOrder::Reverse, FiberOrder::Random(3)] {
        if device(order).is_none() {
            return;
        }
        let msg = launch_error(order, selftest::SELFTEST_DIVERGENT_BARRIER, cfg((2, 1, 1), (64, 1, 1), 0), |d| {
            let out = poisoned::<f32>(d, 64);
            (KernelArgs::new().ptr(out.ptr()), vec![out])
        });
        assert!(msg.contains(&line) && msg.contains("divergent") && msg.contains("exited"), "{order}: {msg}");
        assert!(msg.contains(selftest::SELFTEST_DIVERGENT_BARRIER.name()), "names the kernel: {msg}");
    }
}

#[test]
fn two_different_barriers_are_an_error() {
    let line = error_line("two_barriers");
    if device(FiberOrder::Forward).is_none() {
        return;
    }
    let msg = launch_error(FiberOrder::Forward, selftest::SELFTEST_TWO_BARRIERS, cfg((1, 1, 1), (64, 1, 1), 0), |d| {
        let out = poisoned::<f32>(d, 64);
        (KernelArgs::new().ptr(out.ptr()), vec![out])
    });
    assert!(msg.contains(&line) && msg.contains("divergent barriers"), "{msg}");
}

#[test]
fn shuffle_with_an_exited_lane_is_an_error_not_a_hang() {
    let line = error_line("shfl_exited");
    for order in [FiberOrder::Forward, FiberOrder::Reverse, FiberOrder::Random(11)] {
        if device(order).is_none() {
            return;
        }
        let msg = launch_error(order, selftest::SELFTEST_SHFL_EXITED, cfg((3, 1, 1), (64, 1, 1), 0), |d| {
            let out = poisoned::<f32>(d, 64);
            (KernelArgs::new().ptr(out.ptr()), vec![out])
        });
        assert!(msg.contains(&line) && msg.contains("lane 5") && msg.contains("exited"), "{order}: {msg}");
    }
}

#[test]
fn shuffle_waiting_on_a_lane_at_a_barrier_is_a_deadlock_error() {
    let line = error_line("shfl_vs_barrier");
    for order in [FiberOrder::Forward, FiberOrder::Reverse] {
        if device(order).is_none() {
            return;
        }
        let msg = launch_error(order, selftest::SELFTEST_SHFL_VS_BARRIER, cfg((1, 1, 1), (32, 1, 1), 0), |d| {
            let out = poisoned::<f32>(d, 32);
            (KernelArgs::new().ptr(out.ptr()), vec![out])
        });
        assert!(msg.contains("deadlock") && msg.contains(&line) && msg.contains("lane 0, which waits at __syncthreads"), "{order}: {msg}");
    }
}

#[test]
fn failed_device_assert_is_an_error() {
    let line = error_line("assert");
    let Some(d) = device(FiberOrder::Forward) else { return };
    let zero = upload(&d, &[0i32]);
    // SAFETY: one int.
    unsafe { KernelArgs::new().ptr(zero.ptr()).launch(&*d, selftest::SELFTEST_ASSERT, cfg((2, 1, 1), (32, 1, 1), 0)) }.unwrap();
    let msg = launch_error(FiberOrder::Forward, selftest::SELFTEST_ASSERT, cfg((2, 1, 1), (32, 1, 1), 0), |d| {
        let one = upload(d, &[1.0f32]); // the bits of 1.0f are a non-zero int
        (KernelArgs::new().ptr(one.ptr()), vec![one])
    });
    assert!(msg.contains(&line) && msg.contains("assertion failed"), "{msg}");
}

#[test]
fn launch_mistakes_are_clear_errors() {
    let Some(d) = device(FiberOrder::Forward) else { return };
    let out = poisoned::<f32>(&d, 64);
    // SAFETY (all launches below): they fail before running anything.
    // (An unknown kernel is a compile error: launches take `kernels::entry` constants.)
    let e = unsafe { KernelArgs::new().ptr(out.ptr()).launch(&*d, selftest::SELFTEST_BLOCK_REDUCE, cfg((1, 1, 1), (32, 1, 1), 0)) }.unwrap_err().to_string();
    assert!(e.contains("takes 3 parameters, 1 given"), "{e}");
    let e = unsafe { KernelArgs::new().ptr(out.ptr()).launch(&*d, selftest::SELFTEST_DIVERGENT_BARRIER, cfg((1, 1, 1), (2048, 1, 1), 0)) }.unwrap_err().to_string();
    assert!(e.contains("invalid launch configuration"), "{e}");
    let e = unsafe { KernelArgs::new().ptr(out.ptr()).launch(&*d, selftest::SELFTEST_DIVERGENT_BARRIER, cfg((0, 1, 1), (32, 1, 1), 0)) }.unwrap_err().to_string();
    assert!(e.contains("invalid launch configuration"), "{e}");
    // Copies outside an allocation.
    assert!(d.htod(out.ptr().offset(64 * 4 - 4), &[0u8; 8]).is_err());
    assert!(d.dtoh(DevPtr(8), &mut [0u8; 4]).is_err());
    assert!(d.memset(out.ptr(), 0, 64 * 4 + 1).is_err());
}

#[test]
fn fiber_orders_parse() {
    assert_eq!("fwd".parse::<FiberOrder>().unwrap(), FiberOrder::Forward);
    assert_eq!("rev".parse::<FiberOrder>().unwrap(), FiberOrder::Reverse);
    assert_eq!("rand:42".parse::<FiberOrder>().unwrap(), FiberOrder::Random(42));
    for bad in ["", "forward", "rand", "rand:x", "rand:-1"] {
        let e = bad.parse::<FiberOrder>().unwrap_err().to_string();
        assert!(e.contains("fwd, rev or rand:SEED"), "{bad}: {e}");
    }
    assert_eq!(FiberOrder::Random(7).to_string(), "rand:7");
}

#[test]
fn every_kernel_file_is_in_the_emulator() {
    if !emu::available() {
        return;
    }
    let have = emu::entry_points();
    for m in kernels::all_modules() {
        for e in m.entries {
            assert!(have.contains(e), "{} entry `{e}` is missing from the emulator", m.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM (cuBLAS's contract on the CPU)
// ---------------------------------------------------------------------------------------------

#[test]
fn gemm_bf16_matches_f32_reference() {
    let mut rng = Rng::seeded(8);
    // (m, n, k, extra stride, beta)
    for (m, n, k, pad, beta) in [(1, 1, 1, 0, 0.0f32), (19, 19, 19, 0, 0.0), (111, 111, 111, 0, 0.0), (67, 33, 129, 0, 0.0), (67, 33, 129, 3, 0.5), (5, 300, 7, 1, -1.0)] {
        let Some(d) = device(FiberOrder::Forward) else { return };
        let (lda, ldb, ldc) = (k + pad, k + 2 * pad, n + pad);
        let a: Vec<half::bf16> = (0..m * lda).map(|_| half::bf16::from_f32(rng.uniform(-1.0, 1.0))).collect();
        let b: Vec<half::bf16> = (0..n * ldb).map(|_| half::bf16::from_f32(rng.uniform(-1.0, 1.0))).collect();
        let c0: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * ldc] } else { rng.vec(m * ldc, -1.0, 1.0) };
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a[i * lda + p].to_f64() * b[j * ldb + p].to_f64()).sum();
                want[i * n + j] = dot + if beta == 0.0 { 0.0 } else { beta as f64 * c0[i * ldc + j] as f64 };
            }
        }
        let (ab, bb) = (upload(&d, &a), upload(&d, &b));
        let cb = upload(&d, &c0);
        d.gemm_bf16(m, n, k, ab.ptr(), lda, bb.ptr(), ldb, cb.ptr(), ldc, beta).unwrap();
        let c = cb.download().unwrap();
        let got: Vec<f32> = (0..m).flat_map(|i| c[i * ldc..i * ldc + n].to_vec()).collect();
        assert_close(&format!("gemm {m}x{n}x{k} (pad {pad}, beta {beta})"), &got, &want, 1e-5 * k as f64, 1e-5);
        for i in 0..m {
            for j in n..ldc {
                assert_eq!(c[i * ldc + j].to_bits(), c0[i * ldc + j].to_bits(), "gemm wrote past n at ({i}, {j})");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Speed (printed; run with --nocapture to see it)
// ---------------------------------------------------------------------------------------------

/// CPU time of this process so far, all threads (Linux: /proc/self/task/*/schedstat), seconds.
/// Unlike wall time it does not grow when other processes load the machine.
fn cpu_seconds() -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else { return f64::NAN };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        * 1e-9
}

#[test]
fn emulator_speed() {
    let mut rng = Rng::seeded(9);
    let Some(d) = device(FiberOrder::Forward) else { return };
    let (rows, n) = (64usize, 2048usize);
    let x = upload(&d, &rng.vec(rows * n, -1.0, 1.0));
    let out = poisoned::<f32>(&d, rows);
    for threads in [256u32, 1024] {
        let run = || {
            // SAFETY: x is [rows, n], out [rows].
            unsafe { KernelArgs::new().ptr(x.ptr()).ptr(out.ptr()).i32(n as i32).launch(&*d, selftest::SELFTEST_BLOCK_REDUCE, cfg((rows as u32, 1, 1), (threads, 1, 1), 0)) }.unwrap()
        };
        run();
        let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let (t, c) = (Instant::now(), cpu_seconds());
            run();
            wall = wall.min(t.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - c);
        }
        eprintln!("emu: block reduce {rows}x{n} floats, {threads} threads/block: {:.2} ms wall, {:.2} ms CPU (best of 5)", wall * 1e3, cpu * 1e3);
    }
    let wrows = 4096usize;
    let wx = upload(&d, &rng.vec(wrows * 32, -1.0, 1.0));
    let bufs: Vec<DeviceBuffer<f32>> = (0..5).map(|_| poisoned::<f32>(&d, wrows * 32)).collect();
    let aa = poisoned::<i32>(&d, wrows * 2);
    let (t, c) = (Instant::now(), cpu_seconds());
    // SAFETY: buffers sized for `wrows` rows.
    unsafe {
        KernelArgs::new()
            .ptr(wx.ptr())
            .ptr(bufs[0].ptr())
            .ptr(bufs[1].ptr())
            .ptr(bufs[2].ptr())
            .ptr(aa.ptr())
            .ptr(bufs[3].ptr())
            .ptr(bufs[4].ptr())
            .i32(wrows as i32)
            .launch(&*d, selftest::SELFTEST_WARP_OPS, cfg((wrows as u32 / 4, 1, 1), (128, 1, 1), 0))
    }
    .unwrap();
    eprintln!("emu: warp ops on {wrows} warps (30 collectives each): {:.2} ms wall, {:.2} ms CPU", t.elapsed().as_secs_f64() * 1e3, (cpu_seconds() - c) * 1e3);
    let (m, nn, k) = (64usize, 512usize, 512usize);
    let a = upload(&d, &vec![half::bf16::ONE; m * k]);
    let b = upload(&d, &vec![half::bf16::ONE; nn * k]);
    let c = poisoned::<f32>(&d, m * nn);
    let (t, cs) = (Instant::now(), cpu_seconds());
    d.gemm_bf16(m, nn, k, a.ptr(), k, b.ptr(), k, c.ptr(), nn, 0.0).unwrap();
    eprintln!("emu: gemm_bf16 {m}x{nn}x{k}: {:.2} ms wall, {:.2} ms CPU", t.elapsed().as_secs_f64() * 1e3, (cpu_seconds() - cs) * 1e3);
}
