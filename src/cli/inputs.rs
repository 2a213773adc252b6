//! Command-line arguments shared by `score`, `probe` and `patch`: the model, the device, the
//! dataset and the prompt template (`InputArgs`), and for `score` and `patch` token-id prompts
//! and the label set (`LabelArgs`), resolved in one place (`Prompts::load`).

use std::path::PathBuf;

use clap::Args;

use super::progress_bar;
use patchbay::data::dataset::{self, Dataset, DatasetSpec, Encoding, Filter, Format, Sample};
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::data::template::Template;
use patchbay::engine::Engine;
use patchbay::experiments::dataset_files::dataset_json;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

/// The model, the device and the prompts as a dataset rendered through a template.
#[derive(Args, Clone)]
pub struct InputArgs {
    /// Hugging Face model directory, or a GGUF file (FILE.gguf, or a directory holding one).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    #[arg(long, help = super::ALLOW_NONFINITE_HELP)]
    pub allow_nonfinite: bool,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
}

/// Prompts given as token ids instead of a dataset, and the label set scored.
#[derive(Args, Clone)]
pub struct LabelArgs {
    /// JSON file: a list of lists of token ids, used verbatim (instead of --dataset).
    #[arg(long, conflicts_with = "dataset")]
    pub token_ids: Option<PathBuf>,
    /// Label names, comma-separated (each scored by the first token of " name") [default: the dataset's gold labels].
    #[arg(long, conflicts_with = "label_token_ids")]
    pub labels: Option<String>,
    /// Label tokens given directly: NAME=ID,... or ID,...
    #[arg(long)]
    pub label_token_ids: Option<String>,
}

/// The prompts and the label set of a run.
pub struct Prompts {
    /// Token ids of every prompt: [prompt][token].
    pub ids: Vec<Vec<u32>>,
    /// The dataset the prompts were rendered from (None with --token-ids).
    pub dataset: Option<Dataset>,
    pub template: Option<Template>,
    pub labels: LabelSet,
}

impl Prompts {
    /// Loads the prompts (the dataset through the template, or --token-ids verbatim) and the
    /// label set: --label-token-ids, else --labels, else the dataset's gold labels (sorted).
    pub fn load(inputs: &InputArgs, l: &LabelArgs, quiet: bool) -> Result<Prompts> {
        Prompts::load_labels(inputs, l, quiet, true)
    }

    /// As [`Prompts::load`]; unless `required`, prompts without label flags or gold labels get
    /// an empty label set instead of an error.
    pub fn load_labels(inputs: &InputArgs, l: &LabelArgs, quiet: bool, required: bool) -> Result<Prompts> {
        if inputs.data.dataset.is_none() && l.token_ids.is_none() {
            return Err(Error::input("give the prompts: --dataset FILE or --token-ids FILE"));
        }
        let names = l.labels.as_deref().map(|l| parse_list(l, "label")).transpose()?;
        let tok = if inputs.data.dataset.is_some() || l.label_token_ids.is_none() { Some(PromptTokenizer::load(&inputs.model)?) } else { PromptTokenizer::load(&inputs.model).ok() };
        let no_tok = || Error::input("no tokenizer");
        let (ids, dataset, template) = match &l.token_ids {
            Some(path) => (load_prompts(PromptSource::TokenIds(path), &inputs.model, false)?, None, None),
            None => {
                let ds = inputs.data.load(names.clone())?.ok_or_else(|| Error::input("no --dataset"))?;
                let template = inputs.template.template()?;
                let ids = encode_dataset(&ds, &template, tok.as_ref().ok_or_else(no_tok)?, quiet)?;
                (ids, Some(ds), Some(template))
            }
        };
        let labels = match (&l.label_token_ids, &names) {
            (Some(spec), _) => LabelSet::parse_ids(spec, tok.as_ref())?,
            (None, Some(n)) => LabelSet::resolve(n, tok.as_ref().ok_or_else(no_tok)?)?,
            (None, None) => {
                let values = dataset.as_ref().map(Dataset::label_values).unwrap_or_default();
                match (&dataset, values.is_empty()) {
                    (_, true) if !required => LabelSet { names: Vec::new(), token_ids: Vec::new(), tokens: Vec::new() },
                    (None, _) => return Err(Error::input("give the labels: --labels a,b,c or --label-token-ids")),
                    (Some(_), true) => return Err(Error::input("the dataset has no label column: give --labels")),
                    (Some(_), false) => LabelSet::resolve(&values, tok.as_ref().ok_or_else(no_tok)?)?,
                }
            }
        };
        Ok(Prompts { ids, dataset, template, labels })
    }

