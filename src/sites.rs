//! Sites (hook points) of the network: typed values, printed with their TransformerLens names
//! so that results interoperate. Parsing names back is for the CLI only.

use std::fmt;

use crate::model::config::ModelConfig;
use crate::{Error, Result};

/// What a site is, in forward order. Per-token shapes are given by [`SiteKind::units`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// Hidden state entering block l. (d_model)
    ResidPre,
    /// Input of the attention sublayer: the pre-norm's output (= ResidPre where the family has
    /// no pre-norm). (d_model)
    AttnIn,
    /// Query projection before RoPE (after q_norm where the family has one). (n_heads, d_head)
    Q,
    /// Key projection before RoPE. (n_kv_heads, d_head)
    K,
    /// Value projection. (n_kv_heads, d_head)
    V,
    /// Query after RoPE. (n_heads, d_head)
    RotQ,
    /// Key after RoPE (what the KV cache stores). (n_kv_heads, d_head)
    RotK,
    /// Attention probabilities of each query row over the keys. (n_heads, n_keys)
    Pattern,
    /// Per-head attention output before o_proj. (n_heads, d_head)
    Z,
    /// Per-head contribution after o_proj, z_h @ W_O[h]^T (before any post-norm). (n_heads, d_model)
    HeadOut,
    /// What the attention sublayer adds to the residual (after the post-norm if any). (d_model)
    AttnOut,
    /// Residual after the attention add. (d_model)
    ResidMid,
    /// Input of the MLP: the pre-norm's output (= ResidMid without a pre-norm). (d_model)
    MlpIn,
    /// MLP neurons act(gate) * up. (d_mlp)
    MlpPost,
    /// What the MLP adds to the residual (after the post-norm if any). (d_model)
    MlpOut,
    /// Output of block l. (d_model)
    ResidPost,
    /// Output of the final norm; its layer is n_layers. (d_model)
    FinalNorm,
}

impl SiteKind {
    /// Every kind, in forward order (the order of the catalogue).
    pub const ALL: [SiteKind; 17] = [
        SiteKind::ResidPre,
        SiteKind::AttnIn,
        SiteKind::Q,
        SiteKind::K,
        SiteKind::V,
        SiteKind::RotQ,
        SiteKind::RotK,
        SiteKind::Pattern,
        SiteKind::Z,
        SiteKind::HeadOut,
        SiteKind::AttnOut,
        SiteKind::ResidMid,
        SiteKind::MlpIn,
        SiteKind::MlpPost,
        SiteKind::MlpOut,
        SiteKind::ResidPost,
        SiteKind::FinalNorm,
    ];

