//! `patchbay steer --mode generate` (Wang et al.'s steered generation) through the binary on a
//! fixture model with a direction file of fresh random values and a small scenario/event file:
//! the passes and their order, tokens equal to `patchbay generate`'s for the same direction and
//! control, judged logits equal to `patchbay judge`'s on the same generations, the summaries
//! recomputed from judged.jsonl, the emulated device, direction lists in labels mode, and
//! one-line errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, write};
use patchbay::model::Model;
use serde_json::Value;

/// Label tokens of the fixtures' 384-token vocabulary; the directions are named b and c.
const LABELS: &str = "a=40,b=65,c=262,d=300,e=13";


fn tokens(rows: &[Value]) -> Vec<Value> {
    rows.iter().map(|r| r["tokens"].clone()).collect()
}

/// Directions `b` and `c` at every layer's resid_post (fresh random values, norm ~ sqrt(d)).
fn directions(path: &Path, model: &Model) {
    let d = model.cfg.d_model;
    let base = std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0x5eed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for l in 0..model.cfg.n_layers {
        for (k, name) in ["b", "c"].iter().enumerate() {
            let v = (0..d).map(|i| patchbay::rng::gaussian(base ^ (l * 2 + k) as u64, 11, i as u64)).collect();
            tensors.push((format!("blocks.{l}.hook_resid_post/{name}"), vec![d], v));
        }
    }
    let list: Vec<(String, Vec<usize>, TensorData)> = tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), TensorData::F32(v, OutDtype::F32))).collect();
    write(path, &list, &BTreeMap::from([("format".to_string(), "patchbay-directions-1".to_string())])).unwrap();
}

const SEV: &str = r#"{"scenario": "I finished the report", "event": {"positive": "My boss praised it.", "neutral": "My boss filed it.", "negative": "My boss lost it."}}
{"scenario": "I cooked dinner", "event": {"positive": "Everyone loved it.", "neutral": "We ate at seven.", "negative": "It burned."}}
{"scenario": "I went for a walk", "event": {"positive": "The sun came out.", "neutral": "It was cloudy.", "negative": "It started to hail."}}
"#;