    /// Each prompt's gold label as an index into the label set (None without one).
    pub fn gold(&self) -> Result<Vec<Option<usize>>> {
        let Some(ds) = &self.dataset else { return Ok(vec![None; self.ids.len()]) };
        let labels = &self.labels;
        ds.examples
            .iter()
            .map(|e| match &e.label {
                None => Ok(None),
                Some(l) => labels.index_of(l).map(Some).ok_or_else(|| Error::input(format!("{}: row {}: label `{l}` is not in the label set [{}]", ds.spec.path.display(), e.row, labels.names.join(", ")))),
            })
            .collect()
    }

    /// Keeps only the prompts the model predicts correctly over the label set (`--only-correct`,
    /// as Tak et al. select theirs), with their dataset rows. Needs gold labels; refuses to
    /// keep none. Says how many it kept unless `quiet`.
    pub fn retain_correct(&mut self, engine: &dyn Engine, quiet: bool) -> Result<()> {
        let gold = self.gold()?;
        if gold.iter().all(Option::is_none) {
            return Err(Error::input("--only-correct needs a dataset with gold labels (a label column), not --token-ids"));
        }
        let bar = progress_bar(self.ids.len() as u64, "predict", "prompts", quiet);
        let logits = patchbay::experiments::score::label_logits(engine, &self.ids, &self.labels, &[], 8, &bar)?;
        bar.finish_and_clear();
        let keep: Vec<bool> = logits.chunks(self.labels.len()).zip(&gold).map(|(l, g)| *g == Some(patchbay::logits::argmax(l))).collect();
        let (n, kept) = (keep.len(), keep.iter().filter(|&&k| k).count());
        if kept == 0 {
            return Err(Error::input(format!("--only-correct: the model predicts none of the {n} prompts correctly over the label set [{}]", self.labels.names.join(", "))));
        }
        let mut mask = keep.iter();
        self.ids.retain(|_| *mask.next().unwrap_or(&false));
        if let Some(ds) = &mut self.dataset {
            let mut mask = keep.iter();
            ds.examples.retain(|_| *mask.next().unwrap_or(&false));
        }
        if !quiet {
            eprintln!("--only-correct: kept the {kept} of {n} prompts the model predicts correctly");
        }
        Ok(())
    }
}

/// The manifest of a command run on prompts (the parts of [`Prompts`]): the command, patchbay's
/// version, the command line, the model, the device (and the non-finite values it returned, kept
/// by --allow-nonfinite), the inputs and the labels; `extra` adds the command's own fields.
pub fn manifest(command: &str, model: &Model, engine: &dyn Engine, (dataset, template, labels): (Option<&Dataset>, Option<&Template>, &LabelSet), l: &LabelArgs, extra: serde_json::Value) -> serde_json::Value {
    let mut fields = serde_json::json!({
        "model": super::model_json(model),
        "device": engine.device_name(),
        "nonfinite_values": engine.nonfinite_values(),
        "dataset": dataset.map(dataset_json),
        "token_ids": l.token_ids.as_ref().map(|p| p.display().to_string()),
        "template": template,
        "labels": labels,
    });
    super::merge(&mut fields, extra);
    super::command_manifest(command, fields)
}

#[derive(Args, Clone)]
pub struct DatasetArgs {
    /// Dataset file: CSV, TSV or JSONL (one object per line).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Column declarations of a known dataset (`envent`: crowd-enVENT); the options below override it.
    #[arg(long)]
    pub preset: Option<String>,
    /// File format (default: from the extension).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Text encoding of a CSV/TSV file [default: utf-8, or the preset's]; JSONL is always UTF-8.
    #[arg(long, value_enum)]
    pub encoding: Option<Encoding>,
    /// Column holding the text [default: text, or the preset's].
    #[arg(long)]
    pub text_col: Option<String>,
    /// Column holding the gold label [default: label when the file has one, or the preset's]; `none` for no label.
    #[arg(long)]
    pub label_col: Option<String>,
    /// Numeric columns (comma-separated; `none` for none) [default: the preset's].
    #[arg(long)]
    pub numeric_cols: Option<String>,
    /// Label renames OLD=NEW (repeatable or comma-separated), applied before anything else.
    #[arg(long)]
    pub rename: Vec<String>,
    /// Keep rows where COLUMN=VALUE (several values of one column: any) or COLUMN!=VALUE (repeatable).
    #[arg(long)]
    pub filter: Vec<String>,
    /// Use only the first N rows that pass the filters.
    #[arg(long, conflicts_with = "sample")]
    pub limit: Option<usize>,
    /// Use N rows drawn at random (without replacement, kept in file order) from those that pass the filters.
    #[arg(long)]
    pub sample: Option<usize>,
    /// Seed of --sample's draw.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub sample_seed: u64,
    /// With --sample: each gold label keeps its share of the rows (stratified sample).
    #[arg(long, requires = "sample")]
    pub stratify: bool,
}

