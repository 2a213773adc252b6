//! `patchbay tokenize`: what the model sees of a prompt — its token ids and strings, exactly as
//! every other command encodes them (BOS, chat template and all).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::print_stdout;
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

const TOKENIZE_HELP: &str = "Examples:
  patchbay tokenize --model M --text 'What are the inferred emotions in the following contexts? Context: I won. Answer:'
  patchbay tokenize --model M --text 'I won.' --chat          # wrapped in the model's chat template
  patchbay tokenize --model M --prompts prompts.txt --json    # one JSON object per prompt

Output: per prompt, its number of tokens, then one line per token: position (from the start
and from the end, as --positions counts), id, and the token's string in the vocabulary
(byte-level BPE shows a leading space as Ġ). With --json: one line per prompt,
{\"index\", \"ids\", \"tokens\"}. The ids are those `capture --text` and the other commands run,
so `capture --token-ids` with them gives the same activations.";

#[derive(Args)]
#[command(after_help = TOKENIZE_HELP)]
pub struct TokenizeArgs {
    /// Model directory or GGUF file (its tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// A prompt text (repeatable).
    #[arg(long, num_args = 1.., required_unless_present = "prompts", conflicts_with = "prompts")]
    text: Vec<String>,
    /// Prompts file: JSONL (.jsonl: one {"text": ...} or {"messages": [...]} per line), else one prompt per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Wrap each text as a user message in the model's chat template (with the generation prompt).
    #[arg(long)]
    chat: bool,
    /// One JSON object per prompt on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let source = match &a.prompts {
        Some(p) => PromptSource::File(p),
        None => PromptSource::Texts(&a.text),
    };
    let prompts = load_prompts(source, &a.model, a.chat)?;
    let tok = PromptTokenizer::load(&a.model)?;
    let mut out = String::new();
    for (i, ids) in prompts.iter().enumerate() {
        let tokens = tok.token_strings(ids);
        if a.json {
            out.push_str(&serde_json::to_string(&json!({"index": i, "ids": ids, "tokens": tokens})).map_err(|e| Error::input(e.to_string()))?);
            out.push('\n');
            continue;
        }
        out.push_str(&format!("prompt {i}: {} tokens\n  {:>4} {:>5}  {:>7}  token\n", ids.len(), "pos", "-pos", "id"));
        for (p, (id, s)) in ids.iter().zip(&tokens).enumerate() {
            out.push_str(&format!("  {p:>4} {:>5}  {id:>7}  {s:?}\n", p as i64 - ids.len() as i64));
        }
    }
    print_stdout(&out);
    Ok(())
}
