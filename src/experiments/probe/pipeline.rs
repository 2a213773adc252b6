//! The probing pipeline of `patchbay probe` after its inputs are loaded (the demo's probing
//! runs the same stages):
//! 3. capture: sites x layers x positions (and the label logits) to sharded safetensors in
//!    OUT/acts; 4. score: the model's own predictions (OUT/scores.jsonl, score.json,
//!    confusion.csv; [`score_captured`]); 5. probe: logistic/ridge probes per (site, layer,
//!    position) (OUT/probes/) and 6. outputs: OUT/probe_results.csv, OUT/accuracy_by_layer.png,
//!    OUT/appraisal_r2.png ([`probe_stage`]); OUT/manifest.json after every stage.
//!
//! The run is resumable: re-running the same command continues where a killed run stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{Map, Value, json};

use super::plots::{accuracy_by_layer, r2_heatmap};
use super::{ProbeParams, ProbeRun, ProbeTargets, ResultRow, fit_name, probes_dir, run_probes, write_chosen_csv, write_results_csv};
use crate::data::dataset::Dataset;
use crate::data::labels::LabelSet;
use crate::engine::Engine;
use crate::experiments::Reporter;
use crate::experiments::dataset_files::write_examples;
use crate::experiments::score::Scores;
use crate::experiments::shards::{RunOptions, ShardMeta, ShardSpec, capture_shards, read_label_logits};
use crate::learn::split::{Eval, Split};
use crate::model::Model;
use crate::{Error, Result};

/// Label scoring from a capture's label logits: the scores against `gold`, written to `out`
/// (scores.jsonl with each prompt's dataset row from `rows`, score.json, confusion.csv).
pub fn score_captured(acts: &Path, meta: &ShardMeta, labels: &LabelSet, gold: Vec<Option<usize>>, out: &Path, rows: &[usize]) -> Result<Scores> {
    let scores = Scores::new(labels.clone(), read_label_logits(acts, meta)?, gold);
    scores.write(out, Some(rows))?;
    Ok(scores)
}

/// The share of the most frequent of `k` classes among `rows` (the majority-class rate).
pub fn majority_rate(classes: &[usize], rows: &[usize], k: usize) -> f64 {
    let mut counts = vec![0usize; k.max(1)];
    rows.iter().for_each(|&i| counts[classes[i]] += 1);
    counts.iter().copied().max().unwrap_or(0) as f64 / rows.len().max(1) as f64
}

/// The plots of a probe stage: the accuracy plot's title, and where there are numeric columns
/// the R² heatmap's position and title.
pub struct ProbePlots<'a> {
    pub accuracy_title: &'a str,
    pub r2: Option<(i64, &'a str)>,
}

/// Probes on the capture in `acts` (weights in OUT/probes/), their results in
/// OUT/probe_results.csv, and the plots: OUT/accuracy_by_layer.png (when there are accuracy
/// results; `chance` dashed) and OUT/appraisal_r2.png. Returns the run and the plots' paths.
#[allow(clippy::too_many_arguments)]
pub fn probe_stage(acts: &Path, targets: &ProbeTargets, split: &Split, params: &ProbeParams, out: &Path, chance: Option<f64>, plots: &ProbePlots, progress: &ProgressBar) -> Result<(ProbeRun, Vec<PathBuf>)> {
    let pr = run_probes(acts, targets, split, params, &probes_dir(out), progress)?;
    progress.finish_and_clear();
    write_results_csv(&out.join("probe_results.csv"), &pr.rows)?;
    if params.c.is_grid() || params.alpha.is_grid() {
        write_chosen_csv(&out.join("regularisation.csv"), &pr.chosen)?;
    }
    let mut paths = Vec::new();
    if pr.rows.iter().any(|r| r.metric == "accuracy") {
        let p = out.join("accuracy_by_layer.png");
        accuracy_by_layer(&p, &pr.rows, chance, plots.accuracy_title)?;
        paths.push(p);
    }
    if let Some((pos, title)) = plots.r2 {
        let p = out.join("appraisal_r2.png");
        r2_heatmap(&p, &pr.rows, pos, title)?;
        paths.push(p);
    }
    Ok((pr, paths))
}

/// Settings of a probe run (the flags of `patchbay probe`).
pub struct ProbeSettings {
    /// --sites as given (for the manifest), and the positions.
    pub sites_text: String,
    pub positions: Vec<i64>,
    pub only_correct: bool,
    pub keep_correct: Option<PathBuf>,
    /// The probes and their evaluation.
    pub params: ProbeParams,
    pub capture: ShardSpec,
    pub heatmap_position: Option<i64>,
    pub out: PathBuf,
    pub overwrite: bool,
    pub capture_only: bool,
    pub stop_after_shards: Option<usize>,
}

