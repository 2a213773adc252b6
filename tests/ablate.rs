//! Component sweeps (`experiments::ablate`, `patchbay ablate`): the batched resumed head and
//! neuron-group ablations equal the naive one-forward-per-component loop on every family (random
//! 4-layer checkpoints with each fixture's config, fresh random prompts of different lengths,
//! every op, random positions) on the CPU and, for llama and gemma2, on the device (the emulator,
//! or the GPU of PATCHBAY_TEST_DEVICE); scale 1 is the clean run bit for bit; the mean op's
//! operand is the dataset mean computed here from captures; random controls; the command's files
//! (every summary cell recomputed from experiments.jsonl and clean.jsonl); one-line errors; and
//! Hugging Face hooks zeroing or scaling a head's slice of the o_proj input and neurons of the
//! down_proj input (the goldens of scripts/golden/make_ablate_goldens.py) on every family.
//! Results are written into NaN-poisoned tables, so a missing or doubled row fails.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::kernels::{Rng, test_driver};
use common::*;
use indicatif::ProgressBar;
use patchbay::backend::emu::FiberOrder;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{Engine, RunRequest};
use patchbay::experiments::ablate::{AblateOp, Ablation, Component, ablations, conditions, label_runner, mean_sites, parse_heads, random_control, site_means};
use patchbay::experiments::patch::Method;
use patchbay::experiments::steer::{Projection, Readout, one_each};
use patchbay::intervene::spec::Condition;
use patchbay::intervene::{Capture, Intervention, Op};
use patchbay::logits::argmax;
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind};
use serde_json::Value;

const LABELS: [u32; 5] = [40, 65, 262, 300, 13];

/// Clean label logits `[n_prompts, k]` and ablated ones `[n_conditions, n_prompts, k]` of a
/// sweep by `method`, one condition per experiment (see [`sweep_experiments`]).
fn sweep(engine: &dyn Engine, method: Method, prompts: &[Vec<u32>], conds: &[Condition], batch_rows: usize) -> (Vec<f32>, Vec<f32>) {
    let s = sweep_experiments(engine, method, prompts, &one_each(conds), None, batch_rows);
    (s.clean, s.rows)
}

/// A label sweep's values, from NaN-poisoned tables: every row written exactly once.
struct Swept {
    /// [n_prompts, k]
    clean: Vec<f32>,
    /// [n_experiments, n_prompts, k]
    rows: Vec<f32>,
    /// [n_prompts] (NaN without a projection)
    clean_projection: Vec<f32>,
    /// [n_experiments, n_prompts]
    projection: Vec<f32>,
}

fn sweep_experiments(engine: &dyn Engine, method: Method, prompts: &[Vec<u32>], experiments: &[Vec<Condition>], projection: Option<&Projection>, batch_rows: usize) -> Swept {
    let (n, k) = (prompts.len(), LABELS.len());
    let mut s = Swept { clean: vec![f32::NAN; n * k], rows: vec![f32::NAN; experiments.len() * n * k], clean_projection: vec![f32::NAN; n], projection: vec![f32::NAN; experiments.len() * n] };
    label_runner(method)(
        engine,
        prompts,
        Readout { label_tokens: &LABELS, projection },
        experiments,
        batch_rows,
        &ProgressBar::hidden(),
        &mut |i, l, p| {
            assert!(s.clean[i * k].is_nan(), "clean row {i} written twice");
            s.clean[i * k..(i + 1) * k].copy_from_slice(l);
            assert_eq!(p.is_some(), projection.is_some());
            s.clean_projection[i] = p.unwrap_or(f32::NAN);
            Ok(())
        },
        &mut |batch| {
            for r in batch {
                let at = (r.condition * n + r.index) * k;
                assert!(s.rows[at].is_nan(), "row ({}, {}) written twice", r.condition, r.index);
                s.rows[at..at + k].copy_from_slice(&r.label_logits);
                assert_eq!(r.pred, argmax(&r.label_logits));
                assert_eq!(r.projection.is_some(), projection.is_some());
                s.projection[r.condition * n + r.index] = r.projection.unwrap_or(f32::NAN);
            }
            Ok(())
        },
    )
    .unwrap();
    assert!(s.clean.iter().chain(&s.rows).all(|x| x.is_finite()), "{method:?}: a row was not written (or is not finite)");
    if projection.is_some() {
        assert!(s.clean_projection.iter().chain(&s.projection).all(|x| x.is_finite()), "{method:?}: a projection was not written");
    }
    s
}

/// Random neuron groups: `n` groups at random layers, of random sizes, distinct neurons.
fn random_groups(rng: &mut Rng, model: &Model, n: usize) -> Vec<Component> {
    let cfg = &model.cfg;
    (0..n)
        .map(|_| {
            let mut all: Vec<usize> = (0..cfg.d_mlp).collect();
            rng.shuffle(&mut all);
            let size = 1 + rng.below(6);
            Component::Neurons { layer: rng.below(cfg.n_layers), neurons: all[..size].to_vec() }
        })
        .collect()
}

fn random_positions(rng: &mut Rng) -> Positions {
    [Positions::All, Positions::List(vec![-1]), Positions::List(vec![-1, -3]), Positions::List(vec![1, 2])][rng.below(4)].clone()
}

/// The ops of the sweeps, with the dataset means `Mean` needs.
fn every_op(rng: &mut Rng) -> Vec<AblateOp> {
    vec![AblateOp::Zero, AblateOp::Mean, AblateOp::Random, AblateOp::Scale { alpha: rng.uniform(1.5, 3.0) }]
}

fn the_conditions(engine: &dyn Engine, prompts: &[Vec<u32>], abl: &[Ablation], op: AblateOp, positions: &Positions, seed: u64) -> Vec<Condition> {
    let means = if op == AblateOp::Mean { site_means(engine, prompts, &mean_sites(abl), 64).unwrap() } else { BTreeMap::new() };
    conditions(abl, op, &means, positions, seed, engine.config()).unwrap()
}

/// Some ablation changed some label logit (so equality of the methods says something).
fn assert_changes(tag: &str, clean: &[f32], rows: &[f32]) {
    let k = LABELS.len();
    assert!(rows.chunks(clean.len()).any(|c| c.chunks(k).zip(clean.chunks(k)).any(|(a, b)| a != b)), "{tag}: no ablation changed the logits");
}

#[test]
fn resumed_equals_naive_on_every_family() {
    let mut rng = Rng::seeded(0xab1a7e);
    for family in FAMILIES {
        let dir = synth_family(family, 4, rng.next_u64());
        let model = Model::load(dir.path()).unwrap();
        let prompts = random_prompts(4, &[5, 9, 3, 12], model.cfg.vocab_size, rng.next_u64());
        let mut components = parse_heads("all", &model.cfg).unwrap();
        components.extend(random_groups(&mut rng, &model, 3));
        let abl = ablations(&components, &model.cfg, Some(rng.next_u64())).unwrap();
        for op in every_op(&mut rng) {
            let positions = random_positions(&mut rng);
            let tag = format!("{family} {op:?} at {positions:?}");
            let conds = the_conditions(&model, &prompts, &abl, op, &positions, rng.next_u64());
            let (clean_n, naive) = sweep(&model, Method::Naive, &prompts, &conds, 1 << 20);
            // Small batches (several calls per layer), then one call per layer.
            for batch_rows in [7, 1 << 20] {
                let (clean_r, resumed) = sweep(&model, Method::Resumed, &prompts, &conds, batch_rows);
                assert_close(&format!("{tag} clean, batch_rows {batch_rows}"), &clean_r, &clean_n, F32_ATOL, F32_RTOL);
                assert_close(&format!("{tag} batch_rows {batch_rows}"), &resumed, &naive, F32_ATOL, F32_RTOL);
            }
            assert_changes(&tag, &clean_n, &naive);
        }
    }
}

/// Resumed vs naive on one device: the same bf16 weights and KV; the paths differ only in GEMM
/// row counts.
const DEVICE_SAME_ATOL: f32 = 1e-3;
const DEVICE_SAME_RTOL: f32 = 1e-3;

