//! `patchbay ablate`: causal component sweeps (heads, neuron groups) read through a label set.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::patch::MethodArg;
use super::{load_engine, progress_bar};
use patchbay::experiments::ablate::{AblateOp, Ablation, Component, ablate_sweep, ablations, conditions, mean_sites, parse_heads, prompt_positions, read_groups, site_means};
use patchbay::experiments::steer::Projection;
use patchbay::experiments::sublayers::{influence_sweep, parse_sublayers, sublayer_conditions};
use patchbay::experiments::top_k::{TopK, read_ranking, set_conditions, top_k_sets, top_k_sweep};
use patchbay::intervene::spec::{Condition, read_vector};
use patchbay::model::Model;
use patchbay::model::config::ModelConfig;
use patchbay::sites::{Positions, Site, SiteKind};
use patchbay::{Error, Result};

const ABLATE_HELP: &str = "Examples:
  patchbay ablate --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness \\
      --heads all --op zero --positions all --out runs/heads
  patchbay ablate --model M --dataset D --template tak --labels anger,joy --neuron-groups groups.json \\
      --op mean --random-control --seed 1 --out runs/neurons
  patchbay ablate --model M --token-ids ids.json --label-token-ids 5,6,7 --heads 0.1,3.2 --op scale --alpha 2 \\
      --positions last --device cuda --out runs/enhance
  patchbay ablate --model M --dataset D --template tak --labels anger,joy,fear \\
      --ranking runs/contrib/heads.csv --ranking runs/contrib/neurons.csv --ranking-label joy \\
      --top-k 1,2,4,8,16 --random-draws 10 --op zero --projection runs/dirs/directions.safetensors:joy --out runs/topk

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

Top-k curves (Wang et al.): --ranking reads `components contrib` tables (heads.csv, neurons.csv;
repeat the flag) for --ranking-label and merges them by mean contribution, largest first (both are
terms of the same projection). For each k of --top-k the top k components are intervened on
together in one experiment (neurons of a layer as one group), and --random-draws random sets like
them (at each layer as many heads / neurons as the top set, drawn among the layer's others, or
among all of its units where too few others exist) are the control.

--projection FILE.safetensors:NAME also reads, in every run, the projection of resid_post at
--projection-layer (default the last layer) at the last token on that direction (unit-normalised):
the emotion representation of Wang et al. An experiment whose components all sit after that
layer leaves it unchanged.

Sublayer influence (Wang et al.): --sublayers attn,mlp --alphas 0,0.5,2 scales each layer's
attention output (attn_out) and/or MLP output (mlp_out) by each alpha at --positions, one
experiment each, read through --projection (required; the emotion representation) and the labels.
Outputs influence.csv (layer, sublayer, alpha, n, mean_projection_change, ci_low, ci_high (95%
bootstrap over prompts), flip_rate, mean_clean_pred_logit_change) and influence.png (projection
change against layer, a panel per alpha) instead of summary.csv / heatmap.png; experiments.jsonl
rows have kind sublayer, layer, site, alpha.

--method resumed (default) runs one clean pass per chunk of prompts and resumes every experiment
from the clean run at its layer (all experiments of a layer are segments of one batched forward,
--batch-rows rows); --method naive runs one full forward per (component, chunk of prompts): the
same numbers, slower (the oracle).

Outputs in --out:
  experiments.jsonl  one object per (component, prompt), appended as batches finish: kind (head |
                     neurons), layer, head (head rows) or neurons (the group), op, alpha (scale),
                     index (prompt), label_logits (label order), pred, clean_pred, control, and
                     gold when known, projection with --projection
  clean.jsonl        the clean run: index, label_logits, pred (and gold, projection)
  summary.csv        per component: kind, layer, head, neurons (space-separated), control, op, n,
                     flip_rate (share with pred != clean_pred), mean_clean_pred_logit_change (mean
                     ablated - clean logit of the clean prediction), mean_logit_change:<label>
                     (and mean_projection_change with --projection)
  heatmap.png        by layer x head (with head experiments): mean_projection_change with
                     --projection, else mean_clean_pred_logit_change
