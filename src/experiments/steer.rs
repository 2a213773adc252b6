//! Steering sweeps read through a label set (`patchbay steer --mode labels`; `--mode generate`
//! is generation, `experiments::generate`, judged by `experiments::judge`): every prompt under
//! every condition (layer, direction, beta) of `intervene::spec`, scored by its label logits at
//! the last token, resumed from the prompt's clean run (DESIGN.md section 1): a condition at
//! layer L recomputes layers L.. from the first steered position, and all the conditions of a
//! layer are segments of one batched call.
//!
//! Also the bridge from the grammar to generation ([`step_intervention`]) and the same-norm
//! random control ([`random_controls`]).

use std::path::Path;

use indicatif::ProgressBar;
use serde_json::json;

use std::collections::BTreeMap;

use crate::engine::{Engine, RunOutput, RunRequest, Segment};
use crate::experiments::generate::StepIntervention;
use crate::experiments::judge::{AccuracyChart, ChartLine, GenerationRow, Judged, SummaryRow as JudgeSummary, accuracy_chart};
use crate::experiments::patch::chunk_by_rows;
use crate::data::labels::LabelSet;
use crate::intervene::{Capture, Op, dot, norm};
use crate::intervene::spec::Condition;
use crate::model::config::ModelConfig;
use crate::io::plot::{LinePanels, Point, distinct};
use crate::logits::argmax;
use crate::experiments::label_files::Scope;
use crate::io::JsonlFile;
use crate::rng::{gaussian, splitmix64};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// The step intervention of a condition for `experiments::generate`: its site and op on its
/// prompt positions and/or the generated tokens.
pub fn step_intervention(c: &Condition) -> StepIntervention {
    StepIntervention { site: c.site, units: c.units.clone(), op: c.op.clone(), scope: c.positions.clone() }
}

/// A Gaussian random vector with the norm of `v` (seeded).
pub fn random_like(v: &[f32], seed: u64) -> Vec<f32> {
    let r: Vec<f32> = (0..v.len()).map(|i| gaussian(seed, 0, i as u64)).collect();
    let scale = norm(v) / norm(&r).max(f32::MIN_POSITIVE);
    r.into_iter().map(|x| x * scale).collect()
}

/// The direction name of the random control of `direction`: `random`, or `random:<direction>`
/// when the sweep steers along several directions.
fn control_name(direction: &str, several: bool) -> String {
    if several { format!("random:{direction}") } else { "random".into() }
}

/// The same-norm random control of every steering (`Op::Add`) condition: the same site, beta
/// and positions with v replaced by a Gaussian vector of v's norm, one per (direction, layer)
/// seeded by `seed` and its index among them (so all betas of a layer share it). Conditions of
/// other ops have no control.
pub fn random_controls(conditions: &[Condition], seed: u64) -> Vec<Condition> {
    let add = |c: &&Condition| matches!(c.op, Op::Add { .. });
    let directions = distinct(conditions.iter().filter(add).map(|c| c.direction.clone()));
    let keys = distinct(conditions.iter().filter(add).map(|c| (c.direction.clone(), c.site)));
    conditions
        .iter()
        .filter(add)
        .map(|c| {
            let Op::Add { beta, v, normalize } = &c.op else { unreachable!("filtered on Add") };
            let k = keys.iter().position(|key| key.0 == c.direction && key.1 == c.site).unwrap_or(0);
            let r = random_like(v, splitmix64(seed ^ splitmix64(k as u64)));
            Condition { direction: control_name(&c.direction, directions.len() > 1), op: Op::Add { beta: *beta, v: r, normalize: *normalize }, ..c.clone() }
        })
        .collect()
}

/// Err when there are no label tokens or one is outside the vocabulary.
pub(crate) fn check_label_tokens(label_tokens: &[u32], vocab_size: usize) -> Result<()> {
    if label_tokens.is_empty() {
        return Err(Error::input("no label tokens"));
    }
    if let Some(&t) = label_tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(Error::input(format!("label token {t} is out of range (vocabulary of {vocab_size})")));
    }
    Ok(())
}

