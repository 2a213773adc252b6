//! Checks shared by the launchers: buffer lengths and the narrowing of sizes to the kernels'
//! 32-bit `int` parameters. Every message starts with the op's name.

use bytemuck::Pod;

use crate::backend::device::DeviceBuffer;
use crate::{Error, Result};

/// `b` holds at least `want` elements (buffers may be longer than the rows a launch uses).
pub(crate) fn at_least<T: Pod>(op: &str, name: &str, b: &DeviceBuffer<T>, want: usize) -> Result<()> {
    if b.len() < want {
        return Err(Error::input(format!("{op}: {name} has {} elements, expected at least {want}", b.len())));
    }
    Ok(())
}

/// `b`, where given, holds at least `want` elements.
pub(crate) fn at_least_opt<T: Pod>(op: &str, name: &str, b: Option<&DeviceBuffer<T>>, want: usize) -> Result<()> {
    b.map_or(Ok(()), |b| at_least(op, name, b, want))
}

/// `b` holds exactly `want` elements, the `shape` the message names.
pub(crate) fn exactly<T: Pod>(op: &str, name: &str, b: &DeviceBuffer<T>, want: usize, shape: &str) -> Result<()> {
    if b.len() != want {
        return Err(Error::input(format!("{op}: {name} has {} elements, expected {want} ({shape})", b.len())));
    }
    Ok(())
}

/// `v` as a kernel `int`; `what` names it after the op ("rope: rows").
pub(crate) fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::input(format!("{what} = {v} does not fit the kernels' 32-bit indices")))
}

/// Every one of `dims` fits a kernel `int`.
pub(crate) fn fit_i32(op: &str, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&v| v > i32::MAX as usize) {
        return Err(Error::input(format!("{op}: dimensions {dims:?} do not fit in 32 bits")));
    }
    Ok(())
}
