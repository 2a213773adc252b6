//! Build script: compiles the CUDA kernels twice (DESIGN.md section 6).
//!
//! 1. Scan `kernels/*.cu` (the product's kernels) and `kernels/selftest/*.cu` (the emulator's
//!    self-test kernels): entry points (`extern "C" __global__ void NAME(`), misuse checks.
//! 2. NVRTC, from the pinned wheel that scripts/fetch-cuda.sh unpacks (`PATCHBAY_CUDA_ROOT`,
//!    default `.cache/cuda`): a CUBIN for sm_80 and sm_90a and PTX for compute_80 per file, the
//!    ptxas resource table (`kernel_resources.tsv`), and `kernels.rs`, the table that
//!    src/backend/kernels.rs includes (sources always, binaries when NVRTC was there).
//!    Sets `cfg(patchbay_nvrtc)`.
//! 3. The emulator: every kernel file compiled as host C++ with emu/cuda_emu.h force-included, a
//!    generated thunk per entry point, a registry, emu/runtime.cpp and the context switch, all in
//!    the static library `patchbay_emu`. Sets `cfg(patchbay_emu)`.
//!
//! Without NVRTC / the CUDA headers the build still succeeds, with one warning; with
//! `PATCHBAY_REQUIRE_NVRTC=1` (CI) it fails instead.
//! Every compilation is cached in OUT_DIR under a hash of what it depends on, and the
//! compilations run in parallel (cargo's job count), so that editing one kernel recompiles one file.

mod codegen;
mod emu;
mod layout;
mod nvrtc;
mod scan;
mod sources;
mod tasks;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::{env, fs};

use codegen::{entries_rs, kernels_rs, layout_files};
use emu::emu_units;
use nvrtc::{NVRTC_TARGETS, cuda_root, load_nvrtc, locate_cuda, resource_table};
use sources::{kernel_headers, scan_kernels};
use tasks::{Deps, Done, Task, hash_inputs, run_parallel};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo::rustc-check-cfg=cfg(patchbay_nvrtc)");
    println!("cargo::rustc-check-cfg=cfg(patchbay_emu)");
    println!("cargo::rerun-if-changed=build");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=emu");
    for var in ["PATCHBAY_CUDA_ROOT", "PATCHBAY_REQUIRE_NVRTC", "CXX", "CXXFLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let require = env::var("PATCHBAY_REQUIRE_NVRTC").is_ok_and(|v| v == "1");

    let files = scan_kernels(&manifest).unwrap_or_else(|e| fail(&e));
    let headers = kernel_headers(&manifest);
    let (cuda, missing) = locate_cuda(&manifest);
    if let Some(p) = watch::cuda_watch_path(&cuda_root(&manifest), &manifest) {
        println!("cargo::rerun-if-changed={}", p.display());
    }

    // Which of the two compilations can run here.
    let nvrtc = match &cuda {
        Some(c) => load_nvrtc(c),
        None => Err(missing.clone()),
    };
    let emu = match &cuda {
        Some(_) if host_is_x86_64_linux() => Ok(()),
        Some(_) => Err("the emulator's context switch is written for x86-64 Linux only".to_string()),
        None => Err(missing.clone()),
    };
    if let Err(why) = &nvrtc {
        if require {
            fail(&format!(
                "PATCHBAY_REQUIRE_NVRTC=1 but NVRTC is not usable: {why}. Run scripts/fetch-cuda.sh \
                 (downloads the pinned NVRTC and CUDA headers into .cache/cuda) and set \
                 PATCHBAY_CUDA_ROOT=$PWD/.cache/cuda, as scripts/test.sh does"
            ));
        }
        println!(
            "cargo::warning=NVRTC not found ({why}): kernels will be compiled at run time on the GPU machine; \
             run scripts/fetch-cuda.sh to compile them now"
        );
    }
    if let Err(why) = &emu {
        if require {
            fail(&format!(
                "PATCHBAY_REQUIRE_NVRTC=1 but the CUDA emulator cannot be built: {why}. Run scripts/fetch-cuda.sh"
            ));
        }
        if nvrtc.is_ok() {
            println!("cargo::warning=no CUDA emulator in this build: {why}");
        }
    }

    // The shared structs' layout checks: Rust asserts (included by the mirrors), C asserts
    // (compiled by the host compiler as an emulator unit).
    let layout_check = layout_files(&manifest, &out).unwrap_or_else(|e| fail(&e));

    // Every compilation, run in parallel.
    let deps = Deps {
        nvrtc: hash_inputs(&manifest, &headers, cuda.as_ref(), false),
        emu: hash_inputs(&manifest, &headers, cuda.as_ref(), true),
    };
    let mut tasks = Vec::new();
    if let (Ok(()), Some(c)) = (&nvrtc, &cuda) {
        for (i, _) in files.iter().enumerate() {
            for t in 0..NVRTC_TARGETS.len() {
                tasks.push(Task::Nvrtc { file: i, target: t, cuda: c });
            }
        }
    }
    let emu_units = match (&emu, &cuda) {
        (Ok(()), Some(_)) => emu_units(&manifest, &out, &files, &headers, &layout_check).unwrap_or_else(|e| fail(&e)),
        _ => Vec::new(),
    };
    if let Some(c) = &cuda {
        for u in &emu_units {
            tasks.push(Task::Emu(u, c));
        }
    }
    let results = run_parallel(tasks, jobs(), |t| t.run(&files, &manifest, &out, &deps));
    let mut nvrtc_logs: BTreeMap<(usize, usize), String> = BTreeMap::new();
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(Done::Nvrtc { file, target, log }) => {
                nvrtc_logs.insert((file, target), log);
            }
            Ok(Done::Emu(obj)) => objects.push(obj),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        fail(&errors.join("\n\n"));
    }

    // NVRTC outputs: warnings, resource table, kernels.rs.
    let have_nvrtc = nvrtc.is_ok();
    for ((file, target), log) in &nvrtc_logs {
        if *target == 0 {
            for line in log.lines().filter(|l| l.contains("warning")) {
                println!("cargo::warning={}: {}", files[*file].rel, line.trim());
            }
        }
    }
    let resources = resource_table(&files, &nvrtc_logs).unwrap_or_else(|e| fail(&e));
    write_if_changed(&out.join("kernel_resources.tsv"), &resources);
    let spilling: Vec<&str> = resources
        .lines()
        .skip(1)
        .filter(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            c.len() >= 5 && (c[3] != "0" || c[4] != "0")
        })
        .collect();
    if !spilling.is_empty() {
        println!(
            "cargo::warning=kernels spill registers (kernel, arch, registers, spill stores, spill loads, smem, cmem): {}",
            spilling.join(" | ")
        );
    }
    write_if_changed(&out.join("kernels.rs"), &kernels_rs(&files, &headers, &out, have_nvrtc));
    write_if_changed(&out.join("kernel_entries.rs"), &entries_rs(&files));
    if have_nvrtc {
        println!("cargo::rustc-cfg=patchbay_nvrtc");
    }

    // The emulator library.
    if emu.is_ok() {
        let mut b = cc::Build::new();
        b.cpp(true).cargo_warnings(false);
        for o in &objects {
            b.object(o);
        }
        b.compile("patchbay_emu");
        println!("cargo::rustc-cfg=patchbay_emu");
    }
}

/// Stops the build with `msg`.
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

fn host_is_x86_64_linux() -> bool {
    env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64") && env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux")
}

fn jobs() -> usize {
    env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(2).max(1)
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())))
}

fn rel(manifest: &Path, p: &Path) -> String {
    p.strip_prefix(manifest).unwrap_or(p).to_string_lossy().into_owned()
}
