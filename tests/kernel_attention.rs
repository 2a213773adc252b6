//! kernels/attention.cu (varlen flash attention over the paged bf16 KV cache) against
//! `attention_ref` applied per sequence, on fresh random inputs: odd sizes, GQA 1/3/4,
//! d_head 16..256, several sequences per launch, cached prefixes in blocks shared between
//! sequences, partially filled blocks, sliding windows smaller and larger than the sequences,
//! soft-capping, pattern capture. Every cache slot no query may see is poisoned with NaN, as
//! are the outputs, so reading or skipping the wrong thing fails. Run in two fiber orders.

mod common;

use std::sync::Arc;

use half::bf16;
use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::attention::{AttnParams, PagedBatch, PagedSeq, PatternOut, PatternRequest, attention, attention_ref};
use patchbay::backend::ops::kv::kv_write;
use patchbay::backend::ops::rope::{RopeTables, rope, rope_ref};

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use common::kernels::*;

/// A sequence of a test batch: `n_new` rows after `pos0` cached positions, the cached
/// prefix being the clean prefix of target `target` (blocks shared with the other
/// sequences of that target) or, with None, a prefix of its own.
#[derive(Clone, Copy, Debug)]
struct SeqSpec {
    target: Option<usize>,
    pos0: usize,
    n_new: usize,
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    /// Clean prefix length of each target.
    targets: Vec<usize>,
    seqs: Vec<SeqSpec>,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    block_size: usize,
    sliding_window: Option<usize>,
    softcap: Option<f32>,
    /// Amplitude of the random queries (large values make peaky softmaxes / saturate caps).
    q_amp: f32,
    /// Number of random (row, head) pattern pairs (the last row's last head is always added).
    n_pat: usize,
}

/// The cache and the per-sequence reference keys/values of a case.
struct Built {
    /// (pos0, n_new, block table) per sequence.
    tables: Vec<(usize, usize, Vec<u32>)>,
    n_blocks: usize,
    /// [n_blocks * block_size, KV * dh] bf16; slots no query may see hold NaN.
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
    /// Per sequence [pos0 + n_new, KV * dh], bf16-rounded values as f32.
    k_ref: Vec<Vec<f32>>,
    v_ref: Vec<Vec<f32>>,
}

fn random_rows(rng: &mut Rng, n: usize, amp: f32) -> Vec<f32> {
    bf16_round(&(0..n).map(|_| rng.uniform(-amp, amp)).collect::<Vec<f32>>())
}

fn build(case: &Case, rng: &mut Rng) -> Built {
    let (bs, kvw) = (case.block_size, case.n_kv_heads * case.d_head);
    // Logical blocks first (ids 0..), then a random permutation of ids plus spare blocks.
    let mut next = 0u32;
    let mut alloc = |n: usize| -> Vec<u32> {
        let v = (next..next + n as u32).collect();
        next += n as u32;
        v
    };
    let targets: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> =
        case.targets.iter().map(|&len| (alloc(len.div_ceil(bs)), random_rows(rng, len * kvw, 1.0), random_rows(rng, len * kvw, 1.0))).collect();
    let mut tables = Vec::new();
    let (mut k_ref, mut v_ref) = (Vec::new(), Vec::new());
    for s in &case.seqs {
        let len = s.pos0 + s.n_new;
        let (mut k, mut v) = match s.target {
            Some(t) => {
                assert!(s.pos0 <= case.targets[t], "{}: bad spec", case.name);
                (targets[t].1[..s.pos0 * kvw].to_vec(), targets[t].2[..s.pos0 * kvw].to_vec())
            }
            None => (random_rows(rng, s.pos0 * kvw, 1.0), random_rows(rng, s.pos0 * kvw, 1.0)),
        };
        k.extend(random_rows(rng, s.n_new * kvw, 1.0));
        v.extend(random_rows(rng, s.n_new * kvw, 1.0));
        let blocks = match s.target {
            // Full prefix blocks are the target's; the rest (from the block holding pos0) are
            // this sequence's own. With no new rows, every block is the target's.
            Some(t) if s.n_new == 0 => targets[t].0[..len.div_ceil(bs)].to_vec(),
            Some(t) => {
                let shared = s.pos0 / bs;
                let mut b = targets[t].0[..shared].to_vec();
                b.extend(alloc(len.div_ceil(bs) - shared));
                b
            }
            None => alloc(len.div_ceil(bs)),
        };
        tables.push((s.pos0, s.n_new, blocks));
        k_ref.push(k);
        v_ref.push(v);
    }
    let spare = 3;
    let n_blocks = next as usize + spare;
    let mut perm: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut perm);
    for (_, _, b) in tables.iter_mut() {
        b.iter_mut().for_each(|x| *x = perm[*x as usize]);
    }
    // Fill the slots some query sees; everything else stays NaN.
    let nan = bf16::from_bits(0xFFFF);
    let mut k_cache = vec![nan; n_blocks * bs * kvw];
    let mut v_cache = vec![nan; n_blocks * bs * kvw];
    for (s, (pos0, n_new, blocks)) in tables.iter().enumerate() {
        for p in *pos0..pos0 + n_new {
            let lo = case.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
            for j in lo..=p {
                let slot = blocks[j / bs] as usize * bs + j % bs;
                for e in 0..kvw {
                    k_cache[slot * kvw + e] = bf16::from_f32(k_ref[s][j * kvw + e]);
                    v_cache[slot * kvw + e] = bf16::from_f32(v_ref[s][j * kvw + e]);
                }
            }
        }
    }
    Built { tables, n_blocks, k_cache, v_cache, k_ref, v_ref }
}

