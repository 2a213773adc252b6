//! `patchbay generate` through the binary on the fixture models: the generations.jsonl and
//! manifest contract, tokens equal to the library's generation of the same prompts, every
//! prompt source (a text file, JSONL with `prompt`/`text`/`messages`, a dataset through a
//! template, token ids), --chat, stop strings, the batch size changing nothing, the emulated
//! device, and one-line errors for bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use indicatif::ProgressBar;
use patchbay::backend::ops::sample::SampleParams;
use patchbay::experiments::generate::{GenerateSpec, generate};
use patchbay::model::Model;
use patchbay::model::tokenizer::{ChatMessage, PromptTokenizer};
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
        assert_eq!(keys, ["index", "interventions", "prompt", "seed", "stop", "text", "tokens"]);
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
