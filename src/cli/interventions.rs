//! The intervention flags commands share (`steer`, `generate`; later `ablate`, `circuit`): the
//! command-line form of `patchbay::intervene::spec`, or a JSON spec file with the same fields.

use std::path::PathBuf;

use clap::Args;

use patchbay::intervene::spec::{InterventionSpec, Layers, read_specs};
use patchbay::{Error, Result};

/// What to add (or project out), where, and how strongly.
#[derive(Args, Clone, Debug)]
pub struct InterventionArgs {
    /// The vector: FILE.safetensors[:NAME]; NAME is a tensor name or, per layer, <site>/<NAME> (a `patchbay directions` class); A+B sums vectors; A,B lists directions steered one at a time.
    #[arg(long)]
    pub vector: Option<String>,
    /// Project out a subspace, x <- x + v - beta P x (P onto the span; v = --vector or 0): FILE.safetensors[:NAME], a [k, width] tensor or A+B vectors.
    #[arg(long)]
    pub project: Option<String>,
    /// Site kind: resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_post, z, ...
    #[arg(long, default_value = "resid_post")]
    pub site: String,
    /// Layers: 1,2 or 0..3 (inclusive) or all [default: all].
    #[arg(long)]
    pub layers: Option<String>,
    /// Token positions: all (every prompt token), last, last:K, generated, X+generated, or -1,-2 / 0,3 / -1..-5.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub positions: String,
    /// Strengths, comma-separated (write --betas=-4,2,8 when the first is negative).
    #[arg(long, allow_hyphen_values = true)]
    pub betas: Option<String>,
    /// Scale the vector to unit norm first (adds beta * v / ||v||).
    #[arg(long)]
    pub normalise: bool,
    /// A JSON spec file (one object or a list, fields: vector, project, site, layers, positions, betas, normalise) instead of the flags above.
    #[arg(long, conflicts_with_all = ["vector", "project", "site", "layers", "positions", "betas", "normalise"])]
    pub spec: Option<PathBuf>,
}

impl InterventionArgs {
    /// The specs: the file's, or one from the flags.
    pub fn specs(&self) -> Result<Vec<InterventionSpec>> {
        if let Some(path) = &self.spec {
            return read_specs(path);
        }
        let betas = self.betas.as_deref().ok_or_else(|| Error::input("give --betas (example: --betas=-4,2,8) or --spec FILE.json"))?;
        let betas = parse_numbers(betas, "--betas")?;
        Ok(vec![InterventionSpec {
            vector: self.vector.clone(),
            project: self.project.clone(),
            site: self.site.clone(),
            layers: self.layers.clone().map(Layers::Text),
            positions: self.positions.clone(),
            betas,
            normalise: self.normalise,
        }])
    }
}

/// A comma-separated list of numbers (`--betas`, `--alpha`); Err naming `flag` and the bad item.
pub fn parse_numbers(list: &str, flag: &str) -> Result<Vec<f32>> {
    list.split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| b.parse::<f32>().map_err(|_| Error::input(format!("{flag}: `{b}` is not a number"))))
        .collect()
}
