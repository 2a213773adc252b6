//! `patchbay patch --shard i/n` + `patchbay merge` through the binary: the merged outputs are the
//! unsharded run's (the same experiments in the same order, the same predictions and flip rates,
//! logits equal but for the last bits: a shard batches other prompts together than the whole run),
//! shards hold whole targets and are balanced, and every way a set of shard directories can be
//! wrong is a one-line error.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use patchbay::experiments::patch::ExperimentResult;
use serde_json::Value;

fn patchbay(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn results(dir: &Path) -> Vec<ExperimentResult> {
    std::fs::read_to_string(dir.join("experiments.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A small sweep on a random 6-layer model: 9 prompts of uneven lengths, 14 random pairs.
struct Sweep {
    _model: tempfile::TempDir,
    tmp: tempfile::TempDir,
    model: String,
    ids: String,
}

impl Sweep {
    fn new() -> Sweep {
        let model = synth_family("llama", 6, 11);
        let tmp = tempfile::tempdir().unwrap();
        let ids = tmp.path().join("ids.json");
        std::fs::write(&ids, serde_json::to_string(&random_prompts(9, &[9, 13, 6, 11], 384, 21)).unwrap()).unwrap();
        Sweep { model: model.path().display().to_string(), ids: ids.display().to_string(), _model: model, tmp }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs the sweep (with `extra` arguments) into `name`; returns (exit code, stderr).
    fn run(&self, name: &str, extra: &[&str]) -> (i32, String) {
        let out = self.dir(name).display().to_string();
        let mut args = vec![
            "patch", "--model", &self.model, "--token-ids", &self.ids, "--label-token-ids", "3,50,7,200", "--random-pairs", "14", "--seed", "4",
            "--sites", "attn_out,mlp_out,resid_post", "--window", "3", "--batch-rows", "16", "--mem-budget", "64K", "--quiet", "--out", &out,
        ];
        args.extend_from_slice(extra);
        patchbay(&args)
    }

    fn ok(&self, name: &str, extra: &[&str]) -> PathBuf {
        let (code, err) = self.run(name, extra);
        assert_eq!(code, 0, "{name}: {err}");
        self.dir(name)
    }

    fn merge(&self, out: &str, shards: &[&str]) -> (i32, String) {
        let out = self.dir(out).display().to_string();
        let dirs: Vec<String> = shards.iter().map(|s| self.dir(s).display().to_string()).collect();
        let mut args = vec!["merge", "--quiet", "--out", &out];
        args.extend(dirs.iter().map(String::as_str));
        patchbay(&args)
    }

    /// Merging `shards` fails with one line naming every string of `expect`.
    fn merge_fails(&self, shards: &[&str], expect: &[&str]) {
        let (code, err) = self.merge("refused", shards);
        assert_eq!(code, 1, "merge of {shards:?} must fail: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line expected:\n{err}");
        assert!(err.starts_with("error: "), "{err}");
        for e in expect {
            assert!(err.contains(e), "merge of {shards:?}: `{e}` not in: {err}");
        }
        assert!(!self.dir("refused").join("experiments.jsonl").exists(), "a refused merge wrote outputs");
    }
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// Runs the sweep whole and in 3 shards, merges the shards, and compares: the merged files are
/// the whole run's, byte for byte (shards are whole target groups, and nothing is batched
/// across groups).
fn check_sharded_equals_whole(method: &str) {
    let s = Sweep::new();
    let whole = s.ok("whole", &["--method", method]);
    let all = results(&whole);
    let n_exps = 14 * 3 * 4;
    assert_eq!(all.len(), n_exps, "14 pairs x 3 sites x 4 centres");
    assert!(all.iter().enumerate().all(|(i, r)| r.id == i), "a finished run's experiments.jsonl is sorted by id");
    for i in 0..3 {
        s.ok(&format!("s{i}"), &["--method", method, "--shard", &format!("{i}/3")]);
    }
    // Shards hold whole targets, are disjoint, and balanced within one group's experiments.
    let mut owner: HashMap<usize, usize> = HashMap::new();
    let mut sizes = Vec::new();
    let mut per_target: HashMap<usize, usize> = HashMap::new();
    for i in 0..3 {
        let rs = results(&s.dir(&format!("s{i}")));
        assert!(rs.windows(2).all(|w| w[0].id < w[1].id), "shard {i}: sorted by id");
        for r in &rs {
            assert_eq!(*owner.entry(r.target).or_insert(i), i, "target {} is in two shards", r.target);
            *per_target.entry(r.target).or_default() += 1;
        }
        let m = manifest(&s.dir(&format!("s{i}")));
        assert_eq!(m["shard"], format!("{i}/3"));
        assert_eq!(m["experiments"], rs.len());
        assert_eq!(m["sweep_experiments"], n_exps);
        assert_eq!(m["complete"], true);
        sizes.push(rs.len());
    }
    assert_eq!(sizes.iter().sum::<usize>(), n_exps);
    // A clean run here holds 3 KiB per position (6 layers of f32 keys, values and resid_pre) and
    // prompts have at least 6 tokens, so a 64K group holds at most 3 targets.
    let largest_group = 3 * per_target.values().copied().max().unwrap();
    let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(hi - lo <= largest_group, "unbalanced shards {sizes:?} (largest group: at most {largest_group} experiments)");
    // Merged in any order: the whole run's files.
    let (code, err) = s.merge("merged", &["s2", "s0", "s1"]);
    assert_eq!(code, 0, "{err}");
    let merged = s.dir("merged");
    let m = results(&merged);
    assert_eq!(m.len(), all.len());
    for (w, m) in all.iter().zip(&m) {
        let name = format!("experiment {}", w.id);
        assert_eq!(w.id, m.id, "merged experiments.jsonl is sorted by id");
        for (a, b) in [(&w.patched, &m.patched), (&w.clean_target, &m.clean_target), (&w.clean_source, &m.clean_source)] {
            assert_eq!(a, b, "{name}");
        }
        assert_eq!(
            (w.target, w.source, &w.site, w.center, &w.layers, &w.positions, w.pred, w.target_pred, w.source_pred, w.flipped_to_source),
            (m.target, m.source, &m.site, m.center, &m.layers, &m.positions, m.pred, m.target_pred, m.source_pred, m.flipped_to_source),
            "{name}"
        );
    }
    assert_same_file(&whole.join("experiments.jsonl"), &merged.join("experiments.jsonl"));
    assert_same_file(&whole.join("summary.csv"), &merged.join("summary.csv"));
    // The heatmap shows the flip rates only: the same picture.
    assert_same_file(&whole.join("heatmap.png"), &merged.join("heatmap.png"));
    let (mut mw, mut mm) = (manifest(&whole), manifest(&merged));
    let shards = mm.as_object_mut().unwrap().remove("shards").unwrap();
    assert_eq!(shards.as_array().unwrap().iter().map(|p| p["shard"].as_str().unwrap()).collect::<Vec<_>>(), ["0/3", "1/3", "2/3"]);
    for m in [&mut mw, &mut mm] {
        for k in ["command_line", "seconds"] {
            m.as_object_mut().unwrap().remove(k).unwrap();
        }
    }
    assert_eq!(mw, mm, "manifests differ beyond command line and timings");
}

#[test]
fn resumed_shards_merge_to_the_unsharded_run() {
    check_sharded_equals_whole("resumed");
}

#[test]
fn naive_shards_merge_to_the_unsharded_run() {
    check_sharded_equals_whole("naive");
}

#[test]
fn wrong_sets_of_shards_are_one_line_errors() {
    let s = Sweep::new();
    for i in 0..3 {
        s.ok(&format!("s{i}"), &["--shard", &format!("{i}/3")]);
    }
    s.merge_fails(&["s0", "s2"], &["shard 1/3 is missing"]);
    s.merge_fails(&["s0", "s1", "s2", "s1"], &["shard 1/3 is given twice"]);
    // A copy of a shard under another name is still the same shard.
    let copy = s.dir("s1copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["experiments.jsonl", "manifest.json"] {
        std::fs::copy(s.dir("s1").join(f), copy.join(f)).unwrap();
    }
    s.merge_fails(&["s0", "s1", "s1copy", "s2"], &["shard 1/3 is given twice", "s1copy"]);
    // Another split of the same sweep.
    s.ok("h0", &["--shard", "0/2"]);
    s.merge_fails(&["h0", "s1", "s2"], &["h0", "1/3", "share one N"]);
    // Another sweep (other centres).
    s.ok("other", &["--shard", "1/3", "--layers", "1,2"]);
    s.merge_fails(&["s0", "other", "s2"], &["different sweeps", "other"]);
    s.ok("naive", &["--shard", "1/3", "--method", "naive"]);
    s.merge_fails(&["s0", "naive", "s2"], &["--method"]);
    // A killed shard.
    let (code, err) = s.run("killed", &["--shard", "1/3", "--stop-after", "3"]);
    assert_eq!(code, 1, "{err}");
    s.merge_fails(&["s0", "killed", "s2"], &["shard 1/3 is incomplete", "3 of", "--resume"]);
    // Resumed, it is the uninterrupted shard to the byte.
    s.ok("killed", &["--shard", "1/3", "--resume"]);
    assert_same_file(&s.dir("s1").join("experiments.jsonl"), &s.dir("killed").join("experiments.jsonl"));
    // An unsharded run is not a shard; a directory without a manifest is not a run.
    s.ok("whole", &[]);
    s.merge_fails(&["s0", "whole", "s2"], &["whole sweep"]);
    s.merge_fails(&["s0", "nothing", "s2"], &["nothing", "manifest.json"]);
    // An experiment in two shards (a tampered shard claiming one more).
    let tampered = s.dir("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    let line = std::fs::read_to_string(s.dir("s1").join("experiments.jsonl")).unwrap().lines().next().unwrap().to_string();
    let id = serde_json::from_str::<ExperimentResult>(&line).unwrap().id;
    std::fs::write(tampered.join("experiments.jsonl"), std::fs::read_to_string(s.dir("s0").join("experiments.jsonl")).unwrap() + &line + "\n").unwrap();
    let mut m = manifest(&s.dir("s0"));
    m["experiments"] = (m["experiments"].as_u64().unwrap() + 1).into();
    m["done"] = m["experiments"].clone();
    std::fs::write(tampered.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    s.merge_fails(&["tampered", "s1", "s2"], &[&format!("experiment {id} is in both"), "tampered"]);
    // The good set merges; not twice into the same directory.
    let (code, err) = s.merge("merged", &["s0", "s1", "s2"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = s.merge("merged", &["s0", "s1", "s2"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists"), "{err}");
    // A shard resumed into another shard's directory is refused.
    let (code, err) = s.run("s0", &["--shard", "1/3", "--resume"]);
    assert_eq!(code, 1);
    assert!(err.contains("holds shard 0/3"), "{err}");
    // --shard must be I/N with I < N (usage error).
    for bad in ["3/3", "1", "a/2", "0/0"] {
        let (code, err) = s.run("bad", &["--shard", bad]);
        assert_eq!(code, 2, "--shard {bad}: {err}");
    }
}
