//! Inputs: prompts as texts, chat messages or raw token ids; labelled datasets; scenario/event
//! datasets with variants (SEV); prompt templates; label sets.

pub mod dataset;
pub mod labels;
pub mod prompts;
pub mod sev;
pub mod template;
