//! The `capture` output contract, through the real binary (see src/experiments/capture.rs):
//! tensor names (TransformerLens), shapes, dtypes, values (against the Hugging Face goldens),
//! position lists, metadata, the prompt inputs (--text, --prompts, --chat, --token-ids), site
//! specs, `inspect`, and atomic output.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use indicatif::ProgressBar;
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::io::OutDtype;
use patchbay::model::Model;
use patchbay::sites::{Positions, Site};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs the patchbay binary; returns (exit code, stdout, stderr).
fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One tensor of a capture file, values as f32 (i64 offsets are small: exact).
#[derive(Debug)]
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Elements per leading index (everything after axis `axes`).
    fn row_width(&self, axes: usize) -> usize {
        self.shape[axes..].iter().product()
    }
}

/// A capture file: tensors by name and the metadata.
struct CaptureFile {
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

impl CaptureFile {
    fn read(path: &Path) -> CaptureFile {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = meta.metadata().clone().unwrap_or_default();
        let values = read_tensors(path);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .iter()
            .map(|(name, v)| {
                let (shape, data) = values[name].clone();
                (name.to_string(), Tensor { dtype: v.dtype(), shape, data })
            })
            .collect();
        CaptureFile { tensors, metadata }
    }
    fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("capture has no tensor `{name}`; it has {:?}", self.names()))
    }
    fn names(&self) -> BTreeSet<String> {
        self.tensors.keys().cloned().collect()
    }
}

/// A temporary directory for inputs and outputs.
struct Work(tempfile::TempDir);

impl Work {
    fn new() -> Work {
        Work(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn write(&self, name: &str, contents: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p.to_str().unwrap().to_string()
    }
    /// Runs `capture --model DIR ARGS --out WORK/OUT --quiet`, asserting success; reads the file.
    fn capture(&self, model: &Path, out: &str, args: &[&str]) -> CaptureFile {
        let out_path = self.path(out);
        let mut all = vec!["capture", "--model", model.to_str().unwrap(), "--out", out_path.to_str().unwrap(), "--quiet"];
        all.extend_from_slice(args);
        let (code, _, stderr) = patchbay(&all);
        assert_eq!(code, 0, "capture {args:?} failed: {stderr}");
        assert!(stderr.is_empty(), "--quiet capture wrote to stderr: {stderr}");
        CaptureFile::read(&out_path)
    }
    /// The fixture's prompts as a --token-ids file.
    fn ids_file(&self, family: &str) -> String {
        self.write(&format!("{family}_ids.json"), &serde_json::to_string(&prompt_ids(family)).unwrap())
    }
}

/// Dimensions read from the fixture's config.json (independently of the library's parser).
struct Dims {
    layers: usize,
    d_model: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    d_mlp: usize,
    vocab: usize,
}

fn config(family: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(family).join("config.json")).unwrap()).unwrap()
}

fn dims(family: &str) -> Dims {
    let c = config(family);
    let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{family}: config.json lacks {k}")) as usize;
    let n_heads = u("num_attention_heads");
    Dims {
        layers: u("num_hidden_layers"),
        d_model: u("hidden_size"),
        n_heads,
        n_kv_heads: c["num_key_value_heads"].as_u64().map_or(n_heads, |v| v as usize),
        d_head: c["head_dim"].as_u64().map_or(u("hidden_size") / n_heads, |v| v as usize),
        d_mlp: u("intermediate_size"),
        vocab: u("vocab_size"),
    }
}

