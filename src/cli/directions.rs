//! `patchbay directions`: steering directions per site, by one of four methods: class-mean and
//! context-averaged differences from a capture of a dataset, the rows of saved probe weights,
//! and the unique-effect vectors of a set of directions (`experiments::directions`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::inputs::{DatasetArgs, TemplateArgs, encode_dataset};
use super::{progress_bar};
use patchbay::data::dataset::Dataset;
use patchbay::data::labels::parse_list;
use patchbay::data::sev::{self, DEFAULT_CONTEXT};
use patchbay::data::template::Template;
use patchbay::experiments::directions::{self as dirs, SiteDirections, check_classes, class_counts};
use patchbay::experiments::shards::{RunOptions, ShardMeta, ShardSpec, capture_shards, check_positions};
use patchbay::io::OutDtype;
use patchbay::learn::directions::Versus;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site};
use patchbay::{Error, Result};

const DIRECTIONS_HELP: &str = "Examples:
  patchbay directions --model M --dataset emotions.csv --template tak --sites resid_post --out runs/dirs
  patchbay directions --model M --dataset emotions.csv --template tak --labels anger,joy,neutral --versus neutral --sites 'blocks.4.hook_resid_post' --positions -1..-3 --out runs/dirs
  patchbay directions --method context-averaged --model M --dataset ../shared/data/sev/sev.jsonl --sites resid_post --out runs/sev
  patchbay directions --method probe --probe-weights runs/probe/probes --positions -1 --out runs/probe-dirs
  patchbay directions --method unique-effect --from runs/probe-dirs/directions.safetensors --labels pleasantness,control --sites blocks.4.hook_resid_post --out runs/unique

Methods (x: a prompt's activation at the site averaged over --positions, default the last token):
  class-mean (default): on a dataset with gold labels, for each class c
    mean(x | c) - mean(x | every other class) (--versus rest, the default) or
    mean(x | c) - mean(x | NAME) (--versus NAME, e.g. neutral; NAME itself gets no direction).
    Only prompts with a gold label among the classes (--labels, default all) count.
  context-averaged (Wang et al.): on a scenario/event JSONL file such as SEV (one object per line:
    `scenario`, `event`: {variant: text}; SEV's variants are the event's valence, positive,
    neutral and negative, not emotions), for each variant v: x(s, v) - x(s, neutral) averaged
    over the scenarios s. Each variant's text is --context with {scenario} and {event} filled in
    (default `{scenario}. {event}`), then wrapped by --template as any dataset text. --labels
    picks variants, --versus the reference (default neutral), --limit the first N scenarios.
  probe: the rows of the weights `patchbay probe` saved (OUT/probes/<site>.safetensors; give
    files or the directory): the logistic regression's row per class and the ridge regression's
    row per numeric column (appraisal), at one position (--positions, default -1). The weights
    are in activation space (the fit's standardisation is folded in: w_std / scale), so each
    direction is the gradient of its logit or rating with respect to the raw activation, what
    x <- x + beta v steers along. The multinomial rows sum to zero at the optimum (L2 fit), so
    a set of all the classes is (nearly) linearly dependent. --labels keeps some names.
  unique-effect (Tak et al.): from a directions file (--from) and a set of its names (--labels,
    at least one), per site (--sites, default all of the file's): each direction projected onto
    the orthogonal complement of the span of the others (QR), named <name>.unique, and the set's
    subspace <site>/subspace [k, width] (orthonormal rows; P = learn::directions::projector of
    it, for x <- x + v - beta P x). A linearly dependent set is an error naming the direction;
    the command says which unique effect keeps the smallest share of its direction's norm.
  probe and unique-effect read files only (no --model, no device).

Writes OUT/directions.safetensors (format patchbay-directions-1): one f32 tensor [width] per
(site, name), named <TransformerLens site>/<name> (e.g. blocks.4.hook_resid_post/anger), plus
<site>/subspace [k, width] for unique-effect; metadata: format, method, sites, classes (the names,
in order), positions, and provenance (model, config_sha256, device, dataset, template, rows per
class, versus, context, scenarios; probe: the probe files and their model, C, alpha,
standardize, eval; unique-effect: the source file, its method and provenance). For the capture
methods OUT/acts/ holds the capture (re-running the same command continues a killed run).";

/// How directions are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    ClassMean,
    ContextAveraged,
    Probe,
    UniqueEffect,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::ClassMean => "class-mean",
            Method::ContextAveraged => "context-averaged",
            Method::Probe => "probe",
            Method::UniqueEffect => "unique-effect",
        }
    }

    /// Methods that capture activations of a dataset.
    fn captures(self) -> bool {
        matches!(self, Method::ClassMean | Method::ContextAveraged)
    }
}

