//! Circuits as files (Wang et al.): a circuit is a set of attention heads and MLP neurons of one
//! model, for one emotion, each with an op and a weight, that modulates generation together.
//!
//! # The file (`"format": "patchbay-circuit-1"`)
//!
//! ```json
//! {"format": "patchbay-circuit-1",
//!  "provenance": {"model": "M", "command": "patchbay circuit build ...", "date": "2026-...",
//!                 "sources": ["runs/contrib/heads.csv", ...], "rule": "top 8 heads ..."},
//!  "circuits": {"joy": {"vector": "runs/dirs/directions.safetensors:joy",
//!                       "vector_site": "blocks.5.hook_resid_post",
//!                       "components": [{"layer": 2, "head": 0, "op": "scale", "weight": 1.0},
//!                                      {"layer": 3, "neurons": [7, 19], "op": "add", "weight": 1.0}]}}}
//! ```
//!
//! One file holds circuits for several emotions (a map emotion -> circuit). A component is a
//! head (`layer`, `head`: its slice of the o_proj input, `attn.hook_z` unit h) or neurons
//! (`layer`, `neurons`: entries of the down_proj input, `mlp.hook_post`), as
//! `experiments::ablate::Component`. Parsing is strict: unknown fields, a wrong format, a
//! byte-order mark, an empty map or circuit, a component out of range for the model or listed
//! twice, a non-finite weight, an `add` component without the circuit's `vector`: one-line errors
//! naming the file and the entry.
//!
//! # Modulation at strength A ([`Circuit::conditions`])
//!
//! - `scale`, weight w: the component's units are multiplied by `1 + A w`;
//! - `add`, weight w: the units get `A w u`, u = W^T d / |W^T d| (W the component's write matrix,
//!   d the circuit's `vector`, read at `vector_site`, else at `blocks.L.hook_resid_post` of the
//!   component's layer L, and normalised): `patchbay ablate --op add`'s definition
//!   (`experiments::ablate` module doc; in Gemma 2 / OLMo 2 the add is before the post-norm).
//!
//! A = 0 is the clean run bit for bit (x * 1 and x + 0 u).
//!
//! # Building ([`build`])
//!
//! From `components contrib` tables (`heads.csv`, `neurons.csv`: rank by the emotion's mean
//! contribution) and/or an ablate `summary.csv` (rank by the effect on the emotion's logit:
//! minus the mean logit change for zero / mean / random ablations, plus it for scale and add
//! sweeps, controls excluded): the top k heads and top k neurons (neuron groups, from a summary
//! alone) whose score is at least the threshold. With both sources the contrib ranking picks and
//! a component is kept only when the ablate sweep confirms it (a positive score of the head, or
//! of a group holding the neuron). A layer's picked neurons form one component.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::experiments::judge::{AccuracyChart, ChartLine, SummaryRow as JudgeSummary, accuracy_chart};
use crate::io::plot::LinePanels;
use crate::experiments::ablate::{AblateOp, Ablation, Component, conditions as ablate_conditions, write_operands};
use crate::intervene::spec::{Condition, read_vector};
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::sites::{Positions, Site, SiteKind, TokenScope};
use crate::{Error, Result};

/// The `format` of a circuit file.
pub const FORMAT: &str = "patchbay-circuit-1";

/// A circuit file: provenance and a circuit per emotion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitFile {
    pub format: String,
    pub provenance: Provenance,
    /// Emotion -> circuit.
    pub circuits: BTreeMap<String, Circuit>,
}

/// Where a circuit file came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The model directory the circuit is for.
    pub model: String,
    /// The command line that wrote it.
    pub command: String,
    /// When (RFC 3339, UTC).
    pub date: String,
    /// The rankings it was built from.
    pub sources: Vec<String>,
    /// The selection rule, in words.
    pub rule: String,
}

/// One emotion's circuit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Circuit {
    /// The direction `add` components write along: `FILE.safetensors[:NAME]` (needed by `add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<String>,
    /// The site NAME resolves at (a TransformerLens name); None: resid_post of each component's layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_site: Option<String>,
    pub components: Vec<CircuitComponent>,
}

/// What a component does at strength A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CircuitOp {
    /// units x (1 + A w)
    Scale,
    /// units + A w u
    Add,
}

impl CircuitOp {
    /// `--op scale|add`.
    pub fn parse(s: &str) -> Result<CircuitOp> {
        match s {
            "scale" => Ok(CircuitOp::Scale),
            "add" => Ok(CircuitOp::Add),
            other => Err(Error::input(format!("--op `{other}`: expected scale or add"))),
        }
    }

