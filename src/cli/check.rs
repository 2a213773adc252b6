//! `patchbay check`: the applicability map against the Hugging Face references.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::progress_bar;
use patchbay::backend::{DeviceSpec, Precision};
use patchbay::engine::load_engine;
use patchbay::experiments::check::{Cell, Goldens, Methodology, Verdict, check_family, markdown};
use patchbay::io::{JsonlFile, OutLock, write_atomic};
use patchbay::model::Model;
use patchbay::{Error, Result};

const CHECK_HELP: &str = "Examples:
  patchbay check --out runs/map                                  # every fixture family on cpu, cpu-bf16 and emu
  patchbay check --devices cuda --out runs/map-gpu                # on the GPU
  patchbay check --families llama,gemma2 --devices emu --max-cases 6 --out /tmp/map

What is checked: each methodology (capture of every site, logits, attention patterns, patching
resumed and naive, steering, head/neuron ablation, greedy generation plain and steered) runs
through the functions its command calls on each fixture model (DIR/<family>/, as made by
scripts/golden/make_goldens.py) and is compared with the Hugging Face references beside it
(golden.safetensors, patch_golden.json, steer_golden.json, ablate_golden.json,
generate_golden.json; made with forward hooks on the HF modules by scripts/golden/).

Verdicts: SUPPORTED (every value within the f32 tolerance, 1e-4 + 1e-4 |ref|); DEGRADED (within
the bf16 forward tolerance: the worst error <= 5% of the largest reference value and NMSE <= 1e-3;
the map gives the percentage; generation: sequences that diverge only where the reference's top-2
margin is within twice the engine's logit error); ERROR (the engine refuses, with its message);
SILENTLY_WRONG (anything else). Probes have no HF oracle: tests/probe_pipeline.rs grades them
against scikit-learn (tests/data/sklearn_golden_*.json).

Output (--out): cells.jsonl (one line per cell as it is graded), applicability.csv
(methodology,family,device,verdict,cases,max_abs_err,rel_err,note) and applicability.md (one table
per engine), also printed. Exit code 1 when any cell is SILENTLY_WRONG.";

#[derive(Args)]
#[command(after_help = CHECK_HELP)]
pub struct CheckArgs {
    /// Directory of the fixture families: DIR/<family>/ holds the model and its goldens.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Families (comma-separated); default: every subdirectory of --fixtures with golden.safetensors.
    #[arg(long, value_delimiter = ',')]
    families: Vec<String>,
    /// Engines (comma-separated): cpu (the f32 reference), cpu-bf16 (the cpu engine at --precision bf16),
    /// emu (the CUDA kernels emulated on the CPU), cuda / cuda:N.
    #[arg(long, value_delimiter = ',', default_value = "cpu,cpu-bf16,emu")]
    devices: Vec<CheckEngine>,
    /// At most this many cases per methodology and family (spread evenly over each golden's cases); default all.
    #[arg(long)]
    max_cases: Option<usize>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// An engine of the map: a device, and for the cpu a precision (`cpu-bf16`); named as given.
#[derive(Clone, Copy, Debug)]
struct CheckEngine {
    device: DeviceSpec,
    precision: Option<Precision>,
}

impl std::str::FromStr for CheckEngine {
    type Err = Error;
    fn from_str(s: &str) -> Result<CheckEngine> {
        match s {
            "cpu-bf16" => Ok(CheckEngine { device: DeviceSpec::Cpu, precision: Some(Precision::Bf16) }),
            _ => s.parse().map(|device| CheckEngine { device, precision: None }).map_err(|_| Error::input(format!("engine `{s}`: expected cpu, cpu-bf16, emu, cuda or cuda:N"))),
        }
    }
}

impl std::fmt::Display for CheckEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.precision {
            Some(Precision::Bf16) => write!(f, "{}-bf16", self.device),
            _ => write!(f, "{}", self.device),
        }
    }
}

pub fn run(a: CheckArgs) -> Result<()> {
    if a.max_cases == Some(0) {
        return Err(Error::input("--max-cases 0 compares nothing: give at least 1, or leave it out for every case"));
    }
    let families = if a.families.is_empty() {
        let mut f: Vec<String> = std::fs::read_dir(&a.fixtures)
            .map_err(|e| Error::io(&a.fixtures, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("golden.safetensors").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        f.sort();
        if f.is_empty() {
            return Err(Error::input(format!("{}: no family directory with golden.safetensors (give --fixtures, e.g. tests/fixtures of the source tree)", a.fixtures.display())));
        }
        f
    } else {
        a.families.clone()
    };
    let _lock = OutLock::acquire(&a.out)?;
    let mut lines = JsonlFile::new(a.out.join("cells.jsonl"));
    let bar = progress_bar((families.len() * a.devices.len() * Methodology::ALL.len()) as u64, "check", "cells", a.quiet);
    let mut cells: Vec<Cell> = Vec::new();
    for device in &a.devices {
        for family in &families {
            let dir = a.fixtures.join(family);
            let model = Model::load(&dir)?;
            let engine = load_engine(&model, device.device, device.precision, false)?;
            bar.set_message(format!("check {family} on {device}"));
            let goldens = Goldens { dir, family: family.clone(), max_cases: a.max_cases };
            check_family(engine.as_ref(), &device.to_string(), &goldens, &bar, &mut |c| {
                lines.write(&[json!({
                    "methodology": c.methodology.name(), "family": c.family, "device": c.device, "verdict": c.verdict.name(),
                    "cases": c.cases, "max_abs_err": c.max_abs_err, "rel_err": c.rel_err, "note": c.note,
                })])?;
                cells.push(c);
                Ok(())
            })?;
        }
    }
    bar.finish_and_clear();
    let csv: String = std::iter::once(Cell::CSV_HEADER.to_string()).chain(cells.iter().map(Cell::csv_row)).map(|l| l + "\n").collect();
    write_atomic(&a.out.join("applicability.csv"), csv.as_bytes())?;
    let md = markdown(&cells);
    write_atomic(&a.out.join("applicability.md"), md.as_bytes())?;
    super::print_stdout(&md);
    let wrong: Vec<&Cell> = cells.iter().filter(|c| c.verdict == Verdict::SilentlyWrong).collect();
    match wrong.first() {
        Some(c) => Err(Error::input(format!(
            "{} of {} cells are SILENTLY_WRONG (see {}); first: {} {} on {}: {}",
            wrong.len(),
            cells.len(),
            a.out.join("applicability.md").display(),
            c.methodology.name(),
            c.family,
            c.device,
            c.note
        ))),
        None => Ok(()),
    }
}
