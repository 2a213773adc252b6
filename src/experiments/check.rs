//! The applicability map (`patchbay check`): every methodology on every fixture family and
//! engine, graded against the Hugging Face references committed beside the fixture models
//! (`tests/fixtures/<family>/`, made by `scripts/golden/`): activations and logits of every site
//! (`golden.safetensors`), patching sweeps (`patch_golden.json`), steering (`steer_golden.json`
//! with `steer_vectors.safetensors`), head and neuron ablation (`ablate_golden.json`) and greedy
//! generation, plain and steered (`generate_golden.json`). Each methodology runs through the
//! functions its command calls (capture, `patch::run_sweep`, `steer::steer_labels` over the
//! steer grammar's conditions, `ablate::label_runner`, `generate::generate`), so a verdict is the
//! command's.
//!
//! Verdicts, per (methodology, family, engine): SUPPORTED when every value is within the f32
//! tolerance of the reference ([`F32_ATOL`], [`F32_RTOL`]); DEGRADED when within the bf16 forward
//! tolerance ([`BF16_REL`], [`BF16_NMSE`]; the figure is the worst error relative to the largest
//! reference value); ERROR when the engine refuses with an error (its message is the note);
//! SILENTLY_WRONG otherwise (values outside both tolerances, or non-finite). Generation compares
//! token ids: a divergence is DEGRADED only where the reference's own top-2 logit margin is
//! within twice the engine's measured logit error (a near-tie that drift can flip).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Deserialize;

use crate::engine::Engine;
use crate::experiments::ablate::{AblateOp, Ablation, Component, conditions, label_runner};
use crate::experiments::capture::{CaptureSpec, capture};
use crate::experiments::generate::{GenerateSpec, generate};
use crate::experiments::patch::{Method, Overflow, Pair, RunSettings, SweepSpec, experiments, run_sweep};
use crate::experiments::steer::{Readout, one_each, step_intervention};
use crate::intervene::spec::{InterventionSpec, Layers};
use crate::io::tensorfile::TensorFile;
use crate::io::{OutDtype, OutTensor};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// f32 reference vs Hugging Face float32: |got - want| <= F32_ATOL + F32_RTOL * |want|
/// (summation orders differ from torch's; HF's own eager vs sdpa differ by ~4e-6). These four
/// values are also the tests' tolerance table (tests/common/mod.rs reads them from here).
pub const F32_ATOL: f64 = 1e-4;
pub const F32_RTOL: f64 = 1e-4;
/// bf16 forward (bf16 weights, GEMM operands and KV cache, f32 accumulation) vs an f32
/// reference, per compared group: max |got - want| <= BF16_REL * max |want| and normalised MSE
/// <= BF16_NMSE (the tests' FORWARD_BF16_*; the worst seen on the fixtures is ~3.2%, patching llama).
pub const BF16_REL: f64 = 0.05;
pub const BF16_NMSE: f64 = 1e-3;

/// A methodology patchbay offers (a row of the map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Methodology {
    /// Activations of every site at every position (`capture --sites all`).
    Capture,
    /// The logits of every position (`capture --logits`, what `score` reads).
    Logits,
    /// Attention probabilities (`attn.hook_pattern`).
    Attention,
    /// Activation patching, resumed from clean runs (`patch`).
    PatchResumed,
    /// Activation patching, a full forward per experiment (`patch --method naive`).
    PatchNaive,
    /// Steering: add a vector, or project out and set (`steer --mode labels`).
    Steer,
    /// Head and neuron-group ablation: zero or scale (`ablate`).
    Ablate,
    /// Greedy generation, plain and steered (`generate`).
    Generate,
}

