//! The one forward pass, for every family (quirks are ModelConfig fields), on the CPU
//! backend, at the model's `precision` (f32, the reference, or the device's bf16 numerics). Varlen batch: the rows of all sequences are concatenated, GEMMs run on
//! all rows at once, attention runs per sequence over its KV cache plus its new rows.
//! Every site of DESIGN.md section 2 passes through `hooks.apply`, where interventions and
//! captures happen.

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::{Precision, cpu};
use crate::backend::ops::act::act_mul_ref;
use crate::backend::ops::attention::attention_ref;
use crate::backend::ops::elementwise::{softcap_ref, sum_heads_ref};
use crate::backend::ops::metrics::label_metrics_ref;
use crate::backend::ops::norm::rmsnorm_ref;
use crate::backend::ops::rope::rope_ref;
use crate::intervene::{Capture, Captured, Held, Hooks, Intervention, RowMap};
use crate::logits::LabelMetricsRow;
use crate::model::Model;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// Keys (post-RoPE, what RotK shows) and values of one sequence, all layers. A resumed
/// segment's cache continues the first `prefix_len` positions of a shared clean cache and holds
/// only its own rows, and only for the layers from where it resumed.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// The clean cache this one continues, and how many of its positions.
    prefix: Option<(Arc<KvCache>, usize)>,
    /// Own rows per layer: [len - prefix_len, n_kv_heads, d_head]
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Total positions (prefix included).
    pub len: usize,
    /// Layers below this one hold no keys (a segment resumed at this layer).
    first_layer: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> KvCache {
        KvCache { prefix: None, k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers], len: 0, first_layer: 0 }
    }

    /// A complete cache of `len` positions from its keys and values per layer
    /// (`[len, n_kv_heads, d_head]` each).
    pub(crate) fn from_layers(k: Vec<Vec<f32>>, v: Vec<Vec<f32>>, len: usize) -> KvCache {
        KvCache { prefix: None, k, v, len, first_layer: 0 }
    }

    /// A cache continuing positions `0..p0` of `clean` (which must be complete at `layer` and
    /// above), for a segment resumed at `layer`.
    pub fn resume(clean: &Arc<KvCache>, layer: usize, p0: usize) -> Result<KvCache> {
        if p0 > clean.len || layer < clean.first_layer {
            return Err(Error::input(format!(
                "cannot resume at layer {layer}, position {p0} from a cache of {} positions starting at layer {}",
                clean.len, clean.first_layer
            )));
        }
        // Point at the cache that owns the rows, so prefixes never chain.
        let prefix = match &clean.prefix {
            Some((base, n)) if p0 <= *n => (base.clone(), p0),
            _ => (clean.clone(), p0),
        };
        let n_layers = clean.k.len();
        Ok(KvCache { prefix: Some(prefix), k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers], len: p0, first_layer: layer })
    }

    /// Keys and values of layer `l` for positions 0..len, each [len, n_kv_heads, d_head].
    pub fn layer(&self, l: usize) -> (std::borrow::Cow<'_, [f32]>, std::borrow::Cow<'_, [f32]>) {
        use std::borrow::Cow;
        match &self.prefix {
            None => (Cow::Borrowed(&self.k[l]), Cow::Borrowed(&self.v[l])),
            Some((base, n)) => {
                let (bk, bv) = base.layer(l);
                let w = if base.len == 0 { 0 } else { bk.len() / base.len };
                let join = |b: &[f32], own: &[f32]| [&b[..n * w], own].concat();
                (Cow::Owned(join(&bk, &self.k[l])), Cow::Owned(join(&bv, &self.v[l])))
            }
        }
    }
}

/// The rows a sequence feeds into a forward call.
pub enum SeqRows<'a> {
    /// New tokens, embedded (the call starts at layer 0).
    Tokens(&'a [u32]),
    /// The residual entering the start layer for the new positions: [n_new, d_model].
    Resid(&'a [f32]),
}

/// One sequence of a forward call: new rows appended to its cache.
pub struct SeqInput<'a> {
    pub rows: SeqRows<'a>,
    pub cache: &'a mut KvCache,
}