    /// `scale` or `add`, as the file writes it.
    pub fn name(self) -> &'static str {
        match self {
            CircuitOp::Scale => "scale",
            CircuitOp::Add => "add",
        }
    }
}

/// One head or group of neurons with its op and weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitComponent {
    pub layer: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neurons: Option<Vec<usize>>,
    pub op: CircuitOp,
    pub weight: f32,
}

impl CircuitComponent {
    pub fn new(component: &Component, op: CircuitOp, weight: f32) -> CircuitComponent {
        let (head, neurons) = match component {
            Component::Head { head, .. } => (Some(*head), None),
            Component::Neurons { neurons, .. } => (None, Some(neurons.clone())),
        };
        CircuitComponent { layer: component.layer(), head, neurons, op, weight }
    }

    /// The head or neuron group; Err when both or neither are given.
    pub fn component(&self) -> Result<Component> {
        match (self.head, &self.neurons) {
            (Some(head), None) => Ok(Component::Head { layer: self.layer, head }),
            (None, Some(n)) => Ok(Component::Neurons { layer: self.layer, neurons: n.clone() }),
            _ => Err(Error::input("give either `head` or `neurons`")),
        }
    }
}

impl CircuitFile {
    /// Parses and checks a circuit file against the model's config (module doc); errors name the
    /// file and the entry.
    pub fn read(path: &Path, cfg: &ModelConfig) -> Result<CircuitFile> {
        let bytes = crate::error::read_json_bytes(path)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::file(path, "not UTF-8"))?;
        let mut de = serde_json::Deserializer::from_str(&text);
        let file: CircuitFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let at = e.path().to_string();
            Error::file(path, format!("not a circuit file: {}{}", e.inner(), if at == "." { String::new() } else { format!(" (at {at})") }))
        })?;
        file.check(cfg).map_err(|e| Error::file(path, e.to_string()))?;
        Ok(file)
    }

    /// Writes the file (pretty JSON, atomically) after checking it.
    pub fn write(&self, path: &Path, cfg: &ModelConfig) -> Result<()> {
        self.check(cfg)?;
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::input(e.to_string()))? + "\n";
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Err naming the entry when the file breaks a rule of the module doc.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::input(format!("format `{}`: expected `{FORMAT}`", self.format)));
        }
        if self.circuits.is_empty() {
            return Err(Error::input("no circuits (an empty `circuits` map)"));
        }
        for (emotion, c) in &self.circuits {
            if c.components.is_empty() {
                return Err(Error::input(format!("circuit `{emotion}`: no components")));
            }
            if let Some(s) = &c.vector_site {
                Site::parse(s, cfg).map_err(|e| Error::input(format!("circuit `{emotion}`: vector_site: {e}")))?;
            }
            let mut seen: BTreeSet<(usize, bool, usize)> = BTreeSet::new();
            for (i, cc) in c.components.iter().enumerate() {
                let at = |msg: String| Error::input(format!("circuit `{emotion}`, component {i}: {msg}"));
                let comp = cc.component().map_err(|e| at(e.to_string()))?;
                comp.check(cfg).map_err(|e| at(e.to_string()))?;
                if !cc.weight.is_finite() {
                    return Err(at(format!("weight {} is not a finite number", cc.weight)));
                }
                if cc.op == CircuitOp::Add && c.vector.is_none() {
                    return Err(at("op add needs the circuit's `vector`".into()));
                }
                for u in comp.units() {
                    if !seen.insert((comp.layer(), cc.head.is_some(), u)) {
                        return Err(at(format!("{} is already in the circuit (layer {} {} {u})", comp.name(), comp.layer(), comp.site().kind.unit_name())));
                    }
                }
            }
        }
        Ok(())
    }

    /// The circuit of `emotion` (None: the file's only circuit): (its name, the circuit).
    pub fn circuit(&self, emotion: Option<&str>) -> Result<(&str, &Circuit)> {
        let names = || self.circuits.keys().cloned().collect::<Vec<_>>().join(", ");
        match emotion {
            Some(e) => self.circuits.get_key_value(e).map(|(k, c)| (k.as_str(), c)).ok_or_else(|| Error::input(format!("no circuit for `{e}` (the file has: {})", names()))),
            None if self.circuits.len() == 1 => Ok(self.circuits.iter().next().map(|(k, c)| (k.as_str(), c)).expect("one circuit")),
            None => Err(Error::input(format!("the file holds several circuits: name one with --emotion ({})", names()))),
        }
    }
}

