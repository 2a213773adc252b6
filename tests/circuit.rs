//! Circuits as files (`experiments::circuit`, `patchbay circuit build | eval`, `generate
//! --circuit`) on the llama fixture (2 layers, 4 heads, 96 neurons) with fresh random direction
//! files and rankings: a circuit file round-trips; hostile files are refused with one-line errors
//! naming the file and the entry; `build` picks exactly the top k of hand-made contrib tables and
//! ablate summaries; `generate --circuit` at alpha 0 is the clean generation token for token (and
//! changes it at a large alpha), and a one-head scale circuit equals generation with the explicit
//! intervention on the same engine (cpu, emu); `circuit eval`'s passes and its summary recomputed from its own
//! judged.jsonl.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::kernels::Rng;
use common::*;
use indicatif::ProgressBar;
use patchbay::backend::DeviceSpec;
use patchbay::engine::Engine;
use patchbay::engine::device_forward::DeviceModel;
use patchbay::experiments::ablate::Component;
use patchbay::experiments::circuit::{Circuit, CircuitComponent, CircuitFile, CircuitOp, FORMAT, Provenance};
use patchbay::experiments::generate::{GenerateSpec, StepIntervention, generate};
use patchbay::intervene::Op;
use patchbay::io::OutDtype;
use patchbay::io::tensorfile::{TensorData, write};
use patchbay::model::Model;
use patchbay::sites::{Site, SiteKind, TokenScope};
use serde_json::{Value, json};

const LABELS: &str = "a=40,b=65,c=262,d=300,e=13";

struct Work {
    dir: tempfile::TempDir,
    model: String,
    m: Model,
}

impl Work {
    fn new(seed: u64) -> Work {
        let dir = tempfile::tempdir().unwrap();
        let fixture = fixture("llama");
        let m = Model::load(&fixture).unwrap();
        // Directions b and c at every layer's resid_post (fresh random values).
        let d = m.cfg.d_model;
        let mut rng = Rng::seeded(seed);
        let mut list: Vec<(String, Vec<usize>, TensorData)> = Vec::new();
        let vals: Vec<(String, Vec<f32>)> = (0..m.cfg.n_layers).flat_map(|l| ["b", "c"].map(|n| (format!("blocks.{l}.hook_resid_post/{n}"), rng.normals(d)))).collect();
        for (n, v) in &vals {
            list.push((n.clone(), vec![d], TensorData::F32(v, OutDtype::F32)));
        }
        write(&dir.path().join("dirs.safetensors"), &list, &BTreeMap::new()).unwrap();
        Work { dir, model: fixture.display().to_string(), m }
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.p(name)
    }
}

fn provenance() -> Provenance {
    Provenance { model: "tests/fixtures/llama".into(), command: "by hand".into(), date: "2026-01-01T00:00:00Z".into(), sources: vec!["heads.csv".into()], rule: "hand-made".into() }
}

fn head(layer: usize, head: usize, op: CircuitOp, weight: f32) -> CircuitComponent {
    CircuitComponent::new(&Component::Head { layer, head }, op, weight)
}

fn neurons(layer: usize, n: &[usize], op: CircuitOp, weight: f32) -> CircuitComponent {
    CircuitComponent::new(&Component::Neurons { layer, neurons: n.to_vec() }, op, weight)
}

/// Two circuits (b: heads and neurons, scale and add; c: one head).
fn two_circuits(w: &Work) -> CircuitFile {
    let vector = Some(format!("{}:b", w.p("dirs.safetensors")));
    let b = Circuit { vector, vector_site: None, components: vec![head(0, 1, CircuitOp::Scale, 1.0), head(1, 3, CircuitOp::Add, 0.5), neurons(0, &[4, 17, 90], CircuitOp::Add, 2.0), neurons(1, &[0], CircuitOp::Scale, -0.25)] };
    let c = Circuit { vector: None, vector_site: None, components: vec![head(1, 2, CircuitOp::Scale, 1.0)] };
    CircuitFile { format: FORMAT.into(), provenance: provenance(), circuits: BTreeMap::from([("b".to_string(), b), ("c".to_string(), c)]) }
}

