//! The files of a patching sweep (`patchbay patch`, `merge`, the demo's patching stage): the
//! pairs file read, results appended to `experiments.jsonl` as they complete, the finished
//! outputs (`experiments.jsonl` sorted, `summary.csv`, `heatmap.png`), `manifest.json`, and
//! the parts of a sweep (`--shard i/n`, here [`SweepPart`]: "shard" already names the capture
//! files of `experiments::shards`).
//!
//! [`run_to_dir`] is the whole resumable run of `patchbay patch` in an output directory,
//! [`merge_parts`] what `patchbay merge` does.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::experiments::patch::{CleanSchedule, Experiment, ExperimentResult, GROUP_TARGETS, Method, Overflow, Pair, RunSettings, SummaryRow, SweepSpec, run_sweep, summarize, summary_csv, summary_grid, target_groups};
use crate::rng::{self, PairsOf};
use crate::{Error, Result};

/// A JSONL file of `{"source": i, "target": j}` (prompt indices below `n_prompts`; blank lines
/// skipped; at least one pair).
pub fn read_pairs(path: &Path, n_prompts: usize) -> Result<Vec<Pair>> {
    let text = String::from_utf8(crate::error::read_file(path)?).map_err(|_| Error::file(path, "not UTF-8"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: Pair = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: expected {{\"source\": i, \"target\": j}}: {e}", i + 1)))?;
        if p.source >= n_prompts || p.target >= n_prompts {
            return Err(Error::file(path, format!("line {}: prompt index out of range ({n_prompts} prompts)", i + 1)));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no pairs"));
    }
    Ok(out)
}

/// `n` distinct random (source, target) pairs of distinct prompts ([`rng::distinct_pairs`],
/// seeded; an error saying how many exist when fewer). With `keys` (e.g. each prompt's gold or
/// predicted label; None: the prompt takes no part), the two keys differ.
pub fn random_pairs(n_prompts: usize, n: usize, seed: u64, keys: Option<&[Option<String>]>) -> Result<Vec<Pair>> {
    let of = match keys {
        None => PairsOf::Items(n_prompts),
        Some(keys) => PairsOf::Keys(keys),
    };
    Ok(rng::distinct_pairs(of, n, seed)?.into_iter().map(|(source, target)| Pair { source, target }).collect())
}

/// Part `index` of `count` of a sweep (`--shard i/n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepPart {
    pub index: usize,
    pub count: usize,
}

impl FromStr for SweepPart {
    type Err = Error;
    fn from_str(s: &str) -> Result<SweepPart> {
        let bad = || Error::input(format!("shard `{s}`: expected I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(SweepPart { index, count })
    }
}

impl fmt::Display for SweepPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl SweepPart {
    /// The ids of this part's experiments: whole target groups of the resumed method
    /// (`target_groups`: nothing is batched across groups, so a part computes its experiments
    /// bit for bit as the unsharded run does, and each clean target pass runs in one part),
    /// dealt largest first (ties: lower group) to the least-loaded part (ties: lower index).
    /// Depends only on the sweep, the memory budget and `count`.
    pub fn select(self, groups: &[Vec<usize>], exps: &[Experiment]) -> HashSet<usize> {
        let mut per_target: HashMap<usize, usize> = HashMap::new();
        for e in exps {
            *per_target.entry(e.pair.target).or_default() += 1;
        }
        let mut order: Vec<(usize, usize)> = groups.iter().enumerate().map(|(g, ts)| (g, ts.iter().map(|t| per_target.get(t).copied().unwrap_or(0)).sum())).collect();
        order.sort_by_key(|&(g, n)| (Reverse(n), g));
        let mut load = vec![0usize; self.count];
        let mut owner: HashMap<usize, usize> = HashMap::new();
        for (g, n) in order {
            let s = (0..self.count).min_by_key(|&s| (load[s], s)).unwrap_or(0);
            load[s] += n;
            groups[g].iter().for_each(|&t| {
                owner.insert(t, s);
            });
        }
        exps.iter().filter(|e| owner.get(&e.pair.target) == Some(&self.index)).map(|e| e.id).collect()
    }
}

/// One finished experiment: the parsed result and its line as written.
pub struct Done {
    pub result: ExperimentResult,
    pub line: String,
}

/// Results in an experiments.jsonl (none when it does not exist). A torn last line (a killed
/// write) is an error, or with `cut_torn` cut off the file.
pub fn read_done(path: &Path, cut_torn: bool) -> Result<Vec<Done>> {
    let Some(bytes) = crate::io::complete_lines(path, cut_torn)? else { return Ok(Vec::new()) };
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .enumerate()
        .map(|(i, l)| Ok(Done { result: serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))?, line: l.to_string() }))
        .collect()
}

