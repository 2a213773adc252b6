//! Result files. Every file is written to `NAME.partial` and renamed when complete, so a killed
//! run never leaves a truncated file under the final name.

pub mod plot;
pub mod tensorfile;

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};

use crate::{Error, Result};

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

impl View for &OutTensor {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Float { dtype: OutDtype::F32, .. } => Dtype::F32,
            OutTensor::Float { dtype: OutDtype::Bf16, .. } => Dtype::BF16,
            OutTensor::I64 { .. } => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Float { shape, .. } | OutTensor::I64 { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Float { data, dtype: OutDtype::F32, .. } => Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            OutTensor::Float { data, dtype: OutDtype::Bf16, .. } => {
                Cow::Owned(data.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect())
            }
            OutTensor::I64 { data, .. } => Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        n * match self {
            OutTensor::Float { dtype: OutDtype::F32, .. } => 4,
            OutTensor::Float { dtype: OutDtype::Bf16, .. } => 2,
            OutTensor::I64 { .. } => 8,
        }
    }
}

/// Writes `tensors` (name, tensor) with string `metadata` to `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, OutTensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through `path.partial` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