fn tokens(rows: &[Value]) -> Vec<Value> {
    rows.iter().map(|r| r["tokens"].clone()).collect()
}

#[test]
fn round_trip_and_hostile_files() {
    let w = Work::new(1);
    let file = two_circuits(&w);
    let path = w.dir.path().join("c.json");
    file.write(&path, &w.m.cfg).unwrap();
    assert_eq!(CircuitFile::read(&path, &w.m.cfg).unwrap(), file, "round trip");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "patchbay-circuit-1");
    assert_eq!(v["circuits"]["b"]["components"][2], json!({"layer": 0, "neurons": [4, 17, 90], "op": "add", "weight": 2.0}));

    // Hostile edits of the good file, each refused naming the file and the entry.
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = v.clone();
        f(&mut v);
        serde_json::to_string(&v).unwrap()
    };
    let cases: Vec<(String, &str)> = vec![
        (edit(&|v| v["circuits"]["b"]["components"][0]["heads"] = json!(1)), "unknown field `heads`"),
        (edit(&|v| v["provenance"]["author"] = json!("x")), "unknown field `author`"),
        (edit(&|v| v["circuits"]["b"]["components"][1]["layer"] = json!(2)), "circuit `b`, component 1: L2.H3: layer 2 is out of range"),
        (edit(&|v| v["circuits"]["c"]["components"][0]["head"] = json!(4)), "circuit `c`, component 0: L1.H4: head 4 is out of range"),
        (edit(&|v| v["circuits"]["b"]["components"][2]["neurons"] = json!([4, 96])), "neuron 96 is out of range"),
        (edit(&|v| v["circuits"]["b"]["components"][3] = json!({"layer": 0, "head": 1, "op": "add", "weight": 1.0})), "circuit `b`, component 3: L0.H1 is already in the circuit"),
        (edit(&|v| v["circuits"]["b"]["components"][3] = json!({"layer": 0, "neurons": [8, 17], "op": "scale", "weight": 1.0})), "component 3: L0.N[8,17] is already in the circuit (layer 0 neuron 17)"),
        (edit(&|v| v["circuits"]["b"]["components"][3]["head"] = json!(0)), "component 3: give either `head` or `neurons`"),
        (edit(&|v| v["circuits"]["c"]["components"] = json!([])), "circuit `c`: no components"),
        (edit(&|v| v["circuits"] = json!({})), "no circuits"),
        (edit(&|v| v["format"] = json!("patchbay-circuit-0")), "expected `patchbay-circuit-1`"),
        (edit(&|v| v["circuits"]["b"]["components"][0]["op"] = json!("zero")), "unknown variant `zero`"),
        (edit(&|v| v["circuits"]["c"]["components"][0]["op"] = json!("add")), "circuit `c`, component 0: op add needs the circuit's `vector`"),
        (edit(&|v| v["circuits"]["b"]["vector_site"] = json!("blocks.9.hook_resid_post")), "circuit `b`: vector_site"),
        (format!("\u{feff}{text}"), "byte-order mark"),
        ("{\"format\": ".into(), "not a circuit file"),
    ];
    let ids = w.write("ids.json", "[[1, 5, 9, 12], [3, 4, 5]]");
    for (i, (bad, says)) in cases.iter().enumerate() {
        let p = w.write(&format!("bad{i}.json"), bad);
        let e = CircuitFile::read(Path::new(&p), &w.m.cfg).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains(&p), "case {i}: `{says}` (and the path) not in: {e}");
        // Through the command: one line, nothing written.
        let out = w.p(&format!("out{i}"));
        let (code, err) = patchbay_cli(&["generate", "--model", &w.model, "--token-ids", &ids, "--circuit", &p, "--emotion", "b", "--alpha", "1", "--max-new-tokens", "2", "--quiet", "--out", &out]);
        assert!(code != 0 && err.trim().lines().count() == 1 && err.contains(says), "case {i}: {err}");
        assert!(!Path::new(&out).exists(), "case {i} wrote {out}");
    }
    // The command's own checks.
    let good = path.display().to_string();
    for (extra, says) in [(vec!["--alpha", "1"], "holds several circuits: name one with --emotion (b, c)"), (vec!["--emotion", "z", "--alpha", "1"], "no circuit for `z`"), (vec!["--emotion", "b"], "--circuit needs --alpha"), (vec!["--emotion", "b", "--alpha", "1", "--betas", "2"], "a circuit's strengths are --alpha")] {
        let mut args = vec!["generate", "--model", &w.model, "--token-ids", &ids, "--circuit", &good, "--max-new-tokens", "2", "--quiet", "--out", "/nonexistent/x"];
        args.extend(extra);
        let (code, err) = patchbay_cli(&args);
        assert!(code != 0 && err.trim().lines().count() == 1 && err.contains(says), "{says}: {err}");
    }
}