    /// The part of the TransformerLens name after `blocks.{l}.`.
    pub fn tl_suffix(self) -> &'static str {
        match self {
            SiteKind::ResidPre => "hook_resid_pre",
            SiteKind::AttnIn => "ln1.hook_normalized",
            SiteKind::Q => "attn.hook_q",
            SiteKind::K => "attn.hook_k",
            SiteKind::V => "attn.hook_v",
            SiteKind::RotQ => "attn.hook_rot_q",
            SiteKind::RotK => "attn.hook_rot_k",
            SiteKind::Pattern => "attn.hook_pattern",
            SiteKind::Z => "attn.hook_z",
            SiteKind::HeadOut => "attn.hook_result",
            SiteKind::AttnOut => "hook_attn_out",
            SiteKind::ResidMid => "hook_resid_mid",
            SiteKind::MlpIn => "ln2.hook_normalized",
            SiteKind::MlpPost => "mlp.hook_post",
            SiteKind::MlpOut => "hook_mlp_out",
            SiteKind::ResidPost => "hook_resid_post",
            SiteKind::FinalNorm => "ln_final.hook_normalized",
        }
    }

    /// Short name used on the command line (`--sites resid_post,z`) and in result files.
    pub fn short_name(self) -> &'static str {
        match self {
            SiteKind::ResidPre => "resid_pre",
            SiteKind::AttnIn => "attn_in",
            SiteKind::Q => "q",
            SiteKind::K => "k",
            SiteKind::V => "v",
            SiteKind::RotQ => "rot_q",
            SiteKind::RotK => "rot_k",
            SiteKind::Pattern => "pattern",
            SiteKind::Z => "z",
            SiteKind::HeadOut => "result",
            SiteKind::AttnOut => "attn_out",
            SiteKind::ResidMid => "resid_mid",
            SiteKind::MlpIn => "mlp_in",
            SiteKind::MlpPost => "mlp_post",
            SiteKind::MlpOut => "mlp_out",
            SiteKind::ResidPost => "resid_post",
            SiteKind::FinalNorm => "final_norm",
        }
    }

    pub fn from_short_name(s: &str) -> Option<SiteKind> {
        SiteKind::ALL.into_iter().find(|k| k.short_name() == s)
    }

    /// Per-token shape as (units, unit width): index lists (heads, neurons, dimensions) select
    /// units. `n_keys` is the key count of Pattern rows (the longest sequence of the batch).
    pub fn units(self, cfg: &ModelConfig, n_keys: usize) -> (usize, usize) {
        match self {
            SiteKind::Q | SiteKind::RotQ | SiteKind::Z => (cfg.n_heads, cfg.d_head),
            SiteKind::K | SiteKind::V | SiteKind::RotK => (cfg.n_kv_heads, cfg.d_head),
            SiteKind::Pattern => (cfg.n_heads, n_keys),
            SiteKind::HeadOut => (cfg.n_heads, cfg.d_model),
            SiteKind::MlpPost => (cfg.d_mlp, 1),
            _ => (cfg.d_model, 1),
        }
    }

    /// Per-token shape as written to capture files.
    pub fn token_shape(self, cfg: &ModelConfig, n_keys: usize) -> Vec<usize> {
        let (n, w) = self.units(cfg, n_keys);
        if w == 1 { vec![n] } else { vec![n, w] }
    }

    /// What an index list selects at this site.
    pub fn unit_name(self) -> &'static str {
        match self {
            SiteKind::Q | SiteKind::RotQ | SiteKind::Z | SiteKind::Pattern | SiteKind::HeadOut => "head",
            SiteKind::K | SiteKind::V | SiteKind::RotK => "kv head",
            SiteKind::MlpPost => "neuron",
            _ => "dimension",
        }
    }
}

/// One hook point: a kind at a layer. FinalNorm sits at layer n_layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub kind: SiteKind,
}

impl Site {
    pub fn new(layer: usize, kind: SiteKind) -> Site {
        Site { layer, kind }
    }
    pub fn final_norm(cfg: &ModelConfig) -> Site {
        Site { layer: cfg.n_layers, kind: SiteKind::FinalNorm }
    }

