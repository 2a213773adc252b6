//! The patchbay command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::experiments::capture::{CaptureSpec, capture, metadata};
use patchbay::io::{OutDtype, write_safetensors};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};
use patchbay::{Error, Result};

#[derive(Parser)]
#[command(name = "patchbay", version, about = "Tap, patch, steer and ablate the insides of Hugging Face LLMs.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model directory: family, shapes, dtype, parameter count, rope, sites.
    #[command(after_help = "Examples:\n  patchbay inspect --model tests/fixtures/llama\n  patchbay inspect --model ~/models/Llama-3.2-1B-Instruct --json")]
    Inspect {
        /// Hugging Face model directory (config.json, *.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run prompts and save activations at chosen sites (and logits) to a safetensors file.
    #[command(after_help = CAPTURE_HELP)]
    Capture(CaptureArgs),
}

const CAPTURE_HELP: &str = "Examples:
  patchbay capture --model M --text 'I got the job' --sites resid_post --positions -1 --out acts.safetensors
  patchbay capture --model M --prompts prompts.jsonl --chat --sites 'blocks.*.hook_attn_out,blocks.3.attn.hook_z' --positions -1,-2 --out a.safetensors
  patchbay capture --model M --token-ids ids.json --sites all --positions all --logits --out all.safetensors

Sites: TransformerLens names (blocks.5.hook_resid_pre, blocks.5.attn.hook_z, ln_final.hook_normalized),
globs over them (blocks.*.hook_mlp_out), short names for every layer (resid_pre, attn_in, q, k, v,
rot_q, rot_k, pattern, z, result, attn_out, resid_mid, mlp_in, mlp_post, mlp_out, resid_post,
final_norm), or `all`.

Output: one tensor per site named by its TransformerLens name. With --positions all, prompts are
concatenated along the first axis ([T_total, ...]) and `prompt_offsets` [n_prompts+1] says where
each starts; attn.hook_pattern is [T_total, n_heads, max_len], zero past each prompt's length.
With a position list the first two axes are [n_prompts, n_positions]. `logits` follows the same
layout with a vocab axis.";

#[derive(Args)]
struct CaptureArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Compute device. Only the CPU reference exists so far.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// A prompt text (repeatable).
    #[arg(long, num_args = 1.., required_unless_present_any = ["prompts", "token_ids"], conflicts_with_all = ["prompts", "token_ids"])]
    text: Vec<String>,
    /// JSONL file: one {"text": ...} or {"messages": [...]} per line.
    #[arg(long, conflicts_with = "token_ids")]
    prompts: Option<PathBuf>,
    /// JSON file: a list of lists of token ids, used verbatim (no BOS added).
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// Wrap each text as a user message in the model's chat template (with the generation prompt).
    #[arg(long)]
    chat: bool,
    /// Sites to capture (see below).
    #[arg(long)]
    sites: String,
    /// `all`, or positions such as -1,-2 (from the end) or 0,3 (absolute).
    #[arg(long, allow_hyphen_values = true)]
    positions: String,
    /// Also save the logits at the same positions.
    #[arg(long)]
    logits: bool,
    /// Element type of the saved activations.
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    dtype: OutDtype,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Capture(args) => run_capture(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn inspect(dir: &std::path::Path, as_json: bool) -> Result<()> {
    let m = Model::load(dir)?;
    let c = &m.cfg;
    let sites: Vec<serde_json::Value> = SiteKind::ALL
        .iter()
        .map(|k| json!({"kind": k.short_name(), "name": Site::new(if *k == SiteKind::FinalNorm { c.n_layers } else { 0 }, *k).to_string(), "shape": k.token_shape(c, 0).iter().map(|&d| if *k == SiteKind::Pattern && d == 0 { json!("n_keys") } else { json!(d) }).collect::<Vec<_>>()}))
        .collect();
    let windows: Vec<Option<usize>> = c.layer_window.clone();
    let info = json!({
        "family": c.family.name(),
        "model_type": c.model_type,
        "layers": c.n_layers,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "d_head": c.d_head,
        "d_mlp": c.d_mlp,
        "vocab": c.vocab_size,
        "dtype": m.weights.dtype.name(),
        "parameters": m.weights.n_params,
        "tied_embeddings": c.tie_embeddings,
        "rope_type": c.rope_scaling.name(),
        "rope_theta": c.rope_theta,
        "rotary_dim": c.rotary_dim,
        "sliding_window": windows,
        "attn_softcap": c.attn_softcap,
        "final_softcap": c.final_softcap,
        "config_sha256": m.config_hash,
        "sites": sites,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&info).map_err(|e| Error::input(e.to_string()))?);
        return Ok(());
    }
    println!("model        {}", dir.display());
    println!("family       {} (model_type {})", c.family.name(), c.model_type);
    println!("layers       {}", c.n_layers);
    println!("d_model      {}", c.d_model);
    println!("heads        {} query, {} key/value, d_head {}", c.n_heads, c.n_kv_heads, c.d_head);
    println!("d_mlp        {}", c.d_mlp);
    println!("vocab        {}", c.vocab_size);
    println!("dtype        {}", m.weights.dtype.name());
    println!("parameters   {} ({:.3} B){}", m.weights.n_params, m.weights.n_params as f64 / 1e9, if c.tie_embeddings { ", embeddings tied" } else { "" });
    println!("rope         {} (theta {}, rotary dim {})", c.rope_scaling.name(), c.rope_theta, c.rotary_dim);
    if windows.iter().any(Option::is_some) {
        println!("windows      {}", windows.iter().map(|w| w.map_or("full".to_string(), |w| w.to_string())).collect::<Vec<_>>().join(","));
    }
    println!("sites        (per token; blocks.L.* for L in 0..{})", c.n_layers);
    for k in SiteKind::ALL {
        let name = Site::new(if k == SiteKind::FinalNorm { c.n_layers } else { 0 }, k).to_string().replacen("blocks.0.", "blocks.L.", 1);
        let shape = k.token_shape(c, 0).iter().map(|d| if k == SiteKind::Pattern && *d == 0 { "n_keys".into() } else { d.to_string() }).collect::<Vec<_>>().join(" x ");
        println!("  {:<12} {:<32} {}", k.short_name(), name, shape);
    }
    Ok(())
}

fn run_capture(a: CaptureArgs) -> Result<()> {
    let Device::Cpu = a.device;
    let model = Model::load(&a.model)?;
    let source = match (&a.prompts, &a.token_ids) {
        (Some(p), _) => PromptSource::Jsonl(p),
        (_, Some(t)) => PromptSource::TokenIds(t),
        _ => PromptSource::Texts(&a.text),
    };
    let prompts = load_prompts(source, &a.model, a.chat)?;
    let spec = CaptureSpec { sites: Site::parse_spec(&a.sites, &model.cfg)?, positions: Positions::parse(&a.positions)?, logits: a.logits, dtype: a.dtype, batch_size: a.batch_size };
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(prompts.len() as u64) };
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} prompts {per_sec} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_message("capture");
    let tensors = capture(&model, &prompts, &spec, &bar)?;
    bar.finish_and_clear();
    write_safetensors(&a.out, &tensors, metadata(&model, &spec))?;
    if !a.quiet {
        eprintln!("wrote {} tensors for {} prompts to {}", tensors.len(), prompts.len(), a.out.display());
    }
    Ok(())
}
