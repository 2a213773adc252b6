//! Prompt tokenization the way Hugging Face `transformers` does it: `tokenizer.json` through the
//! `tokenizers` crate, configured by `tokenizer_config.json` / `special_tokens_map.json`; the
//! chat template itself is [`super::chat_template`].
//!
//! HF behaviour replicated here (see the notes on each item):
//! * truncation/padding stored in tokenizer.json are switched off (HF disables them per call);
//! * the post-processor is rebuilt as "[bos] $A [eos]" from `add_bos_token`/`add_eos_token`
//!   when the config sets either flag (transformers 5, any class), for the Llama/CodeLlama/Gemma
//!   classes (defaults true/false, as `LlamaTokenizerFast` does), or when tokenizer.json has none;
//! * class default special tokens (e.g. `<s>`/`</s>` for Llama) when the config omits them, and
//!   named special tokens missing from tokenizer.json are added to it (as transformers does);
//! * `special_tokens_map.json` overrides `tokenizer_config.json`;
//! * `decode` applies `clean_up_tokenization_spaces` when the config asks for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::chat_template::ChatTemplate;
pub use super::chat_template::ChatMessage;
use super::{json_kind, one_line};
use crate::error::read_file;
use crate::{Error, Result};

/// HF's `SPECIAL_TOKENS_ATTRIBUTES` (minus `additional_special_tokens`, handled apart).
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A Hugging Face tokenizer plus its chat template.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    /// `*_token` entries (content strings) passed to the chat template.
    special_tokens: BTreeMap<String, String>,
    additional_special_tokens: Vec<String>,
    bos: Option<String>,
    eos: Option<String>,
    clean_up_tokenization_spaces: bool,
    template: ChatTemplate,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("tokenizer_path", &self.tokenizer_path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("has_chat_template", &self.has_chat_template())
            .finish()
    }
}

/// Reads an optional JSON object file; `Ok(None)` if the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = crate::error::read_json_bytes(path)?;
    let value: Json =
        serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {}", one_line(e))))?;
    match value {
        Json::Object(map) => Ok(Some(map)),
        other => Err(Error::file(path, format!("expected a JSON object, found {}", json_kind(&other)))),
    }
}

/// A special token entry: a string, an AddedToken object `{"content": ...}`, or null.
/// `Ok(Err(()))` means "not a token value" (the caller decides whether that is an error).
fn parse_token_value(v: &Json) -> std::result::Result<Option<String>, ()> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(m) => match m.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// Collects `*_token` entries of a config object into `tokens` (later calls override) and
/// `additional_special_tokens` into `additional`.
fn collect_special_tokens(
    path: &Path,
    map: &serde_json::Map<String, Json>,
    tokens: &mut BTreeMap<String, Option<String>>,
    additional: &mut Option<Vec<String>>,
) -> Result<()> {
    for (key, value) in map {
        if key == "extra_special_tokens" {
            // transformers >= 4.50: a dict of named extra tokens (image_token...), or a list
            // (transformers 5's name for additional_special_tokens).
            if let Json::Object(named) = value {
                for (name, tok) in named {
                    if let Ok(Some(t)) = parse_token_value(tok) {
                        tokens.insert(name.clone(), Some(t));
                    }
                }
                continue;
            }
        }
        if key == "additional_special_tokens" || key == "extra_special_tokens" {
            let Json::Array(items) = value else {
                if value.is_null() {
                    continue;
                }
                return Err(Error::config(path, key, format!("expected a list of tokens, found {}", json_kind(value))));
            };
            let mut list = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match parse_token_value(item) {
                    Ok(Some(s)) => list.push(s),
                    _ => {
                        return Err(Error::config(
                            path,
                            format!("{key}[{i}]"),
                            "expected a string or an AddedToken object {\"content\": ...}",
                        ));
                    }
                }
            }
            *additional = Some(list);
            continue;
        }
        if !key.ends_with("_token") || key.starts_with("add_") {
            continue;
        }
        match parse_token_value(value) {
            Ok(tok) => {
                tokens.insert(key.clone(), tok);
            }
            Err(()) if SPECIAL_KEYS.contains(&key.as_str()) => {
                return Err(Error::config(
                    path,
                    key,
                    format!(
                        "expected a string or an AddedToken object {{\"content\": ...}}, found {}",
                        json_kind(value)
                    ),
                ));
            }
            Err(()) => {} // e.g. `split_special_tokens`-like flags: not a token
        }
    }
    Ok(())
}

