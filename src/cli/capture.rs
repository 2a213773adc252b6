//! `patchbay capture`: activations at chosen sites to a safetensors file.

use std::path::PathBuf;

use clap::Args;

use super::{progress_bar};
use patchbay::{Error, Result};
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::experiments::capture::{CaptureSpec, capture, metadata};
use patchbay::io::{OutDtype, write_safetensors};
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site};

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
#[command(after_help = CAPTURE_HELP)]
pub struct CaptureArgs {
    /// Hugging Face model directory, or a GGUF file (FILE.gguf, or a directory holding one).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[arg(long, help = super::ALLOW_NONFINITE_HELP)]
    allow_nonfinite: bool,
    /// A prompt text (repeatable).
    #[arg(long, num_args = 1.., required_unless_present_any = ["prompts", "token_ids"], conflicts_with_all = ["prompts", "token_ids"])]
    text: Vec<String>,
    /// Prompts file: JSONL (.jsonl: one {"text": ...} or {"messages": [...]} per line), else one prompt per line.
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

pub fn run(a: CaptureArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let engine = a.engine.load(&model, a.allow_nonfinite)?;
    let source = match (&a.prompts, &a.token_ids) {
        (Some(p), _) => PromptSource::File(p),
        (_, Some(t)) => PromptSource::TokenIds(t),
        _ => PromptSource::Texts(&a.text),
    };
    let prompts = load_prompts(source, &a.model, a.chat)?;
    let spec = CaptureSpec { sites: Site::parse_spec(&a.sites, &model.cfg)?, positions: Positions::parse(&a.positions)?, logits: a.logits, dtype: a.dtype, batch_size: a.batch_size, interventions: Vec::new() };
    let bar = progress_bar(prompts.len() as u64, "capture", "prompts", a.quiet);
    let tensors = capture(engine.as_ref(), &prompts, &spec, &bar)?;
    bar.finish_and_clear();
    let mut md = metadata(&model, engine.as_ref(), &spec);
    // Each prompt's token ids and strings, for labelling positions and pattern axes (`<id N>`
    // where the tokenizer has no string; no strings when the model has no tokenizer).
    md.insert("token_ids".into(), serde_json::to_string(&prompts).map_err(|e| Error::input(e.to_string()))?);
    if let Ok(tok) = PromptTokenizer::load(&a.model) {
        let strings: Vec<Vec<String>> = prompts.iter().map(|p| tok.token_strings(p)).collect();
        md.insert("tokens".into(), serde_json::to_string(&strings).map_err(|e| Error::input(e.to_string()))?);
    }
    write_safetensors(&a.out, &tensors, &md)?;
    if !a.quiet {
        eprintln!("wrote {} tensors for {} prompts to {}", tensors.len(), prompts.len(), a.out.display());
    }
    Ok(())
}