fn params(case: &Case) -> AttnParams {
    AttnParams {
        n_heads: case.n_heads,
        n_kv_heads: case.n_kv_heads,
        d_head: case.d_head,
        scale: 1.0 / (case.d_head as f32).sqrt(),
        softcap: case.softcap,
        sliding_window: case.sliding_window,
    }
}

/// Reference z [T, H, dh] and probabilities [T, H, n_keys] from attention_ref per sequence.
fn reference(case: &Case, built: &Built, q: &[f32], n_keys: usize) -> (Vec<f32>, Vec<f32>) {
    let p = params(case);
    let qw = case.n_heads * case.d_head;
    let t: usize = case.seqs.iter().map(|s| s.n_new).sum();
    let mut z = vec![0.0f32; t * qw];
    let mut probs = vec![0.0f32; t * case.n_heads * n_keys];
    let mut r0 = 0;
    for (s, spec) in case.seqs.iter().enumerate() {
        let r1 = r0 + spec.n_new;
        attention_ref(
            &q[r0 * qw..r1 * qw],
            &built.k_ref[s],
            &built.v_ref[s],
            &mut z[r0 * qw..r1 * qw],
            Some(&mut probs[r0 * case.n_heads * n_keys..r1 * case.n_heads * n_keys]),
            n_keys,
            spec.pos0,
            case.n_heads,
            case.n_kv_heads,
            case.d_head,
            p.scale,
            p.softcap,
            p.sliding_window,
        );
        r0 = r1;
    }
    (z, probs)
}

