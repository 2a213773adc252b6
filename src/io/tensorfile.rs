//! Safetensors written tensor by tensor (no second copy of the data in memory) and read tensor
//! by tensor (the header, then only the bytes of the tensors asked for). Used for capture
//! shards and probe weights, whose total size may exceed memory, and (through
//! `io::write_safetensors`) every other safetensors file patchbay writes.
//!
//! Format (as safetensors defines it): u64 LE header length, JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}` padded
//! with spaces to a multiple of 8 bytes, then the data, little-endian, in header offset order.
//!
//! Why not the `safetensors` crate's writer (`serialize_to_file`): it takes the metadata as a
//! `HashMap`, so the header's key order, and with it the file's bytes, change from run to run;
//! a resumed capture must write shards byte-identical to an uninterrupted one
//! (tests/probe_pipeline.rs), and this writer's header is sorted (a `serde_json::Map`). The crate
//! also makes each tensor's bytes in one piece (a bf16 copy of a whole tensor); this writer
//! converts in chunks of 8192 values. The files are standard safetensors: the crate reads them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::io::OutDtype;
use crate::{Error, Result};

/// The values of one tensor to write.
pub enum TensorData<'a> {
    /// f32 values, stored as `OutDtype`.
    F32(&'a [f32], OutDtype),
    I64(&'a [i64]),
}

impl TensorData<'_> {
    fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_, OutDtype::F32) => "F32",
            TensorData::F32(_, OutDtype::Bf16) => "BF16",
            TensorData::I64(_) => "I64",
        }
    }
    fn n_bytes(&self) -> usize {
        match self {
            TensorData::F32(d, OutDtype::F32) => d.len() * 4,
            TensorData::F32(d, OutDtype::Bf16) => d.len() * 2,
            TensorData::I64(d) => d.len() * 8,
        }
    }
    fn len(&self) -> usize {
        match self {
            TensorData::F32(d, _) => d.len(),
            TensorData::I64(d) => d.len(),
        }
    }
}

/// Writes tensors (name, shape, data) and string metadata to `path` through `path.partial`
/// and a rename, so a killed run never leaves a truncated file under the final name.
pub fn write(path: &Path, tensors: &[(String, Vec<usize>, TensorData)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::input(format!("{}: tensor `{name}` has {} values for shape {shape:?}", path.display(), data.len())));
        }
        let end = offset + data.n_bytes();
        header.insert(name.clone(), json!({"dtype": data.dtype_name(), "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    header.insert("__metadata__".into(), json!(metadata));
    let mut hbytes = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::file(path, format!("cannot serialise the header: {e}")))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".partial");
    let io = |e| Error::io(&tmp, e);
    let file = File::create(&tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    for (_, _, data) in tensors {
        match data {
            TensorData::F32(d, dtype) => {
                for chunk in d.chunks(8192) {
                    buf.clear();
                    match dtype {
                        OutDtype::F32 => chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                        OutDtype::Bf16 => chunk.iter().for_each(|&v| buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
                    }
                    w.write_all(&buf).map_err(io)?;
                }
            }
            TensorData::I64(d) => {
                for chunk in d.chunks(8192) {
                    buf.clear();
                    chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
                    w.write_all(&buf).map_err(io)?;
                }
            }
        }
    }
    let file = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One tensor's entry in a header.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl Entry {
    /// Bytes of the tensor's shape at `width` bytes per element; None when that overflows (a
    /// hostile header).
    fn byte_len(&self, width: usize) -> Option<usize> {
        self.shape.iter().try_fold(width, |a, &d| a.checked_mul(d))
    }
}

/// A safetensors file opened for reading tensor by tensor.
pub struct TensorFile {
    pub path: PathBuf,
    file: File,
    data_start: u64,
    pub entries: HashMap<String, Entry>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<TensorFile> {
        let bad = |msg: &str| Error::file(path, format!("not a safetensors file: {msg}"));
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| bad("shorter than 8 bytes"))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            return Err(bad("header length out of range"));
        }
        let mut h = vec![0u8; n as usize];
        file.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
        let header: serde_json::Map<String, Value> = serde_json::from_slice(&h).map_err(|e| bad(&format!("header is not JSON: {e}")))?;
        let mut entries = HashMap::new();
        let mut metadata = HashMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    metadata = m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect();
                }
                continue;
            }
            let dtype = v["dtype"].as_str().ok_or_else(|| bad(&format!("tensor `{name}` has no dtype")))?.to_string();
            let shape = v["shape"].as_array().ok_or_else(|| bad(&format!("tensor `{name}` has no shape")))?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>().ok_or_else(|| bad("bad shape"))?;
            let off = v["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| bad(&format!("tensor `{name}` has no data_offsets")))?;
            let (begin, end) = (off[0].as_u64().unwrap_or(u64::MAX) as usize, off[1].as_u64().unwrap_or(u64::MAX) as usize);
            // 8 + n <= file_len (checked above): no sum here can overflow.
            if begin > end || end as u64 > file_len - 8 - n {
                return Err(bad(&format!("tensor `{name}` lies outside the file")));
            }
            entries.insert(name, Entry { dtype, shape, begin, end });
        }
        Ok(TensorFile { path: path.to_path_buf(), file, data_start: 8 + n, entries, metadata })
    }

    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::file(&self.path, format!("no tensor `{name}`")))
    }

    fn read_bytes(&mut self, e: &Entry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; e.end - e.begin];
        self.file.seek(SeekFrom::Start(self.data_start + e.begin as u64)).map_err(|err| Error::io(&self.path, err))?;
        self.file.read_exact(&mut buf).map_err(|err| Error::io(&self.path, err))?;
        Ok(buf)
    }

    /// A float tensor (F32, BF16 or F16) as f32: (shape, values).
    pub fn read_f32(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let e = self.entry(name)?.clone();
        let width = match e.dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => return Err(Error::file(&self.path, format!("tensor `{name}`: dtype {other}, expected a float type"))),
        };
        if e.byte_len(width) != Some(e.end - e.begin) {
            return Err(Error::file(&self.path, format!("tensor `{name}`: {} bytes for shape {:?}", e.end - e.begin, e.shape)));
        }
        let b = self.read_bytes(&e)?;
        let v = match e.dtype.as_str() {
            "F32" => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "BF16" => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        Ok((e.shape, v))
    }

    pub fn read_i64(&mut self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let e = self.entry(name)?.clone();
        if e.dtype != "I64" || e.byte_len(8) != Some(e.end - e.begin) {
            return Err(Error::file(&self.path, format!("tensor `{name}`: expected I64 of shape {:?}", e.shape)));
        }
        let b = self.read_bytes(&e)?;
        Ok((e.shape, b.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()))
    }
}

