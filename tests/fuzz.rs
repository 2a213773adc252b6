//! Fuzzing on stable, bounded to seconds: every parser of user files (safetensors header of a
//! checkpoint and of a tensor file, config.json, tokenizer_config.json with its chat template,
//! dataset CSV and JSONL, pairs, intervention specs, circuit files, GGUF, token-id files) takes
//! seeded random mutations of a valid seed (bytes flipped, inserted, cut, duplicated; JSON values
//! replaced by hostile ones: huge, negative, empty, nested, wrongly typed; safetensors header
//! entries re-encoded with hostile shapes and offsets) and the committed hostile corpus
//! (`tests/hostile/<target>/`, every file refused); the command line takes mutated argument
//! lists. Always: no panic, no single allocation over [`ALLOC_LIMIT`] (a counting allocator), an
//! error is one line; a corpus file is an error. `PATCHBAY_TEST_SEED` replays a run;
//! `PATCHBAY_FUZZ_CASES` changes the number of mutations per target (default 120).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kernels::{Rng, test_seed};
use common::*;
use patchbay::data::dataset::{DatasetSpec, load as load_dataset};
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::experiments::circuit::CircuitFile;
use patchbay::experiments::patch_files::read_pairs;
use patchbay::intervene::spec::{read_specs, resolve_all};
use patchbay::io::tensorfile::TensorFile;
use patchbay::model::Model;
use patchbay::model::chat_template::ChatMessage;
use patchbay::model::config::ModelConfig;
use patchbay::model::gguf::GgufFile;
use patchbay::model::tokenizer::PromptTokenizer;
use serde_json::{Value, json};

/// The largest single allocation a parser may ask for on these small inputs (a header claiming
/// 10^9 layers or a 2^60-element tensor must be refused before anything that size is allocated).
const ALLOC_LIMIT: usize = 256 << 20;

