//! The engine: the one forward pass on the CPU reference (`forward`) and on a device
//! (`device_forward`, the CUDA backend's host code), behind one interface ([`Engine`]).
//!
//! # Why two forwards
//!
//! `forward` is the oracle: f32 throughout (at `Precision::F32`, the default; at `Bf16` it rounds
//! GEMM operands, the embedding and the KV cache where the device does), weights converted tile by
//! tile inside a plain GEMM,
//! one host buffer per meaning, every step a few lines that mirror the transformers code
//! (llm.c keeps its CPU reference beside its kernels the same way). It is checked against
//! Hugging Face (tests/golden_hf.rs) and every faster path is checked against it.
//! `device_forward` is the fast path: bf16 weights and KV pages on the device, fused kernels
//! (norm + residual + site plan, attention with soft-cap and sliding window), cuBLAS GEMMs,
//! interventions compiled into per-site plans, launches through the `Driver` interface so the
//! same host code runs on a GPU and on the emulated device (tests/device_forward.rs compares it
//! with `forward`). One generic forward over both would either give up the fusions (and the
//! speed) or make the oracle as hard to read as the kernels; the price of two is that they can
//! drift, which the rule below and tests/forward_parity.rs guard against.
//!
//! # What a family quirk touches
//!
//! A family difference is a field of `ModelConfig` (src/model/config.rs), never a branch on the
//! family. Adding or changing one that alters the math means, in this order:
//! 1. config.rs: parse it (an error naming the field for values patchbay cannot run);
//! 2. if it is a tensor (a bias, an extra norm), checkpoint.rs loads it as an optional member of
//!    `LayerWeights`/`ModelWeights`, and both forwards apply it when present;
//! 3. `forward` (the CPU reference, and `backend::cpu` / the op's `<op>_ref` when the math
//!    lives there) reads it;
//! 4. `device_forward` reads it: passes it to the kernel's launcher (`backend/ops/<op>.rs`) and
//!    the kernel (`kernels/<op>.cu`), whose `<op>_ref` and tests/kernel_<op>.rs cover it;
//! 5. a fixture family or a synthetic config (model/synth.rs) that sets it, so the HF goldens
//!    and the device-vs-reference tests exercise it.
//!
//! tests/forward_parity.rs fails when a field is read by one forward and not the other; fields
//! that change no math (reporting, decoding) or reach the forwards only as weights are listed
//! there with their reason.

pub mod device_forward;
pub mod finite;
pub mod forward;

use std::any::Any;
use std::sync::Arc;

use crate::backend::Precision;
use crate::model::config::ModelConfig;
use crate::sites::{Positions, Site, SiteKind};
use crate::intervene::{Capture, Held};
use crate::{Error, Result};
use forward::{KvCache, SeqInput, SeqRows};
pub use forward::{RunOutput, RunRequest};

/// A prompt's clean run kept for resumed segments (DESIGN.md section 1): its KV cache and the
/// residual entering every layer. Opaque: only the engine that made it can resume from it
/// (host vectors on the CPU; pool blocks and a device buffer on a device, released on drop).
pub struct CleanRun {
    /// Prompt length.
    pub len: usize,
    state: Box<dyn Any + Send + Sync>,
}

impl CleanRun {
    pub fn new<S: Any + Send + Sync>(len: usize, state: S) -> CleanRun {
        CleanRun { len, state: Box::new(state) }
    }
    /// The engine-specific state; an error when another kind of engine made this run.
    pub fn state<S: Any>(&self) -> Result<&S> {
        self.state.downcast_ref().ok_or_else(|| Error::input("a clean run can only be resumed by the engine (device) that made it"))
    }
}

/// A resumed segment: rows `p0..clean.len` of the clean run's prompt, recomputed from the call's
/// start layer over the clean KV cache of positions `< p0`.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    pub clean: &'a CleanRun,
    pub p0: usize,
}

/// A sequence being decoded: its KV cache, grown by each [`Engine::decode`] call. Opaque: only
/// the engine that made it can extend it (a `KvCache` on the CPU; pool blocks on a device,
/// released on drop).
pub struct DecodeSeq {
    /// Positions in the cache.
    len: usize,
    /// Set while a call extends the sequence, cleared when it succeeds: a failed call may have
    /// written part of its rows, so the sequence is refused afterwards.
    broken: bool,
    state: Box<dyn Any + Send + Sync>,
}

