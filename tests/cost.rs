//! `patchbay cost`: FLOP counts against an independent brute-force count (row by row, key by
//! key, from the experiments themselves), bytes and memory against the parameter count, resumed
//! vs naive on a Tak-like sweep, monotonicity, the CPU calibration, the JSON fields and errors of
//! the binary, and a `--measure` run (timings reported, never asserted).

mod common;

use std::process::Command;

use common::*;
use patchbay::experiments::cost::{self, Hardware, MethodCost, PassSpec, PatchPlan, Path, Workload, estimate, gpu, keys_sum};
use patchbay::experiments::patch::{Overflow, Pair, SweepSpec, all_centers, experiments};
use patchbay::model::config::{DType, ModelConfig};
use patchbay::sites::{Positions, Site, SiteKind};
use serde_json::Value;

/// The config of fixture `family` with `n_layers` layers (no weights needed).
fn config(family: &str, n_layers: usize) -> ModelConfig {
    let path = fixture(family).join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["num_hidden_layers"] = n_layers.into();
    v.as_object_mut().unwrap().remove("layer_types");
    ModelConfig::from_json(&v, &path).unwrap()
}

fn h100() -> Vec<Hardware> {
    vec![gpu("h100").unwrap()]
}

/// FLOPs of rows at positions `cached..cached+new` of one sequence through layers `start..`,
/// counted row by row and key by key: every linear costs 2 * in * out per row; attention
/// 4 * d_head per head and visible key (QK^T and PV). `head_out`: layers where o_proj runs once
/// per head.
fn brute_flops(cfg: &ModelConfig, start: usize, cached: usize, new: usize, head_out: &[usize]) -> f64 {
    let (d, qw, kvw, dm) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
    let mut f = 0usize;
    for l in start..cfg.n_layers {
        for pos in cached..cached + new {
            let o_times = if head_out.contains(&l) { cfg.n_heads } else { 1 };
            f += 2 * (d * qw + d * kvw + d * kvw + o_times * qw * d + d * dm + d * dm + dm * d);
            for j in 0..=pos {
                let visible = cfg.sliding_window[l].is_none_or(|w| pos - j < w);
                if visible {
                    f += 4 * cfg.d_head * cfg.n_heads;
                }
            }
        }
    }
    f as f64
}

fn lm_head(cfg: &ModelConfig, rows: usize, width: usize) -> f64 {
    (2 * rows * width * cfg.d_model) as f64
}

fn method<'a>(m: &'a [MethodCost], name: &str) -> &'a MethodCost {
    m.iter().find(|x| x.method == name).unwrap_or_else(|| panic!("no method {name}"))
}

#[test]
fn keys_sum_matches_counting_keys() {
    for window in [None, Some(1), Some(3), Some(8)] {
        for cached in [0, 1, 5, 9] {
            for new in [0, 1, 4, 13] {
                let brute: usize = (cached..cached + new).map(|p| (0..=p).filter(|j| window.is_none_or(|w| p - j < w)).count()).sum();
                assert_eq!(keys_sum(cached, new, window), brute as f64, "cached {cached} new {new} window {window:?}");
            }
        }
    }
}

