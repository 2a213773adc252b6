//! GGUF loading (src/model/gguf.rs): dequantization against the reference implementation,
//! fixture models written as GGUF give the fixtures' outputs, SmolLM2-135M-Instruct from its real
//! GGUF matches transformers' GGUF loader, and hostile files are refused with one line.
//! Goldens: tests/fixtures/gguf/, made by scripts/golden/make_gguf_goldens.py.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use indicatif::ProgressBar;
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::io::{OutDtype, OutTensor};
use patchbay::model::Model;
use patchbay::model::config::ModelConfig;
use patchbay::model::gguf::{GgmlType, GgufFile, dequantize};
use patchbay::model::tokenizer::{ChatMessage, PromptTokenizer};
use patchbay::sites::{Positions, Site};
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer (v3, alignment 32), for fixtures and hostile files.

enum Kv {
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

struct Tensor {
    name: String,
    /// Row-major shape.
    shape: Vec<usize>,
    ty: u32,
    data: Vec<u8>,
}

/// Where the writer put the fields the hostile tests overwrite.
#[derive(Default)]
struct Layout {
    /// Per metadata entry: the byte of its key length.
    key_len_at: Vec<usize>,
    /// Per array entry: the byte of its element count.
    array_len_at: Vec<usize>,
    /// Per tensor: the bytes of its type and data offset fields.
    type_at: Vec<usize>,
    offset_at: Vec<usize>,
    data_start: usize,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_gguf(kvs: &[(String, Kv)], tensors: &[Tensor]) -> (Vec<u8>, Layout) {
    let mut out = b"GGUF".to_vec();
    let mut lay = Layout::default();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (key, v) in kvs {
        lay.key_len_at.push(out.len());
        put_str(&mut out, key);
        match v {
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::U64(x) => {
                out.extend(10u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(*b as u8);
            }
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Kv::Strs(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                lay.array_len_at.push(out.len());
                out.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|s| put_str(&mut out, s));
            }
            Kv::I32s(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                lay.array_len_at.push(out.len());
                out.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        t.shape.iter().rev().for_each(|&d| out.extend((d as u64).to_le_bytes()));
        lay.type_at.push(out.len());
        out.extend(t.ty.to_le_bytes());
        lay.offset_at.push(out.len());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    lay.data_start = out.len();
    for (t, o) in tensors.iter().zip(offsets) {
        out.resize(lay.data_start + o, 0);
        out.extend(&t.data);
    }
    (out, lay)
}

// ---------------------------------------------------------------------------------------------
// Dequantization.

/// Every supported type, dequantized, is bit-identical to the gguf package's reference values
/// (random blocks; the reference file is also a file of the reference writer, GGUFWriter).
#[test]
fn dequantization_matches_the_reference() {
    let file = GgufFile::open(&fixtures_dir().join("gguf").join("dequant.gguf")).unwrap();
    for ty in GgmlType::ALL {
        let t = file.tensor(ty.name()).unwrap_or_else(|| panic!("dequant.gguf lacks {}", ty.name()));
        assert_eq!(t.ty, ty);
        let want = file.tensor(&format!("{}.expected", ty.name())).unwrap();
        assert_eq!(t.shape, want.shape, "{}", ty.name());
        let (got, want) = (file.tensor_f32(t), file.tensor_f32(want));
        assert!(want.iter().any(|&x| x != 0.0), "{}: an all-zero reference tests nothing", ty.name());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} element {i}: {g} != reference {w}", ty.name());
        }
        // Row by row gives the same as the whole tensor (rows are whole blocks).
        let cols = t.shape[1];
        let row_bytes = file.tensor_bytes(t).len() / t.shape[0];
        let mut row = vec![0.0; cols];
        dequantize(ty, &file.tensor_bytes(t)[row_bytes..], &mut row);
        assert_eq!(row, got[cols..], "{} row 1", ty.name());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture models written as GGUF.

/// llama.cpp's name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let fixed = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or_else(|| panic!("unexpected tensor {hf}"));
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, suffix) = rest.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected tensor part {other}"),
    };
    format!("blk.{layer}.{g}.{suffix}")
}

/// convert_hf_to_gguf's permutation of Llama's q/k rows: GGUF row h*d + 2i + j holds Hugging
/// Face row h*d + j*d/2 + i.
fn permute_rows(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for g in 0..rows {
        let (h, k) = (g / d, g % d);
        let hf = h * d + (k % 2) * (d / 2) + k / 2;
        out[g * row_bytes..(g + 1) * row_bytes].copy_from_slice(&data[hf * row_bytes..(hf + 1) * row_bytes]);
    }
    out
}

/// ggml's quantize_row_q8_0 (round to nearest, d = max|x| / 127 stored as f16).
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// The fixture `family` as a GGUF file, as convert_hf_to_gguf writes one: llama.cpp names and
/// metadata, Llama's q/k permuted, Llama 3 rope scaling as `rope_freqs.weight`, the tokenizer
/// as `tokenizer.ggml.*` (a byte-level BPE: tokens, merges, token types, special ids). With
/// `q8_0`, the matrices are quantized to Q8_0 (the vectors stay as stored).
fn fixture_gguf(family: &str, q8_0: bool) -> Vec<u8> {
    let dir = fixture(family);
    let cfg = ModelConfig::load(&dir).unwrap();
    let arch = family;
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let values = read_tensors(&dir.join("model.safetensors"));
    let mut tensors = Vec::new();
    for (name, v) in st.iter() {
        let quantize = q8_0 && v.shape().len() == 2;
        let ty = match v.dtype() {
            _ if quantize => 8,
            safetensors::Dtype::F32 => 0,
            safetensors::Dtype::F16 => 1,
            safetensors::Dtype::BF16 => 30,
            other => panic!("{name}: {other:?}"),
        };
        let heads = if family == "llama" && name.contains("q_proj") {
            Some(cfg.n_heads)
        } else if family == "llama" && name.contains("k_proj") {
            Some(cfg.n_kv_heads)
        } else {
            None
        };
        let data = if quantize { quantize_q8_0(&values[name].1) } else { v.data().to_vec() };
        let data = match heads {
            Some(h) => permute_rows(&data, v.shape()[0], h),
            None => data,
        };
        tensors.push(Tensor { name: gguf_name(name), shape: v.shape().to_vec(), ty, data });
    }
    if cfg.rope_scaling.name() != "default" {
        // inv_freq = base / factor, as llama.cpp applies rope_freqs.
        let (scaled, _) = cfg.rope_freqs(1);
        let factors: Vec<f32> = (0..cfg.rotary_dim / 2)
            .map(|i| (1.0 / (cfg.rope_theta as f64).powf((2 * i) as f64 / cfg.rotary_dim as f64) / scaled[i] as f64) as f32)
            .collect();
        tensors.push(Tensor { name: "rope_freqs.weight".into(), shape: vec![factors.len()], ty: 0, data: factors.iter().flat_map(|f| f.to_le_bytes()).collect() });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let tok_cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let mut tokens: Vec<String> = (0..cfg.vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; cfg.vocab_size]; // UNUSED
    for (t, id) in tok["model"]["vocab"].as_object().unwrap() {
        let id = id.as_u64().unwrap() as usize;
        tokens[id] = t.clone();
        types[id] = 1; // NORMAL
    }
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = if a["special"].as_bool().unwrap() { 3 } else { 4 };
    }
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    let id_of = |key: &str| tok_cfg[key].as_str().map(|t| tokens.iter().position(|x| x == t).unwrap() as u32);
    let arch_kv = |k: &str, v: Kv| (format!("{arch}.{k}"), v);
    let kv = |k: &str, v: Kv| (k.to_string(), v);
    let mut kvs = vec![
        kv("general.architecture", Kv::Str(arch.into())),
        arch_kv("block_count", Kv::U32(cfg.n_layers as u32)),
        arch_kv("context_length", Kv::U32(cfg.max_position as u32)),
        arch_kv("embedding_length", Kv::U32(cfg.d_model as u32)),
        arch_kv("feed_forward_length", Kv::U32(cfg.d_mlp as u32)),
        arch_kv("attention.head_count", Kv::U32(cfg.n_heads as u32)),
        arch_kv("attention.head_count_kv", Kv::U32(cfg.n_kv_heads as u32)),
        arch_kv("attention.key_length", Kv::U32(cfg.d_head as u32)),
        arch_kv("attention.value_length", Kv::U32(cfg.d_head as u32)),
        arch_kv("attention.layer_norm_rms_epsilon", Kv::F32(cfg.norm_eps)),
        arch_kv("rope.freq_base", Kv::F32(cfg.rope_theta)),
        arch_kv("rope.dimension_count", Kv::U32(cfg.rotary_dim as u32)),
        kv("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        kv("tokenizer.ggml.pre", Kv::Str("default".into())),
        kv("tokenizer.ggml.tokens", Kv::Strs(tokens.clone())),
        kv("tokenizer.ggml.token_type", Kv::I32s(types)),
        kv("tokenizer.ggml.merges", Kv::Strs(merges)),
        kv("tokenizer.ggml.add_bos_token", Kv::Bool(tok_cfg["add_bos_token"].as_bool().unwrap_or(false))),
        kv("tokenizer.chat_template", Kv::Str(tok_cfg["chat_template"].as_str().unwrap().into())),
    ];
    if let Some(id) = id_of("bos_token") {
        kvs.push(kv("tokenizer.ggml.bos_token_id", Kv::U32(id)));
    }
    if let Some(id) = id_of("eos_token") {
        kvs.push(kv("tokenizer.ggml.eos_token_id", Kv::U32(id)));
    }
    write_gguf(&kvs, &tensors).0
}

fn outputs(model: &Model, prompts: &[Vec<u32>]) -> HashMap<String, Vec<f32>> {
    let spec = CaptureSpec { sites: Site::all(&model.cfg), positions: Positions::All, logits: true, dtype: OutDtype::F32, batch_size: 2, interventions: Vec::new() };
    capture(model, prompts, &spec, &ProgressBar::hidden())
        .unwrap()
        .into_iter()
        .map(|(name, t)| match t {
            OutTensor::Float { data, .. } => (name, data),
            OutTensor::I64 { data, .. } => (name, data.iter().map(|&v| v as f32).collect()),
        })
        .collect()
}

/// A fixture written as GGUF (the path a user gives: the file, or a directory holding it) loads
/// to the same config, the same activations at every site and the same logits, and its tokenizer
/// and chat template give the fixture tokenizer's ids.
fn check_fixture(family: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(format!("{family}.gguf"));
    std::fs::write(&path, fixture_gguf(family, false)).unwrap();
    let hf = Model::load(&fixture(family)).unwrap();
    for model_path in [path.as_path(), tmp.path()] {
        let g = Model::load(model_path).unwrap();
        assert_eq!(g.dir, path);
        let (a, b) = (&g.cfg, &hf.cfg);
        assert_eq!((a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.d_head, a.d_mlp, a.vocab_size), (b.n_layers, b.d_model, b.n_heads, b.n_kv_heads, b.d_head, b.d_mlp, b.vocab_size));
        assert_eq!((a.qkv_bias, a.tie_embeddings, a.rotary_dim, a.bos_token_id), (b.qkv_bias, b.tie_embeddings, b.rotary_dim, b.bos_token_id));
        assert_eq!(g.weights.n_params, hf.weights.n_params);
    }
    let g = Model::load(&path).unwrap();
    let prompts = prompt_ids(family);
    let (got, want) = (outputs(&g, &prompts), outputs(&hf, &prompts));
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f32;
    for (name, w) in &want {
        worst = worst.max(assert_close(&format!("{family} gguf: {name}"), &got[name], w, F32_ATOL, F32_RTOL));
    }
    println!("{family}: GGUF vs Hugging Face directory, max abs error {worst:.3e} over {} tensors", want.len());

    let (gt, ht) = (PromptTokenizer::load(&path).unwrap(), PromptTokenizer::load(&fixture(family)).unwrap());
    for text in ["hello world. be nice", "hi there, user", " system  assistant\nhello"] {
        assert_eq!(gt.encode(text).unwrap(), ht.encode(text).unwrap(), "{family}: {text:?}");
    }
    let msgs = [ChatMessage::new("user", "hello there")];
    assert_eq!(gt.encode_chat(&msgs, true).unwrap(), ht.encode_chat(&msgs, true).unwrap(), "{family}: chat");
    assert_eq!(gt.eos_token(), ht.eos_token());
}

/// The fixtures with Q8_0 matrices give what their directories give with the weights replaced by
/// the dequantized values rounded to f16 (what the GGUF path expands them to): quantized rows
/// are permuted (Llama q/k), named and expanded right. The dequantizer itself is checked against
/// the reference above.
#[test]
fn q8_0_fixtures_as_gguf() {
    for family in ["llama", "qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q8.gguf");
        std::fs::write(&path, fixture_gguf(family, true)).unwrap();
        let dir = tmp.path().join("hf");
        copy_checkpoint(&fixture(family), &dir, safetensors::Dtype::F32, 1);
        let mut tensors: Vec<(String, (Vec<usize>, Vec<f32>))> = read_tensors(&fixture(family).join("model.safetensors")).into_iter().collect();
        for (_, (shape, data)) in tensors.iter_mut().filter(|(_, (shape, _))| shape.len() == 2) {
            let q = quantize_q8_0(data);
            dequantize(GgmlType::Q8_0, &q, data);
            data.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            assert_eq!(shape[1] % 32, 0);
        }
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors.iter().map(|(n, (s, d))| (n.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = encoded.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

        let g = Model::load(&path).unwrap();
        assert_eq!(g.weights.layers[0].q.w.dtype, patchbay::model::config::DType::F16);
        let prompts = prompt_ids(family);
        let (got, want) = (outputs(&g, &prompts), outputs(&Model::load(&dir).unwrap(), &prompts));
        let original = outputs(&Model::load(&fixture(family)).unwrap(), &prompts);
        for (name, w) in &want {
            assert_close(&format!("{family} q8_0 gguf: {name}"), &got[name], w, F32_ATOL, F32_RTOL);
        }
        // Quantization moved the logits: the comparison above is not one of identical models.
        let moved = want["logits"].iter().zip(&original["logits"]).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved > 1e-3, "{family}: Q8_0 changed the logits by only {moved}");
    }
}

#[test]
fn llama_fixture_as_gguf() {
    check_fixture("llama");
}

#[test]
fn qwen2_fixture_as_gguf() {
    check_fixture("qwen2");
}

// ---------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct, the real GGUF (scripts/fetch-smollm2.sh).

/// Logits at the last position of SmolLM2 from the Q4_1 GGUF against transformers' GGUF loader
/// (float32), for a plain, a chat and a non-ASCII prompt; token ids exactly.
///
/// Tolerance: transformers keeps the dequantized weights in f32, patchbay expands them to f16
/// (11-bit mantissa, relative rounding 2^-11 per weight); over 30 layers that moves logits of
/// magnitude ~20-30 by up to ~0.015 (measured). 0.05 absolute leaves room and still fails for
/// any wrong token, permutation or dequantization (those move logits by whole units).
#[test]
fn smollm2_matches_transformers() {
    let Some(path) = smollm2_path() else { return };
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures_dir().join("gguf/smollm2_golden.json")).unwrap()).unwrap();
    let model = Model::load(&path).unwrap();
    let tok = PromptTokenizer::load(&path).unwrap();
    for (key, case) in golden["cases"].as_object().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = if case["chat"].as_bool().unwrap() { tok.encode_chat(&[ChatMessage::new("user", text)], true).unwrap() } else { tok.encode(text).unwrap() };
        let want_ids: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{key}: token ids");
        let spec = CaptureSpec { sites: vec![], positions: Positions::parse("-1").unwrap(), logits: true, dtype: OutDtype::F32, batch_size: 1, interventions: Vec::new() };
        let out = capture(&model, &[ids], &spec, &ProgressBar::hidden()).unwrap();
        let logits = match &out.iter().find(|(n, _)| n == "logits").unwrap().1 {
            OutTensor::Float { data, .. } => data.clone(),
            OutTensor::I64 { .. } => panic!("logits are float"),
        };
        let top: Vec<usize> = serde_json::from_value(case["top_ids"].clone()).unwrap();
        let top_logits: Vec<f32> = serde_json::from_value(case["top_logits"].clone()).unwrap();
        let first: Vec<f32> = serde_json::from_value(case["first_logits"].clone()).unwrap();
        let got_top: Vec<f32> = top.iter().map(|&i| logits[i]).collect();
        let e1 = assert_close(&format!("{key}: top logits"), &got_top, &top_logits, 0.05, 0.0);
        let e2 = assert_close(&format!("{key}: first logits"), &logits[..first.len()], &first, 0.05, 0.0);
        let argmax = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(argmax, top[0], "{key}: top token");
        println!("{key}: {} tokens, max abs logit error {:.2e}", want_ids.len(), e1.max(e2));
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile files.

/// A small valid file: two metadata entries (one an array) and two tensors.
fn small_file() -> (Vec<u8>, Layout) {
    let kvs = [("general.architecture".into(), Kv::Str("llama".into())), ("tokenizer.ggml.tokens".into(), Kv::Strs(vec!["a".into(), "b".into()]))];
    let q8: Vec<u8> = (0..34u8).collect();
    let tensors = [
        Tensor { name: "a".into(), shape: vec![2, 4], ty: 0, data: vec![0; 32] },
        Tensor { name: "b".into(), shape: vec![1, 32], ty: 8, data: q8 },
    ];
    write_gguf(&kvs, &tensors)
}

fn open_bytes(bytes: &[u8]) -> patchbay::Result<GgufFile> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p)
}

