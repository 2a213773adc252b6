//! What a model is, as `patchbay inspect --json` prints it and the Python package's
//! `Model.config` returns it: family, shapes, dtype, parameter count, rope, windows, special
//! tokens, generation defaults, config hash and the site catalogue (one entry per site kind).

use serde_json::{Value, json};

use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::sites::{Site, SiteKind};

/// The model's description (the object of `inspect --json`).
pub fn model_info(m: &Model) -> Value {
    let c = &m.cfg;
    let sites: Vec<Value> = SiteKind::ALL.iter().map(|&k| site_entry(Site::new(if k == SiteKind::FinalNorm { c.n_layers } else { 0 }, k), c)).collect();
    json!({
        "family": c.family.name(),
        "model_type": c.model_type,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "d_head": c.d_head,
        "d_mlp": c.d_mlp,
        "vocab": c.vocab_size,
        "dtype": m.weights.dtype.name(),
        "parameters": m.weights.n_params,
        "tied_embeddings": c.tie_embeddings,
        "rope_type": c.rope_scaling.name(),
        "rope_theta": c.rope_theta,
        "rotary_dim": c.rotary_dim,
        "sliding_window": c.sliding_window,
        "attn_softcap": c.attn_softcap,
        "final_softcap": c.final_softcap,
        "bos_token_id": c.bos_token_id,
        "eos_token_ids": c.eos_token_ids,
        "generation": c.generation.as_ref().map(|g| json!({"do_sample": g.do_sample, "temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens})),
        "config_sha256": m.config_hash,
        "sites": sites,
    })
}

/// One site of the catalogue: its kind (short name), TransformerLens name and per-token shape
/// (the key axis of `attn.hook_pattern` is `"n_keys"`).
pub fn site_entry(site: Site, cfg: &ModelConfig) -> Value {
    let shape: Vec<Value> = site.kind.token_shape(cfg, 0).iter().map(|&d| if site.kind == SiteKind::Pattern && d == 0 { json!("n_keys") } else { json!(d) }).collect();
    json!({"kind": site.kind.short_name(), "name": site.to_string(), "shape": shape})
}
