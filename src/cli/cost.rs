//! `patchbay cost`: FLOPs, bytes, peak memory and estimated time of a planned experiment,
//! before running it (see src/experiments/cost.rs for the model).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};

use super::patch::{ResumedArgs, SweepArgs};
use super::{print_stdout, progress_bar};
use patchbay::data::prompts::{PromptSource, load_prompts};
use patchbay::experiments::cost::{self, Check, Estimate, ModelInfo, PassSpec, PatchPlan, Workload, clean_schedule, devices, duration, estimate, measure_sweep, patch_experiments, ratio, render, workload_plan};
use patchbay::experiments::patch::{Method, Pair};
use patchbay::experiments::patch_files::read_pairs;
use patchbay::experiments::workload::{PatchWorkload, PatchWorkloadSpec};
use patchbay::model::Model;
use patchbay::model::checkpoint::Checkpoint;
use patchbay::model::config::{DType, ModelConfig};
use patchbay::model::synth::{PRESETS, preset};
use patchbay::sites::{Positions, Site};
use patchbay::{Error, Result};

const COST_HELP: &str = "Examples:
  patchbay cost patch --like llama-3.2-1b --n-prompts 100 --prompt-len 48 --pairs 200 --sites attn_out,mlp_out,resid_post --window 5
  patchbay cost patch --model M --token-ids ids.json --random-pairs 200 --window 5 --device h100 --json
  patchbay cost capture --like llama-3.1-8b --n-prompts 10000 --prompt-len 64 --sites resid_post --positions -1
  patchbay cost probe --model M --n-prompts 5000 --prompt-len 120 --sites attn_out,mlp_out,resid_post --positions -1..-5
  patchbay cost forward --like gemma-2-2b --n-prompts 1000 --prompt-len 256 --device a100,h200
  patchbay cost patch --model /tmp/small --n-prompts 20 --prompt-len 48 --pairs 10 --measure --naive-limit 36