impl<'a> SeqInput<'a> {
    pub fn tokens(tokens: &'a [u32], cache: &'a mut KvCache) -> Self {
        SeqInput { rows: SeqRows::Tokens(tokens), cache }
    }
    /// Number of new positions, given the model width (for residual rows).
    fn n_new(&self, d_model: usize) -> usize {
        match self.rows {
            SeqRows::Tokens(t) => t.len(),
            SeqRows::Resid(x) => x.len() / d_model,
        }
    }
}

pub struct ForwardOutput {
    /// [n_logit_rows, vocab], rows in the order of `logit_rows`.
    pub logits: Vec<f32>,
    /// (sequence, absolute position) of each logits row.
    pub logit_rows: Vec<(usize, usize)>,
}

/// What a forward call does besides computing: interventions, captures, which logits.
#[derive(Clone, Copy, Default)]
pub struct RunRequest<'a> {
    pub interventions: &'a [Intervention],
    pub captures: &'a [Capture],
    /// Positions (relative to each sequence) whose logits are returned.
    pub logits_at: Option<&'a Positions>,
    /// Only these vocabulary entries (e.g. a label set), in this order; None = the whole vocabulary.
    pub logit_tokens: Option<&'a [u32]>,
    /// Key columns of captured patterns (None: the longest sequence).
    pub n_keys: Option<usize>,
    /// Label indices (a, b, c) per logits row (in `RunOutput::logit_rows` order): the engine
    /// also computes [`label_metrics_row`] of each row (`RunOutput::metrics`), a device with its
    /// `label_metrics_f32` kernel, so only the logits and the metrics come back.
    pub label_metrics: Option<&'a [[i32; 3]]>,
    /// Also hold the captures where they were made ([`RunOutput::held`]), for later patches
    /// that read them in place ([`Op::PatchHeld`](crate::intervene::Op)).
    pub hold_captures: bool,
}

/// The result of [`Model::run`].
pub struct RunOutput {
    /// [n_logit_rows, vocab]
    pub logits: Vec<f32>,
    /// (sequence, absolute position) of each logits row.
    pub logit_rows: Vec<(usize, usize)>,
    /// The captures, in request order. With `hold_captures`, a device leaves their `data` empty
    /// (nothing comes back) unless one of them is not finite.
    pub captured: Vec<Captured>,
    /// With `hold_captures`: the captures, held by the engine (capture indices in request order).
    pub held: Option<Held>,
    /// With `label_metrics`: the metrics of each logits row; else empty.
    pub metrics: Vec<LabelMetricsRow>,
    /// NaN and +-Inf among the logits and captures, when the engine counted them as it made
    /// them (a device: one counter the kernels add to, read once per call); None when not.
    pub nonfinite: Option<u64>,
}

/// The request's label-metric indices as (a, b, c) columns, checked against the call's `n_rows`
/// logits rows; None when not asked.
pub(crate) fn metric_columns(req: &RunRequest, n_rows: usize) -> Result<Option<[Vec<i32>; 3]>> {
    let Some(idx) = req.label_metrics else { return Ok(None) };
    if idx.len() != n_rows {
        return Err(Error::input(format!("label metrics: {} index triples for {n_rows} logits rows", idx.len())));
    }
    Ok(Some([0, 1, 2].map(|k| idx.iter().map(|r| r[k]).collect())))
}

/// [`label_metrics_ref`] of `logits` (`[n_rows, width]`) at the request's indices (empty when
/// not asked): the engines that compute on the host.
pub(crate) fn host_label_metrics(req: &RunRequest, logits: &[f32], n_rows: usize) -> Result<Vec<LabelMetricsRow>> {
    match metric_columns(req, n_rows)? {
        None => Ok(Vec::new()),
        Some(_) if n_rows == 0 => Ok(Vec::new()),
        Some([a, b, c]) => label_metrics_ref(logits, logits.len() / n_rows, &a, &b, &c),
    }
}

