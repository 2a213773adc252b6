//! The demo's report: report.md, rendered by the minijinja template report.md from the
//! contexts of the stages done so far, and summary.json (their numbers), both rewritten after
//! every stage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use minijinja::Environment;
use minijinja::value::Serde;
use serde_json::{Map, Value, json};

use super::pipeline::{APPRAISALS, SITES, SPLIT_FILTER, TEMPLATE};
use super::{DirectionKind, TowardLabel};
use crate::data::labels::LabelSet;
use crate::data::template::TokenStats;
use crate::experiments::ablate::{Component, SummaryRow as AblateSummary};
use crate::experiments::patch::SummaryRow;
use crate::experiments::top_k::CurvePoint;
use crate::experiments::probe::ResultRow;
use crate::experiments::score::Scores;
use crate::model::Model;
use crate::sites::Site;
use crate::{Error, Result};

/// The report's template.
const TEMPLATE_MD: &str = include_str!("report.md");

/// report.md and summary.json, rewritten after every stage.
pub(super) struct Report {
    out: PathBuf,
    /// The template's context: one entry per stage done (model, training and data; score,
    /// probe, patch, steer, timings).
    context: Map<String, Value>,
    summary: Map<String, Value>,
    pub(super) timings: Vec<(String, f64)>,
    stage_start: Instant,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::input(e.to_string())
}

impl Report {
    pub(super) fn new(out: &Path, started: Instant) -> Report {
        Report { out: out.to_path_buf(), context: Map::new(), summary: Map::new(), timings: Vec::new(), stage_start: started }
    }

    /// A stage done: its parts of the template's context, and its numbers under `key` in
    /// summary.json.
    pub(super) fn add(&mut self, context: Value, key: &str, numbers: Value) -> Result<()> {
        if let Value::Object(parts) = context {
            self.context.extend(parts);
        }
        self.summary.insert(key.to_string(), numbers);
        self.write()
    }

    /// Ends a stage: records its time.
    pub(super) fn lap(&mut self, stage: &str) {
        self.timings.push((stage.to_string(), self.stage_start.elapsed().as_secs_f64()));
        self.stage_start = Instant::now();
    }

    fn write(&mut self) -> Result<()> {
        self.summary.insert("timings_s".into(), json!(self.timings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>()));
        crate::io::write_atomic(&self.out.join("summary.json"), serde_json::to_string_pretty(&self.summary).map_err(err)?.as_bytes())?;
        crate::io::write_atomic(&self.out.join("report.md"), render(&self.context)?.as_bytes())
    }
}

/// report.md from the stages' contexts.
fn render(context: &Map<String, Value>) -> Result<String> {
    let mut env = Environment::new();
    env.add_template("report.md", TEMPLATE_MD).map_err(err)?;
    env.get_template("report.md").and_then(|t| t.render(Serde(context))).map_err(err)
}

/// The timings section: seconds per stage (the total last).
pub(super) fn timings_context(timings: &[(String, f64)]) -> Value {
    let rows: Vec<Vec<String>> = timings.iter().map(|(s, t)| vec![s.clone(), format!("{t:.1}")]).collect();
    json!({"threads": rayon::current_num_threads(), "rows": rows})
}

/// The model: its shapes (the object of `inspect --json`) and directory.
pub(super) fn model_context(model: &Model, model_dir: &Path) -> Value {
    let mut info = crate::experiments::inspect::model_info(model);
    info["dir"] = json!(model_dir.display().to_string());
    info
}

