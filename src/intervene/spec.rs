//! The intervention grammar shared by the command line and JSON spec files: a vector (or a
//! subspace) from a safetensors file, a site kind, layers, token positions and strengths,
//! resolved against a model into the conditions of a sweep, one [`Condition`] per
//! (layer, beta), each an [`Intervention`] (or, for generation, a step intervention: see
//! `experiments::steer::step_intervention`).
//!
//! - `vector`: `FILE.safetensors[:NAME]`; NAME may be `A+B` (the sum of the named vectors). A
//!   name is an exact tensor name, else, at each layer, `<site at that layer>/<NAME>` (the
//!   `patchbay directions` contract), so one name takes each layer's own direction. Without
//!   NAME the file must hold one tensor. `FILE:A,B` lists several directions, each steered on
//!   its own (the same as one spec per name; see [`InterventionSpec::directions`]).
//! - `project`: the subspace, the same syntax (a `[k, width]` tensor, or `A+B` stacks vectors);
//!   the op is then x <- x + v - beta P x (`Op::ProjectSet`, P the projector onto the span, v the
//!   vector or 0): project-out without a vector, project-set with one.
//! - Without `project`, x <- x + beta v (`Op::Add`); `normalise` makes v unit-norm first (in
//!   both ops).
//! - `positions`: `all` (every prompt token), `last`, `last:K` (the last K prompt tokens),
//!   `generated` (generated tokens), `X+generated` (prompt positions X and generated tokens), or
//!   the syntax of `Positions::parse` (`-1,-2`, `0,3`, `-1..-5`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Intervention, Op, norm};
use crate::io::tensorfile::TensorFile;
use crate::learn::directions::projector;
use crate::model::config::ModelConfig;
use crate::sites::{Site, SiteKind, TokenScope};
use crate::{Error, Result};

/// One sweep, as a JSON spec file entry (a file holds one object or a list); the command
/// line's flags build the same. Unknown fields are an error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// `FILE.safetensors[:NAME[+NAME...]]`: the vector added (or set, with `project`).
    #[serde(default)]
    pub vector: Option<String>,
    /// `FILE.safetensors[:NAME[+NAME...]]`: the subspace projected out.
    #[serde(default)]
    pub project: Option<String>,
    /// Site kind (short name: resid_post, attn_out, mlp_out, ...).
    #[serde(default = "default_site")]
    pub site: String,
    /// Layers: `1,2`, `0..3` (inclusive), `all`; a JSON list of numbers works too.
    #[serde(default)]
    pub layers: Option<Layers>,
    /// Token positions (module doc).
    #[serde(default = "default_positions")]
    pub positions: String,
    pub betas: Vec<f32>,
    #[serde(default)]
    pub normalise: bool,
}

fn default_site() -> String {
    "resid_post".into()
}

fn default_positions() -> String {
    "all".into()
}

/// Layers as text (`1,2`, `0..3`, `all`) or a list.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    List(Vec<usize>),
    Text(String),
}