#[test]
fn generate_with_a_circuit() {
    let w = Work::new(2);
    let circuits = w.dir.path().join("c.json");
    two_circuits(&w).write(&circuits, &w.m.cfg).unwrap();
    let circuits = circuits.display().to_string();
    let prompts: Vec<Vec<u32>> = random_prompts(3, &[5, 9, 3], w.m.cfg.vocab_size, 0xc1c);
    let ids = w.write("ids.json", &serde_json::to_string(&prompts).unwrap());
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", &w.model, "--token-ids", &ids, "--max-new-tokens", "6", "--quiet", "--out", out];
        args.extend_from_slice(extra);
        patchbay_ok(&args);
        read_jsonl(&Path::new(out).join("generations.jsonl"))
    };
    let clean = run(&w.p("clean"), &[]);
    // Alpha 0 (every op: scale by 1, add 0 u) is the clean generation; a large alpha changes it.
    let modulated = run(&w.p("b"), &["--circuit", &circuits, "--emotion", "b", "--alpha=0,12", "--positions", "all+generated"]);
    assert_eq!(modulated.len(), 2 * 3);
    assert_eq!(tokens(&modulated[..3]), tokens(&clean), "alpha 0 differs from the clean generation");
    assert_ne!(tokens(&modulated[3..]), tokens(&clean), "alpha 12 changes nothing: the test could not fail");
    assert_eq!((modulated[3]["direction"].as_str(), modulated[3]["beta"].as_f64()), (Some("circuit:b"), Some(12.0)));
    let iv = modulated[3]["interventions"].as_array().unwrap();
    assert_eq!(iv.len(), 4);
    assert_eq!((iv[0]["op"].as_str(), iv[0]["site"].as_str(), &iv[0]["units"]), (Some("scale"), Some("blocks.0.attn.hook_z"), &json!([1])));
    assert_eq!((iv[2]["op"].as_str(), iv[2]["site"].as_str(), &iv[2]["units"]), (Some("add"), Some("blocks.0.mlp.hook_post"), &json!([4, 17, 90])));

    // One head, op scale: the explicit intervention through the library (units x (1 + alpha w)),
    // on the CPU and the emulated device.
    let mut rng = Rng::seeded(0x0e4d);
    let (layer, h, weight, alpha) = (rng.below(2), rng.below(4), rng.uniform(0.5, 2.0), rng.uniform(2.0, 5.0));
    let one = CircuitFile { format: FORMAT.into(), provenance: provenance(), circuits: BTreeMap::from([("b".to_string(), Circuit { vector: None, vector_site: None, components: vec![head(layer, h, CircuitOp::Scale, weight)] })]) };
    let one_path = w.dir.path().join("one.json");
    one.write(&one_path, &w.m.cfg).unwrap();
    let alpha_flag = format!("--alpha={alpha}");
    let step = StepIntervention { site: Site::new(layer, SiteKind::Z), units: Some(vec![h]), op: Op::Scale { alpha: 1.0 + alpha * weight }, scope: TokenScope::parse("last:2+generated").unwrap() };
    // Each engine against itself (bf16 near-ties may part the emulator's tokens from the CPU's).
    let emu = DeviceModel::upload(&w.m, DeviceSpec::Emu.driver().unwrap().expect("emu is a device")).unwrap();
    let engines: [(&str, &dyn Engine); 2] = [("cpu", &w.m), ("emu", &emu)];
    for (device, engine) in engines {
        let want = generate(engine, &prompts, &GenerateSpec::greedy(&w.m.cfg, 6), std::slice::from_ref(&step), None, &ProgressBar::hidden(), &mut |_, _| Ok(())).unwrap();
        let want: Vec<Value> = want.iter().map(|g| json!(g.tokens)).collect();
        let got = run(&w.p(&format!("one-{device}")), &["--circuit", &one_path.display().to_string(), &alpha_flag, "--positions", "last:2+generated", "--device", device]);
        assert_eq!(tokens(&got), want, "{device}: the one-head circuit differs from the explicit intervention");
        if device == "cpu" {
            assert_ne!(want, tokens(&clean), "the one-head scale changes nothing: the test could not fail");
        }
    }
}

