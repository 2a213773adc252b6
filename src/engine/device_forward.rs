//! The forward pass on a device (the CUDA backend's host code): the same steps as the CPU
//! reference in `forward.rs`, as launches of patchbay's kernels and bf16 GEMMs through the
//! `Driver` interface, so it runs unchanged on a GPU (cudarc) and on the emulated device.
//!
//! Numerics (DESIGN.md section 5): weights bf16 on the device, GEMM operands bf16 with f32
//! accumulation, the residual stream and every site f32, the KV cache bf16 (paged).
//! Interventions and captures at a site become a `DeviceSitePlan` applied inside the kernel
//! that produces the site where one exists (norms, activation) and by the standalone site
//! kernel otherwise; all captures of a call land in one device arena downloaded at the end.

use std::sync::Arc;

use half::bf16;

use crate::backend::device::{DeviceBuffer, DevPtr, Driver};
use crate::backend::ops::act::{ActMul, act_mul};
use crate::backend::ops::attention::{AttnParams, PagedBatch, PagedSeq, PatternOut, PatternRequest, attention};
use crate::backend::ops::elementwise::{bias_add, gather_rows_bf16, gather_rows_f32_bf16, head_mask, softcap, sum_heads, to_bf16};
use crate::backend::ops::embed::embed_tokens;
use crate::backend::ops::norm::{AddNorm, add_norm};
use crate::backend::ops::rope::{RopeTables, kv_write, qk_norm, rope};
use crate::backend::ops::site_ops::{DeviceSitePlan, SitePlanBuilder, site_ops};
use crate::engine::Engine;
use crate::engine::forward::{RunOutput, RunRequest};
use crate::intervene::{Hooks, RowMap};
use crate::model::Model;
use crate::model::checkpoint::{Linear, Weight};
use crate::model::config::{ModelConfig, NormWeight};
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// Positions per KV cache block.
const BLOCK_SIZE: usize = 16;

/// A linear layer on the device: w `[out, in]` bf16, b `[out]` f32.
struct DeviceLinear {
    w: DeviceBuffer<bf16>,
    b: Option<DeviceBuffer<f32>>,
    out: usize,
    inp: usize,
}

struct DeviceLayer {
    attn_norm: Option<DeviceBuffer<f32>>,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    q_norm: Option<DeviceBuffer<f32>>,
    k_norm: Option<DeviceBuffer<f32>>,
    o: DeviceLinear,
    attn_post_norm: Option<DeviceBuffer<f32>>,
    mlp_norm: Option<DeviceBuffer<f32>>,
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
    mlp_post_norm: Option<DeviceBuffer<f32>>,
}

/// A model's weights on a device.
pub struct DeviceModel {
    driver: Arc<dyn Driver>,
    pub cfg: ModelConfig,
    embed: DeviceBuffer<bf16>, // [vocab, d_model]
    /// [vocab, d_model]; None when tied to the embedding.
    lm_head: Option<DeviceBuffer<bf16>>,
    final_norm: DeviceBuffer<f32>, // [d_model]
    layers: Vec<DeviceLayer>,
}

/// Uploads a weight as bf16, converting from its stored dtype a chunk at a time (never a
/// whole f32 copy of the model on the host).
fn upload_weight(driver: &Arc<dyn Driver>, w: &Weight) -> Result<DeviceBuffer<bf16>> {
    let n = w.numel();
    let buf = DeviceBuffer::<bf16>::alloc(driver, n)?;
    if w.dtype == crate::model::config::DType::BF16 {
        driver.htod(buf.ptr(), w.bytes())?;
        return Ok(buf);
    }
    const CHUNK: usize = 1 << 20;
    let mut f = vec![0.0f32; CHUNK.min(n)];
    let mut h = vec![bf16::ZERO; CHUNK.min(n)];
    let mut i = 0;
    while i < n {
        let m = CHUNK.min(n - i);
        w.to_f32_range(i, i + m, &mut f[..m]);
        h[..m].iter_mut().zip(&f[..m]).for_each(|(h, f)| *h = bf16::from_f32(*f));
        driver.htod(buf.ptr().offset(i * 2), bytemuck::cast_slice(&h[..m]))?;
        i += m;
    }
    Ok(buf)
}

fn upload_f32(driver: &Arc<dyn Driver>, v: &Option<Vec<f32>>) -> Result<Option<DeviceBuffer<f32>>> {
    v.as_ref().map(|v| DeviceBuffer::from_slice(driver, v)).transpose()
}

