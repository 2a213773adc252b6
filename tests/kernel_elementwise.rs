//! kernels/elementwise.cu against its references (`<name>_ref`): bias add, f32 -> bf16, head
//! masking, head sum (the forward's HeadOut path), soft-capping, non-finite counts, row gathers. Odd sizes,
//! poisoned outputs.

mod common;

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use half::bf16;
use common::kernels::*;
use patchbay::backend::device::DeviceBuffer;
use patchbay::backend::ops::elementwise::*;

const SHAPES: [(usize, usize); 5] = [(1, 1), (19, 19), (111, 1), (3, 111), (2, 1000 + 3)];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn bias_add_matches() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0001);
        for &(t, n) in &SHAPES {
            let x0 = rng.normals(t * n + 5); // longer buffer: the tail stays untouched
            let b = rng.normals(n);
            let x = upload(&drv, &x0);
            bias_add(&*drv, &x, &upload(&drv, &b), t, n).unwrap();
            let mut want = x0.clone();
            bias_add_ref(&mut want[..t * n], &b);
            assert_eq!(bits(&x.download().unwrap()), bits(&want), "{order} t {t} n {n}");
        }
    }
}

#[test]
fn to_bf16_rounds_to_nearest_even() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0002);
        for n in [1usize, 19, 111, 70_001] {
            let mut x = rng.normals(n);
            // Ties and specials: 1 + 2^-8 (tie, down to even), 1 + 3*2^-8 (tie, up), huge, tiny.
            for (i, v) in [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 3.0e38, -1.0e-40, 0.0, -0.0].iter().enumerate() {
                if i < n {
                    x[i] = *v;
                }
            }
            let y: DeviceBuffer<bf16> = poisoned(&drv, n);
            to_bf16(&*drv, &upload(&drv, &x), &y, n).unwrap();
            let got: Vec<u16> = y.download().unwrap().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u16> = to_bf16_ref(&x).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{order} n {n}");
        }
    }
}

#[test]
fn head_mask_keeps_one_head() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0003);
        for &(t, h, dh) in &[(1, 1, 1), (19, 3, 19), (5, 7, 32), (2, 4, 111)] {
            let z = rng.normals(t * h * dh);
            let z_b = upload(&drv, &z);
            for head in [0, h - 1, h / 2] {
                let out: DeviceBuffer<bf16> = poisoned(&drv, t * h * dh);
                head_mask(&*drv, &z_b, &out, t, h, dh, head).unwrap();
                let want: Vec<u16> = head_mask_ref(&z, h, dh, head).iter().map(|v| v.to_bits()).collect();
                let got: Vec<u16> = out.download().unwrap().iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{order} t {t} h {h} dh {dh} head {head}");
            }
        }
        let z: DeviceBuffer<f32> = poisoned(&drv, 8);
        let out: DeviceBuffer<bf16> = poisoned(&drv, 8);
        assert!(head_mask(&*drv, &z, &out, 1, 2, 4, 2).unwrap_err().to_string().contains("head 2"));
    }
}

#[test]
fn sum_heads_matches() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0004);
        for &(t, h, d) in &[(1, 1, 1), (19, 3, 19), (5, 8, 111), (2, 5, 1003)] {
            let res = rng.normals(t * h * d);
            let bias = rng.normals(d);
            for with_bias in [false, true] {
                let out: DeviceBuffer<f32> = poisoned(&drv, t * d);
                let bias_b = upload(&drv, &bias);
                sum_heads(&*drv, &upload(&drv, &res), with_bias.then_some(&bias_b), &out, t, h, d).unwrap();
                let mut want = vec![0.0f32; t * d];
                sum_heads_ref(&res, with_bias.then_some(&bias[..]), &mut want, h, d);
                assert_eq!(bits(&out.download().unwrap()), bits(&want), "{order} t {t} h {h} d {d} bias {with_bias}");
            }
        }
    }
}

