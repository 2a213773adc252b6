//! The emulated CUDA device (DESIGN.md section 6): the same kernels/*.cu the GPU runs, compiled
//! for the host by build/ (emu/cuda_emu.h, emu/runtime.cpp) and executed on the CPU, each
//! CUDA thread a fiber. Device memory is host memory (256-byte aligned allocations); GEMMs run a
//! CPU implementation of cuBLAS's contract (bf16 operands, f32 accumulation).
//!
//! Kernel bugs that hang or silently misbehave on a GPU are launch errors here, with the
//! kernel's file:line: divergent barriers, shuffles waiting on exited lanes, deadlocks, failed
//! device-side asserts, memory faults inside a kernel. The order in which the fibers of a block
//! are resumed ([`FiberOrder`]) is chosen per driver; running a kernel in two orders exposes a
//! missing barrier.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::device::{DevPtr, Driver, LaunchConfig};
use super::kernels::{Kernel, entry};
use crate::{Error, Result};

/// The order in which the emulator resumes the fibers (CUDA threads) of a block between two
/// sync points. `Random` reshuffles at every barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FiberOrder {
    /// Thread 0 first (`fwd`).
    Forward,
    /// The last thread first (`rev`).
    Reverse,
    /// A seeded random permutation, new at every barrier (`rand:SEED`).
    Random(u64),
}

impl FiberOrder {
    /// `PATCHBAY_EMU_ORDER` (`fwd | rev | rand:SEED`), forward when unset.
    pub fn from_env() -> Result<FiberOrder> {
        match std::env::var("PATCHBAY_EMU_ORDER") {
            Ok(s) => s.parse().map_err(|e: Error| Error::input(format!("PATCHBAY_EMU_ORDER: {e}"))),
            Err(_) => Ok(FiberOrder::Forward),
        }
    }
}

impl FromStr for FiberOrder {
    type Err = Error;
    fn from_str(s: &str) -> Result<FiberOrder> {
        match s {
            "fwd" => Ok(FiberOrder::Forward),
            "rev" => Ok(FiberOrder::Reverse),
            _ => match s.strip_prefix("rand:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Ok(FiberOrder::Random(seed)),
                _ => Err(Error::input(format!("fiber order `{s}`: expected fwd, rev or rand:SEED (SEED an integer)"))),
            },
        }
    }
}

impl fmt::Display for FiberOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FiberOrder::Forward => write!(f, "fwd"),
            FiberOrder::Reverse => write!(f, "rev"),
            FiberOrder::Random(seed) => write!(f, "rand:{seed}"),
        }
    }
}

/// Short name of [`FiberOrder`].
pub type Order = FiberOrder;

/// Message of every emulator call in a build without the emulator.
const NO_EMULATOR: &str = "this build has no CUDA emulator: run scripts/fetch-cuda.sh and rebuild";

/// Alignment of every allocation (cudaMalloc gives at least 256).
const ALIGN: usize = 256;

/// The emulated device. Cheap to create; the worker threads are shared by all drivers.
pub struct EmuDriver {
    order: FiberOrder,
    /// Live allocations: address -> size in bytes (copies and GEMM operands are range-checked).
    allocs: Mutex<BTreeMap<u64, usize>>,
    /// What the device was asked to do so far: [launches, gemms, device copies, uploads,
    /// bytes uploaded, downloads, bytes downloaded] (see [`Traffic`]).
    counts: [AtomicU64; 7],
}

/// What a device was asked to do: kernel launches, GEMMs, device-to-device copies, and
/// host<->device transfers with their bytes. Tests count transfers and launches with it
/// (`EmuDriver::traffic`; differences between two snapshots: `Traffic::since`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub launches: u64,
    pub gemms: u64,
    pub dtod: u64,
    pub htod: u64,
    pub htod_bytes: u64,
    pub dtoh: u64,
    pub dtoh_bytes: u64,
}

