//! The run directory of `patchbay ablate`: what a sweep is (its plan, recorded in the manifest
//! so that `--resume` and `merge` can check and rebuild it), its outputs from rows, and the merge
//! of its `--shard I/N` parts (each a contiguous range of the prompts, every experiment).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::labels::LabelSet;
use crate::experiments::ablate::{AblateOp, Ablation, summary_outputs};
use crate::experiments::label_files::{Kept, read_kept, shard_range};
use crate::experiments::patch_files::{read_parts, write_manifest};
use crate::experiments::steer::{CleanValues, SteerRow};
use crate::experiments::sublayers::{influence_outputs, parse_sublayers, sublayer_conditions};
use crate::experiments::top_k::{TopK, curve_outputs};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// What an ablate run sweeps: one component per experiment, top-k sets of a ranking, or each
/// sublayer's output scaled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum SweepPlan {
    Components { ablations: Vec<Ablation>, n_heads: usize },
    TopK { label: String, sets: Vec<TopK> },
    Sublayers { sublayers: String, alphas: Vec<f32>, n_layers: usize },
}

impl SweepPlan {
    pub fn n_experiments(&self) -> usize {
        match self {
            SweepPlan::Components { ablations, .. } => ablations.len(),
            SweepPlan::TopK { sets, .. } => sets.len(),
            SweepPlan::Sublayers { sublayers, alphas, n_layers } => sublayers.split(',').count() * alphas.len() * n_layers,
        }
    }

    /// Every component of every experiment (the sites whose means `--op mean` needs).
    pub fn ablations(&self) -> Vec<Ablation> {
        match self {
            SweepPlan::Components { ablations, .. } => ablations.clone(),
            SweepPlan::TopK { sets, .. } => sets.iter().flat_map(|s| s.components.iter().map(|c| Ablation { component: c.clone(), control: s.draw.is_some() })).collect(),
            SweepPlan::Sublayers { .. } => Vec::new(),
        }
    }

    /// The outputs of the sweep's rows in `out`: summary.csv and heatmap.png, top_k.csv and
    /// top_k.png, or influence.csv and influence.png. `projection`: the site read, when read.
    #[allow(clippy::too_many_arguments)]
    pub fn outputs(&self, out: &Path, rows: &[SteerRow], clean: &CleanValues, labels: &LabelSet, op: AblateOp, seed: u64, projection: Option<Site>) -> Result<()> {
        match self {
            SweepPlan::Components { ablations, n_heads } => summary_outputs(out, ablations, rows, clean, op, labels, *n_heads).map(drop),
            SweepPlan::TopK { label, sets } => curve_outputs(out, sets, rows, clean, labels, label, op, seed).map(drop),
            SweepPlan::Sublayers { sublayers, alphas, n_layers } => {
                let site = projection.ok_or_else(|| Error::input("a sublayer sweep reads a projection"))?;
                let conditions = sublayer_conditions(&parse_sublayers(sublayers)?, alphas, &Positions::All, *n_layers)?;
                influence_outputs(out, &conditions, rows, clean, labels, site, seed).map(drop)
            }
        }
    }
}

fn field<'a, T: Deserialize<'a>>(m: &'a Value, key: &str, path: &Path) -> Result<T> {
    T::deserialize(&m[key]).map_err(|e| Error::file(path, format!("`{key}`: {e}")))
}

/// Combines the shards of an ablate sweep (`ablate --shard I/N` directories, any order) into the
/// files of the whole run in `out`: checks they are all the parts of one sweep, each complete
/// with exactly its prompts' rows; writes clean.jsonl and experiments.jsonl (the parts' lines in
/// shard order), the outputs ([`SweepPlan::outputs`]) and the manifest (with each part under
/// `shards`). Returns the number of parts and of rows.
pub fn merge_ablate(dirs: &[PathBuf], out: &Path, command_line: Vec<String>) -> Result<(usize, usize)> {
    let parts = read_parts(dirs, "ablate")?;
    let first = &parts[0];
    let n = first.shard.count;
    if let Some(p) = parts.iter().find(|p| p.manifest["status"] != "complete") {
        return Err(Error::input(format!("{}: shard {} is incomplete: finish it with the same `patchbay ablate` command and --resume", p.dir.display(), p.shard)));
    }
    let mpath = first.dir.join("manifest.json");
    let m = &first.manifest;
    let plan: SweepPlan = field(&m["sweep"], "plan", &mpath)?;
    let labels: LabelSet = field(m, "labels", &mpath)?;
    let n_prompts: usize = field(m, "n_prompts", &mpath)?;
    let op = AblateOp::parse(&field::<String>(m, "op", &mpath)?, field(m, "alpha", &mpath)?)?;
    let seed: u64 = field(m, "seed", &mpath)?;
    let projection: Option<usize> = field(&m["projection"], "layer", &mpath).ok();
    let n_exp = plan.n_experiments();
    let mut all = Kept::default();
    let (mut clean_text, mut rows_text) = (String::new(), String::new());
    for p in &parts {
        let kept = read_kept(&p.dir, "experiments.jsonl", &labels, n_prompts, n_exp, projection.is_some())?;
        let range = shard_range(p.shard.index, n, n_prompts);
        let complete = kept.clean.keys().copied().eq(range.clone()) && kept.rows.len() == range.len() * n_exp && kept.rows.iter().all(|r| range.contains(&r.index));
        if !complete {
            return Err(Error::input(format!("{}: shard {} should hold the clean run and {n_exp} rows of each of prompts {}..{} exactly ({} clean runs, {} rows found)", p.dir.display(), p.shard, range.start, range.end, kept.clean.len(), kept.rows.len())));
        }
        for (file, text) in [("clean.jsonl", &mut clean_text), ("experiments.jsonl", &mut rows_text)] {
            text.push_str(&String::from_utf8_lossy(&crate::error::read_file(&p.dir.join(file))?));
        }
        all.clean.extend(kept.clean);
        all.done.extend(kept.done);
        all.rows.extend(kept.rows);
    }
    if out.join("experiments.jsonl").exists() {
        return Err(Error::input(format!("{} exists: choose another --out", out.join("experiments.jsonl").display())));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::io::write_atomic(&out.join("clean.jsonl"), clean_text.as_bytes())?;
    crate::io::write_atomic(&out.join("experiments.jsonl"), rows_text.as_bytes())?;
    let clean = all.clean_values(n_prompts, labels.len(), projection.is_some());
    plan.outputs(out, &all.rows, &clean, &labels, op, seed, projection.map(|l| Site::new(l, SiteKind::ResidPost)))?;
    let mut manifest = m.clone();
    manifest["command_line"] = json!(command_line);
    manifest["shard"] = Value::Null;
    manifest["n_rows"] = json!(all.rows.len());
    manifest["shards"] = parts.iter().map(|p| json!({"shard": p.shard.to_string(), "dir": p.dir.display().to_string(), "device": p.manifest["device"], "command_line": p.manifest["command_line"], "timings_s": p.manifest["timings_s"]})).collect();
    write_manifest(&out.join("manifest.json"), &manifest)?;
    Ok((n, all.rows.len()))
}
