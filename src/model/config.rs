//! config.json -> [`ModelConfig`]: one struct for every family, the family quirks as data.
//!
//! Both layouts found on the Hub are read: the classic one (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and the transformers-5 one (`rope_parameters`, `dtype`, `layer_types`).
//! A field that would change the math and that patchbay does not implement is an error naming
//! the field, never silently ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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
}

impl RopeScaling {
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
        }
    }
}

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
    /// Per layer: `Some(w)` = query i sees keys j with i - w < j <= i; `None` = full causal.
    pub layer_window: Vec<Option<usize>>,
    pub rope_theta: f32,
    /// Leading dimensions of each head that are rotated (d_head * partial_rotary_factor).
    pub rotary_dim: usize,
    pub rope_scaling: RopeScaling,
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
            let obj = value.as_object().ok_or_else(|| Error::file(&gen_path, "must hold a JSON object"))?;
            let f = Fields { obj, path: gen_path.clone() };
            if let Some(bos) = f.opt_u32("bos_token_id")? {
                cfg.bos_token_id = Some(bos);
            }
            if f.get("eos_token_id").is_some() {
                cfg.eos_token_ids = f.token_ids("eos_token_id")?;
            }
            cfg.generation = Some(GenerationDefaults {
                do_sample: f.opt_bool("do_sample")?.unwrap_or(false),
                temperature: f.opt_f32("temperature")?,
                top_p: f.opt_f32("top_p")?,
                max_new_tokens: f.opt_usize("max_new_tokens")?,
            });
        }
        Ok(cfg)
    }

    /// Parses a config.json value; `path` only names the file in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "config.json must hold a JSON object"))?;
        let f = Fields { obj, path: path.to_path_buf() };

        let model_type = f.string("model_type")?;
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

        let d_model = f.usize("hidden_size")?;
        let n_layers = f.usize("num_hidden_layers")?;
        let n_heads = f.usize("num_attention_heads")?;
        let n_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{n_kv_heads} must be positive and divide num_attention_heads = {n_heads}"),
            ));
        }
        let d_head = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if d_model % n_heads != 0 {
                    return Err(Error::config(path, "head_dim", "absent and hidden_size is not a multiple of num_attention_heads"));
                }
                d_model / n_heads
            }
        };
        let d_mlp = f.usize("intermediate_size")?;
        let vocab_size = f.usize("vocab_size")?;
        for (name, v) in [("hidden_size", d_model), ("num_hidden_layers", n_layers), ("head_dim", d_head), ("intermediate_size", d_mlp), ("vocab_size", vocab_size)] {
            if v == 0 {
                return Err(Error::config(path, name, "must be positive"));
            }
        }
        let norm_eps = f.opt_f32("rms_norm_eps")?.unwrap_or(1e-6);

        let act_name = match f.opt_string("hidden_activation")? {
            Some(a) => a,
            None => f.opt_string("hidden_act")?.unwrap_or_else(|| "silu".into()),
        };
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                let field = if obj.contains_key("hidden_activation") { "hidden_activation" } else { "hidden_act" };
                return Err(Error::config(path, field, format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)")));
            }
        };

        let is_gemma = family == Family::Gemma2;
        let is_olmo = family == Family::Olmo2;
        let qkv_bias = family == Family::Qwen2 || f.opt_bool("attention_bias")?.unwrap_or(false);
        let o_bias = family != Family::Qwen2 && f.opt_bool("attention_bias")?.unwrap_or(false);
        let mlp_bias = f.opt_bool("mlp_bias")?.unwrap_or(false);
        if is_olmo && !matches!(obj.get("clip_qkv"), None | Some(Value::Null)) {
            return Err(Error::config(path, "clip_qkv", "is not supported (must be null)"));
        }

        let query_pre_attn_scalar = if is_gemma { f.opt_f32("query_pre_attn_scalar")? } else { None };
        let attn_scale = 1.0 / query_pre_attn_scalar.unwrap_or(d_head as f32).sqrt();
        let (attn_softcap, final_softcap) = if is_gemma {
            (f.opt_f32("attn_logit_softcapping")?, f.opt_f32("final_logit_softcapping")?)
        } else {
            (None, None)
        };

        let layer_window = layer_windows(&f, family, n_layers)?;
        let max_position = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let (rope_theta, rotary_dim, rope_scaling) = rope(&f, d_head, max_position)?;

        let declared_dtype = match f.opt_string("torch_dtype")?.or(f.opt_string("dtype")?) {
            None => None,
            Some(s) => Some(match s.as_str() {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                other => return Err(Error::config(path, "torch_dtype", format!("`{other}` is not one of float32, float16, bfloat16"))),
            }),
        };
        let tie_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(is_gemma);
        let bos_token_id = f.opt_u32("bos_token_id")?;
        let eos_token_ids = f.token_ids("eos_token_id")?;

        Ok(ModelConfig {
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
            layer_window,
            rope_theta,
            rotary_dim,
            rope_scaling,
            tie_embeddings,
            max_position,
            declared_dtype,
            bos_token_id,
            eos_token_ids,
            generation: None,
        })
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
        let dim = cfg.rotary_dim;
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / (cfg.rope_theta as f64).powf((2 * i) as f64 / dim as f64)).collect();
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
        }
    }
}