impl Traffic {
    /// What happened between `earlier` and this snapshot.
    pub fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            launches: self.launches - earlier.launches,
            gemms: self.gemms - earlier.gemms,
            dtod: self.dtod - earlier.dtod,
            htod: self.htod - earlier.htod,
            htod_bytes: self.htod_bytes - earlier.htod_bytes,
            dtoh: self.dtoh - earlier.dtoh,
            dtoh_bytes: self.dtoh_bytes - earlier.dtoh_bytes,
        }
    }
    /// Work dispatched to the device's queue: kernel launches, GEMMs and device copies (what
    /// `cost` counts as dispatches on the GPU path).
    pub fn dispatches(&self) -> u64 {
        self.launches + self.gemms + self.dtod
    }
}

const LAUNCHES: usize = 0;
const GEMMS: usize = 1;
const DTOD: usize = 2;
const HTOD: usize = 3;
const HTOD_BYTES: usize = 4;
const DTOH: usize = 5;
const DTOH_BYTES: usize = 6;

impl EmuDriver {
    /// The emulated device with the fiber order of `PATCHBAY_EMU_ORDER` (default `fwd`);
    /// an error in a build without the emulator.
    pub fn new() -> Result<EmuDriver> {
        if !available() {
            return Err(Error::device(NO_EMULATOR));
        }
        Ok(EmuDriver::with_order(FiberOrder::from_env()?))
    }

    /// The emulated device with a fixed fiber order (tests run kernels in several). In a build
    /// without the emulator, memory works but every launch fails with a clear error.
    pub fn with_order(order: FiberOrder) -> EmuDriver {
        EmuDriver { order, allocs: Mutex::new(BTreeMap::new()), counts: Default::default() }
    }

    /// What this device was asked to do since it was created.
    pub fn traffic(&self) -> Traffic {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Traffic { launches: c(LAUNCHES), gemms: c(GEMMS), dtod: c(DTOD), htod: c(HTOD), htod_bytes: c(HTOD_BYTES), dtoh: c(DTOH), dtoh_bytes: c(DTOH_BYTES) }
    }

    fn count(&self, what: usize, n: usize) {
        self.counts[what].fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn order(&self) -> FiberOrder {
        self.order
    }

    /// Checks that `[p, p + bytes)` lies inside one live allocation.
    fn check_range(&self, p: DevPtr, bytes: usize, what: &str) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let allocs = self.allocs.lock().unwrap();
        match allocs.range(..=p.0).next_back() {
            Some((&base, &size)) if p.0 + bytes as u64 <= base + size as u64 => Ok(()),
            _ => Err(Error::device(format!(
                "emu: {what} of {bytes} bytes at {:#x} is outside every allocation of this device",
                p.0
            ))),
        }
    }
}

/// True when this build has the emulator (`cfg(patchbay_emu)`).
pub fn available() -> bool {
    cfg!(patchbay_emu)
}

/// Every kernel entry point the emulator can run (product and self-test kernels), sorted.
pub fn entry_points() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = entry::ALL.iter().zip(ffi::registry()).filter(|(_, e)| e.is_some()).map(|(k, _)| k.name()).collect();
    v.sort_unstable();
    v
}

impl Driver for EmuDriver {
    fn name(&self) -> String {
        format!("emu ({})", self.order)
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let size = bytes.max(1);
        let layout = std::alloc::Layout::from_size_align(size, ALIGN)
            .map_err(|_| Error::device(format!("emu: cannot allocate {bytes} bytes")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::device(format!("emu: out of memory allocating {bytes} bytes")));
        }
        self.allocs.lock().unwrap().insert(p as u64, size);
        Ok(DevPtr(p as u64))
    }