What is counted: the forward calls each workload makes (patch: the calls `patch` itself plans: clean
runs of the sources and targets, targets grouped under --mem-budget, segments batched up to
--batch-rows rows; naive: a full forward per experiment), and per call the GEMM FLOPs (2*m*n*k for
q/k/v/o and gate/up/down, lm_head rows read), attention FLOPs (QK^T and PV over the visible keys,
sliding windows included), bytes (weights, KV cache, activations, captures) on the CPU path (weights
in their stored dtype, f32 math and KV) and the GPU path (bf16 weights, operands and KV), and peak
memory (weights, kept clean runs and KV caches, the call's buffers, captures held).

Time: per op max(FLOPs / throughput, bytes / bandwidth) on GPUs (the roofline), their sum on the CPU
(its GEMM converts a weight tile, then multiplies it), plus a fixed cost per dispatched op; the
dominant term is the largest of compute, memory and overhead. Devices: a100 (312 TFLOP/s dense
bf16, 2.0 TB/s, 80 GB), h100 SXM (989 TFLOP/s, 3.35 TB/s, 80 GB), h200 (989 TFLOP/s, 4.8 TB/s,
141 GB), from NVIDIA's datasheets, with 4 us per kernel launch assumed; GPU figures are peaks, so
GPU estimates are lower bounds. cpu: measured on this machine in about half a second with the
engine's own GEMM (at 1 to 256 rows) and attention at the model's shapes, a copy for bandwidth, and
the fork-join cost of a parallel op, once per process.
With --measure (patch, cpu) the planned sweep is run on the model (random prompts, every window, last
token, as `bench patch`) and each method's measured time is printed beside its estimate, made from
calibrations taken just before and just after that method runs.

Only config.json (or a GGUF file's header) is read (--model) or a synth preset used (--like): no
weights are loaded, except with --measure.

JSON (--json): one object: command, model {name, n_layers, d_model, d_mlp, vocab_size, params,
weight_dtype}, workload {...}, devices [{name, path (cpu|gpu), gemm_flops, gemm_curve [[rows,
FLOP/s]] (cpu), overlap (false on the cpu: terms add), attention_flops, weight_bandwidth, bandwidth,
op_overhead_s, seq_overhead_s, memory_bytes, source}], methods [{method, items (experiments or
prompts), phases
[{name, calls, row_layers, flops {gemm, attention, lm_head, total}, bytes {cpu, gpu: {weights, kv,
activations, captures, total}}, time [{device, seconds, compute_s, memory_s, overhead_s,
dominant}]}], total {same fields}, peak_memory {cpu, gpu: {weights, kv_caches, activations,
captures, total}}}], naive_over_resumed {flops, bytes_cpu, bytes_gpu, time [[device, x]]} or null,
measured [{method, experiments, estimate_before_s, estimate_after_s, estimate_s, measured_s,
ratio, cpu_wait, calibration_cpu_wait}] (with --measure: estimates from calibrations just before and
after the run and their mean; ratio = measured / estimate; cpu_wait = share of the threads' runnable
time spent waiting for a CPU taken by other processes, from Linux schedstat: on a shared machine
both calibration and run stretch, not always alike). Units: FLOPs, bytes, seconds.";

#[derive(Args)]
#[command(after_help = COST_HELP)]
pub struct CostArgs {
    #[command(subcommand)]
    what: CostWhat,
}

#[derive(Subcommand)]
enum CostWhat {
    /// A patching sweep (the flags of `patch`): the resumed and the naive method.
    #[command(after_help = COST_HELP)]
    Patch(PatchCostArgs),
    /// The probe pipeline's capture: sites at positions, full-vocabulary logits at the last token.
    #[command(after_help = COST_HELP)]
    Probe(ProbeCostArgs),
    /// `capture`: sites at positions (and logits with --logits).
    #[command(after_help = COST_HELP)]
    Capture(CaptureCostArgs),
    /// A plain forward of every prompt, full-vocabulary logits at the last token.
    #[command(after_help = COST_HELP)]
    Forward(ForwardCostArgs),
}

/// The model and prompts every workload takes.
#[derive(Args)]
struct CommonArgs {
    /// Hugging Face model directory (only config.json is read), or a GGUF file (only its header).
    #[arg(long, required_unless_present = "like", conflicts_with = "like")]
    model: Option<PathBuf>,
    /// A preset instead of a directory (as `synth --like`): llama-3.2-1b, llama-3.1-8b, gemma-2-2b,
    /// qwen2.5-7b, phi-3.5-mini, olmo-2-7b, mistral-7b-v0.3.
    #[arg(long)]
    like: Option<String>,
    /// Override the number of layers (as `synth --layers`).
    #[arg(long)]
    n_layers: Option<usize>,
    /// Number of prompts (of --prompt-len tokens each).
    #[arg(long, default_value_t = 100)]
    n_prompts: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 48)]
    prompt_len: usize,
    /// JSON file, a list of lists of token ids: the real prompts' lengths (replaces --n-prompts
    /// and --prompt-len).
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// Devices: all, or a comma list of cpu, a100, h100, h200.
    #[arg(long, default_value = "all")]
    device: String,
    /// Print one JSON object (fields below).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum MethodArg {
    Both,
    Resumed,
    Naive,
}

