//! `patchbay patch`: activation-patching sweeps (the Tak et al. protocol and general sweeps),
//! whole or in shards (`--shard i/n`, combined by `patchbay merge`).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, dataset_json};
use super::{load_engine, parse_bytes, progress_bar};
use patchbay::experiments::patch::{Experiment, ExperimentResult, Method, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep, summarize, summary_csv, summary_grid, target_groups, GROUP_TARGETS};
use patchbay::model::Model;
use patchbay::rng::{self, PairsOf};
use patchbay::sites::{Positions, SiteKind};
use patchbay::{Error, Result};

const PATCH_HELP: &str = "Examples:
  patchbay patch --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness \\
      --random-pairs 200 --seed 0 --different-labels --sites attn_out,mlp_out,resid_post --window 5 --out runs/patch
  patchbay patch --model M --token-ids ids.json --label-token-ids 11,42,97 --pairs pairs.jsonl --sites z --heads 3 --window 1 --out runs/z3
  # the same sweep in 4 shards (e.g. a Slurm array: --shard $SLURM_ARRAY_TASK_ID/4), then merged:
  patchbay patch --model M --dataset emotions.csv --template tak --random-pairs 200 --different-labels --shard 0/4 --out runs/p0
  patchbay merge --out runs/patch runs/p0 runs/p1 runs/p2 runs/p3

Prompts: a dataset rendered through --template (the dataset options of `patchbay score`; prompt i
is the i-th example left after --filter/--limit), or --token-ids. Labels: --labels (default: the
dataset's gold labels) or --label-token-ids. Pairs: --pairs FILE of prompt indices, or
--random-pairs N (source != target; with --different-labels, gold labels differ too).

Every (pair, site, window centre) is one experiment: the site is patched at the window's layers, at
--positions of the target, with the source prompt's clean activations at the same relative positions;
the label logits are read at the target's last token. `--method resumed` (default) runs one clean pass
per prompt and resumes each experiment from its first patched layer and position; `--method naive`
runs one full forward per experiment (the oracle; same numbers).

Output in --out: experiments.jsonl (one object per experiment; appended as they complete, sorted by
id when the run completes), summary.csv (site x centre: n, flip rate with Wilson 95% interval, mean
logit difference with 95% interval), heatmap.png (flip rate, site x centre) and manifest.json. A
killed run continues with --resume: finished experiments are kept, the rest are run.

--shard i/n runs part i (0-based) of the sweep: whole groups of targets (the resumed method's unit
of computation, up to 64 targets under --mem-budget; nothing is batched across groups), balanced
by experiment count. `patchbay merge` checks that the shards are all the parts of one sweep and
writes the files of the unsharded run, byte for byte (--batch-rows and --mem-budget are part of
the sweep: give every shard the same).";

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Resumed,
    Naive,
}

#[derive(Args)]
#[command(after_help = PATCH_HELP)]
pub struct PatchArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// JSONL file of {"source": i, "target": j} (prompt indices).
    #[arg(long, required_unless_present = "random_pairs", conflicts_with = "random_pairs")]
    pairs: Option<PathBuf>,
    /// N random (source, target) pairs with source != target.
    #[arg(long)]
    random_pairs: Option<usize>,
    /// Seed of --random-pairs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --random-pairs: only pairs whose gold labels differ (needs a dataset with labels).
    #[arg(long, conflicts_with = "pairs")]
    different_labels: bool,
    #[command(flatten)]
    sweep: SweepArgs,
    /// resumed: one clean pass per prompt, experiments resumed from it; naive: a full forward each.
    #[arg(long, value_enum, default_value_t = MethodArg::Resumed)]
    method: MethodArg,
    /// Rows per batched resumed forward.
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// Memory for the kept clean runs of one target group (KV caches and residuals), e.g. 2G.
    #[arg(long, default_value = "2G")]
    mem_budget: String,
    /// Run part I of N of the sweep (0 <= I < N), e.g. 0/4; combine the parts with `patchbay merge`.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue a killed run in --out.
    #[arg(long)]
    resume: bool,
    /// Stop after N experiments of this run (for testing --resume).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// What a sweep patches: site kinds, units, windows, centres and positions.