/// The per-layer TransformerLens hook names of the contract, in forward order, with their
/// per-token shapes (`n_keys` = key axis of the pattern).
fn block_hooks(d: &Dims, n_keys: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("hook_resid_pre", vec![d.d_model]),
        ("ln1.hook_normalized", vec![d.d_model]),
        ("attn.hook_q", vec![d.n_heads, d.d_head]),
        ("attn.hook_k", vec![d.n_kv_heads, d.d_head]),
        ("attn.hook_v", vec![d.n_kv_heads, d.d_head]),
        ("attn.hook_rot_q", vec![d.n_heads, d.d_head]),
        ("attn.hook_rot_k", vec![d.n_kv_heads, d.d_head]),
        ("attn.hook_pattern", vec![d.n_heads, n_keys]),
        ("attn.hook_z", vec![d.n_heads, d.d_head]),
        ("attn.hook_result", vec![d.n_heads, d.d_model]),
        ("hook_attn_out", vec![d.d_model]),
        ("hook_resid_mid", vec![d.d_model]),
        ("ln2.hook_normalized", vec![d.d_model]),
        ("mlp.hook_post", vec![d.d_mlp]),
        ("hook_mlp_out", vec![d.d_model]),
        ("hook_resid_post", vec![d.d_model]),
    ]
}

/// Every site name with its per-token shape, plus `ln_final.hook_normalized`.
fn all_sites(d: &Dims, n_keys: usize) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> =
        (0..d.layers).flat_map(|l| block_hooks(d, n_keys).into_iter().map(move |(s, shape)| (format!("blocks.{l}.{s}"), shape))).collect();
    v.push(("ln_final.hook_normalized".into(), vec![d.d_model]));
    v
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts two capture files hold the same tensors with bit-identical values.
#[track_caller]
fn assert_same_tensors(what: &str, a: &CaptureFile, b: &CaptureFile) {
    assert_eq!(a.names(), b.names(), "{what}: tensor names differ");
    for (name, ta) in &a.tensors {
        let tb = b.get(name);
        assert_eq!((ta.dtype, &ta.shape), (tb.dtype, &tb.shape), "{what}: {name} dtype/shape");
        assert!(ta.data == tb.data, "{what}: {name} values differ");
    }
}

// ---------------------------------------------------------------------------------------------
// --sites all --positions all --logits: names, shapes, dtypes, values
// ---------------------------------------------------------------------------------------------

/// Captures everything for the fixture prompts and checks the whole contract and the goldens.
fn check_full_capture(family: &str) {
    let w = Work::new();
    let ids = w.ids_file(family);
    let f = w.capture(&fixture(family), "all.safetensors", &["--token-ids", &ids, "--sites", "all", "--positions", "all", "--logits"]);
    let d = dims(family);
    let prompts = prompt_ids(family);
    let t_total: usize = prompts.iter().map(Vec::len).sum();
    let max_len = prompts.iter().map(Vec::len).max().unwrap();

    // Names and shapes.
    let mut want: Vec<(String, Vec<usize>)> = all_sites(&d, max_len).into_iter().map(|(n, s)| (n, [vec![t_total], s].concat())).collect();
    want.push(("logits".into(), vec![t_total, d.vocab]));
    want.push(("prompt_offsets".into(), vec![prompts.len() + 1]));
    let want_names: BTreeSet<String> = want.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(f.names(), want_names, "{family}: tensor names");
    for (name, shape) in &want {
        let t = f.get(name);
        assert_eq!(&t.shape, shape, "{family}: {name} shape");
        let dtype = if name == "prompt_offsets" { Dtype::I64 } else { Dtype::F32 };
        assert_eq!(t.dtype, dtype, "{family}: {name} dtype");
    }

    // prompt_offsets: where each prompt starts.
    let mut offsets = vec![0.0f32];
    for p in &prompts {
        offsets.push(offsets.last().unwrap() + p.len() as f32);
    }
    assert_eq!(f.get("prompt_offsets").data, offsets, "{family}: prompt_offsets");

    // Pattern rows are zero past each prompt's length (and past the query: causal).
    for l in 0..d.layers {
        let pat = f.get(&format!("blocks.{l}.attn.hook_pattern"));
        for (p, prompt) in prompts.iter().enumerate() {
            for q in 0..prompt.len() {
                let row = offsets[p] as usize + q;
                for h in 0..d.n_heads {
                    let keys = &pat.data[(row * d.n_heads + h) * max_len..(row * d.n_heads + h + 1) * max_len];
                    assert!(keys[q + 1..].iter().all(|&v| v == 0.0), "{family}: layer {l} prompt {p} query {q} head {h}: non-zero past the query");
                    let sum: f32 = keys.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-4, "{family}: layer {l} prompt {p} query {q} head {h}: pattern row sums to {sum}");
                }
            }
        }
    }

    // Values: the Hugging Face goldens.
    let golden = read_tensors(&fixture(family).join("golden.safetensors"));
    let golden_names: BTreeSet<String> = golden.keys().cloned().collect();
    assert_eq!(f.names(), golden_names, "{family}: names differ from golden.safetensors");
    for (name, (shape, want)) in &golden {
        let t = f.get(name);
        assert_eq!(&t.shape, shape, "{family}: {name} shape vs golden");
        assert_close(&format!("{family}: {name}"), &t.data, want, F32_ATOL, F32_RTOL);
    }
}

