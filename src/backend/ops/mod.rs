//! Checked entry points of the CUDA kernels, one file per kernel file. One name finds a kernel's
//! four parts: `kernels/<op>.cu` (the kernels) <-> `ops/<op>.rs` (the launcher: grid, block,
//! shared memory; the public checked function: sizes, dtypes, contiguity; and the CPU reference
//! `<name>_ref`) <-> `tests/kernel_<op>.rs` (the kernels against the reference). Kernels are
//! never launched otherwise. They run on any `Driver`: the GPU, or the emulator in tests.
//! `common` holds the checks the launchers share.
pub mod act;
pub mod attention;
pub(crate) mod common;
pub mod elementwise;
pub mod embed;
pub mod kv;
pub mod metrics;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod site_ops;
