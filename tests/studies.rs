//! scripts/studies.sh --small: both studies end to end on SmolLM2-135M-Instruct (the real GGUF)
//! through the CLI, on the bundled corpus and scenarios, with the report of
//! scripts/studies_report.py. Skips (with a notice) where SmolLM2 could not be fetched.
mod common;

use std::path::Path;
use std::process::Command;

fn studies(out: &Path, extra: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("bash")
        .arg(root.join("scripts/studies.sh"))
        .args(["--small", "--bin", env!("CARGO_BIN_EXE_patchbay"), "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn number(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

#[test]
fn both_studies_run_on_smollm2_and_resume() {
    if common::smollm2_path().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("studies");
    let run = studies(&out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "studies.sh failed:\n{stderr}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(!report.contains("has not run"), "a stage is missing from the report:\n{report}");
    for section in ["## Tak et al. 2025", "### Probes by layer", "### Activation patching", "### Steering along the appraisal probes",
        "## Wang et al. 2025", "### Emotion and valence directions", "### Head and neuron contributions", "### Top-k ablation curves",
        "### Steered generation"]
    {
        assert!(report.contains(section), "report.md lacks `{section}`");
    }
    // Every command the report quotes is one the script ran, in order, as a user would type it.
    let commands = std::fs::read_to_string(out.join("commands.sh")).unwrap();
    let ran: Vec<&str> = commands.lines().filter(|l| l.starts_with("patchbay ")).map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(ran, ["score", "probe", "patch", "directions", "steer", "directions", "directions", "components", "ablate", "steer"]);

    let numbers: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(numbers["meta"]["n_layers"], 30);
    assert_eq!(numbers["meta"]["layer"], 15);
    assert_eq!(numbers["score"]["n"], 26);
    number(&numbers["score"]["accuracy"], "score accuracy");
    // Probes: one row per site, every layer, with a finite best accuracy; the nine ratings' R^2.
    for site in ["attn_out", "mlp_out", "resid_post"] {
        let best = number(&numbers["probe"][site]["best"], site);
        assert!((0.0..=1.0).contains(&best), "{site}: best accuracy {best}");
    }
    assert_eq!(numbers["probe"]["appraisal_r2_best"].as_object().unwrap().len(), 9);
    assert_eq!(numbers["patch"]["pairs"], 3);
    // Steering: 2 appraisal directions and their random controls at 4 strengths.
    assert_eq!(numbers["steer"]["conditions"].as_array().unwrap().len(), 16);
    // Cosines of SEV's valence directions with the 13 emotion directions, at the steering layer
    // (and at the best probe's layer when it is another).
    let cos = numbers["directions"]["cosine"].as_object().unwrap();
    assert!(cos.contains_key("blocks.15.hook_resid_post") && (1..=2).contains(&cos.len()), "{cos:?}");
    for (site, by_variant) in cos {
        let by_variant = by_variant.as_object().unwrap();
        assert_eq!(by_variant.keys().collect::<Vec<_>>(), ["negative", "positive", "positive - negative"], "{site}");
        for (variant, row) in by_variant {
            assert_eq!(row.as_object().unwrap().len(), 13, "{site} {variant}");
            for (emotion, c) in row.as_object().unwrap() {
                assert!(number(c, emotion).abs() <= 1.0 + 1e-9);
            }
        }
    }
    assert_eq!(numbers["contrib"]["heads"]["top"].as_array().unwrap().len(), 5);
    let ks: Vec<u64> = numbers["top_k"].as_array().unwrap().iter().map(|x| x["k"].as_u64().unwrap()).collect();
    assert_eq!(ks, [1, 4]);
    // Steered generation: 4 targets x 2 strengths, steered, random and clean accuracies.
    let generated = numbers["generate"].as_array().unwrap();
    assert_eq!(generated.len(), 8);
    for g in generated {
        for cond in ["steered", "random", "clean", "valence_steered", "valence_random", "valence_clean"] {
            let a = number(&g[cond], cond);
            assert!((0.0..=1.0).contains(&a), "{cond}: {a}");
        }
    }

    // A second run resumes: every stage is skipped and the report is the same.
    let again = studies(&out, &[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(stderr.matches("done earlier").count(), 10, "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), report);

    // A wrong option or input is one line naming it, before anything runs.
    let bad = studies(&dir.path().join("bad"), &["--sev", "/nonexistent/sev.jsonl"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert_eq!(stderr.trim(), "studies.sh: no SEV file at '/nonexistent/sev.jsonl'");
    let bad = studies(&dir.path().join("bad"), &["--layers", "3"]);
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim(), "studies.sh: unknown option '--layers' (see --help)");
    // --device reaches every command: a device that does not exist stops the first one with its
    // own one-line message.
    let bad = studies(&dir.path().join("bad-device"), &["--device", "tpu"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("[score] patchbay score --model") && stderr.contains("--device tpu"), "{stderr}");
    assert!(stderr.contains("device `tpu`: expected cpu, cuda, cuda:N"), "{stderr}");
    assert!(!dir.path().join("bad-device/score/.done").exists());
}
