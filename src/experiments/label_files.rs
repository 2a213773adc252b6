//! The files of a label sweep (`experiments::steer::write_label_rows`: clean.jsonl and a rows
//! file) read back: what an earlier run of the same sweep kept (`--resume`), and which prompts a
//! run computes (a `--shard`'s, less those finished).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::data::labels::LabelSet;
use crate::experiments::steer::{CleanValues, SteerRow};
use crate::{Error, Result};

/// Clean values and rows read back from a sweep's files.
#[derive(Default)]
pub struct Kept {
    /// Per prompt: label logits and projection.
    pub clean: BTreeMap<usize, (Vec<f32>, Option<f32>)>,
    pub rows: Vec<SteerRow>,
    /// (experiment, prompt) of every kept row.
    pub done: BTreeSet<(usize, usize)>,
}

/// Which prompts a run computes, and what it keeps from an earlier one.
#[derive(Default)]
pub struct Scope {
    /// Prompt indices run, ascending; None: every prompt.
    pub todo: Option<Vec<usize>>,
    pub kept: Kept,
}

impl Scope {
    /// The prompts of `part` (its contiguous range of the `n` prompts, or all) that `kept` does not
    /// hold completely (the clean run and every one of `n_experiments` rows).
    pub fn new(range: std::ops::Range<usize>, n_experiments: usize, kept: Kept) -> Scope {
        let todo = range.filter(|&i| !kept.clean.contains_key(&i) || (0..n_experiments).any(|e| !kept.done.contains(&(e, i)))).collect();
        Scope { todo: Some(todo), kept }
    }
}

/// Prompts `[from, to)` of shard `index` of `count` over `n` prompts (contiguous, sizes differing
/// by at most one).
pub fn shard_range(index: usize, count: usize, n: usize) -> std::ops::Range<usize> {
    (index * n / count)..((index + 1) * n / count)
}

/// The complete lines of a JSONL file, each parsed; a torn last line (a killed write) is cut off
/// the file. Err names the file and line of a line that is not JSON.
fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let Some(bytes) = crate::io::complete_lines(path, true)? else { return Ok(Vec::new()) };
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::file(path, format!("not UTF-8: {e}")))?;
    text.lines().enumerate().map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))).collect()
}

/// The fields every line of a label sweep carries, checked against the sweep: (prompt index,
/// label logits, projection).
fn common(v: &Value, labels: &LabelSet, n_prompts: usize, projection: bool) -> std::result::Result<(usize, Vec<f32>, Option<f32>), String> {
    let index = v["index"].as_u64().map(|i| i as usize).filter(|&i| i < n_prompts).ok_or_else(|| format!("`index` is not a prompt index below {n_prompts}"))?;
    let logits: Vec<f32> = serde_json::from_value(v["label_logits"].clone()).map_err(|_| "`label_logits` is not a list of numbers".to_string())?;
    if logits.len() != labels.len() || logits.iter().any(|x| !x.is_finite()) {
        return Err(format!("`label_logits` should be {} finite numbers", labels.len()));
    }
    let p = match (projection, v.get("projection")) {
        (true, Some(p)) => Some(p.as_f64().filter(|p| p.is_finite()).ok_or("`projection` is not a finite number")? as f32),
        (false, None) => None,
        (true, None) => return Err("no `projection` (the sweep reads one)".into()),
        (false, Some(_)) => return Err("a `projection` (the sweep reads none)".into()),
    };
    Ok((index, logits, p))
}

/// What the files of a sweep in `out` hold (clean.jsonl and `rows_file`), every line checked
/// against the sweep (`n_prompts`, `n_experiments`, the labels, whether it reads a projection):
/// torn last lines are cut off; a line that does not fit, or a row or clean run given twice, is
/// an error naming the file and line.
pub fn read_kept(out: &Path, rows_file: &str, labels: &LabelSet, n_prompts: usize, n_experiments: usize, projection: bool) -> Result<Kept> {
    let mut kept = Kept::default();
    let path = out.join("clean.jsonl");
    for (i, v) in read_lines(&path)?.iter().enumerate() {
        let bad = |m: String| Error::file(&path, format!("line {}: {m}", i + 1));
        let (index, logits, p) = common(v, labels, n_prompts, projection).map_err(bad)?;
        if kept.clean.insert(index, (logits, p)).is_some() {
            return Err(bad(format!("prompt {index} is given twice")));
        }
    }
    let path = out.join(rows_file);
    let pred = |v: &Value, key: &str| v[key].as_str().and_then(|p| labels.names.iter().position(|n| n == p)).ok_or_else(|| format!("`{key}` is not one of the labels"));
    for (i, v) in read_lines(&path)?.iter().enumerate() {
        let bad = |m: String| Error::file(&path, format!("line {}: {m}", i + 1));
        let (index, label_logits, projection) = common(v, labels, n_prompts, projection).map_err(bad)?;
        let experiment = v["experiment"].as_u64().map(|e| e as usize).filter(|&e| e < n_experiments).ok_or_else(|| bad(format!("`experiment` is not an experiment index below {n_experiments}")))?;
        let (pred, clean_pred) = (pred(v, "pred").map_err(bad)?, pred(v, "clean_pred").map_err(bad)?);
        if !kept.done.insert((experiment, index)) {
            return Err(bad(format!("experiment {experiment} of prompt {index} is given twice")));
        }
        kept.rows.push(SteerRow { index, condition: experiment, label_logits, pred, clean_pred, projection });
    }
    Ok(kept)
}

impl Kept {
    /// The clean values of `n_prompts` prompts holding the kept ones (zeros elsewhere).
    pub fn clean_values(&self, n_prompts: usize, k: usize, projection: bool) -> CleanValues {
        let mut c = CleanValues { label_logits: vec![0.0; n_prompts * k], projection: projection.then(|| vec![0.0; n_prompts]) };
        for (&i, (logits, p)) in &self.clean {
            c.label_logits[i * k..(i + 1) * k].copy_from_slice(logits);
            if let (Some(all), Some(p)) = (c.projection.as_mut(), p) {
                all[i] = *p;
            }
        }
        c
    }
}
