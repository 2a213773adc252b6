//! Activation-patching sweeps (the Tak et al. protocol and general sweeps), resumed from clean
//! runs (DESIGN.md section 1).
//!
//! An experiment patches one site kind at a window of consecutive layers, at the same relative
//! positions, from a source prompt's clean run into a target prompt, and reads the label logits
//! at the target's last position. Two methods give the same numbers:
//! - `Naive`: one full forward of the target per experiment (the oracle and the baseline);
//! - `Resumed`: one clean pass per distinct prompt, then every experiment as a segment that
//!   starts at the window's first layer and the first patched position, over the target's clean
//!   KV prefix; segments with the same start layer share one batched forward.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::engine::{CleanRun, Engine, RunRequest, Segment};
use crate::intervene::{Capture, HeldRows, Intervention, Op};
use crate::logits::{LabelMetricsRow, argmax};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// A (source, target) pair of prompt indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pair {
    pub source: usize,
    pub target: usize,
}

/// What to patch, where, and what to read.
#[derive(Clone, Debug)]
pub struct SweepSpec {
    /// Site kinds patched (each is its own experiment).
    pub sites: Vec<SiteKind>,
    /// Heads (z, q, ...) or neurons (mlp_post) patched; None = the whole site.
    pub units: Option<Vec<usize>>,
    /// Layers patched at once: the window centred on each centre layer.
    pub window: usize,
    /// Centre layers.
    pub centers: Vec<usize>,
    /// Positions patched, resolved in each prompt (-1 = its last token).
    pub positions: Vec<i64>,
    /// Label token ids whose logits are read at the target's last position.
    pub label_tokens: Vec<u32>,
}

impl SweepSpec {
    /// The sweep of `sites` (short names of site kinds) on a model of `n_layers` layers: `units`
    /// (heads or neurons) or whole sites, windows of `window` layers at `centers` (None: every
    /// centre where the window fits), `positions` a list such as `-1` or `0,3` (not `all`),
    /// reading the logits of `label_tokens`.
    pub fn new(sites: &[String], units: Option<Vec<usize>>, window: usize, centers: Option<Vec<usize>>, positions: &str, n_layers: usize, label_tokens: Vec<u32>) -> Result<SweepSpec> {
        let sites = sites.iter().map(|s| SiteKind::from_short_name(s.trim()).ok_or_else(|| Error::input(format!("unknown site kind `{s}`")))).collect::<Result<Vec<_>>>()?;
        let positions = match Positions::parse(positions)? {
            Positions::List(l) => l,
            Positions::All => return Err(Error::input("positions `all` cannot be patched: give a list such as -1")),
        };
        let centers = centers.unwrap_or_else(|| all_centers(window, n_layers));
        Ok(SweepSpec { sites, units, window, centers, positions, label_tokens })
    }

    /// What identifies a sweep of this spec (the `sweep` of its manifest): a run directory
    /// holding another is refused, and the parts of one sweep share it. `sites` as given.
    #[allow(clippy::too_many_arguments)]
    pub fn identity(&self, config_sha256: &str, prompts: &[Vec<u32>], pairs: &[Pair], sites: &str, batch_rows: usize, mem_budget: usize, overflow: Overflow) -> serde_json::Value {
        serde_json::json!({"model_config_sha256": config_sha256, "prompts": prompts, "pairs": pairs, "sites": sites, "units": self.units, "window": self.window, "centers": self.centers, "positions": self.positions, "labels": self.label_tokens, "batch_rows": batch_rows, "mem_budget": mem_budget, "overflow": overflow.name()})
    }
}

/// Layers of the window of `window` layers centred on `center` (for even windows the centre
/// is the lower middle: W = 2 centred on 0 is layers 0 and 1), or None where it does not fit in `n_layers`.
pub fn window_layers(center: usize, window: usize, n_layers: usize) -> Option<Vec<usize>> {
    let start = center.checked_sub((window - 1) / 2)?;
    let end = start + window;
    (window > 0 && end <= n_layers).then(|| (start..end).collect())
}

/// Every centre where a window fits: for W = 5 on 16 layers, 2..=13.
pub fn all_centers(window: usize, n_layers: usize) -> Vec<usize> {
    (0..n_layers).filter(|&c| window_layers(c, window, n_layers).is_some()).collect()
}

