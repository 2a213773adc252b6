//! Steering against an independent Hugging Face implementation (forward hooks on the HF modules):
//! every family's fixture model, the residual site kinds (resid_pre, resid_post, attn_out,
//! mlp_out) at every layer, positions `all` and the last token, four betas (0 and a negative one
//! among them) with a vector raw and normalised, the sum of two vectors, and x <- x + v - beta P x
//! onto a 2-dim subspace. The CPU reference matches at f32 tolerances (and beta = 0 is its clean
//! run bit for bit); the device forward (the emulator or PATCHBAY_TEST_DEVICE's GPU) at the bf16
//! forward tolerances for llama and gemma2 (post-norm attn_out/mlp_out, soft-capped logits), on
//! a third of the cases (every site, layer, positions and normalisation). The `patchbay steer
//! --mode labels` command reproduces every single-vector add case on every family.
//! Goldens: tests/fixtures/<family>/steer_golden.json and steer_vectors.safetensors (patchbay's
//! directions naming), made by scripts/golden/make_steer_goldens.py.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::kernels::test_driver;
use common::*;
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{Engine, RunRequest};
use patchbay::intervene::{Intervention, Op};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site};
use patchbay::experiments::check::{LabelGolden, SteerCase as Case};

type Golden = LabelGolden<Case>;

/// steer_vectors.safetensors: name -> (shape, values).
type Vectors = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn site(c: &Case) -> Site {
    c.site().unwrap()
}

fn positions(c: &Case) -> Positions {
    Positions::parse(&c.positions_text()).unwrap()
}

fn vector(c: &Case, vectors: &Vectors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let key = format!("{}/{name}", site(c));
    vectors.get(&key).unwrap_or_else(|| panic!("steer_vectors.safetensors has no {key}")).clone()
}

fn intervention(c: &Case, vectors: &Vectors) -> Intervention {
    let op = match c.op.as_str() {
        "add" => {
            // [d_model]: the sum of the named vectors, in order (as the generator sums them).
            let mut v = vector(c, vectors, &c.vectors[0]).1;
            for name in &c.vectors[1..] {
                v.iter_mut().zip(vector(c, vectors, name).1).for_each(|(a, b)| *a += b);
            }
            Op::Add { beta: c.beta, v, normalize: c.normalise }
        }
        "project_set" => {
            let v = vector(c, vectors, &c.vectors[0]).1;
            let (shape, u) = vector(c, vectors, &c.vectors[1]); // [k, d_model], orthonormal rows
            let d = shape[1];
            // [d_model, d_model]: P = U^T U
            let p = (0..d * d).map(|ij| (0..shape[0]).map(|k| u[k * d + ij / d] * u[k * d + ij % d]).sum()).collect();
            Op::ProjectSet { beta: c.beta, p, v }
        }
        other => panic!("unknown op {other}"),
    };
    Intervention { site: site(c), prompts: None, positions: positions(c), units: None, op }
}

fn load(family: &str) -> (Model, Golden, Vectors) {
    let dir = fixture(family);
    let path = dir.join("steer_golden.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/golden/make_steer_goldens.py)", path.display()));
    let golden: Golden = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let recorded = prompt_ids(family);
    assert_eq!(golden.prompts[..recorded.len()], recorded[..], "{family}: golden prompts are not the fixture's");
    (Model::load(&dir).unwrap(), golden, read_tensors(&dir.join("steer_vectors.safetensors")))
}

/// [n_prompts * n_labels]: the label logits at the last position of each of `prompts` under `ivs`.
fn label_logits(engine: &dyn Engine, prompts: &[Vec<u32>], labels: &[u32], ivs: &[Intervention]) -> Vec<f32> {
    let last = Positions::List(vec![-1]);
    let req = RunRequest { interventions: ivs, logits_at: Some(&last), logit_tokens: Some(labels), ..Default::default() };
    engine.run_prompts(prompts, &req).unwrap().logits
}