impl DecodeSeq {
    pub fn new<S: Any + Send + Sync>(state: S) -> DecodeSeq {
        DecodeSeq { len: 0, broken: false, state: Box::new(state) }
    }
    /// Positions in the cache (prompt and fed tokens).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The engine-specific states of a call that appends `tokens[i]` to `seqs[i]`: an error
    /// (nothing changed) when the shapes differ, a token list is empty, another kind of engine
    /// made a sequence or an earlier call on one failed. Call [`DecodeSeq::grown`] when the
    /// call succeeds; until then the sequences count as broken.
    pub fn begin<'a, S: Any>(seqs: &'a mut [&mut DecodeSeq], tokens: &[&[u32]]) -> Result<Vec<&'a mut S>> {
        if seqs.len() != tokens.len() {
            return Err(Error::input(format!("decode: {} sequences but {} token lists", seqs.len(), tokens.len())));
        }
        if let Some(i) = tokens.iter().position(|t| t.is_empty()) {
            return Err(Error::input(format!("decode: sequence {i} has no new tokens")));
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.broken {
                return Err(Error::input(format!("decode: sequence {i}: an earlier decode call on it failed; start it again")));
            }
            if !s.state.is::<S>() {
                return Err(Error::input("a decoded sequence can only be extended by the engine (device) that made it"));
            }
        }
        Ok(seqs
            .iter_mut()
            .filter_map(|s| {
                s.broken = true;
                s.state.downcast_mut()
            })
            .collect())
    }
    /// Records the rows a successful call appended.
    pub fn grown(seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]]) {
        for (s, t) in seqs.iter_mut().zip(tokens) {
            s.len += t.len();
            s.broken = false;
        }
    }
}

/// Runs prompts with interventions and captures, resumes segments from kept clean runs, and
/// decodes (sequences whose KV cache grows call by call): what capture, scoring, both patching
/// methods and generation need from any backend.
pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// Where it runs ("cpu", "emu", "cuda:0 ...").
    fn device_name(&self) -> String;
    /// One forward over `prompts` (a fresh cache each) with the request's interventions,
    /// captures and logits.
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput>;
    /// As [`Engine::run_prompts`], also keeping each prompt's clean run for
    /// [`Engine::run_segments`]. The request should carry no interventions (what is kept is
    /// what the request computes).
    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)>;
    /// Runs `segs` from block `start_layer` on (every segment's clean run must come from this
    /// engine) with the request's interventions (positions absolute in each prompt), captures
    /// and logits (positions relative to each prompt's length).
    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput>;
    /// Bytes a kept clean run of `len` positions holds (for memory budgets).
    fn clean_run_bytes(&self, len: usize) -> usize;
    /// A kept clean run as bytes (its KV cache and residuals as the engine holds them), to
    /// spill it out of memory; [`Engine::clean_run_from_bytes`] makes it again, bit for bit.
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>>;
    /// The clean run of `len` positions that [`Engine::clean_run_to_bytes`] wrote as `bytes`.
    fn clean_run_from_bytes(&self, len: usize, bytes: &[u8]) -> Result<CleanRun>;
    /// A rough rate of this engine's forward, in FLOP/s (not a measurement: the resumed
    /// method weighs it against disk bandwidth to choose between recomputing the clean runs a
    /// memory budget cannot hold and spilling them, and the two differ by orders of magnitude).
    fn forward_flops_per_s(&self) -> f64;
    /// A new, empty sequence for [`Engine::decode`].
    fn start_decode(&self) -> Result<DecodeSeq>;
    /// Appends `tokens[i]` to `seqs[i]` in one forward over every sequence's new tokens after
    /// its cache, with the request's interventions and captures (positions absolute, or relative
    /// to each sequence's length after the call; positions already in the cache are skipped)
    /// and logits (relative to that length: `-1` is the last new token).
    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput>;
    /// The engine's numerics: the CPU engine's precision; a device computes in bf16.
    fn precision(&self) -> Precision {
        Precision::Bf16
    }
    /// Non-finite values the engine's calls returned so far, where they are allowed and counted
    /// ([`finite::Checked`]); 0 for an engine that does not check.
    fn nonfinite_values(&self) -> u64 {
        0
    }
}

