//! `capture`: run prompts and write chosen sites (and logits) to one safetensors file.
//!
//! Output contract (stable; other tools read it):
//! - one tensor per site named by its TransformerLens name, f32 unless bf16 is asked for;
//! - positions `all`: prompts concatenated along the first axis, `[T_total, ...]`, plus an i64
//!   tensor `prompt_offsets` `[n_prompts + 1]`; `attn.hook_pattern` is
//!   `[T_total, n_heads, max_len]`, zero past each prompt's length; `logits` `[T_total, vocab]`;
//! - a position list: the first two axes are `[n_prompts, n_positions]`;
//! - metadata: model path, config hash, patchbay version, positions, dtype; from the command
//!   also `token_ids` (each prompt's ids, JSON) and `tokens` (their strings, JSON, when the
//!   model has a tokenizer), to label positions and pattern axes.

use std::collections::BTreeMap;

use indicatif::ProgressBar;

use crate::engine::RunRequest;
use crate::engine::Engine;
use crate::intervene::{Capture, Intervention, for_batch};
use crate::io::{OutDtype, OutTensor};
use crate::model::Model;
use crate::sites::{Positions, Site};
use crate::Result;

pub struct CaptureSpec {
    pub sites: Vec<Site>,
    pub positions: Positions,
    pub logits: bool,
    pub dtype: OutDtype,
    /// Prompts per forward call.
    pub batch_size: usize,
    /// Applied in every forward (their `prompts` index the whole prompt list); captures copy a
    /// site out after the interventions at that site.
    pub interventions: Vec<Intervention>,
}

/// Runs every prompt and returns the tensors of the capture contract, in site order, then
/// `logits`, then `prompt_offsets` (positions `all` only).
pub fn capture(engine: &dyn Engine, prompts: &[Vec<u32>], spec: &CaptureSpec, progress: &ProgressBar) -> Result<Vec<(String, OutTensor)>> {
    let cfg = engine.config();
    for s in &spec.sites {
        s.check(cfg)?;
    }
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let captures: Vec<Capture> = spec.sites.iter().map(|&site| Capture { site, positions: spec.positions.clone() }).collect();
    let mut site_data: Vec<Vec<f32>> = vec![Vec::new(); spec.sites.len()];
    let mut logits = Vec::new();
    let batch_size = spec.batch_size.max(1);
    for (b, batch) in prompts.chunks(batch_size).enumerate() {
        let start = b * batch_size;
        let ivs = for_batch(&spec.interventions, cfg, prompts, start..start + batch.len())?;
        let out = engine.run_prompts(batch, &RunRequest { captures: &captures, interventions: &ivs, logits_at: spec.logits.then_some(&spec.positions), n_keys: Some(max_len), ..Default::default() }).map_err(|e| e.in_batch(|i| start + i))?;
        for (acc, c) in site_data.iter_mut().zip(out.captured) {
            acc.extend_from_slice(&c.data);
        }
        logits.extend_from_slice(&out.logits);
        progress.inc(batch.len() as u64);
    }
    let lead: Vec<usize> = match &spec.positions {
        Positions::All => vec![prompts.iter().map(Vec::len).sum()],
        Positions::List(l) => vec![prompts.len(), l.len()],
    };
    let float = |data: Vec<f32>, tail: Vec<usize>| OutTensor::Float { shape: lead.iter().copied().chain(tail).collect(), data, dtype: spec.dtype };
    let mut out: Vec<(String, OutTensor)> = spec
        .sites
        .iter()
        .zip(site_data)
        .map(|(site, data)| (site.to_string(), float(data, site.kind.token_shape(cfg, max_len))))
        .collect();
    if spec.logits {
        out.push(("logits".into(), float(logits, vec![cfg.vocab_size])));
    }
    if spec.positions == Positions::All {
        let mut offsets = vec![0i64];
        for p in prompts {
            offsets.push(offsets.last().copied().unwrap_or(0) + p.len() as i64);
        }
        out.push(("prompt_offsets".into(), OutTensor::I64 { shape: vec![prompts.len() + 1], data: offsets }));
    }
    Ok(out)
}

/// Provenance recorded in every capture file (with the non-finite values the engine returned,
/// kept by --allow-nonfinite).
pub fn metadata(model: &Model, engine: &dyn Engine, spec: &CaptureSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("device".to_string(), engine.device_name()),
        ("nonfinite_values".to_string(), engine.nonfinite_values().to_string()),
        ("model".to_string(), model.dir.display().to_string()),
        ("config_sha256".to_string(), model.config_hash.clone()),
        ("patchbay_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("positions".to_string(), spec.positions.describe()),
        ("dtype".to_string(), format!("{:?}", spec.dtype).to_lowercase()),
    ])
}