#[test]
fn forward_flops_bytes_and_memory_match_hand_counts() {
    // Gemma 2: sliding windows of 8 on alternate layers, sandwich norms; prompts longer than the window.
    for family in ["llama", "gemma2", "qwen2"] {
        let cfg = config(family, 4);
        let lens = [5, 19, 3, 12, 30];
        let forward = Workload::Passes(PassSpec { sites: Vec::new(), positions: Positions::List(Vec::new()), logits: Some((Positions::List(vec![-1]), cfg.vocab_size)), batch_size: 2, hold_bytes: None });
        let m = estimate(&cfg, DType::BF16, &lens, &forward, &h100()).unwrap();
        let f = &m[0].total.flops;
        let want_layers: f64 = lens.iter().map(|&n| brute_flops(&cfg, 0, 0, n, &[])).sum();
        let want_head = lm_head(&cfg, lens.len(), cfg.vocab_size);
        assert_eq!(f.gemm + f.attention, want_layers, "{family}: layer FLOPs");
        assert_eq!(f.lm_head, want_head, "{family}: lm_head FLOPs");
        assert_eq!(f.total, want_layers + want_head, "{family}");
        assert_eq!(m[0].total.calls, 3, "{family}: 5 prompts in batches of 2");
        // Weights read: every layer matrix once per call, the embedding rows, the whole lm_head.
        let (d, qw, kvw, dm) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
        let layer = d * (qw + 2 * kvw) + qw * d + 3 * d * dm;
        let tokens: usize = lens.iter().sum();
        let want_w = (2 * (3 * (cfg.n_layers * layer + cfg.vocab_size * d) + tokens * d)) as f64;
        assert_eq!(m[0].total.bytes.gpu.weights, want_w, "{family}: bf16 weight bytes");
        assert_eq!(m[0].total.bytes.cpu.weights, want_w, "{family}: the CPU reads bf16 weights as stored");
        let f32_w = estimate(&cfg, DType::F32, &lens, &forward, &h100()).unwrap();
        assert_eq!(f32_w[0].total.bytes.cpu.weights, 2.0 * want_w, "{family}: f32 checkpoints stream twice the bytes on the CPU");
        assert_eq!(f32_w[0].total.bytes.gpu.weights, want_w, "{family}: the device holds bf16 whatever the checkpoint");
        // Peak memory holds the whole model once.
        let (matrices, vectors) = cfg.n_params();
        assert_eq!(m[0].peak_memory.gpu.weights, (2 * matrices + 4 * vectors) as f64, "{family}");
        assert!(m[0].peak_memory.gpu.total > m[0].peak_memory.gpu.weights);
    }
}

#[test]
fn capture_counts_captured_values_and_head_out() {
    let cfg = config("llama", 3);
    let lens = [4, 9, 7];
    let sites = Site::parse_spec("resid_post,blocks.1.attn.hook_result", &cfg).unwrap();
    let spec = PassSpec { sites, positions: Positions::List(vec![-1, -2]), logits: None, batch_size: 8, hold_bytes: None };
    let m = estimate(&cfg, DType::BF16, &lens, &Workload::Passes(spec), &h100()).unwrap();
    // resid_post at 3 layers (d_model) + head_out at layer 1 (n_heads x d_model), 2 positions x 3 prompts.
    let per_row = 3 * cfg.d_model + cfg.n_heads * cfg.d_model;
    assert_eq!(m[0].total.bytes.gpu.captures, (4 * 2 * 3 * per_row) as f64);
    let want: f64 = lens.iter().map(|&n| brute_flops(&cfg, 0, 0, n, &[1])).sum();
    assert_eq!(m[0].total.flops.total, want, "o_proj once per head at the hooked layer, no logits");
    assert_eq!(m[0].peak_memory.cpu.captures, (4 * 2 * 3 * per_row) as f64, "capture holds everything until the end");
}

/// A small sweep: 6 prompts of different lengths, 5 pairs, two positions; every target in one
/// group (each prompt has one clean run as a source and one as a target).
fn small_plan(cfg: &ModelConfig, sites: Vec<SiteKind>, window: usize, units: Option<Vec<usize>>) -> (Vec<usize>, PatchPlan) {
    let lens = vec![9, 14, 6, 11, 20, 8];
    let pairs = vec![Pair { source: 0, target: 1 }, Pair { source: 2, target: 1 }, Pair { source: 4, target: 3 }, Pair { source: 1, target: 5 }, Pair { source: 0, target: 4 }];
    let sweep = SweepSpec { sites, units, window, centers: all_centers(window, cfg.n_layers), positions: vec![-1, -3], label_tokens: vec![3, 50, 7, 200] };
    (lens, PatchPlan { pairs, sweep, batch_rows: 16, mem_budget: 1 << 40, overflow: Overflow::Auto })
}

/// The distinct sources of `pairs`, and the targets that are not sources: where the budget holds
/// every target's clean run, each prompt has one clean pass.
fn distinct(pairs: &[Pair]) -> (Vec<usize>, Vec<usize>) {
    let sources: std::collections::BTreeSet<usize> = pairs.iter().map(|p| p.source).collect();
    let targets = pairs.iter().map(|p| p.target).filter(|t| !sources.contains(t)).collect::<std::collections::BTreeSet<_>>();
    (sources.into_iter().collect(), targets.into_iter().collect())
}