impl Methodology {
    pub const ALL: [Methodology; 8] = [
        Methodology::Capture,
        Methodology::Logits,
        Methodology::Attention,
        Methodology::PatchResumed,
        Methodology::PatchNaive,
        Methodology::Steer,
        Methodology::Ablate,
        Methodology::Generate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Methodology::Capture => "capture",
            Methodology::Logits => "logits",
            Methodology::Attention => "attention_pattern",
            Methodology::PatchResumed => "patch_resumed",
            Methodology::PatchNaive => "patch_naive",
            Methodology::Steer => "steer",
            Methodology::Ablate => "ablate",
            Methodology::Generate => "generate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Supported,
    Degraded,
    Error,
    SilentlyWrong,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Supported => "SUPPORTED",
            Verdict::Degraded => "DEGRADED",
            Verdict::Error => "ERROR",
            Verdict::SilentlyWrong => "SILENTLY_WRONG",
        }
    }
}

/// The difference between an engine's values and the reference, over groups (a tensor, one
/// case's label logits): each group graded on its own scale.
#[derive(Clone, Debug, Default)]
pub struct Drift {
    /// Groups compared.
    pub groups: usize,
    /// Values compared.
    pub values: usize,
    /// Largest |got - want|.
    pub max_abs: f64,
    /// Largest over groups of max |got - want| / max |want|.
    pub rel: f64,
    /// Largest normalised MSE of a group.
    pub nmse: f64,
    /// Groups with a value outside the f32 tolerance.
    pub outside_f32: usize,
    /// Non-finite values returned.
    pub nonfinite: usize,
    /// The first group outside the bf16 tolerance (a description), if any.
    pub worst: Option<String>,
}

impl Drift {
    /// Adds one group: `got` vs `want` (same length; a length mismatch counts as wrong).
    pub fn add(&mut self, name: &str, got: &[f32], want: &[f32]) {
        self.groups += 1;
        self.values += want.len();
        if got.len() != want.len() {
            self.outside_f32 += 1;
            self.rel = f64::INFINITY;
            self.worst.get_or_insert_with(|| format!("{name}: {} values, the reference has {}", got.len(), want.len()));
            return;
        }
        let max_ref = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs())).max(1e-6);
        let (mut max_abs, mut num, mut den, mut f32_ok, mut nonfinite) = (0.0f64, 0.0f64, 0.0f64, true, 0);
        for (&g, &w) in got.iter().zip(want) {
            let (g, w) = (g as f64, w as f64);
            if !g.is_finite() {
                nonfinite += 1;
                continue;
            }
            let err = (g - w).abs();
            max_abs = max_abs.max(err);
            f32_ok &= err <= F32_ATOL + F32_RTOL * w.abs();
            num += err * err;
            den += w * w;
        }
        let (rel, nmse) = (max_abs / max_ref, num / den.max(1e-30));
        self.max_abs = self.max_abs.max(max_abs);
        self.rel = self.rel.max(rel);
        self.nmse = self.nmse.max(nmse);
        self.nonfinite += nonfinite;
        self.outside_f32 += usize::from(!f32_ok || nonfinite > 0);
        if nonfinite > 0 || rel > BF16_REL || nmse > BF16_NMSE {
            self.worst.get_or_insert_with(|| format!("{name}: max abs err {max_abs:.3e} = {rel:.3e} of max |ref| {max_ref:.3e}, NMSE {nmse:.3e}, {nonfinite} non-finite"));
        }
    }

    /// The verdict of a methodology whose values are all in this drift.
    pub fn verdict(&self) -> Verdict {
        if self.groups == 0 || self.nonfinite > 0 || self.worst.is_some() {
            Verdict::SilentlyWrong
        } else if self.outside_f32 == 0 {
            Verdict::Supported
        } else {
            Verdict::Degraded
        }
    }
}

/// One cell of the map.
#[derive(Clone, Debug)]
pub struct Cell {
    pub methodology: Methodology,
    pub family: String,
    /// The engine's `--device` name (cpu, emu, cuda:0).
    pub device: String,
    pub verdict: Verdict,
    /// Cases (tensors, experiments, steering conditions, sequences) compared.
    pub cases: usize,
    pub max_abs_err: f64,
    /// Worst max |got - want| / max |want| of a case (generation: 0).
    pub rel_err: f64,
    /// What the verdict rests on: the worst case outside tolerance, the refusal's message, the
    /// generation's divergences.
    pub note: String,
}

