//! Causal component sweeps (`patchbay ablate`, Wang et al.): one attention head or one group of
//! MLP neurons per experiment, ablated (zero, dataset mean, random of equal norm) or scaled, at
//! chosen prompt positions, read through a label set at the last token.
//!
//! A component is an [`intervene::spec::Condition`](crate::intervene::spec::Condition) with
//! units: a head h of layer L is unit h of `blocks.L.attn.hook_z` (the o_proj input, so zeroing
//! it is zeroing that head's slice of o_proj's input), a neuron group of layer L units of
//! `blocks.L.mlp.hook_post` (the down_proj input). The sweep is therefore
//! `experiments::steer::steer_labels`: each experiment resumes from the prompt's clean run at
//! its layer, all the experiments of a layer segments of one batched call. [`naive_labels`] is
//! the simple path every resumed result is tested against: one full forward per (component,
//! chunk of prompts) with the intervention.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use indicatif::ProgressBar;
use serde::Deserialize;
use serde_json::json;

use crate::data::labels::LabelSet;
use crate::engine::{Engine, RunRequest};
use crate::experiments::patch::{Method, chunk_by_rows};
use crate::experiments::steer::{LabelRunner, SteerRow, check_label_tokens, steer_labels, write_label_rows};
use crate::intervene::spec::Condition;
use crate::intervene::{Capture, Op};
use crate::io::plot::Grid;
use crate::logits::argmax;
use crate::model::config::ModelConfig;
use crate::rng::{chacha, splitmix64};
use crate::sites::{Positions, Site, SiteKind, TokenScope};
use crate::{Error, Result};

/// What one experiment ablates.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

impl AblateOp {
    /// `--op NAME` with `--alpha` (scale only, required there, finite).
    pub fn parse(name: &str, alpha: Option<f32>) -> Result<AblateOp> {
        let op = match name {
            "zero" => AblateOp::Zero,
            "mean" => AblateOp::Mean,
            "random" => AblateOp::Random,
            "scale" => match alpha {
                Some(a) if a.is_finite() => AblateOp::Scale { alpha: a },
                Some(a) => return Err(Error::input(format!("--alpha {a} is not a finite number"))),
                None => return Err(Error::input("--op scale needs --alpha A (e.g. --alpha 2)")),
            },
            other => return Err(Error::input(format!("--op `{other}`: expected zero, mean, random or scale"))),
        };
        if alpha.is_some() && !matches!(op, AblateOp::Scale { .. }) {
            return Err(Error::input(format!("--alpha is for --op scale (not {name})")));
        }
        Ok(op)
    }

