//! The applicability map (`patchbay check`, `experiments::check`): regenerated on every fixture
//! family for the CPU reference (every golden case) and the emulated device (a few cases per
//! methodology), with zero SILENTLY_WRONG and every CPU cell SUPPORTED; and the map's teeth: a
//! checkpoint with one weight changed is graded SILENTLY_WRONG exactly where the change reaches
//! (and the command exits 1), as is a reference site the capture lacks; one with a NaN weight is ERROR (the non-finite refusal), never a
//! wrong number passed as right.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use safetensors::Dtype;
use serde_json::Value;

/// `family`'s fixture copied to `root/family` with its weights changed by `edit`, goldens kept.
fn edited_fixture(root: &Path, family: &str, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) {
    let src = fixture(family);
    let dst = root.join(family);
    copy_checkpoint_edited(&src, &dst, Dtype::BF16, 1, edit);
    for name in ["golden.safetensors", "steer_vectors.safetensors"] {
        std::fs::copy(src.join(name), dst.join(name)).unwrap();
    }
}

/// Runs `patchbay check`; (exit code, stderr, cells by (methodology, family, device)).
fn check(args: &[&str], out: &Path) -> (i32, String, HashMap<(String, String, String), Value>) {
    let mut all = vec!["check", "--quiet", "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, err) = patchbay_cli(&all);
    let cells = read_jsonl(&out.join("cells.jsonl"))
        .into_iter()
        .map(|c| ((c["methodology"].as_str().unwrap().to_string(), c["family"].as_str().unwrap().to_string(), c["device"].as_str().unwrap().to_string()), c))
        .collect();
    (code, err, cells)
}

const METHODOLOGIES: [&str; 8] = ["capture", "logits", "attention_pattern", "patch_resumed", "patch_naive", "steer", "ablate", "generate"];

#[test]
fn the_map_has_no_silently_wrong_cell() {
    let w = tempfile::tempdir().unwrap();
    let fixtures = fixtures_dir();
    for (device, max_cases) in [("cpu", None), ("cpu-bf16", Some("4")), ("emu", Some("4"))] {
        let out = w.path().join(device);
        let mut args = vec!["--fixtures", fixtures.to_str().unwrap(), "--devices", device];
        if let Some(m) = max_cases {
            args.extend(["--max-cases", m]);
        }
        let (code, err, cells) = check(&args, &out);
        assert_eq!(code, 0, "{device}: {err}");
        assert_eq!(cells.len(), FAMILIES.len() * METHODOLOGIES.len(), "{device}: one cell per family and methodology");
        for family in FAMILIES {
            for m in METHODOLOGIES {
                let c = &cells[&(m.to_string(), family.to_string(), device.to_string())];
                let verdict = c["verdict"].as_str().unwrap();
                assert!(c["cases"].as_u64().unwrap() > 0, "{m} {family} {device}: nothing compared");
                match device {
                    "cpu" => assert_eq!(verdict, "SUPPORTED", "{m} {family} on the f32 reference: {c}"),
                    _ => assert!(verdict == "SUPPORTED" || verdict == "DEGRADED", "{m} {family} {device}: {c}"),
                }
            }
        }
        let csv = std::fs::read_to_string(out.join("applicability.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + cells.len());
        let md = std::fs::read_to_string(out.join("applicability.md")).unwrap();
        assert!(md.contains(&format!("Engine `{device}`")) && !md.contains("SILENTLY_WRONG"), "{md}");
    }
}

#[test]
fn a_changed_weight_is_silently_wrong_where_it_reaches_and_a_nan_is_an_error() {
    let w = tempfile::tempdir().unwrap();
    let root = w.path().join("fixtures");
    // Layer 1's MLP output 30% larger: everything after it moves; layer 1's attention (computed
    // before) does not.
    edited_fixture(&root, "llama", |t| {
        let (_, v) = t.get_mut("model.layers.1.mlp.down_proj.weight").unwrap();
        v.iter_mut().for_each(|x| *x *= 1.3);
    });
    let (code, err, cells) = check(&["--fixtures", root.to_str().unwrap(), "--devices", "cpu"], &w.path().join("scaled"));
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("SILENTLY_WRONG") && err.lines().count() == 1, "{err}");
    let verdict = |m: &str| cells[&(m.to_string(), "llama".to_string(), "cpu".to_string())]["verdict"].as_str().unwrap().to_string();
    for m in ["capture", "logits", "patch_resumed", "patch_naive", "steer", "ablate"] {
        assert_eq!(verdict(m), "SILENTLY_WRONG", "{m}");
    }
    assert_eq!(verdict("attention_pattern"), "SUPPORTED", "the change comes after every attention pattern");

    // A reference site the capture does not produce (the golden names a third layer): wrong,
    // not skipped.
    let root = w.path().join("extra");
    edited_fixture(&root, "llama", |_| {});
    let golden = root.join("llama").join("golden.safetensors");
    let mut tensors = read_tensors(&golden);
    let extra = tensors["blocks.1.hook_resid_post"].clone();
    tensors.insert("blocks.2.hook_resid_post".into(), extra);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .filter(|(n, _)| n != "prompt_offsets")
        .map(|(n, (shape, v))| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &golden).unwrap();
    let (code, err, cells) = check(&["--fixtures", root.to_str().unwrap(), "--devices", "cpu"], &w.path().join("extra-out"));
    assert_eq!(code, 1, "{err}");
    let capture = &cells[&("capture".to_string(), "llama".to_string(), "cpu".to_string())];
    assert_eq!(capture["verdict"], "SILENTLY_WRONG", "{capture}");
    assert!(capture["note"].as_str().unwrap().contains("blocks.2.hook_resid_post (not captured)"), "{capture}");
    assert_eq!(cells[&("logits".to_string(), "llama".to_string(), "cpu".to_string())]["verdict"], "SUPPORTED");

    // A NaN in layer 0's q_proj: the engine refuses; every cell is ERROR naming it.
    let root = w.path().join("nan");
    edited_fixture(&root, "llama", |t| t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap().1[3] = f32::NAN);
    let (code, err, cells) = check(&["--fixtures", root.to_str().unwrap(), "--devices", "cpu"], &w.path().join("nan-out"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(cells.len(), METHODOLOGIES.len());
    for c in cells.values() {
        assert_eq!(c["verdict"], "ERROR", "{c}");
        assert!(c["note"].as_str().unwrap().contains("not finite"), "{c}");
    }
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("o");
    for (args, says) in [
        (vec!["--fixtures", w.path().to_str().unwrap()], "no family directory"),
        (vec!["--max-cases", "0"], "--max-cases 0"),
        (vec!["--families", "nosuch"], "nosuch"),
    ] {
        let mut all = vec!["check", "--quiet", "--out", out.to_str().unwrap()];
        all.extend(args);
        let (code, err) = patchbay_cli(&all);
        assert_eq!(code, 1, "{all:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(says) && err.lines().count() == 1, "{all:?}: {err}");
    }
}