impl Layers {
    /// The layers, in the order given; Err naming a bad item or a layer out of range.
    pub fn resolve(&self, n_layers: usize) -> Result<Vec<usize>> {
        let list = match self {
            Layers::List(l) => l.clone(),
            Layers::Text(t) if t.trim() == "all" => (0..n_layers).collect(),
            Layers::Text(t) => {
                let int = |s: &str| s.trim().parse::<usize>().map_err(|_| Error::input(format!("layers: `{}` is not a layer number (examples: 1,2 or 0..3 or all)", s.trim())));
                let mut out = Vec::new();
                for item in t.split(',').filter(|s| !s.trim().is_empty()) {
                    match item.split_once("..") {
                        Some((a, b)) => {
                            let (a, b) = (int(a)?, int(b)?);
                            // Checked before the range is expanded: `0..99999999999` is refused, not allocated.
                            if b >= n_layers {
                                return Err(out_of_range(b, n_layers));
                            }
                            if a > b {
                                return Err(Error::input(format!("layers: `{}` is an empty range (write the lower layer first)", item.trim())));
                            }
                            out.extend(a..=b)
                        }
                        None => out.push(int(item)?),
                    }
                }
                out
            }
        };
        if list.is_empty() {
            return Err(Error::input("layers: empty list"));
        }
        if let Some(&l) = list.iter().find(|&&l| l >= n_layers) {
            return Err(out_of_range(l, n_layers));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(l) = list.iter().find(|l| !seen.insert(**l)) {
            return Err(Error::input(format!("layer {l} is listed twice")));
        }
        Ok(list)
    }
}

fn out_of_range(l: usize, n_layers: usize) -> Error {
    Error::input(format!("layer {l} is out of range (the model has {n_layers} layers: 0..={})", n_layers.saturating_sub(1)))
}

/// `FILE.safetensors[:NAME[+NAME...]]`: the file and the names (empty: the file's only tensor).
pub fn parse_source(s: &str) -> (PathBuf, Vec<String>) {
    match s.rsplit_once(".safetensors:") {
        Some((file, names)) => (PathBuf::from(format!("{file}.safetensors")), names.split('+').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
        None => (PathBuf::from(s), Vec::new()),
    }
}

/// A vector file opened for lookups by name.
struct VectorFile {
    file: TensorFile,
    names: Vec<String>,
}

impl VectorFile {
    fn open(path: &Path) -> Result<VectorFile> {
        let file = TensorFile::open(path)?;
        let mut names: Vec<String> = file.entries.keys().cloned().collect();
        names.sort();
        Ok(VectorFile { file, names })
    }

    /// The tensor `name` means at `site`: `[rows, width]` (a `[width]` tensor is one row).
    fn lookup(&mut self, name: Option<&str>, site: Site) -> Result<(String, usize, Vec<f32>)> {
        let path = self.file.path.display().to_string();
        let key = match name {
            None if self.names.len() == 1 => self.names[0].clone(),
            None => return Err(Error::input(format!("{path}: holds {} tensors; name one as {path}:NAME (available: {})", self.names.len(), abbreviate(&self.names)))),
            Some(n) if self.file.entries.contains_key(n) => n.to_string(),
            Some(n) => {
                let at_site = format!("{site}/{n}");
                if !self.file.entries.contains_key(&at_site) {
                    return Err(Error::input(format!("{path}: no vector `{n}` (nor `{at_site}`); available: {}", abbreviate(&self.names))));
                }
                at_site
            }
        };
        let (shape, v) = self.file.read_f32(&key)?;
        let rows = match shape.as_slice() {
            [_] => 1,
            [k, _] => *k,
            _ => return Err(Error::input(format!("{path}: `{key}` has shape {shape:?}; expected [width] or [k, width]"))),
        };
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::input(format!("{path}: `{key}` holds a non-finite value ({}) at element {j}", v[j])));
        }
        Ok((key, rows, v))
    }

    /// The named tensors at `site`, each checked against the site's width `w`: (names, values
    /// `[n_rows, w]` stacked in order).
    fn rows(&mut self, names: &[String], site: Site, w: usize) -> Result<(Vec<String>, Vec<f32>)> {
        let names: Vec<Option<&str>> = if names.is_empty() { vec![None] } else { names.iter().map(|n| Some(n.as_str())).collect() };
        let mut keys = Vec::new();
        let mut out = Vec::new();
        for n in names {
            let (key, rows, v) = self.lookup(n, site)?;
            if v.len() != rows * w {
                return Err(Error::input(format!("{}: `{key}` has width {}, but {site} has width {w}", self.file.path.display(), v.len() / rows.max(1))));
            }
            keys.push(key);
            out.extend(v);
        }
        Ok((keys, out))
    }

    /// The sum of the named vectors at `site` (width `w`), unit-norm when `normalise`: (its
    /// name, `[w]`). A `[k, width]` subspace is an error.
    fn vector(&mut self, names: &[String], site: Site, w: usize, normalise: bool) -> Result<(String, Vec<f32>)> {
        let (keys, rows) = self.rows(names, site, w)?;
        if rows.len() != keys.len() * w {
            return Err(Error::input(format!("{}: the vector `{}` is a [k, width] subspace; give it as project", self.file.path.display(), keys.join("+"))));
        }
        let mut v = vec![0.0f32; w];
        rows.chunks(w).for_each(|r| v.iter_mut().zip(r).for_each(|(a, b)| *a += b));
        if normalise {
            let nv = norm(&v);
            if nv == 0.0 {
                return Err(Error::input(format!("{}: cannot normalise `{}` at {site}: it is zero", self.file.path.display(), keys.join("+"))));
            }
            v.iter_mut().for_each(|x| *x /= nv);
        }
        Ok((source_name(names, &keys), v))
    }
}

/// A vector's name in results: the names given (`a+b`), else the tensor names read.
fn source_name(names: &[String], keys: &[String]) -> String {
    if names.is_empty() { keys.join("+") } else { names.join("+") }
}

/// The vector `source` (`FILE.safetensors[:NAME[+NAME...]]`, names resolved at `site` as
/// `--vector` resolves them) checked against the site's width `w`: (its name, `[w]`, the sum of
/// the named vectors, unit-norm when `normalise`).
pub fn read_vector(source: &str, site: Site, w: usize, normalise: bool) -> Result<(String, Vec<f32>)> {
    let (path, names) = parse_source(source);
    VectorFile::open(&path)?.vector(&names, site, w, normalise)
}

