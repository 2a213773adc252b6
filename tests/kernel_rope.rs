//! kernels/rope.cu against the CPU reference on fresh random inputs, in two fiber orders:
//! rope_f32 vs `rope_ref` per sequence (several sequences with their own frequency tables and
//! factors, positions past 100k, partial rotary dims), on q alone and on q and k in one launch.

mod common;

use std::sync::Arc;

use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::attention::{PagedBatch, PagedSeq};
use patchbay::backend::ops::rope::{RopeTables, rope, rope_ref};

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use common::kernels::*;

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
fn rope_matches_rope_ref() {
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
        // k has half the heads (grouped-query attention), none for a single head: q alone.
        let n_kv = c.n_heads / 2;
        let (w, wk) = (c.n_heads * c.d_head, n_kv * c.d_head);
        let x: Vec<f32> = (0..t * w).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let xk: Vec<f32> = (0..t * wk).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let tables = tables_for(&mut rng, c.seqs.len(), c.rotary_dim);
        let (mut want, mut want_k) = (x.clone(), xk.clone());
        let mut r0 = 0;
        for (s, &(pos0, n)) in c.seqs.iter().enumerate() {
            let pos: Vec<usize> = (pos0..pos0 + n).collect();
            rope_ref(&mut want[r0 * w..(r0 + n) * w], c.n_heads, c.d_head, &pos, &tables[s].0, tables[s].1);
            rope_ref(&mut want_k[r0 * wk..(r0 + n) * wk], n_kv, c.d_head, &pos, &tables[s].0, tables[s].1);
            r0 += n;
        }
        // Every sequence gets blocks of its own (rope reads positions only).
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
            let (mut d_x, mut d_k) = (upload(&drv, &x), upload(&drv, &xk));
            rope(drv.as_ref(), &mut d_x, c.n_heads, (n_kv > 0).then_some((&mut d_k, n_kv)), &batch, &tab, c.d_head).unwrap();
            for (part, got, x, want) in [("q", d_x.download().unwrap(), &x, &want), ("k", d_k.download().unwrap(), &xk, &want_k)] {
                let err = assert_close(&format!("{name} {part}"), &got, want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
                eprintln!("{name} {part}: max abs err {err:.2e}");
                // Dims past rotary_dim are untouched, bit for bit.
                for (i, (g, x)) in got.iter().zip(x).enumerate() {
                    if i % c.d_head >= c.rotary_dim {
                        assert_eq!(g.to_bits(), x.to_bits(), "{name} {part}: element {i} past rotary_dim changed");
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
    let mut x = DeviceBuffer::<f32>::filled(&drv, 3 * 8, 0).unwrap();
    let blocks = [0u32];
    let batch = PagedBatch::new(&drv, &[PagedSeq { pos0: 0, n_new: 3, blocks: &blocks }], 4, 1).unwrap();
    let tab = RopeTables::new(&drv, &[(vec![1.0; 4], 1.0)]).unwrap();
    let two = RopeTables::new(&drv, &[(vec![1.0; 4], 1.0), (vec![1.0; 4], 1.0)]).unwrap();
    assert!(RopeTables::new(&drv, &[(vec![1.0; 4], 1.0), (vec![1.0; 3], 1.0)]).is_err());
    let mut k = DeviceBuffer::<f32>::filled(&drv, 3 * 8, 0).unwrap();
    assert!(msg(rope(drv.as_ref(), &mut x, 1, None, &batch, &two, 8)).contains("2 frequency tables for a batch of 1"));
    assert!(msg(rope(drv.as_ref(), &mut x, 1, None, &batch, &tab, 4)).contains("exceeds d_head"));
    assert!(msg(rope(drv.as_ref(), &mut x, 2, None, &batch, &tab, 8)).contains("q has 24 elements, expected [3, 2, 8]"));
    assert!(msg(rope(drv.as_ref(), &mut x, 1, Some((&mut k, 2)), &batch, &tab, 8)).contains("k has 24 elements, expected [3, 2, 8]"));
    rope(drv.as_ref(), &mut x, 1, Some((&mut k, 1)), &batch, &tab, 8).unwrap();
}