/// One experiment of a sweep.
#[derive(Clone, Debug)]
pub struct Experiment {
    /// Index in enumeration order (pair, site, centre): stable across runs, used by --resume.
    pub id: usize,
    pub pair: Pair,
    pub site: SiteKind,
    pub center: usize,
    pub layers: Vec<usize>,
}

/// Enumerates the experiments of a sweep, pair-major, then site, then centre.
pub fn experiments(pairs: &[Pair], spec: &SweepSpec, n_layers: usize) -> Result<Vec<Experiment>> {
    if spec.window == 0 || spec.window > n_layers {
        return Err(Error::input(format!("window {} must be in 1..={n_layers}", spec.window)));
    }
    let mut out = Vec::new();
    for &pair in pairs {
        for &site in &spec.sites {
            for &center in &spec.centers {
                let layers = window_layers(center, spec.window, n_layers).ok_or_else(|| {
                    Error::input(format!("a window of {} layers centred on layer {center} does not fit in {n_layers} layers", spec.window))
                })?;
                out.push(Experiment { id: out.len(), pair, site, center, layers });
            }
        }
    }
    Ok(out)
}

/// The outcome of one experiment; one line of experiments.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResult {
    pub id: usize,
    pub target: usize,
    pub source: usize,
    /// Short site name (`resid_post`, `z`...).
    pub site: String,
    pub center: usize,
    pub layers: Vec<usize>,
    /// Absolute positions patched in the target.
    pub positions: Vec<usize>,
    /// Label logits (label order) at the last position: clean target, clean source, patched
    /// (NaN written as null, read back as NaN: see --allow-nonfinite).
    #[serde(deserialize_with = "crate::io::null_as_nan::vec")]
    pub clean_target: Vec<f32>,
    #[serde(deserialize_with = "crate::io::null_as_nan::vec")]
    pub clean_source: Vec<f32>,
    #[serde(deserialize_with = "crate::io::null_as_nan::vec")]
    pub patched: Vec<f32>,
    /// Predicted label (index) after patching, and in the clean target and source.
    pub pred: usize,
    pub target_pred: usize,
    pub source_pred: usize,
    /// The patched prediction is the source's prediction (and the clean target's was not).
    pub flipped_to_source: bool,
    /// patched[source_pred] - patched[target_pred]
    #[serde(deserialize_with = "crate::io::null_as_nan::f32")]
    pub logit_diff: f32,
    /// Probability of the source's prediction among the labels after patching.
    #[serde(deserialize_with = "crate::io::null_as_nan::f32")]
    pub source_prob: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Resumed,
    Naive,
}

/// Where the targets' clean runs that the memory budget cannot hold come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Whichever the engine's rough forward rate and [`SPILL_BYTES_PER_S`] say is faster.
    #[default]
    Auto,
    /// Spilled from the clean pass to a temporary file, read back in their group.
    Spill,
    /// Recomputed in their group.
    Recompute,
}

impl Overflow {
    /// Its name in sweep identities.
    pub fn name(self) -> &'static str {
        match self {
            Overflow::Auto => "auto",
            Overflow::Spill => "spill",
            Overflow::Recompute => "recompute",
        }
    }
}

/// Execution settings.
pub struct RunSettings<'a> {
    pub method: Method,
    /// Experiments already done (skipped).
    pub skip: &'a HashSet<usize>,
    /// Rows per batched resumed forward.
    pub batch_rows: usize,
    /// Bytes of clean KV caches held at once; targets beyond are processed in later groups.
    pub mem_budget: usize,
    /// Where the clean runs beyond `mem_budget` come from.
    pub overflow: Overflow,
    pub progress: &'a ProgressBar,
}

/// Clean values a sweep needs from one prompt used as a source.
struct SourceClean {
    /// Patched sites -> its rows at the patch positions, held by the engine where they were
    /// captured (on a device they never come to the host).
    values: HashMap<Site, HeldRows>,
    label_logits: Vec<f32>,
}