/// The first names of a list and how many more.
fn abbreviate(names: &[String]) -> String {
    const SHOW: usize = 8;
    let head = names.iter().take(SHOW).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOW { format!("{head}, ... ({} in all)", names.len()) } else { head }
}

/// One condition of a sweep: one op at one site.
#[derive(Clone, Debug)]
pub struct Condition {
    /// The vector's name (`joy`, `a+b`, the tensor name); `project-out:<subspace>` for a
    /// projection without vector, `project-set:<vector>:<subspace>` with one; an ablated
    /// component's name (`experiments::ablate::Component::name`).
    pub direction: String,
    pub site: Site,
    pub beta: f32,
    pub op: Op,
    pub positions: TokenScope,
    /// Units the op acts on (heads at `z`, neurons at `mlp_post`); None = the whole site.
    pub units: Option<Vec<usize>>,
}

impl Condition {
    /// The intervention on the prompts `prompts` of a batch (None: all). Err when the
    /// positions name generated tokens (a command without generation).
    pub fn intervention(&self, prompts: Option<Vec<usize>>) -> Result<Intervention> {
        match (&self.positions.prompt, self.positions.generated) {
            (Some(p), false) => Ok(Intervention { site: self.site, prompts, positions: p.clone(), units: self.units.clone(), op: self.op.clone() }),
            _ => Err(Error::input(format!("{} at {}: `generated` positions need a command that generates (this one reads the prompt only)", self.direction, self.site))),
        }
    }
}

impl InterventionSpec {
    /// The spec once per direction its vector lists (`FILE:A,B+C` gives `FILE:A` and
    /// `FILE:B+C`, in order); a spec without a list is itself.
    pub fn directions(&self) -> Vec<InterventionSpec> {
        let Some((file, names)) = self.vector.as_deref().and_then(|v| v.rsplit_once(".safetensors:")) else { return vec![self.clone()] };
        let list: Vec<&str> = names.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
        if list.len() < 2 {
            return vec![self.clone()];
        }
        list.into_iter().map(|n| InterventionSpec { vector: Some(format!("{file}.safetensors:{n}")), ..self.clone() }).collect()
    }

    /// The conditions, layer-major then beta in the order given. `generation`: whether the
    /// command generates (else `generated` positions are an error).
    pub fn resolve(&self, cfg: &ModelConfig, generation: bool) -> Result<Vec<Condition>> {
        let kind = SiteKind::from_short_name(self.site.trim())
            .filter(|k| !matches!(k, SiteKind::Pattern | SiteKind::FinalNorm))
            .ok_or_else(|| Error::input(format!("site `{}`: expected a site kind such as resid_pre, resid_post, attn_out, mlp_out, z, mlp_post (not pattern or final_norm)", self.site)))?;
        if self.betas.is_empty() {
            return Err(Error::input("betas: empty list (example: --betas=-4,2,8)"));
        }
        if let Some(b) = self.betas.iter().find(|b| !b.is_finite()) {
            return Err(Error::input(format!("betas: {b} is not a finite number")));
        }
        let positions = TokenScope::parse(&self.positions)?;
        if positions.generated && !generation {
            return Err(Error::input(format!("positions `{}`: `generated` needs a command that generates (this one reads the prompt only)", self.positions)));
        }
        if self.vector.is_none() && self.project.is_none() {
            return Err(Error::input("give a vector (--vector FILE.safetensors[:NAME]) or a subspace (--project FILE.safetensors[:NAME])"));
        }
        let layers = self.layers.clone().unwrap_or(Layers::Text("all".into())).resolve(cfg.n_layers)?;
        let mut vector = self.vector.as_deref().map(parse_source).map(|(p, n)| VectorFile::open(&p).map(|f| (f, n))).transpose()?;
        let mut project = self.project.as_deref().map(parse_source).map(|(p, n)| VectorFile::open(&p).map(|f| (f, n))).transpose()?;
        let mut out = Vec::new();
        for layer in layers {
            let site = Site::new(layer, kind);
            let (n, uw) = kind.units(cfg, 0);
            let w = n * uw;
            // v: [w]
            let (vector_name, v) = match &mut vector {
                Some((f, names)) => {
                    let (vector_name, v) = f.vector(names, site, w, self.normalise)?;
                    (Some(vector_name), v)
                }
                None => (None, vec![0.0; w]),
            };
            // P: [w, w]
            let (subspace_name, p) = match &mut project {
                Some((f, names)) => {
                    let (keys, rows) = f.rows(names, site, w)?;
                    let p = projector(&rows, w).map_err(|e| Error::input(format!("{}: subspace `{}` at {site}: {e}", f.file.path.display(), source_name(names, &keys))))?;
                    (Some(source_name(names, &keys)), Some(p))
                }
                None => (None, None),
            };
            let direction = match (vector_name, subspace_name) {
                (Some(v), None) => v,
                (None, Some(s)) => format!("project-out:{s}"),
                (Some(v), Some(s)) => format!("project-set:{v}:{s}"),
                (None, None) => unreachable!("checked above: a vector or a subspace"),
            };
            for &beta in &self.betas {
                let op = match &p {
                    Some(p) => Op::ProjectSet { beta, p: p.clone(), v: v.clone() },
                    None => Op::Add { beta, v: v.clone(), normalize: false },
                };
                out.push(Condition { direction: direction.clone(), site, beta, op, positions: positions.clone(), units: None });
            }
        }
        Ok(out)
    }
}

