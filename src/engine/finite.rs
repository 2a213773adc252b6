//! Non-finite values (NaN, +-Inf) in a forward's outputs. [`Checked`] wraps any engine and
//! checks the logits and every captured tensor of every call: a device counts them as it makes
//! them (`RunOutput::nonfinite`, one counter read once per call) and the host looks at the data
//! only when the count is not zero; the CPU reference is checked by one pass over what the call
//! returns. The first non-finite value stops the run with an
//! [`Error::NonFinite`] naming the prompt (its index in the call; callers renumber it with
//! [`Error::in_batch`]) and the first site where it appeared, found only on error by re-running
//! the call with the resid_post of every layer captured, then every site of the first layer
//! that is not finite. A run that allows non-finite values (`--allow-nonfinite`) counts them
//! instead ([`Engine::nonfinite_values`]).
//!
//! It also refuses a sequence longer than the model's context (`max_position_embeddings`):
//! positions past it were never trained, and a model runs there without a word otherwise.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{CleanRun, DecodeSeq, Engine, RunOutput, RunRequest, Segment};
use crate::intervene::{Capture, Captured};
use crate::model::config::ModelConfig;
use crate::sites::{Positions, Site, SiteKind};
use crate::{Error, Result};

/// An engine whose every call is checked for non-finite outputs.
pub struct Checked<E> {
    inner: E,
    /// Keep non-finite values (and count them) instead of stopping.
    allow: bool,
    seen: AtomicU64,
}

impl<E: Engine> Checked<E> {
    pub fn new(inner: E, allow: bool) -> Checked<E> {
        Checked { inner, allow, seen: AtomicU64::new(0) }
    }

    /// Refuses sequences that would pass the model's context: `lens` are their lengths after
    /// the call, in call order.
    fn check_context(&self, lens: impl IntoIterator<Item = usize>) -> Result<()> {
        let max = self.inner.config().max_position;
        match lens.into_iter().enumerate().find(|&(_, len)| len > max) {
            Some((prompt, len)) => Err(Error::TooLong { prompt, len, max }),
            None => Ok(()),
        }
    }

    /// Counts the call's non-finite values when they are allowed; else the error naming the
    /// first prompt that has one and the first site where it appeared (`rerun` runs the same
    /// call with other captures; None where a call cannot be repeated).
    fn check(&self, out: &RunOutput, rerun: Option<&dyn Fn(&[Capture]) -> Result<RunOutput>>) -> Result<()> {
        if out.nonfinite == Some(0) {
            return Ok(());
        }
        let Some((seq, at)) = first_nonfinite(out) else { return Ok(()) };
        if self.allow {
            self.seen.fetch_add(out.nonfinite.unwrap_or_else(|| count_nonfinite(out)), Ordering::Relaxed);
            return Ok(());
        }
        let first = rerun.and_then(|rerun| first_site(self.inner.config(), seq, rerun));
        Err(Error::NonFinite { prompt: seq, site: first.unwrap_or(at) })
    }
}

/// The sequence of the call holding the first non-finite value (captures in request order,
/// then logits) and the output it is in.
fn first_nonfinite(out: &RunOutput) -> Option<(usize, String)> {
    let in_captures = out.captured.iter().filter_map(|c| seq_rows(c).into_iter().enumerate().find(|(_, rows)| !all_finite(&c.data[rows.clone()])).map(|(s, _)| (s, c.site.to_string())));
    let in_logits = || {
        let w = out.logits.len().checked_div(out.logit_rows.len())?;
        out.logits.chunks(w.max(1)).position(|r| !all_finite(r)).map(|i| (out.logit_rows[i].0, "logits".to_string()))
    };
    in_captures.min_by_key(|(s, _)| *s).or_else(in_logits)
}

/// Non-finite values in the call's logits and captures.
fn count_nonfinite(out: &RunOutput) -> u64 {
    let count = |x: &[f32]| x.iter().filter(|v| !v.is_finite()).count() as u64;
    count(&out.logits) + out.captured.iter().map(|c| count(&c.data)).sum::<u64>()
}

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Each sequence's element range in a capture (rows are sequence-major).
fn seq_rows(c: &Captured) -> Vec<std::ops::Range<usize>> {
    let w: usize = c.token_shape.iter().product();
    let mut at = 0;
    c.positions
        .iter()
        .map(|p| {
            let r = at..at + p.len() * w;
            at = r.end;
            r
        })
        .collect()
}

