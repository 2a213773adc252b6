//! Non-finite values (issue 14, item 1): checkpoints made hostile in the test (NaN in one
//! q_proj weight, +Inf in an MLP weight, MLP weights that overflow f32 in the activations, NaN
//! in the embedding row of a token only one prompt holds) stop every command with one line naming
//! the prompt and the first site where the values appeared (cpu and the emulated device), leave
//! no output claiming success, and `--allow-nonfinite` writes the values with their count. The
//! site the engine names is checked against a brute-force capture of every site on the CPU.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{copy_checkpoint_edited, fixture, patchbay_cli, random_prompts, read_jsonl, read_tensors};
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::finite::Checked;
use patchbay::engine::{Engine, RunRequest};
use patchbay::intervene::Capture;
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};
use safetensors::Dtype;

type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// A hostile checkpoint: its name, the edit, and the site where its non-finite values appear
/// first (as the brute-force check must also find).
struct Case {
    name: &'static str,
    edit: fn(&mut Tensors),
    first: &'static str,
}

fn set(t: &mut Tensors, name: &str, f: impl Fn(usize, f32) -> f32) {
    let (_, data) = t.get_mut(name).unwrap_or_else(|| panic!("no tensor {name}"));
    data.iter_mut().enumerate().for_each(|(i, v)| *v = f(i, *v));
}

const CASES: [Case; 3] = [
    Case { name: "NaN in one q_proj weight", edit: |t| set(t, "model.layers.1.self_attn.q_proj.weight", |i, v| if i == 0 { f32::NAN } else { v }), first: "blocks.1.attn.hook_q" },
    Case { name: "+Inf in one up_proj weight", edit: |t| set(t, "model.layers.0.mlp.up_proj.weight", |i, v| if i == 5 { f32::INFINITY } else { v }), first: "blocks.0.mlp.hook_post" },
    Case {
        name: "gate/up weights x 1e25 (finite, overflow in act(gate) * up)",
        edit: |t| {
            set(t, "model.layers.1.mlp.gate_proj.weight", |_, v| v * 1e25);
            set(t, "model.layers.1.mlp.up_proj.weight", |_, v| v * 1e25);
        },
        first: "blocks.1.mlp.hook_post",
    },
];

const DEVICES: [&str; 2] = ["cpu", "emu"];

fn prompts() -> Vec<Vec<u32>> {
    random_prompts(4, &[5, 7, 6, 9], 370, 14)
}

/// The llama fixture with `edit` applied, in a temp dir.
fn hostile(edit: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_checkpoint_edited(&fixture("llama"), dir.path(), Dtype::BF16, 1, edit);
    dir
}

fn write_ids(dir: &Path, prompts: &[Vec<u32>]) -> PathBuf {
    let p = dir.join("ids.json");
    std::fs::write(&p, serde_json::to_vec(prompts).unwrap()).unwrap();
    p
}

/// The first site (forward order; patterns and per-head results aside, as the engine's search)
/// where prompt `p` is not finite, by capturing every site at once on the unchecked CPU model.
fn brute_force_first(model: &Model, prompts: &[Vec<u32>], p: usize) -> String {
    let sites: Vec<Site> = Site::all(&model.cfg).into_iter().filter(|s| !matches!(s.kind, SiteKind::Pattern | SiteKind::HeadOut)).collect();
    let captures: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect();
    let out = model.run_prompts(prompts, &RunRequest { captures: &captures, ..Default::default() }).unwrap();
    for c in &out.captured {
        let w: usize = c.token_shape.iter().product();
        let start: usize = c.positions[..p].iter().map(Vec::len).sum();
        if c.data[start * w..(start + c.positions[p].len()) * w].iter().any(|v| !v.is_finite()) {
            return c.site.to_string();
        }
    }
    "logits".into()
}

fn expect_nonfinite(r: patchbay::Result<()>, prompt: usize, site: &str, what: &str) {
    match r {
        Err(patchbay::Error::NonFinite { prompt: p, site: s }) => assert_eq!((p, s.as_str()), (prompt, site), "{what}"),
        Err(e) => panic!("{what}: another error: {e}"),
        Ok(()) => panic!("{what}: no error"),
    }
}

