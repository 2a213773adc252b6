//! The demo pipeline (`patchbay demo`) on loaded inputs: capture and scores, probes, a
//! patching sweep and steering, through the stages `probe` and `patch` run
//! (`experiments::probe::pipeline`, `experiments::patch_files`), with a Markdown report and its
//! numbers (report.md, summary.json) rewritten after every stage.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::report::{Report, components_context, data_context, model_context, patch_context, probe_context, resid_accuracy, score_context, steer_context, timings_context, training_context};
use super::{DirectionKind, TowardLabel, contrast_pairs, toward_labels};
use crate::data::dataset::Dataset;
use crate::data::labels::LabelSet;
use crate::data::template::TokenStats;
use crate::experiments::Reporter;
use crate::experiments::dataset_files::dataset_json;
use crate::experiments::directions::{SiteDirections, write_directions};
use crate::experiments::label_files::Scope;
use crate::experiments::patch::{Method, Overflow, RunSettings, SweepSpec, all_centers, experiments};
use crate::experiments::patch_files::{append_results, read_done, write_outputs};
use crate::experiments::probe::pipeline::{ProbePlots, majority_rate, probe_stage, score_captured};
use crate::experiments::probe::{ProbeParams, ProbeTargets};
use crate::experiments::shards::{RunOptions, ShardSpec, capture_shards, read_site};
use crate::experiments::ablate::{AblateOp, ablate_sweep, ablations, conditions, parse_heads};
use crate::experiments::components::{ContribSpec, Readout, contribution_tables, head_heatmaps, long_tail_plot, write_table};
use crate::experiments::steer::{Projection, label_sweep, random_controls};
use crate::experiments::top_k::{read_ranking, set_conditions, top_k_sets, top_k_sweep};
use crate::intervene::spec::{InterventionSpec, Layers, read_vector, resolve_all};
use crate::io::OutDtype;
use crate::learn::directions::{Versus, class_mean_directions};
use crate::learn::logreg::LogRegParams;
use crate::learn::penalty::{ALPHA_GRID, Penalty};
use crate::learn::split::{Eval, Split};
use crate::model::Model;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// Columns of the demo corpus (scripts/demo/make_corpus.py).
pub const LABEL_COL: &str = "emotion";
pub const SPLIT_FILTER: &str = "split=test";
pub const APPRAISALS: [&str; 9] = ["suddenness", "pleasantness", "goal_relevance", "self_responsblt", "other_responsblt", "chance_responsblt", "self_control", "attention", "effort"];
pub const TEMPLATE: &str = "tak";
pub(super) const SITES: &str = "attn_out,mlp_out,resid_post";
const SEED: u64 = 0;

/// Sizes of a run.
pub struct Plan {
    pub limit: Option<usize>,
    pub pairs: usize,
    /// Steering runs on the first this many prompts.
    pub steer_prompts: usize,
    pub strengths: Vec<f32>,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan { limit: Some(390), pairs: 30, steer_prompts: 60, strengths: vec![0.0, 2.0, 8.0] }
        } else {
            Plan { limit: None, pairs: 200, steer_prompts: 100, strengths: vec![0.0, 1.0, 2.0, 4.0, 8.0] }
        }
    }
}

/// What the demo runs on: the model, its prompts (the dataset's rows through the template),
/// the label set and each prompt's gold label (an index into it).
pub struct DemoInputs<'a> {
    pub model: &'a Model,
    pub model_dir: &'a Path,
    pub data_path: &'a Path,
    /// The dataset is the bundled corpus (the report describes it).
    pub bundled_data: bool,
    pub prompts: &'a [Vec<u32>],
    pub dataset: &'a Dataset,
    pub labels: &'a LabelSet,
    pub gold: &'a [usize],
    pub plan: &'a Plan,
    pub out: &'a Path,
    /// When the command started (the first stage's time counts from it).
    pub started: Instant,
}

/// A path as a shell word.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c)) { s } else { format!("'{}'", s.replace('\'', "'\\''")) }
}

