//! `patchbay synth`: a random checkpoint with the exact config and tensor layout of a real model.

use std::path::PathBuf;

use clap::Args;

use patchbay::model::synth::{PRESETS, preset, write_checkpoint};
use patchbay::{Error, Result};

#[derive(Args)]
#[command(after_help = "Examples:
  patchbay synth --like llama-3.2-1b --out /tmp/llama-1b      # 1.24B parameters, 2.5 GB of bf16
  patchbay synth --config my/config.json --layers 16 --out /tmp/small

The weights are seeded N(0, 1/fan_in) bf16 values: good for measuring cost, meaningless as a model.
Presets take their values from the public models' config.json.")]
pub struct SynthArgs {
    /// A preset: llama-3.2-1b, llama-3.1-8b, gemma-2-2b, qwen2.5-7b, phi-3.5-mini, olmo-2-7b, mistral-7b-v0.3.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    like: Option<String>,
    /// A config.json to copy.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override num_hidden_layers (a smaller model of the same shape per layer).
    #[arg(long)]
    layers: Option<usize>,
    /// Weight seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (config.json, model.safetensors).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let mut config = match (&a.like, &a.config) {
        (Some(name), _) => preset(name)?,
        (_, Some(path)) => {
            let bytes = patchbay::error::read_file(path)?;
            serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?
        }
        _ => return Err(Error::input(format!("give --like (one of {}) or --config", PRESETS.join(", ")))),
    };
    if let Some(n) = a.layers {
        let obj = config.as_object_mut().ok_or_else(|| Error::input("config must be a JSON object"))?;
        obj.insert("num_hidden_layers".into(), n.into());
        obj.remove("layer_types");
    }
    let n = write_checkpoint(&config, &a.out, a.seed)?;
    eprintln!("wrote {} ({:.3} B parameters, bf16) to {}", a.like.as_deref().unwrap_or("checkpoint"), n as f64 / 1e9, a.out.display());
    Ok(())
}
