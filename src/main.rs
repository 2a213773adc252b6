//! The patchbay command line. Exit codes: 0 success, 1 error (one line on stderr, `error: ...`),
//! 2 bad command-line usage (from clap).

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "patchbay", version, about = "Tap, patch, steer and ablate the insides of Hugging Face LLMs.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: cli::Command,
}

fn main() -> ExitCode {
    match Cli::parse().command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
