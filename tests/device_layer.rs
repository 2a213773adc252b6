//! The device layer around the kernels: `--device` specs, the missing-GPU error on a machine
//! without CUDA, the build-time NVRTC resource table (no kernel spills registers unless its
//! source says why), and the kernel table and typed entry points build/codegen.rs generates.

use std::str::FromStr;

use patchbay::backend::DeviceSpec;
use patchbay::backend::kernels;

#[test]
fn device_specs_parse() {
    assert_eq!(DeviceSpec::from_str("cpu").unwrap(), DeviceSpec::Cpu);
    assert_eq!(DeviceSpec::from_str("cuda").unwrap(), DeviceSpec::Cuda(0));
    assert_eq!(DeviceSpec::from_str("cuda:3").unwrap(), DeviceSpec::Cuda(3));
    assert_eq!(DeviceSpec::from_str("emu").unwrap(), DeviceSpec::Emu);
    for bad in ["cuda:x", "gpu", "cuda:", "cuda:-1", "CUDA", "cuda:0:1", ""] {
        let e = DeviceSpec::from_str(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("device `{bad}`")) && e.contains("expected cpu, cuda, cuda:N"), "{bad}: {e}");
    }
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    assert!(DeviceSpec::Cpu.driver().unwrap().is_none());
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    // On a machine with a GPU this opens it; without one (CI) it must be an error that says
    // so, not cudarc's panic.
    match DeviceSpec::from_str("cuda").unwrap().driver() {
        Ok(d) => eprintln!("a GPU is here: {}", d.unwrap().name()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("no CUDA driver (libcuda) on this machine") || e.contains("cuda:0"), "{e}");
        }
    }
    if let Err(e) = DeviceSpec::Cuda(7).driver() {
        assert!(e.to_string().contains("libcuda") || e.to_string().contains("cuda:7"), "{e}");
    }
}

#[test]
fn emu_spec_gives_the_emulator() {
    match DeviceSpec::Emu.driver() {
        Ok(d) => assert!(d.unwrap().name().starts_with("emu")),
        Err(e) => {
            assert!(!patchbay::backend::emu::available());
            assert!(e.to_string().contains("scripts/fetch-cuda.sh"), "{e}");
        }
    }
}

#[test]
fn kernel_table_lists_every_entry_point() {
    assert!(kernels::MODULES.iter().all(|m| !m.name.starts_with("selftest")));
    let st = kernels::SELFTEST_MODULES.iter().find(|m| m.name == "selftest/selftest").expect("the emulator self-tests");
    assert!(st.entries.contains(&"selftest_block_reduce") && st.entries.contains(&"selftest_struct_arg"));
    assert_eq!(kernels::module_of("selftest_warp_ops").map(|m| m.path), Some("kernels/selftest/selftest.cu"));
    for m in kernels::all_modules() {
        assert!(m.path.ends_with(".cu") && !m.source.is_empty());
        assert_eq!(m.sm_80.is_some(), kernels::PRECOMPILED, "{}", m.path);
        assert_eq!(m.sm_90a.is_some(), kernels::PRECOMPILED, "{}", m.path);
        assert_eq!(m.ptx.is_some(), kernels::PRECOMPILED, "{}", m.path);
        if let Some(ptx) = m.ptx {
            for e in m.entries {
                assert!(ptx.contains(&format!(".entry {e}(")), "{}: `{e}` not in its PTX", m.path);
            }
        }
    }
}

/// `kernels::entry` has one constant per entry point of the kernel table, in table order, each
/// naming its own file; the constants the launchers use are the right kernels.
#[test]
fn typed_entry_points_match_the_kernel_table() {
    use kernels::entry;
    let table: Vec<(&str, &str)> = kernels::all_modules().flat_map(|m| m.entries.iter().map(move |e| (*e, m.path))).collect();
    let typed: Vec<(&str, &str)> = entry::ALL.iter().map(|k| (k.name(), k.file())).collect();
    assert_eq!(typed, table);
    assert!(entry::ALL.iter().enumerate().all(|(i, k)| k.index() == i));
    assert_eq!((entry::KV_WRITE_BF16.name(), entry::KV_WRITE_BF16.file()), ("kv_write_bf16", "kernels/kv.cu"));
    assert_eq!((entry::QK_NORM_F32.name(), entry::QK_NORM_F32.file()), ("qk_norm_f32", "kernels/norm.cu"));
    assert_eq!(entry::selftest::SELFTEST_WARP_OPS.file(), "kernels/selftest/selftest.cu");
}

#[test]
fn resource_table_parses_and_nothing_spills() {
    if !kernels::PRECOMPILED {
        assert!(std::env::var("PATCHBAY_REQUIRE_NVRTC").as_deref() != Ok("1"), "PATCHBAY_REQUIRE_NVRTC=1 but no build-time NVRTC");
        eprintln!("skipped: kernels were not compiled at build time (run scripts/fetch-cuda.sh)");
        return;
    }
    let rows = kernels::resources().unwrap();
    let mut problems = Vec::new();
    for m in kernels::all_modules() {
        for e in m.entries {
            for arch in ["sm_80", "sm_90a"] {
                let Some(r) = rows.iter().find(|r| r.kernel == *e && r.arch == arch) else {
                    problems.push(format!("{e} ({arch}): no resource row"));
                    continue;
                };
                assert!(r.registers > 0 && r.registers <= 255, "{r:?}");
                if (r.spill_store_bytes > 0 || r.spill_load_bytes > 0) && kernels::spill_allowance(m.source).is_none() {
                    problems.push(format!(
                        "{e} ({arch}, {}) spills {} bytes stored / {} loaded with {} registers; fix it or say why in a `// spills: <reason>` header line",
                        m.path, r.spill_store_bytes, r.spill_load_bytes, r.registers
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("{}", kernels::KERNEL_RESOURCES);
}

#[test]
fn resource_table_parser() {
    let t = "kernel\tarch\tregisters\tspill_stores\tspill_loads\tsmem\tcmem\nk\tsm_80\t32\t8\t4\t1024\t400\n";
    let r = kernels::parse_resources(t).unwrap();
    assert_eq!((r[0].registers, r[0].spill_store_bytes, r[0].spill_load_bytes, r[0].shared_bytes, r[0].constant_bytes), (32, 8, 4, 1024, 400));
    assert!(kernels::parse_resources("bad header\n").is_err());
    assert!(kernels::parse_resources("kernel\tarch\tregisters\tspill_stores\tspill_loads\tsmem\tcmem\nk\tsm_80\tx\t0\t0\t0\t0\n").is_err());
    assert_eq!(kernels::spill_allowance("// file header\n// spills: the tile needs 300 registers\n\ncode"), Some("the tile needs 300 registers"));
    assert_eq!(kernels::spill_allowance("// header\nint x;\n// spills: too late\n"), None);
}
