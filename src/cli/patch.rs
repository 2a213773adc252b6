//! `patchbay patch`: activation-patching sweeps (the Tak et al. protocol and general sweeps).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::{parse_bytes, progress_bar};
use patchbay::backend::DeviceSpec;
use patchbay::data::labels::{LabelSet, parse_list};
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::experiments::patch::{ExperimentResult, Method, Pair, RunSettings, SweepSpec, all_centers, experiments, run_sweep, summarize, summary_csv};
use patchbay::intervene::splitmix64;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, SiteKind};
use patchbay::{Error, Result};

const PATCH_HELP: &str = "Examples:
  patchbay patch --model M --token-ids ids.json --labels anger,joy,fear,sadness --random-pairs 200 --seed 0 \\
      --sites attn_out,mlp_out,resid_post --window 5 --positions -1 --out runs/patch
  patchbay patch --model M --token-ids ids.json --label-token-ids 11,42,97 --pairs pairs.jsonl --sites z --heads 3 --window 1 --out runs/z3

Every (pair, site, window centre) is one experiment: the site is patched at the window's layers, at
--positions of the target, with the source prompt's clean activations at the same relative positions;
the label logits are read at the target's last token. `--method resumed` (default) runs one clean pass
per prompt and resumes each experiment from its first patched layer and position; `--method naive`
runs one full forward per experiment (the oracle; same numbers).

Output in --out: experiments.jsonl (one object per experiment, appended as they complete), summary.csv
(site x centre: n, flip rate with Wilson 95% interval, mean logit difference with 95% interval) and
manifest.json. A killed run continues with --resume: finished experiments are kept, the rest are run.";

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Resumed,
    Naive,
}

#[derive(Args)]
#[command(after_help = PATCH_HELP)]
pub struct PatchArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Compute device; patching runs on the CPU path only so far.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// JSON file: a list of lists of token ids (prompt i = the i-th list).
    #[arg(long)]
    token_ids: PathBuf,
    /// Labels, each scored by the first token of " label" (needs tokenizer.json).
    #[arg(long, required_unless_present = "label_token_ids")]
    labels: Option<String>,
    /// Label token ids: `11,42` or `anger=11,joy=42`.
    #[arg(long, conflicts_with = "labels")]
    label_token_ids: Option<String>,
    /// JSONL file of {"source": i, "target": j}.
    #[arg(long, required_unless_present = "random_pairs", conflicts_with = "random_pairs")]
    pairs: Option<PathBuf>,
    /// N random (source, target) pairs with source != target.
    #[arg(long)]
    random_pairs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Site kinds patched (short names: resid_pre, attn_out, mlp_out, resid_post, z, mlp_post, ...).
    #[arg(long, default_value = "attn_out,mlp_out,resid_post")]
    sites: String,
    /// Heads patched at head sites (z, q, ...), comma-separated; default all.
    #[arg(long, conflicts_with = "neurons")]
    heads: Option<String>,
    /// Neurons patched at mlp_post, comma-separated; default all.
    #[arg(long)]
    neurons: Option<String>,
    /// Layers patched at once: a window centred on each centre layer.
    #[arg(long, default_value_t = 5)]
    window: usize,
    /// Centre layers, e.g. 2,3,4; default every centre where the window fits.
    #[arg(long)]
    layers: Option<String>,
    /// Positions patched (relative -1 = last token, or absolute).
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    positions: String,
    #[arg(long, value_enum, default_value_t = MethodArg::Resumed)]
    method: MethodArg,
    /// Rows per batched resumed forward.
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// Memory for clean KV caches, e.g. 2G.
    #[arg(long, default_value = "2G")]
    mem_budget: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue a killed run in --out.
    #[arg(long)]
    resume: bool,
    /// Stop after N experiments of this run (for testing --resume).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    #[arg(long)]
    quiet: bool,
}

fn usize_list(spec: &str, what: &str) -> Result<Vec<usize>> {
    spec.split(',').map(|s| s.trim().parse().map_err(|_| Error::input(format!("{what} `{s}` is not a non-negative integer")))).collect()
}

fn read_pairs(path: &Path, n_prompts: usize) -> Result<Vec<Pair>> {
    let text = String::from_utf8(patchbay::error::read_file(path)?).map_err(|_| Error::file(path, "not UTF-8"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: Pair = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: expected {{\"source\": i, \"target\": j}}: {e}", i + 1)))?;
        if p.source >= n_prompts || p.target >= n_prompts {
            return Err(Error::file(path, format!("line {}: prompt index out of range ({n_prompts} prompts)", i + 1)));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no pairs"));
    }
    Ok(out)
}

/// Results already in experiments.jsonl (a torn last line is cut off).
fn read_done(path: &Path) -> Result<Vec<ExperimentResult>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = patchbay::error::read_file(path)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(complete as u64).map_err(|e| Error::io(path, e))?;
    }
    let text = String::from_utf8_lossy(&bytes[..complete]);
    text.lines().enumerate().map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))).collect()
}

