//! Prompt tokenization the way Hugging Face `transformers` does it: `tokenizer.json` through the
//! `tokenizers` crate, plus the chat template from `tokenizer_config.json` (or
//! `chat_template.jinja`) rendered with minijinja configured like HF's jinja environment.
//!
//! HF behaviour replicated here (see the notes on each item):
//! * truncation/padding stored in tokenizer.json are switched off (HF disables them per call);
//! * the post-processor is rebuilt as "[bos] $A [eos]" from `add_bos_token`/`add_eos_token`
//!   when the config sets either flag (transformers 5, any class), for the Llama/CodeLlama/Gemma
//!   classes (defaults true/false, as `LlamaTokenizerFast` does), or when tokenizer.json has none;
//! * class default special tokens (e.g. `<s>`/`</s>` for Llama) when the config omits them, and
//!   named special tokens missing from tokenizer.json are added to it (as transformers does);
//! * `special_tokens_map.json` overrides `tokenizer_config.json`, `chat_template.jinja`
//!   overrides the config's `chat_template`;
//! * templates: trim_blocks + lstrip_blocks, pycompat methods, `raise_exception`,
//!   `strftime_now`, HF's `tojson` (json.dumps, no HTML escaping), `{% generation %}` blocks,
//!   Python-style printing of None/True/False/lists/dicts;
//! * `decode` applies `clean_up_tokenization_spaces` when the config asks for it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::error::read_file;
use crate::{Error, Result};

