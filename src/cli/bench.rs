//! `patchbay bench`: costs measured side by side in one run.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::ablate::AblateOpArgs;
use super::patch::{ResumedArgs, SweepArgs};
use super::{print_stdout, progress_bar};
use patchbay::backend::ops::sample::SampleParams;
use patchbay::experiments::ablate::AblateOp;
use patchbay::experiments::bench::{AblateBenchSpec, BenchShape, bench_ablate, bench_capture, bench_forward, bench_generate, bench_patch, Utilization};
use patchbay::experiments::generate::StepIntervention;
use patchbay::experiments::workload::PatchWorkloadSpec;
use patchbay::intervene::{Capture, Op};
use patchbay::rng::gaussian;
use patchbay::model::Model;
use patchbay::sites::{Positions, Site, SiteKind, TokenScope};
use patchbay::{Error, Result};

#[derive(Args)]
#[command(after_help = "forward, capture and generate run their variants interleaved in one process (a warm-up each,
then --reps rounds) and report medians, their ratio, and the device; patch runs the resumed sweep,
then the naive method on the same experiments. --json prints one JSON object for tracking.")]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Forward throughput: prefill (whole prompts) and decode (one token per step after the KV cache).
    #[command(after_help = "Examples:
  patchbay synth --like llama-3.2-1b --layers 16 --out /tmp/l1b
  patchbay bench forward --model /tmp/l1b --batch 4 --prompt-len 64 --decode-steps 16
  patchbay bench forward --model /tmp/l1b --device cuda --batch 32 --prompt-len 512 --json

JSON fields: device, batch, prompt_len, decode_steps, reps, prefill_s, prefill_tokens_per_s, decode_s,
decode_tokens_per_s, ratio (prefill/decode tokens/s), prefill_utilization, peak_rss_bytes; decode
fields are null with --decode-steps 0. prefill_utilization (null on emu and cuda): precision,
peak_flops_per_s (this machine's GEMM peak at that precision, measured once per run on a
[512, 2048] x [2048, 2048] product), flops_per_s (useful FLOPs: GEMMs, attention and lm_head as
`patchbay cost` counts them), of_peak.")]
    Forward(ForwardArgs),
    /// Capture overhead: the same prefill without and with captures.
    #[command(after_help = "Examples:
  patchbay bench capture --model /tmp/l1b                              # every resid_post, every position
  patchbay bench capture --model /tmp/l1b --sites all --positions -1 --json

JSON fields: device, batch, prompt_len, reps, sites, captured_bytes, plain_s, capture_s,
plain_tokens_per_s, capture_tokens_per_s, ratio (capture_s / plain_s), peak_rss_bytes.")]
    Capture(CaptureBenchArgs),
    /// Generation without and with steering (KV cache, one batch).
    #[command(after_help = "Examples:
  patchbay bench generate --model /tmp/l1b --batch 4 --prompt-len 32 --new-tokens 16
  patchbay bench generate --model /tmp/l1b --site blocks.3.hook_resid_post --beta 16 --scope generated --json
  patchbay bench generate --model /tmp/l1b --device cuda --batch 32 --prompt-len 128 --new-tokens 64

The steering vector is a seeded random direction of norm --beta. JSON fields: device, batch, prompt_len,
new_tokens, reps, plain_s, steered_s, plain_tokens_per_s, steered_tokens_per_s, ratio (steered_s / plain_s),
tokens_changed, peak_rss_bytes.")]
    Generate(GenerateBenchArgs),
    /// A random patching sweep, resumed vs naive, on the same experiments.
    #[command(after_help = "Example (the Tak et al. protocol shape: 3 sites x every 5-layer window x 200 pairs, last token):
  patchbay synth --like llama-3.2-1b --layers 16 --out /tmp/l1b
  patchbay bench patch --model /tmp/l1b --n-prompts 100 --prompt-len 48 --pairs 200 --sites attn_out,mlp_out,resid_post --window 5 --naive-limit 60 --json

