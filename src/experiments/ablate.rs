//! Causal component sweeps (`patchbay ablate`, Wang et al.): one attention head or one group of
//! MLP neurons per experiment, ablated (zero, dataset mean, random of equal norm), scaled, or
//! enhanced along a direction (add), at chosen prompt positions, read through a label set at the
//! last token.
//!
//! A component is an [`intervene::spec::Condition`](crate::intervene::spec::Condition) with
//! units: a head h of layer L is unit h of `blocks.L.attn.hook_z` (the o_proj input, so zeroing
//! it is zeroing that head's slice of o_proj's input), a neuron group of layer L units of
//! `blocks.L.mlp.hook_post` (the down_proj input). The sweep is therefore
//! `experiments::steer::steer_labels`: each experiment resumes from the prompt's clean run at
//! its layer, all the experiments of a layer segments of one batched call. [`naive_labels`] is
//! the simple path every resumed result is tested against: one full forward per (component,
//! chunk of prompts) with the intervention.
//!
//! # Enhancing along a direction (`AblateOp::Add`)
//!
//! Adding alpha d to the residual stream would be the same for every head of a layer, so the op
//! is defined in the component's own units: with W its write matrix into the residual (the o_proj
//! columns of head h, `W_O[:, h*d_head..(h+1)*d_head]`; the down_proj columns of the group's
//! neurons), u = W^T d / |W^T d| and the component's units get `x + alpha u` ([`write_operands`]
//! computes W^T d over a whole site, [`conditions`] selects and normalises the units). u is the
//! unit change of the component's input whose write W u has the largest projection on d (|W^T d|
//! for a unit d), so the sublayer's output gains alpha |W^T d| along d. In Gemma 2 and OLMo 2
//! the attention and MLP outputs pass a post-norm before the residual: the add is before that
//! norm, which rescales the whole sublayer output (the added write included), so what reaches the
//! residual is neither alpha |W^T d| along d nor exactly along W u.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::labels::LabelSet;
use crate::engine::{Engine, RunOutput, RunRequest};
use crate::experiments::label_files::Scope;
use crate::experiments::patch::{Method, chunk_by_rows};
use crate::experiments::steer::{CleanValues, LabelRunner, Projection, Readout, SteerRow, check_label_tokens, one_each, steer_labels, write_label_rows};
use crate::intervene::spec::Condition;
use crate::experiments::components::project_through;
use crate::intervene::{Capture, Op, norm};
use crate::io::plot::Grid;
use crate::logits::argmax;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::rng::{chacha, splitmix64};
use crate::sites::{Positions, Site, SiteKind, TokenScope};
use crate::{Error, Result};

/// What one experiment ablates (as JSON: `{"kind": "head", "layer": L, "head": H}` or
/// `{"kind": "neurons", "layer": L, "neurons": [...]}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Component {
    /// Attention head `head` of `layer`: its slice of the o_proj input (`attn.hook_z`).
    Head { layer: usize, head: usize },
    /// MLP neurons of `layer`: their entries of the down_proj input (`mlp.hook_post`).
    Neurons { layer: usize, neurons: Vec<usize> },
}

impl Component {
    pub fn layer(&self) -> usize {
        match self {
            Component::Head { layer, .. } | Component::Neurons { layer, .. } => *layer,
        }
    }

