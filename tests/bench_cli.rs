//! `patchbay bench forward|capture|generate|patch` through the binary on a fixture model with
//! tiny sizes: the documented JSON fields and the quantities that do not depend on timing (no
//! timing is asserted), the table output, and clear errors.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Runs the patchbay binary; returns (exit code, stdout, stderr).
fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `bench <what> --model <llama fixture> <args> --json` and parses its one JSON object,
/// checking the fields every bench has.
fn bench_json(what: &str, args: &[&str]) -> Value {
    let model = fixture("llama");
    let mut all = vec!["bench", what, "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = patchbay(&all);
    assert_eq!(code, 0, "bench {what}: {err}");
    assert_eq!(out.lines().count(), 1, "bench {what}: one JSON line, got {out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench {what}: {e}: {out}"));
    assert_eq!(v["bench"], what);
    assert_eq!(v["n_layers"], 2);
    assert_eq!(v["d_model"], 64);
    assert!(v["model"].as_str().unwrap().ends_with("llama"));
    assert!(v["device"].as_str().unwrap().starts_with("cpu ("), "the CPU is named: {}", v["device"]);
    v
}

/// Positive, finite numbers.
fn positive(v: &Value, fields: &[&str]) {
    for f in fields {
        let x = v[f].as_f64().unwrap_or_else(|| panic!("field {f} is not a number: {v}"));
        assert!(x.is_finite() && x > 0.0, "{f} = {x}");
    }
}

