//! `import patchbay`: the Python binding over the patchbay library (pyo3 + rust-numpy).
//!
//! `Model` loads a checkpoint on an engine (`cpu`, `emu`, `cuda`, `cuda:N`, through
//! `patchbay::engine::load_engine`'s `upload`) and runs the library's pipelines: `capture`
//! (`experiments::capture`, the layout of `patchbay capture`'s file), `score`
//! (`experiments::score::label_logits`), `patch` (`experiments::patch::run_sweep`, or
//! `patch_files::run_to_dir` with `out=`). Arrays come in as anything numpy reads as float32
//! and go out as numpy arrays; every call releases the GIL while it computes. Every
//! `patchbay::Error` becomes a `patchbay.Error` subclass with the same one-line message.
//! The intervention classes (`Add`, `Patch`, ...) live in `patchbay/__init__.py`; each hands
//! this module a plain dict (`_spec()`), turned here into a `patchbay::intervene::Intervention`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::ProgressBar;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use serde_json::json;

use patchbay::backend::DeviceSpec;
use patchbay::data::labels::LabelSet;
use patchbay::data::prompts::{PromptSource, check_prompts, load_prompts};
use patchbay::data::template::Template;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::finite::Checked;
use patchbay::engine::{Engine, upload};
use patchbay::backend::ops::sample::SampleParams;
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, generate};
use patchbay::experiments::inspect::{model_info, site_entry};
use patchbay::experiments::patch::{ExperimentResult, Method, Overflow, Pair, RunSettings, SweepSpec, experiments, run_sweep};
use patchbay::experiments::patch_files::{DirRun, read_done, run_to_dir};
use patchbay::experiments::score::{Scores, label_logits};
use patchbay::experiments::steer::{Readout, steer_labels};
use patchbay::intervene::spec::Condition;
use patchbay::intervene::{Intervention, Op};
use patchbay::io::{OutDtype, OutTensor};
use patchbay::learn::directions::projector;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};

create_exception!(patchbay, Error, PyException, "Every error of patchbay (one line naming the bad input, file or device).");
create_exception!(patchbay, InputError, Error, "Bad input: an unknown site, an index or position out of range, a wrong shape, empty input.");
create_exception!(patchbay, FileError, Error, "A file that cannot be read or holds something it must not (config.json fields included).");
create_exception!(patchbay, UnsupportedError, Error, "Something the checkpoint uses that patchbay does not implement.");
create_exception!(patchbay, DeviceError, Error, "The compute device is missing or failed.");
create_exception!(patchbay, NonFiniteError, Error, "The model's outputs hold NaN or Inf (the message names the prompt and the first site).");

/// The Python exception of a patchbay error, with its one-line message.
fn py_err(e: patchbay::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        patchbay::Error::Input(_) => InputError::new_err(msg),
        patchbay::Error::Io { .. } | patchbay::Error::File { .. } | patchbay::Error::Config { .. } => FileError::new_err(msg),
        patchbay::Error::Unsupported(_) => UnsupportedError::new_err(msg),
        patchbay::Error::Device(_) => DeviceError::new_err(msg),
        patchbay::Error::NonFinite { .. } => NonFiniteError::new_err(msg),
        patchbay::Error::TooLong { .. } => InputError::new_err(msg),
    }
}

fn input_err(msg: impl Into<String>) -> PyErr {
    InputError::new_err(msg.into())
}

/// A JSON value as the Python object `json.loads` makes of it.
fn to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// Anything numpy reads as an array (lists, numpy arrays, objects with `__array__`) as a
/// C-contiguous float32 array: its values and shape. Non-finite values are refused.
fn f32_array(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let np = py.import("numpy")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", np.getattr("float32")?)?;
    let arr = np.call_method("ascontiguousarray", (obj,), Some(&kwargs)).map_err(|e| input_err(format!("{what}: not an array of numbers ({e})")))?;
    let arr: PyReadonlyArrayDyn<f32> = arr.extract().map_err(|e| input_err(format!("{what}: {e}")))?;
    let data = arr.as_slice().map_err(|e| input_err(format!("{what}: {e}")))?.to_vec();
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(input_err(format!("{what}: element {i} is {} (values must be finite)", data[i])));
    }
    Ok((data, arr.shape().to_vec()))
}