/// Runs the demo on loaded inputs into `inp.out`: report.md and summary.json are rewritten
/// after every stage.
pub fn run(inp: &DemoInputs, rep: &Reporter) -> Result<()> {
    let (model, prompts, ds, labels, gold, plan, out) = (inp.model, inp.prompts, inp.dataset, inp.labels, inp.gold, inp.plan, inp.out);
    let (model_dir, data_path) = (inp.model_dir, inp.data_path);
    let started = inp.started;
    let cfg = &model.cfg;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut report = Report::new(out, started);
    labels.check_vocab(cfg.vocab_size)?;
    let n = prompts.len();
    let k = labels.len();
    let stats = TokenStats::of(prompts);
    (rep.say)(format!("demo: {} on {n} held-out rows of {} ({k} labels); output in {}", model_dir.display(), data_path.display(), out.display()));
    // The flags every reproduction command shares.
    let flags = |limit: Option<usize>| format!("--model {} --dataset {} --filter {SPLIT_FILTER}{} --label-col {LABEL_COL} --template {TEMPLATE}", sh(model_dir), sh(data_path), limit.map_or(String::new(), |l| format!(" --limit {l}")));
    let data_flags = flags(plan.limit);
    let context = json!({"model": model_context(model, model_dir), "training": training_context(model_dir), "data": data_context(data_path, inp.bundled_data, ds.rows_read, n, &stats, labels)});
    report.add(context, "inputs", json!({"model": model_dir.display().to_string(), "dataset": dataset_json(ds), "labels": labels, "token_stats": stats}))?;
    report.lap("load");

    // ---- capture (activations and label logits) and scores ----
    let probe_out = out.join("probe");
    let acts = probe_out.join("acts");
    let sites = Site::parse_spec(SITES, cfg)?;
    let spec = ShardSpec { sites, positions: vec![-1], label_token_ids: labels.token_ids.clone(), dtype: OutDtype::F32, batch_size: 8, shard_bytes: 256 << 20 };
    let bar = (rep.bar)(n as u64, "capture", "prompts");
    let run = capture_shards(model, &model_dir.display().to_string(), &model.config_hash, prompts, &spec, &acts, &RunOptions { overwrite: true, stop_after: None }, &bar)?;
    bar.finish_and_clear();
    report.lap("capture");
    let score_out = out.join("score");
    let scores = score_captured(&acts, &run.meta, labels, gold.iter().map(|&g| Some(g)).collect(), &score_out, &ds.examples.iter().map(|e| e.row).collect::<Vec<_>>())?;
    let accuracy = scores.accuracy().unwrap_or(f64::NAN);
    let majority = majority_rate(&gold, &(0..n).collect::<Vec<_>>(), k);
    (rep.say)(format!("score: accuracy {accuracy:.3} (majority class {majority:.3})"));
    let cmd = format!("patchbay score {data_flags} --out runs/score");
    report.add(json!({"score": score_context(&scores, accuracy, majority, &cmd)}), "score", json!({"accuracy": accuracy, "majority": majority, "n": n, "command": cmd}))?;
    report.lap("score");

    // ---- probes ----
    let targets = ProbeTargets {
        examples: (0..n).collect(),
        class_names: labels.names.clone(),
        classes: Some(gold.to_vec()),
        numeric_names: ds.spec.numeric_columns.clone(),
        numeric: ds.examples.iter().flat_map(|e| e.numeric.iter().copied()).collect(),
    };
    // The defaults of `patchbay probe`, with `--alpha auto`: the ridge penalty chosen by inner
    // cross-validation (at alpha 1, many features and few rows overfit).
    let eval = Eval::Holdout(0.2);
    let split = Split::new(n, Some(&gold), eval, SEED)?;
    let params = ProbeParams { eval, seed: SEED, c: Penalty::Fixed(1.0), logreg: LogRegParams::default(), alpha: Penalty::Grid(ALPHA_GRID.to_vec()), inner_folds: 5, standardize: true, bootstrap: 1000 };
    let test_rows: Vec<usize> = (0..n).filter(|&i| split.test_fold[i] == 0).collect();
    let chance = majority_rate(&gold, &test_rows, k);
    let bar = (rep.bar)(run.meta.sites.len() as u64, "probe", "probes");
    let plots = ProbePlots { accuracy_title: "Emotion probe accuracy by layer", r2: Some((-1, "Appraisal ridge probe R² by layer")) };
    let (pr, _) = probe_stage(&acts, &targets, &split, &params, &probe_out, Some(chance), &plots, &bar)?;
    let cmd = format!("patchbay probe {data_flags} --numeric-cols {} --sites {SITES} --positions -1 --alpha auto --out runs/probe", APPRAISALS.join(","));
    let (section, numbers) = probe_context(&pr.rows, chance, test_rows.len(), cfg.n_layers, &cmd);
    (rep.say)(format!("probe: resid_post accuracy by layer {} (chance {chance:.3})", resid_accuracy(&numbers)));
    report.add(json!({"probe": section}), "probe", numbers)?;
    report.lap("probe");

    // ---- patching ----
    let patch_out = out.join("patch");
    std::fs::create_dir_all(&patch_out).map_err(|e| Error::io(&patch_out, e))?;
    let correct: Vec<usize> = (0..n).filter(|&i| scores.pred[i] == gold[i]).collect();
    let pairs = contrast_pairs(&gold, &correct, plan.pairs, SEED)?;
    let pairs_path = patch_out.join("pairs.jsonl");
    let pairs_text: String = pairs.iter().map(|q| format!("{}\n", json!(q))).collect();
    crate::io::write_atomic(&pairs_path, pairs_text.as_bytes())?;
    // The study's window of 5 of 16 layers, scaled to the model (odd, at least 1).
    let window = ((cfg.n_layers * 5 + 8) / 16).max(1) | 1;
    let window = window.min(cfg.n_layers);
    let sweep = SweepSpec {
        sites: SITES.split(',').filter_map(SiteKind::from_short_name).collect(),
        units: None,
        window,
        centers: all_centers(window, cfg.n_layers),
        positions: vec![-1],
        label_tokens: labels.token_ids.clone(),
    };
    let exps = experiments(&pairs, &sweep, cfg.n_layers)?;
    // A fresh run: the results are appended as they complete, as `patchbay patch` does.
    let jsonl = patch_out.join("experiments.jsonl");
    if jsonl.exists() {
        std::fs::remove_file(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
    }
    let bar = (rep.bar)(exps.len() as u64, "patch", "experiments");
    let skip = HashSet::new();
    let settings = RunSettings { method: Method::Resumed, skip: &skip, batch_rows: 256, mem_budget: 2 << 30, overflow: Overflow::Auto, progress: &bar };
    let (_, outcome) = append_results(model, prompts, &sweep, &exps, &settings, &jsonl, None)?;
    bar.finish_and_clear();
    outcome?;
    let summary = write_outputs(&patch_out, read_done(&jsonl, false)?, None)?;
    let cmd = format!("patchbay patch {data_flags} --pairs {} --sites {SITES} --window {window} --positions -1 --out runs/patch", sh(&pairs_path));
    let (section, numbers) = patch_context(&summary, pairs.len(), correct.len(), window, &cmd);
    (rep.say)(format!("patch: {} experiments, highest flip rate {}", exps.len(), numbers["best"]));
    report.add(json!({"patch": section}), "patch", numbers)?;
    report.lap("patch");

    // ---- steering ----
    // Each emotion's class-mean direction on the probes' training rows, written as `patchbay
    // directions` writes it; then the sweep of `patchbay steer --mode labels` (the same library
    // function) on the first prompts, each direction and a same-norm random control.
    let steer_out = out.join("steer");
    std::fs::create_dir_all(&steer_out).map_err(|e| Error::io(&steer_out, e))?;
    let layer = cfg.n_layers / 2;
    let site = Site::new(layer, SiteKind::ResidPost);
    let d = cfg.d_model;
    // x: [n, d], the site at the last token of every prompt.
    let mut x = Vec::with_capacity(n * d);
    for s in 0..run.meta.n_shards {
        x.extend(read_site(&acts, s, &site.to_string())?.1);
    }
    let train: Vec<usize> = (0..n).filter(|&i| split.test_fold[i] != 0).collect();
    let x_train: Vec<f32> = train.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect();
    let train_gold: Vec<usize> = train.iter().map(|&i| gold[i]).collect();
    let (names, directions): (Vec<String>, Vec<Vec<f32>>) =
        class_mean_directions(&x_train, d, &train_gold, k, Versus::Rest)?.into_iter().zip(&labels.names).filter_map(|(dir, name)| dir.map(|v| (name.clone(), v))).unzip();
    let dirs_path = steer_out.join("directions.safetensors");
    let metadata = BTreeMap::from([
        ("method".to_string(), "class-mean".to_string()),
        ("versus".to_string(), "rest".to_string()),
        ("model".to_string(), model_dir.display().to_string()),
        ("config_sha256".to_string(), model.config_hash.clone()),
        ("positions".to_string(), "-1".to_string()),
        ("dataset".to_string(), data_path.display().to_string()),
        ("rows".to_string(), format!("the probes' training rows ({} prompts)", train.len())),
    ]);
    let dir_norm = directions.iter().map(|v| crate::intervene::norm(v)).sum::<f32>() / directions.len().max(1) as f32;
    write_directions(&dirs_path, &[SiteDirections { site: site.to_string(), width: d, names: names.clone(), directions, subspace: None }], &metadata)?;
    let spec = InterventionSpec {
        vector: Some(format!("{}:{}", dirs_path.display(), names.join(","))),
        project: None,
        site: SiteKind::ResidPost.short_name().into(),
        layers: Some(Layers::List(vec![layer])),
        positions: "all".into(),
        betas: plan.strengths.clone(),
        normalise: false,
    };
    let mut conditions = resolve_all(std::slice::from_ref(&spec), cfg, false)?;
    let n_steered = conditions.len();
    conditions.extend(random_controls(&conditions, SEED));
    let n_steer = plan.steer_prompts.min(n);
    let steer_gold: Vec<Option<usize>> = gold[..n_steer].iter().map(|&g| Some(g)).collect();
    let bar = (rep.bar)((n_steer * conditions.len()) as u64, "steer", "runs");
    let sweep = label_sweep(model, &prompts[..n_steer], labels, &steer_gold, &conditions, 2048, &bar, &steer_out)?;
    bar.finish_and_clear();
    let rows = toward_labels(&conditions, n_steered, &sweep.rows, labels, gold)?;
    write_steering(&steer_out, &rows)?;
    let mean_norm = x.chunks(d).map(crate::intervene::norm).sum::<f32>() / n.max(1) as f32;
    let steer_flags = flags(Some(n_steer));
    let betas: Vec<String> = plan.strengths.iter().map(|b| b.to_string()).collect();
    let cmd = format!("patchbay steer --mode labels {steer_flags} --vector {}:{} --site resid_post --layers {layer} --positions all --betas={} --seed {SEED} --out runs/steer", sh(&dirs_path), names.join(","), betas.join(","));
    let (section, mut numbers) = steer_context(&rows, &plan.strengths, site, mean_norm, dir_norm, n_steer, &cmd);
    numbers["command"] = json!(cmd);
    (rep.say)(format!("steer: {}", numbers["headline"].as_str().unwrap_or("")));
    report.add(json!({"steer": section}), "steer", numbers)?;
    report.lap("steer");

    // ---- components (Wang et al.) ----
    // The emotion steering moved most (predicted most often at the top strength): its direction's
    // contributions per head and neuron (`components contrib`), each head zeroed (`ablate --heads
    // all`) and the top-k of the contribution ranking zeroed together against random sets like
    // them (`ablate --ranking`), all read as the projection on that direction at the steering site.
    let top = plan.strengths.iter().copied().fold(0.0f32, f32::max);
    let emotion = rows
        .iter()
        .filter(|r| r.direction == DirectionKind::ClassMean && r.strength == top)
        .max_by(|a, b| a.hit_rate.total_cmp(&b.hit_rate))
        .map(|r| r.label.clone())
        .ok_or_else(|| Error::input("no steering rows to choose an emotion from"))?;
    let vector = format!("{}:{emotion}", dirs_path.display());
    // Its own prompts (where the direction is written), at most COMPONENT_PROMPTS of them.
    let e = labels.names.iter().position(|l| *l == emotion).ok_or_else(|| Error::input(format!("emotion {emotion} is not a label")))?;
    let own: Vec<usize> = (0..n).filter(|&i| gold[i] == e).take(COMPONENT_PROMPTS).collect();
    let comp_prompts: Vec<Vec<u32>> = own.iter().map(|&i| prompts[i].clone()).collect();
    let comp_gold = vec![Some(e); own.len()];
    let comp = ComponentsRun { model, prompts: &comp_prompts, labels, gold: &comp_gold, site, vector: &vector, emotion: &emotion, out: &out.join("components") };
    let (section, mut numbers) = comp.run(rep)?;
    let vec_arg = format!("{}:{emotion}", sh(&dirs_path));
    // The data flags selecting the same prompts (the first of the emotion in the demo's rows) and
    // the demo's whole label set.
    let comp_flags = format!(
        "--model {} --dataset {} --filter {SPLIT_FILTER} --filter {LABEL_COL}={emotion} --limit {} --label-col {LABEL_COL} --labels {} --template {TEMPLATE}",
        sh(model_dir),
        sh(data_path),
        own.len(),
        labels.names.join(",")
    );
    numbers["commands"] = json!([
        format!("patchbay components contrib {comp_flags} --vector {vec_arg} --site resid_post --layer {} --positions last --out runs/contrib", site.layer),
        format!("patchbay ablate {comp_flags} --heads all --op zero --positions all --projection {vec_arg} --projection-layer {} --out runs/heads", site.layer),
        format!("patchbay ablate {comp_flags} --ranking runs/contrib/heads.csv --ranking runs/contrib/neurons.csv --ranking-label {emotion} --top-k {} --random-draws {} --op zero --positions all --projection {vec_arg} --projection-layer {} --out runs/topk", comp.ks_arg()?, COMPONENT_DRAWS, site.layer),
    ]);
    (rep.say)(format!("components: {}", numbers["headline"].as_str().unwrap_or("")));
    let mut section = section;
    section["commands"] = numbers["commands"].clone();
    report.add(json!({"components": section}), "components", numbers)?;
    report.lap("components");

    // ---- timings and how to rebuild the model ----
    let total_s = started.elapsed().as_secs_f64();
    report.timings.push(("total".into(), total_s));
    let context = json!({"timings": timings_context(&report.timings)});
    report.add(context, "total_s", json!(total_s))?;
    (rep.say)(format!("wrote {} ({total_s:.1} s)", out.join("report.md").display()));
    Ok(())
}

/// Random sets per k of the demo's top-k curve.
const COMPONENT_DRAWS: usize = 5;
/// The components stage reads at most this many prompts of its emotion.
const COMPONENT_PROMPTS: usize = 64;

/// The components stage's inputs.
struct ComponentsRun<'a> {
    model: &'a Model,
    prompts: &'a [Vec<u32>],
    labels: &'a LabelSet,
    gold: &'a [Option<usize>],
    /// Where the direction is read (and the projection).
    site: Site,
    /// `FILE.safetensors:emotion`
    vector: &'a str,
    emotion: &'a str,
    out: &'a Path,
}

