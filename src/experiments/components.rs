//! Components (Wang et al.): what each attention head and each MLP neuron writes along a
//! direction of the residual stream, computed analytically from one clean run's captures (no
//! extra forward), direct logit attribution (DLA) to label tokens, and the logit lens.
//!
//! # Contributions
//!
//! A direction d is read at a residual-stream site S (resid_pre, resid_mid or resid_post of a
//! layer, or final_norm). Every head and neuron that writes to the residual before S
//! contributes:
//! - head h of layer l: `result_h . d` (`result_h` = z_h W_O[:, h]^T, TransformerLens
//!   `attn.hook_result`), computed as `z_h . (W_O^T d)_h`;
//! - neuron i of layer l: `mlp_post_i * (W_down[:, i] . d)`;
//! - the o_proj and down_proj biases (`b . d`) and what enters block 0 (the scaled embedding)
//!   complete the sum: at S, `x . d` is exactly the sum of all of them.
//!
//! Norms are linearised with their scale frozen at the clean run's value (the scale 1 / rms(x)
//! a norm divides by, per token), so every term stays linear in its component:
//! - at `final_norm`, `final_norm(x) . d = (x . (w ⊙ d)) / rms(x)`: each component's term is
//!   its residual write read along `w ⊙ d`, divided by the clean rms(x) of that token. DLA is
//!   this with d = the lm_head row of a label token: attribution to the logit *before* Gemma 2's
//!   final soft-cap (tanh is not linear).
//! - Families with a norm after the attention / MLP output (Gemma 2, OLMo 2) add
//!   `attn_out = w ⊙ o / rms(o)`, o = sum_h result_h + b: a head's term is `result_h` through
//!   that norm with rms(o) frozen, `(result_h . (w ⊙ d)) / rms(o)`, and the terms of a layer's
//!   heads and bias sum to `attn_out . d` exactly. It is not what the head would add alone (the
//!   norm would rescale it), nor `result_h . d` (which has no meaning in the residual there).
//!   Neurons likewise, through the post-MLP norm.
//!
//! # The logit lens
//!
//! The final norm and unembedding (with Gemma 2's final soft-cap) applied to `resid_post` of
//! every layer: the last layer's lens is the model's own logits.

use std::path::Path;

use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::backend::cpu;
use crate::backend::ops::elementwise::softcap_ref;
use crate::backend::ops::norm::rmsnorm_ref;
use crate::data::labels::LabelSet;
use crate::engine::{Engine, RunRequest};
use crate::intervene::{Capture, Captured, dot};
use crate::experiments::capture::{CaptureSpec, capture};
use crate::io::plot::{Grid, LinePanels, Point, heatmap, heatmaps, line_panels};
use crate::io::{OutDtype, OutTensor};
use crate::model::Model;
use crate::model::checkpoint::Weight;
use crate::model::config::NormWeight;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// A norm's weight as the factor x / rms(x) is multiplied by: w, or 1 + w (Gemma).
fn norm_factor(w: &[f32], kind: NormWeight) -> Vec<f32> {
    match kind {
        NormWeight::Plain => w.to_vec(),
        NormWeight::OnePlus => w.iter().map(|w| 1.0 + w).collect(),
    }
}

/// 1 / rms(x) of each row of `x` (rows of `width`), as `rmsnorm_ref` scales: `[rows]`.
fn inv_rms(x: &[f32], width: usize, eps: f32) -> Vec<f32> {
    x.chunks(width).map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / width as f32 + eps).sqrt()).collect()
}