#[derive(Args)]
#[command(after_help = DIRECTIONS_HELP)]
pub struct DirectionsArgs {
    /// How directions are made (see below).
    #[arg(long, value_enum, default_value_t = Method::ClassMean)]
    method: Method,
    /// Hugging Face model directory or GGUF file (class-mean, context-averaged).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[arg(long, help = super::ALLOW_NONFINITE_HELP)]
    allow_nonfinite: bool,
    #[command(flatten)]
    data: DatasetArgs,
    #[command(flatten)]
    template: TemplateArgs,
    /// Names (comma-separated): the classes, the variants (context-averaged), the probes kept, or the set (unique-effect) [default: all; unique-effect: required].
    #[arg(long)]
    labels: Option<String>,
    /// What each direction is measured against: `rest` or a class (class-mean; default rest), the reference variant (context-averaged; default neutral).
    #[arg(long)]
    versus: Option<String>,
    /// Context-averaged: a variant's text, with {scenario} and {event} [default: `{scenario}. {event}`].
    #[arg(long)]
    context: Option<String>,
    /// Probe: the probe weight files (`patchbay probe`'s OUT/probes/<site>.safetensors) or their directory (repeatable).
    #[arg(long)]
    probe_weights: Vec<PathBuf>,
    /// Unique-effect: the directions file the set is read from.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Sites: short names (all layers), TransformerLens names or globs [default: resid_post; probe, unique-effect: every site of the files].
    #[arg(long)]
    sites: Option<String>,
    /// Positions averaged into a prompt's activation: -1, -1..-3, or absolute 0,3 (probe: the one position of the probes) [default: -1].
    #[arg(long, allow_hyphen_values = true)]
    positions: Option<String>,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Discard an earlier, different capture in OUT/acts instead of refusing.
    #[arg(long)]
    overwrite: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: DirectionsArgs) -> Result<()> {
    check_flags(&a)?;
    let (dirs, metadata) = match a.method {
        Method::ClassMean => class_mean(&a)?,
        Method::ContextAveraged => context_averaged(&a)?,
        Method::Probe => probe(&a)?,
        Method::UniqueEffect => unique_effect(&a)?,
    };
    let path = a.out.join("directions.safetensors");
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    dirs::write_directions(&path, &dirs, &metadata)?;
    if !a.quiet {
        let n: usize = dirs.iter().map(|s| s.names.len()).sum();
        eprintln!("wrote {n} {} directions ({} sites) to {}", a.method.name(), dirs.len(), path.display());
    }
    Ok(())
}

/// Every flag given belongs to the method, and the method's inputs are there.
fn check_flags(a: &DirectionsArgs) -> Result<()> {
    use Method::*;
    let d = &a.data;
    let given: [(&str, bool, &[Method]); 12] = [
        ("--model", a.model.is_some(), &[ClassMean, ContextAveraged]),
        ("--dataset", d.dataset.is_some(), &[ClassMean, ContextAveraged]),
        ("--limit", d.limit.is_some(), &[ClassMean, ContextAveraged]),
        ("--shots", a.template.shots.is_some(), &[ClassMean, ContextAveraged]),
        ("--chat", a.template.chat, &[ClassMean, ContextAveraged]),
        ("--preset, --format, --encoding, --text-col, --label-col, --numeric-cols, --rename or --filter", d.preset.is_some() || d.format.is_some() || d.encoding.is_some() || d.text_col.is_some() || d.label_col.is_some() || d.numeric_cols.is_some() || !d.rename.is_empty() || !d.filter.is_empty(), &[ClassMean]),
        ("--versus", a.versus.is_some(), &[ClassMean, ContextAveraged]),
        ("--context", a.context.is_some(), &[ContextAveraged]),
        ("--probe-weights", !a.probe_weights.is_empty(), &[Probe]),
        ("--from", a.from.is_some(), &[UniqueEffect]),
        ("--positions", a.positions.is_some(), &[ClassMean, ContextAveraged, Probe]),
        ("--overwrite", a.overwrite, &[ClassMean, ContextAveraged]),
    ];
    if let Some((flag, ..)) = given.iter().find(|(_, on, methods)| *on && !methods.contains(&a.method)) {
        return Err(Error::input(format!("{flag} does not apply to --method {}", a.method.name())));
    }
    let missing = match a.method {
        _ if a.method.captures() && a.model.is_none() => Some("--model"),
        _ if a.method.captures() && d.dataset.is_none() => Some("--dataset"),
        Probe if a.probe_weights.is_empty() => Some("--probe-weights FILE|DIR"),
        UniqueEffect if a.from.is_none() => Some("--from FILE"),
        UniqueEffect if a.labels.is_none() => Some("--labels (the set)"),
        _ => None,
    };
    match missing {
        Some(flag) => Err(Error::input(format!("--method {} needs {flag}", a.method.name()))),
        None => Ok(()),
    }
}

