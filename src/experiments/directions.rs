//! `patchbay directions`: class-mean steering directions from a sharded capture (the probe
//! pipeline's `acts/`), written as one safetensors file that steering reads back.
//!
//! File contract: one tensor per (site, class), named `<TransformerLens site>/<class>`, f32 of
//! shape `[width]` (the site's per-token width, d_model for the residual sites); string metadata
//! `format` = `patchbay-directions-1`, `method`, `versus`, `model`, `config_sha256`, `sites`,
//! `classes`, `positions`, `rows` (rows per class, `name=count,...`), plus the caller's provenance.

use std::collections::BTreeMap;
use std::path::Path;

use indicatif::ProgressBar;

use crate::experiments::shards::{ShardMeta, read_site};
use crate::io::tensorfile::{TensorData, write};
use crate::io::OutDtype;
use crate::learn::directions::{Versus, class_mean_directions};
use crate::{Error, Result};

/// The directions of one site: `[k][width]`, in class order.
pub struct SiteDirections {
    pub site: String,
    pub width: usize,
    pub directions: Vec<Vec<f32>>,
}

/// Each labelled prompt's activations at `site`, averaged over the captured positions:
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

/// Class-mean directions at every captured site: for class c, the mean activation (averaged
/// over the captured positions) of its prompts minus that of the prompts `versus` names.
/// `classes[i]` is prompt i's class (None: the prompt takes no part). Err when a class has no
/// prompt, or a direction is not finite (NaN or infinite activations), naming it.
pub fn class_mean_from_capture(acts: &Path, meta: &ShardMeta, classes: &[Option<usize>], names: &[String], versus: Versus, progress: &ProgressBar) -> Result<Vec<SiteDirections>> {
    let k = names.len();
    check_classes(classes, names, versus)?;
    let rows: Vec<usize> = (0..classes.len()).filter(|&i| classes[i].is_some()).collect();
    let row_classes: Vec<usize> = rows.iter().filter_map(|&i| classes[i]).collect();
    let mut out = Vec::with_capacity(meta.sites.len());
    for site in &meta.sites {
        let (x, width) = site_rows(acts, meta, site, &rows)?;
        let dirs = class_mean_directions(&x, width, &row_classes, k, versus)?;
        let directions = dirs
            .into_iter()
            .enumerate()
            .filter_map(|(c, d)| d.map(|d| (c, d)))
            .map(|(c, d)| match d.iter().position(|v| !v.is_finite()) {
                Some(j) => Err(Error::input(format!("{site}/{}: the direction is not finite at {j} (NaN or infinite activations)", names[c]))),
                None => Ok(d),
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(SiteDirections { site: site.clone(), width, directions });
        progress.inc(1);
    }
    Ok(out)
}

/// Every class has a prompt, and there are at least 2 classes (before any capture is spent).
pub fn check_classes(classes: &[Option<usize>], names: &[String], versus: Versus) -> Result<()> {
    let counts = class_counts(classes, names.len());
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        return Err(Error::input(format!("class `{}` has no prompt: every class needs at least one", names[c])));
    }
    if names.len() < 2 {
        let against = if versus == Versus::Rest { "the rest" } else { "a class" };
        return Err(Error::input(format!("class-mean directions against {against} need at least 2 classes")));
    }
    Ok(())
}

/// Prompts per class: `[k]`.
pub fn class_counts(classes: &[Option<usize>], k: usize) -> Vec<usize> {
    let mut counts = vec![0; k];
    classes.iter().flatten().for_each(|&c| counts[c] += 1);
    counts
}

/// Writes the directions file (see the module doc); `names` are the classes that have a
/// direction, in order.
pub fn write_directions(path: &Path, dirs: &[SiteDirections], names: &[String], metadata: &BTreeMap<String, String>) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, TensorData)> = dirs
        .iter()
        .flat_map(|s| s.directions.iter().zip(names).map(move |(d, name)| (format!("{}/{name}", s.site), vec![s.width], TensorData::F32(d, OutDtype::F32))))
        .collect();
    write(path, &tensors, metadata)
}