/// One prompt in one experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct SteerRow {
    /// Prompt index.
    pub index: usize,
    /// Index into the experiments.
    pub condition: usize,
    /// Label logits at the last token, in label order.
    pub label_logits: Vec<f32>,
    /// Predicted label (index), and the clean run's.
    pub pred: usize,
    pub clean_pred: usize,
    /// The [`Projection`] at the last token, when the sweep reads one.
    pub projection: Option<f32>,
}

/// A residual site read along a direction at each prompt's last token: the "emotion
/// representation" of a sweep (e.g. resid_post of the last layer along the emotion's direction).
#[derive(Clone, Debug)]
pub struct Projection {
    pub site: Site,
    /// `[d_model]`, unit norm.
    pub direction: Vec<f32>,
}

impl Projection {
    /// Err unless `site` is a residual site of the model and `direction` has its width.
    pub fn new(site: Site, direction: Vec<f32>, cfg: &ModelConfig) -> Result<Projection> {
        site.check(cfg)?;
        if !matches!(site.kind, SiteKind::ResidPre | SiteKind::ResidMid | SiteKind::ResidPost) {
            return Err(Error::input(format!("projection site {site}: expected resid_pre, resid_mid or resid_post")));
        }
        if direction.len() != cfg.d_model {
            return Err(Error::input(format!("projection direction: {} values, the residual has {}", direction.len(), cfg.d_model)));
        }
        let n = norm(&direction);
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::input("projection direction: zero or non-finite norm"));
        }
        Ok(Projection { site, direction: direction.iter().map(|x| x / n).collect() })
    }

    /// The capture a run needs for it (the last token).
    pub(crate) fn capture(&self) -> Capture {
        Capture { site: self.site, positions: Positions::List(vec![-1]) }
    }

    /// Each row's projection, from the run's capture (request order: the projection's is first).
    pub(crate) fn read(&self, out: &RunOutput) -> Vec<f32> {
        out.captured[0].data.chunks(self.direction.len()).map(|x| dot(x, &self.direction)).collect()
    }
}

/// What a label sweep reads from every run: the label logits at the last token and, optionally,
/// a projection there.
#[derive(Clone, Copy)]
pub struct Readout<'a> {
    pub label_tokens: &'a [u32],
    pub projection: Option<&'a Projection>,
}

impl Readout<'_> {
    /// The captures of a run whose blocks start at `start` (none when the projection's site is
    /// computed before: an experiment starting later cannot change it).
    fn captures(&self, start: usize) -> Vec<Capture> {
        self.projection.filter(|p| p.site.layer >= start).map(Projection::capture).into_iter().collect()
    }
}

/// One experiment of a label sweep: conditions applied together in one run (one steering
/// condition or component; the top-k components of a ranking, at several layers). Its run
/// starts at the earliest of their layers (a final-norm site: the last block's output).
pub fn start_layer(experiment: &[Condition], cfg: &ModelConfig) -> usize {
    experiment.iter().map(|c| c.site.layer.min(cfg.n_layers - 1)).min().unwrap_or(0)
}