fn bool_field(path: &Path, map: &serde_json::Map<String, Json>, key: &str) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::config(path, key, format!("expected true or false, found {}", json_kind(other)))),
    }
}

/// The HF tokenizer class family, from `tokenizer_class` or else config.json's `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenizerFamily {
    /// LlamaTokenizerFast / CodeLlamaTokenizerFast: post-processor rebuilt from add_bos/eos.
    Llama,
    /// GemmaTokenizerFast: same post-processor logic, other default tokens.
    Gemma,
    Gpt2,
    Qwen2,
    Other,
}

impl TokenizerFamily {
    fn from_class(class: &str) -> Self {
        match class.strip_suffix("Fast").unwrap_or(class) {
            "LlamaTokenizer" | "CodeLlamaTokenizer" => TokenizerFamily::Llama,
            "GemmaTokenizer" => TokenizerFamily::Gemma,
            "GPT2Tokenizer" => TokenizerFamily::Gpt2,
            "Qwen2Tokenizer" => TokenizerFamily::Qwen2,
            _ => TokenizerFamily::Other,
        }
    }

    /// transformers' TOKENIZER_MAPPING for the model types patchbay cares about.
    fn from_model_type(model_type: &str) -> Self {
        match model_type {
            "llama" | "mistral" | "mixtral" | "phi3" | "code_llama" => TokenizerFamily::Llama,
            "gemma" | "gemma2" => TokenizerFamily::Gemma,
            "gpt2" | "olmo2" => TokenizerFamily::Gpt2,
            "qwen2" | "qwen2_moe" => TokenizerFamily::Qwen2,
            _ => TokenizerFamily::Other,
        }
    }

    /// Default special tokens of the class's `__init__` (used only for keys the config omits).
    fn default_tokens(self) -> &'static [(&'static str, &'static str)] {
        match self {
            TokenizerFamily::Llama => &[("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")],
            TokenizerFamily::Gemma => {
                &[("bos_token", "<bos>"), ("eos_token", "<eos>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")]
            }
            TokenizerFamily::Gpt2 => {
                &[("bos_token", "<|endoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>")]
            }
            TokenizerFamily::Qwen2 => {
                &[("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")]
            }
            TokenizerFamily::Other => &[],
        }
    }

    fn rebuilds_post_processor(self) -> bool {
        matches!(self, TokenizerFamily::Llama | TokenizerFamily::Gemma)
    }
}

/// The tokenizer models the `tokenizers` library reads (`model.type` of tokenizer.json).
const MODEL_TYPES: [&str; 4] = ["BPE", "Unigram", "WordPiece", "WordLevel"];

/// Why a tokenizer.json the `tokenizers` library refused is refused, where its own message
/// (`data did not match any variant of untagged enum ...`) does not say: a missing or unknown
/// `model.type`. None: not JSON, or another cause.
fn diagnose_tokenizer_json(bytes: &[u8]) -> Option<String> {
    let v: Json = serde_json::from_slice(bytes).ok()?;
    let model = v.get("model")?;
    match model.get("type") {
        Some(Json::String(t)) if !MODEL_TYPES.contains(&t.as_str()) => Some(format!("model type `{t}` is not one the tokenizers library reads ({})", MODEL_TYPES.join(", "))),
        None if model.get("merges").is_none() && model.get("vocab").is_none() => Some(format!("`model` has no `type` (one of {})", MODEL_TYPES.join(", "))),
        _ => None,
    }
}

/// How reports name a token id without a string (no tokenizer, or an id the vocabulary lacks).
pub fn unknown_token(id: u32) -> String {
    format!("<id {id}>")
}

