//! `patchbay components`: analyses of attention heads and MLP neurons (Wang et al.), one
//! subcommand each: `contrib` (analytic contributions to a direction, direct logit attribution)
//! and `lens` (the logit lens).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;

use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::{progress_bar};
use patchbay::experiments::capture::metadata;
use patchbay::experiments::components::{BatchTerms, ContribSpec, LensSpec, Readout, contribution_tables, head_heatmaps, lens_heatmap, logit_lens, long_tail_plot, write_table};
use patchbay::intervene::spec::read_vector;
use patchbay::io::{OutDtype, OutTensor, write_safetensors};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};
use patchbay::{Error, Result};

const CONTRIB_HELP: &str = "Examples:
  patchbay directions --model M --dataset emotions.csv --template tak --sites resid_post --out runs/dirs
  patchbay components contrib --model M --dataset emotions.csv --template tak --labels anger,joy,fear \\
      --vector runs/dirs/directions.safetensors:joy --site resid_post --layer 5 --positions last --out runs/contrib
  patchbay components contrib --model M --token-ids ids.json --label-token-ids 5,6,7 --vector v.safetensors \\
      --site final_norm --positions all --device cuda --out runs/c2

What is computed (one clean forward per prompt, no extra forward): for the direction d read at
--site of --layer, each head h of every layer that writes before that point contributes
result_h . d (result_h = z_h W_O[:, h]^T, TransformerLens attn.hook_result) and each neuron i
contributes mlp_post_i * (W_down[:, i] . d). Heads and neurons of layers < L write before
resid_pre L; heads of layer L too before resid_mid L; both of layer L before resid_post L; all
layers before final_norm. A prompt's term is its mean over --positions; tables give the mean,
sample sd and n over the prompts of each label (the gold label, or the model's predicted label
when the prompts have none) and over all prompts (label `all`).

Norms are linearised with their scale frozen at the clean run's value: at final_norm the terms
are read along w * d and divided by the token's clean rms; in families with a norm after the
attention / MLP output (Gemma 2, OLMo 2) a head's term is result_h through that norm with the
clean rms of the attention output frozen, (result_h . (w * d)) / rms(o), so that a layer's heads
plus the o_proj bias sum to attn_out . d (not what the head would add alone). Direct logit
attribution (dla_*) is the same at final_norm with d = the lm_head row of the label's token:
the logit before Gemma 2's final soft-cap, with the final norm's scale frozen.

Outputs in --out:
  heads.csv, neurons.csv          layer,head|neuron,label,mean,sd,n,rank (rank 1 = largest mean of the label)
  dla_heads.csv, dla_neurons.csv  the same for DLA to the label's token (label all: each prompt's own label)
  heads.png, dla_heads.png        layer x head heatmaps of the means, one panel per label
  long_tail.png                   |mean| sorted, over the largest, against rank (heads and neurons)
  per_prompt/batch-NNNNN.safetensors  each batch's per-prompt terms (heads [n, layers, n_heads],
                                  neurons [n, layers, d_mlp], dla_heads, dla_neurons, index, group),
                                  written as each batch finishes
  manifest.json                   model, device, inputs, labels, the direction and its provenance,
                                  the linearisation, counts, timings";

const LENS_HELP: &str = "Examples:
  patchbay components lens --model M --dataset emotions.csv --template tak --labels anger,joy,fear --out runs/lens
  patchbay components lens --model M --token-ids ids.json --label-token-ids 5,6,7 --positions all --top-k 10 --out runs/lens-all

The final norm and the unembedding (with Gemma 2's final logit soft-cap) applied to resid_post of
every layer (blocks.L.hook_resid_post), at --positions of every prompt: the last layer's lens is
the model's own logits. The residuals are captured on --device in batches; the lens is computed
on the host in f32.

Output: --out/lens.safetensors in capture's layout (f32; metadata as capture's, plus the labels,
their token ids and top_k): label_logits [n_prompts, n_positions, n_layers, n_labels] for a
position list, [T_total, n_layers, n_labels] plus prompt_offsets [n_prompts+1] for --positions
all; with --top-k K also top_ids (i64) and top_logits [..., n_layers, K], largest first. With
--top-k the labels are optional (no label flags and no gold labels: top-k only, no label_logits
and no plot).
--out/lens.png: layer x label heatmap: for each label, the mean probability (softmax over the labels)
of that label at each layer over the rows of its prompts (gold label; without one, the rows the
last layer predicts as that label).
--out/manifest.json.";

