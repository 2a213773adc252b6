//! The CPU engine at `--precision bf16` against the device forward (the emulator, or the GPU of
//! PATCHBAY_TEST_DEVICE) and against itself at f32: every site at every position and the
//! logits of every fixture family. Rounding the same operands at the same points, the bf16 CPU
//! engine sits much closer to the device than the f32 reference does; what is left is the
//! order of f32 summations, whose last-bit differences can move a later bf16 rounding by one
//! unit (2^-8 relative).

mod common;

use common::kernels::test_driver;
use common::*;
use indicatif::ProgressBar;
use patchbay::backend::emu::FiberOrder;
use patchbay::backend::{DeviceSpec, Precision};
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{Engine, load_engine};
use patchbay::experiments::capture::{CaptureSpec, capture};
use patchbay::io::{OutDtype, OutTensor};
use patchbay::model::Model;
use patchbay::sites::{Positions, Site};

/// Every site at every position and the logits of the fixture prompts, name -> values.
fn everything(engine: &dyn Engine, family: &str) -> Vec<(String, Vec<f32>)> {
    let spec = CaptureSpec { sites: Site::all(engine.config()), positions: Positions::All, logits: true, dtype: OutDtype::F32, batch_size: 3, interventions: Vec::new() };
    let out = capture(&engine, &prompt_ids(family), &spec, &ProgressBar::hidden()).unwrap();
    out.into_iter()
        .map(|(name, t)| match t {
            OutTensor::Float { data, .. } => (name, data),
            OutTensor::I64 { data, .. } => (name, data.iter().map(|&v| v as f32).collect()),
        })
        .collect()
}

/// Max abs difference as a fraction of max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref
}

/// Per family: the bf16 CPU engine within the bf16 forward tolerances of the device on every
/// tensor, and over all tensors at most a third of the f32 reference's distance to the device.
fn bf16_cpu_tracks_the_device(family: &str) {
    let model = Model::load(&fixture(family)).unwrap();
    let (dev_name, driver) = test_driver(FiberOrder::Forward);
    let dev = DeviceModel::upload(&model, driver).unwrap();
    let bf16 = load_engine(&model, DeviceSpec::Cpu, Some(Precision::Bf16), false).unwrap();
    assert_eq!(bf16.device_name(), "cpu (bf16)");
    let on_dev = everything(&dev, family);
    let on_bf16 = everything(&*bf16, family);
    let on_f32 = everything(&model, family);
    let (mut sum_bf16, mut sum_f32, mut worst) = (0.0f32, 0.0f32, (0.0f32, String::new()));
    for (((name, d), (_, b)), (_, f)) in on_dev.iter().zip(&on_bf16).zip(&on_f32) {
        let what = format!("{family}: cpu bf16 vs {dev_name}: {name}");
        let (rel, _) = assert_forward_close(&what, b, d);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        sum_bf16 += rel;
        sum_f32 += rel_err(f, d);
    }
    println!("{family}: cpu bf16 vs {dev_name}: mean max-abs error {:.3}% of range (worst {:.3}% at {}); cpu f32 vs {dev_name}: {:.3}%", 100.0 * sum_bf16 / on_dev.len() as f32, 100.0 * worst.0, worst.1, 100.0 * sum_f32 / on_dev.len() as f32);
    assert!(sum_bf16 <= sum_f32 / 3.0, "{family}: the bf16 CPU engine is not much closer to the device than the f32 reference (mean relative error {} vs {})", sum_bf16 / on_dev.len() as f32, sum_f32 / on_dev.len() as f32);
}

#[test]
fn llama_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("llama");
}
#[test]
fn mistral_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("mistral");
}
#[test]
fn qwen2_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("qwen2");
}
#[test]
fn gemma2_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("gemma2");
}
#[test]
fn phi3_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("phi3");
}
#[test]
fn olmo2_bf16_cpu_tracks_the_device() {
    bf16_cpu_tracks_the_device("olmo2");
}

/// The f32 engine is the model itself, bit for bit: `--precision f32` and no `--precision`
/// load the reference, and a device refuses f32 by name.
#[test]
fn f32_is_the_reference_and_devices_refuse_it() {
    let model = Model::load(&fixture("llama")).unwrap();
    let want = everything(&model, "llama");
    for p in [None, Some(Precision::F32)] {
        let engine = load_engine(&model, DeviceSpec::Cpu, p, false).unwrap();
        assert_eq!(engine.device_name(), "cpu");
        for ((name, got), (_, want)) in everything(&*engine, "llama").iter().zip(&want) {
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: precision {p:?} differs from the reference");
        }
    }
    let e = load_engine(&model, DeviceSpec::Emu, Some(Precision::F32), false).err().expect("emu at f32").to_string();
    assert!(e.contains("precision f32") && e.contains("bf16 only"), "{e}");
}

/// A clean run kept at one precision is not resumed at the other.
#[test]
fn clean_runs_stay_at_their_precision() {
    let model = Model::load(&fixture("llama")).unwrap();
    let prompts = prompt_ids("llama");
    let (runs, _) = model.run_clean(&prompts[..1], &Default::default()).unwrap();
    let bf16 = model.with_precision(Precision::Bf16);
    let seg = [patchbay::engine::Segment { clean: &runs[0], p0: 1 }];
    let e = bf16.run_segments(1, &seg, &Default::default()).err().expect("resumed at another precision").to_string();
    assert!(e.contains("precision f32") && e.contains("bf16"), "{e}");
}