impl PromptTokenizer {
    /// Loads DIR/tokenizer.json (required) and DIR/tokenizer_config.json (optional: chat_template,
    /// bos_token, eos_token, add_bos_token...). Also honours DIR/special_tokens_map.json and
    /// DIR/chat_template.jinja when present, as transformers does.
    ///
    /// A GGUF model (a .gguf file, or a directory holding one and no config.json) gives all of
    /// these from its metadata instead (see [`super::gguf::GgufFile::tokenizer`]).
    pub fn load(model_dir: &Path) -> Result<Self> {
        if let Some(path) = super::gguf::find(model_dir)? {
            let (tokenizer, config) = super::gguf::GgufFile::open(&path)?.tokenizer()?;
            return Self::assemble(tokenizer, path.clone(), &path, config, None, TokenizerFamily::Other, None, None);
        }
        let tokenizer_path = model_dir.join("tokenizer.json");
        let config_path = model_dir.join("tokenizer_config.json");

        let bytes = read_file(&tokenizer_path)?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::file(&tokenizer_path, format!("not a valid tokenizer.json: {}", diagnose_tokenizer_json(&bytes).unwrap_or_else(|| one_line(e)))))?;
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let special_map_path = model_dir.join("special_tokens_map.json");
        let special_map = read_json_object(&special_map_path)?;

        // Best effort: config.json is validated elsewhere; a bad one just means no hints.
        let model_config = read_json_object(&model_dir.join("config.json")).ok().flatten().unwrap_or_default();
        let model_vocab = model_config.get("vocab_size").and_then(Json::as_u64).map(|v| v as usize);
        // Which HF class AutoTokenizer would pick.
        let family = match config.get("tokenizer_class") {
            Some(Json::String(class)) => TokenizerFamily::from_class(class),
            Some(Json::Null) | None => match model_config.get("model_type") {
                Some(Json::String(t)) => TokenizerFamily::from_model_type(t),
                _ => TokenizerFamily::Other,
            },
            Some(other) => {
                return Err(Error::config(
                    &config_path,
                    "tokenizer_class",
                    format!("expected a string, found {}", json_kind(other)),
                ));
            }
        };

