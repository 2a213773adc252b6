//! Label scoring: the model's next-token logits at the last position restricted to a label
//! set, the predicted label (argmax, ties to the first label), and against gold labels the
//! accuracy and confusion matrix.
//!
//! Outputs of a scoring directory:
//! - `scores.jsonl`: one object per prompt in input order: `index`, `label_logits` (label order),
//!   `pred` (label name), `gold` and `correct` when known, `row` (dataset row) when known;
//! - `score.json`: labels, their token ids and strings, n, accuracy, per-label counts;
//! - `confusion.csv`: gold labels down, predicted labels across.

use std::path::Path;

use indicatif::ProgressBar;
use serde_json::json;

use crate::engine::RunRequest;
use crate::data::labels::LabelSet;
use crate::engine::Engine;
use crate::intervene::{Intervention, for_batch};
use crate::sites::Positions;
use crate::{Error, Result};

/// Label logits `[n, n_labels]` of every prompt, by batches (only the label rows of the lm_head
/// are multiplied), with `interventions` applied (their `prompts` index `prompts`; none for the
/// model's own predictions).
pub fn label_logits(engine: &dyn Engine, prompts: &[Vec<u32>], labels: &LabelSet, interventions: &[Intervention], batch_size: usize, progress: &ProgressBar) -> Result<Vec<f32>> {
    let cfg = engine.config();
    labels.check_vocab(cfg.vocab_size)?;
    let last = Positions::List(vec![-1]);
    let mut out = Vec::with_capacity(prompts.len() * labels.len());
    let batch_size = batch_size.max(1);
    for (b, batch) in prompts.chunks(batch_size).enumerate() {
        let start = b * batch_size;
        let ivs = for_batch(interventions, cfg, prompts, start..start + batch.len())?;
        let r = engine.run_prompts(batch, &RunRequest { interventions: &ivs, logits_at: Some(&last), logit_tokens: Some(&labels.token_ids), ..Default::default() }).map_err(|e| e.in_batch(|i| start + i))?;
        if r.logits.len() != batch.len() * labels.len() {
            return Err(Error::input(format!("engine returned {} label logits for {} prompts", r.logits.len(), batch.len())));
        }
        out.extend_from_slice(&r.logits);
        progress.inc(batch.len() as u64);
    }
    Ok(out)
}

/// The scores of a set of prompts.
#[derive(Clone, Debug)]
pub struct Scores {
    pub labels: LabelSet,
    /// [n, n_labels]
    pub logits: Vec<f32>,
    /// Predicted label index per prompt.
    pub pred: Vec<usize>,
    /// Gold label index per prompt (None: unknown).
    pub gold: Vec<Option<usize>>,
}

impl Scores {
    pub fn new(labels: LabelSet, logits: Vec<f32>, gold: Vec<Option<usize>>) -> Scores {
        let k = labels.len();
        let pred = logits.chunks(k).map(crate::logits::argmax).collect();
        Scores { labels, logits, pred, gold }
    }

    pub fn n(&self) -> usize {
        self.pred.len()
    }

    /// Whether each prompt is predicted right (None: no gold label).
    pub fn correct(&self) -> Vec<Option<bool>> {
        self.pred.iter().zip(&self.gold).map(|(p, g)| g.map(|g| g == *p)).collect()
    }

    /// Accuracy over prompts with a gold label (None when there are none).
    pub fn accuracy(&self) -> Option<f64> {
        let c: Vec<bool> = self.correct().into_iter().flatten().collect();
        (!c.is_empty()).then(|| c.iter().filter(|&&b| b).count() as f64 / c.len() as f64)
    }

    /// confusion[gold][pred]
    pub fn confusion(&self) -> Vec<Vec<usize>> {
        let k = self.labels.len();
        let mut m = vec![vec![0usize; k]; k];
        for (p, g) in self.pred.iter().zip(&self.gold) {
            if let Some(g) = g {
                m[*g][*p] += 1;
            }
        }
        m
    }