/// --labels as a list.
fn labels(a: &DirectionsArgs) -> Result<Option<Vec<String>>> {
    a.labels.as_deref().map(|l| parse_list(l, "label")).transpose()
}

/// --positions as a list (default -1).
fn positions(a: &DirectionsArgs) -> Result<Vec<i64>> {
    match Positions::parse(a.positions.as_deref().unwrap_or("-1"))? {
        Positions::List(l) => Ok(l),
        Positions::All => Err(Error::input("--positions all: directions need fixed positions (e.g. -1 or -1..-3)")),
    }
}

/// A capture method's model, sites, positions, tokenizer and template.
struct CaptureInputs {
    model: Model,
    sites: Vec<Site>,
    positions: Vec<i64>,
    tok: PromptTokenizer,
    template: Template,
}

impl CaptureInputs {
    fn load(a: &DirectionsArgs) -> Result<CaptureInputs> {
        let path = a.model.as_deref().unwrap_or(Path::new(""));
        let model = Model::load(path)?;
        let sites = Site::parse_spec(a.sites.as_deref().unwrap_or("resid_post"), &model.cfg)?;
        Ok(CaptureInputs { sites, positions: positions(a)?, tok: PromptTokenizer::load(path)?, template: a.template.template()?, model })
    }

    /// Encodes the dataset's prompts, captures them into OUT/acts (continuing a killed run) and
    /// returns the capture's metadata and the provenance shared by the capture methods.
    fn capture(self, a: &DirectionsArgs, ds: &Dataset) -> Result<(ShardMeta, BTreeMap<String, String>)> {
        let prompts = encode_dataset(ds, &self.template, &self.tok, a.quiet)?;
        check_positions(&prompts, &self.positions)?;
        let engine = a.engine.load(&self.model, a.allow_nonfinite)?;
        let acts = a.out.join("acts");
        let spec = ShardSpec { sites: self.sites, positions: self.positions.clone(), label_token_ids: Vec::new(), dtype: OutDtype::F32, batch_size: a.batch_size, shard_bytes: 256 << 20 };
        let bar = progress_bar(prompts.len() as u64, "capture", "prompts", a.quiet);
        let run = capture_shards(engine.as_ref(), &self.model.dir.display().to_string(), &self.model.config_hash, &prompts, &spec, &acts, &RunOptions { overwrite: a.overwrite, stop_after: None }, &bar)?;
        bar.finish_and_clear();
        let metadata = BTreeMap::from([
            ("method".to_string(), a.method.name().to_string()),
            ("model".to_string(), self.model.dir.display().to_string()),
            ("config_sha256".to_string(), self.model.config_hash.clone()),
            ("device".to_string(), engine.device_name()),
            ("nonfinite_values".to_string(), engine.nonfinite_values().to_string()),
            ("positions".to_string(), Positions::List(self.positions).describe()),
            ("dataset".to_string(), ds.spec.path.display().to_string()),
            ("dataset_sha256".to_string(), ds.file_sha256.clone()),
            ("template".to_string(), serde_json::to_string(&self.template).map_err(|e| Error::input(e.to_string()))?),
            ("patchbay_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        Ok((run.meta, metadata))
    }
}

/// `name=count,...` of the prompts per class.
fn rows_per_class(classes: &[Option<usize>], names: &[String]) -> String {
    names.iter().zip(class_counts(classes, names.len())).map(|(n, c)| format!("{n}={c}")).collect::<Vec<_>>().join(",")
}

fn class_mean(a: &DirectionsArgs) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let inputs = CaptureInputs::load(a)?;
    let names = labels(a)?;
    let ds = a.data.load(names.clone())?.ok_or_else(|| Error::input("--dataset is required"))?;
    if ds.spec.label_column.is_none() {
        return Err(Error::input("directions need gold labels: the dataset has no label column (--label-col)"));
    }
    let classes_named = names.unwrap_or_else(|| ds.label_values());
    let versus_name = a.versus.as_deref().unwrap_or("rest");
    let versus = match versus_name {
        "rest" => Versus::Rest,
        name => Versus::Class(classes_named.iter().position(|c| c == name).ok_or_else(|| Error::input(format!("--versus {name}: not one of the classes [{}]", classes_named.join(", "))))?),
    };
    let classes: Vec<Option<usize>> = ds.examples.iter().map(|e| e.label.as_ref().and_then(|l| classes_named.iter().position(|c| c == l))).collect();
    check_classes(&classes, &classes_named, versus)?;
    let (meta, mut metadata) = inputs.capture(a, &ds)?;
    let bar = progress_bar(meta.sites.len() as u64, "directions", "sites", a.quiet);
    let out = dirs::class_mean_from_capture(&a.out.join("acts"), &meta, &classes, &classes_named, versus, &bar)?;
    bar.finish_and_clear();
    metadata.insert("versus".into(), versus_name.into());
    metadata.insert("rows".into(), rows_per_class(&classes, &classes_named));
    Ok((out, metadata))
}

fn context_averaged(a: &DirectionsArgs) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let inputs = CaptureInputs::load(a)?;
    let names = labels(a)?;
    let context = a.context.as_deref().unwrap_or(DEFAULT_CONTEXT);
    let path = a.data.dataset.as_deref().unwrap_or(Path::new(""));
    let s = sev::load(path, context, names.as_deref(), a.data.limit)?;
    let picked = s.dataset.spec.allowed_labels.clone().unwrap_or_default();
    let versus = a.versus.as_deref().unwrap_or("neutral");
    let neutral = picked.iter().position(|v| v == versus).ok_or_else(|| Error::input(format!("--versus {versus}: not one of the variants [{}]", picked.join(", "))))?;
    let classes: Vec<usize> = s.dataset.examples.iter().map(|e| e.label.as_ref().and_then(|l| picked.iter().position(|v| v == l)).unwrap_or(neutral)).collect();
    let counted: Vec<Option<usize>> = classes.iter().map(|&c| Some(c)).collect();
    check_classes(&counted, &picked, Versus::Class(neutral))?;
    let rows = rows_per_class(&counted, &picked);
    let (meta, mut metadata) = inputs.capture(a, &s.dataset)?;
    let bar = progress_bar(meta.sites.len() as u64, "directions", "sites", a.quiet);
    let out = dirs::context_averaged_from_capture(&a.out.join("acts"), &meta, &s.scenario, &classes, &picked, neutral, &bar)?;
    bar.finish_and_clear();
    metadata.insert("versus".into(), versus.into());
    metadata.insert("rows".into(), rows);
    metadata.insert("scenarios".into(), s.dataset.rows_read.to_string());
    metadata.insert("context".into(), context.into());
    Ok((out, metadata))
}

fn probe(a: &DirectionsArgs) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let position = match positions(a)?[..] {
        [p] => p,
        _ => return Err(Error::input("--method probe: give one position (--positions -1): a probe's weights belong to one")),
    };
    let files = dirs::probe_files(&a.probe_weights)?;
    let (all, mut metadata) = dirs::probe_directions(&files, position, labels(a)?.as_deref())?;
    let available: Vec<String> = all.iter().map(|s| s.site.clone()).collect();
    let keep = dirs::select_sites(&available, a.sites.as_deref(), "the probe weights")?;
    metadata.insert("method".into(), "probe".into());
    metadata.insert("positions".into(), position.to_string());
    metadata.insert("probe_weights".into(), files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(","));
    metadata.insert("space".into(), "activation (the probes' raw-space weights: standardisation folded in)".into());
    metadata.insert("patchbay_version".into(), env!("CARGO_PKG_VERSION").into());
    Ok((all.into_iter().filter(|s| keep.contains(&s.site)).collect(), metadata))
}

