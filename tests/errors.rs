//! Bad input never panics: every broken model directory, prompt file or CLI argument gives
//! exit code 1 (a panic would be 101) and ONE stderr line `error: ...` naming the file, field or
//! value and what was expected. Intervention validation is checked at the library level: each
//! bad request is an `Err` naming the site and the problem, before any compute.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use patchbay::engine::RunRequest;
use patchbay::engine::Engine;
use patchbay::engine::forward::{KvCache, SeqInput};
use patchbay::intervene::{Capture, Hooks, Intervention, Op, RowMap};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs the patchbay binary; returns (exit code, stdout, stderr). -1 = killed by a signal.
fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts a clean failure: exit code 1, stderr exactly one line `error: ...` containing every
/// keyword (case-insensitive). Returns the message.
#[track_caller]
fn expect_error(args: &[&str], keywords: &[&str]) -> String {
    let (code, _, stderr) = patchbay(args);
    assert_ne!(code, 101, "patchbay panicked on {args:?}:\n{stderr}");
    assert_eq!(code, 1, "exit code for {args:?} (stderr: {stderr})");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line for {args:?}, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "stderr must start with `error: `: {line}");
    for k in keywords {
        assert!(line.to_lowercase().contains(&k.to_lowercase()), "error for {args:?} does not mention `{k}`: {line}");
    }
    line.to_string()
}

/// A scratch copy of a fixture directory that tests can break.
struct Scratch {
    _tmp: tempfile::TempDir,
    /// The model directory (copy of the fixture).
    model: PathBuf,
    /// A directory for prompt files and outputs.
    work: PathBuf,
}

impl Scratch {
    fn new(family: &str) -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        for e in std::fs::read_dir(fixture(family)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
        Scratch { _tmp: tmp, model, work }
    }
    fn model(&self) -> &str {
        self.model.to_str().unwrap()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
    /// Writes a file under the work directory; returns its path as a string.
    fn write(&self, name: &str, contents: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p.to_str().unwrap().to_string()
    }
    fn out(&self) -> String {
        self.path("out.safetensors").to_str().unwrap().to_string()
    }
    /// Edits config.json as JSON.
    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let p = self.model.join("config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    /// Rewrites model.safetensors through `f`, which gets every (name, dtype, shape, bytes).
    fn edit_weights(&self, f: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
        let p = self.model.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .iter()
            .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        f(&mut tensors);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &p).unwrap();
    }
    /// A token-ids file with the fixture's prompts.
    fn ids_file(&self) -> String {
        self.write("ids.json", &serde_json::to_string(&prompt_ids("llama")).unwrap())
    }
    /// `capture` args on this model with token ids, everything captured.
    fn capture_ids<'a>(&'a self, ids: &'a str, out: &'a str) -> Vec<&'a str> {
        vec!["capture", "--model", self.model(), "--token-ids", ids, "--sites", "all", "--positions", "all", "--out", out, "--quiet"]
    }
}

/// Capture on the unmodified llama fixture with a token-ids file, plus extra args.
fn capture_llama(s: &Scratch, ids: &str, sites: &str, positions: &str) -> Vec<String> {
    ["capture", "--model", s.model(), "--token-ids", ids, "--sites", sites, "--positions", positions, "--out", &s.out(), "--quiet"]
        .map(String::from)
        .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// The model directory
// ---------------------------------------------------------------------------------------------

#[test]
fn sanity_the_unbroken_fixture_succeeds() {
    // Every case below breaks one thing of a setup that otherwise works.
    let s = Scratch::new("llama");
    let (ids, out) = (s.ids_file(), s.out());
    let (code, _, stderr) = patchbay(&s.capture_ids(&ids, &out));
    assert_eq!(code, 0, "{stderr}");
    assert!(Path::new(&out).exists());
}

#[test]
fn missing_model_dir() {
    let s = Scratch::new("llama");
    let missing = s.path("no-such-model");
    let missing = missing.to_str().unwrap();
    let (ids, out) = (s.ids_file(), s.out());
    let args = ["capture", "--model", missing, "--token-ids", &ids, "--sites", "all", "--positions", "all", "--out", &out];
    expect_error(&args, &["no-such-model", "does not exist"]);
    expect_error(&["inspect", "--model", missing], &["no-such-model", "does not exist"]);
    // A file instead of a directory.
    expect_error(&["inspect", "--model", &ids], &["ids.json", "not a directory"]);
}

#[test]
fn missing_config_json() {
    let s = Scratch::new("llama");
    std::fs::remove_file(s.model.join("config.json")).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["config.json", "no such file"]);
}