/// Label logits (and projections) of every prompt clean (`on_clean(prompt, logits, projection)`,
/// in prompt order) and in every experiment (`on_rows`, one call per batched forward; prompt
/// chunk, then start layer, then experiment, then prompt; experiments whose ops are all the
/// identity, beta 0, first: their rows are the clean values). Prompts are taken in chunks of at
/// most `batch_rows` tokens (their clean runs are kept while the chunk's experiments run),
/// segments in calls of at most `batch_rows` rows. `progress` counts prompt-experiments.
#[allow(clippy::too_many_arguments)]
pub fn steer_labels(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    readout: Readout,
    experiments: &[Vec<Condition>],
    batch_rows: usize,
    progress: &ProgressBar,
    on_clean: &mut dyn FnMut(usize, &[f32], Option<f32>) -> Result<()>,
    on_rows: &mut dyn FnMut(&[SteerRow]) -> Result<()>,
) -> Result<()> {
    let cfg = engine.config();
    check_label_tokens(readout.label_tokens, cfg.vocab_size)?;
    let k = readout.label_tokens.len();
    // Per experiment and prompt, the first steered position (each condition's intervention
    // checks its positions name no generated tokens).
    let mut p0: Vec<Vec<usize>> = Vec::with_capacity(experiments.len());
    for (e, conds) in experiments.iter().enumerate() {
        if conds.is_empty() {
            return Err(Error::input(format!("experiment {e}: no intervention")));
        }
        let mut firsts = vec![usize::MAX; prompts.len()];
        for c in conds {
            let iv = c.intervention(None)?;
            c.site.check(cfg)?;
            for (i, p) in prompts.iter().enumerate() {
                let pos = iv.positions.resolve(p.len()).map_err(|e| Error::input(format!("{} at {}: prompt {i}: {e}", c.direction, c.site)))?;
                firsts[i] = firsts[i].min(pos.into_iter().min().unwrap_or(0));
            }
        }
        p0.push(firsts);
    }
    let mut by_start: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (e, conds) in experiments.iter().enumerate() {
        by_start.entry(start_layer(conds, cfg)).or_default().push(e);
    }
    let last = Positions::List(vec![-1]);
    let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(readout.label_tokens), ..Default::default() };
    let clean_captures = readout.captures(0);
    let all: Vec<usize> = (0..prompts.len()).collect();
    for chunk in chunk_by_rows(&all, |&i| prompts[i].len(), batch_rows) {
        let chunk_prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let (runs, out) = engine.run_clean(&chunk_prompts, &RunRequest { captures: &clean_captures, ..req }).map_err(|e| e.in_batch(|i| chunk[i]))?;
        if out.logits.len() != chunk.len() * k {
            return Err(Error::input(format!("engine returned {} label logits for {} prompts", out.logits.len(), chunk.len())));
        }
        let clean_proj: Vec<Option<f32>> = match readout.projection {
            Some(p) => p.read(&out).into_iter().map(Some).collect(),
            None => vec![None; chunk.len()],
        };
        for (j, (&i, logits)) in chunk.iter().zip(out.logits.chunks(k)).enumerate() {
            on_clean(i, logits, clean_proj[j])?;
        }
        let clean_pred: Vec<usize> = out.logits.chunks(k).map(argmax).collect();
        for (&start, exps) in &by_start {
            // Experiments that change nothing (beta 0) are the clean run: their rows are the
            // clean values, bit for bit on every engine, not a recomputation.
            let (identity, steered): (Vec<usize>, Vec<usize>) = exps.iter().partition(|&&e| experiments[e].iter().all(|c| c.op.is_identity()));
            if !identity.is_empty() {
                let rows: Vec<SteerRow> = identity
                    .iter()
                    .flat_map(|&e| (0..chunk.len()).map(move |j| (e, j)))
                    .map(|(e, j)| SteerRow { index: chunk[j], condition: e, label_logits: out.logits[j * k..(j + 1) * k].to_vec(), pred: clean_pred[j], clean_pred: clean_pred[j], projection: clean_proj[j] })
                    .collect();
                on_rows(&rows)?;
                progress.inc(rows.len() as u64);
            }
            let captures = readout.captures(start);
            // (experiment, position in chunk), experiment-major.
            let items: Vec<(usize, usize)> = steered.iter().flat_map(|&e| (0..chunk.len()).map(move |j| (e, j))).collect();
            let rows_of = |&(e, j): &(usize, usize)| prompts[chunk[j]].len() - p0[e][chunk[j]];
            for batch in chunk_by_rows(&items, rows_of, batch_rows) {
                let segs: Vec<Segment> = batch.iter().map(|&(e, j)| Segment { clean: &runs[j], p0: p0[e][chunk[j]] }).collect();
                // One intervention per condition on its experiment's segments (items are
                // experiment-major), so operands (a [w, w] projector) are copied once per call,
                // not per segment.
                let mut ivs = Vec::new();
                let mut s = 0;
                for run in batch.chunk_by(|a, b| a.0 == b.0) {
                    for c in &experiments[run[0].0] {
                        ivs.push(c.intervention(Some((s..s + run.len()).collect()))?);
                    }
                    s += run.len();
                }
                let out = engine.run_segments(start, &segs, &RunRequest { interventions: &ivs, captures: &captures, ..req }).map_err(|e| e.in_batch(|s| chunk[batch[s].1]))?;
                if out.logits.len() != batch.len() * k {
                    return Err(Error::input(format!("engine returned {} label logits for {} segments", out.logits.len(), batch.len())));
                }
                let proj: Vec<Option<f32>> = match readout.projection {
                    Some(p) if !captures.is_empty() => p.read(&out).into_iter().map(Some).collect(),
                    _ => batch.iter().map(|&(_, j)| clean_proj[j]).collect(),
                };
                let rows: Vec<SteerRow> = batch
                    .iter()
                    .zip(out.logits.chunks(k))
                    .zip(proj)
                    .map(|((&(e, j), logits), projection)| SteerRow { index: chunk[j], condition: e, label_logits: logits.to_vec(), pred: argmax(logits), clean_pred: clean_pred[j], projection })
                    .collect();
                on_rows(&rows)?;
                progress.inc(batch.len() as u64);
            }
        }
    }
    Ok(())
}

