//! The reference forward against Hugging Face transformers: every site and the logits of every
//! family's tiny model, for bf16-stored, f32-stored and sharded checkpoints.
//! Goldens: tests/fixtures/<family>/golden.safetensors, made by scripts/golden/make_goldens.py.

mod common;

use common::*;
use indicatif::ProgressBar;
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::io::{OutDtype, OutTensor};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site};
use safetensors::Dtype;

/// Captures every site at every position with logits and compares with the golden file.
fn check_against_golden(family: &str, model_dir: &std::path::Path) -> f32 {
    let golden = read_tensors(&fixture(family).join("golden.safetensors"));
    let model = Model::load(model_dir).unwrap();
    let prompts = prompt_ids(family);
    let spec = CaptureSpec { sites: Site::all(&model.cfg), positions: Positions::All, logits: true, dtype: OutDtype::F32, batch_size: 2, interventions: Vec::new() };
    let out = capture(&model, &prompts, &spec, &ProgressBar::hidden()).unwrap();
    assert_eq!(out.len(), golden.len(), "{family}: {} tensors, golden has {}", out.len(), golden.len());
    let mut worst = 0.0f32;
    for (name, t) in &out {
        let (want_shape, want) = golden.get(name).unwrap_or_else(|| panic!("{family}: golden lacks {name}"));
        let (shape, data): (&Vec<usize>, Vec<f32>) = match t {
            OutTensor::Float { shape, data, .. } => (shape, data.clone()),
            OutTensor::I64 { shape, data } => (shape, data.iter().map(|&v| v as f32).collect()),
        };
        assert_eq!(shape, want_shape, "{family}: {name} shape");
        // Poisoned-output guard: a capture that was never written stays 0 and fails here
        // wherever the golden is non-zero.
        let err = assert_close(&format!("{family}: {name}"), &data, want, F32_ATOL, F32_RTOL);
        worst = worst.max(err);
    }
    println!("{family} ({}): max abs error {worst:.3e} over {} tensors", model_dir.display(), out.len());
    worst
}

fn check_family(family: &str) {
    let dir = fixture(family);
    assert!(dir.join("golden.safetensors").exists(), "missing fixture {}: run scripts/golden/make_goldens.py", dir.display());
    // As committed: bf16 weights.
    check_against_golden(family, &dir);
    // The same values stored as f32, and as bf16 split into 3 shards with an index.
    let tmp = tempfile::tempdir().unwrap();
    let f32_dir = tmp.path().join("f32");
    copy_checkpoint(&dir, &f32_dir, Dtype::F32, 1);
    check_against_golden(family, &f32_dir);
    let sharded = tmp.path().join("sharded");
    copy_checkpoint(&dir, &sharded, Dtype::BF16, 3);
    check_against_golden(family, &sharded);
}

#[test]
fn llama_matches_hf() {
    check_family("llama");
}
#[test]
fn mistral_matches_hf() {
    check_family("mistral");
}
#[test]
fn qwen2_matches_hf() {
    check_family("qwen2");
}
#[test]
fn gemma2_matches_hf() {
    check_family("gemma2");
}
#[test]
fn phi3_matches_hf() {
    check_family("phi3");
}
#[test]
fn olmo2_matches_hf() {
    check_family("olmo2");
}
