//! Benchmarks measured side by side in one run: every figure is a ratio of two variants on the
//! same inputs, plus absolute numbers with the device named. The variants of a bench run
//! interleaved (one warm-up each, then rounds of one repetition each, the first variant of a
//! round rotating), and each figure is the median over the rounds, so drift in the machine's
//! load (other processes, clocks) hits every variant alike.
//!
//! The workloads ([`prefill`], [`decode`], and from `experiments::workload` the random prompts
//! and [`PatchWorkload`]) are shared with the criterion benches (benches/engine.rs).

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Instant;

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::ops::sample::SampleParams;
use crate::backend::{Precision, cpu};
use crate::engine::forward::RunOutput;
use crate::engine::{DecodeSeq, Engine, RunRequest};
use crate::experiments::generate::{GenerateSpec, Generation, StepIntervention, generate};
use crate::experiments::cost::{MethodCost, PassSpec, Workload, estimate, sweep_cost, workload_plan};
use crate::experiments::ablate::{AblateOp, ablations, conditions, label_runner, mean_sites, parse_heads, site_means};
use crate::experiments::patch::Method;
use crate::experiments::steer::{Readout, SteerRow, one_each};
use crate::experiments::workload::{PatchWorkload, PatchWorkloadSpec, random_labels, random_prompts};
use crate::intervene::Capture;
use crate::io::tensorfile::peak_rss_bytes;
use crate::model::checkpoint::Weight;
use crate::model::config::{DType, ModelConfig};
use crate::sites::Positions;
use crate::{Error, Result};

/// Where a bench ran: the engine's device, and for work on the host (the CPU reference, the
/// emulator) the processor and the number of threads.
pub fn device_label(engine: &dyn Engine) -> String {
    let name = engine.device_name();
    if !(name.starts_with("cpu") || name.starts_with("emu")) {
        return name;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).and_then(|l| l.split_once(':')).map_or("unknown processor", |(_, m)| m.trim());
    format!("{name} ({model}, {} threads)", rayon::current_num_threads())
}

/// The machine's own GEMM peak: FLOP/s of the CPU engine's GEMM (`backend::cpu::matmul`) at
/// each precision on one large, square-ish product (x `[512, 2048]` times bf16 W `[2048,
/// 2048]`^T, the best of 7 after a warm-up), measured once per process. What the bench's
/// useful FLOP/s are a fraction of.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct GemmPeak {
    pub f32_flops_per_s: f64,
    pub bf16_flops_per_s: f64,
}

impl GemmPeak {
    pub fn at(&self, precision: Precision) -> f64 {
        match precision {
            Precision::F32 => self.f32_flops_per_s,
            Precision::Bf16 => self.bf16_flops_per_s,
        }
    }
}

pub fn gemm_peak() -> GemmPeak {
    static PEAK: OnceLock<GemmPeak> = OnceLock::new();
    *PEAK.get_or_init(|| {
        let (m, n, k) = (512, 2048, 2048);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect(); // [m, k]
        let w_vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let w = Weight::from_f32(&w_vals, DType::BF16, vec![n, k]); // [n, k]
        let mut y = vec![0.0f32; m * n]; // [m, n]
        let flops = 2.0 * (m * n * k) as f64;
        let mut best = |p: Precision| {
            let runs: Vec<f64> = (0..8).map(|_| timed(|| Ok(cpu::matmul(&x, m, &w, &mut y, p))).unwrap_or(f64::INFINITY)).collect();
            flops / runs[1..].iter().copied().fold(f64::INFINITY, f64::min)
        };
        GemmPeak { f32_flops_per_s: best(Precision::F32), bf16_flops_per_s: best(Precision::Bf16) }
    })
}

/// Useful work per second against the machine's GEMM peak at the engine's precision.
#[derive(Clone, Debug, Serialize)]
pub struct Utilization {
    pub precision: Precision,
    /// [`gemm_peak`] at that precision.
    pub peak_flops_per_s: f64,
    /// The cost model's FLOPs of the timed work (GEMMs, attention, lm_head rows), per second.
    pub flops_per_s: f64,
    /// flops_per_s / peak_flops_per_s
    pub of_peak: f64,
}

