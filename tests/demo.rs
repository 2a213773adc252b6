//! `patchbay demo` on the bundled model and corpus (demo/): the report, its plots and numbers,
//! that the report's reproduction commands give the demo's numbers, that the bundled model was
//! trained on the prompt format the demo scores with, and the demo's library pieces (pairs,
//! class-mean directions, steering) against plain computations.

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbay::data::labels::LabelSet;
use patchbay::data::template::Template;
use patchbay::experiments::demo::contrast_pairs;
use patchbay::experiments::steer::random_like;
use patchbay::intervene::norm;
use patchbay::learn::directions::{Versus, class_mean_directions};
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use serde_json::Value;

fn demo_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("demo").join(name)
}

fn patchbay(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Runs a reproduction command of the report (`patchbay ...`) through the shell, with the
/// test's binary and its output in `out`.
fn reproduce(cmd: &str, out: &Path) {
    let bin = env!("CARGO_BIN_EXE_patchbay");
    let cmd = cmd.strip_prefix("patchbay ").unwrap_or_else(|| panic!("not a patchbay command: {cmd}"));
    let (head, _) = cmd.rsplit_once(" --out ").unwrap_or_else(|| panic!("no --out in {cmd}"));
    let line = format!("'{bin}' {head} --quiet --out '{}'", out.display());
    let status = Command::new("sh").arg("-c").arg(&line).status().expect("cannot run sh");
    assert!(status.success(), "{line}");
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect()
}

#[test]
fn quick_demo_writes_a_sane_report_and_its_commands_reproduce_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (code, err) = patchbay(&["demo", "--quick", "--quiet", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for f in ["score/confusion.png", "probe/accuracy_by_layer.png", "probe/appraisal_r2.png", "patch/heatmap.png"] {
        assert!(is_png(&out.join(f)), "{f} is not a PNG");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for s in ["## The model", "## 1. Label scoring", "## 2. Probing", "## 3. Activation patching", "## 4. Steering", "## 5. Components (Wang et al.)", "## Timings", "scripts/demo/train.py", "probe/accuracy_by_layer.png", "patch/heatmap.png"] {
        assert!(report.contains(s), "report.md lacks `{s}`");
    }
    let s = json(&out.join("summary.json"));

    // Scoring: far above the majority class.
    let (acc, majority) = (s["score"]["accuracy"].as_f64().unwrap(), s["score"]["majority"].as_f64().unwrap());
    assert_eq!(s["score"]["n"], 390);
    assert!(acc > 0.9 && majority < 0.2, "accuracy {acc}, majority {majority}");

    // Probes: above chance everywhere, rising from the first to the last layer.
    let chance = s["probe"]["chance"].as_f64().unwrap();
    let resid: Vec<f64> = s["probe"]["resid_post"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(resid.len(), Model::load(&demo_dir("model")).unwrap().cfg.n_layers);
    assert!(resid.iter().all(|&a| a > chance + 0.3), "resid_post {resid:?}, chance {chance}");
    assert!(resid[resid.len() - 1] > resid[0] + 0.1, "no rise with depth: {resid:?}");

    // Patching: the residual stream carries the answer in the late layers, not in the first.
    let flips = s["patch"]["flip_rate"].as_array().unwrap();
    let resid_flips: Vec<f64> = flips.iter().filter(|r| r["site"] == "resid_post").map(|r| r["flip_rate"].as_f64().unwrap()).collect();
    assert!(resid_flips.last().unwrap() > &0.8 && resid_flips[0] < 0.5, "resid_post flip rates {resid_flips:?}");

    // Steering: the emotion's own direction wins, a random one of the same norm does not.
    let top = s["steer"]["by_strength"].as_array().unwrap().last().unwrap().clone();
    assert!(top["class_mean_hit"].as_f64().unwrap() > 0.8 && top["random_hit"].as_f64().unwrap() < 0.2, "{top}");
    let base = &s["steer"]["by_strength"][0];
    assert_eq!(base["strength"], 0.0);
    assert!(base["class_mean_prob"].as_f64().unwrap() < 0.1, "{base}");

    // The report's commands give the demo's numbers.
    let again = dir.path().join("again");
    // (scoring multiplies only the label rows of the lm_head, the demo's capture all of them:
    // the logits agree to rounding).
    reproduce(s["score"]["command"].as_str().unwrap(), &again.join("score"));
    let (ours, theirs) = (jsonl(&out.join("score/scores.jsonl")), jsonl(&again.join("score/scores.jsonl")));
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(a["pred"] == b["pred"] && a["gold"] == b["gold"] && a["row"] == b["row"], "{a} vs {b}");
        let close = a["label_logits"].as_array().unwrap().iter().zip(b["label_logits"].as_array().unwrap()).all(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4);
        assert!(close, "{a} vs {b}");
    }
    reproduce(s["probe"]["command"].as_str().unwrap(), &again.join("probe"));
    let (ours, theirs) = (csv_rows(&out.join("probe/probe_results.csv")), csv_rows(&again.join("probe/probe_results.csv")));
    assert_eq!(ours.len(), theirs.len());
    for row in &ours {
        assert!(theirs.contains(row), "probe row {row:?} not reproduced");
    }
    reproduce(s["patch"]["command"].as_str().unwrap(), &again.join("patch"));
    assert_eq!(std::fs::read(again.join("patch/summary.csv")).unwrap(), std::fs::read(out.join("patch/summary.csv")).unwrap());

    // Steering: `patchbay steer` with the report's command reads the demo's directions file and
    // gives its rows; steering.csv is those rows read toward each direction's emotion.
    assert!(is_png(&out.join("steer/shares.png")));
    reproduce(s["steer"]["command"].as_str().unwrap(), &again.join("steer"));
    let (ours, theirs) = (jsonl(&out.join("steer/scores.jsonl")), jsonl(&again.join("steer/scores.jsonl")));
    assert_eq!(ours.len(), 60 * 13 * 3 * 2);
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        for field in ["index", "layer", "direction", "beta", "pred", "clean_pred", "gold"] {
            assert_eq!(a[field], b[field], "{field}: {a} vs {b}");
        }
    }
    assert_eq!(std::fs::read(again.join("steer/summary.csv")).unwrap(), std::fs::read(out.join("steer/summary.csv")).unwrap());
    for row in csv_rows(&out.join("steer/steering.csv")) {
        let (emotion, kind, strength) = (&row[0], &row[1], row[2].parse::<f64>().unwrap());
        let direction = if kind == "random" { format!("random:{emotion}") } else { emotion.clone() };
        let rows: Vec<&Value> = ours.iter().filter(|r| r["direction"] == direction.as_str() && r["beta"].as_f64() == Some(strength) && r["gold"] != emotion.as_str()).collect();
        assert_eq!(row[3], rows.len().to_string(), "{row:?}");
        let hits = rows.iter().filter(|r| r["pred"] == emotion.as_str()).count();
        assert!((row[5].parse::<f64>().unwrap() - hits as f64 / rows.len() as f64).abs() < 1e-6, "{row:?}");
    }

    // Components: the plots exist, the curve has both sets at every k, and the report's three
    // commands (contrib, then the two ablate sweeps reading its tables) give the demo's files.
    let c = &s["components"];
    for plot in ["components/contrib/heads.png", "components/contrib/long_tail.png", "components/heads/heatmap.png", "components/topk/top_k.png"] {
        assert!(is_png(&out.join(plot)), "{plot}");
    }
    let curve = c["curve"].as_array().unwrap();
    assert!(curve.len() >= 4 && curve.iter().filter(|p| p["set"] == "top").count() * 2 == curve.len(), "{c}");
    assert!(curve.iter().all(|p| p["mean"].as_f64().unwrap().is_finite() && p["ci_low"].as_f64() <= p["ci_high"].as_f64()), "{c}");
    let commands: Vec<String> = c["commands"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().replace("runs/contrib", &again.join("contrib").display().to_string())).collect();
    for (cmd, dir) in commands.iter().zip(["contrib", "heads", "topk"]) {
        reproduce(cmd, &again.join(dir));
    }
    for (ours, theirs) in [("contrib/heads.csv", "contrib/heads.csv"), ("contrib/neurons.csv", "contrib/neurons.csv"), ("heads/summary.csv", "heads/summary.csv"), ("topk/top_k.csv", "topk/top_k.csv")] {
        assert_eq!(std::fs::read_to_string(out.join("components").join(ours)).unwrap(), std::fs::read_to_string(again.join(theirs)).unwrap(), "{ours}");
    }
}

#[test]
fn bundled_model_was_trained_on_the_tak_prompt_and_its_label_tokens() {
    let training = json(&demo_dir("model").join("training.json"));
    let tak = Template::parse("tak").unwrap();
    assert_eq!(training["template"].as_str().unwrap(), tak.body.replace("{shots}", ""));
    let names: Vec<String> = training["labels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let tok = PromptTokenizer::load(&demo_dir("model")).unwrap();
    let labels = LabelSet::resolve(&names, &tok).unwrap();
    let ids: Vec<u32> = training["label_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(labels.token_ids, ids);
    // The corpus the model was trained on is the committed one.
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(std::fs::read(demo_dir("corpus.csv")).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(training["corpus_sha256"].as_str().unwrap(), sha);
}

#[test]
fn missing_model_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = patchbay(&["demo", "--model", "/nonexistent/model", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("/nonexistent/model"), "{err}");
}

/// A small deterministic pseudo-random sequence.
fn lcg(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> 33
        })
        .collect()
}

#[test]
fn contrast_pairs_are_distinct_eligible_and_of_different_labels() {
    let gold: Vec<usize> = lcg(1, 40).iter().map(|v| (v % 3) as usize).collect();
    let eligible: Vec<usize> = (0..40).filter(|i| i % 4 != 1).collect();
    let pairs = contrast_pairs(&gold, &eligible, 100, 7).unwrap();
    assert_eq!(pairs.len(), 100);
    let mut seen = std::collections::HashSet::new();
    for p in &pairs {
        assert!(eligible.contains(&p.source) && eligible.contains(&p.target));
        assert_ne!(gold[p.source], gold[p.target]);
        assert!(seen.insert((p.source, p.target)), "repeated pair {p:?}");
    }
    assert_eq!(pairs, contrast_pairs(&gold, &eligible, 100, 7).unwrap());
    assert_ne!(pairs, contrast_pairs(&gold, &eligible, 100, 8).unwrap());
    // Capped at the number of possible pairs; one label only is an error.
    let all = contrast_pairs(&[0, 0, 1], &[0, 1, 2], 50, 0).unwrap();
    assert_eq!(all.len(), 4);
    assert!(contrast_pairs(&[2, 2, 2], &[0, 1, 2], 5, 0).is_err());
}

#[test]
fn class_mean_directions_match_a_direct_computation() {
    let (n, d, k) = (37, 5, 4);
    let x: Vec<f32> = lcg(3, n * d).iter().map(|&v| (v % 1000) as f32 / 100.0 - 5.0).collect();
    let classes: Vec<usize> = (0..n).map(|i| if i < 30 { i % 3 } else { 0 }).collect(); // class 3 is empty
    let dirs = class_mean_directions(&x, d, &classes, k, Versus::Rest).unwrap();
    assert!(dirs[3].is_none());
    for (c, dir) in dirs.iter().enumerate().take(3) {
        let mean = |keep: &dyn Fn(usize) -> bool| -> Vec<f64> {
            let rows: Vec<usize> = (0..n).filter(|&i| keep(classes[i])).collect();
            (0..d).map(|j| rows.iter().map(|&i| x[i * d + j] as f64).sum::<f64>() / rows.len() as f64).collect()
        };
        let (a, b) = (mean(&|g| g == c), mean(&|g| g != c));
        let got = dir.as_ref().unwrap();
        for j in 0..d {
            assert!((got[j] as f64 - (a[j] - b[j])).abs() < 1e-5, "class {c} dim {j}: {} vs {}", got[j], a[j] - b[j]);
        }
    }
    let r = random_like(dirs[0].as_ref().unwrap(), 9);
    assert!((norm(&r) - norm(dirs[0].as_ref().unwrap())).abs() < 1e-4);
}