/// Per-layer attention window from `layer_types` or the family's convention.
fn layer_windows(f: &Fields, family: Family, n_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.opt_usize("sliding_window")?;
    let uses_window = match family {
        // Qwen2 ignores sliding_window unless use_sliding_window is set.
        Family::Qwen2 => f.opt_bool("use_sliding_window")?.unwrap_or(false),
        Family::Llama | Family::Olmo2 => false,
        Family::Mistral | Family::Gemma2 | Family::Phi3 => true,
    };
    let window = if uses_window { window } else { None };
    let max_window_layers = f.opt_usize("max_window_layers")?.unwrap_or(0);
    let types: Vec<String> = match f.obj.get("layer_types") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| Error::config(&f.path, "layer_types", "must be a list of strings")))
            .collect::<Result<_>>()?,
        None | Some(Value::Null) => (0..n_layers)
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
        Some(_) => return Err(Error::config(&f.path, "layer_types", "must be a list of strings")),
    };
    if types.len() != n_layers {
        return Err(Error::config(&f.path, "layer_types", format!("has {} entries, num_hidden_layers is {n_layers}", types.len())));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(window),
            other => Err(Error::config(&f.path, "layer_types", format!("`{other}` is not full_attention or sliding_attention"))),
        })
        .collect()
}

