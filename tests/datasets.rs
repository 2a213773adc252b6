//! Datasets (CSV/TSV/JSONL, encodings, renames, filters, one-line errors with row and value),
//! prompt templates (the study's presets and shots, chat), position ranges, label sets.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use patchbay::data::dataset::{self, DatasetSpec, Encoding, Filter, parse_renames};
use patchbay::data::labels::LabelSet;
use patchbay::data::template::{Template, TokenStats};
use patchbay::model::tokenizer::{ChatMessage, PromptTokenizer};
use patchbay::sites::Positions;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name)
}

fn emotions_spec(path: PathBuf, encoding: Encoding) -> DatasetSpec {
    let mut s = DatasetSpec::new(path, "text");
    s.encoding = encoding;
    s.label_column = Some("emotion".into());
    s.numeric_columns = vec!["pleasantness".into(), "self_responsblt".into(), "suddenness".into()];
    s.renames = parse_renames(&["no-emotion=neutral".to_string()]).unwrap();
    s
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err(spec: &DatasetSpec) -> String {
    match dataset::load(spec) {
        Ok(d) => panic!("expected an error, loaded {} examples", d.examples.len()),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "error is not one line: {s}");
            s
        }
    }
}

#[test]
fn committed_dataset_loads_with_labels_numbers_and_renames() {
    let ds = dataset::load(&emotions_spec(data("emotions.csv"), Encoding::Utf8)).unwrap();
    assert_eq!(ds.examples.len(), 196);
    assert_eq!(ds.label_values(), ["anger", "fear", "guilt", "joy", "neutral", "pride", "sadness"]);
    for e in &ds.examples {
        assert_eq!(e.numeric.len(), 3);
        assert!(e.numeric.iter().all(|v| (1.0..=5.0).contains(v)));
    }
    // Rows are CSV lines: header = 1, first record = 2.
    assert_eq!(ds.examples[0].row, 2);
    assert_eq!(ds.examples[195].row, 197);
    assert_eq!(ds.file_sha256.len(), 64);
}

#[test]
fn windows_1252_file_decodes_to_the_same_dataset_as_utf8() {
    let utf8 = dataset::load(&emotions_spec(data("emotions.csv"), Encoding::Utf8)).unwrap();
    let cp = dataset::load(&emotions_spec(data("emotions_cp1252.csv"), Encoding::Windows1252)).unwrap();
    assert_eq!(utf8.examples, cp.examples);
    let text: String = cp.examples.iter().map(|e| e.text.as_str()).collect();
    for c in ['’', '“', '”', '–', 'é', 'ï', '€', '£'] {
        assert!(text.contains(c), "decoded texts lack {c:?}");
    }
    // Read as UTF-8, the 1252 file is refused with a hint at --encoding.
    let msg = err(&emotions_spec(data("emotions_cp1252.csv"), Encoding::Utf8));
    assert!(msg.contains("not valid UTF-8") && msg.contains("--encoding windows-1252"), "{msg}");
}

#[test]
fn latin1_and_bom() {
    let dir = tempfile::tempdir().unwrap();
    // ISO-8859-1: 0xE9 = é, 0x80 stays the C1 control U+0080 (unlike 1252's euro sign).
    let p = write(&dir, "l1.csv", b"text,label\ncaf\xe9 \x80,a\n");
    let mut s = DatasetSpec::new(&p, "text");
    s.label_column = Some("label".into());
    s.encoding = Encoding::Latin1;
    assert_eq!(dataset::load(&s).unwrap().examples[0].text, "caf\u{e9} \u{80}");
    s.encoding = Encoding::Windows1252;
    assert_eq!(dataset::load(&s).unwrap().examples[0].text, "caf\u{e9} \u{20ac}");
    // A UTF-8 BOM is skipped (the first header is `text`, not `\u{feff}text`).
    let p = write(&dir, "bom.csv", "\u{feff}text,label\nhello,a\n".as_bytes());
    let mut s = DatasetSpec::new(&p, "text");
    s.label_column = Some("label".into());
    assert_eq!(dataset::load(&s).unwrap().examples[0].text, "hello");
}