/// Peak resident memory of this process (VmHWM), in bytes; None where /proc is not there.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::*;

    /// The `safetensors` crate reads what [`write`] writes: the same dtypes, shapes, bytes and
    /// metadata as its own writer produces for the same tensors, and [`TensorFile`] reads it back.
    #[test]
    fn the_safetensors_crate_reads_our_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let (a, b, c) = ((0..12).map(|i| i as f32 * 0.37 - 1.0).collect::<Vec<f32>>(), vec![1.5f32, -2.25, 1e-3], vec![3i64, -7, 1 << 40]);
        let tensors = [
            ("a".to_string(), vec![3, 4], TensorData::F32(&a, OutDtype::F32)),
            ("b".to_string(), vec![3], TensorData::F32(&b, OutDtype::Bf16)),
            ("c".to_string(), vec![3], TensorData::I64(&c)),
        ];
        let md = BTreeMap::from([("k".to_string(), "v".to_string()), ("shard".to_string(), "0/1".to_string())]);
        write(&path, &tensors, &md).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let ours = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap(), &md.clone().into_iter().collect::<HashMap<_, _>>());
        let bf16: Vec<u8> = b.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let want = [("a", Dtype::F32, vec![3, 4], bytemuck::cast_slice::<f32, u8>(&a).to_vec()), ("b", Dtype::BF16, vec![3], bf16), ("c", Dtype::I64, vec![3], bytemuck::cast_slice::<i64, u8>(&c).to_vec())];
        let views: Vec<(&str, safetensors::tensor::TensorView)> =
            want.iter().map(|(n, dt, shape, data)| (*n, safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap())).collect();
        let theirs_bytes = safetensors::serialize(views, Some(md.clone().into_iter().collect())).unwrap();
        let theirs = safetensors::SafeTensors::deserialize(&theirs_bytes).unwrap();
        for (name, dtype, shape, data) in &want {
            let (o, t) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
            assert_eq!((o.dtype(), o.shape(), o.data()), (*dtype, shape.as_slice(), data.as_slice()), "{name}");
            assert_eq!((o.dtype(), o.shape(), o.data()), (t.dtype(), t.shape(), t.data()), "{name}");
        }
        let mut f = TensorFile::open(&path).unwrap();
        assert_eq!(f.read_f32("a").unwrap(), (vec![3, 4], a));
        assert_eq!(f.read_i64("c").unwrap(), (vec![3], c));
        assert_eq!(f.metadata, md.into_iter().collect::<HashMap<_, _>>());
    }
}
