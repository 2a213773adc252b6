//! `patchbay probe`: the whole probing pipeline, from a dataset to the plots.
//!
//! Stages (each with its progress bar; the run is resumable: re-running the same command
//! continues where a killed run stopped):
//! 1. dataset: load and check the file; 2. tokenize: render the template, encode;
//! 3. capture: sites x layers x positions (and the label logits) to sharded safetensors in
//!    OUT/acts; 4. score: the model's own predictions (OUT/scores.jsonl, score.json,
//!    confusion.csv); 5. probe: logistic/ridge probes per (site, layer, position) (OUT/probes/);
//! 6. outputs: OUT/probe_results.csv, OUT/accuracy_by_layer.png, OUT/appraisal_r2.png,
//!    OUT/manifest.json.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, dataset_json, encode_dataset, write_examples};
use super::{load_engine, progress_bar};
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::template::TokenStats;
use patchbay::experiments::probe::{ProbeParams, ProbeTargets, probes_dir, run_probes, write_results_csv};
use patchbay::experiments::score::Scores;
use patchbay::experiments::shards::{RunOptions, ShardSpec, capture_shards, read_label_logits};
use patchbay::io::OutDtype;
use patchbay::learn::logreg::LogRegParams;
use patchbay::learn::split::{Eval, Split};
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site};
use patchbay::{Error, Result};

const PROBE_HELP: &str = "Examples:
  patchbay probe --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness --numeric-cols pleasantness,control --sites attn_out,mlp_out,resid_post --positions -1..-5 --out runs/probe
  patchbay probe --model ~/models/Llama-3.2-1B --dataset ../shared/data/envent/envent_gen.csv --preset envent --template tak --shots tak --sites attn_out,mlp_out,resid_post --positions -1..-5 --only-correct --out runs/envent
  patchbay probe --model M --dataset d.jsonl --text-col text --label-col none --numeric-cols valence --sites 'blocks.*.hook_resid_post' --positions -1 --folds 5 --out runs/valence

Stages: dataset, tokenize, capture (OUT/acts/shard-*.safetensors, bounded memory: --shard-mb),
score (OUT/scores.jsonl, score.json, confusion.csv), probe (OUT/probes/<site>.json and
<site>.safetensors: weights acting on raw activations), outputs (OUT/probe_results.csv with
site,layer,position,metric,value,ci_low,ci_high,n; OUT/accuracy_by_layer.png;
OUT/appraisal_r2.png; OUT/manifest.json; OUT/splits.json). Re-running the same command
continues a killed run; --overwrite discards a different earlier capture in OUT.