thread_local! {
    /// The largest single allocation of this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A parser under test: the file it reads (`file`, inside a case directory that `setup` fills
/// with whatever else it needs) and the call (the library function the commands use).
struct Target {
    name: &'static str,
    file: &'static str,
    /// A valid input (the mutations' seed).
    seed: fn() -> Vec<u8>,
    /// How to mutate: as bytes, as JSON (values), as JSON lines, as a safetensors header.
    kind: Kind,
    setup: fn(&Path),
    parse: fn(&Path) -> patchbay::Result<()>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bytes,
    Json,
    JsonLines,
    Safetensors,
}

fn llama() -> PathBuf {
    fixture("llama")
}

fn llama_cfg() -> ModelConfig {
    ModelConfig::load(&llama()).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn copy_from_llama(dir: &Path, names: &[&str]) {
    for n in names {
        std::fs::copy(llama().join(n), dir.join(n)).unwrap();
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name)
}

/// A dataset as the commands load it: text, an `emotion` label and one numeric column.
fn load_emotions(path: &Path, numeric: &str) -> patchbay::Result<()> {
    let mut spec = DatasetSpec::new(path.to_path_buf(), "text");
    spec.label_column = Some("emotion".into());
    spec.numeric_columns = vec![numeric.into()];
    load_dataset(&spec).map(|_| ())
}

fn vectors_file() -> String {
    llama().join("steer_vectors.safetensors").display().to_string()
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            file: "model.safetensors",
            seed: || read(&llama().join("model.safetensors")),
            kind: Kind::Safetensors,
            setup: |d| copy_from_llama(d, &["config.json", "tokenizer.json", "tokenizer_config.json"]),
            parse: |d| Model::load(d).map(|_| ()),
        },
        Target {
            name: "tensorfile",
            file: "vectors.safetensors",
            seed: || read(&llama().join("steer_vectors.safetensors")),
            kind: Kind::Safetensors,
            setup: |_| {},
            parse: |d| {
                let mut f = TensorFile::open(&d.join("vectors.safetensors"))?;
                let names: Vec<String> = f.entries.keys().cloned().collect();
                names.iter().try_for_each(|n| f.read_f32(n).map(|_| ()))
            },
        },
        Target { name: "config", file: "config.json", seed: || read(&llama().join("config.json")), kind: Kind::Json, setup: |_| {}, parse: |d| ModelConfig::load(d).map(|_| ()) },
        Target {
            name: "tokenizer_config",
            file: "tokenizer_config.json",
            seed: || read(&llama().join("tokenizer_config.json")),
            kind: Kind::Json,
            setup: |d| copy_from_llama(d, &["config.json", "tokenizer.json"]),
            parse: |d| {
                let t = PromptTokenizer::load(d)?;
                t.encode("I got the job")?;
                t.encode_chat(&[ChatMessage { role: "user".into(), content: "hello".into() }], true).map(|_| ())
            },
        },
        Target {
            name: "csv",
            file: "data.csv",
            seed: || read(&data("emotions.csv")),
            kind: Kind::Bytes,
            setup: |_| {},
            parse: |d| load_emotions(&d.join("data.csv"), "pleasantness"),
        },
        Target {
            name: "jsonl",
            file: "data.jsonl",
            seed: || {
                let lines: Vec<String> = ["I got the job", "My dog died", "Someone broke in"].iter().zip(["joy", "sadness", "fear"]).map(|(t, e)| json!({"text": t, "emotion": e, "score": 0.5}).to_string() + "\n").collect();
                lines.concat().into_bytes()
            },
            kind: Kind::JsonLines,
            setup: |_| {},
            parse: |d| load_emotions(&d.join("data.jsonl"), "score"),
        },
        Target {
            name: "pairs",
            file: "pairs.jsonl",
            seed: || b"{\"source\": 0, \"target\": 1}\n{\"source\": 3, \"target\": 2}\n".to_vec(),
            kind: Kind::JsonLines,
            setup: |_| {},
            parse: |d| read_pairs(&d.join("pairs.jsonl"), 4).map(|_| ()),
        },
        Target {
            name: "spec",
            file: "spec.json",
            seed: || {
                let v = json!([
                    {"vector": format!("{}:a", vectors_file()), "site": "resid_post", "layers": "0..1", "positions": "-1", "betas": [0, 2.5], "normalise": true},
                    {"vector": format!("{}:a", vectors_file()), "project": format!("{}:subspace", vectors_file()), "site": "resid_post", "layers": [0], "positions": "all", "betas": [1]},
                ]);
                serde_json::to_vec_pretty(&v).unwrap()
            },
            kind: Kind::Json,
            setup: |_| {},
            parse: |d| resolve_all(&read_specs(&d.join("spec.json"))?, &llama_cfg(), false).map(|_| ()),
        },
        Target {
            name: "circuit",
            file: "circuit.json",
            seed: || {
                let v = json!({
                    "format": "patchbay-circuit-1",
                    "provenance": {"model": "m", "command": "patchbay circuit build", "date": "2026-01-01T00:00:00Z", "sources": ["a.csv"], "rule": "top 2"},
                    "circuits": {"joy": {"components": [{"layer": 0, "head": 1, "op": "scale", "weight": 1.0}, {"layer": 1, "neurons": [3, 4], "op": "scale", "weight": 0.5}]}},
                });
                serde_json::to_vec_pretty(&v).unwrap()
            },
            kind: Kind::Json,
            setup: |_| {},
            parse: |d| CircuitFile::read(&d.join("circuit.json"), &llama_cfg()).map(|_| ()),
        },
        Target {
            name: "gguf",
            file: "model.gguf",
            seed: || read(&fixtures_dir().join("gguf").join("dequant.gguf")),
            kind: Kind::Bytes,
            setup: |_| {},
            parse: |d| {
                // Header, metadata and tensor table, then every tensor dequantized.
                let f = GgufFile::open(&d.join("model.gguf"))?;
                for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"] {
                    if let Some(t) = f.tensor(ty) {
                        f.tensor_f32(t);
                    }
                }
                Ok(())
            },
        },
        Target {
            name: "token_ids",
            file: "ids.json",
            seed: || b"[[1, 5, 9, 12], [3, 4, 5]]".to_vec(),
            kind: Kind::Json,
            setup: |_| {},
            parse: |d| load_prompts(PromptSource::TokenIds(&d.join("ids.json")), &llama(), false).map(|_| ()),
        },
    ]
}

