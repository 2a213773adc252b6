//! `patchbay inspect`: what a model directory or GGUF file holds.

use std::path::{Path, PathBuf};

use clap::Args;

use super::print_stdout;
use patchbay::experiments::inspect::model_info;
use patchbay::model::Model;
use patchbay::sites::{Site, SiteKind};
use patchbay::{Error, Result};

#[derive(Args)]
#[command(after_help = "Examples:\n  patchbay inspect --model tests/fixtures/llama\n  patchbay inspect --model ~/models/Llama-3.2-1B-Instruct --json\n  patchbay inspect --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n\nA GGUF file is read as patchbay runs it: quantized tensors expanded to f16 (dtype float16 here),\nF32/F16/BF16 tensors as stored; config_sha256 is then the sha256 of the file's header.")]
pub struct InspectArgs {
    /// Hugging Face model directory (config.json, *.safetensors), or a GGUF file (FILE.gguf, or a
    /// directory holding one and no config.json).
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// writeln! into a String (cannot fail).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write;
        let _ = writeln!($out, $($arg)*);
    }};
}

pub fn run(a: InspectArgs) -> Result<()> {
    inspect(&a.model, a.json)
}

fn inspect(dir: &Path, as_json: bool) -> Result<()> {
    let m = Model::load(dir)?;
    let c = &m.cfg;
    let windows = &c.sliding_window;
    if as_json {
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&model_info(&m)).map_err(|e| Error::input(e.to_string()))?));
        return Ok(());
    }
    let mut out = String::new();
    outln!(out, "model        {}", dir.display());
    outln!(out, "family       {} (model_type {})", c.family.name(), c.model_type);
    outln!(out, "layers       {}", c.n_layers);
    outln!(out, "d_model      {}", c.d_model);
    outln!(out, "heads        {} query, {} key/value, d_head {}", c.n_heads, c.n_kv_heads, c.d_head);
    outln!(out, "d_mlp        {}", c.d_mlp);
    outln!(out, "vocab        {}", c.vocab_size);
    outln!(out, "dtype        {}", m.weights.dtype.name());
    outln!(out, "parameters   {} ({:.2} M){}", m.weights.n_params, m.weights.n_params as f64 / 1e6, if c.tie_embeddings { ", embeddings tied" } else { "" });
    outln!(out, "rope         {} (theta {}, rotary dim {})", c.rope_scaling.name(), c.rope_theta, c.rotary_dim);
    if windows.iter().any(Option::is_some) {
        outln!(out, "windows      {}", windows.iter().map(|w| w.map_or("full".to_string(), |w| w.to_string())).collect::<Vec<_>>().join(","));
    }
    let list = |ids: &[u32]| if ids.is_empty() { "none".to_string() } else { ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ") };
    let or_unset = |v: Option<String>| v.unwrap_or_else(|| "unset".to_string());
    outln!(out, "bos / eos    {} / {}", or_unset(c.bos_token_id.map(|b| b.to_string())), list(&c.eos_token_ids));
    outln!(out, "context      {} positions (max_position_embeddings)", c.max_position);
    if let Some(g) = &c.generation {
        outln!(
            out,
            "generation   do_sample {}, temperature {}, top_p {}, max_new_tokens {} (generation_config.json)",
            g.do_sample,
            or_unset(g.temperature.map(|t| t.to_string())),
            or_unset(g.top_p.map(|t| t.to_string())),
            or_unset(g.max_new_tokens.map(|t| t.to_string()))
        );
    }
    outln!(out, "sites        (per token; blocks.L.* for L in 0..{})", c.n_layers);
    for k in SiteKind::ALL {
        let name = Site::new(if k == SiteKind::FinalNorm { c.n_layers } else { 0 }, k).to_string().replacen("blocks.0.", "blocks.L.", 1);
        let shape = k.token_shape(c, 0).iter().map(|d| if k == SiteKind::Pattern && *d == 0 { "n_keys".into() } else { d.to_string() }).collect::<Vec<_>>().join(" x ");
        outln!(out, "  {:<12} {:<32} {}", k.short_name(), name, shape);
    }
    print_stdout(&out);
    Ok(())
}