#[test]
fn config_json_not_json() {
    let s = Scratch::new("llama");
    std::fs::write(s.model.join("config.json"), "{\"model_type\": \"llama\",\n  oops\n}").unwrap();
    expect_error(&["inspect", "--model", s.model()], &["config.json", "not valid JSON", "line 2"]);
    std::fs::write(s.model.join("config.json"), "[1, 2, 3]").unwrap();
    expect_error(&["inspect", "--model", s.model()], &["config.json", "object"]);
}

#[test]
fn config_missing_hidden_size() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.remove("hidden_size");
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "hidden_size", "missing"]);
}

#[test]
fn config_field_of_wrong_type() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), json!("two"));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "num_hidden_layers", "integer", "\"two\""]);
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("rms_norm_eps".into(), json!([1e-5]));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "rms_norm_eps", "number"]);
}

#[test]
fn unsupported_model_type() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("model_type".into(), json!("gpt2"));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "model_type", "gpt2", "unsupported", "llama"]);
}

#[test]
fn unsupported_rope_type() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("rope_scaling".into(), json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "rope_type", "yarn", "not supported"]);
    // transformers-5 layout, `type` instead of `rope_type`.
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.remove("rope_scaling");
        c.insert("rope_parameters".into(), json!({"type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "rope_parameters", "dynamic", "not supported"]);
}

#[test]
fn kv_heads_not_dividing_heads() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "num_key_value_heads", "3", "divide", "num_attention_heads = 4"]);
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("num_key_value_heads".into(), json!(0));
    });
    expect_error(&["inspect", "--model", s.model()], &["config.json", "num_key_value_heads", "positive"]);
}

#[test]
fn missing_model_safetensors() {
    let s = Scratch::new("llama");
    std::fs::remove_file(s.model.join("model.safetensors")).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "index.json"]);
}

#[test]
fn truncated_model_safetensors() {
    let s = Scratch::new("llama");
    let p = s.model.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "not a valid safetensors file"]);
    // Cut inside the header.
    std::fs::write(&p, &bytes[..100]).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "not a valid safetensors file"]);
    // Empty file.
    std::fs::write(&p, b"").unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn garbage_model_safetensors() {
    let s = Scratch::new("llama");
    // Deterministic garbage: a splitmix-like sequence.
    let mut x = 0x1234_5678_9abc_def0u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect();
    std::fs::write(s.model.join("model.safetensors"), &garbage).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "not a valid safetensors file"]);
    // A plausible header length followed by text that is not JSON.
    let mut fake = 16u64.to_le_bytes().to_vec();
    fake.extend_from_slice(b"this is not json");
    std::fs::write(s.model.join("model.safetensors"), &fake).unwrap();
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_shape_mismatching_config() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("intermediate_size".into(), json!(128));
    });
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]"]);
}

#[test]
fn missing_tensor() {
    let s = Scratch::new("llama");
    let victim = "model.layers.1.mlp.down_proj.weight";
    s.edit_weights(|t| {
        let before = t.len();
        t.retain(|(n, ..)| n != victim);
        assert_eq!(t.len(), before - 1, "fixture lacks {victim}");
    });
    expect_error(&["inspect", "--model", s.model()], &[victim, "missing", "[64, 96]"]);
}

/// Tensors of blocks the config does not declare are refused, not left out: fewer layers in
/// the config than in the file, and one stray block past the end.
#[test]
fn tensors_of_undeclared_layers() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), json!(1));
    });
    expect_error(&["inspect", "--model", s.model()], &["model.layers.1.", "belongs to block 1", "declares 1 layers", "num_hidden_layers"]);
    let s = Scratch::new("llama");
    s.edit_weights(|t| {
        let (_, d, shape, bytes) = t.iter().find(|(n, ..)| n == "model.layers.1.mlp.down_proj.weight").unwrap().clone();
        t.push(("model.layers.7.mlp.down_proj.weight".into(), d, shape, bytes));
    });
    expect_error(&["inspect", "--model", s.model()], &["model.layers.7.mlp.down_proj.weight", "block 7", "declares 2 layers"]);
}