impl Circuit {
    /// The conditions of the circuit at strength `alpha` (module doc), one per component, named
    /// `circuit:<emotion>`, acting at `scope`.
    pub fn conditions(&self, emotion: &str, model: &Model, alpha: f32, scope: &TokenScope) -> Result<Vec<Condition>> {
        let cfg = &model.cfg;
        let comps: Vec<(Component, &CircuitComponent)> = self.components.iter().map(|c| Ok((c.component()?, c))).collect::<Result<_>>()?;
        let add_sites: Vec<Site> = comps.iter().filter(|(_, c)| c.op == CircuitOp::Add).map(|(k, _)| k.site()).collect::<BTreeSet<_>>().into_iter().collect();
        let operands = match (&self.vector, add_sites.is_empty()) {
            (_, true) => BTreeMap::new(),
            (None, false) => return Err(Error::input(format!("circuit `{emotion}`: op add needs the circuit's `vector`"))),
            (Some(v), false) => {
                let fixed = self.vector_site.as_deref().map(|s| Site::parse(s, cfg)).transpose()?;
                write_operands(model, &add_sites, &mut |layer| Ok(read_vector(v, fixed.unwrap_or(Site::new(layer, SiteKind::ResidPost)), cfg.d_model, true)?.1))?
            }
        };
        comps
            .into_iter()
            .map(|(component, c)| {
                let op = match c.op {
                    CircuitOp::Scale => AblateOp::Scale { alpha: 1.0 + alpha * c.weight },
                    CircuitOp::Add => AblateOp::Add { alpha: alpha * c.weight },
                };
                let mut cond = ablate_conditions(&[Ablation { component, control: false }], op, &operands, &Positions::All, 0, cfg)?.remove(0);
                cond.direction = format!("circuit:{emotion}");
                cond.positions = scope.clone();
                Ok(cond)
            })
            .collect()
    }
}

/// A component's score in a ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub component: Component,
    pub score: f64,
}

/// `heads.csv` / `neurons.csv` of `components contrib`: the rows of `label`, scored by their mean
/// (one component per head or neuron).
pub fn read_contrib_table(path: &Path, label: &str) -> Result<Vec<Scored>> {
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, e.to_string()))?;
    let header = r.headers().map_err(|e| Error::file(path, e.to_string()))?.clone();
    let unit = header.get(1).unwrap_or("").to_string();
    if header.iter().collect::<Vec<_>>() != ["layer", unit.as_str(), "label", "mean", "sd", "n", "rank"] || !(unit == "head" || unit == "neuron") {
        return Err(Error::file(path, "expected a `components contrib` table: layer,head|neuron,label,mean,sd,n,rank"));
    }
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::file(path, format!("row {}: {e}", i + 1)))?;
        if &rec[2] != label {
            continue;
        }
        let num = |j: usize| rec[j].parse::<f64>().map_err(|_| Error::file(path, format!("row {}: `{}` is not a number", i + 1, &rec[j])));
        let (layer, index) = (num(0)? as usize, num(1)? as usize);
        let component = if unit == "head" { Component::Head { layer, head: index } } else { Component::Neurons { layer, neurons: vec![index] } };
        out.push(Scored { component, score: num(3)? });
    }
    Ok(out)
}

/// An ablate `summary.csv`: the components (not the controls) scored by the effect on `label`'s
/// logit: minus its mean change for ablations (zero, mean, random), plus it for enhancements
/// (scale, add).
pub fn read_ablate_summary(path: &Path, label: &str) -> Result<Vec<Scored>> {
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, e.to_string()))?;
    let header = r.headers().map_err(|e| Error::file(path, e.to_string()))?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(kind), Some(layer), Some(head), Some(neurons), Some(control), Some(op)) = (col("kind"), col("layer"), col("head"), col("neurons"), col("control"), col("op")) else {
        return Err(Error::file(path, "expected an ablate summary.csv (kind,layer,head,neurons,control,op,...)"));
    };
    let change = col(&format!("mean_logit_change:{label}")).ok_or_else(|| Error::file(path, format!("no column mean_logit_change:{label} (the sweep's labels do not include `{label}`)")))?;
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::file(path, format!("row {}: {e}", i + 1)))?;
        if &rec[control] == "true" {
            continue;
        }
        let bad = |what: &str| Error::file(path, format!("row {}: {what}", i + 1));
        let int = |s: &str| s.trim().parse::<usize>().map_err(|_| bad(&format!("`{s}` is not an index")));
        let layer = int(&rec[layer])?;
        let component = match &rec[kind] {
            "head" => Component::Head { layer, head: int(&rec[head])? },
            "neurons" => Component::Neurons { layer, neurons: rec[neurons].split_whitespace().map(int).collect::<Result<_>>()? },
            k => return Err(bad(&format!("kind `{k}`"))),
        };
        let sign = match &rec[op] {
            "zero" | "mean" | "random" => -1.0,
            "scale" | "add" => 1.0,
            o => return Err(bad(&format!("op `{o}`"))),
        };
        let v: f64 = rec[change].parse().map_err(|_| bad(&format!("`{}` is not a number", &rec[change])))?;
        out.push(Scored { component, score: sign * v });
    }
    Ok(out)
}