#[test]
fn resumed_equals_naive_on_the_device() {
    let mut rng = Rng::seeded(0xde71ce);
    for (fi, family) in ["llama", "gemma2"].into_iter().enumerate() {
        let dir = synth_family(family, 4, rng.next_u64());
        let model = Model::load(dir.path()).unwrap();
        let (dev_name, driver) = test_driver(if fi == 0 { FiberOrder::Forward } else { FiberOrder::Reverse });
        let dev = DeviceModel::upload(&model, driver).unwrap();
        let prompts = random_prompts(3, &[6, 11, 4], model.cfg.vocab_size, rng.next_u64());
        let h = model.cfg.n_heads;
        let mut components = parse_heads(&format!("0.{},2.{},3.{}", rng.below(h), rng.below(h), rng.below(h)), &model.cfg).unwrap();
        components.extend(random_groups(&mut rng, &model, 2));
        let abl = ablations(&components, &model.cfg, Some(rng.next_u64())).unwrap();
        for op in [AblateOp::Zero, AblateOp::Random, AblateOp::Mean] {
            let positions = random_positions(&mut rng);
            let tag = format!("{family} ({dev_name}) {op:?} at {positions:?}");
            let seed = rng.next_u64();
            let conds = the_conditions(&dev, &prompts, &abl, op, &positions, seed);
            let (clean_n, naive) = sweep(&dev, Method::Naive, &prompts, &conds, 1 << 20);
            let (clean_r, resumed) = sweep(&dev, Method::Resumed, &prompts, &conds, 9);
            assert_close(&format!("{tag} clean"), &clean_r, &clean_n, DEVICE_SAME_ATOL, DEVICE_SAME_RTOL);
            assert_close(&tag, &resumed, &naive, DEVICE_SAME_ATOL, DEVICE_SAME_RTOL);
            assert_changes(&tag, &clean_n, &naive);
            // And the CPU reference (its own means: the same dataset on the CPU).
            let cpu_conds = the_conditions(&model, &prompts, &abl, op, &positions, seed);
            let (_, cpu) = sweep(&model, Method::Naive, &prompts, &cpu_conds, 1 << 20);
            assert_forward_close(&format!("{tag} device vs cpu"), &resumed, &cpu);
        }
    }
}

#[test]
fn scale_one_is_the_clean_run_bit_for_bit() {
    let mut rng = Rng::seeded(0x5ca1e1);
    let dir = synth_family("llama", 3, rng.next_u64());
    let model = Model::load(dir.path()).unwrap();
    let prompts = random_prompts(3, &[5, 8, 2], model.cfg.vocab_size, rng.next_u64());
    let mut components = parse_heads("all", &model.cfg).unwrap();
    components.extend(random_groups(&mut rng, &model, 2));
    let abl = ablations(&components, &model.cfg, None).unwrap();
    let conds = the_conditions(&model, &prompts, &abl, AblateOp::Scale { alpha: 1.0 }, &Positions::All, 0);
    let dev = DeviceModel::upload(&model, test_driver(FiberOrder::Forward).1).unwrap();
    assert_clean_bit_for_bit("scaled by 1", &model, &dev, &prompts, &abl, &conds);
}

/// Every condition's rows are the clean run's bit for bit, on the CPU and `dev`, by both methods.
fn assert_clean_bit_for_bit(what: &str, model: &Model, dev: &DeviceModel, prompts: &[Vec<u32>], abl: &[Ablation], conds: &[Condition]) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let engines: [(&str, &dyn Engine); 2] = [("cpu", model), ("device", dev)];
    for (name, engine) in engines {
        for method in [Method::Resumed, Method::Naive] {
            let (clean, rows) = sweep(engine, method, prompts, conds, 1 << 20);
            for (c, r) in rows.chunks(clean.len()).enumerate() {
                assert_eq!(bits(r), bits(&clean), "{name} {method:?}: {} {what} differs from the clean run", abl[c].component.name());
            }
        }
    }
}

#[test]
fn mean_op_is_the_dataset_mean() {
    let mut rng = Rng::seeded(0x3ea7);
    let model = Model::load(&fixture("qwen2")).unwrap();
    let cfg = &model.cfg;
    let prompts = random_prompts(5, &[4, 7, 2, 9, 3], cfg.vocab_size, rng.next_u64());
    let sites = [Site::new(1, SiteKind::Z), Site::new(0, SiteKind::MlpPost)];
    // By hand: each prompt alone, every position, summed in f64.
    let caps: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect();
    let mut want: Vec<Vec<f64>> = sites.iter().map(|s| vec![0.0; s.kind.token_shape(cfg, 0).iter().product()]).collect();
    let mut n = 0;
    for p in &prompts {
        let out = model.run_prompts(std::slice::from_ref(p), &RunRequest { captures: &caps, ..Default::default() }).unwrap();
        for (w, c) in want.iter_mut().zip(&out.captured) {
            assert_eq!(c.data.len(), p.len() * w.len());
            for row in c.data.chunks(w.len()) {
                w.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
            }
        }
        n += p.len();
    }
    let want: Vec<Vec<f32>> = want.into_iter().map(|w| w.into_iter().map(|x| (x / n as f64) as f32).collect()).collect();
    // In batches of 6 rows (several chunks).
    let got = site_means(&model, &prompts, &sites, 6).unwrap();
    for (s, w) in sites.iter().zip(&want) {
        assert_close(&format!("mean of {s}"), &got[s], w, 1e-6, 1e-5);
    }
    let head = rng.below(cfg.n_heads);
    let neurons = vec![rng.below(cfg.d_mlp / 2), cfg.d_mlp / 2 + rng.below(cfg.d_mlp / 2)];
    let abl: Vec<Ablation> = [Component::Head { layer: 1, head }, Component::Neurons { layer: 0, neurons: neurons.clone() }].into_iter().map(|component| Ablation { component, control: false }).collect();
    let conds = conditions(&abl, AblateOp::Mean, &got, &Positions::All, 0, cfg).unwrap();
    let d = cfg.d_head;
    let hand = [want[0][head * d..(head + 1) * d].to_vec(), neurons.iter().map(|&i| want[1][i]).collect::<Vec<f32>>()];
    for (c, h) in conds.iter().zip(&hand) {
        let Op::Mean { mean } = &c.op else { panic!("{:?}", c.op) };
        assert_close(&format!("{} operand", c.direction), mean, h, 1e-6, 1e-5);
    }
    // The sweep's rows == a forward with the hand-made mean set at those units.
    let (_, rows) = sweep(&model, Method::Resumed, &prompts, &conds, 1 << 20);
    let k = LABELS.len();
    for (ci, (a, h)) in abl.iter().zip(&hand).enumerate() {
        let iv = Intervention { site: a.component.site(), prompts: None, positions: Positions::All, units: Some(a.component.units()), op: Op::Mean { mean: h.clone() } };
        let last = Positions::List(vec![-1]);
        let out = model.run_prompts(&prompts, &RunRequest { interventions: &[iv], logits_at: Some(&last), logit_tokens: Some(&LABELS), ..Default::default() }).unwrap();
        assert_close(&format!("{} rows", a.component.name()), &rows[ci * prompts.len() * k..(ci + 1) * prompts.len() * k], &out.logits, F32_ATOL, F32_RTOL);
    }
}