fn check_cpu(family: &str) {
    let (model, golden, vectors) = load(family);
    let clean = label_logits(&model, &golden.prompts, &golden.labels, &[]);
    let mut worst = assert_close(&format!("{family} clean"), &clean, &golden.clean.concat(), F32_ATOL, F32_RTOL);
    for case in &golden.cases {
        let name = format!("{family} {}", case.name());
        let got = label_logits(&model, &golden.prompts, &golden.labels, &[intervention(case, &vectors)]);
        worst = worst.max(assert_close(&name, &got, &case.steered.concat(), F32_ATOL, F32_RTOL));
        if case.beta == 0.0 && case.op == "add" {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&clean), "{name}: beta 0 is not the clean run bit for bit");
        }
    }
    println!("{family}: {} steering cases on cpu: max abs error {worst:.3e} vs HF hooks", golden.cases.len());
}

/// The clean run, every site, layer, positions and normalisation at the negative beta, the
/// combined vectors and the project-set cases (the others differ only in beta's value; the
/// emulator takes ~0.1 s a forward), one forward each.
fn check_device(family: &str, order: FiberOrder) {
    let (model, golden, vectors) = load(family);
    let (dev_name, driver) = test_driver(order);
    let dev = DeviceModel::upload(&model, driver).unwrap();
    let run = |ivs: &[Intervention]| label_logits(&dev, &golden.prompts, &golden.labels, ivs);
    let mut worst = assert_forward_close(&format!("{family} clean on {dev_name}"), &run(&[]), &golden.clean.concat()).0;
    let cases: Vec<&Case> = golden.cases.iter().filter(|c| c.beta < 0.0 || c.vectors.len() > 1).collect();
    for case in &cases {
        let got = run(&[intervention(case, &vectors)]);
        worst = worst.max(assert_forward_close(&format!("{family} {} on {dev_name}", case.name()), &got, &case.steered.concat()).0);
    }
    println!("{family}: {} steering cases on {dev_name}: worst max abs error {:.2}% of the case's largest |logit|", cases.len(), worst * 100.0);
}

#[test]
fn llama_steering_matches_hf() {
    check_cpu("llama");
}
#[test]
fn mistral_steering_matches_hf() {
    check_cpu("mistral");
}
#[test]
fn qwen2_steering_matches_hf() {
    check_cpu("qwen2");
}
#[test]
fn gemma2_steering_matches_hf() {
    check_cpu("gemma2");
}
#[test]
fn phi3_steering_matches_hf() {
    check_cpu("phi3");
}
#[test]
fn olmo2_steering_matches_hf() {
    check_cpu("olmo2");
}
#[test]
fn llama_device_steering_matches_hf() {
    check_device("llama", FiberOrder::Forward);
}
#[test]
fn gemma2_device_steering_matches_hf() {
    check_device("gemma2", FiberOrder::Reverse);
}

/// One `patchbay steer --mode labels` run and the rows its scores.jsonl should hold.
struct SteerRun {
    args: Vec<String>,
    rows: Vec<ScoreRow>,
}

/// One expected scores.jsonl object.
#[derive(Debug, PartialEq)]
struct ScoreRow {
    index: usize,
    layer: usize,
    beta: f32,
    /// In label order.
    label_logits: Vec<f32>,
    /// The top label's name: labels are passed as `ID=ID`, so it is its token id.
    pred: String,
}

