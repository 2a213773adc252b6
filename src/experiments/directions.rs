//! `patchbay directions`: steering directions per site, written as one safetensors file that
//! steering reads back. Four methods: class-mean differences and Wang et al.'s context-averaged
//! differences from a sharded capture (the probe pipeline's `acts/`), the rows of a saved probe's
//! weights, and Tak et al.'s unique-effect vectors of a set of directions read from such a file.
//!
//! File contract (`patchbay-directions-1`): one f32 tensor `[width]` per (site, name), named
//! `<TransformerLens site>/<name>` (width: the site's per-token width, d_model for the residual
//! sites); a set's subspace is one f32 tensor `[k, width]` named `<site>/subspace` (orthonormal
//! rows; `learn::directions::projector` of it is P). String metadata: `format` =
//! `patchbay-directions-1`, `method`, `sites`, `classes` (the names after `<site>/`, in order),
//! `positions`, and the method's provenance (`model`, `config_sha256`, `rows`, `dataset`, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use crate::experiments::shards::{ShardMeta, read_site};
use crate::io::OutDtype;
use crate::io::tensorfile::{TensorData, TensorFile, write};
use crate::learn::directions::{Versus, class_mean_directions, context_averaged_directions, unique_effect_named};
use crate::sites::SiteKind;
use crate::{Error, Result};

/// The format tag of a directions file.
pub const FORMAT: &str = "patchbay-directions-1";

/// The tensor name of a set's subspace at a site (`<site>/subspace`).
pub const SUBSPACE: &str = "subspace";

/// The directions of one site.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteDirections {
    pub site: String,
    pub width: usize,
    /// The names after `<site>/`, one per direction.
    pub names: Vec<String>,
    /// `[k][width]`, in name order.
    pub directions: Vec<Vec<f32>>,
    /// `[k, width]` row-major: orthonormal rows spanning a set (written as `<site>/subspace`).
    pub subspace: Option<Vec<f32>>,
}

/// Each selected prompt's activations at `site`, averaged over the captured positions:
/// `[n_rows, width]` for the prompts `rows` (ascending), and the width.
fn site_rows(acts: &Path, meta: &ShardMeta, site: &str, rows: &[usize]) -> Result<(Vec<f32>, usize)> {
    let n_pos = meta.positions.len();
    let mut out = Vec::new();
    let mut width = 0;
    let mut next = rows.iter().peekable();
    for k in 0..meta.n_shards {
        let range = meta.shard_range(k);
        if next.peek().is_none_or(|&&r| r >= range.end) {
            continue;
        }
        // x: [shard rows, n_pos, width]
        let (shape, x) = read_site(acts, k, site)?;
        width = shape[2];
        while let Some(&r) = next.next_if(|&&r| r < range.end) {
            let at = (r - range.start) * n_pos * width;
            let mut mean = vec![0.0f32; width];
            for p in 0..n_pos {
                mean.iter_mut().zip(&x[at + p * width..at + (p + 1) * width]).for_each(|(m, &v)| *m += v / n_pos as f32);
            }
            out.extend_from_slice(&mean);
        }
    }
    Ok((out, width))
}

/// Directions at every captured site: `per_site` maps the prompts `rows`' activations
/// (`[rows.len(), width]`, averaged over the positions) and the width to one optional direction
/// per name of `names`; the Nones are left out. Err when a direction is not finite, naming it.
fn from_capture(acts: &Path, meta: &ShardMeta, rows: &[usize], names: &[String], progress: &ProgressBar, per_site: impl Fn(&[f32], usize) -> Result<Vec<Option<Vec<f32>>>>) -> Result<Vec<SiteDirections>> {
    let mut out = Vec::with_capacity(meta.sites.len());
    for site in &meta.sites {
        let (x, width) = site_rows(acts, meta, site, rows)?;
        let (mut kept, mut directions) = (Vec::new(), Vec::new());
        for (name, d) in names.iter().zip(per_site(&x, width)?) {
            let Some(d) = d else { continue };
            if let Some(j) = d.iter().position(|v| !v.is_finite()) {
                return Err(Error::input(format!("{site}/{name}: the direction is not finite at {j} (NaN or infinite activations)")));
            }
            kept.push(name.clone());
            directions.push(d);
        }
        out.push(SiteDirections { site: site.clone(), width, names: kept, directions, subspace: None });
        progress.inc(1);
    }
    Ok(out)
}