fn row_map(seqs: &[SeqInput], d_model: usize) -> RowMap {
    RowMap::new(seqs.iter().map(|s| s.cache.len).collect(), seqs.iter().map(|s| s.n_new(d_model)).collect())
}

impl Model {
    /// Resolves interventions and captures against `seqs`, runs the forward, returns logits at
    /// `logits_at` and the captures. Captured patterns have `n_keys` key columns when given
    /// (to align several calls), else as many as the longest sequence.
    pub fn run(
        &self,
        seqs: &mut [SeqInput],
        interventions: &[Intervention],
        captures: &[Capture],
        logits_at: Option<&Positions>,
        n_keys: Option<usize>,
    ) -> Result<RunOutput> {
        self.run_from(0, seqs, &RunRequest { interventions, captures, logits_at, n_keys, ..Default::default() })
    }

    /// As [`Model::run`], starting at block `start_layer`: every sequence feeds residual rows
    /// (`SeqRows::Resid`, the clean resid_pre of that layer) after a cache resumed at that
    /// layer or below. This is the resumed segment of DESIGN.md section 1.
    pub fn run_from(&self, start_layer: usize, seqs: &mut [SeqInput], req: &RunRequest) -> Result<RunOutput> {
        let mut hooks = Hooks::new(&self.cfg, &row_map(seqs, self.cfg.d_model), req.interventions, req.captures, req.n_keys)?;
        if hooks.reads_device_held() {
            return Err(Error::input("a patch reads rows a device holds: only that device's engine can apply it"));
        }
        let out = self.forward(start_layer, seqs, &mut hooks, req.logits_at, req.logit_tokens)?;
        let metrics = host_label_metrics(req, &out.logits, out.logit_rows.len())?;
        let captured = hooks.into_captured();
        Ok(RunOutput { logits: out.logits, logit_rows: out.logit_rows, held: req.hold_captures.then(|| Held::host(&captured)), captured, metrics, nonfinite: None })
    }

    /// Runs `seqs` (new rows after each cache) through blocks `start_layer..`, applying `hooks`.
    /// Logits are computed only at `logits_at` (positions relative to each sequence's length
    /// after this call; positions this call does not compute are skipped), and only for the
    /// vocabulary entries `logit_tokens` when given (the lm_head rows of a label set).
    fn forward(
        &self,
        start_layer: usize,
        seqs: &mut [SeqInput],
        hooks: &mut Hooks,
        logits_at: Option<&Positions>,
        logit_tokens: Option<&[u32]>,
    ) -> Result<ForwardOutput> {
        let cfg = &self.cfg;
        let (d, qw, kvw) = (cfg.d_model, cfg.q_width(), cfg.kv_width());
        let rows = row_map(seqs, d);
        let t = rows.n_rows();
        if t == 0 {
            return Err(Error::input("empty input: no tokens to run"));
        }
        if start_layer >= cfg.n_layers {
            return Err(Error::input(format!("start layer {start_layer} is out of range (the model has {} layers)", cfg.n_layers)));
        }
        for (s, seq) in seqs.iter().enumerate() {
            let cache = &seq.cache;
            if cache.k.len() != cfg.n_layers {
                return Err(Error::input(format!("prompt {s}: KV cache has {} layers, the model {}", cache.k.len(), cfg.n_layers)));
            }
            if cache.first_layer > start_layer {
                return Err(Error::input(format!("prompt {s}: its cache starts at layer {}, the call at layer {start_layer}", cache.first_layer)));
            }
            match seq.rows {
                SeqRows::Tokens(tokens) => {
                    if start_layer != 0 {
                        return Err(Error::input(format!("prompt {s}: tokens can only start at layer 0 (give residual rows to resume)")));
                    }
                    if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                        return Err(Error::input(format!("prompt {s}: token id {bad} is out of range (vocab_size {})", cfg.vocab_size)));
                    }
                }
                SeqRows::Resid(x) => {
                    if x.len() % d != 0 {
                        return Err(Error::input(format!("prompt {s}: residual rows of {} values are not a multiple of d_model {d}", x.len())));
                    }
                }
            }
        }
        let positions: Vec<usize> = rows.row_positions().into_iter().map(|(_, p)| p).collect();
        // Numerics: f32 throughout, or the device's (backend::Precision::Bf16): the GEMMs round
        // their operands to bf16, and the embedding and the KV cache are bf16 (rounded here).
        let prec = self.precision;
        let bf16 = prec == Precision::Bf16;
        let n_keys = hooks.n_keys();

