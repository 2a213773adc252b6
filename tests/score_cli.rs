//! `patchbay score` through the binary: scores.jsonl (order, label logits against the engine's
//! own logits, predictions), accuracy and confusion matrix, --keep-correct, label collisions,
//! token-id inputs and one-line errors.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixture;
use patchbay::engine::RunRequest;
use patchbay::data::dataset::{self, DatasetSpec};
use patchbay::engine::Engine;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::Positions;
use serde_json::Value;

fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name).display().to_string()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

const LABELS: &str = "anger,fear,guilt,joy,neutral,pride,sadness";

#[test]
fn scores_match_the_engine_logits_and_the_summary_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let keep = dir.path().join("correct.jsonl");
    let model = fixture("llama");
    let (code, stdout, err) = patchbay(&[
        "score", "--model", model.to_str().unwrap(), "--dataset", &data("emotions.csv"), "--label-col", "emotion",
        "--rename", "no-emotion=neutral", "--numeric-cols", "pleasantness", "--filter", "round=round-1", "--template", "tak",
        "--labels", LABELS, "--out", out.to_str().unwrap(), "--keep-correct", keep.to_str().unwrap(), "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    // --quiet hides progress, not the result: one line on stdout, nothing on stderr.
    assert!(stdout.starts_with("accuracy ") && stdout.contains("of 98 prompts with a gold label") && stdout.lines().count() == 1, "{stdout}");
    assert!(err.is_empty(), "{err}");
    let rows = jsonl(&out.join("scores.jsonl"));
    assert_eq!(rows.len(), 98);
    let labels: Vec<&str> = LABELS.split(',').collect();

    // Independent check: the same prompts through the engine, logits of " label"'s first token.
    let mut spec = DatasetSpec::new(data("emotions.csv"), "text");
    spec.label_column = Some("emotion".into());
    spec.renames = vec![("no-emotion".into(), "neutral".into())];
    spec.filters = vec![dataset::Filter::parse("round=round-1").unwrap()];
    let ds = dataset::load(&spec).unwrap();
    let tok = PromptTokenizer::load(&model).unwrap();
    let m = Model::load(&model).unwrap();
    let ids: Vec<u32> = labels.iter().map(|l| tok.encode_plain(&format!(" {l}")).unwrap()[0]).collect();
    let t = patchbay::data::template::Template::parse("tak").unwrap();
    let prompts: Vec<Vec<u32>> = ds.examples.iter().take(5).map(|e| t.encode(&tok, &e.text).unwrap()).collect();
    let run = m.run_prompts(&prompts, &RunRequest { logits_at: Some(&Positions::List(vec![-1])), ..Default::default() }).unwrap();
    let vocab = m.cfg.vocab_size;
    for (i, row) in rows.iter().take(5).enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["row"], ds.examples[i].row);
        assert_eq!(row["gold"], ds.examples[i].label.as_deref().unwrap());
        let got: Vec<f64> = row["label_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), labels.len());
        for (j, &id) in ids.iter().enumerate() {
            let want = run.logits[i * vocab + id as usize] as f64;
            assert!((got[j] - want).abs() <= 1e-5 * (1.0 + want.abs()), "prompt {i} label {}: {} vs {want}", labels[j], got[j]);
        }
        let best = (0..labels.len()).fold(0, |b, j| if got[j] > got[b] { j } else { b });
        assert_eq!(row["pred"], labels[best]);
    }

    // Accuracy, confusion matrix and per-label counts agree with scores.jsonl.
    let n_correct = rows.iter().filter(|r| r["pred"] == r["gold"]).count();
    assert!(rows.iter().all(|r| r["correct"] == (r["pred"] == r["gold"])));
    let summary: Value = serde_json::from_slice(&std::fs::read(out.join("score.json")).unwrap()).unwrap();
    assert!((summary["accuracy"].as_f64().unwrap() - n_correct as f64 / 98.0).abs() < 1e-12);
    let conf = std::fs::read_to_string(out.join("confusion.csv")).unwrap();
    let lines: Vec<&str> = conf.lines().collect();
    assert_eq!(lines[0], format!("gold \\ pred,{LABELS}"));
    let mut total = 0;
    let mut diag = 0;
    for (g, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], labels[g]);
        for (p, c) in cells[1..].iter().enumerate() {
            let v: usize = c.parse().unwrap();
            total += v;
            if p == g {
                diag += v;
            }
            assert_eq!(v, rows.iter().filter(|r| r["gold"] == labels[g] && r["pred"] == labels[p]).count());
        }
    }
    assert_eq!((total, diag), (98, n_correct));

    // --keep-correct: exactly the correct rows, with the dataset's columns, loadable again.
    let kept = jsonl(&keep);
    assert_eq!(kept.len(), n_correct);
    for k in &kept {
        let i = k["index"].as_u64().unwrap() as usize;
        assert_eq!(rows[i]["correct"], true);
        assert_eq!(k["text"], ds.examples[i].text);
        assert_eq!(k["emotion"], rows[i]["gold"]);
        assert!(k["pleasantness"].is_number());
    }
    if !kept.is_empty() {
        let mut again = DatasetSpec::new(&keep, "text");
        again.label_column = Some("emotion".into());
        again.numeric_columns = vec!["pleasantness".into()];
        assert_eq!(dataset::load(&again).unwrap().examples.len(), n_correct);
    }
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["labels"]["token_ids"], serde_json::json!(ids));
    assert_eq!(manifest["model"]["config_sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn label_collision_is_an_error_naming_both_labels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let (code, _, err) = patchbay(&[
        "score", "--model", fixture("llama").to_str().unwrap(), "--dataset", &data("emotions.csv"), "--label-col", "emotion",
        "--filter", "emotion=sadness", "--labels", "sadness,surprise,joy", "--out", out.to_str().unwrap(), "--quiet",
    ]);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    assert!(err.contains("`sadness` and `surprise` both resolve to token"), "{err}");
    assert!(!out.join("scores.jsonl").exists());
}