#[test]
fn patch_flops_match_a_count_from_the_experiments() {
    for family in ["llama", "gemma2"] {
        let cfg = config(family, 6);
        let (lens, plan) = small_plan(&cfg, vec![SiteKind::ResidPre, SiteKind::Z, SiteKind::MlpOut], 3, None);
        let m = estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan: plan.clone(), resumed: true, naive: true }, &h100()).unwrap();
        let exps = experiments(&plan.pairs, &plan.sweep, cfg.n_layers).unwrap();
        let nl = plan.sweep.label_tokens.len();
        let clean = |p: usize| brute_flops(&cfg, 0, 0, lens[p], &[]) + lm_head(&cfg, 1, nl);
        let (sources, targets) = distinct(&plan.pairs);
        let cleans: f64 = sources.iter().chain(&targets).map(|&p| clean(p)).sum();
        // Resumed: each experiment recomputes rows p0.. (p0 = the first patched position) from
        // its window's first layer; naive: a full forward of the target per experiment.
        let segments: f64 = exps
            .iter()
            .map(|e| {
                let len = lens[e.pair.target];
                let p0 = len - 3;
                brute_flops(&cfg, e.layers[0], p0, len - p0, &[]) + lm_head(&cfg, 1, nl)
            })
            .sum();
        // The naive method runs every source and every target alone, a prompt that is both twice.
        let naive_cleans: f64 = plan.pairs.iter().map(|p| p.target).collect::<std::collections::BTreeSet<_>>().into_iter().chain(sources.iter().copied()).map(clean).sum();
        let naive: f64 = exps.iter().map(|e| clean(e.pair.target)).sum();
        let r = method(&m, "resumed");
        let n = method(&m, "naive");
        assert_eq!(r.items, exps.len());
        assert_eq!(r.phases.iter().find(|p| p.name == "clean").unwrap().flops.total, cleans, "{family}: clean runs");
        assert_eq!(r.phases.iter().find(|p| p.name == "segments").unwrap().flops.total, segments, "{family}: segments");
        assert_eq!(n.total.flops.total, naive_cleans + naive, "{family}: naive");
        assert!(r.total.flops.total < n.total.flops.total);
    }
}

#[test]
fn head_out_patching_runs_o_proj_per_head_where_hooked() {
    let cfg = config("llama", 4);
    let (lens, plan) = small_plan(&cfg, vec![SiteKind::HeadOut], 1, Some(vec![1]));
    let m = estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan: plan.clone(), resumed: true, naive: false }, &h100()).unwrap();
    let exps = experiments(&plan.pairs, &plan.sweep, cfg.n_layers).unwrap();
    let nl = plan.sweep.label_tokens.len();
    let all: Vec<usize> = (0..cfg.n_layers).collect();
    // Sources capture head_out at every layer (windows of 1 at every centre); the other
    // targets' clean passes hook nothing (at 16 rows per batch each prompt has its own pass);
    // each segment hooks its one layer.
    let (sources, targets) = distinct(&plan.pairs);
    let want: f64 = sources.iter().map(|&p| brute_flops(&cfg, 0, 0, lens[p], &all)).sum::<f64>()
        + targets.iter().map(|&p| brute_flops(&cfg, 0, 0, lens[p], &[])).sum::<f64>()
        + exps.iter().map(|e| brute_flops(&cfg, e.layers[0], lens[e.pair.target] - 3, 3, &e.layers)).sum::<f64>()
        + lm_head(&cfg, sources.len() + targets.len() + exps.len(), nl);
    assert_eq!(m[0].total.flops.total, want);
}

