//! Top-k curves (`patchbay ablate --ranking`, Wang et al.): the k highest-ranked components
//! ablated or enhanced together, for each k of a list, against k random components of the same
//! layers and kinds (several seeded draws), with 95% intervals.
//!
//! A ranking is one or more `components contrib` tables (heads.csv, neurons.csv), read for one
//! label and merged by mean contribution, largest first (heads and neurons are in the same
//! units: a term of the direction's projection). Each experiment is a set of components, one
//! condition each, applied together in one run that resumes from the clean run at the earliest
//! of their layers (`experiments::steer::steer_labels`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use indicatif::ProgressBar;
use serde_json::json;

use crate::data::labels::LabelSet;
use crate::engine::Engine;
use crate::experiments::ablate::{AblateOp, Ablation, Component, conditions, label_runner};
use crate::experiments::label_files::Scope;
use crate::experiments::patch::Method;
use crate::experiments::steer::{CleanValues, Projection, SteerRow, write_label_rows};
use crate::intervene::spec::Condition;
use crate::io::plot::{LinePanels, Point, line_panels};
use crate::learn::metrics::bootstrap_ci;
use crate::model::config::ModelConfig;
use crate::rng::{chacha, splitmix64};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// Components ranked by the mean contribution to `label` in `components contrib` tables
/// (heads.csv: `layer,head,label,mean,...`; neurons.csv: `layer,neuron,label,mean,...`), largest
/// first, ties in file order; each neuron its own component. Err naming the file when it is not
/// such a table, lists no row of the label, or a component is out of range for the model.
pub fn read_ranking(paths: &[impl AsRef<Path>], label: &str, cfg: &ModelConfig) -> Result<Vec<Component>> {
    let mut scored: Vec<(f64, Component)> = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, e.to_string()))?;
        let header: Vec<String> = r.headers().map_err(|e| Error::file(path, e.to_string()))?.iter().map(str::to_string).collect();
        let unit = match header.get(1).map(String::as_str) {
            Some(u @ ("head" | "neuron")) if header.get(..4).is_some_and(|h| h[0] == "layer" && h[2] == "label" && h[3] == "mean") => u.to_string(),
            _ => return Err(Error::file(path, format!("not a components contrib table (header `{}`; expected layer,head|neuron,label,mean,...)", header.join(",")))),
        };
        let before = scored.len();
        for (line, rec) in r.records().enumerate() {
            let rec = rec.map_err(|e| Error::file(path, e.to_string()))?;
            if rec.get(2) != Some(label) {
                continue;
            }
            let bad = |what: &str| Error::file(path, format!("row {}: {what}", line + 2));
            let num = |i: usize| rec.get(i).and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| bad(&format!("column {} is not a whole number", header[i])));
            let (layer, u) = (num(0)?, num(1)?);
            let mean: f64 = rec.get(3).and_then(|v| v.trim().parse().ok()).filter(|m: &f64| m.is_finite()).ok_or_else(|| bad("mean is not a finite number"))?;
            let c = if unit == "head" { Component::Head { layer, head: u } } else { Component::Neurons { layer, neurons: vec![u] } };
            c.check(cfg).map_err(|e| bad(&e.to_string()))?;
            if scored.iter().any(|(_, s)| *s == c) {
                return Err(bad(&format!("{} is listed twice for label {label}", c.name())));
            }
            scored.push((mean, c));
        }
        if scored.len() == before {
            return Err(Error::file(path, format!("no row of label `{label}`")));
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(scored.into_iter().map(|(_, c)| c).collect())
}

/// `components` with the neurons of each layer in one group (sorted), after the heads: the
/// same units, one condition per head and per layer's neurons.
fn grouped(components: &[Component]) -> Vec<Component> {
    let mut neurons: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut out = Vec::new();
    for c in components {
        match c {
            Component::Head { .. } => out.push(c.clone()),
            Component::Neurons { layer, neurons: n } => neurons.entry(*layer).or_default().extend(n),
        }
    }
    out.extend(neurons.into_iter().map(|(layer, n)| Component::Neurons { layer, neurons: n.into_iter().collect() }));
    out
}

