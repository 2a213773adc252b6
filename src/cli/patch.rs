//! `patchbay patch`: activation-patching sweeps (the Tak et al. protocol and general sweeps),
//! whole or in shards (`--shard i/n`, combined by `patchbay merge`).

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts};
use super::{parse_bytes, progress_bar};
use patchbay::experiments::dataset_files::dataset_json;
use patchbay::experiments::patch::{Method, Overflow, SweepSpec, experiments};
use patchbay::experiments::patch_files::{DirRun, SweepPart, random_pairs, read_pairs, run_to_dir};
use patchbay::model::Model;
use patchbay::sites::SiteKind;
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
--random-pairs N: N distinct pairs, source != target (asking for more than exist is an error saying
how many exist); with --different-labels (= gold) the two gold labels differ, with
--different-labels pred the model's two predictions differ (pairs it already predicts alike can
never flip); --only-correct draws only prompts the model predicts correctly (needs gold labels).

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

/// Which labels `--different-labels` compares.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LabelsBy {
    Gold,
    Pred,
}

/// How the resumed method batches and holds clean runs (`patch`, `bench patch`, `cost patch`).
#[derive(Args)]
pub struct ResumedArgs {
    /// Rows per batched resumed forward.
    #[arg(long, default_value_t = 256)]
    pub batch_rows: usize,
    /// Memory for the targets' kept clean runs (KV caches and residuals), e.g. 2G.
    #[arg(long, default_value = "2G")]
    mem_budget: String,
    /// Where the targets' clean runs beyond --mem-budget come from: auto (whichever the cost
    /// model finds faster: spill on a CPU unless the model is tiny, recompute on a GPU), spill
    /// (written once to a temporary file in $TMPDIR, read back when their group comes), or
    /// recompute (run again when their group comes). The manifest's clean_runs says which.
    #[arg(long, value_enum, default_value_t = OverflowArg::Auto)]
    overflow: OverflowArg,
}

/// `--overflow`.
#[derive(Clone, Copy, ValueEnum)]
enum OverflowArg {
    Auto,
    Spill,
    Recompute,
}

impl ResumedArgs {
    /// The memory budget in bytes and where the clean runs beyond it come from.
    pub fn memory(&self) -> Result<(usize, Overflow)> {
        let overflow = match self.overflow {
            OverflowArg::Auto => Overflow::Auto,
            OverflowArg::Spill => Overflow::Spill,
            OverflowArg::Recompute => Overflow::Recompute,
        };
        Ok((parse_bytes(&self.mem_budget)?, overflow))
    }
}

/// `--method` of `patch` and `ablate`.
#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Resumed,
    Naive,
}

impl MethodArg {
    /// The method and its name in manifests.
    pub fn method(self) -> (Method, &'static str) {
        match self {
            MethodArg::Resumed => (Method::Resumed, "resumed"),
            MethodArg::Naive => (Method::Naive, "naive"),
        }
    }
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
    /// N distinct random (source, target) pairs with source != target (more than exist is an error).
    #[arg(long)]
    random_pairs: Option<usize>,
    /// Seed of --random-pairs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --random-pairs: only pairs of different labels: gold (the dataset's labels; the default of a bare --different-labels) or pred (the model's predictions over the label set).
    #[arg(long, conflicts_with = "pairs", value_enum, num_args = 0..=1, default_missing_value = "gold", value_name = "gold|pred")]
    different_labels: Option<LabelsBy>,
    /// With --random-pairs: only prompts the model predicts correctly over the label set (needs gold labels), as Tak et al. patch.
    #[arg(long, conflicts_with = "pairs")]
    only_correct: bool,
    #[command(flatten)]
    sweep: SweepArgs,
    /// resumed: one clean pass per prompt, experiments resumed from it; naive: a full forward each.
    #[arg(long, value_enum, default_value_t = MethodArg::Resumed)]
    method: MethodArg,
    #[command(flatten)]
    memory: ResumedArgs,
    /// Run part I of N of the sweep (0 <= I < N), e.g. 0/4; combine the parts with `patchbay merge`.
    #[arg(long, value_name = "I/N")]
    shard: Option<SweepPart>,
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

/// What a sweep patches: site kinds, units, windows, centres and positions (the flags of
/// `patch`, `cost patch` and `bench patch`).
#[derive(Args, Clone)]
pub struct SweepArgs {
    /// Site kinds patched (short names: resid_pre, attn_out, mlp_out, resid_post, z, mlp_post, ...), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "attn_out,mlp_out,resid_post")]
    pub sites: Vec<String>,
    /// Heads patched at head sites (z, q, ...), comma-separated; default all.
    #[arg(long, value_delimiter = ',', conflicts_with = "neurons")]
    pub heads: Option<Vec<usize>>,
    /// Neurons patched at mlp_post, comma-separated; default all.
    #[arg(long, value_delimiter = ',')]
    pub neurons: Option<Vec<usize>>,
    /// Layers patched at once: a window centred on each centre layer.
    #[arg(long, default_value_t = 5)]
    pub window: usize,
    /// Centre layers, e.g. 2,3,4; default every centre where the window fits.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Positions patched (relative -1 = last token, or absolute).
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    pub positions: String,
}

impl SweepArgs {
    /// The sweep on a model of `n_layers` layers, reading the logits of `label_tokens`.
    /// `--heads` only where every site kind has heads, `--neurons` only at neuron sites: a unit
    /// list applies to every site kind of the sweep, and would select something else elsewhere
    /// (the dimensions of resid_post, the neurons of mlp_post).
    pub fn spec(&self, n_layers: usize, label_tokens: Vec<u32>) -> Result<SweepSpec> {
        let spec = SweepSpec::new(&self.sites, self.heads.clone().or_else(|| self.neurons.clone()), self.window, self.layers.clone(), &self.positions, n_layers, label_tokens)?;
        for (flag, given, units) in [("--heads", self.heads.is_some(), &["head", "kv head"][..]), ("--neurons", self.neurons.is_some(), &["neuron"][..])] {
            if let Some(bad) = spec.sites.iter().find(|k| given && !units.contains(&k.unit_name())) {
                let fit: Vec<&str> = SiteKind::ALL.iter().filter(|k| units.contains(&k.unit_name())).map(|k| k.short_name()).collect();
                return Err(Error::input(format!("{flag} applies to sites with {}s ({}); `{}` has none: patch it in a separate run without {flag}", units[0], fit.join(", "), bad.short_name())));
            }
        }
        Ok(spec)
    }

