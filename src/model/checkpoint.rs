//! Safetensors checkpoints, memory-mapped: `model.safetensors` or a sharded
//! `model.safetensors.index.json`. Weights stay in their stored dtype (bf16, f16 or f32); the
//! CPU math converts tiles as it goes (see `backend::cpu`). Names and shapes are checked
//! against the config here, once, so the forward never meets a malformed tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::config::{DType, ModelConfig};
use crate::{Error, Result};

/// Bytes behind a weight: a memory-mapped checkpoint file, or an owned copy (a gathered subset,
/// a GGUF tensor expanded on load).
pub(super) enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A tensor living in a memory-mapped checkpoint file (row-major).
#[derive(Clone)]
pub struct Weight {
    map: Arc<Storage>,
    /// Byte range of the data inside the mapped file: `start..start + n_bytes`.
    start: usize,
    n_bytes: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({:?}, {:?})", self.dtype, self.shape)
    }
}

impl Weight {
    /// The bytes `range` of a mapped file.
    pub(super) fn mapped(map: Arc<Storage>, range: std::ops::Range<usize>, dtype: DType, shape: Vec<usize>) -> Weight {
        Weight { map, start: range.start, n_bytes: range.len(), dtype, shape }
    }
    /// A tensor owning its bytes.
    pub(super) fn owned(bytes: Vec<u8>, dtype: DType, shape: Vec<usize>) -> Weight {
        Weight { n_bytes: bytes.len(), map: Arc::new(Storage::Owned(bytes)), start: 0, dtype, shape }
    }
    /// An in-memory tensor of `values` stored as `dtype` (rounded to nearest even), `shape`
    /// row-major (GEMM tests and the bench's peak measurement).
    pub fn from_f32(values: &[f32], dtype: DType, shape: Vec<usize>) -> Weight {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "Weight::from_f32: {} values for shape {shape:?}", values.len());
        let bytes: Vec<u8> = match dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        };
        Weight::owned(bytes, dtype, shape)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.n_bytes]
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Rows `r0..r1` of a 2-D weight `[rows, cols]` (a contiguous byte range: how fused
    /// projections such as Phi-3's qkv_proj are split).
    pub fn rows(&self, r0: usize, r1: usize) -> Weight {
        debug_assert!(self.shape.len() == 2 && r0 <= r1 && r1 <= self.shape[0]);
        let row_bytes = self.shape[1] * self.dtype.size();
        Weight { map: self.map.clone(), start: self.start + r0 * row_bytes, n_bytes: (r1 - r0) * row_bytes, dtype: self.dtype, shape: vec![r1 - r0, self.shape[1]] }
    }
    /// The rows `ids` of a 2-D weight, copied into a new in-memory tensor `[ids.len(), cols]`
    /// (e.g. the lm_head rows of a label set). Ids must be < rows.
    pub fn gather_rows(&self, ids: &[u32]) -> Weight {
        let row_bytes = self.shape[1] * self.dtype.size();
        let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let r = id as usize * row_bytes;
            bytes.extend_from_slice(&self.bytes()[r..r + row_bytes]);
        }
        Weight::owned(bytes, self.dtype, vec![ids.len(), self.shape[1]])
    }

    /// Elements `i0..i1` converted to f32.
    pub fn to_f32_range(&self, i0: usize, i1: usize, out: &mut [f32]) {
        let b = self.bytes();
        let s = self.dtype.size();
        let src = &b[i0 * s..i1 * s];
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }
    /// The whole tensor as f32 (only for small tensors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        self.to_f32_range(0, self.numel(), &mut v);
        v
    }
}

/// The shard `name` of an index file: a path that resolves (symlinks followed) inside the model
/// directory `dir`; an absolute path, `..` out of the directory or a symlink out of it is refused.
/// `root` is `dir` canonicalized.
fn inside(dir: &Path, root: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let out = || Error::config(index, "weight_map", format!("names `{name}`, which is outside the model directory (shards must be files in it)"));
    if Path::new(name).is_absolute() {
        return Err(out());
    }
    let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
    if !real.starts_with(root) {
        return Err(out());
    }
    Ok(path)
}

/// All tensors of a checkpoint directory by name.
pub struct Checkpoint {
    pub dir: PathBuf,
    tensors: HashMap<String, (Weight, PathBuf)>,
}