        let special_map = special_map.map(|m| (special_map_path, m));
        let jinja_path = model_dir.join("chat_template.jinja");
        Self::assemble(tokenizer, tokenizer_path, &config_path, config, special_map, family, Some(&jinja_path), model_vocab)
    }

    /// The tokenizer configured as transformers configures it: `config` is tokenizer_config.json's
    /// object (`config_path` names it in errors), `special_map` special_tokens_map.json's,
    /// `jinja_path` a chat_template.jinja that wins over the config's template when it exists;
    /// `model_vocab` the model's vocab_size, when known, to refuse a BOS/EOS that
    /// would be added to every prompt with an id the model does not have.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        mut tokenizer: Tokenizer,
        tokenizer_path: PathBuf,
        config_path: &Path,
        config: serde_json::Map<String, Json>,
        special_map: Option<(PathBuf, serde_json::Map<String, Json>)>,
        family: TokenizerFamily,
        jinja_path: Option<&Path>,
        model_vocab: Option<usize>,
    ) -> Result<Self> {
        // HF's fast tokenizers disable the stored truncation/padding on a plain `tokenizer(text)`.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::file(&tokenizer_path, format!("cannot disable truncation: {}", one_line(e))))?;
        tokenizer.with_padding(None);

        // Special tokens: config, overridden by special_tokens_map.json, class defaults for absent keys.
        let mut tokens: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut additional: Option<Vec<String>> = None;
        collect_special_tokens(config_path, &config, &mut tokens, &mut additional)?;
        if let Some((path, map)) = &special_map {
            collect_special_tokens(path, map, &mut tokens, &mut additional)?;
        }
        for (key, default) in family.default_tokens() {
            tokens.entry((*key).to_string()).or_insert_with(|| Some((*default).to_string()));
        }
        let special_tokens: BTreeMap<String, String> =
            tokens.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        let bos = special_tokens.get("bos_token").cloned();
        let eos = special_tokens.get("eos_token").cloned();

        // Named special tokens missing from tokenizer.json are added as special tokens, as
        // transformers does at init (they get ids after the existing vocabulary).
        let mut missing: Vec<tokenizers::AddedToken> = Vec::new();
        for tok in SPECIAL_KEYS.iter().filter_map(|k| special_tokens.get(*k)).chain(additional.iter().flatten()) {
            if tokenizer.token_to_id(tok).is_none() && !missing.iter().any(|t| &t.content == tok) {
                missing.push(tokenizers::AddedToken::from(tok.clone(), true).normalized(false));
            }
        }
        if !missing.is_empty() {
            tokenizer.add_special_tokens(missing.clone()).map_err(|e| {
                Error::file(&tokenizer_path, format!("cannot add the special tokens of the config: {}", one_line(e)))
            })?;
        }

        // transformers' update_post_processor(): the post-processor is replaced by
        // "[bos] $A [eos]" when the config sets add_bos_token/add_eos_token (transformers 5, any
        // class), for the Llama/Gemma classes (whose __init__ always passes them; defaults
        // true/false, as LlamaTokenizerFast in transformers 4), or when tokenizer.json has none.
        let explicit = config.contains_key("add_bos_token") || config.contains_key("add_eos_token");
        if explicit || family.rebuilds_post_processor() || tokenizer.get_post_processor().is_none() {
            let add_bos = bool_field(config_path, &config, "add_bos_token")?
                .unwrap_or(family.rebuilds_post_processor() && !config.contains_key("add_bos_token"));
            let add_eos = bool_field(config_path, &config, "add_eos_token")?.unwrap_or(false);
            for (key, token, added) in [("bos_token", &bos, add_bos), ("eos_token", &eos, add_eos)] {
                let Some(token) = token.as_deref().filter(|_| added) else { continue };
                let id = tokenizer.token_to_id(token).unwrap_or(0) as usize;
                if let Some(vocab) = model_vocab.filter(|&v| id >= v && missing.iter().any(|m| m.content == token)) {
                    let source = if config.is_empty() { format!("the default of the {family:?} tokenizer class, as {} is absent", config_path.display()) } else { format!("from {}", config_path.display()) };
                    return Err(Error::file(&tokenizer_path, format!(
                        "has no token `{token}` ({key}, {source}): it would be added to every prompt as a new token with id {id}, past the model's vocab_size {vocab}; give the model's own tokenizer_config.json (its bos_token / add_bos_token)"
                    )));
                }
            }
            // An undefined token just is not added (transformers 5 resets the flag).
            let post = build_bos_eos_processor(
                &tokenizer,
                config_path,
                bos.as_deref().filter(|_| add_bos),
                eos.as_deref().filter(|_| add_eos),
            )?;
            tokenizer.with_post_processor(Some(post));
        }

        let clean_up_tokenization_spaces =
            bool_field(config_path, &config, "clean_up_tokenization_spaces")?.unwrap_or(false);

        let template = ChatTemplate::load(jinja_path, config_path, &config)?;

        Ok(PromptTokenizer {
            tokenizer,
            tokenizer_path,
            special_tokens,
            additional_special_tokens: additional.unwrap_or_default(),
            bos,
            eos,
            clean_up_tokenization_spaces,
            template,
        })
    }

    /// Token ids exactly as Hugging Face `tokenizer(text)` gives them (add_special_tokens=True:
    /// BOS etc. as the post-processor says).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` without special tokens (HF `tokenizer(text, add_special_tokens=False)`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::file(&self.tokenizer_path, format!("cannot encode text: {}", one_line(e))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Renders the chat template as HF apply_chat_template(messages, add_generation_prompt,
    /// tokenize=False).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.template.render(&self.special_tokens, &self.additional_special_tokens, messages, add_generation_prompt)
    }

    /// HF apply_chat_template(..., tokenize=True): render then encode WITHOUT adding special tokens.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode_with(&text, false)
    }

    /// HF `tokenizer.decode(ids)` (skip_special_tokens=False). Unknown ids are an error rather
    /// than silently dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.tokenizer.id_to_token(id).is_none()) {
            return Err(Error::input(format!(
                "token id {bad} is not in the vocabulary of {} ({} tokens)",
                self.tokenizer_path.display(),
                self.vocab_size()
            )));
        }
        let text = self
            .tokenizer
            .decode(ids, false)
            .map_err(|e| Error::file(&self.tokenizer_path, format!("cannot decode ids: {}", one_line(e))))?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// The token string of an id (for reports).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The token strings of a prompt's ids (`<id N>` for an id the vocabulary has no string for).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&t| self.id_to_token(t).unwrap_or_else(|| unknown_token(t))).collect()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Vocabulary size including added tokens (HF `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// True when the model ships a chat template (even one that later fails to parse or render).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_present()
    }
}