/// `dirs W` for a weight W `[out, in]` and directions `dirs` `[n, out]`: `[n, in]` (W^T d for
/// each d), in one pass over W, parallel over blocks of its columns.
pub fn project_through(w: &Weight, dirs: &[f32], n: usize) -> Vec<f32> {
    const BLOCK: usize = 256;
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let blocks: Vec<Vec<f32>> = (0..cols.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(cols));
            let mut acc = vec![0.0f32; n * (c1 - c0)]; // [n, c1 - c0]
            let mut row = vec![0.0f32; c1 - c0];
            for r in 0..rows {
                w.to_f32_range(r * cols + c0, r * cols + c1, &mut row);
                for (j, a) in acc.chunks_mut(c1 - c0).enumerate() {
                    let dr = dirs[j * rows + r];
                    a.iter_mut().zip(&row).for_each(|(a, w)| *a += dr * w);
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; n * cols]; // [n, in]
    for (b, acc) in blocks.iter().enumerate() {
        let c0 = b * BLOCK;
        let width = acc.len() / n.max(1);
        for j in 0..n {
            out[j * cols + c0..j * cols + c0 + width].copy_from_slice(&acc[j * width..(j + 1) * width]);
        }
    }
    out
}

/// b . d for each direction (0 without a bias): `[n]`.
fn bias_dot(b: Option<&[f32]>, dirs: &[f32], n: usize) -> Vec<f32> {
    match b {
        Some(b) => dirs.chunks(b.len()).take(n).map(|d| d.iter().zip(b).map(|(d, b)| d * b).sum()).collect(),
        None => vec![0.0; n],
    }
}

/// Directions read at a residual-stream site, as linear maps from each head's z, each neuron's
/// mlp_post value, the biases and the embedding (the module doc says what is linearised).
pub struct Readout {
    pub site: Site,
    /// Heads of layers `< head_layers` and neurons of layers `< neuron_layers` write before the site.
    pub head_layers: usize,
    pub neuron_layers: usize,
    n_dirs: usize,
    /// [n_dirs, d_model]: the directions as read from the residual stream (w ⊙ d at final_norm).
    resid_dirs: Vec<f32>,
    /// Per layer < head_layers: [n_dirs, n_heads * d_head], W_O^T of the direction as the attention output reads it.
    attn: Vec<Vec<f32>>,
    /// Per layer < head_layers: [n_dirs], the o_proj bias along it.
    attn_bias: Vec<Vec<f32>>,
    /// Per layer < neuron_layers: [n_dirs, d_mlp], W_down^T of the direction as the MLP output reads it.
    mlp: Vec<Vec<f32>>,
    /// Per layer < neuron_layers: [n_dirs], the down_proj bias along it.
    mlp_bias: Vec<Vec<f32>>,
}

/// The per-token terms of a batch's rows (prompt-major, the captured positions of each prompt).
pub struct RowContribs {
    /// [rows, head_layers, n_heads]
    pub heads: Vec<f32>,
    /// [rows, neuron_layers, d_mlp]
    pub neurons: Vec<f32>,
    /// [rows, head_layers]: the o_proj bias's term (0 without a bias).
    pub attn_bias: Vec<f32>,
    /// [rows, neuron_layers]: the down_proj bias's term.
    pub mlp_bias: Vec<f32>,
    /// [rows]: the term of what enters block 0 (the scaled embedding).
    pub embed: Vec<f32>,
}

impl RowContribs {
    /// The means of consecutive runs of rows, `counts[p]` rows for prompt p: one row per prompt.
    pub fn prompt_means(&self, counts: &[usize]) -> RowContribs {
        let rows = self.embed.len().max(1);
        let mean = |v: &[f32]| prompt_means(v, v.len() / rows, counts);
        RowContribs { heads: mean(&self.heads), neurons: mean(&self.neurons), attn_bias: mean(&self.attn_bias), mlp_bias: mean(&self.mlp_bias), embed: mean(&self.embed) }
    }
}

impl Readout {
    /// `dirs` `[n, d_model]` read at `site`. Err naming the site when it is not a residual-stream
    /// site or its layer is out of range.
    pub fn new(model: &Model, site: Site, dirs: &[f32]) -> Result<Readout> {
        let cfg = &model.cfg;
        site.check(cfg)?;
        let d = cfg.d_model;
        if dirs.is_empty() || !dirs.len().is_multiple_of(d) {
            return Err(Error::input(format!("directions of {} values are not rows of d_model {d}", dirs.len())));
        }
        let n_dirs = dirs.len() / d;
        let l = site.layer;
        let (head_layers, neuron_layers) = match site.kind {
            SiteKind::ResidPre => (l, l),
            SiteKind::ResidMid => (l + 1, l),
            SiteKind::ResidPost => (l + 1, l + 1),
            SiteKind::FinalNorm => (cfg.n_layers, cfg.n_layers),
            _ => return Err(Error::input(format!("contributions are read at a residual-stream site (resid_pre, resid_mid, resid_post of a layer, or final_norm), not {site}"))),
        };
        // Each row of `dirs` times a norm's factor, elementwise (the direction as read through it).
        let through_norm = |dirs: &[f32], w: Option<&Vec<f32>>| -> Vec<f32> {
            match w {
                Some(w) => {
                    let w = norm_factor(w, cfg.norm_weight);
                    dirs.chunks(d).flat_map(|r| r.iter().zip(&w).map(|(a, b)| a * b).collect::<Vec<_>>()).collect()
                }
                None => dirs.to_vec(),
            }
        };
        let resid_dirs = through_norm(dirs, (site.kind == SiteKind::FinalNorm).then_some(&model.weights.final_norm));
        // The direction as a sublayer output reads it: through its post-norm, if any.
        let through = |post: Option<&Vec<f32>>| through_norm(&resid_dirs, post);
        let layers = &model.weights.layers;
        let (mut attn, mut attn_bias, mut mlp, mut mlp_bias) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for lw in &layers[..head_layers] {
            let dd = through(lw.attn_post_norm.as_ref()); // [n_dirs, d_model]
            attn.push(project_through(&lw.o.w, &dd, n_dirs));
            attn_bias.push(bias_dot(lw.o.b.as_deref(), &dd, n_dirs));
        }
        for lw in &layers[..neuron_layers] {
            let dd = through(lw.mlp_post_norm.as_ref());
            mlp.push(project_through(&lw.down.w, &dd, n_dirs));
            mlp_bias.push(bias_dot(lw.down.b.as_deref(), &dd, n_dirs));
        }
        Ok(Readout { site, head_layers, neuron_layers, n_dirs, resid_dirs, attn, attn_bias, mlp, mlp_bias })
    }

    /// The captures [`Readout::contributions`] reads, at `positions`: z and mlp_post of the
    /// writing layers, resid_pre of block 0, and at final_norm the last block's resid_post.
    pub fn captures(&self, model: &Model, positions: &Positions) -> Vec<Capture> {
        let n = model.cfg.n_layers;
        let mut sites: Vec<Site> = (0..self.head_layers).map(|l| Site::new(l, SiteKind::Z)).collect();
        sites.extend((0..self.neuron_layers).map(|l| Site::new(l, SiteKind::MlpPost)));
        sites.push(Site::new(0, SiteKind::ResidPre));
        if self.site.kind == SiteKind::FinalNorm {
            sites.push(Site::new(n - 1, SiteKind::ResidPost));
        }
        sites.into_iter().map(|site| Capture { site, positions: positions.clone() }).collect()
    }

    /// The terms of every captured row, row r read along direction `dir_of_row[r]`; `captured`
    /// must hold [`Readout::captures`] (in any order, among others), `post` the batch's
    /// post-norm scales of at least the writing layers.
    pub fn contributions(&self, model: &Model, captured: &[Captured], post: &PostNormScales, dir_of_row: &[usize]) -> Result<RowContribs> {
        let cfg = &model.cfg;
        let (d, qw, dh, nh, dm) = (cfg.d_model, cfg.q_width(), cfg.d_head, cfg.n_heads, cfg.d_mlp);
        let get = |site: Site| find(captured, site);
        if post.attn.len() < self.head_layers || post.mlp.len() < self.neuron_layers {
            return Err(Error::input(format!("contributions: post-norm scales of {} layers for {} writing layers", post.attn.len(), self.head_layers.max(self.neuron_layers))));
        }
        let rows = dir_of_row.len();
        if let Some(&j) = dir_of_row.iter().find(|&&j| j >= self.n_dirs) {
            return Err(Error::input(format!("contributions: direction {j} of {}", self.n_dirs)));
        }
        let resid0 = get(Site::new(0, SiteKind::ResidPre))?; // [rows, d_model]
        if resid0.len() != rows * d {
            return Err(Error::input(format!("contributions: {} captured rows for {rows} directions", resid0.len() / d)));
        }
        // Frozen final-norm scale per row (1 at a residual site).
        let scale: Vec<f32> = match self.site.kind {
            SiteKind::FinalNorm => inv_rms(get(Site::new(cfg.n_layers - 1, SiteKind::ResidPost))?, d, cfg.norm_eps),
            _ => vec![1.0; rows],
        };
        let embed = (0..rows).map(|r| scale[r] * dot(&resid0[r * d..(r + 1) * d], &self.resid_dirs[dir_of_row[r] * d..(dir_of_row[r] + 1) * d])).collect();
        let mut out = RowContribs {
            heads: vec![0.0; rows * self.head_layers * nh],
            neurons: vec![0.0; rows * self.neuron_layers * dm],
            attn_bias: vec![0.0; rows * self.head_layers],
            mlp_bias: vec![0.0; rows * self.neuron_layers],
            embed,
        };
        for l in 0..self.head_layers {
            let z = get(Site::new(l, SiteKind::Z))?; // [rows, n_heads * d_head]
            let s = with_post_norm(&scale, post.attn[l].as_ref());
            for r in 0..rows {
                let (j, zr) = (dir_of_row[r], &z[r * qw..(r + 1) * qw]);
                let u = &self.attn[l][j * qw..(j + 1) * qw];
                for h in 0..nh {
                    out.heads[(r * self.head_layers + l) * nh + h] = s[r] * dot(&zr[h * dh..(h + 1) * dh], &u[h * dh..(h + 1) * dh]);
                }
                out.attn_bias[r * self.head_layers + l] = s[r] * self.attn_bias[l][j];
            }
        }
        for l in 0..self.neuron_layers {
            let act = get(Site::new(l, SiteKind::MlpPost))?; // [rows, d_mlp]
            let s = with_post_norm(&scale, post.mlp[l].as_ref());
            for r in 0..rows {
                let j = dir_of_row[r];
                let u = &self.mlp[l][j * dm..(j + 1) * dm];
                let dst = &mut out.neurons[(r * self.neuron_layers + l) * dm..(r * self.neuron_layers + l + 1) * dm];
                dst.iter_mut().zip(&act[r * dm..(r + 1) * dm]).zip(u).for_each(|((o, p), u)| *o = s[r] * p * u);
                out.mlp_bias[r * self.neuron_layers + l] = s[r] * self.mlp_bias[l][j];
            }
        }
        Ok(out)
    }
}

/// The clean scales of a batch's post-norms (Gemma 2, OLMo 2): per layer, 1 / rms of the
/// attention and of the MLP output before its post-norm, `[rows]` each (None where the family
/// has no post-norm), recomputed once per batch from the captured z and mlp_post
/// (`linear(input)` on the host) and shared by every readout of the batch.
pub struct PostNormScales {
    attn: Vec<Option<Vec<f32>>>,
    mlp: Vec<Option<Vec<f32>>>,
}

impl PostNormScales {
    /// The scales of layers `< layers`; `captured` must hold their z and mlp_post where the
    /// family has post-norms.
    pub fn new(model: &Model, captured: &[Captured], layers: usize) -> Result<PostNormScales> {
        let cfg = &model.cfg;
        let scale = |kind: SiteKind, l: usize, lin: &crate::model::checkpoint::Linear| -> Result<Vec<f32>> {
            let x = find(captured, Site::new(l, kind))?;
            let rows = x.len() / lin.w.shape[1];
            let mut o = vec![0.0f32; rows * cfg.d_model]; // [rows, d_model]
            cpu::linear(x, rows, lin, &mut o, crate::backend::Precision::F32);
            Ok(inv_rms(&o, cfg.d_model, cfg.norm_eps))
        };
        let (mut attn, mut mlp) = (Vec::new(), Vec::new());
        for (l, lw) in model.weights.layers[..layers].iter().enumerate() {
            attn.push(lw.attn_post_norm.as_ref().map(|_| scale(SiteKind::Z, l, &lw.o)).transpose()?);
            mlp.push(lw.mlp_post_norm.as_ref().map(|_| scale(SiteKind::MlpPost, l, &lw.down)).transpose()?);
        }
        Ok(PostNormScales { attn, mlp })
    }
}

/// A captured site's rows (Err naming it when it was not captured).
fn find(captured: &[Captured], site: Site) -> Result<&[f32]> {
    captured.iter().find(|c| c.site == site).map(|c| c.data.as_slice()).ok_or_else(|| Error::input(format!("contributions: {site} was not captured")))
}

/// `scale` times the post-norm scale of each row when there is one.
fn with_post_norm(scale: &[f32], post: Option<&Vec<f32>>) -> Vec<f32> {
    match post {
        Some(p) => p.iter().zip(scale).map(|(a, b)| a * b).collect(),
        None => scale.to_vec(),
    }
}

/// The logit lens of residual rows `x` `[rows, d_model]`: final norm, unembedding (only the
/// vocabulary entries `tokens` when given, in that order) and the final soft-cap:
/// `[rows, vocab or tokens.len()]`.
pub fn lens_rows(model: &Model, x: &[f32], tokens: Option<&[u32]>) -> Result<Vec<f32>> {
    let cfg = &model.cfg;
    let d = cfg.d_model;
    let rows = x.len() / d;
    let mut a = vec![0.0f32; x.len()]; // [rows, d_model]
    rmsnorm_ref(x, &model.weights.final_norm, cfg.norm_eps, cfg.norm_weight, &mut a);
    let head = model.lm_head_rows(tokens)?;
    let mut logits = vec![0.0f32; rows * head.shape[0]]; // [rows, vocab or n_tokens]
    cpu::matmul_t(&a, rows, &head, &mut logits);
    if let Some(c) = cfg.final_softcap {
        softcap_ref(&mut logits, c);
    }
    Ok(logits)
}

/// Where and how the logit lens reads: prompt positions, the top-k tokens (None: the labels
/// only), prompts per forward.
#[derive(Clone, Debug)]
pub struct LensSpec {
    pub positions: Positions,
    pub top_k: Option<usize>,
    pub batch_size: usize,
}

/// The logit lens at `positions` of every prompt (captured on `engine` in batches of
/// `batch_size` prompts, read on the host in chunks of rows), in the layout of `capture`'s file:
/// `label_logits` `[lead, n_layers, n_labels]` (unless `labels` is empty) and with `top_k` also `top_ids` (i64) and
/// `top_logits` `[lead, n_layers, k]`, where lead is `[n_prompts, n_positions]` for a position
/// list and `[T_total]` for `all` (then `prompt_offsets` follows, as in `capture`).
pub fn logit_lens(model: &Model, engine: &dyn Engine, prompts: &[Vec<u32>], labels: &LabelSet, spec: &LensSpec, progress: &ProgressBar) -> Result<Vec<(String, OutTensor)>> {
    let LensSpec { positions, top_k, batch_size } = spec.clone();
    const CHUNK_ROWS: usize = 256;
    let cfg = &model.cfg;
    labels.check_vocab(cfg.vocab_size)?;
    if top_k == Some(0) {
        return Err(Error::input("--top-k must be at least 1"));
    }
    if labels.is_empty() && top_k.is_none() {
        return Err(Error::input("give the labels (--labels, --label-token-ids or a dataset with gold labels) or --top-k K"));
    }
    let (n_layers, d, nl) = (cfg.n_layers, cfg.d_model, labels.len());
    let capture_spec = CaptureSpec { sites: (0..n_layers).map(|l| Site::new(l, SiteKind::ResidPost)).collect(), positions, logits: false, dtype: OutDtype::F32, batch_size, interventions: Vec::new() };
    let mut captured = capture(engine, prompts, &capture_spec, progress)?;
    let offsets = captured.pop_if(|(name, _)| name == "prompt_offsets");
    let mut lead = Vec::new();
    let resid: Vec<Vec<f32>> = captured
        .into_iter()
        .map(|(_, t)| match t {
            OutTensor::Float { shape, data, .. } => {
                lead = shape[..shape.len() - 1].to_vec();
                data
            }
            OutTensor::I64 { .. } => Vec::new(),
        })
        .collect();
    let rows = lead.iter().product::<usize>();
    let k = top_k.map(|k| k.min(cfg.vocab_size)).unwrap_or(0);
    let mut label_logits = vec![0.0f32; rows * n_layers * nl]; // [rows, n_layers, n_labels]
    let mut top_ids = vec![0i64; rows * n_layers * k]; // [rows, n_layers, k]
    let mut top_logits = vec![0.0f32; rows * n_layers * k]; // [rows, n_layers, k]
    for (l, x) in resid.iter().enumerate() {
        for r0 in (0..rows).step_by(CHUNK_ROWS) {
            let r1 = (r0 + CHUNK_ROWS).min(rows);
            let xs = &x[r0 * d..r1 * d]; // [chunk, d_model]
            if nl > 0 {
                let ll = lens_rows(model, xs, Some(&labels.token_ids))?; // [chunk, n_labels]
                for (i, v) in ll.chunks(nl).enumerate() {
                    label_logits[((r0 + i) * n_layers + l) * nl..((r0 + i) * n_layers + l + 1) * nl].copy_from_slice(v);
                }
            }
            if k > 0 {
                let (ids, vals) = top_k_rows(&lens_rows(model, xs, None)?, cfg.vocab_size, k);
                for i in 0..r1 - r0 {
                    let dst = ((r0 + i) * n_layers + l) * k;
                    top_ids[dst..dst + k].copy_from_slice(&ids[i * k..(i + 1) * k]);
                    top_logits[dst..dst + k].copy_from_slice(&vals[i * k..(i + 1) * k]);
                }
            }
        }
    }
    let shape = |tail: usize| lead.iter().copied().chain([n_layers, tail]).collect::<Vec<_>>();
    let mut out = Vec::new();
    if nl > 0 {
        out.push(("label_logits".to_string(), OutTensor::Float { shape: shape(nl), data: label_logits, dtype: OutDtype::F32 }));
    }
    if k > 0 {
        out.push(("top_ids".into(), OutTensor::I64 { shape: shape(k), data: top_ids }));
        out.push(("top_logits".into(), OutTensor::Float { shape: shape(k), data: top_logits, dtype: OutDtype::F32 }));
    }
    out.extend(offsets);
    Ok(out)
}

/// The layer x label heatmap of a lens: for each label c and layer, the mean probability of c
/// (softmax over the label set) over the rows whose label is c: `row_label[r]` (a prompt's gold
/// label), else the last layer's argmax at that row (the model's own prediction there).
/// `label_logits` `[rows, n_layers, n_labels]`.
pub fn lens_heatmap(path: &Path, label_logits: &[f32], n_layers: usize, labels: &LabelSet, row_label: &[Option<usize>]) -> Result<()> {
    let nl = labels.len();
    let mut sum = vec![0.0f64; n_layers * nl]; // [n_layers, n_labels]
    let mut count = vec![0usize; nl];
    for (row, gold) in label_logits.chunks(n_layers * nl).zip(row_label) {
        let c = gold.unwrap_or_else(|| crate::logits::argmax(&row[(n_layers - 1) * nl..]));
        count[c] += 1;
        for (l, layer) in row.chunks(nl).enumerate() {
            let max = layer.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = layer.iter().map(|v| ((v - max) as f64).exp()).sum();
            sum[l * nl + c] += ((layer[c] - max) as f64).exp() / z;
        }
    }
    heatmap(
        path,
        &Grid {
            title: format!("logit lens: probability of each row's label (gold, else the last layer's prediction), softmax over the labels; {} rows", row_label.len()),
            row_labels: (0..n_layers).map(|l| format!("layer {l}")).collect(),
            col_labels: labels.names.clone(),
            values: sum.chunks(nl).map(|r| r.iter().zip(&count).map(|(v, &c)| (c > 0).then(|| v / c as f64)).collect()).collect(),
            value_label: "mean probability".into(),
            range: Some((0.0, 1.0)),
            x_desc: "label".into(),
            y_desc: "layer (logit lens)".into(),
        },
    )
}

/// The `k` largest entries of each row of `logits` (rows of `width`), largest first (ties: the
/// lower index first): (`[rows, k]` indices, `[rows, k]` values).
pub fn top_k_rows(logits: &[f32], width: usize, k: usize) -> (Vec<i64>, Vec<f32>) {
    let k = k.min(width);
    let mut ids = Vec::with_capacity(logits.len() / width * k);
    let mut vals = Vec::with_capacity(ids.capacity());
    for row in logits.chunks(width) {
        let mut order: Vec<usize> = (0..width).collect();
        let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
        if k < width {
            order.select_nth_unstable_by(k, cmp);
        }
        order.truncate(k);
        order.sort_by(cmp);
        ids.extend(order.iter().map(|&i| i as i64));
        vals.extend(order.iter().map(|&i| row[i]));
    }
    (ids, vals)
}

/// Running mean and variance (Welford, f64) of `width` values per group.
pub struct GroupStats {
    pub groups: Vec<String>,
    pub width: usize,
    /// [group]
    pub n: Vec<u64>,
    /// [group, width]
    mean: Vec<f64>,
    m2: Vec<f64>,
}

/// One row of a ranked table: a component's mean over a group's prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub group: usize,
    /// The component's index in the stats' width.
    pub index: usize,
    pub mean: f64,
    /// Sample standard deviation (None with fewer than 2 prompts).
    pub sd: Option<f64>,
    pub n: u64,
    /// 1 = the largest mean of the group.
    pub rank: usize,
}