#[derive(Args, Clone)]
pub struct SweepArgs {
    /// Site kinds patched (short names: resid_pre, attn_out, mlp_out, resid_post, z, mlp_post, ...).
    #[arg(long, default_value = "attn_out,mlp_out,resid_post")]
    pub sites: String,
    /// Heads patched at head sites (z, q, ...), comma-separated; default all.
    #[arg(long, conflicts_with = "neurons")]
    pub heads: Option<String>,
    /// Neurons patched at mlp_post, comma-separated; default all.
    #[arg(long)]
    pub neurons: Option<String>,
    /// Layers patched at once: a window centred on each centre layer.
    #[arg(long, default_value_t = 5)]
    pub window: usize,
    /// Centre layers, e.g. 2,3,4; default every centre where the window fits.
    #[arg(long)]
    pub layers: Option<String>,
    /// Positions patched (relative -1 = last token, or absolute).
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    pub positions: String,
}

impl SweepArgs {
    /// The sweep on a model of `n_layers` layers, reading the logits of `label_tokens`.
    pub fn spec(&self, n_layers: usize, label_tokens: Vec<u32>) -> Result<SweepSpec> {
        let sites = self.sites.split(',').map(|s| SiteKind::from_short_name(s.trim()).ok_or_else(|| Error::input(format!("unknown site kind `{s}`")))).collect::<Result<Vec<_>>>()?;
        let units = match (&self.heads, &self.neurons) {
            (Some(h), _) => Some(usize_list(h, "head")?),
            (_, Some(n)) => Some(usize_list(n, "neuron")?),
            _ => None,
        };
        let positions = match Positions::parse(&self.positions)? {
            Positions::List(l) => l,
            Positions::All => return Err(Error::input("--positions all is not supported for patching: give a list such as -1")),
        };
        let centers = match &self.layers {
            Some(l) => usize_list(l, "layer")?,
            None => all_centers(self.window, n_layers),
        };
        Ok(SweepSpec { sites, units, window: self.window, centers, positions, label_tokens })
    }
}

/// Part `index` of `count` of a sweep (`--shard i/n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::input(format!("shard `{s}`: expected I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The ids of this shard's experiments: whole target groups of the resumed method
    /// (`target_groups`: nothing is batched across groups, so a shard computes its experiments
    /// bit for bit as the unsharded run does, and each clean target pass runs in one shard),
    /// dealt largest first (ties: lower group) to the least-loaded shard (ties: lower index).
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

fn usize_list(spec: &str, what: &str) -> Result<Vec<usize>> {
    spec.split(',').map(|s| s.trim().parse().map_err(|_| Error::input(format!("{what} `{s}` is not a non-negative integer")))).collect()
}

fn read_pairs(path: &Path, n_prompts: usize) -> Result<Vec<Pair>> {
    let text = String::from_utf8(patchbay::error::read_file(path)?).map_err(|_| Error::file(path, "not UTF-8"))?;
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

/// `n` random (source, target) pairs of distinct prompts ([`rng::random_pairs`], seeded). With
/// `gold` (each prompt's gold label), only labelled prompts take part and the two labels differ.
fn random_pairs(n_prompts: usize, n: usize, seed: u64, gold: Option<&[Option<String>]>) -> Result<Vec<Pair>> {
    let of = match gold {
        None => PairsOf::Items(n_prompts),
        Some(gold) => PairsOf::Keys(gold),
    };
    Ok(rng::random_pairs(of, seed)?.take(n).map(|(source, target)| Pair { source, target }).collect())
}

/// One finished experiment: the parsed result and its line as written.
pub struct Done {
    pub result: ExperimentResult,
    pub line: String,
}

/// Results in an experiments.jsonl (none when it does not exist). A torn last line (a killed
/// write) is an error, or with `cut_torn` cut off the file.
pub fn read_done(path: &Path, cut_torn: bool) -> Result<Vec<Done>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = patchbay::error::read_file(path)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        if !cut_torn {
            return Err(Error::file(path, "the last line is cut short (a killed run)"));
        }
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(complete as u64).map_err(|e| Error::io(path, e))?;
    }
    let text = String::from_utf8_lossy(&bytes[..complete]);
    text.lines()
        .enumerate()
        .map(|(i, l)| Ok(Done { result: serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))?, line: l.to_string() }))
        .collect()
}

