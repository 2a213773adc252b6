//! kernels/rope.cu against the CPU reference on fresh random inputs, in two fiber orders:
//! qk_norm_f32 vs `cpu::rmsnorm` (plain weight), rope_f32 vs `cpu::rope` per sequence (several
//! sequences with their own frequency tables and factors, positions past 100k, partial
//! rotary dims), kv_write_bf16 vs bf16 rounding into the paged cache (bit for bit, nothing
//! else written), kv_copy_slots_bf16 vs host slot copies (bit for bit, nothing else written).

mod common;

use std::sync::Arc;

use half::bf16;
use patchbay::backend::cpu;
use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::attention::{PagedBatch, PagedSeq};
use patchbay::backend::ops::rope::{RopeTables, SlotCopies, kv_copy_slots, kv_write, qk_norm, rope};
use patchbay::model::config::NormWeight;

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use common::kernels::*;

#[test]
fn qk_norm_matches_cpu_rmsnorm() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    for &(rows, n) in &[(1usize, 19usize), (19, 2048), (111, 333), (19, 4096 + 7)] {
        let x: Vec<f32> = (0..rows * n).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let w: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5)).collect();
        let eps = 1e-6;
        let mut want = vec![0.0f32; rows * n];
        cpu::rmsnorm(&x, &w, eps, NormWeight::Plain, &mut want);
        for (order, drv) in test_drivers() {
            let name = format!("qk_norm rows {rows} n {n} [{order}, seed {seed}]");
            let mut d_x = upload(&drv, &x);
            let d_w = upload(&drv, &w);
            qk_norm(drv.as_ref(), &mut d_x, &d_w, rows, eps).unwrap();
            // In place: a row the kernel skipped would still hold x, far from the reference.
            let err = assert_close(&name, &d_x.download().unwrap(), &want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
            eprintln!("{name}: max abs err {err:.2e}");
        }
    }
}

/// A rope case: heads, head dim, rotary dims, sequences (pos0, n_new).
struct RopeCase {
    n_heads: usize,
    d_head: usize,
    rotary_dim: usize,
    seqs: Vec<(usize, usize)>,
}

fn tables_for(rng: &mut Rng, n_seqs: usize, rotary_dim: usize) -> Vec<(Vec<f32>, f32)> {
    // Llama-like base frequencies, each sequence with its own per-dim factors (as longrope's
    // short/long factors) and attention factor.
    (0..n_seqs)
        .map(|s| {
            let f: Vec<f32> = (0..rotary_dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rotary_dim as f32) / rng.uniform(1.0, 4.0)).collect();
            (f, if s % 2 == 0 { 1.0 } else { rng.uniform(1.0, 1.3) })
        })
        .collect()
}

