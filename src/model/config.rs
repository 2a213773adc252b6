//! config.json -> [`ModelConfig`]: one struct for every family, the family quirks as data.
//!
//! Both layouts found on the Hub are read: the classic one (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and the transformers-5 one (`rope_parameters`, `dtype`, `layer_types`).
//! A field that would change the math and that patchbay does not implement is an error naming
//! the field, never silently ignored.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// The model families patchbay runs. Only used for reporting and for choosing defaults while
/// reading config.json: the forward reads the quirk fields below, never the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Gemma2,
    Phi3,
    Olmo2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
            Family::Olmo2 => "olmo2",
        }
    }
}

/// The numerics of the CPU engine. `f32`: the reference (f32 activations, weights converted
/// to f32, f32 KV cache), what parity tests and the HF goldens check. `bf16`: the device's
/// numerics (DESIGN.md section 5) on the CPU: every GEMM operand rounded to bf16 (weights and
/// activations) with f32 accumulation, the KV cache bf16, the residual stream and every site
/// f32 (the GEMMs run as f32 FMA on the rounded operands: `backend::cpu`). The device engines
/// (emu, cuda) always compute in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::input(format!("precision `{s}`: expected f32 or bf16"))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Storage dtype of a checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

/// How a norm applies its weight: `x_hat * w` (Llama) or `x_hat * (1 + w)` (Gemma).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormWeight {
    Plain,
    OnePlus,
}

/// MLP gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU MLP).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, GeGLU MLP).
    GeluTanh,
}

/// Rotary embedding frequency scheme.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// inv_freq[i] = theta^(-2i/rotary_dim)
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1: low frequencies divided by `factor`, a smooth ramp between the wavelengths
    /// original_max/low_freq_factor and original_max/high_freq_factor.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: usize },
    /// Phi-3 longrope: inv_freq divided by per-frequency factors, `short` while the sequence is at
    /// most `original_max_position` long, `long` beyond; cos/sin multiplied by `attention_factor`.
    LongRope { short_factor: Vec<f32>, long_factor: Vec<f32>, original_max_position: usize, attention_factor: f32 },
    /// inv_freq divided by per-frequency factors at every length (a GGUF's `rope_freqs.weight`:
    /// how llama.cpp stores Llama 3.1's rope scaling).
    Factors { factors: Vec<f32> },
}

impl RopeScaling {
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Factors { .. } => "factors",
        }
    }
}

/// The largest sizes a config may declare (larger ones are refused before anything is
/// allocated): layers, hidden size, heads, head dim, MLP width, vocabulary, context. Llama 3.1
/// 405B has 126 layers, hidden size 16,384, 128 heads, MLP width 53,248; Gemma 2 a vocabulary of
/// 256,000.
pub const SIZE_LIMITS: [(&str, usize); 7] = [
    ("num_hidden_layers", 1024),
    ("hidden_size", 1 << 16),
    ("num_attention_heads", 1024),
    ("head_dim", 4096),
    ("intermediate_size", 1 << 20),
    ("vocab_size", 1 << 23),
    ("max_position_embeddings", 1 << 24),
];

/// The most parameters a config may declare (about 1.1 trillion).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// Everything the forward needs to know about a checkpoint. Family quirks are fields.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub family: Family,
    /// `model_type` as written in config.json.
    pub model_type: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub norm_eps: f32,
    pub norm_weight: NormWeight,
    pub activation: Activation,
    /// Norm before attention / MLP (false for OLMo 2, which norms the sublayer outputs instead).
    pub pre_norms: bool,
    /// Norm applied to the attention / MLP output before the residual add (Gemma 2, OLMo 2).
    pub post_norms: bool,
    /// RMSNorm over the whole q and k projections before RoPE (OLMo 2).
    pub qk_norm: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Multiplier applied to the embedding (Gemma: sqrt(d_model)).
    pub embed_scale: Option<f32>,
    /// Softmax scale of attention logits: 1/sqrt(query_pre_attn_scalar or d_head).
    pub attn_scale: f32,
    /// logits <- cap * tanh(logits / cap) on attention logits (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// The same on the final logits (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Per layer, the sliding attention window: `Some(w)` = query i sees keys j with
    /// i - w < j <= i; `None` = full causal.
    pub sliding_window: Vec<Option<usize>>,
    pub rope_theta: f32,
    /// Leading dimensions of each head that are rotated (d_head * partial_rotary_factor).
    pub rotary_dim: usize,
    pub rope_scaling: RopeScaling,
    /// Generation recomputes a sequence whose cache holds exactly this many tokens instead of
    /// extending its cache: Hugging Face's Phi-3 generation drops the cache once, when the
    /// sequence passes `original_max_position_embeddings` (where longrope switches from the
    /// short to the long factors; the cached keys were rotated with the short ones).
    pub recompute_cache_at: Option<usize>,
    pub tie_embeddings: bool,
    pub max_position: usize,
    /// dtype declared in config.json (`torch_dtype` / `dtype`); the tensors' own dtypes rule.
    pub declared_dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// generation_config.json, when the directory has one.
    pub generation: Option<GenerationDefaults>,
}