#[test]
fn count_nonfinite_matches() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0009);
        for n in [1usize, 19, 256, 70_001, 2_100_003] {
            // NaN, +Inf, -Inf and the largest finite values at random places (some runs none); the
            // last size is past one grid (8192 blocks of 256 threads): threads stride.
            let mut x0 = rng.normals(n + 3);
            let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX, f32::MIN_POSITIVE];
            for _ in 0..(rng.next_u64() % 40) {
                let i = (rng.next_u64() % (n as u64 + 3)) as usize;
                x0[i] = specials[(rng.next_u64() % specials.len() as u64) as usize];
            }
            let count = DeviceBuffer::<u64>::from_slice(&drv, &[7]).unwrap();
            count_nonfinite(&*drv, &upload(&drv, &x0), n, &count).unwrap();
            assert_eq!(count.download().unwrap(), [7 + count_nonfinite_ref(&x0[..n])], "{order} n {n}");
        }
        let x: DeviceBuffer<f32> = poisoned(&drv, 4);
        let count = DeviceBuffer::<u64>::from_slice(&drv, &[0]).unwrap();
        assert!(count_nonfinite(&*drv, &x, 5, &count).is_err());
    }
}

#[test]
fn softcap_matches() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0005);
        for n in [1usize, 19, 111, 70_001] {
            let x0: Vec<f32> = rng.normals(n).iter().map(|v| v * 40.0).collect();
            let x = upload(&drv, &x0);
            softcap(&*drv, &x, n, 30.0).unwrap();
            let mut want = x0.clone();
            softcap_ref(&mut want, 30.0);
            let got = x.download().unwrap();
            assert_close(&format!("softcap {order} n {n}"), &got, &want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
            assert!(got.iter().all(|v| v.abs() <= 30.0));
        }
        let x: DeviceBuffer<f32> = poisoned(&drv, 4);
        assert!(softcap(&*drv, &x, 4, 0.0).is_err());
        assert!(softcap(&*drv, &x, 5, 1.0).is_err());
    }
}

#[test]
fn gathers_match() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xE1E0_0006);
        for &(r, d, n) in &[(1, 1, 1), (19, 19, 5), (111, 7, 111), (5, 1003, 3)] {
            let rows: Vec<usize> = (0..n).map(|_| rng.below(r)).collect();
            let rows_b: DeviceBuffer<i32> = poisoned(&drv, n);
            upload_rows(&rows, r, &rows_b).unwrap();

            let src = rng.normals(r * d);
            let out: DeviceBuffer<bf16> = poisoned(&drv, n * d);
            gather_rows_f32_bf16(&*drv, &upload(&drv, &src), r, &rows_b, &out, n, d).unwrap();
            let want: Vec<u16> = to_bf16_ref(&gather_rows_ref(&src, &rows, d)).iter().map(|v| v.to_bits()).collect();
            let got: Vec<u16> = out.download().unwrap().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "gather_rows_f32_bf16 {order} r {r} d {d} n {n}");

            let src_h: Vec<bf16> = rng.normals(r * d).iter().map(|&v| bf16::from_f32(v)).collect();
            let out: DeviceBuffer<bf16> = poisoned(&drv, n * d);
            gather_rows_bf16(&*drv, &upload(&drv, &src_h), r, &rows_b, &out, n, d).unwrap();
            let want: Vec<u16> = gather_rows_ref(&src_h, &rows, d).iter().map(|v| v.to_bits()).collect();
            let got: Vec<u16> = out.download().unwrap().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "gather_rows_bf16 {order} r {r} d {d} n {n}");
        }
        // Host indices are checked; a bad device index gives a NaN row, not a wild read.
        let rows_b: DeviceBuffer<i32> = poisoned(&drv, 2);
        assert!(upload_rows(&[0, 4], 4, &rows_b).unwrap_err().to_string().contains("row 4"));
        rows_b.upload(&[1, 9]).unwrap();
        let out: DeviceBuffer<bf16> = poisoned(&drv, 2 * 3);
        gather_rows_bf16(&*drv, &upload(&drv, &[bf16::from_f32(2.0); 6]), 2, &rows_b, &out, 2, 3).unwrap();
        let got = out.download().unwrap();
        assert!(got[..3].iter().all(|v| v.to_f32() == 2.0) && got[3..].iter().all(|v| v.is_nan()), "{order}");
    }
}
