//! patchbay: an interpretability engine for decoder-only transformer LLMs.
//! See DESIGN.md for the architecture.
//!
//! # Layers
//!
//! Imports only go down this list: a module uses itself and the modules below it, never one
//! above. `tests/layering.rs` reads this list (the first word of each line of the block below)
//! and fails on every `crate::` path in src/ that goes up.
//!
//! ```text
//! cli          the binary (src/main.rs, src/cli/): parses flags, calls an experiment, prints
//! experiments  pipelines: capture, score, probe, patch, steer, demo, generate, cost, bench
//! engine       the two forwards (f32 reference, device host code), KV store, clean runs, segments
//! backend      drivers (cuda, emu) and ops/<op>.rs: one launcher and CPU reference per kernel
//! intervene    the intervention contract (ops, hooks), the CPU reference of site ops, the grammar (spec)
//! data         datasets, prompt templates, label sets
//! sites        Site, SiteKind, positions; TransformerLens names
//! model        config.json -> ModelConfig, checkpoints, tokenizer, synthetic checkpoints
//! io           result files (atomic writes, safetensors), plots
//! learn        linear probes: logistic and ridge regression, splits, metrics; steering directions
//! logits       argmax and label metrics of a logits row (host helpers and the kernel's semantics)
//! rng          seeded streams: splitmix64, gaussian, pair sampling, ChaCha8
//! error        crate::Error and crate::Result (re-exported at the root)
//! ```
//!
//! Why this order, where the code leaves a choice: `intervene` sits above `sites` and `model`
//! (an intervention is placed at a site and shaped by the config) and below `backend` (the site
//! kernels implement its contract). `data` reads the tokenizer, so it is above `model`; nothing
//! below `experiments` reads a dataset, so it sits directly under the layers that use sites.
//! `model` writes synthetic checkpoints through `io`, so `io` is below it; `io` knows no model
//! and no experiment (plots take plain grids and series). `learn` and `logits` are pure numerics
//! on slices, used by the experiments and, for `logits`, by the metrics kernel's reference in
//! `backend`; `rng` is below all of them because synthetic weights, intervention noise, the
//! samplers and the probes' splits draw from the same streams.

pub mod backend;
pub mod data;
pub mod engine;
pub mod error;
pub mod experiments;
pub mod intervene;
pub mod io;
pub mod learn;
pub mod logits;
pub mod model;
pub mod rng;
pub mod sites;

pub use error::{Error, Result};
