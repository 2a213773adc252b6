//! Labelled text datasets: CSV or JSONL files with a declared text column, an optional label
//! column and optional numeric columns (e.g. appraisal ratings).
//!
//! - Encodings: UTF-8 (a BOM is skipped), Windows-1252 and ISO-8859-1 (the real crowd-enVENT
//!   file is Windows-1252).
//! - Label renames (`no-emotion=neutral`) are applied before filters and label checks.
//! - Filters keep rows whose column equals (`col=value`) or differs from (`col!=value`) a value;
//!   several `=` filters on one column are alternatives (OR), filters on different columns must
//!   all hold (AND).
//! - Errors name the file, the row (the CSV record's first line, or the JSONL line, 1-based;
//!   the CSV header is line 1) and the offending value.
//! - JSONL columns may be dotted paths into nested objects (`event.positive`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Text encoding of the input file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Encoding {
    #[value(name = "utf-8", alias = "utf8")]
    Utf8,
    #[value(name = "windows-1252", alias = "cp1252")]
    Windows1252,
    #[value(name = "iso-8859-1", alias = "latin1", alias = "latin-1")]
    Latin1,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf8 => "utf-8",
            Encoding::Windows1252 => "windows-1252",
            Encoding::Latin1 => "iso-8859-1",
        }
    }

    /// Decodes a whole file. UTF-8 must be valid (the error gives the byte offset and suggests
    /// another encoding); the single-byte encodings cannot fail.
    pub fn decode(self, bytes: &[u8], path: &Path) -> Result<String> {
        match self {
            Encoding::Utf8 => {
                let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                String::from_utf8(bytes.to_vec()).map_err(|e| {
                    let at = e.utf8_error().valid_up_to();
                    let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
                    Error::file(path, format!("not valid UTF-8 at byte {at} (line {line}); pass --encoding windows-1252 or iso-8859-1 if the file uses one of those"))
                })
            }
            // WHATWG windows-1252 (bytes 0x80-0x9F are the 1252 punctuation: curly quotes, euro...).
            Encoding::Windows1252 => Ok(encoding_rs::WINDOWS_1252.decode_without_bom_handling(bytes).0.into_owned()),
            // True ISO-8859-1: every byte is the code point of the same value.
            Encoding::Latin1 => Ok(bytes.iter().map(|&b| b as char).collect()),
        }
    }
}

/// File format; by default from the extension (.csv, .tsv, .jsonl, .ndjson).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            Some("jsonl") | Some("ndjson") => Ok(Format::Jsonl),
            _ => Err(Error::file(path, "cannot tell the format from the extension (expected .csv, .tsv or .jsonl); pass --format")),
        }
    }
}

/// A row filter: keep rows whose `column` equals (or, when `negate`, differs from) `value`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Filter {
    pub column: String,
    pub value: String,
    pub negate: bool,
}

impl Filter {
    /// Parses `col=value` or `col!=value`.
    pub fn parse(s: &str) -> Result<Filter> {
        let bad = || Error::input(format!("filter `{s}`: expected COLUMN=VALUE or COLUMN!=VALUE"));
        let (column, value, negate) = match s.split_once("!=") {
            Some((c, v)) => (c, v, true),
            None => s.split_once('=').map(|(c, v)| (c, v, false)).ok_or_else(bad)?,
        };
        if column.trim().is_empty() {
            return Err(bad());
        }
        Ok(Filter { column: column.trim().to_string(), value: value.to_string(), negate })
    }
}

/// Parses `old=new` label renames (comma-separated or repeated).
pub fn parse_renames(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.split_once('=')
                .filter(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty())
                .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
                .ok_or_else(|| Error::input(format!("label rename `{s}`: expected OLD=NEW (e.g. no-emotion=neutral)")))
        })
        .collect()
}