#[test]
fn missing_column_names_the_column_and_the_header() {
    let mut s = emotions_spec(data("emotions.csv"), Encoding::Utf8);
    s.numeric_columns.push("valence".into());
    let msg = err(&s);
    assert!(msg.contains("emotions.csv") && msg.contains("no column `valence`") && msg.contains("pleasantness"), "{msg}");
    let mut s = emotions_spec(data("emotions.csv"), Encoding::Utf8);
    s.text_column = "hidden_emo_text".into();
    assert!(err(&s).contains("no column `hidden_emo_text`"));
}

#[test]
fn unparseable_number_and_empty_cells_name_row_column_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "d.csv", b"text,label,score\nfine,a,1\nalso fine,b,2.5\nbad,a,high\n");
    let mut s = DatasetSpec::new(&p, "text");
    s.label_column = Some("label".into());
    s.numeric_columns = vec!["score".into()];
    let msg = err(&s);
    assert!(msg.contains("row 4") && msg.contains("`score`") && msg.contains("`high` is not a number"), "{msg}");
    let p = write(&dir, "e.csv", b"text,label,score\nfine,a,\n");
    s.path = p;
    assert!(err(&s).contains("row 2: column `score`: `` is not a number"));
    let p = write(&dir, "f.csv", b"text,label,score\n  ,a,1\n");
    s.path = p;
    assert!(err(&s).contains("row 2: empty text"));
    let p = write(&dir, "g.csv", b"text,label,score\nx,a,1,extra\n");
    s.path = p;
    assert!(err(&s).contains("line 2: 4 fields, the header has 3"), "{}", err(&s));
}

#[test]
fn unknown_label_names_row_value_and_the_label_set() {
    let mut s = emotions_spec(data("emotions.csv"), Encoding::Utf8);
    s.allowed_labels = Some(vec!["anger".into(), "joy".into()]);
    let msg = err(&s);
    assert!(msg.contains("row ") && msg.contains("is not in the label set [anger, joy]") && msg.contains("--filter emotion!="), "{msg}");
    // Renamed labels are checked after the rename.
    let mut s = emotions_spec(data("emotions.csv"), Encoding::Utf8);
    s.allowed_labels = Some(["anger", "fear", "guilt", "joy", "neutral", "pride", "sadness"].map(String::from).to_vec());
    assert_eq!(dataset::load(&s).unwrap().examples.len(), 196);
}

#[test]
fn filters_and_limit() {
    let base = emotions_spec(data("emotions.csv"), Encoding::Utf8);
    let with = |filters: &[&str], limit: Option<usize>| {
        let mut s = base.clone();
        s.filters = filters.iter().map(|f| Filter::parse(f).unwrap()).collect();
        s.limit = limit;
        dataset::load(&s)
    };
    // Two values of one column: either; the label column compares after renames.
    let d = with(&["emotion=joy", "emotion=neutral"], None).unwrap();
    assert_eq!(d.examples.len(), 56);
    assert_eq!(d.label_values(), ["joy", "neutral"]);
    // Different columns: both.
    let d = with(&["emotion=joy", "round=round-1"], None).unwrap();
    assert_eq!(d.examples.len(), 14);
    let d = with(&["emotion!=joy", "emotion!=anger"], None).unwrap();
    assert_eq!(d.examples.len(), 140);
    assert_eq!(with(&[], Some(10)).unwrap().examples.len(), 10);
    let msg = with(&["emotion=love"], None).unwrap_err().to_string();
    assert!(msg.contains("no row of 196 passes the filters"), "{msg}");
    assert!(with(&["mood=joy"], None).unwrap_err().to_string().contains("no column `mood`"));
    assert!(Filter::parse("nothing").unwrap_err().to_string().contains("COLUMN=VALUE"));
    assert!(parse_renames(&["a".to_string()]).unwrap_err().to_string().contains("OLD=NEW"));
}