/// The `patchbay steer --mode labels` runs that reproduce the golden's single-vector `add` cases:
/// one per (site, positions, normalise, vector), over that group's layers and betas (every
/// (layer, beta) pair of a group is a case). `token_ids` must hold `golden.prompts` as JSON;
/// run i writes to `out/<i>`. Rows are in (prompt, layer, beta) order; the caller compares
/// label_logits within the CPU (f32) or bf16 tolerances and pred exactly where the top two labels
/// are apart by more than the tolerance.
fn steer_label_runs(golden: &Golden, model: &Path, token_ids: &Path, vectors: &Path, out: &Path) -> Vec<SteerRun> {
    let mut groups: Vec<(String, Vec<&Case>)> = Vec::new();
    for case in golden.cases.iter().filter(|c| c.op == "add" && c.vectors.len() == 1) {
        let key = format!("{} {} {} {}", case.site, case.positions_text(), case.normalise, case.vectors[0]);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, cases)) => cases.push(case),
            None => groups.push((key, vec![case])),
        }
    }
    let labels = golden.labels.iter().map(|t| format!("{t}={t}")).collect::<Vec<_>>().join(",");
    let join = |v: Vec<String>| v.join(",");
    groups
        .iter()
        .enumerate()
        .map(|(i, (_, cases))| {
            // Layer-major: the first layer's cases give the betas.
            let nb = cases.iter().take_while(|c| c.layer == cases[0].layer).count();
            let betas: Vec<f32> = cases[..nb].iter().map(|c| c.beta).collect();
            let layers: Vec<usize> = cases.iter().step_by(nb).map(|c| c.layer).collect();
            for (k, c) in cases.iter().enumerate() {
                assert_eq!((c.layer, c.beta), (layers[k / nb], betas[k % nb]), "{}: not a (layer, beta) grid", c.name());
            }
            let c = cases[0];
            let mut args: Vec<String> = ["steer", "--mode", "labels", "--quiet", "--model"].map(String::from).into();
            args.extend([model.display().to_string(), "--token-ids".into(), token_ids.display().to_string()]);
            args.extend(["--label-token-ids".into(), labels.clone(), "--vector".into(), format!("{}:{}", vectors.display(), c.vectors[0])]);
            args.extend(["--site".into(), c.site.clone(), "--layers".into(), join(layers.iter().map(usize::to_string).collect())]);
            args.extend([format!("--betas={}", join(betas.iter().map(f32::to_string).collect())), format!("--positions={}", c.positions_text())]);
            if c.normalise {
                args.push("--normalise".into());
            }
            args.extend(["--out".into(), out.join(i.to_string()).display().to_string()]);
            let rows = (0..golden.prompts.len())
                .flat_map(|p| cases.iter().map(move |c| (p, c)))
                .map(|(p, c)| {
                    let top = (0..golden.labels.len()).max_by(|&a, &b| c.steered[p][a].total_cmp(&c.steered[p][b])).unwrap();
                    ScoreRow { index: p, layer: c.layer, beta: c.beta, label_logits: c.steered[p].clone(), pred: golden.labels[top].to_string() }
                })
                .collect();
            SteerRun { args, rows }
        })
        .collect()
}

/// Runs the `steer --mode labels` commands of every single-vector add case (no random control)
/// and compares each scores.jsonl row with the golden: label logits at the f32 tolerances, the
/// pred where the top two labels are apart by more than the tolerance, every case once per prompt.
fn check_steer_command(family: &str) {
    let (_, golden, _) = load(family);
    let dir = fixture(family);
    let work = tempfile::tempdir().unwrap();
    let ids = work.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&golden.prompts).unwrap()).unwrap();
    let runs = steer_label_runs(&golden, &dir, &ids, &dir.join("steer_vectors.safetensors"), work.path());
    let n_single = golden.cases.iter().filter(|c| c.op == "add" && c.vectors.len() == 1).count();
    assert_eq!(runs.iter().map(|r| r.rows.len()).sum::<usize>(), n_single * golden.prompts.len(), "{family}: a case is missing from the runs");
    let mut worst = 0.0f32;
    for run in &runs {
        let mut args = run.args.clone();
        args.push("--no-random-control".into());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchbay")).args(&args).output().unwrap();
        assert!(out.status.success(), "{family}: steer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let dir = Path::new(&args[args.iter().position(|a| a == "--out").unwrap() + 1]).to_path_buf();
        let got: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("scores.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(got.len(), run.rows.len(), "{family}: {args:?}: rows");
        for want in &run.rows {
            let row = got
                .iter()
                .find(|r| r["index"] == want.index && r["layer"] == want.layer && r["beta"].as_f64() == Some(want.beta as f64))
                .unwrap_or_else(|| panic!("{family}: {args:?}: no row for {want:?}"));
            let logits: Vec<f32> = serde_json::from_value(row["label_logits"].clone()).unwrap();
            let name = format!("{family} steer command {want:?}");
            worst = worst.max(assert_close(&name, &logits, &want.label_logits, F32_ATOL, F32_RTOL));
            let mut sorted = want.label_logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > F32_ATOL + F32_RTOL * sorted[0].abs() {
                assert_eq!(row["pred"], want.pred.as_str(), "{name}: pred");
            }
        }
    }
    println!("{family}: {} steer --mode labels runs, {} rows: max abs error {worst:.3e} vs HF hooks", runs.len(), n_single * golden.prompts.len());
}

#[test]
fn steer_command_matches_hf_on_every_family() {
    for family in FAMILIES {
        check_steer_command(family);
    }
}
