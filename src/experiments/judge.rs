//! Judging generated emotion locally (no external service): the label set scored at the end of
//! a judging prompt that embeds each generated text (`score`'s label scoring, on the same or
//! another local model) or a saved probe applied to the judging prompt's activations
//! ([`ProbeJudge`]), and the summary a steering study reports: per condition (a generations
//! file) and beta, the share of each judged label and, where each row names the emotion it was
//! steered toward (`target`), the expression accuracy.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde_json::Value;

use crate::engine::{Engine, RunRequest};
use crate::intervene::Capture;
use crate::io::plot::{LinePanels, Point, distinct};
use crate::io::tensorfile::TensorFile;
use crate::model::Model;
use crate::sites::{Positions, Site};
use crate::{Error, Result};

/// One row of a `patchbay generate` / `steer` generations.jsonl file, as the judge reads it.
#[derive(Clone, Debug)]
pub struct GenerationRow {
    pub index: usize,
    /// The generated text.
    pub text: String,
    /// The pass's strength (None: a clean run).
    pub beta: Option<f64>,
    /// The pass's direction (`random...` for a control; None: a clean run).
    pub direction: Option<String>,
    /// The label the generation was steered toward, when the row names it.
    pub target: Option<String>,
}

/// Reads a generations.jsonl file. Errors name the file and line: not JSON, no `index`, no
/// `text` string.
pub fn read_generations(path: &Path) -> Result<Vec<GenerationRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| Error::file(path, format!("line {}: {what} (expected generate's rows: index, text, ...)", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let index = v.get("index").and_then(Value::as_u64).ok_or_else(|| bad("no `index`"))? as usize;
        let text = v.get("text").and_then(Value::as_str).ok_or_else(|| bad("no `text` string"))?.to_string();
        let beta = v.get("beta").and_then(Value::as_f64);
        let direction = v.get("direction").and_then(Value::as_str).map(str::to_string);
        let target = v.get("target").and_then(Value::as_str).map(str::to_string);
        rows.push(GenerationRow { index, text, beta, direction, target });
    }
    if rows.is_empty() {
        return Err(Error::file(path, "no generations"));
    }
    Ok(rows)
}

/// A judged generation: its condition (index into the conditions), its row, the target's label
/// index when known, and the judged label.
#[derive(Clone, Debug)]
pub struct Judged {
    pub condition: usize,
    pub row: GenerationRow,
    pub target: Option<usize>,
    pub pred: usize,
}

/// One line of the summary: a condition's direction at one beta.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SummaryRow {
    pub condition: String,
    pub direction: Option<String>,
    pub beta: Option<f64>,
    pub n: usize,
    /// Rows whose generated text is empty (judged all the same: the judging prompt without text).
    pub n_empty: usize,
    /// Share of each judged label, in label order.
    pub shares: Vec<f64>,
    /// Rows with a target, and the share judged as their target.
    pub n_target: usize,
    pub accuracy: Option<f64>,
}

/// The summary per (condition, direction, beta), in the order they first appear.
pub fn summarize(conditions: &[String], judged: &[Judged], n_labels: usize) -> Vec<SummaryRow> {
    let key = |j: &Judged| (j.condition, j.row.direction.clone(), j.row.beta.map(f64::to_bits));
    let mut keys: Vec<(usize, Option<String>, Option<u64>)> = Vec::new();
    for j in judged {
        if !keys.contains(&key(j)) {
            keys.push(key(j));
        }
    }
    keys.into_iter()
        .map(|k| {
            let rows: Vec<&Judged> = judged.iter().filter(|j| key(j) == k).collect();
            let (c, direction, beta) = k;
            let n = rows.len();
            let shares = (0..n_labels).map(|l| rows.iter().filter(|j| j.pred == l).count() as f64 / n as f64).collect();
            let with_target: Vec<&&Judged> = rows.iter().filter(|j| j.target.is_some()).collect();
            let hits = with_target.iter().filter(|j| j.target == Some(j.pred)).count();
            SummaryRow {
                condition: conditions[c].clone(),
                direction,
                beta: beta.map(f64::from_bits),
                n,
                n_empty: rows.iter().filter(|j| j.row.text.trim().is_empty()).count(),
                shares,
                n_target: with_target.len(),
                accuracy: (!with_target.is_empty()).then(|| hits as f64 / with_target.len() as f64),
            }
        })
        .collect()
}