/// Runs the experiments not in `settings.skip`, calling `emit` with each result (in a
/// deterministic order: by target group, then start layer, then id for `Resumed`; by id for
/// `Naive`).
pub fn run_sweep(
    engine: &dyn Engine,
    prompts: &[Vec<u32>],
    spec: &SweepSpec,
    exps: &[Experiment],
    settings: &RunSettings,
    emit: &mut dyn FnMut(ExperimentResult) -> Result<()>,
) -> Result<()> {
    let cfg = engine.config();
    if spec.label_tokens.is_empty() {
        return Err(Error::input("no label tokens"));
    }
    if spec.positions.is_empty() {
        return Err(Error::input("no positions to patch"));
    }
    if spec.sites.contains(&SiteKind::Pattern) {
        return Err(Error::input("attention patterns cannot be patched (pick resid_pre, attn_out, mlp_out, resid_post, z, ...)"));
    }
    let skip = settings.skip;
    let todo: Vec<&Experiment> = exps.iter().filter(|e| !skip.contains(&e.id)).collect();
    if todo.is_empty() {
        return Ok(());
    }
    for e in exps {
        for p in [e.pair.source, e.pair.target] {
            if p >= prompts.len() {
                return Err(Error::input(format!("experiment {}: prompt {p} is out of range ({} prompts)", e.id, prompts.len())));
            }
        }
    }
    let positions = Positions::List(spec.positions.clone());
    let last = Positions::List(vec![-1]);
    let n_labels = spec.label_tokens.len();

    // The sites each source's clean pass captures, from every experiment (not only those to
    // run), so that a pass's request does not depend on what is skipped.
    let source_sites = source_sites(exps);
    // One clean pass over `chunk` (prompt indices): with `with_sources`, the patched values of
    // the chunk's sources (the union of their sites is captured); every prompt's label logits;
    // with `keep`, every prompt's clean run (else none).
    let clean_pass = |chunk: &[usize], with_sources: bool, keep: bool| -> Result<(Vec<CleanRun>, HashMap<usize, SourceClean>, Vec<Vec<f32>>)> {
        let sites: Vec<Site> = if with_sources { chunk.iter().filter_map(|p| source_sites.get(p)).flatten().copied().collect::<BTreeSet<_>>().into_iter().collect() } else { Vec::new() };
        let caps: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: positions.clone() }).collect();
        let req = RunRequest { captures: &caps, logits_at: Some(&last), logit_tokens: Some(&spec.label_tokens), hold_captures: true, ..Default::default() };
        let chunk_prompts: Vec<Vec<u32>> = chunk.iter().map(|&p| prompts[p].clone()).collect();
        let failed = |e: Error| Error::input(format!("clean pass of prompts {chunk:?}: {}", e.in_batch(|i| chunk[i])));
        let (runs, out) = if keep { engine.run_clean(&chunk_prompts, &req).map_err(failed)? } else { (Vec::new(), engine.run_prompts(&chunk_prompts, &req).map_err(failed)?) };
        let mut sources = HashMap::new();
        let mut row0 = 0;
        for (k, p) in chunk.iter().enumerate() {
            let n_rows = out.captured.first().map_or(0, |c| c.positions[k].len());
            if let (Some(wanted), Some(held)) = (source_sites.get(p).filter(|_| with_sources), &out.held) {
                let values = sites
                    .iter()
                    .enumerate()
                    .filter(|(_, site)| wanted.contains(site))
                    .map(|(c, &site)| Ok((site, held.rows(c, (row0..row0 + n_rows).collect())?)))
                    .collect::<Result<_>>()?;
                sources.insert(*p, SourceClean { values, label_logits: out.logits[k * n_labels..(k + 1) * n_labels].to_vec() });
            }
            row0 += n_rows;
        }
        Ok((runs, sources, out.logits.chunks(n_labels).map(<[f32]>::to_vec).collect()))
    };

    // The interventions of one experiment on batch entry `seq`.
    let interventions = |e: &Experiment, src: &SourceClean, seq: usize| -> Result<(Vec<Intervention>, Vec<usize>)> {
        let target_len = prompts[e.pair.target].len();
        let abs = positions.resolve(target_len).map_err(|err| Error::input(format!("target prompt {}: {err}", e.pair.target)))?;
        let mut ivs = Vec::with_capacity(e.layers.len());
        for &l in &e.layers {
            let site = Site::new(l, e.site);
            let (n_units, _) = e.site.units(cfg, 0);
            if let Some(&bad) = spec.units.iter().flatten().find(|&&u| u >= n_units) {
                return Err(Error::input(format!("{} {bad} is out of range (0..{n_units}) at {site}", e.site.unit_name())));
            }
            // The source's rows at the patch positions (whole rows: the units are selected in both).
            let from = src.values[&site].clone();
            ivs.push(Intervention { site, prompts: Some(vec![seq]), positions: Positions::List(abs.iter().map(|&p| p as i64).collect()), units: spec.units.clone(), op: Op::PatchHeld { from } });
        }
        Ok((ivs, abs))
    };
    // The label indices of an experiment's metrics (computed by the engine, on a device by its
    // label_metrics kernel): pred, patched[source_pred] - patched[target_pred],
    // softmax(patched)[source_pred].
    let metric_index = |src: &SourceClean, clean_target: &[f32]| -> [i32; 3] {
        let (target_pred, source_pred) = (argmax(clean_target) as i32, argmax(&src.label_logits) as i32);
        [source_pred, target_pred, source_pred]
    };
    let result = |e: &Experiment, src: &SourceClean, abs: Vec<usize>, clean_target: &[f32], patched: Vec<f32>, m: LabelMetricsRow| -> ExperimentResult {
        let clean_source = src.label_logits.clone();
        let (target_pred, source_pred) = (argmax(clean_target), argmax(&clean_source));
        let pred = m.pred as usize;
        ExperimentResult {
            id: e.id,
            target: e.pair.target,
            source: e.pair.source,
            site: e.site.short_name().to_string(),
            center: e.center,
            layers: e.layers.clone(),
            positions: abs,
            clean_target: clean_target.to_vec(),
            flipped_to_source: pred == source_pred && target_pred != source_pred,
            logit_diff: m.logit_diff,
            source_prob: m.prob,
            clean_source,
            patched,
            pred,
            target_pred,
            source_pred,
        }
    };

    match settings.method {
        Method::Naive => {
            // Every prompt alone (clean passes included), so results do not depend on which
            // other experiments run.
            let mut clean_targets: HashMap<usize, Vec<f32>> = HashMap::new();
            let mut sources: HashMap<usize, SourceClean> = HashMap::new();
            for e in &todo {
                if !sources.contains_key(&e.pair.source) {
                    sources.extend(clean_pass(&[e.pair.source], true, false)?.1);
                }
                let src = &sources[&e.pair.source];
                let t = e.pair.target;
                let target = std::slice::from_ref(&prompts[t]);
                if !clean_targets.contains_key(&t) {
                    let req = RunRequest { logits_at: Some(&last), logit_tokens: Some(&spec.label_tokens), ..Default::default() };
                    clean_targets.insert(t, engine.run_prompts(target, &req).map_err(|e| e.in_batch(|_| t))?.logits);
                }
                let (ivs, abs) = interventions(e, src, 0)?;
                let index = [metric_index(src, &clean_targets[&t])];
                let req = RunRequest { interventions: &ivs, logits_at: Some(&last), logit_tokens: Some(&spec.label_tokens), label_metrics: Some(&index), ..Default::default() };
                let mut out = engine.run_prompts(target, &req).map_err(|e| e.in_batch(|_| t))?;
                emit(result(e, src, abs, &clean_targets[&t], out.logits, out.metrics.remove(0)))?;
                settings.progress.inc(1);
            }
        }
        Method::Resumed => {
            // One clean pass per prompt where the memory budget holds every target's clean run
            // (see `CleanSchedule`). Its passes, groups and batches are formed from ALL
            // experiments, whatever is already done or skipped, and nothing is batched across
            // groups, so that every experiment is computed in the same batches as in an
            // uninterrupted, unsharded run (bit-identical results after --resume and in shards
            // made of whole groups); skipped groups, batches and the passes only they need are
            // not computed, partly skipped batches are and only their other experiments are
            // emitted.
            let mut by_target: BTreeMap<usize, Vec<&Experiment>> = BTreeMap::new();
            for e in exps {
                by_target.entry(e.pair.target).or_default().push(e);
            }
            let schedule = CleanSchedule::new(engine, prompts, exps, spec, settings.mem_budget, settings.overflow);
            let live = |group: &[usize]| group.iter().any(|t| by_target[t].iter().any(|e| !skip.contains(&e.id)));
            // Prompts the sweep's clean pass is run for: sources of live groups, and their held targets.
            // Targets whose clean runs the pass spills (the budget does not hold them).
            let spilled_target = |p: &usize| schedule.spill && by_target.contains_key(p) && !schedule.held.contains(p);
            let mut needed: HashSet<usize> = HashSet::new();
            for group in schedule.groups.iter().filter(|g| live(g)) {
                for t in group {
                    needed.extend(by_target[t].iter().map(|e| e.pair.source));
                    if schedule.held.contains(t) || spilled_target(t) {
                        needed.insert(*t);
                    }
                }
            }
            let mut sources: HashMap<usize, SourceClean> = HashMap::new();
            // Clean runs (KV cache, resid_pre at every layer) and label logits of targets, kept
            // until their group is done.
            let mut clean: HashMap<usize, (CleanRun, Vec<f32>)> = HashMap::new();
            let mut spill = Spill::default();
            for chunk in chunk_by_rows(&schedule.clean_pass, |&p| prompts[p].len(), settings.batch_rows) {
                if !chunk.iter().any(|p| needed.contains(p)) {
                    continue;
                }
                let keep = |p: &usize| (schedule.held.contains(p) || spilled_target(p)) && needed.contains(p);
                let (runs, srcs, logits) = clean_pass(chunk, true, chunk.iter().any(keep))?;
                sources.extend(srcs);
                for ((p, run), logits) in chunk.iter().zip(runs).zip(logits) {
                    if keep(p) && spilled_target(p) {
                        spill.write(*p, &engine.clean_run_to_bytes(&run)?, logits)?;
                    } else if keep(p) {
                        clean.insert(*p, (run, logits));
                    }
                }
            }
            for group in schedule.groups.iter().filter(|g| live(g)) {
                // Targets whose clean runs the budget did not hold: read back, or recomputed now.
                let rest: Vec<usize> = group.iter().copied().filter(|t| !schedule.held.contains(t)).collect();
                if schedule.spill {
                    for &t in &rest {
                        let (bytes, logits) = spill.read(t)?;
                        clean.insert(t, (engine.clean_run_from_bytes(prompts[t].len(), &bytes)?, logits));
                    }
                } else {
                    for chunk in chunk_by_rows(&rest, |&t| prompts[t].len(), settings.batch_rows) {
                        let (runs, _, logits) = clean_pass(chunk, false, true)?;
                        clean.extend(chunk.iter().copied().zip(runs.into_iter().zip(logits)));
                    }
                }
                // Segments of this group, by start layer then id.
                let mut segs: Vec<(usize, &Experiment)> = group.iter().flat_map(|t| by_target[t].iter().map(|e| (e.layers[0], *e))).collect();
                segs.sort_by_key(|&(l, e)| (l, e.id));
                let mut i = 0;
                while i < segs.len() {
                    let layer = segs[i].0;
                    // One batch: segments of this start layer up to batch_rows rows.
                    let mut batch: Vec<(&Experiment, Vec<Intervention>, Vec<usize>, usize)> = Vec::new();
                    let mut rows = 0;
                    while i < segs.len() && segs[i].0 == layer && (batch.is_empty() || rows < settings.batch_rows) {
                        let e = segs[i].1;
                        let (ivs, abs) = interventions(e, &sources[&e.pair.source], batch.len())?;
                        let p0 = abs.iter().copied().min().unwrap_or(0);
                        rows += prompts[e.pair.target].len() - p0;
                        batch.push((e, ivs, abs, p0));
                        i += 1;
                    }
                    if batch.iter().all(|b| skip.contains(&b.0.id)) {
                        continue;
                    }
                    let segments: Vec<Segment> = batch.iter().map(|(e, _, _, p0)| Segment { clean: &clean[&e.pair.target].0, p0: *p0 }).collect();
                    let ivs: Vec<Intervention> = batch.iter().flat_map(|b| b.1.iter().cloned()).collect();
                    let index: Vec<[i32; 3]> = batch.iter().map(|b| metric_index(&sources[&b.0.pair.source], &clean[&b.0.pair.target].1)).collect();
                    let req = RunRequest { interventions: &ivs, logits_at: Some(&last), logit_tokens: Some(&spec.label_tokens), label_metrics: Some(&index), ..Default::default() };
                    let out = engine.run_segments(layer, &segments, &req).map_err(|e| e.in_batch(|k| batch[k].0.pair.target))?;
                    for (k, (e, _, abs, _)) in batch.into_iter().enumerate().filter(|(_, b)| !skip.contains(&b.0.id)) {
                        let patched = out.logits[k * n_labels..(k + 1) * n_labels].to_vec();
                        emit(result(e, &sources[&e.pair.source], abs, &clean[&e.pair.target].1, patched, out.metrics[k]))?;
                        settings.progress.inc(1);
                    }
                }
                for t in group {
                    clean.remove(t);
                }
            }
        }
    }
    Ok(())
}