/// What a probe run is given: the model and its engine, the dataset and its prompts, the label
/// set scored (None: no scoring) and the class names of the gold labels.
pub struct ProbeInputs<'a> {
    pub model: &'a Model,
    pub engine: &'a dyn Engine,
    pub ds: &'a Dataset,
    pub prompts: &'a [Vec<u32>],
    pub label_set: Option<LabelSet>,
    pub class_names: Vec<String>,
    /// The manifest's fields about the inputs (dataset, template, token stats, ...).
    pub provenance: Value,
}

/// The pipeline from the capture to the outputs; `timings` holds the stages already timed and
/// `started` when the command started. Returns the manifest as written last.
pub fn run(inp: &ProbeInputs, s: &ProbeSettings, started: Instant, mut timings: Map<String, Value>, rep: &Reporter) -> Result<Value> {
    let mut lap = {
        let mut t = Instant::now();
        move |name: &str, timings: &mut Map<String, Value>| {
            timings.insert(name.to_string(), json!(t.elapsed().as_secs_f64()));
            t = Instant::now();
        }
    };
    let (model, ds, prompts) = (inp.model, inp.ds, inp.prompts);
    let cfg = &model.cfg;
    let positions = &s.positions;
    let class_names = &inp.class_names;
    let label_set = inp.label_set.as_ref();
    let has_labels = ds.spec.label_column.is_some();
    let classes: Option<Vec<usize>> = has_labels.then(|| ds.examples.iter().map(|e| e.label.as_ref().and_then(|l| class_names.iter().position(|c| c == l)).unwrap_or(0)).collect());

    // ---- capture ----
    let acts = s.out.join("acts");
    let bar = (rep.bar)(prompts.len() as u64, "capture", "prompts");
    let run = capture_shards(inp.engine, &model.dir.display().to_string(), &model.config_hash, prompts, &s.capture, &acts, &RunOptions { overwrite: s.overwrite, stop_after: s.stop_after_shards }, &bar)?;
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
        "seed": s.params.seed,
        "model": {"path": model.dir.display().to_string(), "config_sha256": model.config_hash, "family": cfg.family.name(), "layers": cfg.n_layers, "d_model": cfg.d_model},
        "device": inp.engine.device_name(),
        "nonfinite_values": inp.engine.nonfinite_values(),
        "labels": label_set,
        "sites": s.sites_text,
        "positions": positions,
        "capture": capture_json,
    });
    if let (Some(m), Some(p)) = (manifest.as_object_mut(), inp.provenance.as_object()) {
        m.extend(p.clone());
    }
    let write_manifest = |m: &mut Value, timings: &Map<String, Value>, status: &str| -> Result<()> {
        m["status"] = json!(status);
        m["timings_s"] = json!(timings);
        m["total_s"] = json!(started.elapsed().as_secs_f64());
        m["peak_rss_bytes"] = json!(crate::io::tensorfile::peak_rss_bytes());
        crate::io::write_atomic(&s.out.join("manifest.json"), serde_json::to_string_pretty(m).map_err(|e| Error::input(e.to_string()))?.as_bytes())
    };
    if !run.complete {
        write_manifest(&mut manifest, &timings, "capture incomplete")?;
        (rep.say)(format!("capture stopped after {} of {} shards; run the same command again to continue", run.resumed + run.written, run.meta.n_shards));
        return Ok(manifest);
    }
    (rep.say)(format!("capture: {} shards of up to {} prompts in {} ({} resumed)", run.meta.n_shards, run.meta.shard_rows, acts.display(), run.resumed));

    // ---- score ----
    let mut selected: Vec<usize> = (0..ds.examples.len()).collect();
    if let Some(labels) = label_set {
        let gold: Vec<Option<usize>> = classes.as_ref().map_or(vec![None; prompts.len()], |c| c.iter().map(|&c| Some(c)).collect());
        let rows: Vec<usize> = ds.examples.iter().map(|e| e.row).collect();
        let scores = score_captured(&acts, &run.meta, labels, gold, &s.out, &rows)?;
        let correct: Vec<bool> = scores.correct().into_iter().map(|c| c == Some(true)).collect();
        if let Some(path) = &s.keep_correct {
            write_examples(path, ds, &correct)?;
        }
        if s.only_correct {
            selected.retain(|&i| correct[i]);
        }
        manifest["score"] = json!({"accuracy": scores.accuracy(), "correct": correct.iter().filter(|&&c| c).count(), "n": scores.n()});
        (rep.say)(format!("score: {}", scores.describe().lines().next().unwrap_or("")));
    }
    lap("score", &mut timings);
    if s.capture_only {
        write_manifest(&mut manifest, &timings, "captured")?;
        (rep.say)(format!("captured {} prompts in {} ({:.1} s)", prompts.len(), acts.display(), started.elapsed().as_secs_f64()));
        return Ok(manifest);
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
    let params = &s.params;
    let eval = params.eval;
    let split = Split::new(selected.len(), targets.classes.as_deref(), eval, params.seed)?;
    targets.check()?;
    // Everything an outside check needs to redo the probes on the same features and splits.
    let mut splits_json = json!({"targets": targets, "split": split, "params": params, "acts": "acts", "positions": positions, "sites": run.meta.sites});
    if params.c.is_grid() || params.alpha.is_grid() {
        // Per fit: the inner fold of each of its training rows (ascending example order).
        let mut inner = Map::new();
        for fold in split.fits() {
            inner.insert(fit_name(fold), json!(split.inner(fold, targets.classes.as_deref(), params.inner_folds)?.1.test_fold));
        }
        splits_json["inner_test_fold"] = Value::Object(inner);
    }
    crate::io::write_atomic(&s.out.join("splits.json"), serde_json::to_string(&splits_json).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    let chance = targets.classes.as_ref().map(|c| {
        let eval_idx: Vec<usize> = (0..c.len()).filter(|&i| matches!(eval, Eval::KFold(_)) || split.test_fold[i] == 0).collect();
        majority_rate(c, &eval_idx, class_names.len())
    });
    let n_probes = run.meta.sites.len() * positions.len();
    let bar = (rep.bar)(n_probes as u64, "probe", "probes");
    let heatmap_position = s.heatmap_position.unwrap_or(positions[0]);
    let accuracy_title = format!("Emotion probe accuracy by layer ({}, {})", cfg.family.name(), split.eval.describe());
    let plots = ProbePlots { accuracy_title: &accuracy_title, r2: (r > 0).then_some((heatmap_position, "Ridge probe R² by layer")) };
    if r > 0 && !positions.contains(&heatmap_position) {
        return Err(Error::input(format!("--heatmap-position {heatmap_position} is not among the captured positions")));
    }
    let (pr, plot_paths) = probe_stage(&acts, &targets, &split, params, &s.out, chance, &plots, &bar)?;
    let csv_path = s.out.join("probe_results.csv");
    lap("probe", &mut timings);
    if pr.unconverged > 0 {
        (rep.say)(format!("note: {} of {} logistic regression fits stopped at --max-iter {} before the gradient tolerance", pr.unconverged, pr.fits, params.logreg.max_iter));
    }
    lap("outputs", &mut timings);
    manifest["probe"] = json!({
        "eval": split.eval.describe(), "folds": split.n_folds, "seed": params.seed, "C": params.c, "alpha": params.alpha, "inner_folds": params.inner_folds,
        "standardize": params.standardize, "max_iter": params.logreg.max_iter, "tol": params.logreg.tol, "bootstrap": params.bootstrap,
        "examples": selected.len(), "only_correct": s.only_correct, "fits": pr.fits, "unconverged": pr.unconverged,
        "resumed_sites": pr.resumed, "chance_accuracy": chance, "classes": class_names, "numeric": ds.spec.numeric_columns,
    });
    manifest["outputs"] = json!({"results": csv_path.display().to_string(), "plots": plot_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "weights": probes_dir(&s.out).display().to_string()});
    write_manifest(&mut manifest, &timings, "complete")?;
    // The best layer per site at the first position, as a quick read-out (every layer of a tie).
    for site in crate::io::plot::distinct(run.meta.site_kinds.iter().cloned()) {
        let rows: Vec<&ResultRow> = pr.rows.iter().filter(|r| r.metric == "accuracy" && r.site == site && r.position == positions[0]).collect();
        if let Some(best) = rows.iter().max_by(|x, y| x.value.total_cmp(&y.value)) {
            let tied: Vec<String> = rows.iter().filter(|r| r.value == best.value).map(|r| r.layer.to_string()).collect();
            let layers = if tied.len() == 1 { format!("layer {}", tied[0]) } else { format!("layers {} (tied)", tied.join(", ")) };
            (rep.say)(format!("best {site} probe at position {}: {layers} accuracy {:.3} [{:.3}, {:.3}]", best.position, best.value, best.ci_low, best.ci_high));
        }
    }
    (rep.say)(format!("wrote {} and {} plot(s) in {} ({:.1} s)", csv_path.display(), plot_paths.len(), s.out.display(), started.elapsed().as_secs_f64()));
    Ok(manifest)
}