JSON fields: device, experiments, resumed_experiments, naive_experiments, resumed_s, naive_s,
resumed_per_s, naive_per_s, ratio (resumed/naive per second), max_abs_diff, forwards (full
forwards per experiment: tak = 3, naive, resumed = clean_passes_per_prompt /
experiments_per_prompt + segment), resumed_utilization and naive_utilization (as bench
forward's prefill_utilization), peak_rss_bytes.")]
    Patch(PatchBenchArgs),
    /// A head-ablation sweep (every head of every layer), resumed vs naive, on the same experiments.
    #[command(after_help = "Example (every head of a 16-layer model, Wang et al.'s per-head ablation):
  patchbay synth --like llama-3.2-1b --layers 16 --out /tmp/l1b
  patchbay bench ablate --model /tmp/l1b --n-prompts 4 --prompt-len 32 --op zero --positions all --naive-limit 16 --json

An experiment is one (head, prompt): the head's slice of the o_proj input ablated at --positions,
the label logits read at the last token. Resumed: one clean pass per chunk of prompts, every
experiment resumed from the clean run at its layer, a layer's experiments batched as segments
(--batch-rows); naive: one full forward per (head, chunk of prompts), on the first --naive-limit
heads. JSON fields: device, heads, prompts, prompt_len, op, positions, experiments,
resumed_experiments, naive_experiments, resumed_s, naive_s, resumed_per_s, naive_per_s, ratio
(resumed/naive per second), max_abs_diff, peak_rss_bytes.")]
    Ablate(AblateBenchArgs),
}

/// What every bench but `patch` takes.
#[derive(Args)]
struct CommonArgs {
    /// A Hugging Face model directory (or a `patchbay synth` checkpoint), or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    engine: super::EngineArgs,
    /// Prompts per forward.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per prompt (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Timed rounds; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seed of the random prompts (and the steering direction).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl CommonArgs {
    fn shape(&self) -> BenchShape {
        BenchShape { batch: self.batch, prompt_len: self.prompt_len, reps: self.reps, seed: self.seed }
    }
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Decode steps after the prompts (one token per prompt each); 0 times prefill only.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
}

#[derive(Args)]
struct CaptureBenchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Sites captured: short names (all layers), TransformerLens names or globs, `all`.
    #[arg(long, default_value = "resid_post")]
    sites: String,
    /// Positions captured: `all` or a list such as -1,-2.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    positions: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScopeArg {
    /// Prompt and generated tokens.
    All,
    /// Generated tokens only.
    Generated,
}

#[derive(Args)]
struct GenerateBenchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// New tokens per prompt (eos ids are ignored so both variants generate as many).
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Steered site (TransformerLens name); default: resid_post of the middle layer.
    #[arg(long)]
    site: Option<String>,
    /// Norm of the steering vector.
    #[arg(long, default_value_t = 8.0)]
    beta: f32,
    #[arg(long, value_enum, default_value = "all")]
    scope: ScopeArg,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

#[derive(Args)]
struct PatchBenchArgs {
    /// A Hugging Face model directory (or a `patchbay synth` checkpoint), or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[arg(long, default_value_t = 50)]
    n_prompts: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    #[command(flatten)]
    sweep: SweepArgs,
    #[arg(long, default_value_t = 13)]
    labels: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time the naive method on only the first K experiments (it is slow).
    #[arg(long)]
    naive_limit: Option<usize>,
    #[command(flatten)]
    memory: ResumedArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct AblateBenchArgs {
    /// A Hugging Face model directory (or a `patchbay synth` checkpoint).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[arg(long, default_value_t = 4)]
    n_prompts: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 13)]
    labels: usize,
    #[command(flatten)]
    op: AblateOpArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time the naive method on only the first K heads (it is slow).
    #[arg(long)]
    naive_limit: Option<usize>,
    /// Rows per forward (clean passes, resumed segments, naive chunks).
    #[arg(long, default_value_t = 2048)]
    batch_rows: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Forward(a) => forward(a),
        BenchWhat::Capture(a) => capture(a),
        BenchWhat::Generate(a) => generate(a),
        BenchWhat::Patch(a) => patch(a),
        BenchWhat::Ablate(a) => ablate(a),
    }
}