fn refused(name: &str, bytes: &[u8], needle: &str) {
    let msg = match open_bytes(bytes) {
        Ok(_) => panic!("{name}: accepted"),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "{name}: not one line: {msg}");
    assert!(msg.contains(needle), "{name}: {msg:?} does not say {needle:?}");
}

fn patch_u64(bytes: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

fn patch_u32(bytes: &[u8], at: usize, v: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn hostile_files_are_refused_with_one_line() {
    let (ok, lay) = small_file();
    let f = open_bytes(&ok).expect("the small file is valid");
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.strings("tokenizer.ggml.tokens").unwrap().unwrap(), ["a", "b"]);

    // Version 2 has version 3's layout (3 added big-endian files, which are refused).
    assert_eq!(open_bytes(&patch_u32(&ok, 4, 2)).expect("a version 2 file").version, 2);

    refused("magic", &[b"GGML".as_slice(), &ok[4..]].concat(), "GGUF magic");
    refused("version 1", &patch_u32(&ok, 4, 1), "version 1 is not supported");
    refused("version 4", &patch_u32(&ok, 4, 4), "version 4 is not supported");
    refused("big-endian", &patch_u32(&ok, 4, 3u32.swap_bytes()), "is not supported");
    refused("tensor count", &patch_u64(&ok, 8, u64::MAX), "tensor count");
    refused("tensor count +1", &patch_u64(&ok, 8, 3), "not a valid GGUF file");
    refused("metadata count", &patch_u64(&ok, 16, u64::MAX), "metadata count");
    refused("key length", &patch_u64(&ok, lay.key_len_at[0], u64::MAX), "metadata key 0");
    refused("array length", &patch_u64(&ok, lay.array_len_at[0], 1 << 60), "length of `tokenizer.ggml.tokens`");
    refused("unknown type", &patch_u32(&ok, lay.type_at[1], 99), "unknown ggml type 99");
    refused("unsupported type", &patch_u32(&ok, lay.type_at[1], 10), "Q2_K");
    refused("overlap", &patch_u64(&ok, lay.offset_at[1], 0), "overlap");
    refused("offset past the end", &patch_u64(&ok, lay.offset_at[1], 1 << 40), "offset past the end");
    refused("offset overflow", &patch_u64(&ok, lay.offset_at[1], u64::MAX - 31), "offset past the end");
    refused("misaligned", &patch_u64(&ok, lay.offset_at[1], 33), "alignment");
    // Every truncation (the last tensor ends at the end of the file).
    for n in 0..ok.len() {
        refused(&format!("truncated to {n} bytes"), &ok[..n], "not a valid GGUF file");
    }
    assert!(lay.data_start < ok.len());
}

/// Random corruption: never a panic, never a multi-line message, whatever the bytes say.
#[test]
fn corrupted_files_never_panic() {
    let (ok, _) = small_file();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    for _ in 0..2000 {
        let mut b = ok.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        if let Err(e) = open_bytes(&b) {
            assert!(!e.to_string().contains('\n'));
        }
    }
}

/// Model-level refusals: an architecture without a mapping, a missing key, a directory with two
/// GGUF files, a file that is not a GGUF.
#[test]
fn model_level_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let embd = Tensor { name: "token_embd.weight".into(), shape: vec![4, 8], ty: 0, data: vec![0; 128] };
    let write = |name: &str, kvs: &[(String, Kv)]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, write_gguf(kvs, std::slice::from_ref(&embd)).0).unwrap();
        p
    };
    let gemma = write("gemma.gguf", &[("general.architecture".into(), Kv::Str("gemma2".into()))]);
    let msg = Model::load(&gemma).err().unwrap().to_string();
    assert!(msg.contains("`gemma2`") && msg.contains("llama, qwen2"), "{msg}");
    let no_layers = write("llama.gguf", &[("general.architecture".into(), Kv::Str("llama".into())), ("llama.embedding_length".into(), Kv::U32(8))]);
    let msg = Model::load(&no_layers).err().unwrap().to_string();
    assert!(msg.contains("llama.attention.head_count") || msg.contains("llama.block_count"), "{msg}");
    // Sizes no tensor backs: refused before anything is allocated by them.
    let llama_kv = |layers: u32, heads: u32, key_length: Option<Kv>| {
        let mut kvs: Vec<(String, Kv)> = vec![("general.architecture".into(), Kv::Str("llama".into()))];
        for (k, v) in [("block_count", layers), ("embedding_length", 8), ("feed_forward_length", 8), ("attention.head_count", heads)] {
            kvs.push((format!("llama.{k}"), Kv::U32(v)));
        }
        if let Some(d) = key_length {
            kvs.push(("llama.attention.key_length".into(), d));
        }
        kvs
    };
    let msg = Model::load(&write("layers.gguf", &llama_kv(u32::MAX, 2, None))).err().unwrap().to_string();
    assert!(msg.contains("llama.block_count") && msg.contains("more than the file's 1 tensors"), "{msg}");
    let msg = Model::load(&write("keylen.gguf", &llama_kv(1, 2, Some(Kv::U64(1 << 40))))).err().unwrap().to_string();
    assert!(msg.contains("llama.attention.key_length") && msg.contains("too large"), "{msg}");
    let msg = Model::load(&write("keytype.gguf", &llama_kv(1, 2, Some(Kv::Str("7".into()))))).err().unwrap().to_string();
    assert!(msg.contains("llama.attention.key_length") && msg.contains("expected a non-negative integer, found a string"), "{msg}");
    let msg = PromptTokenizer::load(&no_layers).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.ggml.model"), "{msg}");
    let msg = Model::load(tmp.path()).err().unwrap().to_string();
    assert!(msg.contains("holds 5 .gguf files"), "{msg}");
    // A quantized matrix whose f16 scale is NaN: refused at load, never NaN weights.
    let cfg = ModelConfig::load(&fixture("llama")).unwrap();
    let mut bytes = fixture_gguf("llama", true);
    let at = {
        let t = open_bytes(&bytes).unwrap().tensor("blk.1.ffn_up.weight").unwrap().clone();
        assert_eq!((t.ty, t.shape.as_slice()), (GgmlType::Q8_0, [cfg.d_mlp, cfg.d_model].as_slice()));
        t.data.start + 34 // the scale of the second block
    };
    bytes[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let nan = tmp.path().join("nan.gguf");
    std::fs::write(&nan, &bytes).unwrap();
    let msg = Model::load(&nan).err().unwrap().to_string();
    assert!(msg.contains("blk.1.ffn_up.weight") && msg.contains("not finite"), "{msg}");
    // No chat template: --chat says so, naming the file (the key renamed in place, same length).
    let mut bytes = fixture_gguf("qwen2", false);
    let key = b"tokenizer.chat_template";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'X';
    let plain = tmp.path().join("no-template.gguf");
    std::fs::write(&plain, &bytes).unwrap();
    let tok = PromptTokenizer::load(&plain).unwrap();
    assert!(!tok.has_chat_template());
    let msg = tok.render_chat(&[ChatMessage::new("user", "hi")], true).unwrap_err().to_string();
    assert!(msg.contains("no-template.gguf") && msg.contains("no chat template") && !msg.contains("jinja"), "{msg}");
    let txt = tmp.path().join("notes.txt");
    std::fs::write(&txt, "hi").unwrap();
    let msg = Model::load(&txt).err().unwrap().to_string();
    assert!(msg.contains("not a directory or a .gguf file"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Through the binary: the commands a user runs.

/// Runs the patchbay binary; returns (exit code, stdout, stderr).
fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run_ok(args: &[&str]) -> String {
    let (code, out, err) = patchbay(args);
    assert_eq!(code, 0, "patchbay {}: {err}", args.join(" "));
    out
}

/// `capture --device emu` (the CUDA host code and kernels, emulated) on a fixture written as GGUF
/// gives what it gives on the fixture's directory: the device path reads the GGUF's mapped and
/// permuted weights alike.
#[test]
fn emulated_device_reads_gguf_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["llama", "qwen2"] {
        let path = tmp.path().join(format!("{family}.gguf"));
        std::fs::write(&path, fixture_gguf(family, false)).unwrap();
        let ids = tmp.path().join("ids.json");
        std::fs::write(&ids, serde_json::to_string(&prompt_ids(family)).unwrap()).unwrap();
        let mut got = Vec::new();
        for (model, out) in [(path.clone(), "g.safetensors"), (fixture(family), "h.safetensors")] {
            let out = tmp.path().join(out);
            run_ok(&["capture", "--model", model.to_str().unwrap(), "--device", "emu", "--token-ids", ids.to_str().unwrap(), "--sites", "resid_post,q,k", "--positions", "all", "--logits", "--out", out.to_str().unwrap(), "--quiet"]);
            got.push(read_tensors(&out));
        }
        for (name, (shape, want)) in &got[1] {
            let (g_shape, g) = &got[0][name];
            assert_eq!(g_shape, shape, "{family} {name}");
            assert_close(&format!("{family} emu gguf: {name}"), g, want, F32_ATOL, F32_RTOL);
        }
    }
}

/// The done-when: `capture --model SmolLM2.gguf --text ... --chat --sites resid_post
/// --positions -1 --logits` matches transformers; `inspect` describes the file.
#[test]
fn smollm2_capture_and_inspect_commands() {
    let Some(path) = smollm2_path() else { return };
    let model = path.to_str().unwrap();
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures_dir().join("gguf/smollm2_golden.json")).unwrap()).unwrap();
    let case = &golden["cases"]["chat"];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("acts.safetensors");
    run_ok(&["capture", "--model", model, "--text", case["text"].as_str().unwrap(), "--chat", "--sites", "resid_post", "--positions", "-1", "--logits", "--out", out.to_str().unwrap(), "--quiet"]);
    let t = read_tensors(&out);
    let (shape, logits) = &t["logits"];
    assert_eq!(shape, &[1, 1, 49152]);
    assert_eq!(t["blocks.29.hook_resid_post"].0, [1, 1, 576]);
    let top: Vec<usize> = serde_json::from_value(case["top_ids"].clone()).unwrap();
    let want: Vec<f32> = serde_json::from_value(case["top_logits"].clone()).unwrap();
    let got: Vec<f32> = top.iter().map(|&i| logits[i]).collect();
    assert_close("smollm2 capture --chat: top logits", &got, &want, 0.05, 0.0);

    let info: serde_json::Value = serde_json::from_str(&run_ok(&["inspect", "--model", model, "--json"])).unwrap();
    assert_eq!(info["family"], "llama");
    assert_eq!((info["n_layers"].as_u64(), info["d_model"].as_u64(), info["n_heads"].as_u64(), info["n_kv_heads"].as_u64()), (Some(30), Some(576), Some(9), Some(3)));
    assert_eq!((info["d_mlp"].as_u64(), info["vocab"].as_u64(), info["tied_embeddings"].as_bool()), (Some(1536), Some(49152), Some(true)));
    assert_eq!(info["dtype"], "float16");
    assert_eq!(info["parameters"].as_u64(), Some(134_515_008));
    assert_eq!(info["rope_theta"].as_f64(), Some(100000.0));
}

/// `cost` reads a GGUF file's header as it reads config.json: the same model figures.
#[test]
fn cost_reads_a_gguf_header() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("llama.gguf");
    std::fs::write(&path, fixture_gguf("llama", false)).unwrap();
    let model = |m: &Path| -> serde_json::Value {
        let out = run_ok(&["cost", "capture", "--model", m.to_str().unwrap(), "--sites", "resid_post", "--n-prompts", "4", "--prompt-len", "16", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["model"].clone()
    };
    let (mut g, mut h) = (model(&path), model(&fixture("llama")));
    for m in [&mut g, &mut h] {
        m.as_object_mut().unwrap().remove("name");
    }
    assert_eq!(g, h);
    assert_eq!(g["weight_dtype"], "bfloat16");
}