/// A contrib run's files: heads.csv, neurons.csv (labels b and c, fresh random means) and a
/// manifest naming direction `name`.
fn contrib_dir(w: &Work, dir: &str, name: &str, rng: &mut Rng) -> (Vec<(usize, usize, String, f64)>, Vec<(usize, usize, String, f64)>) {
    let d = w.dir.path().join(dir);
    std::fs::create_dir_all(&d).unwrap();
    let mut table = |file: &str, unit: &str, per_layer: usize| {
        let mut rows = Vec::new();
        let mut text = format!("layer,{unit},label,mean,sd,n,rank\n");
        for label in ["b", "c", "all"] {
            for l in 0..2 {
                for i in 0..per_layer {
                    let mean = rng.normal() as f64;
                    text += &format!("{l},{i},{label},{mean},0.1,3,0\n");
                    rows.push((l, i, label.to_string(), mean));
                }
            }
        }
        std::fs::write(d.join(file), text).unwrap();
        rows
    };
    let heads = table("heads.csv", "head", 4);
    let neurons = table("neurons.csv", "neuron", 96);
    let manifest = json!({"direction": {"source": format!("{}:{name}", w.p("dirs.safetensors")), "name": name, "site": "blocks.1.hook_resid_post"}});
    std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
    (heads, neurons)
}

/// The top k (layer, unit) of `label` by mean, at least `threshold`.
fn top(rows: &[(usize, usize, String, f64)], label: &str, k: usize, threshold: f64) -> Vec<(usize, usize)> {
    let mut r: Vec<&(usize, usize, String, f64)> = rows.iter().filter(|r| r.2 == label && r.3 >= threshold).collect();
    r.sort_by(|a, b| b.3.total_cmp(&a.3));
    r.iter().take(k).map(|r| (r.0, r.1)).collect()
}