/// summary.csv: condition, direction, beta, n, n_empty, n_target, accuracy, then one share
/// column per label.
pub fn summary_csv(rows: &[SummaryRow], labels: &[String]) -> String {
    let mut s = format!("condition,direction,beta,n,n_empty,n_target,accuracy,{}\n", labels.iter().map(|l| format!("share:{l}")).collect::<Vec<_>>().join(","));
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for r in rows {
        let shares: Vec<String> = r.shares.iter().map(|s| format!("{s:.4}")).collect();
        s += &format!("{},{},{},{},{},{},{},{}\n", r.condition, r.direction.as_deref().unwrap_or(""), opt(r.beta), r.n, r.n_empty, r.n_target, r.accuracy.map_or(String::new(), |a| format!("{a:.4}")), shares.join(","));
    }
    s
}

/// How a condition of a summary is drawn in [`accuracy_chart`].
#[derive(Clone, Copy, Debug)]
pub enum ChartLine<'a> {
    /// Accuracy against beta (the strength), starting from the baseline's accuracy at 0.
    Curve(&'a str),
    /// A flat line at the condition's accuracy.
    Flat(&'a str),
}

/// An accuracy chart: its title, the panel caption before each target's name, the baseline
/// condition (its accuracy is every curve's value at 0), the lines and their legends, what x is.
pub struct AccuracyChart<'a> {
    pub title: &'a str,
    pub caption: &'a str,
    pub baseline: &'a str,
    pub lines: Vec<(ChartLine<'a>, &'a str)>,
    pub x_desc: &'a str,
}

/// Expression accuracy, one panel per target (the `direction` of `summary`'s rows, as the
/// expression summary keys them), a line per entry of `chart.lines`.
pub fn accuracy_chart(summary: &[SummaryRow], chart: &AccuracyChart) -> LinePanels {
    let targets = distinct(summary.iter().filter_map(|r| r.direction.clone()));
    let betas: Vec<f64> = summary.iter().filter_map(|r| r.beta).collect();
    let lo = betas.iter().copied().fold(0.0, f64::min);
    let hi = betas.iter().copied().fold(0.0, f64::max);
    let point = |x: f64, y: Option<f64>| Point { x, y: y.unwrap_or(f64::NAN), lo: f64::NAN, hi: f64::NAN };
    let panels = targets
        .iter()
        .map(|t| {
            let of = |c: &str| -> Vec<&SummaryRow> {
                let mut v: Vec<&SummaryRow> = summary.iter().filter(|r| r.condition == c && r.direction.as_ref() == Some(t)).collect();
                v.sort_by(|a, b| a.beta.unwrap_or(0.0).total_cmp(&b.beta.unwrap_or(0.0)));
                v
            };
            let accuracy = |c: &str| of(c).first().and_then(|r| r.accuracy);
            let base = accuracy(chart.baseline);
            let lines = chart
                .lines
                .iter()
                .map(|(line, _)| match *line {
                    ChartLine::Flat(c) => vec![point(lo, accuracy(c)), point(hi, accuracy(c))],
                    // Beta 0 is the baseline: each curve starts there.
                    ChartLine::Curve(c) => {
                        let mut l: Vec<Point> = of(c).iter().map(|r| point(r.beta.unwrap_or(0.0), r.accuracy)).collect();
                        if !l.iter().any(|p| p.x == 0.0) {
                            l.push(point(0.0, base));
                            l.sort_by(|a, b| a.x.total_cmp(&b.x));
                        }
                        l
                    }
                })
                .collect();
            (format!("{} {t}", chart.caption), lines)
        })
        .collect();
    LinePanels {
        title: chart.title.into(),
        lines: chart.lines.iter().map(|l| l.1.to_string()).collect(),
        panels,
        x_range: (lo, hi),
        x_desc: chart.x_desc.into(),
        y_desc: "share judged as the target".into(),
        y_range: (0.0, 1.0),
        reference: None,
    }
}

/// A saved probe as a judge: the logistic regression of a `patchbay probe` weight file
/// (`OUT/probes/<site>.safetensors`) at one of its positions, applied to the judge model's
/// activations at the probe's site: class logits `W x + b` over the probe's classes.
#[derive(Clone, Debug)]
pub struct ProbeJudge {
    pub path: PathBuf,
    pub site: Site,
    pub position: i64,
    pub classes: Vec<String>,
    pub width: usize,
    /// `[n_classes, width]`
    pub weight: Vec<f32>,
    /// `[n_classes]`
    pub bias: Vec<f32>,
}