pub fn run(a: PatchArgs) -> Result<()> {
    if a.device != DeviceSpec::Cpu {
        return Err(Error::input(format!("patch: resumed patching runs on the CPU path only so far (got --device {})", a.device)));
    }
    let t0 = Instant::now();
    let model = Model::load(&a.model)?;
    let cfg = &model.cfg;
    let prompts = load_prompts(PromptSource::TokenIds(&a.token_ids), &a.model, false)?;
    let labels = match (&a.labels, &a.label_token_ids) {
        (_, Some(spec)) => LabelSet::parse_ids(spec, PromptTokenizer::load(&a.model).ok().as_ref())?,
        (Some(l), None) => LabelSet::resolve(&parse_list(l, "label")?, &PromptTokenizer::load(&a.model)?)?,
        (None, None) => return Err(Error::input("give --labels or --label-token-ids")),
    };
    labels.check_vocab(cfg.vocab_size)?;
    let pairs = match (&a.pairs, a.random_pairs) {
        (Some(p), _) => read_pairs(p, prompts.len())?,
        (None, Some(n)) => {
            if prompts.len() < 2 {
                return Err(Error::input("--random-pairs needs at least 2 prompts"));
            }
            let mut state = a.seed;
            let mut next = |m: usize| {
                state = splitmix64(state);
                (state % m as u64) as usize
            };
            (0..n)
                .map(|_| {
                    let source = next(prompts.len());
                    Pair { source, target: (source + 1 + next(prompts.len() - 1)) % prompts.len() }
                })
                .collect()
        }
        (None, None) => return Err(Error::input("give --pairs FILE or --random-pairs N")),
    };
    let sites = a.sites.split(',').map(|s| SiteKind::from_short_name(s.trim()).ok_or_else(|| Error::input(format!("unknown site kind `{s}`")))).collect::<Result<Vec<_>>>()?;
    let units = match (&a.heads, &a.neurons) {
        (Some(h), _) => Some(usize_list(h, "head")?),
        (_, Some(n)) => Some(usize_list(n, "neuron")?),
        _ => None,
    };
    let positions = match Positions::parse(&a.positions)? {
        Positions::List(l) => l,
        Positions::All => return Err(Error::input("--positions all is not supported for patching: give a list such as -1")),
    };
    let centers = match &a.layers {
        Some(l) => usize_list(l, "layer")?,
        None => all_centers(a.window, cfg.n_layers),
    };
    let spec = SweepSpec { sites, units, window: a.window, centers, positions, label_tokens: labels.token_ids.clone() };
    let exps = experiments(&pairs, &spec, cfg.n_layers)?;

    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let jsonl = a.out.join("experiments.jsonl");
    let sweep_id = json!({"model_config_sha256": model.config_hash, "prompts": prompts, "pairs": pairs, "sites": a.sites, "units": spec.units, "window": a.window, "centers": spec.centers, "positions": spec.positions, "labels": labels.token_ids});
    let manifest_path = a.out.join("manifest.json");
    if jsonl.exists() {
        if !a.resume {
            return Err(Error::input(format!("{} exists: add --resume to continue it, or choose another --out", jsonl.display())));
        }
        let old: serde_json::Value = serde_json::from_slice(&patchbay::error::read_file(&manifest_path)?).map_err(|e| Error::file(&manifest_path, e.to_string()))?;
        if old.get("sweep") != Some(&sweep_id) {
            return Err(Error::input(format!("{} holds a different sweep (model, prompts, pairs or settings differ): choose another --out", a.out.display())));
        }
    }
    let manifest = |done: usize, seconds: f64| {
        json!({
            "patchbay_version": env!("CARGO_PKG_VERSION"),
            "command_line": std::env::args().collect::<Vec<_>>(),
            "model": model.dir.display().to_string(),
            "device": "cpu",
            "method": match a.method { MethodArg::Resumed => "resumed", MethodArg::Naive => "naive" },
            "seed": a.seed,
            "labels": labels.names,
            "experiments": exps.len(),
            "done": done,
            "seconds": seconds,
            "sweep": sweep_id,
        })
    };
    let write_manifest = |done: usize| patchbay::io::write_atomic(&manifest_path, serde_json::to_string_pretty(&manifest(done, t0.elapsed().as_secs_f64())).unwrap_or_default().as_bytes());
    let done = read_done(&jsonl)?;
    write_manifest(done.len())?;
    let skip: HashSet<usize> = done.iter().map(|r| r.id).collect();

    let bar = progress_bar((exps.len() - skip.len()) as u64, "patch", "experiments", a.quiet);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
    let settings = RunSettings {
        method: match a.method {
            MethodArg::Resumed => Method::Resumed,
            MethodArg::Naive => Method::Naive,
        },
        skip: &skip,
        batch_rows: a.batch_rows,
        mem_budget: parse_bytes(&a.mem_budget)?,
        progress: &bar,
    };
    let mut written = 0usize;
    let outcome = run_sweep(&model, &prompts, &spec, &exps, &settings, &mut |r| {
        if a.stop_after.is_some_and(|n| written >= n) {
            return Err(Error::input("stopped (--stop-after)"));
        }
        let line = serde_json::to_string(&r).map_err(|e| Error::input(e.to_string()))? + "\n";
        file.write_all(line.as_bytes()).and_then(|_| file.flush()).map_err(|e| Error::io(&jsonl, e))?;
        written += 1;
        Ok(())
    });
    bar.finish_and_clear();
    let all = read_done(&jsonl)?;
    write_manifest(all.len())?;
    outcome?;
    patchbay::io::write_atomic(&a.out.join("summary.csv"), summary_csv(&summarize(&all)).as_bytes())?;
    if !a.quiet {
        eprintln!("{} experiments ({} this run) in {:.1} s; results in {}", all.len(), written, t0.elapsed().as_secs_f64(), a.out.display());
    }
    Ok(())
}