/// `TemplateProcessing` with optional BOS/EOS, as transformers' update_post_processor builds
/// it: single = "[bos:0] $A:0 [eos:0]", pair = single + "[bos:1] $B:1 [eos:1]". Built through
/// its tokenizer.json form, so token contents with ':' or spaces are fine.
fn build_bos_eos_processor(
    tokenizer: &Tokenizer,
    config_path: &Path,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<tokenizers::processors::PostProcessorWrapper> {
    let mut specials = serde_json::Map::new();
    for (field, tok) in [("bos_token", bos), ("eos_token", eos)] {
        if let Some(t) = tok {
            let id = tokenizer.token_to_id(t).ok_or_else(|| {
                Error::config(config_path, field, format!("token {t:?} is not in the vocabulary of tokenizer.json"))
            })?;
            specials.insert(t.to_string(), serde_json::json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    let piece = |seq: &str, type_id: u32| -> Vec<Json> {
        let mut v = Vec::new();
        if let Some(b) = bos {
            v.push(serde_json::json!({"SpecialToken": {"id": b, "type_id": type_id}}));
        }
        v.push(serde_json::json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some(e) = eos {
            v.push(serde_json::json!({"SpecialToken": {"id": e, "type_id": type_id}}));
        }
        v
    };
    let single = piece("A", 0);
    let mut pair = single.clone();
    pair.extend(piece("B", 1));
    let json = serde_json::json!({
        "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials
    });
    serde_json::from_value(json).map_err(|e| {
        Error::config(config_path, "add_bos_token", format!("cannot build the post-processor: {}", one_line(e)))
    })
}

/// HF `clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// ids: <unk>=0 <s>=1 </s>=2 <|im_start|>=3 <|im_end|>=4, then words.
    const WORDS: [&str; 10] = ["hello", "world", "user", "assistant", "system", "hi", "there", ".", "be", "nice"];

    fn tokenizer_json(truncation: Json) -> Json {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        for (i, w) in WORDS.iter().enumerate() {
            vocab.insert(w.to_string(), json!(i + 5));
        }
        let added: Vec<Json> = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        json!({
            "version": "1.0",
            "truncation": truncation,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
    }

    /// A model dir with the test tokenizer.json and the given tokenizer_config.json (None: absent).
    fn model_dir(config: Option<Json>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json(Json::Null).to_string()).expect("write");
        if let Some(cfg) = config {
            std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("write");
        }
        dir
    }

    fn with_template(template: &str) -> tempfile::TempDir {
        model_dir(Some(json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
                              "chat_template": template})))
    }

    fn load(dir: &tempfile::TempDir) -> PromptTokenizer {
        PromptTokenizer::load(dir.path()).expect("load")
    }

    fn convo() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  be nice  "),
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi there"),
        ]
    }

    #[test]
    fn encode_adds_special_tokens_from_post_processor() {
        let tok = load(&model_dir(None));
        assert_eq!(tok.encode("hello world").unwrap(), vec![1, 5, 6]);
        assert_eq!(tok.encode("hello nope").unwrap(), vec![1, 5, 0]);
        // special tokens inside the text are recognised
        assert_eq!(tok.encode("<|im_start|>user hello<|im_end|>").unwrap(), vec![1, 3, 7, 5, 4]);
        assert_eq!(tok.encode("").unwrap(), vec![1]);
    }

    #[test]
    fn stored_truncation_is_ignored_like_hf() {
        let dir = model_dir(None);
        let trunc = json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json(trunc).to_string()).unwrap();
        assert_eq!(load(&dir).encode("hello world hi there").unwrap(), vec![1, 5, 6, 10, 11]);
    }

    #[test]
    fn vocab_and_token_lookup() {
        let tok = load(&model_dir(None));
        assert_eq!(tok.vocab_size(), 15);
        assert_eq!(tok.token_to_id("hello"), Some(5));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(4));
        assert_eq!(tok.id_to_token(6).as_deref(), Some("world"));
        assert_eq!(tok.id_to_token(999), None);
        assert_eq!(tok.token_to_id("nope"), None);
    }

    #[test]
    fn decode_and_bad_ids() {
        let tok = load(&model_dir(None));
        assert_eq!(tok.decode(&[1, 5, 6]).unwrap(), "<s> hello world");
        let err = tok.decode(&[5, 99]).unwrap_err().to_string();
        assert!(err.contains("99") && err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn decode_cleans_up_spaces_when_configured() {
        let tok = load(&model_dir(Some(json!({"clean_up_tokenization_spaces": true}))));
        assert_eq!(tok.decode(&[5, 12]).unwrap(), "hello.");
        let tok = load(&model_dir(Some(json!({"clean_up_tokenization_spaces": false}))));
        assert_eq!(tok.decode(&[5, 12]).unwrap(), "hello .");
    }

    #[test]
    fn special_tokens_string_or_added_token_object() {
        let tok = load(&model_dir(Some(json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>"
        }))));
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_token(), Some("</s>"));
        let tok = load(&model_dir(Some(json!({"bos_token": null}))));
        assert_eq!(tok.bos_token(), None);
        assert_eq!(tok.eos_token(), None);
        assert!(!tok.has_chat_template());
    }

    #[test]
    fn special_tokens_map_overrides_config() {
        let dir = model_dir(Some(json!({"bos_token": "<s>", "eos_token": "</s>"})));
        std::fs::write(dir.path().join("special_tokens_map.json"), json!({"eos_token": "<|im_end|>"}).to_string())
            .unwrap();
        let tok = load(&dir);
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    }

    #[test]
    fn bad_special_token_type_names_field() {
        let dir = model_dir(Some(json!({"bos_token": 5})));
        let err = PromptTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("bos_token"), "{err}");
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn missing_tokenizer_json_is_io_error_naming_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = PromptTokenizer::load(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("tokenizer.json"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn corrupt_tokenizer_json_is_file_error() {
        for bad in ["{not json", "{\"model\": {\"type\": \"Nope\"}}", "[]", ""] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), bad).unwrap();
            let err = PromptTokenizer::load(dir.path()).unwrap_err();
            assert!(matches!(err, Error::File { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("tokenizer.json") && msg.contains("not a valid tokenizer.json"), "{msg}");
            assert_eq!(msg.lines().count(), 1, "{msg}");
        }
    }

    #[test]
    fn corrupt_tokenizer_config_is_file_error() {
        let dir = model_dir(None);
        std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": ").unwrap();
        let msg = PromptTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("tokenizer_config.json") && msg.contains("not valid JSON"), "{msg}");
        std::fs::write(dir.path().join("tokenizer_config.json"), "[1]").unwrap();
        let msg = PromptTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("tokenizer_config.json") && msg.contains("expected a JSON object"), "{msg}");
    }

    #[test]
    fn missing_template_is_clear_error() {
        let tok = load(&model_dir(Some(json!({"bos_token": "<s>"}))));
        assert!(!tok.has_chat_template());
        let err = tok.encode_chat(&convo(), true).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("chat_template"), "{err}");
        assert!(err.contains("no chat template"), "{err}");
        // also without any tokenizer_config.json
        let tok = load(&model_dir(None));
        let err = tok.render_chat(&convo(), false).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn template_list_uses_default() {
        let dir = model_dir(Some(json!({"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages | length }}"}
        ]})));
        assert_eq!(load(&dir).render_chat(&convo(), false).unwrap(), "3");
        let dir = model_dir(Some(json!({"chat_template": [{"name": "tool_use", "template": "TOOLS"}]})));
        let tok = load(&dir);
        assert!(tok.has_chat_template());
        let err = tok.render_chat(&convo(), false).unwrap_err().to_string();
        assert!(err.contains("chat_template") && err.contains("default") && err.contains("tool_use"), "{err}");
    }

    #[test]
    fn bad_template_type_is_config_error() {
        let dir = model_dir(Some(json!({"chat_template": 3})));
        let err = PromptTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("chat_template"), "{err}");
    }

    #[test]
    fn unparsable_template_only_fails_chat() {
        let tok = load(&with_template("{% for m in messages %}{{ m.role }"));
        assert!(tok.has_chat_template());
        assert_eq!(tok.encode("hello").unwrap(), vec![1, 5]);
        let err = tok.render_chat(&convo(), false).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("cannot parse template"), "{err}");
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn chat_template_jinja_overrides_config() {
        let dir = with_template("FROM CONFIG");
        std::fs::write(dir.path().join("chat_template.jinja"), "FROM FILE {{ bos_token }}\n").unwrap();
        assert_eq!(load(&dir).render_chat(&[], false).unwrap(), "FROM FILE <s>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ raise_exception('boom') }}").unwrap();
        let err = load(&dir).render_chat(&[], false).unwrap_err().to_string();
        assert!(err.contains("chat_template.jinja") && err.contains("boom"), "{err}");
    }

    #[test]
    fn encode_chat_adds_no_special_tokens() {
        let t = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}";
        let tok = load(&with_template(t));
        let msgs = vec![ChatMessage::new("user", "hello world")];
        assert_eq!(tok.render_chat(&msgs, false).unwrap(), "<s><|im_start|>user hello world<|im_end|>");
        // Only the template's own <s>, not a second one from the post-processor.
        assert_eq!(tok.encode_chat(&msgs, false).unwrap(), vec![1, 3, 7, 5, 6, 4]);
    }

    #[test]
    fn llama_class_rebuilds_post_processor_from_add_bos_eos() {
        // tokenizer.json adds <s>; LlamaTokenizerFast obeys add_bos_token/add_eos_token instead.
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "LlamaTokenizer", "add_bos_token": false,
                                               "bos_token": "<s>", "eos_token": "</s>"}))));
        assert_eq!(tok.encode("hello").unwrap(), vec![5]);
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "LlamaTokenizerFast", "add_eos_token": true}))));
        // default add_bos_token=true, class default tokens <s>/</s>
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.encode("hello").unwrap(), vec![1, 5, 2]);
        // other classes keep tokenizer.json's post-processor unless the config sets the flags
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "PreTrainedTokenizerFast"}))));
        assert_eq!(tok.encode("hello").unwrap(), vec![1, 5]);
        // ... and then (transformers 5) it is rebuilt from them, for every class
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": false}))));
        assert_eq!(tok.encode("hello").unwrap(), vec![5]);
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "Qwen2TokenizerFast", "eos_token": "</s>",
                                               "add_eos_token": true}))));
        assert_eq!(tok.encode("hello world").unwrap(), vec![5, 6, 2]);
        // model_type from config.json when tokenizer_class is absent
        let dir = model_dir(Some(json!({})));
        std::fs::write(dir.path().join("config.json"), json!({"model_type": "mistral"}).to_string()).unwrap();
        assert_eq!(load(&dir).encode("hello").unwrap(), vec![1, 5]);
        let dir = model_dir(Some(json!({"add_bos_token": false})));
        std::fs::write(dir.path().join("config.json"), json!({"model_type": "mistral"}).to_string()).unwrap();
        assert_eq!(load(&dir).encode("hello").unwrap(), vec![5]);
        // add_bos_token with an undefined bos token: nothing added (transformers 5)
        let tok = load(&model_dir(Some(json!({"tokenizer_class": "LlamaTokenizer", "bos_token": null}))));
        assert_eq!(tok.encode("hello").unwrap(), vec![5]);
    }

    #[test]
    fn named_special_tokens_missing_from_vocab_are_added() {
        // transformers adds config special tokens that tokenizer.json lacks, after the vocabulary.
        let dir = model_dir(Some(json!({"tokenizer_class": "LlamaTokenizer", "bos_token": "<bos>",
                                        "additional_special_tokens": ["<extra>", {"content": "<s>"}]})));
        let tok = load(&dir);
        assert_eq!(tok.vocab_size(), 17);
        assert_eq!(tok.token_to_id("<bos>"), Some(15));
        assert_eq!(tok.token_to_id("<extra>"), Some(16));
        assert_eq!(tok.encode("hello<extra>").unwrap(), vec![15, 5, 16]);
        assert_eq!(tok.decode(&[15, 5]).unwrap(), "<bos> hello");
    }
}