/// A sequence longer than max_position_embeddings is refused on every engine and command,
/// not run past the trained positions.
#[test]
fn prompts_longer_than_the_context() {
    let s = Scratch::new("llama");
    s.edit_config(|c| {
        c.insert("max_position_embeddings".into(), json!(6));
    });
    let ids = s.write("long.json", "[[376, 40, 323], [376, 40, 323, 41, 42, 43, 44]]");
    for device in ["cpu", "emu"] {
        let mut a = capture_llama(&s, &ids, "resid_post", "-1");
        a.extend(["--device".to_string(), device.to_string()]);
        expect_error(&strs(&a), &["7 tokens", "context of 6 positions", "max_position_embeddings"]);
    }
    let out = s.path("score").to_str().unwrap().to_string();
    expect_error(&["score", "--model", s.model(), "--token-ids", &ids, "--label-token-ids", "5,6", "--out", &out, "--quiet"], &["7 tokens", "context of 6"]);
    // Exactly the context fits.
    let fits = s.write("fits.json", "[[376, 40, 323, 41, 42, 43]]");
    let (code, _, err) = patchbay(&strs(&capture_llama(&s, &fits, "resid_post", "-1")));
    assert_eq!(code, 0, "{err}");
}

/// A custom template's unknown `{placeholder}` is refused (it would stay in every prompt).
#[test]
fn template_with_an_unknown_placeholder() {
    let s = Scratch::new("llama");
    let data = s.write("d.csv", "text,label\nI won,joy\nI lost,sadness\n");
    let out = s.path("score").to_str().unwrap().to_string();
    for (template, name) in [("{text} feels {emotion}", "{emotion}"), ("Context: {context} {text}", "{context}")] {
        expect_error(&["score", "--model", s.model(), "--dataset", &data, "--template", template, "--out", &out, "--quiet"], &[name, "not a placeholder"]);
    }
}

/// A negative number after a space is a value, refused by the command with its reason, not
/// taken for an unknown flag `-1`.
#[test]
fn negative_numbers_after_a_space_are_values() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    let out = s.path("g").to_str().unwrap().to_string();
    expect_error(&["generate", "--model", s.model(), "--token-ids", &ids, "--temperature", "-1", "--out", &out, "--quiet"], &["temperature", "-1"]);
    expect_error(&["probe", "--model", s.model(), "--dataset", "x.csv", "--C", "-1", "--out", &out], &["--C -1", "positive"]);
    // A count that cannot be negative is clap's usage error naming the value (exit 2).
    let (code, _, err) = patchbay(&["capture", "--model", s.model(), "--token-ids", &ids, "--sites", "resid_post", "--batch-size", "-3", "--out", &out]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value '-3'") && !err.contains("unexpected argument"), "{err}");
}

#[test]
fn tensor_of_int_dtype() {
    let s = Scratch::new("llama");
    let victim = "model.norm.weight";
    s.edit_weights(|t| {
        let e = t.iter_mut().find(|(n, ..)| n == victim).expect("fixture lacks model.norm.weight");
        let numel: usize = e.2.iter().product();
        e.1 = Dtype::I32;
        e.3 = (0..numel as i32).flat_map(i32::to_le_bytes).collect();
    });
    expect_error(&["inspect", "--model", s.model()], &["model.safetensors", victim, "I32", "bf16"]);
}

