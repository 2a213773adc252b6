//! GGUF checkpoints (llama.cpp's format, versions 2 and 3, little-endian), memory-mapped.
//!
//! A GGUF file holds the config (`{arch}.*` metadata), the tokenizer (`tokenizer.ggml.*`), the
//! chat template (`tokenizer.chat_template`) and the tensors. This module reads all of them into
//! the shapes the Hugging Face path produces: a [`ModelConfig`] (built through the same
//! `ModelConfig::from_json` as config.json), a [`Checkpoint`] under Hugging Face tensor names,
//! and a `tokenizers` byte-level BPE as transformers' GGUF loader builds it.
//!
//! Weights: F32, F16 and BF16 tensors stay memory-mapped as they are. Quantized tensors (Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) are expanded once, on load, to f16 (bf16 for a
//! tensor with a value beyond f16's range): 2 bytes per parameter in memory, the footprint of a
//! bf16 safetensors checkpoint. llama.cpp's rotary permutation of the Llama q/k rows is undone
//! on load (as transformers' GGUF loader does), so the half-split rope of the forward is right.
//!
//! Every count, length, offset and size is checked against the file before it is used, and no
//! allocation is sized by a count the file has not backed with bytes: a truncated or hostile
//! file is a one-line error naming the file and what is wrong with it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

use super::checkpoint::{Checkpoint, Storage, Weight};
use super::config::{DType, ModelConfig, RopeScaling};
use super::one_line;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are refused (llama.cpp writes none).
const MAX_NESTING: usize = 8;
const DEFAULT_ALIGNMENT: usize = 32;

/// The GGUF file a model path names: the path itself when it is a file ending in `.gguf`, or the
/// one `.gguf` of a directory without config.json. `None` for a Hugging Face directory (or one
/// that does not exist: the caller's error says what was expected).
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Ok(Some(path.to_path_buf()));
        }
        return Err(Error::file(path, "is not a directory or a .gguf file (expected a Hugging Face model directory or a GGUF file)"));
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut found: Vec<PathBuf> = Vec::new();
    for e in entries {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => {
            let names: Vec<String> = found.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
            Err(Error::file(path, format!("holds {} .gguf files ({}); give --model one of them", names.len(), names.join(", "))))
        }
    }
}

