//! The chat template of a Hugging Face model (`tokenizer_config.json`'s `chat_template` or
//! `chat_template.jinja`), rendered with minijinja configured like transformers' jinja
//! environment (`_compile_jinja_template`): trim_blocks + lstrip_blocks, no trailing newline,
//! loop controls, pycompat methods, `raise_exception`, `strftime_now`, HF's `tojson`
//! (`json.dumps`, no HTML escaping), `{% generation %}` blocks, Python-style printing of
//! None/True/False/lists/dicts.
//!
//! What crates do and what is hand-written here, and why:
//! * `strftime_now`: chrono's strftime (the glibc directives and `-`/`_`/`0` padding flags).
//! * printing of values: Jinja2 prints through Python's `str()`, so `{{ [1, 'a', none] }}` is
//!   `[1, 'a', None]`; minijinja prints Jinja/Rust-style (`[1, "a", none]`) and no crate writes
//!   Python reprs, so `py_repr` stays hand code.
//! * `tojson`: string escaping is serde_json's (the same set as Python's `json`). The rest of
//!   `json.dumps` stays hand code (`json_dump`, `py_float`): minijinja's own `tojson` escapes
//!   `<>&'` for HTML and writes compact separators; serializing through serde_json would turn
//!   NaN into `null` (Python: `NaN`), undefined values into `null` (Python: TypeError), write
//!   ryu floats (`1e16`, Python `1e+16`), and has no `sort_keys` over insertion-ordered maps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{json_kind, one_line};
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