Probes: multinomial logistic regression (L2, C) for the label and ridge regression (alpha) for
every numeric column, the objectives of scikit-learn's LogisticRegression and Ridge, on
features standardised on the training rows (unless --no-standardize). Evaluation: stratified
held-out split (--test-fraction, default) or --folds K; CIs are 95% bootstrap intervals over
the evaluated examples.

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
    /// Inverse L2 strength of the logistic regression (scikit-learn's C).
    #[arg(long = "C", default_value_t = 1.0)]
    c: f64,
    /// L2 strength of the ridge regression (scikit-learn's alpha).
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
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
    let t0 = Instant::now();
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
    if a.c.is_nan() || a.c <= 0.0 || a.alpha.is_nan() || a.alpha <= 0.0 {
        return Err(Error::input("--C and --alpha must be positive"));
    }
    // ---- dataset ----
    let model = Model::load(&a.inputs.model)?;
    let engine = load_engine(&model, a.inputs.device)?;
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
    let classes: Option<Vec<usize>> = has_labels.then(|| ds.examples.iter().map(|e| e.label.as_ref().and_then(|l| class_names.iter().position(|c| c == l)).unwrap_or(0)).collect());

    // ---- capture ----
    let acts = a.out.join("acts");
    let spec = ShardSpec {
        sites: sites.clone(),
        positions: positions.clone(),
        label_token_ids: label_set.as_ref().map_or(Vec::new(), |l| l.token_ids.clone()),
        dtype: a.dtype,
        batch_size: a.batch_size,
        shard_bytes: (a.shard_mb * 1024.0 * 1024.0) as usize,
    };
    let bar = progress_bar(prompts.len() as u64, "capture", "prompts", a.quiet);
    let run = capture_shards(engine.as_ref(), &model.dir.display().to_string(), &model.config_hash, &prompts, &spec, &acts, &RunOptions { overwrite: a.overwrite, stop_after: a.stop_after_shards }, &bar)?;
    bar.finish_and_clear();
    lap("capture", &mut timings);
    let capture_json = json!({
        "dir": acts.display().to_string(), "shards": run.meta.n_shards, "shard_rows": run.meta.shard_rows,
        "resumed_shards": run.resumed, "written_shards": run.written, "dtype": run.meta.dtype,
        "sites": run.meta.sites.len(), "positions": positions,
    });
    let mut manifest = json!({
        "command": "probe",
        "patchbay_version": env!("CARGO_PKG_VERSION"),
        "command_line": std::env::args().collect::<Vec<_>>(),
        "seed": a.seed,
        "model": {"path": model.dir.display().to_string(), "config_sha256": model.config_hash, "family": cfg.family.name(), "layers": cfg.n_layers, "d_model": cfg.d_model},
        "device": engine.device_name(),
        "dataset": dataset_json(&ds),
        "template": template,
        "token_stats": stats,
        "labels": label_set,
        "sites": a.sites,
        "positions": positions,
        "capture": capture_json,
    });
    let write_manifest = |m: &mut serde_json::Value, timings: &serde_json::Map<String, serde_json::Value>, status: &str| -> Result<()> {
        m["status"] = json!(status);
        m["timings_s"] = json!(timings);
        m["total_s"] = json!(t0.elapsed().as_secs_f64());
        m["peak_rss_bytes"] = json!(patchbay::io::tensorfile::peak_rss_bytes());
        patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(m).map_err(|e| Error::input(e.to_string()))?.as_bytes())
    };
    if !run.complete {
        write_manifest(&mut manifest, &timings, "capture incomplete")?;
        say(format!("capture stopped after {} of {} shards; run the same command again to continue", run.resumed + run.written, run.meta.n_shards));
        return Ok(());
    }
    say(format!("capture: {} shards of up to {} prompts in {} ({} resumed)", run.meta.n_shards, run.meta.shard_rows, acts.display(), run.resumed));

    // ---- score ----
    let mut selected: Vec<usize> = (0..ds.examples.len()).collect();
    if let Some(labels) = &label_set {
        let logits = read_label_logits(&acts, &run.meta)?;
        let gold: Vec<Option<usize>> = classes.as_ref().map_or(vec![None; prompts.len()], |c| c.iter().map(|&c| Some(c)).collect());
        let scores = Scores::new(labels.clone(), logits, gold);
        let rows: Vec<usize> = ds.examples.iter().map(|e| e.row).collect();
        scores.write(&a.out, Some(&rows))?;
        let correct: Vec<bool> = scores.correct().into_iter().map(|c| c == Some(true)).collect();
        if let Some(path) = &a.keep_correct {
            write_examples(path, &ds, &correct)?;
        }
        if a.only_correct {
            selected.retain(|&i| correct[i]);
        }
        manifest["score"] = json!({"accuracy": scores.accuracy(), "correct": correct.iter().filter(|&&c| c).count(), "n": scores.n()});
        say(format!("score: {}", scores.describe().lines().next().unwrap_or("")));
    }
    lap("score", &mut timings);
    if a.capture_only {
        write_manifest(&mut manifest, &timings, "captured")?;
        say(format!("captured {} prompts in {} ({:.1} s)", prompts.len(), acts.display(), t0.elapsed().as_secs_f64()));
        return Ok(());
    }
    write_manifest(&mut manifest, &timings, "probing")?;

    // ---- probe ----
    if selected.is_empty() {
        return Err(Error::input("no example to probe (--only-correct: the model gets none right)"));
    }
    let r = ds.spec.numeric_columns.len();
    let targets = ProbeTargets {
        examples: selected.clone(),
        class_names: class_names.clone(),
        classes: classes.as_ref().map(|c| selected.iter().map(|&i| c[i]).collect()),
        numeric_names: ds.spec.numeric_columns.clone(),
        numeric: selected.iter().flat_map(|&i| ds.examples[i].numeric.iter().copied()).collect(),
    };
    debug_assert_eq!(targets.numeric.len(), selected.len() * r);
    let eval = match a.folds {
        Some(k) => Eval::KFold(k),
        None => Eval::Holdout(a.test_fraction),
    };
    let split = Split::new(selected.len(), targets.classes.as_deref(), eval, a.seed)?;
    let params = ProbeParams {
        eval,
        seed: a.seed,
        logreg: LogRegParams { c: a.c, max_iter: a.max_iter, tol: a.tol },
        alpha: a.alpha,
        standardize: !a.no_standardize,
        bootstrap: a.bootstrap,
    };
    // Everything an outside check needs to redo the probes on the same features and splits.
    let splits_json = json!({"targets": targets, "split": split, "params": params, "acts": "acts", "positions": positions, "sites": run.meta.sites});
    patchbay::io::write_atomic(&a.out.join("splits.json"), serde_json::to_string(&splits_json).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    let chance = targets.classes.as_ref().map(|c| {
        let eval_idx: Vec<usize> = (0..c.len()).filter(|&i| matches!(eval, Eval::KFold(_)) || split.test_fold[i] == 0).collect();
        let mut counts = vec![0usize; class_names.len().max(1)];
        eval_idx.iter().for_each(|&i| counts[c[i]] += 1);
        counts.iter().copied().max().unwrap_or(0) as f64 / eval_idx.len().max(1) as f64
    });
    let n_probes = run.meta.sites.len() * positions.len();
    let bar = progress_bar(n_probes as u64, "probe", "probes", a.quiet);
    let pr = run_probes(&acts, &targets, &split, &params, &probes_dir(&a.out), &bar)?;
    bar.finish_and_clear();
    lap("probe", &mut timings);
    if pr.unconverged > 0 {
        say(format!("note: {} of {} logistic regression fits stopped at --max-iter {} before the gradient tolerance", pr.unconverged, pr.fits, a.max_iter));
    }

    // ---- outputs ----
    let csv_path = a.out.join("probe_results.csv");
    write_results_csv(&csv_path, &pr.rows)?;
    let mut plots = Vec::new();
    if pr.rows.iter().any(|r| r.metric == "accuracy") {
        let p = a.out.join("accuracy_by_layer.png");
        let title = format!("Emotion probe accuracy by layer ({}, {})", cfg.family.name(), split.eval.describe());
        patchbay::io::plot::accuracy_by_layer(&p, &pr.rows, chance, &title)?;
        plots.push(p);
    }
    if r > 0 {
        let p = a.out.join("appraisal_r2.png");
        let pos = a.heatmap_position.unwrap_or(positions[0]);
        if !positions.contains(&pos) {
            return Err(Error::input(format!("--heatmap-position {pos} is not among the captured positions")));
        }
        patchbay::io::plot::r2_heatmap(&p, &pr.rows, pos, "Ridge probe R² by layer")?;
        plots.push(p);
    }
    lap("outputs", &mut timings);
    manifest["probe"] = json!({
        "eval": split.eval.describe(), "folds": split.n_folds, "seed": a.seed, "C": a.c, "alpha": a.alpha,
        "standardize": !a.no_standardize, "max_iter": a.max_iter, "tol": a.tol, "bootstrap": a.bootstrap,
        "examples": selected.len(), "only_correct": a.only_correct, "fits": pr.fits, "unconverged": pr.unconverged,
        "resumed_sites": pr.resumed, "chance_accuracy": chance, "classes": class_names, "numeric": ds.spec.numeric_columns,
    });
    manifest["outputs"] = json!({"results": csv_path.display().to_string(), "plots": plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "weights": probes_dir(&a.out).display().to_string()});
    write_manifest(&mut manifest, &timings, "complete")?;
    if !a.quiet {
        // The best layer per site at the first position, as a quick read-out.
        for site in run.meta.site_kinds.iter().fold(Vec::<String>::new(), |mut v, s| {
            if !v.contains(s) {
                v.push(s.clone());
            }
            v
        }) {
            if let Some(best) = pr.rows.iter().filter(|r| r.metric == "accuracy" && r.site == site && r.position == positions[0]).max_by(|x, y| x.value.total_cmp(&y.value)) {
                eprintln!("best {site} probe at position {}: layer {} accuracy {:.3} [{:.3}, {:.3}]", best.position, best.layer, best.value, best.ci_low, best.ci_high);
            }
        }
        eprintln!("wrote {} and {} plot(s) in {} ({:.1} s)", csv_path.display(), plots.len(), a.out.display(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}
