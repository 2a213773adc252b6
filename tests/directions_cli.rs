//! `patchbay directions` through the binary on the llama fixture and the committed datasets
//! (emotions.csv, the SEV-like sev_tiny.jsonl): the file contract, the values of every method
//! against a plain recomputation (class-mean and context-averaged from the capture, probe
//! directions from the saved probe weights, unique-effect vectors orthogonal to the other
//! directions and the subspace's projector), one-vs-a-class, the emulated device against the
//! CPU, a re-run, and one-line errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use patchbay::experiments::shards::{ShardMeta, read_site};
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, TensorFile, write};
use patchbay::learn::directions::projector;

fn patchbay(args: &[String]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn data_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name).display().to_string()
}

fn data() -> String {
    data_file("emotions.csv")
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `directions` on emotions.csv with `extra` flags into `out`; returns (exit code, stderr).
fn directions(out: &Path, extra: &[&str]) -> (i32, String) {
    let mut a: Vec<String> = ["directions", "--model", &fixture("llama").display().to_string(), "--dataset", &data()].iter().map(|s| s.to_string()).collect();
    a.extend(["--text-col", "text", "--label-col", "emotion", "--rename", "no-emotion=neutral", "--template", "tak", "--quiet", "--out"].iter().map(|s| s.to_string()));
    a.push(out.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    patchbay(&a)
}

/// The run `what` failed with a one-line error holding `want`.
fn assert_fails(what: &str, (code, err): (i32, String), want: &str) {
    assert_ne!(code, 0, "{what} succeeded");
    assert!(err.contains(want), "{what}: expected `{want}` in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: not one line: {err}");
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

/// The file's tensors by name (every one a direction `[width]`, but a `<site>/subspace`
/// `[k, width]`), and its metadata.
fn read(path: &Path) -> (BTreeMap<String, Vec<f32>>, BTreeMap<String, String>) {
    let mut f = TensorFile::open(path).unwrap();
    let names: Vec<String> = f.entries.keys().cloned().collect();
    let tensors = names.into_iter().map(|n| {
        let (shape, v) = f.read_f32(&n).unwrap();
        if !n.ends_with("/subspace") {
            assert_eq!(shape, [v.len()], "{n}: a direction is one row");
        }
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

/// The directions in `emu` (made on the emulated device) are those in `cpu`, to within a small
/// angle (bf16 weights on the device).
fn assert_same_directions(cpu: &Path, emu: &Path) {
    let ((a, _), (b, meta)) = (read(&cpu.join("directions.safetensors")), read(&emu.join("directions.safetensors")));
    assert!(meta["device"].starts_with("emu"), "device {}", meta["device"]);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        let cos = cosine(x, &b[name]);
        assert!(cos > 0.99, "{name}: cosine {cos} between the cpu and emu directions");
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
    assert_same_directions(&cpu, &emu);
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
        assert_fails(&format!("{extra:?}"), directions(&out, extra), want);
    }
    assert!(!out.join("directions.safetensors").exists());
    assert!(!out.join("acts").exists(), "a bad input was found only after a capture");
}

/// `directions` with `args` (after the command name); returns (exit code, stderr).
fn directions_with(args: &[String]) -> (i32, String) {
    let mut a = strings(&["directions", "--quiet"]);
    a.extend(args.iter().cloned());
    patchbay(&a)
}

/// `directions --method context-averaged` on sev_tiny.jsonl into `out`.
fn context_averaged(out: &Path, extra: &[&str]) -> (i32, String) {
    let mut a = strings(&["--method", "context-averaged", "--model", &fixture("llama").display().to_string(), "--dataset", &data_file("sev_tiny.jsonl"), "--out", &out.display().to_string()]);
    a.extend(strings(extra));
    directions_with(&a)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

#[test]
fn context_averaged_values_are_the_mean_per_scenario_differences() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sev");
    let (code, err) = context_averaged(&out, &["--sites", "blocks.1.hook_resid_post,blocks.0.hook_mlp_out", "--positions=-1..-2", "--template", "Context: {text} Feeling:"]);
    assert_eq!(code, 0, "{err}");
    let (tensors, meta) = read(&out.join("directions.safetensors"));
    assert_eq!(meta["format"], "patchbay-directions-1");
    assert_eq!(meta["method"], "context-averaged");
    assert_eq!(meta["versus"], "neutral");
    assert_eq!(meta["classes"], "negative,positive");
    assert_eq!(meta["rows"], "negative=5,neutral=5,positive=5");
    assert_eq!(meta["scenarios"], "5");
    assert_eq!(meta["context"], "{scenario}. {event}");
    assert_eq!(meta["sites"], "blocks.0.hook_mlp_out,blocks.1.hook_resid_post");
    assert_eq!(tensors.len(), 4);
    // Prompts go scenario by scenario, the variants sorted: negative, neutral, positive.
    for site in meta["sites"].split(',') {
        let x = prompt_means(&out.join("acts"), site);
        assert_eq!(x.len(), 15);
        for (v, name) in [(0, "negative"), (2, "positive")] {
            let got = &tensors[&format!("{site}/{name}")];
            for (j, g) in got.iter().enumerate() {
                let want = (0..5).map(|s| x[3 * s + v][j] - x[3 * s + 1][j]).sum::<f64>() / 5.0;
                assert!((*g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{site}/{name}[{j}]: {g} vs {want}");
            }
        }
    }
    // One variant against another, over the first 3 scenarios, and another context.
    let out2 = dir.path().join("sev2");
    let (code, err) = context_averaged(&out2, &["--sites", "blocks.1.hook_resid_post", "--labels", "positive,negative", "--versus", "negative", "--limit", "3", "--context", "{event} ({scenario})"]);
    assert_eq!(code, 0, "{err}");
    let (tensors, meta) = read(&out2.join("directions.safetensors"));
    assert_eq!((meta["classes"].as_str(), meta["rows"].as_str(), meta["scenarios"].as_str()), ("positive", "positive=3,negative=3", "3"));
    let x = prompt_means(&out2.join("acts"), "blocks.1.hook_resid_post");
    let got = &tensors["blocks.1.hook_resid_post/positive"];
    for (j, g) in got.iter().enumerate() {
        let want = (0..3).map(|s| x[2 * s][j] - x[2 * s + 1][j]).sum::<f64>() / 3.0;
        assert!((*g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "[{j}]: {g} vs {want}");
    }
}

#[test]
fn context_averaged_on_the_emulated_device_gives_the_cpu_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, emu) = (dir.path().join("cpu"), dir.path().join("emu"));
    let flags = ["--sites", "blocks.1.hook_resid_post", "--limit", "2"];
    for (out, device) in [(&cpu, "cpu"), (&emu, "emu")] {
        let (code, err) = context_averaged(out, &[&flags[..], &["--device", device]].concat());
        assert_eq!(code, 0, "{device}: {err}");
    }
    assert_same_directions(&cpu, &emu);
}

#[test]
fn probe_directions_are_the_saved_probe_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("probe");
    let mut a = strings(&["probe", "--model", &fixture("llama").display().to_string(), "--dataset", &data()]);
    a.extend(strings(&["--text-col", "text", "--label-col", "emotion", "--rename", "no-emotion=neutral", "--numeric-cols", "pleasantness,suddenness", "--no-score"]));
    a.extend(strings(&["--sites", "blocks.1.hook_resid_post,blocks.1.hook_mlp_out", "--positions=-1,-2", "--bootstrap", "10", "--quiet", "--out", &run.display().to_string()]));
    let (code, err) = patchbay(&a);
    assert_eq!(code, 0, "probe: {err}");
    let probes = run.join("probes");
    let out = dir.path().join("dirs");
    let base = strings(&["--method", "probe", "--probe-weights", &probes.display().to_string(), "--out", &out.display().to_string()]);
    let (code, err) = directions_with(&[&base[..], &strings(&["--positions=-2"])].concat());
    assert_eq!(code, 0, "{err}");
    let (tensors, meta) = read(&out.join("directions.safetensors"));
    assert_eq!(meta["method"], "probe");
    assert_eq!(meta["positions"], "-2");
    assert_eq!(meta["classes"], "anger,fear,guilt,joy,neutral,pride,sadness,pleasantness,suddenness");
    assert_eq!(meta["sites"], "blocks.1.hook_mlp_out,blocks.1.hook_resid_post");
    assert!(meta["space"].starts_with("activation"), "{}", meta["space"]);
    assert_eq!(meta["config_sha256"].len(), 64);
    assert_eq!(tensors.len(), 18);
    for site in ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"] {
        let mut f = TensorFile::open(&probes.join(format!("{site}.safetensors"))).unwrap();
        assert!(f.metadata["space"].starts_with("weights act on raw activations"));
        // The saved weights act on raw activations: the standardised fit's weights / scale.
        for (kind, names) in [("logreg", &["anger", "fear", "guilt", "joy", "neutral", "pride", "sadness"][..]), ("ridge", &["pleasantness", "suddenness"][..])] {
            let (shape, w) = f.read_f32(&format!("pos-2.{kind}.weight")).unwrap();
            assert_eq!(shape[0], names.len());
            for (c, row) in w.chunks(shape[1]).enumerate() {
                assert_eq!(&tensors[&format!("{site}/{}", names[c])], row, "{site}/{}", names[c]);
            }
        }
    }
    // A selection of names and of sites.
    let (code, err) = directions_with(&[&base[..], &strings(&["--labels", "suddenness,joy", "--sites", "resid_post"])].concat());
    assert_eq!(code, 0, "{err}");
    let (tensors, meta) = read(&out.join("directions.safetensors"));
    assert_eq!((meta["classes"].as_str(), meta["positions"].as_str()), ("suddenness,joy", "-1"));
    assert_eq!(tensors.keys().collect::<Vec<_>>(), ["blocks.1.hook_resid_post/joy", "blocks.1.hook_resid_post/suddenness"]);
    let cases: [(&[&str], &str); 4] = [
        (&["--positions=-3"], "no probe at position -3 (the probes are at -1,-2)"),
        (&["--positions=-1,-2"], "give one position"),
        (&["--labels", "calm"], "no probe for `calm`"),
        (&["--sites", "attn_out"], "--sites attn_out: no such site in the probe weights"),
    ];
    for (extra, want) in cases {
        assert_fails(&format!("{extra:?}"), directions_with(&[&base[..], &strings(extra)].concat()), want);
    }
}

#[test]
fn unique_effect_vectors_are_orthogonal_to_the_others_and_the_subspace_projects() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rest");
    run_ok(&src, &["--sites", "blocks.1.hook_resid_post,blocks.1.hook_mlp_out"]);
    let from = src.join("directions.safetensors");
    let (v, _) = read(&from);
    let out = dir.path().join("unique");
    let base = strings(&["--method", "unique-effect", "--from", &from.display().to_string(), "--out", &out.display().to_string()]);
    let set = ["anger", "fear", "joy", "neutral"];
    let (code, err) = directions_with(&[&base[..], &strings(&["--labels", &set.join(",")])].concat());
    assert_eq!(code, 0, "{err}");
    let (u, meta) = read(&out.join("directions.safetensors"));
    assert_eq!(meta["method"], "unique-effect");
    assert_eq!(meta["source_method"], "class-mean");
    assert_eq!(meta["versus"], "rest", "the source's provenance is kept");
    assert_eq!(meta["classes"], "anger.unique,fear.unique,joy.unique,neutral.unique");
    assert_eq!(u.len(), 2 * (set.len() + 1));
    for site in ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"] {
        let width = v[&format!("{site}/anger")].len();
        for (i, a) in set.iter().enumerate() {
            let ui = &u[&format!("{site}/{a}.unique")];
            for b in set.iter().filter(|b| *b != a) {
                let cos = cosine(ui, &v[&format!("{site}/{b}")]);
                assert!(cos.abs() < 1e-5, "{site}: {a}.unique . {b} has cosine {cos}");
            }
            assert!(dot(ui, &v[&format!("{site}/{a}")]) > 0.0, "{site}: {a}.unique points away from {a} ({i})");
        }
        // P from the saved subspace: symmetric, idempotent, and it keeps every direction of the set.
        let basis = &u[&format!("{site}/subspace")];
        assert_eq!(basis.len(), set.len() * width);
        let p = projector(basis, width).unwrap();
        for i in 0..width {
            for j in 0..width {
                assert!((p[i * width + j] - p[j * width + i]).abs() < 1e-5, "{site}: P[{i},{j}] != P[{j},{i}]");
                let pp = dot(&p[i * width..(i + 1) * width], &(0..width).map(|r| p[r * width + j]).collect::<Vec<_>>());
                assert!((pp - p[i * width + j] as f64).abs() < 1e-5, "{site}: (PP)[{i},{j}] = {pp}, P = {}", p[i * width + j]);
            }
        }
        for a in set {
            let va = &v[&format!("{site}/{a}")];
            let pv: Vec<f32> = p.chunks(width).map(|row| dot(row, va) as f32).collect();
            let err = pv.iter().zip(va).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5 * dot(va, va).sqrt() as f32, "{site}: |P {a} - {a}| = {err}");
        }
    }
    // Bad sets: one-vs-rest directions of equal-sized classes sum to zero, so all 7 are dependent.
    let all = "anger,fear,guilt,joy,neutral,pride,sadness";
    let uneven = dir.path().join("uneven.safetensors");
    let ones = [1.0f32; 4];
    let one = |n: usize| TensorData::F32(&ones[..n], OutDtype::F32);
    let md = BTreeMap::from([("format".to_string(), "patchbay-directions-1".to_string())]);
    write(&uneven, &[("blocks.0.hook_resid_post/a".into(), vec![4], one(4)), ("blocks.0.hook_resid_post/b".into(), vec![3], one(3))], &md).unwrap();
    let not_dirs = dir.path().join("not.safetensors");
    write(&not_dirs, &[("x".into(), vec![2], one(2))], &BTreeMap::new()).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (strings(&["--labels", all]), "blocks.1.hook_mlp_out, set [anger, fear, guilt, joy, neutral, pride, sadness]: directions are linearly dependent: `sadness` lies in the span of the directions before it"),
        (strings(&["--labels", "anger,anger"]), "label `anger` is listed twice"),
        (strings(&["--labels", "anger,calm"]), "blocks.1.hook_mlp_out: no direction `calm` (the site has: anger, fear, guilt, joy, neutral, pride, sadness)"),
        (strings(&["--labels", "anger", "--sites", "attn_out"]), "--sites attn_out: no such site in"),
        (strings(&[]), "--method unique-effect needs --labels (the set)"),
        (strings(&["--labels", "anger", "--positions=-1"]), "--positions does not apply to --method unique-effect"),
        (strings(&["--labels", "a,b", "--from", &uneven.display().to_string()]), "`blocks.0.hook_resid_post/b` has width 3 but `blocks.0.hook_resid_post/a` has width 4"),
        (strings(&["--labels", "x", "--from", &not_dirs.display().to_string()]), "not a directions file"),
    ];
    for (extra, want) in cases {
        let args = match extra.iter().any(|e| e == "--from") {
            true => [&strings(&["--method", "unique-effect", "--out", &out.display().to_string()])[..], &extra[..]].concat(),
            false => [&base[..], &extra[..]].concat(),
        };
        assert_fails(&format!("{extra:?}"), directions_with(&args), want);
    }
}