#[test]
fn sharded_index_naming_a_missing_shard() {
    let s = Scratch::new("llama");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("sharded");
    copy_checkpoint(&s.model, &dst, Dtype::BF16, 2);
    std::fs::remove_file(dst.join("model-00002-of-00002.safetensors")).unwrap();
    expect_error(&["inspect", "--model", dst.to_str().unwrap()], &["model-00002-of-00002.safetensors", "no such file"]);
    std::fs::write(dst.join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    expect_error(&["inspect", "--model", dst.to_str().unwrap()], &["model.safetensors.index.json", "weight_map"]);
}

// ---------------------------------------------------------------------------------------------
// Tokenizer files
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_tokenizer_json_with_text() {
    let s = Scratch::new("llama");
    std::fs::remove_file(s.model.join("tokenizer.json")).unwrap();
    let out = s.out();
    expect_error(&["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"], &["tokenizer.json", "no such file"]);
    // Token ids need no tokenizer.
    let ids = s.ids_file();
    let (code, _, stderr) = patchbay(&s.capture_ids(&ids, &out));
    assert_eq!(code, 0, "--token-ids must not need tokenizer.json: {stderr}");
}

#[test]
fn corrupt_tokenizer_json() {
    let s = Scratch::new("llama");
    let out = s.out();
    let args = ["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"];
    std::fs::write(s.model.join("tokenizer.json"), "{\"version\": \"1.0\",\n \"model\": ").unwrap();
    expect_error(&args, &["tokenizer.json", "not a valid tokenizer.json"]);
    std::fs::write(s.model.join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}").unwrap();
    expect_error(&args, &["tokenizer.json", "not a valid tokenizer.json"]);
}

/// A tokenizer model type the tokenizers library does not read is named, not reported as an
/// untagged-enum mismatch.
#[test]
fn unknown_tokenizer_model_type() {
    let s = Scratch::new("llama");
    let out = s.out();
    let args = ["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"];
    let path = s.model.join("tokenizer.json");
    let original: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (kind, want) in [(json!("SentencePiece"), "model type `SentencePiece` is not one"), (json!("bpe"), "model type `bpe`")] {
        let mut t = original.clone();
        t["model"]["type"] = kind;
        std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
        expect_error(&args, &["tokenizer.json", want, "BPE, Unigram, WordPiece, WordLevel"]);
    }
}

/// Without tokenizer_config.json the class default BOS (`<s>`) is not in this vocabulary: the
/// error says so at load, not as an out-of-range token id later.
#[test]
fn missing_tokenizer_config_names_the_default_bos() {
    let s = Scratch::new("llama");
    std::fs::remove_file(s.model.join("tokenizer_config.json")).unwrap();
    let out = s.out();
    expect_error(
        &["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"],
        &["no token `<s>`", "bos_token", "tokenizer_config.json is absent", "past the model's vocab_size 384"],
    );
    // Token ids need no tokenizer: they still run.
    let ids = s.ids_file();
    let (code, _, err) = patchbay(&strs(&capture_llama(&s, &ids, "resid_post", "-1")));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn chat_without_chat_template() {
    let s = Scratch::new("llama");
    let p = s.model.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert!(v.as_object_mut().unwrap().remove("chat_template").is_some(), "the llama fixture has a chat template");
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    assert!(!s.model.join("chat_template.jinja").exists());
    let out = s.out();
    expect_error(
        &["capture", "--model", s.model(), "--text", "hello", "--chat", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"],
        &["tokenizer_config.json", "chat_template", "no chat template"],
    );
    // The same without --chat works.
    let (code, _, stderr) = patchbay(&["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Sites, positions and prompts on the command line
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_range_layer_in_sites() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    expect_error(&strs(&capture_llama(&s, &ids, "blocks.99.hook_resid_pre", "all")), &["blocks.99.hook_resid_pre", "layer 99", "out of range", "2 layers"]);
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post,blocks.2.attn.hook_z", "-1")), &["blocks.2.attn.hook_z", "layer 2", "out of range"]);
}

#[test]
fn unknown_site_name() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    expect_error(&strs(&capture_llama(&s, &ids, "blocks.0.hook_nonsense", "all")), &["unknown site", "blocks.0.hook_nonsense", "blocks.0.hook_resid_pre"]);
    expect_error(&strs(&capture_llama(&s, &ids, "residual", "all")), &["unknown site", "`residual`"]);
    expect_error(&strs(&capture_llama(&s, &ids, " , ", "all")), &["no sites"]);
}

#[test]
fn glob_matching_nothing() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    expect_error(&strs(&capture_llama(&s, &ids, "blocks.*.hook_nothing", "all")), &["blocks.*.hook_nothing", "matches no site"]);
    expect_error(&strs(&capture_llama(&s, &ids, "blocks.7.*", "all")), &["blocks.7.*", "matches no site"]);
}

#[test]
fn out_of_range_position() {
    let s = Scratch::new("llama");
    let ids = s.ids_file(); // shortest prompt: 6 tokens
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "100")), &["position 100", "out of range", "6 tokens", "prompt 0"]);
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-100")), &["position -100", "out of range"]);
    // In range for the longer prompts only: names the prompt it fails on.
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "0,10")), &["position 10", "prompt 0", "6 tokens"]);
}