/// Prints `r` as one JSON object (with the bench, model and its shape added), or `text` after
/// a heading naming the model and before the peak memory.
fn report(bench: &str, path: &Path, model: &Model, json: bool, r: &impl Serialize, text: &str) -> Result<()> {
    let mut v = serde_json::to_value(r).map_err(|e| Error::input(e.to_string()))?;
    if json {
        if let Some(o) = v.as_object_mut() {
            o.insert("bench".into(), bench.into());
            o.insert("model".into(), path.display().to_string().into());
            o.insert("n_layers".into(), model.cfg.n_layers.into());
            o.insert("d_model".into(), model.cfg.d_model.into());
        }
        print_stdout(&format!("{v}\n"));
    } else {
        let peak = v["peak_rss_bytes"].as_u64().map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        print_stdout(&format!("bench {bench} on {} ({} layers, d_model {})\n{text}  peak RSS: {peak}\n", path.display(), model.cfg.n_layers, model.cfg.d_model));
    }
    Ok(())
}

/// The table of a side-by-side bench: the device, then a line per variant (name, what it ran,
/// median seconds, tokens/s), then `tail`.
fn table(device: &str, reps: usize, rows: &[(&str, &str, f64, f64)], tail: &str) -> String {
    let mut t = format!("  device {device}; medians of {reps} interleaved rounds\n");
    for (name, what, s, per_s) in rows {
        t += &format!("  {name:<9} {what:<28} {s:>9.4} s  {per_s:>10.1} tokens/s\n");
    }
    t + tail
}