impl Utilization {
    /// `flops` done in `seconds` on `engine`; None on a device engine (emu, cuda), whose GEMM
    /// peak is not the host's.
    pub fn new(engine: &dyn Engine, flops: f64, seconds: f64) -> Option<Utilization> {
        if !engine.device_name().starts_with("cpu") {
            return None;
        }
        let precision = engine.precision();
        let peak_flops_per_s = gemm_peak().at(precision);
        let flops_per_s = flops / seconds;
        Some(Utilization { precision, peak_flops_per_s, flops_per_s, of_peak: flops_per_s / peak_flops_per_s })
    }

    /// "12.3 GFLOP/s useful = 25.0% of the f32 GEMM peak (49.2 GFLOP/s)"
    pub fn describe(&self) -> String {
        format!("{:.1} GFLOP/s useful = {:.1}% of the {} GEMM peak ({:.1} GFLOP/s)", self.flops_per_s / 1e9, 100.0 * self.of_peak, self.precision, self.peak_flops_per_s / 1e9)
    }
}

/// The cost model's FLOPs of one prefill of `prompts` (logits at the last position).
fn prefill_flops(cfg: &ModelConfig, prompts: &[Vec<u32>]) -> Result<f64> {
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let spec = PassSpec { sites: Vec::new(), positions: Positions::All, logits: Some((Positions::List(vec![-1]), cfg.vocab_size)), batch_size: lens.len(), hold_bytes: None };
    Ok(estimate(cfg, DType::BF16, &lens, &Workload::Passes(spec), &[])?.iter().map(|m| m.total.flops.total).sum())
}