/// What to read from a dataset file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DatasetSpec {
    pub path: PathBuf,
    /// None: from the extension.
    pub format: Option<Format>,
    pub encoding: Encoding,
    pub text_column: String,
    pub label_column: Option<String>,
    pub numeric_columns: Vec<String>,
    /// Label renames (old, new), applied first.
    pub renames: Vec<(String, String)>,
    pub filters: Vec<Filter>,
    /// When given, every gold label (after renames and filters) must be one of these.
    pub allowed_labels: Option<Vec<String>>,
    /// Keep only the first N rows that pass the filters.
    pub limit: Option<usize>,
    /// Keep a random sample of the rows that pass the filters.
    pub sample: Option<Sample>,
}

/// A random sample of a dataset's rows (`--sample N --sample-seed S`, `--stratify`): `n` rows
/// drawn without replacement (ChaCha8 stream of `seed`), in file order; stratified, each label
/// keeps its share of the rows (largest remainders round, ties to the first label).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    pub n: usize,
    pub seed: u64,
    pub stratify: bool,
}

impl DatasetSpec {
    pub fn new(path: impl Into<PathBuf>, text_column: impl Into<String>) -> DatasetSpec {
        DatasetSpec {
            path: path.into(),
            format: None,
            encoding: Encoding::Utf8,
            text_column: text_column.into(),
            label_column: None,
            numeric_columns: Vec::new(),
            renames: Vec::new(),
            filters: Vec::new(),
            allowed_labels: None,
            limit: None,
            sample: None,
        }
    }
}

/// A named set of column declarations for a known dataset.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub encoding: Encoding,
    pub text_column: &'static str,
    pub label_column: &'static str,
    pub numeric_columns: &'static [&'static str],
    pub renames: &'static [(&'static str, &'static str)],
    /// The label set (after renames), sorted: the labels of the whole dataset, whichever rows
    /// a run selects.
    pub labels: &'static [&'static str],
}

/// The 21 appraisal ratings (1-5) of crowd-enVENT, in file order.
pub const ENVENT_APPRAISALS: [&str; 21] = [
    "suddenness",
    "familiarity",
    "predict_event",
    "pleasantness",
    "unpleasantness",
    "goal_relevance",
    "chance_responsblt",
    "self_responsblt",
    "other_responsblt",
    "predict_conseq",
    "goal_support",
    "urgency",
    "self_control",
    "other_control",
    "chance_control",
    "accept_conseq",
    "standards",
    "social_norms",
    "attention",
    "not_consider",
    "effort",
];

pub const PRESETS: [Preset; 1] = [Preset {
    name: "envent",
    about: "crowd-enVENT generation set (Troiano et al. 2023): Windows-1252 CSV, texts with the emotion words masked (hidden_emo_text), 13 emotions (no-emotion renamed to neutral), 21 appraisal ratings",
    encoding: Encoding::Windows1252,
    text_column: "hidden_emo_text",
    label_column: "emotion",
    numeric_columns: &ENVENT_APPRAISALS,
    renames: &[("no-emotion", "neutral")],
    labels: &["anger", "boredom", "disgust", "fear", "guilt", "joy", "neutral", "pride", "relief", "sadness", "shame", "surprise", "trust"],
}];

pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        Error::input(format!("unknown dataset preset `{name}` (known: {})", PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")))
    })
}

/// One example: the text, its gold label and numeric values, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Row of the file (CSV: line of the record's start, header = line 1; JSONL: line), 1-based.
    pub row: usize,
    pub text: String,
    pub label: Option<String>,
    /// One value per declared numeric column.
    pub numeric: Vec<f64>,
}

/// A loaded dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub spec: DatasetSpec,
    pub examples: Vec<Example>,
    /// sha256 of the file's bytes (hex), for provenance.
    pub file_sha256: String,
    /// Rows read before filters.
    pub rows_read: usize,
}

impl Dataset {
    /// The label set: the declared labels (`allowed_labels`: --labels, or a preset's whole
    /// set, which never shrinks to the rows selected), else the distinct gold labels; sorted.
    pub fn label_values(&self) -> Vec<String> {
        match &self.spec.allowed_labels {
            Some(declared) => declared.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect(),
            None => self.examples.iter().filter_map(|e| e.label.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        }
    }
}

/// One raw record: a getter for a column's value as text.
trait Record {
    /// Some(value) when the column exists; values of JSON numbers/bools are their JSON text.
    fn get(&self, column: &str) -> Option<String>;
}

struct CsvRecord<'a> {
    headers: &'a [String],
    record: &'a csv::StringRecord,
}