    /// `head` or `neurons` (the `kind` field of experiments.jsonl).
    pub fn kind(&self) -> &'static str {
        match self {
            Component::Head { .. } => "head",
            Component::Neurons { .. } => "neurons",
        }
    }

    /// The site the op acts on: z (heads) or mlp_post (neurons).
    pub fn site(&self) -> Site {
        match self {
            Component::Head { layer, .. } => Site::new(*layer, SiteKind::Z),
            Component::Neurons { layer, .. } => Site::new(*layer, SiteKind::MlpPost),
        }
    }

    /// The units of [`Component::site`] it selects.
    pub fn units(&self) -> Vec<usize> {
        match self {
            Component::Head { head, .. } => vec![*head],
            Component::Neurons { neurons, .. } => neurons.clone(),
        }
    }

    /// `L3.H2` or `L3.N[1,5,9]`.
    pub fn name(&self) -> String {
        match self {
            Component::Head { layer, head } => format!("L{layer}.H{head}"),
            Component::Neurons { layer, neurons } => format!("L{layer}.N[{}]", neurons.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
        }
    }

    /// Err naming the component when its layer, a head or a neuron is out of range, a group is
    /// empty or lists a neuron twice.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let layer = self.layer();
        if layer >= cfg.n_layers {
            return Err(Error::input(format!("{}: layer {layer} is out of range (the model has {} layers: 0..={})", self.name(), cfg.n_layers, cfg.n_layers - 1)));
        }
        let (n_units, _) = self.site().kind.units(cfg, 0);
        let unit = self.site().kind.unit_name();
        let units = self.units();
        if units.is_empty() {
            return Err(Error::input(format!("neuron group at layer {layer}: empty")));
        }
        let mut seen = BTreeSet::new();
        for u in units {
            if u >= n_units {
                return Err(Error::input(format!("{}: {unit} {u} is out of range (layer {layer} has {n_units}: 0..={})", self.name(), n_units - 1)));
            }
            if !seen.insert(u) {
                return Err(Error::input(format!("{}: {unit} {u} is listed twice", self.name())));
            }
        }
        Ok(())
    }
}

/// `--heads`: `all` (every head of every layer, layer-major) or a list `L.H,...`, each checked.
pub fn parse_heads(spec: &str, cfg: &ModelConfig) -> Result<Vec<Component>> {
    let heads: Vec<Component> = if spec.trim() == "all" {
        (0..cfg.n_layers).flat_map(|layer| (0..cfg.n_heads).map(move |head| Component::Head { layer, head })).collect()
    } else {
        let bad = |item: &str| Error::input(format!("--heads: `{item}` is not LAYER.HEAD (examples: all, or 0.1,3.2)"));
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (l, h) = item.split_once('.').ok_or_else(|| bad(item))?;
                Ok(Component::Head { layer: l.trim().parse().map_err(|_| bad(item))?, head: h.trim().parse().map_err(|_| bad(item))? })
            })
            .collect::<Result<_>>()?
    };
    if heads.is_empty() {
        return Err(Error::input("--heads: empty list (examples: all, or 0.1,3.2)"));
    }
    for (i, h) in heads.iter().enumerate() {
        h.check(cfg)?;
        if heads[..i].contains(h) {
            return Err(Error::input(format!("--heads: {} is listed twice", h.name())));
        }
    }
    Ok(heads)
}

/// One entry of a GROUPS.json file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEntry {
    layer: usize,
    neurons: Vec<usize>,
}

/// A GROUPS.json file: a list of `{"layer": L, "neurons": [i, ...]}`, one experiment each, each
/// checked. Errors name the file and the entry.
pub fn read_groups(path: &Path, cfg: &ModelConfig) -> Result<Vec<Component>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("expected a JSON list of {{\"layer\": L, \"neurons\": [i, ...]}}: {e}")))?;
    if values.is_empty() {
        return Err(Error::file(path, "an empty list of neuron groups"));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let g: GroupEntry = serde_path_to_error::deserialize(v).map_err(|e| Error::file(path, format!("group {i}: {}{}", e.inner(), if e.path().to_string() == "." { String::new() } else { format!(" (at {})", e.path()) })))?;
            let c = Component::Neurons { layer: g.layer, neurons: g.neurons };
            c.check(cfg).map_err(|e| Error::file(path, format!("group {i}: {e}")))?;
            Ok(c)
        })
        .collect()
}

/// One experiment: a component, and whether it is a random control.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ablation {
    pub component: Component,
    pub control: bool,
}

/// The random control of `c` (the `index`-th component of the sweep), seeded by `seed`: for a
/// head, another head of the same layer drawn uniformly; for a neuron group, as many distinct
/// neurons of the same layer drawn uniformly among those outside the group (sorted). Err when
/// the layer has no other head, or too few other neurons.
pub fn random_control(c: &Component, index: usize, cfg: &ModelConfig, seed: u64) -> Result<Component> {
    let mut rng = chacha(splitmix64(seed ^ splitmix64(index as u64 ^ 0xab1a7e)));
    let units = c.units();
    let others: Vec<usize> = (0..c.site().kind.units(cfg, 0).0).filter(|u| !units.contains(u)).collect();
    if others.len() < units.len() {
        return Err(Error::input(format!("{}: no random control of the same size (layer {} has only {} other {}s)", c.name(), c.layer(), others.len(), c.site().kind.unit_name())));
    }
    let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, others.len(), units.len()).into_iter().map(|i| others[i]).collect();
    Ok(match c {
        Component::Head { layer, .. } => Component::Head { layer: *layer, head: picked[0] },
        Component::Neurons { layer, .. } => {
            picked.sort_unstable();
            Component::Neurons { layer: *layer, neurons: picked }
        }
    })
}