/// "  prefill: 12.3 GFLOP/s useful = 25.0% of the f32 GEMM peak (49.2 GFLOP/s)", or why there is
/// no such figure.
fn utilization_line(what: &str, u: Option<&Utilization>) -> String {
    match u {
        Some(u) => format!("  {what}: {}\n", u.describe()),
        None => format!("  {what}: fraction of peak not measured (a device engine's GEMM peak is not the host's)\n"),
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    let c = &a.common;
    let model = Model::load(&c.model)?;
    let engine = c.engine.load(&model, false)?;
    let bar = progress_bar(0, "bench forward", "runs", c.quiet || c.json);
    let r = bench_forward(&*engine, &c.shape(), a.decode_steps, &bar)?;
    bar.finish_and_clear();
    let (prefill, decode) = (format!("{} x {} tokens", r.batch, r.prompt_len), format!("{} x {} steps", r.batch, r.decode_steps));
    let mut rows = vec![("prefill", prefill.as_str(), r.prefill_s, r.prefill_tokens_per_s)];
    let mut tail = match (r.decode_s, r.decode_tokens_per_s, r.ratio) {
        (Some(s), Some(per_s), Some(ratio)) => {
            rows.push(("decode", &decode, s, per_s));
            format!("  ratio prefill/decode tokens/s: {ratio:.2}x\n")
        }
        _ => "  decode: not measured (--decode-steps 0)\n".into(),
    };
    tail += &utilization_line("prefill", r.prefill_utilization.as_ref());
    report("forward", &c.model, &model, c.json, &r, &table(&r.device, r.reps, &rows, &tail))
}

fn capture(a: CaptureBenchArgs) -> Result<()> {
    let c = &a.common;
    let model = Model::load(&c.model)?;
    let positions = Positions::parse(&a.positions)?;
    let captures: Vec<Capture> = Site::parse_spec(&a.sites, &model.cfg)?.into_iter().map(|site| Capture { site, positions: positions.clone() }).collect();
    let engine = c.engine.load(&model, false)?;
    let bar = progress_bar(0, "bench capture", "runs", c.quiet || c.json);
    let r = bench_capture(&*engine, &c.shape(), &captures, &bar)?;
    bar.finish_and_clear();
    let what = format!("{} x {} tokens", r.batch, r.prompt_len);
    let tail = format!("  ratio capture/plain time: {:.3}x   ({} sites at positions {}, {:.1} MiB captured)\n", r.ratio, r.sites, a.positions, r.captured_bytes as f64 / 1048576.0);
    let text = table(&r.device, r.reps, &[("plain", &what, r.plain_s, r.plain_tokens_per_s), ("capture", &what, r.capture_s, r.capture_tokens_per_s)], &tail);
    report("capture", &c.model, &model, c.json, &r, &text)
}

fn generate(a: GenerateBenchArgs) -> Result<()> {
    let c = &a.common;
    let model = Model::load(&c.model)?;
    let cfg = &model.cfg;
    let site = match &a.site {
        Some(name) => Site::parse(name, cfg)?,
        None => Site::new(cfg.n_layers / 2, SiteKind::ResidPost),
    };
    let (n, w) = site.kind.units(cfg, 0);
    let direction: Vec<f32> = (0..n * w).map(|i| gaussian(c.seed, 0, i as u64)).collect();
    let (scope, scope_name) = match a.scope {
        ScopeArg::All => (TokenScope::all(), "all"),
        ScopeArg::Generated => (TokenScope::generated(), "generated"),
    };
    let steer = StepIntervention { site, units: None, op: Op::Add { beta: a.beta, v: direction, normalize: true }, scope };
    let sample = SampleParams { temperature: a.temperature, top_p: a.top_p, seed: c.seed };
    let engine = c.engine.load(&model, false)?;
    let bar = progress_bar(0, "bench generate", "runs", c.quiet || c.json);
    let r = bench_generate(&*engine, &c.shape(), a.new_tokens, sample, &steer, &bar)?;
    bar.finish_and_clear();
    let what = format!("{} x {} after {} tokens", r.batch, r.new_tokens, r.prompt_len);
    let (changed, total) = (r.tokens_changed, r.batch * r.new_tokens);
    let tail = format!("  ratio steered/plain time: {:.3}x   (steering {site}, norm {}, {scope_name} tokens; it changed {changed} of {total} tokens)\n", r.ratio, a.beta);
    let text = table(&r.device, r.reps, &[("plain", &what, r.plain_s, r.plain_tokens_per_s), ("steered", &what, r.steered_s, r.steered_tokens_per_s)], &tail);
    report("generate", &c.model, &model, c.json, &r, &text)
}

fn patch(a: PatchBenchArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let (mem_budget, overflow) = a.memory.memory()?;
    let spec = PatchWorkloadSpec {
        n_prompts: a.n_prompts,
        prompt_len: a.prompt_len,
        n_pairs: a.pairs,
        sweep: a.sweep.spec(model.cfg.n_layers, Vec::new())?,
        n_labels: a.labels,
        seed: a.seed,
        naive_limit: a.naive_limit,
        batch_rows: a.memory.batch_rows,
        mem_budget,
        overflow,
    };
    let bar = progress_bar(0, "bench", "experiments", a.quiet || a.json);
    let engine = a.engine.load(&model, false)?;
    let r = bench_patch(&*engine, &spec, &bar)?;
    bar.finish_and_clear();
    let text = format!(
        "  {} experiments, device {}\n{}{}{}{}",
        r.methods.experiments,
        r.device,
        r.methods.describe(),
        r.forwards.describe(),
        utilization_line("resumed", r.resumed_utilization.as_ref()),
        utilization_line("naive", r.naive_utilization.as_ref())
    );
    report("patch", &a.model, &model, a.json, &r, &text)
}

fn ablate(a: AblateBenchArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let (op, positions) = a.op.resolve()?;
    if matches!(op, AblateOp::Add { .. }) {
        return Err(Error::input("bench ablate: --op add needs a direction file (patchbay ablate --vector); bench scale, which costs the same"));
    }
    let spec = AblateBenchSpec {
        n_prompts: a.n_prompts,
        prompt_len: a.prompt_len,
        n_labels: a.labels,
        op,
        positions,
        seed: a.seed,
        naive_limit: a.naive_limit,
        batch_rows: a.batch_rows,
    };
    let bar = progress_bar(0, "bench", "experiments", a.quiet || a.json);
    let engine = a.engine.load(&model, false)?;
    let r = bench_ablate(&*engine, &spec, &bar)?;
    bar.finish_and_clear();
    let text = format!("  {} heads x {} prompts of {} tokens = {} experiments (op {}, positions {}), device {}\n{}", r.heads, r.prompts, r.prompt_len, r.methods.experiments, r.op, r.positions, r.device, r.methods.describe());
    report("ablate", &a.model, &model, a.json, &r, &text)
}