fn run_case(case: &Case, seed: u64) {
    let mut rng = Rng::new(seed ^ case.name.len() as u64 ^ (case.d_head as u64) << 20);
    let built = build(case, &mut rng);
    let t: usize = case.seqs.iter().map(|s| s.n_new).sum();
    let qw = case.n_heads * case.d_head;
    let q: Vec<f32> = (0..t * qw).map(|_| rng.uniform(-case.q_amp, case.q_amp)).collect();
    let n_keys = case.seqs.iter().map(|s| s.pos0 + s.n_new).max().unwrap() + 3;
    let mut pairs: Vec<(usize, usize)> = (0..case.n_pat).map(|_| (rng.below(t), rng.below(case.n_heads))).collect();
    pairs.push((t - 1, case.n_heads - 1));
    let (z_ref, p_ref) = reference(case, &built, &q, n_keys);
    let pat_ref: Vec<f32> =
        pairs.iter().flat_map(|&(r, h)| p_ref[(r * case.n_heads + h) * n_keys..(r * case.n_heads + h + 1) * n_keys].iter().copied()).collect();

    for (order, drv) in test_drivers() {
        let name = format!("{} [{order}, seed {seed}]", case.name);
        let seqs: Vec<PagedSeq> = built.tables.iter().map(|(pos0, n_new, b)| PagedSeq { pos0: *pos0, n_new: *n_new, blocks: b }).collect();
        let batch = PagedBatch::new(&drv, &seqs, case.block_size, built.n_blocks).unwrap();
        assert_eq!(batch.n_rows(), t);
        let d_q = upload(&drv, &q);
        let d_k = upload(&drv, &built.k_cache);
        let d_v = upload(&drv, &built.v_cache);
        let mut d_z = poisoned::<f32>(&drv, t * qw);
        let req = PatternRequest::new(&drv, &pairs).unwrap();
        let mut d_pat = poisoned::<f32>(&drv, pairs.len() * n_keys);
        let pat = PatternOut { request: &req, out: &mut d_pat, n_keys };
        attention(drv.as_ref(), &batch, &params(case), &d_q, &d_k, &d_v, &mut d_z, Some(pat)).unwrap();
        let z = d_z.download().unwrap();
        let err = assert_close(&format!("{name}: z"), &z, &z_ref, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
        let pat = d_pat.download().unwrap();
        let perr = assert_close(&format!("{name}: pattern"), &pat, &pat_ref, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
        eprintln!("{name}: max abs err z {err:.2e}, pattern {perr:.2e}");
        // Each pattern row sums to 1 over its visible keys.
        for (i, row) in pat.chunks(n_keys).enumerate() {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{name}: pattern {i} sums to {sum}");
        }
    }
}

fn seq(target: Option<usize>, pos0: usize, n_new: usize) -> SeqSpec {
    SeqSpec { target, pos0, n_new }
}

fn base(name: &'static str) -> Case {
    Case { name, targets: vec![], seqs: vec![], n_heads: 4, n_kv_heads: 4, d_head: 64, block_size: 16, sliding_window: None, softcap: None, q_amp: 2.0, n_pat: 4 }
}

#[test]
fn one_row_mha() {
    let mut c = base("T=1, MHA, d_head 64");
    c.seqs = vec![seq(None, 0, 1)];
    run_case(&c, test_seed());
}

#[test]
fn one_row_after_a_long_prefix() {
    // Decode-like: one query row at position 130 over a cached prefix of its own.
    let mut c = base("T=1 at pos 130, GQA 4, d_head 128");
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.d_head = 128;
    c.seqs = vec![seq(None, 130, 1)];
    run_case(&c, test_seed());
}

#[test]
fn prefill_19_gqa3_d24() {
    let mut c = base("T=19 prefill, GQA 3, d_head 24, partial block");
    c.n_heads = 6;
    c.n_kv_heads = 2;
    c.d_head = 24;
    c.seqs = vec![seq(None, 0, 19)];
    run_case(&c, test_seed());
}

#[test]
fn varlen_111_shared_prefix_blocks_gqa4_d128() {
    // Three sequences, 111 rows: a fresh prefill, and two segments resumed on the same
    // target's clean prefix (they share its first blocks), plus an empty sequence.
    let mut c = base("T=111 varlen, shared prefix blocks, GQA 4, d_head 128");
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.d_head = 128;
    c.targets = vec![57];
    c.seqs = vec![seq(None, 0, 50), seq(Some(0), 37, 1), seq(Some(0), 0, 0), seq(Some(0), 20, 60)];
    c.n_pat = 6;
    run_case(&c, test_seed());
}

#[test]
fn many_one_row_segments_on_one_target_d96() {
    // Last-token patching: 19 one-row segments resumed at various positions of two targets.
    let mut c = base("19 one-row segments, 2 targets, MHA, d_head 96");
    c.n_heads = 3;
    c.n_kv_heads = 3;
    c.d_head = 96;
    c.targets = vec![45, 33];
    let mut rng = Rng::new(test_seed() ^ 0x5e9);
    c.seqs = (0..19)
        .map(|i| {
            let t = i % 2;
            seq(Some(t), rng.below(c.targets[t] + 1), 1)
        })
        .collect();
    run_case(&c, test_seed());
}

#[test]
fn sliding_window_smaller_than_sequences() {
    let mut c = base("window 7 < sequences, GQA 3, d_head 96, block 16");
    c.n_heads = 3;
    c.n_kv_heads = 1;
    c.d_head = 96;
    c.sliding_window = Some(7);
    c.targets = vec![40];
    c.seqs = vec![seq(None, 0, 19), seq(Some(0), 33, 5), seq(Some(0), 16, 30), seq(None, 70, 3)];
    run_case(&c, test_seed());
}

#[test]
fn sliding_window_larger_than_sequences() {
    let mut c = base("window 4096 > sequences, GQA 1, d_head 32");
    c.d_head = 32;
    c.sliding_window = Some(4096);
    c.targets = vec![21];
    c.seqs = vec![seq(Some(0), 21, 19), seq(Some(0), 5, 1)];
    run_case(&c, test_seed());
}

#[test]
fn window_of_one_sees_only_itself() {
    let mut c = base("window 1, d_head 16");
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.d_head = 16;
    c.sliding_window = Some(1);
    c.seqs = vec![seq(None, 3, 19)];
    run_case(&c, test_seed());
}

#[test]
fn softcap_gqa4_d256() {
    // Gemma 2-like: scores well past the cap (q amplitude 20), GQA 4, d_head 256.
    let mut c = base("softcap 5, GQA 4, d_head 256");
    c.n_heads = 4;
    c.n_kv_heads = 1;
    c.d_head = 256;
    c.softcap = Some(5.0);
    c.q_amp = 20.0;
    c.targets = vec![30];
    c.seqs = vec![seq(Some(0), 17, 19), seq(None, 0, 11), seq(Some(0), 30, 2)];
    run_case(&c, test_seed());
}

#[test]
fn softcap_and_window_gqa2_d256() {
    let mut c = base("softcap 30 + window 13, GQA 2, d_head 256, block 16");
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_head = 256;
    c.softcap = Some(30.0);
    c.sliding_window = Some(13);
    c.q_amp = 8.0;
    c.targets = vec![50];
    c.seqs = vec![seq(Some(0), 48, 19), seq(Some(0), 3, 7)];
    run_case(&c, test_seed());
}

#[test]
fn block_size_not_a_power_of_two() {
    let mut c = base("block 5, GQA 3, d_head 24, T=111");
    c.n_heads = 3;
    c.n_kv_heads = 1;
    c.d_head = 24;
    c.block_size = 5;
    c.targets = vec![23];
    c.seqs = vec![seq(Some(0), 23, 60), seq(Some(0), 12, 51)];
    run_case(&c, test_seed());
}

#[test]
fn peaky_softmax_far_from_zero() {
    // Large scores (q amplitude 40, no cap): exp must be taken relative to the running max.
    let mut c = base("peaky softmax, d_head 64, T=111");
    c.q_amp = 40.0;
    c.seqs = vec![seq(None, 0, 111)];
    run_case(&c, test_seed());
}

/// rope -> kv_write -> attention chained on the device, against rope_ref + attention_ref.
/// Each link is checked on its own inputs: the rotated rows against rope_ref at f32
/// tolerance, the cache bit for bit against bf16 of the device's rotated k (and of v), z
/// against attention_ref on the cache as written.
#[test]
fn rope_kv_write_attention_chain() {
    let seed = test_seed();
    let mut rng = Rng::new(seed ^ 0xc4a1);
    let (h, kv, dh, bs) = (6usize, 2usize, 64usize, 16usize);
    let (qw, kvw) = (h * dh, kv * dh);
    // Two fresh sequences (prefill) of 19 and 23 rows; block tables of their own, permuted.
    let lens = [19usize, 23];
    let n_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 2;
    let mut perm: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut perm);
    let tables: Vec<Vec<u32>> = vec![perm[..2].to_vec(), perm[2..4].to_vec()];
    let t: usize = lens.iter().sum();
    let q: Vec<f32> = (0..t * qw).map(|_| rng.uniform(-2.0, 2.0)).collect();
    let k: Vec<f32> = (0..t * kvw).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let v: Vec<f32> = (0..t * kvw).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let inv_freq: Vec<f32> = (0..dh / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dh as f32)).collect();
    let per_seq = vec![(inv_freq.clone(), 1.0f32), (inv_freq.iter().map(|f| f / 3.0).collect::<Vec<f32>>(), 1.19f32)];

    // Reference rope.
    let (mut q_ref, mut k_ref) = (q.clone(), k.clone());
    let mut r0 = 0;
    for (s, &len) in lens.iter().enumerate() {
        let pos: Vec<usize> = (0..len).collect();
        rope_ref(&mut q_ref[r0 * qw..(r0 + len) * qw], h, dh, &pos, &per_seq[s].0, per_seq[s].1);
        rope_ref(&mut k_ref[r0 * kvw..(r0 + len) * kvw], kv, dh, &pos, &per_seq[s].0, per_seq[s].1);
        r0 += len;
    }
    for (order, drv) in test_drivers() {
        let name = format!("chain [{order}, seed {seed}]");
        let seqs: Vec<PagedSeq> = lens.iter().zip(&tables).map(|(&n, b)| PagedSeq { pos0: 0, n_new: n, blocks: b }).collect();
        let batch = PagedBatch::new(&drv, &seqs, bs, n_blocks).unwrap();
        let tables_d = RopeTables::new(&drv, &per_seq).unwrap();
        let mut d_q = upload(&drv, &q);
        let mut d_k = upload(&drv, &k);
        let d_v = upload(&drv, &v);
        rope(drv.as_ref(), &mut d_q, h, Some((&mut d_k, kv)), &batch, &tables_d, dh).unwrap();
        let mut kc = poisoned::<bf16>(&drv, n_blocks * bs * kvw);
        let mut vc = poisoned::<bf16>(&drv, n_blocks * bs * kvw);
        kv_write(drv.as_ref(), &d_k, &d_v, &mut kc, &mut vc, &batch, kvw).unwrap();
        let mut z = poisoned::<f32>(&drv, t * qw);
        attention(drv.as_ref(), &batch, &params_of(h, kv, dh), &d_q, &kc, &vc, &mut z, None).unwrap();

        let q_dev = d_q.download().unwrap();
        assert_close(&format!("{name}: rotated q"), &q_dev, &q_ref, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
        let k_dev = d_k.download().unwrap();
        assert_close(&format!("{name}: rotated k"), &k_dev, &k_ref, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
        let kc = bf16_to_f32(&kc.download().unwrap());
        let vc = bf16_to_f32(&vc.download().unwrap());
        // The cache rows of each sequence, gathered through its table.
        let gather = |c: &[f32], s: usize| -> Vec<f32> {
            (0..lens[s])
                .flat_map(|p| {
                    let slot = tables[s][p / bs] as usize * bs + p % bs;
                    c[slot * kvw..(slot + 1) * kvw].to_vec()
                })
                .collect()
        };
        let mut r0 = 0;
        let mut z_ref = vec![0.0f32; t * qw];
        for (s, &len) in lens.iter().enumerate() {
            let (ks, vs) = (gather(&kc, s), gather(&vc, s));
            // The cache holds exactly bf16 of what the device's rope produced (checked against
            // rope_ref above): no tolerance on the rounding itself.
            let k_want = bf16_round(&k_dev[r0 * kvw..(r0 + len) * kvw]);
            let v_want = bf16_round(&v[r0 * kvw..(r0 + len) * kvw]);
            assert!(bits_eq(&ks, &k_want), "{name}: k cache of sequence {s} is not bf16(rotated k)");
            assert!(bits_eq(&vs, &v_want), "{name}: v cache of sequence {s} is not bf16(v)");
            // z reference on the cache as written, with the device's rotated q.
            let p = params_of(h, kv, dh);
            attention_ref(&q_dev[r0 * qw..(r0 + len) * qw], &ks, &vs, &mut z_ref[r0 * qw..(r0 + len) * qw], None, 0, 0, h, kv, dh, p.scale, None, None);
            r0 += len;
        }
        assert_close(&format!("{name}: z"), &z.download().unwrap(), &z_ref, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
    }
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn params_of(h: usize, kv: usize, dh: usize) -> AttnParams {
    AttnParams { n_heads: h, n_kv_heads: kv, d_head: dh, scale: 1.0 / (dh as f32).sqrt(), softcap: None, sliding_window: None }
}

/// The checked entry points refuse inconsistent batches and buffers with an error.
#[test]
fn bad_batches_and_buffers_are_errors() {
    let (_, drv): (String, Arc<dyn Driver>) = test_drivers().remove(0);
    let err = |r: patchbay::Result<PagedBatch>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let b = |pos0, n_new, blocks: &'static [u32]| PagedSeq { pos0, n_new, blocks };
    assert!(err(PagedBatch::new(&drv, &[b(0, 17, &[0])], 16, 4)).contains("need 2 blocks"));
    assert!(err(PagedBatch::new(&drv, &[b(0, 3, &[4])], 16, 4)).contains("the cache has 4 blocks"));
    assert!(err(PagedBatch::new(&drv, &[b(0, 20, &[1, 1])], 16, 4)).contains("listed twice"));
    assert!(err(PagedBatch::new(&drv, &[b(0, 3, &[0])], 0, 4)).contains("block_size"));
    // Sequence 1 writes into block 0, which sequence 0 reads.
    assert!(err(PagedBatch::new(&drv, &[b(10, 1, &[2, 3]), b(5, 1, &[2])], 8, 4)).contains("holds new rows of sequence 1"));
    // Reading a block shared with another reader is fine.
    assert!(PagedBatch::new(&drv, &[b(16, 1, &[2, 3]), b(16, 2, &[2, 1])], 16, 4).is_ok());

    let batch = PagedBatch::new(&drv, &[b(0, 3, &[1])], 16, 2).unwrap();
    let p = params_of(4, 2, 16);
    let q = DeviceBuffer::<f32>::filled(&drv, 3 * 4 * 16, 0).unwrap();
    let kc = DeviceBuffer::<bf16>::filled(&drv, 32 * 2 * 16, 0).unwrap();
    let short = DeviceBuffer::<bf16>::filled(&drv, 31 * 2 * 16, 0).unwrap();
    let mut z = DeviceBuffer::<f32>::filled(&drv, 3 * 4 * 16, 0).unwrap();
    let mut z_bad = DeviceBuffer::<f32>::filled(&drv, 3 * 4 * 16 - 1, 0).unwrap();
    let msg = |r: patchbay::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z_bad, None)).contains("z has"));
    assert!(msg(attention(drv.as_ref(), &batch, &p, &q, &short, &kc, &mut z, None)).contains("k_cache"));
    assert!(msg(attention(drv.as_ref(), &batch, &params_of(4, 3, 16), &q, &kc, &kc, &mut z, None)).contains("multiple"));
    assert!(msg(attention(drv.as_ref(), &batch, &params_of(1, 1, 257), &q, &kc, &kc, &mut z, None)).contains("d_head"));
    assert!(msg(attention(drv.as_ref(), &batch, &AttnParams { sliding_window: Some(0), ..p }, &q, &kc, &kc, &mut z, None)).contains("window"));
    assert!(msg(attention(drv.as_ref(), &batch, &AttnParams { softcap: Some(-1.0), ..p }, &q, &kc, &kc, &mut z, None)).contains("softcap"));
    let req = PatternRequest::new(&drv, &[(2, 3)]).unwrap();
    let mut out = DeviceBuffer::<f32>::filled(&drv, 2, 0).unwrap();
    let r = attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z, Some(PatternOut { request: &req, out: &mut out, n_keys: 2 }));
    assert!(msg(r).contains("beyond n_keys"));
    let req = PatternRequest::new(&drv, &[(3, 0)]).unwrap();
    let mut out = DeviceBuffer::<f32>::filled(&drv, 8, 0).unwrap();
    let r = attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z, Some(PatternOut { request: &req, out: &mut out, n_keys: 8 }));
    assert!(msg(r).contains("past the batch"));
    // A valid call still works after the refusals.
    attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z, None).unwrap();
}