/// The resid_pre captures of every layer at every position: what a clean run keeps.
fn resid_pre_captures(cfg: &ModelConfig) -> Vec<Capture> {
    (0..cfg.n_layers).map(|l| Capture { site: Site::new(l, SiteKind::ResidPre), positions: Positions::All }).collect()
}

/// Bytes a kept CPU clean run of `len` positions holds: f32 keys, values and resid_pre per layer.
pub fn clean_run_bytes(cfg: &ModelConfig, len: usize) -> usize {
    len * (2 * cfg.kv_width() + cfg.d_model) * 4 * cfg.n_layers
}

/// A rough rate of the CPU engine's forward: about 50 GFLOP/s per thread with AVX-512
/// (`patchbay bench forward` measures the real one).
pub fn cpu_forward_flops_per_s() -> f64 {
    5e10 * rayon::current_num_threads() as f64
}

/// The model's weights uploaded to `device` (GPU or emulator), or None for `cpu`, where the
/// model itself is the engine (the CPU reference).
pub fn upload(model: &crate::model::Model, device: crate::backend::DeviceSpec) -> Result<Option<device_forward::DeviceModel>> {
    device.driver()?.map(|driver| device_forward::DeviceModel::upload(model, driver)).transpose()
}

/// The engine for `device`: the CPU model itself at `precision` (None: f32, the reference), or
/// its weights uploaded to a device (GPU or emulator), which computes in bf16 only (an error
/// for `precision` f32); every call's outputs checked for NaN and Inf, which stop the run
/// unless `allow_nonfinite` (`--allow-nonfinite`: counted instead, `Engine::nonfinite_values`).
/// Every command loads its engine here.
pub fn load_engine(model: &crate::model::Model, device: crate::backend::DeviceSpec, precision: Option<Precision>, allow_nonfinite: bool) -> Result<Box<dyn Engine + '_>> {
    if device != crate::backend::DeviceSpec::Cpu && precision == Some(Precision::F32) {
        return Err(Error::input(format!("precision f32: the {device} engine computes in bf16 only (f32 is the cpu engine's reference precision)")));
    }
    Ok(match upload(model, device)? {
        None => match precision.unwrap_or_default() {
            Precision::F32 => Box::new(finite::Checked::new(model, allow_nonfinite)),
            p => Box::new(finite::Checked::new(model.with_precision(p), allow_nonfinite)),
        },
        Some(d) => Box::new(finite::Checked::new(d, allow_nonfinite)),
    })
}

/// The CPU engine's clean run: the cache and resid_pre per layer (`[len, d_model]` each), at
/// the precision that made them.
struct CpuClean {
    cache: Arc<KvCache>,
    resid: Vec<Vec<f32>>,
    precision: Precision,
}

