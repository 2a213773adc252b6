//! `patchbay patch` through the binary: outputs, a killed run resumed to the same
//! experiments.jsonl as an uninterrupted one, and naive == resumed.

mod common;

use std::process::Command;

use common::*;
use patchbay::experiments::patch::ExperimentResult;

fn patchbay(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn results(dir: &std::path::Path) -> Vec<ExperimentResult> {
    std::fs::read_to_string(dir.join("experiments.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn killed_sweep_resumes_to_the_same_results() {
    let model = synth_family("llama", 6, 3);
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&random_prompts(6, &[9, 12, 7], 384, 5)).unwrap()).unwrap();
    let (m, i) = (model.path().to_str().unwrap(), ids.to_str().unwrap());
    let out = |name: &str| tmp.path().join(name);
    let args = |dir: &std::path::Path| -> Vec<String> {
        ["patch", "--model", m, "--token-ids", i, "--label-token-ids", "3,50,7,200", "--random-pairs", "5", "--seed", "1", "--sites", "attn_out,resid_post", "--window", "3", "--quiet", "--out", dir.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |dir: &std::path::Path, extra: &[&str]| {
        let mut a = args(dir);
        a.extend(extra.iter().map(|s| s.to_string()));
        patchbay(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Uninterrupted.
    let (code, err) = run(&out("full"), &[]);
    assert_eq!(code, 0, "{err}");
    let full = std::fs::read(out("full").join("experiments.jsonl")).unwrap();
    let rows = results(&out("full"));
    assert_eq!(rows.len(), 5 * 2 * 4, "5 pairs x 2 sites x 4 centres");
    let summary = std::fs::read_to_string(out("full").join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 1 + 2 * 4, "{summary}");
    // Killed after 7 experiments, with a torn line at the end; then resumed.
    let (code, err) = run(&out("killed"), &["--stop-after", "7"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(results(&out("killed")).len(), 7);
    let mut f = std::fs::OpenOptions::new().append(true).open(out("killed").join("experiments.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\": 3, \"tar").unwrap();
    let (code, err) = run(&out("killed"), &[]);
    assert_ne!(code, 0, "an existing sweep without --resume must be refused");
    assert!(err.contains("--resume"), "{err}");
    let (code, err) = run(&out("killed"), &["--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(out("killed").join("experiments.jsonl")).unwrap() == full, "resumed experiments.jsonl differs from the uninterrupted run");
    // A different sweep in the same directory is refused.
    let mut other = args(&out("killed"));
    let w = other.iter().position(|s| s == "--window").unwrap() + 1;
    other[w] = "1".into();
    other.push("--resume".into());
    let (code, err) = patchbay(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert!(err.contains("different sweep"), "{err}");
    // The naive method gives the same numbers.
    let (code, err) = run(&out("naive"), &["--method", "naive"]);
    assert_eq!(code, 0, "{err}");
    let mut naive = results(&out("naive"));
    naive.sort_by_key(|r| r.id);
    let mut resumed = rows;
    resumed.sort_by_key(|r| r.id);
    for (r, n) in resumed.iter().zip(&naive) {
        assert_close(&format!("experiment {}", r.id), &r.patched, &n.patched, F32_ATOL, F32_RTOL);
        assert_eq!(r.pred, n.pred);
    }
}
