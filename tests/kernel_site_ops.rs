//! kernels/site_ops.cu (`site_ops_f32`) and the plan builder of ops/site_ops.rs against
//! `intervene::apply_op` on the CPU: random rows, selections and ops of every kind, several ops
//! per row, captures after interventions, on the emulated device in two fiber orders.

mod common;

use std::sync::Arc;

use common::{KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use common::kernels::*;
use patchbay::backend::device::DeviceBuffer;
use patchbay::backend::ops::site_ops::{DeviceSitePlan, SitePlan, SitePlanBuilder, site_ops};
use patchbay::intervene::Op;

#[test]
fn site_ops_match_apply_op() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0x5173_0001);
        let mut kind = 0;
        let mut n_ops = 0;
        for &(t, width) in &[(1, 1), (1, 19), (19, 1), (19, 111), (111, 19), (7, 259), (3, 1000)] {
            for trial in 0..3 {
                let name = format!("site_ops {order} t {t} width {width} trial {trial}");
                let mut cap_len = 0;
                let plan = random_plan(&mut rng, t, width, 5 * trial, &mut kind, &mut cap_len);
                n_ops += plan.n_ops();
                let x0 = rng.normals(t * width);
                let x = upload(&drv, &x0);
                let cap: DeviceBuffer<f32> = poisoned(&drv, cap_len.max(1));
                let dp = plan.builder().upload(&drv).unwrap();
                site_ops(&*drv, &x, t, width, &dp, Some(&cap)).unwrap();

                let mut want = x0.clone();
                let mut want_cap = vec![f32::NAN; cap_len];
                plan.apply(&mut want, width, &mut want_cap);
                assert_close(&name, &x.download().unwrap(), &want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
                assert_close(&format!("{name} capture"), &cap.download().unwrap()[..cap_len], &want_cap, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
            }
        }
        assert!(kind >= 14 && n_ops > 50, "too few ops drawn ({n_ops}, {kind} non-shared)");
    }
}

/// Each kind alone on a whole wide row (many threads per op, several warps for P x).
#[test]
fn every_kind_on_a_wide_row() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0x5173_0002);
        let (t, width) = (4, 517);
        for kind in 0..7 {
            let slices = if kind % 2 == 0 { vec![(0, width)] } else { vec![(300, 217), (3, 200)] };
            let w: usize = slices.iter().map(|s| s.1).sum();
            let op = Arc::new(random_op(&mut rng, kind, w, t));
            let mut plan = RefPlan::default();
            for row in [2, 0] {
                plan.entries.push(RefEntry::Op { row, pos: 100 + row, op: op.clone(), operand_row: row, slices: slices.clone() });
                plan.entries.push(RefEntry::Capture { row, offset: if row == 0 { 0 } else { width } });
            }
            let x0 = rng.normals(t * width);
            let x = upload(&drv, &x0);
            let cap: DeviceBuffer<f32> = poisoned(&drv, 2 * width);
            site_ops(&*drv, &x, t, width, &plan.builder().upload(&drv).unwrap(), Some(&cap)).unwrap();
            let mut want = x0.clone();
            let mut want_cap = vec![f32::NAN; 2 * width];
            plan.apply(&mut want, width, &mut want_cap);
            let name = format!("{order} {}", op.name());
            assert_close(&name, &x.download().unwrap(), &want, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
            assert_close(&format!("{name} capture"), &cap.download().unwrap(), &want_cap, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
        }
    }
}

/// The order of ops on a row matters and is kept: scale then add differs from add then scale;
/// a capture added first still sees the result of both.
#[test]
fn order_within_a_row() {
    for (order, drv) in test_drivers() {
        let width = 5;
        let x0 = vec![1.0f32; 2 * width];
        let scale = Op::Scale { alpha: 2.0 };
        let add = Op::Add { beta: 1.0, v: vec![1.0; width], normalize: false };
        let mut b = SitePlanBuilder::new();
        b.add_capture(1, 0).unwrap();
        b.add_op(1, 0, &scale, 0, &[(0, width)]).unwrap();
        b.add_op(1, 0, &add, 0, &[(0, width)]).unwrap();
        b.add_op(0, 0, &add, 0, &[(0, width)]).unwrap();
        b.add_op(0, 0, &scale, 0, &[(0, width)]).unwrap();
        let x = upload(&drv, &x0);
        let cap: DeviceBuffer<f32> = poisoned(&drv, width);
        site_ops(&*drv, &x, 2, width, &b.upload(&drv).unwrap(), Some(&cap)).unwrap();
        let got = x.download().unwrap();
        assert_eq!(&got[..width], &[4.0; 5], "{order}: row 0 is (1 + 1) * 2");
        assert_eq!(&got[width..], &[3.0; 5], "{order}: row 1 is 1 * 2 + 1");
        assert_eq!(cap.download().unwrap(), vec![3.0; 5], "{order}: the capture comes after the interventions");
    }
}