#[test]
fn llama_full_capture_matches_contract_and_golden() {
    check_full_capture("llama");
}

#[test]
fn phi3_full_capture_matches_contract_and_golden() {
    check_full_capture("phi3");
}

#[test]
fn gemma2_full_capture_matches_contract_and_golden() {
    check_full_capture("gemma2");
}

#[test]
fn batch_size_does_not_change_the_output() {
    // Patterns keep the key axis of the longest prompt overall, whatever the batching.
    let w = Work::new();
    let ids = w.ids_file("llama");
    let args = ["--token-ids", &ids, "--sites", "all", "--positions", "all", "--logits"];
    let a = w.capture(&fixture("llama"), "a.safetensors", &args);
    let b = w.capture(&fixture("llama"), "b.safetensors", &[&args[..], &["--batch-size", "1"]].concat());
    assert_eq!(a.names(), b.names());
    for (name, ta) in &a.tensors {
        let tb = b.get(name);
        assert_eq!(ta.shape, tb.shape, "{name}: shape with --batch-size 1");
        assert_close(&format!("{name} with --batch-size 1"), &tb.data, &ta.data, 1e-5, 1e-5);
    }
}

#[test]
fn the_same_capture_writes_the_same_bytes() {
    // Two processes (each with its own hash seed) write byte-identical files: the header's key
    // order comes from the inputs, not from a HashMap (the crate's writer gave a different
    // metadata order from run to run).
    let w = Work::new();
    let ids = w.ids_file("llama");
    for dtype in ["f32", "bf16"] {
        let args = ["--token-ids", &ids, "--sites", "resid_post,pattern", "--positions", "all", "--logits", "--dtype", dtype];
        let (a, b) = (format!("a_{dtype}.safetensors"), format!("b_{dtype}.safetensors"));
        w.capture(&fixture("llama"), &a, &args);
        w.capture(&fixture("llama"), &b, &args);
        let (a, b) = (std::fs::read(w.path(&a)).unwrap(), std::fs::read(w.path(&b)).unwrap());
        assert!(a == b, "--dtype {dtype}: two runs of the same capture wrote different bytes ({} vs {} bytes)", a.len(), b.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Position lists
// ---------------------------------------------------------------------------------------------

fn check_position_list(family: &str) {
    let w = Work::new();
    let ids = w.ids_file(family);
    let model = fixture(family);
    let all = w.capture(&model, "all.safetensors", &["--token-ids", &ids, "--sites", "all", "--positions", "all", "--logits"]);
    let sel = w.capture(&model, "sel.safetensors", &["--token-ids", &ids, "--sites", "all", "--positions", "-1,0", "--logits"]);
    let prompts = prompt_ids(family);
    let n = prompts.len();
    let offsets: Vec<usize> = all.get("prompt_offsets").data.iter().map(|&v| v as usize).collect();

    let mut want_names = all.names();
    want_names.remove("prompt_offsets");
    assert_eq!(sel.names(), want_names, "{family}: a position list has no prompt_offsets, the same sites and logits");
    for (name, t) in &sel.tensors {
        let full = all.get(name);
        let tail = &full.shape[1..];
        assert_eq!(t.shape, [&[n, 2][..], tail].concat(), "{family}: {name} shape with --positions -1,0");
        assert_eq!(t.dtype, Dtype::F32);
        let w = full.row_width(1);
        let mut want = Vec::with_capacity(n * 2 * w);
        for (p, prompt) in prompts.iter().enumerate() {
            for row in [offsets[p] + prompt.len() - 1, offsets[p]] {
                want.extend_from_slice(&full.data[row * w..(row + 1) * w]);
            }
        }
        // The same forward; logits are computed for fewer rows (another GEMM shape).
        if name == "logits" {
            assert_close(&format!("{family}: {name} rows -1,0"), &t.data, &want, 1e-6, 1e-6);
        } else {
            assert!(t.data == want, "{family}: {name} at -1,0 differs from the rows of the all-positions capture");
        }
    }
    assert_eq!(sel.metadata["positions"], "-1,0");
}

#[test]
fn position_list_equals_rows_of_all_positions() {
    check_position_list("llama");
    check_position_list("phi3");
}

// ---------------------------------------------------------------------------------------------
// --dtype bf16, metadata
// ---------------------------------------------------------------------------------------------

#[test]
fn bf16_output_is_the_f32_capture_rounded() {
    let w = Work::new();
    let ids = w.ids_file("llama");
    let model = fixture("llama");
    let args = ["--token-ids", &ids, "--sites", "all", "--positions", "all", "--logits"];
    let f32s = w.capture(&model, "f32.safetensors", &args);
    let bf16s = w.capture(&model, "bf16.safetensors", &[&args[..], &["--dtype", "bf16"]].concat());
    assert_eq!(f32s.names(), bf16s.names());
    for (name, t) in &bf16s.tensors {
        let full = f32s.get(name);
        assert_eq!(t.shape, full.shape, "{name}");
        if name == "prompt_offsets" {
            assert_eq!(t.dtype, Dtype::I64, "prompt_offsets stays i64");
            assert_eq!(t.data, full.data);
            continue;
        }
        assert_eq!(t.dtype, Dtype::BF16, "{name} dtype with --dtype bf16");
        let rounded: Vec<f32> = full.data.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert!(t.data == rounded, "{name}: bf16 values are not the f32 capture rounded to bf16");
    }
    assert_eq!(bf16s.metadata.get("dtype").map(String::as_str), Some("bf16"));
    assert_eq!(f32s.metadata.get("dtype").map(String::as_str), Some("f32"));
}

#[test]
fn metadata_records_provenance() {
    let w = Work::new();
    let ids = w.ids_file("llama");
    let model = fixture("llama");
    let f = w.capture(&model, "m.safetensors", &["--token-ids", &ids, "--sites", "resid_post", "--positions", "all"]);
    let config_hash = sha256_hex(&std::fs::read(model.join("config.json")).unwrap());
    assert_eq!(f.metadata.get("model").map(String::as_str), Some(model.to_str().unwrap()), "{:?}", f.metadata);
    assert_eq!(f.metadata.get("config_sha256"), Some(&config_hash), "{:?}", f.metadata);
    assert_eq!(f.metadata.get("patchbay_version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(f.metadata.get("positions").map(String::as_str), Some("all"));
    let g = w.capture(&model, "m2.safetensors", &["--token-ids", &ids, "--sites", "resid_post", "--positions", "-2, 1"]);
    assert_eq!(g.metadata.get("positions").map(String::as_str), Some("-2,1"));
    // The prompts' token ids and strings label positions and pattern axes.
    let want: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&ids).unwrap()).unwrap();
    let got: Vec<Vec<u32>> = serde_json::from_str(&g.metadata["token_ids"]).unwrap();
    assert_eq!(got, want);
    let tok = patchbay::model::tokenizer::PromptTokenizer::load(&model).unwrap();
    let strings: Vec<Vec<String>> = serde_json::from_str(&g.metadata["tokens"]).unwrap();
    assert_eq!(strings.iter().map(Vec::len).collect::<Vec<_>>(), want.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(strings[0][1], tok.id_to_token(want[0][1]).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Prompt inputs: --text, --prompts, --chat == --token-ids with the recorded ids
// ---------------------------------------------------------------------------------------------

fn check_text_inputs(family: &str) {
    let w = Work::new();
    let model = fixture(family);
    let fx = fixture_prompts(family);
    let texts: Vec<String> = serde_json::from_value(fx["texts"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = prompt_ids(family);
    let (texts, ids) = (&texts[..2], &ids[..2]);
    let common = ["--sites", "resid_post,blocks.0.attn.hook_pattern", "--positions", "all", "--logits"];

    let ids_file = w.write("ids.json", &serde_json::to_string(ids).unwrap());
    let by_ids = w.capture(&model, "ids.safetensors", &[&["--token-ids", ids_file.as_str()][..], &common].concat());
    let by_text = w.capture(&model, "text.safetensors", &[&["--text", &texts[0], "--text", &texts[1]][..], &common].concat());
    assert_same_tensors(&format!("{family}: --text vs --token-ids"), &by_text, &by_ids);
    let by_text2 = w.capture(&model, "text2.safetensors", &[&["--text", &texts[0], &texts[1]][..], &common].concat());
    assert_same_tensors(&format!("{family}: --text A B vs --token-ids"), &by_text2, &by_ids);

    let jsonl: String = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
    let jsonl_file = w.write("prompts.jsonl", &jsonl);
    let by_jsonl = w.capture(&model, "jsonl.safetensors", &[&["--prompts", jsonl_file.as_str()][..], &common].concat());
    assert_same_tensors(&format!("{family}: --prompts vs --token-ids"), &by_jsonl, &by_ids);

    // Chat: the generator's messages through the template == its recorded chat_ids.
    let messages = fx["chat_messages"].as_array().unwrap();
    let chat_ids: Vec<u32> = serde_json::from_value(fx["chat_ids"].clone()).unwrap();
    let chat_ids_file = w.write("chat_ids.json", &serde_json::to_string(&[&chat_ids]).unwrap());
    let want = w.capture(&model, "chat_ids.safetensors", &[&["--token-ids", chat_ids_file.as_str()][..], &common].concat());
    let msg_file = w.write("chat.jsonl", &(serde_json::json!({ "messages": messages }).to_string() + "\n"));
    let by_messages = w.capture(&model, "chat_msgs.safetensors", &[&["--prompts", msg_file.as_str()][..], &common].concat());
    assert_same_tensors(&format!("{family}: --prompts messages vs chat_ids"), &by_messages, &want);
    assert_eq!(messages.len(), 1, "{family}: chat_messages must be one user message for the --chat --text check");
    assert_eq!(messages[0]["role"], "user");
    let content = messages[0]["content"].as_str().unwrap();
    let by_chat = w.capture(&model, "chat.safetensors", &[&["--chat", "--text", content][..], &common].concat());
    assert_same_tensors(&format!("{family}: --chat --text vs chat_ids"), &by_chat, &want);
    // --chat also wraps {"text"} lines of --prompts.
    let chat_jsonl = w.write("chat_text.jsonl", &(serde_json::json!({ "text": content }).to_string() + "\n"));
    let by_chat_jsonl = w.capture(&model, "chat_jsonl.safetensors", &[&["--chat", "--prompts", chat_jsonl.as_str()][..], &common].concat());
    assert_same_tensors(&format!("{family}: --chat --prompts text vs chat_ids"), &by_chat_jsonl, &want);
}

#[test]
fn text_prompts_and_chat_equal_token_ids_llama() {
    check_text_inputs("llama");
}

#[test]
fn text_prompts_and_chat_equal_token_ids_phi3() {
    check_text_inputs("phi3");
}

// ---------------------------------------------------------------------------------------------
// Site specs
// ---------------------------------------------------------------------------------------------

fn capture_names(w: &Work, sites: &str) -> BTreeSet<String> {
    let ids = w.ids_file("llama");
    let out = format!("sites_{}.safetensors", sha256_hex(sites.as_bytes()));
    let f = w.capture(&fixture("llama"), &out, &["--token-ids", &ids, "--sites", sites, "--positions", "-1"]);
    f.names()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn site_specs_select_the_right_tensors() {
    let w = Work::new();
    let d = dims("llama");
    assert_eq!(d.layers, 2, "the llama fixture has 2 layers (names below)");
    // A short name is every layer.
    assert_eq!(capture_names(&w, "resid_post"), set(&["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]));
    assert_eq!(capture_names(&w, "final_norm"), set(&["ln_final.hook_normalized"]));
    // A glob.
    assert_eq!(capture_names(&w, "blocks.*.hook_attn_out"), set(&["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]));
    assert_eq!(capture_names(&w, "blocks.1.attn.hook_*_q"), set(&["blocks.1.attn.hook_rot_q"]));
    // Duplicates are removed.
    assert_eq!(
        capture_names(&w, "resid_post, blocks.1.hook_resid_post,blocks.*.hook_resid_post,z,blocks.0.attn.hook_z"),
        set(&["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"])
    );
    // `all` is the catalogue.
    let all: BTreeSet<String> = all_sites(&d, 0).into_iter().map(|(n, _)| n).collect();
    assert_eq!(capture_names(&w, "all"), all);
    assert_eq!(capture_names(&w, "all,resid_pre"), all);
}

#[test]
fn sites_come_out_in_forward_order() {
    let model = Model::load(&fixture("llama")).unwrap();
    let spec = "ln_final.hook_normalized,blocks.1.hook_resid_pre,mlp_post,blocks.0.attn.hook_pattern,blocks.0.hook_resid_pre,blocks.0.hook_resid_pre";
    let sites = Site::parse_spec(spec, &model.cfg).unwrap();
    let names: Vec<String> = sites.iter().map(Site::to_string).collect();
    let want = [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_pattern",
        "blocks.0.mlp.hook_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.mlp.hook_post",
        "ln_final.hook_normalized",
    ];
    assert_eq!(names, want);
    // The tensors of a capture follow the same order, then logits.
    let spec = CaptureSpec { sites, positions: Positions::List(vec![-1]), logits: true, dtype: OutDtype::F32, batch_size: 8, interventions: Vec::new() };
    let out = capture(&model, &prompt_ids("llama"), &spec, &ProgressBar::hidden()).unwrap();
    let got: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, [&want[..], &["logits"]].concat());
}

// ---------------------------------------------------------------------------------------------
// inspect
// ---------------------------------------------------------------------------------------------

/// Sum of the element counts of every tensor stored in the checkpoint.
fn stored_parameters(family: &str) -> (usize, BTreeSet<String>) {
    let bytes = std::fs::read(fixture(family).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names().into_iter().map(String::from).collect();
    (st.iter().map(|(_, v)| v.shape().iter().product::<usize>()).sum(), names)
}

fn inspect_json(family: &str) -> Value {
    let (code, stdout, stderr) = patchbay(&["inspect", "--model", fixture(family).to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{family}: inspect --json failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{family}: inspect --json is not JSON ({e}):\n{stdout}"))
}

#[test]
fn inspect_json_llama() {
    let j = inspect_json("llama");
    let d = dims("llama");
    let (params, names) = stored_parameters("llama");
    assert!(!names.contains("lm_head.weight"), "the llama fixture is tied: no lm_head stored");
    assert_eq!(j["parameters"], params, "parameters = every stored element, tied embedding once");
    assert_eq!(j["tied_embeddings"], true);
    assert_eq!(j["family"], "llama");
    assert_eq!(j["model_type"], "llama");
    assert_eq!(j["n_layers"], d.layers);
    assert_eq!(j["d_model"], d.d_model);
    assert_eq!(j["n_heads"], d.n_heads);
    assert_eq!(j["n_kv_heads"], d.n_kv_heads);
    assert_eq!(j["d_head"], d.d_head);
    assert_eq!(j["d_mlp"], d.d_mlp);
    assert_eq!(j["vocab"], d.vocab);
    assert_eq!(j["dtype"], "bfloat16");
    assert_eq!(j["rope_type"], "llama3");
    assert_eq!(j["rope_theta"], 500000.0);
    let config_hash = sha256_hex(&std::fs::read(fixture("llama").join("config.json")).unwrap());
    assert_eq!(j["config_sha256"], config_hash);
    // The site table: one entry per kind, in forward order.
    let sites: Vec<&str> = j["sites"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    let want: Vec<String> = block_hooks(&d, 0).iter().map(|(s, _)| format!("blocks.0.{s}")).chain(["ln_final.hook_normalized".to_string()]).collect();
    assert_eq!(sites, want);
}

#[test]
fn inspect_json_every_family() {
    for family in FAMILIES {
        let j = inspect_json(family);
        let (params, names) = stored_parameters(family);
        assert_eq!(j["parameters"], params, "{family}: parameters");
        assert_eq!(j["tied_embeddings"], !names.contains("lm_head.weight"), "{family}: tied iff no lm_head stored");
        assert_eq!(j["family"], family);
        assert_eq!(j["dtype"], "bfloat16", "{family}");
        let rope = match family {
            "llama" => "llama3",
            "phi3" => "longrope",
            _ => "default",
        };
        assert_eq!(j["rope_type"], rope, "{family}: rope_type");
        let d = dims(family);
        assert_eq!((j["n_layers"].as_u64(), j["n_kv_heads"].as_u64(), j["d_head"].as_u64()), (Some(d.layers as u64), Some(d.n_kv_heads as u64), Some(d.d_head as u64)), "{family}");
    }
}

#[test]
fn inspect_text() {
    for family in ["llama", "phi3", "gemma2"] {
        let (code, stdout, stderr) = patchbay(&["inspect", "--model", fixture(family).to_str().unwrap()]);
        assert_eq!(code, 0, "{family}: inspect failed: {stderr}");
        let (params, _) = stored_parameters(family);
        for want in [format!("family       {family}"), format!("parameters   {params}"), "blocks.L.attn.hook_z".into(), "ln_final.hook_normalized".into()] {
            assert!(stdout.contains(&want), "{family}: inspect output lacks `{want}`:\n{stdout}");
        }
        // Plain words for a reader, not Rust debug text.
        assert!(!stdout.contains("Some(") && !stdout.contains("None") && !stdout.contains("[3"), "{family}: debug text in\n{stdout}");
        assert!(stdout.contains("context      ") && stdout.contains("max_position_embeddings"), "{stdout}");
    }
    let (_, stdout, _) = patchbay(&["inspect", "--model", fixture("llama").to_str().unwrap()]);
    assert!(stdout.contains("bos / eos    376 / 377, 380") && stdout.contains("temperature unset"), "{stdout}");
    let (_, stdout, _) = patchbay(&["inspect", "--model", fixture("phi3").to_str().unwrap()]);
    assert!(stdout.contains("longrope"), "{stdout}");
    let (_, stdout, _) = patchbay(&["inspect", "--model", fixture("gemma2").to_str().unwrap()]);
    assert!(stdout.contains("windows"), "gemma2 has sliding windows: {stdout}");
}

// ---------------------------------------------------------------------------------------------
// Atomic output
// ---------------------------------------------------------------------------------------------

fn dir_listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

#[test]
fn output_appears_atomically() {
    let w = Work::new();
    let ids = w.ids_file("llama");
    let out_dir = w.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("acts.safetensors");
    let model = fixture("llama");
    let args = ["capture", "--model", model.to_str().unwrap(), "--token-ids", &ids, "--sites", "all", "--positions", "all", "--out", out.to_str().unwrap(), "--quiet"];
    let (code, _, stderr) = patchbay(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(dir_listing(&out_dir), set(&["acts.safetensors"]), "only the final file may remain");
    let first = CaptureFile::read(&out);
    // A stale .partial from a killed run, and an existing output: both replaced.
    std::fs::write(out_dir.join("acts.safetensors.partial"), b"stale").unwrap();
    std::fs::write(&out, b"old").unwrap();
    let (code, _, stderr) = patchbay(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(dir_listing(&out_dir), set(&["acts.safetensors"]));
    // The same tensors and metadata (not necessarily the same bytes: the safetensors crate
    // writes the metadata map in HashMap order).
    let second = CaptureFile::read(&out);
    assert_same_tensors("rerun", &second, &first);
    assert_eq!(second.metadata, first.metadata, "rerun metadata");
    // Without --quiet it reports what it wrote on stderr (and still no .partial).
    let (code, _, stderr) = patchbay(&args[..args.len() - 1]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("wrote") && stderr.contains("3 prompts"), "{stderr}");
    assert_eq!(dir_listing(&out_dir), set(&["acts.safetensors"]));
}

/// `capture --device emu` (the CUDA kernels on the emulated device) reproduces the Hugging Face
/// goldens within the bf16 forward tolerances, and records the device in the metadata.
#[test]
fn capture_on_the_emulated_device_matches_hf() {
    let w = Work::new();
    for family in ["llama", "olmo2"] {
        let ids = w.ids_file(family);
        let f = w.capture(&fixture(family), &format!("{family}_emu.safetensors"), &["--token-ids", &ids, "--sites", "all", "--positions", "all", "--logits", "--device", "emu"]);
        assert!(f.metadata["device"].starts_with("emu"), "{family}: device metadata {}", f.metadata["device"]);
        let golden = read_tensors(&fixture(family).join("golden.safetensors"));
        let got = read_tensors(&w.path(&format!("{family}_emu.safetensors")));
        for (name, (_, want)) in &golden {
            assert_forward_close(&format!("{family} --device emu: {name}"), &got[name].1, want);
        }
        assert_eq!(f.tensors.len(), golden.len());
    }
}

/// `tokenize` shows the ids every command runs (here: the fixture's recorded ids of its texts,
/// plain and chat) with their strings, as text and as JSON.
#[test]
fn tokenize_shows_the_ids_the_commands_run() {
    for family in ["llama", "phi3"] {
        let model = fixture(family);
        let fx = fixture_prompts(family);
        let texts: Vec<String> = serde_json::from_value(fx["texts"].clone()).unwrap();
        let ids = prompt_ids(family);
        let (code, stdout, stderr) = patchbay(&["tokenize", "--model", model.to_str().unwrap(), "--text", &texts[0], "--text", &texts[1], "--json"]);
        assert_eq!(code, 0, "{stderr}");
        let tok = patchbay::model::tokenizer::PromptTokenizer::load(&model).unwrap();
        for (i, line) in stdout.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let got: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
            assert_eq!(got, ids[i], "{family}: prompt {i}");
            let strings: Vec<String> = serde_json::from_value(v["tokens"].clone()).unwrap();
            assert_eq!(strings, got.iter().map(|&t| tok.id_to_token(t).unwrap()).collect::<Vec<_>>());
        }
        assert_eq!(stdout.lines().count(), 2);
        let (code, text, _) = patchbay(&["tokenize", "--model", model.to_str().unwrap(), "--text", &texts[0]]);
        assert_eq!(code, 0);
        assert!(text.starts_with(&format!("prompt 0: {} tokens\n", ids[0].len())), "{text}");
        assert!(text.contains(&format!("{:>7}  {:?}", ids[0][1], tok.id_to_token(ids[0][1]).unwrap())), "{text}");
    }
}