/// The experiments of a sweep: every component, then (with `control_seed`) the random control of
/// each, in the same order.
pub fn ablations(components: &[Component], cfg: &ModelConfig, control_seed: Option<u64>) -> Result<Vec<Ablation>> {
    let mut out: Vec<Ablation> = components.iter().map(|c| Ablation { component: c.clone(), control: false }).collect();
    if let Some(seed) = control_seed {
        for (i, c) in components.iter().enumerate() {
            out.push(Ablation { component: random_control(c, i, cfg, seed)?, control: true });
        }
    }
    Ok(out)
}

/// `--positions`: the grammar of `TokenScope::parse` (`all`, `last`, `last:K`, `-1,-2`, `0,3`,
/// `-1..-5`), prompt positions only.
pub fn prompt_positions(spec: &str) -> Result<Positions> {
    match TokenScope::parse(spec)? {
        TokenScope { prompt: Some(p), generated: false } => Ok(p),
        _ => Err(Error::input(format!("--positions `{spec}`: ablations read the prompt only (no generated positions)"))),
    }
}

/// What is done to a component.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AblateOp {
    /// x <- 0
    Zero,
    /// x <- the component's mean over every prompt and position of the dataset.
    Mean,
    /// x <- a seeded Gaussian vector of |x|'s norm.
    Random,
    /// x <- alpha x (enhancement for alpha > 1).
    Scale { alpha: f32 },
    /// x <- x + alpha u, u = W^T d / |W^T d| over the component's units (the module doc).
    Add { alpha: f32 },
}

impl AblateOp {
    /// `--op NAME` with `--alpha` (scale and add only, required there, finite).
    pub fn parse(name: &str, alpha: Option<f32>) -> Result<AblateOp> {
        let alpha_of = |op: &str| match alpha {
            Some(a) if a.is_finite() => Ok(a),
            Some(a) => Err(Error::input(format!("--alpha {a} is not a finite number"))),
            None => Err(Error::input(format!("--op {op} needs --alpha A (e.g. --alpha 2)"))),
        };
        let op = match name {
            "zero" => AblateOp::Zero,
            "mean" => AblateOp::Mean,
            "random" => AblateOp::Random,
            "scale" => AblateOp::Scale { alpha: alpha_of(name)? },
            "add" => AblateOp::Add { alpha: alpha_of(name)? },
            other => return Err(Error::input(format!("--op `{other}`: expected zero, mean, random, scale or add"))),
        };
        if alpha.is_some() && op.alpha().is_none() {
            return Err(Error::input(format!("--alpha is for --op scale or add (not {name})")));
        }
        Ok(op)
    }

    /// The strength of scale and add (None for the ablations).
    pub fn alpha(&self) -> Option<f32> {
        match self {
            AblateOp::Scale { alpha } | AblateOp::Add { alpha } => Some(*alpha),
            AblateOp::Zero | AblateOp::Mean | AblateOp::Random => None,
        }
    }

    /// `zero`, `mean`, `random`, `scale` or `add` (the `op` field of experiments.jsonl).
    pub fn name(&self) -> &'static str {
        match self {
            AblateOp::Zero => "zero",
            AblateOp::Mean => "mean",
            AblateOp::Random => "random",
            AblateOp::Scale { .. } => "scale",
            AblateOp::Add { .. } => "add",
        }
    }
}