/// Clean runs spilled out of memory: their bytes in one anonymous temporary file (removed when
/// closed, also when the run is killed), with their label logits.
#[derive(Default)]
struct Spill {
    file: Option<std::fs::File>,
    /// End of the file.
    end: u64,
    /// Prompt -> (offset, bytes, label logits).
    runs: HashMap<usize, (u64, usize, Vec<f32>)>,
}

impl Spill {
    fn failed(e: std::io::Error) -> Error {
        Error::io(std::env::temp_dir(), e)
    }

    fn write(&mut self, prompt: usize, bytes: &[u8], logits: Vec<f32>) -> Result<()> {
        use std::io::Write;
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(tempfile::tempfile().map_err(Spill::failed)?),
        };
        file.write_all(bytes).map_err(Spill::failed)?;
        self.runs.insert(prompt, (self.end, bytes.len(), logits));
        self.end += bytes.len() as u64;
        Ok(())
    }

    /// The bytes and label logits of `prompt`'s spilled clean run.
    fn read(&mut self, prompt: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        use std::io::{Read, Seek, SeekFrom};
        let (offset, n, logits) = self.runs.get(&prompt).cloned().ok_or_else(|| Error::input(format!("prompt {prompt}: its clean run was not spilled")))?;
        let mut bytes = vec![0u8; n];
        if let Some(file) = self.file.as_mut() {
            file.seek(SeekFrom::Start(offset)).map_err(Spill::failed)?;
            file.read_exact(&mut bytes).map_err(Spill::failed)?;
            file.seek(SeekFrom::End(0)).map_err(Spill::failed)?;
        }
        Ok((bytes, logits))
    }
}