impl DatasetArgs {
    /// The dataset spec, with the allowed labels (from --labels) when given.
    pub fn spec(&self, allowed: Option<Vec<String>>) -> Result<Option<DatasetSpec>> {
        let Some(path) = &self.dataset else { return Ok(None) };
        let preset = self.preset.as_deref().map(dataset::preset).transpose()?;
        let mut spec = DatasetSpec::new(path, self.text_col.clone().unwrap_or_else(|| preset.map_or("text", |p| p.text_column).to_string()));
        spec.format = self.format;
        // JSON is UTF-8 by definition: a preset's encoding is that of its CSV.
        spec.encoding = match self.format.map_or_else(|| Format::from_path(path), Ok)? {
            Format::Jsonl => match self.encoding {
                Some(e) if e != Encoding::Utf8 => return Err(Error::input(format!("--encoding {}: {} is JSONL, which is always UTF-8", e.name(), path.display()))),
                _ => Encoding::Utf8,
            },
            Format::Csv | Format::Tsv => self.encoding.or(preset.map(|p| p.encoding)).unwrap_or(Encoding::Utf8),
        };
        spec.label_column = match self.label_col.as_deref() {
            Some("none") => None,
            Some(c) => Some(c.to_string()),
            None => Some(preset.map_or("label", |p| p.label_column).to_string()),
        };
        spec.numeric_columns = match self.numeric_cols.as_deref() {
            Some("none") => Vec::new(),
            Some(list) => patchbay::data::labels::parse_list(list, "numeric column")?,
            None => preset.map_or(Vec::new(), |p| p.numeric_columns.iter().map(|s| s.to_string()).collect()),
        };
        spec.renames = preset.map_or(Vec::new(), |p| p.renames.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect());
        spec.renames.extend(dataset::parse_renames(&self.rename)?);
        spec.filters = self.filter.iter().map(|f| Filter::parse(f)).collect::<Result<_>>()?;
        // A preset's label set stays whole (unless --labels or --label-col say otherwise).
        spec.allowed_labels = match (allowed, preset) {
            (Some(a), _) => Some(a),
            (None, Some(p)) if self.label_col.is_none() => Some(p.labels.iter().map(|l| l.to_string()).collect()),
            (None, _) => None,
        };
        if self.limit == Some(0) {
            return Err(Error::input("--limit 0 selects no rows: give N >= 1 (or leave --limit out for every row)"));
        }
        spec.limit = self.limit;
        spec.sample = self.sample.map(|n| Sample { n, seed: self.sample_seed, stratify: self.stratify });
        Ok(Some(spec))
    }

    /// Loads the dataset. Without an explicit --label-col and preset, a file without a `label`
    /// column is read without labels.
    pub fn load(&self, allowed: Option<Vec<String>>) -> Result<Option<Dataset>> {
        let Some(mut spec) = self.spec(allowed)? else { return Ok(None) };
        if self.label_col.is_none() && self.preset.is_none() {
            match dataset::load(&spec) {
                Err(patchbay::Error::File { msg, .. }) if msg.contains("no column `label`") => spec.label_column = None,
                other => return other.map(Some),
            }
        }
        dataset::load(&spec).map(Some)
    }
}

#[derive(Args, Clone)]
pub struct TemplateArgs {
    /// Prompt template: a preset (tak, tak-list, tak-guess, plain) or a string with {text} (and optionally {shots}).
    #[arg(long, default_value = "plain")]
    pub template: String,
    /// Few-shot examples: `tak` (the study's joy and sadness shots), `tak:E1,E2` (its shots of those emotions) or a JSONL file of {"text", "answer"}.
    #[arg(long)]
    pub shots: Option<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
}

impl TemplateArgs {
    pub fn template(&self) -> Result<Template> {
        let mut t = Template::parse(&self.template)?;
        if let Some(s) = &self.shots {
            t = t.with_shots(Template::load_shots(s)?)?;
        }
        t.chat = self.chat;
        Ok(t)
    }
}

/// Renders and encodes every example's prompt (with a progress bar unless `quiet`).
pub fn encode_dataset(ds: &Dataset, template: &Template, tok: &PromptTokenizer, quiet: bool) -> Result<Vec<Vec<u32>>> {
    let bar = progress_bar(ds.examples.len() as u64, "tokenize", "prompts", quiet);
    let mut out = Vec::with_capacity(ds.examples.len());
    for e in &ds.examples {
        let ids = template.encode(tok, &e.text)?;
        if ids.is_empty() {
            return Err(Error::input(format!("{}: row {}: the prompt encodes to no tokens", ds.spec.path.display(), e.row)));
        }
        out.push(ids);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}