/// A list of lists of integers (or anything with `tolist()`, e.g. a numpy or torch array).
fn int_lists<T: for<'a, 'py> FromPyObject<'a, 'py>>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Vec<T>>> {
    let obj = if obj.hasattr("tolist")? { obj.call_method0("tolist")? } else { obj.clone() };
    obj.extract().map_err(|_| input_err(format!("{what}: expected a list of lists of non-negative integers")))
}

/// Positions as `"all"`, a string such as `"-1,-2"`, one integer or a list of integers.
fn positions(obj: &Bound<'_, PyAny>) -> PyResult<Positions> {
    if let Ok(s) = obj.extract::<String>() {
        return Positions::parse(&s).map_err(py_err);
    }
    if let Ok(p) = obj.extract::<i64>() {
        return Ok(Positions::List(vec![p]));
    }
    let obj = if obj.hasattr("tolist")? { obj.call_method0("tolist")? } else { obj.clone() };
    let list: Vec<i64> = obj.extract().map_err(|_| input_err("positions: expected \"all\", an integer or a list of integers (-1 = the last token)"))?;
    if list.is_empty() {
        return Err(input_err("positions: empty list"));
    }
    Ok(Positions::List(list))
}

/// Where an intervention acts: `"all"`, `"last"`, `"last:K"`, `"generated"` (generate only),
/// `"X+generated"`, a string such as `"-1,-2"`, one integer or a list of integers.
fn token_scope(obj: &Bound<'_, PyAny>) -> PyResult<TokenScope> {
    match obj.extract::<String>() {
        Ok(s) => TokenScope::parse(&s).map_err(py_err),
        Err(_) => Ok(TokenScope { prompt: Some(positions(obj)?), generated: false }),
    }
}

/// An intervention object read: the op at a site, its units and prompts, and where it acts.
struct Parsed {
    site: Site,
    prompts: Option<Vec<usize>>,
    units: Option<Vec<usize>>,
    op: Op,
    scope: TokenScope,
}

/// One name or a list of names.
#[derive(FromPyObject)]
enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn into_vec(self) -> Vec<String> {
        match self {
            Names::One(s) => vec![s],
            Names::Many(v) => v,
        }
    }
}

/// A model on an engine.
#[pyclass(module = "patchbay", name = "Model", frozen)]
struct PyModel {
    model: patchbay::model::Model,
    /// The weights on the device; None on the CPU, where `model` is the engine.
    device: Option<DeviceModel>,
    path: PathBuf,
}

impl PyModel {
    /// The engine of a call: the device's or the CPU model, its outputs checked for NaN and Inf
    /// (a `NonFiniteError` naming the prompt and first site, as the CLI stops).
    fn engine(&self) -> Checked<&dyn Engine> {
        let raw: &dyn Engine = match &self.device {
            Some(d) => d,
            None => &self.model,
        };
        Checked::new(raw, false)
    }

    /// The prompts of a call: `token_ids` verbatim, or `texts` encoded (with `chat`, as a user
    /// message in the chat template).
    fn prompts(&self, py: Python<'_>, token_ids: Option<&Bound<'_, PyAny>>, texts: Option<Names>, chat: bool) -> PyResult<Vec<Vec<u32>>> {
        match (token_ids, texts) {
            (Some(ids), None) => {
                if chat {
                    return Err(input_err("chat applies to texts; token_ids are used verbatim"));
                }
                let ids = int_lists::<u32>(ids, "token_ids")?;
                check_prompts(&ids).map_err(py_err)?;
                Ok(ids)
            }
            (None, Some(texts)) => {
                let texts = texts.into_vec();
                py.detach(|| load_prompts(PromptSource::Texts(&texts), &self.path, chat)).map_err(py_err)
            }
            _ => Err(input_err("give the prompts: token_ids=[[...], ...] or texts=[...] (one of them)")),
        }
    }