impl Cell {
    fn graded(methodology: Methodology, family: &str, device: &str, drift: &Drift) -> Cell {
        let verdict = drift.verdict();
        let note = match verdict {
            Verdict::SilentlyWrong if drift.groups == 0 => "nothing compared".to_string(),
            Verdict::SilentlyWrong => drift.worst.clone().unwrap_or_default(),
            Verdict::Degraded => format!("{} of {} cases outside the f32 tolerance; NMSE <= {:.1e}", drift.outside_f32, drift.groups, drift.nmse),
            _ => String::new(),
        };
        Cell { methodology, family: family.into(), device: device.into(), verdict, cases: drift.groups, max_abs_err: drift.max_abs, rel_err: drift.rel, note }
    }

    fn refused(methodology: Methodology, family: &str, device: &str, msg: String) -> Cell {
        Cell { methodology, family: family.into(), device: device.into(), verdict: Verdict::Error, cases: 0, max_abs_err: 0.0, rel_err: 0.0, note: msg }
    }

    /// The CSV header of [`Cell::csv_row`].
    pub const CSV_HEADER: &'static str = "methodology,family,device,verdict,cases,max_abs_err,rel_err,note";

    pub fn csv_row(&self) -> String {
        let note = self.note.replace('"', "'");
        format!("{},{},{},{},{},{:.3e},{:.3e},\"{note}\"", self.methodology.name(), self.family, self.device, self.verdict.name(), self.cases, self.max_abs_err, self.rel_err)
    }

    /// The map's cell text: the verdict, with the relative error when degraded.
    fn short(&self) -> String {
        match self.verdict {
            Verdict::Degraded if self.methodology == Methodology::Generate => format!("DEGRADED ({})", self.note.split(';').next().unwrap_or_default()),
            Verdict::Degraded => format!("DEGRADED {:.1}%", 100.0 * self.rel_err),
            v => v.name().to_string(),
        }
    }
}

/// The map as Markdown: one table per engine, a row per methodology, a column per family; then
/// the notes of every cell that is not SUPPORTED.
pub fn markdown(cells: &[Cell]) -> String {
    let mut devices: Vec<&str> = Vec::new();
    let mut families: Vec<&str> = Vec::new();
    for c in cells {
        if !devices.contains(&c.device.as_str()) {
            devices.push(&c.device);
        }
        if !families.contains(&c.family.as_str()) {
            families.push(&c.family);
        }
    }
    let mut s = String::new();
    for d in devices {
        s.push_str(&format!("Engine `{d}`:\n\n| methodology | {} |\n|---|{}\n", families.join(" | "), "---|".repeat(families.len())));
        for m in Methodology::ALL {
            let row: Vec<String> = families.iter().map(|f| cells.iter().find(|c| c.device == d && c.family == *f && c.methodology == m).map_or("-".into(), Cell::short)).collect();
            if row.iter().any(|r| r != "-") {
                s.push_str(&format!("| {} | {} |\n", m.name(), row.join(" | ")));
            }
        }
        s.push('\n');
    }
    let notes: Vec<&Cell> = cells.iter().filter(|c| matches!(c.verdict, Verdict::Error | Verdict::SilentlyWrong) || (c.verdict == Verdict::Degraded && c.methodology == Methodology::Generate)).collect();
    for c in notes {
        s.push_str(&format!("- {} {} on {}: {}: {}\n", c.methodology.name(), c.family, c.device, c.verdict.name(), c.note));
    }
    s
}

/// The reference files of one family (`DIR/<family>/`): the fixture model and its goldens.
pub struct Goldens {
    pub dir: PathBuf,
    pub family: String,
    /// At most this many cases per methodology (spread evenly over the golden's cases); None: all.
    pub max_cases: Option<usize>,
}

/// Every `step`-th of `n` indices so that at most `max` remain.
fn spread(n: usize, max: Option<usize>) -> Vec<usize> {
    let step = max.map_or(1, |m| n.div_ceil(m.max(1)).max(1));
    (0..n).step_by(step).collect()
}