#[derive(Args)]
pub struct ComponentsArgs {
    #[command(subcommand)]
    what: ComponentsCommand,
}

#[derive(Subcommand)]
enum ComponentsCommand {
    /// Each head's and neuron's contribution to a direction (and DLA to the label tokens), averaged per label, ranked.
    #[command(after_help = CONTRIB_HELP)]
    Contrib(ContribArgs),
    /// The logit lens: final norm + unembedding of every layer's resid_post, label logits and top-k tokens.
    #[command(after_help = LENS_HELP)]
    Lens(LensArgs),
}

#[derive(Args)]
struct ContribArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// Only the prompts the model predicts correctly over the label set (needs gold labels), as Tak et al. select theirs.
    #[arg(long)]
    only_correct: bool,
    /// The direction: FILE.safetensors[:NAME]; NAME is a tensor name or <site>/<NAME> at the site (a `patchbay directions` class); A+B sums vectors.
    #[arg(long)]
    vector: String,
    /// Residual-stream site of the direction: resid_pre, resid_mid, resid_post or final_norm.
    #[arg(long, default_value = "resid_post")]
    site: String,
    /// The direction's layer (not with final_norm).
    #[arg(long)]
    layer: Option<usize>,
    /// Scale the direction to unit norm first.
    #[arg(long)]
    normalise: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct LensArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// Also the K highest-scoring tokens of the whole vocabulary per layer (then the labels are optional).
    #[arg(long)]
    top_k: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// The positions, batching and output flags of every subcommand.
#[derive(Args)]
struct RunArgs {
    /// Token positions of each prompt: last, last:K, all, or -1,-2 / 0,3 / -1..-5 (contrib averages a prompt's terms over them).
    #[arg(long, default_value = "last", allow_hyphen_values = true)]
    positions: String,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: ComponentsArgs) -> Result<()> {
    match a.what {
        ComponentsCommand::Contrib(a) => contrib(a),
        ComponentsCommand::Lens(a) => lens(a),
    }
}

/// Prompt positions (`TokenScope` grammar without generated tokens).
fn prompt_positions(spec: &str) -> Result<Positions> {
    match TokenScope::parse(spec)? {
        TokenScope { prompt: Some(p), generated: false } => Ok(p),
        _ => Err(Error::input(format!("positions `{spec}`: this command reads prompt positions only (not generated)"))),
    }
}

/// The direction's site: a residual-stream kind at --layer, or final_norm.
fn direction_site(kind: &str, layer: Option<usize>, model: &Model) -> Result<Site> {
    let cfg = &model.cfg;
    let kind = SiteKind::from_short_name(kind.trim())
        .filter(|k| matches!(k, SiteKind::ResidPre | SiteKind::ResidMid | SiteKind::ResidPost | SiteKind::FinalNorm))
        .ok_or_else(|| Error::input(format!("--site `{kind}`: expected a residual-stream site: resid_pre, resid_mid, resid_post or final_norm")))?;
    let site = match (kind, layer) {
        (SiteKind::FinalNorm, None) => Site::final_norm(cfg),
        (SiteKind::FinalNorm, Some(_)) => return Err(Error::input("--layer: final_norm has no layer (leave --layer out)")),
        (_, None) => return Err(Error::input(format!("--layer: give the layer of the {} direction (0..={})", kind.short_name(), cfg.n_layers - 1))),
        (_, Some(l)) => Site::new(l, kind),
    };
    site.check(cfg)?;
    Ok(site)
}

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result<()> {
    patchbay::io::write_atomic(path, serde_json::to_string_pretty(v).map_err(|e| Error::input(e.to_string()))?.as_bytes())
}