/// How the model was trained (its training.json), or null.
pub(super) fn training_context(model_dir: &Path) -> Value {
    let training: Option<Value> = std::fs::read(model_dir.join("training.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let Some(t) = training else { return Value::Null };
    let last = t["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
    json!({
        "script": text(&t["script"]),
        "torch": text(&t["versions"]["torch"]),
        "transformers": text(&t["versions"]["transformers"]),
        "tokenizers": text(&t["versions"]["tokenizers"]),
        "documents": t["training_documents"].to_string(),
        "corpus": text(&t["corpus"]),
        "document": text(&t["document"]),
        "epochs": t["epochs"].to_string(),
        "steps": t["steps"].to_string(),
        "batch_size": t["batch_size"].to_string(),
        "optimizer": text(&t["optimizer"]),
        "seed": t["seed"].to_string(),
        "threads": t["threads"].to_string(),
        "seconds": t["seconds"].to_string(),
        "tokenizer": text(&t["tokenizer"]),
        "loss": format!("{:.3}", last["train_loss"].as_f64().unwrap_or(f64::NAN)),
        "heldout_accuracy": format!("{:.3}", t["heldout_accuracy_bf16"].as_f64().unwrap_or(f64::NAN)),
    })
}

/// The data: the dataset file, the prompts and the labels.
pub(super) fn data_context(data_path: &Path, bundled_data: bool, rows_read: usize, n: usize, stats: &TokenStats, labels: &LabelSet) -> Value {
    json!({
        "path": data_path.display().to_string(),
        "rows_read": rows_read,
        "bundled": bundled_data,
        "n": n,
        "filter": SPLIT_FILTER,
        "template": TEMPLATE,
        "token_stats": stats.describe(),
        "labels": labels.names.iter().zip(&labels.tokens).map(|(n, t)| format!("{n} (`{t}`)")).collect::<Vec<_>>().join(", "),
    })
}

/// The scoring section: accuracy, and gold, predicted and recall per label.
pub(super) fn score_context(scores: &Scores, accuracy: f64, majority: f64, cmd: &str) -> Value {
    let conf = scores.confusion();
    let rows: Vec<Vec<String>> = scores
        .labels
        .names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let n: usize = conf[c].iter().sum();
            let predicted = scores.pred.iter().filter(|&&p| p == c).count();
            vec![name.clone(), n.to_string(), predicted.to_string(), if n > 0 { format!("{:.2}", conf[c][c] as f64 / n as f64) } else { "-".into() }]
        })
        .collect();
    json!({
        "accuracy": format!("{accuracy:.3}"),
        "n": scores.n(),
        "majority": format!("{majority:.3}"),
        "uniform": format!("{:.3}", 1.0 / scores.labels.len() as f64),
        "rows": rows,
        "command": cmd,
    })
}

/// The probing section's context and its numbers: accuracy per site and layer (position -1),
/// the best R² per appraisal.
pub(super) fn probe_context(rows: &[ResultRow], chance: f64, n_eval: usize, n_layers: usize, cmd: &str) -> (Value, Value) {
    let sites: Vec<&str> = SITES.split(',').collect();
    let acc = |site: &str, layer: usize| rows.iter().find(|r| r.metric == "accuracy" && r.site == site && r.layer == layer).map(|r| r.value);
    let table_rows: Vec<Vec<String>> = (0..n_layers)
        .map(|l| std::iter::once(l.to_string()).chain(sites.iter().map(|s| acc(s, l).map_or("-".into(), |v| format!("{v:.3}")))).collect())
        .collect();
    let mut header = vec!["layer"];
    header.extend(&sites);
    let r2_rows: Vec<Vec<String>> = APPRAISALS
        .iter()
        .filter_map(|a| {
            let best = rows.iter().filter(|r| r.metric == format!("r2:{a}")).max_by(|x, y| x.value.total_cmp(&y.value))?;
            let last = rows.iter().find(|r| r.metric == format!("r2:{a}") && r.site == "resid_post" && r.layer + 1 == n_layers)?;
            Some(vec![a.to_string(), format!("{:.2}", last.value), format!("{:.2} ({} layer {})", best.value, best.site, best.layer)])
        })
        .collect();
    let resid: Vec<f64> = (0..n_layers).map(|l| acc("resid_post", l).unwrap_or(f64::NAN)).collect();
    let section = json!({
        "n_eval": n_eval,
        "chance": format!("{chance:.3}"),
        "accuracy_header": header,
        "accuracy_rows": table_rows,
        "r2_rows": r2_rows,
        "command": cmd,
    });
    let numbers = json!({
        "chance": chance,
        "n_eval": n_eval,
        "resid_post": resid,
        "attn_out": (0..n_layers).map(|l| acc("attn_out", l)).collect::<Vec<_>>(),
        "mlp_out": (0..n_layers).map(|l| acc("mlp_out", l)).collect::<Vec<_>>(),
        "command": cmd,
    });
    (section, numbers)
}

/// The patching section's context and its numbers: flip rates by site and window centre.
pub(super) fn patch_context(summary: &[SummaryRow], n_pairs: usize, n_correct: usize, window: usize, cmd: &str) -> (Value, Value) {
    let mut centers: Vec<usize> = summary.iter().map(|r| r.center).collect();
    centers.sort_unstable();
    centers.dedup();
    let sites: Vec<&str> = SITES.split(',').collect();
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| std::iter::once(s.to_string()).chain(centers.iter().map(|&c| summary.iter().find(|r| r.site == *s && r.center == c).map_or("-".into(), |r| format!("{:.2}", r.flip_rate)))).collect())
        .collect();
    let header: Vec<String> = std::iter::once("site \\ centre layer".to_string()).chain(centers.iter().map(|c| c.to_string())).collect();
    let best = summary.iter().max_by(|x, y| x.flip_rate.total_cmp(&y.flip_rate));
    let best_text = best.map_or("-".to_string(), |b| format!("{} at centre layer {}: {:.2} [{:.2}, {:.2}]", b.site, b.center, b.flip_rate, b.flip_lo, b.flip_hi));
    let section = json!({"pairs": n_pairs, "correct": n_correct, "window": window, "best": best_text, "header": header, "rows": rows, "command": cmd});
    let numbers = json!({
        "pairs": n_pairs,
        "window": window,
        "best": best_text,
        "flip_rate": summary.iter().map(|r| json!({"site": r.site, "center": r.center, "n": r.n, "flip_rate": r.flip_rate, "mean_logit_diff": r.mean_logit_diff})).collect::<Vec<_>>(),
        "command": cmd,
    });
    (section, numbers)
}