fn upload_linear(driver: &Arc<dyn Driver>, l: &Linear) -> Result<DeviceLinear> {
    Ok(DeviceLinear { w: upload_weight(driver, &l.w)?, b: upload_f32(driver, &l.b)?, out: l.w.shape[0], inp: l.w.shape[1] })
}

impl DeviceModel {
    /// Copies the model's weights to the device (bf16 matrices, f32 norms and biases).
    pub fn upload(model: &Model, driver: Arc<dyn Driver>) -> Result<DeviceModel> {
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|lw| {
                Ok(DeviceLayer {
                    attn_norm: upload_f32(&driver, &lw.attn_norm)?,
                    q: upload_linear(&driver, &lw.q)?,
                    k: upload_linear(&driver, &lw.k)?,
                    v: upload_linear(&driver, &lw.v)?,
                    q_norm: upload_f32(&driver, &lw.q_norm)?,
                    k_norm: upload_f32(&driver, &lw.k_norm)?,
                    o: upload_linear(&driver, &lw.o)?,
                    attn_post_norm: upload_f32(&driver, &lw.attn_post_norm)?,
                    mlp_norm: upload_f32(&driver, &lw.mlp_norm)?,
                    gate: upload_linear(&driver, &lw.gate)?,
                    up: upload_linear(&driver, &lw.up)?,
                    down: upload_linear(&driver, &lw.down)?,
                    mlp_post_norm: upload_f32(&driver, &lw.mlp_post_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceModel {
            embed: upload_weight(&driver, &w.embed)?,
            lm_head: if model.cfg.tie_embeddings { None } else { Some(upload_weight(&driver, &w.lm_head)?) },
            final_norm: DeviceBuffer::from_slice(&driver, &w.final_norm)?,
            layers,
            cfg: model.cfg.clone(),
            driver,
        })
    }

    fn lm_head(&self) -> &DeviceBuffer<bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// y[t, out] = x[t, in] W^T (+ b): bf16 operands, f32 accumulation.
    fn linear(&self, x: &DeviceBuffer<bf16>, t: usize, l: &DeviceLinear, y: &DeviceBuffer<f32>) -> Result<()> {
        self.driver.gemm_bf16(t, l.out, l.inp, x.ptr(), l.inp, l.w.ptr(), l.inp, y.ptr(), l.out, 0.0)?;
        if let Some(b) = &l.b {
            bias_add(&*self.driver, y, b, t, l.out)?;
        }
        Ok(())
    }

    /// One forward over whole prompts (fresh caches), applying `hooks`.
    fn forward(&self, prompts: &[Vec<u32>], rows: &RowMap, hooks: &mut Hooks, logits_at: Option<&Positions>, logit_tokens: Option<&[u32]>) -> Result<(Vec<f32>, Vec<(usize, usize)>)> {
        let cfg = &self.cfg;
        let drv = &self.driver;
        let (d, qw, kvw, dm) = (cfg.d_model, cfg.q_width(), cfg.kv_width(), cfg.d_mlp);
        let t = rows.n_rows();
        if t == 0 {
            return Err(Error::input("empty input: no tokens to run"));
        }
        for (s, p) in prompts.iter().enumerate() {
            if let Some(&bad) = p.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(Error::input(format!("prompt {s}: token id {bad} is out of range (vocab_size {})", cfg.vocab_size)));
            }
        }
        // Paged KV cache of this call: fresh blocks for every prompt.
        let mut tables: Vec<Vec<u32>> = Vec::with_capacity(prompts.len());
        let mut n_blocks = 0u32;
        for p in prompts {
            let nb = p.len().div_ceil(BLOCK_SIZE) as u32;
            tables.push((n_blocks..n_blocks + nb).collect());
            n_blocks += nb;
        }
        let seqs: Vec<PagedSeq> = prompts.iter().zip(&tables).map(|(p, b)| PagedSeq { pos0: 0, n_new: p.len(), blocks: b }).collect();
        let batch = PagedBatch::new(drv, &seqs, BLOCK_SIZE, n_blocks as usize)?;
        let n_slots = n_blocks as usize * BLOCK_SIZE;
        let rope_tables = RopeTables::new(drv, &(0..prompts.len()).map(|s| cfg.rope_freqs(rows.total_len(s))).collect::<Vec<_>>())?;

        // Buffers, one per meaning.
        let resid = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] residual stream
        let a = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] sublayer input (attn_in, mlp_in, final_norm)
        let a16 = DeviceBuffer::<bf16>::alloc(drv, t * d)?; // [T, d_model] the same, GEMM operand
        let mut q = DeviceBuffer::<f32>::alloc(drv, t * qw)?; // [T, n_heads, d_head]
        let mut k = DeviceBuffer::<f32>::alloc(drv, t * kvw)?; // [T, n_kv_heads, d_head]
        let v = DeviceBuffer::<f32>::alloc(drv, t * kvw)?; // [T, n_kv_heads, d_head]
        let mut z = DeviceBuffer::<f32>::alloc(drv, t * qw)?; // [T, n_heads, d_head]
        let z16 = DeviceBuffer::<bf16>::alloc(drv, t * qw)?; // [T, n_heads * d_head] o_proj operand
        let o = DeviceBuffer::<f32>::alloc(drv, t * d)?; // [T, d_model] sublayer output
        let gate = DeviceBuffer::<f32>::alloc(drv, t * dm)?; // [T, d_mlp] gate, then act(gate) * up
        let up = DeviceBuffer::<f32>::alloc(drv, t * dm)?; // [T, d_mlp]
        let post16 = DeviceBuffer::<bf16>::alloc(drv, t * dm)?; // [T, d_mlp] down_proj operand
        let mut k_cache: Vec<DeviceBuffer<bf16>> = (0..cfg.n_layers).map(|_| DeviceBuffer::alloc(drv, n_slots * kvw)).collect::<Result<_>>()?; // per layer [slots, kv]
        let mut v_cache: Vec<DeviceBuffer<bf16>> = (0..cfg.n_layers).map(|_| DeviceBuffer::alloc(drv, n_slots * kvw)).collect::<Result<_>>()?;

        // Every capture of the call lands in one arena, each capture's rows at its own base.
        let mut bases = Vec::new();
        let mut arena_len = 0;
        for c in hooks.captured() {
            bases.push(arena_len);
            arena_len += c.data.len();
        }
        let arena = DeviceBuffer::<f32>::filled(drv, arena_len.max(1), 0)?;
        let plan = |site: Site| -> Result<DeviceSitePlan> {
            let mut b = SitePlanBuilder::new();
            for ro in hooks.row_ops(site, rows) {
                b.add_op(ro.row, ro.pos, ro.op, ro.operand_row, ro.slices)?;
            }
            if site.kind != SiteKind::Pattern {
                for rc in hooks.row_captures(site, rows) {
                    let w: usize = hooks.captured()[rc.capture].token_shape.iter().product();
                    b.add_capture(rc.row, bases[rc.capture] + rc.out_row * w)?;
                }
            }
            if b.is_empty() { Ok(DeviceSitePlan::empty()) } else { b.upload(drv) }
        };
        let one_plus = cfg.norm_weight == NormWeight::OnePlus;
        let norm = |resid_sites: [&DeviceSitePlan; 2], delta: Option<(&DeviceBuffer<f32>, Option<&DeviceBuffer<f32>>, &DeviceSitePlan)>, pre_w: Option<&DeviceBuffer<f32>>, out_site: &DeviceSitePlan| {
            add_norm(
                &**drv,
                &AddNorm {
                    resid: &resid,
                    delta: delta.map(|x| x.0),
                    post_w: delta.and_then(|x| x.1),
                    pre_w,
                    out_f32: &a,
                    out_bf16: Some(&a16),
                    t,
                    d,
                    eps: cfg.norm_eps,
                    one_plus,
                    delta_site: delta.map(|x| x.2),
                    resid_site0: Some(resid_sites[0]),
                    resid_site1: Some(resid_sites[1]),
                    out_site: Some(out_site),
                    capture: Some(&arena),
                },
            )
        };
        let empty = DeviceSitePlan::empty();

        // x = embed_tokens(ids) (* sqrt(d_model)); ResidPre(0); a = attn_norm(x); AttnIn(0).
        let tokens: Vec<u32> = prompts.iter().flatten().copied().collect();
        let ids = DeviceBuffer::<i32>::alloc(drv, t)?;
        embed_tokens(&**drv, &resid, &self.embed, cfg.vocab_size, d, &tokens, &ids, cfg.embed_scale.unwrap_or(1.0))?;
        norm([&plan(Site::new(0, SiteKind::ResidPre))?, &empty], None, self.layers[0].attn_norm.as_ref(), &plan(Site::new(0, SiteKind::AttnIn))?)?;

        let mut patterns: Vec<(usize, Vec<f32>, Vec<(usize, usize, usize)>)> = Vec::new(); // (layer, [n_pat, n_keys], (capture, out_row, head))
        for (l, lw) in self.layers.iter().enumerate() {
            let site = |kind| Site::new(l, kind);
            // ---- attention ----
            self.linear(&a16, t, &lw.q, &q)?;
            self.linear(&a16, t, &lw.k, &k)?;
            self.linear(&a16, t, &lw.v, &v)?;
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                qk_norm(&**drv, &mut q, qn, t, cfg.norm_eps)?;
                qk_norm(&**drv, &mut k, kn, t, cfg.norm_eps)?;
            }
            site_ops(&**drv, &q, t, qw, &plan(site(SiteKind::Q))?, Some(&arena))?;
            site_ops(&**drv, &k, t, kvw, &plan(site(SiteKind::K))?, Some(&arena))?;
            site_ops(&**drv, &v, t, kvw, &plan(site(SiteKind::V))?, Some(&arena))?;
            rope(&**drv, &mut q, &batch, &rope_tables, cfg.n_heads, cfg.d_head)?;
            rope(&**drv, &mut k, &batch, &rope_tables, cfg.n_kv_heads, cfg.d_head)?;
            site_ops(&**drv, &q, t, qw, &plan(site(SiteKind::RotQ))?, Some(&arena))?;
            site_ops(&**drv, &k, t, kvw, &plan(site(SiteKind::RotK))?, Some(&arena))?;
            kv_write(&**drv, &k, &v, &mut k_cache[l], &mut v_cache[l], &batch, kvw)?;
            // Pattern captures: every head of each captured row.
            let pat_rows: Vec<(usize, usize, usize)> = hooks
                .row_captures(site(SiteKind::Pattern), rows)
                .into_iter()
                .flat_map(|rc| (0..cfg.n_heads).map(move |h| (rc.row, rc.capture, rc.out_row * cfg.n_heads + h)))
                .collect();
            let params = AttnParams { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, d_head: cfg.d_head, scale: cfg.attn_scale, softcap: cfg.attn_softcap, window: cfg.layer_window[l] };
            if pat_rows.is_empty() {
                attention(&**drv, &batch, &params, &q, &k_cache[l], &v_cache[l], &mut z, None)?;
            } else {
                let pairs: Vec<(usize, usize)> = pat_rows.iter().map(|&(r, _, i)| (r, i % cfg.n_heads)).collect();
                let request = PatternRequest::new(drv, &pairs)?;
                let n_keys = hooks.n_keys();
                let mut out = DeviceBuffer::<f32>::alloc(drv, pairs.len() * n_keys)?;
                attention(&**drv, &batch, &params, &q, &k_cache[l], &v_cache[l], &mut z, Some(PatternOut { request: &request, out: &mut out, n_keys }))?;
                patterns.push((l, out.download()?, pat_rows.iter().map(|&(_, c, i)| (c, i / cfg.n_heads, i % cfg.n_heads)).collect()));
            }
            site_ops(&**drv, &z, t, qw, &plan(site(SiteKind::Z))?, Some(&arena))?;
            // o = o_proj(z); with HeadOut hooked, per head (z_h W_O[h]^T) then summed.
            let head_plan = plan(site(SiteKind::HeadOut))?;
            if hooks.touches(site(SiteKind::HeadOut)) {
                let result = DeviceBuffer::<f32>::alloc(drv, t * cfg.n_heads * d)?; // [T, n_heads, d_model]
                for h in 0..cfg.n_heads {
                    head_mask(&**drv, &z, &z16, t, cfg.n_heads, cfg.d_head, h)?;
                    let c: DevPtr = result.ptr().offset(h * d * 4);
                    drv.gemm_bf16(t, d, qw, z16.ptr(), qw, lw.o.w.ptr(), qw, c, cfg.n_heads * d, 0.0)?;
                }
                site_ops(&**drv, &result, t, cfg.n_heads * d, &head_plan, Some(&arena))?;
                sum_heads(&**drv, &result, lw.o.b.as_ref(), &o, t, cfg.n_heads, d)?;
            } else {
                to_bf16(&**drv, &z, &z16, t * qw)?;
                self.linear(&z16, t, &lw.o, &o)?;
            }
            // attn_out = post_norm(o); AttnOut; x += attn_out; ResidMid; a = mlp_norm(x); MlpIn.
            norm(
                [&plan(site(SiteKind::ResidMid))?, &empty],
                Some((&o, lw.attn_post_norm.as_ref(), &plan(site(SiteKind::AttnOut))?)),
                lw.mlp_norm.as_ref(),
                &plan(site(SiteKind::MlpIn))?,
            )?;
            // ---- MLP ----
            self.linear(&a16, t, &lw.gate, &gate)?;
            self.linear(&a16, t, &lw.up, &up)?;
            act_mul(
                &**drv,
                &ActMul { gate: &gate, up: &up, gate_b: None, up_b: None, out_bf16: Some(&post16), t, i: dm, act: cfg.activation, site: Some(&plan(site(SiteKind::MlpPost))?), capture: Some(&arena) },
            )?;
            self.linear(&post16, t, &lw.down, &o)?;
            // mlp_out = post_norm(o); MlpOut; x += mlp_out; ResidPost; then the next layer's
            // ResidPre and attn_norm (AttnIn), or the final norm (FinalNorm).
            let last = l + 1 == cfg.n_layers;
            let (next_pre, next_norm, next_site) = if last {
                (DeviceSitePlan::empty(), Some(&self.final_norm), plan(Site::final_norm(cfg))?)
            } else {
                (plan(Site::new(l + 1, SiteKind::ResidPre))?, self.layers[l + 1].attn_norm.as_ref(), plan(Site::new(l + 1, SiteKind::AttnIn))?)
            };
            norm([&plan(site(SiteKind::ResidPost))?, &next_pre], Some((&o, lw.mlp_post_norm.as_ref(), &plan(site(SiteKind::MlpOut))?)), next_norm, &next_site)?;
        }