/// The outputs of a finished sweep (or merged shards) in `out`: experiments.jsonl rewritten
/// sorted by id (atomically), summary.csv and heatmap.png (when there are results).
pub fn write_outputs(out: &Path, mut done: Vec<Done>) -> Result<()> {
    done.sort_by_key(|d| d.result.id);
    let text: String = done.iter().map(|d| format!("{}\n", d.line)).collect();
    patchbay::io::write_atomic(&out.join("experiments.jsonl"), text.as_bytes())?;
    let results: Vec<ExperimentResult> = done.into_iter().map(|d| d.result).collect();
    let summary = summarize(&results);
    patchbay::io::write_atomic(&out.join("summary.csv"), summary_csv(&summary).as_bytes())?;
    if !summary.is_empty() {
        patchbay::io::plot::heatmap(&out.join("heatmap.png"), &summary_grid(&summary))?;
    }
    Ok(())
}

/// Reads a manifest.json.
pub fn read_manifest(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(&patchbay::error::read_file(path)?).map_err(|e| Error::file(path, e.to_string()))
}

pub fn write_manifest(path: &Path, manifest: &serde_json::Value) -> Result<()> {
    patchbay::io::write_atomic(path, serde_json::to_string_pretty(manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())
}

pub fn run(a: PatchArgs) -> Result<()> {
    let t0 = Instant::now();
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let prompts = &p.ids;
    let labels = &p.labels;
    let model = Model::load(&a.inputs.model)?;
    let engine = load_engine(&model, a.inputs.device)?;
    let cfg = &model.cfg;
    labels.check_vocab(cfg.vocab_size)?;
    let pairs = match (&a.pairs, a.random_pairs) {
        (Some(file), _) => read_pairs(file, prompts.len())?,
        (None, Some(n)) => {
            let gold: Option<Vec<Option<String>>> = match (a.different_labels, &p.dataset) {
                (false, _) => None,
                (true, None) => return Err(Error::input("--different-labels needs a dataset with gold labels (not --token-ids)")),
                (true, Some(ds)) if ds.spec.label_column.is_none() => return Err(Error::input("--different-labels: the dataset has no label column (give --label-col)")),
                (true, Some(ds)) => Some(ds.examples.iter().map(|e| e.label.clone()).collect()),
            };
            random_pairs(prompts.len(), n, a.seed, gold.as_deref())?
        }
        (None, None) => return Err(Error::input("give --pairs FILE or --random-pairs N")),
    };
    let spec = a.sweep.spec(cfg.n_layers, labels.token_ids.clone())?;
    let all_exps = experiments(&pairs, &spec, cfg.n_layers)?;
    let total = all_exps.len();
    let mem_budget = parse_bytes(&a.mem_budget)?;
    // Every experiment goes to run_sweep (its batches are formed from the whole sweep); those of
    // other shards are skipped like finished ones.
    let mine: HashSet<usize> = match a.shard {
        Some(s) => {
            let groups = target_groups(engine.as_ref(), prompts, &all_exps, mem_budget);
            if groups.len() < s.count {
                return Err(Error::input(format!(
                    "the sweep has {} target group(s) (up to {GROUP_TARGETS} targets each, under --mem-budget), fewer than {} shards: use at most {} shards",
                    groups.len(),
                    s.count,
                    groups.len()
                )));
            }
            s.select(&groups, &all_exps)
        }
        None => all_exps.iter().map(|e| e.id).collect(),
    };
    let n_mine = mine.len();

    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let jsonl = a.out.join("experiments.jsonl");
    let sweep_id = json!({"model_config_sha256": model.config_hash, "prompts": prompts, "pairs": pairs, "sites": a.sweep.sites, "units": spec.units, "window": spec.window, "centers": spec.centers, "positions": spec.positions, "labels": labels.token_ids, "batch_rows": a.batch_rows, "mem_budget": mem_budget});
    let shard = a.shard.map(|s| s.to_string());
    let manifest_path = a.out.join("manifest.json");
    if jsonl.exists() {
        if !a.resume {
            return Err(Error::input(format!("{} exists: add --resume to continue it, or choose another --out", jsonl.display())));
        }
        let old = read_manifest(&manifest_path)?;
        if old.get("sweep") != Some(&sweep_id) {
            return Err(Error::input(format!("{} holds a different sweep (model, prompts, pairs or settings differ): choose another --out", a.out.display())));
        }
        if old.get("shard").unwrap_or(&serde_json::Value::Null) != &json!(shard) {
            return Err(Error::input(format!("{} holds shard {} of this sweep, not {}: choose another --out", a.out.display(), old["shard"].as_str().unwrap_or("(whole)"), shard.as_deref().unwrap_or("the whole sweep"))));
        }
    }
    let (method, method_name) = match a.method {
        MethodArg::Resumed => (Method::Resumed, "resumed"),
        MethodArg::Naive => (Method::Naive, "naive"),
    };
    let manifest = |done: usize, seconds: f64| {
        json!({
            "command": "patch",
            "patchbay_version": env!("CARGO_PKG_VERSION"),
            "command_line": std::env::args().collect::<Vec<_>>(),
            "model": model.dir.display().to_string(),
            "device": engine.device_name(),
            "method": method_name,
            "seed": a.seed,
            "labels": labels.names,
            "dataset": p.dataset.as_ref().map(dataset_json),
            "token_ids": a.labels.token_ids.as_ref().map(|p| p.display().to_string()),
            "template": p.template,
            "shard": shard,
            "sweep_experiments": total,
            "experiments": n_mine,
            "done": done,
            "complete": done == n_mine,
            "seconds": seconds,
            "sweep": sweep_id,
        })
    };
    let save_manifest = |done: usize| write_manifest(&manifest_path, &manifest(done, t0.elapsed().as_secs_f64()));
    let done = read_done(&jsonl, true)?;
    save_manifest(done.len())?;
    let done_ids: HashSet<usize> = done.iter().map(|d| d.result.id).collect();
    let skip: HashSet<usize> = all_exps.iter().map(|e| e.id).filter(|id| done_ids.contains(id) || !mine.contains(id)).collect();

    let bar = progress_bar((n_mine - done_ids.len()) as u64, "patch", "experiments", a.quiet);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
    let settings = RunSettings {
        method,
        skip: &skip,
        batch_rows: a.batch_rows,
        mem_budget,
        progress: &bar,
    };
    let mut written = 0usize;
    let outcome = run_sweep(engine.as_ref(), prompts, &spec, &all_exps, &settings, &mut |r| {
        if a.stop_after.is_some_and(|n| written >= n) {
            return Err(Error::input("stopped (--stop-after)"));
        }
        let line = serde_json::to_string(&r).map_err(|e| Error::input(e.to_string()))? + "\n";
        file.write_all(line.as_bytes()).and_then(|_| file.flush()).map_err(|e| Error::io(&jsonl, e))?;
        written += 1;
        Ok(())
    });
    bar.finish_and_clear();
    drop(file);
    let all = read_done(&jsonl, true)?;
    let n_done = all.len();
    if outcome.is_ok() {
        write_outputs(&a.out, all)?;
    }
    save_manifest(n_done)?;
    outcome?;
    if !a.quiet {
        let part = a.shard.map_or(String::new(), |s| format!(" (shard {s} of a sweep of {total})"));
        eprintln!("{n_done} experiments{part}, {written} this run, in {:.1} s; results in {}", t0.elapsed().as_secs_f64(), a.out.display());
    }
    Ok(())
}