/// A tensor type of ggml that patchbay reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type of ggml's id, or a message naming the id (and the type, when ggml has one).
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => {
                const OTHERS: [(u32, &str); 21] = [
                    (9, "Q8_1"), (10, "Q2_K"), (11, "Q3_K"), (15, "Q8_K"), (16, "IQ2_XXS"), (17, "IQ2_XS"), (18, "IQ3_XXS"),
                    (19, "IQ1_S"), (20, "IQ4_NL"), (21, "IQ3_S"), (22, "IQ2_S"), (23, "IQ4_XS"), (24, "I8"), (25, "I16"),
                    (26, "I32"), (27, "I64"), (28, "F64"), (29, "IQ1_M"), (34, "TQ1_0"), (35, "TQ2_0"), (39, "MXFP4"),
                ];
                let supported: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
                return Err(match OTHERS.iter().find(|(i, _)| *i == id) {
                    Some((_, name)) => format!("type {name} (ggml type {id}) is not supported (supported: {})", supported.join(", ")),
                    None => format!("unknown ggml type {id} (supported: {})", supported.join(", ")),
                });
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// (elements, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// The dtype a tensor of this type keeps in memory, None when it is quantized.
    fn float_dtype(self) -> Option<DType> {
        match self {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block `j` of a K-quant block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) };
    (d as f32, m as f32)
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out` (f32), as ggml's dequantize_row_*
/// does, operation for operation (so the values are bit-identical to ggml's and gguf-py's).
/// `out.len()` must be the number of elements the blocks hold.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (be, bb) = ty.block();
    debug_assert_eq!(bytes.len() / bb * be, out.len());
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => y[0] = f16_at(b, 0),
            GgmlType::BF16 => y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            GgmlType::Q4_0 => {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let offset = usize::from(ty == GgmlType::Q5_1) * 2;
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2 + offset], b[3 + offset], b[4 + offset], b[5 + offset]]);
                let qs = &b[6 + offset..];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let (x0, x1) = ((qs[j] & 0xF) | h0, (qs[j] >> 4) | h1);
                    if ty == GgmlType::Q5_0 {
                        y[j] = (x0 as i32 - 16) as f32 * d;
                        y[j + 16] = (x1 as i32 - 16) as f32 * d;
                    } else {
                        let m = f16_at(b, 2);
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    }
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, ql) = if ty == GgmlType::Q5K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for (n, chunk) in y.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * n, scales);
                    let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
                    let q = &ql[32 * n..32 * n + 32];
                    for l in 0..32 {
                        let (h1, h2) = if qh.is_empty() { (0, 0) } else { (((qh[l] >> (2 * n)) & 1) << 4, ((qh[l] >> (2 * n + 1)) & 1) << 4) };
                        chunk[l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
                        chunk[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for (n, chunk) in y.chunks_exact_mut(128).enumerate() {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        chunk[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        chunk[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        chunk[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        chunk[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// A metadata value. Strings and arrays are byte ranges of the mapped file, decoded on use (an
/// array is only walked, never materialized, while the header is parsed).
#[derive(Clone, Debug)]
enum Meta {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Range<usize>),
    /// `n` elements of GGUF value type `ty`, the first at byte `at`.
    Array { ty: u32, n: usize, at: usize },
}

impl Meta {
    fn kind(&self) -> &'static str {
        match self {
            Meta::Uint(_) => "an unsigned integer",
            Meta::Int(_) => "an integer",
            Meta::Float(_) => "a float",
            Meta::Bool(_) => "a boolean",
            Meta::Str(_) => "a string",
            Meta::Array { .. } => "an array",
        }
    }
}

/// One tensor of the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (ggml's dims reversed: ne[0] is the last, contiguous axis).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range of the data in the file.
    pub data: Range<usize>,
}

/// Reads little-endian values from the file, every read checked against its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    /// The error for a malformed file: one line even when it quotes a name the file holds.
    fn bad(&self, msg: impl std::fmt::Display) -> Error {
        Error::file(self.path, format!("not a valid GGUF file: {}", one_line(msg)))
    }
    fn take(&mut self, n: usize, what: &dyn std::fmt::Display) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(self.bad(format_args!("truncated: {what} at byte {} needs {n} bytes, the file has {} left", self.pos, self.buf.len() - self.pos)));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &dyn std::fmt::Display) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &dyn std::fmt::Display) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// A count of items that each take at least `min_bytes` of the file: larger than what is
    /// left cannot be right, so no allocation is ever sized by it.
    fn count(&mut self, min_bytes: usize, what: &dyn std::fmt::Display) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > left / min_bytes as u64 {
            return Err(self.bad(format_args!("{what} is {n}, more than the {left} bytes left in the file can hold")));
        }
        Ok(n as usize)
    }
    /// A string: its byte range.
    fn string(&mut self, what: &dyn std::fmt::Display) -> Result<Range<usize>> {
        let n = self.u64(&format_args!("the length of {what}"))?;
        let left = self.buf.len() - self.pos;
        if n > left as u64 {
            return Err(self.bad(format_args!("truncated: {what} at byte {} is {n} bytes long, the file has {left} left", self.pos)));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(start..self.pos)
    }
    fn utf8(&self, r: Range<usize>, what: &dyn std::fmt::Display) -> Result<&'a str> {
        std::str::from_utf8(&self.buf[r]).map_err(|_| self.bad(format_args!("{what} is not valid UTF-8")))
    }
    /// A value of GGUF type `ty`.
    fn value(&mut self, ty: u32, what: &dyn std::fmt::Display, depth: usize) -> Result<Meta> {
        Ok(match ty {
            0 => Meta::Uint(self.take(1, what)?[0] as u64),
            1 => Meta::Int(self.take(1, what)?[0] as i8 as i64),
            2 => Meta::Uint(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as u64),
            3 => Meta::Int(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            4 => Meta::Uint(self.u32(what)? as u64),
            5 => Meta::Int(self.u32(what)? as i32 as i64),
            6 => Meta::Float(f32::from_bits(self.u32(what)?) as f64),
            7 => match self.take(1, what)?[0] {
                0 => Meta::Bool(false),
                1 => Meta::Bool(true),
                b => return Err(self.bad(format_args!("{what} is a boolean holding {b} (must be 0 or 1)"))),
            },
            8 => Meta::Str(self.string(what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(self.bad(format_args!("{what} nests arrays more than {MAX_NESTING} deep")));
                }
                let elem = self.u32(&format_args!("the element type of {what}"))?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(self.bad(format_args!("{what} has unknown element type {elem}"))),
                };
                let n = self.count(min, &format_args!("the length of {what}"))?;
                let at = self.pos;
                if matches!(elem, 8 | 9) {
                    for i in 0..n {
                        self.value(elem, &format_args!("{what}[{i}]"), depth + 1)?;
                    }
                } else {
                    self.take(n * min, what)?;
                }
                Meta::Array { ty: elem, n, at }
            }
            10 => Meta::Uint(self.u64(what)?),
            11 => Meta::Int(self.u64(what)? as i64),
            12 => Meta::Float(f64::from_bits(self.u64(what)?)),
            _ => return Err(self.bad(format_args!("{what} has unknown value type {ty}"))),
        })
    }
}

/// A parsed GGUF file: metadata and tensor table, checked; the data stays mapped.
pub struct GgufFile {
    pub path: PathBuf,
    map: Arc<Storage>,
    pub version: u32,
    metadata: HashMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
    /// Bytes before the tensor data (header, metadata, tensor table, padding).
    header_len: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; patchbay never writes to checkpoint files (as for safetensors).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(Storage::Mapped(map)))
    }

    fn parse(path: &Path, map: Arc<Storage>) -> Result<GgufFile> {
        let buf: &[u8] = &map;
        let mut r = Reader { buf, pos: 0, path };
        let magic = r.take(4, &"the magic number")?;
        if magic != MAGIC {
            return Err(r.bad(format_args!("the file starts with {magic:02x?}, not the GGUF magic \"GGUF\"")));
        }
        let version = r.u32(&"the version")?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format_args!("version {version} is not supported (GGUF 2 and 3, little-endian)")));
        }
        // A tensor entry takes at least 8 (name) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset) bytes,
        // a metadata entry 8 (key) + 4 (type) + 1 (value).
        let n_tensors_at = r.pos;
        let n_tensors = r.u64(&"the tensor count")?;
        let n_kv = r.count(13, &"the metadata count")?;
        let mut metadata: HashMap<String, Meta> = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r.string(&format_args!("metadata key {i}"))?;
            let key = r.utf8(key, &format_args!("metadata key {i}"))?.to_string();
            let ty = r.u32(&format_args!("the type of `{key}`"))?;
            let v = r.value(ty, &format_args!("`{key}`"), 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.bad(format_args!("metadata key `{key}` appears twice")));
            }
        }
        if n_tensors > ((buf.len() - r.pos) / 32) as u64 {
            return Err(r.bad(format_args!("the tensor count (at byte {n_tensors_at}) is {n_tensors}, more than the {} bytes left in the file can hold", buf.len() - r.pos)));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Meta::Uint(a)) if a.is_power_of_two() && *a <= 1 << 30 => *a as usize,
            Some(v) => return Err(r.bad(format_args!("`general.alignment` must be a power of two, found {v:?}"))),
        };
        let mut infos: Vec<(String, Vec<usize>, GgmlType, u64)> = Vec::with_capacity(n_tensors as usize);
        let mut names: HashSet<String> = HashSet::with_capacity(n_tensors as usize);
        for i in 0..n_tensors as usize {
            let name = r.string(&format_args!("the name of tensor {i}"))?;
            let name = r.utf8(name, &format_args!("the name of tensor {i}"))?.to_string();
            let n_dims = r.u32(&format_args!("the dimension count of tensor `{name}`"))? as usize;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(r.bad(format_args!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&format_args!("a dimension of tensor `{name}`"))?;
                if d == 0 || d > u32::MAX as u64 {
                    return Err(r.bad(format_args!("tensor `{name}` has a dimension of {d}")));
                }
                dims.push(d as usize);
            }
            let ty = r.u32(&format_args!("the type of tensor `{name}`"))?;
            let ty = GgmlType::from_id(ty).map_err(|m| r.bad(format_args!("tensor `{name}`: {m}")))?;
            let offset = r.u64(&format_args!("the data offset of tensor `{name}`"))?;
            if !names.insert(name.clone()) {
                return Err(r.bad(format_args!("tensor `{name}` appears twice")));
            }
            dims.reverse();
            infos.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let data_len = buf.len().saturating_sub(data_start);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, shape, ty, offset) in infos {
            let (be, bb) = ty.block();
            let cols = *shape.last().expect("n_dims >= 1");
            if cols % be != 0 {
                return Err(r.bad(format_args!("tensor `{name}` ({}) has rows of {cols} elements, not a multiple of the block size {be}", ty.name())));
            }
            let n_bytes = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| (n / be).checked_mul(bb));
            let Some(n_bytes) = n_bytes else {
                return Err(r.bad(format_args!("tensor `{name}` has shape {shape:?}: too large")));
            };
            if offset % alignment as u64 != 0 {
                return Err(r.bad(format_args!("tensor `{name}` has data offset {offset}, not a multiple of the alignment {alignment}")));
            }
            if offset > data_len as u64 || n_bytes as u64 > data_len as u64 - offset {
                return Err(r.bad(format_args!(
                    "tensor `{name}` ({}, shape {shape:?}) needs bytes {offset}..{} of the data section, which has {data_len}: truncated file or offset past the end",
                    ty.name(),
                    offset as u128 + n_bytes as u128
                )));
            }
            let start = data_start + offset as usize;
            tensors.push(TensorInfo { name, shape, ty, data: start..start + n_bytes });
        }
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| !t.data.is_empty()).collect();
        by_offset.sort_by_key(|t| t.data.start);
        for w in by_offset.windows(2) {
            if w[1].data.start < w[0].data.end {
                return Err(r.bad(format_args!("tensors `{}` and `{}` overlap in the file", w[0].name, w[1].name)));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, header_len: data_start.min(buf.len()), map })
    }

    /// The header bytes (everything before the tensor data): what identifies the model's config.
    pub fn header(&self) -> &[u8] {
        &self.map[..self.header_len]
    }

    fn reader(&self, at: usize) -> Reader<'_> {
        Reader { buf: &self.map, pos: at, path: &self.path }
    }

    fn wrong(&self, key: &str, expected: &str, found: &Meta) -> Error {
        Error::config(&self.path, key, format!("expected {expected}, found {}", found.kind()))
    }

    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Uint(v)) => Ok(Some(*v)),
            Some(Meta::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(v) => Err(self.wrong(key, "a non-negative integer", v)),
        }
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Float(v)) => Ok(Some(*v)),
            Some(Meta::Uint(v)) => Ok(Some(*v as f64)),
            Some(Meta::Int(v)) => Ok(Some(*v as f64)),
            Some(v) => Err(self.wrong(key, "a number", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Str(r)) => self.reader(0).utf8(r.clone(), &format_args!("`{key}`")).map(Some),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Array { ty: 8, n, at }) => {
                let mut r = self.reader(*at);
                let mut out = Vec::with_capacity(*n);
                for i in 0..*n {
                    let what = format_args!("`{key}`[{i}]");
                    let s = r.string(&what)?;
                    out.push(r.utf8(s, &what)?);
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    /// An array of integers (any integer element type).
    pub fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Array { ty, n, at }) if matches!(ty, 0..=5 | 10 | 11) => {
                let mut r = self.reader(*at);
                let mut out = Vec::with_capacity(*n);
                for i in 0..*n {
                    match r.value(*ty, &format_args!("`{key}`[{i}]"), 0)? {
                        Meta::Uint(v) => out.push(v as i64),
                        Meta::Int(v) => out.push(v),
                        _ => unreachable!("integer element types give integers"),
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.wrong(key, "an array of integers", v)),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.data.clone()]
    }

    /// A whole tensor as f32 (small tensors: norms, rope factors, tests).
    pub fn tensor_f32(&self, t: &TensorInfo) -> Vec<f32> {
        let mut v = vec![0.0; t.shape.iter().product()];
        dequantize(t.ty, self.tensor_bytes(t), &mut v);
        v
    }

    /// `general.architecture`.
    pub fn arch(&self) -> Result<&str> {
        self.str("general.architecture")?.ok_or_else(|| Error::config(&self.path, "general.architecture", "missing"))
    }

    /// The model's config, from `{arch}.*` metadata and the tensor table.
    pub fn config(&self) -> Result<ModelConfig> {
        let mut config = ModelConfig::from_json(&self.config_json()?, &self.path)?;
        if let Some(t) = self.tensor("rope_freqs.weight") {
            if config.rope_scaling != RopeScaling::Default {
                return Err(Error::file(&self.path, "has both `rope_freqs.weight` and rope scaling metadata"));
            }
            if t.shape != [config.rotary_dim / 2] {
                return Err(Error::file(&self.path, format!("tensor `rope_freqs.weight` has shape {:?}, the config implies [{}]", t.shape, config.rotary_dim / 2)));
            }
            config.rope_scaling = RopeScaling::Factors { factors: self.tensor_f32(t) };
        }
        Ok(config)
    }

    /// The config.json a Hugging Face export of this file would have (the fields
    /// `ModelConfig::from_json` reads; `rope_freqs.weight` is applied by [`Self::config`]).
    pub fn config_json(&self) -> Result<Json> {
        let arch = self.arch()?;
        if !matches!(arch, "llama" | "qwen2") {
            return Err(Error::Unsupported(format!("{}: GGUF architecture `{arch}` (supported: llama, qwen2)", self.path.display())));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let required = |k: &str| -> Result<u64> { self.uint(&key(k))?.ok_or_else(|| Error::config(&self.path, key(k), "missing")) };
        if self.uint(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(Error::Unsupported(format!("{}: a mixture-of-experts model (`{}`)", self.path.display(), key("expert_count"))));
        }
        let d_model = required("embedding_length")?;
        let n_heads = required("attention.head_count")?;
        let n_kv_heads = self.uint(&key("attention.head_count_kv"))?.unwrap_or(n_heads);
        let d_head = match self.uint(&key("attention.key_length"))? {
            Some(d) => d,
            None if n_heads > 0 => d_model / n_heads,
            None => 0,
        };
        if let Some(v) = self.uint(&key("attention.value_length"))?
            && v != d_head
        {
            return Err(Error::config(&self.path, key("attention.value_length"), format!("is {v}; patchbay needs it equal to the key length {d_head}")));
        }
        let n_layers = required("block_count")?;
        let d_mlp = required("feed_forward_length")?;
        // Sizes the file's tensors could not back are refused before anything is sized by them.
        if n_layers > self.tensors.len() as u64 {
            return Err(Error::config(&self.path, key("block_count"), format!("is {n_layers}, more than the file's {} tensors", self.tensors.len())));
        }
        for (k, v) in [("embedding_length", d_model), ("attention.head_count", n_heads), ("attention.head_count_kv", n_kv_heads), ("attention.key_length", d_head), ("feed_forward_length", d_mlp)] {
            if v > u32::MAX as u64 {
                return Err(Error::config(&self.path, key(k), format!("is {v}: too large")));
            }
        }
        let embed = self.tensor("token_embd.weight").ok_or_else(|| Error::file(&self.path, "tensor `token_embd.weight` is missing"))?;
        let mut cfg = json!({
            "model_type": arch,
            "hidden_size": d_model,
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv_heads,
            "head_dim": d_head,
            "intermediate_size": d_mlp,
            "vocab_size": embed.shape[0],
            "rms_norm_eps": self.float(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "max_position_embeddings": self.uint(&key("context_length"))?.unwrap_or(4096),
            "rope_theta": self.float(&key("rope.freq_base"))?.unwrap_or(10000.0),
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "bos_token_id": self.uint("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.uint("tokenizer.ggml.eos_token_id")?,
        });
        if let Some(rot) = self.uint(&key("rope.dimension_count"))?
            && d_head > 0
        {
            cfg["partial_rotary_factor"] = json!(rot as f64 / d_head as f64);
        }
        match self.str(&key("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self.float(&key("rope.scaling.factor"))?.ok_or_else(|| Error::config(&self.path, key("rope.scaling.factor"), "required by linear rope scaling"))?;
                cfg["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
            Some(other) => return Err(Error::config(&self.path, key("rope.scaling.type"), format!("`{other}` is not supported (none, linear)"))),
        }
        Ok(cfg)
    }

    /// The dtype tensor `name` has once loaded: its own for F32/F16/BF16, f16 when quantized.
    pub fn loaded_dtype(&self, name: &str) -> Option<DType> {
        self.tensor(name).map(|t| t.ty.float_dtype().unwrap_or(DType::F16))
    }

    /// The tensors under their Hugging Face names, quantized ones expanded (see the module doc),
    /// the Llama q/k rows put back in Hugging Face's order.
    pub fn checkpoint(&self, cfg: &ModelConfig) -> Result<Checkpoint> {
        let llama = self.arch()? == "llama";
        let mut tensors = HashMap::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let name = hf_name(&t.name);
            // convert_hf_to_gguf permutes the rows of Llama's q and k (and their biases) so that
            // ggml's interleaved rope applies; undo it per head.
            let heads = match name.rsplit('.').nth(1) {
                Some("q_proj") if llama => Some(cfg.n_heads),
                Some("k_proj") if llama => Some(cfg.n_kv_heads),
                _ => None,
            };
            let w = self.weight(t, heads)?;
            tensors.insert(name, w);
        }
        Ok(Checkpoint::from_weights(&self.path, tensors))
    }

    /// One tensor as a [`Weight`]: mapped as it is, or expanded (quantized) / copied (permuted).
    fn weight(&self, t: &TensorInfo, rope_heads: Option<usize>) -> Result<Weight> {
        let rows: usize = t.shape[..t.shape.len() - 1].iter().product();
        let cols = *t.shape.last().expect("n_dims >= 1");
        // A vector (bias) is permuted as rows of one element.
        let (rows, cols) = if t.shape.len() == 1 && rope_heads.is_some() { (cols, 1) } else { (rows, cols) };
        let perm = match rope_heads {
            Some(h) if h > 0 && rows % (2 * h) == 0 => Some((h, rows / h)),
            Some(h) => return Err(Error::file(&self.path, format!("tensor `{}` has {rows} rows, not a whole number of {h} heads of even size", t.name))),
            None => None,
        };
        // HF row -> GGUF row: within a head of d rows, HF row j*d/2 + i is GGUF row 2i + j.
        let src_row = |r: usize| match perm {
            None => r,
            Some((_, d)) => {
                let (h, k) = (r / d, r % d);
                let (j, i) = (k / (d / 2), k % (d / 2));
                h * d + 2 * i + j
            }
        };
        let src = self.tensor_bytes(t);
        let src_row_bytes = src.len() / rows;
        if let Some(dtype) = t.ty.float_dtype() {
            if perm.is_none() {
                return Ok(Weight::mapped(self.map.clone(), t.data.clone(), dtype, t.shape.clone()));
            }
            let mut out = vec![0u8; src.len()];
            for (r, dst) in out.chunks_exact_mut(src_row_bytes).enumerate() {
                let s = src_row(r) * src_row_bytes;
                dst.copy_from_slice(&src[s..s + src_row_bytes]);
            }
            return Ok(Weight::owned(out, dtype, t.shape.clone()));
        }
        // Quantized: dequantize row by row (rows are whole blocks) straight into f16.
        let non_finite = AtomicBool::new(false);
        let expand = |dtype: DType| -> Vec<u8> {
            let mut out = vec![0u8; rows * cols * 2]; // [rows, cols] f16 or bf16
            out.par_chunks_mut(cols * 2).enumerate().for_each_init(
                || vec![0.0f32; cols],
                |f, (r, dst)| {
                    let s = src_row(r) * src_row_bytes;
                    dequantize(t.ty, &src[s..s + src_row_bytes], f);
                    if f.iter().any(|x| !x.is_finite()) {
                        non_finite.store(true, Ordering::Relaxed);
                    }
                    for (d, &x) in dst.chunks_exact_mut(2).zip(f.iter()) {
                        let bits = if dtype == DType::F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() };
                        d.copy_from_slice(&bits.to_le_bytes());
                    }
                },
            );
            out
        };
        let out = expand(DType::F16);
        if non_finite.load(Ordering::Relaxed) {
            return Err(Error::file(&self.path, format!("tensor `{}` ({}) dequantizes to values that are not finite (corrupt scales)", t.name, t.ty.name())));
        }
        let overflows = out.chunks_exact(2).any(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).is_infinite());
        Ok(if overflows { Weight::owned(expand(DType::BF16), DType::BF16, t.shape.clone()) } else { Weight::owned(out, DType::F16, t.shape.clone()) })
    }

    /// The tokenizer `tokenizer.ggml.*` describes, built as transformers' GGUF loader builds it
    /// (a byte-level BPE for `gpt2`), and the tokenizer_config.json it implies: special tokens,
    /// add_bos_token / add_eos_token, chat_template.
    pub fn tokenizer(&self) -> Result<(Tokenizer, serde_json::Map<String, Json>)> {
        let model = self.str("tokenizer.ggml.model")?.ok_or_else(|| Error::config(&self.path, "tokenizer.ggml.model", "missing: the file has no tokenizer"))?;
        if model != "gpt2" {
            return Err(Error::config(&self.path, "tokenizer.ggml.model", format!("`{model}` is not supported (gpt2: byte-level BPE)")));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?.ok_or_else(|| Error::config(&self.path, "tokenizer.ggml.tokens", "missing"))?;
        let merges = self.strings("tokenizer.ggml.merges")?.ok_or_else(|| Error::config(&self.path, "tokenizer.ggml.merges", "missing (a byte-level BPE needs its merges)"))?;
        let types = self.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(Error::config(&self.path, "tokenizer.ggml.token_type", format!("has {} entries, tokenizer.ggml.tokens has {}", types.len(), tokens.len())));
        }
        // A token outside the byte alphabet is spelled in it (transformers' byte_level_tokenizer).
        let spelling = bytes_to_unicode();
        let in_alphabet = |t: &str| t.chars().all(|c| spelling.contains(&c));
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            let t = if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| spelling[b as usize]).collect() };
            vocab.insert(t, json!(id));
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| Error::config(&self.path, format!("tokenizer.ggml.merges[{i}]"), format!("{m:?} is not two tokens separated by a space")))?;
            pairs.push(json!([a, b]));
        }
        // Control tokens (type 3) are special, user-defined ones (type 4) plain added tokens.
        let mut added = Vec::new();
        for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if (*ty == 3 && in_alphabet(t)) || *ty == 4 {
                added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *ty == 3}));
            }
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match self.str("tokenizer.ggml.pre")?.and_then(split_regex) {
            Some(regex) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false}, byte_level(false)]}),
            None => byte_level(true),
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre_tokenizer, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": pairs},
        });
        let tokenizer: Tokenizer = serde_json::from_value(spec).map_err(|e| Error::file(&self.path, format!("cannot build the tokenizer from its metadata: {}", one_line(e))))?;

        let mut config = serde_json::Map::new();
        for (name, key) in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")] {
            let key = format!("tokenizer.ggml.{key}");
            if let Some(id) = self.uint(&key)? {
                let t = tokens.get(id as usize).ok_or_else(|| Error::config(&self.path, &key, format!("{id} is not a token id (the vocabulary has {})", tokens.len())))?;
                config.insert(name.into(), json!(t));
            }
        }
        config.insert("add_bos_token".into(), json!(self.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false)));
        config.insert("add_eos_token".into(), json!(self.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false)));
        if let Some(t) = self.str("tokenizer.chat_template")? {
            config.insert("chat_template".into(), json!(t));
        }
        Ok((tokenizer, config))
    }
}

/// The Hugging Face name of a llama.cpp tensor name (unknown names are kept as they are).
fn hf_name(name: &str) -> String {
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some((layer, rest)) = name.strip_prefix("blk.").and_then(|s| s.split_once('.')) else { return name.to_string() };
    let Some((part, suffix)) = rest.split_once('.') else { return name.to_string() };
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return name.to_string(),
    };
    format!("model.layers.{layer}.{hf}.{suffix}")
}

/// The split regex transformers' GGUF loader uses for a `tokenizer.ggml.pre` value (None: GPT-2's
/// own, inside the ByteLevel pre-tokenizer).
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// GPT-2's byte -> unicode spelling: printable bytes stand for themselves, the others get the
/// code points from 256 on, in byte order.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias"), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.12.ffn_norm.weight"), "model.layers.12.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
        assert_eq!(hf_name("rope_freqs.weight"), "rope_freqs.weight");
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let s = bytes_to_unicode();
        assert_eq!(s[b' ' as usize], 'Ġ');
        assert_eq!(s[b'\n' as usize], 'Ċ');
        assert_eq!(s[b'a' as usize], 'a');
        let mut sorted = s.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