#[test]
fn non_integer_position() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "1.5")), &["position `1.5`", "not an integer"]);
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1,last")), &["position `last`", "not an integer"]);
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "")), &["not an integer"]);
}

#[test]
fn empty_token_id_list() {
    let s = Scratch::new("llama");
    let ids = s.write("empty.json", "[]");
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1")), &["no prompts"]);
}

#[test]
fn empty_prompt() {
    let s = Scratch::new("llama");
    let ids = s.write("empty_prompt.json", "[[376, 40], []]");
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1")), &["prompt 1", "no tokens"]);
}

#[test]
fn token_id_out_of_vocab() {
    let s = Scratch::new("llama");
    let ids = s.write("big.json", "[[376, 40], [376, 384]]");
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1")), &["prompt 1", "token id 384", "out of range", "vocab_size 384"]);
    let ids = s.write("neg.json", "[[376, -1]]");
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1")), &["neg.json", "list of lists of token ids"]);
}

#[test]
fn token_ids_not_a_list_of_lists() {
    let s = Scratch::new("llama");
    for (name, text) in [("flat.json", "[376, 40, 323]"), ("obj.json", "{\"ids\": [[1]]}"), ("str.json", "[[\"I\", \"got\"]]"), ("broken.json", "[[1, 2]")] {
        let ids = s.write(name, text);
        expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "-1")), &[name, "expected a JSON list of lists of token ids"]);
    }
    let missing = s.path("missing.json");
    expect_error(&strs(&capture_llama(&s, missing.to_str().unwrap(), "resid_post", "-1")), &["missing.json", "no such file"]);
}

#[test]
fn chat_with_token_ids_is_refused() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    let mut args = capture_llama(&s, &ids, "resid_post", "-1");
    args.push("--chat".into());
    expect_error(&strs(&args), &["--chat", "--token-ids"]);
}

#[test]
fn prompts_jsonl_with_a_bad_line() {
    let s = Scratch::new("llama");
    let out = s.out();
    let run = |file: &str| -> Vec<String> {
        ["capture", "--model", s.model(), "--prompts", file, "--sites", "resid_post", "--positions", "-1", "--out", &out, "--quiet"].map(String::from).to_vec()
    };
    let f = s.write("bad_json.jsonl", "{\"text\": \"I got the job\"}\n\n{\"text\": \"fine\"}\n{\"text\": oops}\n");
    expect_error(&strs(&run(&f)), &["bad_json.jsonl", "line 4"]);
    let f = s.write("bad_type.jsonl", "{\"text\": \"I got the job\"}\n{\"text\": 3}\n");
    expect_error(&strs(&run(&f)), &["bad_type.jsonl", "line 2", "string"]);
    let f = s.write("both.jsonl", "{\"text\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}\n");
    expect_error(&strs(&run(&f)), &["both.jsonl", "line 1", "exactly one of `text` (or `prompt`) or `messages`"]);
    let f = s.write("unknown_field.jsonl", "{\"text\": \"a\"}\n{\"input\": \"b\"}\n");
    expect_error(&strs(&run(&f)), &["unknown_field.jsonl", "line 2", "input"]);
    let f = s.write("empty.jsonl", "\n\n");
    expect_error(&strs(&run(&f)), &["no prompts"]);
}

#[test]
fn failed_capture_leaves_no_output() {
    let s = Scratch::new("llama");
    let ids = s.ids_file();
    expect_error(&strs(&capture_llama(&s, &ids, "resid_post", "100")), &["out of range"]);
    let left: Vec<String> = std::fs::read_dir(&s.work).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.starts_with("out.")).collect();
    assert!(left.is_empty(), "a failed capture left {left:?}");
    // An output directory that does not exist: the error names the path.
    let bad_out = s.path("no-such-dir").join("out.safetensors");
    let args = ["capture", "--model", s.model(), "--token-ids", &ids, "--sites", "resid_post", "--positions", "-1", "--out", bad_out.to_str().unwrap(), "--quiet"];
    expect_error(&args, &["no-such-dir", "out.safetensors"]);
}

