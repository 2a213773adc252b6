//! kernels/act.cu (`act_mul_f32`, on the stacked gate and up projections) against `act_mul_ref`
//! (biases added first, as `bias_add_ref`) followed by the MlpPost site ops (`site_op_ref`), odd
//! sizes, both activations.

mod common;

use common::{BF16_ATOL, BF16_RTOL, KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use half::bf16;
use common::kernels::*;
use patchbay::backend::device::DeviceBuffer;
use patchbay::backend::ops::act::{ActMul, act_mul, act_mul_ref};
use patchbay::backend::ops::elementwise::bias_add_ref;
use patchbay::model::config::Activation;

#[test]
fn act_mul_matches_reference() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0xAC70_0001);
        let mut kind = 0;
        for &(t, n) in &[(1, 1), (19, 19), (111, 19), (5, 111), (2, 1000 + 3)] {
            for act in [Activation::Silu, Activation::GeluTanh] {
                for variant in 0..4 {
                    let (gate_bias, up_bias, with_sites) = (variant & 1 != 0, variant == 2 || variant == 3, variant >= 2);
                    let with_bf16 = variant != 1;
                    let name = format!("act_mul {order} t {t} i {n} {act:?} gate_b {gate_bias} up_b {up_bias} sites {with_sites}");
                    let gate0: Vec<f32> = rng.normals(t * n).iter().map(|x| x * 3.0).collect();
                    let up0 = rng.normals(t * n);
                    let gb = rng.normals(n);
                    let ub = rng.normals(n);
                    let mut cap_len = 0;
                    let plan = if with_sites { random_plan(&mut rng, t, n, 0, &mut kind, &mut cap_len) } else { RefPlan::default() };

                    let mut g = gate0.clone();
                    let mut u = up0.clone();
                    if gate_bias {
                        bias_add_ref(&mut g, &gb);
                    }
                    if up_bias {
                        bias_add_ref(&mut u, &ub);
                    }
                    act_mul_ref(&mut g, &u, act);
                    let mut want_cap = vec![f32::NAN; cap_len];
                    plan.apply(&mut g, n, &mut want_cap);

                    // Per row the gate projection, then the up projection (one stacked GEMM's output).
                    let gate_up0: Vec<f32> = gate0.chunks(n).zip(up0.chunks(n)).flat_map(|(g, u)| g.iter().chain(u).copied()).collect();
                    let gate_up = upload(&drv, &gate_up0);
                    let gb_b = upload(&drv, &gb);
                    let ub_b = upload(&drv, &ub);
                    let out: DeviceBuffer<bf16> = poisoned(&drv, t * n);
                    let cap: DeviceBuffer<f32> = poisoned(&drv, cap_len.max(1));
                    let dp = plan.builder().upload(&drv).unwrap();
                    act_mul(
                        &*drv,
                        &ActMul {
                            gate_up: &gate_up,
                            gate_b: gate_bias.then_some(&gb_b),
                            up_b: up_bias.then_some(&ub_b),
                            out_bf16: with_bf16.then_some(&out),
                            t,
                            i: n,
                            act,
                            site: with_sites.then_some(&dp),
                            capture: Some(&cap),
                        },
                    )
                    .unwrap();
                    let rows = gate_up.download().unwrap();
                    let got: Vec<f32> = rows.chunks(2 * n).flat_map(|r| r[..n].to_vec()).collect();
                    let up_after: Vec<f32> = rows.chunks(2 * n).flat_map(|r| r[n..].to_vec()).collect();
                    assert_eq!(up_after, up0, "{name}: the up half is read, not written");
                    assert_close(&name, &got, &g, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
                    assert_close(&format!("{name} capture"), &cap.download().unwrap()[..cap_len], &want_cap, KERNEL_F32_ATOL, KERNEL_F32_RTOL);
                    let got_h = bf16_to_f32(&out.download().unwrap());
                    if with_bf16 {
                        assert_close(&format!("{name} bf16"), &got_h, &bf16_round(&g), BF16_ATOL, BF16_RTOL);
                        assert!(got_h.iter().zip(bf16_round(&got)).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: out_bf16 is not gate rounded");
                    } else {
                        assert!(got_h.iter().all(|v| v.is_nan()), "{name}: out_bf16 not asked for but written");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let (_, drv) = &test_drivers()[0];
    let (t, n) = (3, 10);
    let full: DeviceBuffer<f32> = upload(drv, &vec![0.0; 2 * t * n]);
    let short: DeviceBuffer<f32> = upload(drv, &vec![0.0; 2 * t * n - 1]);
    let bias: DeviceBuffer<f32> = upload(drv, &vec![0.0; n - 1]);
    let base = ActMul { gate_up: &full, gate_b: None, up_b: None, out_bf16: None, t, i: n, act: Activation::Silu, site: None, capture: None };
    let e = |a: ActMul| act_mul(&**drv, &a).unwrap_err().to_string();
    assert!(e(ActMul { gate_up: &short, ..base }).contains("gate_up"));
    assert!(e(ActMul { up_b: Some(&bias), ..base }).contains("up_b"));
    assert!(e(ActMul { i: 0, ..base }).contains("bad shape"));
    act_mul(&**drv, &base).unwrap();
    assert!(full.download().unwrap().iter().all(|&v| v == 0.0), "silu(0) * 0 = 0");
}