/// The outputs of a finished sweep (or merged parts) in `out`: experiments.jsonl rewritten
/// sorted by id (atomically), summary.csv and heatmap.png (when there are results). Returns
/// the summary.
pub fn write_outputs(out: &Path, mut done: Vec<Done>, units: Option<&[usize]>) -> Result<Vec<SummaryRow>> {
    done.sort_by_key(|d| d.result.id);
    let text: String = done.iter().map(|d| format!("{}\n", d.line)).collect();
    let sums: String = done.iter().map(|d| format!("{}\n", crate::io::line_sum(&d.line))).collect();
    let jsonl = out.join("experiments.jsonl");
    crate::io::write_atomic(&crate::io::sums_path(&jsonl), sums.as_bytes())?;
    crate::io::write_atomic(&jsonl, text.as_bytes())?;
    let results: Vec<ExperimentResult> = done.into_iter().map(|d| d.result).collect();
    let summary = summarize(&results);
    crate::io::write_atomic(&out.join("summary.csv"), summary_csv(&summary).as_bytes())?;
    if !summary.is_empty() {
        let window = results.iter().map(|r| r.layers.len()).max().unwrap_or(0);
        crate::io::plot::heatmap(&out.join("heatmap.png"), &summary_grid(&summary, window, units))?;
    }
    Ok(summary)
}

/// Reads a manifest.json.
pub fn read_manifest(path: &Path) -> Result<Value> {
    serde_json::from_slice(&crate::error::read_json_bytes(path)?).map_err(|e| Error::file(path, e.to_string()))
}

pub fn write_manifest(path: &Path, manifest: &Value) -> Result<()> {
    crate::io::write_atomic(path, serde_json::to_string_pretty(manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())
}

/// Runs the experiments `settings` does not skip, appending each result to `jsonl` as one line
/// as soon as it completes (the file is created when missing). With `stop_after`, stops with an
/// error after that many (a simulated kill). Returns how many were written, and how the sweep
/// ended.
pub fn append_results(engine: &dyn Engine, prompts: &[Vec<u32>], spec: &SweepSpec, exps: &[Experiment], settings: &RunSettings, jsonl: &Path, stop_after: Option<usize>) -> Result<(usize, Result<()>)> {
    let append = |path: &Path| std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e));
    let (mut file, sums) = (append(jsonl)?, crate::io::sums_path(jsonl));
    let mut sums_file = append(&sums)?;
    let mut written = 0usize;
    let outcome = run_sweep(engine, prompts, spec, exps, settings, &mut |r| {
        if stop_after.is_some_and(|n| written >= n) {
            return Err(Error::input("stopped (--stop-after)"));
        }
        let line = serde_json::to_string(&r).map_err(|e| Error::input(e.to_string()))?;
        file.write_all(format!("{line}\n").as_bytes()).and_then(|_| file.flush()).map_err(|e| Error::io(jsonl, e))?;
        // The line's checksum after the line: a kill between the two leaves a line --resume runs again.
        sums_file.write_all(format!("{}\n", crate::io::line_sum(&line)).as_bytes()).and_then(|_| sums_file.flush()).map_err(|e| Error::io(&sums, e))?;
        written += 1;
        Ok(())
    });
    Ok((written, outcome))
}

/// A sweep run into an output directory (`patchbay patch`).
pub struct DirRun<'a> {
    pub out: &'a Path,
    /// When the command started (the manifest's `seconds` count from it).
    pub started: Instant,
    pub method: Method,
    pub batch_rows: usize,
    pub mem_budget: usize,
    pub overflow: Overflow,
    /// Run only this part of the sweep.
    pub part: Option<SweepPart>,
    /// Continue the run found in `out` (else finding one is an error).
    pub resume: bool,
    /// Stop after this many experiments of this run (a simulated kill).
    pub stop_after: Option<usize>,
    /// What identifies the sweep (model, prompts, pairs, settings): a run in `out` with another
    /// identity is refused, and parts of one sweep share it.
    pub sweep_id: Value,
    /// The manifest's provenance fields (command, model, device, ...); the run adds its own.
    pub provenance: Value,
}

/// How a [`run_to_dir`] ended.
pub struct DirRunEnd {
    /// Experiments in the whole sweep, and in this run's part.
    pub total: usize,
    pub mine: usize,
    /// Experiments done in `out` (this run's and earlier runs').
    pub done: usize,
    /// Written by this run.
    pub written: usize,
}