#[test]
fn random_controls_same_size_distinct_same_layer() {
    let mut rng = Rng::seeded(0xc0);
    let model = Model::load(&fixture("mistral")).unwrap();
    let cfg = &model.cfg;
    let mut components = parse_heads("all", cfg).unwrap();
    components.extend(random_groups(&mut rng, &model, 20));
    let seed = rng.next_u64();
    let abl = ablations(&components, cfg, Some(seed)).unwrap();
    assert_eq!(abl.len(), 2 * components.len());
    for (c, a) in components.iter().zip(&abl[components.len()..]) {
        assert!(a.control && !abl[..components.len()].iter().any(|x| x.control));
        let r = &a.component;
        assert_eq!((r.layer(), r.kind(), r.units().len()), (c.layer(), c.kind(), c.units().len()), "{} -> {}", c.name(), r.name());
        r.check(cfg).unwrap();
        assert!(r.units().iter().all(|u| !c.units().contains(u)), "{} shares a unit with its control {}", c.name(), r.name());
    }
    assert_eq!(ablations(&components, cfg, Some(seed)).unwrap(), abl, "seeded");
    assert_ne!(ablations(&components, cfg, Some(seed ^ 1)).unwrap(), abl, "another seed, other controls");
    // Too few other neurons for a same-size control: an error naming the group.
    let big = Component::Neurons { layer: 0, neurons: (0..cfg.d_mlp / 2 + 1).collect() };
    let e = random_control(&big, 0, cfg, 1).unwrap_err().to_string();
    assert!(e.contains("no random control") && e.contains("L0.N["), "{e}");
}

fn ablate_args<'a>(model: &'a str, out: &'a str, ids: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["ablate", "--model", model, "--token-ids", ids, "--label-token-ids", "a=40,b=65,c=262", "--quiet", "--out", out];
    a.extend_from_slice(extra);
    a
}

