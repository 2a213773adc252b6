//! The engine: the one forward pass on the CPU reference (`forward`) and on a device
//! (`device_forward`, the CUDA backend's host code), behind one interface.

pub mod device_forward;
pub mod forward;

use crate::model::config::ModelConfig;
use crate::Result;
use forward::{KvCache, RunOutput, SeqInput};
pub use forward::RunRequest;

/// Runs whole prompts with interventions and captures: what capture, scoring and the naive
/// patching path need from any backend.
pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// Where it runs ("cpu", "emu", "cuda:0 ...").
    fn device_name(&self) -> String;
    /// One forward over `prompts` (a fresh cache each) with the request's interventions,
    /// captures and logits.
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput>;
}

impl Engine for crate::model::Model {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn device_name(&self) -> String {
        "cpu".into()
    }
    fn run_prompts(&self, prompts: &[Vec<u32>], req: &RunRequest) -> Result<RunOutput> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(self.cfg.n_layers)).collect();
        let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput::tokens(p, c)).collect();
        self.run_from(0, &mut seqs, req)
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
}