impl GroupStats {
    pub fn new(groups: Vec<String>, width: usize) -> GroupStats {
        let g = groups.len();
        GroupStats { groups, width, n: vec![0; g], mean: vec![0.0; g * width], m2: vec![0.0; g * width] }
    }

    /// Adds one prompt's values (`[width]`) to group `g`.
    pub fn add(&mut self, g: usize, values: &[f32]) {
        self.n[g] += 1;
        let n = self.n[g] as f64;
        let w = self.width;
        for ((m, m2), &v) in self.mean[g * w..(g + 1) * w].iter_mut().zip(&mut self.m2[g * w..(g + 1) * w]).zip(values) {
            let delta = v as f64 - *m;
            *m += delta / n;
            *m2 += delta * (v as f64 - *m);
        }
    }

    /// The mean of group `g`: `[width]`.
    pub fn mean(&self, g: usize) -> &[f64] {
        &self.mean[g * self.width..(g + 1) * self.width]
    }

    /// Every (group, component), groups in order, each ranked by mean (largest first; ties by
    /// index). Groups without prompts are left out.
    pub fn ranked(&self) -> Vec<Ranked> {
        let mut out = Vec::with_capacity(self.groups.len() * self.width);
        for g in (0..self.groups.len()).filter(|&g| self.n[g] > 0) {
            let mean = self.mean(g);
            let mut order: Vec<usize> = (0..self.width).collect();
            order.sort_by(|a, b| mean[*b].total_cmp(&mean[*a]).then(a.cmp(b)));
            let mut rank = vec![0; self.width];
            order.iter().enumerate().for_each(|(r, &i)| rank[i] = r + 1);
            let n = self.n[g];
            out.extend((0..self.width).map(|i| Ranked { group: g, index: i, mean: mean[i], sd: (n > 1).then(|| (self.m2[g * self.width + i] / (n - 1) as f64).sqrt()), n, rank: rank[i] }));
        }
        out
    }
}