/// `args` fail with one line holding `says`, leaving `out` (when given) unwritten.
fn assert_refused(args: &[&str], says: &str, out: Option<&str>) {
    let (code, err) = patchbay_cli(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.contains(says), "{args:?}: `{says}` not in: {err}");
    if let Some(out) = out {
        assert!(!Path::new(out).exists(), "{args:?} wrote {out}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn command_files_follow_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = env!("CARGO_MANIFEST_DIR").to_string() + "/tests/data/emotions.csv";
    let groups = write(tmp.path(), "groups.json", r#"[{"layer": 1, "neurons": [3, 7, 9]}, {"layer": 0, "neurons": [11]}]"#);
    let out = tmp.path().join("run");
    let model = fixture("llama");
    let labels = ["pride", "anger", "joy"];
    #[rustfmt::skip]
    patchbay_ok(&["ablate", "--model", &model.display().to_string(), "--dataset", &ds, "--label-col", "emotion", "--filter", "emotion=pride", "--filter", "emotion=anger", "--filter", "emotion=joy", "--limit", "6",
        "--label-token-ids", "pride=40,anger=65,joy=262", "--heads", "all", "--neuron-groups", &groups, "--op", "scale", "--alpha", "2.5", "--positions", "last:2", "--random-control", "--seed", "3", "--out", &out.display().to_string(), "--quiet"]);
    let rows = read_jsonl(&out.join("experiments.jsonl"));
    let clean = read_jsonl(&out.join("clean.jsonl"));
    let cfg = &Model::load(&model).unwrap().cfg;
    let n_components = cfg.n_layers * cfg.n_heads + 2;
    assert_eq!(clean.len(), 6);
    assert_eq!(rows.len(), 2 * n_components * 6, "one row per (component, prompt), controls included");
    // Per component (in file order of first appearance): its rows.
    let mut by: Vec<(String, Vec<&Value>)> = Vec::new();
    for r in &rows {
        for f in ["kind", "layer", "op", "index", "label_logits", "pred", "clean_pred", "control", "gold", "alpha"] {
            assert!(r.get(f).is_some(), "no `{f}` in {r}");
        }
        assert_eq!((r["op"].as_str(), r["alpha"].as_f64()), (Some("scale"), Some(2.5)));
        let key = match r["kind"].as_str().unwrap() {
            "head" => {
                assert!(r.get("neurons").is_none() && r["head"].as_u64().unwrap() < cfg.n_heads as u64, "{r}");
                format!("h{}.{}.{}", r["layer"], r["head"], r["control"])
            }
            "neurons" => {
                assert!(r.get("head").is_none(), "{r}");
                format!("n{}.{}.{}", r["layer"], r["neurons"], r["control"])
            }
            k => panic!("kind {k}"),
        };
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(r["clean_pred"], clean[i]["pred"]);
        assert_eq!(r["gold"], clean[i]["gold"]);
        assert!(labels.contains(&r["gold"].as_str().unwrap()));
        let logits: Vec<f32> = serde_json::from_value(r["label_logits"].clone()).unwrap();
        assert_eq!(r["pred"].as_str().unwrap(), labels[argmax(&logits)]);
        match by.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => by.push((key, vec![r])),
        }
    }
    let controls = rows.iter().filter(|r| r["control"] == true).count();
    assert_eq!(controls, n_components * 6);
    // summary.csv: every cell recomputed from the rows (controls may repeat a component: a
    // random head can be drawn twice, so rows group by (component, control) and summary lines
    // are matched in order).
    let text = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..9], ["kind", "layer", "head", "neurons", "control", "op", "n", "flip_rate", "mean_clean_pred_logit_change"]);
    assert_eq!(header[9..], labels.map(|l| format!("mean_logit_change:{l}")).iter().map(String::as_str).collect::<Vec<_>>()[..]);
    let lines: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(lines.len(), 2 * n_components);
    let clean_logits: Vec<Vec<f32>> = clean.iter().map(|c| serde_json::from_value(c["label_logits"].clone()).unwrap()).collect();
    for line in &lines {
        let key = match line[0].as_str() {
            "head" => format!("h{}.{}.{}", line[1], line[2], line[4]),
            _ => format!("n{}.[{}].{}", line[1], line[3].replace(' ', ","), line[4]),
        };
        let (_, rs) = by.iter().find(|(k, _)| *k == key).unwrap_or_else(|| panic!("no rows of summary line {line:?}"));
        // A control drawn twice has its rows twice: n is per summary line.
        let n: usize = line[6].parse().unwrap();
        assert_eq!(rs.len() % n, 0);
        let rs = &rs[..n];
        let num = |j: usize| line[j].parse::<f64>().unwrap();
        let flips = rs.iter().filter(|r| r["pred"] != r["clean_pred"]).count() as f64 / n as f64;
        let change = |r: &Value, l: usize| r["label_logits"][l].as_f64().unwrap() - clean_logits[r["index"].as_u64().unwrap() as usize][l] as f64;
        let cp = |r: &Value| labels.iter().position(|l| r["clean_pred"] == *l).unwrap();
        let mean = |f: &dyn Fn(&Value) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n as f64;
        assert!((num(7) - flips).abs() < 1e-6, "{line:?}");
        assert!((num(8) - mean(&|r| change(r, cp(r)))).abs() < 1e-5, "{line:?}");
        for l in 0..3 {
            assert!((num(9 + l) - mean(&|r| change(r, l))).abs() < 1e-5, "{line:?} label {l}");
        }
    }
    assert!(std::fs::metadata(out.join("heatmap.png")).unwrap().len() > 1000);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((m["command"].as_str(), m["method"].as_str(), m["op"].as_str(), m["n_experiments"].as_u64()), (Some("ablate"), Some("resumed"), Some("scale"), Some(2 * n_components as u64)));

    // The naive method writes the same rows (f32 tolerance).
    let naive = tmp.path().join("naive");
    #[rustfmt::skip]
    patchbay_ok(&["ablate", "--model", &model.display().to_string(), "--dataset", &ds, "--label-col", "emotion", "--filter", "emotion=pride", "--filter", "emotion=anger", "--filter", "emotion=joy", "--limit", "6",
        "--label-token-ids", "pride=40,anger=65,joy=262", "--heads", "all", "--neuron-groups", &groups, "--op", "scale", "--alpha", "2.5", "--positions", "last:2", "--random-control", "--seed", "3", "--out", &naive.display().to_string(), "--quiet", "--method", "naive"]);
    let key = |r: &Value| format!("{}{}{}{}{}{}", r["kind"], r["layer"], r["head"], r["neurons"], r["control"], r["index"]);
    let mut a: Vec<(String, Vec<f32>)> = rows.iter().map(|r| (key(r), serde_json::from_value(r["label_logits"].clone()).unwrap())).collect();
    let mut b: Vec<(String, Vec<f32>)> = read_jsonl(&naive.join("experiments.jsonl")).iter().map(|r| (key(r), serde_json::from_value(r["label_logits"].clone()).unwrap())).collect();
    a.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.partial_cmp(&y.1).unwrap()));
    b.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.partial_cmp(&y.1).unwrap()));
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>());
    assert_close("naive vs resumed files", &a.iter().flat_map(|x| x.1.clone()).collect::<Vec<_>>(), &b.iter().flat_map(|x| x.1.clone()).collect::<Vec<_>>(), F32_ATOL, F32_RTOL);
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = write(tmp.path(), "ids.json", &serde_json::to_string(&prompt_ids("llama")).unwrap());
    let groups = |name: &str, text: &str| write(tmp.path(), name, text);
    let g_range = groups("range.json", r#"[{"layer": 0, "neurons": [1, 96]}]"#);
    let g_layer = groups("layer.json", r#"[{"layer": 2, "neurons": [1]}]"#);
    let g_empty = groups("empty.json", r#"[{"layer": 0, "neurons": []}]"#);
    let g_twice = groups("twice.json", r#"[{"layer": 0, "neurons": [4, 4]}]"#);
    let g_field = groups("field.json", r#"[{"layer": 0, "neurons": [1], "heads": [2]}]"#);
    let g_json = groups("json.json", r#"{"layer": 0"#);
    let g_none = groups("none.json", "[]");
    let out = tmp.path().join("out").display().to_string();
    let model = fixture("llama").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--heads", "2.0"], "layer 2 is out of range"),
        (vec!["--heads", "0.4"], "head 4 is out of range"),
        (vec!["--heads", "0,1"], "not LAYER.HEAD"),
        (vec!["--neuron-groups", &g_range], "neuron 96 is out of range"),
        (vec!["--neuron-groups", &g_layer], "layer 2 is out of range"),
        (vec!["--neuron-groups", &g_empty], "empty"),
        (vec!["--neuron-groups", &g_twice], "listed twice"),
        (vec!["--neuron-groups", &g_field], "unknown field `heads`"),
        (vec!["--neuron-groups", &g_json], "expected a JSON list"),
        (vec!["--neuron-groups", &g_none], "empty list"),
        (vec!["--heads", "all", "--op", "cut"], "--op `cut`"),
        (vec!["--heads", "all", "--op", "scale"], "needs --alpha"),
        (vec!["--heads", "all", "--op", "scale", "--alpha", "inf"], "not a finite"),
        (vec!["--heads", "all", "--alpha", "2"], "--alpha is for --op scale"),
        (vec!["--heads", "all", "--positions", "last+generated"], "prompt only (no generated"),
        (vec!["--heads", "all", "--op", "add", "--alpha", "2"], "--vector goes with --op add"),
        (vec!["--heads", "all", "--vector", "v.safetensors:joy"], "--vector goes with --op add"),
        (vec![], "give the components"),
    ];
    for (extra, says) in cases {
        assert_refused(&ablate_args(&model, &out, &ids, &extra), says, Some(&out));
    }
}

/// Against Hugging Face forward pre-hooks on o_proj and down_proj
/// (`tests/fixtures/*/ablate_golden.json`, made by `scripts/golden/make_ablate_goldens.py`): both
/// methods on the CPU (f32 tolerance) on every family, and the resumed method on the device for
/// llama (bf16 forward tolerance).
#[test]
fn matches_hugging_face_hooks() {
    for family in FAMILIES {
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(fixture(family).join("ablate_golden.json")).unwrap()).unwrap();
        let model = Model::load(&fixture(family)).unwrap();
        let prompts: Vec<Vec<u32>> = serde_json::from_value(golden["prompts"].clone()).unwrap();
        let labels: Vec<u32> = serde_json::from_value(golden["labels"].clone()).unwrap();
        let clean: Vec<Vec<f32>> = serde_json::from_value(golden["clean"].clone()).unwrap();
        let device = (family == "llama").then(|| DeviceModel::upload(&model, test_driver(FiberOrder::Forward).1).unwrap());
        for case in golden["cases"].as_array().unwrap() {
            let layer = case["layer"].as_u64().unwrap() as usize;
            let component = match case["kind"].as_str().unwrap() {
                "head" => Component::Head { layer, head: case["head"].as_u64().unwrap() as usize },
                _ => Component::Neurons { layer, neurons: serde_json::from_value(case["neurons"].clone()).unwrap() },
            };
            let op = match case["op"].as_str().unwrap() {
                "zero" => AblateOp::Zero,
                _ => AblateOp::Scale { alpha: case["alpha"].as_f64().unwrap() as f32 },
            };
            let positions = if case["positions"] == "all" { Positions::All } else { Positions::List(serde_json::from_value(case["positions"].clone()).unwrap()) };
            let tag = format!("{family} {} {op:?} at {positions:?}", component.name());
            let abl = [Ablation { component, control: false }];
            let conds = conditions(&abl, op, &BTreeMap::new(), &positions, 0, &model.cfg).unwrap();
            let want: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(case["ablated"].clone()).unwrap().concat();
            let run = |engine: &dyn Engine, method: Method| {
                let mut got = vec![f32::NAN; want.len()];
                let mut got_clean = vec![f32::NAN; want.len()];
                let k = labels.len();
                label_runner(method)(engine, &prompts, Readout { label_tokens: &labels, projection: None }, &one_each(&conds), 1 << 20, &ProgressBar::hidden(), &mut |i, l, _| {
                    got_clean[i * k..(i + 1) * k].copy_from_slice(l);
                    Ok(())
                }, &mut |rows| {
                    rows.iter().for_each(|r| got[r.index * k..(r.index + 1) * k].copy_from_slice(&r.label_logits));
                    Ok(())
                })
                .unwrap();
                (got_clean, got)
            };
            for method in [Method::Resumed, Method::Naive] {
                let (got_clean, got) = run(&model, method);
                assert_close(&format!("{tag} {method:?} clean"), &got_clean, &clean.concat(), F32_ATOL, F32_RTOL);
                assert_close(&format!("{tag} {method:?}"), &got, &want, F32_ATOL, F32_RTOL);
            }
            if let Some(dev) = &device {
                assert_forward_close(&format!("{tag} device"), &run(dev, Method::Resumed).1, &want);
            }
        }
    }
}

/// A random unit-norm-free direction at the model's width (the projection normalises it).
fn random_direction(rng: &mut Rng, d: usize) -> Vec<f32> {
    (0..d).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

/// Experiments of several components at several layers (the top-k sets' shape), read with a
/// projection at a random layer (also below an experiment's first layer, where it cannot
/// change): resumed equals naive on every family, labels and projections; the clean projection
/// is the captured residual's dot with the unit direction; an experiment of identity ops is the
/// clean run bit for bit.
#[test]
fn experiments_of_several_components_with_a_projection() {
    let mut rng = Rng::seeded(0x70b_c0de);
    for family in FAMILIES {
        let dir = synth_family(family, 4, rng.next_u64());
        let model = Model::load(dir.path()).unwrap();
        let cfg = &model.cfg;
        let prompts = random_prompts(3, &[6, 4, 9], cfg.vocab_size, rng.next_u64());
        let mut pool = parse_heads("all", cfg).unwrap();
        pool.extend(random_groups(&mut rng, &model, 4));
        let op = every_op(&mut rng)[rng.below(4)];
        let positions = random_positions(&mut rng);
        let mut experiments: Vec<Vec<Condition>> = (0..5)
            .map(|_| {
                let mut picks = pool.clone();
                rng.shuffle(&mut picks);
                let abl: Vec<Ablation> = picks[..1 + rng.below(4)].iter().map(|c| Ablation { component: c.clone(), control: false }).collect();
                the_conditions(&model, &prompts, &abl, op, &positions, rng.next_u64())
            })
            .collect();
        let abl = [Ablation { component: pool[0].clone(), control: false }, Ablation { component: pool[pool.len() - 1].clone(), control: false }];
        experiments.push(conditions(&abl, AblateOp::Scale { alpha: 1.0 }, &BTreeMap::new(), &positions, 0, cfg).unwrap());
        let site = Site::new(rng.below(cfg.n_layers), SiteKind::ResidPost);
        let projection = Projection::new(site, random_direction(&mut rng, cfg.d_model), cfg).unwrap();
        let tag = format!("{family} {op:?} at {positions:?}, projection at {site}");
        let naive = sweep_experiments(&model, Method::Naive, &prompts, &experiments, Some(&projection), 1 << 20);
        for batch_rows in [5, 1 << 20] {
            let resumed = sweep_experiments(&model, Method::Resumed, &prompts, &experiments, Some(&projection), batch_rows);
            assert_close(&format!("{tag} batch_rows {batch_rows}"), &resumed.rows, &naive.rows, F32_ATOL, F32_RTOL);
            assert_close(&format!("{tag} projection, batch_rows {batch_rows}"), &resumed.projection, &naive.projection, F32_ATOL, F32_RTOL);
            assert_close(&format!("{tag} clean projection, batch_rows {batch_rows}"), &resumed.clean_projection, &naive.clean_projection, F32_ATOL, F32_RTOL);
            let n = prompts.len();
            let last = experiments.len() - 1;
            assert_eq!(resumed.rows[last * n * LABELS.len()..], resumed.clean[..], "{tag}: identity experiment");
            assert_eq!(resumed.projection[last * n..], resumed.clean_projection[..], "{tag}: identity experiment");
        }
        assert_changes(&tag, &naive.clean, &naive.rows);
        // The clean projection from a capture of the site.
        let out = model.run_prompts(&prompts, &RunRequest { captures: &[Capture { site, positions: Positions::List(vec![-1]) }], ..Default::default() }).unwrap();
        let unit: Vec<f32> = {
            let n = projection.direction.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{tag}: direction not unit");
            projection.direction.clone()
        };
        let want: Vec<f32> = out.captured[0].data.chunks(cfg.d_model).map(|x| x.iter().zip(&unit).map(|(a, b)| a * b).sum()).collect();
        assert_close(&format!("{tag} clean projection"), &naive.clean_projection, &want, 1e-5, 1e-5);
    }
}

/// `patchbay ablate --ranking`: the top sets are the ranking's prefixes (merged heads and neurons
/// tables by mean), each random set has the top set's counts per layer and kind and avoids the
/// top set of its k (there are enough others here); top_k.csv is recomputed from experiments.jsonl and clean.jsonl; the plot exists.
#[test]
fn top_k_curves_follow_the_ranking() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = write(tmp.path(), "ids.json", &serde_json::to_string(&prompt_ids("llama")).unwrap());
    let model = fixture("llama");
    let cfg = Model::load(&model).unwrap().cfg;
    // Means: joy ranks L1.H2 (0.9), N0.17 (0.8), L0.H3 (0.5), N1.5 (0.4), L0.H0 (0.1); anger rows are distractors.
    let heads = write(tmp.path(), "heads.csv", "layer,head,label,mean,sd,n,rank\n0,0,joy,0.1,0,3,3\n1,2,joy,0.9,0,3,1\n0,3,joy,0.5,0,3,2\n1,2,anger,5,0,3,1\n");
    let neurons = write(tmp.path(), "neurons.csv", "layer,neuron,label,mean,sd,n,rank\n1,5,joy,0.4,0,3,2\n0,17,joy,0.8,0,3,1\n0,1,anger,9,0,3,1\n");
    let ranking = ["L1.H2", "L0.N[17]", "L0.H3", "L1.N[5]", "L0.H0"];
    let dirs = tmp.path().join("dir.safetensors");
    let mut rng = Rng::seeded(7);
    let v = random_direction(&mut rng, cfg.d_model);
    patchbay::io::write_safetensors(&dirs, &[("x".to_string(), patchbay::io::OutTensor::Float { shape: vec![cfg.d_model], data: v, dtype: patchbay::io::OutDtype::F32 })], &Default::default()).unwrap();
    let out = tmp.path().join("run");
    let dirs_s = format!("{}:x", dirs.display());
    let (m, o) = (model.display().to_string(), out.display().to_string());
    let extra = ["--ranking", &heads, "--ranking", &neurons, "--ranking-label", "joy", "--top-k", "1,3,5", "--random-draws", "4", "--op", "zero", "--projection", &dirs_s, "--projection-layer", "0"];
    patchbay_ok(&ablate_args(&m, &o, &ids, &extra));
    let rows = read_jsonl(&out.join("experiments.jsonl"));
    let clean = read_jsonl(&out.join("clean.jsonl"));
    let n = clean.len();
    assert_eq!(rows.len(), 3 * 5 * n, "(1 top + 4 random) sets per k, one row per prompt");
    let names = |r: &Value| -> Vec<String> { serde_json::from_value(r["components"].clone()).unwrap() };
    let units = |names: &[String]| -> Vec<(String, usize)> {
        // (site, layer) of every unit: heads one each, a neuron group one per neuron.
        let mut u = Vec::new();
        for c in names {
            let (l, rest) = c.split_once('.').unwrap();
            if let Some(list) = rest.strip_prefix("N[") {
                u.extend(list.trim_end_matches(']').split(',').map(|_| (format!("N{l}"), 1)));
            } else {
                u.push((format!("H{l}"), 1));
            }
        }
        u.sort();
        u
    };
    for k in [1usize, 3, 5] {
        let top: Vec<&Value> = rows.iter().filter(|r| r["k"] == k && r["draw"].is_null()).collect();
        assert_eq!(top.len(), n);
        let mut want: Vec<String> = ranking[..k].iter().map(|s| s.to_string()).collect();
        let mut got = names(top[0]);
        want.sort();
        got.sort();
        assert_eq!(got, want, "top {k}");
        for d in 0..4 {
            let rs: Vec<&Value> = rows.iter().filter(|r| r["k"] == k && r["draw"] == d).collect();
            assert_eq!(rs.len(), n);
            assert!(rs.iter().all(|r| r["control"] == true && r["kind"] == "top_k"));
            let random = names(rs[0]);
            assert_eq!(units(&random), units(&want), "draw {d} of k {k}: the top set's counts per layer and kind");
            for c in &random {
                for t in &ranking[..k] {
                    let overlap = c == t || (c.contains(".N[") && t.contains(".N[") && c.split_once('.').unwrap().0 == t.split_once('.').unwrap().0 && c.trim_end_matches(']').split(|ch| ch == '[' || ch == ',').skip(1).any(|x| t.trim_end_matches(']').split('[').nth(1) == Some(x)));
                    assert!(!overlap, "draw {d} of k {k}: {c} is a top component ({t})");
                }
            }
        }
    }
    // top_k.csv recomputed.
    let clean_logits: Vec<Vec<f64>> = clean.iter().map(|c| serde_json::from_value(c["label_logits"].clone()).unwrap()).collect();
    let clean_proj: Vec<f64> = clean.iter().map(|c| c["projection"].as_f64().unwrap()).collect();
    let text = std::fs::read_to_string(out.join("top_k.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("k,set,metric,mean,ci_low,ci_high,flip_rate,n"));
    let mut seen = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let (k, random) = (f[0].parse::<u64>().unwrap(), f[1] == "random");
        let rs: Vec<&Value> = rows.iter().filter(|r| r["k"] == k && r["draw"].is_null() != random).collect();
        let value = |r: &Value| -> f64 {
            let i = r["index"].as_u64().unwrap() as usize;
            let l = |name: &str| ["a", "b", "c"].iter().position(|x| *x == name).unwrap();
            match f[2] {
                "clean_pred_logit_change" => r["label_logits"][l(r["clean_pred"].as_str().unwrap())].as_f64().unwrap() - clean_logits[i][l(r["clean_pred"].as_str().unwrap())],
                "projection_change" => r["projection"].as_f64().unwrap() - clean_proj[i],
                m => panic!("metric {m}"),
            }
        };
        let mean = rs.iter().map(|r| value(r)).sum::<f64>() / rs.len() as f64;
        let flips = rs.iter().filter(|r| r["pred"] != r["clean_pred"]).count() as f64 / rs.len() as f64;
        let num = |j: usize| f[j].parse::<f64>().unwrap();
        assert!((num(3) - mean).abs() < 1e-5, "{line}: mean {mean}");
        assert!(num(4) <= num(3) + 1e-6 && num(3) <= num(5) + 1e-6 || random, "{line}: interval");
        assert!((num(6) - flips).abs() < 1e-6, "{line}");
        assert_eq!(f[7].parse::<usize>().unwrap(), rs.len(), "{line}");
        seen += 1;
    }
    assert_eq!(seen, 3 * 2 * 2, "k x set x metric (joy is no label here: no logit_change:joy)");
    // The projection at layer 0: sets whose components all sit at layer 1 cannot change it.
    for r in rows.iter().filter(|r| names(r).iter().all(|c| c.starts_with("L1."))) {
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(r["projection"].as_f64().unwrap(), clean_proj[i], "{r}");
    }
    assert!(std::fs::metadata(out.join("top_k.png")).unwrap().len() > 1000);
    let man: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((man["ranking_label"].as_str(), man["n_experiments"].as_u64(), man["projection"]["site"].as_str()), (Some("joy"), Some(15), Some("blocks.0.hook_resid_post")));

    // A component sweep with a projection: summary.csv's mean_projection_change recomputed.
    let comp = tmp.path().join("components");
    let c = comp.display().to_string();
    patchbay_ok(&ablate_args(&m, &c, &ids, &["--heads", "0.1,1.2", "--op", "zero", "--projection", &dirs_s]));
    let rows = read_jsonl(&comp.join("experiments.jsonl"));
    let clean_proj: Vec<f64> = read_jsonl(&comp.join("clean.jsonl")).iter().map(|c| c["projection"].as_f64().unwrap()).collect();
    let text = std::fs::read_to_string(comp.join("summary.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    assert_eq!(header.last(), Some(&"mean_projection_change"));
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let rs: Vec<&Value> = rows.iter().filter(|r| r["layer"].to_string() == f[1] && r["head"].to_string() == f[2]).collect();
        let want = rs.iter().map(|r| r["projection"].as_f64().unwrap() - clean_proj[r["index"].as_u64().unwrap() as usize]).sum::<f64>() / rs.len() as f64;
        assert!(!rs.is_empty() && (f.last().unwrap().parse::<f64>().unwrap() - want).abs() < 1e-5, "{line}: {want}");
    }

    // One-line errors.
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--ranking", &heads, "--ranking-label", "fear", "--top-k", "1"], "no row of label `fear`"),
        (vec!["--ranking", &heads, "--ranking-label", "joy", "--top-k", "4"], "the ranking has 3 components"),
        (vec!["--ranking", &heads, "--ranking-label", "joy", "--top-k", "1,1"], "listed twice"),
        (vec!["--ranking", &heads, "--ranking-label", "joy"], "needs --top-k"),
        (vec!["--ranking", &heads, "--top-k", "1"], "needs --ranking-label"),
        (vec!["--ranking", &heads, "--ranking-label", "joy", "--top-k", "1", "--heads", "all"], "replaces --heads"),
        (vec!["--ranking", &ids, "--ranking-label", "joy", "--top-k", "1"], "not a components contrib table"),
        (vec!["--heads", "all", "--top-k", "1"], "go with --ranking"),
        (vec!["--heads", "all", "--projection-layer", "1"], "goes with --projection"),
        (vec!["--heads", "all", "--projection", &dirs_s, "--projection-layer", "9"], "out of range"),
    ];
    for (extra, says) in cases {
        let bad = tmp.path().join("bad").display().to_string();
        assert_refused(&ablate_args(&m, &bad, &ids, &extra), says, Some(&bad));
    }
}

/// `patchbay ablate --sublayers`: one experiment per (layer, sublayer, alpha), alpha 1 the clean
/// run exactly, influence.csv recomputed from the rows, the naive method the same numbers, and
/// one-line errors.
#[test]
fn sublayer_influence_follows_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = write(tmp.path(), "ids.json", &serde_json::to_string(&prompt_ids("llama")).unwrap());
    let model = fixture("llama");
    let cfg = Model::load(&model).unwrap().cfg;
    let dirs = tmp.path().join("dir.safetensors");
    let v = random_direction(&mut Rng::seeded(11), cfg.d_model);
    patchbay::io::write_safetensors(&dirs, &[("x".to_string(), patchbay::io::OutTensor::Float { shape: vec![cfg.d_model], data: v, dtype: patchbay::io::OutDtype::F32 })], &Default::default()).unwrap();
    let dirs_s = format!("{}:x", dirs.display());
    let m = model.display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = out.display().to_string();
        let mut args = vec!["--sublayers", "attn,mlp", "--alphas", "0,1,2.5", "--projection", &dirs_s, "--positions", "all"];
        args.extend_from_slice(extra);
        patchbay_ok(&ablate_args(&m, &o, &ids, &args));
        out
    };
    let out = run("resumed", &[]);
    let rows = read_jsonl(&out.join("experiments.jsonl"));
    let clean = read_jsonl(&out.join("clean.jsonl"));
    let n = clean.len();
    assert_eq!(rows.len(), cfg.n_layers * 2 * 3 * n);
    let clean_proj: Vec<f64> = clean.iter().map(|c| c["projection"].as_f64().unwrap()).collect();
    for r in rows.iter().filter(|r| r["alpha"] == 1.0) {
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(r["projection"].as_f64().unwrap(), clean_proj[i], "alpha 1 is the clean run: {r}");
        assert_eq!(r["label_logits"], clean[i]["label_logits"], "{r}");
    }
    let text = std::fs::read_to_string(out.join("influence.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("layer,sublayer,alpha,n,mean_projection_change,ci_low,ci_high,flip_rate,mean_clean_pred_logit_change"));
    let mut moved = false;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let rs: Vec<&Value> = rows.iter().filter(|r| r["layer"].to_string() == f[0] && r["site"] == f[1] && r["alpha"].as_f64().unwrap() == f[2].parse::<f64>().unwrap()).collect();
        assert_eq!(rs.len(), n, "{line}");
        let change: Vec<f64> = rs.iter().map(|r| r["projection"].as_f64().unwrap() - clean_proj[r["index"].as_u64().unwrap() as usize]).collect();
        let mean = change.iter().sum::<f64>() / n as f64;
        let num = |j: usize| f[j].parse::<f64>().unwrap();
        assert!((num(4) - mean).abs() < 1e-5, "{line}: {mean}");
        assert!(num(5) <= num(4) + 1e-6 && num(4) <= num(6) + 1e-6, "{line}: interval");
        assert!((num(7) - rs.iter().filter(|r| r["pred"] != r["clean_pred"]).count() as f64 / n as f64).abs() < 1e-6, "{line}");
        moved |= mean.abs() > 1e-4;
    }
    assert!(moved, "no sublayer moved the projection");
    assert!(std::fs::metadata(out.join("influence.png")).unwrap().len() > 1000);
    // The naive method: the same numbers.
    let naive = read_jsonl(&run("naive", &["--method", "naive"]).join("experiments.jsonl"));
    let key = |r: &Value| format!("{}{}{}{}", r["layer"], r["site"], r["alpha"], r["index"]);
    let mut a: Vec<(String, f32)> = rows.iter().map(|r| (key(r), r["projection"].as_f64().unwrap() as f32)).collect();
    let mut b: Vec<(String, f32)> = naive.iter().map(|r| (key(r), r["projection"].as_f64().unwrap() as f32)).collect();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>());
    assert_close("naive vs resumed projections", &a.iter().map(|x| x.1).collect::<Vec<_>>(), &b.iter().map(|x| x.1).collect::<Vec<_>>(), F32_ATOL, F32_RTOL);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--sublayers", "attn", "--alphas", "2"], "give --projection"),
        (vec!["--sublayers", "attn", "--projection", &dirs_s], "needs --alphas"),
        (vec!["--sublayers", "attn,attn", "--alphas", "2", "--projection", &dirs_s], "listed twice"),
        (vec!["--sublayers", "ffn", "--alphas", "2", "--projection", &dirs_s], "`ffn` is not attn or mlp"),
        (vec!["--sublayers", "mlp", "--alphas", "2,2", "--projection", &dirs_s], "2 is listed twice"),
        (vec!["--sublayers", "mlp", "--alphas", "NaN", "--projection", &dirs_s], "not a finite"),
        (vec!["--sublayers", "mlp", "--alphas", "2", "--projection", &dirs_s, "--heads", "all"], "replaces --heads"),
        (vec!["--sublayers", "mlp", "--alphas", "2", "--projection", &dirs_s, "--op", "mean"], "no --op"),
        (vec!["--heads", "all", "--alphas", "2"], "--alphas goes with --sublayers"),
    ];
    for (extra, says) in cases {
        let bad = tmp.path().join("bad").display().to_string();
        assert_refused(&ablate_args(&m, &bad, &ids, &extra), says, Some(&bad));
    }
}

/// Rows of an experiments.jsonl keyed by (experiment, prompt), each key once.
fn rows_by_key(path: &Path) -> BTreeMap<(u64, u64), Value> {
    let mut m = BTreeMap::new();
    for r in read_jsonl(path) {
        let key = (r["experiment"].as_u64().unwrap(), r["index"].as_u64().unwrap());
        assert!(m.insert(key, r).is_none(), "{key:?} twice in {}", path.display());
    }
    m
}

fn assert_same_rows(tag: &str, a: &BTreeMap<(u64, u64), Value>, b: &BTreeMap<(u64, u64), Value>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{tag}: keys");
    let logits = |m: &BTreeMap<(u64, u64), Value>| -> Vec<f32> { m.values().flat_map(|r| serde_json::from_value::<Vec<f32>>(r["label_logits"].clone()).unwrap()).collect() };
    assert_close(tag, &logits(a), &logits(b), F32_ATOL, F32_RTOL);
    for (k, r) in a {
        for f in ["kind", "layer", "head", "neurons", "k", "draw", "components", "site", "alpha", "control"] {
            assert_eq!(r.get(f), b[k].get(f), "{tag}: {f} of {k:?}");
        }
    }
}

/// `ablate --shard I/N` then `merge` gives the unsharded run's rows and outputs (components,
/// top-k and sublayer sweeps); a killed run (lines cut, a torn last line) continued with
/// `--resume` keeps its complete lines and ends with every row exactly once and the same
/// outputs; one-line errors for a second run without --resume, another sweep, another shard,
/// a tampered line and bad merges.
#[test]
fn shards_merge_and_resume_give_the_whole_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = write(tmp.path(), "ids.json", &serde_json::to_string(&prompt_ids("llama")).unwrap());
    let model = fixture("llama");
    let cfg = Model::load(&model).unwrap().cfg;
    let dirs = tmp.path().join("dir.safetensors");
    let v = random_direction(&mut Rng::seeded(5), cfg.d_model);
    patchbay::io::write_safetensors(&dirs, &[("x".to_string(), patchbay::io::OutTensor::Float { shape: vec![cfg.d_model], data: v, dtype: patchbay::io::OutDtype::F32 })], &Default::default()).unwrap();
    let dirs_s = format!("{}:x", dirs.display());
    let heads = write(tmp.path(), "heads.csv", "layer,head,label,mean,sd,n,rank\n0,1,joy,0.5,0,3,1\n1,2,joy,0.4,0,3,2\n1,0,joy,0.1,0,3,3\n");
    let m = model.display().to_string();
    let n_prompts = prompt_ids("llama").len();
    let modes: Vec<(&str, Vec<&str>, &str)> = vec![
        ("components", vec!["--heads", "all", "--op", "mean", "--random-control", "--projection", &dirs_s], "summary.csv"),
        ("topk", vec!["--ranking", &heads, "--ranking-label", "joy", "--top-k", "1,3", "--random-draws", "2", "--op", "zero"], "top_k.csv"),
        ("sublayers", vec!["--sublayers", "attn,mlp", "--alphas", "0,2", "--projection", &dirs_s, "--projection-layer", "0"], "influence.csv"),
    ];
    let csv_close = |tag: &str, a: &Path, b: &Path| {
        let (a, b) = (std::fs::read_to_string(a).unwrap(), std::fs::read_to_string(b).unwrap());
        assert_eq!(a.lines().count(), b.lines().count(), "{tag}");
        for (x, y) in a.lines().zip(b.lines()) {
            for (u, w) in x.split(',').zip(y.split(',')) {
                match (u.parse::<f64>(), w.parse::<f64>()) {
                    (Ok(u), Ok(w)) => assert!((u - w).abs() <= 1e-4 * (1.0 + u.abs()), "{tag}: {x} vs {y}"),
                    _ => assert_eq!(u, w, "{tag}: {x} vs {y}"),
                }
            }
        }
    };
    for (mode, extra, output) in &modes {
        let run = |name: &str, more: &[&str]| -> (i32, String) {
            let o = tmp.path().join(mode).join(name).display().to_string();
            let mut args = ablate_args(&m, &o, &ids, extra);
            args.extend_from_slice(more);
            patchbay_cli(&args)
        };
        let dir = |name: &str| tmp.path().join(mode).join(name);
        assert_eq!(run("whole", &[]).0, 0);
        let whole = rows_by_key(&dir("whole").join("experiments.jsonl"));
        assert!(!whole.is_empty());
        // Shards, then merge.
        for s in ["2/3", "0/3", "1/3"] {
            let (code, err) = run(&format!("s{}", &s[..1]), &["--shard", s]);
            assert_eq!(code, 0, "{mode} shard {s}: {err}");
        }
        let merged = dir("merged");
        let shards: Vec<String> = ["s1", "s0", "s2"].iter().map(|s| dir(s).display().to_string()).collect();
        let mut margs = vec!["merge", "--quiet", "--out"];
        let ms = merged.display().to_string();
        margs.push(&ms);
        margs.extend(shards.iter().map(String::as_str));
        patchbay_ok(&margs);
        assert_same_rows(&format!("{mode} merged"), &rows_by_key(&merged.join("experiments.jsonl")), &whole);
        assert_eq!(read_jsonl(&merged.join("clean.jsonl")).len(), n_prompts);
        csv_close(&format!("{mode} merged {output}"), &merged.join(output), &dir("whole").join(output));
        // A killed run: half the rows kept, the rest of the file cut mid-line, the last clean
        // line gone; --resume finishes it.
        let killed = dir("killed");
        std::fs::create_dir_all(&killed).unwrap();
        std::fs::copy(dir("whole").join("manifest.json"), killed.join("manifest.json")).unwrap();
        let text = std::fs::read_to_string(dir("whole").join("experiments.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let keep = lines.len() / 2;
        let cut = format!("{}\n{}", lines[..keep].join("\n"), &lines[keep][..lines[keep].len() / 2]);
        std::fs::write(killed.join("experiments.jsonl"), &cut).unwrap();
        let clean_text = std::fs::read_to_string(dir("whole").join("clean.jsonl")).unwrap();
        let clean_lines: Vec<&str> = clean_text.lines().collect();
        std::fs::write(killed.join("clean.jsonl"), clean_lines[..clean_lines.len() - 1].join("\n") + "\n").unwrap();
        let (code, err) = run("killed", &[]);
        assert!(code != 0 && err.contains("add --resume"), "{mode}: {err}");
        let (code, err) = run("killed", &["--resume"]);
        assert_eq!(code, 0, "{mode} resume: {err}");
        let resumed = std::fs::read_to_string(killed.join("experiments.jsonl")).unwrap();
        assert!(resumed.starts_with(&(lines[..keep].join("\n") + "\n")), "{mode}: the kept lines are kept as they were");
        assert_same_rows(&format!("{mode} resumed"), &rows_by_key(&killed.join("experiments.jsonl")), &whole);
        assert_eq!(read_jsonl(&killed.join("clean.jsonl")).len(), n_prompts);
        csv_close(&format!("{mode} resumed {output}"), &killed.join(output), &dir("whole").join(output));
        let man: Value = serde_json::from_str(&std::fs::read_to_string(killed.join("manifest.json")).unwrap()).unwrap();
        assert_eq!((man["status"].as_str(), man["rows_kept_from_earlier_runs"].as_u64()), (Some("complete"), Some(keep as u64)));
    }
    // Errors.
    let comp = |name: &str| tmp.path().join("components").join(name).display().to_string();
    let base: Vec<&str> = modes[0].1.clone();
    let with = |more: &[&'static str]| -> Vec<String> { base.iter().map(|s| s.to_string()).chain(more.iter().map(|s| s.to_string())).collect() };
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (comp("whole"), with(&["--resume", "--seed", "9"]), "holds a different sweep"),
        (comp("whole"), with(&["--resume", "--shard", "0/3"]), "not 0/3"),
        (comp("s0"), with(&["--resume"]), "holds shard 0/3 of this sweep"),
        (comp("new"), with(&["--shard", "3/3"]), "expected I/N"),
        (comp("new"), with(&["--shard", "0/99"]), "cannot make 99 shards"),
    ];
    for (out, extra, says) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        assert_refused(&ablate_args(&m, &out, &ids, &extra), says, None);
    }
    // A tampered line is refused with its file and line.
    let tampered = tmp.path().join("components").join("whole").join("experiments.jsonl");
    let text = std::fs::read_to_string(&tampered).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for (bad, says) in [(r#""label_logits":[1.0]"#, "`label_logits` should be 3"), (r#""experiment":99999"#, "`experiment` is not an experiment index")] {
        let key = bad.split(':').next().unwrap();
        let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
        v[key.trim_matches('"')] = serde_json::from_str(bad.split_once(':').unwrap().1).unwrap();
        let orig = std::mem::replace(&mut lines[2], v.to_string());
        std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
        let extra: Vec<&str> = base.iter().copied().chain(["--resume"]).collect();
        let (code, err) = patchbay_cli(&ablate_args(&m, &comp("whole"), &ids, &extra));
        assert!(code != 0 && err.contains("line 3") && err.contains(says), "{bad}: {err}");
        lines[2] = orig;
    }
    // Bad merges.
    let out = tmp.path().join("bad-merge").display().to_string();
    let (s0, s1, s2, whole) = (comp("s0"), comp("s1"), comp("s2"), comp("whole"));
    let t0 = tmp.path().join("topk").join("s0").display().to_string();
    for (dirs, says) in [(vec![s0.as_str(), s1.as_str()], "shard 2/3 is missing"), (vec![s0.as_str(), s0.as_str(), s1.as_str()], "given twice"), (vec![s0.as_str(), s1.as_str(), t0.as_str()], "different sweeps"), (vec![whole.as_str(), s1.as_str(), s2.as_str()], "holds a whole sweep")] {
        let mut args = vec!["merge", "--out", &out];
        args.extend(dirs.iter().copied());
        let (code, err) = patchbay_cli(&args);
        assert!(code != 0 && err.contains(says) && err.trim().lines().count() == 1, "{dirs:?}: {err}");
    }
}

/// `--op add`: each head's and group's write operand is W^T d (checked by its effect: adding
/// alpha u to head h's z at one position moves attn_out there by exactly alpha |W^T d| along a
/// unit d, in a family without post-norm); alpha 0 is the clean run bit for bit on every engine
/// and method; resumed equals naive on the CPU (llama, and gemma2 with its post-norms) and on
/// the device (llama), against the CPU.
#[test]
fn add_op_along_the_write_direction() {
    use patchbay::experiments::ablate::write_operands;
    let mut rng = Rng::seeded(0xadd0);
    let unit = |v: Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    for family in ["llama", "gemma2"] {
        let dir = synth_family(family, 3, rng.next_u64());
        let model = Model::load(dir.path()).unwrap();
        let cfg = &model.cfg;
        let prompts = random_prompts(3, &[6, 9, 4], cfg.vocab_size, rng.next_u64());
        // A direction per layer.
        let dirs: Vec<Vec<f32>> = (0..cfg.n_layers).map(|_| unit(rng.normals(cfg.d_model))).collect();
        let mut components = parse_heads("all", cfg).unwrap();
        components.extend(random_groups(&mut rng, &model, 3));
        let abl = ablations(&components, cfg, Some(rng.next_u64())).unwrap();
        let operands = write_operands(&model, &mean_sites(&abl), &mut |l| Ok(dirs[l].clone())).unwrap();
        let positions = random_positions(&mut rng);
        let alpha = rng.uniform(2.0, 6.0);
        let conds = conditions(&abl, AblateOp::Add { alpha }, &operands, &positions, 0, cfg).unwrap();
        for (a, c) in abl.iter().zip(&conds) {
            let Op::Add { beta, v, normalize: false } = &c.op else { panic!("{:?}", c.op) };
            assert_eq!((*beta, c.units.as_ref()), (alpha, Some(&a.component.units())));
            assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-5, "{}: u is not a unit vector", a.component.name());
        }
        if family == "llama" {
            // The effect of one head's add on attn_out (no post-norm): alpha |W^T d| along d.
            let (layer, head) = (1, rng.below(cfg.n_heads));
            let w = &operands[&Site::new(layer, SiteKind::Z)][head * cfg.d_head..(head + 1) * cfg.d_head];
            let wn = w.iter().map(|x| x * x).sum::<f32>().sqrt();
            let cap = [Capture { site: Site::new(layer, SiteKind::AttnOut), positions: Positions::List(vec![-1]) }];
            let iv = Intervention { site: Site::new(layer, SiteKind::Z), prompts: None, positions: Positions::List(vec![-1]), units: Some(vec![head]), op: Op::Add { beta: alpha, v: unit(w.to_vec()), normalize: false } };
            let run = |ivs: &[Intervention]| model.run_prompts(&prompts, &RunRequest { interventions: ivs, captures: &cap, ..Default::default() }).unwrap().captured[0].data.clone();
            let (clean, added) = (run(&[]), run(std::slice::from_ref(&iv)));
            for (p, (a, c)) in added.chunks(cfg.d_model).zip(clean.chunks(cfg.d_model)).enumerate() {
                let along: f32 = a.iter().zip(c).zip(&dirs[layer]).map(|((a, c), d)| (a - c) * d).sum();
                assert!((along - alpha * wn).abs() < 1e-3 * (1.0 + alpha * wn), "prompt {p}: attn_out moved {along} along d, expected {}", alpha * wn);
            }
        }
        let tag = format!("{family} add {alpha} at {positions:?}");
        let (clean_n, naive) = sweep(&model, Method::Naive, &prompts, &conds, 1 << 20);
        let (clean_r, resumed) = sweep(&model, Method::Resumed, &prompts, &conds, 11);
        assert_close(&format!("{tag} clean"), &clean_r, &clean_n, F32_ATOL, F32_RTOL);
        assert_close(&tag, &resumed, &naive, F32_ATOL, F32_RTOL);
        assert_changes(&tag, &clean_n, &naive);
        let zero = conditions(&abl, AblateOp::Add { alpha: 0.0 }, &operands, &positions, 0, cfg).unwrap();
        let (driver_name, driver) = test_driver(FiberOrder::Forward);
        let dev = DeviceModel::upload(&model, driver).unwrap();
        if family == "llama" {
            let (_, on_dev) = sweep(&dev, Method::Resumed, &prompts, &conds, 9);
            assert_forward_close(&format!("{tag} {driver_name} vs cpu"), &on_dev, &naive);
        }
        assert_clean_bit_for_bit(&format!("({family}) with alpha 0"), &model, &dev, &prompts, &abl, &zero);
    }
}
