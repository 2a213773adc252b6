//! `patchbay merge`: combines the shards of a patching sweep (`patchbay patch --shard i/n`) or of
//! a component sweep (`patchbay ablate --shard i/n`) into the files the whole run writes
//! (DESIGN.md section 7).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use patchbay::Result;
use patchbay::experiments::ablate_files::merge_ablate;
use patchbay::experiments::patch_files::{merge_parts, read_manifest};

const MERGE_HELP: &str = "Examples:
  patchbay merge --out runs/patch runs/p0 runs/p1 runs/p2 runs/p3
  patchbay merge --out runs/patch runs/shard-*

The directories must be the shards 0/N .. N-1/N of one `patchbay patch` sweep (same model config,
prompts, pairs, sites, units, window, centres, positions, labels and --method), each complete (a
killed shard is finished with --resume first), with no experiment in two shards and none missing.
Writes experiments.jsonl (sorted by id), summary.csv, heatmap.png and manifest.json in --out: the
files of the unsharded run, with the same experiments in the same order; logits can differ from
the unsharded run's in the last bits (a shard batches other prompts together), and with them a
prediction at a near-tie. The manifest lists each shard's command line, device and timing under `shards`.

Shards of `patchbay ablate --shard I/N` (each a contiguous range of the prompts, every experiment)
merge the same way: the same sweep (model, prompts, labels, components, op, positions, projection,
seed), each complete with exactly its prompts' rows; writes clean.jsonl and experiments.jsonl (the
shards' lines in shard order) and the sweep's outputs (summary.csv and heatmap.png, top_k.csv and
top_k.png, or influence.csv and influence.png) computed over every prompt.";

#[derive(Args)]
#[command(after_help = MERGE_HELP)]
pub struct MergeArgs {
    /// Output directory (must not hold a sweep already).
    #[arg(long)]
    out: PathBuf,
    /// Output directories of `patchbay patch --shard I/N` or `patchbay ablate --shard I/N`, in any order.
    #[arg(required = true, value_name = "SHARD_DIR")]
    shards: Vec<PathBuf>,
    /// No summary line.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let t0 = Instant::now();
    // The first shard's manifest says which command wrote them.
    let first = a.shards[0].join("manifest.json");
    let ablate = first.exists() && read_manifest(&first)?.get("command").and_then(|c| c.as_str()) == Some("ablate");
    let (n, total) = if ablate { merge_ablate(&a.shards, &a.out, std::env::args().collect())? } else { merge_parts(&a.shards, &a.out, std::env::args().collect())? };
    if !a.quiet {
        eprintln!("merged {n} shards: {total} {} in {} ({:.1} s)", if ablate { "rows" } else { "experiments" }, a.out.display(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}