#[derive(Args)]
struct PatchCostArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    sweep: SweepArgs,
    /// N random pairs, or a JSONL file of {"source": i, "target": j} (as `patch --pairs`).
    #[arg(long, conflicts_with = "random_pairs")]
    pairs: Option<String>,
    /// N random (source, target) pairs with source != target [default: 200].
    #[arg(long)]
    random_pairs: Option<usize>,
    /// Seed of the random pairs (drawn as `bench patch` draws them).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Labels read at the last token: a count (13) or a list (anger,joy,...); only the number matters.
    #[arg(long, value_delimiter = ',', default_value = "13")]
    labels: Vec<String>,
    /// Methods estimated.
    #[arg(long, value_enum, default_value_t = MethodArg::Both)]
    method: MethodArg,
    #[command(flatten)]
    memory: ResumedArgs,
    /// Run the sweep on the CPU (needs --model with weights) and print measured beside estimated time.
    #[arg(long)]
    measure: bool,
    /// With --measure: time the naive method on only the first K experiments (it is slow).
    #[arg(long, requires = "measure")]
    naive_limit: Option<usize>,
    /// No progress bar (with --measure).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ProbeCostArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Sites: short names (all layers), TransformerLens names or globs.
    #[arg(long, default_value = "resid_post")]
    sites: String,
    /// Positions captured, e.g. -1..-5.
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    positions: String,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Cap on the size of one capture shard, in MiB.
    #[arg(long, default_value_t = 256.0)]
    shard_mb: f64,
    /// No scoring (no logits).
    #[arg(long)]
    no_score: bool,
}

#[derive(Args)]
struct CaptureCostArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Sites (as `capture --sites`).
    #[arg(long)]
    sites: String,
    /// `all`, or positions such as -1,-2.
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    positions: String,
    /// Also the full-vocabulary logits at the same positions.
    #[arg(long)]
    logits: bool,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

#[derive(Args)]
struct ForwardCostArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

pub fn run(a: CostArgs) -> Result<()> {
    match a.what {
        CostWhat::Patch(a) => patch(a),
        CostWhat::Probe(a) => {
            let positions = fixed_positions(&a.positions, "probe")?;
            let spec = |cfg: &ModelConfig| -> Result<PassSpec> {
                Ok(PassSpec {
                    sites: Site::parse_spec(&a.sites, cfg)?,
                    positions: positions.clone(),
                    logits: (!a.no_score).then(|| (Positions::List(vec![-1]), cfg.vocab_size)),
                    batch_size: a.batch_size,
                    hold_bytes: Some((a.shard_mb * 1048576.0) as usize),
                })
            };
            passes(&a.common, "probe", json!({"sites": a.sites, "positions": a.positions, "batch_size": a.batch_size, "shard_mb": a.shard_mb, "score": !a.no_score}), spec)
        }
        CostWhat::Capture(a) => {
            let positions = Positions::parse(&a.positions)?;
            let spec = |cfg: &ModelConfig| -> Result<PassSpec> {
                Ok(PassSpec { sites: Site::parse_spec(&a.sites, cfg)?, positions: positions.clone(), logits: a.logits.then(|| (positions.clone(), cfg.vocab_size)), batch_size: a.batch_size, hold_bytes: None })
            };
            passes(&a.common, "capture", json!({"sites": a.sites, "positions": a.positions, "logits": a.logits, "batch_size": a.batch_size}), spec)
        }
        CostWhat::Forward(a) => {
            let spec = |cfg: &ModelConfig| -> Result<PassSpec> {
                Ok(PassSpec { sites: Vec::new(), positions: Positions::List(Vec::new()), logits: Some((Positions::List(vec![-1]), cfg.vocab_size)), batch_size: a.batch_size, hold_bytes: None })
            };
            passes(&a.common, "forward", json!({"batch_size": a.batch_size}), spec)
        }
    }
}

/// A position list (probes and patches need fixed positions).
fn fixed_positions(spec: &str, what: &str) -> Result<Positions> {
    match Positions::parse(spec)? {
        Positions::All => Err(Error::input(format!("--positions all is not supported for {what}: give a list such as -1"))),
        p => Ok(p),
    }
}