/// How [`build`] picks components.
#[derive(Clone, Debug)]
pub struct BuildRule {
    pub top_k_heads: usize,
    pub top_k_neurons: usize,
    /// Keep only scores >= this.
    pub threshold: Option<f64>,
    pub op: CircuitOp,
}

impl BuildRule {
    /// The rule in words (the provenance's `rule`).
    pub fn describe(&self, contrib: bool, ablate: bool) -> String {
        let by = match (contrib, ablate) {
            (true, false) => "the emotion's mean contribution (components contrib)",
            (false, true) => "the effect on the emotion's logit (ablate summary: -change for ablations, +change for enhancements)",
            _ => "the emotion's mean contribution (components contrib), kept only when the ablate sweep's effect is positive",
        };
        let t = self.threshold.map_or(String::new(), |t| format!(" with score >= {t}"));
        format!("top {} heads and top {} neurons by {by}{t}; op {}, weight 1; a layer's neurons form one component", self.top_k_heads, self.top_k_neurons, self.op.name())
    }
}

/// The components of one emotion's circuit: from `ranked` (contrib or ablate scores) the top-k
/// heads and neurons (ties by layer and unit) whose score passes the threshold and that `confirm`
/// keeps; a layer's neurons merged into one component, in layer order after the heads.
pub fn build(ranked: &[Scored], rule: &BuildRule, confirm: &dyn Fn(&Component) -> bool) -> Vec<CircuitComponent> {
    let mut sorted: Vec<&Scored> = ranked.iter().filter(|s| rule.threshold.is_none_or(|t| s.score >= t) && confirm(&s.component)).collect();
    sorted.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.component.layer().cmp(&b.component.layer())).then_with(|| a.component.units().cmp(&b.component.units())));
    let heads = sorted.iter().filter(|s| matches!(s.component, Component::Head { .. })).take(rule.top_k_heads);
    let mut out: Vec<CircuitComponent> = heads.map(|s| CircuitComponent::new(&s.component, rule.op, 1.0)).collect();
    let mut neurons: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for s in sorted.iter().filter(|s| matches!(s.component, Component::Neurons { .. })).take(rule.top_k_neurons) {
        neurons.entry(s.component.layer()).or_default().extend(s.component.units());
    }
    out.extend(neurons.into_iter().map(|(layer, n)| CircuitComponent::new(&Component::Neurons { layer, neurons: n.into_iter().collect() }, rule.op, 1.0)));
    out
}

/// The direction of a `components contrib` run (its manifest.json): (`FILE.safetensors:NAME` as
/// given to its --vector, the direction's name, the TransformerLens name of its site).
pub fn contrib_direction(dir: &Path) -> Result<(String, String, String)> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not JSON: {e}")))?;
    let d = &m["direction"];
    match (d["source"].as_str(), d["name"].as_str(), d["site"].as_str()) {
        (Some(source), Some(name), Some(site)) => Ok((source.to_string(), name.to_string(), site.to_string())),
        _ => Err(Error::file(&path, "no direction (source, name, site): not a `components contrib` manifest")),
    }
}

/// The files a contrib directory's ranking reads: heads.csv and neurons.csv.
pub fn contrib_tables(dir: &Path) -> [PathBuf; 2] {
    [dir.join("heads.csv"), dir.join("neurons.csv")]
}

/// The conditions of `circuit eval`, as its judged rows and summary name them.
pub const EVAL_CONDITIONS: [&str; 4] = ["clean", "circuit", "prompted", "steered"];

/// The accuracy chart of `circuit eval`, one panel per emotion: the circuit against alpha (from
/// the clean accuracy at 0), steering against beta (likewise), prompting and clean as flat lines.
pub fn eval_chart(summary: &[JudgeSummary]) -> LinePanels {
    let [clean, circuit, prompted, steered] = EVAL_CONDITIONS;
    accuracy_chart(
        summary,
        &AccuracyChart {
            title: "Expression accuracy: circuit, steering, prompting (judged)",
            caption: "toward",
            baseline: clean,
            lines: vec![(ChartLine::Curve(circuit), "circuit (x = alpha)"), (ChartLine::Curve(steered), "steered (x = beta)"), (ChartLine::Flat(prompted), "prompted"), (ChartLine::Flat(clean), "clean")],
            x_desc: "alpha (circuit) / beta (steering)",
        },
    )
}