/// Values that break assumptions: sizes past any machine, negative, zero, empty, wrong types.
fn hostile_value(rng: &mut Rng) -> Value {
    let pick = [
        json!(0),
        json!(-1),
        json!(1_000_000_000u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4294967296u64),
        json!(1e308),
        json!(-1e-300),
        json!(0.5),
        json!(""),
        json!("NaN"),
        json!("../../../etc/passwd"),
        json!("\u{feff}x"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([[[[[[[[1]]]]]]]]),
        json!("{% for a in range(1000000) %}{% for b in range(1000000) %}x{% endfor %}{% endfor %}"),
        json!("x".repeat(1000)),
    ];
    pick[rng.below(pick.len())].clone()
}

/// Replaces one random node of `v` by a hostile value, deletes it from its object, or adds an
/// unknown key.
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    let stop = rng.below(3) == 0;
    match v {
        Value::Object(m) if !m.is_empty() && !stop => {
            let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
            match rng.below(8) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert("unknown_field".into(), json!(1));
                }
                _ => mutate_json(m.get_mut(&k).unwrap(), rng),
            }
        }
        Value::Array(a) if !a.is_empty() && !stop => {
            let i = rng.below(a.len());
            mutate_json(&mut a[i], rng)
        }
        _ => *v = hostile_value(rng),
    }
}

/// One byte-level mutation of `b`, positions within the first `focus` bytes more often.
fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng, focus: usize) {
    let len = b.len().max(1);
    let pos = |rng: &mut Rng| if rng.coin() { rng.below(focus.clamp(1, len)) } else { rng.below(len) };
    const TOKENS: [&[u8]; 10] = [b"1e309", b"-1", b"18446744073709551616", b"null", b"\"\"", b"[[[[[[[[", b"\xef\xbb\xbf", b"\xff\xfe", b"\"x\",\"y\"\n\"", b"\x00"];
    match rng.below(6) {
        0 if !b.is_empty() => {
            let i = pos(rng);
            let i = i.min(b.len() - 1);
            b[i] ^= 1 << rng.below(8);
        }
        1 if !b.is_empty() => {
            let i = pos(rng).min(b.len() - 1);
            b[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b',', b'\n', b'-', b'9'][rng.below(10)];
        }
        2 => {
            let i = pos(rng).min(b.len());
            let t = TOKENS[rng.below(TOKENS.len())];
            b.splice(i..i, t.iter().copied());
        }
        3 if !b.is_empty() => {
            let i = pos(rng).min(b.len() - 1);
            let n = (1 + rng.below(16)).min(b.len() - i);
            b.drain(i..i + n);
        }
        4 => {
            let at = pos(rng).min(b.len());
            b.truncate(at);
        }
        _ if !b.is_empty() => {
            let i = rng.below(b.len());
            let n = (1 + rng.below(64)).min(b.len() - i);
            let copy = b[i..i + n].to_vec();
            let at = rng.below(b.len());
            b.splice(at..at, copy);
        }
        _ => b.push(b'x'),
    }
}