/// The contributions of a run: per group (each label, then `all`), the mean over its prompts
/// of each component's term (a prompt's term is its mean over the chosen positions).
pub struct ContribTables {
    /// [group, head_layers * n_heads] along the direction.
    pub heads: GroupStats,
    /// [group, neuron_layers * d_mlp] along the direction.
    pub neurons: GroupStats,
    /// [group, n_layers * n_heads]: DLA to the group's label token (`all`: each prompt's own).
    pub dla_heads: GroupStats,
    /// [group, n_layers * d_mlp]
    pub dla_neurons: GroupStats,
}

/// What a contributions run reads: the direction's readout, the labels (DLA reads their
/// lm_head rows at final_norm) and each prompt's group (a label index).
pub struct ContribSpec<'a> {
    pub readout: &'a Readout,
    pub labels: &'a LabelSet,
    pub positions: Positions,
    /// Per prompt, its gold label (None: the model's predicted label is its group).
    pub gold: &'a [Option<usize>],
    pub batch_size: usize,
}

/// The DLA readout of a label set: the lm_head rows of its tokens at final_norm.
pub fn dla_readout(model: &Model, labels: &LabelSet) -> Result<Readout> {
    labels.check_vocab(model.cfg.vocab_size)?;
    Readout::new(model, Site::final_norm(&model.cfg), &model.lm_head_rows(Some(&labels.token_ids))?.to_f32())
}

