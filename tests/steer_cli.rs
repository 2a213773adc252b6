//! `patchbay steer --mode labels` through the binary on the fixture models, with vector files
//! written here from fresh random values: beta 0 is the clean run bit for bit, steered label
//! logits equal a direct reference forward (`run_prompts` with the op at the same site and
//! positions) on several layers, sites and positions, `--normalise`, project-set against
//! `learn::directions::project_set` applied by hand, a JSON spec file against the same flags,
//! the emulated device against the CPU, and one-line errors that write nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use patchbay::engine::{Engine, RunRequest};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, write};
use patchbay::learn::directions::{project_set, projector};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};
use serde_json::Value;

/// Label tokens of the fixtures' 384-token vocabulary.
const LABELS: &str = "a=40,b=65,c=262,d=300,e=13";
const LABEL_IDS: [u32; 5] = [40, 65, 262, 300, 13];

fn patchbay(args: &[String]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let base = std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0x5eed);
    (0..n).map(|i| patchbay::rng::gaussian(base ^ seed, 3, i as u64)).collect()
}

/// A vector file: `[width]` tensors `<site>/<class>` for every layer and the given kinds and
/// classes (fresh random values), plus the named extra tensors. Returns the tensors by name.
fn vector_file(path: &Path, model: &Model, kinds: &[SiteKind], classes: &[&str], extra: &[(&str, Vec<usize>, Vec<f32>)]) -> BTreeMap<String, Vec<f32>> {
    let cfg = &model.cfg;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut seed = 1;
    for &kind in kinds {
        let (n, w) = kind.units(cfg, 0);
        for l in 0..cfg.n_layers {
            for c in classes {
                seed += 1;
                tensors.insert(format!("{}/{c}", Site::new(l, kind)), (vec![n * w], seeded(n * w, seed)));
            }
        }
    }
    for (name, shape, v) in extra {
        tensors.insert(name.to_string(), (shape.clone(), v.clone()));
    }
    let list: Vec<(String, Vec<usize>, TensorData)> = tensors.iter().map(|(n, (s, v))| (n.clone(), s.clone(), TensorData::F32(v, OutDtype::F32))).collect();
    write(path, &list, &BTreeMap::from([("format".to_string(), "patchbay-directions-1".to_string())])).unwrap();
    tensors.into_iter().map(|(n, (_, v))| (n, v)).collect()
}

/// The fixture's prompts as a token-ids file.
fn ids_file(dir: &Path, family: &str) -> PathBuf {
    let p = dir.join("ids.json");
    std::fs::write(&p, serde_json::to_string(&prompt_ids(family)).unwrap()).unwrap();
    p
}