/// Most targets in one group of the resumed method: bounds the unit of computation so that
/// sweeps split into shards of whole groups (64 targets of a Tak-style sweep, positions -1, give
/// batches of a few hundred segment rows per start layer).
pub const GROUP_TARGETS: usize = 64;

/// The target groups of the resumed method: targets in index order, cut so that each group's
/// kept clean runs fit `mem_budget` and it holds at most [`GROUP_TARGETS`] targets (at least
/// one). A group is the unit of computation: nothing is batched across groups, so a shard made
/// of whole groups computes exactly what the unsharded run does for them.
pub fn target_groups(engine: &dyn Engine, prompts: &[Vec<u32>], exps: &[Experiment], mem_budget: usize) -> Vec<Vec<usize>> {
    let targets: BTreeSet<usize> = exps.iter().map(|e| e.pair.target).collect();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for t in targets {
        let b = engine.clean_run_bytes(prompts.get(t).map_or(0, Vec::len));
        match groups.last_mut() {
            Some(g) if used + b <= mem_budget && g.len() < GROUP_TARGETS => g.push(t),
            _ => {
                groups.push(vec![t]);
                used = 0;
            }
        }
        used += b;
    }
    groups
}

/// The sites patched from each source prompt (source -> sites), over `exps`.
fn source_sites(exps: &[Experiment]) -> BTreeMap<usize, BTreeSet<Site>> {
    let mut out: BTreeMap<usize, BTreeSet<Site>> = BTreeMap::new();
    for e in exps {
        out.entry(e.pair.source).or_default().extend(e.layers.iter().map(|&l| Site::new(l, e.site)));
    }
    out
}

