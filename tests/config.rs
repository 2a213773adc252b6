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

#[test]
fn values_the_math_cannot_use_are_refused_naming_the_field() {
    let base = |family: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(fixture(family).join("config.json")).unwrap()).unwrap() };
    let error = |family: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = base(family);
        edit(v.as_object_mut().unwrap());
        ModelConfig::from_json(&v, std::path::Path::new("config.json")).err().map(|e| e.to_string())
    };
    let set = |k: &'static str, v: serde_json::Value| move |c: &mut serde_json::Map<String, serde_json::Value>| {
        c.insert(k.into(), v.clone());
    };
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>, &str)> = vec![
        ("llama", Box::new(set("rms_norm_eps", serde_json::json!(-1e-6))), "`rms_norm_eps`"),
        ("llama", Box::new(set("rms_norm_eps", serde_json::json!(0))), "`rms_norm_eps`"),
        ("llama", Box::new(set("rms_norm_eps", serde_json::json!(1e300))), "`rms_norm_eps`: is inf"),
        ("llama", Box::new(set("rope_theta", serde_json::json!(0))), "`rope_theta`"),
        ("llama", Box::new(set("rope_theta", serde_json::json!(-10000.0))), "`rope_theta`"),
        ("llama", Box::new(set("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 0}))), "rope factor"),
        ("llama", Box::new(set("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_max_position_embeddings": 16}))), "high_freq_factor"),
        ("gemma2", Box::new(set("final_logit_softcapping", serde_json::json!(-30))), "`final_logit_softcapping`"),
        ("gemma2", Box::new(set("attn_logit_softcapping", serde_json::json!(0))), "`attn_logit_softcapping`"),
        ("gemma2", Box::new(set("query_pre_attn_scalar", serde_json::json!(0))), "query_pre_attn_scalar"),
        ("mistral", Box::new(set("sliding_window", serde_json::json!(0))), "`sliding_window`"),
        ("llama", Box::new(set("num_hidden_layers", serde_json::json!(1_000_000_000u64))), "`num_hidden_layers`: is 1000000000; patchbay takes at most 1024"),
        ("llama", Box::new(set("vocab_size", serde_json::json!(u64::MAX))), "`vocab_size`"),
        ("llama", Box::new(set("max_position_embeddings", serde_json::json!(1u64 << 40))), "`max_position_embeddings`"),
        ("llama", Box::new(set("max_position_embeddings", serde_json::json!(0))), "`max_position_embeddings`"),
        ("llama", Box::new(|c: &mut serde_json::Map<String, serde_json::Value>| {
            c.insert("num_hidden_layers".into(), serde_json::json!(1000));
            c.insert("hidden_size".into(), serde_json::json!(65536));
            c.insert("intermediate_size".into(), serde_json::json!(1 << 20));
            c.insert("num_attention_heads".into(), serde_json::json!(64));
            c.insert("num_key_value_heads".into(), serde_json::json!(64));
        }), "parameters"),
    ];
    for (family, edit, want) in &cases {
        let e = error(family, edit.as_ref()).unwrap_or_else(|| panic!("{family}: accepted, expected an error with {want}"));
        assert!(e.contains(want) && e.contains("config.json") && !e.contains('\n'), "{family}: {e}");
    }
    // The phi3 fixture's longrope factors: a zero among them.
    let e = error("phi3", &|c| {
        let mut f = c["rope_parameters"]["short_factor"].clone();
        f[0] = serde_json::json!(0.0);
        c.get_mut("rope_parameters").unwrap()["short_factor"] = f;
    })
    .expect("a zero longrope factor was accepted");
    assert!(e.contains("short_factor"), "{e}");
    // Every fixture passes.
    for family in ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"] {
        assert!(error(family, &|_| {}).is_none(), "{family}");
    }
}
