//! The subcommands of the patchbay binary, one file each.

pub mod capture;
pub mod inspect;

use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum Command {
    /// Describe a model directory: family, shapes, dtype, parameter count, rope, sites.
    Inspect(inspect::InspectArgs),
    /// Run prompts and save activations at chosen sites (and logits) to a safetensors file.
    Capture(capture::CaptureArgs),
}

impl Command {
    pub fn run(self) -> patchbay::Result<()> {
        match self {
            Command::Inspect(a) => inspect::run(a),
            Command::Capture(a) => capture::run(a),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Device {
    Cpu,
}

/// A progress bar counting `len` items of `unit`, hidden when `quiet`.
pub fn progress_bar(len: u64, what: &str, unit: &str, quiet: bool) -> ProgressBar {
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(len) };
    let template = format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_message(what.to_string());
    bar
}

/// Writes to stdout; a closed pipe (`patchbay inspect | head`) is not an error.
pub fn print_stdout(s: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}
