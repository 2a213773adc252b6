//! kernels/kv.cu against the CPU references on fresh random inputs, in two fiber orders:
//! kv_write_bf16 vs `kv_write_ref` (bf16 rounding into the paged cache, bit for bit, nothing
//! else written), kv_copy_slots_bf16 vs `kv_copy_slots_ref` (bit for bit, nothing else written, every
//! layer of one launch).

mod common;

use std::sync::Arc;

use half::bf16;
use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::attention::{PagedBatch, PagedSeq};
use patchbay::backend::ops::kv::{SlotCopies, kv_copy_slots, kv_copy_slots_ref, kv_write, kv_write_ref};

use common::kernels::*;

#[test]
fn kv_write_rounds_into_the_right_slots() {
    let seed = test_seed();
    let mut rng = Rng::new(seed ^ 0x4b5);
    // (kv_width, block_size, sequences (pos0, n_new))
    let cases = [(16usize, 16usize, vec![(0usize, 1usize)]), (72, 16, vec![(0, 19), (33, 5), (16, 0), (2, 87)]), (128, 5, vec![(7, 111)])];
    for (kvw, bs, seqs_spec) in &cases {
        let (kvw, bs) = (*kvw, *bs);
        let t: usize = seqs_spec.iter().map(|s| s.1).sum();
        // Each sequence's blocks, drawn from a shuffled pool with spare blocks left unwritten.
        let need: Vec<usize> = seqs_spec.iter().map(|&(p, n)| (p + n).div_ceil(bs)).collect();
        let n_blocks = need.iter().sum::<usize>() + 2;
        let mut pool: Vec<u32> = (0..n_blocks as u32).collect();
        rng.shuffle(&mut pool);
        let mut tables = Vec::new();
        let mut used = 0;
        for &n in &need {
            tables.push(pool[used..used + n].to_vec());
            used += n;
        }
        // Values of all kinds of magnitude, including exact ties of bf16 rounding.
        let vals = |n: usize, rng: &mut Rng| -> Vec<f32> {
            (0..n)
                .map(|i| match i % 7 {
                    0 => f32::from_bits(0x3F80_8000), // 1 + 2^-8: a tie, rounds to even (1.0)
                    1 => f32::from_bits(0x3F81_8000), // a tie that rounds up
                    2 => rng.uniform(-1e-30, 1e-30),
                    3 => rng.uniform(-6e4, 6e4),
                    _ => rng.uniform(-2.0, 2.0),
                })
                .collect()
        };
        let k = vals(t * kvw, &mut rng);
        let v = vals(t * kvw, &mut rng);
        // Expected cache: poison everywhere, bf16 of the rows at their slots.
        let poison = bf16::from_bits(0xFFFF);
        let (mut k_want, mut v_want) = (vec![poison; n_blocks * bs * kvw], vec![poison; n_blocks * bs * kvw]);
        let slots: Vec<usize> =
            seqs_spec.iter().enumerate().flat_map(|(s, &(pos0, n))| (pos0..pos0 + n).map(|p| tables[s][p / bs] as usize * bs + p % bs).collect::<Vec<_>>()).collect();
        kv_write_ref(&k, &v, &mut k_want, &mut v_want, &slots, kvw);
        for (order, drv) in test_drivers() {
            let name = format!("kv_write kv_width {kvw} block {bs} seqs {seqs_spec:?} [{order}, seed {seed}]");
            let seqs: Vec<PagedSeq> = seqs_spec.iter().zip(&tables).map(|(&(pos0, n_new), b)| PagedSeq { pos0, n_new, blocks: b }).collect();
            let batch = PagedBatch::new(&drv, &seqs, bs, n_blocks).unwrap();
            let d_k = upload(&drv, &k);
            let d_v = upload(&drv, &v);
            let mut kc = poisoned::<bf16>(&drv, n_blocks * bs * kvw);
            let mut vc = poisoned::<bf16>(&drv, n_blocks * bs * kvw);
            kv_write(drv.as_ref(), &d_k, &d_v, &mut kc, &mut vc, &batch, kvw).unwrap();
            for (what, got, want) in [("k", kc.download().unwrap(), &k_want), ("v", vc.download().unwrap(), &v_want)] {
                if let Some(i) = got.iter().zip(want.iter()).position(|(g, w)| g.to_bits() != w.to_bits()) {
                    panic!("{name}: {what} cache element {i} (slot {}): got {:#06x}, want {:#06x}", i / kvw, got[i].to_bits(), want[i].to_bits());
                }
            }
        }
    }
}