    unsafe fn free(&self, p: DevPtr) {
        if let Some(size) = self.allocs.lock().unwrap().remove(&p.0) {
            let layout = std::alloc::Layout::from_size_align(size, ALIGN).unwrap();
            // SAFETY: p was allocated by `alloc` with this layout and is removed from the table.
            unsafe { std::alloc::dealloc(p.0 as *mut u8, layout) };
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.check_range(dst, src.len(), "upload")?;
        self.count(HTOD, 1);
        self.count(HTOD_BYTES, src.len());
        // SAFETY: the destination range lies in a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0 as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len(), "download")?;
        self.count(DTOH, 1);
        self.count(DTOH_BYTES, dst.len());
        // SAFETY: the source range lies in a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.check_range(dst, bytes, "memset")?;
        // SAFETY: the range lies in a live allocation (checked above).
        unsafe { std::ptr::write_bytes(dst.0 as *mut u8, byte, bytes) };
        Ok(())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.check_range(src, bytes, "device copy source")?;
        self.check_range(dst, bytes, "device copy destination")?;
        self.count(DTOD, 1);
        if src.0.max(dst.0) < src.0.min(dst.0) + bytes as u64 {
            return Err(Error::device(format!("emu: device copy of {bytes} bytes between overlapping ranges {:#x} and {:#x}", src.0, dst.0)));
        }
        // SAFETY: both ranges lie in live allocations and do not overlap (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.0 as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn launch(&self, kernel: Kernel, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
        self.count(LAUNCHES, 1);
        // SAFETY: forwarded to the caller's contract (arguments match the kernel's parameters).
        unsafe { ffi::launch(kernel, cfg, args, self.order) }
    }

    fn gemm_bf16(&self, m: usize, n: usize, k: usize, a: DevPtr, lda: usize, b: DevPtr, ldb: usize, c: DevPtr, ldc: usize, beta: f32) -> Result<()> {
        self.count(GEMMS, 1);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if lda < k || ldb < k || ldc < n {
            return Err(Error::device(format!("gemm_bf16: leading dimensions lda={lda}, ldb={ldb}, ldc={ldc} too small for m={m}, n={n}, k={k}")));
        }
        self.check_range(a, ((m - 1) * lda + k) * 2, "gemm_bf16 operand A")?;
        self.check_range(b, ((n - 1) * ldb + k) * 2, "gemm_bf16 operand B")?;
        self.check_range(c, ((m - 1) * ldc + n) * 4, "gemm_bf16 result C")?;
        // SAFETY: the three ranges lie in live allocations (checked above); A and B are only
        // read, and C is written by disjoint row tasks.
        unsafe { gemm_bf16_cpu(m, n, k, a.0 as *const u16, lda, b.0 as *const u16, ldb, c.0 as *mut f32, ldc, beta) };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Raw pointer that may cross threads (disjoint accesses only).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// C = A B^T (+ beta C) with bf16 A [m, k], B [n, k] and f32 C [m, n], accumulating in f32.
/// With beta == 0, C is not read (NaN in it does not propagate), as cuBLAS does.
///
/// # Safety
/// The operands must be valid for the given sizes and strides; C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bf16_cpu(m: usize, n: usize, k: usize, a: *const u16, lda: usize, b: *const u16, ldb: usize, c: *mut f32, ldc: usize, beta: f32) {
    // SAFETY (all slices below): in bounds by the caller's contract.
    let a_rows: Vec<f32> = (0..m).flat_map(|i| unsafe { std::slice::from_raw_parts(a.add(i * lda), k) }.iter().map(|&x| bf16_to_f32(x))).collect();
    let (b, c) = (SendPtr(b as *mut u16), SendPtr(c));
    const JB: usize = 32; // B rows converted per task
    (0..n.div_ceil(JB)).into_par_iter().for_each(|jb| {
        let (b, c) = (b, c);
        let j0 = jb * JB;
        let j1 = (j0 + JB).min(n);
        let b_rows: Vec<f32> = (j0..j1).flat_map(|j| unsafe { std::slice::from_raw_parts(b.0.add(j * ldb), k) }.iter().map(|&x| bf16_to_f32(x))).collect();
        for i in 0..m {
            let ar = &a_rows[i * k..(i + 1) * k];
            for j in j0..j1 {
                let br = &b_rows[(j - j0) * k..(j - j0 + 1) * k];
                let acc = dot(ar, br);
                let cp = unsafe { c.0.add(i * ldc + j) };
                unsafe { *cp = if beta == 0.0 { acc } else { acc + beta * *cp } };
            }
        }
    });
}

/// f32 dot product with 8 independent accumulators.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// The C interface of the emulator library (build/emu.rs, emu/runtime.cpp).
#[cfg(patchbay_emu)]
mod ffi {
    use std::collections::HashMap;
    use std::ffi::{CStr, c_char, c_void};
    use std::sync::OnceLock;

    use super::FiberOrder;
    use crate::backend::device::LaunchConfig;
    use crate::backend::kernels::{Kernel, entry};
    use crate::{Error, Result};

    /// `patchbay_emu_entry` of emu/cuda_emu.h.
    #[repr(C)]
    pub struct Entry {
        name: *const c_char,
        thunk: *const c_void,
        nparams: u32,
        file: *const c_char,
    }
    // SAFETY: entries are immutable static data of the emulator library.
    unsafe impl Sync for Entry {}
    unsafe impl Send for Entry {}

    unsafe extern "C" {
        fn patchbay_emu_module_count() -> u32;
        fn patchbay_emu_module_entries(i: u32, n: *mut u32) -> *const Entry;
        fn patchbay_emu_launch(
            e: *const Entry,
            grid: *const u32,
            block: *const u32,
            shared: u32,
            args: *mut *mut c_void,
            order: i32,
            seed: u64,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
    }

    /// The library's entry of every [`Kernel`], by [`Kernel::index`] (None: not in the library),
    /// resolved once.
    pub fn registry() -> &'static [Option<&'static Entry>] {
        static REG: OnceLock<Vec<Option<&'static Entry>>> = OnceLock::new();
        REG.get_or_init(|| {
            let mut by_name = HashMap::new();
            // SAFETY: the registry functions return static arrays of `n` entries whose names are
            // static NUL-terminated strings.
            unsafe {
                for i in 0..patchbay_emu_module_count() {
                    let mut n = 0u32;
                    let p = patchbay_emu_module_entries(i, &mut n);
                    for e in std::slice::from_raw_parts(p, n as usize) {
                        let name = CStr::from_ptr(e.name).to_str().expect("ASCII entry point names");
                        by_name.insert(name, e);
                    }
                }
            }
            entry::ALL.iter().map(|k| by_name.get(k.name()).copied()).collect()
        })
    }

    /// # Safety
    /// As `Driver::launch`.
    pub unsafe fn launch(kernel: Kernel, cfg: LaunchConfig, args: &mut [*mut c_void], order: FiberOrder) -> Result<()> {
        let name = kernel.name();
        let Some(e) = registry()[kernel.index()] else {
            return Err(Error::device(format!(
                "`{name}` ({}) is not in the emulator library; the emulator has: {}",
                kernel.file(),
                super::entry_points().join(", ")
            )));
        };
        if args.len() != e.nparams as usize {
            // SAFETY: a static NUL-terminated string.
            let file = unsafe { CStr::from_ptr(e.file) }.to_string_lossy();
            return Err(Error::device(format!("kernel `{name}` ({file}) takes {} parameters, {} given", e.nparams, args.len())));
        }
        let grid = [cfg.grid.0, cfg.grid.1, cfg.grid.2];
        let block = [cfg.block.0, cfg.block.1, cfg.block.2];
        let (kind, seed) = match order {
            FiberOrder::Forward => (0, 0),
            FiberOrder::Reverse => (1, 0),
            FiberOrder::Random(s) => (2, s),
        };
        let mut err = vec![0u8; 4096];
        // SAFETY: `e` is a registry entry; args match its parameters (caller's contract; count
        // checked above); grid, block and err outlive the call, which is synchronous.
        let rc = unsafe {
            patchbay_emu_launch(e, grid.as_ptr(), block.as_ptr(), cfg.shared_bytes, args.as_mut_ptr(), kind, seed, err.as_mut_ptr() as *mut c_char, err.len())
        };
        if rc == 0 {
            return Ok(());
        }
        let msg = CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        Err(Error::device(format!("emu ({order}): {msg}")))
    }
}

/// Stand-in for a build without the emulator: no entry points, every launch an error.
#[cfg(not(patchbay_emu))]
mod ffi {
    use std::ffi::c_void;

    use super::{FiberOrder, NO_EMULATOR};
    use crate::backend::device::LaunchConfig;
    use crate::backend::kernels::Kernel;
    use crate::{Error, Result};

    pub fn registry() -> &'static [Option<()>] {
        &[]
    }

    pub unsafe fn launch(kernel: Kernel, _cfg: LaunchConfig, _args: &mut [*mut c_void], _order: FiberOrder) -> Result<()> {
        let name = kernel.name();
        Err(Error::device(format!("cannot launch `{name}`: {NO_EMULATOR}")))
    }
}
