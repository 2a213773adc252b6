//! NVRTC: locating the pinned wheel, compiling one file for one target, ptxas's resource table.

use std::collections::BTreeMap;
use std::env;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use crate::sources::KernelFile;

/// NVRTC targets: (architecture option, output kind, file suffix).
pub const NVRTC_TARGETS: [(&str, Output, &str); 3] = [
    ("sm_80", Output::Cubin, "sm_80.cubin"),
    ("sm_90a", Output::Cubin, "sm_90a.cubin"),
    ("compute_80", Output::Ptx, "compute_80.ptx"),
];

#[derive(Clone, Copy, PartialEq)]
pub enum Output {
    Cubin,
    Ptx,
}


/// The pinned NVRTC wheel and CUDA headers.
pub struct Cuda {
    pub nvrtc_lib: PathBuf,
    pub include: PathBuf,
}

/// Where scripts/fetch-cuda.sh unpacks the wheels: `PATCHBAY_CUDA_ROOT`, default `.cache/cuda`.
pub fn cuda_root(manifest: &Path) -> PathBuf {
    env::var_os("PATCHBAY_CUDA_ROOT").map(PathBuf::from).unwrap_or_else(|| manifest.join(".cache/cuda"))
}

/// Finds the wheel's NVRTC and headers; `(None, why)` when they are not there.
pub fn locate_cuda(manifest: &Path) -> (Option<Cuda>, String) {
    let root = cuda_root(manifest);
    let nvrtc_lib = root.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    let include = root.join("nvidia/cuda_runtime/include");
    if !include.join("cuda_bf16.h").is_file() {
        return (None, format!("no CUDA headers at {}", include.display()));
    }
    (Some(Cuda { nvrtc_lib, include }), String::new())
}

/// Loads libnvrtc by absolute path, so that cudarc's dlopen by soname finds it (environment
/// variables set here would not reach the dynamic loader).
pub fn load_nvrtc(cuda: &Cuda) -> Result<(), String> {
    if !cuda.nvrtc_lib.is_file() {
        return Err(format!("no {}", cuda.nvrtc_lib.display()));
    }
    // SAFETY: loading NVRTC runs its initialisers only; the library stays loaded for the
    // build script's life (forgotten below).
    let lib = unsafe { libloading::Library::new(&cuda.nvrtc_lib) }
        .map_err(|e| format!("cannot load {}: {e}", cuda.nvrtc_lib.display()))?;
    std::mem::forget(lib);
    // SAFETY: only probes for the library (cudarc would panic on first use if it were missing).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!("{} was loaded but cudarc cannot find it", cuda.nvrtc_lib.display()));
    }
    Ok(())
}

/// The NVRTC version, for cache keys.
pub fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: NVRTC is loaded (load_nvrtc) before any task runs.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

pub fn nvrtc_options(f: &KernelFile, manifest: &Path, cuda: &Cuda, arch: &str, kind: Output) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "-lineinfo".into(),
        format!("-I{}", cuda.include.display()),
        format!("-I{}", manifest.join("kernels").display()),
        format!("-I{}", f.path.parent().unwrap().display()),
    ];
    if kind == Output::Cubin {
        o.push("--ptxas-options=-v".into());
    }
    o
}

/// Compiles `src` with NVRTC: the CUBIN or PTX, and the log (ptxas -v lines, warnings).
pub fn nvrtc_compile(src: &str, name: &str, opts: &[String], kind: Output) -> Result<(Vec<u8>, String), String> {
    use cudarc::nvrtc::sys;
    let c_src = CString::new(src).map_err(|_| "source holds a NUL byte".to_string())?;
    let c_name = CString::new(name).unwrap();
    let c_opts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers are valid C strings that outlive the program; the program is
    // destroyed before returning.
    unsafe {
        let r = sys::nvrtcCreateProgram(&mut prog, c_src.as_ptr(), c_name.as_ptr(), 0, std::ptr::null(), std::ptr::null());
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcCreateProgram: {r:?}"));
        }
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_len = 0usize;
        sys::nvrtcGetProgramLogSize(prog, &mut log_len);
        let mut log = vec![0u8; log_len.max(1)];
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
        let log = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            Err(format!("{compiled:?}\n{log}"))
        } else {
            let mut n = 0usize;
            let mut bin;
            if kind == Output::Cubin {
                sys::nvrtcGetCUBINSize(prog, &mut n);
                bin = vec![0u8; n];
                sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _);
            } else {
                sys::nvrtcGetPTXSize(prog, &mut n);
                bin = vec![0u8; n];
                sys::nvrtcGetPTX(prog, bin.as_mut_ptr() as *mut _);
                while bin.last() == Some(&0) {
                    bin.pop();
                }
            }
            Ok((bin, log))
        };
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// Parses the ptxas -v lines of every CUBIN compilation into the resource table:
/// `kernel  arch  registers  spill_stores  spill_loads  smem  cmem` (bytes; cmem sums all banks).
pub fn resource_table(files: &[KernelFile], logs: &BTreeMap<(usize, usize), String>) -> Result<String, String> {
    let mut rows = Vec::new();
    for ((file, target), log) in logs {
        let (arch, kind, _) = NVRTC_TARGETS[*target];
        if kind != Output::Cubin {
            continue;
        }
        // Per entry: "Compiling entry function 'K' for 'sm_80'", "Function properties for K",
        // "N bytes stack frame, S bytes spill stores, L bytes spill loads", "Used R registers, ...".
        let mut cur: Option<String> = None;
        let mut props_of: Option<String> = None;
        let mut spills = (0u64, 0u64);
        for line in log.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
                cur = rest.split('\'').next().map(str::to_string);
                spills = (0, 0);
            } else if let Some(rest) = line.strip_prefix("ptxas info    : Function properties for ") {
                props_of = Some(rest.trim().to_string());
            } else if line.contains("bytes spill stores") {
                if cur.is_some() && props_of == cur {
                    spills = (number_before(line, "bytes spill stores"), number_before(line, "bytes spill loads"));
                }
            } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
                let Some(kernel) = cur.take() else { continue };
                let regs = number_before(rest, "registers");
                let smem = number_before(rest, "bytes smem");
                let cmem: u64 = rest
                    .split(',')
                    .filter(|p| p.contains("bytes cmem"))
                    .map(|p| number_before(p, "bytes cmem"))
                    .sum();
                rows.push(format!("{kernel}\t{arch}\t{regs}\t{}\t{}\t{smem}\t{cmem}", spills.0, spills.1));
            }
        }
        for e in &files[*file].entries {
            if !rows.iter().any(|l| l.starts_with(&format!("{e}\t{arch}\t"))) {
                return Err(format!(
                    "{}: no ptxas resource line for entry point `{e}` ({arch}); the NVRTC log was:\n{log}",
                    files[*file].rel
                ));
            }
        }
    }
    rows.sort();
    Ok(format!("kernel\tarch\tregisters\tspill_stores\tspill_loads\tsmem\tcmem\n{}", rows.iter().map(|r| format!("{r}\n")).collect::<String>()))
}

/// The number just before `marker` in `s` ("16 registers" -> 16), 0 if none.
pub fn number_before(s: &str, marker: &str) -> u64 {
    let Some(at) = s.find(marker) else { return 0 };
    s[..at].split(|c: char| !c.is_ascii_digit()).rfind(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}
