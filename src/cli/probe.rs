//! `patchbay probe`: the whole probing pipeline, from a dataset to the plots.
//!
//! Stages (each with its progress bar; the run is resumable: re-running the same command
//! continues where a killed run stopped): 1. dataset: load and check the file; 2. tokenize:
//! render the template, encode (here); then capture, score, probe and outputs
//! (`experiments::probe::pipeline`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, encode_dataset};
use super::{progress_bar};
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::template::TokenStats;
use patchbay::experiments::dataset_files::dataset_json;
use patchbay::experiments::Reporter;
use patchbay::experiments::probe::ProbeParams;
use patchbay::experiments::probe::pipeline::{self, ProbeInputs, ProbeSettings};
use patchbay::experiments::shards::ShardSpec;
use patchbay::io::OutDtype;
use patchbay::learn::logreg::LogRegParams;
use patchbay::learn::penalty::{ALPHA_GRID, C_GRID, Penalty};
use patchbay::learn::split::Eval;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site};
use patchbay::{Error, Result};

const PROBE_HELP: &str = "Examples:
  patchbay probe --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness --numeric-cols pleasantness,control --sites attn_out,mlp_out,resid_post --positions -1..-5 --out runs/probe
  patchbay probe --model ~/models/Llama-3.2-1B --dataset ../shared/data/envent/envent_gen.csv --preset envent --template tak --shots tak --sites attn_out,mlp_out,resid_post --positions -1..-5 --only-correct --out runs/envent
  patchbay probe --model M --dataset d.jsonl --text-col text --label-col none --numeric-cols valence --sites 'blocks.*.hook_resid_post' --positions -1 --folds 5 --out runs/valence

Stages: dataset, tokenize, capture (OUT/acts/shard-*.safetensors, bounded memory: --shard-mb),
score (OUT/scores.jsonl, score.json, confusion.csv and .png), probe (OUT/probes/<site>.json and
<site>.safetensors: weights acting on raw activations), outputs (OUT/probe_results.csv with
site,layer,position,metric,value,ci_low,ci_high,n; OUT/accuracy_by_layer.png;
OUT/appraisal_r2.png; OUT/manifest.json; OUT/splits.json). Re-running the same command
continues a killed run; --overwrite discards a different earlier capture in OUT.

Probes: multinomial logistic regression (L2, C) for the label and ridge regression (alpha) for
every numeric column, the objectives of scikit-learn's LogisticRegression and Ridge, on
features standardised on the training rows (unless --no-standardize). Evaluation: stratified
held-out split (--test-fraction, default) or --folds K; CIs are 95% bootstrap intervals over
the evaluated examples.

Regularisation: --C auto / --alpha auto (or a grid: --alpha 1,10,100) choose the penalty for
every fit on its training rows only, by --inner-folds K cross-validation, as scikit-learn's
GridSearchCV / RidgeCV(cv=K) / LogisticRegressionCV do: the best mean inner-fold accuracy
(classifier) or mean squared error (each numeric column separately), the smaller value on a tie.
The choices go to OUT/regularisation.csv (site,layer,position,penalty,fit,value; fit `fold F`
or `all` for the model k-fold evaluation refits on every example) and to the weight files'
metadata. With many features and few rows the default alpha 1 overfits (negative R^2): use auto.

Positions: -1..-5 is the last five tokens (-1,-2,-3,-4,-5); lists like -1,-3 and absolute
positions (0,3) work too.";