/// The model's config (from DIR/config.json, a GGUF header or a preset, --n-layers applied), its name, and the
/// dtype its weights are read in on the CPU path: the checkpoint's own where there is one, else
/// config.json's, else bf16 (what `synth` writes).
fn load_config(c: &CommonArgs) -> Result<(ModelConfig, String, DType)> {
    let gguf = c.model.as_deref().map(patchbay::model::gguf::find).transpose()?.flatten().map(|p| patchbay::model::gguf::GgufFile::open(&p)).transpose()?;
    let (mut value, path, name): (Value, PathBuf, String) = match (&c.model, &c.like) {
        (Some(_), _) if let Some(file) = &gguf => (file.config_json()?, file.path.clone(), file.path.display().to_string()),
        (Some(dir), _) => {
            let path = dir.join("config.json");
            let bytes = patchbay::error::read_file(&path)?;
            (serde_json::from_slice(&bytes).map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?, path, dir.display().to_string())
        }
        (None, Some(like)) => (preset(like)?, PathBuf::from(format!("preset {like}")), like.clone()),
        (None, None) => return Err(Error::input(format!("give --model DIR or --like PRESET (one of {})", PRESETS.join(", ")))),
    };
    if let Some(n) = c.n_layers {
        let obj = value.as_object_mut().ok_or_else(|| Error::file(&path, "config must be a JSON object"))?;
        obj.insert("num_hidden_layers".into(), n.into());
        obj.remove("layer_types");
    }
    let cfg = ModelConfig::from_json(&value, &path)?;
    let stored = match &gguf {
        Some(file) => file.loaded_dtype("token_embd.weight"),
        None => c.model.as_ref().and_then(|dir| Checkpoint::open(dir).ok()).and_then(|ck| ck.get("model.embed_tokens.weight", &[cfg.vocab_size, cfg.d_model]).ok()).map(|w| w.dtype),
    };
    let dtype = match &c.model {
        Some(_) => stored.or(cfg.declared_dtype).unwrap_or(DType::BF16),
        None => DType::BF16,
    };
    Ok((cfg, name, dtype))
}

/// The largest --n-prompts and number of pairs a plan takes (its prompt lengths and pairs are
/// held in memory).
const MAX_PLANNED: usize = 10_000_000;

/// Prompt lengths: from --token-ids, or --n-prompts of --prompt-len; each within the model's
/// context (max_position_embeddings), checked before anything of that size is drawn.
fn prompt_lens(c: &CommonArgs, cfg: &ModelConfig) -> Result<Vec<usize>> {
    let lens = match &c.token_ids {
        Some(path) => load_prompts(PromptSource::TokenIds(path), Path::new(""), false)?.iter().map(Vec::len).collect(),
        None if c.n_prompts == 0 || c.prompt_len == 0 => return Err(Error::input("--n-prompts and --prompt-len must be at least 1")),
        // One length per prompt is held: bounded before it is allocated.
        None if c.n_prompts > MAX_PLANNED => return Err(Error::input(format!("--n-prompts {}: at most {MAX_PLANNED} prompts can be planned", c.n_prompts))),
        None => vec![c.prompt_len; c.n_prompts],
    };
    if let Some((i, len)) = lens.iter().enumerate().find(|(_, l)| **l > cfg.max_position) {
        return Err(Error::input(format!("prompt {i} has {len} tokens, past the model's context of {} tokens (max_position_embeddings)", cfg.max_position)));
    }
    Ok(lens)
}

fn model_info(cfg: &ModelConfig, name: String, dtype: DType) -> ModelInfo {
    let (matrices, vectors) = cfg.n_params();
    ModelInfo { name, n_layers: cfg.n_layers, d_model: cfg.d_model, d_mlp: cfg.d_mlp, vocab_size: cfg.vocab_size, params: matrices + vectors, weight_dtype: dtype.name().into() }
}

fn lens_json(lens: &[usize]) -> Value {
    json!({"n_prompts": lens.len(), "min_len": lens.iter().min(), "max_len": lens.iter().max(), "total_tokens": lens.iter().sum::<usize>()})
}

/// The whole output: the estimate and, with --measure, the checks.
#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    estimate: &'a Estimate,
    measured: &'a [Check],
}

