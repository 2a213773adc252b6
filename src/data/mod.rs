//! Inputs: prompts as texts, chat messages or raw token ids.

pub mod prompts;