#[test]
fn rope_matches_cpu_rope() {
    let seed = test_seed();
    let mut rng = Rng::new(seed ^ 0x201e);
    let cases = [
        RopeCase { n_heads: 1, d_head: 16, rotary_dim: 16, seqs: vec![(0, 1)] },
        RopeCase { n_heads: 3, d_head: 24, rotary_dim: 24, seqs: vec![(0, 19)] },
        // Partial rotary dims, three sequences of 111 rows in all, one resumed at 37.
        RopeCase { n_heads: 8, d_head: 96, rotary_dim: 64, seqs: vec![(0, 50), (37, 1), (5, 60)] },
        RopeCase { n_heads: 2, d_head: 256, rotary_dim: 256, seqs: vec![(3, 19), (0, 0), (100, 7)] },
        // Long positions: angles up to ~1.3e5 rad, where fast sin/cos would be wrong.
        RopeCase { n_heads: 4, d_head: 128, rotary_dim: 128, seqs: vec![(131_000, 19), (65_519, 3)] },
        RopeCase { n_heads: 5, d_head: 32, rotary_dim: 8, seqs: vec![(9, 11)] },
    ];
    for c in &cases {
        let t: usize = c.seqs.iter().map(|s| s.1).sum();
        let w = c.n_heads * c.d_head;
        let x: Vec<f32> = (0..t * w).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let tables = tables_for(&mut rng, c.seqs.len(), c.rotary_dim);
        let mut want = x.clone();
        let mut r0 = 0;
        for (s, &(pos0, n)) in c.seqs.iter().enumerate() {
            let pos: Vec<usize> = (pos0..pos0 + n).collect();
            cpu::rope(&mut want[r0 * w..(r0 + n) * w], c.n_heads, c.d_head, &pos, &tables[s].0, tables[s].1);
            r0 += n;
        }
        // Every sequence gets blocks of its own (rope reads positions only; kv_write is below).
        let bs = 16;
        let mut next = 0u32;
        let tables_b: Vec<Vec<u32>> = c
            .seqs
            .iter()
            .map(|&(p0, n)| {
                let k = (p0 + n).div_ceil(bs) as u32;
                next += k;
                (next - k..next).collect()
            })
            .collect();
        for (order, drv) in test_drivers() {
            let name = format!("rope H {} dh {} rot {} seqs {:?} [{order}, seed {seed}]", c.n_heads, c.d_head, c.rotary_dim, c.seqs);
            let seqs: Vec<PagedSeq> = c.seqs.iter().zip(&tables_b).map(|(&(pos0, n_new), b)| PagedSeq { pos0, n_new, blocks: b }).collect();
            let batch = PagedBatch::new(&drv, &seqs, bs, next as usize).unwrap();
            let tab = RopeTables::new(&drv, &tables).unwrap();
            let mut d_x = upload(&drv, &x);
            rope(drv.as_ref(), &mut d_x, &batch, &tab, c.n_heads, c.d_head).unwrap();
            let got = d_x.download().unwrap();
            let err = assert_close(&name, &got, &want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
            eprintln!("{name}: max abs err {err:.2e}");
            // Dims past rotary_dim are untouched, bit for bit.
            for (i, (g, x)) in got.iter().zip(&x).enumerate() {
                if i % c.d_head >= c.rotary_dim {
                    assert_eq!(g.to_bits(), x.to_bits(), "{name}: element {i} past rotary_dim changed");
                }
            }
        }
    }
}

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
        let mut r = 0;
        for (s, &(pos0, n)) in seqs_spec.iter().enumerate() {
            for p in pos0..pos0 + n {
                let slot = tables[s][p / bs] as usize * bs + p % bs;
                for e in 0..kvw {
                    k_want[slot * kvw + e] = bf16::from_f32(k[r * kvw + e]);
                    v_want[slot * kvw + e] = bf16::from_f32(v[r * kvw + e]);
                }
                r += 1;
            }
        }
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
        for &(s, d) in &pairs {
            k_want.copy_within(s * kvw..(s + 1) * kvw, d * kvw);
            v_want.copy_within(s * kvw..(s + 1) * kvw, d * kvw);
        }
        for (order, drv) in test_drivers() {
            let name = format!("kv_copy_slots kv_width {kvw} slots {n_slots} copies {n_copies} [{order}, seed {seed}]");
            let copies = SlotCopies::new(&drv, &pairs, n_slots).unwrap();
            let (mut kc, mut vc) = (upload(&drv, &k), upload(&drv, &v));
            kv_copy_slots(drv.as_ref(), &mut kc, &mut vc, &copies, kvw).unwrap();
            for (what, got, want) in [("k", kc.download().unwrap(), &k_want), ("v", vc.download().unwrap(), &v_want)] {
                if let Some(i) = got.iter().zip(want.iter()).position(|(g, w)| g.to_bits() != w.to_bits()) {
                    panic!("{name}: {what} cache element {i} (slot {}): got {:#06x}, want {:#06x}", i / kvw, got[i].to_bits(), want[i].to_bits());
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
    let mut x = DeviceBuffer::<f32>::filled(&drv, 3 * 8, 0).unwrap();
    let w = DeviceBuffer::<f32>::filled(&drv, 8, 0).unwrap();
    assert!(msg(qk_norm(drv.as_ref(), &mut x, &w, 4, 1e-6)).contains("expected 4 rows of 8"));
    assert!(msg(qk_norm(drv.as_ref(), &mut x, &w, 3, f32::NAN)).contains("eps"));

    let blocks = [0u32];
    let batch = PagedBatch::new(&drv, &[PagedSeq { pos0: 0, n_new: 3, blocks: &blocks }], 4, 1).unwrap();
    let tab = RopeTables::new(&drv, &[(vec![1.0; 4], 1.0)]).unwrap();
    let two = RopeTables::new(&drv, &[(vec![1.0; 4], 1.0), (vec![1.0; 4], 1.0)]).unwrap();
    assert!(RopeTables::new(&drv, &[(vec![1.0; 4], 1.0), (vec![1.0; 3], 1.0)]).is_err());
    assert!(msg(rope(drv.as_ref(), &mut x, &batch, &two, 1, 8)).contains("2 frequency tables for a batch of 1"));
    assert!(msg(rope(drv.as_ref(), &mut x, &batch, &tab, 1, 4)).contains("exceeds d_head"));
    assert!(msg(rope(drv.as_ref(), &mut x, &batch, &tab, 2, 8)).contains("expected [3, 2, 8]"));
    rope(drv.as_ref(), &mut x, &batch, &tab, 1, 8).unwrap();

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
    assert!(msg(kv_copy_slots(drv.as_ref(), &mut kc, &mut short, &copies, 8)).contains("v_cache"));
}