/// The mean of each site over every position of every prompt (one capture pass, prompts in
/// chunks of at most `batch_rows` tokens, sums in f64): `[width]` per site.
pub fn site_means(engine: &dyn Engine, prompts: &[Vec<u32>], sites: &[Site], batch_rows: usize) -> Result<BTreeMap<Site, Vec<f32>>> {
    let cfg = engine.config();
    let captures: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect();
    let mut sums: Vec<Vec<f64>> = sites.iter().map(|s| vec![0.0; s.kind.token_shape(cfg, 0).iter().product()]).collect();
    let mut n = 0usize;
    let all: Vec<usize> = (0..prompts.len()).collect();
    for chunk in chunk_by_rows(&all, |&i| prompts[i].len(), batch_rows) {
        let chunk_prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let out = engine.run_prompts(&chunk_prompts, &RunRequest { captures: &captures, ..Default::default() }).map_err(|e| e.in_batch(|i| chunk[i]))?;
        n += chunk_prompts.iter().map(Vec::len).sum::<usize>();
        for (sum, c) in sums.iter_mut().zip(&out.captured) {
            // c.data: [n_rows, width]
            for row in c.data.chunks(sum.len()) {
                sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
            }
        }
    }
    if n == 0 {
        return Err(Error::input("no prompts to average over"));
    }
    Ok(sites.iter().zip(sums).map(|(&s, sum)| (s, sum.into_iter().map(|x| (x / n as f64) as f32).collect())).collect())
}

/// The sites whose operands `--op mean` and `--op add` need.
pub fn mean_sites(ablations: &[Ablation]) -> Vec<Site> {
    ablations.iter().map(|a| a.component.site()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// One condition per ablation (same order): `op` on the component's units at `positions` (prompt
/// positions). `operands` (`[width]` per site) are the dataset means of `Mean` (from
/// [`site_means`]) or the W^T d of `Add` (from [`write_operands`], normalised here over the
/// component's units); `Random`'s noise is seeded by `seed` and the ablation's index.
pub fn conditions(ablations: &[Ablation], op: AblateOp, operands: &BTreeMap<Site, Vec<f32>>, positions: &Positions, seed: u64, cfg: &ModelConfig) -> Result<Vec<Condition>> {
    ablations
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let site = a.component.site();
            let units = a.component.units();
            let beta = op.alpha().unwrap_or(0.0);
            let (_, unit_w) = site.kind.units(cfg, 0);
            let selected = |what: &str| -> Result<Vec<f32>> {
                let all = operands.get(&site).ok_or_else(|| Error::input(format!("no {what} of {site}")))?;
                Ok(units.iter().flat_map(|&u| all[u * unit_w..(u + 1) * unit_w].iter().copied()).collect())
            };
            let op = match op {
                AblateOp::Zero => Op::Zero,
                AblateOp::Scale { alpha } => Op::Scale { alpha },
                AblateOp::Random => Op::RandomEqualNorm { seed: splitmix64(seed ^ splitmix64(i as u64)) },
                AblateOp::Mean => Op::Mean { mean: selected("dataset mean")? },
                AblateOp::Add { alpha } => Op::Add { beta: alpha, v: unit_write(selected("write direction W^T d (--op add)")?, &a.component.name())?, normalize: false },
            };
            Ok(Condition { direction: a.component.name(), site, beta, op, positions: TokenScope { prompt: Some(positions.clone()), generated: false }, units: Some(units) })
        })
        .collect()
}

/// `w / |w|`: the unit write of a component (Err naming it when W^T d is zero on its units: it
/// cannot write along d).
pub fn unit_write(mut w: Vec<f32>, component: &str) -> Result<Vec<f32>> {
    let n = norm(&w);
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::input(format!("{component}: W^T d is {n} on its units (the component does not write along the direction)")));
    }
    w.iter_mut().for_each(|x| *x /= n);
    Ok(w)
}