/// The engine pass of a label sweep: [`steer_labels`] (resumed) or
/// `experiments::ablate::naive_labels` (a full forward per experiment), same arguments, same rows.
pub type LabelRunner = fn(&dyn Engine, &[Vec<u32>], Readout, &[Vec<Condition>], usize, &ProgressBar, &mut dyn FnMut(usize, &[f32], Option<f32>) -> Result<()>, &mut dyn FnMut(&[SteerRow]) -> Result<()>) -> Result<()>;

/// Each condition as an experiment of its own.
pub fn one_each(conditions: &[Condition]) -> Vec<Vec<Condition>> {
    conditions.iter().map(|c| vec![c.clone()]).collect()
}

/// The clean values of a label sweep: label logits `[n_prompts, n_labels]` and, when the sweep
/// reads one, the projection `[n_prompts]`.
pub struct CleanValues {
    pub label_logits: Vec<f32>,
    pub projection: Option<Vec<f32>>,
}

/// Runs `run` on the prompts of `scope` and appends its rows to files in `out` as batches
/// finish: clean.jsonl (`index`, `label_logits`, `pred`, and `projection` when the sweep reads
/// one) and `rows_file`, each row the object `fields(row)` (the sweep's own fields) with
/// `experiment` (its index), `index`, `label_logits`, `pred`, `clean_pred` (and `projection`);
/// both with `gold` where `gold` knows it. With rows kept from an earlier run (`scope.kept`) the
/// files are appended to and a kept row or clean run is not written again. Returns the clean
/// values and the rows (kept and new).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_label_rows(
    run: LabelRunner,
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    labels: &LabelSet,
    projection: Option<&Projection>,
    gold: &[Option<usize>],
    experiments: &[Vec<Condition>],
    scope: Scope,
    batch_rows: usize,
    progress: &ProgressBar,
    out: &Path,
    rows_file: &str,
    fields: &dyn Fn(&SteerRow) -> serde_json::Value,
) -> Result<(CleanValues, Vec<SteerRow>)> {
    let k = labels.len();
    let names = &labels.names;
    let with_common = |mut o: serde_json::Value, i: usize, projection: Option<f32>| {
        if let Some(g) = gold[i] {
            o["gold"] = json!(names[g]);
        }
        if let Some(p) = projection {
            o["projection"] = json!(p);
        }
        o
    };
    let Scope { todo, kept } = scope;
    let todo: Vec<usize> = todo.unwrap_or_else(|| (0..prompts.len()).collect());
    let resumed = !kept.clean.is_empty() || !kept.rows.is_empty();
    let (mut rows_out, mut clean_file) = match resumed {
        true => (JsonlFile::append(out.join(rows_file)), JsonlFile::append(out.join("clean.jsonl"))),
        false => (JsonlFile::new(out.join(rows_file)), JsonlFile::new(out.join("clean.jsonl"))),
    };
    let mut clean = kept.clean_values(prompts.len(), k, projection.is_some());
    let mut rows: Vec<SteerRow> = kept.rows;
    let run_prompts: Vec<Vec<u32>> = todo.iter().map(|&i| prompts[i].clone()).collect();
    run(
        engine,
        &run_prompts,
        Readout { label_tokens: &labels.token_ids, projection },
        experiments,
        batch_rows,
        progress,
        &mut |j, logits, p| {
            let i = todo[j];
            if kept.clean.contains_key(&i) {
                return Ok(());
            }
            clean.label_logits[i * k..(i + 1) * k].copy_from_slice(logits);
            if let (Some(all), Some(p)) = (clean.projection.as_mut(), p) {
                all[i] = p;
            }
            clean_file.write(&[with_common(json!({"index": i, "label_logits": logits, "pred": names[argmax(logits)]}), i, p)])
        },
        &mut |batch| {
            let batch: Vec<SteerRow> = batch.iter().map(|r| SteerRow { index: todo[r.index], ..r.clone() }).filter(|r| !kept.done.contains(&(r.condition, r.index))).collect();
            let lines: Vec<serde_json::Value> = batch
                .iter()
                .map(|r| {
                    let mut o = fields(r);
                    for (key, v) in [("experiment", json!(r.condition)), ("index", json!(r.index)), ("label_logits", json!(r.label_logits)), ("pred", json!(names[r.pred])), ("clean_pred", json!(names[r.clean_pred]))] {
                        o[key] = v;
                    }
                    with_common(o, r.index, r.projection)
                })
                .collect();
            rows.extend(batch);
            if lines.is_empty() { Ok(()) } else { rows_out.write(&lines) }
        },
    )?;
    Ok((clean, rows))
}

