//! The paged bf16 KV cache: `kernels/kv.cu`. The write of the new rows' K/V at the batch's
//! slots ([`kv_write`]) and slot-to-slot copies ([`kv_copy_slots`], the copy-on-write of
//! resumed segments' partial prefix blocks), with their CPU references.

use std::sync::Arc;

use half::bf16;

use crate::backend::device::{DeviceBuffer, Driver, KernelArgs, LaunchConfig};
use crate::backend::kernels::entry;
use crate::backend::ops::attention::PagedBatch;
use crate::backend::ops::common::to_i32;
use crate::{Error, Result};

const THREADS: u32 = 256;

/// Writes the new rows' keys and values into the paged cache at the batch's slots, rounded to
/// bf16 (nearest even). k, v: `[T, kv_width]` f32; k_cache, v_cache: `[>= batch.n_slots(),
/// kv_width]` bf16 (one layer's cache).
pub fn kv_write(
    driver: &dyn Driver,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    k_cache: &mut DeviceBuffer<bf16>,
    v_cache: &mut DeviceBuffer<bf16>,
    batch: &PagedBatch,
    kv_width: usize,
) -> Result<()> {
    let t = batch.n_rows();
    for (name, b) in [("k", k), ("v", v)] {
        if t.checked_mul(kv_width) != Some(b.len()) {
            return Err(Error::input(format!("kv_write: {name} has {} elements, expected [{t}, {kv_width}]", b.len())));
        }
    }
    let need = batch.n_slots().checked_mul(kv_width).ok_or_else(|| Error::input("kv_write: cache size overflows"))?;
    for (name, c) in [("k_cache", &*k_cache), ("v_cache", &*v_cache)] {
        if c.len() < need {
            return Err(Error::input(format!("kv_write: {name} has {} elements, the batch addresses {} slots of {kv_width}", c.len(), batch.n_slots())));
        }
    }
    if t == 0 || kv_width == 0 {
        return Ok(());
    }
    let (t_i, w_i) = (to_i32(t, "kv_write: rows")?, to_i32(kv_width, "kv_write: kv_width")?);
    let cfg = LaunchConfig { grid: (t as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
    // SAFETY: k, v hold [T, kv_width] (checked); every slot of the validated batch is
    // < n_slots and the caches hold n_slots * kv_width; k_cache and v_cache are distinct
    // (two &mut), and no two rows of a batch share a slot (PagedBatch::new).
    unsafe {
        KernelArgs::new().ptr(k.ptr()).ptr(v.ptr()).ptr(k_cache.ptr()).ptr(v_cache.ptr()).ptr(batch.d_slot().ptr()).i32(t_i).i32(w_i).launch(
            driver,
            entry::KV_WRITE_BF16,
            cfg,
        )
    }
}

/// Slot-to-slot copies inside a paged cache (`kv_copy_slots_bf16`), validated once on the host
/// and uploaded once, then applied to the caches of every layer: the copy-on-write of resumed
/// segments' partial prefix blocks.
pub struct SlotCopies {
    n: usize,
    n_slots: usize,
    src: DeviceBuffer<i32>, // [n]
    dst: DeviceBuffer<i32>, // [n]
}

impl SlotCopies {
    /// `pairs` of (source slot, destination slot) in a cache of `n_slots` slots. Errors on a slot
    /// out of range, a destination listed twice, or a destination that is also a source (the
    /// copies would race).
    pub fn new(driver: &Arc<dyn Driver>, pairs: &[(usize, usize)], n_slots: usize) -> Result<SlotCopies> {
        to_i32(n_slots, "kv_copy_slots: cache slots")?;
        if let Some(&(s, d)) = pairs.iter().find(|&&(s, d)| s >= n_slots || d >= n_slots) {
            return Err(Error::input(format!("kv_copy_slots: copy {s} -> {d} is outside the cache of {n_slots} slots")));
        }
        let mut dsts: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        dsts.sort_unstable();
        if let Some(w) = dsts.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::input(format!("kv_copy_slots: slot {} is written twice", w[0])));
        }
        if let Some(&(s, _)) = pairs.iter().find(|p| dsts.binary_search(&p.0).is_ok()) {
            return Err(Error::input(format!("kv_copy_slots: slot {s} is both copied from and written")));
        }
        let src: Vec<i32> = pairs.iter().map(|p| p.0 as i32).collect();
        let dst: Vec<i32> = pairs.iter().map(|p| p.1 as i32).collect();
        Ok(SlotCopies { n: pairs.len(), n_slots, src: DeviceBuffer::from_slice(driver, &src)?, dst: DeviceBuffer::from_slice(driver, &dst)? })
    }
}