/// The checkpoint's generation defaults (generation_config.json). Its bos/eos ids, when given,
/// replace config.json's in `ModelConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl ModelConfig {
    /// Reads DIR/config.json and DIR/generation_config.json when present.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let mut cfg = Self::from_json(&read_json(&path)?, &path)?;
        let gen_path = model_dir.join("generation_config.json");
        if gen_path.exists() {
            let value = read_json(&gen_path)?;
            if !value.is_object() {
                return Err(Error::file(&gen_path, "must hold a JSON object"));
            }
            let raw: RawGeneration = deserialize(&value, &gen_path)?;
            if let Some(TokenId(bos)) = raw.bos_token_id {
                cfg.bos_token_id = Some(bos);
            }
            if let Some(TokenIds(eos)) = raw.eos_token_id {
                cfg.eos_token_ids = eos;
            }
            cfg.generation = Some(GenerationDefaults {
                do_sample: raw.do_sample.unwrap_or(false),
                temperature: raw.temperature.map(|Number(x)| x),
                top_p: raw.top_p.map(|Number(x)| x),
                max_new_tokens: raw.max_new_tokens.map(|Count(n)| n),
            });
        }
        Ok(cfg)
    }

    /// Parses a config.json value; `path` only names the file in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        if !value.is_object() {
            return Err(Error::file(path, "config.json must hold a JSON object"));
        }
        let raw: RawConfig = deserialize(value, path)?;
        let count = |c: Option<Count>| c.map(|Count(n)| n);
        let number = |x: Option<Number>| x.map(|Number(x)| x);

        let model_type = raw.model_type.clone();
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" | "ministral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "gemma2" => Family::Gemma2,
            "phi3" => Family::Phi3,
            "olmo2" => Family::Olmo2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: model_type `{other}` (supported: llama, mistral, ministral, qwen2, gemma2, phi3, olmo2)",
                    path.display()
                )));
            }
        };

        let Count(d_model) = raw.hidden_size;
        let Count(n_layers) = raw.num_hidden_layers;
        let Count(n_heads) = raw.num_attention_heads;
        let n_kv_heads = count(raw.num_key_value_heads).unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{n_kv_heads} must be positive and divide num_attention_heads = {n_heads}"),
            ));
        }
        let d_head = match count(raw.head_dim) {
            Some(d) => d,
            None => {
                if d_model % n_heads != 0 {
                    return Err(Error::config(path, "head_dim", "absent and hidden_size is not a multiple of num_attention_heads"));
                }
                d_model / n_heads
            }
        };
        let Count(d_mlp) = raw.intermediate_size;
        let Count(vocab_size) = raw.vocab_size;
        let max_position = count(raw.max_position_embeddings).unwrap_or(4096);
        // Sizes first: later steps allocate per layer. In the order of SIZE_LIMITS.
        let sizes = [n_layers, d_model, n_heads, d_head, d_mlp, vocab_size, max_position];
        for (v, (name, limit)) in sizes.into_iter().zip(SIZE_LIMITS) {
            if v > limit {
                return Err(Error::config(path, name, format!("is {v}; patchbay takes at most {limit} (the largest released models are far below)")));
            }
        }
        for (name, v) in [("hidden_size", d_model), ("num_hidden_layers", n_layers), ("head_dim", d_head), ("intermediate_size", d_mlp), ("vocab_size", vocab_size), ("max_position_embeddings", max_position)] {
            if v == 0 {
                return Err(Error::config(path, name, "must be positive"));
            }
        }
        let norm_eps = number(raw.rms_norm_eps).unwrap_or(1e-6);

        let (act_field, act_name) = match (raw.hidden_activation.as_deref(), raw.hidden_act.as_deref()) {
            (Some(a), _) => ("hidden_activation", a),
            (None, a) => ("hidden_act", a.unwrap_or("silu")),
        };
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(Error::config(path, act_field, format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)")));
            }
        };

        let is_gemma = family == Family::Gemma2;
        let is_olmo = family == Family::Olmo2;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let qkv_bias = family == Family::Qwen2 || attention_bias;
        let o_bias = family != Family::Qwen2 && attention_bias;
        let mlp_bias = raw.mlp_bias.unwrap_or(false);
        if is_olmo && raw.clip_qkv.is_some() {
            return Err(Error::config(path, "clip_qkv", "is not supported (must be null)"));
        }

        let query_pre_attn_scalar = if is_gemma { number(raw.query_pre_attn_scalar) } else { None };
        let attn_scale = 1.0 / query_pre_attn_scalar.unwrap_or(d_head as f32).sqrt();
        let (attn_softcap, final_softcap) = if is_gemma {
            (number(raw.attn_logit_softcapping), number(raw.final_logit_softcapping))
        } else {
            (None, None)
        };

        let sliding_window = layer_sliding_windows(&raw, path, family, n_layers)?;
        let (rope_theta, rotary_dim, rope_scaling) = rope(&raw, path, d_head, max_position)?;

        let declared_dtype = match raw.torch_dtype.as_deref().or(raw.dtype.as_deref()) {
            None => None,
            Some(s) => Some(match s {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                other => return Err(Error::config(path, "torch_dtype", format!("`{other}` is not one of float32, float16, bfloat16"))),
            }),
        };
        let tie_embeddings = raw.tie_word_embeddings.unwrap_or(is_gemma);
        let bos_token_id = raw.bos_token_id.map(|TokenId(id)| id);
        let eos_token_ids = raw.eos_token_id.map(|TokenIds(ids)| ids).unwrap_or_default();

        let cfg = ModelConfig {
            family,
            model_type,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            d_head,
            d_mlp,
            vocab_size,
            norm_eps,
            norm_weight: if is_gemma { NormWeight::OnePlus } else { NormWeight::Plain },
            activation,
            pre_norms: !is_olmo,
            post_norms: is_gemma || is_olmo,
            qk_norm: is_olmo,
            qkv_bias,
            o_bias,
            mlp_bias,
            embed_scale: is_gemma.then(|| (d_model as f32).sqrt()),
            attn_scale,
            attn_softcap,
            final_softcap,
            sliding_window,
            rope_theta,
            rotary_dim,
            rope_scaling,
            recompute_cache_at: if family == Family::Phi3 { raw.original_max_position_embeddings.map(|Count(n)| n) } else { None },
            tie_embeddings,
            max_position,
            declared_dtype,
            bos_token_id,
            eos_token_ids,
            generation: None,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks, before anything is allocated, every value the math uses: the numbers it divides
    /// by, takes roots or logs of, or raises must be finite and positive (a zero or negative eps,
    /// rope theta, soft-cap, scale or rope factor gives NaN or garbage silently); windows are at
    /// least 1; the parameter count is within [`MAX_PARAMETERS`] (each size was checked against
    /// [`SIZE_LIMITS`] as it was read). Errors name the field.
    fn validate(&self, path: &Path) -> Result<()> {
        let mut positive: Vec<(&str, f32)> = vec![("rms_norm_eps", self.norm_eps), ("rope_theta", self.rope_theta), ("query_pre_attn_scalar (the attention scale)", self.attn_scale)];
        positive.extend(self.attn_softcap.map(|c| ("attn_logit_softcapping", c)));
        positive.extend(self.final_softcap.map(|c| ("final_logit_softcapping", c)));
        match &self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive.push(("rope factor", *factor)),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } => {
                positive.extend([("rope factor", *factor), ("rope low_freq_factor", *low_freq_factor), ("rope high_freq_factor", *high_freq_factor)]);
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::config(path, "rope high_freq_factor", format!("is {high_freq_factor}; must exceed low_freq_factor = {low_freq_factor}")));
                }
            }
            RopeScaling::LongRope { short_factor, long_factor, attention_factor, .. } => {
                positive.extend(short_factor.iter().map(|&f| ("rope short_factor", f)));
                positive.extend(long_factor.iter().map(|&f| ("rope long_factor", f)));
                positive.push(("rope attention_factor", *attention_factor));
            }
            RopeScaling::Factors { factors } => positive.extend(factors.iter().map(|&f| ("rope_freqs (per-frequency factors)", f))),
        }
        if let Some((name, v)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::config(path, *name, format!("is {v}; must be a positive finite number")));
        }
        if self.sliding_window.contains(&Some(0)) {
            return Err(Error::config(path, "sliding_window", "is 0; a window holds at least the token itself (1), or is absent"));
        }
        let (matrices, vectors) = self.n_params();
        if (matrices + vectors) as u64 > MAX_PARAMETERS {
            return Err(Error::config(path, "hidden_size", format!("the sizes make more than {MAX_PARAMETERS} parameters (num_hidden_layers {}, hidden_size {}, intermediate_size {}, vocab_size {})", self.n_layers, self.d_model, self.d_mlp, self.vocab_size)));
        }
        Ok(())
    }

    /// Parameter count (tied embeddings counted once): (matrices, vectors: norms and biases).
    /// The sizes are within [`SIZE_LIMITS`], so no product overflows.
    pub fn n_params(&self) -> (usize, usize) {
        let (d, qw, kvw, dm) = (self.d_model, self.q_width(), self.kv_width(), self.d_mlp);
        let matrices = self.n_layers * (d * (qw + 2 * kvw) + qw * d + 3 * d * dm) + self.vocab_size * d * if self.tie_embeddings { 1 } else { 2 };
        let norms = self.n_layers * d * if self.pre_norms && self.post_norms { 4 } else { 2 } + d + self.qk_norm as usize * self.n_layers * (qw + kvw);
        let biases = self.n_layers * (self.qkv_bias as usize * (qw + 2 * kvw) + self.o_bias as usize * d + self.mlp_bias as usize * (2 * dm + d));
        (matrices, norms + biases)
    }

    /// Number of query heads sharing one kv head.
    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    pub fn q_width(&self) -> usize {
        self.n_heads * self.d_head
    }
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.d_head
    }

    /// Inverse frequencies (rotary_dim/2) and cos/sin factor for a sequence of `len` tokens.
    pub fn rope_freqs(&self, len: usize) -> (Vec<f32>, f32) {
        let cfg = self;
        let rotary_dim = cfg.rotary_dim;
        let base: Vec<f64> = (0..rotary_dim / 2).map(|i| 1.0 / (cfg.rope_theta as f64).powf((2 * i) as f64 / rotary_dim as f64)).collect();
        match &cfg.rope_scaling {
            RopeScaling::Default => (base.iter().map(|&f| f as f32).collect(), 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|&f| (f / *factor as f64) as f32).collect(), 1.0),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let (factor, lo, hi, old) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64, *original_max_position as f64);
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                let f = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .map(|f| f as f32)
                    .collect();
                (f, 1.0)
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position, attention_factor } => {
                let ext = if len > *original_max_position { long_factor } else { short_factor };
                (base.iter().zip(ext).map(|(&f, &e)| (f / e as f64) as f32).collect(), *attention_factor)
            }
            RopeScaling::Factors { factors } => (base.iter().zip(factors).map(|(&f, &e)| (f / e as f64) as f32).collect(), 1.0),
        }
    }
}

