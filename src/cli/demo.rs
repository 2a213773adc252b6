//! `patchbay demo`: the study pipeline end to end on the bundled model and corpus (demo/), with
//! a Markdown report and PNG plots: label scoring, probes by layer, a patching sweep, steering.
//!
//! Every stage goes through the same library code as its own command (`score`, `probe`,
//! `patch`), and the report gives the command that reproduces it. Each stage's files and the
//! report (rewritten after every stage) are written as soon as the stage is done.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};

use super::inputs::{DatasetArgs, InputArgs, LabelArgs, Prompts, TemplateArgs, dataset_json};
use super::patch::{Done, write_outputs};
use super::progress_bar;
use patchbay::backend::DeviceSpec;
use patchbay::data::template::TokenStats;
use patchbay::experiments::demo::{DirectionKind, SteerRow, SteerTarget, class_mean_directions, contrast_pairs, steer_sweep};
use patchbay::experiments::patch::{Method, RunSettings, SummaryRow, SweepSpec, all_centers, experiments, run_sweep, summarize};
use patchbay::experiments::probe::{ProbeParams, ProbeTargets, ResultRow, probes_dir, run_probes, write_results_csv};
use patchbay::experiments::score::Scores;
use patchbay::experiments::shards::{RunOptions, ShardSpec, capture_shards, read_label_logits, read_site};
use patchbay::io::OutDtype;
use patchbay::io::plot::{Grid, accuracy_by_layer, heatmap, r2_heatmap};
use patchbay::learn::logreg::LogRegParams;
use patchbay::learn::split::{Eval, Split};
use patchbay::model::Model;
use patchbay::sites::{Site, SiteKind};
use patchbay::{Error, Result};

const DEMO_HELP: &str = "Examples:
  patchbay demo                                   # the bundled model and corpus; report in demo-out/report.md
  patchbay demo --quick --out /tmp/demo           # a reduced run (fewer rows, pairs and prompts), seconds
  patchbay demo --model M --dataset corpus.csv --out runs/demo

Runs on the CPU, with a progress bar per stage, on the held-out rows (split=test) of the corpus,
each rendered with the `tak` template of Tak et al. 2025:
  1. score: the model's own prediction over the 13 emotions (OUT/score/: scores.jsonl, score.json,
     confusion.csv, confusion.png);
  2. probe: attn_out, mlp_out and resid_post of every layer at the last token; logistic probes of
     the emotion and ridge probes of the nine appraisal ratings on a stratified 80/20 split
     (OUT/probe/: probe_results.csv, accuracy_by_layer.png, appraisal_r2.png, probes/, acts/);
  3. patch: activation patching between correctly predicted prompts of different emotions,
     attn_out / mlp_out / resid_post over windows of layers at the last token (OUT/patch/:
     pairs.jsonl, experiments.jsonl, summary.csv, heatmap.png);
  4. steer: each emotion's class-mean direction in the middle layer's residual stream, added at
     every position of held-out prompts of other emotions, at several strengths, against a random
     direction of the same norm (OUT/steer/: steering.csv, directions.safetensors).
OUT/report.md describes the model and every result with its plot, the timings, and the commands
(`patchbay score`, `probe`, `patch`) that reproduce each part; OUT/summary.json has the numbers.

The bundled files (demo/ in the source tree): demo/model, a small Llama trained from scratch by
scripts/demo/train.py on demo/corpus.csv, a synthetic emotion corpus written by
scripts/demo/make_corpus.py. --model and --dataset replace them: the dataset must have the
corpus's columns (split, emotion, text and the nine ratings).";

/// Columns of the demo corpus (scripts/demo/make_corpus.py).
const LABEL_COL: &str = "emotion";
const SPLIT_FILTER: &str = "split=test";
const APPRAISALS: [&str; 9] = ["suddenness", "pleasantness", "goal_relevance", "self_responsblt", "other_responsblt", "chance_responsblt", "self_control", "attention", "effort"];
const TEMPLATE: &str = "tak";
const SITES: &str = "attn_out,mlp_out,resid_post";
const SEED: u64 = 0;

#[derive(Args)]
#[command(after_help = DEMO_HELP)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Model directory [default: the bundled demo/model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Corpus in the format of demo/corpus.csv [default: the bundled demo/corpus.csv].
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// A reduced run: 390 held-out rows, 30 patching pairs, 8 steered prompts per emotion.
    #[arg(long)]
    quick: bool,
    /// No progress bars or messages.
    #[arg(long)]
    quiet: bool,
}

