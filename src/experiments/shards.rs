//! Capture at scale: sites x layers x positions for a whole dataset, streamed to sharded
//! safetensors files with bounded memory, resumable.
//!
//! Layout of a shard directory:
//! - `meta.json`: what is captured and from what (model config hash, sha256 of the prompts'
//!   token ids, sites, positions, dtype, label token ids, rows per shard). A run that finds a
//!   `meta.json` describing something else refuses to mix the two.
//! - `shard-00000.safetensors`, ...: shard `k` holds prompts `k*R .. min((k+1)*R, N)`; one tensor
//!   per site named by its TransformerLens name, `[rows, n_positions, per-token shape...]`, i64
//!   `index` `[rows]` (the prompts' indices) and `n_tokens` `[rows]`, and f32 `label_logits`
//!   `[rows, n_labels]` (next-token logits at the last position, restricted to the label
//!   tokens) when labels are given.
//!
//! Memory: one shard's activations (at most `shard_bytes`, at least one prompt) plus one
//! forward batch, whatever the dataset size. Each shard is written through `.partial` and a
//! rename, so a killed run leaves only complete shards; a re-run computes exactly the missing
//! ones: no row is lost or duplicated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::RunRequest;
use crate::engine::Engine;
use crate::intervene::Capture;
use crate::io::OutDtype;
use crate::io::tensorfile::{TensorData, TensorFile, write};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// What to capture.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub sites: Vec<Site>,
    /// Positions relative to each prompt (-1 = last token) or absolute.
    pub positions: Vec<i64>,
    /// Tokens whose next-token logits at the last position are saved (may be empty).
    pub label_token_ids: Vec<u32>,
    pub dtype: OutDtype,
    /// Prompts per forward call.
    pub batch_size: usize,
    /// Cap on one shard's activation bytes (a shard holds at least one prompt).
    pub shard_bytes: usize,
}

/// `meta.json` of a shard directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format: String,
    pub model: String,
    pub config_sha256: String,
    pub patchbay_version: String,
    /// sha256 over the prompts' token ids.
    pub prompts_sha256: String,
    pub n_prompts: usize,
    /// TransformerLens names, in order.
    pub sites: Vec<String>,
    /// Short kind name and layer of each site.
    pub site_kinds: Vec<String>,
    pub site_layers: Vec<usize>,
    /// Per-token shape of each site.
    pub token_shapes: Vec<Vec<usize>>,
    pub positions: Vec<i64>,
    pub dtype: String,
    pub label_token_ids: Vec<u32>,
    pub shard_rows: usize,
    pub n_shards: usize,
}

impl ShardMeta {
    /// The fields that must agree for a resumed run to continue this one.
    fn same_run(&self, other: &ShardMeta) -> Option<String> {
        let checks: [(&str, bool); 7] = [
            ("model config", self.config_sha256 == other.config_sha256),
            ("prompts", self.prompts_sha256 == other.prompts_sha256 && self.n_prompts == other.n_prompts),
            ("sites", self.sites == other.sites),
            ("positions", self.positions == other.positions),
            ("dtype", self.dtype == other.dtype),
            ("label tokens", self.label_token_ids == other.label_token_ids),
            ("rows per shard", self.shard_rows == other.shard_rows),
        ];
        checks.iter().find(|(_, ok)| !ok).map(|(what, _)| what.to_string())
    }

    pub fn shard_path(dir: &Path, k: usize) -> PathBuf {
        dir.join(format!("shard-{k:05}.safetensors"))
    }

    /// Prompts of shard k.
    pub fn shard_range(&self, k: usize) -> std::ops::Range<usize> {
        k * self.shard_rows..((k + 1) * self.shard_rows).min(self.n_prompts)
    }

    pub fn load(dir: &Path) -> Result<ShardMeta> {
        let path = dir.join("meta.json");
        let bytes = crate::error::read_file(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::file(&path, format!("not a shard directory's meta.json: {e}")))
    }
}