impl Record for CsvRecord<'_> {
    fn get(&self, column: &str) -> Option<String> {
        let i = self.headers.iter().position(|h| h == column)?;
        Some(self.record.get(i).unwrap_or("").to_string())
    }
}

struct JsonRecord<'a>(&'a serde_json::Map<String, serde_json::Value>);

impl Record for JsonRecord<'_> {
    fn get(&self, column: &str) -> Option<String> {
        let v = match self.0.get(column) {
            Some(v) => v,
            None => {
                // A dotted path into nested objects.
                let mut parts = column.split('.');
                let mut v = self.0.get(parts.next()?)?;
                for p in parts {
                    v = v.as_object()?.get(p)?;
                }
                v
            }
        };
        Some(match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        })
    }
}

/// Loads and checks a dataset.
pub fn load(spec: &DatasetSpec) -> Result<Dataset> {
    let path = &spec.path;
    let bytes = crate::error::read_file(path)?;
    let file_sha256 = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    let format = match spec.format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let text = spec.encoding.decode(&bytes, path)?;
    let mut ctx = Loader { spec, examples: Vec::new(), rows_read: 0 };
    match format {
        Format::Csv | Format::Tsv => {
            let mut reader = csv::ReaderBuilder::new().delimiter(if format == Format::Tsv { b'\t' } else { b',' }).flexible(false).from_reader(text.as_bytes());
            let headers: Vec<String> = reader
                .headers()
                .map_err(|e| Error::file(path, format!("cannot read the header row: {}", csv_error(&e))))?
                .iter()
                .map(|h| h.trim().to_string())
                .collect();
            let mut declared = vec![&spec.text_column];
            declared.extend(spec.label_column.iter());
            declared.extend(spec.numeric_columns.iter());
            declared.extend(spec.filters.iter().map(|f| &f.column));
            for c in declared {
                if !headers.contains(c) {
                    // A header field can hold the rest of the file (an unclosed quote): names cut at 40 characters.
                    let shown: Vec<String> = headers.iter().map(|h| if h.chars().count() > 40 { format!("{}...", h.chars().take(40).collect::<String>()) } else { h.clone() }).collect();
                    return Err(Error::file(path, format!("no column `{c}` (the header has: {})", shown.join(", "))));
                }
            }
            let mut record = csv::StringRecord::new();
            loop {
                match reader.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {
                        let line = record.position().map_or(0, |p| p.line() as usize);
                        if ctx.add(line, &CsvRecord { headers: &headers, record: &record })? {
                            break;
                        }
                    }
                    Err(e) => return Err(Error::file(path, csv_error(&e))),
                }
            }
        }
        Format::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let row = i + 1;
                let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {row}: not JSON: {e}")))?;
                let obj = value.as_object().ok_or_else(|| Error::file(path, format!("line {row}: expected a JSON object")))?;
                if ctx.add(row, &JsonRecord(obj))? {
                    break;
                }
            }
        }
    }
    let Loader { mut examples, rows_read, .. } = ctx;
    if examples.is_empty() {
        let why = if rows_read == 0 { "the file has no rows".to_string() } else { format!("no row of {rows_read} passes the filters") };
        return Err(Error::file(path, format!("empty dataset: {why}")));
    }
    if let Some(s) = spec.sample {
        examples = sample_rows(examples, s, path)?;
    }
    Ok(Dataset { spec: spec.clone(), examples, file_sha256, rows_read })
}

