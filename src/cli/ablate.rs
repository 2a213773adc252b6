//! `patchbay ablate`: causal component sweeps (heads, neuron groups) read through a label set.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::patch::MethodArg;
use super::progress_bar;
use patchbay::experiments::ablate::{AblateOp, Component, ablate_sweep, ablations, conditions, mean_sites, parse_heads, prompt_positions, read_groups, site_means, write_operands};
use patchbay::experiments::ablate_files::SweepPlan;
use patchbay::experiments::label_files::{Kept, Scope, read_kept, shard_range};
use patchbay::experiments::patch_files::{SweepPart, read_manifest, write_manifest};
use patchbay::experiments::shards::prompts_sha256;
use patchbay::experiments::steer::Projection;
use patchbay::experiments::sublayers::{influence_sweep, parse_sublayers, sublayer_conditions};
use patchbay::experiments::top_k::{read_ranking, set_conditions, top_k_sets, top_k_sweep};
use patchbay::intervene::spec::read_vector;
use patchbay::model::{Model, sha256_hex};
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
  patchbay ablate --model M --dataset D --template tak --labels anger,joy --heads all --op add \\
      --alpha 4 --vector runs/dirs/directions.safetensors:joy --positions last:4 --out runs/add-joy
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
  --op add --alpha A --vector FILE.safetensors:E
                       itself + A u (A = 0 is the clean run bit for bit), where u is the
                       component's own direction toward d: with W its write matrix (the o_proj
                       columns of head h; the down_proj columns of the group's neurons),
                       u = W^T d / |W^T d|, so its output gains A |W^T d| along d. d is read at
                       d_model width, at blocks.L.hook_resid_post of the component's layer L (a
                       `patchbay directions` name E, or an exact tensor name), and normalised.
                       In Gemma 2 / OLMo 2 the add is before the sublayer's post-norm, which
                       rescales the whole output (the added write included): what reaches the
                       residual along d is not A |W^T d|.
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

A killed run is continued with the same command and --resume: its complete lines are checked
against the sweep and kept, a torn last line is cut, only the missing rows are computed (each
(experiment, prompt) is written exactly once). --shard I/N runs a contiguous part of the prompts
(every experiment); `patchbay merge --out DIR SHARD_DIRS...` joins the parts into the whole run's
files.

Outputs in --out:
  experiments.jsonl  one object per (component, prompt), appended as batches finish: experiment
                     (its index in the sweep), kind (head | neurons), layer, head (head rows) or
                     neurons (the group), op, alpha (scale, add), index (prompt), label_logits (label
                     order), pred, clean_pred, control, gold when known, projection with
                     --projection
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
  manifest.json      model, device, command line, inputs, labels, the sweep (its plan: every
                     experiment), op, shard, counts, timings; status running, then complete";

#[derive(Args)]
#[command(after_help = ABLATE_HELP)]
pub struct AblateArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// Only the prompts the model predicts correctly over the label set (needs gold labels), as Tak et al. select theirs.
    #[arg(long)]
    only_correct: bool,
    /// Heads ablated, one experiment each: `all` or LAYER.HEAD,... (e.g. 0.1,3.2).
    #[arg(long)]
    heads: Option<String>,
    /// JSON file: a list of {"layer": L, "neurons": [i, ...]}, one experiment per group.
    #[arg(long)]
    neuron_groups: Option<PathBuf>,
    #[command(flatten)]
    op: AblateOpArgs,
    /// --op add: the direction d, FILE.safetensors:NAME (NAME per layer as <resid_post of the layer>/NAME, or a tensor name); normalised.
    #[arg(long)]
    vector: Option<String>,
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
    /// Continue the run in --out (the same sweep: model, prompts, labels, components, op,
    /// positions, projection, seed): its complete lines are kept, the rest computed.
    #[arg(long)]
    resume: bool,
    /// Run part I of N (0/4, 1/4, ...): a contiguous range of the prompts, every experiment;
    /// `patchbay merge` joins the parts' directories.
    #[arg(long)]
    shard: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// What is done to each component, and where: the flags of `ablate` and `bench ablate`.
