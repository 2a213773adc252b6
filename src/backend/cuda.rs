//! The real GPU (DESIGN.md section 6): cudarc's driver API for memory, modules and launches,
//! cuBLAS for GEMMs. Kernels come from build/ ([`super::kernels`]): the CUBIN for the device's
//! architecture (sm_90a on compute capability 9.0, sm_80 on 8.x), else the compute_80 PTX
//! (JIT-compiled by the driver), else, in a build without build-time NVRTC, the sources compiled
//! with NVRTC at run time.
//!
//! cudarc panics when a CUDA library is missing; every entry point here checks first and
//! returns an error instead.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{self, CudaContext, CudaFunction, CudaModule, CudaStream};

use super::device::{DevPtr, Driver, LaunchConfig};
use super::kernels::{self, Kernel, KernelModule};
use crate::{Error, Result};

/// Dynamic shared memory above this needs the function's opt-in attribute.
const DEFAULT_MAX_DYNAMIC_SMEM: u32 = 48 << 10;

/// One CUDA device with its own stream; every call is ordered on that stream.
pub struct CudaDriver {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    /// Every entry point, by [`Kernel::index`].
    functions: Vec<CudaFunction>,
    /// Keeps the modules loaded as long as the functions are used.
    _modules: Vec<Arc<CudaModule>>,
    /// Dynamic shared memory each function has been opted in to.
    smem_opt_in: Mutex<HashMap<Kernel, u32>>,
    name: String,
}

fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::device(format!("{what}: {e}"))
}