#[test]
fn token_ids_with_explicit_label_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.json");
    std::fs::write(&ids, "[[1, 2, 3, 4], [5, 6, 7], [300, 12]]").unwrap();
    let out = dir.path().join("s");
    let (code, _, err) = patchbay(&["score", "--model", fixture("llama").to_str().unwrap(), "--token-ids", ids.to_str().unwrap(), "--label-token-ids", "x=10,y=20,z=30", "--out", out.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let rows = jsonl(&out.join("scores.jsonl"));
    assert_eq!(rows.len(), 3);
    let m = Model::load(&fixture("llama")).unwrap();
    let run = m.run_prompts(&[vec![5, 6, 7]], &RunRequest { logits_at: Some(&Positions::List(vec![-1])), ..Default::default() }).unwrap();
    let got: Vec<f64> = rows[1]["label_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (g, id) in got.iter().zip([10usize, 20, 30]) {
        assert!((g - run.logits[id] as f64).abs() < 1e-5);
    }
    assert!(rows[1].get("gold").is_none());
    assert!(!out.join("confusion.csv").exists());
}

#[test]
fn score_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s").display().to_string();
    let model = fixture("llama").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--dataset".into(), data("emotions.csv"), "--label-col".into(), "emotion".into(), "--labels".into(), "anger,joy".into()], "is not in the label set [anger, joy]"),
        (vec!["--dataset".into(), data("emotions.csv"), "--label-col".into(), "mood".into()], "no column `mood`"),
        (vec!["--dataset".into(), data("emotions_cp1252.csv"), "--label-col".into(), "emotion".into()], "not valid UTF-8"),
        (vec!["--dataset".into(), data("emotions.csv"), "--label-col".into(), "emotion".into(), "--template".into(), "bogus".into()], "neither a preset"),
        (vec!["--labels".into(), "a,b".into()], "--dataset FILE or --token-ids FILE"),
        (vec!["--dataset".into(), data("nope.csv")], "nope.csv"),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = vec!["score".into(), "--model".into(), model.clone(), "--out".into(), out.clone(), "--quiet".into()];
        args.extend(extra.clone());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = patchbay(&argv);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1 && err.contains(want), "{extra:?}: expected `{want}` in {err}");
    }
}

#[test]
fn help_has_examples() {
    for cmd in ["score", "probe"] {
        let (code, out, _) = patchbay(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(out.contains("Examples:") && out.contains(&format!("patchbay {cmd} --model")), "{cmd} --help:\n{out}");
    }
}