impl Engine for crate::model::Model {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn precision(&self) -> Precision {
        self.precision
    }
    fn device_name(&self) -> String {
        match self.precision {
            Precision::F32 => "cpu".into(),
            p => format!("cpu ({p})"),
        }
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(self.cfg.n_layers)).collect();
        let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
        self.run_from(0, &mut seqs, req)
    }
    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)> {
        let n_user = req.captures.len();
        let captures: Vec<Capture> = req.captures.iter().cloned().chain(resid_pre_captures(&self.cfg)).collect();
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(self.cfg.n_layers)).collect();
        let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
        let mut out = self.run_from(0, &mut seqs, &RunRequest { captures: &captures, hold_captures: false, ..*req })?;
        // Split each layer's [sum(len), d] capture into the prompts' rows.
        let d = self.cfg.d_model;
        let resid_all = out.captured.split_off(n_user);
        out.held = req.hold_captures.then(|| Held::host(&out.captured));
        let mut resid: Vec<Vec<Vec<f32>>> = prompts.iter().map(|_| Vec::with_capacity(self.cfg.n_layers)).collect();
        for layer in resid_all {
            let mut at = 0;
            for (s, p) in prompts.iter().enumerate() {
                resid[s].push(layer.data[at * d..(at + p.len()) * d].to_vec());
                at += p.len();
            }
        }
        let runs = caches.into_iter().zip(resid).map(|(cache, resid)| CleanRun::new(cache.len, CpuClean { cache: Arc::new(cache), resid, precision: self.precision })).collect();
        Ok((runs, out))
    }
    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput> {
        let d = self.cfg.d_model;
        if start_layer >= self.cfg.n_layers {
            return Err(Error::input(format!("start layer {start_layer} is out of range (the model has {} layers)", self.cfg.n_layers)));
        }
        let cleans: Vec<&CpuClean> = segs.iter().map(|s| s.clean.state::<CpuClean>()).collect::<Result<_>>()?;
        if let Some(c) = cleans.iter().find(|c| c.precision != self.precision) {
            return Err(Error::input(format!("a clean run made at precision {} cannot be resumed at {}", c.precision, self.precision)));
        }
        let mut caches: Vec<KvCache> = segs.iter().zip(&cleans).map(|(s, c)| KvCache::resume(&c.cache, start_layer, s.p0)).collect::<Result<_>>()?;
        let mut seqs: Vec<SeqInput> = segs
            .iter()
            .zip(&cleans)
            .zip(caches.iter_mut())
            .map(|((s, c), cache)| SeqInput { rows: SeqRows::Resid(&c.resid[start_layer][s.p0 * d..]), cache })
            .collect();
        self.run_from(start_layer, &mut seqs, req)
    }
    fn clean_run_bytes(&self, len: usize) -> usize {
        clean_run_bytes(&self.cfg, len)
    }
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>> {
        let c = run.state::<CpuClean>()?;
        let mut out = Vec::with_capacity(clean_run_bytes(&self.cfg, run.len));
        for (l, resid) in c.resid.iter().enumerate() {
            let (k, v) = c.cache.layer(l);
            for part in [&k[..], &v[..], resid] {
                out.extend_from_slice(bytemuck::cast_slice(part));
            }
        }
        Ok(out)
    }
    fn clean_run_from_bytes(&self, len: usize, bytes: &[u8]) -> Result<CleanRun> {
        let (kvw, d) = (self.cfg.kv_width(), self.cfg.d_model);
        if bytes.len() != clean_run_bytes(&self.cfg, len) {
            return Err(Error::input(format!("a spilled clean run of {len} positions has {} bytes, expected {}", bytes.len(), clean_run_bytes(&self.cfg, len))));
        }
        let f: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect(); // per layer: k [len, kvw], v [len, kvw], resid [len, d]
        let (mut k, mut v, mut resid) = (Vec::new(), Vec::new(), Vec::new());
        for layer in f.chunks_exact(len * (2 * kvw + d)) {
            let (kl, rest) = layer.split_at(len * kvw);
            let (vl, rl) = rest.split_at(len * kvw);
            k.push(kl.to_vec());
            v.push(vl.to_vec());
            resid.push(rl.to_vec());
        }
        let cache = KvCache::from_layers(k, v, len);
        Ok(CleanRun::new(len, CpuClean { cache: Arc::new(cache), resid, precision: self.precision }))
    }
    fn forward_flops_per_s(&self) -> f64 {
        cpu_forward_flops_per_s()
    }
    fn start_decode(&self) -> Result<DecodeSeq> {
        Ok(DecodeSeq::new(KvCache::new(self.cfg.n_layers)))
    }
    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput> {
        let mut inputs: Vec<SeqInput> = DecodeSeq::begin::<KvCache>(seqs, tokens)?.into_iter().zip(tokens).map(|(c, t)| SeqInput::tokens(t, c)).collect();
        let out = self.run_from(0, &mut inputs, req)?;
        DecodeSeq::grown(seqs, tokens);
        Ok(out)
    }
}

impl<T: Engine + ?Sized> Engine for &T {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn device_name(&self) -> String {
        (**self).device_name()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        (**self).run_prompts(prompts, req)
    }
    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)> {
        (**self).run_clean(prompts, req)
    }
    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput> {
        (**self).run_segments(start_layer, segs, req)
    }
    fn clean_run_bytes(&self, len: usize) -> usize {
        (**self).clean_run_bytes(len)
    }
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>> {
        (**self).clean_run_to_bytes(run)
    }
    fn clean_run_from_bytes(&self, len: usize, bytes: &[u8]) -> Result<CleanRun> {
        (**self).clean_run_from_bytes(len, bytes)
    }
    fn forward_flops_per_s(&self) -> f64 {
        (**self).forward_flops_per_s()
    }
    fn start_decode(&self) -> Result<DecodeSeq> {
        (**self).start_decode()
    }
    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput> {
        (**self).decode(seqs, tokens, req)
    }
    fn nonfinite_values(&self) -> u64 {
        (**self).nonfinite_values()
    }
    fn precision(&self) -> Precision {
        (**self).precision()
    }
}