    /// --sites as given (manifests record it so).
    pub fn sites_text(&self) -> String {
        self.sites.join(",")
    }
}

pub fn run(a: PatchArgs) -> Result<()> {
    let started = Instant::now();
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let prompts = &p.ids;
    let labels = &p.labels;
    let model = Model::load(&a.inputs.model)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let cfg = &model.cfg;
    labels.check_vocab(cfg.vocab_size)?;
    let pairs = match (&a.pairs, a.random_pairs) {
        (Some(file), _) => read_pairs(file, prompts.len())?,
        (None, Some(n)) => {
            let needs_gold = a.only_correct || a.different_labels == Some(LabelsBy::Gold);
            let flag = if a.only_correct { "--only-correct" } else { "--different-labels" };
            let gold: Option<Vec<Option<String>>> = match (needs_gold, &p.dataset) {
                (false, _) => None,
                (true, None) => return Err(Error::input(format!("{flag} needs a dataset with gold labels (not --token-ids)"))),
                (true, Some(ds)) if ds.spec.label_column.is_none() => return Err(Error::input(format!("{flag}: the dataset has no label column (give --label-col)"))),
                (true, Some(ds)) => Some(ds.examples.iter().map(|e| e.label.clone()).collect()),
            };
            // The model's prediction of every prompt, when pairs are chosen by it.
            let pred: Option<Vec<String>> = if a.only_correct || a.different_labels == Some(LabelsBy::Pred) {
                let bar = progress_bar(prompts.len() as u64, "predict", "prompts", a.quiet);
                let batch = (a.memory.batch_rows / prompts.iter().map(Vec::len).max().unwrap_or(1)).max(1);
                let logits = patchbay::experiments::score::label_logits(engine.as_ref(), prompts, &labels, &[], batch, &bar)?;
                bar.finish_and_clear();
                Some(logits.chunks(labels.len()).map(|l| labels.names[patchbay::logits::argmax(l)].clone()).collect())
            } else {
                None
            };
            let mut keys: Option<Vec<Option<String>>> = match a.different_labels {
                None => None,
                Some(LabelsBy::Gold) => gold.clone(),
                Some(LabelsBy::Pred) => pred.as_ref().map(|p| p.iter().cloned().map(Some).collect()),
            };
            if let (true, Some(gold), Some(pred)) = (a.only_correct, &gold, &pred) {
                // Prompts predicted wrongly take no part (a key per prompt when labels may agree).
                let k = keys.get_or_insert_with(|| (0..prompts.len()).map(|i| Some(i.to_string())).collect());
                for (i, key) in k.iter_mut().enumerate() {
                    if gold[i].as_ref() != Some(&pred[i]) {
                        *key = None;
                    }
                }
            }
            random_pairs(prompts.len(), n, a.seed, keys.as_deref())?
        }
        (None, None) => return Err(Error::input("give --pairs FILE or --random-pairs N")),
    };
    let spec = a.sweep.spec(cfg.n_layers, labels.token_ids.clone())?;
    let all_exps = experiments(&pairs, &spec, cfg.n_layers)?;
    let (mem_budget, overflow) = a.memory.memory()?;
    let (method, method_name) = a.method.method();
    let run = DirRun {
        out: &a.out,
        started,
        method,
        batch_rows: a.memory.batch_rows,
        mem_budget,
        overflow,
        part: a.shard,
        resume: a.resume,
        stop_after: a.stop_after,
        sweep_id: spec.identity(&model.config_hash, prompts, &pairs, &a.sweep.sites_text(), a.memory.batch_rows, mem_budget, overflow),
        provenance: json!({
            "command": "patch",
            "patchbay_version": env!("CARGO_PKG_VERSION"),
            "command_line": std::env::args().collect::<Vec<_>>(),
            "model": model.dir.display().to_string(),
            "device": engine.device_name(),
            "method": method_name,
            "seed": a.seed,
            "different_labels": a.different_labels.map(|b| b.to_possible_value().map(|v| v.get_name().to_string())),
            "only_correct": a.only_correct,
            "labels": labels.names,
            "dataset": p.dataset.as_ref().map(dataset_json),
            "token_ids": a.labels.token_ids.as_ref().map(|p| p.display().to_string()),
            "template": p.template,
        }),
    };
    let bar = progress_bar(0, "patch", "experiments", a.quiet);
    let end = run_to_dir(engine.as_ref(), prompts, &spec, &all_exps, &run, &bar)?;
    if !a.quiet {
        let part = a.shard.map_or(String::new(), |s| format!(" (shard {s} of a sweep of {})", end.total));
        eprintln!("{} experiments{part}, {} this run, in {:.1} s; results in {}", end.done, end.written, started.elapsed().as_secs_f64(), a.out.display());
    }
    Ok(())
}