/// W^T d over whole sites, the operand of [`AblateOp::Add`]: at `z` of layer L, `W_O^T d`
/// (`[n_heads * d_head]`, head h's write direction at `h*d_head..`), at `mlp_post`, `W_down^T d`
/// (`[d_mlp]`), with d = `direction(L)` (`[d_model]`, the direction at that layer). Err for another
/// site kind or a direction of another width.
pub fn write_operands(model: &Model, sites: &[Site], direction: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<BTreeMap<Site, Vec<f32>>> {
    let mut out = BTreeMap::new();
    for &site in sites {
        site.check(&model.cfg)?;
        let lw = &model.weights.layers[site.layer];
        let w = match site.kind {
            SiteKind::Z => &lw.o.w,
            SiteKind::MlpPost => &lw.down.w,
            _ => return Err(Error::input(format!("{site}: --op add acts on heads (z) and neurons (mlp_post) only"))),
        };
        let d = direction(site.layer)?;
        if d.len() != model.cfg.d_model {
            return Err(Error::input(format!("{site}: a direction of {} values (d_model is {})", d.len(), model.cfg.d_model)));
        }
        out.insert(site, project_through(w, &d, 1));
    }
    Ok(out)
}

/// The naive method of [`steer_labels`] (same arguments, same rows, in another order): prompts in
/// chunks of at most `batch_rows` tokens, each chunk run clean, then once per experiment with its
/// interventions on every prompt of the chunk (a full forward each).
#[allow(clippy::too_many_arguments)]
pub fn naive_labels(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    readout: Readout,
    experiments: &[Vec<Condition>],
    batch_rows: usize,
    progress: &ProgressBar,
    on_clean: &mut dyn FnMut(usize, &[f32], Option<f32>) -> Result<()>,
    on_rows: &mut dyn FnMut(&[SteerRow]) -> Result<()>,
) -> Result<()> {
    check_label_tokens(readout.label_tokens, engine.config().vocab_size)?;
    let k = readout.label_tokens.len();
    let ivs = experiments.iter().map(|e| e.iter().map(|c| c.intervention(None)).collect::<Result<Vec<_>>>()).collect::<Result<Vec<_>>>()?;
    let last = Positions::List(vec![-1]);
    let captures: Vec<Capture> = readout.projection.map(Projection::capture).into_iter().collect();
    let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(readout.label_tokens), captures: &captures, ..Default::default() };
    let projections = |out: &RunOutput| -> Vec<Option<f32>> {
        match readout.projection {
            Some(p) => p.read(out).into_iter().map(Some).collect(),
            None => vec![None; out.logits.len() / k],
        }
    };
    let all: Vec<usize> = (0..prompts.len()).collect();
    for chunk in chunk_by_rows(&all, |&i| prompts[i].len(), batch_rows) {
        let chunk_prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let clean = engine.run_prompts(&chunk_prompts, &req).map_err(|e| e.in_batch(|i| chunk[i]))?;
        let clean_proj = projections(&clean);
        for ((&i, logits), &p) in chunk.iter().zip(clean.logits.chunks(k)).zip(&clean_proj) {
            on_clean(i, logits, p)?;
        }
        for (e, iv) in ivs.iter().enumerate() {
            let out = engine.run_prompts(&chunk_prompts, &RunRequest { interventions: iv, ..req }).map_err(|e| e.in_batch(|i| chunk[i]))?;
            let rows: Vec<SteerRow> = chunk
                .iter()
                .zip(out.logits.chunks(k).zip(clean.logits.chunks(k)))
                .zip(projections(&out))
                .map(|((&i, (logits, clean)), projection)| SteerRow { index: i, condition: e, label_logits: logits.to_vec(), pred: argmax(logits), clean_pred: argmax(clean), projection })
                .collect();
            on_rows(&rows)?;
            progress.inc(rows.len() as u64);
        }
    }
    Ok(())
}

/// The engine pass of `method`: [`steer_labels`] (resumed) or [`naive_labels`].
pub fn label_runner(method: Method) -> LabelRunner {
    match method {
        Method::Resumed => steer_labels,
        Method::Naive => naive_labels,
    }
}

/// One line of summary.csv: an ablation over all prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub ablation: Ablation,
    pub n: usize,
    /// Share of prompts whose prediction changed (pred != clean_pred).
    pub flip_rate: f64,
    /// Mean change (ablated - clean) of the logit of the label the clean run predicted.
    pub mean_clean_pred_change: f64,
    /// Mean change of each label's logit, in label order.
    pub mean_logit_change: Vec<f64>,
    /// Mean change of the projection, when the sweep reads one.
    pub mean_projection_change: Option<f64>,
}

