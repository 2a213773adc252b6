//! config.json / generation_config.json parsing beyond what the goldens exercise.

mod common;

use common::*;
use patchbay::model::config::{ModelConfig, RopeScaling};

#[test]
fn generation_config_overrides_bos_eos() {
    let cfg = ModelConfig::load(&fixture("llama")).unwrap();
    assert_eq!(cfg.bos_token_id, Some(376));
    assert_eq!(cfg.eos_token_ids, vec![377, 380]);
    let g = cfg.generation.expect("llama fixture has generation_config.json");
    assert!(!g.do_sample);
    // Without the file there are no generation defaults.
    assert!(ModelConfig::load(&fixture("qwen2")).unwrap().generation.is_none());
}

#[test]
fn bad_generation_config_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("llama").join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"eos_token_id": "x"}"#).unwrap();
    let e = ModelConfig::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{e}");
}

#[test]
fn classic_and_new_layouts_agree() {
    // The phi3 fixture uses the transformers-5 layout; rewrite it in the classic one.
    let text = std::fs::read_to_string(fixture("phi3").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let new = ModelConfig::from_json(&v, std::path::Path::new("new.json")).unwrap();
    let obj = v.as_object_mut().unwrap();
    let mut rope = obj.remove("rope_parameters").unwrap();
    let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
    let partial = rope.as_object_mut().unwrap().remove("partial_rotary_factor").unwrap();
    let rope_type = rope["rope_type"].clone();
    rope.as_object_mut().unwrap().insert("type".into(), rope_type);
    rope.as_object_mut().unwrap().remove("rope_type");
    obj.insert("rope_theta".into(), theta);
    obj.insert("partial_rotary_factor".into(), partial);
    obj.insert("rope_scaling".into(), rope);
    obj.insert("torch_dtype".into(), obj["dtype"].clone());
    obj.remove("dtype");
    let classic = ModelConfig::from_json(&v, std::path::Path::new("classic.json")).unwrap();
    assert_eq!(format!("{new:?}"), format!("{classic:?}"));
    assert!(matches!(new.rope_scaling, RopeScaling::LongRope { .. }));
    assert_eq!(new.rotary_dim, 12);
}

#[test]
fn errors_name_the_field_by_its_path() {
    let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let error = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = base.clone();
        edit(v.as_object_mut().unwrap());
        ModelConfig::from_json(&v, std::path::Path::new("config.json")).unwrap_err().to_string()
    };
    let e = error(&|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": "2"}));
    });
    assert!(e.contains("`rope_scaling.factor`") && e.contains("a number") && e.contains("\"2\""), "{e}");
    let e = error(&|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear"}));
    });
    assert!(e.contains("`rope_scaling.factor`") && e.contains("required for linear rope"), "{e}");
    let e = error(&|c| {
        c.insert("eos_token_id".into(), serde_json::json!([1, -2]));
    });
    assert!(e.contains("`eos_token_id[1]`") && e.contains("token id") && e.contains("-2"), "{e}");
    let e = error(&|c| {
        c.remove("vocab_size");
    });
    assert!(e.contains("config.json") && e.contains("`vocab_size`: missing"), "{e}");
    let e = error(&|c| {
        c.insert("layer_types".into(), serde_json::json!(["full_attention", 3]));
    });
    assert!(e.contains("`layer_types[1]`") && e.contains("string"), "{e}");
}