        // ---- logits at the requested rows (a now holds the final norm's output) ----
        let logit_rows = rows.select(logits_at, "logits")?;
        let mut logits = Vec::new();
        if !logit_rows.is_empty() {
            let n = logit_rows.len();
            let sel: Vec<i32> = logit_rows.iter().map(|&(s, p)| rows.row(s, p).unwrap_or_default() as i32).collect();
            let sel = DeviceBuffer::from_slice(drv, &sel)?;
            let x16 = DeviceBuffer::<bf16>::alloc(drv, n * d)?; // [n, d_model]
            gather_rows_f32_bf16(&**drv, &a, t, &sel, &x16, n, d)?;
            let gathered;
            let head: &DeviceBuffer<bf16> = match logit_tokens {
                None => self.lm_head(),
                Some(ids) => {
                    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                        return Err(Error::input(format!("logit token {bad} is out of range (vocab_size {})", cfg.vocab_size)));
                    }
                    let idx = DeviceBuffer::from_slice(drv, &ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
                    gathered = DeviceBuffer::<bf16>::alloc(drv, ids.len() * d)?;
                    gather_rows_bf16(&**drv, self.lm_head(), cfg.vocab_size, &idx, &gathered, ids.len(), d)?;
                    &gathered
                }
            };
            let n_out = head.len() / d;
            let out = DeviceBuffer::<f32>::alloc(drv, n * n_out)?; // [n, vocab or n_tokens]
            drv.gemm_bf16(n, n_out, d, x16.ptr(), d, head.ptr(), d, out.ptr(), n_out, 0.0)?;
            if let Some(c) = cfg.final_softcap {
                softcap(&**drv, &out, n * n_out, c)?;
            }
            logits = out.download()?;
        }

