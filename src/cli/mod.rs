//! The subcommands of the patchbay binary, one file each.

pub mod ablate;
pub mod bench;
pub mod capture;
pub mod check;
pub mod circuit;
pub mod components;
pub mod cost;
pub mod demo;
pub mod directions;
pub mod generate;
pub mod inspect;
pub mod judge;
pub mod interventions;
pub mod merge;
pub mod patch;
pub mod inputs;
pub mod probe;
pub mod score;
pub mod steer;
pub mod synth;
pub mod tokenize;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum Command {
    /// The study pipeline end to end on the bundled demo model and corpus: a report with plots (start here).
    Demo(demo::DemoArgs),
    /// Describe a model (directory or GGUF file): family, shapes, dtype, parameter count, rope, sites.
    Inspect(inspect::InspectArgs),
    /// Run prompts and save activations at chosen sites (and logits) to a safetensors file.
    Capture(capture::CaptureArgs),
    /// Show a prompt's token ids and strings, as every command encodes it (BOS, chat template).
    Tokenize(tokenize::TokenizeArgs),
    /// The applicability map: every methodology on every fixture family and engine, graded against Hugging Face references (SUPPORTED, DEGRADED, ERROR, SILENTLY_WRONG).
    Check(check::CheckArgs),
    /// Circuits as files: build a circuit per emotion from component rankings (build), evaluate circuit-modulated generation against prompting and steering (eval).
    Circuit(circuit::CircuitArgs),
    /// Attention heads and MLP neurons: contributions to a direction and to label logits (contrib), the logit lens (lens).
    Components(components::ComponentsArgs),
    /// Steering directions per site: class-mean or context-averaged from a dataset, from probe weights, unique-effect vectors (a safetensors file).
    Directions(directions::DirectionsArgs),
    /// Generate text from prompts (KV-cache decoding, greedy or sampled) on any device: generations.jsonl.
    Generate(generate::GenerateArgs),
    /// Which emotion generated texts express, judged locally by label scoring or a saved probe (per condition and beta, accuracy against the steering target).
    Judge(judge::JudgeArgs),
    /// Activation-patching sweeps resumed from clean runs (the Tak et al. protocol and general sweeps).
    Patch(patch::PatchArgs),
    /// Causal component sweeps: ablate (zero, mean, random) or scale each attention head or MLP neuron group, resumed from clean runs, read through a label set.
    Ablate(ablate::AblateArgs),
    /// Combine the shards of a patching sweep (patch --shard i/n) into the whole run's outputs.
    Merge(merge::MergeArgs),
    /// Write a random checkpoint with the exact layout of a real model (for costs and benches).
    Synth(synth::SynthArgs),
    /// Measure costs side by side (e.g. resumed vs naive patching).
    Bench(bench::BenchArgs),
    /// Estimate FLOPs, bytes, peak memory and time of a planned experiment before running it.
    Cost(cost::CostArgs),
    /// Score a dataset with the model's next-token logits over a label set: predictions, accuracy, confusion matrix.
    Score(score::ScoreArgs),
    /// Steering sweeps: add a direction (or project out a subspace) at a site, layer by layer and strength by strength; read a label set (--mode labels) or generate and judge the texts (--mode generate, Wang et al.).
    Steer(steer::SteerArgs),
    /// The probing pipeline: dataset -> prompts -> sharded capture -> scores -> linear probes -> results and plots.
    Probe(probe::ProbeArgs),
}

impl Command {
    pub fn run(self) -> patchbay::Result<()> {
        match self {
            Command::Demo(a) => demo::run(a),
            Command::Inspect(a) => inspect::run(a),
            Command::Capture(a) => capture::run(a),
            Command::Tokenize(a) => tokenize::run(a),
            Command::Check(a) => check::run(a),
            Command::Circuit(a) => circuit::run(a),
            Command::Components(a) => components::run(a),
            Command::Directions(a) => directions::run(a),
            Command::Generate(a) => generate::run(a),
            Command::Judge(a) => judge::run(a),
            Command::Patch(a) => patch::run(a),
            Command::Ablate(a) => ablate::run(a),
            Command::Merge(a) => merge::run(a),
            Command::Synth(a) => synth::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Cost(a) => cost::run(a),
            Command::Score(a) => score::run(a),
            Command::Probe(a) => probe::run(a),
            Command::Steer(a) => steer::run(a),
        }
    }
}

/// Where and at which precision a command runs its model: `--device` and `--precision`, the
/// same for every command that runs one.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Compute device: cpu (patchbay's own CPU engine), cuda, cuda:N (a GPU), or emu (the CUDA
    /// kernels emulated on the CPU: slow, for checking the GPU path without a GPU).
    #[arg(long, default_value = "cpu")]
    pub device: patchbay::backend::DeviceSpec,
    /// Numerics: f32 (the reference; the cpu default) or bf16 (the GPU's: bf16 weights, GEMM
    /// operands and KV cache, f32 accumulation and residual stream; the only one of cuda and
    /// emu; on the cpu, a preview of a GPU run at about the speed of f32).
    #[arg(long)]
    pub precision: Option<patchbay::backend::Precision>,
}

impl EngineArgs {
    /// The engine (`patchbay::engine::load_engine`).
    pub fn load<'m>(&self, model: &'m patchbay::model::Model, allow_nonfinite: bool) -> patchbay::Result<Box<dyn patchbay::engine::Engine + 'm>> {
        patchbay::engine::load_engine(model, self.device, self.precision, allow_nonfinite)
    }
}

/// `--allow-nonfinite`'s help, one text for every command that runs a model.
pub const ALLOW_NONFINITE_HELP: &str = "Keep NaN and Inf in logits and activations instead of stopping at the first (the default stops with the prompt and the first site where they appeared); their count is written as `nonfinite_values` in the manifest.";

/// The model as manifests record it: its directory, config hash and family.
pub fn model_json(model: &patchbay::model::Model) -> serde_json::Value {
    serde_json::json!({"path": model.dir.display().to_string(), "config_sha256": model.config_hash, "family": model.cfg.family.name()})
}

/// A command's manifest: the command, patchbay's version and the command line, then the
/// command's own `fields` (an object).
pub fn command_manifest(command: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::json!({
        "command": command,
        "patchbay_version": env!("CARGO_PKG_VERSION"),
        "command_line": std::env::args().collect::<Vec<_>>(),
    });
    merge(&mut m, fields);
    m
}

/// Adds the fields of the object `from` to the object `into` (replacing those of the same name).
pub fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
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

/// Parses a byte count such as `512M`, `2G`, `1.5G` or `1048576`.
pub fn parse_bytes(s: &str) -> patchbay::Result<usize> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| patchbay::Error::input(format!("`{s}` is not a size (examples: 512M, 2G)")))?;
    Ok((v * mult as f64) as usize)
}