    /// Writes scores.jsonl, score.json and (with gold labels) confusion.csv into `dir`.
    /// `rows` are dataset rows per prompt when known.
    pub fn write(&self, dir: &Path, rows: Option<&[usize]>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let k = self.labels.len();
        let mut lines = String::new();
        for (i, (logits, p)) in self.logits.chunks(k).zip(&self.pred).enumerate() {
            let mut o = json!({"index": i, "label_logits": logits, "pred": self.labels.names[*p]});
            if let Some(r) = rows {
                o["row"] = json!(r[i]);
            }
            if let Some(g) = self.gold[i] {
                o["gold"] = json!(self.labels.names[g]);
                o["correct"] = json!(g == *p);
            }
            lines.push_str(&o.to_string());
            lines.push('\n');
        }
        crate::io::write_atomic(&dir.join("scores.jsonl"), lines.as_bytes())?;
        let confusion = self.confusion();
        let per_label: Vec<_> = (0..k)
            .map(|c| {
                let n_gold: usize = confusion[c].iter().sum();
                let n_pred = self.pred.iter().filter(|&&p| p == c).count();
                json!({"label": self.labels.names[c], "token_id": self.labels.token_ids[c], "token": self.labels.tokens[c], "gold": n_gold, "predicted": n_pred, "correct": confusion[c][c], "recall": if n_gold > 0 { json!(confusion[c][c] as f64 / n_gold as f64) } else { json!(null) }})
            })
            .collect();
        let n_gold = self.gold.iter().filter(|g| g.is_some()).count();
        let summary = json!({"n": self.n(), "n_with_gold": n_gold, "accuracy": self.accuracy(), "labels": per_label});
        crate::io::write_atomic(&dir.join("score.json"), serde_json::to_string_pretty(&summary).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
        if n_gold > 0 {
            let mut w = csv::Writer::from_writer(Vec::new());
            let path = dir.join("confusion.csv");
            let err = |e: csv::Error| Error::file(&path, e.to_string());
            let mut header = vec!["gold \\ pred".to_string()];
            header.extend(self.labels.names.iter().cloned());
            w.write_record(&header).map_err(err)?;
            for (c, row) in confusion.iter().enumerate() {
                let mut rec = vec![self.labels.names[c].clone()];
                rec.extend(row.iter().map(usize::to_string));
                w.write_record(&rec).map_err(err)?;
            }
            let bytes = w.into_inner().map_err(|e| Error::file(&path, e.to_string()))?;
            crate::io::write_atomic(&path, &bytes)?;
            crate::io::plot::heatmap(&dir.join("confusion.png"), &confusion_grid(&self.labels.names, &confusion))?;
        }
        Ok(())
    }

    /// A short text summary: accuracy and the confusion matrix.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        match self.accuracy() {
            Some(a) => s.push_str(&format!("accuracy {:.4} ({} of {} prompts with a gold label)\n", a, self.correct().into_iter().flatten().filter(|&b| b).count(), self.gold.iter().flatten().count())),
            None => s.push_str(&format!("{} prompts scored (no gold labels)\n", self.n())),
        }
        if self.accuracy().is_some() {
            let w = self.labels.names.iter().map(String::len).max().unwrap_or(4).max(6);
            s.push_str(&format!("{:>w$} ", "gold\\pred"));
            for n in &self.labels.names {
                s.push_str(&format!(" {:>w$}", n));
            }
            s.push('\n');
            for (c, row) in self.confusion().iter().enumerate() {
                s.push_str(&format!("{:>w$} ", self.labels.names[c]));
                for v in row {
                    s.push_str(&format!(" {:>w$}", v));
                }
                s.push('\n');
            }
        }
        s
    }
}

/// The confusion matrix as a heatmap: gold labels down, predictions across (full names, drawn
/// vertically when they do not fit across a cell), each row as fractions of its gold count.
pub fn confusion_grid(names: &[String], confusion: &[Vec<usize>]) -> crate::io::plot::Grid {
    crate::io::plot::Grid {
        title: "Label scoring: fraction of each gold label predicted as each label".into(),
        row_labels: names.to_vec(),
        col_labels: names.to_vec(),
        values: confusion.iter().map(|row| row.iter().map(|&c| Some(c as f64 / row.iter().sum::<usize>().max(1) as f64)).collect()).collect(),
        value_label: "fraction".into(),
        range: Some((0.0, 1.0)),
        x_desc: "predicted label".into(),
        y_desc: "gold label".into(),
    }
}
