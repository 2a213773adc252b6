//! `patchbay directions` through the binary on the llama fixture and the committed dataset:
//! the file contract, the values against a plain recomputation from the capture, one-vs-a-class,
//! the emulated device against the CPU, a re-run, and one-line errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use patchbay::experiments::shards::{ShardMeta, read_site};
use patchbay::io::tensorfile::TensorFile;

fn patchbay(args: &[String]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn data() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/emotions.csv").display().to_string()
}

/// `directions` on emotions.csv with `extra` flags into `out`; returns (exit code, stderr).
fn directions(out: &Path, extra: &[&str]) -> (i32, String) {
    let mut a: Vec<String> = ["directions", "--model", &fixture("llama").display().to_string(), "--dataset", &data()].iter().map(|s| s.to_string()).collect();
    a.extend(["--text-col", "text", "--label-col", "emotion", "--rename", "no-emotion=neutral", "--template", "tak", "--quiet", "--out"].iter().map(|s| s.to_string()));
    a.push(out.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    patchbay(&a)
}

fn run_ok(out: &Path, extra: &[&str]) {
    let (code, err) = directions(out, extra);
    assert_eq!(code, 0, "directions {extra:?}: {err}");
}

/// Each prompt's gold class name, from the CSV (with the rename the command is given).
fn gold() -> Vec<String> {
    let mut r = csv::Reader::from_path(data()).unwrap();
    let col = r.headers().unwrap().iter().position(|h| h == "emotion").unwrap();
    r.records().map(|rec| rec.unwrap()[col].replace("no-emotion", "neutral")).collect()
}

/// The file's tensors by name, and its metadata.
fn read(path: &Path) -> (BTreeMap<String, Vec<f32>>, BTreeMap<String, String>) {
    let mut f = TensorFile::open(path).unwrap();
    let names: Vec<String> = f.entries.keys().cloned().collect();
    let tensors = names.into_iter().map(|n| {
        let (shape, v) = f.read_f32(&n).unwrap();
        assert_eq!(shape, [v.len()], "{n}: a direction is one row");
        (n, v)
    }).collect();
    (tensors, f.metadata.clone().into_iter().collect())
}

/// Per prompt, the captured activations of `site` averaged over the positions: `[n][width]`.
fn prompt_means(acts: &Path, site: &str) -> Vec<Vec<f64>> {
    let meta = ShardMeta::load(acts).unwrap();
    let mut out = Vec::new();
    for k in 0..meta.n_shards {
        let (shape, x) = read_site(acts, k, site).unwrap();
        let (rows, n_pos, w) = (shape[0], shape[1], shape[2]);
        for r in 0..rows {
            out.push((0..w).map(|j| (0..n_pos).map(|p| x[(r * n_pos + p) * w + j] as f64).sum::<f64>() / n_pos as f64).collect());
        }
    }
    out
}

fn mean(rows: &[&Vec<f64>]) -> Vec<f64> {
    let w = rows[0].len();
    (0..w).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64).collect()
}

/// Every tensor equals mean(class) - mean(reference rows), recomputed from OUT/acts.
fn check_values(out: &Path, reference: Option<&str>) {
    let (tensors, meta) = read(&out.join("directions.safetensors"));
    let gold = gold();
    let classes: Vec<&str> = meta["classes"].split(',').collect();
    let sites: Vec<&str> = meta["sites"].split(',').collect();
    assert_eq!(tensors.len(), sites.len() * classes.len());
    assert!(reference.is_none_or(|r| !classes.contains(&r)), "the reference class has a direction");
    for site in &sites {
        let x = prompt_means(&out.join("acts"), site);
        assert_eq!(x.len(), gold.len());
        for c in &classes {
            let of = |keep: &dyn Fn(&str) -> bool| mean(&x.iter().zip(&gold).filter(|(_, g)| keep(g)).map(|(r, _)| r).collect::<Vec<_>>());
            let own = of(&|g| g == *c);
            let other = match reference {
                Some(r) => of(&|g| g == r),
                None => of(&|g| g != *c),
            };
            let got = &tensors[&format!("{site}/{c}")];
            assert_eq!(got.len(), own.len());
            for (j, v) in got.iter().enumerate() {
                let want = own[j] - other[j];
                assert!((*v as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{site}/{c}[{j}]: {v} vs {want}");
            }
        }
    }
}

#[test]
fn one_vs_rest_file_contract_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rest");
    run_ok(&out, &["--sites", "resid_post,blocks.1.hook_mlp_out", "--positions=-1..-2"]);
    let (tensors, meta) = read(&out.join("directions.safetensors"));
    assert_eq!(meta["format"], "patchbay-directions-1");
    assert_eq!(meta["method"], "class-mean");
    assert_eq!(meta["versus"], "rest");
    assert_eq!(meta["positions"], "-1,-2");
    assert_eq!(meta["classes"], "anger,fear,guilt,joy,neutral,pride,sadness");
    assert_eq!(meta["rows"], "anger=28,fear=28,guilt=28,joy=28,neutral=28,pride=28,sadness=28");
    assert_eq!(meta["sites"], "blocks.0.hook_resid_post,blocks.1.hook_mlp_out,blocks.1.hook_resid_post", "sites in forward order");
    assert!(tensors.contains_key("blocks.1.hook_resid_post/anger"));
    check_values(&out, None);
}

#[test]
fn one_vs_a_class_and_a_rerun_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("neutral");
    run_ok(&out, &["--versus", "neutral"]);
    check_values(&out, Some("neutral"));
    let before = std::fs::read(out.join("directions.safetensors")).unwrap();
    run_ok(&out, &["--versus", "neutral"]);
    assert_eq!(std::fs::read(out.join("directions.safetensors")).unwrap(), before, "a re-run over the kept capture wrote other bytes");
}

#[test]
fn the_emulated_device_gives_the_cpu_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, emu) = (dir.path().join("cpu"), dir.path().join("emu"));
    run_ok(&cpu, &[]);
    run_ok(&emu, &["--device", "emu"]);
    let ((a, _), (b, meta)) = (read(&cpu.join("directions.safetensors")), read(&emu.join("directions.safetensors")));
    assert!(meta["device"].starts_with("emu"), "device {}", meta["device"]);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        // bf16 weights on the device: the same direction to within a small angle.
        let y = &b[name];
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(x) * norm(y));
        assert!(cos > 0.99, "{name}: cosine {cos} between the cpu and emu directions");
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("e");
    let cases: [(&[&str], &str); 6] = [
        (&["--versus", "calm"], "--versus calm: not one of the classes"),
        (&["--positions", "all"], "directions need fixed positions"),
        (&["--sites", "resid_post", "--labels", "anger,joy", "--filter", "emotion=anger"], "class `joy` has no prompt"),
        (&["--sites", "blocks.9.hook_resid_post"], "blocks.9.hook_resid_post"),
        (&["--positions=-4000"], "need at least 4000"),
        (&["--labels", "anger", "--filter", "emotion=anger"], "need at least 2 classes"),
    ];
    for (extra, want) in cases {
        let (code, err) = directions(&out, extra);
        assert_ne!(code, 0, "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: expected `{want}` in: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: not one line: {err}");
    }
    assert!(!out.join("directions.safetensors").exists());
    assert!(!out.join("acts").exists(), "a bad input was found only after a capture");
}