/// Aggregates rows per ablation (`rows[..].condition` indexes `ablations`).
pub fn summarize(ablations: &[Ablation], rows: &[SteerRow], clean: &CleanValues, n_labels: usize) -> Vec<SummaryRow> {
    let mut acc: Vec<(usize, f64, f64, Vec<f64>, f64)> = vec![(0, 0.0, 0.0, vec![0.0; n_labels], 0.0); ablations.len()];
    for r in rows {
        let a = &mut acc[r.condition];
        let c = &clean.label_logits[r.index * n_labels..(r.index + 1) * n_labels];
        a.0 += 1;
        a.1 += (r.pred != r.clean_pred) as u8 as f64;
        a.2 += (r.label_logits[r.clean_pred] - c[r.clean_pred]) as f64;
        a.3.iter_mut().zip(r.label_logits.iter().zip(c)).for_each(|(m, (x, c))| *m += (x - c) as f64);
        if let (Some(p), Some(cp)) = (r.projection, &clean.projection) {
            a.4 += (p - cp[r.index]) as f64;
        }
    }
    ablations
        .iter()
        .zip(acc)
        .map(|(a, (n, flips, change, changes, proj))| {
            let per = |x: f64| if n == 0 { f64::NAN } else { x / n as f64 };
            SummaryRow {
                ablation: a.clone(),
                n,
                flip_rate: per(flips),
                mean_clean_pred_change: per(change),
                mean_logit_change: changes.into_iter().map(per).collect(),
                mean_projection_change: clean.projection.as_ref().map(|_| per(proj)),
            }
        })
        .collect()
}

/// summary.csv text: `kind,layer,head,neurons,control,op,n,flip_rate,mean_clean_pred_logit_change`,
/// then `mean_logit_change:<label>` per label, then `mean_projection_change` when the sweep reads
/// a projection (`head` empty for neuron rows, `neurons` space-separated and empty for head rows).
pub fn summary_csv(rows: &[SummaryRow], op: AblateOp, labels: &[String]) -> String {
    let mut s = String::from("kind,layer,head,neurons,control,op,n,flip_rate,mean_clean_pred_logit_change");
    labels.iter().for_each(|l| s.push_str(&format!(",mean_logit_change:{l}")));
    let with_projection = rows.first().is_some_and(|r| r.mean_projection_change.is_some());
    if with_projection {
        s.push_str(",mean_projection_change");
    }
    s.push('\n');
    for r in rows {
        let c = &r.ablation.component;
        let (head, neurons) = match c {
            Component::Head { head, .. } => (head.to_string(), String::new()),
            Component::Neurons { neurons, .. } => (String::new(), neurons.iter().map(usize::to_string).collect::<Vec<_>>().join(" ")),
        };
        s.push_str(&format!("{},{},{head},{neurons},{},{},{},{:.6},{:.6}", c.kind(), c.layer(), r.ablation.control, op.name(), r.n, r.flip_rate, r.mean_clean_pred_change));
        r.mean_logit_change.iter().chain(&r.mean_projection_change).for_each(|v| s.push_str(&format!(",{v:.6}")));
        s.push('\n');
    }
    s
}

/// The layer x head heatmap of the mean change of the projection when the sweep reads one, else
/// of the clean prediction's logit (the ablated heads, not their controls); None without head
/// experiments.
pub fn head_grid(rows: &[SummaryRow], op: AblateOp, n_heads: usize) -> Option<Grid> {
    let heads: Vec<(usize, usize, f64)> = rows
        .iter()
        .filter(|r| !r.ablation.control)
        .filter_map(|r| match r.ablation.component {
            Component::Head { layer, head } => Some((layer, head, r.mean_projection_change.unwrap_or(r.mean_clean_pred_change))),
            Component::Neurons { .. } => None,
        })
        .collect();
    let projection = rows.first().is_some_and(|r| r.mean_projection_change.is_some());
    let layers: Vec<usize> = heads.iter().map(|h| h.0).collect::<BTreeSet<_>>().into_iter().collect();
    if layers.is_empty() {
        return None;
    }
    let op = match op.alpha() {
        Some(alpha) => format!("{} {alpha}", op.name()),
        None => op.name().to_string(),
    };
    Some(Grid {
        title: if projection { format!("Mean change of the projection, head ablated ({op})") } else { format!("Mean change of the clean prediction's label logit, head ablated ({op})") },
        row_labels: layers.iter().map(|l| format!("layer {l}")).collect(),
        col_labels: (0..n_heads).map(|h| h.to_string()).collect(),
        values: layers.iter().map(|&l| (0..n_heads).map(|h| heads.iter().find(|x| x.0 == l && x.1 == h).map(|x| x.2)).collect()).collect(),
        value_label: if projection { "projection change" } else { "logit change" }.into(),
        range: None,
        x_desc: "head".into(),
        y_desc: "layer".into(),
    })
}