        // x = embed_tokens(ids) (* sqrt(d_model) for Gemma), or the given residual rows
        let mut x = vec![0.0f32; t * d]; // [T, d_model]
        for (s, seq) in seqs.iter().enumerate() {
            let dst = &mut x[rows.row_start[s] * d..(rows.row_start[s] + rows.new_len[s]) * d];
            match seq.rows {
                SeqRows::Resid(src) => dst.copy_from_slice(src),
                SeqRows::Tokens(tokens) => dst.par_chunks_mut(d).zip(tokens.par_iter()).for_each(|(row, &id)| {
                    let id = id as usize;
                    self.weights.embed.to_f32_range(id * d, (id + 1) * d, row);
                    if bf16 {
                        cpu::round_to_bf16(row);
                    }
                    if let Some(s) = cfg.embed_scale {
                        row.iter_mut().for_each(|v| *v *= s);
                    }
                }),
            }
        }

        // Buffers, one per meaning.
        let mut a = vec![0.0f32; t * d]; // [T, d_model] sublayer input (attn_in, then mlp_in)
        let mut q = vec![0.0f32; t * qw]; // [T, n_heads, d_head]
        let mut k = vec![0.0f32; t * kvw]; // [T, n_kv_heads, d_head]
        let mut v = vec![0.0f32; t * kvw]; // [T, n_kv_heads, d_head]
        let mut z = vec![0.0f32; t * qw]; // [T, n_heads, d_head]
        let mut o = vec![0.0f32; t * d]; // [T, d_model] sublayer output (attn_out, then mlp_out)
        let mut gate = vec![0.0f32; t * cfg.d_mlp]; // [T, d_mlp] gate, then act(gate) * up
        let mut up = vec![0.0f32; t * cfg.d_mlp]; // [T, d_mlp]
        let mut tmp = vec![0.0f32; t * qw.max(d)]; // norm scratch

        // The rope frequencies depend on each sequence's length for longrope.
        let rope_tables: Vec<(Vec<f32>, f32)> = (0..rows.n_seqs()).map(|s| cfg.rope_freqs(rows.total_len(s))).collect();

        for (l, lw) in self.weights.layers.iter().enumerate().skip(start_layer) {
            let site = |kind| Site::new(l, kind);
            hooks.apply(site(SiteKind::ResidPre), &rows, &mut x, d);

            // ---- attention ----
            // a = input_layernorm(x)  (OLMo 2: x itself)
            match &lw.attn_norm {
                Some(w) => rmsnorm_ref(&x, w, cfg.norm_eps, cfg.norm_weight, &mut a),
                None => a.copy_from_slice(&x),
            }
            hooks.apply(site(SiteKind::AttnIn), &rows, &mut a, d);
            cpu::linear(&a, t, &lw.q, &mut q, prec);
            cpu::linear(&a, t, &lw.k, &mut k, prec);
            cpu::linear(&a, t, &lw.v, &mut v, prec);
            // OLMo 2: q = q_norm(q_proj(x)), k = k_norm(k_proj(x)) over the whole projection.
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                rmsnorm_ref(&q, qn, cfg.norm_eps, cfg.norm_weight, &mut tmp[..t * qw]);
                q.copy_from_slice(&tmp[..t * qw]);
                rmsnorm_ref(&k, kn, cfg.norm_eps, cfg.norm_weight, &mut tmp[..t * kvw]);
                k.copy_from_slice(&tmp[..t * kvw]);
            }
            hooks.apply(site(SiteKind::Q), &rows, &mut q, qw);
            hooks.apply(site(SiteKind::K), &rows, &mut k, kvw);
            hooks.apply(site(SiteKind::V), &rows, &mut v, kvw);
            // Per sequence (each has its own frequencies), sequences in parallel.
            split_rows(&mut q, &rows.new_len, qw).into_par_iter().zip(split_rows(&mut k, &rows.new_len, kvw)).enumerate().for_each(|(s, (qs, ks))| {
                let pos = &positions[rows.row_start[s]..rows.row_start[s] + rows.new_len[s]];
                let (inv_freq, factor) = &rope_tables[s];
                rope_ref(qs, cfg.n_heads, cfg.d_head, pos, inv_freq, *factor);
                rope_ref(ks, cfg.n_kv_heads, cfg.d_head, pos, inv_freq, *factor);
            });
            hooks.apply(site(SiteKind::RotQ), &rows, &mut q, qw);
            hooks.apply(site(SiteKind::RotK), &rows, &mut k, kvw);

