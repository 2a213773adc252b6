//! Loading a model: a Hugging Face directory (config.json -> ModelConfig, safetensors weights
//! memory-mapped, tokenizer.json + chat template) or a GGUF file (all four in one file).

pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod synth;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Result;
use checkpoint::{Checkpoint, ModelWeights};
use config::ModelConfig;

/// A loaded model: config and memory-mapped weights. It is also the CPU engine, computing at
/// `precision` (f32, the reference, unless [`Model::with_precision`]).
#[derive(Clone)]
pub struct Model {
    /// The model directory, or the GGUF file.
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub weights: ModelWeights,
    /// sha256 of config.json (hex), or of a GGUF file's header (metadata and tensor table),
    /// recorded in every output's provenance.
    pub config_hash: String,
    /// The CPU engine's numerics.
    pub precision: config::Precision,
}

/// sha256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Model {
    /// Loads DIR/config.json and the safetensors weights, or a GGUF file (PATH.gguf, or the one
    /// .gguf of a directory without config.json), checking every tensor's shape.
    pub fn load(dir: &Path) -> Result<Model> {
        if let Some(path) = gguf::find(dir)? {
            let file = gguf::GgufFile::open(&path)?;
            let cfg = file.config()?;
            let weights = ModelWeights::load(&cfg, &file.checkpoint(&cfg)?)?;
            return Ok(Model { dir: path, cfg, weights, config_hash: sha256_hex(file.header()), precision: Default::default() });
        }
        if !dir.is_dir() {
            let what = if dir.exists() { "is not a directory" } else { "does not exist" };
            return Err(crate::Error::file(dir, format!("model directory {what} (expected a Hugging Face model directory with config.json and model.safetensors, or a .gguf file)")));
        }
        let cfg = ModelConfig::load(dir)?;
        let config_bytes = crate::error::read_file(&dir.join("config.json"))?;
        let config_hash = sha256_hex(&config_bytes);
        let ck = Checkpoint::open(dir)?;
        let weights = ModelWeights::load(&cfg, &ck)?;
        Ok(Model { dir: dir.to_path_buf(), cfg, weights, precision: Default::default(), config_hash })
    }

    /// The same model (its weights shared, not copied) as a CPU engine computing at
    /// `precision`.
    pub fn with_precision(&self, precision: config::Precision) -> Model {
        Model { precision, ..self.clone() }
    }
}

/// One line, whatever a library's error message looks like.
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What kind of JSON value `v` is, for errors ("expected a string, found an array").
fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value as Json;
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}
