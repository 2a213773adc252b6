//! `patchbay judge`: which emotion generated texts express, judged locally by label scoring or a saved probe.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::ProgressBar;
use serde_json::json;

use super::{command_manifest, merge, model_json, progress_bar};
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::template::Template;
use patchbay::engine::Engine;
use patchbay::experiments::judge::{GenerationRow, Judged, ProbeJudge, SummaryRow, read_generations, summarize, summary_csv};
use patchbay::experiments::patch_files::write_manifest;
use patchbay::experiments::score::label_logits;
use patchbay::logits::argmax;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

const JUDGE_HELP: &str = "Examples:
  patchbay judge --model M --generations runs/clean/generations.jsonl --generations runs/angry/generations.jsonl --target anger --labels anger,joy,sadness,fear,neutral --out runs/judged
  patchbay judge --model JUDGE --device cuda --generations runs/steer/generations.jsonl --labels anger,joy --template 'Text: {text} The emotion expressed is' --out runs/judged
  patchbay probe --model M --dataset envent_gen.csv --preset envent --template tak --sites resid_post --positions -1 --out runs/probe
  patchbay judge --model M --generations runs/angry/generations.jsonl --probe runs/probe/probes/blocks.12.hook_resid_post.safetensors --template tak --out runs/judged_probe

The judge: each generated text is put into a judging prompt (--template: a preset, default `tak`,
the study's \"What are the inferred emotions in the following contexts? Context: {text} Answer:\",
or a string with {text}; --chat wraps it in the judge's chat template) and the judge model (--model,
the generator or any other local model) scores the labels by their next-token logits at its end,
as `patchbay score` does. The judged label is the highest. judge.json names the judge: method,
model, config hash, template, labels and their tokens.

