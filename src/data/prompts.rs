//! Prompt inputs of the CLI, turned into token ids.
//!
//! - `--text T`: encoded as Hugging Face `tokenizer(T)` does (BOS as the tokenizer adds it);
//!   with `--chat`, wrapped as one user message and rendered with the model's chat template.
//! - `--prompts FILE`: with the extension `.jsonl`, one JSON object per line, `{"text": ...}`
//!   (or `{"prompt": ...}`) or `{"messages": [{"role": ..., "content": ...}, ...]}` (messages
//!   always use the template); any other file holds one prompt per line.
//! - `--token-ids FILE.json`: a JSON list of lists of token ids, used verbatim.

use std::path::Path;

use serde::Deserialize;

use crate::model::tokenizer::{ChatMessage, PromptTokenizer};
use crate::{Error, Result};

/// Where the prompts come from.
pub enum PromptSource<'a> {
    Texts(&'a [String]),
    File(&'a Path),
    TokenIds(&'a Path),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    #[serde(alias = "prompt")]
    text: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// One prompt of a prompts file.
#[derive(Clone, Debug)]
pub enum PromptEntry {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// The prompts of a file, in order: JSONL when the name ends in `.jsonl` (blank lines skipped),
/// else one prompt per line. An empty prompt is an error naming its line.
pub fn read_prompts_file(path: &Path) -> Result<Vec<PromptEntry>> {
    let text = String::from_utf8(crate::error::read_file(path)?).map_err(|_| Error::file(path, "not UTF-8"))?;
    let jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |msg: &str| Error::file(path, format!("line {}: {msg}", i + 1));
        if !jsonl {
            if line.trim().is_empty() {
                return Err(at("empty prompt (one prompt per line; use a .jsonl file for prompts with line breaks)"));
            }
            out.push(PromptEntry::Text(line.to_string()));
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(line).map_err(|e| at(&e.to_string()))?;
        out.push(match (p.text, p.messages) {
            (Some(t), None) if t.is_empty() => return Err(at("empty prompt")),
            (Some(t), None) => PromptEntry::Text(t),
            (None, Some(m)) => PromptEntry::Messages(m),
            _ => return Err(at("expected exactly one of `text` (or `prompt`) or `messages`")),
        });
    }
    if out.is_empty() {
        return Err(Error::file(path, "no prompts"));
    }
    Ok(out)
}

/// Token ids of every prompt, in input order. The tokenizer is loaded only when needed.
pub fn load_prompts(source: PromptSource, model_dir: &Path, chat: bool) -> Result<Vec<Vec<u32>>> {
    let prompts = match source {
        PromptSource::TokenIds(path) => {
            if chat {
                return Err(Error::input("--chat applies to texts; --token-ids are used verbatim"));
            }
            let bytes = crate::error::read_json_bytes(path)?;
            serde_json::from_slice::<Vec<Vec<u32>>>(&bytes)
                .map_err(|e| Error::file(path, format!("expected a JSON list of lists of token ids: {e}")))?
        }
        PromptSource::Texts(texts) => {
            let tok = PromptTokenizer::load(model_dir)?;
            texts.iter().map(|t| encode_text(&tok, t, chat)).collect::<Result<_>>()?
        }
        PromptSource::File(path) => {
            let tok = PromptTokenizer::load(model_dir)?;
            read_prompts_file(path)?
                .iter()
                .map(|p| match p {
                    PromptEntry::Text(t) => encode_text(&tok, t, chat),
                    PromptEntry::Messages(m) => tok.encode_chat(m, true),
                })
                .collect::<Result<_>>()?
        }
    };
    check_prompts(&prompts)?;
    Ok(prompts)
}

/// Prompts given as token ids must be at least one, each of at least one token.
pub fn check_prompts(prompts: &[Vec<u32>]) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::input("no prompts given"));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::input(format!("prompt {i} has no tokens")));
    }
    Ok(())
}

fn encode_text(tok: &PromptTokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
    if chat { tok.encode_chat(&[ChatMessage::new("user", text)], true) } else { tok.encode(text) }
}