/// Per-layer sliding attention window from `layer_types` or the family's convention.
fn layer_sliding_windows(raw: &RawConfig, path: &Path, family: Family, n_layers: usize) -> Result<Vec<Option<usize>>> {
    let uses_sliding_window = match family {
        // Qwen2 ignores sliding_window unless use_sliding_window is set.
        Family::Qwen2 => raw.use_sliding_window.unwrap_or(false),
        Family::Llama | Family::Olmo2 => false,
        Family::Mistral | Family::Gemma2 | Family::Phi3 => true,
    };
    let sliding_window = raw.sliding_window.filter(|_| uses_sliding_window).map(|Count(w)| w);
    let max_window_layers = raw.max_window_layers.map_or(0, |Count(n)| n);
    let types: Vec<String> = match &raw.layer_types {
        Some(types) => types.clone(),
        None => (0..n_layers)
            .map(|l| {
                let sliding = match family {
                    // Gemma 2: even layers (0, 2, ...) slide, odd layers see everything.
                    Family::Gemma2 => l % 2 == 0,
                    Family::Qwen2 => l >= max_window_layers,
                    _ => true,
                };
                if sliding { "sliding_attention" } else { "full_attention" }.to_string()
            })
            .collect(),
    };
    if types.len() != n_layers {
        return Err(Error::config(path, "layer_types", format!("has {} entries, num_hidden_layers is {n_layers}", types.len())));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(sliding_window),
            other => Err(Error::config(path, "layer_types", format!("`{other}` is not full_attention or sliding_attention"))),
        })
        .collect()
}