    /// The label set: `label_token_ids` (a list of ids, or a dict name -> id) or `labels`
    /// (names, each scored by the first token of " name").
    fn labels(&self, label_token_ids: Option<&Bound<'_, PyAny>>, labels: Option<Names>) -> PyResult<LabelSet> {
        let tok = PromptTokenizer::load(&self.path);
        let set = match (label_token_ids, labels) {
            (Some(ids), None) => {
                let spec = if let Ok(d) = ids.cast::<PyDict>() {
                    d.iter().map(|(k, v)| Ok(format!("{}={}", k.extract::<String>()?, v.extract::<u32>()?))).collect::<PyResult<Vec<_>>>()
                } else {
                    let ids = if ids.hasattr("tolist")? { ids.call_method0("tolist")? } else { ids.clone() };
                    ids.extract::<Vec<u32>>().map(|v| v.iter().map(u32::to_string).collect())
                }
                .map_err(|_| input_err("label_token_ids: expected a list of token ids or a dict {name: id}"))?;
                if spec.iter().any(|s| s.contains(',')) {
                    return Err(input_err("label_token_ids: a label name cannot hold a comma"));
                }
                LabelSet::parse_ids(&spec.join(","), tok.as_ref().ok())
            }
            (None, Some(names)) => LabelSet::resolve(&names.into_vec(), &tok.map_err(py_err)?),
            _ => return Err(input_err("give the labels: label_token_ids=[...] or labels=[names] (one of them)")),
        };
        let set = set.map_err(py_err)?;
        set.check_vocab(self.model.cfg.vocab_size).map_err(py_err)?;
        Ok(set)
    }

    /// The interventions given as objects of the package (`Add`, `Patch`, ...), for a call on
    /// `prompts`.
    fn interventions(&self, py: Python<'_>, list: Option<&Bound<'_, PyAny>>, prompts: &[Vec<u32>]) -> PyResult<Vec<Intervention>> {
        let Some(list) = list else { return Ok(Vec::new()) };
        let parsed = self.parse_all(py, list, prompts)?;
        parsed
            .into_iter()
            .enumerate()
            .map(|(i, p)| match p.scope {
                TokenScope { prompt: Some(positions), generated: false } => Ok(Intervention { site: p.site, prompts: p.prompts, positions, units: p.units, op: p.op }),
                _ => Err(input_err(format!("interventions[{i}]: positions `{}` act on generated tokens: only generate() has them", p.scope.describe()))),
            })
            .collect()
    }

    /// The intervention objects of a call (one, or a list), read in order.
    fn parse_all(&self, py: Python<'_>, list: &Bound<'_, PyAny>, prompts: &[Vec<u32>]) -> PyResult<Vec<Parsed>> {
        let items: Vec<Bound<'_, PyAny>> = if list.hasattr("_spec")? { vec![list.clone()] } else { list.try_iter()?.collect::<PyResult<_>>()? };
        items.iter().enumerate().map(|(i, item)| self.intervention(py, item, prompts).map_err(|e| prefix(py, e, &format!("interventions[{i}]")))).collect()
    }

