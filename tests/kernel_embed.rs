//! kernels/embed.cu (`embed_bf16`) against `embed_ref`: bf16 row to f32, times the scale.
//! Exact (a conversion and one multiply).

mod common;

use half::bf16;
use common::kernels::*;
use patchbay::backend::device::DeviceBuffer;
use patchbay::backend::ops::embed::{embed, embed_ref, embed_tokens};

#[test]
fn embed_matches_reference() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE3BE_0001);
        for &(vocab, d, t) in &[(1, 1, 1), (37, 19, 19), (111, 111, 5), (50, 259, 111)] {
            for scale in [1.0f32, (d as f32).sqrt()] {
                let table: Vec<bf16> = rng.normals(vocab * d).iter().map(|&x| bf16::from_f32(x)).collect();
                let tokens: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
                let want = embed_ref(&table, d, &tokens, scale);
                let table_b = upload(&drv, &table);
                let out: DeviceBuffer<f32> = poisoned(&drv, t * d);
                let ids: DeviceBuffer<i32> = poisoned(&drv, t + 3);
                embed_tokens(&*drv, &out, &table_b, vocab, d, &tokens, &ids, scale).unwrap();
                let got = out.download().unwrap();
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{order} vocab {vocab} d {d} t {t} scale {scale}");
            }
        }
    }
}

#[test]
fn out_of_range_ids() {
    let (_, drv) = &test_drivers()[0];
    let (vocab, d) = (5, 7);
    let table = upload(drv, &vec![bf16::from_f32(1.0); vocab * d]);
    let out: DeviceBuffer<f32> = poisoned(drv, 3 * d);
    let ids: DeviceBuffer<i32> = poisoned(drv, 3);
    let err = embed_tokens(&**drv, &out, &table, vocab, d, &[0, 5, 1], &ids, 1.0).unwrap_err().to_string();
    assert!(err.contains("token 1 has id 5"), "{err}");
    // Device ids are not checked on the host: a bad id gives a NaN row, its neighbours are fine.
    ids.upload(&[4, -1, 5]).unwrap();
    embed(&**drv, &out, &table, vocab, d, &ids, 3, 1.0).unwrap();
    let got = out.download().unwrap();
    assert!(got[..d].iter().all(|&v| v == 1.0));
    assert!(got[d..].iter().all(|v| v.is_nan()));
    let e = embed(&**drv, &out, &table, vocab + 1, d, &ids, 3, 1.0).unwrap_err().to_string();
    assert!(e.contains("table has"), "{e}");
    let e = embed(&**drv, &out, &table, vocab, d, &ids, 4, 1.0).unwrap_err().to_string();
    assert!(e.contains("expected 4"), "{e}");
}