/// (theta, rotary_dim, scaling) from `rope_parameters` (transformers 5) or `rope_theta` +
/// `rope_scaling` (classic).
fn rope(raw: &RawConfig, path: &Path, d_head: usize, max_position: usize) -> Result<(f32, usize, RopeScaling)> {
    let (sub, field) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, s) => (s.as_ref(), "rope_scaling"),
    };
    let prefixed = |k: &str| format!("{field}.{k}");
    let number = |x: Option<Number>| x.map(|Number(x)| x);
    let theta = number(sub.and_then(|s| s.rope_theta)).or(number(raw.rope_theta)).unwrap_or(10000.0);
    let partial = number(sub.and_then(|s| s.partial_rotary_factor)).or(number(raw.partial_rotary_factor)).unwrap_or(1.0);
    let rotary_dim = (d_head as f32 * partial) as usize;
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > d_head {
        return Err(Error::config(path, "partial_rotary_factor", format!("gives rotary dim {rotary_dim}; must be even and in 2..={d_head}")));
    }
    let Some(sub) = sub else { return Ok((theta, rotary_dim, RopeScaling::Default)) };
    let rope_type = sub.rope_type.clone().or(sub.r#type.clone()).unwrap_or_else(|| "default".into());
    // Phi-3 keeps original_max_position_embeddings at the top level.
    let original_max = || -> Result<usize> {
        sub.original_max_position_embeddings
            .or(raw.original_max_position_embeddings)
            .map(|Count(n)| n)
            .ok_or_else(|| Error::config(path, prefixed("original_max_position_embeddings"), "required by this rope type"))
    };
    let required = |x: Option<Number>, k: &str| number(x).ok_or_else(|| Error::config(path, prefixed(k), format!("required for {rope_type} rope")));
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: required(sub.factor, "factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: required(sub.factor, "factor")?,
            low_freq_factor: required(sub.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: required(sub.high_freq_factor, "high_freq_factor")?,
            original_max_position: original_max()?,
        },
        "longrope" | "su" => {
            let list = |v: &Option<Vec<Number>>, k: &str| -> Result<Vec<f32>> {
                let v: Vec<f32> = v
                    .as_ref()
                    .ok_or_else(|| Error::config(path, prefixed(k), "required for longrope: a list of numbers"))?
                    .iter()
                    .map(|&Number(x)| x)
                    .collect();
                if v.len() != rotary_dim / 2 {
                    return Err(Error::config(path, prefixed(k), format!("has {} entries, expected rotary_dim/2 = {}", v.len(), rotary_dim / 2)));
                }
                Ok(v)
            };
            let original_max_position = original_max()?;
            let factor = number(sub.factor).unwrap_or(max_position as f32 / original_max_position as f32);
            let attention_factor = match number(sub.attention_factor) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + (factor as f64).ln() / (original_max_position as f64).ln()).sqrt() as f32,
            };
            RopeScaling::LongRope {
                short_factor: list(&sub.short_factor, "short_factor")?,
                long_factor: list(&sub.long_factor, "long_factor")?,
                original_max_position,
                attention_factor,
            }
        }
        other => {
            return Err(Error::config(path, prefixed("rope_type"), format!("`{other}` is not supported (default, linear, llama3, longrope)")));
        }
    };
    Ok((theta, rotary_dim, scaling))
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::error::read_json_bytes(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// Deserializes `value` into `T`; an error names the field by its path (`rope_scaling.factor`,
/// `eos_token_id[1]`) and says what was expected and found.
fn deserialize<T: serde::de::DeserializeOwned>(value: &Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let msg = e.inner().to_string();
        // serde reports a missing field at its parent, as "missing field `name`".
        match msg.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
            Some(name) if at == "." => Error::config(path, name, "missing"),
            Some(name) => Error::config(path, format!("{at}.{name}"), "missing"),
            None => Error::config(path, at, msg),
        }
    })
}