struct Work {
    dir: tempfile::TempDir,
    model: String,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir().unwrap();
        let fixture = fixture("llama");
        directions(&dir.path().join("dirs.safetensors"), &Model::load(&fixture).unwrap());
        std::fs::write(dir.path().join("sev.jsonl"), SEV).unwrap();
        Work { dir, model: fixture.display().to_string() }
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// `steer --mode generate` on the SEV file steering b and c at layer 0 (`betas`, e.g.
    /// `--betas=2,30`), plus `extra`.
    fn steer_args(&self, out: &str, betas: &str, extra: &[&str]) -> Vec<String> {
        let vector = format!("{}:b,c", self.p("dirs.safetensors"));
        let mut args: Vec<String> = ["steer", "--mode", "generate", "--model", &self.model, "--sev", &self.p("sev.jsonl"), "--vector", &vector, "--layers", "0", "--positions", "all+generated", betas, "--label-token-ids", LABELS, "--quiet", "--out", &self.p(out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

#[test]
fn passes_tokens_judgements_and_summaries() {
    let w = Work::new();
    let args = w.steer_args("wang", "--betas=2,30", &["--max-new-tokens", "4"]);
    patchbay_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = Path::new(&w.p("wang")).to_path_buf();
    let gens = read_jsonl(&out.join("generations.jsonl"));
    // 3 scenarios x (clean + 2 directions x 2 betas x (steered + control)).
    assert_eq!(gens.len(), 3 * 9);
    let passes: Vec<(Value, Value, Value)> = gens.iter().step_by(3).map(|g| (g["direction"].clone(), g["beta"].clone(), g["target"].clone())).collect();
    let want: Vec<(Value, Value, Value)> = [
        (Value::Null, Value::Null, Value::Null),
        ("b".into(), 2.0.into(), "b".into()),
        ("random:b".into(), 2.0.into(), "b".into()),
        ("b".into(), 30.0.into(), "b".into()),
        ("random:b".into(), 30.0.into(), "b".into()),
        ("c".into(), 2.0.into(), "c".into()),
        ("random:c".into(), 2.0.into(), "c".into()),
        ("c".into(), 30.0.into(), "c".into()),
        ("random:c".into(), 30.0.into(), "c".into()),
    ]
    .into();
    assert_eq!(passes, want);
    assert_eq!(gens[0]["prompt"], "I finished the report. My boss filed it.", "the neutral variant through the plain template");
    assert_ne!(tokens(&gens[3..6]), tokens(&gens[9..12]), "beta 2 and beta 30 generate differently");

    // `patchbay generate` with direction b alone and its control: the same tokens as the clean
    // pass and b's passes (a control's random vector depends only on the seed, the direction's
    // index among the listed directions and the layer: b is the first in both runs).
    let prompts: Vec<&str> = gens[..3].iter().map(|g| g["prompt"].as_str().unwrap()).collect();
    std::fs::write(w.p("prompts.txt"), prompts.join("\n")).unwrap();
    let b = format!("{}:b", w.p("dirs.safetensors"));
    patchbay_ok(&["generate", "--model", &w.model, "--prompts", &w.p("prompts.txt"), "--max-new-tokens", "4", "--quiet", "--out", &w.p("clean")]);
    patchbay_ok(&["generate", "--model", &w.model, "--prompts", &w.p("prompts.txt"), "--max-new-tokens", "4", "--quiet", "--vector", &b, "--layers", "0", "--positions", "all+generated", "--betas=2,30", "--random-control", "--out", &w.p("b")]);
    assert_eq!(tokens(&read_jsonl(Path::new(&w.p("clean/generations.jsonl")))), tokens(&gens[..3]));
    assert_eq!(tokens(&read_jsonl(Path::new(&w.p("b/generations.jsonl")))), tokens(&gens[3..15]));

    // `patchbay judge` on the same generations (targets from the rows) gives the same logits.
    patchbay_ok(&["judge", "--model", &w.model, "--generations", &out.join("generations.jsonl").display().to_string(), "--label-token-ids", LABELS, "--quiet", "--out", &w.p("judged")]);
    let judged = read_jsonl(&out.join("judged.jsonl"));
    let by_judge = read_jsonl(Path::new(&w.p("judged/judged.jsonl")));
    assert_eq!(judged.len(), gens.len());
    let conditions: Vec<&str> = judged.iter().step_by(3).map(|j| j["condition"].as_str().unwrap()).collect();
    assert_eq!(conditions, ["clean", "steered", "random", "steered", "random", "steered", "random", "steered", "random"]);
    for (a, b) in judged.iter().zip(&by_judge) {
        for field in ["label_logits", "pred", "target", "beta", "direction", "text", "index"] {
            assert_eq!(a[field], b[field], "{field}");
        }
    }

    // summary.csv: clean rows once per target, then each pass; every accuracy and share recomputed.
    let keys = ["clean,b,", "clean,c,", "steered,b,2", "random,b,2", "steered,b,30", "random,b,30", "steered,c,2", "random,c,2", "steered,c,30", "random,c,30"];
    assert_summary_recomputed(&out.join("summary.csv"), &judged, &["a", "b", "c", "d", "e"], &keys);
    // valence.csv: the fixture labels are unknown emotions (valence `other`), so every text is
    // judged with its target's valence.
    let valence = std::fs::read_to_string(out.join("valence.csv")).unwrap();
    assert!(valence.starts_with("condition,direction,beta,n,n_empty,n_target,accuracy,share:positive,share:negative,share:neutral,share:other\nclean,other,,6,"), "{valence}");
    assert!(valence.lines().skip(1).all(|l| l.contains(",1.0000,0.0000,0.0000,0.0000,1.0000")), "{valence}");
    assert!(std::fs::metadata(out.join("accuracy.png")).unwrap().len() > 1000);
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((manifest["command"].as_str(), manifest["mode"].as_str()), (Some("steer"), Some("generate")));
    assert_eq!(manifest["passes"].as_array().unwrap().len(), 9);
    assert!(manifest["timings_s"]["judge"].as_f64().is_some());

    // --valence puts b with the positive labels: its targets' valence accuracy follows.
    let args = w.steer_args("valence", "--betas=2", &["--valence", "b=positive,c=negative", "--no-random-control", "--max-new-tokens", "4"]);
    patchbay_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let v = std::fs::read_to_string(w.p("valence/valence.csv")).unwrap();
    let keys: Vec<String> = v.lines().skip(1).map(|l| l.split(',').take(3).collect::<Vec<_>>().join(",")).collect();
    assert_eq!(keys, ["clean,positive,", "clean,negative,", "steered,positive,2", "steered,negative,2"], "{v}");
}

#[test]
fn emu_generates_the_cpu_tokens() {
    let w = Work::new();
    let cpu = w.steer_args("cpu", "--betas=2", &["--no-random-control", "--max-new-tokens", "3", "--limit", "2"]);
    patchbay_ok(&cpu.iter().map(String::as_str).collect::<Vec<_>>());
    let emu = w.steer_args("emu", "--betas=2", &["--no-random-control", "--max-new-tokens", "3", "--limit", "2", "--device", "emu"]);
    patchbay_ok(&emu.iter().map(String::as_str).collect::<Vec<_>>());
    let (c, e) = (read_jsonl(Path::new(&w.p("cpu/generations.jsonl"))), read_jsonl(Path::new(&w.p("emu/generations.jsonl"))));
    assert_eq!(c.len(), 2 * 3);
    assert_eq!(tokens(&c), tokens(&e), "greedy tokens on emu differ from the CPU's");
    let (c, e) = (read_jsonl(Path::new(&w.p("cpu/judged.jsonl"))), read_jsonl(Path::new(&w.p("emu/judged.jsonl"))));
    for (c, e) in c.iter().zip(&e) {
        let f = |v: &Value| serde_json::from_value::<Vec<f32>>(v["label_logits"].clone()).unwrap();
        assert_forward_close("judge on emu", &f(e), &f(c));
    }
}

#[test]
fn direction_lists_in_labels_mode_are_the_separate_runs() {
    let w = Work::new();
    let ids = w.p("ids.json");
    std::fs::write(&ids, "[[1, 5, 9, 12], [3, 4, 5]]").unwrap();
    let run = |names: &str, out: &str| {
        let vector = format!("{}:{names}", w.p("dirs.safetensors"));
        patchbay_ok(&["steer", "--model", &w.model, "--token-ids", &ids, "--label-token-ids", LABELS, "--vector", &vector, "--layers", "0,1", "--betas=3", "--no-random-control", "--quiet", "--out", &w.p(out)]);
        read_jsonl(Path::new(&w.p(out)).join("scores.jsonl").as_path())
    };
    let both = run("b,c", "both");
    let (b, c) = (run("b", "b"), run("c", "c"));
    let key = |r: &Value| (r["layer"].as_u64(), r["direction"].as_str().map(str::to_string), r["index"].as_u64());
    let mut want: Vec<&Value> = b.iter().chain(&c).collect();
    want.sort_by_key(|r| key(r));
    let mut got: Vec<&Value> = both.iter().collect();
    got.sort_by_key(|r| key(r));
    // The same rows; the logits to f32 rounding (the batch of a forward differs).
    assert_eq!(got.len(), want.len());
    let f = |v: &Value| serde_json::from_value::<Vec<f32>>(v["label_logits"].clone()).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(key(g), key(w));
        assert_eq!((&g["beta"], &g["clean_pred"]), (&w["beta"], &w["clean_pred"]));
        assert_close("label logits", &f(g), &f(w), 1e-5, 1e-5);
    }
}

#[test]
fn bad_input_is_one_line() {
    let w = Work::new();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--label-token-ids", "a=40,d=300"], "direction `b` is not one of the judge's labels"),
        (vec!["--valence", "b=happy"], "--valence: `b=happy`"),
        (vec!["--valence", "z=positive"], "`z` is not one of the labels"),
        (vec!["--sev-variant", "angry"], "angry"),
        (vec!["--judge-template", "no placeholder"], "{text}"),
    ];
    for (extra, want) in cases {
        // A later --label-token-ids replaces the default one (clap keeps the last).
        let mut args = w.steer_args("bad", "--betas=2", &["--max-new-tokens", "2"]);
        if extra[0] == "--label-token-ids" {
            let i = args.iter().position(|a| a == "--label-token-ids").unwrap();
            args.drain(i..i + 2);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (code, err) = patchbay_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ne!(code, 0, "{extra:?} was accepted");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{extra:?}: {err}");
    }
    // Generation flags in labels mode.
    let (code, err) = patchbay_cli(&["steer", "--model", &w.model, "--sev", &w.p("sev.jsonl"), "--label-token-ids", LABELS, "--vector", &format!("{}:b", w.p("dirs.safetensors")), "--betas=1", "--out", &w.p("x")]);
    assert!(code != 0 && err.contains("--sev is for --mode generate"), "{err}");
}