/// Means of consecutive row runs: `values` `[rows, width]`, `counts[p]` rows of prompt p:
/// `[prompts, width]`.
fn prompt_means(values: &[f32], width: usize, counts: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(counts.len() * width);
    let mut at = 0;
    for &c in counts {
        let mut m = vec![0.0f32; width];
        for r in at..at + c {
            m.iter_mut().zip(&values[r * width..(r + 1) * width]).for_each(|(m, v)| *m += v);
        }
        m.iter_mut().for_each(|m| *m /= c.max(1) as f32);
        out.extend(m);
        at += c;
    }
    out
}

/// Runs every prompt once (clean, batched) on `engine`, capturing what the direction's and the
/// labels' readouts need, and averages the terms per group. `per_batch(first_prompt, batch)`
/// receives each batch's per-prompt terms (to flush them) before the next batch runs.
pub fn contribution_tables(model: &Model, engine: &dyn Engine, prompts: &[Vec<u32>], spec: &ContribSpec, per_batch: &mut dyn FnMut(usize, &BatchTerms) -> Result<()>, progress: &ProgressBar) -> Result<ContribTables> {
    let cfg = &model.cfg;
    let labels = spec.labels;
    let dla = dla_readout(model, labels)?;
    let mut captures = spec.readout.captures(model, &spec.positions);
    for c in dla.captures(model, &spec.positions) {
        if !captures.iter().any(|k| k.site == c.site) {
            captures.push(c);
        }
    }
    let mut groups = labels.names.clone();
    groups.push("all".into());
    let all = labels.len();
    let (nh, dm) = (cfg.n_heads, cfg.d_mlp);
    let r = spec.readout;
    let mut t = ContribTables {
        heads: GroupStats::new(groups.clone(), r.head_layers * nh),
        neurons: GroupStats::new(groups.clone(), r.neuron_layers * dm),
        dla_heads: GroupStats::new(groups.clone(), cfg.n_layers * nh),
        dla_neurons: GroupStats::new(groups, cfg.n_layers * dm),
    };
    let last = Positions::List(vec![-1]);
    let mut first = 0;
    for batch in prompts.chunks(spec.batch_size.max(1)) {
        let req = RunRequest { captures: &captures, logits_at: Some(&last), logit_tokens: Some(&labels.token_ids), ..Default::default() };
        let out = engine.run_prompts(batch, &req).map_err(|e| e.in_batch(|i| first + i))?;
        let group: Vec<usize> = out.logits.chunks(labels.len()).enumerate().map(|(i, l)| spec.gold[first + i].unwrap_or_else(|| crate::logits::argmax(l))).collect();
        let counts: Vec<usize> = out.captured[0].positions.iter().map(Vec::len).collect();
        let row_group: Vec<usize> = counts.iter().zip(&group).flat_map(|(&c, &g)| std::iter::repeat_n(g, c)).collect();
        let post = PostNormScales::new(model, &out.captured, cfg.n_layers)?;
        let along = r.contributions(model, &out.captured, &post, &vec![0; row_group.len()])?;
        let to_label = dla.contributions(model, &out.captured, &post, &row_group)?;
        let terms = BatchTerms { along: along.prompt_means(&counts), dla: to_label.prompt_means(&counts), group };
        for (i, &g) in terms.group.iter().enumerate() {
            for (stats, values) in [(&mut t.heads, &terms.along.heads), (&mut t.neurons, &terms.along.neurons), (&mut t.dla_heads, &terms.dla.heads), (&mut t.dla_neurons, &terms.dla.neurons)] {
                let w = stats.width;
                stats.add(g, &values[i * w..(i + 1) * w]);
                stats.add(all, &values[i * w..(i + 1) * w]);
            }
        }
        per_batch(first, &terms)?;
        first += batch.len();
        progress.inc(batch.len() as u64);
    }
    Ok(t)
}

