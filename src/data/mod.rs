//! Inputs: prompts as texts, chat messages or raw token ids; labelled datasets; prompt
//! templates; label sets.

pub mod dataset;
pub mod labels;
pub mod prompts;
pub mod template;