/// Sizes of a run.
struct Plan {
    limit: Option<usize>,
    pairs: usize,
    steer_prompts: usize,
    strengths: Vec<f32>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { limit: Some(390), pairs: 30, steer_prompts: 8, strengths: vec![0.0, 2.0, 8.0] }
        } else {
            Plan { limit: None, pairs: 200, steer_prompts: 40, strengths: vec![0.0, 1.0, 2.0, 4.0, 8.0] }
        }
    }
}

/// A bundled file: `demo/<name>` in the source tree patchbay was built from.
fn bundled(given: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo").join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::input(format!("the bundled demo file {} is missing (this binary was built from another checkout?): pass --model DIR --dataset FILE", p.display())))
    }
}

/// A path as a shell word.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c)) { s } else { format!("'{}'", s.replace('\'', "'\\''")) }
}

/// A Markdown table.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// The share of the most frequent of `k` gold labels among `rows`.
fn majority_rate(gold: &[usize], rows: &[usize], k: usize) -> f64 {
    (0..k).map(|c| rows.iter().filter(|&&i| gold[i] == c).count()).max().unwrap_or(0) as f64 / rows.len().max(1) as f64
}

fn json_err(e: serde_json::Error) -> Error {
    Error::input(e.to_string())
}

/// report.md and summary.json, rewritten after every stage.
struct Report {
    out: PathBuf,
    sections: Vec<String>,
    summary: serde_json::Map<String, Value>,
    timings: Vec<(String, f64)>,
    stage_start: Instant,
}

impl Report {
    fn add(&mut self, section: String, key: &str, numbers: Value) -> Result<()> {
        self.sections.push(section);
        self.summary.insert(key.to_string(), numbers);
        self.write()
    }

    /// Ends a stage: records its time.
    fn lap(&mut self, stage: &str) {
        self.timings.push((stage.to_string(), self.stage_start.elapsed().as_secs_f64()));
        self.stage_start = Instant::now();
    }

