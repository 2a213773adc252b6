//! Experiments built on the engine.

pub mod capture;
pub mod patch;