#[derive(Args)]
#[command(after_help = PROBE_HELP)]
pub struct ProbeArgs {
    #[command(flatten)]
    inputs: InputArgs,
    /// Label set (comma-separated) for scoring; gold labels must be among them [default: the dataset's labels].
    #[arg(long)]
    labels: Option<String>,
    /// Do not score the model's own predictions (no label tokens needed).
    #[arg(long)]
    no_score: bool,
    /// Probe only the examples the model predicts correctly (as the study does).
    #[arg(long, conflicts_with = "no_score")]
    only_correct: bool,
    /// Also write the correctly predicted examples to this file (JSONL).
    #[arg(long, conflicts_with = "no_score")]
    keep_correct: Option<PathBuf>,
    /// Sites: short names (all layers), TransformerLens names or globs.
    #[arg(long, default_value = "resid_post")]
    sites: String,
    /// Positions: -1..-5, -1,-2 or absolute 0,3.
    #[arg(long, allow_hyphen_values = true, default_value = "-1")]
    positions: String,
    /// K-fold evaluation instead of a held-out split.
    #[arg(long)]
    folds: Option<usize>,
    /// Fraction of each class held out for testing.
    #[arg(long, default_value_t = 0.2, conflicts_with = "folds")]
    test_fraction: f64,
    /// Seed of the split and the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inverse L2 strength of the logistic regression (scikit-learn's C): a number, `auto`
    /// (chosen from 0.001,0.01,0.1,1,10,100 by inner cross-validation on each fit's training
    /// rows), or a comma-separated grid to choose from.
    #[arg(long = "C", default_value = "1", allow_hyphen_values = true)]
    c: String,
    /// L2 strength of the ridge regression (scikit-learn's alpha): a number, `auto` (chosen per
    /// numeric column from 0.1,1,...,1e5 by inner cross-validation), or a comma-separated grid.
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    alpha: String,
    /// Inner folds (stratified by label) that choose an `auto` or grid --C / --alpha.
    #[arg(long, default_value_t = 5)]
    inner_folds: usize,
    /// Iteration cap of the logistic regression (L-BFGS).
    #[arg(long, default_value_t = 500)]
    max_iter: usize,
    /// Gradient tolerance of the logistic regression.
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
    /// Fit on raw activations (default: standardised on the training rows).
    #[arg(long)]
    no_standardize: bool,
    /// Bootstrap resamples of the confidence intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Element type of the captured activations.
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    dtype: OutDtype,
    /// Cap on the size of one capture shard, in MiB (fractions allowed): the capture's memory bound.
    #[arg(long, default_value_t = 256.0)]
    shard_mb: f64,
    /// Position of the appraisal heatmap [default: the first of --positions].
    #[arg(long, allow_hyphen_values = true)]
    heatmap_position: Option<i64>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Discard an earlier, different capture in OUT instead of refusing.
    #[arg(long)]
    overwrite: bool,
    /// Stop after the capture and the scores (no probes).
    #[arg(long)]
    capture_only: bool,
    /// Stop the capture after writing N shards (as if killed; for tests).
    #[arg(long, hide = true)]
    stop_after_shards: Option<usize>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let started = Instant::now();
    let mut timings = serde_json::Map::new();
    let mut lap = {
        let mut t = Instant::now();
        move |name: &str, timings: &mut serde_json::Map<String, serde_json::Value>| {
            timings.insert(name.to_string(), json!(t.elapsed().as_secs_f64()));
            t = Instant::now();
        }
    };
    let say = |s: String| {
        if !a.quiet {
            eprintln!("{s}");
        }
    };
    if a.inputs.data.dataset.is_none() {
        return Err(Error::input("--dataset is required"));
    }
    if a.shard_mb.is_nan() || a.shard_mb <= 0.0 {
        return Err(Error::input("--shard-mb must be positive"));
    }
    let c = Penalty::parse("C", &a.c, &C_GRID)?;
    let alpha = Penalty::parse("alpha", &a.alpha, &ALPHA_GRID)?;
    if a.inner_folds < 2 {
        return Err(Error::input(format!("--inner-folds {}: need at least 2", a.inner_folds)));
    }
    // ---- dataset ----
    let model = Model::load(&a.inputs.model)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let cfg = &model.cfg;
    let sites = Site::parse_spec(&a.sites, cfg)?;
    let positions = match Positions::parse(&a.positions)? {
        Positions::List(l) => l,
        Positions::All => return Err(Error::input("--positions all: probes need fixed positions (e.g. -1..-5)")),
    };
    let tok = PromptTokenizer::load(&a.inputs.model)?;
    let names = a.labels.as_deref().map(|l| parse_list(l, "label")).transpose()?;
    let ds = a.inputs.data.load(names.clone())?.ok_or_else(|| Error::input("--dataset is required"))?;
    let template = a.inputs.template.template()?;
    say(format!("dataset: {} examples from {} ({} rows read)", ds.examples.len(), ds.spec.path.display(), ds.rows_read));
    lap("dataset", &mut timings);

    // ---- tokenize ----
    let prompts = encode_dataset(&ds, &template, &tok, a.quiet)?;
    let stats = TokenStats::of(&prompts);
    say(format!("tokens: {}", stats.describe()));
    let need = positions.iter().map(|&p| if p < 0 { (-p) as usize } else { p as usize + 1 }).max().unwrap_or(1);
    if let Some((e, p)) = ds.examples.iter().zip(&prompts).find(|(_, p)| p.len() < need) {
        return Err(Error::input(format!("{}: row {}: the prompt has {} tokens; positions {} need at least {need}", ds.spec.path.display(), e.row, p.len(), a.positions)));
    }
    lap("tokenize", &mut timings);

    // ---- labels ----
    let has_labels = ds.spec.label_column.is_some();
    let class_names: Vec<String> = match (&names, has_labels) {
        (Some(n), _) => n.clone(),
        (None, true) => ds.label_values(),
        (None, false) => Vec::new(),
    };
    let label_set = if has_labels && !a.no_score { Some(LabelSet::resolve(&class_names, &tok)?) } else { None };
    if (a.only_correct || a.keep_correct.is_some()) && label_set.is_none() {
        return Err(Error::input("--only-correct / --keep-correct need gold labels (a label column) and scoring"));
    }
    let settings = ProbeSettings {
        sites_text: a.sites.clone(),
        capture: ShardSpec {
            sites,
            positions: positions.clone(),
            label_token_ids: label_set.as_ref().map_or(Vec::new(), |l| l.token_ids.clone()),
            dtype: a.dtype,
            batch_size: a.batch_size,
            shard_bytes: (a.shard_mb * 1024.0 * 1024.0) as usize,
        },
        positions,
        only_correct: a.only_correct,
        keep_correct: a.keep_correct.clone(),
        params: ProbeParams {
            eval: match a.folds {
                Some(k) => Eval::KFold(k),
                None => Eval::Holdout(a.test_fraction),
            },
            seed: a.seed,
            c,
            logreg: LogRegParams { max_iter: a.max_iter, tol: a.tol },
            alpha,
            inner_folds: a.inner_folds,
            standardize: !a.no_standardize,
            bootstrap: a.bootstrap,
        },
        heatmap_position: a.heatmap_position,
        out: a.out.clone(),
        overwrite: a.overwrite,
        capture_only: a.capture_only,
        stop_after_shards: a.stop_after_shards,
    };
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let inputs = ProbeInputs {
        model: &model,
        engine: engine.as_ref(),
        ds: &ds,
        prompts: &prompts,
        label_set,
        class_names,
        provenance: json!({"dataset": dataset_json(&ds), "template": template, "token_stats": stats}),
    };
    let bar = |len: u64, what: &str, unit: &str| progress_bar(len, what, unit, a.quiet);
    pipeline::run(&inputs, &settings, started, timings, &Reporter { bar: &bar, say: &say })?;
    Ok(())
}
