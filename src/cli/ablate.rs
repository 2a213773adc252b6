//! `patchbay ablate`: causal component sweeps (heads, neuron groups) read through a label set.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::patch::MethodArg;
use super::{progress_bar};
use patchbay::engine::load_engine;
use patchbay::experiments::ablate::{AblateOp, Component, ablate_sweep, ablations, conditions, mean_sites, parse_heads, prompt_positions, read_groups, site_means};
use patchbay::model::Model;
use patchbay::sites::Positions;
use patchbay::{Error, Result};

const ABLATE_HELP: &str = "Examples:
  patchbay ablate --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness \\
      --heads all --op zero --positions all --out runs/heads
  patchbay ablate --model M --dataset D --template tak --labels anger,joy --neuron-groups groups.json \\
      --op mean --random-control --seed 1 --out runs/neurons
  patchbay ablate --model M --token-ids ids.json --label-token-ids 5,6,7 --heads 0.1,3.2 --op scale --alpha 2 \\
      --positions last --device cuda --out runs/enhance

One experiment per component: --heads all (every head of every layer) or L.H,...; --neuron-groups
GROUPS.json, a list of {\"layer\": L, \"neurons\": [i, ...]}, one experiment per group (both flags may
be given). A head is its slice of the o_proj input (blocks.L.attn.hook_z), a neuron group its
entries of the down_proj input (blocks.L.mlp.hook_post). At --positions (all, last, last:K,
-1,-2, 0,3, -1..-5: prompt positions) the component becomes:
  --op zero            0
  --op mean            its mean over every position of every prompt (one capture pass first)
  --op random          a Gaussian vector of its own norm (seeded by --seed)
  --op scale --alpha A A times itself (A > 1 enhances; A = 1 is the clean run bit for bit)
The label logits are read at each prompt's last token. --random-control adds, for each
component, a random one of the same size at the same layer (seeded by --seed): another head of
that layer, or as many distinct neurons of that layer outside the group; its rows have control
true.

--method resumed (default) runs one clean pass per chunk of prompts and resumes every experiment
from the clean run at its layer (all experiments of a layer are segments of one batched forward,
--batch-rows rows); --method naive runs one full forward per (component, chunk of prompts): the
same numbers, slower (the oracle).

Outputs in --out:
  experiments.jsonl  one object per (component, prompt), appended as batches finish: kind (head |
                     neurons), layer, head (head rows) or neurons (the group), op, alpha (scale),
                     index (prompt), label_logits (label order), pred, clean_pred, control, and
                     gold when known
  clean.jsonl        the clean run: index, label_logits, pred (and gold)
  summary.csv        per component: kind, layer, head, neurons (space-separated), control, op, n,
                     flip_rate (share with pred != clean_pred), mean_clean_pred_logit_change (mean
                     ablated - clean logit of the clean prediction), mean_logit_change:<label>
  heatmap.png        mean_clean_pred_logit_change by layer x head (with head experiments)
  manifest.json      model, device, command line, inputs, labels, components, op, counts, timings";

#[derive(Args)]
#[command(after_help = ABLATE_HELP)]
pub struct AblateArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// Heads ablated, one experiment each: `all` or LAYER.HEAD,... (e.g. 0.1,3.2).
    #[arg(long)]
    heads: Option<String>,
    /// JSON file: a list of {"layer": L, "neurons": [i, ...]}, one experiment per group.
    #[arg(long)]
    neuron_groups: Option<PathBuf>,
    #[command(flatten)]
    op: AblateOpArgs,
    /// Also run, for each component, a random one of the same size at the same layer.
    #[arg(long)]
    random_control: bool,
    /// Seed of --random-control and of --op random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// resumed (from clean runs, batched) or naive (a full forward per component and chunk).
    #[arg(long, value_enum, default_value_t = MethodArg::Resumed)]
    method: MethodArg,
    /// Token rows per forward pass (clean passes, resumed segments, naive chunks).
    #[arg(long, default_value_t = 2048)]
    batch_rows: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// What is done to each component, and where: the flags of `ablate` and `bench ablate`.