/// One chat turn, as in HF's `messages=[{"role": ..., "content": ...}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The name the chat template is registered under in the minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// HF's `SPECIAL_TOKENS_ATTRIBUTES` (minus `additional_special_tokens`, handled apart).
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// State of the chat template: absent, present but unusable (the error is reported when a
/// template is needed, so `encode` still works), or compiled.
enum ChatTemplate {
    Missing,
    Broken { path: PathBuf, msg: String },
    Ready { path: PathBuf, env: Box<Environment<'static>> },
}

/// A Hugging Face tokenizer plus its chat template.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    config_path: PathBuf,
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

/// One line, whatever a library's error message looks like.
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads an optional JSON object file; `Ok(None)` if the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_file(path)?;
    let value: Json =
        serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {}", one_line(e))))?;
    match value {
        Json::Object(map) => Ok(Some(map)),
        other => Err(Error::file(path, format!("expected a JSON object, found {}", json_kind(&other)))),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
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

impl PromptTokenizer {
    /// Loads DIR/tokenizer.json (required) and DIR/tokenizer_config.json (optional: chat_template,
    /// bos_token, eos_token, add_bos_token...). Also honours DIR/special_tokens_map.json and
    /// DIR/chat_template.jinja when present, as transformers does.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let tokenizer_path = model_dir.join("tokenizer.json");
        let config_path = model_dir.join("tokenizer_config.json");

        let bytes = read_file(&tokenizer_path)?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::file(&tokenizer_path, format!("not a valid tokenizer.json: {}", one_line(e))))?;
        // HF's fast tokenizers disable the stored truncation/padding on a plain `tokenizer(text)`.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::file(&tokenizer_path, format!("cannot disable truncation: {}", one_line(e))))?;
        tokenizer.with_padding(None);

        let config = read_json_object(&config_path)?.unwrap_or_default();
        let special_map_path = model_dir.join("special_tokens_map.json");
        let special_map = read_json_object(&special_map_path)?;

        // Which HF class AutoTokenizer would pick.
        let family = match config.get("tokenizer_class") {
            Some(Json::String(class)) => TokenizerFamily::from_class(class),
            Some(Json::Null) | None => {
                // Best effort: config.json is validated elsewhere; a bad one just means "Other".
                let model_config_path = model_dir.join("config.json");
                match read_json_object(&model_config_path) {
                    Ok(Some(cfg)) => match cfg.get("model_type") {
                        Some(Json::String(t)) => TokenizerFamily::from_model_type(t),
                        _ => TokenizerFamily::Other,
                    },
                    _ => TokenizerFamily::Other,
                }
            }
            Some(other) => {
                return Err(Error::config(
                    &config_path,
                    "tokenizer_class",
                    format!("expected a string, found {}", json_kind(other)),
                ));
            }
        };

        // Special tokens: config, overridden by special_tokens_map.json, class defaults for absent keys.
        let mut tokens: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut additional: Option<Vec<String>> = None;
        collect_special_tokens(&config_path, &config, &mut tokens, &mut additional)?;
        if let Some(map) = &special_map {
            collect_special_tokens(&special_map_path, map, &mut tokens, &mut additional)?;
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
            tokenizer.add_special_tokens(missing).map_err(|e| {
                Error::file(&tokenizer_path, format!("cannot add the special tokens of the config: {}", one_line(e)))
            })?;
        }

        // transformers' update_post_processor(): the post-processor is replaced by
        // "[bos] $A [eos]" when the config sets add_bos_token/add_eos_token (transformers 5, any
        // class), for the Llama/Gemma classes (whose __init__ always passes them; defaults
        // true/false, as LlamaTokenizerFast in transformers 4), or when tokenizer.json has none.
        let explicit = config.contains_key("add_bos_token") || config.contains_key("add_eos_token");
        if explicit || family.rebuilds_post_processor() || tokenizer.get_post_processor().is_none() {
            let add_bos = bool_field(&config_path, &config, "add_bos_token")?
                .unwrap_or(family.rebuilds_post_processor() && !config.contains_key("add_bos_token"));
            let add_eos = bool_field(&config_path, &config, "add_eos_token")?.unwrap_or(false);
            // An undefined token just is not added (transformers 5 resets the flag).
            let post = build_bos_eos_processor(
                &tokenizer,
                &config_path,
                bos.as_deref().filter(|_| add_bos),
                eos.as_deref().filter(|_| add_eos),
            )?;
            tokenizer.with_post_processor(Some(post));
        }

        let clean_up_tokenization_spaces =
            bool_field(&config_path, &config, "clean_up_tokenization_spaces")?.unwrap_or(false);

        let template = load_chat_template(model_dir, &config_path, &config)?;

        Ok(PromptTokenizer {
            tokenizer,
            tokenizer_path,
            config_path,
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
        let (path, env) = match &self.template {
            ChatTemplate::Ready { path, env } => (path, env),
            ChatTemplate::Broken { path, msg } => {
                return Err(Error::config(path, "chat_template", msg.clone()));
            }
            ChatTemplate::Missing => {
                return Err(Error::config(
                    &self.config_path,
                    "chat_template",
                    "the model has no chat template (none in tokenizer_config.json, no chat_template.jinja); \
                     use a plain prompt instead",
                ));
            }
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        if !self.additional_special_tokens.is_empty() {
            ctx.insert(
                "additional_special_tokens".into(),
                Value::from(self.additional_special_tokens.iter().map(|s| Value::from(s.as_str())).collect::<Vec<_>>()),
            );
        }
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageObj {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
            .collect();
        ctx.insert("messages".into(), Value::from(msgs));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));

        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::config(path, "chat_template", format!("cannot load template: {}", one_line(e))))?;
        tmpl.render(Value::from(ctx)).map_err(|e| render_error(path, &e))
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
        !matches!(self.template, ChatTemplate::Missing)
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

// ---------------------------------------------------------------------------------------------
// Chat template
// ---------------------------------------------------------------------------------------------

/// Finds the template: DIR/chat_template.jinja clobbers tokenizer_config.json's `chat_template`
/// (as in transformers); the config value may be a string or a list of {name, template}.
fn load_chat_template(
    model_dir: &Path,
    config_path: &Path,
    config: &serde_json::Map<String, Json>,
) -> Result<ChatTemplate> {
    let jinja_path = model_dir.join("chat_template.jinja");
    let (path, source) = if jinja_path.exists() {
        let bytes = read_file(&jinja_path)?;
        match String::from_utf8(bytes) {
            Ok(s) => (jinja_path, s),
            Err(_) => return Err(Error::file(&jinja_path, "not valid UTF-8")),
        }
    } else {
        match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(ChatTemplate::Missing),
            Some(Json::String(s)) => (config_path.to_path_buf(), s.clone()),
            Some(Json::Array(items)) => {
                let mut found = None;
                for item in items {
                    if let (Some(Json::String(name)), Some(Json::String(t))) = (item.get("name"), item.get("template"))
                        && name == "default"
                    {
                        found = Some(t.clone());
                        break;
                    }
                }
                match found {
                    Some(t) => (config_path.to_path_buf(), t),
                    None => {
                        let names: Vec<&str> =
                            items.iter().filter_map(|i| i.get("name").and_then(Json::as_str)).collect();
                        return Ok(ChatTemplate::Broken {
                            path: config_path.to_path_buf(),
                            msg: format!(
                                "a list of named templates ({}) with none named \"default\"",
                                names.join(", ")
                            ),
                        });
                    }
                }
            }
            Some(other) => {
                return Err(Error::config(
                    config_path,
                    "chat_template",
                    format!("expected a string or a list of {{name, template}}, found {}", json_kind(other)),
                ));
            }
        }
    };
    Ok(match build_environment(&source) {
        Ok(env) => ChatTemplate::Ready { path, env: Box::new(env) },
        Err(e) => ChatTemplate::Broken { path, msg: format!("cannot parse template: {}", one_line(e)) },
    })
}

/// A minijinja environment configured like transformers' `_compile_jinja_template`.
fn build_environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson_filter);
    env.set_formatter(python_formatter);
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))?;
    Ok(env)
}

