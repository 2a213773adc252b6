//! The engine: the one forward pass on the CPU reference (`forward`) and on a device
//! (`device_forward`, the CUDA backend's host code), behind one interface.

pub mod device_forward;
pub mod forward;

use crate::intervene::{Capture, Intervention};
use crate::model::config::ModelConfig;
use crate::sites::Positions;
use crate::Result;
use forward::{KvCache, RunOutput, SeqInput};

/// Runs whole prompts with interventions and captures: what capture, scoring and the naive
/// patching path need from any backend.
pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// Where it runs ("cpu", "emu", "cuda:0 ...").
    fn device_name(&self) -> String;
    /// One forward over `prompts` (a fresh cache each); logits at `logits_at`; captured patterns
    /// padded to `n_keys` key columns when given.
    fn run_prompts(
        &self,
        prompts: &[Vec<u32>],
        interventions: &[Intervention],
        captures: &[Capture],
        logits_at: Option<&Positions>,
        n_keys: Option<usize>,
    ) -> Result<RunOutput>;
}

impl Engine for crate::model::Model {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn device_name(&self) -> String {
        "cpu".into()
    }
    fn run_prompts(
        &self,
        prompts: &[Vec<u32>],
        interventions: &[Intervention],
        captures: &[Capture],
        logits_at: Option<&Positions>,
        n_keys: Option<usize>,
    ) -> Result<RunOutput> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(self.cfg.n_layers)).collect();
        let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
        self.run(&mut seqs, interventions, captures, logits_at, n_keys)
    }
}

impl<T: Engine + ?Sized> Engine for &T {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn device_name(&self) -> String {
        (**self).device_name()
    }
    fn run_prompts(
        &self,
        prompts: &[Vec<u32>],
        interventions: &[Intervention],
        captures: &[Capture],
        logits_at: Option<&Positions>,
        n_keys: Option<usize>,
    ) -> Result<RunOutput> {
        (**self).run_prompts(prompts, interventions, captures, logits_at, n_keys)
    }
}