/// The time of a 4-head 128-token attention (d_head 64) on the first test device (the emulator
/// in forward fiber order by default), printed for the record.
#[test]
fn emulator_time_4_heads_128_tokens() {
    let (order, drv) = test_drivers().remove(0);
    let (h, dh, t, bs) = (4usize, 64usize, 128usize, 16usize);
    let blocks: Vec<u32> = (0..(t / bs) as u32).collect();
    let batch = PagedBatch::new(&drv, &[PagedSeq { pos0: 0, n_new: t, blocks: &blocks }], bs, blocks.len()).unwrap();
    let mut rng = Rng::new(7);
    let q = upload(&drv, &(0..t * h * dh).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>());
    let kc = upload(&drv, &(0..t * h * dh).map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0))).collect::<Vec<bf16>>());
    let mut z = poisoned::<f32>(&drv, t * h * dh);
    let p = params_of(h, h, dh);
    attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z, None).unwrap(); // warm-up
    let (start, cpu0) = (std::time::Instant::now(), process_cpu_seconds());
    let n = 5;
    for _ in 0..n {
        attention(drv.as_ref(), &batch, &p, &q, &kc, &kc, &mut z, None).unwrap();
    }
    drv.synchronize().unwrap();
    let wall = start.elapsed().as_secs_f64() / n as f64;
    let cpu = cpu0.zip(process_cpu_seconds()).map(|(a, b)| (b - a) / n as f64);
    eprintln!(
        "device {order}: 4-head 128-token attention, d_head 64: {:.1} ms wall, {} CPU (all threads; the wall time depends on the machine's load)",
        wall * 1e3,
        cpu.map_or("?".to_string(), |c| format!("{:.1} ms", c * 1e3))
    );
    assert!(z.download().unwrap().iter().all(|x| x.is_finite()));
}

/// User + system CPU time of this process (all threads), from /proc/self/stat (Linux).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ
}
