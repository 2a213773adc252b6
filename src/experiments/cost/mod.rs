//! `cost`: what a planned experiment will cost, before it runs: FLOPs and bytes of every forward
//! call the engine would make, peak memory, and a roofline estimate of the time on a named device.
//!
//! The model, in one place:
//! - **Calls.** A workload is enumerated into the exact forward calls the engine makes. For a
//!   patch sweep, `run_sweep` itself runs against a recording engine ([`Planner`]) that computes
//!   nothing, so the plan is the code's own (clean runs, target groups under the memory budget,
//!   segment batches, or one forward per experiment for the naive method); `capture`/`probe`
//!   are batches of prompts. Each call is a start layer, per sequence (cached positions, new
//!   rows), its logit rows and width, its captures, the layers where head_out is hooked, and
//!   what is held meanwhile.
//! - **FLOPs** are counted as `forward.rs` computes them: per row and layer the q/k/v/o and
//!   gate/up/down GEMMs (2*m*n*k; o_proj once per head where head_out is hooked), attention
//!   (QK^T and PV: 4 * d_head * n_heads per visible key, causal with sliding windows), the
//!   lm_head rows that are read (label tokens only where labels are used). Norms, RoPE,
//!   activations and softmax are not counted as FLOPs (their bytes are).
//! - **Bytes** depend on the path: the CPU reference (`forward.rs`: weights in their stored
//!   dtype, f32 GEMM operands and KV cache, a resumed segment's KV prefix copied per layer) or
//!   the device forward (`device_forward.rs`: bf16 weights, GEMM operands and KV, f32 residual).
//! - **Time** of a call = sum over its ops (layer GEMMs, lm_head, attention, elementwise) of
//!   max(FLOPs / throughput, bytes / bandwidth) on a GPU (the roofline: each op's time goes to
//!   the term that bounds it), or of both terms on the CPU (`matmul_t` converts a weight tile,
//!   then multiplies it: streaming and compute do not overlap), plus a fixed cost per dispatched
//!   op (GPU: a kernel launch; CPU: a parallel op's fork-join). The largest of compute, memory
//!   and overhead is "dominant".
//! - **Devices**: GPUs from their datasheets (see [`GPUS`]); the CPU measured on this machine
//!   with the engine's own kernels at the model's shapes ([`calibrate_cpu`]).
//!
//! Files: `devices` (hardware figures and the CPU calibration), `calls` (one forward call's
//! FLOPs, bytes and time), `plan` (workloads enumerated into calls), `estimate` (calls summed
//! per method and phase), `text` (the human-readable report), `measure` (`--measure`: the
//! planned sweep run and timed beside its estimate).

mod calls;
mod devices;
mod estimate;
mod measure;
mod plan;
mod text;

pub use calls::*;
pub use devices::*;
pub use estimate::*;
pub use measure::*;
pub use plan::*;
pub use text::*;