#[test]
fn jsonl_with_nested_columns_and_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "d.jsonl",
        br#"{"scenario": "I sent the report", "event": {"positive": "They loved it"}, "label": "joy", "v": 4}

{"scenario": "I lost my keys", "event": {"positive": "A neighbour found them"}, "label": "relief", "v": "2"}
"#,
    );
    let mut s = DatasetSpec::new(&p, "event.positive");
    s.label_column = Some("label".into());
    s.numeric_columns = vec!["v".into()];
    let d = dataset::load(&s).unwrap();
    assert_eq!(d.examples.len(), 2);
    assert_eq!(d.examples[1].text, "A neighbour found them");
    assert_eq!(d.examples[1].row, 3);
    assert_eq!(d.examples[1].numeric, [2.0]);
    s.numeric_columns = vec!["w".into()];
    assert!(err(&s).contains("row 1: no column `w`"));
    let p = write(&dir, "bad.jsonl", b"{\"text\": \"a\"}\n[1, 2]\n");
    let s = DatasetSpec::new(&p, "text");
    assert!(err(&s).contains("line 2: expected a JSON object"));
    let p = write(&dir, "x.txt", b"");
    assert!(err(&DatasetSpec::new(&p, "text")).contains("--format"));
}

#[test]
fn envent_preset_declares_the_real_file() {
    let p = dataset::preset("envent").unwrap();
    assert_eq!((p.text_column, p.label_column, p.encoding), ("hidden_emo_text", "emotion", Encoding::Windows1252));
    assert_eq!(p.numeric_columns.len(), 21);
    assert!(dataset::preset("goemotions").unwrap_err().to_string().contains("known: envent"));
}

/// Optional: the real crowd-enVENT file, when ../shared is there.
#[test]
fn envent_file_loads_with_the_preset_when_present() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/envent/envent_gen.csv");
    if !path.exists() {
        eprintln!("skipped: {} is absent", path.display());
        return;
    }
    let p = dataset::preset("envent").unwrap();
    let mut s = DatasetSpec::new(&path, p.text_column);
    s.encoding = p.encoding;
    s.label_column = Some(p.label_column.into());
    s.numeric_columns = p.numeric_columns.iter().map(|c| c.to_string()).collect();
    s.renames = p.renames.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let d = dataset::load(&s).unwrap();
    assert_eq!(d.examples.len(), 6600);
    let labels = d.label_values();
    assert_eq!(labels.len(), 13);
    assert!(labels.contains(&"neutral".to_string()) && !labels.contains(&"no-emotion".to_string()));
    assert!(d.examples.iter().any(|e| e.text.contains('’')), "Windows-1252 quotes decode");
}