/// Reads a JSON spec file: one [`InterventionSpec`] object or a list of them. Errors name the
/// file and the bad field (unknown fields included).
pub fn read_specs(path: &Path) -> Result<Vec<InterventionSpec>> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<serde_json::Value>),
        One(serde_json::Value),
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let values = match serde_json::from_str::<OneOrMany>(&text).map_err(|e| Error::file(path, format!("not JSON: {e}")))? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(v) => vec![v],
    };
    if values.is_empty() {
        return Err(Error::file(path, "an empty list of interventions"));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| serde_path_to_error::deserialize(v).map_err(|e| Error::file(path, format!("intervention {i}: {}{}", e.inner(), if e.path().to_string() == "." { String::new() } else { format!(" (at {})", e.path()) }))))
        .collect()
}

/// The conditions of several specs, in spec order, each spec's directions in the order listed
/// (see [`InterventionSpec::directions`] and [`InterventionSpec::resolve`]).
pub fn resolve_all(specs: &[InterventionSpec], cfg: &ModelConfig, generation: bool) -> Result<Vec<Condition>> {
    let mut out = Vec::new();
    for s in specs.iter().flat_map(InterventionSpec::directions) {
        out.extend(s.resolve(cfg, generation)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_grammar() {
        let l = |s: &str| Layers::Text(s.into()).resolve(4);
        assert_eq!(l("1,2").unwrap(), [1, 2]);
        assert_eq!(l("0..2").unwrap(), [0, 1, 2]);
        assert_eq!(l("all").unwrap(), [0, 1, 2, 3]);
        assert_eq!(Layers::List(vec![3]).resolve(4).unwrap(), [3]);
        assert!(l("4").unwrap_err().to_string().contains("layer 4 is out of range"));
        assert!(l("1,1").unwrap_err().to_string().contains("twice"));
        assert!(l("0..99999999999").unwrap_err().to_string().contains("layer 99999999999 is out of range"));
        assert!(l("3..1").unwrap_err().to_string().contains("empty range"));
        assert!(l("x").is_err() && l("").is_err());
    }

    #[test]
    fn sources() {
        assert_eq!(parse_source("d/dirs.safetensors:joy+anger"), (PathBuf::from("d/dirs.safetensors"), vec!["joy".to_string(), "anger".to_string()]));
        assert_eq!(parse_source("dirs.safetensors:blocks.1.hook_resid_post/joy"), (PathBuf::from("dirs.safetensors"), vec!["blocks.1.hook_resid_post/joy".to_string()]));
        assert_eq!(parse_source("dirs.safetensors"), (PathBuf::from("dirs.safetensors"), vec![]));
    }

    #[test]
    fn direction_lists() {
        let spec = |v: &str| InterventionSpec { vector: Some(v.into()), project: None, site: default_site(), layers: None, positions: default_positions(), betas: vec![1.0], normalise: false };
        let vectors = |v: &str| spec(v).directions().into_iter().map(|s| s.vector.unwrap()).collect::<Vec<_>>();
        assert_eq!(vectors("d/x.safetensors:anger, joy+fear,"), ["d/x.safetensors:anger", "d/x.safetensors:joy+fear"]);
        assert_eq!(vectors("d/x.safetensors:anger"), ["d/x.safetensors:anger"]);
        assert_eq!(vectors("d/x.safetensors"), ["d/x.safetensors"]);
        let two = spec("x.safetensors:a,b").directions();
        assert_eq!((two[1].betas.clone(), two[1].site.clone()), (vec![1.0], default_site()), "the other fields are kept");
    }

    #[test]
    fn abbreviated_names() {
        let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        assert_eq!(abbreviate(&names[..2]), "n0, n1");
        assert!(abbreviate(&names).ends_with("... (20 in all)"));
    }
}