fn contrib(a: ContribArgs) -> Result<()> {
    let t0 = Instant::now();
    let positions = prompt_positions(&a.run.positions)?;
    let mut p = Prompts::load(&a.inputs, &a.labels, a.run.quiet)?;
    let model = Model::load(&a.inputs.model)?;
    let cfg = &model.cfg;
    let site = direction_site(&a.site, a.layer, &model)?;
    let (name, direction) = read_vector(&a.vector, site, cfg.d_model, a.normalise)?;
    let readout = Readout::new(&model, site, &direction)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    if a.only_correct {
        p.retain_correct(engine.as_ref(), a.run.quiet)?;
    }
    let gold = p.gold()?;
    let _lock = patchbay::io::OutLock::acquire(&a.run.out)?;
    std::fs::create_dir_all(a.run.out.join("per_prompt")).map_err(|e| Error::io(&a.run.out, e))?;
    let spec = ContribSpec { readout: &readout, labels: &p.labels, positions: positions.clone(), gold: &gold, batch_size: a.run.batch_size };
    let (nh, dm, nl) = (cfg.n_heads, cfg.d_mlp, cfg.n_layers);
    let (hl, ml) = (readout.head_layers, readout.neuron_layers);
    let mut batch_no = 0;
    let mut flush = |first: usize, t: &BatchTerms| -> Result<()> {
        let n = t.group.len();
        let f = |shape: Vec<usize>, data: &[f32]| OutTensor::Float { shape, data: data.to_vec(), dtype: OutDtype::F32 };
        let tensors = vec![
            ("heads".to_string(), f(vec![n, hl, nh], &t.along.heads)),
            ("neurons".to_string(), f(vec![n, ml, dm], &t.along.neurons)),
            ("dla_heads".to_string(), f(vec![n, nl, nh], &t.dla.heads)),
            ("dla_neurons".to_string(), f(vec![n, nl, dm], &t.dla.neurons)),
            ("index".to_string(), OutTensor::I64 { shape: vec![n], data: (first..first + n).map(|i| i as i64).collect() }),
            ("group".to_string(), OutTensor::I64 { shape: vec![n], data: t.group.iter().map(|&g| g as i64).collect() }),
        ];
        let meta = BTreeMap::from([("direction".to_string(), name.clone()), ("site".to_string(), site.to_string()), ("labels".to_string(), p.labels.names.join(","))]);
        write_safetensors(&a.run.out.join("per_prompt").join(format!("batch-{batch_no:05}.safetensors")), &tensors, &meta)?;
        batch_no += 1;
        Ok(())
    };
    let bar = progress_bar(p.ids.len() as u64, "contributions", "prompts", a.run.quiet);
    let tables = contribution_tables(&model, engine.as_ref(), &p.ids, &spec, &mut flush, &bar)?;
    bar.finish_and_clear();
    write_table(&a.run.out.join("heads.csv"), "head", &tables.heads, nh)?;
    write_table(&a.run.out.join("neurons.csv"), "neuron", &tables.neurons, dm)?;
    write_table(&a.run.out.join("dla_heads.csv"), "head", &tables.dla_heads, nh)?;
    write_table(&a.run.out.join("dla_neurons.csv"), "neuron", &tables.dla_neurons, dm)?;
    if hl > 0 {
        head_heatmaps(&a.run.out.join("heads.png"), &format!("mean head contribution along {name} at {site}"), &tables.heads, nh)?;
    }
    head_heatmaps(&a.run.out.join("dla_heads.png"), "direct logit attribution of each head to the label's logit (final norm scale frozen)", &tables.dla_heads, nh)?;
    long_tail_plot(&a.run.out.join("long_tail.png"), &format!("the long tail: |mean contribution| along {name} at {site}, sorted"), &[("heads", &tables.heads), ("neurons", &tables.neurons)])?;
    let norm = direction.iter().map(|v| v * v).sum::<f32>().sqrt();
    let groups_by = if gold.iter().all(Option::is_some) { "gold" } else if gold.iter().all(Option::is_none) { "pred" } else { "gold, else pred" };
    let extra = json!({
        "direction": {"source": a.vector, "name": name, "site": site.to_string(), "normalise": a.normalise, "norm": norm},
        "positions": positions.describe(),
        "writers": {"head_layers": hl, "neuron_layers": ml},
        "groups": {"by": groups_by, "labels": tables.heads.groups, "n": tables.heads.n},
        "linearisation": "norm scales frozen at the clean run's values: at final_norm the terms are read along w*d and divided by the token's clean rms; through a post-attention / post-MLP norm (Gemma 2, OLMo 2) by the clean rms of the sublayer output before that norm, so a layer's heads plus the o_proj bias sum to attn_out . d",
        "dla": "direct logit attribution to each label's token: d = its lm_head row at final_norm, final norm scale frozen; the logit before the final soft-cap (Gemma 2)",
        "n_prompts": p.ids.len(),
        "timings_s": {"total": t0.elapsed().as_secs_f64()},
    });
    let m = manifest("components contrib", &model, engine.as_ref(), (p.dataset.as_ref(), p.template.as_ref(), &p.labels), &a.labels, extra);
    write_json(&a.run.out.join("manifest.json"), &m)?;
    if !a.run.quiet {
        eprintln!("wrote heads.csv, neurons.csv, dla_heads.csv, dla_neurons.csv and plots to {}", a.run.out.display());
    }
    Ok(())
}