/// Marks an error raised by the template's own `raise_exception(msg)`.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    let msg = match msg.as_str() {
        Some(s) => s.to_string(),
        None => msg.to_string(),
    };
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
}

fn render_error(path: &Path, e: &minijinja::Error) -> Error {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Error::config(path, "chat_template", format!("template raised an exception: {}", one_line(raised)));
        }
        src = err.source();
    }
    Error::config(path, "chat_template", format!("cannot render template: {}", one_line(e)))
}

/// HF's AssistantTracker extension adds `{% generation %}...{% endgeneration %}`; it only marks
/// assistant spans, so it renders as its body. Rewritten to `{% if true %}...{% endif %}`,
/// keeping the whitespace-control markers.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos + 2]);
        rest = &rest[pos + 2..];
        let ctl = rest.chars().next().filter(|c| *c == '-' || *c == '+');
        let after_ctl = &rest[ctl.map_or(0, char::len_utf8)..];
        let ws = after_ctl.len() - after_ctl.trim_start().len();
        let word_start = &after_ctl[ws..];
        let word_len = word_start.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(word_start.len());
        let word = &word_start[..word_len];
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        if let Some(r) = replacement {
            let consumed = rest.len() - word_start.len();
            out.push_str(&rest[..consumed]);
            out.push_str(r);
            rest = &word_start[word_len..];
        }
    }
    out.push_str(rest);
    out
}

/// A chat message as a map that keeps HF's key order (role, content).
#[derive(Debug)]
struct MessageObj {
    role: Value,
    content: Value,
}

impl Object for MessageObj {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// Prints values as Jinja2 (Python `str()`) does: None, True/False, Python reprs of containers.
fn python_formatter(out: &mut Output, _state: &mut State, value: &Value) -> std::result::Result<(), minijinja::Error> {
    let fmt_err = |_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write output");
    match value.kind() {
        ValueKind::Undefined => Ok(()),
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            py_repr(value, &mut s)?;
            out.write_str(&s).map_err(fmt_err)
        }
        _ => write!(out, "{value}").map_err(fmt_err),
    }
}