// ---------------------------------------------------------------------------------------------
// Intervention validation (library)
// ---------------------------------------------------------------------------------------------

fn llama() -> Model {
    Model::load(&fixture("llama")).unwrap()
}

/// `Model::run` on the fixture prompts; returns the error message of a bad request.
#[track_caller]
fn run_err(model: &Model, ivs: &[Intervention], caps: &[Capture]) -> String {
    let prompts = prompt_ids("llama");
    match model.run_prompts(&prompts, &RunRequest { interventions: ivs, captures: caps, logits_at: Some(&Positions::List(vec![-1])), ..Default::default() }) {
        Ok(_) => panic!("expected an error for {ivs:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(msg.lines().count(), 1, "multi-line error: {msg}");
            msg
        }
    }
}

#[track_caller]
fn assert_mentions(msg: &str, keywords: &[&str]) {
    for k in keywords {
        assert!(msg.contains(k), "error does not mention `{k}`: {msg}");
    }
}

fn iv(site: Site, units: Option<Vec<usize>>, op: Op) -> Intervention {
    Intervention { site, prompts: None, positions: Positions::List(vec![-1]), units, op }
}

#[test]
fn sanity_valid_interventions_run() {
    // The same shapes as the failing cases below, but right: they must be accepted.
    let m = llama();
    let prompts = prompt_ids("llama");
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(m.cfg.n_layers)).collect();
    let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
    let z = Site::new(1, SiteKind::Z);
    let d = m.cfg.d_model;
    let ivs = [
        iv(z, Some(vec![3, 0]), Op::Zero),
        iv(z, Some(vec![1]), Op::Add { beta: 1.0, v: vec![0.5; m.cfg.d_head], normalize: true }),
        iv(Site::new(0, SiteKind::ResidPost), None, Op::Mean { mean: vec![0.0; d] }),
        iv(Site::new(0, SiteKind::MlpPost), Some(vec![0, 5]), Op::ProjectSet { beta: 1.0, p: vec![0.0; 4], v: vec![0.0; 2] }),
        iv(Site::new(1, SiteKind::ResidPre), None, Op::Patch { values: vec![0.0; prompts.len() * d] }),
        Intervention { site: Site::new(0, SiteKind::K), prompts: Some(vec![2]), positions: Positions::All, units: Some(vec![1]), op: Op::Scale { alpha: 0.5 } },
    ];
    assert!(m.run(&mut seqs, &ivs, &[], Some(&Positions::List(vec![-1])), None).is_ok());
}