#[test]
fn resumed_beats_naive_on_a_tak_like_sweep_on_every_device() {
    // The Tak et al. shape on a 16-layer model: 3 sites x every 5-layer window, last token.
    let cfg = config("llama", 16);
    let lens = vec![48; 20];
    let pairs: Vec<Pair> = (0..30).map(|i| Pair { source: i % 20, target: (i * 7 + 3) % 20 }).filter(|p| p.source != p.target).collect();
    let sweep = SweepSpec { sites: vec![SiteKind::AttnOut, SiteKind::MlpOut, SiteKind::ResidPost], units: None, window: 5, centers: all_centers(5, 16), positions: vec![-1], label_tokens: (0..13).collect() };
    let plan = PatchPlan { pairs, sweep, batch_rows: 256, mem_budget: 1 << 31, overflow: Overflow::Auto };
    let devices: Vec<Hardware> = ["a100", "h100", "h200"].iter().map(|d| gpu(d).unwrap()).collect();
    let m = estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan, resumed: true, naive: true }, &devices).unwrap();
    let (r, n) = (method(&m, "resumed"), method(&m, "naive"));
    let ratio = cost::ratio(r, n);
    assert!(ratio.flops > 5.0, "naive/resumed FLOPs {}", ratio.flops);
    assert!(ratio.bytes_cpu > 5.0 && ratio.bytes_gpu > 5.0, "{ratio:?}");
    for (i, (dev, x)) in ratio.time.iter().enumerate() {
        assert!(*x > 2.0, "{dev}: naive/resumed time {x}");
        let t = &r.total.time[i];
        assert!((t.compute_s + t.memory_s + t.overhead_s - t.seconds).abs() <= 1e-9 * t.seconds, "{dev}: terms add up");
        assert!(["compute", "memory", "overhead"].contains(&t.dominant.as_str()));
    }
    // The GPU path moves fewer bytes than the CPU path (bf16 KV and operands, no prefix copies).
    assert!(r.total.bytes.gpu.total < r.total.bytes.cpu.total);
    // A faster device is never slower.
    assert!(r.total.time[2].seconds <= r.total.time[1].seconds && r.total.time[1].seconds <= r.total.time[0].seconds);
}

#[test]
fn costs_grow_with_pairs_prompt_length_and_layers() {
    let run = |n_layers: usize, len: usize, n_pairs: usize| -> Vec<MethodCost> {
        let cfg = config("llama", n_layers);
        let lens = vec![len; 8];
        let pairs: Vec<Pair> = (0..n_pairs).map(|i| Pair { source: i % 8, target: (i + 1 + i / 8) % 8 }).collect();
        let sweep = SweepSpec { sites: vec![SiteKind::AttnOut, SiteKind::ResidPost], units: None, window: 3, centers: all_centers(3, n_layers), positions: vec![-1], label_tokens: vec![1, 2, 3] };
        estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan: PatchPlan { pairs, sweep, batch_rows: 64, mem_budget: 1 << 30, overflow: Overflow::Auto }, resumed: true, naive: true }, &h100()).unwrap()
    };
    let base = run(8, 16, 6);
    for bigger in [run(12, 16, 6), run(8, 32, 6), run(8, 16, 12)] {
        for name in ["resumed", "naive"] {
            let (a, b) = (&method(&base, name).total, &method(&bigger, name).total);
            assert!(b.flops.total > a.flops.total, "{name}: FLOPs");
            assert!(b.bytes.cpu.total > a.bytes.cpu.total && b.bytes.gpu.total > a.bytes.gpu.total, "{name}: bytes");
            assert!(b.time[0].seconds > a.time[0].seconds, "{name}: time");
        }
    }
}

#[test]
fn the_memory_budget_bounds_the_clean_runs_held() {
    let cfg = config("llama", 6);
    let (lens, mut plan) = small_plan(&cfg, vec![SiteKind::ResidPost], 3, None);
    let peak = |plan: &PatchPlan| estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan: plan.clone(), resumed: true, naive: false }, &h100()).unwrap()[0].peak_memory;
    plan.mem_budget = 1 << 40;
    let all = peak(&plan);
    plan.mem_budget = 1;
    let one = peak(&plan);
    // Targets 1, 3, 4, 5 held at once, or one at a time (the memory at the peak call: its
    // components are that call's).
    let targets: usize = [1, 3, 4, 5].iter().map(|&t| cost::clean_run_bytes(&cfg, Path::Cpu, lens[t])).sum();
    assert!(all.cpu.total >= all.cpu.weights + targets as f64, "{} < {targets}", all.cpu.total);
    assert!(one.cpu.total < all.cpu.total && one.gpu.total < all.gpu.total);
    assert!(one.cpu.total >= one.cpu.weights + cost::clean_run_bytes(&cfg, Path::Cpu, 20) as f64, "at least the longest target's clean run");
}