/// Python `repr()` of a template value.
fn py_repr(value: &Value, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` — no HTML escaping, Python's default separators.
fn tojson_filter(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii = match ensure_ascii {
        Some(v) => v.is_true(),
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ));
                }
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    json_dump(value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_newline(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_dump(
    value: &Value,
    style: &JsonStyle,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::String => json_str(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Ok(f) = f64::try_from(value.clone()) {
                out.push_str(&py_float(f));
            } else {
                let _ = write!(out, "{value}");
            }
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(style, level + 1, out);
                json_dump(item, style, level + 1, out)?;
            }
            json_newline(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
                    _ => key.to_string(),
                };
                pairs.push((key, item));
            }
            if style.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(style, level + 1, out);
                json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                json_dump(v, style, level + 1, out)?;
            }
            json_newline(style, level, out);
            out.push('}');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of kind {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Python `float.__repr__` (as json.dumps writes floats).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: 1e+16, 1.5e-05
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f:?}");
    if s.contains('.') || s.contains('e') { s } else { format!("{s}.0") }
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// HF's `strftime_now(format)`: the current time formatted like Python's `strftime` (UTC, since
/// std has no time zone database).
fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (H. Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day as i64 + if is_leap && month > 2 { 1 } else { 0 };
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's '-' flag: no padding.
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, width: usize| if no_pad { v.to_string() } else { format!("{v:0width$}") };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month as i64, 2)),
            Some('d') => out.push_str(&num(day as i64, 2)),
            Some('e') => out.push_str(&if no_pad { day.to_string() } else { format!("{day:2}") }),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('w') => out.push_str(&weekday.to_string()),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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

    fn render(template: &str, msgs: &[ChatMessage], add_gen: bool) -> Result<String> {
        load(&with_template(template)).render_chat(msgs, add_gen)
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

    // Expected outputs below were checked against jinja2 3.1 configured as in transformers
    // (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loopcontrols)).

    const CHATML: &str = "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n<|im_start|>system\nbe nice<|im_end|>\n    {% endif %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";

    #[test]
    fn trim_and_lstrip_blocks() {
        let msgs = vec![ChatMessage::new("user", "hello")];
        assert_eq!(
            render(CHATML, &msgs, true).unwrap(),
            "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render(CHATML, &msgs, false).unwrap(),
            "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        );
        assert_eq!(
            render(CHATML, &convo(), false).unwrap(),
            "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
        );
    }

    #[test]
    fn keep_trailing_newline_is_off() {
        assert_eq!(render("x\n", &[], false).unwrap(), "x");
        assert_eq!(render("x\n\n", &[], false).unwrap(), "x\n");
    }

    const LLAMA2_LIKE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn bos_eos_tokens_and_loop_index() {
        let msgs = vec![
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi"),
            ChatMessage::new("user", "world"),
        ];
        assert_eq!(render(LLAMA2_LIKE, &msgs, false).unwrap(), "<s>[INST] hello [/INST]hi</s>[INST] world [/INST]");
    }

    #[test]
    fn raise_exception_message_reaches_user() {
        let err = render(LLAMA2_LIKE, &convo(), false).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("tokenizer_config.json"), "{msg}");
        assert!(msg.contains("template raised an exception"), "{msg}");
        assert!(msg.contains("Conversation roles must alternate user/assistant/user/assistant/..."), "{msg}");
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn pycompat_string_and_dict_methods() {
        let t = "{% for m in messages %}{{ m.content.strip() }}|{{ m.role.startswith('sys') }}|{{ m['content'].split() | length }}|{{ m.content.upper().strip() }}\n{% endfor %}{% for k, v in messages[1].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('name', 'anon') }}";
        assert_eq!(
            render(t, &convo(), false).unwrap(),
            "be nice|True|2|BE NICE\nhello|False|1|HELLO\nhi there|False|2|HI THERE\nrole=user;content=hello;anon"
        );
    }

    #[test]
    fn python_style_printing_and_tojson() {
        let t = "{{ none }} {{ true }} {{ false }} {{ [1, 'a', none] }} {{ undefined_var }}|{{ messages[1] | tojson }} {{ {'b': '<&>', 'a': [1, 2.5, true, none]} | tojson(sort_keys=true) }} {{ [] | tojson }} {{ 'é' | tojson }} {{ 'é' | tojson(ensure_ascii=true) }}";
        assert_eq!(
            render(t, &convo(), false).unwrap(),
            "None True False [1, 'a', None] |{\"role\": \"user\", \"content\": \"hello\"} {\"a\": [1, 2.5, true, null], \"b\": \"<&>\"} [] \"é\" \"\\u00e9\""
        );
        let t = "{{ messages[1] | tojson(indent=2) }}";
        assert_eq!(render(t, &convo(), false).unwrap(), "{\n  \"role\": \"user\",\n  \"content\": \"hello\"\n}");
    }

    #[test]
    fn tools_none_and_loop_controls() {
        let t = "{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}D{% endif %}{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.role }}{% endfor %}";
        assert_eq!(render(t, &convo(), false).unwrap(), "Duser");
    }

    #[test]
    fn namespace_and_slicing() {
        let t = "{% set ns = namespace(n=0) %}{% for m in messages[1:] %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ messages[::-1][0].role }}";
        assert_eq!(render(t, &convo(), false).unwrap(), "2assistant");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        assert_eq!(render(t, &convo(), false).unwrap(), "  be nice  hello[hi there]");
    }

    #[test]
    fn strftime_now_is_available() {
        let out = render("{{ strftime_now('%Y') }}", &[], false).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.starts_with("20"), "{out}");
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%A %B %-d %H:%M:%S %j %I%p %y %%", t), "Friday July 26 13:05:09 208 01PM 24 %");
        assert_eq!(strftime("%F %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%F", 951_782_400), "2000-02-29");
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
    fn render_errors_name_file() {
        let err = render("{{ messages[0].content.nosuchmethod() }}", &convo(), false).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("cannot render template"), "{err}");
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

    #[test]
    fn rewrite_generation_keeps_other_tags() {
        assert_eq!(
            rewrite_generation_tags("{%- generation -%}x{% endgeneration %}{% if generation_x %}{{ '{%' }}"),
            "{%- if true -%}x{% endif %}{% if generation_x %}{{ '{%' }}"
        );
    }

    #[test]
    fn py_float_matches_python_repr() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(2.5), "2.5");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
        assert_eq!(py_float(-0.0), "-0.0");
    }
}
