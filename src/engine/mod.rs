//! The engine: the one forward pass (and, later, KV stores and resumed segments).

pub mod forward;
