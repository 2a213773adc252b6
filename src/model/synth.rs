//! Synthetic checkpoints: the exact config and tensor layout of a real model with seeded
//! random bf16 weights, so costs can be measured and benches run without downloading
//! anything. Tensor names and shapes are those the loader checks (`checkpoint.rs`).

use std::path::Path;

use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{Value, json};

use super::checkpoint::norm_names;
use super::config::{Family, ModelConfig, NormWeight};
use crate::rng::{gaussian, splitmix64};
use crate::{Error, Result};

/// Presets: config.json values of public models (from their model cards' config.json).
pub const PRESETS: [&str; 7] = ["llama-3.2-1b", "llama-3.1-8b", "gemma-2-2b", "qwen2.5-7b", "phi-3.5-mini", "olmo-2-7b", "mistral-7b-v0.3"];

/// The config.json of a preset.
pub fn preset(name: &str) -> Result<Value> {
    let llama3_rope = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    Ok(match name {
        "llama-3.2-1b" => json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": llama3_rope, "max_position_embeddings": 131072,
            "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}),
        "llama-3.1-8b" => json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}),
        "gemma-2-2b" => json!({
            "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "sliding_window": 4096, "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 1, "torch_dtype": "float32"}),
        "qwen2.5-7b" => json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 131072,
            "use_sliding_window": false, "max_window_layers": 28, "tie_word_embeddings": false, "hidden_act": "silu",
            "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}),
        "phi-3.5-mini" => json!({
            "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "short_factor": vec![1.0f32; 48], "long_factor": (0..48).map(|i| 1.0 + i as f32).collect::<Vec<_>>()},
            "sliding_window": 262144, "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 32000, "torch_dtype": "bfloat16"}),
        "olmo-2-7b" => json!({
            "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 100352,
            "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false,
            "hidden_act": "silu", "bos_token_id": null, "eos_token_id": 100257, "torch_dtype": "float32"}),
        "mistral-7b-v0.3" => json!({
            "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": null,
            "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}),
        other => return Err(Error::input(format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")))),
    })
}

/// How a tensor is initialised.
#[derive(Clone, Copy)]
enum Init {
    /// N(0, 1/fan_in): keeps activations O(1).
    Matrix,
    /// The embedding: N(0, 1).
    Embedding,
    /// Norm weights: 1 + N(0, 0.1) (Gemma's (1+w): N(0, 0.1)).
    Norm,
    /// N(0, 0.02)
    Bias,
}

/// Every tensor of a checkpoint for `cfg`: (name, shape, init). Phi-3 is written fused, as on the Hub.
fn tensors(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>, Init)>> {
    let (d, qw, kvw, i) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
    let fused = cfg.family == Family::Phi3;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, d], Init::Embedding)];
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
            t.push((format!("{p}.{name}.weight"), vec![out, inp], Init::Matrix));
            if bias {
                t.push((format!("{p}.{name}.bias"), vec![out], Init::Bias));
            }
        };
        if fused {
            lin("self_attn.qkv_proj", qw + 2 * kvw, d, cfg.qkv_bias);
        } else {
            lin("self_attn.q_proj", qw, d, cfg.qkv_bias);
            lin("self_attn.k_proj", kvw, d, cfg.qkv_bias);
            lin("self_attn.v_proj", kvw, d, cfg.qkv_bias);
        }
        lin("self_attn.o_proj", d, qw, cfg.o_bias);
        if fused {
            lin("mlp.gate_up_proj", 2 * i, d, cfg.mlp_bias);
        } else {
            lin("mlp.gate_proj", i, d, cfg.mlp_bias);
            lin("mlp.up_proj", i, d, cfg.mlp_bias);
        }
        lin("mlp.down_proj", d, i, cfg.mlp_bias);
        if cfg.qk_norm {
            t.push((format!("{p}.self_attn.q_norm.weight"), vec![qw], Init::Norm));
            t.push((format!("{p}.self_attn.k_norm.weight"), vec![kvw], Init::Norm));
        }
        for n in norm_names(cfg)?.into_iter().flatten() {
            t.push((format!("{p}.{n}.weight"), vec![d], Init::Norm));
        }
    }
    t.push(("model.norm.weight".to_string(), vec![d], Init::Norm));
    if !cfg.tie_embeddings {
        t.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d], Init::Matrix));
    }
    Ok(t)
}

/// Writes DIR/config.json (as given) and DIR/model.safetensors (bf16, seeded random weights).
/// Returns the parameter count.
pub fn write_checkpoint(config: &Value, dir: &Path, seed: u64) -> Result<usize> {
    let cfg = ModelConfig::from_json(config, &dir.join("config.json"))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let specs = tensors(&cfg)?;
    let one_plus = cfg.norm_weight == NormWeight::OnePlus;
    // Each tensor's bytes are made when the writer asks for them: one tensor in memory at a time.
    let lazy: Vec<(String, RandomTensor)> = specs
        .iter()
        .enumerate()
        .map(|(ti, (name, shape, init))| {
            let (mean, std) = match init {
                Init::Matrix => (0.0, 1.0 / (shape[1] as f32).sqrt()),
                Init::Embedding => (0.0, 1.0),
                Init::Norm => (if one_plus { 0.0 } else { 1.0 }, 0.1),
                Init::Bias => (0.0, 0.02),
            };
            (name.clone(), RandomTensor { shape: shape.clone(), mean, std, seed: seed ^ splitmix64(ti as u64) })
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(lazy, None, &path).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.insert("torch_dtype".into(), json!("bfloat16"));
        o.remove("dtype");
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::input(e.to_string()))?;
    crate::io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    Ok(specs.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum())
}

/// A bf16 tensor of N(mean, std) values drawn from a seed, made on demand.
struct RandomTensor {
    shape: Vec<usize>,
    mean: f32,
    std: f32,
    seed: u64,
}

impl safetensors::View for RandomTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        bytes.par_chunks_mut(2 * 4096).enumerate().for_each(|(c, chunk)| {
            for (j, b) in chunk.chunks_exact_mut(2).enumerate() {
                let v = self.mean + self.std * gaussian(self.seed, 0, (c * 4096 + j) as u64);
                b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        });
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}