fn lens(a: LensArgs) -> Result<()> {
    let t0 = Instant::now();
    let positions = prompt_positions(&a.run.positions)?;
    let p = Prompts::load_labels(&a.inputs, &a.labels, a.run.quiet, a.top_k.is_none())?;
    let model = Model::load(&a.inputs.model)?;
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let bar = progress_bar(p.ids.len() as u64, "lens", "prompts", a.run.quiet);
    let tensors = logit_lens(&model, engine.as_ref(), &p.ids, &p.labels, &LensSpec { positions: positions.clone(), top_k: a.top_k, batch_size: a.run.batch_size }, &bar)?;
    bar.finish_and_clear();
    let _lock = patchbay::io::OutLock::acquire(&a.run.out)?;
    let spec = patchbay::experiments::capture::CaptureSpec { sites: Vec::new(), positions: positions.clone(), logits: false, dtype: OutDtype::F32, batch_size: a.run.batch_size, interventions: Vec::new() };
    let mut meta = metadata(&model, engine.as_ref(), &spec);
    meta.insert("lens".into(), "final norm + lm_head (+ final soft-cap) of blocks.L.hook_resid_post, every layer".into());
    meta.insert("labels".into(), p.labels.names.join(","));
    meta.insert("label_token_ids".into(), p.labels.token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    meta.insert("top_k".into(), a.top_k.map_or("none".into(), |k| k.to_string()));
    write_safetensors(&a.run.out.join("lens.safetensors"), &tensors, &meta)?;
    if let Some((_, OutTensor::Float { data, .. })) = tensors.iter().find(|(name, _)| name == "label_logits") {
        let rows_of = |prompt: &Vec<u32>| if let Positions::List(l) = &positions { l.len() } else { prompt.len() };
        let row_label: Vec<Option<usize>> = p.ids.iter().zip(p.gold()?).flat_map(|(ids, g)| std::iter::repeat_n(g, rows_of(ids))).collect();
        lens_heatmap(&a.run.out.join("lens.png"), data, model.cfg.n_layers, &p.labels, &row_label)?;
    }
    let extra = json!({"positions": positions.describe(), "top_k": a.top_k, "n_prompts": p.ids.len(), "timings_s": {"total": t0.elapsed().as_secs_f64()}});
    let m = manifest("components lens", &model, engine.as_ref(), (p.dataset.as_ref(), p.template.as_ref(), &p.labels), &a.labels, extra);
    write_json(&a.run.out.join("manifest.json"), &m)?;
    if !a.run.quiet {
        eprintln!("wrote {}", a.run.out.join("lens.safetensors").display());
    }
    Ok(())
}