/// A label sweep's results: the clean label logits `[n_prompts, n_labels]`, every steered row,
/// the summary per condition.
pub struct LabelSweep {
    pub clean: Vec<f32>,
    pub rows: Vec<SteerRow>,
    pub summary: Vec<SummaryRow>,
}

/// [`steer_labels`] with its files written in `out` (the contract of `patchbay steer --mode
/// labels`): scores.jsonl (a line per prompt and condition) and clean.jsonl, appended as
/// batches finish; then summary.csv and shares.png. `gold`: each prompt's gold label, written
/// when known.
#[allow(clippy::too_many_arguments)]
pub fn label_sweep(engine: &dyn Engine, prompts: &[Vec<u32>], labels: &LabelSet, gold: &[Option<usize>], conditions: &[Condition], batch_rows: usize, progress: &ProgressBar, out: &Path) -> Result<LabelSweep> {
    let (clean, rows) = write_label_rows(steer_labels, engine, prompts, labels, None, gold, &one_each(conditions), Scope::default(), batch_rows, progress, out, "scores.jsonl", &|r| {
        let c = &conditions[r.condition];
        json!({"layer": c.site.layer, "site": c.site.kind.short_name(), "direction": c.direction, "beta": c.beta})
    })?;
    let (k, names) = (labels.len(), &labels.names);
    let clean = clean.label_logits;
    let summary = summarize(conditions, &rows, &clean, k);
    crate::io::write_atomic(&out.join("summary.csv"), summary_csv(&summary, names).as_bytes())?;
    if !summary.is_empty() {
        crate::io::plot::line_panels(&out.join("shares.png"), &shares_chart(&summary, names))?;
    }
    Ok(LabelSweep { clean, rows, summary })
}

/// One line of the summary: a condition over all prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub layer: usize,
    pub site: String,
    pub direction: String,
    pub beta: f32,
    pub n: usize,
    /// Share of the prompts predicted as each label, in label order.
    pub shares: Vec<f64>,
    /// Mean over prompts of (steered - clean) label logit, per label.
    pub mean_logit_change: Vec<f64>,
}

