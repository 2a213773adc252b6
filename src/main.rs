//! The patchbay command line. Exit codes: 0 success, 1 error (one line on stderr, `error: ...`),
//! 2 bad command-line usage (from clap).

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};

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

/// Every command takes negative numbers as values: `--alpha -1` is the value -1 (refused by the
/// command with its reason where it must be positive), not an unknown flag `-1`.
fn with_negative_numbers(cmd: clap::Command) -> clap::Command {
    cmd.allow_negative_numbers(true).mut_subcommands(with_negative_numbers)
}

fn main() -> ExitCode {
    let matches = with_negative_numbers(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
