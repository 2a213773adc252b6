//! patchbay: an interpretability engine for decoder-only transformer LLMs.
//! See DESIGN.md for the architecture.

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
