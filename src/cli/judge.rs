//! `patchbay judge`: which emotion generated texts express, judged locally by label scoring.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::{command_manifest, load_engine, model_json, progress_bar};
use patchbay::backend::DeviceSpec;
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::template::Template;
use patchbay::experiments::judge::{GenerationRow, Judged, read_generations, summarize, summary_csv};
use patchbay::experiments::patch_files::write_manifest;
use patchbay::experiments::score::label_logits;
use patchbay::logits::argmax;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

const JUDGE_HELP: &str = "Examples:
  patchbay judge --model M --generations runs/clean/generations.jsonl --generations runs/angry/generations.jsonl --target anger --labels anger,joy,sadness,fear,neutral --out runs/judged
  patchbay judge --model JUDGE --device cuda --generations runs/steer/generations.jsonl --labels anger,joy --template 'Text: {text} The emotion expressed is' --out runs/judged

The judge: each generated text is put into a judging prompt (--template: a preset, default `tak`,
the study's \"What are the inferred emotions in the following contexts? Context: {text} Answer:\",
or a string with {text}; --chat wraps it in the judge's chat template) and the judge model (--model,
the generator or any other local model) scores the labels by their next-token logits at its end,
as `patchbay score` does. The judged label is the highest. judge.json names the judge: method,
model, config hash, template, labels and their tokens.

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
    /// Compute device: cpu (the f32 reference), cuda, cuda:N, or emu (the CUDA emulator).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// A generations.jsonl file (repeatable: one condition each).
    #[arg(long, required = true)]
    generations: Vec<PathBuf>,
    /// Names of the conditions, comma-separated, one per --generations [default: each file's directory name].
    #[arg(long)]
    names: Option<String>,
    /// Label names, comma-separated (each scored by the first token of \" name\").
    #[arg(long, conflicts_with = "label_token_ids", required_unless_present = "label_token_ids")]
    labels: Option<String>,
    /// Label tokens given directly: NAME=ID,... or ID,...
    #[arg(long)]
    label_token_ids: Option<String>,
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
    if a.batch_size == 0 {
        return Err(Error::input("--batch-size must be at least 1"));
    }
    let conditions = condition_names(&a)?;
    let mut rows: Vec<(usize, GenerationRow)> = Vec::new();
    for (c, path) in a.generations.iter().enumerate() {
        rows.extend(read_generations(path)?.into_iter().map(|r| (c, r)));
    }
    let tok = PromptTokenizer::load(&a.model)?;
    let labels = match (&a.label_token_ids, &a.labels) {
        (Some(spec), _) => LabelSet::parse_ids(spec, Some(&tok))?,
        (None, Some(names)) => LabelSet::resolve(&parse_list(names, "label")?, &tok)?,
        (None, None) => return Err(Error::input("give the labels: --labels a,b,c or --label-token-ids")),
    };
    let model = Model::load(&a.model)?;
    labels.check_vocab(model.cfg.vocab_size)?;
    let target_of = |r: &GenerationRow| -> Result<Option<usize>> {
        match r.target.as_deref().or(a.target.as_deref()) {
            None => Ok(None),
            Some(t) => labels.index_of(t).map(Some).ok_or_else(|| Error::input(format!("target `{t}` is not one of the labels ({})", labels.names.join(", ")))),
        }
    };
    let targets: Vec<Option<usize>> = rows.iter().map(|(_, r)| target_of(r)).collect::<Result<_>>()?;
    let mut template = Template::parse(&a.template)?;
    template.chat = a.chat;
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(_, r)| template.encode(&tok, &r.text)).collect::<Result<_>>()?;
    let n_empty = rows.iter().filter(|(_, r)| r.text.trim().is_empty()).count();
    if n_empty > 0 && !a.quiet {
        eprintln!("warning: {n_empty} of {} generated texts are empty (judged as the prompt without a text; counted as n_empty)", rows.len());
    }
    let engine = load_engine(&model, a.device)?;
    let judge = json!({
        "method": "label scoring of a judging prompt",
        "model": model_json(&model),
        "device": engine.device_name(),
        "template": template,
        "labels": labels,
    });
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let manifest = |extra: serde_json::Value| {
        let fields = json!({
            "judge": judge,
            "generations": a.generations.iter().zip(&conditions).map(|(p, c)| json!({"condition": c, "path": p.display().to_string()})).collect::<Vec<_>>(),
            "n": rows.len(),
            "timings_s": extra,
        });
        write_manifest(&a.out.join("manifest.json"), &command_manifest("judge", fields))
    };
    manifest(serde_json::Value::Null)?;

    let path = a.out.join("judged.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?);
    let bar = progress_bar(rows.len() as u64, "judge", "texts", a.quiet);
    let n_labels = labels.len();
    let mut judged = Vec::with_capacity(rows.len());
    // A few forward batches at a time, each chunk's rows flushed when it completes.
    let chunk = a.batch_size * 4;
    for (start, batch) in prompts.chunks(chunk).enumerate().map(|(i, b)| (i * chunk, b)) {
        let logits = label_logits(engine.as_ref(), batch, &labels, a.batch_size, &bar)?; // [batch, n_labels]
        for (k, l) in logits.chunks_exact(n_labels).enumerate() {
            let (condition, row) = &rows[start + k];
            let target = targets[start + k];
            if let Some(bad) = l.iter().find(|v| !v.is_finite()) {
                return Err(Error::input(format!("{}: generation {}: the judge's label logit is {bad}", conditions[*condition], row.index)));
            }
            let pred = argmax(l);
            let line = json!({"condition": conditions[*condition], "index": row.index, "direction": row.direction, "beta": row.beta, "target": target.map(|t| &labels.names[t]), "label_logits": l, "pred": labels.names[pred], "text": row.text});
            writeln!(file, "{line}").map_err(|e| Error::io(&path, e))?;
            judged.push(Judged { condition: *condition, row: row.clone(), target, pred });
        }
        file.flush().map_err(|e| Error::io(&path, e))?;
    }
    bar.finish_and_clear();
    let summary = summarize(&conditions, &judged, n_labels);
    patchbay::io::write_atomic(&a.out.join("summary.csv"), summary_csv(&summary, &labels.names).as_bytes())?;
    let report = json!({"judge": judge, "summary": summary});
    write_manifest(&a.out.join("judge.json"), &report)?;
    manifest(json!({"total": t0.elapsed().as_secs_f64()}))?;
    if !a.quiet {
        for r in &summary {
            let top = argmax(&r.shares.iter().map(|&s| s as f32).collect::<Vec<_>>());
            let beta = r.beta.map_or(String::new(), |b| format!(" {} beta {b}", r.direction.as_deref().unwrap_or("")));
            let acc = r.accuracy.map_or(String::new(), |acc| format!(", accuracy vs target {acc:.3} ({} rows)", r.n_target));
            eprintln!("{}{beta}: {} texts, most judged {} ({:.0}%){acc}", r.condition, r.n, labels.names[top], 100.0 * r.shares[top]);
        }
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}