#[test]
fn templates_reproduce_the_study_prompts() {
    let t = Template::parse("tak").unwrap();
    assert_eq!(t.render("My dog died."), "What are the inferred emotions in the following contexts? Context: My dog died. Answer:");
    // The study's default: two shots (joy, sadness) in its own format.
    let t = t.with_shots(Template::load_shots("tak").unwrap()).unwrap();
    assert_eq!(
        t.render("I won."),
        "What are the inferred emotions in the following contexts? Context: My first child was born. Answer: joy Context: My dog died last week. Answer: sadness Context: I won. Answer:"
    );
    assert_eq!(Template::load_shots("tak:fear,neutral").unwrap()[1].answer, "neutral");
    assert!(Template::load_shots("tak:love").unwrap_err().to_string().contains("no built-in shot for `love`"));
    // Custom templates: one {text}; texts go in verbatim, braces and all.
    let c = Template::parse("Q: {text} A:").unwrap();
    assert_eq!(c.render("a {shots} b"), "Q: a {shots} b A:");
    assert!(Template::parse("no placeholder").unwrap_err().to_string().contains("{text}"));
    // A placeholder patchbay does not fill is refused (it would stay in every prompt); other
    // braces are text.
    for (bad, name) in [("{text} feels {emotion}", "{emotion}"), ("{Text}{text}", "{Text}"), ("{text} {label_1}", "{label_1}"), ("{_x} {text}", "{_x}")] {
        let e = Template::parse(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("`{name}` is not a placeholder")) && !e.contains('\n'), "{bad}: {e}");
    }
    for fine in ["{\"q\": \"{text}\"}", "{ {text} }", "{1} {text}", "{text} {", "} {text} {shots}"] {
        assert!(Template::parse(fine).is_ok(), "{fine}");
    }
    assert!(Template::parse("Q: {text}").unwrap().with_shots(Template::load_shots("tak").unwrap()).unwrap_err().to_string().contains("{shots}"));
    // Few-shot file.
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "shots.jsonl", b"{\"text\": \"It rained.\", \"answer\": \"neutral\"}\n");
    let shots = Template::load_shots(p.to_str().unwrap()).unwrap();
    assert_eq!(Template::parse("tak").unwrap().with_shots(shots).unwrap().render("x"), "What are the inferred emotions in the following contexts? Context: It rained. Answer: neutral Context: x Answer:");
}

#[test]
fn template_encoding_plain_and_chat() {
    let tok = PromptTokenizer::load(&fixture("llama")).unwrap();
    let mut t = Template::parse("tak").unwrap();
    let text = "My friend lost the keys.";
    assert_eq!(t.encode(&tok, text).unwrap(), tok.encode(&t.render(text)).unwrap());
    t.chat = true;
    assert_eq!(t.encode(&tok, text).unwrap(), tok.encode_chat(&[ChatMessage::new("user", t.render(text))], true).unwrap());
    let s = TokenStats::of(&[vec![1; 3], vec![1; 10], vec![1; 5]]);
    assert_eq!((s.min, s.median, s.max, s.total), (3, 5, 10, 18));
    assert!((s.mean - 6.0).abs() < 1e-12);
}

#[test]
fn position_ranges() {
    assert_eq!(Positions::parse("-1..-5").unwrap(), Positions::List(vec![-1, -2, -3, -4, -5]));
    assert_eq!(Positions::parse("0..2,-1").unwrap(), Positions::List(vec![0, 1, 2, -1]));
    assert_eq!(Positions::parse("-3..-1").unwrap(), Positions::List(vec![-3, -2, -1]));
    assert!(Positions::parse("-1..2").unwrap_err().to_string().contains("mixes"));
    assert!(Positions::parse("-1,-1").unwrap_err().to_string().contains("twice"));
    assert!(Positions::parse("-1..x").is_err());
}

#[test]
fn label_sets_resolve_first_tokens_and_refuse_collisions() {
    let tok = PromptTokenizer::load(&fixture("llama")).unwrap();
    let names: Vec<String> = ["anger", "joy", "fear"].map(String::from).to_vec();
    let l = LabelSet::resolve(&names, &tok).unwrap();
    for (n, &id) in names.iter().zip(&l.token_ids) {
        assert_eq!(tok.encode_plain(&format!(" {n}")).unwrap()[0], id);
    }
    let msg = LabelSet::resolve(&["sadness".to_string(), "joy".to_string(), "surprise".to_string()], &tok).unwrap_err().to_string();
    assert!(msg.contains("`sadness` and `surprise` both resolve to token"), "{msg}");
    let ids = LabelSet::parse_ids("a=5,b=7", None).unwrap();
    assert_eq!((ids.names.clone(), ids.token_ids.clone()), (vec!["a".to_string(), "b".to_string()], vec![5, 7]));
    assert!(LabelSet::parse_ids("a=5,b=5", None).unwrap_err().to_string().contains("`a` and `b` both resolve"));
    assert!(ids.check_vocab(6).unwrap_err().to_string().contains("out of range"));
}
