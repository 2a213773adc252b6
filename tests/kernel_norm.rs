//! kernels/norm.cu against `rmsnorm_ref`: `add_norm_f32` (with `site_op_ref` for the site ops)
//! in every combination of delta / post_w / pre_w present or not, plain and (1 + w) weights, odd
//! widths, site plans on some rows of all four sites sharing one capture arena; `qk_norm_f32`
//! (plain weight) in two fiber orders.

mod common;

use std::sync::Arc;

use common::{BF16_ATOL, BF16_RTOL, KERNEL_F32_ATOL, KERNEL_F32_RTOL, assert_close};
use half::bf16;
use common::kernels::*;
use patchbay::backend::device::{DeviceBuffer, Driver};
use patchbay::backend::ops::norm::{AddNorm, add_norm, qk_norm, rmsnorm_ref};
use patchbay::backend::ops::site_ops::DeviceSitePlan;
use patchbay::intervene::Op;
use patchbay::model::config::NormWeight;

struct Case {
    t: usize,
    d: usize,
    with_delta: bool,
    with_post: bool,
    with_pre: bool,
    one_plus: bool,
    with_sites: bool,
    with_bf16: bool,
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, one_plus: bool) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    rmsnorm_ref(x, w, eps, if one_plus { NormWeight::OnePlus } else { NormWeight::Plain }, &mut out);
    out
}

fn run_case(order: &str, drv: &Arc<dyn Driver>, rng: &mut Rng, kind: &mut usize, c: &Case) {
    let (t, d, eps) = (c.t, c.d, 1e-6f32);
    let name = format!(
        "add_norm {order} t {t} d {d} delta {} post {} pre {} one_plus {} sites {}",
        c.with_delta, c.with_post, c.with_pre, c.one_plus, c.with_sites
    );
    let weight = |rng: &mut Rng| -> Vec<f32> { (0..d).map(|_| rng.normal() * 0.5 + if c.one_plus { 0.0 } else { 1.0 }).collect() };
    let resid0 = rng.normals(t * d);
    let delta0: Vec<f32> = rng.normals(t * d).iter().map(|x| x * 2.0).collect();
    let post_w = weight(rng);
    let pre_w = weight(rng);
    let mut cap_len = 0;
    let mut plans: Vec<RefPlan> = Vec::new();
    for site in 0..4 {
        let on = c.with_sites && (site != 0 || c.with_delta) && rng.below(4) != 0;
        plans.push(if on { random_plan(rng, t, d, 3, kind, &mut cap_len) } else { RefPlan::default() });
    }

    // The reference, step by step as the kernel's header says.
    let mut want_cap = vec![f32::NAN; cap_len];
    let mut resid = resid0.clone();
    let mut delta = delta0.clone();
    if c.with_delta {
        if c.with_post {
            delta = rmsnorm(&delta0, &post_w, eps, c.one_plus);
        }
        plans[0].apply(&mut delta, d, &mut want_cap);
        resid.iter_mut().zip(&delta).for_each(|(r, dl)| *r += dl);
    }
    plans[1].apply(&mut resid, d, &mut want_cap);
    plans[2].apply(&mut resid, d, &mut want_cap);
    let mut out = if c.with_pre { rmsnorm(&resid, &pre_w, eps, c.one_plus) } else { resid.clone() };
    plans[3].apply(&mut out, d, &mut want_cap);

    // The kernel.
    let resid_b = upload(drv, &resid0);
    let delta_b = upload(drv, &delta0);
    let post_b = upload(drv, &post_w);
    let pre_b = upload(drv, &pre_w);
    let out_b: DeviceBuffer<f32> = poisoned(drv, t * d);
    let out_h: DeviceBuffer<bf16> = poisoned(drv, t * d);
    let cap_b: DeviceBuffer<f32> = poisoned(drv, cap_len.max(1));
    let dev_plans: Vec<DeviceSitePlan> = plans.iter().map(|p| p.builder().upload(drv).unwrap()).collect();
    let site = |i: usize| (!plans[i].entries.is_empty()).then(|| &dev_plans[i]);
    add_norm(
        &**drv,
        &AddNorm {
            resid: &resid_b,
            delta: c.with_delta.then_some(&delta_b),
            post_w: c.with_post.then_some(&post_b),
            pre_w: c.with_pre.then_some(&pre_b),
            out_f32: &out_b,
            out_bf16: c.with_bf16.then_some(&out_h),
            t,
            d,
            eps,
            one_plus: c.one_plus,
            delta_site: site(0),
            resid_site0: site(1),
            resid_site1: site(2),
            out_site: site(3),
            capture: Some(&cap_b),
        },
    )
    .unwrap();

    let (a, r) = (KERNEL_F32_ATOL, KERNEL_F32_RTOL);
    assert_close(&format!("{name}: resid"), &resid_b.download().unwrap(), &resid, a, r);
    assert_close(&format!("{name}: delta"), &delta_b.download().unwrap(), &delta, a, r);
    let got_out = out_b.download().unwrap();
    assert_close(&format!("{name}: out_f32"), &got_out, &out, a, r);
    if c.with_bf16 {
        let got_h = bf16_to_f32(&out_h.download().unwrap());
        assert_close(&format!("{name}: out_bf16"), &got_h, &bf16_round(&out), BF16_ATOL, BF16_RTOL);
        assert!(got_h.iter().zip(bf16_round(&got_out)).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: out_bf16 is not out_f32 rounded");
    } else {
        assert!(out_h.download().unwrap().iter().all(|v| v.is_nan()), "{name}: out_bf16 was not asked for but written");
    }
    assert_close(&format!("{name}: capture"), &cap_b.download().unwrap()[..cap_len], &want_cap, a, r);
}

#[test]
fn add_norm_matches_reference() {
    for (order, drv) in test_drivers() {
        let mut rng = Rng::seeded(0x0404_0001);
        let mut kind = 0;
        for &(t, d) in &[(1, 1), (19, 19), (7, 111), (3, 2048 + 3)] {
            for combo in 0..16 {
                let (with_delta, with_post, with_pre, one_plus) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0, combo & 8 != 0);
                if with_post && !with_delta {
                    continue; // an error: see bad_arguments_are_errors
                }
                for with_sites in [false, true] {
                    let with_bf16 = !(combo + with_sites as usize).is_multiple_of(3);
                    run_case(&order, &drv, &mut rng, &mut kind, &Case { t, d, with_delta, with_post, with_pre, one_plus, with_sites, with_bf16 });
                }
            }
        }
    }
}

