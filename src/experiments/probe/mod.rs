//! Probes over captured activations: for every (site, layer, position) of a shard directory, a
//! multinomial logistic regression for the label and a ridge regression for every numeric
//! column, evaluated on seeded splits (k-fold or held-out), with bootstrap confidence intervals.
//!
//! Work goes one site (one layer of one kind) at a time: its activations for the selected
//! examples are read from the shards (`n x positions x width` floats), then all fits of all its
//! positions run in parallel (rayon). Each site's results and weights are written atomically to
//! `probes/<site>.json` and `probes/<site>.safetensors` as soon as they are done; a re-run with
//! the same inputs and settings skips the sites already done.
//!
//! Saved weights act on raw activations (any standardisation is folded in): logits
//! `= W x + b` over the classes, numeric predictions `= W x + b` per column. With held-out
//! evaluation they are the evaluated model (fitted on the training part); with k-fold they are
//! refitted on all selected examples. A site's weight file holds, per captured position P,
//! `posP.logreg.weight` `[classes, width]` and `.bias`, `posP.ridge.weight` `[numeric, width]`
//! and `.bias`, `posP.mean` and `posP.scale` (the fit's standardisation), with its provenance in
//! the metadata: site, model, config_sha256, prompts_sha256, positions, classes and numeric
//! (JSON lists, the weights' row order), C, alpha, standardize, eval. `patchbay directions
//! --method probe` turns the rows into steering directions.
//!
//! `pipeline`: the stages of `patchbay probe` (and of the demo's probing); `plots`: plots of
//! the results.

pub mod pipeline;
pub mod plots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::experiments::shards::{ShardMeta, read_site};
use crate::io::OutDtype;
use crate::io::tensorfile::{TensorData, write};
use crate::learn::logreg::{self, LogRegParams};
use crate::learn::metrics::{accuracy, bootstrap_ci, r2};
use crate::learn::penalty::{Penalty, best_index};
use crate::learn::ridge::{self, Moments, feature_scale};
use crate::learn::split::{Eval, Split};
use crate::{Error, Result};

/// What to probe for, on which examples.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeTargets {
    /// Indices of the probed examples among the captured prompts (ascending).
    pub examples: Vec<usize>,
    /// Class names and each probed example's class (None: no classification probe).
    pub class_names: Vec<String>,
    pub classes: Option<Vec<usize>>,
    /// Numeric column names and values `[n_examples, n_numeric]`.
    pub numeric_names: Vec<String>,
    pub numeric: Vec<f64>,
}