/// A safetensors file with one header entry changed: a hostile shape, offsets or dtype (the
/// length prefix kept consistent, so the parser reaches the entry), or bytes of the header.
fn mutate_safetensors(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    if rng.below(4) == 0 {
        let mut out = b.to_vec();
        mutate_bytes(&mut out, rng, 8 + n);
        return out;
    }
    let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let e = &mut header[&names[rng.below(names.len())]];
    match rng.below(5) {
        0 => e["shape"] = json!([rng.below(1 << 20), 1u64 << 40]),
        1 => e["data_offsets"] = json!([0, u64::MAX]),
        2 => e["data_offsets"] = json!([data.len() + 1, 8]),
        3 => e["dtype"] = json!(["F8_E4M3", "I64", "Q4", "BOOL", ""][rng.below(5)]),
        _ => mutate_json(e, rng),
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn mutate(t: &Target, seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    match t.kind {
        Kind::Bytes => {
            let mut b = seed.to_vec();
            for _ in 0..1 + rng.below(3) {
                mutate_bytes(&mut b, rng, 2048);
            }
            b
        }
        Kind::Safetensors => mutate_safetensors(seed, rng),
        Kind::Json | Kind::JsonLines if rng.below(4) == 0 => {
            let mut b = seed.to_vec();
            let n = b.len();
            mutate_bytes(&mut b, rng, n);
            b
        }
        Kind::Json => {
            let mut v: Value = serde_json::from_slice(seed).unwrap();
            mutate_json(&mut v, rng);
            serde_json::to_vec(&v).unwrap()
        }
        Kind::JsonLines => {
            let mut lines: Vec<Value> = seed.split(|&c| c == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
            let i = rng.below(lines.len());
            mutate_json(&mut lines[i], rng);
            lines.iter().map(|l| l.to_string() + "\n").collect::<String>().into_bytes()
        }
    }
}

/// Runs `t.parse` on `bytes`: Err(description) on a panic, an allocation past the limit or an
/// error message of more than one line; Ok(None) when it parsed, Ok(Some(the error)) when refused.
fn run_case(t: &Target, dir: &Path, bytes: &[u8]) -> Result<Option<String>, String> {
    std::fs::write(dir.join(t.file), bytes).unwrap();
    LARGEST.with(|l| l.set(0));
    // A panic is caught and reported with its input: keep the hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| (t.parse)(dir)));
    std::panic::set_hook(hook);
    let largest = LARGEST.with(|l| l.get());
    if largest > ALLOC_LIMIT {
        return Err(format!("allocated {largest} bytes at once"));
    }
    match r {
        Err(p) => Err(format!("panicked: {}", p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())),
        Ok(Ok(())) => Ok(None),
        Ok(Err(e)) => {
            let msg = e.to_string();
            if msg.trim().is_empty() || msg.contains('\n') {
                Err(format!("error not one line: {msg:?}"))
            } else {
                Ok(Some(msg))
            }
        }
    }
}

fn case_dir(root: &Path, t: &Target) -> PathBuf {
    let dir = root.join(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    (t.setup)(&dir);
    dir
}

#[test]
fn parsers_survive_random_mutations() {
    let cases: usize = std::env::var("PATCHBAY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let seed = test_seed();
    let root = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let t0 = Instant::now();
    for (ti, t) in targets().iter().enumerate() {
        let dir = case_dir(root.path(), t);
        let good = (t.seed)();
        assert_eq!(run_case(t, &dir, &good), Ok(None), "{}: the seed must parse (else the mutations prove nothing)", t.name);
        let mut rng = Rng::new(seed ^ (ti as u64) << 40);
        let (mut refused, mut accepted) = (0, 0);
        for i in 0..cases {
            let bytes = mutate(t, &good, &mut rng);
            match run_case(t, &dir, &bytes) {
                Ok(None) => accepted += 1,
                Ok(Some(_)) => refused += 1,
                Err(why) => {
                    let kept = std::env::temp_dir().join(format!("patchbay-fuzz-{}-{seed}-{i}", t.name));
                    std::fs::write(&kept, &bytes).unwrap();
                    failures.push(format!("{} case {i} ({}): {why}", t.name, kept.display()));
                }
            }
        }
        eprintln!("{}: {cases} mutations, {refused} refused, {accepted} accepted", t.name);
        assert!(refused > 0, "{}: no mutation was refused: the mutations do not reach the parser", t.name);
    }
    eprintln!("seed {seed}: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "seed {seed} (PATCHBAY_TEST_SEED replays it):\n{}", failures.join("\n"));
}

/// The committed corpus: tests/hostile/<target>/*, each file refused with one line.
#[test]
fn the_hostile_corpus_is_refused() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("hostile");
    let root = tempfile::tempdir().unwrap();
    let (mut n, mut failures) = (0, Vec::new());
    let targets = targets();
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let t = targets.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("tests/hostile/{name}: no such target"));
        let dir = case_dir(root.path(), t);
        for f in std::fs::read_dir(&path).unwrap() {
            let f = f.unwrap().path();
            n += 1;
            match run_case(t, &dir, &read(&f)) {
                Ok(Some(_)) => {}
                Ok(None) => failures.push(format!("{}: accepted", f.display())),
                Err(why) => failures.push(format!("{}: {why}", f.display())),
            }
        }
    }
    eprintln!("{n} hostile files");
    assert!(n >= 50, "the corpus has {n} files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs the binary with `args` (at most 60 s): (exit code, stderr); None when killed by a signal.
fn run_bin(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchbay")).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("patchbay {args:?} ran for more than 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn command_lines_survive_hostile_arguments() {
    let w = tempfile::tempdir().unwrap();
    let p = |n: &str| w.path().join(n).display().to_string();
    std::fs::write(p("ids.json"), "[[1, 5, 9, 12], [3, 4, 5, 6, 7]]").unwrap();
    let m = llama().display().to_string();
    let v = format!("{}:a", vectors_file());
    let bases: Vec<Vec<String>> = [
        vec!["inspect", "--model", &m],
        vec!["capture", "--model", &m, "--token-ids", &p("ids.json"), "--sites", "resid_post", "--positions", "-1", "--quiet", "--out", &p("c.safetensors")],
        vec!["score", "--model", &m, "--token-ids", &p("ids.json"), "--label-token-ids", "x=10,y=20", "--quiet", "--out", &p("score")],
        vec!["patch", "--model", &m, "--token-ids", &p("ids.json"), "--label-token-ids", "3,50", "--random-pairs", "2", "--sites", "resid_post", "--window", "1", "--quiet", "--out", &p("patch")],
        vec!["steer", "--mode", "labels", "--model", &m, "--token-ids", &p("ids.json"), "--label-token-ids", "3,50", "--vector", &v, "--layers", "1", "--betas=0,2", "--quiet", "--out", &p("steer")],
        vec!["generate", "--model", &m, "--token-ids", &p("ids.json"), "--max-new-tokens", "2", "--quiet", "--out", &p("gen")],
        vec!["ablate", "--model", &m, "--token-ids", &p("ids.json"), "--label-token-ids", "3,50", "--heads", "0.1", "--quiet", "--out", &p("ablate")],
        vec!["cost", "patch", "--model", &m, "--n-prompts", "4", "--prompt-len", "6", "--pairs", "2", "--window", "1", "--device", "h200", "--json"],
    ]
    .iter()
    .map(|b| b.iter().map(|s| s.to_string()).collect())
    .collect();
    const VALUES: [&str; 27] = [
        "1", "2", "1000", "0,1", "-2", "", "-1", "0", "-0", "1e309", "NaN", "inf", "18446744073709551616", "18446744073709551615", "4294967296", "-9223372036854775808", "/", "/dev/null", "../../x",
        "a,,b", "1..", "-1..-999999999", "blocks.99999999999.hook_resid_pre", "*", "\u{202e}1", " 3", "x=1,x=2",
    ];
    // Unmutated, every base command line runs (so the mutations start from valid ones).
    for b in &bases {
        let (code, err) = run_bin(b);
        assert_eq!(code, Some(0), "patchbay {b:?}: {err}");
    }
    let cases: usize = std::env::var("PATCHBAY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).map_or(48, |c: usize| c / 2);
    let seed = test_seed();
    let mut rng = Rng::new(seed ^ 0xc11);
    let mut failures = Vec::new();
    let mut codes = [0usize; 3];
    for i in 0..cases {
        let mut args = bases[i % bases.len()].clone();
        // Replace the value of a random flag (never the output path or the model: the runs stay
        // in the temporary directory) or drop or repeat an argument.
        let flags: Vec<usize> = (1..args.len()).filter(|&j| args[j].starts_with("--") && j + 1 < args.len() && !args[j + 1].starts_with("--") && !["--out", "--model"].contains(&args[j].as_str())).collect();
        match rng.below(4) {
            0 | 1 if !flags.is_empty() => {
                let j = flags[rng.below(flags.len())];
                args[j + 1] = VALUES[rng.below(VALUES.len())].to_string();
            }
            2 => {
                let j = 1 + rng.below(args.len() - 1);
                args.remove(j);
            }
            _ => {
                let j = 1 + rng.below(args.len() - 1);
                let a = args[j].clone();
                args.insert(j, a);
            }
        }
        let (code, err) = run_bin(&args);
        if let Some(c @ 0..=2) = code {
            codes[c as usize] += 1;
        }
        let ok = match code {
            Some(0) | Some(2) => true,
            Some(1) => err.lines().filter(|l| l.starts_with("error")).count() == 1 && err.trim_end().lines().last().is_some_and(|l| l.starts_with("error: ")),
            _ => false,
        };
        if !ok {
            failures.push(format!("patchbay {args:?}: exit {code:?}: {err}"));
        }
    }
    eprintln!("{cases} command lines: {} ran, {} refused (exit 1), {} usage errors (exit 2)", codes[0], codes[1], codes[2]);
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
    // Few mutated lines stay valid (most values in VALUES are bad for most flags): how many
    // varies with the seed; refusals (exit 1) are always many.
    assert!(codes[1] > 0, "the mutations should make some command lines refused: {codes:?}");
}
