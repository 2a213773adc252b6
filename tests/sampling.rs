//! Honest sampling and statistics (issue 14, item 4): random pairs are distinct and asking for
//! more than exist is an error; `--limit 0` is an error in every dataset command; `--sample N
//! --sample-seed S [--stratify]` draws rows at random (every command, through the shared
//! dataset flags); a preset's label set stays whole; JSONL is always UTF-8; `patch
//! --only-correct` and `--different-labels gold|pred`; degenerate probes are refused; tied best
//! layers are reported as ties.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use common::{fixture, patchbay_cli, read_jsonl};
use patchbay::data::dataset::{self, DatasetSpec, Sample};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name)
}

/// The llama fixture and tests/data/emotions.csv, as arguments.
fn model_and_data() -> (String, String) {
    (fixture("llama").display().to_string(), data("emotions.csv").display().to_string())
}

fn emotions(sample: Option<Sample>) -> DatasetSpec {
    let mut s = DatasetSpec::new(data("emotions.csv"), "text");
    s.label_column = Some("emotion".into());
    s.sample = sample;
    s
}

fn rows(spec: &DatasetSpec) -> Vec<usize> {
    dataset::load(spec).unwrap().examples.iter().map(|e| e.row).collect()
}

#[test]
fn sample_draws_distinct_rows_by_seed_in_file_order_and_stratified_keeps_each_share() {
    let all = dataset::load(&emotions(None)).unwrap();
    let n_rows = all.examples.len();
    for (n, seed) in [(1, 0), (20, 3), (70, 9), (n_rows, 1)] {
        let got = rows(&emotions(Some(Sample { n, seed, stratify: false })));
        assert_eq!(got.len(), n);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "file order, distinct rows");
        assert_eq!(got, rows(&emotions(Some(Sample { n, seed, stratify: false }))), "same seed, same rows");
        if n > 1 && n < n_rows {
            assert_ne!(got, rows(&emotions(Some(Sample { n, seed: seed + 1, stratify: false }))), "another seed, other rows");
            assert_ne!(got, all.examples[..n].iter().map(|e| e.row).collect::<Vec<_>>(), "not the first rows");
        }
    }
    // Stratified: each label's share, rounded by largest remainders (recomputed here).
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    for e in &all.examples {
        *sizes.entry(e.label.clone().unwrap()).or_default() += 1;
    }
    for (n, seed) in [(7, 0), (30, 5), (71, 2), (100, 8)] {
        let ds = dataset::load(&emotions(Some(Sample { n, seed, stratify: true }))).unwrap();
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for e in &ds.examples {
            *got.entry(e.label.clone().unwrap()).or_default() += 1;
        }
        let exact: Vec<f64> = sizes.values().map(|&c| n as f64 * c as f64 / n_rows as f64).collect();
        for ((label, &c), x) in got.iter().zip(&exact) {
            assert!((c as f64 - x).abs() < 1.0, "{label}: {c} rows of {n}, share {x}");
        }
        assert_eq!(got.values().sum::<usize>(), n);
        assert_eq!(ds.label_values(), all.label_values());
    }
    // Refused: none, more rows than pass the filters, stratified without labels.
    for (n, stratify, want) in [(0, false, "--sample 0"), (n_rows + 1, false, "the rows that pass the filters are 196"), (n_rows + 5, true, "give 1 to 196")] {
        let e = dataset::load(&emotions(Some(Sample { n, seed: 0, stratify }))).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut no_label = emotions(Some(Sample { n: 5, seed: 0, stratify: true }));
    no_label.label_column = None;
    let e = dataset::load(&no_label).unwrap_err().to_string();
    assert!(e.contains("--stratify needs gold labels"), "{e}");
}

#[test]
fn dataset_commands_refuse_limit_zero_and_sample_through_the_shared_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = model_and_data();
    let (m, d) = (m.as_str(), d.as_str());
    let out = |name: &str| dir.path().join(name).display().to_string();
    let base = |cmd: &'static str| vec![cmd, "--model", m, "--dataset", d, "--label-col", "emotion", "--template", "tak", "--quiet"];
    let commands: Vec<(Vec<&str>, Vec<String>)> = vec![
        (base("score"), vec!["--out".into(), out("score")]),
        (base("probe"), vec!["--out".into(), out("probe")]),
        (base("patch"), vec!["--random-pairs".into(), "2".into(), "--out".into(), out("patch")]),
        (base("generate"), vec!["--max-new-tokens".into(), "1".into(), "--out".into(), out("generate")]),
    ];
    for (args, extra) in &commands {
        let mut a: Vec<&str> = args.clone();
        a.extend(extra.iter().map(String::as_str));
        a.extend(["--limit", "0"]);
        let (code, err) = patchbay_cli(&a);
        assert_eq!(code, 1, "{a:?}: {err}");
        assert!(err.lines().last().unwrap().starts_with("error: --limit 0 selects no rows"), "{a:?}: {err}");
    }
    // score --sample: the rows scored are the library's sample.
    let (code, err) = patchbay_cli(&[&base("score")[..], &["--sample", "25", "--sample-seed", "4", "--stratify", "--out", &out("sampled")]].concat());
    assert_eq!(code, 0, "{err}");
    let scored: Vec<usize> = read_jsonl(&Path::new(&out("sampled")).join("scores.jsonl")).iter().map(|r| r["row"].as_u64().unwrap() as usize).collect();
    assert_eq!(scored, rows(&emotions(Some(Sample { n: 25, seed: 4, stratify: true }))));
    let (code, err) = patchbay_cli(&[&base("score")[..], &["--sample", "5", "--limit", "3", "--out", &out("both")]].concat());
    assert_eq!(code, 2, "--sample and --limit conflict: {err}");
}