/// A random set like `top`: at each (site, layer) as many units as `top` holds there, drawn
/// without replacement (seeded) among the units `top` does not hold there, or among all the
/// layer's units where too few others exist (every head of a layer in the top set: the random
/// set then overlaps it).
pub fn random_set(top: &[Component], cfg: &ModelConfig, seed: u64) -> Vec<Component> {
    let mut want: BTreeMap<Site, Vec<usize>> = BTreeMap::new();
    top.iter().for_each(|c| want.entry(c.site()).or_default().extend(c.units()));
    let mut rng = chacha(seed);
    let mut out = Vec::new();
    for (site, units) in want {
        let all = site.kind.units(cfg, 0).0;
        let mut others: Vec<usize> = (0..all).filter(|u| !units.contains(u)).collect();
        if others.len() < units.len() {
            others = (0..all).collect();
        }
        let picked = rand::seq::index::sample(&mut rng, others.len(), units.len()).into_iter().map(|i| others[i]);
        if site.kind == SiteKind::Z {
            out.extend(picked.map(|head| Component::Head { layer: site.layer, head }));
        } else {
            out.push(Component::Neurons { layer: site.layer, neurons: picked.collect::<BTreeSet<_>>().into_iter().collect() });
        }
    }
    out
}

/// One experiment of a top-k sweep: the top k components, or draw `draw` of the random sets
/// like them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopK {
    pub k: usize,
    pub draw: Option<usize>,
    pub components: Vec<Component>,
}

/// For each k of `ks` (each in 1..=ranking length): the top k, then `draws` random sets like
/// them ([`random_set`]; draw d of k seeded by `seed`, k and d).
pub fn top_k_sets(ranking: &[Component], ks: &[usize], draws: usize, cfg: &ModelConfig, seed: u64) -> Result<Vec<TopK>> {
    if ks.is_empty() {
        return Err(Error::input("--top-k: empty list (example: --top-k 1,2,4,8)"));
    }
    if let Some(&k) = ks.iter().find(|&&k| k == 0 || k > ranking.len()) {
        return Err(Error::input(format!("--top-k {k}: the ranking has {} components (k must be 1..={})", ranking.len(), ranking.len())));
    }
    if let Some((i, k)) = ks.iter().enumerate().find(|(i, k)| ks[..*i].contains(k)) {
        return Err(Error::input(format!("--top-k: {k} is listed twice (entry {i})")));
    }
    let mut out = Vec::new();
    for &k in ks {
        let top = grouped(&ranking[..k]);
        for d in 0..draws {
            let components = random_set(&top, cfg, splitmix64(seed ^ splitmix64((k as u64) << 20 | d as u64)));
            out.push(TopK { k, draw: Some(d), components });
        }
        out.insert(out.len() - draws, TopK { k, draw: None, components: top });
    }
    Ok(out)
}

/// The conditions of each set: `op` on every component (as `experiments::ablate::conditions`),
/// the noise of `--op random` seeded by `seed` and the set's index.
pub fn set_conditions(sets: &[TopK], op: AblateOp, means: &BTreeMap<Site, Vec<f32>>, positions: &Positions, seed: u64, cfg: &ModelConfig) -> Result<Vec<Vec<Condition>>> {
    sets.iter()
        .enumerate()
        .map(|(i, s)| {
            let abl: Vec<Ablation> = s.components.iter().map(|c| Ablation { component: c.clone(), control: s.draw.is_some() }).collect();
            conditions(&abl, op, means, positions, splitmix64(seed ^ splitmix64(i as u64 ^ 0x70b_c0de)), cfg)
        })
        .collect()
}