fn steer_args(family: &str, ids: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["steer", "--mode", "labels", "--model", &fixture(family).display().to_string(), "--token-ids", &ids.display().to_string(), "--label-token-ids", LABELS, "--quiet", "--out", &out.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn steer_ok(family: &str, ids: &Path, out: &Path, extra: &[&str]) {
    let (code, err) = patchbay(&steer_args(family, ids, out, extra));
    assert_eq!(code, 0, "steer {extra:?}: {err}");
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn logits(row: &Value) -> Vec<f32> {
    row["label_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Label logits of one prompt under `ivs` by a full forward (the reference).
fn reference(model: &Model, prompt: &[u32], ivs: &[Intervention]) -> Vec<f32> {
    let last = Positions::List(vec![-1]);
    model.run_prompts(&[prompt.to_vec()], &RunRequest { interventions: ivs, logits_at: Some(&last), logit_tokens: Some(&LABEL_IDS), ..Default::default() }).unwrap().logits
}

fn positions_of(spec: &str) -> Positions {
    TokenScope::parse(spec).unwrap().prompt.unwrap()
}

/// Every row of `rows` against the reference with `op(row)`; beta-0 rows of Add equal the clean
/// run of `out` bit for bit. Returns how many rows changed something.
fn check_rows(model: &Model, prompts: &[Vec<u32>], out: &Path, rows: &[Value], kind: SiteKind, positions: &str, op: &dyn Fn(&Value) -> Op) -> usize {
    let clean = jsonl(&out.join("clean.jsonl"));
    assert_eq!(clean.len(), prompts.len());
    for (i, c) in clean.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_close("clean", &logits(c), &reference(model, &prompts[i], &[]), F32_ATOL, F32_RTOL);
    }
    let mut changed = 0;
    for r in rows {
        let i = r["index"].as_u64().unwrap() as usize;
        let site = Site::new(r["layer"].as_u64().unwrap() as usize, kind);
        assert_eq!(r["site"], kind.short_name());
        let got = logits(r);
        let clean_logits = logits(&clean[i]);
        assert_eq!(r["clean_pred"], clean[i]["pred"]);
        if r["beta"].as_f64().unwrap() == 0.0 && matches!(op(r), Op::Add { .. }) {
            assert_eq!(got, clean_logits, "beta 0 must be the clean run bit for bit: {r}");
            continue;
        }
        let iv = Intervention { site, prompts: None, positions: positions_of(positions), units: None, op: op(r) };
        let want = reference(model, &prompts[i], &[iv]);
        assert_close(&format!("{r}"), &got, &want, F32_ATOL, F32_RTOL);
        changed += usize::from(got.iter().zip(&clean_logits).any(|(a, b)| (a - b).abs() > 1e-3));
    }
    changed
}

fn beta(r: &Value) -> f32 {
    r["beta"].as_f64().unwrap() as f32
}

#[test]
fn steered_rows_match_reference_forwards() {
    for (family, kind, positions, layers) in [("llama", SiteKind::ResidPost, "all", "0,1"), ("llama", SiteKind::ResidPre, "last:2", "1"), ("qwen2", SiteKind::MlpOut, "-1,0", "0..1"), ("gemma2", SiteKind::AttnOut, "last", "all")] {
        let model = Model::load(&fixture(family)).unwrap();
        let prompts = prompt_ids(family);
        let dir = tempfile::tempdir().unwrap();
        let vf = dir.path().join("dirs.safetensors");
        let tensors = vector_file(&vf, &model, &[kind], &["joy", "fear"], &[]);
        let ids = ids_file(dir.path(), family);
        let out = dir.path().join("out");
        let vector = format!("{}:joy", vf.display());
        steer_ok(family, &ids, &out, &["--vector", &vector, "--site", kind.short_name(), "--layers", layers, "--betas=-3,0,2.5", "--positions", positions, "--batch-rows", "20"]);
        let rows = jsonl(&out.join("scores.jsonl"));
        let n_layers = if layers == "1" { 1 } else { model.cfg.n_layers };
        // 3 betas x layers x 2 (direction and random control) x prompts.
        assert_eq!(rows.len(), 3 * n_layers * 2 * prompts.len(), "{family}");
        let direction: Vec<Value> = rows.iter().filter(|r| r["direction"] == "joy").cloned().collect();
        assert_eq!(direction.len(), rows.len() / 2);
        let op = |r: &Value| Op::Add { beta: beta(r), v: tensors[&format!("{}/joy", Site::new(r["layer"].as_u64().unwrap() as usize, kind))].clone(), normalize: false };
        let changed = check_rows(&model, &prompts, &out, &direction, kind, positions, &op);
        assert!(changed > 0, "{family}: steering changed nothing");
        let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
        assert!(summary.starts_with("layer,site,direction,beta,n,share:a,"), "{summary}");
        assert_eq!(summary.lines().count(), 1 + 3 * n_layers * 2);
        assert!(out.join("shares.png").exists() && out.join("manifest.json").exists());
    }
}

#[test]
fn normalise_and_sums_of_named_vectors() {
    let model = Model::load(&fixture("llama")).unwrap();
    let prompts = prompt_ids("llama");
    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("dirs.safetensors");
    let d = model.cfg.d_model;
    let tensors = vector_file(&vf, &model, &[SiteKind::ResidPost], &["joy", "fear"], &[("extra", vec![d], seeded(d, 99))]);
    let ids = ids_file(dir.path(), "llama");
    let out = dir.path().join("out");
    // joy (per layer) + an exact tensor name, normalised: adds beta (j + e) / |j + e|.
    let vector = format!("{}:joy+extra", vf.display());
    steer_ok("llama", &ids, &out, &["--vector", &vector, "--layers", "1", "--betas=4", "--positions", "last", "--normalise", "--no-random-control"]);
    let rows = jsonl(&out.join("scores.jsonl"));
    assert!(rows.iter().all(|r| r["direction"] == "joy+extra"));
    let op = |r: &Value| {
        let j = &tensors[&format!("{}/joy", Site::new(r["layer"].as_u64().unwrap() as usize, SiteKind::ResidPost))];
        let v: Vec<f32> = j.iter().zip(&tensors["extra"]).map(|(a, b)| a + b).collect();
        let n = patchbay::intervene::norm(&v);
        Op::Add { beta: beta(r), v: v.iter().map(|x| x / n).collect(), normalize: false }
    };
    assert!(check_rows(&model, &prompts, &out, &rows, SiteKind::ResidPost, "last", &op) > 0);
    // The engine's own normalisation (Op::Add { normalize: true }) is the same thing.
    let r = &rows[0];
    let j = &tensors["blocks.1.hook_resid_post/joy"];
    let v: Vec<f32> = j.iter().zip(&tensors["extra"]).map(|(a, b)| a + b).collect();
    let iv = Intervention { site: Site::new(1, SiteKind::ResidPost), prompts: None, positions: Positions::List(vec![-1]), units: None, op: Op::Add { beta: 4.0, v, normalize: true } };
    assert_close("normalize: true", &logits(r), &reference(&model, &prompts[r["index"].as_u64().unwrap() as usize], &[iv]), F32_ATOL, F32_RTOL);
}

#[test]
fn project_set_matches_the_update_applied_by_hand() {
    let model = Model::load(&fixture("llama")).unwrap();
    let cfg = &model.cfg;
    let d = cfg.d_model;
    let prompts = prompt_ids("llama");
    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("dirs.safetensors");
    let sub: Vec<f32> = seeded(3 * d, 7); // [3, d]
    let tensors = vector_file(&vf, &model, &[SiteKind::ResidPost], &["joy"], &[("sub", vec![3, d], sub.clone())]);
    let ids = ids_file(dir.path(), "llama");
    for (project, vector, rows_of) in [("sub", None, sub.clone()), ("blocks.0.hook_resid_post/joy+sub", Some("joy"), [tensors["blocks.0.hook_resid_post/joy"].clone(), sub.clone()].concat())] {
        let out = dir.path().join(format!("out-{}", vector.is_some()));
        let p_arg = format!("{}:{project}", vf.display());
        let mut args = vec!["--project", &p_arg, "--layers", "0", "--betas=1,0.5", "--positions", "-1,-2"];
        let v_arg = vector.map(|v| format!("{}:{v}", vf.display()));
        if let Some(v) = &v_arg {
            args.extend(["--vector", v]);
        }
        steer_ok("llama", &ids, &out, &args);
        let p = projector(&rows_of, d).unwrap();
        let v = match vector {
            Some(_) => tensors["blocks.0.hook_resid_post/joy"].clone(),
            None => vec![0.0; d],
        };
        let rows = jsonl(&out.join("scores.jsonl"));
        assert_eq!(rows.len(), 2 * prompts.len(), "project-set has no random control");
        let direction = match vector {
            None => format!("project-out:{project}"),
            Some(v) => format!("project-set:{v}:{project}"),
        };
        assert!(rows.iter().all(|r| r["direction"] == direction.as_str()), "{direction}: {}", rows[0]);
        let site = Site::new(0, SiteKind::ResidPost);
        let pos = Positions::List(vec![-1, -2]);
        for r in &rows {
            let prompt = &prompts[r["index"].as_u64().unwrap() as usize];
            // The clean activation at the site, updated by hand, patched in.
            let caps = [Capture { site, positions: pos.clone() }];
            let mut x = model.run_prompts(std::slice::from_ref(prompt), &RunRequest { captures: &caps, ..Default::default() }).unwrap().captured.remove(0).data; // [2, d]
            project_set(&mut x, d, beta(r), &p, &v);
            let iv = Intervention { site, prompts: None, positions: pos.clone(), units: None, op: Op::Patch { values: x } };
            assert_close(&format!("project {project}: {r}"), &logits(r), &reference(&model, prompt, &[iv]), F32_ATOL, F32_RTOL);
        }
        assert!(rows.iter().any(|r| r["pred"] != r["clean_pred"] || logits(r)[0] != logits(&jsonl(&out.join("clean.jsonl"))[r["index"].as_u64().unwrap() as usize])[0]));
    }
}

#[test]
fn spec_file_gives_the_rows_of_the_flags() {
    let model = Model::load(&fixture("llama")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("dirs.safetensors");
    vector_file(&vf, &model, &[SiteKind::ResidPost, SiteKind::MlpOut], &["joy", "fear"], &[]);
    let ids = ids_file(dir.path(), "llama");
    let v = |c: &str| format!("{}:{c}", vf.display());
    let flags = dir.path().join("flags");
    steer_ok("llama", &ids, &flags, &["--vector", &v("joy"), "--site", "mlp_out", "--layers", "0..1", "--betas=-2,3", "--positions", "last:2", "--normalise", "--seed", "5"]);
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, serde_json::json!([{"vector": v("joy"), "site": "mlp_out", "layers": [0, 1], "positions": "last:2", "betas": [-2.0, 3.0], "normalise": true}]).to_string()).unwrap();
    let from_spec = dir.path().join("spec");
    steer_ok("llama", &ids, &from_spec, &["--spec", &spec.display().to_string(), "--seed", "5"]);
    for f in ["scores.jsonl", "clean.jsonl", "summary.csv"] {
        assert_eq!(std::fs::read(flags.join(f)).unwrap(), std::fs::read(from_spec.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn emu_matches_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&fixture("llama")).unwrap();
    let vf = dir.path().join("dirs.safetensors");
    vector_file(&vf, &model, &[SiteKind::ResidPost], &["joy"], &[]);
    let ids = ids_file(dir.path(), "llama");
    let vector = format!("{}:joy", vf.display());
    let args = ["--vector", vector.as_str(), "--layers", "0,1", "--betas=-2,0,3", "--positions", "all", "--normalise"];
    let cpu = dir.path().join("cpu");
    steer_ok("llama", &ids, &cpu, &args);
    let emu = dir.path().join("emu");
    steer_ok("llama", &ids, &emu, &[&args[..], &["--device", "emu"]].concat());
    for f in ["clean.jsonl", "scores.jsonl"] {
        let (c, e) = (jsonl(&cpu.join(f)), jsonl(&emu.join(f)));
        assert_eq!(c.len(), e.len());
        for (c, e) in c.iter().zip(&e) {
            for key in ["index", "layer", "direction", "beta"] {
                assert_eq!(c.get(key), e.get(key), "{f}: rows in the same order");
            }
            assert_forward_close(&format!("{f}: emu vs cpu {c}"), &logits(e), &logits(c));
        }
    }
    // beta 0 is the device's own clean run bit for bit.
    let clean = jsonl(&emu.join("clean.jsonl"));
    for r in jsonl(&emu.join("scores.jsonl")).iter().filter(|r| r["beta"] == 0.0) {
        assert_eq!(logits(r), logits(&clean[r["index"].as_u64().unwrap() as usize]), "emu beta 0: {r}");
    }
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let model = Model::load(&fixture("llama")).unwrap();
    let d = model.cfg.d_model;
    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("dirs.safetensors");
    let mut nan = seeded(d, 3);
    nan[5] = f32::NAN;
    vector_file(&vf, &model, &[SiteKind::ResidPost], &["joy", "fear", "anger", "guilt", "shame", "pride", "trust", "disgust", "relief"], &[("narrow", vec![d - 1], seeded(d - 1, 2)), ("bad", vec![d], nan)]);
    let ids = ids_file(dir.path(), "llama");
    let v = |c: &str| format!("{}:{c}", vf.display());
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, serde_json::json!({"vector": v("joy"), "betas": [1.0], "beta": 2}).to_string()).unwrap();
    let spec_arg = spec.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--vector".into(), v("narrow"), "--betas=1".into()], "has width 63, but blocks.0.hook_resid_post has width 64"),
        (vec!["--vector".into(), v("sadness"), "--betas=1".into()], "no vector `sadness`"),
        (vec!["--vector".into(), v("joy"), "--layers".into(), "2".into(), "--betas=1".into()], "layer 2 is out of range"),
        (vec!["--vector".into(), v("joy"), "--betas=".into()], "betas: empty list"),
        (vec!["--vector".into(), v("bad"), "--betas=1".into()], "non-finite value (NaN) at element 5"),
        (vec!["--vector".into(), v("joy"), "--betas=1".into(), "--positions".into(), "last+generated".into()], "`generated` needs a command that generates"),
        (vec!["--spec".into(), spec_arg.clone()], "unknown field `beta`"),
        (vec!["--vector".into(), v("joy"), "--betas=1".into(), "--positions".into(), "40".into()], "position 40 is out of range"),
        (vec!["--vector".into(), format!("{}", vf.display()), "--betas=1".into()], "name one as"),
        (vec!["--vector".into(), v("joy"), "--site".into(), "pattern".into(), "--betas=1".into()], "site `pattern`"),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = patchbay(&steer_args("llama", &ids, &out, &a));
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{args:?}: not one line: {err}");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
        assert!(!out.exists(), "{args:?}: wrote {}", out.display());
    }
    // The missing name lists the available ones, abbreviated.
    let (_, err) = patchbay(&steer_args("llama", &ids, &dir.path().join("x"), &["--vector", &v("sadness"), "--betas=1"]));
    assert!(err.contains("available: bad, blocks.0.hook_resid_post/anger") && err.contains("in all)"), "{err}");
}

/// `--only-correct` on steer, ablate and components contrib keeps exactly the prompts `score`
/// finds the model predicts correctly (and refuses prompts without gold labels).
#[test]
fn only_correct_keeps_the_prompts_the_model_gets_right() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&fixture("llama")).unwrap();
    let vf = dir.path().join("dirs.safetensors");
    vector_file(&vf, &model, &[SiteKind::ResidPost], &["joy"], &[]);
    let ds = format!("{}/tests/data/emotions.csv", env!("CARGO_MANIFEST_DIR"));
    let m = fixture("llama").display().to_string();
    let data = ["--model", &m, "--dataset", &ds, "--label-col", "emotion", "--rename", "no-emotion=neutral", "--labels", "anger,joy,sadness", "--filter", "emotion=anger", "--filter", "emotion=joy", "--filter", "emotion=sadness", "--template", "tak", "--quiet"];
    let run = |cmd: &[&str], extra: &[&str], name: &str| -> std::path::PathBuf {
        let out = dir.path().join(name);
        let a: Vec<&str> = cmd.iter().chain(&data).chain(extra).copied().chain(["--out", out.to_str().unwrap()]).collect();
        let (code, err) = patchbay(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(code, 0, "{cmd:?}: {err}");
        out
    };
    let scores = read_jsonl(&run(&["score"], &[], "score").join("scores.jsonl"));
    let correct: Vec<u64> = scores.iter().filter(|s| s["correct"] == true).map(|s| s["index"].as_u64().unwrap()).collect();
    assert!(!correct.is_empty() && correct.len() < scores.len(), "{} of {}", correct.len(), scores.len());
    let vector = format!("{}:joy", vf.display());
    let steer = run(&["steer", "--mode", "labels"], &["--vector", &vector, "--layers", "1", "--betas=2", "--only-correct"], "steer");
    let ablate = run(&["ablate"], &["--heads", "0.1", "--op", "zero", "--only-correct"], "ablate");
    for out in [&steer, &ablate] {
        let clean = read_jsonl(&out.join("clean.jsonl"));
        assert_eq!(clean.len(), correct.len(), "{}", out.display());
        assert!(clean.iter().all(|c| c["pred"] == c["gold"]), "{}: a kept prompt is predicted wrongly", out.display());
    }
    let contrib = run(&["components", "contrib"], &["--vector", &vector, "--site", "resid_post", "--layer", "1", "--only-correct"], "contrib");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(contrib.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["n_prompts"].as_u64(), Some(correct.len() as u64));
    // No gold labels: refused.
    let ids = ids_file(dir.path(), "llama");
    let (code, err) = patchbay(&steer_args("llama", &ids, &dir.path().join("x"), &["--vector", &vector, "--layers", "1", "--betas=2", "--only-correct"]));
    assert!(code == 1 && err.contains("--only-correct needs a dataset with gold labels"), "{err}");
}
