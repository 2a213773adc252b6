//! `patchbay patch` through the binary: outputs, a killed run resumed to the same
//! experiments.jsonl as an uninterrupted one, naive == resumed, prompts from a dataset through a
//! template with pairs of different gold labels; and the flip-rate heatmap (grid and PNG).

mod common;

use std::process::Command;

use common::*;
use patchbay::data::dataset::{self, DatasetSpec};
use patchbay::data::template::Template;
use patchbay::experiments::patch::{ExperimentResult, Pair, SummaryRow, summary_grid};
use patchbay::io::plot::{Grid, heatmap, heatmaps_svg};
use patchbay::model::tokenizer::PromptTokenizer;

fn patchbay(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn results(dir: &std::path::Path) -> Vec<ExperimentResult> {
    std::fs::read_to_string(dir.join("experiments.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn killed_sweep_resumes_to_the_same_results() {
    let model = synth_family("llama", 6, 3);
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&random_prompts(6, &[9, 12, 7], 384, 5)).unwrap()).unwrap();
    let (m, i) = (model.path().to_str().unwrap(), ids.to_str().unwrap());
    let out = |name: &str| tmp.path().join(name);
    let args = |dir: &std::path::Path| -> Vec<String> {
        ["patch", "--model", m, "--token-ids", i, "--label-token-ids", "3,50,7,200", "--random-pairs", "5", "--seed", "1", "--sites", "attn_out,resid_post", "--window", "3", "--quiet", "--out", dir.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |dir: &std::path::Path, extra: &[&str]| {
        let mut a = args(dir);
        a.extend(extra.iter().map(|s| s.to_string()));
        patchbay(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Uninterrupted.
    let (code, err) = run(&out("full"), &[]);
    assert_eq!(code, 0, "{err}");
    let full = std::fs::read(out("full").join("experiments.jsonl")).unwrap();
    let rows = results(&out("full"));
    assert_eq!(rows.len(), 5 * 2 * 4, "5 pairs x 2 sites x 4 centres");
    let summary = std::fs::read_to_string(out("full").join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 1 + 2 * 4, "{summary}");
    // Killed after 7 experiments, with a torn line at the end; then resumed.
    let (code, err) = run(&out("killed"), &["--stop-after", "7"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(results(&out("killed")).len(), 7);
    let mut f = std::fs::OpenOptions::new().append(true).open(out("killed").join("experiments.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\": 3, \"tar").unwrap();
    let (code, err) = run(&out("killed"), &[]);
    assert_ne!(code, 0, "an existing sweep without --resume must be refused");
    assert!(err.contains("--resume"), "{err}");
    let (code, err) = run(&out("killed"), &["--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(out("killed").join("experiments.jsonl")).unwrap() == full, "resumed experiments.jsonl differs from the uninterrupted run");
    // A different sweep in the same directory is refused.
    let mut other = args(&out("killed"));
    let w = other.iter().position(|s| s == "--window").unwrap() + 1;
    other[w] = "1".into();
    other.push("--resume".into());
    let (code, err) = patchbay(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert!(err.contains("different sweep"), "{err}");
    // The naive method gives the same numbers.
    let (code, err) = run(&out("naive"), &["--method", "naive"]);
    assert_eq!(code, 0, "{err}");
    let mut naive = results(&out("naive"));
    naive.sort_by_key(|r| r.id);
    let mut resumed = rows;
    resumed.sort_by_key(|r| r.id);
    for (r, n) in resumed.iter().zip(&naive) {
        assert_close(&format!("experiment {}", r.id), &r.patched, &n.patched, F32_ATOL, F32_RTOL);
        assert_eq!(r.pred, n.pred);
    }
    // A budget that holds no clean run: spilled or recomputed as --overflow says (the manifest
    // tells which), the same numbers; a killed spilling run resumes to the same bytes.
    for overflow in ["spill", "recompute"] {
        let dir = out(overflow);
        let (code, err) = run(&dir, &["--mem-budget", "1", "--overflow", overflow]);
        assert_eq!(code, 0, "{err}");
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let clean = &manifest["clean_runs"];
        assert_eq!((clean["target_clean_runs"].as_str(), clean["held_targets"].as_u64()), (Some(overflow), Some(0)), "{clean}");
        assert!(clean["estimate_s"]["spill"].as_f64().unwrap() > 0.0, "{clean}");
        let mut got = results(&dir);
        got.sort_by_key(|r| r.id);
        for (g, n) in got.iter().zip(&naive) {
            assert_close(&format!("{overflow}: experiment {}", g.id), &g.patched, &n.patched, F32_ATOL, F32_RTOL);
        }
    }
    let (code, err) = run(&out("spill-killed"), &["--mem-budget", "1", "--overflow", "spill", "--stop-after", "9"]);
    assert_eq!(code, 1, "{err}");
    let (code, err) = run(&out("spill-killed"), &["--mem-budget", "1", "--overflow", "spill", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(out("spill-killed").join("experiments.jsonl")).unwrap() == std::fs::read(out("spill").join("experiments.jsonl")).unwrap(), "a resumed spilling run differs");
}

#[test]
fn dataset_prompts_and_pairs_of_different_gold_labels() {
    let model = synth_family("llama", 4, 2);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama").join(f), model.path().join(f)).unwrap();
    }
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/emotions.csv");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d");
    let (m, d, o) = (model.path().to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let base = ["patch", "--model", m, "--dataset", d, "--label-col", "emotion", "--rename", "no-emotion=neutral", "--filter", "round=round-1", "--limit", "24", "--template", "tak"];
    let sweep = ["--random-pairs", "40", "--seed", "3", "--different-labels", "--sites", "resid_post", "--window", "1", "--layers", "1,2", "--quiet", "--out"];
    let (code, err) = patchbay(&[&base[..], &sweep, &[o]].concat());
    assert_eq!(code, 0, "{err}");

    // The prompts are the dataset's examples through the template; the labels default to the
    // dataset's gold labels, sorted.
    let mut spec = DatasetSpec::new(&data, "text");
    spec.label_column = Some("emotion".into());
    spec.renames = vec![("no-emotion".into(), "neutral".into())];
    spec.filters = vec![dataset::Filter::parse("round=round-1").unwrap()];
    spec.limit = Some(24);
    let ds = dataset::load(&spec).unwrap();
    let tok = PromptTokenizer::load(model.path()).unwrap();
    let t = Template::parse("tak").unwrap();
    let prompts: Vec<Vec<u32>> = ds.examples.iter().map(|e| t.encode(&tok, &e.text).unwrap()).collect();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["sweep"]["prompts"], serde_json::json!(prompts));
    assert_eq!(manifest["labels"], serde_json::json!(ds.label_values()));
    assert_eq!(manifest["dataset"]["examples"], 24);
    assert_eq!(manifest["template"]["chat"], false, "the template is recorded");
    // Every pair joins two examples of different gold labels; every label can be drawn.
    let pairs: Vec<Pair> = serde_json::from_value(manifest["sweep"]["pairs"].clone()).unwrap();
    assert_eq!(pairs.len(), 40);
    let gold = |i: usize| ds.examples[i].label.clone().unwrap();
    for p in &pairs {
        assert_ne!(gold(p.source), gold(p.target), "pair {p:?}");
    }
    let drawn: std::collections::HashSet<String> = pairs.iter().flat_map(|p| [gold(p.source), gold(p.target)]).collect();
    assert_eq!(drawn.len(), ds.label_values().len(), "labels drawn: {drawn:?}");
    let rows = results(&out);
    assert_eq!(rows.len(), 40 * 2);
    assert!(rows.iter().all(|r| pairs[r.id / 2] == Pair { source: r.source, target: r.target }));
    assert!(out.join("heatmap.png").exists());

    // --different-labels needs gold labels; it goes with --random-pairs.
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, "[[1, 2, 3], [4, 5, 6]]").unwrap();
    let other = tmp.path().join("e").display().to_string();
    let cases: [(Vec<&str>, i32, &str); 3] = [
        (vec!["patch", "--model", m, "--token-ids", ids.to_str().unwrap(), "--labels", "anger,joy", "--random-pairs", "3", "--different-labels", "--out", &other], 1, "needs a dataset"),
        (vec!["patch", "--model", m, "--dataset", d, "--label-col", "none", "--labels", "anger,joy", "--random-pairs", "3", "--different-labels", "--out", &other], 1, "no label column"),
        ([&base[..], &["--pairs", "p.jsonl", "--different-labels", "--out", &other]].concat(), 2, "cannot be used with '--different-labels"),
    ];
    for (args, want, msg) in cases {
        let (code, err) = patchbay(&args);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: `{msg}` not in {err}");
    }
}

fn row(site: &str, center: usize, flip_rate: f64) -> SummaryRow {
    SummaryRow { site: site.into(), center, n: 10, flip_rate, flip_lo: 0.0, flip_hi: 1.0, mean_logit_diff: 0.0, diff_lo: 0.0, diff_hi: 0.0 }
}

#[test]
fn summary_grid_puts_sites_down_and_centres_across() {
    let g = summary_grid(&[row("z", 3, 0.5), row("z", 1, 0.25), row("attn_out", 1, 1.0)], 3, Some(&[2, 5]));
    assert_eq!(g.row_labels, ["z", "attn_out"]);
    assert_eq!(g.col_labels, ["1", "3"]);
    assert_eq!(g.values, vec![vec![Some(0.25), Some(0.5)], vec![Some(1.0), None]]);
    assert_eq!(g.range, Some((0.0, 1.0)));
    // What was patched is on the plot: the window size, the units, the axes.
    let svg = heatmaps_svg(&g.title, std::slice::from_ref(&g)).unwrap();
    for want in ["3-layer windows", "units 2,5", "(10 pairs)", "\nwindow centre layer (layers centre ± 1)\n", "\nsite patched\n", "\nattn_out\n", "\nflip rate\n"] {
        assert!(svg.contains(want), "the patching heatmap lacks `{want}`");
    }
}

#[test]
fn heatmap_draws_cells_in_their_colours_and_refuses_ragged_grids() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("h.png");
    let mut grid = Grid {
        title: "test".into(),
        row_labels: vec!["a".into(), "b".into()],
        col_labels: vec!["0".into(), "1".into(), "2".into()],
        values: vec![vec![Some(1.0), Some(0.0), None], vec![Some(0.5), Some(-0.5), Some(1.0)]],
        value_label: "v".into(),
        range: Some((-1.0, 1.0)),
        x_desc: "x".into(),
        y_desc: "y".into(),
    };
    heatmap(&path, &grid).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let count = |rgb: [u8; 3]| buf[..info.buffer_size()].chunks(3).filter(|p| *p == rgb).count();
    // Two full-scale cells (1.0: the darkest blue), one missing value (grey), a mid-red cell.
    let (blue, grey, red) = (count([8, 48, 107]), count([220, 220, 220]), count([216, 139, 149]));
    assert!(blue > 2 * 44 * 24 / 2, "full-scale blue pixels: {blue}");
    assert!(grey > 44 * 24 / 2, "grey (missing) pixels: {grey}");
    assert!(red > 44 * 24 / 2, "half-scale red pixels: {red}");
    grid.values[1].pop();
    let err = heatmap(&path, &grid).unwrap_err().to_string();
    assert!(err.contains("2 rows of 3 columns"), "{err}");
}

/// A unit list applies to every site kind of the sweep: `--heads` where a site has no heads, or
/// `--neurons` where it has no neurons, would select something else there (the dimensions of
/// resid_post, the neurons of mlp_post) and is refused; at the right sites it runs.
#[test]
fn unit_lists_only_at_sites_that_have_those_units() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&random_prompts(3, &[6, 8], 384, 2)).unwrap()).unwrap();
    let model = fixture("llama");
    let run = |sites: &str, units: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let mut a = vec!["patch", "--model", model.to_str().unwrap(), "--token-ids", ids.to_str().unwrap(), "--label-token-ids", "3,50", "--random-pairs", "2", "--sites", sites, "--window", "1", "--quiet", "--out", out.to_str().unwrap()];
        a.extend_from_slice(units);
        patchbay(&a)
    };
    for (sites, units, want) in [
        ("resid_post", &["--heads", "1"][..], "--heads applies to sites with heads"),
        ("z,attn_out", &["--heads", "1"][..], "`attn_out` has none"),
        ("mlp_post", &["--heads", "1"][..], "`mlp_post` has none"),
        ("z", &["--neurons", "3"][..], "--neurons applies to sites with neurons (mlp_post); `z` has none"),
        ("resid_post", &["--neurons", "3"][..], "`resid_post` has none"),
    ] {
        let (code, err) = run(sites, units, "bad");
        assert!(code == 1 && err.contains(want) && err.trim_end().lines().count() == 1, "{sites} {units:?}: {err}");
        assert!(!tmp.path().join("bad").join("experiments.jsonl").exists());
    }
    for (sites, units, name) in [("z,v", &["--heads", "1"][..], "heads"), ("mlp_post", &["--neurons", "3"][..], "neurons")] {
        let (code, err) = run(sites, units, name);
        assert_eq!(code, 0, "{sites} {units:?}: {err}");
    }
}