/// RandomEqualNorm draws the reference's noise: same direction, norm of the input, independent of
/// the row the position sits in.
#[test]
fn random_equal_norm_is_the_reference_noise() {
    for (order, drv) in test_drivers() {
        let width = 64;
        let x0: Vec<f32> = (0..3 * width).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let op = Op::RandomEqualNorm { seed: 0xDEAD_BEEF_1234 };
        let mut b = SitePlanBuilder::new();
        // rows 0 and 2 carry the same position: same noise direction, scaled to their own norms.
        b.add_op(0, 41, &op, 0, &[(0, width)]).unwrap();
        b.add_op(2, 41, &op, 0, &[(0, width)]).unwrap();
        let x = upload(&drv, &x0);
        site_ops(&*drv, &x, 3, width, &b.upload(&drv).unwrap(), None).unwrap();
        let got = x.download().unwrap();
        for row in [0, 2] {
            let mut want = x0[row * width..(row + 1) * width].to_vec();
            patchbay::intervene::apply_op(&op, &mut want, 0, 41);
            assert_close(&format!("{order} row {row}"), &got[row * width..(row + 1) * width], &want, 1e-5, 1e-5);
            let n_in = patchbay::intervene::norm(&x0[row * width..(row + 1) * width]);
            let n_out = patchbay::intervene::norm(&got[row * width..(row + 1) * width]);
            assert!((n_in - n_out).abs() <= 1e-5 * n_in, "{order} row {row}: norm {n_out}, want {n_in}");
        }
        assert_eq!(&got[width..2 * width], &x0[width..2 * width], "{order}: row 1 has no op");
        let ratio: Vec<f32> = (0..width).map(|i| got[i] / got[2 * width + i]).collect();
        assert!(ratio.iter().all(|r| (r - ratio[0]).abs() < 1e-4 * ratio[0].abs()), "{order}: same position, same direction");
    }
}

#[test]
fn empty_plan_is_a_no_op() {
    for (order, drv) in test_drivers() {
        let x0: Vec<f32> = (0..38).map(|i| i as f32).collect();
        let x = upload(&drv, &x0);
        let dp = SitePlanBuilder::new().upload(&drv).unwrap();
        assert!(dp.is_empty());
        assert_eq!(dp.raw(), SitePlan::EMPTY);
        site_ops(&*drv, &x, 2, 19, &dp, None).unwrap();
        site_ops(&*drv, &x, 2, 19, &DeviceSitePlan::empty(), None).unwrap();
        assert_eq!(x.download().unwrap(), x0, "{order}");
    }
}

#[test]
fn operands_are_shared_not_copied_per_row() {
    let v = vec![0.5f32; 300];
    let add = Op::Add { beta: 1.0, v: v.clone(), normalize: false };
    let mut b = SitePlanBuilder::new();
    for row in 0..50 {
        b.add_op(row, row, &add, 0, &[(0, 300)]).unwrap();
    }
    // The same values in another Op (another address) are not confused with different values.
    let other = Op::Add { beta: 1.0, v: vec![0.25f32; 300], normalize: false };
    b.add_op(50, 50, &other, 0, &[(0, 300)]).unwrap();
    let (_, drv) = &test_drivers()[0];
    let dp = b.upload(drv).unwrap();
    assert_eq!(dp.n_active(), 51);
    let x = upload(drv, &vec![0.0f32; 51 * 300]);
    site_ops(&**drv, &x, 51, 300, &dp, None).unwrap();
    let got = x.download().unwrap();
    assert!(got[..50 * 300].iter().all(|&g| g == 0.5) && got[50 * 300..].iter().all(|&g| g == 0.25));
}