/// The resid_post probe accuracies of the probe numbers, for the console.
pub(super) fn resid_accuracy(numbers: &Value) -> String {
    numbers["resid_post"].as_array().map_or(String::new(), |a| a.iter().map(|v| v.as_f64().map_or("-".into(), |v| format!("{v:.2}"))).collect::<Vec<_>>().join(" "))
}

/// The components section: the ranking's top, the head-ablation sweep's strongest heads and the
/// top-k curve of the projection change (top and random sets, with their intervals).
pub(super) fn components_context(emotion: &str, site: Site, n_prompts: usize, ranking: &[Component], heads: &[AblateSummary], curve: &[CurvePoint]) -> (Value, Value) {
    let mut by_head: Vec<(&AblateSummary, f64)> = heads.iter().filter_map(|r| r.mean_projection_change.map(|c| (r, c))).collect();
    by_head.sort_by(|a, b| a.1.total_cmp(&b.1));
    let strongest: Vec<Vec<String>> = by_head.iter().take(5).map(|(r, c)| vec![r.ablation.component.name(), format!("{c:.3}"), format!("{:.2}", r.flip_rate)]).collect();
    let point = |k: usize, random: bool| curve.iter().find(|p| p.k == k && p.random == random && p.metric == "projection_change");
    let ks: Vec<usize> = crate::io::plot::distinct(curve.iter().map(|p| p.k));
    let fmt = |p: Option<&CurvePoint>| p.map_or("-".to_string(), |p| format!("{:.3} [{:.3}, {:.3}]", p.mean, p.ci_low, p.ci_high));
    let flips = |p: Option<&CurvePoint>| p.map_or("-".to_string(), |p| format!("{:.2}", p.flip_rate));
    let rows: Vec<Vec<String>> = ks.iter().map(|&k| vec![k.to_string(), fmt(point(k, false)), flips(point(k, false)), fmt(point(k, true)), flips(point(k, true))]).collect();
    let k_max = ks.iter().copied().max().unwrap_or(0);
    let headline = match (point(k_max, false), point(k_max, true)) {
        (Some(t), Some(r)) => format!("zeroing the top {k_max} components moves the {emotion} projection by {:.3} [{:.3}, {:.3}]; random sets of the same size by {:.3} (draws' 95% range [{:.3}, {:.3}])", t.mean, t.ci_low, t.ci_high, r.mean, r.ci_low, r.ci_high),
        _ => "no curve".to_string(),
    };
    // What the curve says: the smallest k whose top set lowers the projection beyond every
    // random draw (its interval below theirs).
    let separated = ks.iter().copied().find(|&k| matches!((point(k, false), point(k, true)), (Some(t), Some(r)) if t.ci_high < r.ci_low));
    let reading = match separated {
        Some(k) => format!("From k = {k} on, zeroing the top components lowers the projection beyond every random set of the same size (the intervals do not overlap): a few components carry much of the direction, the long tail of the contributions plot."),
        None => format!("At no k up to {k_max} is the top set's effect separated from the random sets' (the intervals overlap): on this model and these prompts the direction is not carried by a few components, or the prompts are too few to tell."),
    };
    let section = json!({
        "emotion": emotion,
        "site": site.to_string(),
        "n_prompts": n_prompts,
        "top": ranking.iter().take(8).map(Component::name).collect::<Vec<_>>().join(", "),
        "strongest_heads": strongest,
        "curve": rows,
        "headline": headline,
        "reading": reading,
    });
    let numbers = json!({
        "emotion": emotion,
        "separated_from_k": separated,
        "site": site.to_string(),
        "headline": headline,
        "ranking_top": ranking.iter().take(8).map(Component::name).collect::<Vec<_>>(),
        "strongest_heads": by_head.iter().take(5).map(|(r, c)| json!({"head": r.ablation.component.name(), "mean_projection_change": c, "flip_rate": r.flip_rate})).collect::<Vec<_>>(),
        "curve": curve.iter().filter(|p| p.metric == "projection_change").map(|p| json!({"k": p.k, "set": if p.random { "random" } else { "top" }, "mean": p.mean, "ci_low": p.ci_low, "ci_high": p.ci_high, "flip_rate": p.flip_rate, "n": p.n})).collect::<Vec<_>>(),
    });
    (section, numbers)
}

