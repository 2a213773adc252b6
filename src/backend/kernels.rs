//! The CUDA kernels as build.rs compiled them (DESIGN.md section 6): for every `kernels/*.cu`,
//! its entry points, its source (always: a GPU machine can compile it at run time) and, when
//! NVRTC was there at build time (`cfg(patchbay_nvrtc)`), CUBINs for sm_80 and sm_90a and
//! PTX for compute_80. The emulator's self-test kernels (kernels/selftest) are in
//! [`SELFTEST_MODULES`], apart from the product's [`MODULES`].

use crate::{Error, Result};

/// One kernel source file and what build.rs made of it.
#[derive(Debug)]
pub struct KernelModule {
    /// File stem ("rmsnorm"); "selftest/<stem>" for a self-test file.
    pub name: &'static str,
    /// Path from the crate root ("kernels/rmsnorm.cu").
    pub path: &'static str,
    /// Its `extern "C" __global__` entry points.
    pub entries: &'static [&'static str],
    pub source: &'static str,
    pub sm_80: Option<&'static [u8]>,
    pub sm_90a: Option<&'static [u8]>,
    pub ptx: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// ptxas's resource report of every kernel (build-time NVRTC; only the header line without it),
/// tab-separated: `kernel arch registers spill_stores spill_loads smem cmem` (bytes).
pub const KERNEL_RESOURCES: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel_resources.tsv"));

/// True when build.rs compiled the kernels with NVRTC (else they compile at run time on a GPU).
pub const PRECOMPILED: bool = cfg!(patchbay_nvrtc);

/// All modules: the product's, then the self-tests'.
pub fn all_modules() -> impl Iterator<Item = &'static KernelModule> {
    MODULES.iter().chain(SELFTEST_MODULES.iter())
}

/// The module that defines entry point `name`.
pub fn module_of(name: &str) -> Option<&'static KernelModule> {
    all_modules().find(|m| m.entries.contains(&name))
}

/// One row of [`KERNEL_RESOURCES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
    pub constant_bytes: u32,
}

/// Parses [`KERNEL_RESOURCES`].
pub fn resources() -> Result<Vec<KernelResources>> {
    parse_resources(KERNEL_RESOURCES)
}

/// Parses a resource table in the format of [`KERNEL_RESOURCES`].
pub fn parse_resources(tsv: &str) -> Result<Vec<KernelResources>> {
    let mut lines = tsv.lines();
    let header = lines.next().unwrap_or_default();
    if header != "kernel\tarch\tregisters\tspill_stores\tspill_loads\tsmem\tcmem" {
        return Err(Error::input(format!("kernel resource table: unexpected header `{header}`")));
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let c: Vec<&str> = l.split('\t').collect();
            let num = |k: usize| -> Result<u32> {
                c.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| Error::input(format!("kernel resource table line {}: `{l}`", i + 2)))
            };
            if c.len() != 7 {
                return Err(Error::input(format!("kernel resource table line {}: {} columns, expected 7", i + 2, c.len())));
            }
            Ok(KernelResources {
                kernel: c[0].to_string(),
                arch: c[1].to_string(),
                registers: num(2)?,
                spill_store_bytes: num(3)?,
                spill_load_bytes: num(4)?,
                shared_bytes: num(5)?,
                constant_bytes: num(6)?,
            })
        })
        .collect()
}

/// The reason given by a `// spills: <reason>` line in the leading comment of a kernel source,
/// which allows its kernels to spill registers.
pub fn spill_allowance(source: &str) -> Option<&str> {
    source
        .lines()
        .map(str::trim)
        .take_while(|l| l.is_empty() || l.starts_with("//"))
        .find_map(|l| l.strip_prefix("// spills:").map(str::trim).filter(|r| !r.is_empty()))
}