#[test]
fn the_engine_names_the_first_site_the_brute_force_capture_finds() {
    let prompts = prompts();
    let logits = Positions::List(vec![-1]);
    let req = RunRequest { logits_at: Some(&logits), ..Default::default() };
    for case in &CASES {
        let dir = hostile(case.edit);
        let model = Model::load(dir.path()).unwrap();
        let want = brute_force_first(&model, &prompts, 0);
        assert_eq!(want, case.first, "{}: the brute-force capture", case.name);
        let (_, driver) = common::kernels::test_driver(FiberOrder::Forward);
        let device = DeviceModel::upload(&model, driver).unwrap();
        let engines: [(&str, Box<dyn Engine + '_>); 2] = [("cpu", Box::new(Checked::new(&model, false))), ("emu", Box::new(Checked::new(device, false)))];
        for (name, engine) in &engines {
            let what = format!("{} on {name}", case.name);
            expect_nonfinite(engine.run_prompts(&prompts, &req).map(|_| ()), 0, &want, &format!("{what}: run_prompts"));
            expect_nonfinite(engine.run_clean(&prompts, &req).map(|_| ()), 0, &want, &format!("{what}: run_clean"));
            let mut seqs: Vec<_> = prompts.iter().map(|_| engine.start_decode().unwrap()).collect();
            let tokens: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let r = engine.decode(&mut seqs.iter_mut().collect::<Vec<_>>(), &tokens, &req);
            expect_nonfinite(r.map(|_| ()), 0, &want, &format!("{what}: decode of the prompts"));
        }
    }
    // The device's own count of a call's non-finite values == the host's count of what it returned.
    let dir = hostile(CASES[1].edit);
    let model = Model::load(dir.path()).unwrap();
    let (_, driver) = common::kernels::test_driver(FiberOrder::Forward);
    let device = DeviceModel::upload(&model, driver).unwrap();
    let captures: Vec<Capture> = [SiteKind::MlpPost, SiteKind::Pattern, SiteKind::ResidPost].iter().map(|&k| Capture { site: Site::new(0, k), positions: Positions::All }).collect();
    let all = Positions::All;
    let out = device.run_prompts(&prompts, &RunRequest { captures: &captures, logits_at: Some(&all), ..Default::default() }).unwrap();
    let host = out.logits.iter().chain(out.captured.iter().flat_map(|c| &c.data)).filter(|v| !v.is_finite()).count() as u64;
    assert!(host > 0);
    assert_eq!(out.nonfinite, Some(host));
    // A finite model passes unchanged, with nothing counted.
    let model = Model::load(&fixture("llama")).unwrap();
    let checked = Checked::new(&model, false);
    let a = checked.run_prompts(&prompts, &req).unwrap();
    let b = model.run_prompts(&prompts, &req).unwrap();
    assert_eq!(a.logits, b.logits);
    assert_eq!(checked.nonfinite_values(), 0);
}

/// Runs a command; returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    patchbay_cli(args)
}

fn assert_one_line_error(code: i32, err: &str, prompt: usize, site: &str, what: &str) {
    assert_eq!(code, 1, "{what}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: {err}");
    let want = format!("error: prompt {prompt}: the model's outputs are not finite (NaN or Inf), first at {site};");
    assert!(lines[0].starts_with(&want), "{what}: {err}\nwant: {want}");
}

#[test]
fn commands_stop_with_one_line_naming_the_prompt_and_site_and_write_nothing_claiming_success() {
    let prompts = prompts();
    for case in &CASES {
        let dir = hostile(case.edit);
        let m = dir.path().to_str().unwrap();
        let ids = write_ids(dir.path(), &prompts);
        let ids = ids.to_str().unwrap();
        for device in DEVICES {
            let what = format!("{} on {device}", case.name);
            let acts = dir.path().join(format!("acts-{device}.safetensors"));
            let (code, err) = run(&["capture", "--model", m, "--device", device, "--token-ids", ids, "--sites", "resid_post", "--positions", "-1", "--quiet", "--out", acts.to_str().unwrap()]);
            assert_one_line_error(code, &err, 0, case.first, &format!("capture, {what}"));
            assert!(!acts.exists() && !acts.with_extension("safetensors.partial").exists(), "{what}: capture left a file");

            let out = dir.path().join(format!("score-{device}"));
            let (code, err) = run(&["score", "--model", m, "--device", device, "--token-ids", ids, "--label-token-ids", "3,50,7", "--quiet", "--out", out.to_str().unwrap()]);
            assert_one_line_error(code, &err, 0, case.first, &format!("score, {what}"));
            assert!(!out.join("score.json").exists() && !out.join("manifest.json").exists(), "{what}: score left a summary");

            let out = dir.path().join(format!("patch-{device}"));
            let (code, err) = run(&["patch", "--model", m, "--device", device, "--token-ids", ids, "--label-token-ids", "3,50,7", "--random-pairs", "3", "--sites", "resid_post", "--window", "1", "--quiet", "--out", out.to_str().unwrap()]);
            assert_eq!(code, 1, "patch, {what}: {err}");
            assert_eq!(err.lines().count(), 1, "patch, {what}: {err}");
            assert!(err.contains(&format!(": the model's outputs are not finite (NaN or Inf), first at {};", case.first)), "patch, {what}: {err}");
            assert!(!out.join("summary.csv").exists(), "{what}: patch left a summary");
            let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(manifest["complete"], false, "{what}: {manifest}");

            let out = dir.path().join(format!("generate-{device}"));
            let (code, err) = run(&["generate", "--model", m, "--device", device, "--token-ids", ids, "--max-new-tokens", "2", "--quiet", "--out", out.to_str().unwrap()]);
            assert_one_line_error(code, &err, 0, case.first, &format!("generate, {what}"));
        }
    }
}

#[test]
fn the_prompt_named_is_the_one_whose_token_is_poisoned_in_any_batch() {
    let prompts = prompts();
    // A token of prompt 2 that no other prompt holds: NaN in its embedding row only.
    let token = *prompts[2].iter().find(|t| prompts.iter().enumerate().all(|(i, p)| i == 2 || !p.contains(t))).unwrap();
    let dir = hostile(|t| set(t, "model.embed_tokens.weight", |i, v| if i / 64 == token as usize { f32::NAN } else { v }));
    let m = dir.path().to_str().unwrap();
    let ids = write_ids(dir.path(), &prompts);
    let ids = ids.to_str().unwrap();
    let labels: Vec<String> = (3..400).filter(|&i| i != token && i < 370).take(3).map(|i| i.to_string()).collect();
    let labels = labels.join(",");
    for device in DEVICES {
        for batch in ["1", "2", "8"] {
            let acts = dir.path().join("acts.safetensors");
            let (code, err) = run(&["capture", "--model", m, "--device", device, "--token-ids", ids, "--sites", "mlp_out", "--positions", "-1", "--batch-size", batch, "--quiet", "--out", acts.to_str().unwrap()]);
            assert_one_line_error(code, &err, 2, "blocks.0.hook_resid_pre", &format!("capture on {device}, batches of {batch}"));
        }
        let out = dir.path().join(format!("score-{device}"));
        let (code, err) = run(&["score", "--model", m, "--device", device, "--token-ids", ids, "--label-token-ids", &labels, "--batch-size", "3", "--quiet", "--out", out.to_str().unwrap()]);
        assert_one_line_error(code, &err, 2, "blocks.0.hook_resid_pre", &format!("score on {device}"));
    }
}

#[test]
fn allow_nonfinite_writes_the_values_with_their_count() {
    let prompts = prompts();
    let dir = hostile(CASES[0].edit);
    let m = dir.path().to_str().unwrap();
    let ids = write_ids(dir.path(), &prompts);
    let ids = ids.to_str().unwrap();
    for device in DEVICES {
        let acts = dir.path().join(format!("acts-{device}.safetensors"));
        let (code, err) = run(&["capture", "--model", m, "--device", device, "--token-ids", ids, "--sites", "q,resid_post", "--positions", "-1,-2", "--logits", "--allow-nonfinite", "--quiet", "--out", acts.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let bad: usize = read_tensors(&acts).values().map(|(_, v)| v.iter().filter(|x| !x.is_finite()).count()).sum();
        assert!(bad > 0);
        let bytes = std::fs::read(&acts).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["nonfinite_values"], bad.to_string(), "capture on {device}");

        let out = dir.path().join(format!("score-{device}"));
        let (code, err) = run(&["score", "--model", m, "--device", device, "--token-ids", ids, "--label-token-ids", "3,50,7", "--allow-nonfinite", "--quiet", "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let nulls: usize = read_jsonl(&out.join("scores.jsonl")).iter().map(|r| r["label_logits"].as_array().unwrap().iter().filter(|v| v.is_null()).count()).sum();
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert!(nulls > 0);
        assert_eq!(manifest["nonfinite_values"], nulls, "score on {device}");

        // patch writes NaN as null and reads its own file back (summary included).
        let out = dir.path().join(format!("patch-{device}"));
        let (code, err) = run(&["patch", "--model", m, "--device", device, "--token-ids", ids, "--label-token-ids", "3,50,7", "--random-pairs", "3", "--sites", "resid_post", "--window", "1", "--allow-nonfinite", "--quiet", "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["complete"], true);
        assert!(manifest["nonfinite_values"].as_u64().unwrap() > 0, "{manifest}");
        assert!(read_jsonl(&out.join("experiments.jsonl")).iter().any(|r| r["patched"][0].is_null()));
    }
}

#[test]
fn probe_refuses_nonfinite_features_naming_the_file_layer_and_row() {
    let dir = hostile(CASES[1].edit);
    let m = dir.path().to_str().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/emotions.csv");
    let out = dir.path().join("probe");
    let base = ["probe", "--model", m, "--dataset", data.to_str().unwrap(), "--label-col", "emotion", "--limit", "30", "--template", "tak", "--sites", "mlp_in,mlp_out", "--positions", "-1", "--folds", "2", "--quiet", "--out", out.to_str().unwrap()];
    let (code, err) = run(&base);
    assert_one_line_error(code, &err, 0, "blocks.0.mlp.hook_post", "probe");
    let (code, err) = run(&[&base[..], &["--allow-nonfinite"]].concat());
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // mlp_in of layer 0 is finite; mlp_out of layer 0 is the first features that are not.
    assert!(err.contains("shard-00000.safetensors: tensor `blocks.0.hook_mlp_out` (layer 0), row 0 (prompt 0): the features are not finite"), "{err}");
    assert!(!out.join("probe_results.csv").exists());
}
