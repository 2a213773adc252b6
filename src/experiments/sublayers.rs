//! Sublayer influence (`patchbay ablate --sublayers`, Wang et al.): each attention and MLP
//! sublayer's output (attn_out, mlp_out: what it adds to the residual) scaled by several alphas,
//! one experiment each, read as the change of the emotion representation (a [`Projection`] at a
//! late layer) and of the label logits. Every experiment resumes from the clean run at its layer.

use std::path::Path;

use indicatif::ProgressBar;
use serde_json::json;

use crate::data::labels::LabelSet;
use crate::engine::Engine;
use crate::experiments::ablate::label_runner;
use crate::experiments::label_files::Scope;
use crate::experiments::patch::Method;
use crate::experiments::steer::{CleanValues, Projection, SteerRow, one_each, write_label_rows};
use crate::intervene::Op;
use crate::intervene::spec::Condition;
use crate::io::plot::{LinePanels, Point, distinct, line_panels};
use crate::learn::metrics::bootstrap_ci;
use crate::sites::{Positions, Site, SiteKind, TokenScope};
use crate::{Error, Result};

/// `--sublayers`: `attn`, `mlp` or both (`attn,mlp`), as the sites attn_out / mlp_out.
pub fn parse_sublayers(spec: &str) -> Result<Vec<SiteKind>> {
    let mut out = Vec::new();
    for s in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind = match s {
            "attn" | "attn_out" => SiteKind::AttnOut,
            "mlp" | "mlp_out" => SiteKind::MlpOut,
            other => return Err(Error::input(format!("--sublayers: `{other}` is not attn or mlp (example: --sublayers attn,mlp)"))),
        };
        if out.contains(&kind) {
            return Err(Error::input(format!("--sublayers: `{s}` is listed twice")));
        }
        out.push(kind);
    }
    if out.is_empty() {
        return Err(Error::input("--sublayers: empty list (example: --sublayers attn,mlp)"));
    }
    Ok(out)
}

/// One condition per (layer, sublayer, alpha), layer-major: the sublayer's output scaled by
/// alpha at `positions`. Err on an empty, repeated or non-finite alpha.
pub fn sublayer_conditions(kinds: &[SiteKind], alphas: &[f32], positions: &Positions, n_layers: usize) -> Result<Vec<Condition>> {
    if alphas.is_empty() {
        return Err(Error::input("--sublayers needs --alphas A,... (example: --alphas 0,0.5,2)"));
    }
    if let Some(a) = alphas.iter().find(|a| !a.is_finite()) {
        return Err(Error::input(format!("--alphas: {a} is not a finite number")));
    }
    if let Some((i, a)) = alphas.iter().enumerate().find(|(i, a)| alphas[..*i].contains(a)) {
        return Err(Error::input(format!("--alphas: {a} is listed twice (entry {i})")));
    }
    let scope = TokenScope { prompt: Some(positions.clone()), generated: false };
    Ok((0..n_layers)
        .flat_map(|layer| kinds.iter().flat_map(move |&kind| alphas.iter().map(move |&alpha| (layer, kind, alpha))))
        .map(|(layer, kind, alpha)| Condition { direction: kind.short_name().into(), site: Site::new(layer, kind), beta: alpha, op: Op::Scale { alpha }, positions: scope.clone(), units: None })
        .collect())
}

/// One line of influence.csv: a sublayer scaled by alpha, over all prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct Influence {
    pub layer: usize,
    pub sublayer: String,
    pub alpha: f32,
    pub n: usize,
    /// Mean change of the projection, with its 95% bootstrap interval over prompts.
    pub mean_projection_change: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Share of prompts whose prediction changed.
    pub flip_rate: f64,
    /// Mean change of the clean prediction's label logit.
    pub mean_clean_pred_logit_change: f64,
}

/// The influence of each condition (`rows[..].condition` indexes `conditions`).
pub fn influence(conditions: &[Condition], rows: &[SteerRow], clean: &CleanValues, n_labels: usize, seed: u64) -> Result<Vec<Influence>> {
    let clean_proj = clean.projection.as_ref().ok_or_else(|| Error::input("sublayer influence reads a projection"))?;
    conditions
        .iter()
        .enumerate()
        .map(|(c, cond)| {
            let rs: Vec<&SteerRow> = rows.iter().filter(|r| r.condition == c).collect();
            let change: Vec<f64> = rs.iter().map(|r| r.projection.map_or(f64::NAN, |p| (p - clean_proj[r.index]) as f64)).collect();
            let n = rs.len();
            let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / n as f64;
            let (ci_low, ci_high) = bootstrap_ci(n, seed, 1000, |idx| idx.iter().map(|&i| change[i]).sum::<f64>() / idx.len() as f64);
            Ok(Influence {
                layer: cond.site.layer,
                sublayer: cond.site.kind.short_name().into(),
                alpha: cond.beta,
                n,
                mean_projection_change: mean(&mut change.iter().copied()),
                ci_low,
                ci_high,
                flip_rate: mean(&mut rs.iter().map(|r| (r.pred != r.clean_pred) as u8 as f64)),
                mean_clean_pred_logit_change: mean(&mut rs.iter().map(|r| (r.label_logits[r.clean_pred] - clean.label_logits[r.index * n_labels + r.clean_pred]) as f64)),
            })
        })
        .collect()
}