    fn write(&mut self) -> Result<()> {
        self.summary.insert("timings_s".into(), json!(self.timings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()));
        patchbay::io::write_atomic(&self.out.join("summary.json"), serde_json::to_string_pretty(&self.summary).map_err(json_err)?.as_bytes())?;
        patchbay::io::write_atomic(&self.out.join("report.md"), self.sections.join("\n").as_bytes())
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let say = |s: String| {
        if !a.quiet {
            eprintln!("{s}");
        }
    };
    let model_dir = bundled(&a.model, "model")?;
    let data_path = bundled(&a.dataset, "corpus.csv")?;
    let plan = Plan::new(a.quick);
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let mut report = Report { out: a.out.clone(), sections: Vec::new(), summary: serde_json::Map::new(), timings: Vec::new(), stage_start: Instant::now() };

    // ---- model, data, prompts: exactly what `patchbay score` / `probe` / `patch` load ----
    let inputs = InputArgs {
        model: model_dir.clone(),
        device: DeviceSpec::Cpu,
        data: DatasetArgs {
            dataset: Some(data_path.clone()),
            preset: None,
            format: None,
            encoding: None,
            text_col: None,
            label_col: Some(LABEL_COL.into()),
            numeric_cols: Some(APPRAISALS.join(",")),
            rename: Vec::new(),
            filter: vec![SPLIT_FILTER.into()],
            limit: plan.limit,
        },
        template: TemplateArgs { template: TEMPLATE.into(), shots: None, chat: false },
    };
    let model = Model::load(&model_dir)?;
    let cfg = &model.cfg;
    let p = Prompts::load(&inputs, &LabelArgs { token_ids: None, labels: None, label_token_ids: None }, a.quiet)?;
    let ds = p.dataset.as_ref().ok_or_else(|| Error::input("no dataset"))?;
    let labels = &p.labels;
    labels.check_vocab(cfg.vocab_size)?;
    let gold: Vec<usize> = p.gold()?.into_iter().map(|g| g.ok_or_else(|| Error::input("a row has no gold label"))).collect::<Result<_>>()?;
    let n = p.ids.len();
    let k = labels.len();
    let stats = TokenStats::of(&p.ids);
    say(format!("demo: {} on {n} held-out rows of {} ({k} labels); output in {}", model_dir.display(), data_path.display(), a.out.display()));
    // The flags every reproduction command shares.
    let limit = plan.limit.map_or(String::new(), |l| format!(" --limit {l}"));
    let data_flags = format!("--model {} --dataset {} --filter {SPLIT_FILTER}{limit} --label-col {LABEL_COL} --template {TEMPLATE}", sh(&model_dir), sh(&data_path));
    report.add(model_section(&model, &model_dir, &data_path, a.dataset.is_none(), ds.rows_read, n, &stats, labels), "inputs", json!({"model": model_dir.display().to_string(), "dataset": dataset_json(ds), "labels": labels, "token_stats": stats}))?;
    report.lap("load");

    // ---- capture (activations and label logits) and scores ----
    let probe_out = a.out.join("probe");
    let acts = probe_out.join("acts");
    let sites = Site::parse_spec(SITES, cfg)?;
    let spec = ShardSpec { sites, positions: vec![-1], label_token_ids: labels.token_ids.clone(), dtype: OutDtype::F32, batch_size: 8, shard_bytes: 256 << 20 };
    let bar = progress_bar(n as u64, "capture", "prompts", a.quiet);
    let run = capture_shards(&model, &model_dir.display().to_string(), &model.config_hash, &p.ids, &spec, &acts, &RunOptions { overwrite: true, stop_after: None }, &bar)?;
    bar.finish_and_clear();
    report.lap("capture");
    let scores = Scores::new(labels.clone(), read_label_logits(&acts, &run.meta)?, gold.iter().map(|&g| Some(g)).collect());
    let score_out = a.out.join("score");
    scores.write(&score_out, Some(&ds.examples.iter().map(|e| e.row).collect::<Vec<_>>()))?;
    let confusion = scores.confusion();
    // Column labels: the first three letters when they tell the labels apart (narrow columns).
    let short: Vec<String> = labels.names.iter().map(|l| l.chars().take(3).collect()).collect();
    let short_unique = short.iter().collect::<HashSet<_>>().len() == short.len();
    heatmap(
        &score_out.join("confusion.png"),
        &Grid {
            title: "Label scoring: gold (rows) x predicted (columns), fraction of the row".into(),
            row_labels: labels.names.clone(),
            col_labels: if short_unique { short } else { labels.names.clone() },
            values: confusion.iter().map(|row| row.iter().map(|&c| Some(c as f64 / row.iter().sum::<usize>().max(1) as f64)).collect()).collect(),
            value_label: "fraction".into(),
            range: Some((0.0, 1.0)),
        },
    )?;
    let accuracy = scores.accuracy().unwrap_or(f64::NAN);
    let majority = majority_rate(&gold, &(0..n).collect::<Vec<_>>(), k);
    say(format!("score: accuracy {accuracy:.3} (majority class {majority:.3})"));
    let cmd = format!("patchbay score {data_flags} --out runs/score");
    report.add(score_section(&scores, accuracy, majority, &cmd), "score", json!({"accuracy": accuracy, "majority": majority, "n": n, "command": cmd}))?;
    report.lap("score");

    // ---- probes ----
    let targets = ProbeTargets {
        examples: (0..n).collect(),
        class_names: labels.names.clone(),
        classes: Some(gold.clone()),
        numeric_names: ds.spec.numeric_columns.clone(),
        numeric: ds.examples.iter().flat_map(|e| e.numeric.iter().copied()).collect(),
    };
    // The defaults of `patchbay probe`.
    let eval = Eval::Holdout(0.2);
    let split = Split::new(n, Some(&gold), eval, SEED)?;
    let params = ProbeParams { eval, seed: SEED, logreg: LogRegParams { c: 1.0, max_iter: 500, tol: 1e-5 }, alpha: 1.0, standardize: true, bootstrap: 1000 };
    let bar = progress_bar(run.meta.sites.len() as u64, "probe", "probes", a.quiet);
    let pr = run_probes(&acts, &targets, &split, &params, &probes_dir(&probe_out), &bar)?;
    bar.finish_and_clear();
    write_results_csv(&probe_out.join("probe_results.csv"), &pr.rows)?;
    let test_rows: Vec<usize> = (0..n).filter(|&i| split.test_fold[i] == 0).collect();
    let chance = majority_rate(&gold, &test_rows, k);
    accuracy_by_layer(&probe_out.join("accuracy_by_layer.png"), &pr.rows, Some(chance), "Emotion probe accuracy by layer")?;
    r2_heatmap(&probe_out.join("appraisal_r2.png"), &pr.rows, -1, "Appraisal ridge probe R² by layer")?;
    let cmd = format!("patchbay probe {data_flags} --numeric-cols {} --sites {SITES} --positions -1 --out runs/probe", APPRAISALS.join(","));
    let (section, numbers) = probe_section(&pr.rows, chance, test_rows.len(), cfg.n_layers, &cmd);
    say(format!("probe: resid_post accuracy by layer {} (chance {chance:.3})", resid_accuracy(&numbers)));
    report.add(section, "probe", numbers)?;
    report.lap("probe");

    // ---- patching ----
    let patch_out = a.out.join("patch");
    std::fs::create_dir_all(&patch_out).map_err(|e| Error::io(&patch_out, e))?;
    let correct: Vec<usize> = (0..n).filter(|&i| scores.pred[i] == gold[i]).collect();
    let pairs = contrast_pairs(&gold, &correct, plan.pairs, SEED)?;
    let pairs_path = patch_out.join("pairs.jsonl");
    let pairs_text: String = pairs.iter().map(|q| format!("{}\n", json!(q))).collect();
    patchbay::io::write_atomic(&pairs_path, pairs_text.as_bytes())?;
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
    let jsonl = patch_out.join("experiments.jsonl");
    let mut file = std::fs::File::create(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
    let bar = progress_bar(exps.len() as u64, "patch", "experiments", a.quiet);
    let skip = HashSet::new();
    let settings = RunSettings { method: Method::Resumed, skip: &skip, batch_rows: 256, mem_budget: 2 << 30, progress: &bar };
    let mut done = Vec::with_capacity(exps.len());
    run_sweep(&model, &p.ids, &sweep, &exps, &settings, &mut |r| {
        let line = serde_json::to_string(&r).map_err(json_err)?;
        writeln!(file, "{line}").and_then(|_| file.flush()).map_err(|e| Error::io(&jsonl, e))?;
        done.push(Done { result: r, line });
        Ok(())
    })?;
    bar.finish_and_clear();
    drop(file);
    let summary = summarize(&done.iter().map(|d| d.result.clone()).collect::<Vec<_>>());
    write_outputs(&patch_out, done)?;
    let cmd = format!("patchbay patch {data_flags} --pairs {} --sites {SITES} --window {window} --positions -1 --out runs/patch", sh(&pairs_path));
    let (section, numbers) = patch_section(&summary, pairs.len(), correct.len(), window, &cmd);
    say(format!("patch: {} experiments, highest flip rate {}", exps.len(), numbers["best"]));
    report.add(section, "patch", numbers)?;
    report.lap("patch");

    // ---- steering ----
    let steer_out = a.out.join("steer");
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
    let directions = class_mean_directions(&x_train, d, &train_gold, k);
    let steer_targets: Vec<SteerTarget> = directions
        .iter()
        .enumerate()
        .filter_map(|(c, dir)| {
            let prompts: Vec<usize> = test_rows.iter().copied().filter(|&i| gold[i] != c).take(plan.steer_prompts).collect();
            dir.clone().map(|direction| SteerTarget { label: c, direction, prompts })
        })
        .collect();
    let mean_norm = x.chunks(d).map(patchbay::intervene::norm).sum::<f32>() / n.max(1) as f32;
    let dir_norm = steer_targets.iter().map(|t| patchbay::intervene::norm(&t.direction)).sum::<f32>() / steer_targets.len().max(1) as f32;
    let total: usize = steer_targets.iter().map(|t| t.prompts.len()).sum::<usize>() * plan.strengths.len() * 2;
    let bar = progress_bar(total as u64, "steer", "prompts", a.quiet);
    let rows = steer_sweep(&model, &p.ids, site, &steer_targets, &plan.strengths, &labels.names, &labels.token_ids, SEED, 32, &bar)?;
    bar.finish_and_clear();
    write_steering(&steer_out, &rows, &steer_targets, &labels.names, site)?;
    let (section, numbers) = steer_section(&rows, &plan.strengths, site, mean_norm, dir_norm, steer_targets.first().map_or(0, |t| t.prompts.len()));
    say(format!("steer: {}", numbers["headline"].as_str().unwrap_or("")));
    report.add(section, "steer", numbers)?;
    report.lap("steer");

    // ---- timings and how to rebuild the model ----
    let total_s = t0.elapsed().as_secs_f64();
    report.timings.push(("total".into(), total_s));
    let rows: Vec<Vec<String>> = report.timings.iter().map(|(s, t)| vec![s.clone(), format!("{t:.1}")]).collect();
    let section = format!(
        "## Timings\n\nWall-clock seconds per stage on this machine ({} rayon threads):\n\n{}\n## Rebuilding the model\n\n```sh\npython3.11 -m venv /tmp/demo-venv\n/tmp/demo-venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu -r scripts/demo/requirements.txt\n/tmp/demo-venv/bin/python scripts/demo/make_corpus.py     # demo/corpus.csv\n/tmp/demo-venv/bin/python scripts/demo/train.py           # demo/model\n```\n",
        rayon::current_num_threads(),
        table(&["stage", "seconds"], &rows)
    );
    report.add(section, "total_s", json!(total_s))?;
    say(format!("wrote {} ({total_s:.1} s)", a.out.join("report.md").display()));
    Ok(())
}

/// What the model and the data are.
#[allow(clippy::too_many_arguments)]
fn model_section(model: &Model, model_dir: &Path, data_path: &Path, bundled_data: bool, rows_read: usize, n: usize, stats: &TokenStats, labels: &patchbay::data::labels::LabelSet) -> String {
    let c = &model.cfg;
    let dtype = c.declared_dtype.map_or("?", |d| d.name());
    let mut s = format!(
        "# patchbay demo\n\nThe pipeline of Tak et al. 2025 (probing, activation patching) and steering along emotion directions (Wang et al. 2025), end to end on a model small enough to run it in a minute on a laptop CPU.\n\n## The model\n\n`{}`: a {} model ({}), {} layers, d_model {}, {} attention heads ({} key/value heads, d_head {}), MLP width {}, vocabulary {}, {} parameters{}, {dtype} weights.\n",
        model_dir.display(),
        c.family.name(),
        c.model_type,
        c.n_layers,
        c.d_model,
        c.n_heads,
        c.n_kv_heads,
        c.d_head,
        c.d_mlp,
        c.vocab_size,
        model.weights.n_params,
        if c.tie_embeddings { " (embeddings tied)" } else { "" },
    );
    let training: Option<Value> = std::fs::read(model_dir.join("training.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    match training {
        Some(t) => {
            let last = t["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or(Value::Null);
            let _ = write!(
                s,
                "\nIt was trained from scratch by `{}` (pinned versions in `scripts/demo/requirements.txt`: torch {}, transformers {}, tokenizers {}) as a causal language model on the {} training rows of `{}`, each written as the prompt below followed by its emotion (`{}`): {} epochs, {} steps of batch {}, {}, seed {}, {} CPU thread(s), {} s. Its tokenizer is a {}. Final training loss {:.3}; held-out accuracy of the saved weights in transformers: {:.3}.\n",
                t["script"].as_str().unwrap_or("?"),
                t["versions"]["torch"].as_str().unwrap_or("?"),
                t["versions"]["transformers"].as_str().unwrap_or("?"),
                t["versions"]["tokenizers"].as_str().unwrap_or("?"),
                t["training_documents"],
                t["corpus"].as_str().unwrap_or("?"),
                t["document"].as_str().unwrap_or("?"),
                t["epochs"],
                t["steps"],
                t["batch_size"],
                t["optimizer"].as_str().unwrap_or("?"),
                t["seed"],
                t["threads"],
                t["seconds"],
                t["tokenizer"].as_str().unwrap_or("?"),
                last["train_loss"].as_f64().unwrap_or(f64::NAN),
                t["heldout_accuracy_bf16"].as_f64().unwrap_or(f64::NAN),
            );
        }
        None => s.push_str("\n(No training.json in the model directory: how it was trained is not recorded.)\n"),
    }
    let about = if bundled_data {
        "the demo corpus written by `scripts/demo/make_corpus.py` (seeded, standard library only), short first-person event descriptions in the style of crowd-enVENT (Troiano et al. 2023) with the emotion words left out, its 13 emotions (no-emotion spelled `neutral`) and nine of its appraisal ratings (1-5). The emotion follows from the event's structure and the ratings from its wording (who caused it, how it ended, phrases such as \"all of a sudden\" or \"there was nothing I could do\"), with rater noise; no crowd-enVENT text is used"
    } else {
        "a corpus given with --dataset"
    };
    let _ = write!(
        s,
        "\n## The data\n\n`{}` ({rows_read} rows read): {about}. The demo evaluates on the {n} held-out rows (`{SPLIT_FILTER}`; the bundled model never saw them), each rendered with the `{TEMPLATE}` template:\n\n> What are the inferred emotions in the following contexts? Context: *text* Answer:\n\nTokens per prompt: {}.\n\nLabels (each scored by the first token of \" label\"): {}.\n",
        data_path.display(),
        stats.describe(),
        labels.names.iter().zip(&labels.tokens).map(|(n, t)| format!("{n} (`{t}`)")).collect::<Vec<_>>().join(", "),
    );
    s
}

fn score_section(scores: &Scores, accuracy: f64, majority: f64, cmd: &str) -> String {
    let conf = scores.confusion();
    let rows: Vec<Vec<String>> = scores
        .labels
        .names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let n: usize = conf[c].iter().sum();
            let predicted = scores.pred.iter().filter(|&&p| p == c).count();
            vec![name.clone(), n.to_string(), predicted.to_string(), if n > 0 { format!("{:.2}", conf[c][c] as f64 / n as f64) } else { "-".into() }]
        })
        .collect();
    format!(
        "## 1. Label scoring\n\nThe model's own answer: the next-token logits after \"Answer:\" restricted to the label tokens. **Accuracy {accuracy:.3}** on {} held-out prompts (majority class: {majority:.3}; uniform guessing: {:.3}).\n\n{}\n![confusion matrix](score/confusion.png)\n\nFiles: `score/scores.jsonl`, `score/score.json`, `score/confusion.csv`. Reproduce: `{cmd}`\n",
        scores.n(),
        1.0 / scores.labels.len() as f64,
        table(&["emotion", "gold", "predicted", "recall"], &rows)
    )
}

/// The probing section and its numbers: accuracy per site and layer (position -1), the best R²
/// per appraisal.
fn probe_section(rows: &[ResultRow], chance: f64, n_eval: usize, n_layers: usize, cmd: &str) -> (String, Value) {
    let sites: Vec<&str> = SITES.split(',').collect();
    let acc = |site: &str, layer: usize| rows.iter().find(|r| r.metric == "accuracy" && r.site == site && r.layer == layer).map(|r| r.value);
    let table_rows: Vec<Vec<String>> = (0..n_layers)
        .map(|l| std::iter::once(l.to_string()).chain(sites.iter().map(|s| acc(s, l).map_or("-".into(), |v| format!("{v:.3}")))).collect())
        .collect();
    let mut header = vec!["layer"];
    header.extend(&sites);
    let r2_rows: Vec<Vec<String>> = APPRAISALS
        .iter()
        .filter_map(|a| {
            let best = rows.iter().filter(|r| r.metric == format!("r2:{a}")).max_by(|x, y| x.value.total_cmp(&y.value))?;
            let last = rows.iter().find(|r| r.metric == format!("r2:{a}") && r.site == "resid_post" && r.layer + 1 == n_layers)?;
            Some(vec![a.to_string(), format!("{:.2}", last.value), format!("{:.2} ({} layer {})", best.value, best.site, best.layer)])
        })
        .collect();
    let resid: Vec<f64> = (0..n_layers).map(|l| acc("resid_post", l).unwrap_or(f64::NAN)).collect();
    let section = format!(
        "## 2. Probing\n\nActivations at the last token (\"Answer:\"'s colon) of every layer's attention output, MLP output and residual stream; a multinomial logistic regression of the emotion and a ridge regression of each appraisal rating per site and layer (scikit-learn's objectives, C = 1, alpha = 1, standardised features), fitted on 80% of the held-out rows and evaluated on the other 20% ({n_eval} prompts, stratified, seed 0). The dashed line is the majority class of the evaluated prompts ({chance:.3}).\n\nEmotion probe accuracy:\n\n{}\n![probe accuracy by layer](probe/accuracy_by_layer.png)\n\nAppraisal ratings (R² on the evaluated prompts):\n\n{}\n![appraisal R2](probe/appraisal_r2.png)\n\nFiles: `probe/probe_results.csv` (with 95% bootstrap intervals), `probe/probes/` (weights), `probe/acts/` (the captured activations). Reproduce: `{cmd}` (add `--only-correct` to probe only the prompts the model gets right, as the study does).\n",
        table(&header, &table_rows),
        table(&["appraisal", "R² resid_post, last layer", "best (site, layer)"], &r2_rows),
    );
    let numbers = json!({
        "chance": chance,
        "n_eval": n_eval,
        "resid_post": resid,
        "attn_out": (0..n_layers).map(|l| acc("attn_out", l)).collect::<Vec<_>>(),
        "mlp_out": (0..n_layers).map(|l| acc("mlp_out", l)).collect::<Vec<_>>(),
        "command": cmd,
    });
    (section, numbers)
}

fn patch_section(summary: &[SummaryRow], n_pairs: usize, n_correct: usize, window: usize, cmd: &str) -> (String, Value) {
    let mut centers: Vec<usize> = summary.iter().map(|r| r.center).collect();
    centers.sort_unstable();
    centers.dedup();
    let sites: Vec<&str> = SITES.split(',').collect();
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| std::iter::once(s.to_string()).chain(centers.iter().map(|&c| summary.iter().find(|r| r.site == *s && r.center == c).map_or("-".into(), |r| format!("{:.2}", r.flip_rate)))).collect())
        .collect();
    let header: Vec<String> = std::iter::once("site \\ centre layer".to_string()).chain(centers.iter().map(|c| c.to_string())).collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let best = summary.iter().max_by(|x, y| x.flip_rate.total_cmp(&y.flip_rate));
    let best_text = best.map_or("-".to_string(), |b| format!("{} at centre layer {}: {:.2} [{:.2}, {:.2}]", b.site, b.center, b.flip_rate, b.flip_lo, b.flip_hi));
    let section = format!(
        "## 3. Activation patching\n\n{n_pairs} random (source, target) pairs of held-out prompts with different emotions, both predicted correctly ({n_correct} such prompts). Each experiment copies one site of the source's clean run into the target's run over a window of {window} consecutive layers (the study's 5 of 16, scaled to this model) at the last token, and reads the target's label logits; it is a flip when the target's prediction becomes the source's. Run with the resumed method (one clean pass per prompt, each experiment resumed at its first patched layer).\n\nFlip rate by site and window centre (95% Wilson intervals in `patch/summary.csv`); highest: {best_text}.\n\n{}\n![patching flip rate](patch/heatmap.png)\n\nFiles: `patch/pairs.jsonl`, `patch/experiments.jsonl`, `patch/summary.csv`. Reproduce: `{cmd}`\n",
        table(&header, &rows)
    );
    let numbers = json!({
        "pairs": n_pairs,
        "window": window,
        "best": best_text,
        "flip_rate": summary.iter().map(|r| json!({"site": r.site, "center": r.center, "n": r.n, "flip_rate": r.flip_rate, "mean_logit_diff": r.mean_logit_diff})).collect::<Vec<_>>(),
        "command": cmd,
    });
    (section, numbers)
}

/// The resid_post probe accuracies of the probe numbers, for the console.
fn resid_accuracy(numbers: &Value) -> String {
    numbers["resid_post"].as_array().map_or(String::new(), |a| a.iter().map(|v| v.as_f64().map_or("-".into(), |v| format!("{v:.2}"))).collect::<Vec<_>>().join(" "))
}

/// Mean of a field of the steering rows of one direction kind and strength (over labels).
fn mean_over_labels(rows: &[SteerRow], kind: DirectionKind, strength: f32, field: fn(&SteerRow) -> f64) -> f64 {
    let sel: Vec<f64> = rows.iter().filter(|r| r.direction == kind && r.strength == strength && r.n > 0).map(field).collect();
    sel.iter().sum::<f64>() / sel.len().max(1) as f64
}

fn steer_section(rows: &[SteerRow], strengths: &[f32], site: Site, mean_norm: f32, dir_norm: f32, per_label: usize) -> (String, Value) {
    let (cm, rnd) = (DirectionKind::ClassMean, DirectionKind::Random);
    let prob = |r: &SteerRow| r.mean_prob;
    let hit = |r: &SteerRow| r.hit_rate;
    let by_strength: Vec<Vec<String>> = strengths
        .iter()
        .map(|&s| {
            vec![
                format!("{s}"),
                format!("{:.3}", mean_over_labels(rows, cm, s, prob)),
                format!("{:.2}", mean_over_labels(rows, cm, s, hit)),
                format!("{:.3}", mean_over_labels(rows, rnd, s, prob)),
                format!("{:.2}", mean_over_labels(rows, rnd, s, hit)),
            ]
        })
        .collect();
    let top = strengths.iter().copied().fold(0.0f32, f32::max);
    // The headline strength: the weakest that makes the emotion the prediction half of the time.
    let mid = strengths.iter().copied().find(|&s| mean_over_labels(rows, cm, s, hit) >= 0.5).unwrap_or(top);
    let find = |label: &str, kind: DirectionKind, s: f32| rows.iter().find(|r| r.label == label && r.direction == kind && r.strength == s);
    let mut labels: Vec<&str> = Vec::new();
    for r in rows {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let per_emotion: Vec<Vec<String>> = labels
        .iter()
        .map(|&l| {
            let mut row = vec![l.to_string()];
            row.extend(strengths.iter().map(|&s| find(l, cm, s).map_or("-".into(), |r| format!("{:.3}", r.mean_prob))));
            row.push(find(l, rnd, top).map_or("-".into(), |r| format!("{:.3}", r.mean_prob)));
            row
        })
        .collect();
    let per_emotion_header: Vec<String> = std::iter::once("emotion".to_string()).chain(strengths.iter().map(|s| format!("strength {s}"))).chain(std::iter::once(format!("random, strength {top}"))).collect();
    let per_emotion_header: Vec<&str> = per_emotion_header.iter().map(String::as_str).collect();
    let headline = format!(
        "strength {mid}: P(steered emotion) {:.3} -> {:.3}, predicted {:.0}% of the time (random direction of the same norm: {:.3}, {:.0}%)",
        mean_over_labels(rows, cm, 0.0, prob),
        mean_over_labels(rows, cm, mid, prob),
        100.0 * mean_over_labels(rows, cm, mid, hit),
        mean_over_labels(rows, rnd, mid, prob),
        100.0 * mean_over_labels(rows, rnd, mid, hit),
    );
    let section = format!(
        "## 4. Steering\n\nFor each emotion, its direction in the residual stream after block {} (`{site}`, mid-depth) is the difference between the mean activation of its prompts and that of all other prompts at the last token, on the probes' training rows. Adding *strength* x direction at every position of {per_label} evaluation prompts of other emotions, then reading the label probabilities at the last token (softmax over the label logits). The control adds a random direction of the same norm. Mean direction norm {dir_norm:.2}; mean residual norm at that site {mean_norm:.2}.\n\nMean over the emotions:\n\n{}\nP(emotion) per emotion and strength, with its own direction (and a random one at strength {top}):\n\n{}\nHeadline: {headline}.\n\nFiles: `steer/steering.csv` (every emotion, direction and strength), `steer/directions.safetensors` (the directions, one `[d_model]` tensor per emotion). There is no steering subcommand yet: this stage is `patchbay::experiments::demo::steer_sweep`.\n",
        site.layer,
        table(&["strength", "P(emotion), its direction", "predicted as it", "P(emotion), random direction", "predicted as it"], &by_strength),
        table(&per_emotion_header, &per_emotion),
    );
    let numbers = json!({
        "site": site.to_string(),
        "headline": headline,
        "by_strength": strengths.iter().map(|&s| json!({"strength": s, "class_mean_prob": mean_over_labels(rows, cm, s, prob), "class_mean_hit": mean_over_labels(rows, cm, s, hit), "random_prob": mean_over_labels(rows, rnd, s, prob), "random_hit": mean_over_labels(rows, rnd, s, hit)})).collect::<Vec<_>>(),
        "rows": rows,
    });
    (section, numbers)
}

/// steering.csv and the directions.
fn write_steering(dir: &Path, rows: &[SteerRow], targets: &[SteerTarget], names: &[String], site: Site) -> Result<()> {
    let mut csv = String::from("emotion,direction,strength,n,mean_prob,hit_rate\n");
    for r in rows {
        let kind = if r.direction == DirectionKind::ClassMean { "class-mean" } else { "random" };
        let _ = writeln!(csv, "{},{kind},{},{},{:.6},{:.6}", r.label, r.strength, r.n, r.mean_prob, r.hit_rate);
    }
    patchbay::io::write_atomic(&dir.join("steering.csv"), csv.as_bytes())?;
    let tensors: Vec<(String, patchbay::io::OutTensor)> = targets
        .iter()
        .map(|t| (names[t.label].clone(), patchbay::io::OutTensor::Float { shape: vec![t.direction.len()], data: t.direction.clone(), dtype: OutDtype::F32 }))
        .collect();
    let md = std::collections::HashMap::from([("site".to_string(), site.to_string()), ("what".to_string(), "mean(x | emotion) - mean(x | other emotions) at the last token".to_string())]);
    patchbay::io::write_safetensors(&dir.join("directions.safetensors"), &tensors, md)
}