Or a saved probe judges (--probe FILE, a weight file of `patchbay probe --out P`:
P/probes/<site>.safetensors, fitted on --model's activations; its classes are the labels): the
judging prompt's activation at the probe's site and --probe-position (default -1) through the
probe's logistic regression, W x + b; `label_logits` are then those class logits. Use the
template the probe was fitted with (the probe's prompts were rendered through it).

Inputs: --generations FILE (repeatable; each file is a condition, named by its directory unless
--names gives the names), rows of `patchbay generate` (index, text, and beta when it steered).
The target (the emotion a row was steered toward): the row's `target` field, else --target for
every row; a target outside the labels is an error. Empty texts are judged (the prompt without a
text) and counted as n_empty.

Outputs in --out: judged.jsonl (one object per generation, in input order, flushed as batches
complete: condition, index, direction, beta, target, label_logits in label order, pred, text),
summary.csv (per condition, direction and beta: n, n_empty, n_target, accuracy against the target, the share of each
judged label), judge.json (the judge and the summary), manifest.json.";

#[derive(Args)]
#[command(after_help = JUDGE_HELP)]
pub struct JudgeArgs {
    /// The judge: a Hugging Face model directory or GGUF file (the generator or another local model).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[arg(long, help = super::ALLOW_NONFINITE_HELP)]
    allow_nonfinite: bool,
    /// A generations.jsonl file (repeatable: one condition each).
    #[arg(long, required = true)]
    generations: Vec<PathBuf>,
    /// Names of the conditions, comma-separated, one per --generations [default: each file's directory name].
    #[arg(long)]
    names: Option<String>,
    /// Label names, comma-separated (each scored by the first token of \" name\").
    #[arg(long, conflicts_with = "label_token_ids")]
    labels: Option<String>,
    /// Label tokens given directly: NAME=ID,... or ID,...
    #[arg(long)]
    label_token_ids: Option<String>,
    /// Judge by a saved probe instead of label scoring: a `patchbay probe` weight file (OUT/probes/<site>.safetensors) of --model; its classes are the labels.
    #[arg(long, conflicts_with_all = ["labels", "label_token_ids"])]
    probe: Option<PathBuf>,
    /// The probe's position (one it was fitted at).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    probe_position: i64,
    /// The judging prompt: a preset (tak, tak-list, tak-guess, plain) or a string with {text}.
    #[arg(long, default_value = "tak")]
    template: String,
    /// Wrap each judging prompt as a user message in the judge's chat template.
    #[arg(long)]
    chat: bool,
    /// The target label of rows without a `target` field.
    #[arg(long)]
    target: Option<String>,
    /// Judging prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The condition names: --names, else each file's directory name.
fn condition_names(a: &JudgeArgs) -> Result<Vec<String>> {
    let names = match &a.names {
        Some(n) => parse_list(n, "condition name")?,
        None => a.generations.iter().map(|p| p.parent().and_then(|d| d.file_name()).map_or_else(|| p.display().to_string(), |d| d.to_string_lossy().into_owned())).collect(),
    };
    if names.len() != a.generations.len() {
        return Err(Error::input(format!("--names gives {} names for {} --generations files", names.len(), a.generations.len())));
    }
    if let Some(dup) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(n)) {
        return Err(Error::input(format!("two --generations files are both named `{dup}`: give --names")));
    }
    Ok(names)
}

pub fn run(a: JudgeArgs) -> Result<()> {
    let t0 = Instant::now();
    let conditions = condition_names(&a)?;
    let mut rows: Vec<(usize, GenerationRow)> = Vec::new();
    for (c, path) in a.generations.iter().enumerate() {
        rows.extend(read_generations(path)?.into_iter().map(|r| (c, r)));
    }
    let tok = PromptTokenizer::load(&a.model)?;
    let model = Model::load(&a.model)?;
    let scorer = scorer(a.probe.as_deref(), a.probe_position, a.labels.as_deref(), a.label_token_ids.as_deref(), None, &model, &tok)?;
    let names = scorer.names().to_vec();
    let target_of = |r: &GenerationRow| -> Result<Option<usize>> {
        match r.target.as_deref().or(a.target.as_deref()) {
            None => Ok(None),
            Some(t) => names.iter().position(|n| n == t).map(Some).ok_or_else(|| Error::input(format!("target `{t}` is not one of the labels ({})", names.join(", ")))),
        }
    };
    let targets: Vec<Option<usize>> = rows.iter().map(|(_, r)| target_of(r)).collect::<Result<_>>()?;
    let mut template = Template::parse(&a.template)?;
    template.chat = a.chat;
    let engine = a.engine.load(&model, a.allow_nonfinite)?;
    let judge = Judge { engine: engine.as_ref(), model: &model, tok: &tok, template, scorer };
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let manifest = |extra: serde_json::Value| {
        let fields = json!({
            "judge": judge.describe(),
            "generations": a.generations.iter().zip(&conditions).map(|(p, c)| json!({"condition": c, "path": p.display().to_string()})).collect::<Vec<_>>(),
            "n": rows.len(),
            "timings_s": extra,
        });
        write_manifest(&a.out.join("manifest.json"), &command_manifest("judge", fields))
    };
    manifest(serde_json::Value::Null)?;
    let bar = progress_bar(rows.len() as u64, "judge", "texts", a.quiet);
    let judged = judge.judge(&conditions, &rows, &targets, a.batch_size, a.quiet, &bar, &a.out.join("judged.jsonl"))?;
    bar.finish_and_clear();
    let summary = summarize(&conditions, &judged, names.len());
    patchbay::io::write_atomic(&a.out.join("summary.csv"), summary_csv(&summary, &names).as_bytes())?;
    let report = json!({"judge": judge.describe(), "summary": summary});
    write_manifest(&a.out.join("judge.json"), &report)?;
    manifest(json!({"total": t0.elapsed().as_secs_f64()}))?;
    if !a.quiet {
        print_summary(&summary, &names);
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}

/// The scorer of the judge flags: a saved probe (`probe`, at `position`; its classes are the
/// labels), else the label set of `label_token_ids` or `labels`, else of `default_labels`.
pub fn scorer(probe: Option<&Path>, position: i64, labels: Option<&str>, label_token_ids: Option<&str>, default_labels: Option<&[String]>, model: &Model, tok: &PromptTokenizer) -> Result<Scorer> {
    if let Some(path) = probe {
        if labels.is_some() || label_token_ids.is_some() {
            return Err(Error::input("a probe judge's labels are its classes: give --labels / --label-token-ids or a probe, not both"));
        }
        return Ok(Scorer::Probe(ProbeJudge::load(path, position, model)?));
    }
    let set = match (label_token_ids, labels, default_labels) {
        (Some(spec), _, _) => LabelSet::parse_ids(spec, Some(tok))?,
        (None, Some(names), _) => LabelSet::resolve(&parse_list(names, "label")?, tok)?,
        (None, None, Some(names)) => LabelSet::resolve(names, tok)?,
        (None, None, None) => return Err(Error::input("give the labels: --labels a,b,c or --label-token-ids (or a saved probe: --probe FILE)")),
    };
    set.check_vocab(model.cfg.vocab_size)?;
    Ok(Scorer::Labels(set))
}

/// One line per summary row on stderr: the most judged label and the accuracy.
pub fn print_summary(summary: &[SummaryRow], labels: &[String]) {
    for r in summary {
        let top = argmax(&r.shares.iter().map(|&s| s as f32).collect::<Vec<_>>());
        let beta = r.beta.map_or(String::new(), |b| format!(" beta {b}"));
        let direction = r.direction.as_deref().map_or(String::new(), |d| format!(" {d}"));
        let acc = r.accuracy.map_or(String::new(), |acc| format!(", accuracy vs target {acc:.3} ({} rows)", r.n_target));
        eprintln!("{}{direction}{beta}: {} texts, most judged {} ({:.0}%){acc}", r.condition, r.n, labels[top], 100.0 * r.shares[top]);
    }
}

/// How a judge scores a judging prompt: the label tokens' next-token logits, or a saved probe's
/// class logits on the prompt's activations.
pub enum Scorer {
    Labels(LabelSet),
    Probe(ProbeJudge),
}

impl Scorer {
    /// The judged labels (the label set, or the probe's classes), in logit order.
    pub fn names(&self) -> &[String] {
        match self {
            Scorer::Labels(l) => &l.names,
            Scorer::Probe(p) => &p.classes,
        }
    }
}

/// A judge: a model scoring each judging prompt (a text embedded in the template).
pub struct Judge<'a> {
    pub engine: &'a dyn Engine,
    pub model: &'a Model,
    pub tok: &'a PromptTokenizer,
    pub template: Template,
    pub scorer: Scorer,
}

impl Judge<'_> {
    pub fn names(&self) -> &[String] {
        self.scorer.names()
    }

    /// What judge.json and the manifests say about the judge.
    pub fn describe(&self) -> serde_json::Value {
        let scorer = match &self.scorer {
            Scorer::Labels(l) => json!({"method": "label scoring of a judging prompt", "labels": l}),
            Scorer::Probe(p) => json!({"method": "a saved probe on the judging prompt's activations", "probe": p.path.display().to_string(), "site": p.site.to_string(), "position": p.position, "classes": p.classes}),
        };
        let mut d = json!({"model": model_json(self.model), "device": self.engine.device_name(), "nonfinite_values": self.engine.nonfinite_values(), "template": self.template});
        merge(&mut d, scorer);
        d
    }

    /// Logits `[n, n_labels]` of judging prompts.
    fn logits(&self, prompts: &[Vec<u32>], batch_size: usize, bar: &ProgressBar) -> Result<Vec<f32>> {
        match &self.scorer {
            Scorer::Labels(l) => label_logits(self.engine, prompts, l, &[], batch_size, bar),
            Scorer::Probe(p) => p.class_logits(self.engine, prompts, batch_size, bar),
        }
    }

    /// Judges `rows` (each with its condition index into `conditions`, and its target label
    /// index in `targets`), `batch_size` judging prompts per forward, writing judged.jsonl at
    /// `path` (flushed every few batches). Empty texts are judged as the prompt without a text
    /// (a warning says how many unless `quiet`); a non-finite label logit is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(&self, conditions: &[String], rows: &[(usize, GenerationRow)], targets: &[Option<usize>], batch_size: usize, quiet: bool, bar: &ProgressBar, path: &Path) -> Result<Vec<Judged>> {
        if batch_size == 0 {
            return Err(Error::input("--batch-size must be at least 1"));
        }
        let names = self.names();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|(_, r)| self.template.encode(self.tok, &r.text)).collect::<Result<_>>()?;
        let n_empty = rows.iter().filter(|(_, r)| r.text.trim().is_empty()).count();
        if n_empty > 0 && !quiet {
            eprintln!("warning: {n_empty} of {} generated texts are empty (judged as the prompt without a text; counted as n_empty)", rows.len());
        }
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
        let n_labels = names.len();
        let mut judged = Vec::with_capacity(rows.len());
        // A few forward batches at a time, each chunk's rows flushed when it completes.
        let chunk = batch_size * 4;
        for (start, batch) in prompts.chunks(chunk).enumerate().map(|(i, b)| (i * chunk, b)) {
            let logits = self.logits(batch, batch_size, bar)?; // [batch, n_labels]
            for (k, l) in logits.chunks_exact(n_labels).enumerate() {
                let (condition, row) = &rows[start + k];
                let target = targets[start + k];
                if let Some(bad) = l.iter().find(|v| !v.is_finite()) {
                    return Err(Error::input(format!("{}: generation {}: the judge's logit is {bad}", conditions[*condition], row.index)));
                }
                let pred = argmax(l);
                let line = json!({"condition": conditions[*condition], "index": row.index, "direction": row.direction, "beta": row.beta, "target": target.map(|t| &names[t]), "label_logits": l, "pred": names[pred], "text": row.text});
                writeln!(file, "{line}").map_err(|e| Error::io(path, e))?;
                judged.push(Judged { condition: *condition, row: row.clone(), target, pred });
            }
            file.flush().map_err(|e| Error::io(path, e))?;
        }
        Ok(judged)
    }
}