            // softmax(q k^T * scale (soft-capped), causal (+ sliding window)) v, per sequence
            let want_pattern = hooks.touches(site(SiteKind::Pattern));
            let mut pattern = if want_pattern { vec![0.0f32; t * cfg.n_heads * n_keys] } else { Vec::new() }; // [T, n_heads, n_keys]
            // Sequences in parallel; each appends its new K/V and attends over its cache.
            let pattern_width = if want_pattern { cfg.n_heads * n_keys } else { 0 };
            let z_parts = split_rows(&mut z, &rows.new_len, qw);
            let p_parts = split_rows(&mut pattern, &rows.new_len, pattern_width);
            seqs.par_iter_mut().zip(z_parts).zip(p_parts).enumerate().for_each(|(s, ((seq, zs), ps))| {
                let (r0, r1) = (rows.row_start[s], rows.row_start[s] + rows.new_len[s]);
                let cache = &mut *seq.cache;
                let at = cache.k[l].len();
                cache.k[l].extend_from_slice(&k[r0 * kvw..r1 * kvw]);
                cache.v[l].extend_from_slice(&v[r0 * kvw..r1 * kvw]);
                if bf16 {
                    cpu::round_to_bf16(&mut cache.k[l][at..]);
                    cpu::round_to_bf16(&mut cache.v[l][at..]);
                }
                let (kc, vc) = cache.layer(l);
                attention_ref(
                    &q[r0 * qw..r1 * qw],
                    &kc,
                    &vc,
                    zs,
                    want_pattern.then_some(ps),
                    n_keys,
                    rows.cache_len[s],
                    cfg.n_heads,
                    cfg.n_kv_heads,
                    cfg.d_head,
                    cfg.attn_scale,
                    cfg.attn_softcap,
                    cfg.sliding_window[l],
                );
            });
            if want_pattern {
                hooks.apply(site(SiteKind::Pattern), &rows, &mut pattern, cfg.n_heads * n_keys);
            }
            hooks.apply(site(SiteKind::Z), &rows, &mut z, qw);

            // o = o_proj(z); with HeadOut hooked, as the sum of per-head products.
            if hooks.touches(site(SiteKind::HeadOut)) {
                let mut result = vec![0.0f32; t * cfg.n_heads * d]; // [T, n_heads, d_model]
                let mut zh = vec![0.0f32; t * qw]; // [T, n_heads, d_head], zero but head h
                let mut oh = vec![0.0f32; t * d]; // [T, d_model]
                for h in 0..cfg.n_heads {
                    // z_h @ W_O[:, h]^T as o_proj of z with the other heads zeroed.
                    zh.fill(0.0);
                    for r in 0..t {
                        let head = r * qw + h * cfg.d_head..r * qw + (h + 1) * cfg.d_head;
                        zh[head.clone()].copy_from_slice(&z[head]);
                    }
                    cpu::matmul(&zh, t, &lw.o.w, &mut oh, prec);
                    for r in 0..t {
                        result[(r * cfg.n_heads + h) * d..(r * cfg.n_heads + h + 1) * d].copy_from_slice(&oh[r * d..(r + 1) * d]);
                    }
                }
                hooks.apply(site(SiteKind::HeadOut), &rows, &mut result, cfg.n_heads * d);
                sum_heads_ref(&result, lw.o.b.as_deref(), &mut o, cfg.n_heads, d);
            } else {
                cpu::linear(&z, t, &lw.o, &mut o, prec);
            }
            if let Some(w) = &lw.attn_post_norm {
                rmsnorm_ref(&o, w, cfg.norm_eps, cfg.norm_weight, &mut tmp[..t * d]);
                o.copy_from_slice(&tmp[..t * d]);
            }
            hooks.apply(site(SiteKind::AttnOut), &rows, &mut o, d);
            add_into(&mut x, &o);
            hooks.apply(site(SiteKind::ResidMid), &rows, &mut x, d);

