//! `patchbay generate` through the binary on the fixture models: the generations.jsonl and
//! manifest contract, tokens equal to the library's generation of the same prompts, every
//! prompt source (a text file, JSONL with `prompt`/`text`/`messages`, a dataset through a
//! template, token ids), --chat, stop strings, the batch size changing nothing, the emulated
//! device, steering through the intervention flags (== the library's steered generation; beta 0
//! and a zero vector == the clean run), and one-line errors for bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use indicatif::ProgressBar;
use patchbay::backend::ops::sample::SampleParams;
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, generate};
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, write};
use patchbay::model::Model;
use patchbay::model::tokenizer::{ChatMessage, PromptTokenizer};
use patchbay::sites::{Site, SiteKind, TokenScope};
use serde_json::Value;

/// Runs the patchbay binary; returns (exit code, stdout, stderr).
fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        Work { dir: tempfile::tempdir().unwrap() }
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Runs `generate --model <fixture> <args> --out <name> --quiet`; returns generations.jsonl
    /// and the manifest.
    fn generate(&self, family: &str, name: &str, args: &[&str]) -> (Vec<Value>, Value) {
        let model = fixture(family);
        let out = self.out(name);
        let mut all = vec!["generate", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"];
        all.extend_from_slice(args);
        let (code, _, err) = patchbay(&all);
        assert_eq!(code, 0, "generate {args:?}: {err}");
        (read_jsonl(&out.join("generations.jsonl")), serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap())
    }
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn tokens(gens: &[Value]) -> Vec<Vec<u32>> {
    gens.iter().map(|g| serde_json::from_value(g["tokens"].clone()).unwrap()).collect()
}

const TEXTS: [&str; 3] = ["I got the job", "My dog ran away from home", "It rained"];

#[test]
fn contract_and_tokens_equal_the_library() {
    let w = Work::new();
    let family = "qwen2";
    let dir = fixture(family);
    let file = w.write("prompts.txt", &(TEXTS.join("\n") + "\n"));
    let (gens, manifest) = w.generate(family, "plain", &["--prompts", &file, "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--batch-size", "2"]);
    assert_eq!(gens.len(), 3);
    // The library on the same ids and settings.
    let model = Model::load(&dir).unwrap();
    let tok = PromptTokenizer::load(&dir).unwrap();
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
    let spec = GenerateSpec { max_new_tokens: 5, sample: SampleParams { temperature: 0.8, top_p: 0.9, seed: 3 }, eos_ids: model.cfg.eos_token_ids.clone(), stop: Vec::new(), batch_size: 3 };
    let want = generate(&model, &ids, &spec, &[], Some(&tok), &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap();
    for (i, (g, w)) in gens.iter().zip(&want).enumerate() {
        let keys: Vec<&str> = g.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["beta", "direction", "index", "interventions", "prompt", "seed", "stop", "text", "tokens"]);
        assert!(g["beta"].is_null() && g["direction"].is_null(), "a clean run has no beta or direction");
        assert_eq!(g["index"], i);
        assert_eq!(g["prompt"], TEXTS[i]);
        assert_eq!(g["interventions"], serde_json::json!([]));
        assert_eq!(tokens(std::slice::from_ref(g))[0], w.tokens, "prompt {i}: tokens differ from the library's");
        assert_eq!(g["text"].as_str(), w.text.as_deref());
        assert_eq!(g["seed"].as_u64(), Some(w.seed));
        assert_eq!(g["stop"], serde_json::to_value(w.stop).unwrap());
        assert!(["eos", "length"].contains(&g["stop"].as_str().unwrap()));
    }
    assert_eq!(manifest["command"], "generate");
    assert_eq!(manifest["device"], "cpu");
    assert_eq!(manifest["n_prompts"], 3);
    assert_eq!(manifest["sampling"]["temperature"].as_f64(), Some(0.8f32 as f64));
    assert_eq!(manifest["sampling"]["max_new_tokens"], 5);
    assert_eq!(manifest["sampling"]["eos_ids"], serde_json::to_value(&model.cfg.eos_token_ids).unwrap());
    assert!(manifest["timings_s"]["generate"].as_f64().unwrap() > 0.0);
    // Batch size 1: the same file.
    let (one, _) = w.generate(family, "one", &["--prompts", &file, "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--batch-size", "1"]);
    assert_eq!(one, gens, "the batch size changed the generations");
}

#[test]
fn every_prompt_source_chat_and_stop_strings() {
    let w = Work::new();
    let family = "llama";
    let dir = fixture(family);
    let tok = PromptTokenizer::load(&dir).unwrap();
    let max = ["--max-new-tokens", "6"];
    // JSONL with `prompt`, `text` and `messages`, --chat: as the chat template renders them.
    let jsonl = format!(
        "{}\n{}\n\n{}\n",
        serde_json::json!({"prompt": TEXTS[0]}),
        serde_json::json!({"text": TEXTS[1]}),
        serde_json::json!({"messages": [{"role": "user", "content": TEXTS[2]}]})
    );
    let file = w.write("p.jsonl", &jsonl);
    let (chat, _) = w.generate(family, "chat", &[&["--prompts", file.as_str(), "--chat"][..], &max].concat());
    let lines = w.write("p.txt", &TEXTS.join("\n"));
    let (chat_lines, manifest) = w.generate(family, "chat_lines", &[&["--prompts", lines.as_str(), "--chat"][..], &max].concat());
    assert_eq!(tokens(&chat), tokens(&chat_lines), "--chat: messages and wrapped texts differ");
    assert_eq!(chat[0]["prompt"], TEXTS[0]);
    assert_eq!(chat[2]["prompt"], tok.render_chat(&[ChatMessage::new("user", TEXTS[2])], true).unwrap());
    assert_eq!(manifest["chat"], true);
    // Token ids of the chat prompts: the same tokens, prompt null.
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode_chat(&[ChatMessage::new("user", *t)], true).unwrap()).collect();
    let ids_file = w.write("ids.json", &serde_json::to_string(&ids).unwrap());
    let (by_ids, _) = w.generate(family, "ids", &[&["--token-ids", ids_file.as_str(), "--device", "emu"][..], &max].concat());
    assert!(by_ids.iter().all(|g| g["prompt"].is_null()));
    assert_eq!(by_ids.len(), 3);
    // A dataset through a template.
    let csv = w.write("d.csv", &format!("text,label\n{},joy\n\"{}\",sadness\n", TEXTS[0], TEXTS[1]));
    let (ds, manifest) = w.generate(family, "ds", &[&["--dataset", csv.as_str(), "--template", "Q: {text} A:"][..], &max].concat());
    assert_eq!(ds[1]["prompt"], format!("Q: {} A:", TEXTS[1]));
    assert_eq!(manifest["inputs"]["template"]["body"], "Q: {text} A:");
    // A stop string: the text of prompt 0's 3rd token; the text is cut before it.
    let (free, _) = w.generate(family, "free", &[&["--prompts", lines.as_str()][..], &max].concat());
    let t0 = tokens(&free)[0].clone();
    let stop_str = tok.decode(&t0[..3]).unwrap().strip_prefix(tok.decode(&t0[..2]).unwrap().as_str()).unwrap().to_string();
    let (stopped, _) = w.generate(family, "stopped", &[&["--prompts", lines.as_str(), "--stop", stop_str.as_str()][..], &max].concat());
    assert_eq!(stopped[0]["stop"], "stop_string");
    assert!(tokens(&stopped)[0].len() <= 3);
    for g in &stopped {
        assert!(!g["text"].as_str().unwrap().contains(&stop_str));
    }
}