impl ProbeTargets {
    /// Refuses targets on which a probe measures nothing: one class (accuracy 1 by
    /// construction) or a constant numeric target (no R^2). (Fewer examples than folds are
    /// refused by `Split::new`.)
    pub fn check(&self) -> Result<()> {
        let n = self.examples.len();
        if let Some(classes) = &self.classes {
            let present: std::collections::BTreeSet<usize> = classes.iter().copied().collect();
            if let [only] = present.into_iter().collect::<Vec<_>>()[..] {
                let name = self.class_names.get(only).map_or("?", String::as_str);
                return Err(Error::input(format!("all {n} probed examples have label `{name}`: a one-class probe is right by construction; probe examples of at least two labels (or --label-col none for numeric probes only)")));
            }
        }
        let r = self.numeric_names.len();
        for (j, name) in self.numeric_names.iter().enumerate() {
            let first = self.numeric[j];
            if (0..n).all(|i| self.numeric[i * r + j] == first) {
                return Err(Error::input(format!("numeric column `{name}` is {first} for all {n} probed examples: a constant target has no R^2; leave it out of --numeric-cols")));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeParams {
    pub eval: Eval,
    pub seed: u64,
    /// Inverse L2 strength of the logistic regression (scikit-learn's C).
    pub c: Penalty,
    pub logreg: LogRegParams,
    /// Ridge penalty (scikit-learn's alpha), chosen per numeric column when a grid.
    pub alpha: Penalty,
    /// Inner folds that choose a grid penalty on each fit's training rows.
    pub inner_folds: usize,
    pub standardize: bool,
    pub bootstrap: usize,
}

/// A penalty chosen by inner cross-validation: one line of regularisation.csv.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChosenRow {
    pub site: String,
    pub layer: usize,
    pub position: i64,
    /// `C` (the classifier) or `alpha:<column>`.
    pub penalty: String,
    /// The fit it was chosen for: `fold F` (with held-out evaluation, fold 0 is the training
    /// part) or `all` (the model k-fold evaluation refits on every example).
    pub fit: String,
    pub value: f64,
}

/// The fit whose model is saved: the training part (fold 0) with held-out evaluation, the refit
/// on every example (None) with k-fold.
fn saved_fold(split: &Split) -> Option<usize> {
    matches!(split.eval, Eval::Holdout(_)).then_some(0)
}

/// The name of fit `fold` in regularisation.csv and splits.json.
pub fn fit_name(fold: Option<usize>) -> String {
    fold.map_or("all".to_string(), |f| format!("fold {f}"))
}

/// One line of probe_results.csv.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// Short site name (resid_post, attn_out, ...).
    pub site: String,
    pub layer: usize,
    pub position: i64,
    /// `accuracy` or `r2:<column>`.
    pub metric: String,
    pub value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Examples the metric is computed on.
    pub n: usize,
}

/// A site's results file.
#[derive(Serialize, Deserialize)]
struct SiteResults {
    fingerprint: String,
    site: String,
    rows: Vec<ResultRow>,
    /// Penalties chosen by inner cross-validation.
    chosen: Vec<ChosenRow>,
    /// Logistic regression fits that stopped at max_iter.
    unconverged: usize,
    /// Logistic regression fits.
    fits: usize,
}

/// Summary of a probe run.
pub struct ProbeRun {
    pub rows: Vec<ResultRow>,
    pub chosen: Vec<ChosenRow>,
    /// Sites found done at the start.
    pub resumed: usize,
    pub unconverged: usize,
    pub fits: usize,
}

fn fingerprint(meta: &ShardMeta, targets: &ProbeTargets, split: &Split, params: &ProbeParams) -> String {
    let mut h = Sha256::new();
    let s = serde_json::to_string(&(&meta.prompts_sha256, &meta.config_sha256, &meta.positions, targets, &split.test_fold, params)).unwrap_or_default();
    h.update(s.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// File stem of a site's outputs.
pub fn site_stem(site: &str) -> String {
    site.replace('/', "_")
}

/// Runs every probe of the captured sites; results and weights go to `out_dir` (`probes/`).
pub fn run_probes(shard_dir: &Path, targets: &ProbeTargets, split: &Split, params: &ProbeParams, out_dir: &Path, progress: &ProgressBar) -> Result<ProbeRun> {
    let meta = ShardMeta::load(shard_dir)?;
    if (0..meta.n_shards).any(|k| !ShardMeta::shard_path(shard_dir, k).exists()) {
        return Err(Error::input(format!("{}: the capture is incomplete; run the capture again to finish it", shard_dir.display())));
    }
    let n = targets.examples.len();
    if split.test_fold.len() != n {
        return Err(Error::input(format!("split has {} examples, targets {n}", split.test_fold.len())));
    }
    if let Some(&bad) = targets.examples.iter().find(|&&i| i >= meta.n_prompts) {
        return Err(Error::input(format!("example {bad} is not among the {} captured prompts", meta.n_prompts)));
    }
    if targets.classes.is_none() && targets.numeric_names.is_empty() {
        return Err(Error::input("nothing to probe: no label column and no numeric columns"));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let fp = fingerprint(&meta, targets, split, params);
    let mut all_rows = Vec::new();
    let mut all_chosen = Vec::new();
    let (mut resumed, mut unconverged, mut fits) = (0, 0, 0);
    let n_pos = meta.positions.len();
    // Shard lookup for each probed example: (shard, row within shard).
    let loc: Vec<(usize, usize)> = targets.examples.iter().map(|&i| (i / meta.shard_rows, i % meta.shard_rows)).collect();
    for (si, site_name) in meta.sites.iter().enumerate() {
        let stem = site_stem(site_name);
        let json_path = out_dir.join(format!("{stem}.json"));
        if let Ok(bytes) = std::fs::read(&json_path)
            && let Ok(done) = serde_json::from_slice::<SiteResults>(&bytes)
            && done.fingerprint == fp
        {
            all_rows.extend(done.rows);
            all_chosen.extend(done.chosen);
            unconverged += done.unconverged;
            fits += done.fits;
            resumed += 1;
            progress.inc(n_pos as u64);
            continue;
        }
        let width: usize = meta.token_shapes[si].iter().product();
        let (short, layer) = (meta.site_kinds[si].clone(), meta.site_layers[si]);
        // x: [n, n_pos, width] for the probed examples.
        let mut x = vec![0.0f32; n * n_pos * width];
        let row_w = n_pos * width;
        let mut by_shard: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (j, &(k, r)) in loc.iter().enumerate() {
            by_shard.entry(k).or_default().push((j, r));
        }
        for (k, items) in by_shard {
            let (shape, data) = read_site(shard_dir, k, site_name)?;
            let rows = meta.shard_range(k).len();
            if shape.first() != Some(&rows) || data.len() != rows * row_w {
                return Err(Error::file(ShardMeta::shard_path(shard_dir, k), format!("tensor `{site_name}` has shape {shape:?}, expected [{rows}, {n_pos}, ...{width} values]")));
            }
            for (j, r) in items {
                let features = &data[r * row_w..(r + 1) * row_w];
                if features.iter().any(|v| !v.is_finite()) {
                    let prompt = meta.shard_range(k).start + r;
                    return Err(Error::file(ShardMeta::shard_path(shard_dir, k), format!("tensor `{site_name}` (layer {layer}), row {r} (prompt {prompt}): the features are not finite (NaN or Inf); a probe cannot fit them")));
                }
                x[j * row_w..(j + 1) * row_w].copy_from_slice(features);
            }
        }
        let per_pos: Vec<Vec<f32>> = (0..n_pos).map(|p| (0..n).flat_map(|j| x[j * row_w + p * width..j * row_w + (p + 1) * width].iter().copied()).collect()).collect();
        drop(x);
        let out = probe_site(&per_pos, &meta.positions, width, targets, split, params)?;
        let mut rows = Vec::new();
        let mut chosen = Vec::new();
        let mut tensors_owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (p, po) in out.iter().enumerate() {
            let position = meta.positions[p];
            for (metric, value, (lo, hi), n_eval) in &po.metrics {
                rows.push(ResultRow { site: short.clone(), layer, position, metric: metric.clone(), value: *value, ci_low: *lo, ci_high: *hi, n: *n_eval });
            }
            for (penalty, fit, value) in &po.chosen {
                chosen.push(ChosenRow { site: short.clone(), layer, position, penalty: penalty.clone(), fit: fit.clone(), value: *value });
            }
            let tag = format!("pos{position}");
            if let Some((w, b, k)) = &po.logreg {
                tensors_owned.push((format!("{tag}.logreg.weight"), vec![*k, width], w.clone()));
                tensors_owned.push((format!("{tag}.logreg.bias"), vec![*k], b.clone()));
            }
            if let Some((w, b)) = &po.ridge {
                let r = targets.numeric_names.len();
                tensors_owned.push((format!("{tag}.ridge.weight"), vec![r, width], w.clone()));
                tensors_owned.push((format!("{tag}.ridge.bias"), vec![r], b.clone()));
            }
            tensors_owned.push((format!("{tag}.mean"), vec![width], po.mean.clone()));
            tensors_owned.push((format!("{tag}.scale"), vec![width], po.scale.clone()));
            unconverged += po.unconverged;
            fits += po.fits;
        }
        let class_names: Vec<&String> = out.first().map(|o| o.classes.iter().map(|&c| &targets.class_names[c]).collect()).unwrap_or_default();
        let md = BTreeMap::from([
            ("site".to_string(), site_name.clone()),
            ("model".to_string(), meta.model.clone()),
            ("config_sha256".to_string(), meta.config_sha256.clone()),
            ("prompts_sha256".to_string(), meta.prompts_sha256.clone()),
            ("positions".to_string(), serde_json::to_string(&meta.positions).unwrap_or_default()),
            ("classes".to_string(), serde_json::to_string(&class_names).unwrap_or_default()),
            ("numeric".to_string(), serde_json::to_string(&targets.numeric_names).unwrap_or_default()),
            ("C".to_string(), saved_penalty(&out, &params.c, "C", split)),
            ("alpha".to_string(), saved_penalty(&out, &params.alpha, "alpha:", split)),
            ("standardize".to_string(), params.standardize.to_string()),
            ("eval".to_string(), split.eval.describe()),
            ("space".to_string(), "weights act on raw activations (standardisation folded in); mean/scale are the fit's standardisation".to_string()),
            ("patchbay_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        let tensors: Vec<(String, Vec<usize>, TensorData)> = tensors_owned.iter().map(|(name, shape, v)| (name.clone(), shape.clone(), TensorData::F32(v, OutDtype::F32))).collect();
        write(&out_dir.join(format!("{stem}.safetensors")), &tensors, &md)?;
        let po_unconv: usize = out.iter().map(|o| o.unconverged).sum();
        let po_fits: usize = out.iter().map(|o| o.fits).sum();
        let res = SiteResults { fingerprint: fp.clone(), site: site_name.clone(), rows: rows.clone(), chosen: chosen.clone(), unconverged: po_unconv, fits: po_fits };
        crate::io::write_atomic(&json_path, &serde_json::to_vec_pretty(&res).map_err(|e| Error::input(e.to_string()))?)?;
        all_rows.extend(rows);
        all_chosen.extend(chosen);
        progress.inc(n_pos as u64);
    }
    Ok(ProbeRun { rows: all_rows, chosen: all_chosen, resumed, unconverged, fits })
}

/// The weight file's record of a penalty: the fixed value, or, for a grid, the saved models'
/// choices as JSON (`{"pos-1": {"C": 0.1}}` / `{"pos-1": {"alpha:pleasantness": 100}}`).
fn saved_penalty(out: &[PosOut], penalty: &Penalty, prefix: &str, split: &Split) -> String {
    match penalty {
        Penalty::Fixed(v) => v.to_string(),
        Penalty::Grid(_) => {
            let saved_fit = fit_name(saved_fold(split));
            let per_pos: BTreeMap<String, BTreeMap<&str, f64>> = out
                .iter()
                .map(|po| (format!("pos{}", po.position), po.chosen.iter().filter(|(p, f, _)| p.starts_with(prefix) && *f == saved_fit).map(|(p, _, v)| (p.as_str(), *v)).collect()))
                .collect();
            serde_json::to_string(&per_pos).unwrap_or_default()
        }
    }
}

/// The results of one position of one site.
struct PosOut {
    position: i64,
    /// Penalties chosen by inner cross-validation: (penalty, fit, value).
    chosen: Vec<(String, String, f64)>,
    /// (metric, value, ci, n)
    metrics: Vec<(String, f64, (f64, f64), usize)>,
    /// Saved classifier: (W [k, d], b [k], k), raw space.
    logreg: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// Global class indices of the saved classifier's rows.
    classes: Vec<usize>,
    /// Saved regressor: (W [r, d], b [r]), raw space.
    ridge: Option<(Vec<f32>, Vec<f32>)>,
    mean: Vec<f32>,
    scale: Vec<f32>,
    unconverged: usize,
    fits: usize,
}

enum Task {
    /// Logistic regression at position p on fold f (None: all examples, the saved model).
    LogReg { p: usize, fold: Option<usize> },
    /// Ridge at position p, all folds and the saved model.
    Ridge { p: usize },
}

enum TaskOut {
    LogReg { p: usize, fold: Option<usize>, test: Vec<usize>, pred: Vec<usize>, model: Option<SavedLogReg>, c: Chosen, fits: Fits },
    Ridge { p: usize, oof: Vec<(usize, Vec<f64>)>, w: Vec<f32>, b: Vec<f32>, alphas: Vec<(Option<usize>, Vec<f64>)> },
}

/// A fit's penalty and whether inner cross-validation chose it.
#[derive(Clone, Copy)]
struct Chosen {
    value: f64,
    by_cv: bool,
}

/// Logistic regression fits made, and how many stopped at max_iter.
#[derive(Clone, Copy, Default)]
struct Fits {
    made: usize,
    unconverged: usize,
}

impl Fits {
    fn add(&mut self, converged: bool) {
        self.made += 1;
        self.unconverged += usize::from(!converged);
    }
}

struct SavedLogReg {
    w: Vec<f32>,
    b: Vec<f32>,
    k: usize,
    classes: Vec<usize>,
    mean: Vec<f32>,
    scale: Vec<f32>,
}

/// Per-feature mean and scale (1 when not standardising) over the given rows of x [n, d].
fn standardizer(x: &[f32], d: usize, rows: &[usize], standardize: bool) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0.0f64; d];
    for &i in rows {
        mean.iter_mut().zip(&x[i * d..(i + 1) * d]).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n);
    if !standardize {
        return (vec![0.0; d], vec![1.0; d]);
    }
    let mut var = vec![0.0f64; d];
    for &i in rows {
        var.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(&mean).for_each(|((s, &v), m)| *s += (v as f64 - m).powi(2));
    }
    let scale = var.iter().zip(&mean).map(|(v, m)| feature_scale((v / n).sqrt(), *m)).collect();
    (mean, scale)
}

/// Rows of x, standardised: [rows.len(), d].
fn gather(x: &[f32], d: usize, rows: &[usize], mean: &[f64], scale: &[f64]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &i in rows {
        out.extend(x[i * d..(i + 1) * d].iter().zip(mean).zip(scale).map(|((&v, m), s)| ((v as f64 - m) / s) as f32));
    }
    out
}

/// The inner folds of fit `fold` as (train, test) rows of x: `split.inner` mapped back.
fn inner_folds(split: &Split, fold: Option<usize>, classes: Option<&[usize]>, k: usize) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    let (train, inner) = split.inner(fold, classes, k)?;
    let back = |idx: Vec<usize>| idx.into_iter().map(|j| train[j]).collect::<Vec<usize>>();
    Ok((0..inner.n_folds).map(|f| inner.fold(f)).map(|(tr, te)| (back(tr), back(te))).collect())
}

/// The C of fit `fold`: the fixed value, or the grid value of the best mean inner-fold
/// accuracy on the fit's training rows.
fn choose_c(x: &[f32], d: usize, classes: &[usize], split: &Split, fold: Option<usize>, params: &ProbeParams, fits: &mut Fits) -> Result<Chosen> {
    let grid = params.c.values();
    if !params.c.is_grid() {
        return Ok(Chosen { value: grid[0], by_cv: false });
    }
    let mut scores = vec![Vec::new(); grid.len()]; // [grid][inner fold]
    for (train, test) in inner_folds(split, fold, Some(classes), params.inner_folds)? {
        let gold: Vec<usize> = test.iter().map(|&i| classes[i]).collect();
        for (g, &c) in grid.iter().enumerate() {
            let (pred, _, converged) = run_logreg(x, d, classes, &train, &test, c, params, false);
            fits.add(converged);
            scores[g].push(accuracy(&pred, &gold));
        }
    }
    Ok(Chosen { value: grid[best_index(&scores)], by_cv: true })
}

fn run_logreg(x: &[f32], d: usize, classes: &[usize], train: &[usize], test: &[usize], c: f64, params: &ProbeParams, save: bool) -> (Vec<usize>, Option<SavedLogReg>, bool) {
    // Classes present in training, mapped to 0..k.
    let mut present: Vec<usize> = train.iter().map(|&i| classes[i]).collect();
    present.sort_unstable();
    present.dedup();
    let local: Vec<usize> = train.iter().map(|&i| present.binary_search(&classes[i]).unwrap_or(0)).collect();
    let (mean, scale) = standardizer(x, d, train, params.standardize);
    let xt = gather(x, d, train, &mean, &scale);
    let parallel = train.len() * d > 1 << 20;
    let k = present.len();
    let (pred, model, converged) = if k < 2 {
        // One class: every prediction is that class.
        (vec![present.first().copied().unwrap_or(0); test.len()], None, true)
    } else {
        let m = logreg::fit(&xt, &local, train.len(), d, k, c, &params.logreg, parallel);
        let xs = gather(x, d, test, &mean, &scale);
        let pred = m.predict(&xs, test.len(), parallel).into_iter().map(|c| present[c]).collect();
        let conv = m.converged;
        (pred, Some(m), conv)
    };
    let saved = if save {
        model.map(|m| {
            // Fold the standardisation in: W' = W / s, b' = b - W' mean.
            let mut w = m.w.clone();
            let mut b = m.b.clone();
            for c in 0..k {
                let row = &mut w[c * d..(c + 1) * d];
                let mut shift = 0.0f64;
                for j in 0..d {
                    let v = row[j] as f64 / scale[j];
                    shift += v * mean[j];
                    row[j] = v as f32;
                }
                b[c] = (b[c] as f64 - shift) as f32;
            }
            SavedLogReg { w, b, k, classes: present.clone(), mean: mean.iter().map(|&v| v as f32).collect(), scale: scale.iter().map(|&v| v as f32).collect() }
        })
    } else {
        None
    };
    (pred, saved, converged)
}

/// Out-of-fold predictions (example, values), the saved model's weights and biases, and the
/// alphas (one per numeric column) of each fit.
type RidgeOut = (Vec<(usize, Vec<f64>)>, Vec<f32>, Vec<f32>, Vec<(Option<usize>, Vec<f64>)>);

fn run_ridge(x: &[f32], d: usize, targets: &ProbeTargets, split: &Split, params: &ProbeParams) -> Result<RidgeOut> {
    let n = targets.examples.len();
    let r = targets.numeric_names.len();
    let y = &targets.numeric;
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let parallel = n * d > 1 << 20;
    let rows_of = |idx: &[usize]| -> (Vec<f64>, Vec<f64>) {
        let mut xs = Vec::with_capacity(idx.len() * d);
        let mut ys = Vec::with_capacity(idx.len() * r);
        for &i in idx {
            xs.extend_from_slice(&xd[i * d..(i + 1) * d]);
            ys.extend_from_slice(&y[i * r..(i + 1) * r]);
        }
        (xs, ys)
    };
    // The moments of `train`, the rows of `total` less `test` (xs, ys), when the primal
    // applies (d <= rows); None: the dual.
    let less = |total: Option<&Moments>, train: &[usize], xs: &[f64], ys: &[f64], test: usize| -> Option<Moments> {
        total.filter(|_| d <= train.len()).map(|t| t.minus(&Moments::of(xs, ys, test, d, r, parallel)))
    };
    let err = |e: String| Error::input(format!("ridge regression: {e}"));
    // One alpha on `train`, from its moments in the primal, else in the dual.
    let fit = |train: &[usize], m: Option<&Moments>, alpha: f64| -> Result<ridge::Ridge> {
        match m {
            Some(m) => ridge::fit_moments(m, alpha, params.standardize).map_err(err),
            None => {
                let (xs, ys) = rows_of(train);
                ridge::fit_dual(&xs, &ys, train.len(), d, r, alpha, params.standardize, parallel).map_err(err)
            }
        }
    };
    // Fit `fold` (its training rows and their moments), with each column's alpha fixed or
    // chosen by the best mean inner-fold score (negative mean squared error).
    let fit_with_alphas = |fold: Option<usize>, train: &[usize], m: Option<&Moments>| -> Result<(ridge::Ridge, Vec<f64>)> {
        let grid = params.alpha.values();
        if !params.alpha.is_grid() {
            return Ok((fit(train, m, grid[0])?, vec![grid[0]; r]));
        }
        let mut scores = vec![vec![Vec::new(); grid.len()]; r]; // [column][grid][inner fold]
        for (tr, te) in inner_folds(split, fold, targets.classes.as_deref(), params.inner_folds)? {
            let (xs, ys) = rows_of(&te);
            let tr_m = less(m, &tr, &xs, &ys, te.len());
            for (g, &alpha) in grid.iter().enumerate() {
                let pred = fit(&tr, tr_m.as_ref(), alpha)?.predict(&xs, te.len());
                for (c, col) in scores.iter_mut().enumerate() {
                    let se: f64 = (0..te.len()).map(|j| (pred[j * r + c] - ys[j * r + c]).powi(2)).sum();
                    col[g].push(-se / te.len() as f64);
                }
            }
        }
        let alphas: Vec<f64> = scores.iter().map(|s| grid[best_index(s)]).collect();
        // One fit per distinct chosen alpha; each column takes its row.
        let mut model = ridge::Ridge { w: vec![0.0; r * d], b: vec![0.0; r], r, d };
        let mut distinct = alphas.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        for &alpha in &distinct {
            let m_alpha = fit(train, m, alpha)?;
            for c in (0..r).filter(|&c| alphas[c] == alpha) {
                model.w[c * d..(c + 1) * d].copy_from_slice(&m_alpha.w[c * d..(c + 1) * d]);
                model.b[c] = m_alpha.b[c];
            }
        }
        Ok((model, alphas))
    };
    let all = (d <= n).then(|| Moments::of(&xd, y, n, d, r, parallel));
    let mut oof = Vec::new();
    let mut alphas = Vec::new();
    // Each evaluated fit predicts its test rows; the last one fitted is the saved model.
    let mut saved = None;
    for fold in split.fits() {
        let (train, test) = split.fit_rows(fold);
        let (xs, ys) = rows_of(&test);
        let m = less(all.as_ref(), &train, &xs, &ys, test.len());
        let (model, chosen) = fit_with_alphas(fold, &train, m.as_ref())?;
        let pred = model.predict(&xs, test.len());
        for (j, &i) in test.iter().enumerate() {
            oof.push((i, pred[j * r..(j + 1) * r].to_vec()));
        }
        alphas.push((fold, chosen));
        saved = Some(model);
    }
    let saved = saved.ok_or_else(|| Error::input("ridge regression: no fit"))?;
    Ok((oof, saved.w.iter().map(|&v| v as f32).collect(), saved.b.iter().map(|&v| v as f32).collect(), alphas))
}

/// All probes of one site: `per_pos[p]` is `[n, d]`; `positions[p]` its position.
fn probe_site(per_pos: &[Vec<f32>], positions: &[i64], d: usize, targets: &ProbeTargets, split: &Split, params: &ProbeParams) -> Result<Vec<PosOut>> {
    let n_pos = per_pos.len();
    let saved_fold = saved_fold(split);
    let mut tasks = Vec::new();
    for p in 0..n_pos {
        if targets.classes.is_some() {
            tasks.extend(split.fits().into_iter().map(|fold| Task::LogReg { p, fold }));
        }
        if !targets.numeric_names.is_empty() {
            tasks.push(Task::Ridge { p });
        }
    }
    let outs: Vec<Result<TaskOut>> = tasks
        .par_iter()
        .map(|t| match *t {
            Task::LogReg { p, fold } => {
                let classes = targets.classes.as_deref().unwrap_or(&[]);
                let (train, test) = split.fit_rows(fold);
                let mut fits = Fits::default();
                let c = choose_c(&per_pos[p], d, classes, split, fold, params, &mut fits)?;
                let (pred, model, converged) = run_logreg(&per_pos[p], d, classes, &train, &test, c.value, params, fold == saved_fold);
                fits.add(converged);
                Ok(TaskOut::LogReg { p, fold, test, pred, model, c, fits })
            }
            Task::Ridge { p } => {
                let (oof, w, b, alphas) = run_ridge(&per_pos[p], d, targets, split, params)?;
                Ok(TaskOut::Ridge { p, oof, w, b, alphas })
            }
        })
        .collect();
    let mut pos: Vec<PosOut> = positions
        .iter()
        .map(|&position| PosOut { position, chosen: Vec::new(), metrics: Vec::new(), logreg: None, classes: Vec::new(), ridge: None, mean: vec![0.0; d], scale: vec![1.0; d], unconverged: 0, fits: 0 })
        .collect();
    // Out-of-fold predictions per position.
    let mut cls_pred: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_pos];
    let mut num_pred: Vec<Vec<(usize, Vec<f64>)>> = vec![Vec::new(); n_pos];
    for o in outs {
        match o? {
            TaskOut::LogReg { p, fold, test, pred, model, c, fits } => {
                pos[p].fits += fits.made;
                pos[p].unconverged += fits.unconverged;
                if c.by_cv {
                    pos[p].chosen.push(("C".to_string(), fit_name(fold), c.value));
                }
                if fold.is_some() {
                    cls_pred[p].extend(test.into_iter().zip(pred));
                }
                if let Some(m) = model {
                    pos[p].logreg = Some((m.w, m.b, m.k));
                    pos[p].classes = m.classes;
                    pos[p].mean = m.mean;
                    pos[p].scale = m.scale;
                }
            }
            TaskOut::Ridge { p, oof, w, b, alphas } => {
                num_pred[p] = oof;
                pos[p].ridge = Some((w, b));
                if params.alpha.is_grid() {
                    for (fold, values) in alphas {
                        for (name, value) in targets.numeric_names.iter().zip(values) {
                            pos[p].chosen.push((format!("alpha:{name}"), fit_name(fold), value));
                        }
                    }
                }
            }
        }
    }
    let seed = params.seed;
    for p in 0..n_pos {
        if let Some(classes) = &targets.classes {
            let mut cp = std::mem::take(&mut cls_pred[p]);
            cp.sort_unstable();
            let pred: Vec<usize> = cp.iter().map(|x| x.1).collect();
            let gold: Vec<usize> = cp.iter().map(|x| classes[x.0]).collect();
            let acc = accuracy(&pred, &gold);
            let ci = bootstrap_ci(pred.len(), seed ^ (p as u64 + 1), params.bootstrap, |idx| idx.iter().filter(|&&i| pred[i] == gold[i]).count() as f64 / idx.len() as f64);
            pos[p].metrics.push(("accuracy".into(), acc, ci, pred.len()));
        }
        if !targets.numeric_names.is_empty() {
            let mut np = std::mem::take(&mut num_pred[p]);
            np.sort_by_key(|x| x.0);
            let r = targets.numeric_names.len();
            for (c, name) in targets.numeric_names.iter().enumerate() {
                let pred: Vec<f64> = np.iter().map(|x| x.1[c]).collect();
                let gold: Vec<f64> = np.iter().map(|x| targets.numeric[x.0 * r + c]).collect();
                let v = r2(&pred, &gold);
                let ci = bootstrap_ci(pred.len(), seed ^ ((p as u64 + 1) << 8) ^ (c as u64 + 1), params.bootstrap, |idx| {
                    let pp: Vec<f64> = idx.iter().map(|&i| pred[i]).collect();
                    let gg: Vec<f64> = idx.iter().map(|&i| gold[i]).collect();
                    r2(&pp, &gg)
                });
                pos[p].metrics.push((format!("r2:{name}"), v, ci, pred.len()));
            }
        }
    }
    Ok(pos)
}

/// Writes probe_results.csv (site, layer, position, metric, value, ci_low, ci_high, n).
/// Writes regularisation.csv: site,layer,position,penalty,fit,value, one line per penalty
/// chosen by inner cross-validation.
pub fn write_chosen_csv(path: &Path, rows: &[ChosenRow]) -> Result<()> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    let err = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record(["site", "layer", "position", "penalty", "fit", "value"]).map_err(err)?;
    for r in rows {
        w.serialize(r).map_err(err)?;
    }
    let bytes = w.into_inner().map_err(|e| Error::file(path, e.to_string()))?;
    crate::io::write_atomic(path, &bytes)
}

pub fn write_results_csv(path: &Path, rows: &[ResultRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record(["site", "layer", "position", "metric", "value", "ci_low", "ci_high", "n"]).map_err(err)?;
    for r in rows {
        let f = |v: f64| if v.is_finite() { format!("{v:.6}") } else { String::new() };
        w.write_record([r.site.clone(), r.layer.to_string(), r.position.to_string(), r.metric.clone(), f(r.value), f(r.ci_low), f(r.ci_high), r.n.to_string()]).map_err(err)?;
    }
    let bytes = w.into_inner().map_err(|e| Error::file(path, e.to_string()))?;
    crate::io::write_atomic(path, &bytes)
}

/// Reads probe_results.csv back.
pub fn read_results_csv(path: &Path) -> Result<Vec<ResultRow>> {
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, e.to_string()))?;
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| Error::file(path, e.to_string()))?;
        let num = |i: usize| rec.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        out.push(ResultRow {
            site: rec.get(0).unwrap_or("").to_string(),
            layer: rec.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            position: rec.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            metric: rec.get(3).unwrap_or("").to_string(),
            value: num(4),
            ci_low: num(5),
            ci_high: num(6),
            n: rec.get(7).and_then(|s| s.parse().ok()).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Where probe outputs of a pipeline directory live.
pub fn probes_dir(out: &Path) -> PathBuf {
    out.join("probes")
}
