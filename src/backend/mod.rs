//! Compute backends. `cpu` is the plain f32 reference every fast path is checked against;
//! `device` is the interface the CUDA backend's host code talks to.

pub mod cpu;
pub mod device;