#[derive(Args, Clone)]
pub struct AblateOpArgs {
    /// zero, mean (the dataset mean), random (equal norm) or scale (with --alpha).
    #[arg(long, default_value = "zero")]
    op: String,
    /// The factor of --op scale.
    #[arg(long, allow_hyphen_values = true)]
    alpha: Option<f32>,
    /// Prompt positions ablated: all, last, last:K, -1,-2, 0,3, -1..-5.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    positions: String,
}

impl AblateOpArgs {
    pub fn resolve(&self) -> Result<(AblateOp, Positions)> {
        Ok((AblateOp::parse(&self.op, self.alpha)?, prompt_positions(&self.positions)?))
    }
}

pub fn run(a: AblateArgs) -> Result<()> {
    let t0 = Instant::now();
    let (op, positions) = a.op.resolve()?;
    if a.batch_rows == 0 {
        return Err(Error::input("--batch-rows must be at least 1"));
    }
    let model = Model::load(&a.inputs.model)?;
    let cfg = &model.cfg;
    let mut components: Vec<Component> = Vec::new();
    if let Some(h) = &a.heads {
        components.extend(parse_heads(h, cfg)?);
    }
    if let Some(g) = &a.neuron_groups {
        components.extend(read_groups(g, cfg)?);
    }
    if components.is_empty() {
        return Err(Error::input("give the components: --heads all | L.H,... and/or --neuron-groups GROUPS.json"));
    }
    let ablations = ablations(&components, cfg, a.random_control.then_some(a.seed))?;
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let gold = p.gold()?;
    let engine = load_engine(&model, a.inputs.device)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;

    let t_mean = Instant::now();
    let means = if op == AblateOp::Mean { site_means(engine.as_ref(), &prompts, &mean_sites(&ablations), a.batch_rows)? } else { Default::default() };
    let mean_s = t_mean.elapsed().as_secs_f64();
    let conditions = conditions(&ablations, op, &means, &positions, a.seed, cfg)?;
    let (method, method_name) = a.method.method();
    let bar = progress_bar((prompts.len() * ablations.len()) as u64, "ablate", "runs", a.quiet);
    let t_run = Instant::now();
    let sweep = ablate_sweep(engine.as_ref(), method, &prompts, &labels, &gold, &ablations, op, &conditions, a.batch_rows, &bar, &a.out)?;
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();
    let n_heads = components.iter().filter(|c| matches!(c, Component::Head { .. })).count();
    let extra = json!({
        "method": method_name,
        "op": op.name(),
        "alpha": match op { AblateOp::Scale { alpha } => Some(alpha), _ => None },
        "positions": positions.describe(),
        "heads": a.heads,
        "neuron_groups": a.neuron_groups.as_ref().map(|p| p.display().to_string()),
        "random_control": a.random_control.then_some(json!({"seed": a.seed})),
        "seed": a.seed,
        "n_prompts": prompts.len(),
        "n_components": components.len(),
        "n_head_components": n_heads,
        "n_neuron_groups": components.len() - n_heads,
        "n_experiments": ablations.len(),
        "n_rows": sweep.rows.len(),
        "batch_rows": a.batch_rows,
        "timings_s": {"mean": mean_s, "ablate": run_s, "total": t0.elapsed().as_secs_f64()},
        "experiments_per_s": sweep.rows.len() as f64 / run_s,
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
        "status": "complete",
    });
    let manifest = manifest("ablate", &model, &engine.device_name(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
    patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    if !a.quiet {
        eprintln!("{} prompts x {} experiments ({method_name}) in {run_s:.1} s; wrote {}", prompts.len(), ablations.len(), a.out.display());
    }
    Ok(())
}