/// One batch's per-prompt terms (each the mean over the prompt's chosen positions: rows are
/// prompts).
pub struct BatchTerms {
    /// Along the direction.
    pub along: RowContribs,
    /// DLA to the logit of each prompt's group's label.
    pub dla: RowContribs,
    /// Per prompt, its group (label index).
    pub group: Vec<usize>,
}

/// Writes a ranked table: `layer,<unit>,label,mean,sd,n,rank` (units per layer `per_layer`;
/// sd empty with fewer than 2 prompts).
pub fn write_table(path: &Path, unit: &str, stats: &GroupStats, per_layer: usize) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record(["layer", unit, "label", "mean", "sd", "n", "rank"]).map_err(err)?;
    for r in stats.ranked() {
        let sd = r.sd.map_or(String::new(), |s| s.to_string());
        w.write_record([(r.index / per_layer).to_string(), (r.index % per_layer).to_string(), stats.groups[r.group].clone(), r.mean.to_string(), sd, r.n.to_string(), r.rank.to_string()]).map_err(err)?;
    }
    crate::io::write_atomic(path, &w.into_inner().map_err(|e| Error::file(path, e.to_string()))?)
}

/// A layer x head heatmap of each group's mean (one panel per group with prompts).
pub fn head_heatmaps(path: &Path, title: &str, stats: &GroupStats, n_heads: usize) -> Result<()> {
    let layers = stats.width / n_heads;
    let panels: Vec<Grid> = (0..stats.groups.len())
        .filter(|&g| stats.n[g] > 0)
        .map(|g| Grid {
            title: format!("{} (n={})", stats.groups[g], stats.n[g]),
            row_labels: (0..layers).map(|l| format!("layer {l}")).collect(),
            col_labels: (0..n_heads).map(|h| h.to_string()).collect(),
            values: stats.mean(g).chunks(n_heads).map(|r| r.iter().map(|v| Some(*v)).collect()).collect(),
            value_label: "mean contribution".into(),
            range: None,
            x_desc: "head".into(),
            y_desc: "layer".into(),
        })
        .collect();
    heatmaps(path, title, &panels)
}