/// State of the chat template: absent, present but unusable (the error is reported when a
/// template is needed, so `encode` still works), or compiled.
pub(super) enum ChatTemplate {
    /// No template; `config_path` (tokenizer_config.json, or the GGUF file) is named in the
    /// error, and `jinja_path` when there was one to look for.
    Missing { config_path: PathBuf, jinja_path: Option<PathBuf> },
    Broken { path: PathBuf, msg: String },
    Ready { path: PathBuf, env: Box<Environment<'static>> },
}

impl ChatTemplate {
    /// Finds the template: `jinja_path` (DIR/chat_template.jinja), when it exists, clobbers the
    /// config's `chat_template` (as in transformers); the config value may be a string or a list
    /// of {name, template}.
    pub(super) fn load(
        jinja_path: Option<&Path>,
        config_path: &Path,
        config: &serde_json::Map<String, Json>,
    ) -> Result<ChatTemplate> {
        let (path, source) = if let Some(jinja_path) = jinja_path.filter(|p| p.exists()) {
            let bytes = read_file(jinja_path)?;
            match String::from_utf8(bytes) {
                Ok(s) => (jinja_path.to_path_buf(), s),
                Err(_) => return Err(Error::file(jinja_path, "not valid UTF-8")),
            }
        } else {
            match config.get("chat_template") {
                None | Some(Json::Null) => {
                    return Ok(ChatTemplate::Missing { config_path: config_path.to_path_buf(), jinja_path: jinja_path.map(Path::to_path_buf) });
                }
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
        Ok(ChatTemplate::compile(path, &source))
    }

    /// Compiles `source`; a template that does not parse is kept as `Broken` (reported on use).
    fn compile(path: PathBuf, source: &str) -> ChatTemplate {
        match build_environment(source) {
            Ok(env) => ChatTemplate::Ready { path, env: Box::new(env) },
            Err(e) => ChatTemplate::Broken { path, msg: format!("cannot parse template: {}", one_line(e)) },
        }
    }

    /// True when the model ships a template (even one that fails to parse or render).
    pub(super) fn is_present(&self) -> bool {
        !matches!(self, ChatTemplate::Missing { .. })
    }

    /// Renders as HF apply_chat_template(messages, add_generation_prompt, tokenize=False), with the
    /// tokenizer's `*_token` strings and `additional_special_tokens` in the context.
    pub(super) fn render(
        &self,
        special_tokens: &BTreeMap<String, String>,
        additional_special_tokens: &[String],
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let (path, env) = match self {
            ChatTemplate::Ready { path, env } => (path, env),
            ChatTemplate::Broken { path, msg } => {
                return Err(Error::config(path, "chat_template", msg.clone()));
            }
            ChatTemplate::Missing { config_path, jinja_path } => {
                let jinja = jinja_path.as_ref().and_then(|p| p.file_name()).map(|n| format!(", no {}", n.to_string_lossy())).unwrap_or_default();
                return Err(Error::config(
                    config_path,
                    "chat_template",
                    format!("the model has no chat template (none in this file{jinja}); use a plain prompt instead"),
                ));
            }
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in special_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        if !additional_special_tokens.is_empty() {
            ctx.insert(
                "additional_special_tokens".into(),
                Value::from(additional_special_tokens.iter().map(|s| Value::from(s.as_str())).collect::<Vec<_>>()),
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
        let mut out = BoundedOutput { buf: Vec::new(), exceeded: false };
        match tmpl.render_captured_to(Value::from(ctx), &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|e| Error::config(path, "chat_template", format!("the template rendered invalid UTF-8: {e}"))),
            Err(_) if out.exceeded => Err(Error::config(path, "chat_template", format!("the template's output passed {} MiB: refused (a loop that never ends?)", TEMPLATE_MAX_OUTPUT >> 20))),
            Err(e) => Err(render_error(path, &e)),
        }
    }
}

/// Instructions (minijinja fuel) a chat template may run: far above any real template's
/// (a conversation renders in thousands), bounded so that nested loops cannot run forever.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Bytes a chat template may write.
const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// The rendered text, refused past [`TEMPLATE_MAX_OUTPUT`] bytes.
struct BoundedOutput {
    buf: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > TEMPLATE_MAX_OUTPUT {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    env.set_fuel(Some(TEMPLATE_FUEL));
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
    if e.kind() == ErrorKind::OutOfFuel {
        return Error::config(path, "chat_template", format!("the template ran past {TEMPLATE_FUEL} instructions: refused (a loop that never ends?)"));
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

/// A JSON string as `json.dumps` writes it. serde_json escapes what Python escapes (`"`, `\\`,
/// control characters, `\b \f \n \r \t` in short form, the rest as `\u00XX`);
/// `ensure_ascii` also escapes every character above `~` as UTF-16 `\uXXXX` units.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    let quoted = Json::String(s.to_owned()).to_string();
    if !ensure_ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if (c as u32) > 0x7e {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
}

/// HF's `strftime_now(format)`: the current time formatted like Python's `strftime` (UTC: HF
/// uses the local time zone; patchbay's outputs should not depend on the machine's).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    strftime(&format, chrono::Utc::now())
}

/// `time` formatted by chrono's strftime (the glibc directives and the `-`/`_`/`0` padding
/// flags). A directive chrono does not know is a template error (glibc would copy it).
fn strftime(format: &str, time: chrono::DateTime<chrono::Utc>) -> std::result::Result<String, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", time.format(format)).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported format {format:?}"))
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, msgs: &[ChatMessage], add_gen: bool) -> Result<String> {
        let special_tokens: BTreeMap<String, String> =
            [("bos_token", "<s>"), ("eos_token", "</s>")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        ChatTemplate::compile(PathBuf::from("tokenizer_config.json"), template).render(&special_tokens, &[], msgs, add_gen)
    }

    fn strftime_unix(format: &str, unix_secs: i64) -> String {
        strftime(format, chrono::DateTime::from_timestamp(unix_secs, 0).expect("in range")).expect("format")
    }

    fn convo() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  be nice  "),
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi there"),
        ]
    }

    // Expected outputs below were checked against jinja2 3.1 configured as in transformers
    // (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loopcontrols)).

    const CHATML: &str = "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n<|im_start|>system\nbe nice<|im_end|>\n    {% endif %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";

    /// Hostile templates stop at the fuel or output limit with one line naming it, and fast;
    /// a long conversation of a real template stays far inside both.
    #[test]
    fn rendering_is_bounded() {
        let t0 = std::time::Instant::now();
        let msgs = [ChatMessage::new("user", "hi")];
        for (template, says) in [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}", "instructions"),
            ("{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}x{% endfor %}{% endfor %}{% endfor %}", "instructions"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "cannot render"),
            (&format!("{{% for i in range(100000) %}}{}{{% endfor %}}", "y".repeat(1000)), "MiB"),
        ] {
            let e = render(template, &msgs, false).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{template:.60}: {e}");
        }
        assert!(t0.elapsed().as_secs() < 30, "limits took {:?}", t0.elapsed());
        let long: Vec<ChatMessage> = (0..2000).map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, &"word ".repeat(200))).collect();
        assert!(render(CHATML, &long, true).unwrap().len() > 2_000_000);
    }

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
        assert_eq!(strftime_unix("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime_unix("%A %B %-d %H:%M:%S %j %I%p %y %%", t), "Friday July 26 13:05:09 208 01PM 24 %");
        assert_eq!(strftime_unix("%F %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_unix("%F", 951_782_400), "2000-02-29");
        let err = render("{{ strftime_now('%Y %Q') }}", &[], false).unwrap_err().to_string();
        assert!(err.contains("cannot render template") && err.contains("%Y %Q"), "{err}");
    }

    #[test]
    fn render_errors_name_file() {
        let err = render("{{ messages[0].content.nosuchmethod() }}", &convo(), false).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("cannot render template"), "{err}");
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

    #[test]
    fn json_str_matches_python_json_dumps() {
        // json.dumps(s, ensure_ascii=False) and json.dumps(s) of Python 3.
        let s = "a\"b\\c\n\t\u{1}\u{7f}\u{8}\u{c}é😀\u{2028}";
        let mut out = String::new();
        json_str(s, false, &mut out);
        assert_eq!(out, "\"a\\\"b\\\\c\\n\\t\\u0001\u{7f}\\b\\fé😀\u{2028}\"");
        out.clear();
        json_str(s, true, &mut out);
        assert_eq!(out, "\"a\\\"b\\\\c\\n\\t\\u0001\\u007f\\b\\f\\u00e9\\ud83d\\ude00\\u2028\"");
    }
}