/// The resumable run of a sweep (or of one part) into `r.out`: experiments.jsonl appended as
/// experiments complete, manifest.json (rewritten at the start and the end), and when every
/// experiment of the part is done, the outputs ([`write_outputs`]). `progress` is set to the
/// experiments left.
pub fn run_to_dir(engine: &dyn Engine, prompts: &[Vec<u32>], spec: &SweepSpec, all_exps: &[Experiment], r: &DirRun, progress: &ProgressBar) -> Result<DirRunEnd> {
    let total = all_exps.len();
    // Every experiment goes to run_sweep (its batches are formed from the whole sweep); those of
    // other parts are skipped like finished ones.
    let mine: HashSet<usize> = match r.part {
        Some(s) => {
            let groups = target_groups(engine, prompts, all_exps, r.mem_budget);
            if groups.len() < s.count {
                return Err(Error::input(format!(
                    "the sweep has {} target group(s) (up to {GROUP_TARGETS} targets each, under --mem-budget), fewer than {} shards: use at most {} shards",
                    groups.len(),
                    s.count,
                    groups.len()
                )));
            }
            s.select(&groups, all_exps)
        }
        None => all_exps.iter().map(|e| e.id).collect(),
    };
    let n_mine = mine.len();

    let _lock = crate::io::OutLock::acquire(r.out)?;
    let jsonl = r.out.join("experiments.jsonl");
    let part = r.part.map(|s| s.to_string());
    let manifest_path = r.out.join("manifest.json");
    if jsonl.exists() {
        if !r.resume {
            return Err(Error::input(format!("{} exists: add --resume to continue it, or choose another --out", jsonl.display())));
        }
        let old = read_manifest(&manifest_path)?;
        if old.get("sweep") != Some(&r.sweep_id) {
            return Err(Error::input(format!("{} holds a different sweep (model, prompts, pairs or settings differ): choose another --out", r.out.display())));
        }
        if old.get("shard").unwrap_or(&Value::Null) != &json!(part) {
            return Err(Error::input(format!("{} holds shard {} of this sweep, not {}: choose another --out", r.out.display(), old["shard"].as_str().unwrap_or("(whole)"), part.as_deref().unwrap_or("the whole sweep"))));
        }
        crate::io::verify_lines(&jsonl)?;
    } else if crate::io::sums_path(&jsonl).exists() {
        // Checksums of a results file that is gone.
        std::fs::remove_file(crate::io::sums_path(&jsonl)).map_err(|e| Error::io(r.out, e))?;
    }
    // Where the resumed method's clean runs come from (held from one pass, or recomputed).
    let clean_runs = (r.method == Method::Resumed).then(|| CleanSchedule::new(engine, prompts, all_exps, spec, r.mem_budget, r.overflow).summary());
    let save_manifest = |done: usize| {
        let mut m = r.provenance.clone();
        let run = json!({
            "clean_runs": clean_runs,
            "shard": part,
            "sweep_experiments": total,
            "experiments": n_mine,
            "done": done,
            "complete": done == n_mine,
            "seconds": r.started.elapsed().as_secs_f64(),
            "nonfinite_values": engine.nonfinite_values(),
            "sweep": r.sweep_id,
        });
        if let (Some(m), Value::Object(run)) = (m.as_object_mut(), run) {
            m.extend(run);
        }
        write_manifest(&manifest_path, &m)
    };
    let done = read_done(&jsonl, true)?;
    save_manifest(done.len())?;
    let done_ids: HashSet<usize> = done.iter().map(|d| d.result.id).collect();
    let skip: HashSet<usize> = all_exps.iter().map(|e| e.id).filter(|id| done_ids.contains(id) || !mine.contains(id)).collect();

    progress.set_length((n_mine - done_ids.len()) as u64);
    let settings = RunSettings { method: r.method, skip: &skip, batch_rows: r.batch_rows, mem_budget: r.mem_budget, overflow: r.overflow, progress };
    let (written, outcome) = append_results(engine, prompts, spec, all_exps, &settings, &jsonl, r.stop_after)?;
    progress.finish_and_clear();
    let all = read_done(&jsonl, true)?;
    let n_done = all.len();
    if outcome.is_ok() {
        write_outputs(r.out, all, spec.units.as_deref())?;
    }
    save_manifest(n_done)?;
    outcome?;
    Ok(DirRunEnd { total, mine: n_mine, done: n_done, written })
}
/// One part's directory and its manifest.
pub(crate) struct Part {
    pub dir: PathBuf,
    pub manifest: Value,
    pub shard: SweepPart,
}

fn read_part(dir: PathBuf, command: &str) -> Result<Part> {
    let path = dir.join("manifest.json");
    if !path.exists() {
        return Err(Error::input(format!("{}: no manifest.json (not an output directory of `patchbay {command}`)", dir.display())));
    }
    let manifest = read_manifest(&path)?;
    if manifest.get("sweep").is_none() {
        return Err(Error::file(&path, format!("not the manifest of `patchbay {command}` (no `sweep`)")));
    }
    let shard = match manifest.get("shard").and_then(Value::as_str) {
        Some(s) => s.parse::<SweepPart>().map_err(|e| Error::file(&path, e.to_string()))?,
        None => return Err(Error::input(format!("{} holds a whole sweep, not a shard (`patchbay {command} --shard I/N` writes shards)", dir.display()))),
    };
    Ok(Part { dir, manifest, shard })
}