    fn intervention(&self, py: Python<'_>, item: &Bound<'_, PyAny>, prompts: &[Vec<u32>]) -> PyResult<Parsed> {
        if !item.hasattr("_spec")? {
            return Err(input_err(format!("{} is not an intervention (patchbay.Add, Patch, Zero, Mean, Scale, ProjectSet, RandomEqualNorm)", item.get_type().name()?)));
        }
        let spec = item.call_method0("_spec")?;
        let spec = spec.cast::<PyDict>()?;
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> { spec.get_item(k)?.ok_or_else(|| input_err(format!("missing `{k}`"))) };
        let opt = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> { Ok(spec.get_item(k)?.filter(|v| !v.is_none())) };
        let cfg = &self.model.cfg;
        let site_name: String = get("site")?.extract().map_err(|_| input_err("site: expected a TransformerLens name such as blocks.3.hook_resid_post"))?;
        let site = Site::parse(&site_name, cfg).map_err(py_err)?;
        let scope = token_scope(&get("positions")?)?;
        let heads: Option<Vec<usize>> = opt("heads")?.map(|h| h.extract()).transpose().map_err(|_| input_err("heads: expected a list of head indices"))?;
        let neurons: Option<Vec<usize>> = opt("neurons")?.map(|h| h.extract()).transpose().map_err(|_| input_err("neurons: expected a list of neuron indices"))?;
        let units = match (heads, neurons) {
            (Some(_), Some(_)) => return Err(input_err("give heads or neurons, not both")),
            (Some(h), None) if site.kind.unit_name().ends_with("head") => Some(h),
            (None, Some(n)) if site.kind == SiteKind::MlpPost => Some(n),
            (Some(_), None) => return Err(input_err(format!("heads select units at head sites (q, k, v, rot_q, rot_k, z, result), not at {site}"))),
            (None, Some(_)) => return Err(input_err(format!("neurons select units at mlp.hook_post, not at {site}"))),
            (None, None) => None,
        };
        let prompt_ids: Option<Vec<usize>> = opt("prompts")?.map(|p| p.extract()).transpose().map_err(|_| input_err("prompts: expected a list of prompt indices"))?;
        let (n_units, unit_w) = site.kind.units(cfg, 0);
        let width = units.as_ref().map_or(n_units, Vec::len) * unit_w;
        let vector = |k: &str| -> PyResult<Vec<f32>> {
            let (v, shape) = f32_array(py, &get(k)?, k)?;
            if v.len() != width {
                return Err(input_err(format!("{k}: {} values (shape {shape:?}), expected {width} (the selected width at {site})", v.len())));
            }
            Ok(v)
        };
        let float = |k: &str| -> PyResult<f32> { get(k)?.extract::<f32>().map_err(|_| input_err(format!("{k}: expected a number"))) };
        let kind: String = get("op")?.extract()?;
        let op = match kind.as_str() {
            "add" => Op::Add { beta: float("beta")?, v: vector("vector")?, normalize: get("normalise")?.is_truthy()? },
            "zero" => Op::Zero,
            "mean" => Op::Mean { mean: vector("mean")? },
            "scale" => Op::Scale { alpha: float("alpha")? },
            "random_equal_norm" => Op::RandomEqualNorm { seed: get("seed")?.extract().map_err(|_| input_err("seed: expected a non-negative integer"))? },
            "project_set" => {
                let (basis, _) = f32_array(py, &get("subspace")?, "subspace")?;
                if basis.is_empty() || basis.len() % width != 0 {
                    return Err(input_err(format!("subspace: {} values, expected k x {width} (k directions of the selected width at {site})", basis.len())));
                }
                let v = if opt("vector")?.is_some() { vector("vector")? } else { vec![0.0; width] };
                Op::ProjectSet { beta: float("beta")?, p: projector(&basis, width).map_err(py_err)?, v }
            }
            "patch" => {
                let (values, shape) = f32_array(py, &get("values")?, "values")?;
                let n_selected = prompt_ids.as_ref().map_or(prompts.len(), Vec::len);
                // [W]: every row; [n_positions, W] with a position list: the same rows for
                // every prompt; otherwise one row per (prompt, position), prompt-major.
                let values = match (&scope.prompt, shape.len()) {
                    (Some(Positions::List(l)), 2) if shape[0] == l.len() && values.len() == l.len() * width => values.repeat(n_selected),
                    _ => values,
                };
                Op::Patch { values }
            }
            other => return Err(input_err(format!("unknown intervention op `{other}`"))),
        };
        Ok(Parsed { site, prompts: prompt_ids, units, op, scope })
    }
}

