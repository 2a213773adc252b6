//! `patchbay merge`: combines the shards of a patching sweep (`patchbay patch --shard i/n`) into
//! the files the whole run writes (DESIGN.md section 7).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};

use super::patch::{Done, Shard, read_done, read_manifest, write_manifest, write_outputs};
use patchbay::{Error, Result};

const MERGE_HELP: &str = "Examples:
  patchbay merge --out runs/patch runs/p0 runs/p1 runs/p2 runs/p3
  patchbay merge --out runs/patch runs/shard-*

The directories must be the shards 0/N .. N-1/N of one `patchbay patch` sweep (same model config,
prompts, pairs, sites, units, window, centres, positions, labels and --method), each complete (a
killed shard is finished with --resume first), with no experiment in two shards and none missing.
Writes experiments.jsonl (sorted by id), summary.csv, heatmap.png and manifest.json in --out: the
files of the unsharded run, with the same experiments in the same order; logits can differ from
the unsharded run's in the last bits (a shard batches other prompts together), and with them a
prediction at a near-tie. The manifest lists each shard's command line, device and timing under `shards`.";

#[derive(Args)]
#[command(after_help = MERGE_HELP)]
pub struct MergeArgs {
    /// Output directory (must not hold a sweep already).
    #[arg(long)]
    out: PathBuf,
    /// Output directories of `patchbay patch --shard I/N`, in any order.
    #[arg(required = true, value_name = "SHARD_DIR")]
    shards: Vec<PathBuf>,
    /// No summary line.
    #[arg(long)]
    quiet: bool,
}

/// One shard directory and its manifest.
struct Part {
    dir: PathBuf,
    manifest: Value,
    shard: Shard,
}

fn read_part(dir: PathBuf) -> Result<Part> {
    let path = dir.join("manifest.json");
    if !path.exists() {
        return Err(Error::input(format!("{}: no manifest.json (not an output directory of `patchbay patch`)", dir.display())));
    }
    let manifest = read_manifest(&path)?;
    if manifest.get("sweep").is_none() {
        return Err(Error::file(&path, "not the manifest of `patchbay patch` (no `sweep`)"));
    }
    let shard = match manifest.get("shard").and_then(Value::as_str) {
        Some(s) => s.parse::<Shard>().map_err(|e| Error::file(&path, e.to_string()))?,
        None => return Err(Error::input(format!("{} holds a whole sweep, not a shard (`patchbay patch --shard I/N` writes shards)", dir.display()))),
    };
    Ok(Part { dir, manifest, shard })
}

pub fn run(a: MergeArgs) -> Result<()> {
    let t0 = Instant::now();
    let parts = a.shards.iter().cloned().map(read_part).collect::<Result<Vec<_>>>()?;
    let first = &parts[0];
    let n = first.shard.count;
    for p in &parts[1..] {
        if p.manifest["sweep"] != first.manifest["sweep"] {
            return Err(Error::input(format!("{} and {} are shards of different sweeps (model, prompts, pairs or settings differ)", first.dir.display(), p.dir.display())));
        }
        if p.manifest["method"] != first.manifest["method"] {
            let method = |p: &Part| p.manifest["method"].as_str().unwrap_or("?").to_string();
            return Err(Error::input(format!("{} ran --method {} and {} --method {}: merge shards of one method", first.dir.display(), method(first), p.dir.display(), method(p))));
        }
        if p.shard.count != n {
            return Err(Error::input(format!("{} is shard {} but {} is shard {}: the shards of a sweep share one N", first.dir.display(), first.shard, p.dir.display(), p.shard)));
        }
    }
    let mut slots: Vec<Option<&Part>> = vec![None; n];
    for p in &parts {
        if let Some(q) = slots[p.shard.index] {
            return Err(Error::input(format!("shard {} is given twice: {} and {}", p.shard, q.dir.display(), p.dir.display())));
        }
        slots[p.shard.index] = Some(p);
    }
    if let Some(i) = slots.iter().position(Option::is_none) {
        return Err(Error::input(format!("shard {i}/{n} is missing ({} of {n} shards given)", parts.len())));
    }
    let total = first.manifest["sweep_experiments"].as_u64().ok_or_else(|| Error::file(first.dir.join("manifest.json"), "no `sweep_experiments`"))? as usize;
    let mut owner: HashMap<usize, &Part> = HashMap::new();
    let mut all: Vec<Done> = Vec::with_capacity(total);
    for p in slots.into_iter().flatten() {
        let m = &p.manifest;
        if m["complete"] != json!(true) {
            return Err(Error::input(format!("{}: shard {} is incomplete ({} of {} experiments): finish it with the same `patchbay patch` command and --resume", p.dir.display(), p.shard, m["done"], m["experiments"])));
        }
        let path = p.dir.join("experiments.jsonl");
        let done = read_done(&path, false)?;
        if Some(done.len() as u64) != m["experiments"].as_u64() {
            return Err(Error::file(&path, format!("{} results, but the manifest counts {} experiments", done.len(), m["experiments"])));
        }
        for d in &done {
            let id = d.result.id;
            if id >= total {
                return Err(Error::file(&path, format!("experiment {id} is out of range (the sweep has {total})")));
            }
            if let Some(q) = owner.insert(id, p) {
                return Err(Error::input(format!("experiment {id} is in both {} and {}", q.dir.display(), p.dir.display())));
            }
        }
        all.extend(done);
    }
    if let Some(id) = (0..total).find(|id| !owner.contains_key(id)) {
        return Err(Error::input(format!("experiment {id} is in no shard ({} of {total} experiments found)", owner.len())));
    }
    let jsonl = a.out.join("experiments.jsonl");
    if jsonl.exists() {
        return Err(Error::input(format!("{} exists: choose another --out", jsonl.display())));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    write_outputs(&a.out, all)?;

    // The manifest of the whole run, with each shard's own provenance and timings.
    let mut sorted: Vec<&Part> = parts.iter().collect();
    sorted.sort_by_key(|p| p.shard.index);
    let mut devices: Vec<&Value> = Vec::new();
    for p in &sorted {
        if !devices.contains(&&p.manifest["device"]) {
            devices.push(&p.manifest["device"]);
        }
    }
    let mut manifest = first.manifest.clone();
    manifest["command_line"] = json!(std::env::args().collect::<Vec<_>>());
    manifest["device"] = if devices.len() == 1 { devices[0].clone() } else { json!(devices) };
    manifest["shard"] = Value::Null;
    manifest["experiments"] = json!(total);
    manifest["done"] = json!(total);
    manifest["complete"] = json!(true);
    manifest["seconds"] = json!(sorted.iter().filter_map(|p| p.manifest["seconds"].as_f64()).sum::<f64>());
    manifest["shards"] = sorted
        .iter()
        .map(|p| {
            let m = &p.manifest;
            json!({"shard": p.shard.to_string(), "dir": p.dir.display().to_string(), "experiments": m["experiments"], "seconds": m["seconds"], "device": m["device"], "command_line": m["command_line"], "patchbay_version": m["patchbay_version"]})
        })
        .collect();
    write_manifest(&a.out.join("manifest.json"), &manifest)?;
    if !a.quiet {
        eprintln!("merged {n} shards: {total} experiments in {} ({:.1} s)", a.out.display(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}