/// A rough rate of writing a spilled clean run to the temporary directory and reading it back
/// (an SSD), in bytes/s, weighed against the engine's forward rate.
pub const SPILL_BYTES_PER_S: f64 = 1e9;

/// Where the resumed method's clean runs come from. One clean pass runs every source and every
/// held target once (index order, batched by rows); the sources' patched values it captures are
/// kept for the whole sweep (small: sites x window layers x positions x width, f32). The
/// targets' clean runs (KV caches and resid_pre at every layer: large) are held from that pass
/// for the first target groups that fit the memory budget beside the source values. The other
/// groups' clean runs either come from that pass too, spilled to a temporary file and read back
/// when their group comes, or are recomputed then (a target that is also a source then runs
/// twice): as [`Overflow`] says; by default whichever the engine's rough forward rate and
/// [`SPILL_BYTES_PER_S`] say is faster (on a CPU spilling unless the model is tiny, on a GPU
/// recomputing). Depends only on the sweep, the budget and the
/// engine, so every run and shard of a sweep makes the same passes.
#[derive(Clone, Debug)]
pub struct CleanSchedule {
    /// The target groups ([`target_groups`]), in the order they run.
    pub groups: Vec<Vec<usize>>,
    /// Targets whose clean runs are held from the sweep's clean pass.
    pub held: BTreeSet<usize>,
    /// The other targets' clean runs are spilled from the clean pass (else recomputed).
    pub spill: bool,
    /// Estimated seconds to recompute, and to spill and read back, the clean runs not held.
    pub recompute_s: f64,
    pub spill_s: f64,
    /// Prompts of the sweep's clean pass, in index order: every source and every held (or
    /// spilled) target.
    pub clean_pass: Vec<usize>,
    /// Bytes of the source values kept for the whole sweep (f32, every position patched).
    pub source_bytes: usize,
}

