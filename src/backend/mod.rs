//! Compute backends. `cpu` is the plain f32 reference every fast path is checked against (and
//! its bf16 variant, [`Precision::Bf16`]); `device` is the interface the CUDA backend's host
//! code talks to.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod kernels;
pub mod ops;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use crate::model::config::Precision;
use crate::{Error, Result};

/// Where a model runs: `cpu` (the plain reference), `cuda` / `cuda:N` (a GPU), `emu` (the
/// emulated GPU: the CUDA kernels executed on the CPU, for tests and machines without a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Emu,
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        let bad = || Error::input(format!("device `{s}`: expected cpu, cuda, cuda:N (N a GPU index such as cuda:0) or emu"));
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "emu" => Ok(DeviceSpec::Emu),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Emu => write!(f, "emu"),
        }
    }
}

impl DeviceSpec {
    /// The device driver, or None for the CPU reference path. A clear error (never a panic)
    /// when the device is not there: no GPU or CUDA driver, a build without the emulator.
    pub fn driver(&self) -> Result<Option<Arc<dyn device::Driver>>> {
        match self {
            DeviceSpec::Cpu => Ok(None),
            DeviceSpec::Cuda(n) => Ok(Some(Arc::new(cuda::CudaDriver::new(*n)?))),
            DeviceSpec::Emu => Ok(Some(Arc::new(emu::EmuDriver::new()?))),
        }
    }
}
