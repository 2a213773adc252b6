//! Interventions in the reference path against independent Hugging Face hook implementations
//! (tests/fixtures/<family>/interventions.{json,safetensors}, made by scripts/golden).

mod common;

use common::*;
use patchbay::engine::RunRequest;
use patchbay::engine::Engine;
use patchbay::engine::forward::RunOutput;
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site};
use serde_json::Value;

fn run(model: &Model, prompts: &[Vec<u32>], ivs: &[Intervention], caps: &[Capture]) -> RunOutput {
    model.run_prompts(prompts, &RunRequest { interventions: ivs, captures: caps, logits_at: Some(&Positions::All), ..Default::default() }).unwrap()
}

fn positions(v: &Value) -> Positions {
    match v {
        Value::String(s) if s == "all" => Positions::All,
        Value::Array(a) => Positions::List(a.iter().map(|x| x.as_i64().unwrap()).collect()),
        other => panic!("positions {other}"),
    }
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn check_family(family: &str) {
    let dir = fixture(family);
    let model = Model::load(&dir).unwrap();
    let prompts = prompt_ids(family);
    let spec: Value = serde_json::from_slice(&std::fs::read(dir.join("interventions.json")).unwrap()).unwrap();
    let tensors = read_tensors(&dir.join("interventions.safetensors"));
    let t = |name: &str| tensors[name].1.clone();
    let cases = spec["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6, "{family}: expected 6 intervention cases");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let site = Site::parse(case["site"].as_str().unwrap(), &model.cfg).unwrap();
        let pos = positions(&case["positions"]);
        let tensor = |k: &str| t(case["tensors"][k].as_str().unwrap());
        let iv = |prompts, units, op| Intervention { site, prompts, positions: pos.clone(), units, op };
        let iv = match case["op"].as_str().unwrap() {
            "add" => iv(None, None, Op::Add { beta: case["beta"].as_f64().unwrap() as f32, v: tensor("v"), normalize: false }),
            "zero_heads" => iv(None, Some(indices(&case["heads"])), Op::Zero),
            "scale_neurons" => iv(None, Some(indices(&case["neurons"])), Op::Scale { alpha: case["alpha"].as_f64().unwrap() as f32 }),
            "patch" => {
                // The source activation comes from our own clean run, as a patching sweep does.
                let src_prompt = case["source_prompt"].as_u64().unwrap() as usize;
                let src_pos = positions(&Value::Array(vec![case["source_position"].clone()]));
                let clean = run(&model, &prompts[src_prompt..=src_prompt], &[], &[Capture { site, positions: src_pos }]);
                let values = clean.captured[0].data.clone();
                assert_close(&format!("{family}: {name} source"), &values, &tensor("v"), F32_ATOL, F32_RTOL);
                iv(Some(vec![case["target_prompt"].as_u64().unwrap() as usize]), None, Op::Patch { values })
            }
            "project_out_add" => iv(None, None, Op::ProjectSet { beta: case["beta"].as_f64().unwrap() as f32, p: tensor("P"), v: tensor("v") }),
            "set" => iv(None, None, Op::Mean { mean: tensor("mean") }),
            other => panic!("{family}: unknown op {other}"),
        };
        let out = run(&model, &prompts, &[iv], &[]);
        let want = t(case["logits"].as_str().unwrap());
        let err = assert_close(&format!("{family}: {name}"), &out.logits, &want, F32_ATOL, F32_RTOL);
        println!("{family}: {name} max abs err {err:.2e}");
    }
}

#[test]
fn interventions_match_hf_hooks() {
    for family in FAMILIES {
        check_family(family);
    }
}
