//! Result files. Every file is written to `NAME.partial` and renamed when complete, so a killed
//! run never leaves a truncated file under the final name.

pub mod plot;
pub mod tensorfile;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use self::tensorfile::TensorData;
use crate::{Error, Result};

/// serde `deserialize_with` helpers reading `null` (what JSON writes for NaN and +-Inf, kept
/// by --allow-nonfinite) back as NaN, so a results file with non-finite values can be read again.
pub mod null_as_nan {
    use serde::{Deserialize, Deserializer};

    pub fn f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<Option<f32>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
    }
}

/// A JSONL results file appended as work completes: created on its first line (so a run that
/// fails before any result writes nothing), flushed after every write.
pub struct JsonlFile {
    path: PathBuf,
    w: Option<std::io::BufWriter<std::fs::File>>,
}

impl JsonlFile {
    pub fn new(path: PathBuf) -> JsonlFile {
        JsonlFile { path, w: None }
    }

    /// Appends `lines`, one JSON object per line, and flushes.
    pub fn write(&mut self, lines: &[serde_json::Value]) -> Result<()> {
        if self.w.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            self.w = Some(std::io::BufWriter::new(std::fs::File::create(&self.path).map_err(|e| Error::io(&self.path, e))?));
        }
        let w = self.w.as_mut().expect("opened above");
        for l in lines {
            writeln!(w, "{l}").map_err(|e| Error::io(&self.path, e))?;
        }
        w.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    F32,
    Bf16,
}

/// A tensor to write: f32 values stored as f32 or bf16, or i64 values.
pub enum OutTensor {
    Float { shape: Vec<usize>, data: Vec<f32>, dtype: OutDtype },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

/// Writes `tensors` (name, tensor) with string `metadata` to `path` atomically, through the one
/// safetensors writer (`tensorfile::write`: sorted header, so the same inputs give the same bytes).
pub fn write_safetensors(path: &Path, tensors: &[(String, OutTensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let data: Vec<(String, Vec<usize>, TensorData)> = tensors
        .iter()
        .map(|(name, t)| match t {
            OutTensor::Float { shape, data, dtype } => (name.clone(), shape.clone(), TensorData::F32(data, *dtype)),
            OutTensor::I64 { shape, data } => (name.clone(), shape.clone(), TensorData::I64(data)),
        })
        .collect();
    tensorfile::write(path, &data, metadata)
}

/// Writes `bytes` to `path` through `path.partial` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