fn read_golden<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = crate::error::read_json_bytes(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not a golden file of this version: {e}")))
}

/// Runs every methodology of `goldens` on `engine`, calling `emit` with each cell as it is graded.
pub fn check_family(engine: &dyn Engine, device: &str, goldens: &Goldens, progress: &ProgressBar, emit: &mut dyn FnMut(Cell) -> Result<()>) -> Result<()> {
    let fam = goldens.family.as_str();
    // An engine's refusal is the cell's verdict (ERROR, with its message), not the run's end.
    let mut cell = |m: Methodology, r: std::result::Result<Drift, String>| -> Result<Cell> {
        progress.inc(1);
        let c = match r {
            Ok(d) => Cell::graded(m, fam, device, &d),
            Err(msg) => Cell::refused(m, fam, device, msg),
        };
        emit(c.clone())?;
        Ok(c)
    };
    // One capture of every site and the logits, split three ways.
    let mut logit_err = 0.0;
    match capture_drifts(engine, goldens) {
        Ok(drifts) => {
            for (m, d) in drifts {
                let c = cell(m, Ok(d))?;
                if m == Methodology::Logits {
                    logit_err = c.max_abs_err;
                }
            }
        }
        Err(e) => {
            for m in [Methodology::Capture, Methodology::Logits, Methodology::Attention] {
                cell(m, Err(e.to_string()))?;
            }
        }
    }
    let patch: Result<PatchGolden> = read_golden(&goldens.dir.join("patch_golden.json"));
    for (m, method) in [(Methodology::PatchResumed, Method::Resumed), (Methodology::PatchNaive, Method::Naive)] {
        let r = match &patch {
            Ok(g) => patch_drift(engine, g, method, goldens.max_cases).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        cell(m, r)?;
    }
    cell(Methodology::Steer, steer_drift(engine, goldens).map_err(|e| e.to_string()))?;
    cell(Methodology::Ablate, ablate_drift(engine, goldens).map_err(|e| e.to_string()))?;
    match generate_cell(engine, goldens, logit_err) {
        Ok(c) => {
            progress.inc(1);
            emit(Cell { family: fam.into(), device: device.into(), ..c })
        }
        Err(e) => cell(Methodology::Generate, Err(e.to_string())).map(|_| ()),
    }
}

/// Capture, logits and attention patterns of every site at every position of the fixture's
/// prompts vs `golden.safetensors`.
fn capture_drifts(engine: &dyn Engine, g: &Goldens) -> Result<Vec<(Methodology, Drift)>> {
    let path = g.dir.join("golden.safetensors");
    let mut golden = TensorFile::open(&path)?;
    let prompts: Vec<Vec<u32>> = {
        let p: serde_json::Value = read_golden(&g.dir.join("prompts.json"))?;
        serde_json::from_value(p["ids"].clone()).map_err(|e| Error::file(g.dir.join("prompts.json"), format!("`ids`: {e}")))?
    };
    let spec = CaptureSpec { sites: Site::all(engine.config()), positions: Positions::All, logits: true, dtype: OutDtype::F32, batch_size: 2, interventions: Vec::new() };
    let out = capture(engine, &prompts, &spec, &ProgressBar::hidden())?;
    let mut drifts: BTreeMap<Methodology, Drift> = BTreeMap::new();
    for (name, t) in &out {
        let OutTensor::Float { data, .. } = t else { continue };
        let m = if name == "logits" {
            Methodology::Logits
        } else if name.ends_with("hook_pattern") {
            Methodology::Attention
        } else {
            Methodology::Capture
        };
        let (_, want) = golden.read_f32(name)?;
        drifts.entry(m).or_default().add(name, data, &want);
    }
    // A reference tensor the capture did not produce is a site gone missing: wrong, not skipped.
    let mut missing: Vec<String> = golden.entries.keys().filter(|n| *n != "prompt_offsets" && !out.iter().any(|(o, _)| o == *n)).cloned().collect();
    missing.sort();
    for name in missing {
        let (_, want) = golden.read_f32(&name)?;
        drifts.entry(Methodology::Capture).or_default().add(&format!("{name} (not captured)"), &[], &want);
    }
    Ok(drifts.into_iter().collect())
}

/// `patch_golden.json` (scripts/golden/make_patch_goldens.py).
#[derive(Deserialize)]
pub struct PatchGolden {
    /// Token ids: prompts.json `ids`, then `chat_ids`.
    pub prompts: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    /// Clean label logits at each prompt's last position.
    pub clean: Vec<Vec<f32>>,
    pub sweeps: Vec<PatchGoldenSweep>,
}

#[derive(Deserialize)]
pub struct PatchGoldenSweep {
    pub sites: Vec<String>,
    pub units: Option<Vec<usize>>,
    pub window: usize,
    pub centers: Vec<usize>,
    pub positions: Vec<i64>,
    /// (source, target)
    pub pairs: Vec<(usize, usize)>,
    /// In enumeration order (pair, site, centre).
    pub experiments: Vec<PatchGoldenExperiment>,
}

#[derive(Deserialize)]
pub struct PatchGoldenExperiment {
    pub source: usize,
    pub target: usize,
    pub site: String,
    pub layers: Vec<usize>,
    /// Absolute target positions.
    pub positions: Vec<usize>,
    /// Label logits at the target's last position.
    pub patched: Vec<f32>,
}

/// Every sweep of `patch_golden.json` (at most `max_cases` experiments in all, spread over the
/// sweeps) by `method`, with the command's default batch rows and memory budget.
fn patch_drift(engine: &dyn Engine, g: &PatchGolden, method: Method, max_cases: Option<usize>) -> Result<Drift> {
    let n_all: usize = g.sweeps.iter().map(|s| s.experiments.len()).sum();
    let keep = spread(n_all, max_cases);
    let mut drift = Drift::default();
    let mut first = 0;
    for (i, gs) in g.sweeps.iter().enumerate() {
        let sites = gs.sites.iter().map(|s| SiteKind::from_short_name(s).ok_or_else(|| Error::input(format!("patch golden sweep {i}: unknown site `{s}`")))).collect::<Result<_>>()?;
        let spec = SweepSpec { sites, units: gs.units.clone(), window: gs.window, centers: gs.centers.clone(), positions: gs.positions.clone(), label_tokens: g.labels.clone() };
        let pairs: Vec<Pair> = gs.pairs.iter().map(|&(source, target)| Pair { source, target }).collect();
        let all = experiments(&pairs, &spec, engine.config().n_layers)?;
        if all.len() != gs.experiments.len() {
            return Err(Error::input(format!("patch golden sweep {i}: {} experiments, patchbay enumerates {}", gs.experiments.len(), all.len())));
        }
        let skip = all.iter().filter(|e| keep.binary_search(&(first + e.id)).is_err()).map(|e| e.id).collect();
        first += all.len();
        let settings = RunSettings { method, skip: &skip, batch_rows: 256, mem_budget: 2 << 30, overflow: Overflow::Auto, progress: &ProgressBar::hidden() };
        let mut results = Vec::new();
        run_sweep(engine, &g.prompts, &spec, &all, &settings, &mut |r| {
            results.push(r);
            Ok(())
        })?;
        for r in results {
            let want = &gs.experiments[r.id];
            if (r.source, r.target, &r.layers) != (want.source, want.target, &want.layers) {
                return Err(Error::input(format!("patch golden sweep {i}: experiment {} is not the golden's", r.id)));
            }
            drift.add(&format!("sweep {i} experiment {} ({} layers {:?}, {}->{})", r.id, r.site, r.layers, r.source, r.target), &r.patched, &want.patched);
        }
    }
    Ok(drift)
}

/// `steer_golden.json` and `ablate_golden.json` (scripts/golden/make_steer_goldens.py,
/// make_ablate_goldens.py): label logits at every prompt's last position, clean and per case.
#[derive(Deserialize)]
pub struct LabelGolden<C> {
    /// Token ids: prompts.json `ids`, then `chat_ids`.
    pub prompts: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    /// [prompt][label]
    pub clean: Vec<Vec<f32>>,
    pub cases: Vec<C>,
}

/// A case of `steer_golden.json`.
#[derive(Deserialize)]
pub struct SteerCase {
    /// `add` (x <- x + beta * sum of `vectors`, unit norm first when `normalise`) or
    /// `project_set` (x <- x + v - beta * P x, `vectors` = [v, subspace], P = U^T U).
    pub op: String,
    /// Short site kind (`resid_post`, ...).
    pub site: String,
    pub layer: usize,
    /// `"all"` or a list of positions (-1 = last token).
    pub positions: serde_json::Value,
    pub beta: f32,
    pub normalise: bool,
    /// Names in steer_vectors.safetensors, under `blocks.<layer>.hook_<site>/`.
    pub vectors: Vec<String>,
    /// [prompt][label]
    pub steered: Vec<Vec<f32>>,
}

impl SteerCase {
    pub fn site(&self) -> Result<Site> {
        let kind = SiteKind::from_short_name(&self.site).ok_or_else(|| Error::input(format!("steer golden: unknown site `{}`", self.site)))?;
        Ok(Site::new(self.layer, kind))
    }

    /// The positions in the steer grammar (`all`, `-1`).
    pub fn positions_text(&self) -> String {
        positions_text(&self.positions)
    }

    pub fn name(&self) -> String {
        format!("{} {:?} at {}.{} positions {} beta {} normalise {}", self.op, self.vectors, self.layer, self.site, self.positions_text(), self.beta, self.normalise)
    }
}

/// A golden's positions (`"all"` or a list) in the steer grammar.
fn positions_text(p: &serde_json::Value) -> String {
    match p {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The steering cases as the steer command builds them (its intervention grammar, resolved),
/// run by the resumed label sweep.
fn steer_drift(engine: &dyn Engine, g: &Goldens) -> Result<Drift> {
    let golden: LabelGolden<SteerCase> = read_golden(&g.dir.join("steer_golden.json"))?;
    let file = g.dir.join("steer_vectors.safetensors").display().to_string();
    let keep = spread(golden.cases.len(), g.max_cases);
    let mut conds = Vec::new();
    for &i in &keep {
        let c = &golden.cases[i];
        let (vector, project) = match c.op.as_str() {
            "add" => (format!("{file}:{}", c.vectors.join("+")), None),
            "project_set" if c.vectors.len() == 2 => (format!("{file}:{}", c.vectors[0]), Some(format!("{file}:{}", c.vectors[1]))),
            other => return Err(Error::input(format!("steer golden case {i}: unknown op `{other}`"))),
        };
        let spec = InterventionSpec { vector: Some(vector), project, site: c.site.clone(), layers: Some(Layers::List(vec![c.layer])), positions: c.positions_text(), betas: vec![c.beta], normalise: c.normalise };
        let resolved = spec.resolve(engine.config(), false)?;
        conds.extend(resolved);
    }
    let wants: Vec<Vec<f32>> = keep.iter().map(|&i| golden.cases[i].steered.concat()).collect();
    let names: Vec<String> = conds.iter().map(|c| format!("{} {} at {} beta {}", c.op.name(), c.direction, c.site, c.beta)).collect();
    label_drift(engine, &golden.prompts, &golden.labels, &one_each(&conds), &names, &wants)
}

#[derive(Deserialize)]
struct AblateCase {
    /// `head` or `neurons`.
    kind: String,
    layer: usize,
    head: Option<usize>,
    neurons: Option<Vec<usize>>,
    positions: serde_json::Value,
    /// `zero` or `scale` (by `alpha`).
    op: String,
    alpha: Option<f32>,
    /// [prompt][label]
    ablated: Vec<Vec<f32>>,
}

/// The ablation cases as the ablate command builds them, by the resumed label sweep.
fn ablate_drift(engine: &dyn Engine, g: &Goldens) -> Result<Drift> {
    let golden: LabelGolden<AblateCase> = read_golden(&g.dir.join("ablate_golden.json"))?;
    let cfg = engine.config();
    let keep = spread(golden.cases.len(), g.max_cases);
    let (mut exps, mut names, mut wants) = (Vec::new(), Vec::new(), Vec::new());
    for &i in &keep {
        let c = &golden.cases[i];
        let bad = |what: &str| Error::input(format!("ablate golden case {i}: {what}"));
        let component = match (c.kind.as_str(), c.head, &c.neurons) {
            ("head", Some(head), _) => Component::Head { layer: c.layer, head },
            ("neurons", _, Some(n)) => Component::Neurons { layer: c.layer, neurons: n.clone() },
            _ => return Err(bad("kind `head` with `head` or `neurons` with `neurons` expected")),
        };
        let op = match (c.op.as_str(), c.alpha) {
            ("zero", _) => AblateOp::Zero,
            ("scale", Some(alpha)) => AblateOp::Scale { alpha },
            _ => return Err(bad("op `zero` or `scale` with `alpha` expected")),
        };
        let positions = crate::experiments::ablate::prompt_positions(&positions_text(&c.positions))?;
        names.push(format!("{} {op:?} at {}", component.name(), positions_text(&c.positions)));
        let abl = [Ablation { component, control: false }];
        exps.push(conditions(&abl, op, &BTreeMap::new(), &positions, 0, cfg)?);
        wants.push(c.ablated.concat());
    }
    label_drift(engine, &golden.prompts, &golden.labels, &exps, &names, &wants)
}

/// Label logits of every prompt under each experiment (the resumed label sweep of `steer` and
/// `ablate`) vs `wants` (`[n_prompts * n_labels]` per experiment).
fn label_drift(engine: &dyn Engine, prompts: &[Vec<u32>], labels: &[u32], exps: &[Vec<crate::intervene::spec::Condition>], names: &[String], wants: &[Vec<f32>]) -> Result<Drift> {
    let k = labels.len();
    // [n_experiments, n_prompts * k], NaN until written: a missing row is non-finite.
    let mut got: Vec<Vec<f32>> = vec![vec![f32::NAN; prompts.len() * k]; exps.len()];
    label_runner(Method::Resumed)(engine, prompts, Readout { label_tokens: labels, projection: None }, exps, 256, &ProgressBar::hidden(), &mut |_, _, _| Ok(()), &mut |rows| {
        for r in rows {
            got[r.condition][r.index * k..(r.index + 1) * k].copy_from_slice(&r.label_logits);
        }
        Ok(())
    })?;
    let mut drift = Drift::default();
    for ((name, g), w) in names.iter().zip(&got).zip(wants) {
        drift.add(name, g, w);
    }
    Ok(drift)
}

#[derive(Deserialize)]
struct GenerateGolden {
    prompts: Vec<Vec<u32>>,
    layer: usize,
    /// The steering vector's name in steer_vectors.safetensors.
    vector: String,
    max_new_tokens: usize,
    cases: Vec<GenerateCase>,
}

#[derive(Deserialize)]
struct GenerateCase {
    beta: f32,
    prompt: usize,
    tokens: Vec<u32>,
    /// The smallest top-2 logit margin over the reference's steps.
    min_margin: f32,
}

/// Greedy generation plain and steered (the generate command's conditions: the vector at the
/// golden's layer's resid_post, every prompt and generated position) vs the reference's tokens.
/// `logit_err`: the engine's largest logit error measured on this family (the Logits cell).
fn generate_cell(engine: &dyn Engine, g: &Goldens, logit_err: f64) -> Result<Cell> {
    let golden: GenerateGolden = read_golden(&g.dir.join("generate_golden.json"))?;
    let keep = spread(golden.cases.len(), g.max_cases);
    let mut betas: Vec<f32> = Vec::new();
    for &i in &keep {
        if !betas.contains(&golden.cases[i].beta) {
            betas.push(golden.cases[i].beta);
        }
    }
    let spec = InterventionSpec {
        vector: Some(format!("{}:{}", g.dir.join("steer_vectors.safetensors").display(), golden.vector)),
        project: None,
        site: "resid_post".into(),
        layers: Some(Layers::List(vec![golden.layer])),
        positions: "all+generated".into(),
        betas,
        normalise: false,
    };
    let conds = spec.resolve(engine.config(), true)?;
    let greedy = GenerateSpec::greedy(engine.config(), golden.max_new_tokens);
    let (mut same, mut near_ties, mut wrong) = (0, 0, Vec::new());
    let mut widest_tie = 0.0f32;
    for c in &conds {
        let cases: Vec<&GenerateCase> = keep.iter().map(|&i| &golden.cases[i]).filter(|k| k.beta == c.beta).collect();
        let prompts: Vec<Vec<u32>> = cases.iter().map(|k| golden.prompts.get(k.prompt).cloned().ok_or_else(|| Error::input(format!("generate golden: prompt {} does not exist", k.prompt)))).collect::<Result<_>>()?;
        let gens = generate(engine, &prompts, &greedy, &[step_intervention(c)], None, &ProgressBar::hidden(), &mut |_, _| Ok(()))?;
        for (k, got) in cases.iter().zip(gens) {
            if got.tokens == k.tokens {
                same += 1;
            } else if (k.min_margin as f64) <= 2.0 * logit_err {
                near_ties += 1;
                widest_tie = widest_tie.max(k.min_margin);
            } else {
                wrong.push(format!("prompt {} beta {}: {:?}, the reference {:?} (its top-2 margin {:.3}, the logit error {logit_err:.3})", k.prompt, k.beta, got.tokens, k.tokens, k.min_margin));
            }
        }
    }
    let n = same + near_ties + wrong.len();
    let (verdict, note) = if let Some(w) = wrong.first() {
        (Verdict::SilentlyWrong, format!("{} of {n} sequences differ beyond drift; first: {w}", wrong.len()))
    } else if near_ties > 0 {
        (Verdict::Degraded, format!("{same}/{n} identical; {near_ties} diverge at near-ties (the reference's top-2 margin <= {widest_tie:.3}, the logit error {logit_err:.3})"))
    } else if n == 0 {
        (Verdict::SilentlyWrong, "nothing compared".into())
    } else {
        (Verdict::Supported, String::new())
    };
    Ok(Cell { methodology: Methodology::Generate, family: String::new(), device: String::new(), verdict, cases: n, max_abs_err: 0.0, rel_err: 0.0, note })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grading_follows_the_tolerances() {
        let want: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let shifted = |d: f32| want.iter().map(|w| w + d).collect::<Vec<f32>>();
        let grade = |got: &[f32]| {
            let mut d = Drift::default();
            d.add("t", got, &want);
            d.verdict()
        };
        assert_eq!(grade(&want), Verdict::Supported);
        assert_eq!(grade(&shifted(5e-5)), Verdict::Supported);
        // 1% of the range: bf16-level drift.
        assert_eq!(grade(&shifted(0.04)), Verdict::Degraded);
        // 25% of the range: wrong.
        assert_eq!(grade(&shifted(1.0)), Verdict::SilentlyWrong);
        let mut nan = want.clone();
        nan[7] = f32::NAN;
        assert_eq!(grade(&nan), Verdict::SilentlyWrong);
        assert_eq!(grade(&want[1..]), Verdict::SilentlyWrong);
        assert_eq!(Drift::default().verdict(), Verdict::SilentlyWrong, "nothing compared proves nothing");
        // One wrong group among good ones makes the whole cell wrong.
        let mut d = Drift::default();
        d.add("good", &want, &want);
        d.add("bad", &shifted(1.0), &want);
        assert_eq!(d.verdict(), Verdict::SilentlyWrong);
        assert!(d.worst.unwrap().starts_with("bad"));
    }

    #[test]
    fn spread_keeps_at_most_max_evenly() {
        assert_eq!(spread(10, None), (0..10).collect::<Vec<_>>());
        assert_eq!(spread(10, Some(5)), [0, 2, 4, 6, 8]);
        assert_eq!(spread(10, Some(3)), [0, 4, 8]);
        assert_eq!(spread(3, Some(10)), [0, 1, 2]);
    }
}