impl ComponentsRun<'_> {
    /// The ks of the curve: powers of two up to the ranking's length (heads and neurons that
    /// write before the site).
    fn ks(&self) -> Vec<usize> {
        let cfg = &self.model.cfg;
        let writers = (self.site.layer + 1) * (cfg.n_heads + cfg.d_mlp);
        (0..).map(|e| 1usize << e).take_while(|&k| k <= writers.min(32)).collect()
    }

    fn ks_arg(&self) -> Result<String> {
        Ok(self.ks().iter().map(usize::to_string).collect::<Vec<_>>().join(","))
    }

    /// Runs the three sweeps into `out` (contrib/, heads/, topk/) and returns the report's
    /// section and numbers.
    fn run(&self, rep: &Reporter) -> Result<(serde_json::Value, serde_json::Value)> {
        let (model, cfg) = (self.model, &self.model.cfg);
        let d = cfg.d_model;
        let (_, direction) = read_vector(self.vector, self.site, d, false)?;
        // Contributions, as `components contrib --positions last`.
        let contrib_out = self.out.join("contrib");
        std::fs::create_dir_all(&contrib_out).map_err(|e| Error::io(&contrib_out, e))?;
        let readout = Readout::new(model, self.site, &direction)?;
        let spec = ContribSpec { readout: &readout, labels: self.labels, positions: Positions::List(vec![-1]), gold: self.gold, batch_size: 8 };
        let bar = (rep.bar)(self.prompts.len() as u64, "contributions", "prompts");
        let tables = contribution_tables(model, model, self.prompts, &spec, &mut |_, _| Ok(()), &bar)?;
        bar.finish_and_clear();
        let (heads_csv, neurons_csv) = (contrib_out.join("heads.csv"), contrib_out.join("neurons.csv"));
        write_table(&heads_csv, "head", &tables.heads, cfg.n_heads)?;
        write_table(&neurons_csv, "neuron", &tables.neurons, cfg.d_mlp)?;
        head_heatmaps(&contrib_out.join("heads.png"), &format!("mean head contribution along {} at {}", self.emotion, self.site), &tables.heads, cfg.n_heads)?;
        long_tail_plot(&contrib_out.join("long_tail.png"), &format!("the long tail: |mean contribution| along {} at {}, sorted", self.emotion, self.site), &[("heads", &tables.heads), ("neurons", &tables.neurons)])?;
        let ranking = read_ranking(&[&heads_csv, &neurons_csv], self.emotion, cfg)?;

        // Each head zeroed at every position, read as the projection (`ablate --heads all`).
        let projection = Projection::new(self.site, direction, cfg)?;
        let all = Positions::All;
        let heads_out = self.out.join("heads");
        std::fs::create_dir_all(&heads_out).map_err(|e| Error::io(&heads_out, e))?;
        let abl = ablations(&parse_heads("all", cfg)?, cfg, None)?;
        let conds = conditions(&abl, AblateOp::Zero, &BTreeMap::new(), &all, SEED, cfg)?;
        let bar = (rep.bar)((self.prompts.len() * abl.len()) as u64, "heads", "runs");
        let heads = ablate_sweep(model, Method::Resumed, self.prompts, self.labels, Some(&projection), self.gold, &abl, AblateOp::Zero, &conds, Scope::default(), 2048, &bar, &heads_out)?;
        bar.finish_and_clear();

        // The top-k of the ranking against random sets (`ablate --ranking`).
        let topk_out = self.out.join("topk");
        std::fs::create_dir_all(&topk_out).map_err(|e| Error::io(&topk_out, e))?;
        let sets = top_k_sets(&ranking, &self.ks(), COMPONENT_DRAWS, cfg, SEED)?;
        let exps = set_conditions(&sets, AblateOp::Zero, &BTreeMap::new(), &all, SEED, cfg)?;
        let bar = (rep.bar)((self.prompts.len() * sets.len()) as u64, "top-k", "runs");
        let curve = top_k_sweep(model, Method::Resumed, self.prompts, self.labels, Some(&projection), self.gold, &sets, &exps, AblateOp::Zero, self.emotion, SEED, Scope::default(), 2048, &bar, &topk_out)?;
        bar.finish_and_clear();
        Ok(components_context(self.emotion, self.site, self.prompts.len(), &ranking, &heads.summary, &curve))
    }
}

/// steering.csv: each emotion's pull toward it (`toward_labels`), per direction kind and strength.
fn write_steering(dir: &Path, rows: &[TowardLabel]) -> Result<()> {
    let mut csv = String::from("emotion,direction,strength,n,mean_prob,hit_rate\n");
    for r in rows {
        let kind = if r.direction == DirectionKind::ClassMean { "class-mean" } else { "random" };
        let _ = writeln!(csv, "{},{kind},{},{},{:.6},{:.6}", r.label, r.strength, r.n, r.mean_prob, r.hit_rate);
    }
    crate::io::write_atomic(&dir.join("steering.csv"), csv.as_bytes())
}