impl ProbeJudge {
    /// Loads the probe at `position` of a weight file for `model` (the model the probe was
    /// fitted on: the config hashes must agree). Errors name the file: not a probe file, no
    /// classifier at that position, another model's probe, a site or width the model lacks.
    pub fn load(path: &Path, position: i64, model: &Model) -> Result<ProbeJudge> {
        let mut f = TensorFile::open(path)?;
        let meta = |key: &str| f.metadata.get(key).cloned().ok_or_else(|| Error::file(path, format!("not a probe weight file (no `{key}` in its metadata)")));
        let classes: Vec<String> = serde_json::from_str(&meta("classes")?).map_err(|e| Error::file(path, format!("metadata `classes`: {e}")))?;
        let site = Site::parse(&meta("site")?, &model.cfg).map_err(|e| Error::file(path, format!("its site: {e}")))?;
        let hash = meta("config_sha256")?;
        if hash != model.config_hash {
            return Err(Error::file(path, format!("a probe of another model ({}, config {}); the judge model {} has config {}", meta("model")?, &hash[..hash.len().min(12)], model.dir.display(), &model.config_hash[..model.config_hash.len().min(12)])));
        }
        let tensor = format!("pos{position}.logreg.weight");
        if !f.entries.contains_key(&tensor) {
            return Err(Error::file(path, format!("no classifier at position {position} (`{tensor}`; the probes are at {})", meta("positions")?)));
        }
        let (shape, weight) = f.read_f32(&tensor)?;
        let (_, bias) = f.read_f32(&format!("pos{position}.logreg.bias"))?;
        let (n_units, unit_width) = site.kind.units(&model.cfg, 0);
        let width = n_units * unit_width;
        if shape != [classes.len(), width] || bias.len() != classes.len() {
            return Err(Error::file(path, format!("`{tensor}` has shape {shape:?} (bias {}), expected [{}, {width}] for {} classes at {site}", bias.len(), classes.len(), classes.len())));
        }
        if classes.len() < 2 {
            return Err(Error::file(path, format!("the probe has {} class(es): judging needs at least two", classes.len())));
        }
        Ok(ProbeJudge { path: path.to_path_buf(), site, position, classes, width, weight, bias })
    }

    /// Class logits `[n_prompts, n_classes]`: each prompt's activation at the probe's site and
    /// position through `W x + b`, `batch_size` prompts per forward. `progress` counts prompts.
    pub fn class_logits(&self, engine: &dyn Engine, prompts: &[Vec<u32>], batch_size: usize, progress: &ProgressBar) -> Result<Vec<f32>> {
        let (k, w) = (self.classes.len(), self.width);
        let captures = [Capture { site: self.site, positions: Positions::List(vec![self.position]) }];
        let mut out = Vec::with_capacity(prompts.len() * k);
        for (b, batch) in prompts.chunks(batch_size.max(1)).enumerate() {
            let r = engine.run_prompts(batch, &RunRequest { captures: &captures, ..Default::default() }).map_err(|e| e.in_batch(|i| b * batch_size.max(1) + i))?;
            let x = &r.captured[0].data; // [batch, width]
            if x.len() != batch.len() * w {
                return Err(Error::input(format!("{}: captured {} values at {} for {} prompts of width {w}", self.path.display(), x.len(), self.site, batch.len())));
            }
            for row in x.chunks(w) {
                out.extend(self.weight.chunks(w).zip(&self.bias).map(|(wc, b)| wc.iter().zip(row).map(|(a, x)| a * x).sum::<f32>() + b));
            }
            progress.inc(batch.len() as u64);
        }
        Ok(out)
    }
}

/// The valence groups of [`by_valence`], in its column order.
pub const VALENCES: [&str; 4] = ["positive", "negative", "neutral", "other"];

/// The valence of an emotion label of the studies' sets (Tak et al.'s crowd-enVENT emotions,
/// Wang et al.'s six, a few common synonyms): an index into [`VALENCES`]. Surprise, whose
/// valence depends on the event, and any unknown label are `other`.
pub fn default_valence(label: &str) -> usize {
    const POSITIVE: &[&str] = &["joy", "happiness", "happy", "pride", "relief", "trust", "love", "gratitude", "contentment", "amusement", "excitement", "hope"];
    const NEGATIVE: &[&str] = &["anger", "angry", "sadness", "sad", "fear", "disgust", "guilt", "shame", "boredom", "anxiety", "frustration", "grief"];
    const NEUTRAL: &[&str] = &["neutral", "no-emotion", "none", "calm"];
    let l = label.trim().to_lowercase();
    [POSITIVE, NEGATIVE, NEUTRAL].iter().position(|set| set.contains(&l.as_str())).unwrap_or(3)
}

