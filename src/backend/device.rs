//! The small device interface the CUDA backend's host code talks to (DESIGN.md section 6).
//! Two drivers implement it: `cuda` (cudarc on a real GPU) and `emu` (the same kernels
//! compiled for the host and run as fibers on the CPU). Buffer layouts, launch configurations
//! and plans are therefore the same code on both.

use std::ffi::c_void;
use std::sync::Arc;

use crate::Result;
use crate::backend::kernels::Kernel;

/// A device address: a raw device pointer on a GPU, a host pointer on the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// Grid and block of a launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory bytes.
    pub shared_bytes: u32,
}

/// One device. All calls are stream-ordered: a download sees every earlier launch.
pub trait Driver: Send + Sync {
    /// What this device is, for messages and manifests ("emu", "cuda:0 NVIDIA H100 ...").
    fn name(&self) -> String;
    /// `bytes` of uninitialised device memory (never 0: a zero-size request gets 1 byte).
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// Frees what `alloc` returned.
    ///
    /// # Safety
    /// `p` came from `alloc` of this driver and is not used afterwards.
    unsafe fn free(&self, p: DevPtr);
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()>;
    /// Copies `bytes` from `src` to `dst` on the device (the ranges must not overlap).
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Launches the `extern "C"` kernel `kernel`; `args[i]` points to the value of parameter i
    /// (as cuLaunchKernel's kernelParams).
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in count and types, and every pointer
    /// argument must address memory of this device large enough for what the kernel touches.
    unsafe fn launch(&self, kernel: Kernel, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()>;
    /// C = A B^T (+ beta C): A `[m, k]` bf16 (row stride lda), B `[n, k]` bf16 (row stride ldb),
    /// C `[m, n]` f32 (row stride ldc); f32 accumulation (cuBLAS's contract).
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16(&self, m: usize, n: usize, k: usize, a: DevPtr, lda: usize, b: DevPtr, ldb: usize, c: DevPtr, ldc: usize, beta: f32) -> Result<()>;
    /// Waits for all queued work; reports asynchronous errors.
    fn synchronize(&self) -> Result<()>;
}

/// A typed device allocation freed on drop. `T` is the element type as the kernels see it.
pub struct DeviceBuffer<T: bytemuck::Pod> {
    driver: Arc<dyn Driver>,
    ptr: DevPtr,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    /// `len` uninitialised elements.
    pub fn alloc(driver: &Arc<dyn Driver>, len: usize) -> Result<Self> {
        let ptr = driver.alloc(len * std::mem::size_of::<T>())?;
        Ok(DeviceBuffer { driver: driver.clone(), ptr, len, _t: std::marker::PhantomData })
    }
    /// A copy of `data` on the device.
    pub fn from_slice(driver: &Arc<dyn Driver>, data: &[T]) -> Result<Self> {
        let b = Self::alloc(driver, data.len())?;
        driver.htod(b.ptr, bytemuck::cast_slice(data))?;
        Ok(b)
    }
    /// `len` elements filled with the byte `byte` (0xFF poisons f32 with NaN).
    pub fn filled(driver: &Arc<dyn Driver>, len: usize, byte: u8) -> Result<Self> {
        let b = Self::alloc(driver, len)?;
        driver.memset(b.ptr, byte, len * std::mem::size_of::<T>())?;
        Ok(b)
    }
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn upload(&self, data: &[T]) -> Result<()> {
        assert!(data.len() <= self.len, "upload of {} elements into a buffer of {}", data.len(), self.len);
        self.driver.htod(self.ptr, bytemuck::cast_slice(data))
    }
    pub fn download(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        self.driver.dtoh(self.ptr, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
}

impl<T: bytemuck::Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc of this driver and the buffer owns it exclusively.
        unsafe { self.driver.free(self.ptr) }
    }
}

/// Kernel arguments by value, kept alive until the launch: `KernelArgs::new().ptr(x).i32(n)`.
#[derive(Default)]
pub struct KernelArgs {
    /// Each argument's bytes in its own 8-byte-aligned slot (struct arguments may take several).
    slots: Vec<Vec<u64>>,
}

impl KernelArgs {
    pub fn new() -> Self {
        KernelArgs::default()
    }
    /// Any plain-old-data value (a pointer, a scalar, a `#[repr(C)]` struct mirroring the kernel's).
    pub fn value<T: bytemuck::Pod>(mut self, v: T) -> Self {
        let bytes = bytemuck::bytes_of(&v);
        let mut slot = vec![0u64; bytes.len().div_ceil(8).max(1)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut slot)[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(slot);
        self
    }
    pub fn ptr(self, p: DevPtr) -> Self {
        self.value(p.0)
    }
    pub fn i32(self, v: i32) -> Self {
        self.value(v)
    }
    pub fn u32(self, v: u32) -> Self {
        self.value(v)
    }
    pub fn f32(self, v: f32) -> Self {
        self.value(v)
    }
    pub fn u64(self, v: u64) -> Self {
        self.value(v)
    }
    /// Launches `kernel` with these arguments.
    ///
    /// # Safety
    /// As [`Driver::launch`]: the arguments must match the kernel's parameters.
    pub unsafe fn launch(mut self, driver: &dyn Driver, kernel: Kernel, cfg: LaunchConfig) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = self.slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: forwarded to the caller's contract; the slots outlive the call.
        unsafe { driver.launch(kernel, cfg, &mut ptrs) }
    }
}