/// Mean of a field of the steering rows of one direction kind and strength (over labels).
fn mean_over_labels(rows: &[TowardLabel], kind: DirectionKind, strength: f32, field: fn(&TowardLabel) -> f64) -> f64 {
    let sel: Vec<f64> = rows.iter().filter(|r| r.direction == kind && r.strength == strength && r.n > 0).map(field).collect();
    sel.iter().sum::<f64>() / sel.len().max(1) as f64
}

/// The steering section's context and its numbers: each direction's effect by strength.
pub(super) fn steer_context(rows: &[TowardLabel], strengths: &[f32], site: Site, mean_norm: f32, dir_norm: f32, n_prompts: usize, command: &str) -> (Value, Value) {
    let (cm, rnd) = (DirectionKind::ClassMean, DirectionKind::Random);
    let prob = |r: &TowardLabel| r.mean_prob;
    let hit = |r: &TowardLabel| r.hit_rate;
    let by_strength: Vec<Vec<String>> = strengths
        .iter()
        .map(|&s| {
            vec![
                format!("{s}"),
                format!("{:.3}", mean_over_labels(rows, cm, s, prob)),
                format!("{:.2}", mean_over_labels(rows, cm, s, hit)),
                format!("{:.3}", mean_over_labels(rows, rnd, s, prob)),
                format!("{:.2}", mean_over_labels(rows, rnd, s, hit)),
            ]
        })
        .collect();
    let top = strengths.iter().copied().fold(0.0f32, f32::max);
    // The headline strength: the weakest that makes the emotion the prediction half of the time.
    let mid = strengths.iter().copied().find(|&s| mean_over_labels(rows, cm, s, hit) >= 0.5).unwrap_or(top);
    let find = |label: &str, kind: DirectionKind, s: f32| rows.iter().find(|r| r.label == label && r.direction == kind && r.strength == s);
    let mut labels: Vec<&str> = Vec::new();
    for r in rows {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let per_emotion: Vec<Vec<String>> = labels
        .iter()
        .map(|&l| {
            let mut row = vec![l.to_string()];
            row.extend(strengths.iter().map(|&s| find(l, cm, s).map_or("-".into(), |r| format!("{:.3}", r.mean_prob))));
            row.push(find(l, rnd, top).map_or("-".into(), |r| format!("{:.3}", r.mean_prob)));
            row
        })
        .collect();
    let per_emotion_header: Vec<String> = std::iter::once("emotion".to_string()).chain(strengths.iter().map(|s| format!("strength {s}"))).chain(std::iter::once(format!("random, strength {top}"))).collect();
    let headline = format!(
        "strength {mid}: P(steered emotion) {:.3} -> {:.3}, predicted {:.0}% of the time (random direction of the same norm: {:.3}, {:.0}%)",
        mean_over_labels(rows, cm, 0.0, prob),
        mean_over_labels(rows, cm, mid, prob),
        100.0 * mean_over_labels(rows, cm, mid, hit),
        mean_over_labels(rows, rnd, mid, prob),
        100.0 * mean_over_labels(rows, rnd, mid, hit),
    );
    let section = json!({
        "layer": site.layer,
        "site": site.to_string(),
        "n_prompts": n_prompts,
        "command": command,
        "direction_norm": format!("{dir_norm:.2}"),
        "residual_norm": format!("{mean_norm:.2}"),
        "by_strength": by_strength,
        "top": format!("{top}"),
        "per_emotion_header": per_emotion_header,
        "per_emotion": per_emotion,
        "headline": headline,
    });
    let numbers = json!({
        "site": site.to_string(),
        "headline": headline,
        "by_strength": strengths.iter().map(|&s| json!({"strength": s, "class_mean_prob": mean_over_labels(rows, cm, s, prob), "class_mean_hit": mean_over_labels(rows, cm, s, hit), "random_prob": mean_over_labels(rows, rnd, s, prob), "random_hit": mean_over_labels(rows, rnd, s, hit)})).collect::<Vec<_>>(),
        "rows": rows,
    });
    (section, numbers)
}