/// The rows of `s` (see [`Sample`]), in file order.
fn sample_rows(examples: Vec<Example>, s: Sample, path: &Path) -> Result<Vec<Example>> {
    use rand::seq::SliceRandom;
    let n_rows = examples.len();
    if s.n == 0 || s.n > n_rows {
        return Err(Error::file(path, format!("--sample {}: the rows that pass the filters are {n_rows}; give 1 to {n_rows}", s.n)));
    }
    let mut rng = crate::rng::chacha(s.seed);
    let mut keep: Vec<usize> = if s.stratify {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, e) in examples.iter().enumerate() {
            let label = e.label.as_deref().ok_or_else(|| Error::file(path, "--stratify needs gold labels (a label column)"))?;
            groups.entry(label).or_default().push(i);
        }
        // Quotas n * size / n_rows, rounded down, then one more to the largest remainders.
        let mut quotas: Vec<(usize, usize)> = groups.values().map(|g| (s.n * g.len() / n_rows, s.n * g.len() % n_rows)).collect();
        let short = s.n - quotas.iter().map(|q| q.0).sum::<usize>();
        let mut order: Vec<usize> = (0..quotas.len()).collect();
        order.sort_by_key(|&g| std::cmp::Reverse(quotas[g].1));
        order.iter().take(short).for_each(|&g| quotas[g].0 += 1);
        groups.into_values().zip(quotas).flat_map(|(mut g, (q, _))| {
            g.shuffle(&mut rng);
            g.truncate(q);
            g
        }).collect()
    } else {
        let mut all: Vec<usize> = (0..n_rows).collect();
        all.shuffle(&mut rng);
        all.truncate(s.n);
        all
    };
    keep.sort_unstable();
    let mut examples: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    Ok(keep.into_iter().filter_map(|i| examples[i].take()).collect())
}

fn csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { pos, expected_len, len } => {
            format!("line {}: {len} fields, the header has {expected_len}", pos.as_ref().map_or(0, |p| p.line()))
        }
        _ => e.to_string(),
    }
}

struct Loader<'a> {
    spec: &'a DatasetSpec,
    examples: Vec<Example>,
    rows_read: usize,
}

impl Loader<'_> {
    /// Adds one record; returns true when the limit is reached.
    fn add(&mut self, row: usize, rec: &dyn Record) -> Result<bool> {
        let spec = self.spec;
        let path = &spec.path;
        self.rows_read += 1;
        let at = |msg: String| Error::file(path, format!("row {row}: {msg}"));
        let get = |c: &str| rec.get(c).ok_or_else(|| at(format!("no column `{c}`")));
        let rename = |v: String| spec.renames.iter().find(|(a, _)| *a == v).map_or(v, |(_, b)| b.clone());
        // Filters: the label column is compared after renames.
        let mut by_col: Vec<(&str, bool)> = Vec::new();
        for f in &spec.filters {
            let mut v = get(&f.column)?;
            if Some(&f.column) == spec.label_column.as_ref() {
                v = rename(v.trim().to_string());
            }
            let hit = v.trim() == f.value.trim();
            match (f.negate, by_col.iter_mut().find(|(c, _)| *c == f.column)) {
                (true, _) if hit => return Ok(false),
                (true, _) => {}
                (false, Some((_, any))) => *any |= hit,
                (false, None) => by_col.push((&f.column, hit)),
            }
        }
        if by_col.iter().any(|(_, hit)| !hit) {
            return Ok(false);
        }
        let text = get(&spec.text_column)?;
        if text.trim().is_empty() {
            return Err(at(format!("empty text in column `{}`", spec.text_column)));
        }
        let label = match &spec.label_column {
            None => None,
            Some(c) => {
                let v = rename(get(c)?.trim().to_string());
                if v.is_empty() {
                    return Err(at(format!("empty label in column `{c}`")));
                }
                if let Some(allowed) = &spec.allowed_labels
                    && !allowed.contains(&v)
                {
                    return Err(at(format!("label `{v}` (column `{c}`) is not in the label set [{}]; add it to --labels, rename it (--rename {v}=...) or filter it out (--filter {c}!={v})", allowed.join(", "))));
                }
                Some(v)
            }
        };
        let numeric = spec
            .numeric_columns
            .iter()
            .map(|c| {
                let raw = get(c)?;
                let v = raw.trim();
                match v.parse::<f64>() {
                    Ok(x) if x.is_finite() => Ok(x),
                    _ => Err(at(format!("column `{c}`: `{raw}` is not a number"))),
                }
            })
            .collect::<Result<Vec<f64>>>()?;
        self.examples.push(Example { row, text, label, numeric });
        Ok(spec.limit.is_some_and(|n| self.examples.len() >= n))
    }
}
