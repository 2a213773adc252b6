//! `patchbay components` (contrib, lens) on the fixture models: the logit lens against Hugging
//! Face (`tests/fixtures/*/lens_golden.json`, made by `scripts/golden/make_lens_goldens.py`) on
//! every family and its last layer against the model's own logits (cpu and the emulated device);
//! head and neuron contributions against the sublayer outputs they decompose (every family, Gemma
//! 2 and OLMo 2 through their post-norms with the scale frozen), DLA against the logits, the
//! command's tables against a recomputation from a plain capture of `result` and `mlp_post`, the
//! emulated device against the CPU, and one-line errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::kernels::test_driver;
use common::*;
use patchbay::backend::emu::FiberOrder;
use patchbay::data::labels::LabelSet;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::engine::{Engine, RunRequest};
use patchbay::experiments::components::{ContribSpec, LensSpec, PostNormScales, Readout, contribution_tables, logit_lens};
use patchbay::intervene::Capture;
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, TensorFile, write};
use patchbay::model::Model;
use patchbay::model::config::NormWeight;
use patchbay::sites::{Positions, Site, SiteKind};

fn patchbay(args: &[String]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let base = std::env::var("PATCHBAY_TEST_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0x5eed);
    (0..n).map(|i| patchbay::rng::gaussian(base ^ seed, 7, i as u64)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn rms(x: &[f32], eps: f32) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

fn norm_factor(model: &Model, w: &[f32]) -> Vec<f32> {
    w.iter().map(|w| if model.cfg.norm_weight == NormWeight::OnePlus { 1.0 + w } else { *w }).collect()
}

fn labels_of(ids: &[u32]) -> LabelSet {
    LabelSet { names: ids.iter().map(|i| format!("t{i}")).collect(), token_ids: ids.to_vec(), tokens: ids.iter().map(|i| i.to_string()).collect() }
}

/// The prompts of the lens goldens (prompts.json ids, then chat_ids), their labels and values.
#[derive(serde::Deserialize)]
struct LensGolden {
    prompts: Vec<Vec<u32>>,
    labels: Vec<u32>,
    k: usize,
    /// [prompt][position][layer][label]
    label_logits: Vec<Vec<Vec<Vec<f32>>>>,
    /// [prompt][position][layer][k]
    top_ids: Vec<Vec<Vec<Vec<i64>>>>,
    top_logits: Vec<Vec<Vec<Vec<f32>>>>,
}

fn lens_golden(family: &str) -> LensGolden {
    serde_json::from_slice(&std::fs::read(fixture(family).join("lens_golden.json")).unwrap()).unwrap_or_else(|e| panic!("{family} lens_golden.json: {e}"))
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// `components lens --positions all --top-k K` through the binary on every family against HF:
/// label logits and top-k (a swap of two ranks whose HF logits agree within the tolerance is a
/// near tie, not an error).
#[test]
fn lens_matches_hf_every_family() {
    for family in FAMILIES {
        let g = lens_golden(family);
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("ids.json");
        std::fs::write(&ids, serde_json::to_string(&g.prompts).unwrap()).unwrap();
        let labels = g.labels.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out = dir.path().join("lens");
        let args: Vec<String> = ["components", "lens", "--model", &path_arg(&fixture(family)), "--token-ids", &path_arg(&ids), "--label-token-ids", &labels, "--positions", "all", "--top-k", &g.k.to_string(), "--batch-size", "3", "--quiet", "--out", &path_arg(&out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (code, err) = patchbay(&args);
        assert_eq!(code, 0, "{family}: {err}");
        let mut f = TensorFile::open(&out.join("lens.safetensors")).unwrap();
        let (shape, got) = f.read_f32("label_logits").unwrap();
        let t_total: usize = g.prompts.iter().map(Vec::len).sum();
        let n_layers = g.label_logits[0][0].len();
        assert_eq!(shape, [t_total, n_layers, g.labels.len()], "{family}");
        let want: Vec<f32> = g.label_logits.iter().flatten().flatten().flatten().copied().collect();
        let worst = assert_close(&format!("{family} lens label logits"), &got, &want, F32_ATOL, F32_RTOL);
        let (_, got_ids) = f.read_i64("top_ids").unwrap();
        let (_, got_top) = f.read_f32("top_logits").unwrap();
        let want_ids: Vec<i64> = g.top_ids.iter().flatten().flatten().flatten().copied().collect();
        let want_top: Vec<f32> = g.top_logits.iter().flatten().flatten().flatten().copied().collect();
        assert_close(&format!("{family} lens top-k logits"), &got_top, &want_top, F32_ATOL, F32_RTOL);
        for (i, (a, b)) in got_ids.iter().zip(&want_ids).enumerate() {
            if a != b {
                let r = i % g.k;
                let tie = |j: usize| (want_top[i - r + j] - want_top[i]).abs() <= 2.0 * (F32_ATOL + F32_RTOL * want_top[i].abs());
                assert!((r > 0 && tie(r - 1)) || (r + 1 < g.k && tie(r + 1)), "{family}: top id {a} vs HF {b} at {i} without a near tie");
            }
        }
        let (_, offsets) = f.read_i64("prompt_offsets").unwrap();
        assert_eq!(*offsets.last().unwrap() as usize, t_total);
        assert!(out.join("lens.png").exists() && out.join("manifest.json").exists());
        println!("{family}: lens vs HF max abs error {worst:.2e}");
    }
}

/// The last layer's lens is the model's own logits: on the CPU within the kernel f32 tolerance
/// (the same norm, GEMM and soft-cap, but the GEMM's blocking depends on the number of rows),
/// on the emulated device within the bf16 forward tolerance of the device's logits.
#[test]
fn last_layer_lens_is_the_model_logits() {
    let tokens: Vec<u32> = (0..384).step_by(7).collect();
    let labels = labels_of(&tokens);
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let prompts = random_prompts(3, &[5, 9, 4], model.cfg.vocab_size, 3);
        let check = |engine: &dyn Engine, exact: bool| {
            for positions in [Positions::All, Positions::List(vec![-1, 0])] {
                let bar = indicatif::ProgressBar::hidden();
                let lens = logit_lens(&model, engine, &prompts, &labels, &LensSpec { positions: positions.clone(), top_k: None, batch_size: 2 }, &bar).unwrap();
                let patchbay::io::OutTensor::Float { data, shape, .. } = &lens[0].1 else { panic!() };
                let n_layers = model.cfg.n_layers;
                let last: Vec<f32> = data.chunks(tokens.len()).skip(n_layers - 1).step_by(n_layers).flatten().copied().collect();
                assert_eq!(shape[shape.len() - 2], n_layers);
                let own = engine.run_prompts(&prompts, &RunRequest { logits_at: Some(&positions), logit_tokens: Some(&tokens), ..Default::default() }).unwrap().logits;
                if exact {
                    assert_close(&format!("{family} last-layer lens vs logits"), &last, &own, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
                } else {
                    assert_forward_close(&format!("{family} last-layer lens vs logits on {}", engine.device_name()), &last, &own);
                }
            }
        };
        check(&model, true);
        if ["llama", "gemma2"].contains(&family) {
            let dev = DeviceModel::upload(&model, test_driver(FiberOrder::Forward).1).unwrap();
            check(&dev, false);
        }
    }
}

/// Captured rows of every layer's sites at all positions of `prompts`.
fn capture_all(engine: &dyn Engine, prompts: &[Vec<u32>], sites: &[Site], extra: &[Capture]) -> Vec<patchbay::intervene::Captured> {
    let mut captures: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect();
    for c in extra {
        if !captures.iter().any(|k| k.site == c.site) {
            captures.push(c.clone());
        }
    }
    engine.run_prompts(prompts, &RunRequest { captures: &captures, ..Default::default() }).unwrap().captured
}

fn data(captured: &[patchbay::intervene::Captured], site: Site) -> &[f32] {
    &captured.iter().find(|c| c.site == site).unwrap_or_else(|| panic!("{site} not captured")).data
}

/// Every family: per token, a layer's head terms plus the o_proj bias's sum to attn_out . d and
/// its neuron terms plus the down_proj bias's to mlp_out . d (through the frozen post-norm scale
/// for Gemma 2 and OLMo 2); with the embedding term, all of them sum to resid_post . d. `result`
/// summed over heads plus the bias is the attention output before any post-norm. At final_norm
/// with lm_head rows as directions, the terms sum to the logit before the final soft-cap.
#[test]
fn contributions_decompose_the_residual_every_family() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let (d, nh, dm, nl) = (cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers);
        let prompts = random_prompts(2, &[6, 11], cfg.vocab_size, 5);
        let dir = seeded(d, 1);
        let site = Site::new(nl - 1, SiteKind::ResidPost);
        let readout = Readout::new(&model, site, &dir).unwrap();
        assert_eq!((readout.head_layers, readout.neuron_layers), (nl, nl));
        let kinds = [SiteKind::AttnOut, SiteKind::MlpOut, SiteKind::HeadOut];
        let sites: Vec<Site> = (0..nl).flat_map(|l| kinds.map(|k| Site::new(l, k))).chain([Site::final_norm(cfg)]).collect();
        let captured = capture_all(&model, &prompts, &sites, &readout.captures(&model, &Positions::All));
        let rows = 17;
        let c = readout.contributions(&model, &captured, &PostNormScales::new(&model, &captured, nl).unwrap(), &vec![0; rows]).unwrap();
        let tol = |name: &str, got: f32, want: f32| assert!((got - want).abs() <= F32_ATOL + F32_RTOL * want.abs(), "{family} {name}: {got} vs {want}");
        assert_eq!(c.embed.len(), rows);
        let mut total = c.embed.clone();
        for l in 0..nl {
            let lw = &model.weights.layers[l];
            let (attn_out, mlp_out) = (data(&captured, Site::new(l, SiteKind::AttnOut)), data(&captured, Site::new(l, SiteKind::MlpOut)));
            let result = data(&captured, Site::new(l, SiteKind::HeadOut)); // [rows, n_heads, d_model]
            for r in 0..rows {
                let heads: f32 = c.heads[(r * nl + l) * nh..(r * nl + l + 1) * nh].iter().sum::<f32>() + c.attn_bias[r * nl + l];
                tol(&format!("layer {l} row {r}: heads + bias vs attn_out . d"), heads, dot(&attn_out[r * d..(r + 1) * d], &dir));
                let neurons: f32 = c.neurons[(r * nl + l) * dm..(r * nl + l + 1) * dm].iter().sum::<f32>() + c.mlp_bias[r * nl + l];
                tol(&format!("layer {l} row {r}: neurons + bias vs mlp_out . d"), neurons, dot(&mlp_out[r * d..(r + 1) * d], &dir));
                total[r] += heads + neurons;
                // sum_h result_h + b = o_proj(z); attn_out is it, or its post-norm.
                let mut o = vec![0.0f32; d];
                for h in 0..nh {
                    o.iter_mut().zip(&result[(r * nh + h) * d..(r * nh + h + 1) * d]).for_each(|(o, x)| *o += x);
                }
                if let Some(b) = &lw.o.b {
                    o.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                }
                if let Some(w) = &lw.attn_post_norm {
                    let s = rms(&o, cfg.norm_eps);
                    o = o.iter().zip(norm_factor(&model, w)).map(|(o, w)| o / s * w).collect();
                }
                assert_close(&format!("{family} layer {l} row {r}: sum of result + bias (post-normed) vs attn_out"), &o, &attn_out[r * d..(r + 1) * d], F32_ATOL, F32_RTOL);
            }
        }
        let resid_post = capture_all(&model, &prompts, &[site], &[]);
        for (r, t) in total.iter().enumerate() {
            tol(&format!("row {r}: all terms vs resid_post . d"), *t, dot(&resid_post[0].data[r * d..(r + 1) * d], &dir));
        }

        // DLA: lm_head rows at final_norm; the terms sum to the logit (before the soft-cap).
        let tokens = [3u32, 40, 262];
        let dla = Readout::new(&model, Site::final_norm(cfg), &model.weights.lm_head.gather_rows(&tokens).to_f32()).unwrap();
        let dla_captured = capture_all(&model, &prompts, &[], &dla.captures(&model, &Positions::All));
        let which: Vec<usize> = (0..rows).map(|r| r % tokens.len()).collect();
        let t = dla.contributions(&model, &dla_captured, &PostNormScales::new(&model, &dla_captured, nl).unwrap(), &which).unwrap();
        let logits = model.run_prompts(&prompts, &RunRequest { logits_at: Some(&Positions::All), logit_tokens: Some(&tokens), ..Default::default() }).unwrap().logits;
        for r in 0..rows {
            let mut sum = t.embed[r] + t.heads[r * nl * nh..(r + 1) * nl * nh].iter().sum::<f32>() + t.neurons[r * nl * dm..(r + 1) * nl * dm].iter().sum::<f32>();
            sum += t.attn_bias[r * nl..(r + 1) * nl].iter().sum::<f32>() + t.mlp_bias[r * nl..(r + 1) * nl].iter().sum::<f32>();
            if let Some(cap) = cfg.final_softcap {
                sum = (sum / cap).tanh() * cap;
            }
            tol(&format!("row {r}: DLA terms vs logit of token {}", tokens[which[r]]), sum, logits[r * tokens.len() + which[r]]);
        }
    }
}

/// A direction file with one `[width]` tensor per name at `site`.
fn direction_file(path: &Path, site: Site, named: &[(&str, Vec<f32>)]) {
    let list: Vec<(String, Vec<usize>, TensorData)> = named.iter().map(|(n, v)| (format!("{site}/{n}"), vec![v.len()], TensorData::F32(v, OutDtype::F32))).collect();
    write(path, &list, &BTreeMap::from([("format".to_string(), "patchbay-directions-1".to_string())])).unwrap();
}

fn contrib_args(family: &str, ids: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["components", "contrib", "--model", &path_arg(&fixture(family)), "--token-ids", &path_arg(ids), "--label-token-ids", "a=40,b=65,c=262", "--quiet", "--out", &path_arg(out)].iter().map(|s| s.to_string()).collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `layer,<unit>,label,mean,sd,n,rank` rows by (label, layer, unit): (mean, n, rank).
fn read_table(path: &Path) -> BTreeMap<(String, usize, usize), (f64, u64, usize)> {
    let mut r = csv::Reader::from_path(path).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            ((rec[2].to_string(), rec[0].parse().unwrap(), rec[1].parse().unwrap()), (rec[3].parse().unwrap(), rec[5].parse().unwrap(), rec[6].parse().unwrap()))
        })
        .collect()
}

/// The command's heads.csv and neurons.csv (resid_post of the last layer, positions all) equal
/// a recomputation from a plain capture of `result` and `mlp_post`: result_h . d and
/// mlp_post_i (W_down[:, i] . d) (Gemma 2: through the post-norms, clean rms frozen), averaged
/// over each prompt's positions and then over the prompts predicted as each label.
#[test]
fn tables_equal_a_recomputation_from_capture() {
    for family in ["llama", "gemma2"] {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let (d, nh, dm, nl) = (cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers);
        let dir = tempfile::tempdir().unwrap();
        let prompts = prompt_ids(family);
        let ids = dir.path().join("ids.json");
        std::fs::write(&ids, serde_json::to_string(&prompts).unwrap()).unwrap();
        let site = Site::new(nl - 1, SiteKind::ResidPost);
        let v = seeded(d, 2);
        direction_file(&dir.path().join("dirs.safetensors"), site, &[("joy", v.clone())]);
        let out = dir.path().join("out");
        let vector = format!("{}:joy", dir.path().join("dirs.safetensors").display());
        let (code, err) = patchbay(&contrib_args(family, &ids, &out, &["--vector", &vector, "--layer", &(nl - 1).to_string(), "--positions", "all", "--batch-size", "2"]));
        assert_eq!(code, 0, "{family}: {err}");
        let (heads, neurons) = (read_table(&out.join("heads.csv")), read_table(&out.join("neurons.csv")));

        let label_ids = [40u32, 65, 262];
        let names = ["a", "b", "c"];
        let sites: Vec<Site> = (0..nl).flat_map(|l| [Site::new(l, SiteKind::HeadOut), Site::new(l, SiteKind::MlpPost)]).collect();
        let mut per_prompt: Vec<(usize, Vec<f64>, Vec<f64>)> = Vec::new(); // (label, heads [nl*nh], neurons [nl*dm])
        for p in &prompts {
            let run = model.run_prompts(std::slice::from_ref(p), &RunRequest { captures: &sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect::<Vec<_>>(), logits_at: Some(&Positions::List(vec![-1])), logit_tokens: Some(&label_ids), ..Default::default() }).unwrap();
            let label = patchbay::logits::argmax(&run.logits);
            let (mut hs, mut ns) = (vec![0.0f64; nl * nh], vec![0.0f64; nl * dm]);
            for l in 0..nl {
                let lw = &model.weights.layers[l];
                let result = &run.captured[2 * l].data; // [T, n_heads, d_model]
                let post = &run.captured[2 * l + 1].data; // [T, d_mlp]
                let down = lw.down.w.to_f32(); // [d_model, d_mlp]
                for t in 0..p.len() {
                    let mut o: Vec<f32> = lw.o.b.clone().unwrap_or(vec![0.0; d]);
                    (0..nh).for_each(|h| o.iter_mut().zip(&result[(t * nh + h) * d..(t * nh + h + 1) * d]).for_each(|(o, x)| *o += x));
                    let mut m: Vec<f32> = lw.down.b.clone().unwrap_or(vec![0.0; d]);
                    (0..d).for_each(|i| m[i] += dot(&down[i * dm..(i + 1) * dm], &post[t * dm..(t + 1) * dm]));
                    let (attn_d, sa) = match &lw.attn_post_norm {
                        Some(w) => (norm_factor(&model, w).iter().zip(&v).map(|(w, v)| w * v).collect(), rms(&o, cfg.norm_eps)),
                        None => (v.clone(), 1.0),
                    };
                    let (mlp_d, sm) = match &lw.mlp_post_norm {
                        Some(w) => (norm_factor(&model, w).iter().zip(&v).map(|(w, v)| w * v).collect(), rms(&m, cfg.norm_eps)),
                        None => (v.clone(), 1.0),
                    };
                    for h in 0..nh {
                        hs[l * nh + h] += (dot(&result[(t * nh + h) * d..(t * nh + h + 1) * d], &attn_d) / sa) as f64 / p.len() as f64;
                    }
                    for i in 0..dm {
                        let w_i: f32 = (0..d).map(|r| down[r * dm + i] * mlp_d[r]).sum();
                        ns[l * dm + i] += (post[t * dm + i] * w_i / sm) as f64 / p.len() as f64;
                    }
                }
            }
            per_prompt.push((label, hs, ns));
        }
        for (g, name) in names.iter().enumerate().map(|(g, n)| (Some(g), *n)).chain([(None, "all")]) {
            let members: Vec<_> = per_prompt.iter().filter(|(l, _, _)| g.is_none_or(|g| g == *l)).collect();
            if members.is_empty() {
                assert!(!heads.keys().any(|k| k.0 == name), "{family}: no prompt is {name}, yet it has rows");
                continue;
            }
            let n = members.len() as f64;
            for (table, width, pick) in [(&heads, nh, 1usize), (&neurons, dm, 2)] {
                for l in 0..nl {
                    for u in 0..width {
                        let want: f64 = members.iter().map(|m| if pick == 1 { m.1[l * width + u] } else { m.2[l * width + u] }).sum::<f64>() / n;
                        let (got, count, _) = table[&(name.to_string(), l, u)];
                        assert_eq!(count as f64, n);
                        assert!((got - want).abs() <= 1e-4 + 1e-4 * want.abs(), "{family} {name} layer {l} unit {u}: table {got} vs recomputed {want}");
                    }
                }
            }
            // Ranks: 1 is the largest mean.
            let top = heads.iter().filter(|(k, _)| k.0 == name).max_by(|a, b| a.1.0.total_cmp(&b.1.0)).unwrap();
            assert_eq!(top.1.2, 1, "{family} {name}: the largest head mean has rank 1");
        }
        for f in ["dla_heads.csv", "dla_neurons.csv", "heads.png", "dla_heads.png", "long_tail.png", "manifest.json", "per_prompt/batch-00000.safetensors", "per_prompt/batch-00001.safetensors"] {
            assert!(out.join(f).exists(), "{family}: {f} missing");
        }
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert!(manifest["linearisation"].as_str().unwrap().contains("frozen"));
        assert_eq!(manifest["groups"]["by"], "pred");
    }
}

/// The tables on the emulated device equal the CPU's within the bf16 forward tolerance.
#[test]
fn emu_matches_cpu() {
    for family in ["llama", "gemma2"] {
        let model = Model::load(&fixture(family)).unwrap();
        let cfg = &model.cfg;
        let prompts = random_prompts(4, &[7, 12, 5, 9], cfg.vocab_size, 9);
        let readout = Readout::new(&model, Site::new(0, SiteKind::ResidPost), &seeded(cfg.d_model, 3)).unwrap();
        let labels = labels_of(&[40, 65, 262]);
        let gold = [Some(0), Some(1), Some(0), Some(2)];
        let spec = ContribSpec { readout: &readout, labels: &labels, positions: Positions::List(vec![-1, -2]), gold: &gold, batch_size: 3 };
        let bar = indicatif::ProgressBar::hidden();
        let tables = |engine: &dyn Engine| {
            let mut batches = 0;
            let t = contribution_tables(&model, engine, &prompts, &spec, &mut |_, _| {
                batches += 1;
                Ok(())
            }, &bar)
            .unwrap();
            assert_eq!(batches, 2);
            t
        };
        let cpu = tables(&model);
        let dev = DeviceModel::upload(&model, test_driver(FiberOrder::Forward).1).unwrap();
        let emu = tables(&dev);
        for (name, a, b) in [("heads", &emu.heads, &cpu.heads), ("neurons", &emu.neurons, &cpu.neurons), ("dla_heads", &emu.dla_heads, &cpu.dla_heads), ("dla_neurons", &emu.dla_neurons, &cpu.dla_neurons)] {
            assert_eq!(a.n, b.n, "{family} {name}: group counts");
            for g in 0..a.groups.len() {
                let f = |s: &patchbay::experiments::components::GroupStats| s.mean(g).iter().map(|v| *v as f32).collect::<Vec<f32>>();
                if a.n[g] > 0 {
                    assert_forward_close(&format!("{family} {name} group {}: emu vs cpu", a.groups[g]), &f(a), &f(b));
                }
            }
        }
    }
}

/// Bad input is one line on stderr naming the bad thing (exit 1), nothing written.
#[test]
fn errors_are_one_line() {
    let family = "llama";
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&prompt_ids(family)).unwrap()).unwrap();
    let model = Model::load(&fixture(family)).unwrap();
    let d = model.cfg.d_model;
    let file = dir.path().join("dirs.safetensors");
    direction_file(&file, Site::new(1, SiteKind::ResidPost), &[("joy", seeded(d, 4)), ("narrow", seeded(d - 3, 5))]);
    let f = |name: &str| format!("{}:{name}", file.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--vector".into(), f("fear"), "--layer".into(), "1".into()], "no vector `fear`"),
        (vec!["--vector".into(), f("narrow"), "--layer".into(), "1".into()], "has width 61"),
        (vec!["--vector".into(), f("joy"), "--layer".into(), "7".into()], "layer 7 is out of range"),
        (vec!["--vector".into(), f("joy")], "--layer"),
        (vec!["--vector".into(), f("joy"), "--site".into(), "final_norm".into(), "--layer".into(), "1".into()], "final_norm has no layer"),
        (vec!["--vector".into(), f("joy"), "--layer".into(), "1".into(), "--site".into(), "attn_out".into()], "residual-stream site"),
        (vec!["--vector".into(), f("joy"), "--layer".into(), "1".into(), "--positions".into(), "generated".into()], "prompt positions only"),
        (vec!["--vector".into(), f("joy"), "--layer".into(), "1".into(), "--positions".into(), "40".into()], "position 40 is out of range"),
    ];
    for (extra, want) in cases {
        let out: PathBuf = dir.path().join("out");
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (code, err) = patchbay(&contrib_args(family, &ids, &out, &extra));
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: `{err}` does not say `{want}`");
        assert!(!out.join("heads.csv").exists(), "{extra:?}: wrote a table");
    }
    // A direction at final_norm: every layer's heads and neurons write before it.
    let final_file = dir.path().join("final.safetensors");
    direction_file(&final_file, Site::final_norm(&model.cfg), &[("joy", seeded(d, 6))]);
    let out = dir.path().join("final");
    let (code, err) = patchbay(&contrib_args(family, &ids, &out, &["--vector", &format!("{}:joy", final_file.display()), "--site", "final_norm"]));
    assert_eq!(code, 0, "{err}");
    let layers: std::collections::BTreeSet<usize> = read_table(&out.join("heads.csv")).keys().map(|k| k.1).collect();
    assert_eq!(layers.len(), model.cfg.n_layers);

    let out = dir.path().join("lens");
    let lens = |extra: &[&str]| {
        let mut args: Vec<String> = ["components", "lens", "--model", &path_arg(&fixture(family)), "--token-ids", &path_arg(&ids), "--quiet", "--out", &path_arg(&out)].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        patchbay(&args)
    };
    for (extra, want) in [(&["--label-token-ids", "5,6", "--top-k", "0"][..], "--top-k"), (&[][..], "give the labels")] {
        let (code, err) = lens(extra);
        assert!(code == 1 && err.trim().lines().count() == 1 && err.contains(want), "{extra:?}: {err}");
    }
    // With --top-k the labels are optional: top-k only.
    let (code, err) = lens(&["--top-k", "3"]);
    assert_eq!(code, 0, "{err}");
    let f = TensorFile::open(&out.join("lens.safetensors")).unwrap();
    assert!(f.entries.contains_key("top_ids") && !f.entries.contains_key("label_logits"));
}