#[derive(Args, Clone)]
pub struct AblateOpArgs {
    /// zero, mean (the dataset mean), random (equal norm), scale or add (with --alpha).
    #[arg(long, default_value = "zero")]
    op: String,
    /// The factor of --op scale, the strength of --op add.
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

/// The sweep the flags ask for.
fn plan(a: &AblateArgs, cfg: &ModelConfig) -> Result<SweepPlan> {
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
        // Checked here (the plan keeps the flags' text).
        sublayer_conditions(&parse_sublayers(spec)?, &a.alphas, &Positions::All, cfg.n_layers)?;
        return Ok(SweepPlan::Sublayers { sublayers: spec.clone(), alphas: a.alphas.clone(), n_layers: cfg.n_layers });
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
        if a.top_k.is_empty() {
            return Err(Error::input("--ranking needs --top-k K,... (example: --top-k 1,2,4,8)"));
        }
        return Ok(SweepPlan::TopK { sets: top_k_sets(&ranking, &a.top_k, a.random_draws, cfg, a.seed)?, label });
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
    Ok(SweepPlan::Components { ablations: ablations(&components, cfg, a.random_control.then_some(a.seed))?, n_heads: cfg.n_heads })
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
    if a.vector.is_some() != matches!(op, AblateOp::Add { .. }) {
        return Err(Error::input("--vector goes with --op add (and --op add needs --vector FILE.safetensors:NAME)"));
    }
    if a.batch_rows == 0 {
        return Err(Error::input("--batch-rows must be at least 1"));
    }
    let part: Option<SweepPart> = a.shard.as_deref().map(str::parse).transpose()?;
    let model = Model::load(&a.inputs.model)?;
    let cfg = &model.cfg;
    let plan = plan(&a, cfg)?;
    let projection = projection(&a, cfg)?;
    let mut p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    if a.only_correct {
        p.retain_correct(engine.as_ref(), a.quiet)?;
    }
    let gold = p.gold()?;
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;
    if let Some(s) = part.filter(|s| s.count > prompts.len()) {
        return Err(Error::input(format!("--shard {s}: {} prompts cannot make {} shards (at most {})", prompts.len(), s.count, prompts.len())));
    }
    let range = part.map_or(0..prompts.len(), |s| shard_range(s.index, s.count, prompts.len()));
    let n_exp = plan.n_experiments();
    let proj_json = projection.as_ref().map(|p| json!({"vector": a.projection, "site": p.site.to_string(), "layer": p.site.layer, "position": -1}));
    // What identifies the sweep: a --resume continues only the same one, and merge joins only
    // its shards.
    let sweep = json!({
        "config_sha256": model.config_hash,
        "prompts_sha256": prompts_sha256(&prompts),
        "label_token_ids": labels.token_ids,
        "plan": plan,
        "op": op.name(),
        "alpha": op.alpha(),
        "vector": a.vector,
        "positions": positions.describe(),
        "projection": projection.as_ref().map(|p| json!({"site": p.site.to_string(), "direction_sha256": sha256_hex(bytemuck::cast_slice(&p.direction))})),
        "seed": a.seed,
    });
    let shard_name = part.map(|s| s.to_string());
    let manifest_path = a.out.join("manifest.json");
    let exists = ["experiments.jsonl", "clean.jsonl"].iter().any(|f| a.out.join(f).exists());
    let kept = match (exists, a.resume) {
        (false, _) => Kept::default(),
        (true, false) => return Err(Error::input(format!("{} holds a run: add --resume to continue it, or choose another --out", a.out.display()))),
        (true, true) => {
            let old = read_manifest(&manifest_path)?;
            if old.get("sweep") != Some(&sweep) {
                return Err(Error::input(format!("{} holds a different sweep (model, prompts, labels, components, op, positions, projection or seed differ): choose another --out", a.out.display())));
            }
            if old.get("shard").unwrap_or(&serde_json::Value::Null) != &json!(shard_name) {
                return Err(Error::input(format!("{} holds shard {} of this sweep, not {}: choose another --out", a.out.display(), old["shard"].as_str().unwrap_or("(whole)"), shard_name.as_deref().unwrap_or("the whole sweep"))));
            }
            read_kept(&a.out, "experiments.jsonl", &labels, prompts.len(), n_exp, projection.is_some())?
        }
    };
    let n_kept = kept.rows.len();
    let scope = Scope::new(range.clone(), n_exp, kept);
    let save_manifest = |status: &str, timings: serde_json::Value| -> Result<()> {
        let extra = json!({
            "method": a.method.method().1,
            "op": op.name(),
            "alpha": op.alpha(),
            "vector": a.vector,
            "positions": positions.describe(),
            "projection": proj_json,
            "mode": match &plan { SweepPlan::Components { .. } => "components", SweepPlan::TopK { .. } => "top_k", SweepPlan::Sublayers { .. } => "sublayers" },
            "heads": a.heads,
            "neuron_groups": a.neuron_groups.as_ref().map(|p| p.display().to_string()),
            "random_control": a.random_control.then_some(json!({"seed": a.seed})),
            "ranking": a.ranking.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "ranking_label": a.ranking_label,
            "top_k": a.top_k,
            "random_draws": a.random_draws,
            "sublayers": a.sublayers,
            "alphas": a.alphas,
            "seed": a.seed,
            "n_prompts": prompts.len(),
            "shard": shard_name,
            "shard_prompts": [range.start, range.end],
            "n_experiments": n_exp,
            "n_rows": range.len() * n_exp,
            "rows_kept_from_earlier_runs": n_kept,
            "batch_rows": a.batch_rows,
            "sweep": sweep,
            "timings_s": timings,
            "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
            "status": status,
        });
        let m = manifest("ablate", &model, engine.as_ref(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
        std::fs::create_dir_all(&a.out).map_err(|e| patchbay::Error::io(&a.out, e))?;
        write_manifest(&manifest_path, &m)
    };
    save_manifest("running", json!(null))?;

    let t_mean = Instant::now();
    let operands = match (op, &a.vector) {
        (AblateOp::Mean, _) => site_means(engine.as_ref(), &prompts, &mean_sites(&plan.ablations()), a.batch_rows)?,
        (AblateOp::Add { .. }, Some(v)) => write_operands(&model, &mean_sites(&plan.ablations()), &mut |layer| Ok(read_vector(v, Site::new(layer, SiteKind::ResidPost), cfg.d_model, true)?.1))?,
        _ => Default::default(),
    };
    let mean_s = t_mean.elapsed().as_secs_f64();
    let (method, method_name) = a.method.method();
    let n_todo = scope.todo.as_ref().map_or(prompts.len(), Vec::len);
    let bar = progress_bar((n_todo * n_exp) as u64, "ablate", "runs", a.quiet);
    let t_run = Instant::now();
    let e = engine.as_ref();
    match &plan {
        SweepPlan::Components { ablations, .. } => {
            let conditions = conditions(ablations, op, &operands, &positions, a.seed, cfg)?;
            ablate_sweep(e, method, &prompts, &labels, projection.as_ref(), &gold, ablations, op, &conditions, scope, a.batch_rows, &bar, &a.out).map(drop)
        }
        SweepPlan::TopK { label, sets } => {
            let experiments = set_conditions(sets, op, &operands, &positions, a.seed, cfg)?;
            top_k_sweep(e, method, &prompts, &labels, projection.as_ref(), &gold, sets, &experiments, op, label, a.seed, scope, a.batch_rows, &bar, &a.out).map(drop)
        }
        SweepPlan::Sublayers { sublayers, alphas, .. } => {
            let conditions = sublayer_conditions(&parse_sublayers(sublayers)?, alphas, &positions, cfg.n_layers)?;
            let projection = projection.as_ref().ok_or_else(|| Error::input("--sublayers needs --projection"))?;
            influence_sweep(e, method, &prompts, &labels, projection, &gold, &conditions, a.seed, scope, a.batch_rows, &bar, &a.out).map(drop)
        }
    }?;
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();
    let computed = n_todo * n_exp;
    save_manifest("complete", json!({"mean": mean_s, "ablate": run_s, "total": t0.elapsed().as_secs_f64(), "experiments_per_s": computed as f64 / run_s}))?;
    if !a.quiet {
        eprintln!("{n_todo} prompts x {n_exp} experiments ({method_name}) in {run_s:.1} s; wrote {}", a.out.display());
    }
    Ok(())
}