#[test]
fn build_picks_the_top_k() {
    let w = Work::new(3);
    let mut rng = Rng::seeded(0xb111d);
    let (heads_b, neurons_b) = contrib_dir(&w, "contrib-b", "b", &mut rng);
    let (heads_c, neurons_c) = contrib_dir(&w, "contrib-c", "c", &mut rng);
    let out = w.p("built.json");
    patchbay_ok(&["circuit", "build", "--model", &w.model, "--contrib", &w.p("contrib-b"), "--contrib", &w.p("contrib-c"), "--labels", "b,c", "--top-k-heads", "3", "--top-k-neurons", "7", "--threshold=-0.5", "--op", "add", "--quiet", "--out", &out]);
    let file = CircuitFile::read(Path::new(&out), &w.m.cfg).unwrap();
    for (e, heads, neurons) in [("b", &heads_b, &neurons_b), ("c", &heads_c, &neurons_c)] {
        let c = &file.circuits[e];
        let got_heads: Vec<(usize, usize)> = c.components.iter().filter_map(|x| x.head.map(|h| (x.layer, h))).collect();
        assert_eq!(got_heads, top(heads, e, 3, -0.5), "{e}: heads");
        let mut got_neurons: Vec<(usize, usize)> = c.components.iter().filter_map(|x| x.neurons.as_ref().map(|n| n.iter().map(|&i| (x.layer, i)).collect::<Vec<_>>())).flatten().collect();
        let mut want = top(neurons, e, 7, -0.5);
        got_neurons.sort();
        want.sort();
        assert_eq!(got_neurons, want, "{e}: neurons");
        assert!(c.components.iter().all(|x| x.op == CircuitOp::Add && x.weight == 1.0));
        assert_eq!((c.vector.clone(), c.vector_site.as_deref()), (Some(format!("{}:{e}", w.p("dirs.safetensors"))), Some("blocks.1.hook_resid_post")));
    }
    assert!(file.provenance.sources.iter().any(|s| s.ends_with("contrib-c/neurons.csv")) && file.provenance.command.contains("circuit build") && file.provenance.rule.contains("top 3 heads"));

    // From an ablate summary alone: zero ablations rank by the drop of the label's logit.
    let summary = "kind,layer,head,neurons,control,op,n,flip_rate,mean_clean_pred_logit_change,mean_logit_change:b,mean_logit_change:c\n\
        head,0,0,,false,zero,4,0,0,-0.5,0.1\nhead,0,1,,false,zero,4,0,0,-2.0,0.2\nhead,1,2,,false,zero,4,0,0,0.3,-1.0\nhead,1,3,,false,zero,4,0,0,-3.0,0.0\n\
        head,1,0,,true,zero,4,0,0,-9.0,0.0\nneurons,0,,3 5,false,zero,4,0,0,-1.0,0.0\nneurons,1,,7,false,zero,4,0,0,-0.1,0.0\n";
    std::fs::create_dir_all(w.dir.path().join("abl")).unwrap();
    std::fs::write(w.dir.path().join("abl/summary.csv"), summary).unwrap();
    let out = w.p("abl.json");
    patchbay_ok(&["circuit", "build", "--model", &w.model, "--ablate", &w.p("abl"), "--labels", "b", "--top-k-heads", "2", "--top-k-neurons", "1", "--op", "scale", "--quiet", "--out", &out]);
    let c = &CircuitFile::read(Path::new(&out), &w.m.cfg).unwrap().circuits["b"];
    assert_eq!(c.components, vec![head(1, 3, CircuitOp::Scale, 1.0), head(0, 1, CircuitOp::Scale, 1.0), neurons(0, &[3, 5], CircuitOp::Scale, 1.0)], "the control (L1.H0) is not a candidate");
    // With both: the contrib ranking confirmed by the ablate sweep (positive effect only).
    let out = w.p("both.json");
    patchbay_ok(&["circuit", "build", "--model", &w.model, "--contrib", &w.p("contrib-b"), "--ablate", &w.p("abl"), "--labels", "b", "--top-k-heads", "4", "--op", "scale", "--quiet", "--out", &out]);
    let c = &CircuitFile::read(Path::new(&out), &w.m.cfg).unwrap().circuits["b"];
    let confirmed = [(0, 0), (0, 1), (1, 3)];
    let want: Vec<(usize, usize)> = top(&heads_b, "b", 8, f64::NEG_INFINITY).into_iter().filter(|h| confirmed.contains(h)).collect();
    assert_eq!(c.components.iter().map(|x| (x.layer, x.head.unwrap())).collect::<Vec<_>>(), want);
    // Errors.
    for (extra, says) in [(vec!["--labels", "b", "--top-k-heads", "1"], "give the rankings"), (vec!["--ablate", &w.p("abl"), "--labels", "b"], "--top-k-heads"), (vec!["--ablate", &w.p("abl"), "--labels", "z", "--top-k-heads", "1"], "mean_logit_change:z"), (vec!["--ablate", &w.p("abl"), "--labels", "b", "--top-k-heads", "1", "--op", "add"], "--op add needs a direction"), (vec!["--ablate", &w.p("abl"), "--labels", "b", "--top-k-heads", "1", "--threshold", "50"], "no component passes")] {
        let mut args = vec!["circuit", "build", "--model", &w.model, "--quiet", "--out", "/nonexistent/x.json"];
        args.extend(extra);
        let (code, err) = patchbay_cli(&args);
        assert!(code != 0 && err.trim().lines().count() == 1 && err.contains(says), "{says}: {err}");
    }
}

const SEV: &str = r#"{"scenario": "I finished the report", "event": {"positive": "My boss praised it.", "neutral": "My boss filed it.", "negative": "My boss lost it."}}
{"scenario": "I cooked dinner", "event": {"positive": "Everyone loved it.", "neutral": "We ate at seven.", "negative": "It burned."}}
"#;