/// Writes `[width]` vectors `blocks.<L>.hook_resid_post/<name>` for every layer: `dir` a fresh
/// random one (returned per layer), `zero` zeros, and `nan` with a NaN.
fn directions_file(path: &Path, model: &Model, seed: u64) -> Vec<Vec<f32>> {
    let d = model.cfg.d_model;
    let mut list = Vec::new();
    let mut dirs = Vec::new();
    for l in 0..model.cfg.n_layers {
        let site = Site::new(l, SiteKind::ResidPost);
        let v: Vec<f32> = (0..d).map(|i| patchbay::rng::gaussian(seed, l as u64, i as u64)).collect();
        let mut nan = v.clone();
        nan[3] = f32::NAN;
        list.push((format!("{site}/dir"), v.clone()));
        list.push((format!("{site}/zero"), vec![0.0; d]));
        list.push((format!("{site}/nan"), nan));
        dirs.push(v);
    }
    let tensors: Vec<(String, Vec<usize>, TensorData)> = list.iter().map(|(n, v)| (n.clone(), vec![d], TensorData::F32(v, OutDtype::F32))).collect();
    write(path, &tensors, &std::collections::BTreeMap::from([("format".to_string(), "patchbay-directions-1".to_string())])).unwrap();
    dirs
}

#[test]
fn steering_flags_match_the_library_and_beta_zero_is_clean() {
    let w = Work::new();
    let family = "llama";
    let dir = fixture(family);
    let model = Model::load(&dir).unwrap();
    let tok = PromptTokenizer::load(&dir).unwrap();
    let path = w.out("dirs.safetensors");
    let dirs = directions_file(&path, &model, 0x5eed ^ std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0));
    let vector = |name: &str| format!("{}:{name}", path.display());
    let lines = w.write("p.txt", &TEXTS.join("\n"));
    let common = ["--prompts", lines.as_str(), "--max-new-tokens", "6", "--layers", "0,1", "--positions", "last:2+generated"];
    let (clean, _) = w.generate(family, "clean", &["--prompts", lines.as_str(), "--max-new-tokens", "6"]);
    let (gens, manifest) = w.generate(family, "steered", &[&common[..], &["--vector", &vector("dir"), "--betas=0,40"]].concat());
    // One pass per beta, in the order listed, each over every prompt.
    assert_eq!(gens.len(), 2 * TEXTS.len());
    assert_eq!(gens.iter().map(|g| g["beta"].as_f64().unwrap()).collect::<Vec<_>>(), [0.0, 0.0, 0.0, 40.0, 40.0, 40.0]);
    assert_eq!(gens.iter().map(|g| g["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
    assert_eq!(tokens(&gens[..3]), tokens(&clean), "beta 0 changed the tokens");
    let described = &gens[3]["interventions"];
    assert_eq!(described.as_array().unwrap().len(), 2, "one intervention per layer: {described}");
    assert_eq!(described[1]["site"], "blocks.1.hook_resid_post");
    assert_eq!(described[1]["positions"], "-1,-2+generated");
    assert_eq!(manifest["interventions"].as_array().unwrap().len(), 2, "the manifest lists both passes");
    // The library with the same step interventions.
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
    let spec = spec_greedy(&model);
    let scope = TokenScope { prompt: Some(patchbay::sites::Positions::List(vec![-1, -2])), generated: true };
    let steps: Vec<StepIntervention> = dirs.iter().enumerate().map(|(l, v)| StepIntervention::steer(Site::new(l, SiteKind::ResidPost), v.clone(), 40.0, scope.clone())).collect();
    let want = generate(&model, &ids, &spec, &steps, Some(&tok), &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap();
    assert_eq!(tokens(&gens[3..]), want.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(), "the command's steered tokens differ from the library's");
    assert_ne!(tokens(&gens[3..]), tokens(&clean), "steering with beta 40 changed no token (the test would not see a dropped intervention)");
    // A zero vector at any strength, and --normalise, on the emulated device too.
    let (zero, _) = w.generate(family, "zero", &[&common[..], &["--vector", &vector("zero"), "--betas=5"]].concat());
    assert_eq!(tokens(&zero), tokens(&clean), "a zero vector changed the tokens");
    let (emu_clean, _) = w.generate(family, "emu_clean", &["--prompts", lines.as_str(), "--max-new-tokens", "6", "--device", "emu"]);
    let (emu_zero, _) = w.generate(family, "emu_zero", &[&common[..], &["--vector", &vector("zero"), "--betas=5", "--device", "emu"]].concat());
    assert_eq!(tokens(&emu_zero), tokens(&emu_clean), "emu: a zero vector changed the tokens");
    let (unit, _) = w.generate(family, "unit", &[&common[..], &["--vector", &vector("dir"), "--betas=40", "--normalise"]].concat());
    let unit_steps: Vec<StepIntervention> = steps.iter().map(|s| StepIntervention { op: patchbay::intervene::Op::Add { beta: 40.0, v: match &s.op { patchbay::intervene::Op::Add { v, .. } => v.clone(), _ => unreachable!() }, normalize: true }, ..s.clone() }).collect();
    let want_unit = generate(&model, &ids, &spec, &unit_steps, Some(&tok), &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap();
    assert_eq!(tokens(&unit), want_unit.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(), "--normalise: tokens differ from the library's");
    // --random-control: after the steered pass, the same pass along experiments::steer's
    // same-norm random directions (seeded by --seed).
    let (ctl, _) = w.generate(family, "control", &[&common[..], &["--vector", &vector("dir"), "--betas=40", "--random-control", "--seed", "9"]].concat());
    assert_eq!(ctl.iter().map(|g| g["direction"].as_str().unwrap()).collect::<Vec<_>>(), ["dir", "dir", "dir", "random", "random", "random"]);
    assert_eq!(tokens(&ctl[..3]), tokens(&gens[3..]), "the steered pass changed with a control after it");
    let spec = patchbay::intervene::spec::InterventionSpec {
        vector: Some(vector("dir")),
        project: None,
        site: "resid_post".into(),
        layers: Some(patchbay::intervene::spec::Layers::Text("0,1".into())),
        positions: "last:2+generated".into(),
        betas: vec![40.0],
        normalise: false,
    };
    let controls = patchbay::experiments::steer::random_controls(&spec.resolve(&model.cfg, true).unwrap(), 9);
    for (c, s) in controls.iter().zip(&steps) {
        let (patchbay::intervene::Op::Add { v: r, .. }, patchbay::intervene::Op::Add { v, .. }) = (&c.op, &s.op) else { panic!("add ops") };
        assert!((patchbay::intervene::norm(r) - patchbay::intervene::norm(v)).abs() < 1e-3 * patchbay::intervene::norm(v), "the control's norm differs");
    }
    let control_steps: Vec<StepIntervention> = controls.iter().map(patchbay::experiments::steer::step_intervention).collect();
    let want_ctl = generate(&model, &ids, &spec_greedy(&model), &control_steps, Some(&tok), &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap();
    assert_eq!(tokens(&ctl[3..]), want_ctl.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(), "the control pass differs from the library's random controls");
}

fn spec_greedy(model: &Model) -> GenerateSpec {
    GenerateSpec { max_new_tokens: 6, sample: SampleParams::GREEDY, eos_ids: model.cfg.eos_token_ids.clone(), stop: Vec::new(), batch_size: 8 }
}

#[test]
fn bad_input_is_one_line_error() {
    let w = Work::new();
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let out = w.out("o");
    let o = out.to_str().unwrap();
    let ok = w.write("ok.txt", "hello\n");
    let blank = w.write("blank.txt", "hello\n\nworld\n");
    let empty = w.write("empty.jsonl", "{\"prompt\": \"\"}\n");
    let long = w.write("long.json", &serde_json::to_string(&[vec![5u32; 300]]).unwrap());
    let dirs = w.out("dirs.safetensors");
    directions_file(&dirs, &Model::load(&model).unwrap(), 1);
    let v = |name: &str| format!("{}:{name}", dirs.display());
    let (dir_v, nan_v, missing_v) = (v("dir"), v("nan"), v("fear"));
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--prompts", &blank], &["blank.txt", "line 2", "empty prompt"]),
        (vec!["--prompts", &empty], &["empty.jsonl", "line 1", "empty prompt"]),
        (vec!["--token-ids", &long], &["prompt 0 has 300 tokens", "context"]),
        (vec!["--prompts", &ok, "--temperature=-1"], &["temperature"]),
        (vec!["--prompts", &ok, "--top-p", "0"], &["top_p"]),
        (vec!["--prompts", &ok, "--top-p", "1.5"], &["top_p"]),
        (vec!["--prompts", &ok, "--batch-size", "0"], &["batch size"]),
        (vec!["--prompts", &ok, "--stop", ""], &["stop string is empty"]),
        (vec!["--token-ids", &long, "--chat"], &["--chat", "--token-ids"]),
        (vec![], &["give the prompts"]),
        (vec!["--prompts", &ok, "--betas=1"], &["--betas", "need --vector"]),
        (vec!["--prompts", &ok, "--random-control"], &["--random-control", "need --vector"]),
        (vec!["--prompts", &ok, "--project", &dir_v, "--betas=1", "--random-control"], &["--random-control", "no `add`"]),
        (vec!["--prompts", &ok, "--vector", &dir_v], &["--betas"]),
        (vec!["--prompts", &ok, "--vector", &dir_v, "--betas="], &["empty"]),
        (vec!["--prompts", &ok, "--vector", &missing_v, "--betas=1"], &["fear"]),
        (vec!["--prompts", &ok, "--vector", &nan_v, "--betas=1"], &["nan", "finite"]),
        (vec!["--prompts", &ok, "--vector", &dir_v, "--betas=1", "--layers", "7"], &["layer 7"]),
        (vec!["--prompts", &ok, "--vector", &dir_v, "--betas=1", "--site", "mlp_out", "--layers", "0"], &["mlp_out"]),
        (vec!["--prompts", &ok, "--vector", &dir_v, "--betas=1", "--positions", "-9"], &["position -9"]),
    ];
    for (args, want) in cases {
        let all: Vec<&str> = [&["generate", "--model", m, "--out", o, "--quiet"][..], &args].concat();
        let (code, _, err) = patchbay(&all);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.lines().count() == 1, "{args:?}: {err}");
        for k in want {
            assert!(err.contains(k), "{args:?}: no `{k}` in {err}");
        }
    }
    let (code, _, _) = patchbay(&["generate", "--model", m, "--out", o, "--prompts", &ok, "--token-ids", &long]);
    assert_eq!(code, 2, "two prompt sources are a usage error");
}
