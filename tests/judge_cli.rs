//! `patchbay judge` on the fixture models: texts from `patchbay generate` (clean and steered)
//! judged with label logits equal to `score`'s label scoring of the rendered judging prompts;
//! summary arithmetic against hand-made generations with targets; the emulated device; one-line
//! errors for bad input.

mod common;

use std::path::Path;

use common::*;
use indicatif::ProgressBar;
use patchbay::data::labels::LabelSet;
use patchbay::data::template::Template;
use patchbay::experiments::score::label_logits;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use serde_json::Value;

const LABELS: &str = "a=40,b=65,c=262,d=300,e=13";


fn logits(v: &Value) -> Vec<f32> {
    serde_json::from_value(v["label_logits"].clone()).unwrap()
}

#[test]
fn judged_logits_are_score_label_logits_of_the_judging_prompts() {
    let family = "llama";
    let dir = fixture(family);
    let m = dir.to_str().unwrap();
    let w = tempfile::tempdir().unwrap();
    let p = |n: &str| w.path().join(n).display().to_string();
    std::fs::write(p("prompts.txt"), "I got the job\nMy dog ran away\nIt rained all day\n").unwrap();
    // A clean run and a steered one (a random direction file written by `directions`' contract).
    let model = Model::load(&dir).unwrap();
    let d = model.cfg.d_model;
    let v: Vec<f32> = (0..d).map(|i| patchbay::rng::gaussian(7, 0, i as u64)).collect();
    let tensors = vec![("blocks.0.hook_resid_post/x".to_string(), vec![d], patchbay::io::tensorfile::TensorData::F32(&v, patchbay::io::OutDtype::F32))];
    patchbay::io::tensorfile::write(Path::new(&p("dirs.safetensors")), &tensors, &Default::default()).unwrap();
    patchbay_ok(&["generate", "--model", m, "--prompts", &p("prompts.txt"), "--max-new-tokens", "5", "--quiet", "--out", &p("clean")]);
    let vector = format!("{}:x", p("dirs.safetensors"));
    patchbay_ok(&["generate", "--model", m, "--prompts", &p("prompts.txt"), "--max-new-tokens", "5", "--quiet", "--vector", &vector, "--layers", "0", "--positions", "all+generated", "--betas=2,30", "--random-control", "--out", &p("steered")]);
    let clean_gens = p("clean/generations.jsonl");
    let steered_gens = p("steered/generations.jsonl");
    patchbay_ok(&["judge", "--model", m, "--generations", &clean_gens, "--generations", &steered_gens, "--label-token-ids", LABELS, "--target", "b", "--quiet", "--out", &p("judged")]);
    let judged = read_jsonl(&w.path().join("judged/judged.jsonl"));
    // clean; then beta 2 steered and its random control, beta 30 the same.
    assert_eq!(judged.len(), 3 + 12);
    assert_eq!(judged.iter().map(|j| j["condition"].as_str().unwrap()).collect::<Vec<_>>(), [vec!["clean"; 3], vec!["steered"; 12]].concat());
    let directions: Vec<&str> = judged[3..].iter().step_by(3).map(|j| j["direction"].as_str().unwrap()).collect();
    assert_eq!(directions, ["x", "random", "x", "random"]);
    // The same texts through the tak template, scored by the library.
    let tok = PromptTokenizer::load(&dir).unwrap();
    let labels = LabelSet::parse_ids(LABELS, Some(&tok)).unwrap();
    let template = Template::parse("tak").unwrap();
    let texts: Vec<String> = [read_jsonl(Path::new(&clean_gens)), read_jsonl(Path::new(&steered_gens))].concat().iter().map(|g| g["text"].as_str().unwrap().to_string()).collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| template.encode(&tok, t).unwrap()).collect();
    let want = label_logits(&model, &ids, &labels, &[], 4, &ProgressBar::hidden()).unwrap();
    for (j, (row, w)) in judged.iter().zip(want.chunks(labels.len())).enumerate() {
        assert_eq!(logits(row), w, "row {j}: judged label logits differ from score's");
        assert_eq!(row["text"].as_str().unwrap(), texts[j]);
        assert_eq!(row["target"], "b");
        let top = patchbay::logits::argmax(w);
        assert_eq!(row["pred"], labels.names[top]);
    }
    // Summary: one line per (condition, beta), accuracy = share judged as the target.
    let csv = std::fs::read_to_string(w.path().join("judged/summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "condition,direction,beta,n,n_empty,n_target,accuracy,share:a,share:b,share:c,share:d,share:e");
    assert_eq!(lines.len(), 6, "{csv}");
    for (line, start) in lines[1..].iter().zip(["clean,,,3,", "steered,x,2,3,", "steered,random,2,3,", "steered,x,30,3,", "steered,random,30,3,"]) {
        assert!(line.starts_with(start), "{csv}");
    }
    let report: Value = serde_json::from_slice(&std::fs::read(w.path().join("judged/judge.json")).unwrap()).unwrap();
    assert_eq!(report["judge"]["template"]["name"], "tak");
    assert_eq!(report["judge"]["labels"]["token_ids"], serde_json::json!([40, 65, 262, 300, 13]));
    for s in report["summary"].as_array().unwrap() {
        let rows: Vec<&Value> = judged.iter().filter(|j| j["condition"] == s["condition"] && j["direction"] == s["direction"] && j["beta"] == s["beta"]).collect();
        let hits = rows.iter().filter(|j| j["pred"] == "b").count();
        assert_eq!(s["accuracy"].as_f64().unwrap(), hits as f64 / rows.len() as f64);
    }
    // The emulated device judges the same labels (logits at bf16 tolerance).
    patchbay_ok(&["judge", "--model", m, "--device", "emu", "--generations", &clean_gens, "--label-token-ids", LABELS, "--quiet", "--out", &p("judged_emu")]);
    for (e, c) in read_jsonl(&w.path().join("judged_emu/judged.jsonl")).iter().zip(&judged[..3]) {
        assert_forward_close("judge on emu", &logits(e), &logits(c));
    }
}

#[test]
fn targets_from_rows_and_bad_input() {
    let dir = fixture("llama");
    let m = dir.to_str().unwrap();
    let w = tempfile::tempdir().unwrap();
    let p = |n: &str| w.path().join(n).display().to_string();
    let rows = [("hello there", "a"), ("", "b"), ("a rainy day", "c"), ("good news", "a")];
    let text: String = rows.iter().enumerate().map(|(i, (t, target))| serde_json::json!({"index": i, "text": t, "target": target, "beta": 4.0}).to_string() + "\n").collect();
    std::fs::create_dir_all(w.path().join("run")).unwrap();
    std::fs::write(p("run/generations.jsonl"), text).unwrap();
    let (code, err) = patchbay_cli(&["judge", "--model", m, "--generations", &p("run/generations.jsonl"), "--label-token-ids", LABELS, "--out", &p("j")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 of 4 generated texts are empty"), "{err}");
    let judged = read_jsonl(&w.path().join("j/judged.jsonl"));
    let hits = judged.iter().zip(&rows).filter(|(j, (_, t))| j["pred"] == *t).count();
    let summary: Value = serde_json::from_slice(&std::fs::read(w.path().join("j/judge.json")).unwrap()).unwrap();
    let s = &summary["summary"][0];
    assert_eq!((s["condition"].as_str(), s["n"].as_u64(), s["n_empty"].as_u64(), s["n_target"].as_u64()), (Some("run"), Some(4), Some(1), Some(4)));
    assert_eq!(s["accuracy"].as_f64().unwrap(), hits as f64 / 4.0);
    // Bad input: each a one-line error, exit code 1.
    std::fs::write(p("bad.jsonl"), "{\"index\": 0, \"text\": \"x\"}\n{oops\n").unwrap();
    std::fs::write(p("unknown.jsonl"), "{\"index\": 0, \"text\": \"x\", \"target\": \"zzz\"}\n").unwrap();
    let g = p("run/generations.jsonl");
    let (bad, unknown, missing, e) = (p("bad.jsonl"), p("unknown.jsonl"), p("missing.jsonl"), p("e"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--generations", &bad, "--label-token-ids", LABELS], "line 2: not JSON"),
        (vec!["--generations", &unknown, "--label-token-ids", LABELS], "target `zzz` is not one of the labels"),
        (vec!["--generations", &missing, "--label-token-ids", LABELS], "missing.jsonl"),
        (vec!["--generations", &g, "--generations", &g, "--label-token-ids", LABELS], "both named `run`"),
        (vec!["--generations", &g, "--names", "a,b", "--label-token-ids", LABELS], "2 names for 1"),
        (vec!["--generations", &g, "--label-token-ids", "a=99999"], "99999"),
        (vec!["--generations", &g, "--label-token-ids", LABELS, "--template", "no placeholder"], "{text}"),
        (vec!["--generations", &g, "--label-token-ids", LABELS, "--batch-size", "0"], "batch-size"),
    ];
    for (args, want) in cases {
        let all: Vec<&str> = [&["judge", "--model", m, "--quiet", "--out", &e][..], &args].concat();
        let (code, err) = patchbay_cli(&all);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.lines().count() == 1 && err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_saved_probe_judges_by_its_class_logits() {
    let dir = fixture("llama");
    let m = dir.to_str().unwrap();
    let w = tempfile::tempdir().unwrap();
    let p = |n: &str| w.path().join(n).display().to_string();
    // A probe of two classes on resid_post, fitted by `patchbay probe` (the tak template).
    let words = ["sun", "rain", "good", "bad", "up", "down", "hot", "cold", "win", "lose", "day", "night"];
    let csv: String = std::iter::once("text,label\n".to_string()).chain(words.iter().enumerate().map(|(i, t)| format!("a {t} story,{}\n", if i % 2 == 0 { "x" } else { "y" }))).collect();
    std::fs::write(p("d.csv"), csv).unwrap();
    patchbay_ok(&["probe", "--model", m, "--dataset", &p("d.csv"), "--template", "tak", "--sites", "resid_post", "--positions", "-1", "--quiet", "--out", &p("probe")]);
    let probe = p("probe/probes/blocks.1.hook_resid_post.safetensors");
    let rows = [("hello there", "x"), ("a rainy day", "y"), ("good news", "x")];
    let text: String = rows.iter().enumerate().map(|(i, (t, target))| serde_json::json!({"index": i, "text": t, "target": target}).to_string() + "\n").collect();
    std::fs::create_dir_all(w.path().join("run")).unwrap();
    std::fs::write(p("run/generations.jsonl"), text).unwrap();
    patchbay_ok(&["judge", "--model", m, "--generations", &p("run/generations.jsonl"), "--probe", &probe, "--quiet", "--out", &p("j")]);
    let judged = read_jsonl(&w.path().join("j/judged.jsonl"));
    // W x + b of the tak judging prompts' resid_post at the last token, by the library.
    let model = Model::load(&dir).unwrap();
    let tok = PromptTokenizer::load(&dir).unwrap();
    let tak = Template::parse("tak").unwrap();
    let ids: Vec<Vec<u32>> = rows.iter().map(|(t, _)| tak.encode(&tok, t).unwrap()).collect();
    let site = patchbay::sites::Site::new(1, patchbay::sites::SiteKind::ResidPost);
    let captures = [patchbay::intervene::Capture { site, positions: patchbay::sites::Positions::List(vec![-1]) }];
    use patchbay::engine::Engine;
    let x = model.run_prompts(&ids, &patchbay::engine::RunRequest { captures: &captures, ..Default::default() }).unwrap().captured.remove(0).data;
    let t = read_tensors(Path::new(&probe));
    let (wt, b) = (&t["pos-1.logreg.weight"].1, &t["pos-1.logreg.bias"].1);
    let d = model.cfg.d_model;
    for (j, row) in judged.iter().enumerate() {
        let want: Vec<f32> = (0..2).map(|c| wt[c * d..(c + 1) * d].iter().zip(&x[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>() + b[c]).collect();
        assert_close("probe logits", &logits(row), &want, 1e-4, 1e-4);
        assert_eq!(row["pred"], if want[0] >= want[1] { "x" } else { "y" });
        assert_eq!(row["target"], rows[j].1);
    }
    let report: Value = serde_json::from_slice(&std::fs::read(w.path().join("j/judge.json")).unwrap()).unwrap();
    assert_eq!(report["judge"]["classes"], serde_json::json!(["x", "y"]));
    assert_eq!(report["judge"]["site"], "blocks.1.hook_resid_post");
    // The emulated device: W x + b of the activations `capture --device emu` gives (a probe
    // fitted on 12 prompts has large weights: bf16 activation rounding moves its logits by
    // several percent, so the device's activations are the reference here).
    patchbay_ok(&["judge", "--model", m, "--device", "emu", "--generations", &p("run/generations.jsonl"), "--probe", &probe, "--quiet", "--out", &p("je")]);
    std::fs::write(p("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
    patchbay_ok(&["capture", "--model", m, "--device", "emu", "--token-ids", &p("ids.json"), "--sites", "blocks.1.hook_resid_post", "--positions", "-1", "--quiet", "--out", &p("x_emu.safetensors")]);
    let x_emu = &read_tensors(Path::new(&p("x_emu.safetensors")))["blocks.1.hook_resid_post"].1;
    for (j, e) in read_jsonl(&w.path().join("je/judged.jsonl")).iter().enumerate() {
        let want: Vec<f32> = (0..2).map(|c| wt[c * d..(c + 1) * d].iter().zip(&x_emu[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>() + b[c]).collect();
        assert_close("probe judge on emu", &logits(e), &want, 1e-4, 1e-4);
    }
    // Another model's probe, a position it was not fitted at, a file that is not a probe.
    let other = fixture("qwen2");
    let (g, e) = (p("run/generations.jsonl"), p("e"));
    for (args, want) in [
        (vec!["--model", other.to_str().unwrap(), "--probe", &probe], "a probe of another model"),
        (vec!["--model", m, "--probe", &probe, "--probe-position", "-2"], "no classifier at position -2"),
        (vec!["--model", m, "--probe", &p("d.csv")], "d.csv"),
    ] {
        let all: Vec<&str> = [&["judge", "--generations", &g, "--quiet", "--out", &e][..], &args].concat();
        let (code, err) = patchbay_cli(&all);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.lines().count() == 1 && err.contains(want), "{args:?}: {err}");
    }
}