With --ranking, experiments.jsonl rows have kind top_k, k, draw (null: the top set), control,
components (names: L1.H2, L0.N[5,17]) instead of layer/head/neurons, and summary.csv / heatmap.png
are replaced by:
  top_k.csv          k, set (top | random), metric, mean, ci_low, ci_high, flip_rate, n; metrics:
                     clean_pred_logit_change, logit_change:<ranking label> (when it is a label),
                     projection_change (with --projection). The interval is a 95% bootstrap over
                     prompts for the top set, the 2.5-97.5 percentiles of the draws' means for the
                     random sets.
  top_k.png          each metric against k, top and random, with the intervals
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
    /// Top-k curves: rank components by these `components contrib` tables (heads.csv,
    /// neurons.csv; repeat the flag for both) for --ranking-label, instead of --heads /
    /// --neuron-groups.
    #[arg(long)]
    ranking: Vec<PathBuf>,
    /// The label whose ranking is read (a `label` of the tables, e.g. joy).
    #[arg(long)]
    ranking_label: Option<String>,
    /// The k of the curve: the top k components intervened together (e.g. 1,2,4,8,16).
    #[arg(long, value_delimiter = ',')]
    top_k: Vec<usize>,
    /// Random sets like each top k (same layers, kinds and counts), seeded by --seed.
    #[arg(long, default_value_t = 10)]
    random_draws: usize,
    /// Sublayer influence: scale each layer's attention and/or MLP output (attn, mlp, attn,mlp)
    /// by each of --alphas, one experiment each, read through --projection.
    #[arg(long)]
    sublayers: Option<String>,
    /// The factors of --sublayers (e.g. 0,0.5,2; 1 is the clean run).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    alphas: Vec<f32>,
    /// Also read in every run the projection of resid_post at --projection-layer, last token, on
    /// this direction (FILE.safetensors:NAME, e.g. a `patchbay directions` file; unit-normalised).
    #[arg(long)]
    projection: Option<String>,
    /// The layer of --projection (default: the last layer).
    #[arg(long)]
    projection_layer: Option<usize>,
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

/// What the sweep runs: one component per experiment, or top-k sets of a ranking.
enum Plan {
    Components { components: Vec<Component>, ablations: Vec<Ablation> },
    TopK { label: String, sets: Vec<TopK> },
    Sublayers { conditions: Vec<Condition> },
}

impl Plan {
    fn new(a: &AblateArgs, cfg: &ModelConfig, positions: &Positions) -> Result<Plan> {
        if let Some(spec) = &a.sublayers {
            if a.heads.is_some() || a.neuron_groups.is_some() || a.random_control || !a.ranking.is_empty() {
                return Err(Error::input("--sublayers replaces --heads, --neuron-groups, --random-control and --ranking"));
            }
            if a.op.op != "zero" || a.op.alpha.is_some() {
                return Err(Error::input("--sublayers scales by --alphas (no --op / --alpha)"));
            }
            if a.projection.is_none() {
                return Err(Error::input("--sublayers reads the emotion representation: give --projection FILE.safetensors:NAME"));
            }
            return Ok(Plan::Sublayers { conditions: sublayer_conditions(&parse_sublayers(spec)?, &a.alphas, positions, cfg)? });
        }
        if !a.alphas.is_empty() {
            return Err(Error::input("--alphas goes with --sublayers (a component's factor is --op scale --alpha A)"));
        }
        if !a.ranking.is_empty() {
            if a.heads.is_some() || a.neuron_groups.is_some() || a.random_control {
                return Err(Error::input("--ranking (top-k curves) replaces --heads, --neuron-groups and --random-control (its random sets are --random-draws)"));
            }
            let label = a.ranking_label.clone().ok_or_else(|| Error::input("--ranking needs --ranking-label LABEL (the tables' label whose ranking is used)"))?;
            if a.random_draws == 0 {
                return Err(Error::input("--random-draws must be at least 1"));
            }
            let ranking = read_ranking(&a.ranking, &label, cfg)?;
            let ks = if a.top_k.is_empty() { return Err(Error::input("--ranking needs --top-k K,... (example: --top-k 1,2,4,8)")) } else { &a.top_k };
            return Ok(Plan::TopK { sets: top_k_sets(&ranking, ks, a.random_draws, cfg, a.seed)?, label });
        }
        if a.ranking_label.is_some() || !a.top_k.is_empty() {
            return Err(Error::input("--ranking-label and --top-k go with --ranking TABLE.csv"));
        }
        let mut components: Vec<Component> = Vec::new();
        if let Some(h) = &a.heads {
            components.extend(parse_heads(h, cfg)?);
        }
        if let Some(g) = &a.neuron_groups {
            components.extend(read_groups(g, cfg)?);
        }
        if components.is_empty() {
            return Err(Error::input("give the components: --heads all | L.H,... and/or --neuron-groups GROUPS.json (or a ranking: --ranking heads.csv --ranking-label L --top-k 1,2,4)"));
        }
        let ablations = ablations(&components, cfg, a.random_control.then_some(a.seed))?;
        Ok(Plan::Components { components, ablations })
    }

    /// Every component of every experiment (the sites whose means --op mean needs).
    fn ablations(&self) -> Vec<Ablation> {
        match self {
            Plan::Components { ablations, .. } => ablations.clone(),
            Plan::TopK { sets, .. } => sets.iter().flat_map(|s| s.components.iter().map(|c| Ablation { component: c.clone(), control: s.draw.is_some() })).collect(),
            Plan::Sublayers { .. } => Vec::new(),
        }
    }

