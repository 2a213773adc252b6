//! The patchbay command line. Exit codes: 0 success, 1 error (one line on stderr, `error: ...`),
//! 2 bad command-line usage (from clap).

mod cli;

use std::process::ExitCode;

use clap::Parser;

const TOP_HELP: &str = "Start here:
  patchbay demo                                   # the whole study pipeline on the bundled model (a few minutes, CPU)
  patchbay inspect --model DIR                    # what a checkpoint is: family, shapes, sites
  patchbay COMMAND --help                         # every command's flags, with examples

Exit codes: 0 success; 1 error (one line on stderr starting with `error:`, saying what to change);
2 bad command-line usage (unknown flag, missing value). Long commands show progress on stderr;
--quiet hides it, --json (where offered) prints one JSON object on stdout for tools.

Reliability: the logits and activations of every forward are checked for NaN and Inf; the first
stops the run naming the prompt and the first site where it appeared (--allow-nonfinite keeps and
counts them). An --out directory is locked (.patchbay.lock) while a run writes it.";

#[derive(Parser)]
#[command(name = "patchbay", version, about = "Tap, patch, steer and ablate the insides of Hugging Face LLMs.", long_about = None, after_help = TOP_HELP)]
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