/// A crowd-enVENT-shaped CSV (Windows-1252) of `rows` (emotion, text), with every appraisal column.
fn envent_csv(dir: &Path, rows: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from("hidden_emo_text,emotion");
    for a in dataset::ENVENT_APPRAISALS {
        text.push(',');
        text.push_str(a);
    }
    text.push('\n');
    for (i, (emotion, t)) in rows.iter().enumerate() {
        text.push_str(&format!("\"{t}\",{emotion}"));
        for j in 0..dataset::ENVENT_APPRAISALS.len() {
            text.push_str(&format!(",{}", 1 + (i + j) % 5));
        }
        text.push('\n');
    }
    let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode(&text);
    let p = dir.join("envent.csv");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn a_preset_keeps_its_whole_label_set_and_jsonl_is_always_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama");
    let m = m.to_str().unwrap();
    // Sorted by emotion, as crowd-enVENT is: the first rows are all anger.
    let csv = envent_csv(dir.path(), &[("anger", "They lied to me."), ("anger", "He broke it."), ("anger", "Café closed early."), ("joy", "I won."), ("no-emotion", "I walked.")]);
    let out = dir.path().join("directions");
    let (code, err) = patchbay_cli(&["directions", "--model", m, "--dataset", csv.to_str().unwrap(), "--preset", "envent", "--limit", "3", "--sites", "resid_post", "--positions", "-1", "--quiet", "--out", out.to_str().unwrap()]);
    // One label among the rows, thirteen in the set: the class-mean directions of labels
    // without rows cannot be formed, and the message says so instead of shrinking the set.
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("boredom") || err.contains("no example"), "{err}");

    // The same rows as JSONL (UTF-8): read as UTF-8 under the preset, whose encoding is its CSV's.
    let jsonl = dir.path().join("rows.jsonl");
    let mut lines = String::new();
    for t in ["Café closed early.", "It’s gone."] {
        let mut obj = serde_json::json!({"hidden_emo_text": t, "emotion": "anger"});
        for a in dataset::ENVENT_APPRAISALS {
            obj[a] = 3.into();
        }
        lines.push_str(&format!("{obj}\n"));
    }
    std::fs::write(&jsonl, lines).unwrap();
    let out = dir.path().join("gen");
    let (code, err) = patchbay_cli(&["generate", "--model", m, "--dataset", jsonl.to_str().unwrap(), "--preset", "envent", "--max-new-tokens", "1", "--quiet", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let texts: Vec<String> = read_jsonl(&out.join("generations.jsonl")).iter().map(|r| r.to_string()).collect();
    assert!(texts[0].contains("Café") && texts[1].contains("It’s"), "{texts:?}");
    let (code, err) = patchbay_cli(&["generate", "--model", m, "--dataset", jsonl.to_str().unwrap(), "--preset", "envent", "--encoding", "windows-1252", "--max-new-tokens", "1", "--quiet", "--out", dir.path().join("g2").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("--encoding windows-1252") && err.contains("always UTF-8"), "{err}");
}

#[test]
fn patch_pairs_are_distinct_by_gold_or_prediction_and_only_correct() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = model_and_data();
    let (m, d) = (m.as_str(), d.as_str());
    let labels = "anger,fear,guilt,joy,neutral,pride,sadness";
    let base = ["patch", "--model", m, "--dataset", d, "--label-col", "emotion", "--rename", "no-emotion=neutral", "--template", "tak", "--labels", labels, "--sites", "resid_post", "--window", "1", "--layers", "0", "--quiet"];
    let run = |name: &str, extra: &[&str]| -> (i32, String, Vec<(usize, usize)>) {
        let out = dir.path().join(name);
        let (code, err) = patchbay_cli(&[&base[..], extra, &["--out", out.to_str().unwrap()]].concat());
        let pairs = if code == 0 { read_jsonl(&out.join("experiments.jsonl")).iter().map(|r| (r["source"].as_u64().unwrap() as usize, r["target"].as_u64().unwrap() as usize)).collect() } else { Vec::new() };
        (code, err, pairs)
    };
    let ds = dataset::load(&{
        let mut s = emotions(None);
        s.renames = vec![("no-emotion".into(), "neutral".into())];
        s.limit = Some(6);
        s
    })
    .unwrap();
    let gold: Vec<String> = ds.examples.iter().map(|e| e.label.clone().unwrap()).collect();
    // Every pair of 6 prompts, then one more than exist.
    let (code, err, pairs) = run("all", &["--limit", "6", "--random-pairs", "30"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pairs.iter().collect::<HashSet<_>>().len(), 30);
    let (code, err, _) = run("too_many", &["--limit", "6", "--random-pairs", "31"]);
    assert_eq!(code, 1);
    assert!(err.contains("31 distinct random pairs asked, but 6 prompts make only 30"), "{err}");
    // Different gold labels: every such pair, then one more.
    let possible = (0..6).flat_map(|s| (0..6).map(move |t| (s, t))).filter(|&(s, t)| gold[s] != gold[t]).count();
    let (code, err, pairs) = run("gold", &["--limit", "6", "--random-pairs", &possible.to_string(), "--different-labels"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pairs.iter().collect::<HashSet<_>>().len(), possible);
    assert!(pairs.iter().all(|&(s, t)| gold[s] != gold[t]));
    let (code, err, _) = run("gold_more", &["--limit", "6", "--random-pairs", &(possible + 1).to_string(), "--different-labels", "gold"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("prompts of different labels make only {possible}")), "{err}");
    // By prediction and only correct: the model's predictions from `score` on the same rows.
    let score_out = dir.path().join("score");
    let (code, err) = patchbay_cli(&["score", "--model", m, "--dataset", d, "--label-col", "emotion", "--rename", "no-emotion=neutral", "--template", "tak", "--labels", labels, "--limit", "40", "--quiet", "--out", score_out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let scores = read_jsonl(&score_out.join("scores.jsonl"));
    let pred: Vec<String> = scores.iter().map(|r| r["pred"].as_str().unwrap().to_string()).collect();
    let correct: Vec<bool> = scores.iter().map(|r| r["correct"].as_bool().unwrap()).collect();
    let (code, err, pairs) = run("pred", &["--limit", "40", "--random-pairs", "15", "--different-labels", "pred", "--seed", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pairs.len(), 15);
    assert!(pairs.iter().all(|&(s, t)| pred[s] != pred[t]), "{pairs:?}");
    let n_correct = correct.iter().filter(|&&c| c).count();
    if n_correct >= 2 {
        let n = (n_correct * (n_correct - 1)).min(6);
        let (code, err, pairs) = run("correct", &["--limit", "40", "--random-pairs", &n.to_string(), "--only-correct", "--seed", "1"]);
        assert_eq!(code, 0, "{err}");
        assert!(pairs.iter().all(|&(s, t)| correct[s] && correct[t]), "{pairs:?}");
    }
    let (code, err, _) = run("correct_too_many", &["--limit", "40", "--random-pairs", &(n_correct * n_correct + 1).to_string(), "--only-correct"]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn degenerate_probes_are_refused_and_tied_best_layers_reported_as_ties() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = model_and_data();
    let (m, d) = (m.as_str(), d.as_str());
    let base = ["probe", "--model", m, "--dataset", d, "--template", "tak", "--sites", "resid_post", "--folds", "2", "--no-score"];
    let cases: [(&[&str], &str); 4] = [
        (&["--label-col", "emotion", "--filter", "emotion=anger", "--limit", "12"], "all 12 probed examples have label `anger`: a one-class probe"),
        (&["--label-col", "emotion", "--filter", "emotion=joy", "--sample", "9", "--sample-seed", "2"], "all 9 probed examples have label `joy`"),
        (&["--label-col", "none", "--numeric-cols", "suddenness", "--filter", "suddenness=3", "--limit", "8"], "numeric column `suddenness` is 3 for all 8 probed examples"),
        (&["--label-col", "emotion", "--limit", "1"], "2-fold evaluation needs at least 2 examples; there are 1"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("p{i}"));
        let (code, err) = patchbay_cli(&[&base[..], extra, &["--quiet", "--out", out.to_str().unwrap()]].concat());
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!out.join("probe_results.csv").exists());
    }
    // Best layers: every layer of the highest accuracy is named, with "(tied)" when several.
    let out = dir.path().join("tie");
    let (code, err) = patchbay_cli(&[&base[..], &["--label-col", "emotion", "--filter", "emotion=anger", "--filter", "emotion=joy", "--limit", "16", "--out", out.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    let acc: Vec<f64> = std::fs::read_to_string(out.join("probe_results.csv")).unwrap().lines().skip(1).filter(|l| l.contains(",accuracy,")).map(|l| l.split(',').nth(4).unwrap().parse().unwrap()).collect();
    let best = acc.iter().cloned().fold(f64::MIN, f64::max);
    let tied = acc.iter().filter(|&&a| a == best).count();
    let line = err.lines().find(|l| l.starts_with("best resid_post probe")).unwrap_or_else(|| panic!("{err}"));
    assert_eq!(line.contains("(tied)"), tied > 1, "{line}: {acc:?}");
}