/// The summary by valence: each row's target and judged label mapped to their valences
/// (`valence[label]`, an index into [`VALENCES`]); per (condition, target valence, beta), in
/// the `direction` column, the share of each judged valence and, as accuracy, the share judged
/// with the target's valence. Rows without a target are left out.
pub fn by_valence(conditions: &[String], judged: &[Judged], valence: &[usize]) -> Vec<SummaryRow> {
    let mapped: Vec<Judged> = judged
        .iter()
        .filter_map(|j| {
            let t = valence[j.target?];
            let row = GenerationRow { direction: Some(VALENCES[t].to_string()), ..j.row.clone() };
            Some(Judged { condition: j.condition, row, target: Some(t), pred: valence[j.pred] })
        })
        .collect();
    summarize(conditions, &mapped, VALENCES.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(beta: Option<f64>, direction: Option<&str>, text: &str) -> GenerationRow {
        GenerationRow { index: 0, text: text.into(), beta, direction: direction.map(str::to_string), target: None }
    }

    #[test]
    fn shares_and_accuracy_per_condition_and_beta() {
        let j = |condition, beta, direction, target, pred, text| Judged { condition, row: row(beta, direction, text), target, pred };
        let judged = vec![
            j(0, None, None, None, 0, "a"),
            j(0, None, None, None, 1, ""),
            j(1, Some(4.0), Some("x"), Some(1), 1, "b"),
            j(1, Some(4.0), Some("random"), Some(1), 0, "r"),
            j(1, Some(4.0), Some("x"), Some(1), 0, "c"),
            j(1, Some(4.0), Some("x"), Some(0), 0, "d"),
            j(1, Some(8.0), Some("x"), Some(1), 1, "e"),
        ];
        let s = summarize(&["clean".into(), "steered".into()], &judged, 2);
        assert_eq!(s.len(), 4);
        assert_eq!((s[2].direction.as_deref(), s[2].n, s[2].accuracy), (Some("random"), 1, Some(0.0)), "the control is its own line");
        assert_eq!((s[0].n, s[0].n_empty, s[0].n_target, s[0].accuracy), (2, 1, 0, None));
        assert_eq!(s[0].shares, [0.5, 0.5]);
        assert_eq!((s[1].beta, s[1].n, s[1].n_target), (Some(4.0), 3, 3));
        assert!((s[1].accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s[3].accuracy, Some(1.0));
        let csv = summary_csv(&s, &["joy".into(), "anger".into()]);
        assert_eq!(csv.lines().next().unwrap(), "condition,direction,beta,n,n_empty,n_target,accuracy,share:joy,share:anger");
        assert_eq!(csv.lines().nth(2).unwrap(), "steered,x,4,3,0,3,0.6667,0.6667,0.3333");
    }

    #[test]
    fn valence_groups_targets_and_judged_labels() {
        assert_eq!(["Joy", "anger", "neutral", "surprise", "x"].map(default_valence), [0, 1, 2, 3, 3]);
        // labels: joy (positive), pride (positive), anger (negative), neutral.
        let valence = [0, 0, 1, 2];
        let j = |condition, target, pred| Judged { condition, row: row(Some(1.0), Some("d"), "t"), target, pred };
        let judged = vec![j(0, Some(0), 1), j(0, Some(0), 2), j(0, Some(1), 3), j(0, Some(2), 2), j(0, None, 0)];
        let s = by_valence(&["steered".into()], &judged, &valence);
        assert_eq!(s.len(), 2, "positive and negative targets; the row without one is left out");
        assert_eq!((s[0].direction.as_deref(), s[0].n, s[0].accuracy), (Some("positive"), 3, Some(1.0 / 3.0)), "joy judged pride counts as positive");
        assert_eq!(s[0].shares, [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!((s[1].direction.as_deref(), s[1].n, s[1].accuracy), (Some("negative"), 1, Some(1.0)));
    }

    #[test]
    fn bad_generation_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.jsonl");
        for (text, want) in [("{\"index\": 0, \"text\": \"hi\"}\nnot json\n", "line 2: not JSON"), ("{\"text\": \"hi\"}\n", "line 1: no `index`"), ("{\"index\": 3}\n", "line 1: no `text`"), ("\n", "no generations")] {
            std::fs::write(&p, text).unwrap();
            let e = read_generations(&p).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{text:?}: {e}");
        }
        std::fs::write(&p, "{\"index\": 3, \"text\": \"hi\", \"beta\": 2.5, \"direction\": \"joy\", \"target\": \"joy\"}\n").unwrap();
        let r = &read_generations(&p).unwrap()[0];
        assert_eq!((r.index, r.text.as_str(), r.beta, r.direction.as_deref(), r.target.as_deref()), (3, "hi", Some(2.5), Some("joy"), Some("joy")));
    }
}
