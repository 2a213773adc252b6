//! `patchbay demo`: the study pipeline end to end on the bundled model and corpus (demo/), with
//! a Markdown report and PNG plots: label scoring, probes by layer, a patching sweep, steering.
//!
//! Every stage goes through the same library code as its own command (`score`, `probe`,
//! `patch`), and the report gives the command that reproduces it. Each stage's files and the
//! report (rewritten after every stage) are written as soon as the stage is done. Here: the
//! inputs are loaded as `score`/`probe`/`patch` load them; the pipeline is
//! `experiments::demo::pipeline`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::inputs::{DatasetArgs, InputArgs, LabelArgs, Prompts, TemplateArgs};
use super::progress_bar;
use patchbay::backend::DeviceSpec;
use patchbay::experiments::Reporter;
use patchbay::experiments::demo::pipeline::{self, APPRAISALS, DemoInputs, LABEL_COL, Plan, SPLIT_FILTER, TEMPLATE};
use patchbay::model::Model;
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
  4. steer: each emotion's class-mean direction in the middle layer's residual stream (on the
     probes' training rows, in the file format of `patchbay directions`), added at every position
     of the first prompts at several strengths, against a random direction of the same norm, by
     the sweep of `patchbay steer --mode labels` (OUT/steer/: directions.safetensors,
     scores.jsonl, clean.jsonl, summary.csv, shares.png, steering.csv).
OUT/report.md describes the model and every result with its plot, the timings, and the commands
(`patchbay score`, `probe`, `patch`, `steer`) that reproduce each part; OUT/summary.json has the
numbers.

The bundled files (demo/ in the source tree): demo/model, a small Llama trained from scratch by
scripts/demo/train.py on demo/corpus.csv, a synthetic emotion corpus written by
scripts/demo/make_corpus.py. --model and --dataset replace them: the dataset must have the
corpus's columns (split, emotion, text and the nine ratings).";

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

pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let say = |s: String| {
        if !a.quiet {
            eprintln!("{s}");
        }
    };
    let model_dir = bundled(&a.model, "model")?;
    let data_path = bundled(&a.dataset, "corpus.csv")?;
    let plan = Plan::new(a.quick);
    // ---- model, data, prompts: exactly what `patchbay score` / `probe` / `patch` load ----
    let inputs = InputArgs {
        model: model_dir.clone(),
        engine: super::EngineArgs { device: DeviceSpec::Cpu, precision: None },
        allow_nonfinite: false,
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
            sample: None,
            sample_seed: 0,
            stratify: false,
        },
        template: TemplateArgs { template: TEMPLATE.into(), shots: None, chat: false },
    };
    let model = Model::load(&model_dir)?;
    let p = Prompts::load(&inputs, &LabelArgs { token_ids: None, labels: None, label_token_ids: None }, a.quiet)?;
    let dataset = p.dataset.as_ref().ok_or_else(|| Error::input("no dataset"))?;
    let gold: Vec<usize> = p.gold()?.into_iter().map(|g| g.ok_or_else(|| Error::input("a row has no gold label"))).collect::<Result<_>>()?;
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let demo = DemoInputs {
        model: &model,
        model_dir: &model_dir,
        data_path: &data_path,
        bundled_data: a.dataset.is_none(),
        prompts: &p.ids,
        dataset,
        labels: &p.labels,
        gold: &gold,
        plan: &plan,
        out: &a.out,
        started,
    };
    let bar = |len: u64, what: &str, unit: &str| progress_bar(len, what, unit, a.quiet);
    pipeline::run(&demo, &Reporter { bar: &bar, say: &say })
}