/// influence.csv text: `layer,sublayer,alpha,n,mean_projection_change,ci_low,ci_high,flip_rate,mean_clean_pred_logit_change`.
pub fn influence_csv(rows: &[Influence]) -> String {
    let mut s = String::from("layer,sublayer,alpha,n,mean_projection_change,ci_low,ci_high,flip_rate,mean_clean_pred_logit_change\n");
    for r in rows {
        s.push_str(&format!("{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6}\n", r.layer, r.sublayer, r.alpha, r.n, r.mean_projection_change, r.ci_low, r.ci_high, r.flip_rate, r.mean_clean_pred_logit_change));
    }
    s
}

/// The figure: one panel per alpha, the projection change against layer, a line per sublayer.
pub fn influence_chart(rows: &[Influence], site: Site) -> LinePanels {
    let sublayers: Vec<String> = distinct(rows.iter().map(|r| r.sublayer.clone()));
    let alphas: Vec<f32> = distinct(rows.iter().map(|r| r.alpha));
    let finite = rows.iter().flat_map(|r| [r.mean_projection_change, r.ci_low, r.ci_high]).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = 0.05 * (hi - lo).max(1e-6);
    LinePanels {
        title: format!("Sublayer influence on the projection at {site} (last token)"),
        lines: sublayers.clone(),
        panels: alphas
            .iter()
            .map(|&a| {
                let line = |s: &String| rows.iter().filter(|r| r.alpha == a && &r.sublayer == s).map(|r| Point { x: r.layer as f64, y: r.mean_projection_change, lo: r.ci_low, hi: r.ci_high }).collect();
                (format!("output scaled by {a}"), sublayers.iter().map(line).collect())
            })
            .collect(),
        x_range: (0.0, rows.iter().map(|r| r.layer).max().unwrap_or(0) as f64),
        x_desc: "layer of the scaled sublayer".into(),
        y_desc: "mean projection change (95% interval)".into(),
        y_range: (lo - pad, hi + pad),
        reference: Some(("no change".into(), 0.0)),
    }
}

/// The sweep of `conditions` (from [`sublayer_conditions`]) by `method`, read with `projection`,
/// with its files written in `out`: experiments.jsonl (a line per (condition, prompt): kind
/// `sublayer`, layer, site, alpha, projection and the label-sweep fields) and clean.jsonl
/// appended per batch; then influence.csv and influence.png.
#[allow(clippy::too_many_arguments)]
pub fn influence_sweep(
    engine: &dyn Engine,
    method: Method,
    prompts: &[Vec<u32>],
    labels: &LabelSet,
    projection: &Projection,
    gold: &[Option<usize>],
    conditions: &[Condition],
    seed: u64,
    scope: Scope,
    batch_rows: usize,
    progress: &ProgressBar,
    out: &Path,
) -> Result<Vec<Influence>> {
    let (clean, rows) = write_label_rows(label_runner(method), engine, prompts, labels, Some(projection), gold, &one_each(conditions), scope, batch_rows, progress, out, "experiments.jsonl", &|r| {
        let c = &conditions[r.condition];
        json!({"kind": "sublayer", "layer": c.site.layer, "site": c.site.kind.short_name(), "alpha": c.beta})
    })?;
    influence_outputs(out, conditions, &rows, &clean, labels, projection.site, seed)
}

/// influence.csv and influence.png of a sublayer sweep's rows (`conditions`: the sweep's, from
/// [`sublayer_conditions`]; `site`: the projection's), in `out`.
pub fn influence_outputs(out: &Path, conditions: &[Condition], rows: &[SteerRow], clean: &CleanValues, labels: &LabelSet, site: Site, seed: u64) -> Result<Vec<Influence>> {
    let rows = influence(conditions, rows, clean, labels.len(), seed)?;
    crate::io::write_atomic(&out.join("influence.csv"), influence_csv(&rows).as_bytes())?;
    line_panels(&out.join("influence.png"), &influence_chart(&rows, site))?;
    Ok(rows)
}