/// The parts of one sweep of `patchbay {command}` in `dirs` (any order), in shard order: all of
/// one sweep (the same manifest `sweep`) and one N, every shard given once.
pub(crate) fn read_parts(dirs: &[PathBuf], command: &str) -> Result<Vec<Part>> {
    let parts = dirs.iter().cloned().map(|d| read_part(d, command)).collect::<Result<Vec<_>>>()?;
    let first = &parts[0];
    let n = first.shard.count;
    for p in &parts[1..] {
        if p.manifest["sweep"] != first.manifest["sweep"] {
            return Err(Error::input(format!("{} and {} are shards of different sweeps (model, prompts or settings differ)", first.dir.display(), p.dir.display())));
        }
        if p.shard.count != n {
            return Err(Error::input(format!("{} is shard {} but {} is shard {}: the shards of a sweep share one N", first.dir.display(), first.shard, p.dir.display(), p.shard)));
        }
    }
    let mut slots: Vec<Option<Part>> = (0..n).map(|_| None).collect();
    let given = parts.len();
    for p in parts {
        if let Some(q) = &slots[p.shard.index] {
            return Err(Error::input(format!("shard {} is given twice: {} and {}", p.shard, q.dir.display(), p.dir.display())));
        }
        let i = p.shard.index;
        slots[i] = Some(p);
    }
    if let Some(i) = slots.iter().position(Option::is_none) {
        return Err(Error::input(format!("shard {i}/{n} is missing ({given} of {n} shards given)")));
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Combines the parts of a sweep (the output directories of `patch --shard I/N`, in any order)
/// into the files of the whole run in `out`: checks that they are all the parts of one sweep,
/// each complete, with no experiment in two parts and none missing; writes the outputs
/// ([`write_outputs`]) and the manifest of the whole run (`command_line` and each part's
/// provenance and timing under `shards`). Returns the number of parts and of experiments.
pub fn merge_parts(dirs: &[PathBuf], out: &Path, command_line: Vec<String>) -> Result<(usize, usize)> {
    let parts = read_parts(dirs, "patch")?;
    let first = &parts[0];
    let n = first.shard.count;
    if let Some(p) = parts.iter().find(|p| p.manifest["method"] != first.manifest["method"]) {
        let method = |p: &Part| p.manifest["method"].as_str().unwrap_or("?").to_string();
        return Err(Error::input(format!("{} ran --method {} and {} --method {}: merge shards of one method", first.dir.display(), method(first), p.dir.display(), method(p))));
    }
    let total = first.manifest["sweep_experiments"].as_u64().ok_or_else(|| Error::file(first.dir.join("manifest.json"), "no `sweep_experiments`"))? as usize;
    let mut owner: HashMap<usize, &Part> = HashMap::new();
    let mut all: Vec<Done> = Vec::with_capacity(total);
    for p in &parts {
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
    let jsonl = out.join("experiments.jsonl");
    if jsonl.exists() {
        return Err(Error::input(format!("{} exists: choose another --out", jsonl.display())));
    }
    let _lock = crate::io::OutLock::acquire(out)?;
    let units: Option<Vec<usize>> = serde_json::from_value(first.manifest["sweep"]["units"].clone()).unwrap_or(None);
    write_outputs(out, all, units.as_deref())?;

    // The manifest of the whole run, with each shard's own provenance and timings.
    let mut devices: Vec<&Value> = Vec::new();
    for p in &parts {
        if !devices.contains(&&p.manifest["device"]) {
            devices.push(&p.manifest["device"]);
        }
    }
    let mut manifest = first.manifest.clone();
    manifest["command_line"] = json!(command_line);
    manifest["device"] = if devices.len() == 1 { devices[0].clone() } else { json!(devices) };
    manifest["shard"] = Value::Null;
    manifest["experiments"] = json!(total);
    manifest["done"] = json!(total);
    manifest["complete"] = json!(true);
    manifest["seconds"] = json!(parts.iter().filter_map(|p| p.manifest["seconds"].as_f64()).sum::<f64>());
    manifest["shards"] = parts
        .iter()
        .map(|p| {
            let m = &p.manifest;
            json!({"shard": p.shard.to_string(), "dir": p.dir.display().to_string(), "experiments": m["experiments"], "seconds": m["seconds"], "device": m["device"], "command_line": m["command_line"], "patchbay_version": m["patchbay_version"]})
        })
        .collect();
    write_manifest(&out.join("manifest.json"), &manifest)?;
    Ok((n, total))
}
