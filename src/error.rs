//! The one error type of patchbay. Every message names the file, field or input it is about
//! and what was expected, on one line; the library never panics on user input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file was read but its contents are not what they must be (corrupt, truncated, wrong shape).
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A field of config.json (or another JSON config) is missing or holds a bad value.
    #[error("{path}: field `{field}`: {msg}")]
    Config { path: PathBuf, field: String, msg: String },
    /// The checkpoint uses something patchbay does not implement (a model type, a rope type...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Bad user input: an unknown site name, an out-of-range layer/head/position, empty input.
    #[error("{0}")]
    Input(String),
    /// The compute device failed or is missing: no GPU/driver, a kernel launch error (with the
    /// kernel's file:line on the emulated device), an out-of-memory.
    #[error("device: {0}")]
    Device(String),
    /// A forward produced NaN or +-Inf (`engine::finite`): the prompt (its index in the run,
    /// once renumbered by [`Error::in_batch`]) and the first site where it appeared.
    #[error("prompt {prompt}: the model's outputs are not finite (NaN or Inf), first at {site}; nothing more is written (--allow-nonfinite keeps such values and counts them)")]
    NonFinite { prompt: usize, site: String },
    /// A sequence longer than the model's context (`engine::finite` refuses it before the
    /// forward): the prompt as in [`Error::NonFinite`], its length after the call, the context.
    #[error("prompt {prompt}: {len} tokens, longer than the model's context of {max} positions (max_position_embeddings in config.json): positions past it were never trained; shorten the prompt or leave it out")]
    TooLong { prompt: usize, len: usize, max: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File { path: path.into(), msg: one_line(msg.into()) }
    }
    pub fn config(path: impl Into<PathBuf>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: one_line(field.into()), msg: one_line(msg.into()) }
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(one_line(msg.into()))
    }
    pub fn device(msg: impl Into<String>) -> Self {
        Error::Device(one_line(msg.into()))
    }
    /// A [`Error::NonFinite`] or [`Error::TooLong`] with its prompt renumbered from the index
    /// in a forward call to the run's (`id(i)`); any other error unchanged.
    pub fn in_batch(self, id: impl FnOnce(usize) -> usize) -> Self {
        match self {
            Error::NonFinite { prompt, site } => Error::NonFinite { prompt: id(prompt), site },
            Error::TooLong { prompt, len, max } => Error::TooLong { prompt: id(prompt), len, max },
            e => e,
        }
    }
}

/// A message on one line: line breaks quoted from user text (a CSV header field with a newline, a
/// JSON key) written as `\n` and `\r`.
fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) { s.replace('\r', "\\r").replace('\n', "\\n") } else { s }
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The bytes of a JSON file: a byte-order mark (which JSON forbids and serde reports as an
/// error at line 1 column 1) is refused by name.
pub fn read_json_bytes(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = read_file(path)?;
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(Error::file(path, "starts with a byte-order mark (BOM): save it as UTF-8 without one"));
    }
    Ok(bytes)
}