/// Runs `variants` side by side: one untimed warm-up each, then `reps` rounds of one run each
/// (round r starts at variant r mod n). Each variant returns the seconds of the work it times
/// (set-up such as copying a cache stays outside). Returns each variant's median.
pub fn side_by_side(reps: usize, variants: &mut [&mut dyn FnMut() -> Result<f64>], progress: &ProgressBar) -> Result<Vec<f64>> {
    if reps == 0 {
        return Err(Error::input("bench: --reps must be at least 1"));
    }
    let n = variants.len();
    progress.set_length(((reps + 1) * n) as u64);
    for v in variants.iter_mut() {
        v()?;
        progress.inc(1);
    }
    let mut times = vec![Vec::with_capacity(reps); n];
    for r in 0..reps {
        for k in 0..n {
            let i = (r + k) % n;
            times[i].push(variants[i]()?);
            progress.inc(1);
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

/// Seconds taken by `f`.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Prefill: one forward over whole prompts (fresh caches), logits at the last position, with
/// `captures`.
pub fn prefill(engine: &dyn Engine, prompts: &[Vec<u32>], captures: &[Capture]) -> Result<RunOutput> {
    engine.run_prompts(prompts, &RunRequest { captures, logits_at: Some(&Positions::List(vec![-1])), ..Default::default() })
}

/// Fresh decoded sequences holding `prompts` (one prefill call, no logits).
pub fn prefilled(engine: &dyn Engine, prompts: &[Vec<u32>]) -> Result<Vec<DecodeSeq>> {
    let mut seqs: Vec<DecodeSeq> = prompts.iter().map(|_| engine.start_decode()).collect::<Result<_>>()?;
    let tokens: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    engine.decode(&mut seqs.iter_mut().collect::<Vec<_>>(), &tokens, &RunRequest::default())?;
    Ok(seqs)
}

/// Decode: for each step s, one call feeding token `tokens[b][s]` after each sequence `b` (all
/// sequences batched), logits at the new position. `tokens`: [batch][steps].
pub fn decode(engine: &dyn Engine, seqs: &mut [DecodeSeq], tokens: &[Vec<u32>]) -> Result<()> {
    let steps = tokens.first().map_or(0, Vec::len);
    if tokens.len() != seqs.len() || tokens.iter().any(|t| t.len() != steps) {
        return Err(Error::input("decode: one token list of the same length per sequence"));
    }
    let last = Positions::List(vec![-1]);
    let mut seqs: Vec<&mut DecodeSeq> = seqs.iter_mut().collect();
    for s in 0..steps {
        let step: Vec<&[u32]> = tokens.iter().map(|t| &t[s..s + 1]).collect();
        engine.decode(&mut seqs, &step, &RunRequest { logits_at: Some(&last), ..Default::default() })?;
    }
    Ok(())
}

/// Shapes and repetitions shared by the forward, capture and generate benches.
#[derive(Clone, Debug)]
pub struct BenchShape {
    /// Prompts per forward.
    pub batch: usize,
    pub prompt_len: usize,
    /// Timed rounds (the median is reported).
    pub reps: usize,
    /// Seed of the random prompts.
    pub seed: u64,
}

impl BenchShape {
    fn prompts(&self, vocab: usize) -> Result<Vec<Vec<u32>>> {
        if self.batch == 0 || self.prompt_len == 0 {
            return Err(Error::input("bench: --batch and --prompt-len must be at least 1"));
        }
        Ok(random_prompts(&mut ChaCha8Rng::seed_from_u64(self.seed), self.batch, self.prompt_len, vocab))
    }
    fn tokens(&self) -> f64 {
        (self.batch * self.prompt_len) as f64
    }
}

/// `bench forward`: prefill (whole prompts) and decode (one token per sequence per step after
/// the prompts' caches) throughput.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardBench {
    pub device: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub decode_steps: usize,
    pub reps: usize,
    /// Median seconds of one prefill of batch x prompt_len tokens.
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    /// Median seconds of decode_steps steps of batch tokens after the prefilled caches (None
    /// with 0 steps).
    pub decode_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    /// prefill_tokens_per_s / decode_tokens_per_s
    pub ratio: Option<f64>,
    /// Prefill's useful FLOP/s against the GEMM peak (the CPU engine only).
    pub prefill_utilization: Option<Utilization>,
    pub peak_rss_bytes: Option<u64>,
}

/// Prefill and decode of `decode_steps` random tokens after the prefilled caches (prefilled
/// again, untimed, before each timed decode) on `engine`, side by side.
pub fn bench_forward(engine: &dyn Engine, shape: &BenchShape, decode_steps: usize, progress: &ProgressBar) -> Result<ForwardBench> {
    let cfg = engine.config();
    let prompts = shape.prompts(cfg.vocab_size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(shape.seed ^ 1);
    let tokens = random_prompts(&mut rng, shape.batch, decode_steps, cfg.vocab_size); // [batch][steps]
    let mut run_prefill = || timed(|| prefill(engine, &prompts, &[]).map(drop));
    let mut run_decode = || {
        let mut seqs = prefilled(engine, &prompts)?;
        timed(|| decode(engine, &mut seqs, &tokens))
    };
    let times = if decode_steps == 0 { side_by_side(shape.reps, &mut [&mut run_prefill], progress)? } else { side_by_side(shape.reps, &mut [&mut run_prefill, &mut run_decode], progress)? };
    let prefill_tokens_per_s = shape.tokens() / times[0];
    let decode_s = times.get(1).copied();
    let decode_tokens_per_s = decode_s.map(|s| (shape.batch * decode_steps) as f64 / s);
    Ok(ForwardBench {
        device: device_label(engine),
        batch: shape.batch,
        prompt_len: shape.prompt_len,
        decode_steps,
        reps: shape.reps,
        prefill_s: times[0],
        prefill_tokens_per_s,
        decode_s,
        decode_tokens_per_s,
        ratio: decode_tokens_per_s.map(|d| prefill_tokens_per_s / d),
        prefill_utilization: Utilization::new(engine, prefill_flops(cfg, &prompts)?, times[0]),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `bench capture`: the same prefill without and with captures.
#[derive(Clone, Debug, Serialize)]
pub struct CaptureBench {
    pub device: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub reps: usize,
    /// Sites captured.
    pub sites: usize,
    /// Bytes the captures of one forward hold (f32).
    pub captured_bytes: usize,
    pub plain_s: f64,
    pub capture_s: f64,
    pub plain_tokens_per_s: f64,
    pub capture_tokens_per_s: f64,
    /// plain_tokens_per_s / capture_tokens_per_s: the slowdown capturing costs.
    pub ratio: f64,
    pub peak_rss_bytes: Option<u64>,
}

pub fn bench_capture(engine: &dyn Engine, shape: &BenchShape, captures: &[Capture], progress: &ProgressBar) -> Result<CaptureBench> {
    if captures.is_empty() {
        return Err(Error::input("bench capture: no sites to capture"));
    }
    let prompts = shape.prompts(engine.config().vocab_size)?;
    let mut captured_bytes = 0;
    let times = side_by_side(
        shape.reps,
        &mut [&mut || timed(|| prefill(engine, &prompts, &[]).map(drop)), &mut || {
            let t0 = Instant::now();
            let out = prefill(engine, &prompts, captures)?;
            let s = t0.elapsed().as_secs_f64();
            captured_bytes = out.captured.iter().map(|c| c.data.len() * 4).sum();
            Ok(s)
        }],
        progress,
    )?;
    Ok(CaptureBench {
        device: device_label(engine),
        batch: shape.batch,
        prompt_len: shape.prompt_len,
        reps: shape.reps,
        sites: captures.len(),
        captured_bytes,
        plain_s: times[0],
        capture_s: times[1],
        plain_tokens_per_s: shape.tokens() / times[0],
        capture_tokens_per_s: shape.tokens() / times[1],
        ratio: times[1] / times[0],
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `bench generate`: generation without and with a step intervention (steering).
#[derive(Clone, Debug, Serialize)]
pub struct GenerateBench {
    pub device: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub reps: usize,
    /// Median seconds of one generation (prefill included) of batch x new_tokens tokens.
    pub plain_s: f64,
    pub steered_s: f64,
    /// Generated tokens per second of wall time (prefill included).
    pub plain_tokens_per_s: f64,
    pub steered_tokens_per_s: f64,
    /// plain_tokens_per_s / steered_tokens_per_s: the slowdown steering costs.
    pub ratio: f64,
    /// Generated tokens that steering changed (0 would mean it had no effect).
    pub tokens_changed: usize,
    pub peak_rss_bytes: Option<u64>,
}

/// Generates `new_tokens` per prompt on `engine` (eos ignored, so both variants produce the
/// same count; all prompts in one batch) without and with `steer`.
pub fn bench_generate(engine: &dyn Engine, shape: &BenchShape, new_tokens: usize, sample: SampleParams, steer: &StepIntervention, progress: &ProgressBar) -> Result<GenerateBench> {
    if new_tokens == 0 {
        return Err(Error::input("bench generate: --new-tokens must be at least 1"));
    }
    let prompts = shape.prompts(engine.config().vocab_size)?;
    let spec = GenerateSpec { max_new_tokens: new_tokens, sample, eos_ids: Vec::new(), stop: Vec::new(), batch_size: shape.batch };
    let hidden = ProgressBar::hidden();
    let run = |steps: &[StepIntervention], out: &mut Vec<Generation>| -> Result<f64> {
        let t0 = Instant::now();
        *out = generate(engine, &prompts, &spec, steps, None, &hidden, &mut |_, _| Ok(()))?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let (mut plain, mut steered) = (Vec::new(), Vec::new());
    let times = side_by_side(shape.reps, &mut [&mut || run(&[], &mut plain), &mut || run(std::slice::from_ref(steer), &mut steered)], progress)?;
    let tokens = (shape.batch * new_tokens) as f64;
    let tokens_changed = plain.iter().zip(&steered).map(|(a, b)| a.tokens.iter().zip(&b.tokens).filter(|(a, b)| a != b).count()).sum();
    Ok(GenerateBench {
        device: device_label(engine),
        batch: shape.batch,
        prompt_len: shape.prompt_len,
        new_tokens,
        reps: shape.reps,
        plain_s: times[0],
        steered_s: times[1],
        plain_tokens_per_s: tokens / times[0],
        steered_tokens_per_s: tokens / times[1],
        ratio: times[1] / times[0],
        tokens_changed,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// A sweep run by both methods: counts, seconds, throughput and agreement.
#[derive(Clone, Debug, Serialize)]
pub struct ResumedVsNaive {
    /// Experiments of the sweep, and those each method ran.
    pub experiments: usize,
    pub resumed_experiments: usize,
    pub naive_experiments: usize,
    pub resumed_s: f64,
    pub naive_s: f64,
    pub resumed_per_s: f64,
    pub naive_per_s: f64,
    /// resumed_per_s / naive_per_s
    pub ratio: f64,
    /// Largest |resumed - naive| over the label logits both methods computed.
    pub max_abs_diff: f32,
}

impl ResumedVsNaive {
    /// From each method's (experiments, seconds).
    pub fn new(experiments: usize, (resumed_experiments, resumed_s): (usize, f64), (naive_experiments, naive_s): (usize, f64), max_abs_diff: f32) -> ResumedVsNaive {
        let resumed_per_s = resumed_experiments as f64 / resumed_s;
        let naive_per_s = naive_experiments as f64 / naive_s;
        ResumedVsNaive { experiments, resumed_experiments, naive_experiments, resumed_s, naive_s, resumed_per_s, naive_per_s, ratio: resumed_per_s / naive_per_s, max_abs_diff }
    }

    /// The lines of the text report: each method's count, seconds and rate, then the ratio.
    pub fn describe(&self) -> String {
        format!(
            "  resumed: {} experiments in {:.2} s = {:.1}/s\n  naive:   {} experiments in {:.2} s = {:.2}/s\n  ratio resumed/naive: {:.1}x   (max |resumed - naive| label logit: {:.2e})\n",
            self.resumed_experiments, self.resumed_s, self.resumed_per_s, self.naive_experiments, self.naive_s, self.naive_per_s, self.ratio, self.max_abs_diff
        )
    }
}

/// Full forwards per experiment (row-layers computed / (n_layers x prompt length)), from the
/// cost model's plan of the sweep: where the resumed/naive ratio comes from.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardCounts {
    /// Tak et al.'s method: two cached forwards (source, target) and one patched forward.
    pub tak: f64,
    /// patchbay's naive method (a clean pass per prompt, one patched forward per experiment).
    pub naive: f64,
    /// The resumed method: clean_passes_per_prompt / experiments_per_prompt + segment.
    pub resumed: f64,
    pub clean_passes_per_prompt: f64,
    pub experiments_per_prompt: f64,
    /// A resumed segment's share of a full forward (its rows and layers).
    pub segment: f64,
}

impl ForwardCounts {
    /// From the costs of both methods' plans on prompts of lengths `lens`.
    fn new(cfg: &ModelConfig, lens: &[usize], resumed: &MethodCost, naive: &MethodCost) -> ForwardCounts {
        let full = (cfg.n_layers * lens.iter().sum::<usize>()) as f64 / lens.len() as f64; // row-layers of one forward
        let n = resumed.items as f64;
        let clean: f64 = resumed.phases.iter().filter(|p| p.name == "clean").map(|p| p.row_layers).sum();
        ForwardCounts {
            tak: 3.0,
            naive: naive.total.row_layers / full / naive.items as f64,
            resumed: resumed.total.row_layers / full / n,
            clean_passes_per_prompt: clean / full / lens.len() as f64,
            experiments_per_prompt: n / lens.len() as f64,
            segment: (resumed.total.row_layers - clean) / full / n,
        }
    }

    /// The text report's lines.
    pub fn describe(&self) -> String {
        format!(
            "  full forwards per experiment: Tak et al. {:.0} (2 cached + 1 patched); naive {:.2}; resumed {:.3} = {:.2} clean passes per prompt / {:.1} experiments per prompt + {:.3} segment
  forward-count bound on resumed vs Tak et al.: {:.0}x
",
            self.tak, self.naive, self.resumed, self.clean_passes_per_prompt, self.experiments_per_prompt, self.segment, self.tak / self.resumed
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PatchBench {
    pub device: String,
    #[serde(flatten)]
    pub methods: ResumedVsNaive,
    pub forwards: ForwardCounts,
    /// Each method's useful FLOP/s against the GEMM peak (the CPU engine only).
    pub resumed_utilization: Option<Utilization>,
    pub naive_utilization: Option<Utilization>,
    /// Peak resident memory of the process (bytes), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Runs the same random sweep with the resumed and the naive method on `engine` and compares.
pub fn bench_patch(engine: &dyn Engine, spec: &PatchWorkloadSpec, progress: &ProgressBar) -> Result<PatchBench> {
    let w = PatchWorkload::new(spec, engine.config())?;
    let exps = &w.exps;
    let n_naive = spec.naive_limit.unwrap_or(exps.len()).min(exps.len());
    progress.set_length((exps.len() + n_naive) as u64);
    progress.set_message("resumed");
    let (resumed_s, resumed) = w.run(engine, Method::Resumed, &HashSet::new(), spec, progress)?;
    progress.set_message("naive");
    // The naive method runs the first n_naive experiments (by id) of the same sweep.
    let skip: HashSet<usize> = exps.iter().skip(n_naive).map(|e| e.id).collect();
    let (naive_s, naive) = w.run(engine, Method::Naive, &skip, spec, progress)?;
    let mut max_abs_diff = 0.0f32;
    for n in &naive {
        if let Some(r) = resumed.iter().find(|r| r.id == n.id) {
            for (a, b) in r.patched.iter().zip(&n.patched) {
                max_abs_diff = max_abs_diff.max((a - b).abs());
            }
        }
    }
    let cfg = engine.config();
    let plan = workload_plan(&w, spec);
    let lens: Vec<usize> = w.prompts.iter().map(Vec::len).collect();
    let cost = |method, n| sweep_cost(cfg, DType::BF16, &lens, &plan, exps, method, n, &[]);
    let (resumed_cost, naive_cost) = (cost(Method::Resumed, exps.len())?, cost(Method::Naive, n_naive.max(1))?);
    Ok(PatchBench {
        device: device_label(engine),
        methods: ResumedVsNaive::new(exps.len(), (resumed.len(), resumed_s), (naive.len(), naive_s), max_abs_diff),
        forwards: ForwardCounts::new(cfg, &lens, &resumed_cost, &naive_cost),
        resumed_utilization: Utilization::new(engine, resumed_cost.total.flops.total, resumed_s),
        naive_utilization: if n_naive == 0 { None } else { Utilization::new(engine, naive_cost.total.flops.total, naive_s) },
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `bench ablate`: a head sweep (every head of every layer, one experiment per (head, prompt)).
#[derive(Clone, Debug)]
pub struct AblateBenchSpec {
    pub n_prompts: usize,
    pub prompt_len: usize,
    pub n_labels: usize,
    pub op: AblateOp,
    /// Prompt positions ablated.
    pub positions: Positions,
    pub seed: u64,
    /// Time the naive method on only the first K heads (it is slow).
    pub naive_limit: Option<usize>,
    /// Rows per forward (clean passes, resumed segments, naive chunks).
    pub batch_rows: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct AblateBench {
    pub device: String,
    pub heads: usize,
    pub prompts: usize,
    pub prompt_len: usize,
    pub op: String,
    pub positions: String,
    /// Experiments are (head, prompt) pairs; each method's seconds include its clean passes
    /// (not the dataset mean of `--op mean`).
    #[serde(flatten)]
    pub methods: ResumedVsNaive,
    pub peak_rss_bytes: Option<u64>,
}

/// The head sweep of random prompts by the resumed method (all heads), then by the naive one
/// (the first `naive_limit` heads), on `engine`, and the two compared.
pub fn bench_ablate(engine: &dyn Engine, spec: &AblateBenchSpec, progress: &ProgressBar) -> Result<AblateBench> {
    let cfg = engine.config();
    if spec.n_prompts == 0 || spec.prompt_len == 0 || spec.n_labels == 0 || spec.n_labels > cfg.vocab_size {
        return Err(Error::input("bench ablate needs at least 1 prompt, a prompt length >= 1 and 1..=vocab labels"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let prompts = random_prompts(&mut rng, spec.n_prompts, spec.prompt_len, cfg.vocab_size);
    let labels = random_labels(&mut rng, spec.n_labels, cfg.vocab_size);
    let abl = ablations(&parse_heads("all", cfg)?, cfg, None)?;
    let means = if spec.op == AblateOp::Mean { site_means(engine, &prompts, &mean_sites(&abl), spec.batch_rows)? } else { Default::default() };
    let conds = one_each(&conditions(&abl, spec.op, &means, &spec.positions, spec.seed, cfg)?);
    let n_naive = spec.naive_limit.unwrap_or(conds.len()).min(conds.len());
    progress.set_length(((conds.len() + n_naive) * prompts.len()) as u64);
    let k = labels.len();
    // Label logits [condition][prompt][label], per method.
    let run = |method: Method, conds: &[Vec<crate::intervene::spec::Condition>]| -> Result<(f64, Vec<f32>)> {
        progress.set_message(if method == Method::Resumed { "resumed" } else { "naive" });
        let f = label_runner(method);
        let mut table = vec![f32::NAN; conds.len() * prompts.len() * k];
        let s = timed(|| {
            f(engine, &prompts, Readout { label_tokens: &labels, projection: None }, conds, spec.batch_rows, progress, &mut |_, _, _| Ok(()), &mut |rows: &[SteerRow]| {
                for r in rows {
                    let at = (r.condition * prompts.len() + r.index) * k;
                    table[at..at + k].copy_from_slice(&r.label_logits);
                }
                Ok(())
            })
        })?;
        Ok((s, table))
    };
    let (resumed_s, resumed) = run(Method::Resumed, &conds)?;
    let (naive_s, naive) = run(Method::Naive, &conds[..n_naive])?;
    let max_abs_diff = naive.iter().zip(&resumed).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let n = conds.len() * prompts.len();
    Ok(AblateBench {
        device: device_label(engine),
        heads: conds.len(),
        prompts: prompts.len(),
        prompt_len: spec.prompt_len,
        op: spec.op.name().into(),
        positions: spec.positions.describe(),
        methods: ResumedVsNaive::new(n, (n, resumed_s), (n_naive * prompts.len(), naive_s), max_abs_diff),
        peak_rss_bytes: peak_rss_bytes(),
    })
}