#[test]
fn bad_method_input_is_a_one_line_error_before_any_capture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e");
    let cases: [(&[&str], &str); 6] = [
        (&["--versus", "calm"], "--versus calm: not one of the variants [negative, neutral, positive]"),
        (&["--labels", "positive,happy"], "line 1: no event variant `happy` (the variants are: negative, neutral, positive)"),
        (&["--text-col", "scenario"], "--preset, --format, --encoding, --text-col, --label-col, --numeric-cols, --rename or --filter does not apply to --method context-averaged"),
        (&["--probe-weights", "x"], "--probe-weights does not apply to --method context-averaged"),
        (&["--context", "{scenario} then"], "context template `{scenario} then` needs exactly one {scenario} and one {event}"),
        (&["--labels", "positive", "--versus", "positive"], "directions against a class need at least 2 classes"),
    ];
    for (extra, want) in cases {
        assert_fails(&format!("{extra:?}"), context_averaged(&out, extra), want);
    }
    assert_fails("no probe weights", directions_with(&strings(&["--method", "probe", "--out", &out.display().to_string()])), "--method probe needs --probe-weights FILE|DIR");
    assert_fails("no model", directions_with(&strings(&["--dataset", &data(), "--out", &out.display().to_string()])), "--method class-mean needs --model");
    assert!(!out.join("acts").exists(), "a bad input was found only after a capture");
}
