//! `patchbay bench`: costs measured side by side in one run.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{parse_bytes, print_stdout, progress_bar};
use patchbay::backend::DeviceSpec;
use patchbay::experiments::bench::{PatchBenchSpec, bench_patch};
use patchbay::model::Model;
use patchbay::sites::SiteKind;
use patchbay::{Error, Result};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// A random patching sweep, resumed vs naive, on the same experiments.
    #[command(after_help = "Example (the Tak et al. protocol shape: 3 sites x every 5-layer window x 200 pairs, last token):
  patchbay synth --like llama-3.2-1b --layers 16 --out /tmp/l1b
  patchbay bench patch --model /tmp/l1b --n-prompts 100 --prompt-len 48 --pairs 200 --sites attn_out,mlp_out,resid_post --window 5 --naive-limit 60 --json")]
    Patch(PatchBenchArgs),
}

#[derive(Args)]
struct PatchBenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// Compute device; resumed patching runs on the CPU path only so far.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, default_value_t = 50)]
    n_prompts: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Site kinds patched (short names).
    #[arg(long, default_value = "attn_out,mlp_out,resid_post")]
    sites: String,
    #[arg(long, default_value_t = 5)]
    window: usize,
    #[arg(long, default_value_t = 13)]
    labels: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time the naive method on only the first K experiments (it is slow).
    #[arg(long)]
    naive_limit: Option<usize>,
    /// Rows per batched resumed forward.
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// Memory for clean KV caches, e.g. 2G.
    #[arg(long, default_value = "2G")]
    mem_budget: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Patch(a) => patch(a),
    }
}

fn patch(a: PatchBenchArgs) -> Result<()> {
    if a.device != DeviceSpec::Cpu {
        return Err(Error::input(format!("bench patch: resumed patching runs on the CPU path only so far (got --device {})", a.device)));
    }
    let model = Model::load(&a.model)?;
    let sites = a
        .sites
        .split(',')
        .map(|s| SiteKind::from_short_name(s.trim()).ok_or_else(|| Error::input(format!("unknown site kind `{s}`"))))
        .collect::<Result<Vec<_>>>()?;
    let spec = PatchBenchSpec {
        n_prompts: a.n_prompts,
        prompt_len: a.prompt_len,
        n_pairs: a.pairs,
        sites,
        window: a.window,
        n_labels: a.labels,
        seed: a.seed,
        naive_limit: a.naive_limit,
        batch_rows: a.batch_rows,
        mem_budget: parse_bytes(&a.mem_budget)?,
    };
    let bar = progress_bar(0, "bench", "experiments", a.quiet || a.json);
    let r = bench_patch(&model, &spec, &bar)?;
    bar.finish_and_clear();
    if a.json {
        print_stdout(&format!("{}\n", serde_json::to_string(&r).map_err(|e| Error::input(e.to_string()))?));
    } else {
        print_stdout(&format!(
            "patch sweep on {} ({} layers, d_model {}), {} experiments, device {}\n  resumed: {} experiments in {:.2} s = {:.1}/s\n  naive:   {} experiments in {:.2} s = {:.2}/s\n  ratio resumed/naive: {:.1}x   (max |resumed - naive| label logit: {:.2e})\n  peak RSS: {}\n",
            a.model.display(),
            model.cfg.n_layers,
            model.cfg.d_model,
            r.experiments,
            r.device,
            r.resumed_experiments,
            r.resumed_s,
            r.resumed_per_s,
            r.naive_experiments,
            r.naive_s,
            r.naive_per_s,
            r.ratio,
            r.max_abs_diff,
            r.peak_rss_bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        ));
    }
    Ok(())
}