impl Checkpoint {
    /// Opens DIR/model.safetensors, or the shards listed in DIR/model.safetensors.index.json.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let bytes = crate::error::read_json_bytes(&index)?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::config(&index, format!("weight_map.{tensor}"), "expected a file name"))?;
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
            names.into_iter().map(|n| inside(dir, &root, &index, &n)).collect::<Result<_>>()?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json in this directory"));
        };
        let mut tensors = HashMap::new();
        for path in files {
            if path.is_dir() {
                return Err(Error::file(&path, "is a directory, not a safetensors file"));
            }
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is mapped read-only; patchbay never writes to checkpoint files.
            // Another process truncating it while mapped is outside what we can guard against.
            let map = Arc::new(Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?));
            let st = SafeTensors::deserialize(&map).map_err(|e| Error::file(&path, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.iter() {
                let dtype = match view.dtype() {
                    StDtype::F32 => DType::F32,
                    StDtype::F16 => DType::F16,
                    StDtype::BF16 => DType::BF16,
                    other => return Err(Error::file(&path, format!("tensor `{name}` has dtype {other:?}; patchbay reads bf16, f16 and f32"))),
                };
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                let w = Weight { map: map.clone(), start, n_bytes: view.data().len(), dtype, shape: view.shape().to_vec() };
                tensors.insert(name.to_string(), (w, path.clone()));
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), tensors })
    }

    /// A checkpoint of tensors already read (a GGUF file's, under Hugging Face names); `path`
    /// names the file in errors.
    pub(super) fn from_weights(path: &Path, weights: HashMap<String, Weight>) -> Self {
        let tensors = weights.into_iter().map(|(name, w)| (name, (w, path.to_path_buf()))).collect();
        Checkpoint { dir: path.to_path_buf(), tensors }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let (w, path) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::file(&self.dir, format!("tensor `{name}` (shape {shape:?}) is missing from the checkpoint")))?;
        if w.shape != shape {
            return Err(Error::file(path, format!("tensor `{name}` has shape {:?}, the config implies {shape:?}", w.shape)));
        }
        Ok(w.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Refuses a tensor of a block the config does not declare (`model.layers.{l}.` with l at
    /// or past `n_layers`): the checkpoint and the config disagree, and the extra blocks would
    /// be left out without a word.
    pub fn check_layers(&self, n_layers: usize) -> Result<()> {
        let mut extra: Vec<(usize, &String, &PathBuf)> = self
            .tensors
            .iter()
            .filter_map(|(name, (_, path))| {
                let layer = name.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()?;
                (layer >= n_layers).then_some((layer, name, path))
            })
            .collect();
        extra.sort();
        match extra.first() {
            Some((layer, name, path)) => Err(Error::file(path, format!(
                "tensor `{name}` belongs to block {layer}, but config.json declares {n_layers} layers (num_hidden_layers): the checkpoint and the config disagree ({} tensors of undeclared blocks)",
                extra.len()
            ))),
            None => Ok(()),
        }
    }
}

/// One linear layer `y = x W^T (+ b)`; `w` is `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Weight,
    /// (out)
    pub b: Option<Vec<f32>>,
}

/// The weights of one decoder block, in the shape the one forward reads them.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// (d_model) pre-attention norm; None where the family has none (OLMo 2).
    pub attn_norm: Option<Vec<f32>>,
    pub q: Linear, // [n_heads*d_head, d_model]
    pub k: Linear, // [n_kv_heads*d_head, d_model]
    pub v: Linear, // [n_kv_heads*d_head, d_model]
    /// (n_heads*d_head), (n_kv_heads*d_head): OLMo 2's norms over the whole q / k projections.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: Linear, // [d_model, n_heads*d_head]
    /// (d_model) norm of the attention output before the residual add (Gemma 2, OLMo 2).
    pub attn_post_norm: Option<Vec<f32>>,
    /// (d_model) pre-MLP norm; None for OLMo 2.
    pub mlp_norm: Option<Vec<f32>>,
    pub gate: Linear, // [d_mlp, d_model]
    pub up: Linear,   // [d_mlp, d_model]
    pub down: Linear, // [d_model, d_mlp]
    /// (d_model) norm of the MLP output before the residual add (Gemma 2, OLMo 2).
    pub mlp_post_norm: Option<Vec<f32>>,
}

/// Checkpoint names (under `model.layers.{l}.`) of the four per-block norms, by role:
/// [attention pre-norm, attention post-norm, MLP pre-norm, MLP post-norm]; None where the
/// family has none. The names differ by family, the roles do not.
pub fn norm_names(cfg: &ModelConfig) -> Result<[Option<&'static str>; 4]> {
    Ok(match (cfg.pre_norms, cfg.post_norms) {
        // Llama, Mistral, Qwen2, Phi-3: post_attention_layernorm is the MLP's pre-norm.
        (true, false) => [Some("input_layernorm"), None, Some("post_attention_layernorm"), None],
        // Gemma 2: sandwich norms.
        (true, true) => [Some("input_layernorm"), Some("post_attention_layernorm"), Some("pre_feedforward_layernorm"), Some("post_feedforward_layernorm")],
        // OLMo 2: norms after each sublayer only.
        (false, true) => [None, Some("post_attention_layernorm"), None, Some("post_feedforward_layernorm")],
        (false, false) => return Err(Error::Unsupported("a block without any norm".into())),
    })
}

/// All weights of a model, checked against its config.
#[derive(Clone)]
pub struct ModelWeights {
    pub embed: Weight, // [vocab, d_model]
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>, // (d_model)
    /// [vocab, d_model]; the embedding when tied.
    pub lm_head: Weight,
    /// Total parameter count, tied tensors counted once.
    pub n_params: usize,
    /// dtype of the embedding (the checkpoint's dtype for reporting).
    pub dtype: DType,
}

