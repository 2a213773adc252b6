//! The CUDA backend's host code (the device forward) on the emulated device (or the GPU of
//! PATCHBAY_TEST_DEVICE, see tests/common/kernels.rs): every site and the logits of every family
//! against the Hugging Face goldens and the CPU reference, with and without interventions (the
//! bf16 forward tolerances of tests/common).

mod common;

use common::kernels::test_driver;
use common::*;
use indicatif::ProgressBar;
use patchbay::engine::RunRequest;
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::Engine;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::io::{OutDtype, OutTensor};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};

fn float(t: &OutTensor) -> Vec<f32> {
    match t {
        OutTensor::Float { data, .. } => data.clone(),
        OutTensor::I64 { data, .. } => data.iter().map(|&v| v as f32).collect(),
    }
}

/// `model` on the test device (the emulator in fiber order `order` by default), and the
/// device's name for messages.
fn device(model: &Model, order: FiberOrder) -> (String, DeviceModel) {
    let (name, driver) = test_driver(order);
    (name, DeviceModel::upload(model, driver).unwrap())
}

/// Every site at every position and the logits vs the HF golden, on the test device.
fn check_against_golden(family: &str, order: FiberOrder) {
    let model = Model::load(&fixture(family)).unwrap();
    let (dev_name, dev) = device(&model, order);
    let prompts = prompt_ids(family);
    let spec = CaptureSpec { sites: Site::all(&model.cfg), positions: Positions::All, logits: true, dtype: OutDtype::F32, batch_size: 3, interventions: Vec::new() };
    let out = capture(&dev, &prompts, &spec, &ProgressBar::hidden()).unwrap();
    let golden = read_tensors(&fixture(family).join("golden.safetensors"));
    assert_eq!(out.len(), golden.len());
    let mut worst = (0.0f32, String::new());
    for (name, t) in &out {
        let (rel, _) = assert_forward_close(&format!("{family} ({dev_name}): {name}"), &float(t), &golden[name].1);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!("{family} ({dev_name}): worst max-abs error {:.2}% of the tensor's range, at {}", worst.0 * 100.0, worst.1);
}

#[test]
fn llama_emu_matches_hf() {
    check_against_golden("llama", FiberOrder::Forward);
}
#[test]
fn mistral_emu_matches_hf() {
    check_against_golden("mistral", FiberOrder::Reverse);
}
#[test]
fn qwen2_emu_matches_hf() {
    check_against_golden("qwen2", FiberOrder::Forward);
}
#[test]
fn gemma2_emu_matches_hf() {
    check_against_golden("gemma2", FiberOrder::Reverse);
}
#[test]
fn phi3_emu_matches_hf() {
    check_against_golden("phi3", FiberOrder::Forward);
}
#[test]
fn olmo2_emu_matches_hf() {
    check_against_golden("olmo2", FiberOrder::Reverse);
}

/// Interventions of every kind at every kind of site: the device forward equals the CPU
/// reference (bf16 tolerances), logits and captures.
#[test]
fn emu_interventions_match_reference() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let (dev_name, dev) = device(&model, FiberOrder::Forward);
        let cfg = &model.cfg;
        let prompts = prompt_ids(family);
        let d = cfg.d_model;
        let v = |n: usize, seed: u64| -> Vec<f32> { (0..n).map(|i| patchbay::rng::gaussian(seed, 1, i as u64)).collect() };
        let last = Positions::List(vec![-1]);
        let ivs = vec![
            Intervention { site: Site::new(0, SiteKind::ResidPre), prompts: None, positions: last.clone(), units: None, op: Op::Add { beta: 2.0, v: v(d, 1), normalize: true } },
            Intervention { site: Site::new(0, SiteKind::Q), prompts: Some(vec![1]), positions: Positions::All, units: Some(vec![2]), op: Op::Scale { alpha: 0.5 } },
            Intervention { site: Site::new(0, SiteKind::V), prompts: None, positions: Positions::List(vec![0, 2]), units: Some(vec![1]), op: Op::Zero },
            Intervention { site: Site::new(1, SiteKind::RotK), prompts: None, positions: Positions::All, units: Some(vec![0]), op: Op::Scale { alpha: 1.5 } },
            Intervention { site: Site::new(0, SiteKind::Z), prompts: None, positions: Positions::All, units: Some(vec![1, 3]), op: Op::Zero },
            Intervention { site: Site::new(1, SiteKind::HeadOut), prompts: None, positions: last.clone(), units: Some(vec![0]), op: Op::RandomEqualNorm { seed: 9 } },
            Intervention { site: Site::new(0, SiteKind::AttnOut), prompts: None, positions: Positions::List(vec![-1, -2]), units: None, op: Op::ProjectSet { beta: 1.0, p: (0..d * d).map(|i| if i % (d + 1) == 0 && i < 3 * (d + 1) { 1.0 } else { 0.0 }).collect(), v: v(d, 2) } },
            Intervention { site: Site::new(1, SiteKind::MlpPost), prompts: None, positions: Positions::All, units: Some(vec![0, 5, 7, 50]), op: Op::Scale { alpha: 2.5 } },
            Intervention { site: Site::new(1, SiteKind::MlpOut), prompts: Some(vec![2]), positions: Positions::All, units: None, op: Op::Mean { mean: v(d, 3) } },
            Intervention { site: Site::new(0, SiteKind::ResidPost), prompts: Some(vec![0]), positions: last.clone(), units: None, op: Op::Patch { values: v(d, 4) } },
            Intervention { site: Site::new(1, SiteKind::MlpIn), prompts: None, positions: last.clone(), units: Some(vec![3, 4]), op: Op::Zero },
        ];
        let caps: Vec<Capture> = [Site::new(1, SiteKind::ResidPost), Site::new(1, SiteKind::HeadOut), Site::new(0, SiteKind::Pattern), Site::final_norm(cfg)]
            .into_iter()
            .map(|site| Capture { site, positions: Positions::List(vec![-1, 0]) })
            .collect();
        let want = model.run_prompts(&prompts, &RunRequest { interventions: &ivs, captures: &caps, logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
        let got = dev.run_prompts(&prompts, &RunRequest { interventions: &ivs, captures: &caps, logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
        assert_forward_close(&format!("{family} ({dev_name}): logits with interventions"), &got.logits, &want.logits);
        for (g, w) in got.captured.iter().zip(&want.captured) {
            assert_forward_close(&format!("{family} ({dev_name}): {} with interventions", g.site), &g.data, &w.data);
        }
        // The interventions changed something (the test can fail).
        let clean = model.run_prompts(&prompts, &RunRequest { logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
        assert!(clean.logits.iter().zip(&want.logits).any(|(a, b)| (a - b).abs() > 0.1), "{family}: interventions changed nothing");
    }
}

/// The HF intervention goldens reproduced on the test device.
#[test]
fn emu_matches_hf_intervention_goldens() {
    for family in FAMILIES {
        let dir = fixture(family);
        let model = Model::load(&dir).unwrap();
        let (dev_name, dev) = device(&model, FiberOrder::Reverse);
        let prompts = prompt_ids(family);
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("interventions.json")).unwrap()).unwrap();
        let tensors = read_tensors(&dir.join("interventions.safetensors"));
        for case in spec["cases"].as_array().unwrap() {
            let site = Site::parse(case["site"].as_str().unwrap(), &model.cfg).unwrap();
            let positions = match &case["positions"] {
                serde_json::Value::String(_) => Positions::All,
                v => Positions::List(v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()),
            };
            let t = |k: &str| tensors[case["tensors"][k].as_str().unwrap()].1.clone();
            let idx = |k: &str| case[k].as_array().map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<_>>());
            let (prompts_sel, units, op) = match case["op"].as_str().unwrap() {
                "add" => (None, None, Op::Add { beta: case["beta"].as_f64().unwrap() as f32, v: t("v"), normalize: false }),
                "zero_heads" => (None, idx("heads"), Op::Zero),
                "scale_neurons" => (None, idx("neurons"), Op::Scale { alpha: case["alpha"].as_f64().unwrap() as f32 }),
                "patch" => (Some(vec![case["target_prompt"].as_u64().unwrap() as usize]), None, Op::Patch { values: t("v") }),
                "project_out_add" => (None, None, Op::ProjectSet { beta: case["beta"].as_f64().unwrap() as f32, p: t("P"), v: t("v") }),
                "set" => (None, None, Op::Mean { mean: t("mean") }),
                other => panic!("unknown op {other}"),
            };
            let iv = Intervention { site, prompts: prompts_sel, positions, units, op };
            let out = dev.run_prompts(&prompts, &RunRequest { interventions: &[iv], logits_at: Some(&Positions::All), ..Default::default() }).unwrap();
            let want = &tensors[case["logits"].as_str().unwrap()].1;
            assert_forward_close(&format!("{family} ({dev_name}): {}", case["name"]), &out.logits, want);
        }
    }
}

/// Logits for a label set only (the gathered lm_head rows) equal those columns of the full
/// logits, on the device.
#[test]
fn emu_label_logits_are_columns_of_full_logits() {
    for family in ["llama", "gemma2", "phi3"] {
        let model = Model::load(&fixture(family)).unwrap();
        let (_, dev) = device(&model, FiberOrder::Forward);
        let prompts = prompt_ids(family);
        let last = Positions::List(vec![-1, -2]);
        let labels = [5u32, 300, 17, 5];
        let full = dev.run_prompts(&prompts, &RunRequest { logits_at: Some(&last), ..Default::default() }).unwrap();
        let sel = dev.run_prompts(&prompts, &RunRequest { logits_at: Some(&last), logit_tokens: Some(&labels), ..Default::default() }).unwrap();
        let v = model.cfg.vocab_size;
        let want: Vec<f32> = (0..full.logit_rows.len()).flat_map(|r| labels.iter().map(move |&t| (r, t))).map(|(r, t)| full.logits[r * v + t as usize]).collect();
        assert_eq!(sel.logits, want, "{family}: label logits differ from the full logits' columns");
    }
}

/// Every bias the families may have (q/k/v, o, and the MLP's: the gate and up biases are added
/// by the activation kernel after the stacked gate-up GEMM, the down bias by its own launch) on
/// the device against the CPU reference: the MLP neurons (MlpPost, captured with a Scale on
/// them) and the logits.
#[test]
fn emu_matches_cpu_with_every_bias() {
    let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["mlp_bias", "attention_bias"] {
        cfg[key] = true.into();
    }
    cfg["num_hidden_layers"] = 3.into();
    let dir = tempfile::tempdir().unwrap();
    patchbay::model::synth::write_checkpoint(&cfg, dir.path(), 5).unwrap();
    let mut model = Model::load(dir.path()).unwrap();
    assert!(model.cfg.mlp_bias && model.cfg.qkv_bias, "the config has the biases");
    // Biases of the size of the activations (synth draws them small), so that one left out
    // shows beyond the bf16 tolerance.
    for lw in &mut model.weights.layers {
        for lin in [&mut lw.q, &mut lw.k, &mut lw.v, &mut lw.o, &mut lw.gate, &mut lw.up, &mut lw.down] {
            lin.b.iter_mut().flatten().for_each(|b| *b *= 50.0);
        }
    }
    let (name, dev) = device(&model, FiberOrder::Reverse);
    let prompts = random_prompts(2, &[13, 7], model.cfg.vocab_size, 3);
    let site = Site::new(1, SiteKind::MlpPost);
    let ivs = [Intervention { site, prompts: None, positions: Positions::List(vec![-1]), units: Some(vec![0, 7, 30]), op: Op::Scale { alpha: -2.0 } }];
    let caps = [Capture { site, positions: Positions::All }];
    let all = Positions::All;
    let req = RunRequest { interventions: &ivs, captures: &caps, logits_at: Some(&all), ..Default::default() };
    let (got, want) = (dev.run_prompts(&prompts, &req).unwrap(), model.run_prompts(&prompts, &req).unwrap());
    assert_forward_close(&format!("{name}: mlp_post"), &got.captured[0].data, &want.captured[0].data);
    assert_forward_close(&format!("{name}: logits"), &got.logits, &want.logits);
}