fn print(e: &Estimate, measured: &[Check], as_json: bool) -> Result<()> {
    if as_json {
        let text = serde_json::to_string(&Output { estimate: e, measured }).map_err(|err| Error::input(err.to_string()))?;
        print_stdout(&format!("{text}\n"));
        return Ok(());
    }
    let mut s = render(e);
    if !measured.is_empty() {
        s.push_str("\nmeasured on this CPU:\n");
        for c in measured {
            s.push_str(&format!(
                "  {:<8} {:>6} experiments: estimate {:>10} (calibrated before {}, after {}), measured {:>10}, measured/estimate {:.2}{}\n",
                c.method,
                c.experiments,
                duration(c.estimate_s),
                duration(c.estimate_before_s),
                duration(c.estimate_after_s),
                duration(c.measured_s),
                c.ratio,
                match (c.cpu_wait, c.calibration_cpu_wait) {
                    (Some(w), Some(cw)) => format!("; threads waited for a CPU {:.0}% of the run, {:.0}% of the calibrations", w * 100.0, cw * 100.0),
                    _ => String::new(),
                }
            ));
        }
    }
    print_stdout(&s);
    Ok(())
}

fn passes(c: &CommonArgs, command: &str, workload: Value, spec: impl Fn(&ModelConfig) -> Result<PassSpec>) -> Result<()> {
    let (cfg, name, dtype) = load_config(c)?;
    let lens = prompt_lens(c, &cfg)?;
    let spec = spec(&cfg)?;
    let devs = devices(&c.device, &cfg, dtype)?;
    let methods = estimate(&cfg, dtype, &lens, &Workload::Passes(spec), &devs)?;
    let mut workload = workload;
    workload["prompts"] = lens_json(&lens);
    let e = Estimate { command: command.into(), model: model_info(&cfg, name, dtype), workload, devices: devs, methods, naive_over_resumed: None };
    print(&e, &[], c.json)
}

/// The number of labels: a count, or the length of a list.
fn n_labels(list: &[String]) -> Result<usize> {
    let count = match list {
        [one] => one.trim().parse().ok(),
        _ => None,
    };
    let n = count.unwrap_or_else(|| list.iter().filter(|s| !s.trim().is_empty()).count());
    if n == 0 {
        return Err(Error::input("--labels: give a count (13) or a list of labels"));
    }
    Ok(n)
}