        // ---- captures back to the host ----
        let arena_host = arena.download()?;
        for site in Site::all(cfg).into_iter().filter(|s| s.kind != SiteKind::Pattern) {
            for rc in hooks.row_captures(site, rows) {
                let c = hooks.captured_mut(rc.capture);
                let w: usize = c.token_shape.iter().product();
                let src = bases[rc.capture] + rc.out_row * w;
                c.data[rc.out_row * w..(rc.out_row + 1) * w].copy_from_slice(&arena_host[src..src + w]);
            }
        }
        let n_keys = hooks.n_keys();
        for (_, data, dests) in patterns {
            for (i, (capture, out_row, h)) in dests.into_iter().enumerate() {
                let c = hooks.captured_mut(capture);
                let at = (out_row * cfg.n_heads + h) * n_keys;
                c.data[at..at + n_keys].copy_from_slice(&data[i * n_keys..(i + 1) * n_keys]);
            }
        }
        self.driver.synchronize()?;
        Ok((logits, logit_rows))
    }
}

impl Engine for DeviceModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn device_name(&self) -> String {
        self.driver.name()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        let rows = RowMap::new(vec![0; prompts.len()], prompts.iter().map(Vec::len).collect());
        let mut hooks = Hooks::new(&self.cfg, &rows, req.interventions, req.captures, req.n_keys)?;
        let (logits, logit_rows) = self.forward(prompts, &rows, &mut hooks, req.logits_at, req.logit_tokens)?;
        Ok(RunOutput { logits, logit_rows, captured: hooks.into_captured() })
    }
}