/// config.json, the fields patchbay reads (null = absent, as transformers treats it). Other
/// fields are ignored; checks that need several fields are in [`ModelConfig::from_json`].
#[derive(Deserialize)]
struct RawConfig {
    model_type: String,
    hidden_size: Count,
    num_hidden_layers: Count,
    num_attention_heads: Count,
    num_key_value_heads: Option<Count>,
    head_dim: Option<Count>,
    intermediate_size: Count,
    vocab_size: Count,
    rms_norm_eps: Option<Number>,
    /// Gemma's name; wins over `hidden_act`.
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    /// OLMo 2: anything but null is unsupported.
    clip_qkv: Option<Value>,
    query_pre_attn_scalar: Option<Number>,
    attn_logit_softcapping: Option<Number>,
    final_logit_softcapping: Option<Number>,
    sliding_window: Option<Count>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<Count>,
    layer_types: Option<Vec<String>>,
    max_position_embeddings: Option<Count>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    rope_theta: Option<Number>,
    partial_rotary_factor: Option<Number>,
    /// Phi-3 keeps it here rather than in rope_scaling.
    original_max_position_embeddings: Option<Count>,
    torch_dtype: Option<String>,
    /// transformers 5's name for `torch_dtype`.
    dtype: Option<String>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenIds>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (classic).
#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    /// The classic name of `rope_type`.
    r#type: Option<String>,
    rope_theta: Option<Number>,
    partial_rotary_factor: Option<Number>,
    factor: Option<Number>,
    low_freq_factor: Option<Number>,
    high_freq_factor: Option<Number>,
    original_max_position_embeddings: Option<Count>,
    short_factor: Option<Vec<Number>>,
    long_factor: Option<Vec<Number>>,
    attention_factor: Option<Number>,
}