impl ModelWeights {
    pub fn load(cfg: &ModelConfig, ck: &Checkpoint) -> Result<Self> {
        let d = cfg.d_model;
        let (qw, kvw) = (cfg.q_width(), cfg.kv_width());
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> { Ok(ck.get(name, &[n])?.to_f32()) };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            Ok(Linear { w: ck.get(&format!("{name}.weight"), &[out, inp])?, b: if bias { Some(vec(&format!("{name}.bias"), out)?) } else { None } })
        };
        ck.check_layers(cfg.n_layers)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            let fused_qkv = format!("{p}.self_attn.qkv_proj.weight");
            let (q, k, v) = if ck.contains(&fused_qkv) {
                let w = ck.get(&fused_qkv, &[qw + 2 * kvw, d])?;
                let bias = cfg.qkv_bias.then(|| vec(&format!("{p}.self_attn.qkv_proj.bias"), qw + 2 * kvw)).transpose()?;
                let part = |r0: usize, r1: usize| Linear { w: w.rows(r0, r1), b: bias.as_ref().map(|b| b[r0..r1].to_vec()) };
                (part(0, qw), part(qw, qw + kvw), part(qw + kvw, qw + 2 * kvw))
            } else {
                (
                    linear(&format!("{p}.self_attn.q_proj"), qw, d, cfg.qkv_bias)?,
                    linear(&format!("{p}.self_attn.k_proj"), kvw, d, cfg.qkv_bias)?,
                    linear(&format!("{p}.self_attn.v_proj"), kvw, d, cfg.qkv_bias)?,
                )
            };
            let fused_gate_up = format!("{p}.mlp.gate_up_proj.weight");
            let (gate, up) = if ck.contains(&fused_gate_up) {
                let w = ck.get(&fused_gate_up, &[2 * cfg.d_mlp, d])?;
                let bias = cfg.mlp_bias.then(|| vec(&format!("{p}.mlp.gate_up_proj.bias"), 2 * cfg.d_mlp)).transpose()?;
                let part = |r0: usize, r1: usize| Linear { w: w.rows(r0, r1), b: bias.as_ref().map(|b| b[r0..r1].to_vec()) };
                (part(0, cfg.d_mlp), part(cfg.d_mlp, 2 * cfg.d_mlp))
            } else {
                (linear(&format!("{p}.mlp.gate_proj"), cfg.d_mlp, d, cfg.mlp_bias)?, linear(&format!("{p}.mlp.up_proj"), cfg.d_mlp, d, cfg.mlp_bias)?)
            };
            let [attn_norm, attn_post_norm, mlp_norm, mlp_post_norm] = norm_names(cfg)?;
            let norm = |n: Option<&str>| n.map(|n| vec(&format!("{p}.{n}.weight"), d)).transpose();
            layers.push(LayerWeights {
                attn_norm: norm(attn_norm)?,
                q,
                k,
                v,
                q_norm: cfg.qk_norm.then(|| vec(&format!("{p}.self_attn.q_norm.weight"), qw)).transpose()?,
                k_norm: cfg.qk_norm.then(|| vec(&format!("{p}.self_attn.k_norm.weight"), kvw)).transpose()?,
                o: linear(&format!("{p}.self_attn.o_proj"), d, qw, cfg.o_bias)?,
                attn_post_norm: norm(attn_post_norm)?,
                mlp_norm: norm(mlp_norm)?,
                gate,
                up,
                down: linear(&format!("{p}.mlp.down_proj"), d, cfg.d_mlp, cfg.mlp_bias)?,
                mlp_post_norm: norm(mlp_post_norm)?,
            });
        }
        let embed = ck.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_embeddings { embed.clone() } else { ck.get("lm_head.weight", &[cfg.vocab_size, d])? };
        let final_norm = vec("model.norm.weight", d)?;
        // Count what the model uses, tied tensors once.
        let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
        let mut count = |w: &Weight| {
            seen.insert((Arc::as_ptr(&w.map) as usize, w.start), w.numel());
        };
        count(&embed);
        count(&lm_head);
        let mut small = d; // final norm
        for lw in &layers {
            for lin in [&lw.q, &lw.k, &lw.v, &lw.o, &lw.gate, &lw.up, &lw.down] {
                count(&lin.w);
                small += lin.b.as_ref().map_or(0, Vec::len);
            }
            for n in [&lw.attn_norm, &lw.q_norm, &lw.k_norm, &lw.attn_post_norm, &lw.mlp_norm, &lw.mlp_post_norm].into_iter().flatten() {
                small += n.len();
            }
        }
        let n_params = seen.values().sum::<usize>() + small;
        Ok(ModelWeights { dtype: embed.dtype, embed, layers, final_norm, lm_head, n_params })
    }
}