/// A Tak-like sweep where every prompt is a source and a target of pairs drawn across target
/// groups: with the budget holding every target's clean run, each prompt has one clean pass
/// (clean row-layers = the prompts' total); with a budget for a few targets, the other groups'
/// clean runs are spilled (still one pass per prompt) or recomputed (more row-layers, never more
/// than a pass per source and one per target). `auto` picks whichever its estimates say is
/// faster: recomputing on a GPU. The row-layers are the CPU path's.
#[test]
fn one_clean_pass_per_prompt_where_the_budget_holds_the_targets() {
    let cfg = config("llama", 8);
    let lens: Vec<usize> = (0..150).map(|i| 12 + i % 7).collect();
    let pairs: Vec<Pair> = (0..300).map(|i| Pair { source: (i * 37 + 11) % 150, target: (i * 53 + 5) % 150 }).filter(|p| p.source != p.target).collect();
    let sweep = SweepSpec { sites: vec![SiteKind::AttnOut, SiteKind::ResidPost], units: None, window: 3, centers: all_centers(3, 8), positions: vec![-1], label_tokens: (0..5).collect() };
    let used: std::collections::BTreeSet<usize> = pairs.iter().flat_map(|p| [p.source, p.target]).collect();
    let prompt_row_layers = (used.iter().map(|&p| lens[p]).sum::<usize>() * cfg.n_layers) as f64;
    let clean_row_layers = |mem_budget: usize, overflow: Overflow| {
        let plan = PatchPlan { pairs: pairs.clone(), sweep: sweep.clone(), batch_rows: 64, mem_budget, overflow };
        let m = estimate(&cfg, DType::BF16, &lens, &Workload::Patch { plan: plan.clone(), resumed: true, naive: false }, &h100()).unwrap();
        let exps = experiments(&plan.pairs, &plan.sweep, cfg.n_layers).unwrap();
        (m[0].phases.iter().find(|p| p.name == "clean").unwrap().row_layers, cost::clean_schedule(&cfg, Path::Cpu, &lens, &plan, &exps), cost::clean_schedule(&cfg, Path::Gpu, &lens, &plan, &exps))
    };
    let state = |s: &patchbay::experiments::patch::CleanSchedule| s.summary()["target_clean_runs"].as_str().unwrap().to_string();
    let (all, schedule, gpu) = clean_row_layers(1 << 40, Overflow::Spill);
    assert!(schedule.groups.len() > 2, "targets in several groups");
    assert_eq!(all, prompt_row_layers);
    assert_eq!((state(&schedule), state(&gpu)), ("held".into(), "held".into()));
    let budget = schedule.source_bytes + 70 * cost::clean_run_bytes(&cfg, Path::Cpu, 18);
    let (spilled, schedule, _) = clean_row_layers(budget, Overflow::Spill);
    assert!(schedule.not_held() > 0 && !schedule.held.is_empty(), "{schedule:?}");
    assert_eq!(state(&schedule), "spill");
    assert_eq!(schedule.summary()["spilled_targets"], schedule.not_held());
    assert_eq!(spilled, all, "spilled clean runs are not recomputed");
    let (recomputed, schedule, _) = clean_row_layers(budget, Overflow::Recompute);
    assert_eq!(state(&schedule), "recompute");
    assert!(recomputed > all && recomputed <= 2.0 * prompt_row_layers, "{recomputed} vs {all}");
    let (_, cpu, gpu) = clean_row_layers(budget, Overflow::Auto);
    assert_eq!(state(&cpu), if cpu.spill_s < cpu.recompute_s { "spill" } else { "recompute" }, "{cpu:?}");
    assert!(cpu.summary()["estimate_s"]["spill"].as_f64().unwrap() > 0.0);
    assert_eq!(state(&gpu), "recompute", "{gpu:?}");
}

