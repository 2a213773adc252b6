//! Experiments built on the engine.

pub mod ablate;
pub mod ablate_files;
pub mod bench;
pub mod check;
pub mod capture;
pub mod circuit;
pub mod components;
pub mod cost;
pub mod dataset_files;
pub mod demo;
pub mod directions;
pub mod generate;
pub mod inspect;
pub mod judge;
pub mod label_files;
pub mod patch;
pub mod patch_files;
pub mod probe;
pub mod score;
pub mod shards;
pub mod steer;
pub mod sublayers;
pub mod top_k;
pub mod workload;

use indicatif::ProgressBar;

/// Progress and messages of a pipeline run: a bar of `len` items (`what`, `unit`), and a line
/// for the user.
pub struct Reporter<'a> {
    pub bar: &'a dyn Fn(u64, &str, &str) -> ProgressBar,
    pub say: &'a dyn Fn(String),
}