#[test]
fn head_index_out_of_range() {
    let m = llama();
    let msg = run_err(&m, &[iv(Site::new(1, SiteKind::Z), Some(vec![0, 4]), Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.1.attn.hook_z", "head 4", "out of range", "0..4"]);
    // kv heads at k/v sites: n_kv_heads = 2.
    let msg = run_err(&m, &[iv(Site::new(0, SiteKind::V), Some(vec![2]), Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.0.attn.hook_v", "kv head 2", "out of range", "0..2"]);
    // neurons at mlp.hook_post: d_mlp = 96.
    let msg = run_err(&m, &[iv(Site::new(0, SiteKind::MlpPost), Some(vec![96]), Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.0.mlp.hook_post", "neuron 96", "out of range"]);
    let msg = run_err(&m, &[iv(Site::new(0, SiteKind::Z), Some(vec![]), Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.0.attn.hook_z", "empty head list"]);
}

#[test]
fn duplicate_head() {
    let m = llama();
    let msg = run_err(&m, &[iv(Site::new(0, SiteKind::HeadOut), Some(vec![1, 2, 1]), Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.0.attn.hook_result", "head 1", "twice"]);
}

#[test]
fn operand_of_wrong_width() {
    let m = llama();
    let (d, dh) = (m.cfg.d_model, m.cfg.d_head);
    let rp = Site::new(0, SiteKind::ResidPost);
    let msg = run_err(&m, &[iv(rp, None, Op::Add { beta: 1.0, v: vec![1.0; d - 1], normalize: false })], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_post", "add", "v has 63 values, expected 64"]);
    // Width follows the unit selection: two heads of z = 2 * d_head.
    let z = Site::new(1, SiteKind::Z);
    let msg = run_err(&m, &[iv(z, Some(vec![0, 1]), Op::Add { beta: 1.0, v: vec![1.0; dh], normalize: true })], &[]);
    assert_mentions(&msg, &["blocks.1.attn.hook_z", "v has 16 values, expected 32"]);
    let msg = run_err(&m, &[iv(rp, None, Op::Mean { mean: vec![0.0; d + 1] })], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_post", "mean", "65 values, expected 64"]);
    let msg = run_err(&m, &[iv(rp, None, Op::ProjectSet { beta: 1.0, p: vec![0.0; d], v: vec![0.0; d] })], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_post", "project_set", "P has 64 values, expected 4096"]);
    let msg = run_err(&m, &[iv(rp, None, Op::ProjectSet { beta: 1.0, p: vec![0.0; d * d], v: vec![0.0; 3] })], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_post", "project_set", "v has 3 values, expected 64"]);
    let msg = run_err(&m, &[iv(rp, None, Op::Add { beta: 1.0, v: vec![0.0; d], normalize: true })], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_post", "zero vector"]);
}

#[test]
fn patch_values_of_wrong_size() {
    let m = llama();
    let d = m.cfg.d_model;
    let site = Site::new(1, SiteKind::ResidMid);
    // 3 prompts x 1 position: one row (d) or 3 rows (3d) are right; 2 rows are not.
    let msg = run_err(&m, &[iv(site, None, Op::Patch { values: vec![0.0; 2 * d] })], &[]);
    assert_mentions(&msg, &["blocks.1.hook_resid_mid", "patch", "128 elements", "3 x 64"]);
    let msg = run_err(&m, &[iv(site, None, Op::Patch { values: vec![] })], &[]);
    assert_mentions(&msg, &["blocks.1.hook_resid_mid", "0 elements"]);
}

#[test]
fn intervening_on_attention_pattern() {
    let m = llama();
    let msg = run_err(&m, &[iv(Site::new(0, SiteKind::Pattern), None, Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.0.attn.hook_pattern", "captured, not intervened on"]);
}

#[test]
fn prompt_index_out_of_range() {
    let m = llama();
    let bad = Intervention { site: Site::new(0, SiteKind::ResidPre), prompts: Some(vec![0, 3]), positions: Positions::All, units: None, op: Op::Zero };
    let msg = run_err(&m, &[bad], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_pre", "prompt 3", "out of range", "batch has 3"]);
}

#[test]
fn intervention_position_and_layer_out_of_range() {
    let m = llama();
    let bad = Intervention { site: Site::new(0, SiteKind::ResidPre), prompts: None, positions: Positions::List(vec![6]), units: None, op: Op::Zero };
    let msg = run_err(&m, &[bad], &[]);
    assert_mentions(&msg, &["blocks.0.hook_resid_pre", "prompt 0", "position 6", "out of range"]);
    let msg = run_err(&m, &[iv(Site::new(2, SiteKind::ResidPost), None, Op::Zero)], &[]);
    assert_mentions(&msg, &["blocks.2.hook_resid_post", "layer 2", "out of range"]);
    let msg = run_err(&m, &[], &[Capture { site: Site::new(5, SiteKind::Z), positions: Positions::All }]);
    assert_mentions(&msg, &["blocks.5.attn.hook_z", "out of range"]);
}

#[test]
fn hooks_new_validates_before_any_compute() {
    // Hooks::new directly, on a row map alone: validation needs no weights.
    let m = llama();
    let rows = RowMap::new(vec![0, 0], vec![4, 7]);
    let ok = [iv(Site::new(0, SiteKind::Z), Some(vec![3]), Op::Zero)];
    assert!(Hooks::new(&m.cfg, &rows, &ok, &[], None).is_ok());
    let bad = [iv(Site::new(0, SiteKind::Z), Some(vec![3, 3]), Op::Zero)];
    let msg = Hooks::new(&m.cfg, &rows, &bad, &[], None).err().expect("duplicate head accepted").to_string();
    assert_mentions(&msg, &["intervention 0", "blocks.0.attn.hook_z", "head 3", "twice"]);
    let bad = [ok[0].clone(), iv(Site::new(1, SiteKind::Q), Some(vec![9]), Op::Zero)];
    let msg = Hooks::new(&m.cfg, &rows, &bad, &[], None).err().expect("head 9 accepted").to_string();
    assert_mentions(&msg, &["intervention 1", "blocks.1.attn.hook_q", "head 9"]);
    let bad = [Intervention { site: Site::new(0, SiteKind::ResidPre), prompts: Some(vec![2]), positions: Positions::All, units: None, op: Op::Zero }];
    let msg = Hooks::new(&m.cfg, &rows, &bad, &[], None).err().expect("prompt 2 accepted").to_string();
    assert_mentions(&msg, &["blocks.0.hook_resid_pre", "prompt 2", "batch has 2"]);
}

/// Shard files must resolve inside the model directory: an index naming `../x`, an absolute
/// path or a symlink out of the directory is refused by name; a symlink loop and a directory
/// where a shard is expected name the real cause; a byte-order mark in config.json,
/// tokenizer_config.json, the index or a token-ids file is named.
#[test]
fn paths_stay_inside_and_json_boms_are_named() {
    let s = Scratch::new("llama");
    let outside = s.work.join("outside.safetensors");
    std::fs::copy(s.model.join("model.safetensors"), &outside).unwrap();
    let index = |weight_file: &str| {
        let v = serde_json::json!({"weight_map": {"model.embed_tokens.weight": weight_file}});
        std::fs::write(s.model.join("model.safetensors.index.json"), v.to_string()).unwrap();
    };
    for name in ["../work/outside.safetensors", outside.to_str().unwrap()] {
        index(name);
        expect_error(&["inspect", "--model", s.model()], &["model.safetensors.index.json", "outside the model directory", name]);
    }
    std::os::unix::fs::symlink(&outside, s.model.join("link.safetensors")).unwrap();
    index("link.safetensors");
    expect_error(&["inspect", "--model", s.model()], &["outside the model directory", "link.safetensors"]);
    std::os::unix::fs::symlink(s.model.join("loop.safetensors"), s.model.join("loop.safetensors")).unwrap();
    index("loop.safetensors");
    expect_error(&["inspect", "--model", s.model()], &["loop.safetensors", "symbolic links"]);
    std::fs::create_dir(s.model.join("dir.safetensors")).unwrap();
    index("dir.safetensors");
    expect_error(&["inspect", "--model", s.model()], &["dir.safetensors", "is a directory"]);
    std::fs::remove_file(s.model.join("model.safetensors.index.json")).unwrap();
    // A symlink inside the directory is fine.
    std::fs::rename(s.model.join("model.safetensors"), s.model.join("real.safetensors")).unwrap();
    std::os::unix::fs::symlink(s.model.join("real.safetensors"), s.model.join("model.safetensors")).unwrap();
    let (code, _, err) = patchbay(&["inspect", "--model", s.model()]);
    assert_eq!(code, 0, "{err}");
    // Byte-order marks.
    let ids = s.ids_file();
    for file in ["config.json", "tokenizer_config.json"] {
        let p = s.model.join(file);
        let orig = std::fs::read(&p).unwrap();
        std::fs::write(&p, [b"\xEF\xBB\xBF".as_slice(), &orig].concat()).unwrap();
        expect_error(&["capture", "--model", s.model(), "--text", "hello", "--sites", "resid_post", "--positions", "-1", "--out", &s.out(), "--quiet"], &[file, "byte-order mark"]);
        std::fs::write(&p, orig).unwrap();
    }
    let bom_ids = s.write("bom.json", &format!("\u{feff}{}", std::fs::read_to_string(&ids).unwrap()));
    expect_error(&["capture", "--model", s.model(), "--token-ids", &bom_ids, "--sites", "resid_post", "--positions", "-1", "--out", &s.out(), "--quiet"], &["bom.json", "byte-order mark"]);
}