/// Class-mean directions at every captured site: for class c, the mean activation (averaged
/// over the captured positions) of its prompts minus that of the prompts `versus` names.
/// `classes[i]` is prompt i's class (None: the prompt takes no part). Err when a class has no
/// prompt, or a direction is not finite (NaN or infinite activations), naming it.
pub fn class_mean_from_capture(acts: &Path, meta: &ShardMeta, classes: &[Option<usize>], names: &[String], versus: Versus, progress: &ProgressBar) -> Result<Vec<SiteDirections>> {
    check_classes(classes, names, versus)?;
    let rows: Vec<usize> = (0..classes.len()).filter(|&i| classes[i].is_some()).collect();
    let row_classes: Vec<usize> = rows.iter().filter_map(|&i| classes[i]).collect();
    from_capture(acts, meta, &rows, names, progress, |x, width| class_mean_directions(x, width, &row_classes, names.len(), versus))
}

/// Wang et al.'s context-averaged directions at every captured site: for each class c other
/// than `neutral`, the mean over scenarios of x(s, c) - x(s, neutral), x the activation averaged
/// over the captured positions ([`context_averaged_directions`]). Prompt i belongs to scenario
/// `scenario[i]` and class `classes[i]`. Err as [`class_mean_from_capture`], or when a class has
/// no scenario with a neutral prompt.
pub fn context_averaged_from_capture(acts: &Path, meta: &ShardMeta, scenario: &[usize], classes: &[usize], names: &[String], neutral: usize, progress: &ProgressBar) -> Result<Vec<SiteDirections>> {
    check_classes(&classes.iter().map(|&c| Some(c)).collect::<Vec<_>>(), names, Versus::Class(neutral))?;
    let rows: Vec<usize> = (0..classes.len()).collect();
    from_capture(acts, meta, &rows, names, progress, |x, width| context_averaged_directions(x, width, scenario, classes, names.len(), neutral))
}

/// Every class has a prompt, and there are at least 2 classes (before any capture is spent).
pub fn check_classes(classes: &[Option<usize>], names: &[String], versus: Versus) -> Result<()> {
    let counts = class_counts(classes, names.len());
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        return Err(Error::input(format!("class `{}` has no prompt: every class needs at least one", names[c])));
    }
    if names.len() < 2 {
        let against = if versus == Versus::Rest { "the rest" } else { "a class" };
        return Err(Error::input(format!("directions against {against} need at least 2 classes")));
    }
    Ok(())
}

/// Prompts per class: `[k]`.
pub fn class_counts(classes: &[Option<usize>], k: usize) -> Vec<usize> {
    let mut counts = vec![0; k];
    classes.iter().flatten().for_each(|&c| counts[c] += 1);
    counts
}

/// Writes the directions file (see the module doc) with `metadata`, to which `format`, `sites`
/// and `classes` (the names of the first site) are added.
pub fn write_directions(path: &Path, dirs: &[SiteDirections], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, TensorData)> = Vec::new();
    for s in dirs {
        tensors.extend(s.directions.iter().zip(&s.names).map(|(d, name)| (format!("{}/{name}", s.site), vec![s.width], TensorData::F32(d, OutDtype::F32))));
        if let Some(b) = &s.subspace {
            tensors.push((format!("{}/{SUBSPACE}", s.site), vec![b.len() / s.width.max(1), s.width], TensorData::F32(b, OutDtype::F32)));
        }
    }
    let mut metadata = metadata.clone();
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("sites".into(), dirs.iter().map(|s| s.site.as_str()).collect::<Vec<_>>().join(","));
    metadata.insert("classes".into(), dirs.first().map_or(String::new(), |s| s.names.join(",")));
    write(path, &tensors, &metadata)
}