#[test]
fn kv_copy_slots_copies_exactly_the_listed_slots() {
    let seed = test_seed();
    let mut rng = Rng::new(seed ^ 0xc0b);
    for &(kvw, n_slots, n_copies) in &[(8usize, 4usize, 1usize), (72, 64, 23), (130, 200, 97)] {
        // Distinct destinations, sources drawn from the other slots.
        let mut slots: Vec<usize> = (0..n_slots).collect();
        rng.shuffle(&mut slots);
        let (dsts, srcs) = slots.split_at(n_copies);
        let pairs: Vec<(usize, usize)> = dsts.iter().map(|&d| (srcs[(rng.next_u64() % srcs.len() as u64) as usize], d)).collect();
        let k: Vec<bf16> = (0..n_slots * kvw).map(|_| bf16::from_f32(rng.uniform(-3.0, 3.0))).collect();
        let v: Vec<bf16> = (0..n_slots * kvw).map(|_| bf16::from_f32(rng.uniform(-3.0, 3.0))).collect();
        let (mut k_want, mut v_want) = (k.clone(), v.clone());
        kv_copy_slots_ref(&mut k_want, &mut v_want, &pairs, kvw);
        for (order, drv) in test_drivers() {
            let name = format!("kv_copy_slots kv_width {kvw} slots {n_slots} copies {n_copies} [{order}, seed {seed}]");
            let copies = SlotCopies::new(&drv, &pairs, n_slots).unwrap();
            // Three layers in one launch: each its own caches (the second layer's negated).
            let neg = |x: &[bf16]| x.iter().map(|v| -*v).collect::<Vec<bf16>>();
            let layers = |x: &[bf16]| vec![upload(&drv, x), upload(&drv, &neg(x)), upload(&drv, x)];
            let (mut kc, mut vc) = (layers(&k), layers(&v));
            kv_copy_slots(&drv, &mut kc, &mut vc, &copies, kvw).unwrap();
            for (l, (kl, vl)) in kc.iter().zip(&vc).enumerate() {
                let (kw, vw) = if l == 1 { (neg(&k_want), neg(&v_want)) } else { (k_want.clone(), v_want.clone()) };
                for (what, got, want) in [("k", kl.download().unwrap(), &kw), ("v", vl.download().unwrap(), &vw)] {
                    if let Some(i) = got.iter().zip(want.iter()).position(|(g, w)| g.to_bits() != w.to_bits()) {
                        panic!("{name}: layer {l} {what} cache element {i} (slot {}): got {:#06x}, want {:#06x}", i / kvw, got[i].to_bits(), want[i].to_bits());
                    }
                }
            }
        }
    }
}

/// The checked entry points refuse inconsistent inputs with an error.
#[test]
fn bad_inputs_are_errors() {
    let (_, drv): (String, Arc<dyn Driver>) = test_drivers().remove(0);
    let msg = |r: patchbay::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let blocks = [0u32];
    let batch = PagedBatch::new(&drv, &[PagedSeq { pos0: 0, n_new: 3, blocks: &blocks }], 4, 1).unwrap();
    let k = DeviceBuffer::<f32>::filled(&drv, 3 * 8, 0).unwrap();
    let mut kc = DeviceBuffer::<bf16>::filled(&drv, 4 * 8, 0).unwrap();
    let mut short = DeviceBuffer::<bf16>::filled(&drv, 4 * 8 - 1, 0).unwrap();
    assert!(msg(kv_write(drv.as_ref(), &k, &k, &mut kc, &mut short, &batch, 8)).contains("v_cache"));
    assert!(msg(kv_write(drv.as_ref(), &k, &k, &mut kc, &mut short, &batch, 7)).contains("expected [3, 7]"));

    let err = |pairs: &[(usize, usize)]| SlotCopies::new(&drv, pairs, 4).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(&[(0, 4)]).contains("outside the cache of 4 slots"));
    assert!(err(&[(0, 2), (1, 2)]).contains("slot 2 is written twice"));
    assert!(err(&[(0, 1), (1, 2)]).contains("slot 1 is both copied from and written"));
    let copies = SlotCopies::new(&drv, &[(0, 3)], 4).unwrap();
    let mut kcs = vec![kc, DeviceBuffer::<bf16>::filled(&drv, 4 * 8, 0).unwrap()];
    let mut vcs = vec![DeviceBuffer::<bf16>::filled(&drv, 4 * 8, 0).unwrap(), short];
    assert!(msg(kv_copy_slots(&drv, &mut kcs, &mut vcs, &copies, 8)).contains("v_cache of layer 1"));
    assert!(msg(kv_copy_slots(&drv, &mut kcs, &mut vcs[..1], &copies, 8)).contains("2 key caches but 1 value caches"));
}