impl CleanSchedule {
    pub fn new(engine: &dyn Engine, prompts: &[Vec<u32>], exps: &[Experiment], spec: &SweepSpec, mem_budget: usize, overflow: Overflow) -> CleanSchedule {
        let cfg = engine.config();
        let groups = target_groups(engine, prompts, exps, mem_budget);
        let sources = source_sites(exps);
        let width = |site: &Site| {
            let (n, w) = site.kind.units(cfg, 0);
            n * w
        };
        let len = |t: usize| prompts.get(t).map_or(0, Vec::len);
        let source_bytes = sources.values().flatten().map(width).sum::<usize>() * spec.positions.len() * 4;
        let mut budget = mem_budget.saturating_sub(source_bytes);
        let mut held = BTreeSet::new();
        for group in &groups {
            let bytes: usize = group.iter().map(|&t| engine.clean_run_bytes(len(t))).sum();
            if bytes > budget {
                break;
            }
            budget -= bytes;
            held.extend(group.iter().copied());
        }
        let rest: Vec<usize> = groups.iter().flatten().copied().filter(|t| !held.contains(t)).collect();
        // About 2 FLOPs per parameter and token; the spill is written once and read once.
        let recompute_s = rest.iter().map(|&t| 2.0 * cfg.n_params().0 as f64 * len(t) as f64).sum::<f64>() / engine.forward_flops_per_s();
        let spill_s = rest.iter().map(|&t| 2.0 * engine.clean_run_bytes(len(t)) as f64).sum::<f64>() / SPILL_BYTES_PER_S;
        let spill = !rest.is_empty()
            && match overflow {
                Overflow::Auto => spill_s < recompute_s,
                Overflow::Spill => true,
                Overflow::Recompute => false,
            };
        let spilled = rest.iter().filter(|_| spill);
        let clean_pass = sources.keys().chain(&held).chain(spilled).copied().collect::<BTreeSet<_>>().into_iter().collect();
        CleanSchedule { groups, held, spill, recompute_s, spill_s, clean_pass, source_bytes }
    }

    /// Targets whose clean runs are not held from the clean pass (spilled or recomputed).
    pub fn not_held(&self) -> usize {
        self.groups.iter().map(Vec::len).sum::<usize>() - self.held.len()
    }

    /// The schedule in the manifest: "held" (every prompt's clean pass runs once and is held),
    /// "spill" (the budget holds the clean runs of `held_targets` targets, the others are spilled
    /// to a temporary file) or "recompute" (they are recomputed in their group), the counts and,
    /// when not all are held, the estimates the choice was made on.
    pub fn summary(&self) -> serde_json::Value {
        let state = match (self.not_held(), self.spill) {
            (0, _) => "held",
            (_, true) => "spill",
            (_, false) => "recompute",
        };
        let mut s = serde_json::json!({"target_clean_runs": state, "held_targets": self.held.len(), "spilled_targets": if self.spill { self.not_held() } else { 0 }, "recomputed_targets": if self.spill { 0 } else { self.not_held() }, "source_bytes": self.source_bytes});
        if self.not_held() > 0 {
            s["estimate_s"] = serde_json::json!({"recompute": self.recompute_s, "spill": self.spill_s});
        }
        s
    }
}

