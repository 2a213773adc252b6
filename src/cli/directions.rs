//! `patchbay directions`: class-mean steering directions per site and layer, from a dataset
//! with gold labels (capture, then `experiments::directions`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use super::inputs::{InputArgs, encode_dataset};
use super::{load_engine, progress_bar};
use patchbay::data::labels::parse_list;
use patchbay::experiments::directions::{check_classes, class_counts, class_mean_from_capture, write_directions};
use patchbay::experiments::shards::{RunOptions, ShardSpec, capture_shards, check_positions};
use patchbay::io::OutDtype;
use patchbay::learn::directions::Versus;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::{Positions, Site};
use patchbay::{Error, Result};

const DIRECTIONS_HELP: &str = "Examples:
  patchbay directions --model M --dataset emotions.csv --template tak --sites resid_post --out runs/dirs
  patchbay directions --model M --dataset emotions.csv --template tak --labels anger,joy,neutral --versus neutral --sites 'blocks.4.hook_resid_post' --positions -1..-3 --out runs/dirs

For each class c and each site (every layer of a short name), the direction is
mean(x | c) - mean(x | every other class) (--versus rest, the default) or
mean(x | c) - mean(x | NAME) (--versus NAME: one-vs-a-class, e.g. neutral; NAME itself gets no
direction). x is a prompt's activation at the site averaged over --positions (default: the last
token). Only prompts with a gold label among the classes count; every class needs one.

Writes OUT/directions.safetensors: one f32 tensor [width] per (site, class), named
<TransformerLens site>/<class> (e.g. blocks.4.hook_resid_post/anger), with the provenance in
its metadata (model, config hash, method, versus, sites, positions, classes, prompts per class,
dataset). OUT/acts/ holds the capture (re-running the same command continues a killed run).";

#[derive(Args)]
#[command(after_help = DIRECTIONS_HELP)]
pub struct DirectionsArgs {
    #[command(flatten)]
    inputs: InputArgs,
    /// Classes (comma-separated gold labels) [default: every label of the dataset].
    #[arg(long)]
    labels: Option<String>,
    /// What each class's mean is measured against: `rest` (every other class) or a class name.
    #[arg(long, default_value = "rest")]
    versus: String,
    /// Sites: short names (all layers), TransformerLens names or globs.
    #[arg(long, default_value = "resid_post")]
    sites: String,
    /// Positions averaged into a prompt's activation: -1, -1..-3, or absolute 0,3.
    #[arg(long, allow_hyphen_values = true, default_value = "-1")]
    positions: String,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Discard an earlier, different capture in OUT/acts instead of refusing.
    #[arg(long)]
    overwrite: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: DirectionsArgs) -> Result<()> {
    let model = Model::load(&a.inputs.model)?;
    let sites = Site::parse_spec(&a.sites, &model.cfg)?;
    let Positions::List(positions) = Positions::parse(&a.positions)? else {
        return Err(Error::input("--positions all: directions need fixed positions (e.g. -1 or -1..-3)"));
    };
    let names = a.labels.as_deref().map(|l| parse_list(l, "label")).transpose()?;
    let ds = a.inputs.data.load(names.clone())?.ok_or_else(|| Error::input("--dataset is required"))?;
    if ds.spec.label_column.is_none() {
        return Err(Error::input("directions need gold labels: the dataset has no label column (--label-col)"));
    }
    let classes_named = names.unwrap_or_else(|| ds.label_values());
    let versus = match a.versus.as_str() {
        "rest" => Versus::Rest,
        name => Versus::Class(classes_named.iter().position(|c| c == name).ok_or_else(|| Error::input(format!("--versus {name}: not one of the classes [{}]", classes_named.join(", "))))?),
    };
    let classes: Vec<Option<usize>> = ds.examples.iter().map(|e| e.label.as_ref().and_then(|l| classes_named.iter().position(|c| c == l))).collect();
    check_classes(&classes, &classes_named, versus)?;
    let tok = PromptTokenizer::load(&a.inputs.model)?;
    let prompts = encode_dataset(&ds, &a.inputs.template.template()?, &tok, a.quiet)?;
    check_positions(&prompts, &positions)?;

    let engine = load_engine(&model, a.inputs.device)?;
    let acts = a.out.join("acts");
    let spec = ShardSpec { sites, positions: positions.clone(), label_token_ids: Vec::new(), dtype: OutDtype::F32, batch_size: a.batch_size, shard_bytes: 256 << 20 };
    let bar = progress_bar(prompts.len() as u64, "capture", "prompts", a.quiet);
    let run = capture_shards(engine.as_ref(), &model.dir.display().to_string(), &model.config_hash, &prompts, &spec, &acts, &RunOptions { overwrite: a.overwrite, stop_after: None }, &bar)?;
    bar.finish_and_clear();

    let bar = progress_bar(run.meta.sites.len() as u64, "directions", "sites", a.quiet);
    let dirs = class_mean_from_capture(&acts, &run.meta, &classes, &classes_named, versus, &bar)?;
    bar.finish_and_clear();
    let with_direction: Vec<String> = classes_named.iter().enumerate().filter(|&(c, _)| versus != Versus::Class(c)).map(|(_, n)| n.clone()).collect();
    let counts = class_counts(&classes, classes_named.len());
    let metadata = BTreeMap::from([
        ("format".to_string(), "patchbay-directions-1".to_string()),
        ("method".to_string(), "class-mean".to_string()),
        ("versus".to_string(), a.versus.clone()),
        ("model".to_string(), model.dir.display().to_string()),
        ("config_sha256".to_string(), model.config_hash.clone()),
        ("device".to_string(), engine.device_name()),
        ("sites".to_string(), run.meta.sites.join(",")),
        ("positions".to_string(), Positions::List(positions).describe()),
        ("classes".to_string(), with_direction.join(",")),
        ("rows".to_string(), classes_named.iter().zip(&counts).map(|(n, c)| format!("{n}={c}")).collect::<Vec<_>>().join(",")),
        ("dataset".to_string(), ds.spec.path.display().to_string()),
        ("patchbay_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    let path = a.out.join("directions.safetensors");
    write_directions(&path, &dirs, &with_direction, &metadata)?;
    if !a.quiet {
        eprintln!("wrote {} directions ({} sites x {} classes) to {}", dirs.len() * with_direction.len(), dirs.len(), with_direction.len(), path.display());
    }
    Ok(())
}
