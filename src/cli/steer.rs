//! `patchbay steer --mode labels`: steering sweeps read through a label set.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::interventions::InterventionArgs;
use super::{load_engine, progress_bar};
use patchbay::experiments::steer::{SteerRow, random_controls, shares_chart, steer_labels, summarize, summary_csv};
use patchbay::intervene::spec::resolve_all;
use patchbay::model::Model;
use patchbay::{Error, Result};

const STEER_HELP: &str = "Examples:
  patchbay directions --model M --dataset emotions.csv --template tak --out runs/dirs
  patchbay steer --mode labels --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness \\
      --vector runs/dirs/directions.safetensors:joy --site resid_post --layers 1,2 --betas=-6,3,8 --positions all --out runs/steer
  patchbay steer --mode labels --model M --token-ids ids.json --label-token-ids 5,6,7 \\
      --vector v.safetensors --betas=1,2 --normalise --positions last:3 --out runs/ids
  patchbay steer --mode labels --model M --dataset D --template tak --project dirs.safetensors:joy+anger --betas 1 --out runs/po
  patchbay steer --mode labels --model M --dataset D --template tak --spec sweeps.json --out runs/spec

Every prompt is scored clean and under every condition (layer x beta, per direction): at the
site of that layer, at --positions, x <- x + beta v (v / ||v|| with --normalise), or with
--project x <- x + v - beta P x (P the projector onto the subspace, v = --vector or 0). A name
in --vector is a tensor name or, at each layer, <site>/<NAME> (so `dirs.safetensors:joy` with
--layers 1,2 takes each layer's own joy direction from `patchbay directions`). --spec FILE.json
takes one object or a list with the fields vector, project, site, layers, positions, betas,
normalise (unknown fields are an error). A same-norm random direction (seeded by --seed, one
per direction and layer) is steered too unless --no-random-control (not for --project).
Steered runs resume from each prompt's clean run at the steered layer (all conditions of a
layer are segments of one batched forward); a condition that changes nothing (beta 0) is the
clean run itself, its label logits those of clean.jsonl bit for bit.

Outputs in --out:
  scores.jsonl  one object per (prompt, layer, direction, beta), appended as batches finish:
                index, layer, site, direction (the vector's name; `random` for the control;
                project-out:<subspace>, project-set:<vector>:<subspace> with --project),
                beta, label_logits (label order), pred, clean_pred, and gold when known
  clean.jsonl   the clean run: index, label_logits, pred (and gold)
  summary.csv   layer, site, direction, beta, n, share:<label> (share of prompts predicted as
                each label), mean_logit_change:<label> (mean steered - clean label logit)
  shares.png    predicted-label shares against beta, one panel per layer and direction
  manifest.json model, device, command line, inputs, labels, specs, counts, timings, status";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// Score a label set at the last token of each steered prompt.
    Labels,
}

#[derive(Args)]
#[command(after_help = STEER_HELP)]
pub struct SteerArgs {
    /// What is read from the steered runs.
    #[arg(long, value_enum, default_value = "labels")]
    mode: Mode,
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    interventions: InterventionArgs,
    /// Seed of the random-direction control.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the same-norm random-direction control.
    #[arg(long)]
    no_random_control: bool,
    /// Token rows per forward pass (clean passes and steered segments).
    #[arg(long, default_value_t = 2048)]
    batch_rows: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A JSONL file created on its first line (so a run that fails before any result writes
/// nothing), flushed after every batch.
struct Jsonl {
    path: PathBuf,
    w: Option<BufWriter<File>>,
}

impl Jsonl {
    fn new(path: PathBuf) -> Jsonl {
        Jsonl { path, w: None }
    }
    fn write(&mut self, lines: &[serde_json::Value]) -> Result<()> {
        if self.w.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            self.w = Some(BufWriter::new(File::create(&self.path).map_err(|e| Error::io(&self.path, e))?));
        }
        let w = self.w.as_mut().expect("opened above");
        for l in lines {
            writeln!(w, "{l}").map_err(|e| Error::io(&self.path, e))?;
        }
        w.flush().map_err(|e| Error::io(&self.path, e))
    }
}

pub fn run(a: SteerArgs) -> Result<()> {
    let Mode::Labels = a.mode;
    let t0 = Instant::now();
    let specs = a.interventions.specs()?;
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let gold = p.gold()?;
    let model = Model::load(&a.inputs.model)?;
    let mut conditions = resolve_all(&specs, &model.cfg, false)?;
    if !a.no_random_control {
        let controls = random_controls(&conditions, a.seed);
        conditions.extend(controls);
    }
    let engine = load_engine(&model, a.inputs.device)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;
    let k = labels.len();
    let names = &labels.names;
    let with_gold = |mut o: serde_json::Value, i: usize| {
        if let Some(g) = gold[i] {
            o["gold"] = json!(names[g]);
        }
        o
    };

    let mut scores = Jsonl::new(a.out.join("scores.jsonl"));
    let mut clean_file = Jsonl::new(a.out.join("clean.jsonl"));
    let mut clean = vec![0.0f32; prompts.len() * k]; // [n_prompts, n_labels]
    let mut rows: Vec<SteerRow> = Vec::new();
    let bar = progress_bar((prompts.len() * conditions.len()) as u64, "steer", "runs", a.quiet);
    let t_run = Instant::now();
    steer_labels(
        engine.as_ref(),
        &prompts,
        &labels.token_ids,
        &conditions,
        a.batch_rows,
        &bar,
        &mut |i, logits| {
            clean[i * k..(i + 1) * k].copy_from_slice(logits);
            clean_file.write(&[with_gold(json!({"index": i, "label_logits": logits, "pred": names[patchbay::logits::argmax(logits)]}), i)])
        },
        &mut |batch| {
            let lines: Vec<serde_json::Value> = batch
                .iter()
                .map(|r| {
                    let c = &conditions[r.condition];
                    with_gold(
                        json!({"index": r.index, "layer": c.site.layer, "site": c.site.kind.short_name(), "direction": c.direction, "beta": c.beta,
                               "label_logits": r.label_logits, "pred": names[r.pred], "clean_pred": names[r.clean_pred]}),
                        r.index,
                    )
                })
                .collect();
            rows.extend_from_slice(batch);
            scores.write(&lines)
        },
    )?;
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();

    let summary = summarize(&conditions, &rows, &clean, k);
    patchbay::io::write_atomic(&a.out.join("summary.csv"), summary_csv(&summary, names).as_bytes())?;
    if !summary.is_empty() {
        patchbay::io::plot::line_panels(&a.out.join("shares.png"), &shares_chart(&summary, names))?;
    }
    let extra = json!({
        "mode": "labels",
        "interventions": specs,
        "random_control": (!a.no_random_control).then_some(json!({"seed": a.seed})),
        "n_prompts": prompts.len(),
        "n_conditions": conditions.len(),
        "n_rows": rows.len(),
        "batch_rows": a.batch_rows,
        "timings_s": {"steer": run_s, "total": t0.elapsed().as_secs_f64()},
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
        "status": "complete",
    });
    let manifest = manifest("steer", &model, &engine.device_name(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
    patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    if !a.quiet {
        eprintln!("{} prompts x {} conditions; wrote {}", prompts.len(), conditions.len(), a.out.join("scores.jsonl").display());
    }
    Ok(())
}