fn unique_effect(a: &DirectionsArgs) -> Result<(Vec<SiteDirections>, BTreeMap<String, String>)> {
    let from = a.from.as_deref().unwrap_or(Path::new(""));
    let set = labels(a)?.unwrap_or_default();
    let (src, source) = dirs::read_directions(from)?;
    let available: Vec<String> = src.iter().map(|s| s.site.clone()).collect();
    let sites = dirs::select_sites(&available, a.sites.as_deref(), &from.display().to_string())?;
    let (out, (weakest, share)) = dirs::unique_effect_sets(&src, &sites, &set)?;
    if !a.quiet {
        let nearly = if share < 0.05 { " (the set is nearly linearly dependent)" } else { "" };
        let share = if share < 1e-3 { format!("{share:.1e}") } else { format!("{share:.3}") };
        eprintln!("the smallest unique effect is {weakest}.unique: {share} of the direction's norm{nearly}");
    }
    // The source's provenance, then what this step adds.
    let mut metadata: BTreeMap<String, String> = source.iter().filter(|(k, _)| !matches!(k.as_str(), "format" | "sites" | "classes" | "method")).map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.insert("method".into(), "unique-effect".into());
    metadata.insert("source".into(), from.display().to_string());
    metadata.insert("source_method".into(), source.get("method").cloned().unwrap_or_default());
    metadata.insert("set".into(), set.join(","));
    metadata.insert("patchbay_version".into(), env!("CARGO_PKG_VERSION").into());
    Ok((out, metadata))
}