/// Aggregates rows per condition (condition order); `clean` is `[n_prompts, n_labels]`.
pub fn summarize(conditions: &[Condition], rows: &[SteerRow], clean: &[f32], n_labels: usize) -> Vec<SummaryRow> {
    let mut acc: Vec<(usize, Vec<f64>, Vec<f64>)> = vec![(0, vec![0.0; n_labels], vec![0.0; n_labels]); conditions.len()];
    for r in rows {
        let a = &mut acc[r.condition];
        a.0 += 1;
        a.1[r.pred] += 1.0;
        let c = &clean[r.index * n_labels..(r.index + 1) * n_labels];
        a.2.iter_mut().zip(r.label_logits.iter().zip(c)).for_each(|(m, (s, c))| *m += (s - c) as f64);
    }
    conditions
        .iter()
        .zip(acc)
        .map(|(c, (n, shares, change))| {
            let per = |v: Vec<f64>| v.into_iter().map(|x| if n == 0 { f64::NAN } else { x / n as f64 }).collect();
            SummaryRow { layer: c.site.layer, site: c.site.kind.short_name().into(), direction: c.direction.clone(), beta: c.beta, n, shares: per(shares), mean_logit_change: per(change) }
        })
        .collect()
}

/// summary.csv text: `layer,site,direction,beta,n,share:<label>...,mean_logit_change:<label>...`.
pub fn summary_csv(rows: &[SummaryRow], labels: &[String]) -> String {
    let mut s = String::from("layer,site,direction,beta,n");
    for prefix in ["share", "mean_logit_change"] {
        labels.iter().for_each(|l| s.push_str(&format!(",{prefix}:{l}")));
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!("{},{},{},{},{}", r.layer, r.site, r.direction, r.beta, r.n));
        r.shares.iter().chain(&r.mean_logit_change).for_each(|v| s.push_str(&format!(",{v:.6}")));
        s.push('\n');
    }
    s
}

/// The study's figure: the share of prompts predicted as each label (one line per label)
/// against beta, one panel per (layer, site, direction), by layer.
pub fn shares_chart(rows: &[SummaryRow], labels: &[String]) -> LinePanels {
    let mut panels_keys = distinct(rows.iter().map(|r| (r.layer, r.site.clone(), r.direction.clone())));
    // Each layer's directions side by side (a stable sort keeps their order).
    panels_keys.sort_by_key(|k| k.0);
    let betas: Vec<f64> = rows.iter().map(|r| r.beta as f64).collect();
    let lo = betas.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let hi = betas.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(0.0);
    let panels = panels_keys
        .iter()
        .map(|(layer, site, direction)| {
            let mut mine: Vec<&SummaryRow> = rows.iter().filter(|r| r.layer == *layer && &r.site == site && &r.direction == direction).collect();
            mine.sort_by(|a, b| a.beta.total_cmp(&b.beta));
            let lines = (0..labels.len()).map(|l| mine.iter().map(|r| Point { x: r.beta as f64, y: r.shares[l], lo: f64::NAN, hi: f64::NAN }).collect()).collect();
            (format!("{site} layer {layer}: {direction}"), lines)
        })
        .collect();
    LinePanels {
        title: "Predicted label by steering strength".into(),
        lines: labels.to_vec(),
        panels,
        x_range: (lo, hi),
        x_desc: "beta".into(),
        y_desc: "share of prompts predicted".into(),
        y_range: (0.0, 1.0),
        reference: None,
    }
}

/// The conditions of steered generation (`patchbay steer --mode generate`), as its judged rows
/// index them: the clean pass, the steered passes, their same-norm random controls.
pub const GENERATION_CONDITIONS: [&str; 3] = ["clean", "steered", "random"];