/// Reads a directions file: its sites (in the order of its `sites` metadata, else by name) and
/// metadata. Err when it is not a `patchbay-directions-1` file, a tensor is not `<site>/<name>`
/// of shape `[width]` (or `[k, width]` for a subspace), or the directions of a site differ in
/// width, naming the tensors.
pub fn read_directions(path: &Path) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let mut f = TensorFile::open(path)?;
    let metadata: BTreeMap<String, String> = f.metadata.clone().into_iter().collect();
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::file(path, format!("not a directions file (metadata format is {:?}, expected {FORMAT})", metadata.get("format"))));
    }
    let mut names: Vec<String> = f.entries.keys().cloned().collect();
    names.sort();
    let mut sites: Vec<SiteDirections> = Vec::new();
    for tensor in names {
        let (site, name) = tensor.split_once('/').ok_or_else(|| Error::file(path, format!("tensor `{tensor}` is not named <site>/<name>")))?;
        let (shape, v) = f.read_f32(&tensor)?;
        let width = *shape.last().unwrap_or(&0);
        let i = match sites.iter().position(|s| s.site == site) {
            Some(i) => i,
            None => {
                sites.push(SiteDirections { site: site.to_string(), width, names: Vec::new(), directions: Vec::new(), subspace: None });
                sites.len() - 1
            }
        };
        let s = &mut sites[i];
        if width != s.width {
            let other = s.names.first().map_or(format!("{site}/{SUBSPACE}"), |n| format!("{site}/{n}"));
            return Err(Error::file(path, format!("`{tensor}` has width {width} but `{other}` has width {}: the directions of a site must have one width", s.width)));
        }
        match (name, shape.len()) {
            (SUBSPACE, 2) => s.subspace = Some(v),
            (_, 1) if name != SUBSPACE => {
                s.names.push(name.to_string());
                s.directions.push(v);
            }
            _ => return Err(Error::file(path, format!("tensor `{tensor}` has shape {shape:?}: a direction is [width], a {SUBSPACE} [k, width]"))),
        }
    }
    if let Some(order) = metadata.get("sites") {
        let order: Vec<&str> = order.split(',').collect();
        sites.sort_by_key(|s| order.iter().position(|o| *o == s.site).unwrap_or(usize::MAX));
    }
    Ok((sites, metadata))
}

/// The sites of `available` (TransformerLens names) that `spec` selects: comma-separated names,
/// globs over them (`blocks.*.hook_resid_post`) or short names (`resid_post`: every layer), in
/// `available`'s order; None selects all. Err naming an item that selects nothing.
pub fn select_sites(available: &[String], spec: Option<&str>, source: &str) -> Result<Vec<String>> {
    let Some(spec) = spec else { return Ok(available.to_vec()) };
    let kind_of = |name: &str| -> Option<SiteKind> {
        let suffix = name.strip_prefix("blocks.").and_then(|r| r.split_once('.')).map_or(name, |(_, s)| s);
        SiteKind::ALL.iter().copied().find(|k| k.tl_suffix() == suffix)
    };
    let mut keep = vec![false; available.len()];
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let short = SiteKind::from_short_name(item);
        let pat = glob::Pattern::new(item).map_err(|e| Error::input(format!("site pattern `{item}`: {e}")))?;
        let hits: Vec<usize> = (0..available.len()).filter(|&i| short.map_or(pat.matches(&available[i]), |k| kind_of(&available[i]) == Some(k))).collect();
        if hits.is_empty() {
            return Err(Error::input(format!("--sites {item}: no such site in {source} (it has: {})", available.join(", "))));
        }
        hits.into_iter().for_each(|i| keep[i] = true);
    }
    Ok(available.iter().zip(keep).filter(|(_, k)| *k).map(|(s, _)| s.clone()).collect())
}

/// Tak et al.'s unique-effect vectors of the set `names` at each site of `sites`: every
/// direction projected onto the orthogonal complement of the span of the others, named
/// `<name>.unique`, and the set's subspace (orthonormal rows). Also returns the unique effect
/// that keeps the smallest share of its direction's norm (`<site>/<name>`, |u| / |v|): near 0,
/// the set is nearly dependent. Err naming the site and the direction when one is missing, zero
/// or not finite, or the set is linearly dependent.
pub fn unique_effect_sets(src: &[SiteDirections], sites: &[String], names: &[String]) -> Result<(Vec<SiteDirections>, (String, f64))> {
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let mut weakest = (String::new(), f64::INFINITY);
    let mut out = Vec::with_capacity(sites.len());
    for site in sites {
        let s = src.iter().find(|s| &s.site == site).ok_or_else(|| Error::input(format!("no site {site}")))?;
        // set: [k, width], in the order of `names`
        let mut set = Vec::with_capacity(names.len() * s.width);
        for n in names {
            let i = s.names.iter().position(|m| m == n).ok_or_else(|| Error::input(format!("{site}: no direction `{n}` (the site has: {})", s.names.join(", "))))?;
            set.extend_from_slice(&s.directions[i]);
        }
        let ue = unique_effect_named(&set, s.width, names).map_err(|e| Error::input(format!("{site}, set [{}]: {e}", names.join(", "))))?;
        for ((u, v), n) in ue.vectors.chunks(s.width).zip(set.chunks(s.width)).zip(names) {
            let share = norm(u) / norm(v);
            if share < weakest.1 {
                weakest = (format!("{site}/{n}"), share);
            }
        }
        out.push(SiteDirections {
            site: site.clone(),
            width: s.width,
            names: names.iter().map(|n| format!("{n}.unique")).collect(),
            directions: ue.vectors.chunks(s.width).map(<[f32]>::to_vec).collect(),
            subspace: Some(ue.basis),
        });
    }
    Ok((out, weakest))
}