/// Applies `copies` to every layer's caches `k_caches[l]`, `v_caches[l]` (`[>= n_slots,
/// kv_width]` bf16 each), in one launch.
pub fn kv_copy_slots(driver: &Arc<dyn Driver>, k_caches: &mut [DeviceBuffer<bf16>], v_caches: &mut [DeviceBuffer<bf16>], copies: &SlotCopies, kv_width: usize) -> Result<()> {
    let need = copies.n_slots.checked_mul(kv_width).ok_or_else(|| Error::input("kv_copy_slots: cache size overflows"))?;
    if k_caches.len() != v_caches.len() {
        return Err(Error::input(format!("kv_copy_slots: {} key caches but {} value caches", k_caches.len(), v_caches.len())));
    }
    for (name, caches) in [("k_cache", &*k_caches), ("v_cache", &*v_caches)] {
        if let Some((l, c)) = caches.iter().enumerate().find(|(_, c)| c.len() < need) {
            return Err(Error::input(format!("kv_copy_slots: {name} of layer {l} has {} elements, the copies address {} slots of {kv_width}", c.len(), copies.n_slots)));
        }
    }
    let n_layers = k_caches.len();
    if copies.n == 0 || kv_width == 0 || n_layers == 0 {
        return Ok(());
    }
    let (n_i, l_i, w_i, s_i) = (to_i32(copies.n, "kv_copy_slots: copies")?, to_i32(n_layers, "kv_copy_slots: layers")?, to_i32(kv_width, "kv_copy_slots: kv_width")?, to_i32(copies.n_slots, "kv_copy_slots: slots")?);
    let ptrs = |caches: &[DeviceBuffer<bf16>]| DeviceBuffer::from_slice(driver, &caches.iter().map(|c| c.ptr().0).collect::<Vec<u64>>());
    let (k_ptrs, v_ptrs) = (ptrs(k_caches)?, ptrs(v_caches)?); // [n_layers] each
    let cfg = LaunchConfig { grid: (copies.n as u32, n_layers as u32, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
    // SAFETY: every slot is < n_slots (checked in SlotCopies::new) and each layer's caches hold
    // n_slots x kv_width (checked); destinations are distinct and never sources, so no element
    // is both read and written; the key and value caches are distinct buffers (two &mut
    // slices), their addresses in k_ptrs and v_ptrs ([n_layers] each).
    unsafe {
        KernelArgs::new().ptr(k_ptrs.ptr()).ptr(v_ptrs.ptr()).ptr(copies.src.ptr()).ptr(copies.dst.ptr()).i32(n_i).i32(l_i).i32(w_i).i32(s_i).launch(&**driver, entry::KV_COPY_SLOTS_BF16, cfg)
    }
}

/// The reference of [`kv_write`]: row t of k and v (`[T, kv_width]`), rounded to bf16 (nearest
/// even), at slot `slots[t]` of k_cache and v_cache (`[n_slots, kv_width]`); nothing else written.
pub fn kv_write_ref(k: &[f32], v: &[f32], k_cache: &mut [bf16], v_cache: &mut [bf16], slots: &[usize], kv_width: usize) {
    for (t, &slot) in slots.iter().enumerate() {
        let (src, dst) = (t * kv_width..(t + 1) * kv_width, slot * kv_width..(slot + 1) * kv_width);
        k_cache[dst.clone()].iter_mut().zip(&k[src.clone()]).for_each(|(c, x)| *c = bf16::from_f32(*x));
        v_cache[dst].iter_mut().zip(&v[src]).for_each(|(c, x)| *c = bf16::from_f32(*x));
    }
}

/// The reference of [`kv_copy_slots`]: for each (source, destination) pair, in order, the
/// destination slot of k_cache and v_cache (`[n_slots, kv_width]`) becomes a copy of the source.
pub fn kv_copy_slots_ref(k_cache: &mut [bf16], v_cache: &mut [bf16], pairs: &[(usize, usize)], kv_width: usize) {
    for &(s, d) in pairs {
        k_cache.copy_within(s * kv_width..(s + 1) * kv_width, d * kv_width);
        v_cache.copy_within(s * kv_width..(s + 1) * kv_width, d * kv_width);
    }
}
