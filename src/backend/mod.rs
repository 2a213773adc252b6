//! Compute backends. `cpu` is the plain f32 reference every fast path is checked against.

pub mod cpu;