/// The probe weight files named by `paths`: each a file, or a directory whose `*.safetensors`
/// are taken (by name; `patchbay probe` writes one per site in OUT/probes/).
pub fn probe_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p).map_err(|e| Error::io(p, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|f| f.extension().is_some_and(|x| x == "safetensors")).collect();
            if files.is_empty() {
                return Err(Error::file(p, "no probe weights (*.safetensors) in this directory"));
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The metadata keys of a probe weight file carried into the directions' provenance.
const PROBE_PROVENANCE: [&str; 7] = ["model", "config_sha256", "prompts_sha256", "C", "alpha", "standardize", "eval"];

/// Directions from saved probe weights (`patchbay probe`'s OUT/probes/<site>.safetensors) at
/// `position`: row c of the logistic regression's weight is the direction of class c, row a of
/// the ridge regression's the direction of numeric column a, as saved, i.e. acting on raw
/// activations (the standardisation is folded in: d logit / dx). `names` (None: every class,
/// then every numeric column) selects them. Returns the sites (in file order) and the
/// provenance shared by the files. Err naming the file when it is not a probe file, lacks the
/// position or a name, a class and a numeric column share a name, or the files disagree on
/// provenance.
pub fn probe_directions(files: &[PathBuf], position: i64, names: Option<&[String]>) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let mut out: Vec<SiteDirections> = Vec::new();
    let mut provenance: BTreeMap<String, String> = BTreeMap::new();
    for path in files {
        let mut f = TensorFile::open(path)?;
        let meta = |key: &str| f.metadata.get(key).cloned().ok_or_else(|| Error::file(path, format!("not a probe weight file (no `{key}` in its metadata)")));
        let list = |key: &str| -> Result<Vec<String>> { serde_json::from_str(&meta(key)?).map_err(|e| Error::file(path, format!("metadata `{key}`: {e}"))) };
        let site = meta("site")?;
        let (classes, numeric) = (list("classes")?, list("numeric")?);
        let positions: Vec<i64> = serde_json::from_str(&meta("positions")?).map_err(|e| Error::file(path, format!("metadata `positions`: {e}")))?;
        if !positions.contains(&position) {
            return Err(Error::file(path, format!("no probe at position {position} (the probes are at {})", positions.iter().map(i64::to_string).collect::<Vec<_>>().join(","))));
        }
        if let Some(n) = classes.iter().find(|c| numeric.contains(c)) {
            return Err(Error::file(path, format!("`{n}` is both a class and a numeric column: directions need distinct names")));
        }
        for key in PROBE_PROVENANCE {
            let Some(v) = f.metadata.get(key) else { continue };
            match provenance.get(key) {
                Some(w) if w != v => return Err(Error::file(path, format!("metadata `{key}` is {v}, but {} has {w}: give the probe files of one run", files[0].display()))),
                _ => provenance.insert(key.to_string(), v.clone()),
            };
        }
        // rows: (name, direction [width]) of the classifier, then of the regressions
        let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
        let mut width = 0;
        for (kind, labels) in [("logreg", &classes), ("ridge", &numeric)] {
            let tensor = format!("pos{position}.{kind}.weight");
            if labels.is_empty() || !f.entries.contains_key(&tensor) {
                continue;
            }
            // w: [labels, width]
            let (shape, w) = f.read_f32(&tensor)?;
            if shape.len() != 2 || shape[0] != labels.len() {
                return Err(Error::file(path, format!("`{tensor}` has shape {shape:?}, expected [{}, width]", labels.len())));
            }
            width = shape[1];
            rows.extend(labels.iter().cloned().zip(w.chunks(width).map(<[f32]>::to_vec)));
        }
        let (kept, directions): (Vec<String>, Vec<Vec<f32>>) = match names {
            None => rows.into_iter().unzip(),
            Some(want) => want
                .iter()
                .map(|n| rows.iter().find(|r| &r.0 == n).cloned().ok_or_else(|| Error::file(path, format!("no probe for `{n}` (it has: {})", rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join(", ")))))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip(),
        };
        if kept.is_empty() {
            return Err(Error::file(path, format!("no probe weights at position {position}")));
        }
        if out.first().is_some_and(|s| s.names != kept) {
            return Err(Error::file(path, format!("its probes [{}] differ from {}'s [{}]", kept.join(", "), files[0].display(), out[0].names.join(", "))));
        }
        out.push(SiteDirections { site, width, names: kept, directions, subspace: None });
    }
    Ok((out, provenance))
}