    /// Checks the layer against the model.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let ok = match self.kind {
            SiteKind::FinalNorm => self.layer == cfg.n_layers,
            _ => self.layer < cfg.n_layers,
        };
        if ok { Ok(()) } else { Err(Error::input(format!("site {self}: layer {} is out of range (the model has {} layers)", self.layer, cfg.n_layers))) }
    }

    /// Every site of the model in forward order (the catalogue).
    pub fn all(cfg: &ModelConfig) -> Vec<Site> {
        let mut v: Vec<Site> = (0..cfg.n_layers)
            .flat_map(|l| SiteKind::ALL[..SiteKind::ALL.len() - 1].iter().map(move |&k| Site::new(l, k)))
            .collect();
        v.push(Site::final_norm(cfg));
        v
    }

    /// Parses one TransformerLens name (`blocks.3.attn.hook_z`, `ln_final.hook_normalized`).
    pub fn parse(name: &str, cfg: &ModelConfig) -> Result<Site> {
        if let Some(site) = Site::all(cfg).into_iter().find(|s| s.to_string() == name) {
            return Ok(site);
        }
        let last = cfg.n_layers.saturating_sub(1);
        // A well-formed name at a layer the model does not have: say so rather than "unknown".
        if let Some((layer, suffix)) = name.strip_prefix("blocks.").and_then(|r| r.split_once('.')) {
            let known = SiteKind::ALL[..SiteKind::ALL.len() - 1].iter().any(|k| k.tl_suffix() == suffix);
            if known && let Ok(l) = layer.parse::<usize>() {
                return Err(Error::input(format!("site `{name}`: layer {l} is out of range (the model has {} layers: 0..={last})", cfg.n_layers)));
            }
        }
        Err(Error::input(format!(
            "unknown site `{name}` (expected a TransformerLens name such as blocks.0.hook_resid_pre or blocks.{last}.attn.hook_z, with layers 0..={last}, or a short name such as resid_post)"
        )))
    }

    /// Parses a comma-separated site spec: TransformerLens names, globs over them
    /// (`blocks.*.hook_resid_post`), short names meaning all layers (`resid_post`, `z`), `all`.
    /// The result is deduplicated and in forward order.
    pub fn parse_spec(spec: &str, cfg: &ModelConfig) -> Result<Vec<Site>> {
        let all = Site::all(cfg);
        let mut out: Vec<Site> = Vec::new();
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                continue;
            }
            let matched: Vec<Site> = if item == "all" {
                all.clone()
            } else if let Some(kind) = SiteKind::from_short_name(item) {
                all.iter().copied().filter(|s| s.kind == kind).collect()
            } else if item.contains(['*', '?', '[']) {
                let pat = glob::Pattern::new(item).map_err(|e| Error::input(format!("site pattern `{item}`: {e}")))?;
                let m: Vec<Site> = all.iter().copied().filter(|s| pat.matches(&s.to_string())).collect();
                if m.is_empty() {
                    return Err(Error::input(format!("site pattern `{item}` matches no site of this model")));
                }
                m
            } else {
                vec![Site::parse(item, cfg)?]
            };
            out.extend(matched);
        }
        if out.is_empty() {
            return Err(Error::input("no sites given (examples: all, resid_post, blocks.*.hook_attn_out, blocks.3.attn.hook_z)"));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SiteKind::FinalNorm => f.write_str(self.kind.tl_suffix()),
            k => write!(f, "blocks.{}.{}", self.layer, k.tl_suffix()),
        }
    }
}

/// Which token positions of each prompt a request covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Every token.
    All,
    /// A list: negative values count from the end (-1 = last token), others are absolute.
    List(Vec<i64>),
}

