//! Prompt inputs of the CLI, turned into token ids.
//!
//! - `--text T`: encoded as Hugging Face `tokenizer(T)` does (BOS as the tokenizer adds it);
//!   with `--chat`, wrapped as one user message and rendered with the model's chat template.
//! - `--prompts FILE.jsonl`: one JSON object per line, `{"text": ...}` or
//!   `{"messages": [{"role": ..., "content": ...}, ...]}` (messages always use the template).
//! - `--token-ids FILE.json`: a JSON list of lists of token ids, used verbatim.

use std::path::Path;

use serde::Deserialize;

use crate::model::tokenizer::{ChatMessage, PromptTokenizer};
use crate::{Error, Result};

/// Where the prompts come from.
pub enum PromptSource<'a> {
    Texts(&'a [String]),
    Jsonl(&'a Path),
    TokenIds(&'a Path),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    text: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// Token ids of every prompt, in input order. The tokenizer is loaded only when needed.
pub fn load_prompts(source: PromptSource, model_dir: &Path, chat: bool) -> Result<Vec<Vec<u32>>> {
    let prompts = match source {
        PromptSource::TokenIds(path) => {
            if chat {
                return Err(Error::input("--chat applies to texts; --token-ids are used verbatim"));
            }
            let bytes = crate::error::read_file(path)?;
            serde_json::from_slice::<Vec<Vec<u32>>>(&bytes)
                .map_err(|e| Error::file(path, format!("expected a JSON list of lists of token ids: {e}")))?
        }
        PromptSource::Texts(texts) => {
            let tok = PromptTokenizer::load(model_dir)?;
            texts.iter().map(|t| encode_text(&tok, t, chat)).collect::<Result<_>>()?
        }
        PromptSource::Jsonl(path) => {
            let tok = PromptTokenizer::load(model_dir)?;
            let text = String::from_utf8(crate::error::read_file(path)?).map_err(|_| Error::file(path, "not UTF-8"))?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let at = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
                let p: PromptLine = serde_json::from_str(line).map_err(|e| at(format!("{e}")))?;
                out.push(match (p.text, p.messages) {
                    (Some(t), None) => encode_text(&tok, &t, chat)?,
                    (None, Some(m)) => tok.encode_chat(&m, true)?,
                    _ => return Err(at("expected exactly one of `text` or `messages`".into())),
                });
            }
            out
        }
    };
    if prompts.is_empty() {
        return Err(Error::input("no prompts given"));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::input(format!("prompt {i} has no tokens")));
    }
    Ok(prompts)
}

fn encode_text(tok: &PromptTokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
    if chat { tok.encode_chat(&[ChatMessage::new("user", text)], true) } else { tok.encode(text) }
}
