//! The tokenizer against Hugging Face transformers: for every family fixture under
//! tests/fixtures/<family>/ (tokenizer.json, tokenizer_config.json, prompts.json recorded by
//! scripts/golden/make_goldens.py), `encode` must give HF's `tokenizer(text)` ids and the chat
//! template HF's `apply_chat_template` text and ids.

use std::path::{Path, PathBuf};

use patchbay::model::tokenizer::{ChatMessage, PromptTokenizer};
use serde::Deserialize;

const FAMILIES: [&str; 6] = ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"];

#[derive(Deserialize)]
struct Prompts {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    chat_messages: Vec<ChatMessage>,
    chat_ids: Vec<u32>,
    chat_text: String,
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

fn check_family(dir: &Path) -> Result<(), String> {
    let prompts_path = dir.join("prompts.json");
    let bytes = std::fs::read(&prompts_path).map_err(|e| format!("{}: {e}", prompts_path.display()))?;
    let prompts: Prompts = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", prompts_path.display()))?;
    let tok = PromptTokenizer::load(dir).map_err(|e| e.to_string())?;
    let mut failures = Vec::new();

    if prompts.texts.len() != prompts.ids.len() {
        failures.push(format!("prompts.json: {} texts but {} id lists", prompts.texts.len(), prompts.ids.len()));
    }
    for (text, want) in prompts.texts.iter().zip(&prompts.ids) {
        match tok.encode(text) {
            Ok(got) if &got == want => {}
            Ok(got) => failures.push(format!("encode({text:?}): got {got:?}, HF {want:?}")),
            Err(e) => failures.push(format!("encode({text:?}): {e}")),
        }
        match tok.decode(want) {
            Ok(s) if s.ends_with(text.as_str()) => {}
            Ok(s) => failures.push(format!("decode({want:?}) = {s:?} does not end with {text:?}")),
            Err(e) => failures.push(format!("decode({want:?}): {e}")),
        }
    }
    if !tok.has_chat_template() {
        failures.push("no chat template found".to_string());
    }
    match tok.render_chat(&prompts.chat_messages, true) {
        Ok(s) if s == prompts.chat_text => {}
        Ok(s) => failures.push(format!("render_chat: got {s:?}, HF {:?}", prompts.chat_text)),
        Err(e) => failures.push(format!("render_chat: {e}")),
    }
    match tok.encode_chat(&prompts.chat_messages, true) {
        Ok(ids) if ids == prompts.chat_ids => {}
        Ok(ids) => failures.push(format!("encode_chat: got {ids:?}, HF {:?}", prompts.chat_ids)),
        Err(e) => failures.push(format!("encode_chat: {e}")),
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("\n  ")) }
}

#[test]
fn tokenizer_matches_hugging_face_fixtures() {
    let root = fixtures_root();
    let mut checked = Vec::new();
    let mut failed = Vec::new();
    for fam in FAMILIES {
        let dir = root.join(fam);
        if !dir.is_dir() {
            eprintln!("{fam}: no fixture directory, skipped");
            continue;
        }
        match check_family(&dir) {
            Ok(()) => {
                eprintln!("{fam}: ok");
                checked.push(fam);
            }
            Err(e) => failed.push(format!("{fam}:\n  {e}")),
        }
    }
    assert!(failed.is_empty(), "tokenizer differs from Hugging Face:\n{}", failed.join("\n"));
    assert!(
        !checked.is_empty(),
        "no tokenizer fixture found under {} (expected one of {FAMILIES:?}); run scripts/golden/make_goldens.py",
        root.display()
    );
    eprintln!("checked against HF: {checked:?}");
}
