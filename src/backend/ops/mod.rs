//! Checked entry points of the CUDA kernels, one file per kernel file: `kernels/<op>.cu`
//! pairs with `ops/<op>.rs`. Each file has the launcher (grid/block/shared memory) and the
//! public checked function (sizes, dtypes, contiguity); kernels are never launched otherwise.
//! They run on any `Driver`: the GPU, or the emulator in tests.
pub mod act;
pub mod attention;
pub mod elementwise;
pub mod embed;
pub mod metrics;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod site_ops;