            // ---- MLP ----
            match &lw.mlp_norm {
                Some(w) => rmsnorm_ref(&x, w, cfg.norm_eps, cfg.norm_weight, &mut a),
                None => a.copy_from_slice(&x),
            }
            hooks.apply(site(SiteKind::MlpIn), &rows, &mut a, d);
            cpu::linear(&a, t, &lw.gate, &mut gate, prec);
            cpu::linear(&a, t, &lw.up, &mut up, prec);
            act_mul_ref(&mut gate, &up, cfg.activation);
            hooks.apply(site(SiteKind::MlpPost), &rows, &mut gate, cfg.d_mlp);
            cpu::linear(&gate, t, &lw.down, &mut o, prec);
            if let Some(w) = &lw.mlp_post_norm {
                rmsnorm_ref(&o, w, cfg.norm_eps, cfg.norm_weight, &mut tmp[..t * d]);
                o.copy_from_slice(&tmp[..t * d]);
            }
            hooks.apply(site(SiteKind::MlpOut), &rows, &mut o, d);
            add_into(&mut x, &o);
            hooks.apply(site(SiteKind::ResidPost), &rows, &mut x, d);
        }
        for (s, seq) in seqs.iter_mut().enumerate() {
            seq.cache.len += rows.new_len[s];
        }

        // ---- final norm and logits ----
        rmsnorm_ref(&x, &self.weights.final_norm, cfg.norm_eps, cfg.norm_weight, &mut a);
        hooks.apply(Site::final_norm(cfg), &rows, &mut a, d);
        let logit_rows = rows.select(logits_at, "logits")?;
        let n = logit_rows.len();
        let head = self.lm_head_rows(logit_tokens)?;
        let mut logits = vec![0.0f32; n * head.shape[0]]; // [n, vocab or n_tokens]
        if n > 0 {
            let sel: Vec<f32> = logit_rows
                .iter()
                .flat_map(|&(s, p)| {
                    let r = rows.row(s, p).unwrap_or_default();
                    a[r * d..(r + 1) * d].iter().copied()
                })
                .collect(); // [n, d_model]
            cpu::matmul(&sel, n, &head, &mut logits, prec);
            if let Some(c) = cfg.final_softcap {
                softcap_ref(&mut logits, c);
            }
        }
        Ok(ForwardOutput { logits, logit_rows })
    }
}

impl Model {
    /// The lm_head `[vocab, d_model]`, or only its rows `tokens` in that order (Err naming a
    /// token out of range).
    pub fn lm_head_rows(&self, tokens: Option<&[u32]>) -> Result<crate::model::checkpoint::Weight> {
        match tokens {
            None => Ok(self.weights.lm_head.clone()),
            Some(ids) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(Error::input(format!("logit token {bad} is out of range (vocab_size {})", self.cfg.vocab_size)));
                }
                Ok(self.weights.lm_head.gather_rows(ids))
            }
        }
    }
}

/// Splits `x` (rows of `width`) into consecutive parts of `lens[i]` rows (empty parts when
/// `width` is 0).
fn split_rows<'a>(mut x: &'a mut [f32], lens: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(lens.len());
    for &n in lens {
        let (head, tail) = std::mem::take(&mut x).split_at_mut(n * width);
        parts.push(head);
        x = tail;
    }
    parts
}

/// x += y
fn add_into(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
}