#[test]
fn eval_rows_recomputed_from_its_judged_file() {
    let w = Work::new(4);
    let circuits = w.dir.path().join("c.json");
    two_circuits(&w).write(&circuits, &w.m.cfg).unwrap();
    let sev = w.write("sev.jsonl", SEV);
    let out = Path::new(&w.p("eval")).to_path_buf();
    let vector = format!("{}:b,c", w.p("dirs.safetensors"));
    #[rustfmt::skip]
    patchbay_ok(&["circuit", "eval", "--circuit", &circuits.display().to_string(), "--model", &w.model, "--sev", &sev, "--alpha=2,6", "--positions", "all+generated",
        "--vector", &vector, "--layers", "0", "--betas=3", "--label-token-ids", LABELS, "--max-new-tokens", "3", "--quiet", "--out", &out.display().to_string()]);
    let gens = read_jsonl(&out.join("generations.jsonl"));
    // 2 scenarios x (clean + 2 emotions x (2 alphas + 1 beta + prompted)).
    assert_eq!(gens.len(), 2 * 9);
    let passes: Vec<(Value, Value, Value)> = gens.iter().step_by(2).map(|g| (g["direction"].clone(), g["beta"].clone(), g["target"].clone())).collect();
    #[rustfmt::skip]
    let want: Vec<(Value, Value, Value)> = vec![(Value::Null, Value::Null, Value::Null), ("circuit:b".into(), 2.0.into(), "b".into()), ("circuit:b".into(), 6.0.into(), "b".into()), ("circuit:c".into(), 2.0.into(), "c".into()), ("circuit:c".into(), 6.0.into(), "c".into()),
        ("b".into(), 3.0.into(), "b".into()), ("c".into(), 3.0.into(), "c".into()), ("prompt:b".into(), Value::Null, "b".into()), ("prompt:c".into(), Value::Null, "c".into())];
    assert_eq!(passes, want);
    assert_eq!(gens[14]["prompt"], "Write as someone who feels b. I finished the report. My boss filed it.");
    let judged = read_jsonl(&out.join("judged.jsonl"));
    assert_eq!(judged.len(), gens.len());
    let conditions: Vec<&str> = judged.iter().step_by(2).map(|j| j["condition"].as_str().unwrap()).collect();
    assert_eq!(conditions, ["clean", "circuit", "circuit", "circuit", "circuit", "steered", "steered", "prompted", "prompted"]);
    for (g, j) in gens.iter().zip(&judged) {
        assert_eq!((&g["text"], &g["index"], &g["target"]), (&j["text"], &j["index"], &j["target"]));
    }
    // summary.csv: every cell recomputed from judged.jsonl (clean rows once per emotion).
    let keys = ["clean,b,", "clean,c,", "circuit,b,2", "circuit,b,6", "circuit,c,2", "circuit,c,6", "steered,b,3", "steered,c,3", "prompted,b,", "prompted,c,"];
    assert_summary_recomputed(&out.join("summary.csv"), &judged, &["a", "b", "c", "d", "e"], &keys);
    assert!(std::fs::metadata(out.join("accuracy.png")).unwrap().len() > 1000);
    let m: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((m["command"].as_str(), m["passes"].as_array().map(Vec::len)), (Some("circuit eval"), Some(9)));
    assert!(m["timings_s"]["judge"].as_f64().is_some());
    // One-line errors, nothing written.
    let ids = w.write("ids.json", "[[1, 5, 9]]");
    let c = circuits.display().to_string();
    for (extra, says) in [(vec!["--sev", &sev, "--betas=3"], "the circuit's strengths are --alpha"), (vec!["--token-ids", &ids], "needs text prompts"), (vec!["--sev", &sev, "--emotions", "z"], "no circuit for `z`"), (vec!["--sev", &sev, "--instruction", "{text} "], "--instruction")] {
        let mut args = vec!["circuit", "eval", "--circuit", &c, "--model", &w.model, "--alpha=2", "--label-token-ids", LABELS, "--quiet", "--out", "/nonexistent/eval"];
        args.extend(extra);
        let (code, err) = patchbay_cli(&args);
        assert!(code != 0 && err.trim().lines().count() == 1 && err.contains(says), "{says}: {err}");
    }
}