/// An ablation sweep's results: the clean values, every ablated row, the summary per ablation.
pub struct AblateSweep {
    pub clean: CleanValues,
    pub rows: Vec<SteerRow>,
    pub summary: Vec<SummaryRow>,
}

/// The sweep of `conditions` (one per ablation, from [`conditions`]) by `method`, with its files
/// written in `out` (the contract of `patchbay ablate`): experiments.jsonl (a line per
/// (ablation, prompt)) and clean.jsonl appended and flushed per batch; then summary.csv and
/// heatmap.png (with head experiments). `gold`: each prompt's gold label, written when known;
/// `projection`: read in every run when given.
#[allow(clippy::too_many_arguments)]
pub fn ablate_sweep(
    engine: &dyn Engine,
    method: Method,
    prompts: &[Vec<u32>],
    labels: &LabelSet,
    projection: Option<&Projection>,
    gold: &[Option<usize>],
    ablations: &[Ablation],
    op: AblateOp,
    conditions: &[Condition],
    scope: Scope,
    batch_rows: usize,
    progress: &ProgressBar,
    out: &Path,
) -> Result<AblateSweep> {
    if conditions.len() != ablations.len() {
        return Err(Error::input(format!("{} conditions for {} ablations", conditions.len(), ablations.len())));
    }
    let (clean, rows) = write_label_rows(label_runner(method), engine, prompts, labels, projection, gold, &one_each(conditions), scope, batch_rows, progress, out, "experiments.jsonl", &|r| {
        let a = &ablations[r.condition];
        let mut o = json!({"kind": a.component.kind(), "layer": a.component.layer(), "op": op.name(), "control": a.control});
        match &a.component {
            Component::Head { head, .. } => o["head"] = json!(head),
            Component::Neurons { neurons, .. } => o["neurons"] = json!(neurons),
        }
        if let Some(alpha) = op.alpha() {
            o["alpha"] = json!(alpha);
        }
        o
    })?;
    let summary = summary_outputs(out, ablations, &rows, &clean, op, labels, engine.config().n_heads)?;
    Ok(AblateSweep { clean, rows, summary })
}

/// summary.csv and heatmap.png (with head experiments) of a component sweep's rows, in `out`.
pub fn summary_outputs(out: &Path, ablations: &[Ablation], rows: &[SteerRow], clean: &CleanValues, op: AblateOp, labels: &LabelSet, n_heads: usize) -> Result<Vec<SummaryRow>> {
    let summary = summarize(ablations, rows, clean, labels.len());
    crate::io::write_atomic(&out.join("summary.csv"), summary_csv(&summary, op, &labels.names).as_bytes())?;
    if let Some(grid) = head_grid(&summary, op, n_heads) {
        crate::io::plot::heatmap(&out.join("heatmap.png"), &grid)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let mut v = crate::model::synth::preset("llama-3.2-1b").unwrap();
        v["num_hidden_layers"] = 3.into();
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn heads_grammar() {
        let c = cfg();
        assert_eq!(parse_heads("all", &c).unwrap().len(), 3 * c.n_heads);
        assert_eq!(parse_heads("0.1, 2.3", &c).unwrap(), [Component::Head { layer: 0, head: 1 }, Component::Head { layer: 2, head: 3 }]);
        for (bad, says) in [("3.0", "layer 3 is out of range"), ("0.99", "head 99 is out of range"), ("1", "is not LAYER.HEAD"), ("0.1,0.1", "twice"), ("", "empty")] {
            let e = parse_heads(bad, &c).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn ops() {
        assert_eq!(AblateOp::parse("scale", Some(2.0)).unwrap(), AblateOp::Scale { alpha: 2.0 });
        assert_eq!(AblateOp::parse("zero", None).unwrap(), AblateOp::Zero);
        assert_eq!(AblateOp::parse("add", Some(-1.5)).unwrap(), AblateOp::Add { alpha: -1.5 });
        assert_eq!(AblateOp::parse("add", Some(3.0)).unwrap().alpha(), Some(3.0));
        for (name, alpha, says) in [("scale", None, "needs --alpha"), ("add", None, "--op add needs --alpha"), ("scale", Some(f32::NAN), "not a finite"), ("zero", Some(1.0), "--alpha is for"), ("cut", None, "expected zero")] {
            let e = AblateOp::parse(name, alpha).unwrap_err().to_string();
            assert!(e.contains(says), "{name}: {e}");
        }
    }
}
