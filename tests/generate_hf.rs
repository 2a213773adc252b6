//! Generation against Hugging Face: `patchbay generate` on every fixture family gives the greedy
//! tokens of `transformers.generate` (KV cache), plain and steered along the golden steering
//! vector at the middle layer's resid_post for every prompt and generated position
//! (`tests/fixtures/<family>/generate_golden.json`, made by
//! `scripts/golden/make_generate_goldens.py`; steps with a near-tie are left out there).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

#[test]
fn greedy_generation_plain_and_steered_matches_transformers() {
    for family in ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"] {
        let dir = fixture(family);
        let golden: Value = serde_json::from_slice(&std::fs::read(dir.join("generate_golden.json")).unwrap()).unwrap();
        let w = tempfile::tempdir().unwrap();
        let ids = w.path().join("ids.json");
        std::fs::write(&ids, golden["prompts"].to_string()).unwrap();
        let vector = format!("{}:{}", dir.join("steer_vectors.safetensors").display(), golden["vector"].as_str().unwrap());
        let layer = golden["layer"].to_string();
        let betas: Vec<f64> = golden["cases"].as_array().unwrap().iter().map(|c| c["beta"].as_f64().unwrap()).fold(Vec::new(), |mut v, b| {
            if !v.contains(&b) {
                v.push(b);
            }
            v
        });
        let betas = format!("--betas={}", betas.iter().map(f64::to_string).collect::<Vec<_>>().join(","));
        let out = w.path().join("gen");
        let max_new = golden["max_new_tokens"].to_string();
        patchbay_ok(&[
            "generate", "--model", dir.to_str().unwrap(), "--token-ids", ids.to_str().unwrap(), "--max-new-tokens", &max_new,
            "--vector", &vector, "--layers", &layer, "--positions", "all+generated", &betas, "--quiet", "--out", out.to_str().unwrap(),
        ]);
        let rows = read_jsonl(Path::new(&out.join("generations.jsonl")));
        let cases = golden["cases"].as_array().unwrap();
        for c in cases {
            let row = rows.iter().find(|r| r["beta"].as_f64() == c["beta"].as_f64() && r["index"] == c["prompt"]).unwrap_or_else(|| panic!("{family}: no row for {c}"));
            assert_eq!(row["tokens"], c["tokens"], "{family}: beta {} prompt {}", c["beta"], c["prompt"]);
        }
        assert!(cases.len() >= 10, "{family}: {} cases", cases.len());
    }
}