/// The error `e` with `what: ` before its message (same exception type).
fn prefix(py: Python<'_>, e: PyErr, what: &str) -> PyErr {
    let msg = format!("{what}: {}", e.value(py));
    if e.is_instance_of::<Error>(py) {
        let ty = e.get_type(py);
        return ty.call1((msg,)).map_or_else(|err| err, PyErr::from_value);
    }
    InputError::new_err(msg)
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face model directory or a GGUF file on a device: `cpu` (the f32
    /// reference), `emu` (the CUDA kernels on the CPU emulator), `cuda` or `cuda:N`.
    #[new]
    #[pyo3(signature = (path, device = "cpu"))]
    fn new(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let spec: DeviceSpec = device.parse().map_err(py_err)?;
        py.detach(|| {
            let model = patchbay::model::Model::load(&path)?;
            let device = upload(&model, spec)?;
            Ok(PyModel { model, device, path })
        })
        .map_err(py_err)
    }

    /// The model as `patchbay inspect --json` describes it (a dict).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &model_info(&self.model))
    }

    /// The engine's name (`cpu`, `emu`, `cuda:0 ...`).
    #[getter]
    fn device(&self) -> String {
        self.engine().device_name()
    }

    /// Every site of the model, in forward order: dicts of name (TransformerLens), kind, layer
    /// and per-token shape.
    fn sites<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let cfg = &self.model.cfg;
        let list: Vec<serde_json::Value> = Site::all(cfg)
            .into_iter()
            .map(|s| {
                let mut e = site_entry(s, cfg);
                e["layer"] = json!(s.layer);
                e
            })
            .collect();
        to_py(py, &json!(list))
    }

    /// Token ids of each text, as `patchbay capture --text` encodes it (with `chat`, wrapped as
    /// a user message in the model's chat template); with `template` (a preset such as `tak`,
    /// or a string with `{text}`), rendered through it first as `patchbay score --template` does.
    #[pyo3(signature = (texts, chat = false, template = None))]
    fn tokenize(&self, py: Python<'_>, texts: Names, chat: bool, template: Option<&str>) -> PyResult<Vec<Vec<u32>>> {
        let Some(spec) = template else { return self.prompts(py, None, Some(texts), chat) };
        let texts = texts.into_vec();
        py.detach(|| {
            let mut t = Template::parse(spec)?;
            t.chat = chat;
            let tok = PromptTokenizer::load(&self.path)?;
            let ids = texts.iter().map(|x| t.encode(&tok, x)).collect::<patchbay::Result<Vec<_>>>()?;
            check_prompts(&ids)?;
            Ok(ids)
        })
        .map_err(py_err)
    }

    /// Activations at `sites` (TransformerLens names, globs, short names, `all`) at `positions`
    /// (`"all"` or a list such as `[-1]`), with `interventions` applied: a dict from site name
    /// (and `logits`, `prompt_offsets`) to arrays, laid out as `patchbay capture`'s file.
    #[pyo3(signature = (token_ids = None, texts = None, sites = None, positions = None, logits = false, interventions = None, chat = false, batch_size = 8))]
    #[allow(clippy::too_many_arguments)]
    fn capture<'py>(
        &self,
        py: Python<'py>,
        token_ids: Option<&Bound<'py, PyAny>>,
        texts: Option<Names>,
        sites: Option<Names>,
        positions: Option<&Bound<'py, PyAny>>,
        logits: bool,
        interventions: Option<&Bound<'py, PyAny>>,
        chat: bool,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prompts = self.prompts(py, token_ids, texts, chat)?;
        let sites = match sites {
            Some(s) => Site::parse_spec(&s.into_vec().join(","), &self.model.cfg).map_err(py_err)?,
            None if logits => Vec::new(),
            None => return Err(input_err("give sites=[...] (TransformerLens names, globs, short names or \"all\") or logits=True")),
        };
        let positions = match positions {
            Some(p) => self::positions(p)?,
            None => Positions::All,
        };
        let spec = CaptureSpec { sites, positions, logits, dtype: OutDtype::F32, batch_size, interventions: self.interventions(py, interventions, &prompts)? };
        let tensors = py.detach(|| capture(&self.engine(), &prompts, &spec, &ProgressBar::hidden())).map_err(py_err)?;
        let out = PyDict::new(py);
        for (name, t) in tensors {
            let arr = match t {
                OutTensor::Float { shape, data, .. } => PyArray1::from_vec(py, data).reshape(shape)?.into_any(),
                OutTensor::I64 { shape, data } => PyArray1::from_vec(py, data).reshape(shape)?.into_any(),
            };
            out.set_item(name, arr)?;
        }
        Ok(out)
    }

    /// The model's predictions over a label set: next-token logits at each prompt's last
    /// position restricted to the labels (as `patchbay score`), with `interventions` applied.
    /// Returns a dict: `label_logits` [n_prompts, n_labels] float32, `pred` [n_prompts] int64
    /// (label index), `labels` (names) and `label_token_ids`.
    #[pyo3(signature = (token_ids = None, texts = None, label_token_ids = None, labels = None, interventions = None, chat = false, batch_size = 8))]
    #[allow(clippy::too_many_arguments)]
    fn score<'py>(
        &self,
        py: Python<'py>,
        token_ids: Option<&Bound<'py, PyAny>>,
        texts: Option<Names>,
        label_token_ids: Option<&Bound<'py, PyAny>>,
        labels: Option<Names>,
        interventions: Option<&Bound<'py, PyAny>>,
        chat: bool,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prompts = self.prompts(py, token_ids, texts, chat)?;
        let labels = self.labels(label_token_ids, labels)?;
        let ivs = self.interventions(py, interventions, &prompts)?;
        let logits = py.detach(|| label_logits(&self.engine(), &prompts, &labels, &ivs, batch_size, &ProgressBar::hidden())).map_err(py_err)?;
        let scores = Scores::new(labels, logits, vec![None; prompts.len()]);
        let out = PyDict::new(py);
        out.set_item("label_logits", PyArray1::from_vec(py, scores.logits.clone()).reshape([prompts.len(), scores.labels.len()])?)?;
        out.set_item("pred", PyArray1::from_vec(py, scores.pred.iter().map(|&p| p as i64).collect()))?;
        out.set_item("labels", scores.labels.names.clone())?;
        out.set_item("label_token_ids", scores.labels.token_ids.clone())?;
        Ok(out)
    }

    /// An activation-patching sweep (as `patchbay patch`): every (pair, site kind, window
    /// centre) patches the source prompt's clean activations into the target at `positions`
    /// and the window's layers, and reads the label logits at the target's last token.
    /// Returns one dict per experiment with the fields of experiments.jsonl, by id; with `out`,
    /// also writes the run directory of `patchbay patch` (experiments.jsonl, summary.csv,
    /// heatmap.png, manifest.json; `resume=True` continues a killed run there). `overflow`
    /// ("auto", "spill" or "recompute") says where the clean runs beyond `mem_budget` come
    /// from, as `patch --overflow`.
    #[pyo3(signature = (token_ids = None, texts = None, label_token_ids = None, labels = None, pairs = None, sites = None, window = 5, positions = None, layers = None, heads = None, neurons = None, method = "resumed", batch_rows = 256, mem_budget = 2usize << 30, overflow = "auto", out = None, resume = false, chat = false))]
    #[allow(clippy::too_many_arguments)]
    fn patch<'py>(
        &self,
        py: Python<'py>,
        token_ids: Option<&Bound<'py, PyAny>>,
        texts: Option<Names>,
        label_token_ids: Option<&Bound<'py, PyAny>>,
        labels: Option<Names>,
        pairs: Option<&Bound<'py, PyAny>>,
        sites: Option<Names>,
        window: usize,
        positions: Option<&Bound<'py, PyAny>>,
        layers: Option<Vec<usize>>,
        heads: Option<Vec<usize>>,
        neurons: Option<Vec<usize>>,
        method: &str,
        batch_rows: usize,
        mem_budget: usize,
        overflow: &str,
        out: Option<PathBuf>,
        resume: bool,
        chat: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let started = Instant::now();
        let prompts = self.prompts(py, token_ids, texts, chat)?;
        let labels = self.labels(label_token_ids, labels)?;
        let pairs: Vec<Pair> = int_lists::<usize>(pairs.ok_or_else(|| input_err("give pairs=[(source, target), ...] (prompt indices)"))?, "pairs")?
            .into_iter()
            .map(|p| match p[..] {
                [source, target] if source < prompts.len() && target < prompts.len() => Ok(Pair { source, target }),
                [s, t] => Err(input_err(format!("pair ({s}, {t}): prompt index out of range ({} prompts)", prompts.len()))),
                _ => Err(input_err(format!("pairs: {p:?} is not a (source, target) pair"))),
            })
            .collect::<PyResult<_>>()?;
        if heads.is_some() && neurons.is_some() {
            return Err(input_err("give heads or neurons, not both"));
        }
        let sites = sites.map_or_else(|| vec!["attn_out".into(), "mlp_out".into(), "resid_post".into()], Names::into_vec);
        let positions = match positions {
            Some(p) => match self::positions(p)? {
                Positions::List(l) => l.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                Positions::All => "all".into(),
            },
            None => "-1".into(),
        };
        let n_layers = self.model.cfg.n_layers;
        let spec = SweepSpec::new(&sites, heads.or(neurons), window, layers, &positions, n_layers, labels.token_ids.clone()).map_err(py_err)?;
        let exps = experiments(&pairs, &spec, n_layers).map_err(py_err)?;
        let method = match method {
            "resumed" => Method::Resumed,
            "naive" => Method::Naive,
            m => return Err(input_err(format!("method `{m}`: expected resumed or naive"))),
        };
        let overflow = match overflow {
            "auto" => Overflow::Auto,
            "spill" => Overflow::Spill,
            "recompute" => Overflow::Recompute,
            o => return Err(input_err(format!("overflow `{o}`: expected auto, spill or recompute"))),
        };
        let lines: Vec<String> = match &out {
            Some(dir) => {
                let run = DirRun {
                    out: dir,
                    started,
                    method,
                    batch_rows,
                    mem_budget,
                    overflow,
                    part: None,
                    resume,
                    stop_after: None,
                    sweep_id: spec.identity(&self.model.config_hash, &prompts, &pairs, &sites.join(","), batch_rows, mem_budget, overflow),
                    provenance: json!({
                        "command": "patch",
                        "interface": "python",
                        "patchbay_version": env!("CARGO_PKG_VERSION"),
                        "model": self.model.dir.display().to_string(),
                        "device": self.engine().device_name(),
                        "method": if method == Method::Resumed { "resumed" } else { "naive" },
                        "labels": labels.names,
                    }),
                };
                py.detach(|| {
                    run_to_dir(&self.engine(), &prompts, &spec, &exps, &run, &ProgressBar::hidden())?;
                    read_done(&dir.join("experiments.jsonl"), false)
                })
                .map_err(py_err)?
                .into_iter()
                .map(|d| d.line)
                .collect()
            }
            None => {
                let mut results: Vec<ExperimentResult> = Vec::with_capacity(exps.len());
                let skip = HashSet::new();
                let settings = RunSettings { method, skip: &skip, batch_rows, mem_budget, overflow, progress: &ProgressBar::hidden() };
                py.detach(|| run_sweep(&self.engine(), &prompts, &spec, &exps, &settings, &mut |r| Ok(results.push(r)))).map_err(py_err)?;
                results.sort_by_key(|r| r.id);
                results.iter().map(|r| serde_json::to_string(r).map_err(|e| input_err(e.to_string()))).collect::<PyResult<_>>()?
            }
        };
        let loads = py.import("json")?.getattr("loads")?;
        let list = PyList::empty(py);
        for l in lines {
            list.append(loads.call1((l,))?)?;
        }
        Ok(list.into_any())
    }

    /// Text generation with KV-cache decoding (as `patchbay generate`): greedy at temperature 0,
    /// else temperature and nucleus sampling seeded per prompt; stops at the checkpoint's eos
    /// ids, a `stop` string, or `max_new_tokens`. `interventions` act at every forward on the rows
    /// it computes; their `positions` may also be `"generated"` or `"X+generated"`. Returns one
    /// dict per prompt: `index`, `tokens` (generated ids), `text`, `stop`
    /// (`eos`/`stop_string`/`length`), `seed`.
    #[pyo3(signature = (token_ids = None, texts = None, max_new_tokens = 32, temperature = 0.0, top_p = 1.0, seed = 0, stop = None, interventions = None, chat = false, batch_size = 8))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        token_ids: Option<&Bound<'py, PyAny>>,
        texts: Option<Names>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
        stop: Option<Names>,
        interventions: Option<&Bound<'py, PyAny>>,
        chat: bool,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prompts = self.prompts(py, token_ids, texts, chat)?;
        let steps: Vec<StepIntervention> = match interventions {
            None => Vec::new(),
            Some(list) => self
                .parse_all(py, list, &prompts)?
                .into_iter()
                .enumerate()
                .map(|(i, p)| match p.prompts {
                    Some(_) => Err(input_err(format!("interventions[{i}]: prompts= is not supported by generate (every prompt is steered alike)"))),
                    None => Ok(StepIntervention { site: p.site, units: p.units, op: p.op, scope: p.scope }),
                })
                .collect::<PyResult<_>>()?,
        };
        let mut spec = GenerateSpec::greedy(&self.model.cfg, max_new_tokens);
        spec.sample = SampleParams { temperature, top_p, seed };
        spec.stop = stop.map_or_else(Vec::new, Names::into_vec);
        spec.batch_size = batch_size;
        let gens = py
            .detach(|| {
                let tok = PromptTokenizer::load(&self.path).ok();
                generate(&self.engine(), &prompts, &spec, &steps, tok.as_ref(), &ProgressBar::hidden(), &mut |_, _| Ok(()))
            })
            .map_err(py_err)?;
        let rows: Vec<serde_json::Value> = gens.iter().enumerate().map(|(i, g)| json!({"index": i, "tokens": g.tokens, "text": g.text, "stop": g.stop, "seed": g.seed})).collect();
        to_py(py, &json!(rows))
    }

    /// A label sweep (as `patchbay steer --mode labels`): every prompt clean and under each
    /// experiment of `experiments` (an intervention, or a list of them applied together), each
    /// resumed from the prompt's clean run at the experiment's first layer; the label logits at
    /// the last token. Returns `clean_logits` `[n_prompts, n_labels]`, `clean_pred`,
    /// `label_logits` `[n_experiments, n_prompts, n_labels]`, `pred` `[n_experiments, n_prompts]`
    /// and `labels`. `ablate` is the same sweep under its own name.
    #[pyo3(signature = (experiments, token_ids = None, texts = None, label_token_ids = None, labels = None, chat = false, batch_rows = 256))]
    #[allow(clippy::too_many_arguments)]
    fn steer<'py>(
        &self,
        py: Python<'py>,
        experiments: &Bound<'py, PyAny>,
        token_ids: Option<&Bound<'py, PyAny>>,
        texts: Option<Names>,
        label_token_ids: Option<&Bound<'py, PyAny>>,
        labels: Option<Names>,
        chat: bool,
        batch_rows: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prompts = self.prompts(py, token_ids, texts, chat)?;
        let labels = self.labels(label_token_ids, labels)?;
        let mut exps: Vec<Vec<Condition>> = Vec::new();
        for (e, item) in experiments.try_iter()?.enumerate() {
            let item = item?;
            let parsed = self.parse_all(py, &item, &prompts).map_err(|err| prefix(py, err, &format!("experiments[{e}]")))?;
            let conds = parsed
                .into_iter()
                .map(|p| match (&p.prompts, &p.op) {
                    (Some(_), _) => Err(input_err(format!("experiments[{e}]: prompts= is not supported by a sweep (every prompt runs every experiment)"))),
                    (_, Op::Patch { .. }) => Err(input_err(format!("experiments[{e}]: Patch values are per prompt: use patch() or score(interventions=...)"))),
                    _ => {
                        let beta = match p.op {
                            Op::Add { beta, .. } | Op::ProjectSet { beta, .. } => beta,
                            Op::Scale { alpha } => alpha,
                            _ => 0.0,
                        };
                        Ok(Condition { direction: format!("experiment {e}"), site: p.site, beta, op: p.op, positions: p.scope, units: p.units })
                    }
                })
                .collect::<PyResult<Vec<Condition>>>()?;
            exps.push(conds);
        }
        let (n, k, n_exp) = (prompts.len(), labels.len(), exps.len());
        let mut clean = vec![0.0f32; n * k]; // [n_prompts, n_labels]
        let mut steered = vec![0.0f32; n_exp * n * k]; // [n_experiments, n_prompts, n_labels]
        let readout = Readout { label_tokens: &labels.token_ids, projection: None };
        py.detach(|| {
            steer_labels(
                &self.engine(),
                &prompts,
                readout,
                &exps,
                batch_rows,
                &ProgressBar::hidden(),
                &mut |i, logits, _| {
                    clean[i * k..(i + 1) * k].copy_from_slice(logits);
                    Ok(())
                },
                &mut |rows| {
                    for r in rows {
                        steered[(r.condition * n + r.index) * k..][..k].copy_from_slice(&r.label_logits);
                    }
                    Ok(())
                },
            )
        })
        .map_err(py_err)?;
        let argmax_rows = |x: &[f32]| -> Vec<i64> { x.chunks(k.max(1)).map(|r| patchbay::logits::argmax(r) as i64).collect() };
        let out = PyDict::new(py);
        out.set_item("clean_pred", PyArray1::from_vec(py, argmax_rows(&clean)))?;
        out.set_item("pred", PyArray1::from_vec(py, argmax_rows(&steered)).reshape([n_exp, n])?)?;
        out.set_item("clean_logits", PyArray1::from_vec(py, clean).reshape([n, k])?)?;
        out.set_item("label_logits", PyArray1::from_vec(py, steered).reshape([n_exp, n, k])?)?;
        out.set_item("labels", labels.names.clone())?;
        Ok(out)
    }

    /// [`Model::steer`] under the name of `patchbay ablate`, with steer's arguments: experiments
    /// of `Zero`, `Mean`, `Scale` (or `Add`) at heads (`heads=` at `attn.hook_z`) or neurons
    /// (`neurons=` at `mlp.hook_post`).
    #[pyo3(signature = (*args, **kwargs))]
    fn ablate<'py>(slf: &Bound<'py, Self>, args: &Bound<'py, PyTuple>, kwargs: Option<&Bound<'py, PyDict>>) -> PyResult<Bound<'py, PyAny>> {
        slf.call_method("steer", args, kwargs)
    }

    fn __repr__(&self) -> String {
        format!("patchbay.Model({:?}, device={:?})", self.path.display().to_string(), self.engine().device_name())
    }
}

#[pymodule]
fn _patchbay(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyModel>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("FileError", py.get_type::<FileError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