/// A row of zeros normalises to zeros (eps keeps it finite); a constant row to w (or 1 + w).
#[test]
fn add_norm_fixed_points() {
    for (order, drv) in test_drivers() {
        let d = 37;
        let w: Vec<f32> = (0..d).map(|i| i as f32 * 0.1).collect();
        let resid = upload(&drv, &[vec![0.0f32; d], vec![3.0f32; d]].concat());
        let w_b = upload(&drv, &w);
        let out: DeviceBuffer<f32> = poisoned(&drv, 2 * d);
        for one_plus in [false, true] {
            let a = AddNorm {
                resid: &resid,
                delta: None,
                post_w: None,
                pre_w: Some(&w_b),
                out_f32: &out,
                out_bf16: None,
                t: 2,
                d,
                eps: 1e-5,
                one_plus,
                delta_site: None,
                resid_site0: None,
                resid_site1: None,
                out_site: None,
                capture: None,
            };
            add_norm(&*drv, &a).unwrap();
            let got = out.download().unwrap();
            assert!(got[..d].iter().all(|&v| v == 0.0), "{order}: zero row");
            let want: Vec<f32> = w.iter().map(|&w| if one_plus { 1.0 + w } else { w }).collect();
            assert_close(&format!("{order} constant row"), &got[d..], &want, 1e-5, 1e-5);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let (_, drv) = &test_drivers()[0];
    let (t, d) = (3, 8);
    let full: DeviceBuffer<f32> = upload(drv, &vec![1.0; t * d]);
    let short: DeviceBuffer<f32> = upload(drv, &vec![1.0; t * d - 1]);
    let w: DeviceBuffer<f32> = upload(drv, &vec![1.0; d]);
    let mut b = RefPlan::default();
    b.entries.push(RefEntry::Op { row: 3, pos: 0, op: Arc::new(Op::Zero), operand_row: 0, slices: vec![(0, 1)] });
    let row3 = b.builder().upload(drv).unwrap();
    let base = AddNorm {
        resid: &full,
        delta: None,
        post_w: None,
        pre_w: None,
        out_f32: &full,
        out_bf16: None,
        t,
        d,
        eps: 1e-6,
        one_plus: false,
        delta_site: None,
        resid_site0: None,
        resid_site1: None,
        out_site: None,
        capture: None,
    };
    let e = |a: AddNorm| add_norm(&**drv, &a).unwrap_err().to_string();
    assert!(e(AddNorm { resid: &short, ..base }).contains("resid"));
    assert!(e(AddNorm { out_f32: &short, ..base }).contains("out_f32"));
    assert!(e(AddNorm { delta: Some(&short), ..base }).contains("delta"));
    assert!(e(AddNorm { post_w: Some(&w), ..base }).contains("not given"));
    assert!(e(AddNorm { pre_w: Some(&short), d: d * t, t: 1, ..base }).contains("pre_w"));
    assert!(e(AddNorm { out_site: Some(&row3), ..base }).contains("row 3"));
    assert!(e(AddNorm { d: 0, ..base }).contains("bad shape"));
    add_norm(&**drv, &AddNorm { delta: Some(&w), t: 1, ..base }).unwrap();
}

#[test]
fn qk_norm_matches_rmsnorm_ref() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    for &(rows, n) in &[(1usize, 19usize), (19, 2048), (111, 333), (19, 4096 + 7)] {
        let x: Vec<f32> = (0..rows * n).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let w: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5)).collect();
        let eps = 1e-6;
        let mut want = vec![0.0f32; rows * n];
        rmsnorm_ref(&x, &w, eps, NormWeight::Plain, &mut want);
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

/// qk_norm refuses inconsistent inputs with an error.
#[test]
fn qk_norm_bad_inputs_are_errors() {
    let (_, drv): (String, Arc<dyn Driver>) = test_drivers().remove(0);
    let msg = |r: patchbay::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let mut x = DeviceBuffer::<f32>::filled(&drv, 3 * 8, 0).unwrap();
    let w = DeviceBuffer::<f32>::filled(&drv, 8, 0).unwrap();
    assert!(msg(qk_norm(drv.as_ref(), &mut x, &w, 4, 1e-6)).contains("expected 4 rows of 8"));
    assert!(msg(qk_norm(drv.as_ref(), &mut x, &w, 3, f32::NAN)).contains("eps"));
}