/// The rows of the expression summary: every judged generation keyed by the label it is
/// measured against (its `direction` field becomes that label's name): a steered or control
/// row by its target, a clean row (no target) once per label of `targets`, since the clean
/// text is every direction's baseline.
pub fn expression_rows(judged: &[Judged], targets: &[usize], labels: &[String]) -> Vec<Judged> {
    let keyed = |j: &Judged, t: usize| Judged { target: Some(t), row: GenerationRow { direction: Some(labels[t].clone()), ..j.row.clone() }, ..j.clone() };
    judged.iter().flat_map(|j| match j.target {
        Some(t) => vec![keyed(j, t)],
        None => targets.iter().map(|&t| keyed(j, t)).collect(),
    })
    .collect()
}

/// Expression accuracy against beta, one panel per target: the steered passes, their random
/// controls, and the clean accuracy (flat), from the summary of [`expression_rows`].
pub fn expression_chart(summary: &[JudgeSummary]) -> LinePanels {
    let [clean, steered, random] = GENERATION_CONDITIONS;
    accuracy_chart(
        summary,
        &AccuracyChart {
            title: "Expression accuracy of steered generation (judged)",
            caption: "steered toward",
            baseline: clean,
            lines: vec![(ChartLine::Curve(steered), "steered"), (ChartLine::Curve(random), "random direction"), (ChartLine::Flat(clean), "clean")],
            x_desc: "beta",
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sites::TokenScope;
    use crate::sites::{Site, SiteKind};

    fn cond(direction: &str, layer: usize, beta: f32, positions: &str) -> Condition {
        Condition {
            direction: direction.into(),
            site: Site::new(layer, SiteKind::ResidPost),
            beta,
            op: Op::Add { beta, v: vec![3.0, 4.0], normalize: false },
            positions: TokenScope::parse(positions).unwrap(),
            units: None,
        }
    }

    #[test]
    fn step_interventions_carry_the_scope() {
        let s = step_intervention(&cond("joy", 1, 2.0, "last:2+generated"));
        assert_eq!(s.site, Site::new(1, SiteKind::ResidPost));
        assert_eq!(s.scope, TokenScope { prompt: Some(Positions::List(vec![-1, -2])), generated: true });
        assert_eq!(s.op, Op::Add { beta: 2.0, v: vec![3.0, 4.0], normalize: false });
        assert_eq!(step_intervention(&cond("joy", 0, 1.0, "generated")).scope, TokenScope::generated());
        assert_eq!(step_intervention(&cond("joy", 0, 1.0, "all+generated")).scope, TokenScope::all());
        assert_eq!(step_intervention(&cond("joy", 0, 1.0, "all")).scope, TokenScope { prompt: Some(Positions::All), generated: false });
        // Without generation, `generated` is an error naming the condition.
        let e = cond("joy", 0, 1.0, "last+generated").intervention(None).unwrap_err().to_string();
        assert!(e.contains("joy") && e.contains("generated"), "{e}");
    }

    #[test]
    fn random_controls_keep_norm_and_share_a_layer() {
        let cs = vec![cond("joy", 0, 1.0, "all"), cond("joy", 0, 2.0, "all"), cond("joy", 1, 1.0, "all")];
        let r = random_controls(&cs, 7);
        assert_eq!(r.len(), 3);
        let v = |c: &Condition| match &c.op {
            Op::Add { v, .. } => v.clone(),
            _ => panic!(),
        };
        for c in &r {
            assert_eq!(c.direction, "random");
            assert!((crate::intervene::norm(&v(c)) - 5.0).abs() < 1e-5);
        }
        assert_eq!(v(&r[0]), v(&r[1]), "the betas of a layer share one random vector");
        assert_ne!(v(&r[0]), v(&r[2]), "layers get their own");
        assert_ne!(v(&r[0]), vec![3.0, 4.0]);
        assert_eq!(random_controls(&cs, 7)[0].op, r[0].op, "seeded");
        let two = random_controls(&[cond("joy", 0, 1.0, "all"), cond("fear", 0, 1.0, "all")], 7);
        assert_eq!(two[1].direction, "random:fear");
    }
}