/// The long tail: each group's |mean| sorted, over the largest, against the rank as a share of
/// the components (%); one panel per table (name, stats), at most 400 points a line.
pub fn long_tail_plot(path: &Path, title: &str, tables: &[(&str, &GroupStats)]) -> Result<()> {
    let groups = tables[0].1.groups.clone();
    let panels = tables
        .iter()
        .map(|(name, stats)| {
            let lines = (0..groups.len())
                .map(|g| {
                    if stats.n[g] == 0 {
                        return Vec::new();
                    }
                    let mut abs: Vec<f64> = stats.mean(g).iter().map(|v| v.abs()).collect();
                    abs.sort_by(|a, b| b.total_cmp(a));
                    let top = abs.first().copied().filter(|&t| t > 0.0).unwrap_or(1.0);
                    let step = abs.len().div_ceil(400).max(1);
                    let n = abs.len() as f64;
                    abs.iter().enumerate().step_by(step).map(|(i, v)| Point { x: 100.0 * (i + 1) as f64 / n, y: v / top, lo: f64::NAN, hi: f64::NAN }).collect()
                })
                .collect();
            (format!("{name} ({} components)", stats.width), lines)
        })
        .collect();
    line_panels(path, &LinePanels { title: title.into(), lines: groups, panels, x_range: (0.0, 100.0), x_desc: "rank, % of the components".into(), y_desc: "|mean| / largest |mean|".into(), y_range: (0.0, 1.0), reference: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welford_matches_two_pass() {
        let vals = [[1.0f32, -2.0], [3.0, 0.5], [2.5, 4.0]];
        let mut s = GroupStats::new(vec!["a".into()], 2);
        vals.iter().for_each(|v| s.add(0, v));
        let r = s.ranked();
        let mean0 = (1.0 + 3.0 + 2.5) / 3.0;
        let var0 = [1.0f64, 3.0, 2.5].iter().map(|v| (v - mean0).powi(2)).sum::<f64>() / 2.0;
        assert!((r[0].mean - mean0).abs() < 1e-12 && (r[0].sd.unwrap() - var0.sqrt()).abs() < 1e-12);
        assert_eq!((r[0].rank, r[1].rank), (1, 2));
    }

    #[test]
    fn top_k_order_and_ties() {
        let (ids, vals) = top_k_rows(&[0.5, 2.0, 2.0, -1.0, 3.0], 5, 3);
        assert_eq!(ids, [4, 1, 2]);
        assert_eq!(vals, [3.0, 2.0, 2.0]);
    }
}