impl CudaDriver {
    /// Opens GPU `ordinal` and loads every kernel.
    pub fn new(ordinal: usize) -> Result<CudaDriver> {
        // SAFETY: only probes whether the library can be loaded.
        if !unsafe { driver::sys::is_culib_present() } {
            return Err(Error::device(
                "no CUDA driver (libcuda) on this machine: use --device cpu, or --device emu for the emulated GPU",
            ));
        }
        // SAFETY: as above.
        if !unsafe { cublas::sys::is_culib_present() } {
            return Err(Error::device(
                "the CUDA driver is here but cuBLAS (libcublas.so.12) is not: install the CUDA 12 runtime libraries \
                 (e.g. pip install nvidia-cublas-cu12 and add its lib/ to LD_LIBRARY_PATH)",
            ));
        }
        driver::result::init().map_err(|e| dev_err("cuInit", e))?;
        let count = CudaContext::device_count().map_err(|e| dev_err("cuDeviceGetCount", e))?;
        if ordinal as i64 >= count as i64 {
            return Err(Error::device(format!("cuda:{ordinal}: no such GPU (this machine has {count})")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err(&format!("cuda:{ordinal}"), e))?;
        let stream = ctx.new_stream().map_err(|e| dev_err("cuStreamCreate", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cublasCreate", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| dev_err("compute capability", e))?;
        let dev_name = ctx.name().unwrap_or_else(|_| "?".into());

        let mut modules = HashMap::new();
        for m in kernels::all_modules() {
            modules.insert(m.path, load_module(&ctx, m, (major, minor))?);
        }
        let functions = kernels::entry::ALL
            .iter()
            .map(|k| {
                let module = modules.get(k.file()).ok_or_else(|| Error::device(format!("{}: no such kernel module", k.file())))?;
                module.load_function(k.name()).map_err(|err| dev_err(&format!("{}: loading `{}`", k.file(), k.name()), err))
            })
            .collect::<Result<Vec<_>>>()?;
        let modules = modules.into_values().collect();
        Ok(CudaDriver {
            ordinal,
            ctx,
            stream,
            blas: Mutex::new(blas),
            functions,
            _modules: modules,
            smem_opt_in: Mutex::new(HashMap::new()),
            name: format!("cuda:{ordinal} {dev_name} (sm_{major}{minor})"),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| dev_err("binding the CUDA context", e))
    }
}

/// Loads one kernel file for a device of compute capability `cc`: the matching CUBIN, else the
/// PTX, else the source compiled now.
fn load_module(ctx: &Arc<CudaContext>, m: &KernelModule, cc: (i32, i32)) -> Result<Arc<CudaModule>> {
    let image = match cc {
        (9, 0) => m.sm_90a.map(|b| cudarc::nvrtc::Ptx::from_binary(b.to_vec())),
        (8, _) => m.sm_80.map(|b| cudarc::nvrtc::Ptx::from_binary(b.to_vec())),
        _ => None,
    };
    let image = match image.or_else(|| m.ptx.map(cudarc::nvrtc::Ptx::from_src)) {
        Some(i) => i,
        None => cudarc::nvrtc::Ptx::from_binary(compile_at_run_time(m, cc)?),
    };
    ctx.load_module(image).map_err(|e| dev_err(&format!("{}: loading the module", m.path), e))
}

/// Where the CUDA headers (cuda_bf16.h) are on this machine, for run-time NVRTC.
fn cuda_include_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(r) = std::env::var_os("PATCHBAY_CUDA_ROOT") {
        candidates.push(PathBuf::from(r).join("nvidia/cuda_runtime/include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(var) {
            candidates.push(PathBuf::from(r).join("include"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/cuda/nvidia/cuda_runtime/include"));
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| d.join("cuda_bf16.h").is_file())
}

/// Compiles a kernel file with NVRTC for this device (a build without build-time NVRTC).
fn compile_at_run_time(m: &KernelModule, (major, minor): (i32, i32)) -> Result<Vec<u8>> {
    use cudarc::nvrtc::sys;
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::device(format!(
            "{}: this build has no precompiled kernels and NVRTC (libnvrtc.so.12) is not on this machine: \
             rebuild after scripts/fetch-cuda.sh, or install NVRTC",
            m.path
        )));
    }
    let include = cuda_include_dir().ok_or_else(|| {
        Error::device(format!(
            "{}: compiling at run time needs the CUDA headers (cuda_bf16.h): set PATCHBAY_CUDA_ROOT or CUDA_HOME",
            m.path
        ))
    })?;
    let arch = if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") };
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        format!("-I{}", include.display()),
    ]
    .into_iter()
    .map(|o| CString::new(o).unwrap())
    .collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let src = CString::new(m.source).map_err(|_| Error::device(format!("{}: NUL byte in source", m.path)))?;
    let name = CString::new(m.path).unwrap();
    let hdr_src: Vec<CString> = kernels::HEADERS.iter().map(|(_, s)| CString::new(*s).unwrap()).collect();
    let hdr_names: Vec<CString> = kernels::HEADERS.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
    let hs: Vec<*const std::ffi::c_char> = hdr_src.iter().map(|c| c.as_ptr()).collect();
    let hn: Vec<*const std::ffi::c_char> = hdr_names.iter().map(|c| c.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a live C string for the duration of the program, which is
    // destroyed before returning.
    unsafe {
        let r = sys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), hs.len() as i32, hs.as_ptr(), hn.as_ptr());
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::device(format!("{}: nvrtcCreateProgram: {r:?}", m.path)));
        }
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            let mut n = 0usize;
            sys::nvrtcGetProgramLogSize(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
            let log = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
            Err(Error::device(format!("{}: NVRTC ({arch}) failed: {compiled:?}\n{log}", m.path)))
        } else {
            let mut n = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut n);
            let mut bin = vec![0u8; n];
            sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _);
            Ok(bin)
        };
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

impl Driver for CudaDriver {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        // SAFETY: plain device memory (cuMemAlloc), freed by `free`.
        let p = unsafe { driver::result::malloc_sync(bytes.max(1)) }.map_err(|e| dev_err(&format!("cuMemAlloc of {bytes} bytes"), e))?;
        Ok(DevPtr(p))
    }

    unsafe fn free(&self, p: DevPtr) {
        if self.bind().is_ok() {
            // SAFETY: p came from `alloc` (caller's contract). cuMemFree waits for work using it.
            let _ = unsafe { driver::result::free_sync(p.0) };
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the copy is complete (stream synchronised) before `src` can go away.
        unsafe { driver::result::memcpy_htod_async(dst.0, src, self.stream.cu_stream()) }.map_err(|e| dev_err("upload", e))?;
        self.synchronize()
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the copy is complete (stream synchronised) before `dst` is returned to the caller.
        unsafe { driver::result::memcpy_dtoh_async(dst, src.0, self.stream.cu_stream()) }.map_err(|e| dev_err("download", e))?;
        self.synchronize()
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: stream-ordered write of device memory the caller owns.
        unsafe { driver::result::memset_d8_async(dst.0, byte, bytes, self.stream.cu_stream()) }.map_err(|e| dev_err("memset", e))
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: stream-ordered copy between device allocations the caller owns.
        unsafe { driver::result::memcpy_dtod_async(dst.0, src.0, bytes, self.stream.cu_stream()) }.map_err(|e| dev_err("device copy", e))
    }

    unsafe fn launch(&self, kernel: Kernel, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
        let f = &self.functions[kernel.index()];
        let name = kernel.name();
        self.bind()?;
        if cfg.shared_bytes > DEFAULT_MAX_DYNAMIC_SMEM {
            let mut opted = self.smem_opt_in.lock().unwrap();
            if opted.get(&kernel).copied().unwrap_or(0) < cfg.shared_bytes {
                // SAFETY: sets an attribute of a loaded function.
                unsafe {
                    driver::result::function::set_function_attribute(
                        f.cu_function(),
                        driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        cfg.shared_bytes as i32,
                    )
                }
                .map_err(|e| dev_err(&format!("`{name}`: {} bytes of dynamic shared memory", cfg.shared_bytes), e))?;
                opted.insert(kernel, cfg.shared_bytes);
            }
        }
        // SAFETY: the caller guarantees the arguments match the kernel's parameters; the driver
        // copies them at launch.
        unsafe { driver::result::launch_kernel(f.cu_function(), cfg.grid, cfg.block, cfg.shared_bytes, self.stream.cu_stream(), args) }
            .map_err(|e| dev_err(&format!("launching `{name}` (grid {:?}, block {:?}, {} bytes shared)", cfg.grid, cfg.block, cfg.shared_bytes), e))
    }

    fn gemm_bf16(&self, m: usize, n: usize, k: usize, a: DevPtr, lda: usize, b: DevPtr, ldb: usize, c: DevPtr, ldc: usize, beta: f32) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
        if m == 0 || n == 0 {
            return Ok(());
        }
        if lda < k || ldb < k || ldc < n {
            return Err(Error::device(format!("gemm_bf16: leading dimensions lda={lda}, ldb={ldb}, ldc={ldc} too small for m={m}, n={n}, k={k}")));
        }
        let int = |v: usize, what: &str| i32::try_from(v).map_err(|_| Error::device(format!("gemm_bf16: {what} = {v} exceeds cuBLAS's 32-bit sizes")));
        let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        let (lda, ldb, ldc) = (int(lda, "lda")?, int(ldb, "ldb")?, int(ldc, "ldc")?);
        self.bind()?;
        let blas = self.blas.lock().unwrap();
        let alpha = 1.0f32;
        // Row-major C [m, n] is column-major C^T [n, m] (ld = ldc). C^T = B A^T, where the
        // row-major B [n, k] is column-major B^T [k, n] (so op = T) and the row-major A [m, k]
        // is column-major A^T [k, m] (op = N).
        // SAFETY: A, B, C are device allocations of the sizes the caller described; cuBLAS runs on
        // this driver's stream.
        unsafe {
            cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const c_void,
                b.0 as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                ldb,
                a.0 as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                lda,
                &beta as *const f32 as *const c_void,
                c.0 as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| dev_err(&format!("cublasGemmEx (m={m}, n={n}, k={k})"), e))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| dev_err("synchronize", e))
    }
}