#[test]
fn cpu_calibration_gives_finite_rates_and_interpolates_by_rows() {
    let cfg = config("llama", 2);
    let cpu = cost::cpu_hardware(&cfg, DType::BF16).unwrap();
    for (what, v) in [("gemm", cpu.gemm_flops), ("attention", cpu.attention_flops), ("weights", cpu.weight_bandwidth), ("memory", cpu.bandwidth), ("op", cpu.op_overhead_s), ("seq", cpu.seq_overhead_s)] {
        assert!(v.is_finite() && v > 0.0, "{what}: {v}");
    }
    assert!(!cpu.overlap && cpu.path == Path::Cpu && cpu.gemm_curve.len() >= 2);
    let c = &cpu.gemm_curve;
    for &(m, f) in c {
        assert_eq!(cpu.gemm_flops_at(m), f, "exact at a calibrated row count");
    }
    let (lo, hi) = (c[0].1.min(c[1].1), c[0].1.max(c[1].1));
    let mid = cpu.gemm_flops_at((c[0].0 * c[1].0).sqrt());
    assert!(mid >= lo && mid <= hi, "between neighbours: {mid} not in {lo}..{hi}");
    assert_eq!(cpu.gemm_flops_at(0.5), c[0].1, "clamped below");
    assert_eq!(cpu.gemm_flops_at(1e6), c[c.len() - 1].1, "clamped above");
    // Cached: the same numbers the second time.
    assert_eq!(cost::cpu_hardware(&cfg, DType::BF16).unwrap().gemm_curve, cpu.gemm_curve);
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

fn patchbay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().expect("cannot run the patchbay binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = patchbay(args);
    assert_eq!(code, 0, "patchbay {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn json_output_has_the_documented_fields() {
    let llama = fixture("llama");
    let dir = llama.to_str().unwrap();
    let v = json_of(&["cost", "patch", "--model", dir, "--n-layers", "8", "--n-prompts", "10", "--prompt-len", "12", "--pairs", "6", "--window", "3", "--device", "h100,a100", "--json"]);
    assert_eq!(v["command"], "patch");
    assert_eq!(v["model"]["n_layers"], 8);
    assert!(v["model"]["params"].as_u64().unwrap() > 0);
    assert_eq!(v["devices"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect::<Vec<_>>(), ["h100", "a100"]);
    for d in v["devices"].as_array().unwrap() {
        for f in ["path", "gemm_flops", "attention_flops", "weight_bandwidth", "bandwidth", "op_overhead_s", "seq_overhead_s", "memory_bytes", "source", "gemm_curve", "overlap"] {
            assert!(d.get(f).is_some(), "devices[].{f}");
        }
    }
    let methods = v["methods"].as_array().unwrap();
    assert_eq!(methods.iter().map(|m| m["method"].as_str().unwrap()).collect::<Vec<_>>(), ["resumed", "naive"]);
    let exps = 6 * 3 * all_centers(3, 8).len();
    assert_eq!(v["workload"]["experiments"], exps);
    for m in methods {
        assert_eq!(m["items"], exps);
        for p in m["phases"].as_array().unwrap().iter().chain([&m["total"]]) {
            for f in ["gemm", "attention", "lm_head", "total"] {
                assert!(p["flops"][f].as_f64().unwrap() >= 0.0, "flops.{f}");
            }
            for path in ["cpu", "gpu"] {
                for f in ["weights", "kv", "activations", "captures", "total"] {
                    assert!(p["bytes"][path][f].as_f64().unwrap() >= 0.0, "bytes.{path}.{f}");
                }
            }
            let times = p["time"].as_array().unwrap();
            assert_eq!(times.len(), 2);
            for t in times {
                for f in ["seconds", "compute_s", "memory_s", "overhead_s"] {
                    assert!(t[f].as_f64().unwrap() >= 0.0, "time.{f}");
                }
                assert!(t["dominant"].is_string());
            }
        }
        for path in ["cpu", "gpu"] {
            for f in ["weights", "kv_caches", "activations", "captures", "total"] {
                assert!(m["peak_memory"][path][f].as_f64().unwrap() >= 0.0, "peak_memory.{path}.{f}");
            }
        }
    }
    let r = &v["naive_over_resumed"];
    assert!(r["flops"].as_f64().unwrap() > 1.0 && r["bytes_cpu"].as_f64().unwrap() > 1.0 && r["bytes_gpu"].as_f64().unwrap() > 1.0);
    assert_eq!(r["time"].as_array().unwrap().len(), 2);
    assert_eq!(v["measured"], Value::Array(Vec::new()));

    // One method only: no ratio.
    let v = json_of(&["cost", "patch", "--model", dir, "--n-prompts", "4", "--prompt-len", "6", "--pairs", "2", "--window", "1", "--method", "naive", "--device", "h200", "--json"]);
    assert_eq!(v["methods"].as_array().unwrap().len(), 1);
    assert!(v["naive_over_resumed"].is_null());

    // The forward workloads, a preset, and real prompt lengths from --token-ids.
    let ids = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ids.path(), "[[1,2,3],[4,5,6,7,8],[9]]").unwrap();
    let ids_path = ids.path().to_str().unwrap();
    for args in [
        vec!["cost", "forward", "--model", dir, "--token-ids", ids_path, "--device", "a100", "--json"],
        vec!["cost", "capture", "--model", dir, "--token-ids", ids_path, "--sites", "resid_post", "--positions", "all", "--logits", "--device", "a100", "--json"],
        vec!["cost", "probe", "--like", "llama-3.2-1b", "--n-layers", "4", "--n-prompts", "20", "--prompt-len", "30", "--positions=-1..-5", "--device", "h100", "--json"],
    ] {
        let v = json_of(&args);
        assert_eq!(v["methods"][0]["method"], "forward");
        assert!(v["methods"][0]["total"]["flops"]["total"].as_f64().unwrap() > 0.0);
    }
    let v = json_of(&["cost", "forward", "--model", dir, "--token-ids", ids_path, "--device", "a100", "--json"]);
    assert_eq!(v["workload"]["prompts"]["total_tokens"], 9);
    let cfg = config("llama", 2);
    let want: f64 = [3, 5, 1].iter().map(|&n| brute_flops(&cfg, 0, 0, n, &[])).sum::<f64>() + lm_head(&cfg, 3, cfg.vocab_size);
    assert_eq!(v["methods"][0]["total"]["flops"]["total"].as_f64().unwrap(), want);
}

#[test]
fn the_text_report_names_methods_devices_and_terms() {
    let (code, out, err) = patchbay(&["cost", "patch", "--like", "llama-3.2-1b", "--n-prompts", "40", "--prompt-len", "48", "--pairs", "50", "--device", "h100"]);
    assert_eq!(code, 0, "{err}");
    for want in ["resumed segments", "naive experiments", "naive / resumed", "peak memory", "h100", "dominant", "989"] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let llama = fixture("llama");
    let dir = llama.to_str().unwrap();
    for (args, want) in [
        (vec!["cost", "patch", "--like", "llama-9"], "unknown preset"),
        (vec!["cost", "patch", "--model", dir, "--window", "3"], "window 3 must be in 1..=2"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--device", "tpu"], "unknown device `tpu`"),
        (vec!["cost", "patch", "--model", dir, "--sites", "attn_outt"], "unknown site kind"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--sites", "pattern"], "patterns cannot be patched"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--prompt-len", "2", "--positions=-3"], "out of range"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--sites", "z", "--heads", "9"], "out of range"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--layers", "5"], "does not fit"),
        (vec!["cost", "patch", "--like", "llama-3.2-1b", "--measure"], "--measure runs the sweep"),
        (vec!["cost", "patch", "--model", dir, "--window", "1", "--n-prompts", "1"], "at least 2 prompts"),
        (vec!["cost", "probe", "--model", dir, "--positions", "all"], "not supported"),
        (vec!["cost", "capture", "--model", dir, "--sites", "blocks.7.hook_resid_post"], "blocks.7"),
        (vec!["cost", "forward", "--model", "/nonexistent/model"], "/nonexistent/model"),
    ] {
        let (code, _, err) = patchbay(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1 && err.contains(want), "{args:?}: {err}");
    }
    // Usage errors are clap's (exit 2).
    let (code, _, _) = patchbay(&["cost", "patch"]);
    assert_eq!(code, 2);
}

#[test]
fn measure_runs_the_sweep_and_reports_estimate_and_time() {
    let dir = synth_family("llama", 6, 5);
    let d = dir.path().to_str().unwrap();
    let v = json_of(&["cost", "patch", "--model", d, "--n-prompts", "4", "--prompt-len", "6", "--pairs", "2", "--window", "3", "--measure", "--naive-limit", "5", "--device", "cpu", "--json", "--quiet"]);
    let measured = v["measured"].as_array().unwrap();
    assert_eq!(measured.iter().map(|c| c["method"].as_str().unwrap()).collect::<Vec<_>>(), ["resumed", "naive"]);
    assert_eq!(measured[0]["experiments"], 2 * 3 * all_centers(3, 6).len());
    assert_eq!(measured[1]["experiments"], 5);
    for c in measured {
        for f in ["estimate_before_s", "estimate_after_s", "estimate_s", "measured_s", "ratio"] {
            let x = c[f].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{f}: {x}");
        }
        eprintln!("measure on a 6-layer tiny model: {} estimate {:.4} s measured {:.4} s (ratio {:.2})", c["method"], c["estimate_s"], c["measured_s"], c["ratio"]);
    }
    // The measured workload is the estimated one.
    assert_eq!(v["workload"]["experiments"], measured[0]["experiments"]);
}
