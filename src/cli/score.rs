//! `patchbay score`: the model's own predictions over a label set.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::{progress_bar};
use patchbay::data::template::TokenStats;
use patchbay::experiments::dataset_files::write_examples;
use patchbay::experiments::score::{Scores, label_logits};
use patchbay::model::Model;
use patchbay::{Error, Result};

const SCORE_HELP: &str = "Examples:
  patchbay score --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness --out runs/score
  patchbay score --model M --dataset envent_gen.csv --preset envent --template tak --shots tak --out runs/envent --keep-correct runs/envent/correct.jsonl
  patchbay score --model M --token-ids ids.json --label-token-ids anger=4719,joy=16913 --out runs/ids

Each label is scored by the first token of \" <label>\" (encoded without special tokens); two
labels sharing that token are an error. The prediction is the label with the highest next-token
logit at the last position of the prompt. Without --labels, the labels are the dataset's gold
labels (sorted).

Outputs in --out: scores.jsonl (one object per prompt, in input order: index, label_logits in
label order, pred, and gold/correct/row when known), score.json (accuracy, per-label counts,
label tokens), confusion.csv (gold down, predicted across) and confusion.png (its heatmap, rows as fractions), manifest.json.";

#[derive(Args)]
#[command(after_help = SCORE_HELP)]
pub struct ScoreArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Write the correctly predicted examples here (JSONL with the dataset's columns).
    #[arg(long)]
    keep_correct: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let t0 = Instant::now();
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    if a.keep_correct.is_some() && p.dataset.is_none() {
        return Err(Error::input("--keep-correct needs --dataset (gold labels)"));
    }
    let gold = p.gold()?;
    let model = Model::load(&a.inputs.model)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;
    let stats = TokenStats::of(&prompts);
    if !a.quiet {
        eprintln!("{}", stats.describe());
        eprintln!("labels: {}", labels.names.iter().zip(&labels.token_ids).zip(&labels.tokens).map(|((n, id), t)| format!("{n}={id} ({t:?})")).collect::<Vec<_>>().join(", "));
    }
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let t_score = Instant::now();
    let bar = progress_bar(prompts.len() as u64, "score", "prompts", a.quiet);
    let logits = label_logits(engine.as_ref(), &prompts, &labels, &[], a.batch_size, &bar)?;
    bar.finish_and_clear();
    let score_s = t_score.elapsed().as_secs_f64();
    let scores = Scores::new(labels.clone(), logits, gold);
    let rows: Option<Vec<usize>> = ds.as_ref().map(|d| d.examples.iter().map(|e| e.row).collect());
    scores.write(&a.out, rows.as_deref())?;
    let mut kept = None;
    if let (Some(path), Some(ds)) = (&a.keep_correct, &ds) {
        let keep: Vec<bool> = scores.correct().into_iter().map(|c| c == Some(true)).collect();
        kept = Some(write_examples(path, ds, &keep)?);
    }
    let extra = json!({
        "token_stats": stats,
        "n": scores.n(),
        "accuracy": scores.accuracy(),
        "kept_correct": kept,
        "timings_s": {"score": score_s, "total": t0.elapsed().as_secs_f64()},
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
    });
    let manifest = manifest("score", &model, engine.as_ref(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
    patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    // The result itself is printed whatever --quiet says (it hides progress and notes).
    let description = scores.describe();
    println!("{}", description.lines().next().unwrap_or_default());
    if !a.quiet {
        eprint!("{}", description.split_once('\n').map_or("", |(_, rest)| rest));
        if let (Some(n), Some(p)) = (kept, &a.keep_correct) {
            eprintln!("kept {n} correctly predicted examples in {}", p.display());
        }
        eprintln!("wrote {}", a.out.join("scores.jsonl").display());
    }
    Ok(())
}