/// Consecutive chunks of `items` of at most `max_rows` rows each (`rows` of an item), at least
/// one item per chunk.
pub(crate) fn chunk_by_rows<T>(items: &[T], rows: impl Fn(&T) -> usize, max_rows: usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut n = 1;
        let mut total = rows(&rest[0]);
        while n < rest.len() && total + rows(&rest[n]) <= max_rows {
            total += rows(&rest[n]);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// One row of summary.csv: a site at a window centre over all pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub site: String,
    pub center: usize,
    pub n: usize,
    pub flip_rate: f64,
    /// Wilson 95% interval of the flip rate.
    pub flip_lo: f64,
    pub flip_hi: f64,
    pub mean_logit_diff: f64,
    /// Normal 95% interval of the mean logit difference.
    pub diff_lo: f64,
    pub diff_hi: f64,
}

/// Aggregates results per (site, centre), sorted by site (first appearance) then centre.
pub fn summarize(results: &[ExperimentResult]) -> Vec<SummaryRow> {
    let mut sites: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<(usize, usize), Vec<&ExperimentResult>> = BTreeMap::new();
    for r in results {
        let si = match sites.iter().position(|s| *s == r.site) {
            Some(i) => i,
            None => {
                sites.push(&r.site);
                sites.len() - 1
            }
        };
        groups.entry((si, r.center)).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((si, center), rs)| {
            let n = rs.len() as f64;
            let k = rs.iter().filter(|r| r.flipped_to_source).count() as f64;
            let p = k / n;
            let z = 1.96f64;
            let denom = 1.0 + z * z / n;
            let centre = (p + z * z / (2.0 * n)) / denom;
            let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
            let diffs: Vec<f64> = rs.iter().map(|r| r.logit_diff as f64).collect();
            let mean = diffs.iter().sum::<f64>() / n;
            let var = if rs.len() > 1 { diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
            let se = (var / n).sqrt();
            SummaryRow {
                site: sites[si].to_string(),
                center,
                n: rs.len(),
                flip_rate: p,
                flip_lo: (centre - half).max(0.0),
                flip_hi: (centre + half).min(1.0),
                mean_logit_diff: mean,
                diff_lo: mean - z * se,
                diff_hi: mean + z * se,
            }
        })
        .collect()
}

/// summary.csv text.
pub fn summary_csv(rows: &[SummaryRow]) -> String {
    let mut s = String::from("site,center,n,flip_rate,flip_rate_lo95,flip_rate_hi95,mean_logit_diff,logit_diff_lo95,logit_diff_hi95\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}\n",
            r.site, r.center, r.n, r.flip_rate, r.flip_lo, r.flip_hi, r.mean_logit_diff, r.diff_lo, r.diff_hi
        ));
    }
    s
}

/// The flip rates of a summary as a heatmap grid: sites as rows (in summary order), centre
/// layers as columns (ascending), None where a site has no experiment at a centre; the title
/// says the window size and the units patched (heads or neurons; None: whole sites).
pub fn summary_grid(rows: &[SummaryRow], window: usize, units: Option<&[usize]>) -> crate::io::plot::Grid {
    let mut sites: Vec<&str> = Vec::new();
    let mut centers: Vec<usize> = Vec::new();
    for r in rows {
        if !sites.contains(&r.site.as_str()) {
            sites.push(&r.site);
        }
        if !centers.contains(&r.center) {
            centers.push(r.center);
        }
    }
    centers.sort_unstable();
    let pairs = rows.iter().map(|r| r.n).max().unwrap_or(0);
    crate::io::plot::Grid {
        title: format!(
            "Flip rate to the source's prediction, {window}-layer windows{} ({pairs} pairs)",
            units.map_or(String::new(), |u| format!(", units {}", u.iter().map(usize::to_string).collect::<Vec<_>>().join(",")))
        ),
        row_labels: sites.iter().map(|s| s.to_string()).collect(),
        col_labels: centers.iter().map(|c| c.to_string()).collect(),
        values: sites.iter().map(|&s| centers.iter().map(|&c| rows.iter().find(|r| r.site == s && r.center == c).map(|r| r.flip_rate)).collect()).collect(),
        value_label: "flip rate".into(),
        range: Some((0.0, 1.0)),
        x_desc: format!("window centre layer (layers centre ± {})", window / 2),
        y_desc: "site patched".into(),
    }
}