/// sha256 over the prompts (lengths and ids), the identity of a capture's input.
pub fn prompts_sha256(prompts: &[Vec<u32>]) -> String {
    let mut h = Sha256::new();
    for p in prompts {
        h.update((p.len() as u64).to_le_bytes());
        for id in p {
            h.update(id.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRun {
    pub meta: ShardMeta,
    /// Shards found complete at the start.
    pub resumed: usize,
    /// Shards written by this call.
    pub written: usize,
    /// True when every shard exists.
    pub complete: bool,
}

/// Options of a run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Discard shards of a different run instead of refusing.
    pub overwrite: bool,
    /// Stop after writing this many shards (a simulated kill, for tests and budgets).
    pub stop_after: Option<usize>,
}

/// Checks that every prompt is long enough for every position.
pub fn check_positions(prompts: &[Vec<u32>], positions: &[i64]) -> Result<()> {
    let need = positions.iter().map(|&p| if p < 0 { (-p) as usize } else { p as usize + 1 }).max().unwrap_or(0);
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() < need) {
        return Err(Error::input(format!("prompt {i} has {} tokens; positions {} need at least {need}", p.len(), Positions::List(positions.to_vec()).describe())));
    }
    Ok(())
}

/// Captures `spec` for every prompt into `dir`, continuing a previous run of the same capture.
/// `model_path` and `config_sha256` are recorded as provenance.
#[allow(clippy::too_many_arguments)]
pub fn capture_shards(engine: &dyn Engine, model_path: &str, config_sha256: &str, prompts: &[Vec<u32>], spec: &ShardSpec, dir: &Path, opts: &RunOptions, progress: &ProgressBar) -> Result<ShardRun> {
    let cfg = engine.config();
    if prompts.is_empty() {
        return Err(Error::input("no prompts to capture"));
    }
    if spec.positions.is_empty() {
        return Err(Error::input("no positions to capture"));
    }
    for s in &spec.sites {
        s.check(cfg)?;
        if s.kind == SiteKind::Pattern {
            return Err(Error::input(format!("site {s}: attention patterns vary in width with the prompt; capture them with `patchbay capture`")));
        }
    }
    for (i, &id) in spec.label_token_ids.iter().enumerate() {
        if id as usize >= cfg.vocab_size {
            return Err(Error::input(format!("label token {i}: id {id} is out of range (vocab_size {})", cfg.vocab_size)));
        }
    }
    check_positions(prompts, &spec.positions)?;
    let token_shapes: Vec<Vec<usize>> = spec.sites.iter().map(|s| s.kind.token_shape(cfg, 0)).collect();
    let widths: Vec<usize> = token_shapes.iter().map(|s| s.iter().product()).collect();
    let n_pos = spec.positions.len();
    let elem = match spec.dtype {
        OutDtype::F32 => 4,
        OutDtype::Bf16 => 2,
    };
    // Bytes of one prompt's row in memory (f32) and on disk.
    let row_floats: usize = widths.iter().sum::<usize>() * n_pos + spec.label_token_ids.len();
    let row_bytes = (row_floats * 4).max(elem);
    let shard_rows = (spec.shard_bytes / row_bytes).clamp(1, prompts.len());
    let n_shards = prompts.len().div_ceil(shard_rows);
    let meta = ShardMeta {
        format: "patchbay-shards-1".into(),
        model: model_path.to_string(),
        config_sha256: config_sha256.to_string(),
        patchbay_version: env!("CARGO_PKG_VERSION").into(),
        prompts_sha256: prompts_sha256(prompts),
        n_prompts: prompts.len(),
        sites: spec.sites.iter().map(Site::to_string).collect(),
        site_kinds: spec.sites.iter().map(|s| s.kind.short_name().to_string()).collect(),
        site_layers: spec.sites.iter().map(|s| s.layer).collect(),
        token_shapes: token_shapes.clone(),
        positions: spec.positions.clone(),
        dtype: format!("{:?}", spec.dtype).to_lowercase(),
        label_token_ids: spec.label_token_ids.clone(),
        shard_rows,
        n_shards,
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta_path = dir.join("meta.json");
    if meta_path.exists() {
        let old = ShardMeta::load(dir)?;
        if let Some(what) = old.same_run(&meta) {
            if !opts.overwrite {
                return Err(Error::input(format!("{} holds a capture with other {what}; choose another output directory or pass --overwrite", dir.display())));
            }
            for k in 0..old.n_shards {
                let p = ShardMeta::shard_path(dir, k);
                if p.exists() {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
    }
    let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::input(e.to_string()))?;
    crate::io::write_atomic(&meta_path, &meta_json)?;

    // Which shards are complete (a shard exists only once fully written).
    let mut done = vec![false; n_shards];
    for (k, d) in done.iter_mut().enumerate() {
        let p = ShardMeta::shard_path(dir, k);
        if p.exists() {
            let r = meta.shard_range(k);
            let mut f = TensorFile::open(&p)?;
            let (shape, index) = f.read_i64("index")?;
            if shape != [r.len()] || index.first() != Some(&(r.start as i64)) || index.last() != Some(&(r.end as i64 - 1)) {
                return Err(Error::file(&p, format!("holds prompts other than {}..{}; remove it and run again", r.start, r.end)));
            }
            *d = true;
        }
    }
    let resumed = done.iter().filter(|&&d| d).count();
    progress.set_position(done.iter().enumerate().filter(|(_, d)| **d).map(|(k, _)| meta.shard_range(k).len() as u64).sum());

    let captures: Vec<Capture> = spec.sites.iter().map(|&site| Capture { site, positions: Positions::List(spec.positions.clone()) }).collect();
    let last = Positions::List(vec![-1]);
    let n_labels = spec.label_token_ids.len();
    let mut written = 0;
    // Buffers of one shard, reused: per site [rows, n_pos, width].
    let mut bufs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(shard_rows * n_pos * w)).collect();
    let mut label_logits: Vec<f32> = Vec::with_capacity(shard_rows * n_labels);
    for (k, &is_done) in done.iter().enumerate() {
        if is_done {
            continue;
        }
        if opts.stop_after.is_some_and(|n| written >= n) {
            break;
        }
        let range = meta.shard_range(k);
        bufs.iter_mut().for_each(Vec::clear);
        label_logits.clear();
        for (b, batch) in prompts[range.clone()].chunks(spec.batch_size.max(1)).enumerate() {
            let req = RunRequest { captures: &captures, logits_at: (n_labels > 0).then_some(&last), ..Default::default() };
            let out = engine.run_prompts(batch, &req).map_err(|e| e.in_batch(|i| range.start + b * spec.batch_size.max(1) + i))?;
            for (buf, c) in bufs.iter_mut().zip(&out.captured) {
                buf.extend_from_slice(&c.data);
            }
            if n_labels > 0 {
                let vocab = cfg.vocab_size;
                if out.logits.len() != batch.len() * vocab {
                    return Err(Error::input(format!("engine returned {} logits for {} prompts", out.logits.len() / vocab.max(1), batch.len())));
                }
                for row in out.logits.chunks(vocab) {
                    label_logits.extend(spec.label_token_ids.iter().map(|&id| row[id as usize]));
                }
            }
            progress.inc(batch.len() as u64);
        }
        let rows = range.len();
        let index: Vec<i64> = range.clone().map(|i| i as i64).collect();
        let n_tokens: Vec<i64> = prompts[range.clone()].iter().map(|p| p.len() as i64).collect();
        let mut tensors: Vec<(String, Vec<usize>, TensorData)> = Vec::new();
        for ((site, shape), buf) in spec.sites.iter().zip(&token_shapes).zip(&bufs) {
            tensors.push((site.to_string(), [rows, n_pos].iter().chain(shape).copied().collect(), TensorData::F32(buf, spec.dtype)));
        }
        tensors.push(("index".into(), vec![rows], TensorData::I64(&index)));
        tensors.push(("n_tokens".into(), vec![rows], TensorData::I64(&n_tokens)));
        if n_labels > 0 {
            tensors.push(("label_logits".into(), vec![rows, n_labels], TensorData::F32(&label_logits, OutDtype::F32)));
        }
        let md: BTreeMap<String, String> = BTreeMap::from([
            ("model".to_string(), meta.model.clone()),
            ("config_sha256".to_string(), meta.config_sha256.clone()),
            ("patchbay_version".to_string(), meta.patchbay_version.clone()),
            ("positions".to_string(), Positions::List(spec.positions.clone()).describe()),
            ("dtype".to_string(), meta.dtype.clone()),
            ("device".to_string(), engine.device_name()),
            ("nonfinite_values".to_string(), engine.nonfinite_values().to_string()),
            ("shard".to_string(), format!("{k}/{n_shards}")),
        ]);
        write(&ShardMeta::shard_path(dir, k), &tensors, &md)?;
        written += 1;
    }
    let complete = (0..n_shards).all(|k| ShardMeta::shard_path(dir, k).exists());
    Ok(ShardRun { meta, resumed, written, complete })
}

/// Reads one site's activations at one shard: `[rows, n_positions, width]` flattened.
pub fn read_site(dir: &Path, k: usize, site: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    TensorFile::open(&ShardMeta::shard_path(dir, k))?.read_f32(site)
}

/// All label logits of a complete capture, `[n_prompts, n_labels]`.
pub fn read_label_logits(dir: &Path, meta: &ShardMeta) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(meta.n_prompts * meta.label_token_ids.len());
    for k in 0..meta.n_shards {
        let (_, v) = TensorFile::open(&ShardMeta::shard_path(dir, k))?.read_f32("label_logits")?;
        out.extend_from_slice(&v);
    }
    Ok(out)
}