/// (theta, rotary_dim, scaling) from `rope_parameters` (transformers 5) or `rope_theta` +
/// `rope_scaling` (classic).
fn rope(f: &Fields, d_head: usize, max_position: usize) -> Result<(f32, usize, RopeScaling)> {
    let (params, field): (Option<&Map<String, Value>>, &str) = match f.obj.get("rope_parameters") {
        Some(Value::Object(m)) => (Some(m), "rope_parameters"),
        Some(Value::Null) | None => match f.obj.get("rope_scaling") {
            Some(Value::Object(m)) => (Some(m), "rope_scaling"),
            Some(Value::Null) | None => (None, "rope_scaling"),
            Some(_) => return Err(Error::config(&f.path, "rope_scaling", "must be an object or null")),
        },
        Some(_) => return Err(Error::config(&f.path, "rope_parameters", "must be an object")),
    };
    let sub = params.map(|m| Fields { obj: m, path: f.path.clone() });
    let prefixed = |k: &str| format!("{field}.{k}");
    let theta = match sub.as_ref().map(|s| s.opt_f32("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => f.opt_f32("rope_theta")?.unwrap_or(10000.0),
    };
    let partial = match sub.as_ref().map(|s| s.opt_f32("partial_rotary_factor")).transpose()?.flatten() {
        Some(p) => p,
        None => f.opt_f32("partial_rotary_factor")?.unwrap_or(1.0),
    };
    let rotary_dim = (d_head as f32 * partial) as usize;
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > d_head {
        return Err(Error::config(&f.path, "partial_rotary_factor", format!("gives rotary dim {rotary_dim}; must be even and in 2..={d_head}")));
    }
    let Some(sub) = sub else { return Ok((theta, rotary_dim, RopeScaling::Default)) };
    let rope_type = match sub.opt_string("rope_type")? {
        Some(t) => t,
        None => sub.opt_string("type")?.unwrap_or_else(|| "default".into()),
    };
    // Phi-3 keeps original_max_position_embeddings at the top level.
    let original_max = |s: &Fields| -> Result<usize> {
        match s.opt_usize("original_max_position_embeddings")? {
            Some(v) => Ok(v),
            None => f.opt_usize("original_max_position_embeddings")?.ok_or_else(|| {
                Error::config(&f.path, prefixed("original_max_position_embeddings"), "required by this rope type")
            }),
        }
    };
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: sub.f32("factor").map_err(|_| Error::config(&f.path, prefixed("factor"), "required for linear rope"))? },
        "llama3" => {
            let get = |k: &str| sub.f32(k).map_err(|_| Error::config(&f.path, prefixed(k), "required for llama3 rope"));
            RopeScaling::Llama3 {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position: original_max(&sub)?,
            }
        }
        "longrope" | "su" => {
            let list = |k: &str| -> Result<Vec<f32>> {
                let v = match sub.obj.get(k) {
                    Some(Value::Array(a)) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<Vec<_>>>(),
                    _ => None,
                };
                let v = v.ok_or_else(|| Error::config(&f.path, prefixed(k), "required for longrope: a list of numbers"))?;
                if v.len() != rotary_dim / 2 {
                    return Err(Error::config(&f.path, prefixed(k), format!("has {} entries, expected rotary_dim/2 = {}", v.len(), rotary_dim / 2)));
                }
                Ok(v)
            };
            let original_max_position = original_max(&sub)?;
            let factor = match sub.opt_f32("factor")? {
                Some(x) => x,
                None => max_position as f32 / original_max_position as f32,
            };
            let attention_factor = match sub.opt_f32("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + (factor as f64).ln() / (original_max_position as f64).ln()).sqrt() as f32,
            };
            RopeScaling::LongRope { short_factor: list("short_factor")?, long_factor: list("long_factor")?, original_max_position, attention_factor }
        }
        other => {
            return Err(Error::config(&f.path, prefixed("rope_type"), format!("`{other}` is not supported (default, linear, llama3, longrope)")));
        }
    };
    Ok((theta, rotary_dim, scaling))
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::error::read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// Typed access to a JSON object's fields with errors naming the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: PathBuf,
}

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        match self.obj.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    fn missing(&self, k: &str) -> Error {
        Error::config(&self.path, k, "missing")
    }
    fn string(&self, k: &str) -> Result<String> {
        self.opt_string(k)?.ok_or_else(|| self.missing(k))
    }
    fn opt_string(&self, k: &str) -> Result<Option<String>> {
        self.get(k)
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| Error::config(&self.path, k, format!("expected a string, found {v}"))))
            .transpose()
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| self.missing(k))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| Error::config(&self.path, k, format!("expected a non-negative integer, found {v}"))))
            .transpose()
    }
    fn opt_u32(&self, k: &str) -> Result<Option<u32>> {
        self.get(k).map(|v| self.as_u32(v, k)).transpose()
    }
    /// A token id or a list of them (absent = none).
    fn token_ids(&self, k: &str) -> Result<Vec<u32>> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|v| self.as_u32(v, k)).collect(),
            Some(v) => Ok(vec![self.as_u32(v, k)?]),
        }
    }
    fn as_u32(&self, v: &Value, k: &str) -> Result<u32> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Error::config(&self.path, k, format!("expected a token id, found {v}")))
    }
    fn f32(&self, k: &str) -> Result<f32> {
        self.opt_f32(k)?.ok_or_else(|| self.missing(k))
    }
    fn opt_f32(&self, k: &str) -> Result<Option<f32>> {
        self.get(k)
            .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| Error::config(&self.path, k, format!("expected a number, found {v}"))))
            .transpose()
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        self.get(k)
            .map(|v| v.as_bool().ok_or_else(|| Error::config(&self.path, k, format!("expected true or false, found {v}"))))
            .transpose()
    }
}
