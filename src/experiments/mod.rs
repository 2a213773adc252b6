//! Experiments built on the engine.

pub mod bench;
pub mod capture;
pub mod cost;
pub mod demo;
pub mod generate;
pub mod patch;
pub mod probe;
pub mod score;
pub mod shards;