fn patch(a: PatchCostArgs) -> Result<()> {
    let (cfg, name, dtype) = load_config(&a.common)?;
    let lens = prompt_lens(&a.common, &cfg)?;
    // Label tokens are drawn with the workload below (as `bench patch` draws them).
    let sweep = a.sweep.spec(cfg.n_layers, Vec::new())?;
    let n_labels = n_labels(&a.labels)?;
    // Random pairs and label tokens as `bench patch` draws them (what --measure runs).
    let (pairs_n, pairs_file) = match (&a.pairs, a.random_pairs) {
        (Some(p), _) => match p.trim().parse::<usize>() {
            Ok(n) => (n, None),
            Err(_) => (0, Some(PathBuf::from(p))),
        },
        (None, n) => (n.unwrap_or(200), None),
    };
    // The pairs are drawn into memory: bounded before they are.
    if pairs_n > MAX_PLANNED {
        return Err(Error::input(format!("{pairs_n} pairs: at most {MAX_PLANNED} pairs can be planned")));
    }
    let (mem_budget, overflow) = a.memory.memory()?;
    let work = PatchWorkloadSpec {
        n_prompts: lens.len(),
        prompt_len: lens[0],
        n_pairs: pairs_n,
        sweep,
        n_labels,
        seed: a.seed,
        naive_limit: a.naive_limit,
        batch_rows: a.memory.batch_rows,
        mem_budget,
        overflow,
    };
    if work.sweep.window == 0 || work.sweep.window > cfg.n_layers {
        return Err(Error::input(format!("window {} must be in 1..={}", work.sweep.window, cfg.n_layers)));
    }
    if lens.len() < 2 {
        return Err(Error::input("patching needs at least 2 prompts"));
    }
    if n_labels > cfg.vocab_size {
        return Err(Error::input(format!("{n_labels} labels: the vocabulary has {} tokens", cfg.vocab_size)));
    }
    let drawn = PatchWorkload::new(&work, &cfg)?;
    let pairs: Vec<Pair> = match &pairs_file {
        Some(path) => read_pairs(path, lens.len())?,
        None => workload_plan(&drawn, &work).pairs,
    };
    let plan = PatchPlan { pairs, sweep: drawn.sweep.clone(), batch_rows: a.memory.batch_rows, mem_budget: work.mem_budget, overflow: work.overflow };
    let workload = json!({
        "prompts": lens_json(&lens), "pairs": plan.pairs.len(), "sites": a.sweep.sites_text(), "units": plan.sweep.units, "window": plan.sweep.window,
        "centers": plan.sweep.centers, "positions": plan.sweep.positions, "labels": n_labels, "batch_rows": a.memory.batch_rows, "mem_budget_bytes": plan.mem_budget, "overflow": plan.overflow.name(),
    });
    let devs = devices(&a.common.device, &cfg, dtype)?;
    let (resumed, naive) = (a.method != MethodArg::Naive, a.method != MethodArg::Resumed);
    let methods = estimate(&cfg, dtype, &lens, &Workload::Patch { plan: plan.clone(), resumed, naive }, &devs)?;
    let naive_over_resumed = match (methods.first(), methods.get(1)) {
        (Some(r), Some(n)) => Some(ratio(r, n)),
        _ => None,
    };
    let mut workload = workload;
    workload["experiments"] = json!(methods.first().map_or(0, |m| m.items));
    if resumed {
        let exps = patch_experiments(&cfg, &plan)?;
        workload["clean_runs"] = json!({"cpu": clean_schedule(&cfg, cost::Path::Cpu, &lens, &plan, &exps).summary(), "gpu": clean_schedule(&cfg, cost::Path::Gpu, &lens, &plan, &exps).summary()});
    }
    let e = Estimate { command: "patch".into(), model: model_info(&cfg, name, dtype), workload, devices: devs, methods, naive_over_resumed };
    let measured = if a.measure { measure(&a, &cfg, dtype, &work, &drawn)? } else { Vec::new() };
    print(&e, &measured, a.common.json)
}

/// Runs the planned sweep on the CPU (the `bench patch` workload: random prompts, every window,
/// last token) and checks each method's time against its estimate.
fn measure(a: &PatchCostArgs, cfg: &ModelConfig, dtype: DType, work: &PatchWorkloadSpec, drawn: &PatchWorkload) -> Result<Vec<Check>> {
    let dir = a.common.model.as_ref().ok_or_else(|| Error::input("--measure runs the sweep: give --model DIR with weights (e.g. from `patchbay synth`)"))?;
    if a.common.token_ids.is_some() || a.sweep.layers.is_some() || a.sweep.heads.is_some() || a.sweep.neurons.is_some() || a.sweep.positions.trim() != "-1" || a.pairs.as_deref().is_some_and(|p| p.parse::<usize>().is_err()) {
        return Err(Error::input("--measure runs the `bench patch` sweep (random prompts of --prompt-len, random pairs, every window, last token): drop --token-ids, a pairs file, --layers, --positions, --heads and --neurons"));
    }
    let model = Model::load(dir)?;
    if model.cfg.n_layers != cfg.n_layers {
        return Err(Error::input(format!("--measure: --n-layers {} differs from the checkpoint's {} layers", cfg.n_layers, model.cfg.n_layers)));
    }
    let n = drawn.exps.len();
    let n_naive = a.naive_limit.unwrap_or(n).min(n);
    let bar = progress_bar((n + n_naive) as u64, "measure", "experiments", a.quiet || a.common.json);
    let mut checks = Vec::new();
    for (method, limit) in [(Method::Resumed, n), (Method::Naive, n_naive)] {
        if limit > 0 {
            checks.push(measure_sweep(&model, dtype, drawn, work, method, limit, &bar)?);
        }
    }
    bar.finish_and_clear();
    Ok(checks)
}