#[test]
fn bad_plans_are_errors() {
    let (_, drv) = &test_drivers()[0];
    let mut b = SitePlanBuilder::new();
    let err = |r: patchbay::Result<()>| r.unwrap_err().to_string();
    assert!(err(b.add_op(0, 0, &Op::Zero, 0, &[(0, 4), (3, 2)])).contains("overlap"));
    assert!(err(b.add_op(0, 0, &Op::Mean { mean: vec![0.0; 3] }, 0, &[(0, 4)])).contains("expected 4"));
    assert!(err(b.add_op(0, 0, &Op::Add { beta: 1.0, v: vec![0.0; 5], normalize: false }, 0, &[(0, 4)])).contains("v has 5"));
    assert!(err(b.add_op(0, 0, &Op::ProjectSet { beta: 1.0, p: vec![0.0; 15], v: vec![0.0; 4] }, 0, &[(0, 4)])).contains("P has 15"));
    assert!(err(b.add_op(0, 0, &Op::Patch { values: vec![0.0; 8] }, 2, &[(0, 4)])).contains("values"));
    assert!(b.is_empty(), "failed adds leave nothing behind");

    b.add_op(3, 0, &Op::Zero, 0, &[(10, 4)]).unwrap();
    b.add_capture(3, 7).unwrap();
    let dp = b.upload(drv).unwrap();
    let x: DeviceBuffer<f32> = upload(drv, &[0.0; 4 * 14]);
    let cap: DeviceBuffer<f32> = upload(drv, &[0.0; 21]);
    let e = |r: patchbay::Result<()>| r.unwrap_err().to_string();
    assert!(e(site_ops(&**drv, &x, 3, 14, &dp, Some(&cap))).contains("row 3"));
    assert!(e(site_ops(&**drv, &x, 4, 13, &dp, Some(&cap))).contains("ends at 14"));
    assert!(e(site_ops(&**drv, &x, 4, 14, &dp, None)).contains("no capture buffer"));
    let small: DeviceBuffer<f32> = upload(drv, &[0.0; 20]);
    assert!(e(site_ops(&**drv, &x, 4, 14, &dp, Some(&small))).contains("overruns"));
    assert!(e(site_ops(&**drv, &x, 5, 14, &dp, Some(&cap))).contains("x has"));
    site_ops(&**drv, &x, 4, 14, &dp, Some(&cap)).unwrap();
}

/// A patch from rows held on the device (`add_patch_row`, `Op::PatchHeld`) reads the source rows
/// in place and equals a `Patch` of the same elements gathered on the host: random selections,
/// rows patched from different source rows, mixed with other ops on the same row, on wide rows
/// (several warps) and narrow ones.
#[test]
fn patch_row_reads_held_rows_in_place() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0x5173_0003);
        for &(t, width) in &[(1, 1), (5, 19), (9, 517)] {
            let n_src = 4;
            let src0 = rng.normals(n_src * width);
            let src: DeviceBuffer<f32> = upload(&drv, &src0); // [n_src, width]
            let x0 = rng.normals(t * width);
            let mut want = x0.clone();
            let mut b = SitePlanBuilder::new();
            for row in (0..t).filter(|r| r % 2 == 0) {
                let slices = random_slices(&mut rng, width);
                let s = rng.below(n_src);
                b.add_patch_row(row, row, src.ptr().offset(s * width * 4), width, &slices).unwrap();
                let scale = Op::Scale { alpha: 2.0 };
                b.add_op(row, row, &scale, 0, &[(0, width)]).unwrap();
                let r = &mut want[row * width..(row + 1) * width];
                for &(a, n) in &slices {
                    r[a..a + n].copy_from_slice(&src0[s * width + a..s * width + a + n]);
                }
                r.iter_mut().for_each(|v| *v *= 2.0);
            }
            let x = upload(&drv, &x0);
            site_ops(&*drv, &x, t, width, &b.upload(&drv).unwrap(), None).unwrap();
            assert_eq!(x.download().unwrap(), want, "{order} t {t} width {width}");
            assert_eq!(src.download().unwrap(), src0, "{order}: the held rows are read, not written");
        }
        // A selection past the held row, and a null row, are refused when added.
        let mut b = SitePlanBuilder::new();
        let src: DeviceBuffer<f32> = upload(&drv, &[0.0; 8]);
        assert!(b.add_patch_row(0, 0, src.ptr(), 8, &[(4, 5)]).unwrap_err().to_string().contains("past the held source row"));
        assert!(b.add_patch_row(0, 0, patchbay::backend::device::DevPtr::NULL, 8, &[(0, 8)]).unwrap_err().to_string().contains("null"));
        let held = Op::Patch { values: vec![0.0; 8] };
        b.add_op(0, 0, &held, 0, &[(0, 8)]).unwrap();
        assert_eq!(b.upload(&drv).unwrap().n_active(), 1, "{order}: refused adds leave nothing behind");
    }
}