#[test]
fn forward_reports_prefill_and_decode() {
    let v = bench_json("forward", &["--batch", "2", "--prompt-len", "5", "--decode-steps", "3", "--reps", "2", "--seed", "4"]);
    positive(&v, &["prefill_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s", "ratio"]);
    assert_eq!((v["batch"].as_u64(), v["prompt_len"].as_u64(), v["decode_steps"].as_u64(), v["reps"].as_u64()), (Some(2), Some(5), Some(3), Some(2)));
    let (p, d) = (v["prefill_tokens_per_s"].as_f64().unwrap(), v["decode_tokens_per_s"].as_f64().unwrap());
    assert!((v["ratio"].as_f64().unwrap() - p / d).abs() <= 1e-9 * p / d, "ratio = prefill / decode tokens/s");
    assert!((p * v["prefill_s"].as_f64().unwrap() - 10.0).abs() < 1e-6, "prefill tokens/s x s = batch x prompt_len");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    // Useful FLOP/s against the machine's f32 GEMM peak.
    let u = &v["prefill_utilization"];
    positive(u, &["peak_flops_per_s", "flops_per_s", "of_peak"]);
    assert_eq!(u["precision"], "f32");
    let (f, peak) = (u["flops_per_s"].as_f64().unwrap(), u["peak_flops_per_s"].as_f64().unwrap());
    assert!((u["of_peak"].as_f64().unwrap() - f / peak).abs() <= 1e-9 * f / peak, "of_peak = flops_per_s / peak: {u}");
    // The bf16 CPU engine against the bf16 peak.
    let v = bench_json("forward", &["--batch", "2", "--prompt-len", "5", "--decode-steps", "1", "--reps", "1", "--precision", "bf16"]);
    assert!(v["device"].as_str().unwrap().starts_with("cpu (bf16)"), "{v}");
    assert_eq!(v["prefill_utilization"]["precision"], "bf16");
    positive(&v["prefill_utilization"], &["peak_flops_per_s", "flops_per_s", "of_peak"]);
    // On the emulated device (decoding in its paged KV pool); with no steps, decode is null.
    let model = fixture("llama");
    let (code, out, err) = patchbay(&["bench", "forward", "--model", model.to_str().unwrap(), "--device", "emu", "--batch", "2", "--prompt-len", "3", "--decode-steps", "2", "--reps", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["device"].as_str().unwrap().starts_with("emu"), "{v}");
    positive(&v, &["prefill_tokens_per_s", "decode_tokens_per_s", "ratio"]);
    assert!(v["prefill_utilization"].is_null(), "the host's GEMM peak is no measure of a device: {v}");
    let v = bench_json("forward", &["--batch", "1", "--prompt-len", "3", "--decode-steps", "0", "--reps", "1"]);
    assert!(v["decode_tokens_per_s"].is_null() && v["ratio"].is_null(), "{v}");
}

#[test]
fn capture_reports_the_overhead_and_what_it_captured() {
    let v = bench_json("capture", &["--batch", "2", "--prompt-len", "4", "--reps", "1"]);
    positive(&v, &["plain_s", "capture_s", "plain_tokens_per_s", "capture_tokens_per_s", "ratio"]);
    // resid_post of both layers, every position: 2 sites x 8 rows x 64 floats.
    assert_eq!(v["sites"], 2);
    assert_eq!(v["captured_bytes"], 2 * 8 * 64 * 4);
    let r = v["capture_s"].as_f64().unwrap() / v["plain_s"].as_f64().unwrap();
    assert!((v["ratio"].as_f64().unwrap() - r).abs() <= 1e-9 * r, "ratio = capture_s / plain_s");
    let v = bench_json("capture", &["--batch", "2", "--prompt-len", "4", "--reps", "1", "--sites", "blocks.1.attn.hook_z,mlp_post", "--positions", "-1"]);
    // z of layer 1 (4 heads x 16) and mlp_post of both layers (96), last position of 2 prompts.
    assert_eq!(v["sites"], 3);
    assert_eq!(v["captured_bytes"], 2 * (64 + 2 * 96) * 4);
}

#[test]
fn generate_reports_plain_and_steered() {
    let v = bench_json("generate", &["--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--reps", "1", "--beta", "1000"]);
    positive(&v, &["plain_s", "steered_s", "plain_tokens_per_s", "steered_tokens_per_s", "ratio"]);
    assert_eq!(v["new_tokens"], 3);
    assert!(v["tokens_changed"].as_u64().unwrap() > 0, "steering with norm 1000 changed no token: {v}");
    let v = bench_json("generate", &["--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--reps", "1", "--beta", "0", "--scope", "generated", "--temperature", "0.7", "--top-p", "0.9", "--site", "blocks.0.hook_attn_out"]);
    assert_eq!(v["tokens_changed"], 0, "steering with norm 0 changed tokens: {v}");
    // On the emulated device.
    let model = fixture("llama");
    let (code, out, err) = patchbay(&["bench", "generate", "--model", model.to_str().unwrap(), "--device", "emu", "--batch", "2", "--prompt-len", "3", "--new-tokens", "2", "--reps", "1", "--beta", "1000", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["device"].as_str().unwrap().starts_with("emu"), "{v}");
    positive(&v, &["plain_tokens_per_s", "steered_tokens_per_s", "ratio"]);
    assert!(v["tokens_changed"].as_u64().unwrap() > 0, "steering with norm 1000 changed no token on emu: {v}");
}

#[test]
fn patch_keeps_its_fields() {
    let v = bench_json("patch", &["--n-prompts", "4", "--prompt-len", "5", "--pairs", "3", "--sites", "attn_out,resid_post", "--window", "1", "--naive-limit", "4"]);
    positive(&v, &["resumed_s", "naive_s", "resumed_per_s", "naive_per_s", "ratio"]);
    // 3 pairs x 2 sites x 2 centres; the naive method times the first 4.
    assert_eq!((v["experiments"].as_u64(), v["resumed_experiments"].as_u64(), v["naive_experiments"].as_u64()), (Some(12), Some(12), Some(4)));
    assert!(v["max_abs_diff"].as_f64().unwrap() < 1e-3, "resumed and naive disagree: {v}");
    // Forwards per experiment: Tak et al.'s 3; resumed = clean passes per prompt / experiments
    // per prompt (12 / 4) + its segment, fewer than the naive method's.
    let fw = &v["forwards"];
    positive(fw, &["naive", "resumed", "clean_passes_per_prompt", "segment"]);
    let num = |f: &str| fw[f].as_f64().unwrap();
    assert_eq!((num("tak"), num("experiments_per_prompt")), (3.0, 3.0), "{fw}");
    assert!((num("resumed") - (num("clean_passes_per_prompt") / 3.0 + num("segment"))).abs() < 1e-9, "{fw}");
    assert!(num("clean_passes_per_prompt") >= 1.0 && num("resumed") < num("naive"), "{fw}");
    positive(&v["resumed_utilization"], &["flops_per_s", "of_peak"]);
    positive(&v["naive_utilization"], &["flops_per_s", "of_peak"]);
    // On the emulated device.
    let model = fixture("llama");
    let (code, out, err) = patchbay(&["bench", "patch", "--model", model.to_str().unwrap(), "--device", "emu", "--n-prompts", "3", "--prompt-len", "4", "--pairs", "2", "--sites", "resid_post", "--window", "2", "--json", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["device"].as_str().unwrap().starts_with("emu"), "{v}");
    assert_eq!((v["experiments"].as_u64(), v["naive_experiments"].as_u64()), (Some(2), Some(2)));
}

#[test]
fn ablate_keeps_its_fields() {
    let v = bench_json("ablate", &["--n-prompts", "3", "--prompt-len", "6", "--positions", "last:2", "--naive-limit", "3"]);
    positive(&v, &["resumed_s", "naive_s", "resumed_per_s", "naive_per_s", "ratio"]);
    // Every head of the 2-layer, 4-head fixture x 3 prompts; the naive method times 3 heads.
    assert_eq!((v["heads"].as_u64(), v["experiments"].as_u64(), v["resumed_experiments"].as_u64(), v["naive_experiments"].as_u64()), (Some(8), Some(24), Some(24), Some(9)));
    assert_eq!((v["op"].as_str(), v["positions"].as_str()), (Some("zero"), Some("-1,-2")));
    assert!(v["max_abs_diff"].as_f64().unwrap() < 1e-3, "resumed and naive disagree: {v}");
}

#[test]
fn tables_and_errors() {
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let (code, out, err) = patchbay(&["bench", "generate", "--model", m, "--batch", "1", "--prompt-len", "2", "--new-tokens", "2", "--reps", "1", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    for want in ["bench generate on", "device cpu (", "plain", "steered", "ratio steered/plain time"] {
        assert!(out.contains(want), "no `{want}` in\n{out}");
    }
    let bad: [(&[&str], &str); 5] = [
        (&["bench", "generate", "--model", m, "--new-tokens", "0"], "--new-tokens"),
        (&["bench", "forward", "--model", m, "--reps", "0"], "--reps"),
        (&["bench", "forward", "--model", m, "--batch", "0"], "--batch"),
        (&["bench", "capture", "--model", m, "--sites", "blocks.7.hook_resid_post"], "out of range"),
        (&["bench", "generate", "--model", m, "--temperature=-1"], "temperature"),
    ];
    for (args, want) in bad {
        let (code, _, err) = patchbay(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(want) && err.lines().count() == 1, "{args:?}: {err}");
    }
    let (code, _, _) = patchbay(&["bench", "forward", "--model", m, "--scope", "all"]);
    assert_eq!(code, 2, "an unknown flag is a usage error");
}