impl Positions {
    /// Parses `all` or a comma-separated list of positions and inclusive ranges, such as
    /// `-1,-2`, `0,3` or `-1..-5` (= -1,-2,-3,-4,-5; a range does not cross from absolute to
    /// relative positions).
    pub fn parse(spec: &str) -> Result<Positions> {
        let spec = spec.trim();
        if spec == "all" {
            return Ok(Positions::All);
        }
        let int = |s: &str| s.trim().parse::<i64>().map_err(|_| Error::input(format!("position `{s}` is not an integer (use `all`, or a list like -1,-2, 0,3 or a range -1..-5)")));
        let mut list = Vec::new();
        for item in spec.split(',') {
            match item.split_once("..") {
                Some((a, b)) => {
                    let (a, b) = (int(a)?, int(b)?);
                    if (a < 0) != (b < 0) {
                        return Err(Error::input(format!("position range `{}` mixes absolute and from-the-end positions", item.trim())));
                    }
                    if a.abs_diff(b) >= 1 << 16 {
                        return Err(Error::input(format!("position range `{}` is too long", item.trim())));
                    }
                    if a <= b { list.extend(a..=b) } else { list.extend((b..=a).rev()) }
                }
                None => list.push(int(item)?),
            }
        }
        if list.is_empty() {
            return Err(Error::input("empty position list"));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(p) = list.iter().find(|p| !seen.insert(**p)) {
            return Err(Error::input(format!("position {p} is listed twice")));
        }
        Ok(Positions::List(list))
    }

    /// Absolute positions in a sequence of `len` tokens, in the listed order.
    pub fn resolve(&self, len: usize) -> Result<Vec<usize>> {
        match self {
            Positions::All => Ok((0..len).collect()),
            Positions::List(l) => l
                .iter()
                .map(|&p| {
                    let abs = if p < 0 { len as i64 + p } else { p };
                    if abs < 0 || abs >= len as i64 {
                        Err(Error::input(format!("position {p} is out of range for a prompt of {len} tokens")))
                    } else {
                        Ok(abs as usize)
                    }
                })
                .collect(),
        }
    }

    /// How the metadata of output files records these positions.
    pub fn describe(&self) -> String {
        match self {
            Positions::All => "all".into(),
            Positions::List(l) => l.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

/// Which tokens an intervention acts on in a generation: prompt positions (at prefill) and/or
/// every generated token (when it is fed back). Commands without generation take prompt
/// positions only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenScope {
    /// Positions of the prompt (None: the prompt runs clean).
    pub prompt: Option<Positions>,
    /// Every generated token.
    pub generated: bool,
}

impl TokenScope {
    /// Every token: the whole prompt and each generated one.
    pub const fn all() -> TokenScope {
        TokenScope { prompt: Some(Positions::All), generated: true }
    }
    /// Generated tokens only (the prompt runs clean).
    pub const fn generated() -> TokenScope {
        TokenScope { prompt: None, generated: true }
    }
    /// How output files record it: the prompt positions as [`Positions::describe`] writes them,
    /// `generated`, or `X+generated` (the syntax [`TokenScope::parse`] reads).
    pub fn describe(&self) -> String {
        match (&self.prompt, self.generated) {
            (Some(p), true) => format!("{}+generated", p.describe()),
            (Some(p), false) => p.describe(),
            (None, true) => "generated".into(),
            (None, false) => "none".into(),
        }
    }
    /// Parses `all`, `last`, `last:K`, `generated`, `X+generated` or a `Positions::parse` list.
    pub fn parse(spec: &str) -> Result<TokenScope> {
        let spec = spec.trim();
        let (prompt, generated) = match spec.strip_suffix("+generated") {
            Some(p) => (Some(p), true),
            None if spec == "generated" => (None, true),
            None => (Some(spec), false),
        };
        let prompt = prompt
            .map(|p| match p.trim() {
                "last" => Ok(Positions::List(vec![-1])),
                p => match p.strip_prefix("last:") {
                    Some(k) => match k.trim().parse::<i64>() {
                        Ok(k) if (1..=1 << 16).contains(&k) => Ok(Positions::List((1..=k).map(|i| -i).collect())),
                        _ => Err(Error::input(format!("positions `{spec}`: last:K needs a whole number K >= 1"))),
                    },
                    None => Positions::parse(p).map_err(|e| Error::input(format!("positions `{spec}`: {e} (or last, last:K, generated)"))),
                },
            })
            .transpose()?;
        Ok(TokenScope { prompt, generated })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_grammar() {
        let p = |s: &str| TokenScope::parse(s).unwrap();
        assert_eq!(p("all"), TokenScope { prompt: Some(Positions::All), generated: false });
        assert_eq!(p("last"), TokenScope { prompt: Some(Positions::List(vec![-1])), generated: false });
        assert_eq!(p("last:3"), TokenScope { prompt: Some(Positions::List(vec![-1, -2, -3])), generated: false });
        assert_eq!(p("generated"), TokenScope { prompt: None, generated: true });
        assert_eq!(p("last:2+generated"), TokenScope { prompt: Some(Positions::List(vec![-1, -2])), generated: true });
        assert_eq!(p("0,3"), TokenScope { prompt: Some(Positions::List(vec![0, 3])), generated: false });
        assert_eq!(p("-1..-3"), TokenScope { prompt: Some(Positions::List(vec![-1, -2, -3])), generated: false });
        for spec in ["all", "-1", "-1,-2,-3", "generated", "-1,-2+generated", "0,3"] {
            assert_eq!(p(&p(spec).describe()), p(spec), "{spec} reads back");
        }
        for bad in ["last:0", "last:x", "first", ""] {
            let e = TokenScope::parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }
}