/// The first site (in forward order) where sequence `seq` is not finite: the first layer whose
/// resid_post is not, then the first site of that layer (attention patterns and per-head
/// results aside: they feed z and attn_out); the final norm or the logits when every layer is
/// finite. None when a re-run fails.
fn first_site(cfg: &ModelConfig, seq: usize, rerun: &dyn Fn(&[Capture]) -> Result<RunOutput>) -> Option<String> {
    let bad = |sites: Vec<Site>| -> Option<Option<Site>> {
        let captures: Vec<Capture> = sites.iter().map(|&site| Capture { site, positions: Positions::All }).collect();
        let out = rerun(&captures).ok()?;
        Some(out.captured.iter().find(|c| seq_rows(c).get(seq).is_some_and(|r| !all_finite(&c.data[r.clone()]))).map(|c| c.site))
    };
    let posts: Vec<Site> = (0..cfg.n_layers).map(|l| Site::new(l, SiteKind::ResidPost)).chain([Site::final_norm(cfg)]).collect();
    let site = match bad(posts)? {
        None => return Some("logits".into()),
        Some(s) if s.kind == SiteKind::FinalNorm => s,
        Some(s) => {
            let layer: Vec<Site> = Site::all(cfg).into_iter().filter(|x| x.layer == s.layer && !matches!(x.kind, SiteKind::Pattern | SiteKind::HeadOut)).collect();
            bad(layer)?.unwrap_or(s)
        }
    };
    Some(site.to_string())
}

impl<E: Engine> Engine for Checked<E> {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn precision(&self) -> crate::backend::Precision {
        self.inner.precision()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        self.check_context(prompts.iter().map(Vec::len))?;
        let out = self.inner.run_prompts(prompts, req)?;
        self.check(&out, Some(&|captures: &[Capture]| self.inner.run_prompts(prompts, &RunRequest { captures, ..*req })))?;
        Ok(out)
    }
    fn run_clean(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<(Vec<CleanRun>, RunOutput)> {
        self.check_context(prompts.iter().map(Vec::len))?;
        let (runs, out) = self.inner.run_clean(prompts, req)?;
        self.check(&out, Some(&|captures: &[Capture]| self.inner.run_prompts(prompts, &RunRequest { captures, ..*req })))?;
        Ok((runs, out))
    }
    fn run_segments(&self, start_layer: usize, segs: &[Segment], req: &RunRequest) -> Result<RunOutput> {
        let out = self.inner.run_segments(start_layer, segs, req)?;
        self.check(&out, Some(&|captures: &[Capture]| self.inner.run_segments(start_layer, segs, &RunRequest { captures, ..*req })))?;
        Ok(out)
    }
    fn clean_run_bytes(&self, len: usize) -> usize {
        self.inner.clean_run_bytes(len)
    }
    fn clean_run_to_bytes(&self, run: &CleanRun) -> Result<Vec<u8>> {
        self.inner.clean_run_to_bytes(run)
    }
    fn clean_run_from_bytes(&self, len: usize, bytes: &[u8]) -> Result<CleanRun> {
        self.inner.clean_run_from_bytes(len, bytes)
    }
    fn forward_flops_per_s(&self) -> f64 {
        self.inner.forward_flops_per_s()
    }
    fn start_decode(&self) -> Result<DecodeSeq> {
        self.inner.start_decode()
    }
    fn decode(&self, seqs: &mut [&mut DecodeSeq], tokens: &[&[u32]], req: &RunRequest) -> Result<RunOutput> {
        self.check_context(seqs.iter().zip(tokens).map(|(s, t)| s.len() + t.len()))?;
        let out = self.inner.decode(seqs, tokens, req)?;
        // A call that fed whole sequences (their prompts) is repeated as one over prompts to
        // find the first layer; a later call cannot be (the sequences grew).
        let prompts: Vec<Vec<u32>> = tokens.iter().map(|t| t.to_vec()).collect();
        let fresh = seqs.iter().zip(tokens).all(|(s, t)| s.len() == t.len());
        let rerun = |captures: &[Capture]| self.inner.run_prompts(&prompts, &RunRequest { captures, ..*req });
        self.check(&out, fresh.then_some(&rerun as &dyn Fn(&[Capture]) -> Result<RunOutput>))?;
        Ok(out)
    }
    fn nonfinite_values(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}
