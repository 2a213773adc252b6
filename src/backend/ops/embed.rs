//! Token embedding (kernels/embed.cu, `embed_bf16`): out[t] = f32(table[ids[t]]) * scale.
//! CPU reference: [`embed_ref`].

use half::bf16;

use super::site_ops::row_block;
use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::{Error, Result};

/// Embeds the `ids` already on the device (`ids[..t]`) into `out` (`[t, d]`) from `table`
/// (`[vocab, d]`), times `scale` (1.0 unless the family scales embeddings).
///
/// Precondition (not checked: the ids are on the device): every id is in `0..vocab`. An id
/// outside gives a NaN row, never an out-of-bounds read. [`embed_tokens`] checks host ids.
#[allow(clippy::too_many_arguments)]
pub fn embed(driver: &dyn Driver, out: &DeviceBuffer<f32>, table: &DeviceBuffer<bf16>, vocab: usize, d: usize, ids: &DeviceBuffer<i32>, t: usize, scale: f32) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || t > i32::MAX as usize || vocab > i32::MAX as usize {
        return Err(Error::input(format!("embed: bad shape (t {t}, d {d}, vocab {vocab})")));
    }
    if table.len() < vocab * d {
        return Err(Error::input(format!("embed: table has {} elements, expected {vocab} x {d}", table.len())));
    }
    if out.len() < t * d || ids.len() < t {
        return Err(Error::input(format!("embed: out has {} elements and ids {}, expected {t} x {d} and {t}", out.len(), ids.len())));
    }
    if t == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (row_block(d), 1, 1), shared_bytes: 0 };
    // SAFETY: out holds t x d floats, ids t ints, table vocab x d; the kernel bounds every id by vocab.
    unsafe {
        KernelArgs::new()
            .ptr(out.ptr())
            .ptr(table.ptr())
            .ptr(ids.ptr())
            .i32(t as i32)
            .i32(d as i32)
            .i32(vocab as i32)
            .f32(scale)
            .launch(driver, entry::EMBED_BF16, cfg)
    }
}

/// Checks the host token ids against `vocab`, uploads them into `ids_dev` (at least
/// `tokens.len()` long; stream-ordered, so it may be reused by the next call) and embeds them.
#[allow(clippy::too_many_arguments)]
pub fn embed_tokens(driver: &dyn Driver, out: &DeviceBuffer<f32>, table: &DeviceBuffer<bf16>, vocab: usize, d: usize, tokens: &[u32], ids_dev: &DeviceBuffer<i32>, scale: f32) -> Result<()> {
    if let Some((i, &bad)) = tokens.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
        return Err(Error::input(format!("embed: token {i} has id {bad}, out of range (vocab_size {vocab})")));
    }
    if ids_dev.len() < tokens.len() {
        return Err(Error::input(format!("embed: the ids buffer holds {}, {} tokens given", ids_dev.len(), tokens.len())));
    }
    let ids: Vec<i32> = tokens.iter().map(|&id| id as i32).collect();
    ids_dev.upload(&ids)?;
    embed(driver, out, table, vocab, d, ids_dev, tokens.len(), scale)
}

/// The reference of [`embed_tokens`]: row `id` of table (`[vocab, d]`) in f32, times `scale`,
/// for every token (`[tokens.len(), d]`).
pub fn embed_ref(table: &[bf16], d: usize, tokens: &[u32], scale: f32) -> Vec<f32> {
    tokens.iter().flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].iter().map(move |v| v.to_f32() * scale)).collect()
}