/// A metric of the curve: its name and each row's value.
struct Metric {
    name: String,
    value: Box<dyn Fn(&SteerRow) -> f64>,
}

/// The metrics of a sweep's rows: the change of the clean prediction's logit, of the ranking
/// label's logit (when it is a label), and of the projection (when read).
fn metrics(clean: &CleanValues, labels: &LabelSet, ranking_label: &str) -> Vec<Metric> {
    let k = labels.len();
    let logits = clean.label_logits.clone();
    let mut out = vec![Metric { name: "clean_pred_logit_change".into(), value: Box::new(move |r: &SteerRow| (r.label_logits[r.clean_pred] - logits[r.index * k + r.clean_pred]) as f64) }];
    if let Some(l) = labels.names.iter().position(|n| n == ranking_label) {
        let logits = clean.label_logits.clone();
        out.push(Metric { name: format!("logit_change:{ranking_label}"), value: Box::new(move |r: &SteerRow| (r.label_logits[l] - logits[r.index * k + l]) as f64) });
    }
    if let Some(p) = clean.projection.clone() {
        out.push(Metric { name: "projection_change".into(), value: Box::new(move |r: &SteerRow| r.projection.map_or(f64::NAN, |x| (x - p[r.index]) as f64)) });
    }
    out
}

/// One line of top_k.csv: a metric at one k, for the top set or the random sets.
#[derive(Clone, Debug, PartialEq)]
pub struct CurvePoint {
    pub k: usize,
    pub random: bool,
    pub metric: String,
    /// Mean over prompts (and draws).
    pub mean: f64,
    /// 95% interval: over prompts (bootstrap) for the top set, the 2.5-97.5 percentiles of the
    /// draws' means for the random sets.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Share of rows whose prediction changed.
    pub flip_rate: f64,
    /// Rows (prompts x draws).
    pub n: usize,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The curve points of `rows` (`rows[..].condition` indexes `sets`).
pub fn curve(sets: &[TopK], rows: &[SteerRow], clean: &CleanValues, labels: &LabelSet, ranking_label: &str, seed: u64) -> Vec<CurvePoint> {
    let ms = metrics(clean, labels, ranking_label);
    let ks: Vec<usize> = crate::io::plot::distinct(sets.iter().map(|s| s.k));
    let mut out = Vec::new();
    for k in ks {
        for random in [false, true] {
            let of_set = |i: usize| sets[i].k == k && sets[i].draw.is_some() == random;
            let rs: Vec<&SteerRow> = rows.iter().filter(|r| of_set(r.condition)).collect();
            if rs.is_empty() {
                continue;
            }
            let flip_rate = rs.iter().filter(|r| r.pred != r.clean_pred).count() as f64 / rs.len() as f64;
            for m in &ms {
                let vals: Vec<f64> = rs.iter().map(|r| (m.value)(r)).collect();
                let (lo, hi) = if random {
                    let draws: Vec<usize> = crate::io::plot::distinct(rs.iter().map(|r| r.condition));
                    let mut means: Vec<f64> = draws.iter().map(|&d| mean(&rs.iter().filter(|r| r.condition == d).map(|r| (m.value)(r)).collect::<Vec<_>>())).collect();
                    means.sort_by(|a, b| a.total_cmp(b));
                    let q = |f: f64| means[((means.len() - 1) as f64 * f).round() as usize];
                    (q(0.025), q(0.975))
                } else {
                    bootstrap_ci(vals.len(), seed, 1000, |idx| idx.iter().map(|&i| vals[i]).sum::<f64>() / idx.len() as f64)
                };
                out.push(CurvePoint { k, random, metric: m.name.clone(), mean: mean(&vals), ci_low: lo, ci_high: hi, flip_rate, n: rs.len() });
            }
        }
    }
    out
}

/// top_k.csv text: `k,set,metric,mean,ci_low,ci_high,flip_rate,n` (set: top | random).
pub fn curve_csv(points: &[CurvePoint]) -> String {
    let mut s = String::from("k,set,metric,mean,ci_low,ci_high,flip_rate,n\n");
    for p in points {
        s.push_str(&format!("{},{},{},{:.6},{:.6},{:.6},{:.6},{}\n", p.k, if p.random { "random" } else { "top" }, p.metric, p.mean, p.ci_low, p.ci_high, p.flip_rate, p.n));
    }
    s
}

/// The curve figure: one panel per metric, the top-k and random lines with their intervals
/// against k.
pub fn curve_chart(points: &[CurvePoint], ranking_label: &str, op: &str) -> LinePanels {
    let metrics: Vec<String> = crate::io::plot::distinct(points.iter().map(|p| p.metric.clone()));
    let finite = points.iter().flat_map(|p| [p.mean, p.ci_low, p.ci_high]).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = 0.05 * (hi - lo).max(1e-6);
    let k_max = points.iter().map(|p| p.k).max().unwrap_or(1) as f64;
    LinePanels {
        title: format!("Top-k components of `{ranking_label}` ({op}) against random sets like them"),
        lines: vec!["top k".into(), "random k".into()],
        panels: metrics
            .iter()
            .map(|m| {
                let line = |random: bool| points.iter().filter(|p| &p.metric == m && p.random == random).map(|p| Point { x: p.k as f64, y: p.mean, lo: p.ci_low, hi: p.ci_high }).collect();
                (m.replace('_', " "), vec![line(false), line(true)])
            })
            .collect(),
        x_range: (0.0, k_max),
        x_desc: "k (components intervened together)".into(),
        y_desc: "mean change (95% interval)".into(),
        y_range: (lo - pad, hi + pad),
        reference: Some(("no change".into(), 0.0)),
    }
}

/// The top-k sweep of `sets` by `method`, with its files written in `out`: experiments.jsonl (a
/// line per (set, prompt): kind `top_k`, k, draw (null for the top set), control, components,
/// op, and the label-sweep fields) and clean.jsonl appended per batch; then top_k.csv and
/// top_k.png. Returns the curve.
#[allow(clippy::too_many_arguments)]
pub fn top_k_sweep(
    engine: &dyn Engine,
    method: Method,
    prompts: &[Vec<u32>],
    labels: &LabelSet,
    projection: Option<&Projection>,
    gold: &[Option<usize>],
    sets: &[TopK],
    experiments: &[Vec<Condition>],
    op: AblateOp,
    ranking_label: &str,
    seed: u64,
    scope: Scope,
    batch_rows: usize,
    progress: &ProgressBar,
    out: &Path,
) -> Result<Vec<CurvePoint>> {
    let (clean, rows) = write_label_rows(label_runner(method), engine, prompts, labels, projection, gold, experiments, scope, batch_rows, progress, out, "experiments.jsonl", &|r| {
        let s = &sets[r.condition];
        json!({"kind": "top_k", "k": s.k, "draw": s.draw, "control": s.draw.is_some(), "components": s.components.iter().map(Component::name).collect::<Vec<_>>(), "op": op.name()})
    })?;
    curve_outputs(out, sets, &rows, &clean, labels, ranking_label, op, seed)
}

/// top_k.csv and top_k.png of a top-k sweep's rows, in `out`.
#[allow(clippy::too_many_arguments)]
pub fn curve_outputs(out: &Path, sets: &[TopK], rows: &[SteerRow], clean: &CleanValues, labels: &LabelSet, ranking_label: &str, op: AblateOp, seed: u64) -> Result<Vec<CurvePoint>> {
    let points = curve(sets, rows, clean, labels, ranking_label, seed);
    crate::io::write_atomic(&out.join("top_k.csv"), curve_csv(&points).as_bytes())?;
    line_panels(&out.join("top_k.png"), &curve_chart(&points, ranking_label, op.name()))?;
    Ok(points)
}