    /// `zero`, `mean`, `random` or `scale` (the `op` field of experiments.jsonl).
    pub fn name(&self) -> &'static str {
        match self {
            AblateOp::Zero => "zero",
            AblateOp::Mean => "mean",
            AblateOp::Random => "random",
            AblateOp::Scale { .. } => "scale",
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

/// The sites whose dataset means `--op mean` needs.
pub fn mean_sites(ablations: &[Ablation]) -> Vec<Site> {
    ablations.iter().map(|a| a.component.site()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// One condition per ablation (same order): `op` on the component's units at `positions` (prompt
/// positions). `means` (`[width]` per site, from [`site_means`]) is needed by `Mean`; `Random`'s
/// noise is seeded by `seed` and the ablation's index.
pub fn conditions(ablations: &[Ablation], op: AblateOp, means: &BTreeMap<Site, Vec<f32>>, positions: &Positions, seed: u64, cfg: &ModelConfig) -> Result<Vec<Condition>> {
    ablations
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let site = a.component.site();
            let units = a.component.units();
            let op = match op {
                AblateOp::Zero => Op::Zero,
                AblateOp::Scale { alpha } => Op::Scale { alpha },
                AblateOp::Random => Op::RandomEqualNorm { seed: splitmix64(seed ^ splitmix64(i as u64)) },
                AblateOp::Mean => {
                    let mean = means.get(&site).ok_or_else(|| Error::input(format!("no dataset mean of {site}")))?;
                    let (_, unit_w) = site.kind.units(cfg, 0);
                    Op::Mean { mean: units.iter().flat_map(|&u| mean[u * unit_w..(u + 1) * unit_w].iter().copied()).collect() }
                }
            };
            let beta = if let Op::Scale { alpha } = op { alpha } else { 0.0 };
            Ok(Condition { direction: a.component.name(), site, beta, op, positions: TokenScope { prompt: Some(positions.clone()), generated: false }, units: Some(units) })
        })
        .collect()
}

/// The naive method of [`steer_labels`] (same arguments, same rows, in another order): prompts in
/// chunks of at most `batch_rows` tokens, each chunk run clean, then once per condition with the
/// condition's intervention on every prompt of the chunk (a full forward each).
#[allow(clippy::too_many_arguments)]
pub fn naive_labels(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    label_tokens: &[u32],
    conditions: &[Condition],
    batch_rows: usize,
    progress: &ProgressBar,
    on_clean: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    on_rows: &mut dyn FnMut(&[SteerRow]) -> Result<()>,
) -> Result<()> {
    check_label_tokens(label_tokens, engine.config().vocab_size)?;
    let k = label_tokens.len();
    let ivs = conditions.iter().map(|c| c.intervention(None)).collect::<Result<Vec<_>>>()?;
    let last = Positions::List(vec![-1]);
    let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(label_tokens), ..Default::default() };
    let all: Vec<usize> = (0..prompts.len()).collect();
    for chunk in chunk_by_rows(&all, |&i| prompts[i].len(), batch_rows) {
        let chunk_prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let clean = engine.run_prompts(&chunk_prompts, &req).map_err(|e| e.in_batch(|i| chunk[i]))?.logits; // [n_chunk, k]
        for (&i, logits) in chunk.iter().zip(clean.chunks(k)) {
            on_clean(i, logits)?;
        }
        for (c, iv) in ivs.iter().enumerate() {
            let out = engine.run_prompts(&chunk_prompts, &RunRequest { interventions: std::slice::from_ref(iv), ..req }).map_err(|e| e.in_batch(|i| chunk[i]))?;
            let rows: Vec<SteerRow> = chunk
                .iter()
                .zip(out.logits.chunks(k).zip(clean.chunks(k)))
                .map(|(&i, (logits, clean))| SteerRow { index: i, condition: c, label_logits: logits.to_vec(), pred: argmax(logits), clean_pred: argmax(clean) })
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
}

/// Aggregates rows per ablation (`rows[..].condition` indexes `ablations`); `clean` is
/// `[n_prompts, n_labels]`.
pub fn summarize(ablations: &[Ablation], rows: &[SteerRow], clean: &[f32], n_labels: usize) -> Vec<SummaryRow> {
    let mut acc: Vec<(usize, f64, f64, Vec<f64>)> = vec![(0, 0.0, 0.0, vec![0.0; n_labels]); ablations.len()];
    for r in rows {
        let a = &mut acc[r.condition];
        let c = &clean[r.index * n_labels..(r.index + 1) * n_labels];
        a.0 += 1;
        a.1 += (r.pred != r.clean_pred) as u8 as f64;
        a.2 += (r.label_logits[r.clean_pred] - c[r.clean_pred]) as f64;
        a.3.iter_mut().zip(r.label_logits.iter().zip(c)).for_each(|(m, (x, c))| *m += (x - c) as f64);
    }
    ablations
        .iter()
        .zip(acc)
        .map(|(a, (n, flips, change, changes))| {
            let per = |x: f64| if n == 0 { f64::NAN } else { x / n as f64 };
            SummaryRow { ablation: a.clone(), n, flip_rate: per(flips), mean_clean_pred_change: per(change), mean_logit_change: changes.into_iter().map(per).collect() }
        })
        .collect()
}

/// summary.csv text: `kind,layer,head,neurons,control,op,n,flip_rate,mean_clean_pred_logit_change`,
/// then `mean_logit_change:<label>` per label (`head` empty for neuron rows, `neurons` space-separated and empty for head rows).
pub fn summary_csv(rows: &[SummaryRow], op: AblateOp, labels: &[String]) -> String {
    let mut s = String::from("kind,layer,head,neurons,control,op,n,flip_rate,mean_clean_pred_logit_change");
    labels.iter().for_each(|l| s.push_str(&format!(",mean_logit_change:{l}")));
    s.push('\n');
    for r in rows {
        let c = &r.ablation.component;
        let (head, neurons) = match c {
            Component::Head { head, .. } => (head.to_string(), String::new()),
            Component::Neurons { neurons, .. } => (String::new(), neurons.iter().map(usize::to_string).collect::<Vec<_>>().join(" ")),
        };
        s.push_str(&format!("{},{},{head},{neurons},{},{},{},{:.6},{:.6}", c.kind(), c.layer(), r.ablation.control, op.name(), r.n, r.flip_rate, r.mean_clean_pred_change));
        r.mean_logit_change.iter().for_each(|v| s.push_str(&format!(",{v:.6}")));
        s.push('\n');
    }
    s
}

/// The layer x head heatmap of the mean change of the clean prediction's logit (the ablated
/// heads, not their controls); None without head experiments.
pub fn head_grid(rows: &[SummaryRow], op: AblateOp, n_heads: usize) -> Option<Grid> {
    let heads: Vec<(usize, usize, f64)> = rows
        .iter()
        .filter(|r| !r.ablation.control)
        .filter_map(|r| match r.ablation.component {
            Component::Head { layer, head } => Some((layer, head, r.mean_clean_pred_change)),
            Component::Neurons { .. } => None,
        })
        .collect();
    let layers: Vec<usize> = heads.iter().map(|h| h.0).collect::<BTreeSet<_>>().into_iter().collect();
    if layers.is_empty() {
        return None;
    }
    let op = match op {
        AblateOp::Scale { alpha } => format!("scale {alpha}"),
        op => op.name().to_string(),
    };
    Some(Grid {
        title: format!("Mean change of the clean prediction's label logit, head ablated ({op})"),
        row_labels: layers.iter().map(|l| format!("layer {l}")).collect(),
        col_labels: (0..n_heads).map(|h| h.to_string()).collect(),
        values: layers.iter().map(|&l| (0..n_heads).map(|h| heads.iter().find(|x| x.0 == l && x.1 == h).map(|x| x.2)).collect()).collect(),
        value_label: "logit change".into(),
        range: None,
    })
}

/// An ablation sweep's results: the clean label logits `[n_prompts, n_labels]`, every ablated
/// row, the summary per ablation.
pub struct AblateSweep {
    pub clean: Vec<f32>,
    pub rows: Vec<SteerRow>,
    pub summary: Vec<SummaryRow>,
}

/// The sweep of `conditions` (one per ablation, from [`conditions`]) by `method`, with its files
/// written in `out` (the contract of `patchbay ablate`): experiments.jsonl (a line per
/// (ablation, prompt)) and clean.jsonl appended and flushed per batch; then summary.csv and
/// heatmap.png (with head experiments). `gold`: each prompt's gold label, written when known.
#[allow(clippy::too_many_arguments)]
pub fn ablate_sweep(
    engine: &dyn Engine,
    method: Method,
    prompts: &[Vec<u32>],
    labels: &LabelSet,
    gold: &[Option<usize>],
    ablations: &[Ablation],
    op: AblateOp,
    conditions: &[Condition],
    batch_rows: usize,
    progress: &ProgressBar,
    out: &Path,
) -> Result<AblateSweep> {
    if conditions.len() != ablations.len() {
        return Err(Error::input(format!("{} conditions for {} ablations", conditions.len(), ablations.len())));
    }
    let (clean, rows) = write_label_rows(label_runner(method), engine, prompts, labels, gold, conditions, batch_rows, progress, out, "experiments.jsonl", &|r| {
        let a = &ablations[r.condition];
        let mut o = json!({"kind": a.component.kind(), "layer": a.component.layer(), "op": op.name(), "control": a.control});
        match &a.component {
            Component::Head { head, .. } => o["head"] = json!(head),
            Component::Neurons { neurons, .. } => o["neurons"] = json!(neurons),
        }
        if let AblateOp::Scale { alpha } = op {
            o["alpha"] = json!(alpha);
        }
        o
    })?;
    let (k, names) = (labels.len(), &labels.names);
    let summary = summarize(ablations, &rows, &clean, k);
    crate::io::write_atomic(&out.join("summary.csv"), summary_csv(&summary, op, names).as_bytes())?;
    if let Some(grid) = head_grid(&summary, op, engine.config().n_heads) {
        crate::io::plot::heatmap(&out.join("heatmap.png"), &grid)?;
    }
    Ok(AblateSweep { clean, rows, summary })
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
        for (name, alpha, says) in [("scale", None, "needs --alpha"), ("scale", Some(f32::NAN), "not a finite"), ("zero", Some(1.0), "--alpha is for"), ("cut", None, "expected zero")] {
            let e = AblateOp::parse(name, alpha).unwrap_err().to_string();
            assert!(e.contains(says), "{name}: {e}");
        }
    }
}