/// generation_config.json, the fields patchbay reads.
#[derive(Deserialize)]
struct RawGeneration {
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenIds>,
    do_sample: Option<bool>,
    temperature: Option<Number>,
    top_p: Option<Number>,
    max_new_tokens: Option<Count>,
}

// Field types whose errors say what config.json must hold ("expected a non-negative integer"
// rather than serde's "expected usize").

/// A non-negative integer.
#[derive(Clone, Copy)]
struct Count(usize);

/// A JSON number, read as f32 (through f64, as Python floats are).
#[derive(Clone, Copy)]
struct Number(f32);

/// A token id (fits u32).
#[derive(Clone, Copy)]
struct TokenId(u32);

/// A token id or a list of them.
struct TokenIds(Vec<u32>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Count, E> {
                usize::try_from(v).map(Count).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_u64(V)
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Number, E> {
                Ok(Number(v as f32))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Number, E> {
                Ok(Number(v as f64 as f32))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Number, E> {
                Ok(Number(v as f64 as f32))
            }
        }
        d.deserialize_f64(V)
    }
}

/// The visitor of one token id, shared by [`TokenId`] and [`TokenIds`].
struct TokenIdVisitor;

impl serde::de::Visitor<'_> for TokenIdVisitor {
    type Value = u32;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a token id")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_u64(TokenIdVisitor).map(TokenId)
    }
}

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TokenIds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id or a list of token ids")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<TokenIds, E> {
                TokenIdVisitor.visit_u64(v).map(|id| TokenIds(vec![id]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<TokenIds, A::Error> {
                let mut ids = Vec::new();
                while let Some(TokenId(id)) = seq.next_element()? {
                    ids.push(id);
                }
                Ok(TokenIds(ids))
            }
        }
        d.deserialize_any(V)
    }
}