    fn n_experiments(&self) -> usize {
        match self {
            Plan::Components { ablations, .. } => ablations.len(),
            Plan::TopK { sets, .. } => sets.len(),
            Plan::Sublayers { conditions } => conditions.len(),
        }
    }
}

/// `--projection` read at resid_post of `--projection-layer` (default the last layer).
fn projection(a: &AblateArgs, cfg: &ModelConfig) -> Result<Option<Projection>> {
    let Some(src) = &a.projection else {
        return match a.projection_layer {
            Some(_) => Err(Error::input("--projection-layer goes with --projection FILE.safetensors:NAME")),
            None => Ok(None),
        };
    };
    let site = Site::new(a.projection_layer.unwrap_or(cfg.n_layers - 1), SiteKind::ResidPost);
    site.check(cfg)?;
    // Projection::new normalises (read raw: the same unit vector as the library callers).
    let (_, v) = read_vector(src, site, cfg.d_model, false)?;
    Ok(Some(Projection::new(site, v, cfg)?))
}

pub fn run(a: AblateArgs) -> Result<()> {
    let t0 = Instant::now();
    let (op, positions) = a.op.resolve()?;
    if a.batch_rows == 0 {
        return Err(Error::input("--batch-rows must be at least 1"));
    }
    let model = Model::load(&a.inputs.model)?;
    let cfg = &model.cfg;
    let plan = Plan::new(&a, cfg, &positions)?;
    let projection = projection(&a, cfg)?;
    let p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let gold = p.gold()?;
    let engine = load_engine(&model, a.inputs.device)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;

    let t_mean = Instant::now();
    let means = if op == AblateOp::Mean { site_means(engine.as_ref(), &prompts, &mean_sites(&plan.ablations()), a.batch_rows)? } else { Default::default() };
    let mean_s = t_mean.elapsed().as_secs_f64();
    let (method, method_name) = a.method.method();
    let bar = progress_bar((prompts.len() * plan.n_experiments()) as u64, "ablate", "runs", a.quiet);
    let t_run = Instant::now();
    let mut extra = match &plan {
        Plan::Components { components, ablations } => {
            let conditions = conditions(ablations, op, &means, &positions, a.seed, cfg)?;
            ablate_sweep(engine.as_ref(), method, &prompts, &labels, projection.as_ref(), &gold, ablations, op, &conditions, a.batch_rows, &bar, &a.out)?;
            let n_heads = components.iter().filter(|c| matches!(c, Component::Head { .. })).count();
            json!({
                "heads": a.heads,
                "neuron_groups": a.neuron_groups.as_ref().map(|p| p.display().to_string()),
                "random_control": a.random_control.then_some(json!({"seed": a.seed})),
                "n_components": components.len(),
                "n_head_components": n_heads,
                "n_neuron_groups": components.len() - n_heads,
            })
        }
        Plan::TopK { label, sets } => {
            let experiments = set_conditions(sets, op, &means, &positions, a.seed, cfg)?;
            top_k_sweep(engine.as_ref(), method, &prompts, &labels, projection.as_ref(), &gold, sets, &experiments, op, label, a.seed, a.batch_rows, &bar, &a.out)?;
            json!({
                "ranking": a.ranking.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "ranking_label": label,
                "top_k": a.top_k,
                "random_draws": a.random_draws,
            })
        }
        Plan::Sublayers { conditions } => {
            let projection = projection.as_ref().ok_or_else(|| Error::input("--sublayers needs --projection"))?;
            influence_sweep(engine.as_ref(), method, &prompts, &labels, projection, &gold, conditions, a.seed, a.batch_rows, &bar, &a.out)?;
            json!({"sublayers": a.sublayers, "alphas": a.alphas})
        }
    };
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();
    let n_rows = prompts.len() * plan.n_experiments();
    let common = json!({
        "method": method_name,
        "op": op.name(),
        "alpha": match op { AblateOp::Scale { alpha } => Some(alpha), _ => None },
        "positions": positions.describe(),
        "projection": projection.as_ref().map(|p| json!({"vector": a.projection, "site": p.site.to_string(), "position": -1})),
        "seed": a.seed,
        "n_prompts": prompts.len(),
        "n_experiments": plan.n_experiments(),
        "n_rows": n_rows,
        "batch_rows": a.batch_rows,
        "timings_s": {"mean": mean_s, "ablate": run_s, "total": t0.elapsed().as_secs_f64()},
        "experiments_per_s": n_rows as f64 / run_s,
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
        "status": "complete",
    });
    if let (Some(e), Some(c)) = (extra.as_object_mut(), common.as_object()) {
        e.extend(c.clone());
    }
    let manifest = manifest("ablate", &model, &engine.device_name(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
    patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    if !a.quiet {
        eprintln!("{} prompts x {} experiments ({method_name}) in {run_s:.1} s; wrote {}", prompts.len(), plan.n_experiments(), a.out.display());
    }
    Ok(())
}
