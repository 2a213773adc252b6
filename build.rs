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

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::{env, fs};

/// NVRTC targets: (architecture option, output kind, file suffix).
const NVRTC_TARGETS: [(&str, Output, &str); 3] = [
    ("sm_80", Output::Cubin, "sm_80.cubin"),
    ("sm_90a", Output::Cubin, "sm_90a.cubin"),
    ("compute_80", Output::Ptx, "compute_80.ptx"),
];

#[derive(Clone, Copy, PartialEq)]
enum Output {
    Cubin,
    Ptx,
}

/// One kernel source file.
struct KernelFile {
    /// File stem, unique among product kernels ("rmsnorm"); "selftest/<stem>" for self-tests.
    id: String,
    path: PathBuf,
    /// Path relative to the crate root, as messages print it ("kernels/rmsnorm.cu").
    rel: String,
    source: String,
    entries: Vec<String>,
    selftest: bool,
}

impl KernelFile {
    /// `id` as a C++/file-name-safe identifier.
    fn ident(&self) -> String {
        self.id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
    }
}

/// The pinned NVRTC wheel and CUDA headers.
struct Cuda {
    nvrtc_lib: PathBuf,
    include: PathBuf,
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo::rustc-check-cfg=cfg(patchbay_nvrtc)");
    println!("cargo::rustc-check-cfg=cfg(patchbay_emu)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=emu");
    for var in ["PATCHBAY_CUDA_ROOT", "PATCHBAY_REQUIRE_NVRTC", "CXX", "CXXFLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let require = env::var("PATCHBAY_REQUIRE_NVRTC").is_ok_and(|v| v == "1");

    let files = scan_kernels(&manifest).unwrap_or_else(|e| fail(&e));
    let headers = kernel_headers(&manifest);
    let (cuda, missing) = locate_cuda(&manifest);

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
        (Ok(()), Some(_)) => emu_units(&manifest, &out, &files, &headers).unwrap_or_else(|e| fail(&e)),
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

// ---------------------------------------------------------------------------------------------
// 1. Kernel sources
// ---------------------------------------------------------------------------------------------

/// `*.cu` files of `dir` (not subdirectories), sorted.
fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Headers under kernels/ (any depth): `(name relative to kernels/, path)`.
fn kernel_headers(manifest: &Path) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, PathBuf)>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|x| x == "cuh" || x == "h") {
                out.push((p.strip_prefix(base).unwrap().to_string_lossy().into_owned(), p));
            }
        }
    }
    let base = manifest.join("kernels");
    let mut v = Vec::new();
    walk(&base, &base, &mut v);
    v.sort();
    v
}

fn scan_kernels(manifest: &Path) -> Result<Vec<KernelFile>, String> {
    let mut files = Vec::new();
    for (dir, selftest) in [(manifest.join("kernels"), false), (manifest.join("kernels/selftest"), true)] {
        for path in cu_files(&dir) {
            let source = read(&path);
            let rel = rel(manifest, &path);
            let code = strip_comments(&source);
            let entries = scan_entries(&code).map_err(|e| format!("{rel}: {e}"))?;
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let id = if selftest { format!("selftest/{stem}") } else { stem };
            files.push(KernelFile { id, path, rel, source, entries, selftest });
        }
    }
    // Entry points are looked up by name across all modules: names must be unique.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for f in &files {
        for e in &f.entries {
            if let Some(other) = seen.insert(e, &f.rel) {
                return Err(format!("entry point `{e}` is defined in both {other} and {}: entry point names must be unique", f.rel));
            }
        }
    }
    Ok(files)
}

/// The source with every byte of a comment replaced by a space (newlines kept): byte offsets
/// and line numbers stay those of the source.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out[i] = b' ';
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = src[i + 2..].find("*/").map(|k| i + 2 + k + 2).unwrap_or(b.len());
            for (k, o) in out.iter_mut().enumerate().take(end).skip(i) {
                if b[k] != b'\n' {
                    *o = b' ';
                }
            }
            i = end;
        } else if b[i] == b'"' || b[i] == b'\'' {
            // Skip a literal whole: a "//" inside it is no comment.
            let q = b[i];
            i += 1;
            while i < b.len() && b[i] != q && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only whole comments were blanked")
}

#[derive(Debug, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Str(&'a str),
    Punct(char),
}

/// A tiny C++ tokenizer: identifiers, string literals, single-character punctuation; each with
/// its line number (and byte offset: see `tokenize_at`).
fn tokenize(code: &str) -> Vec<(Tok<'_>, usize)> {
    tokenize_at(code).into_iter().map(|(t, line, _)| (t, line)).collect()
}

fn tokenize_at(code: &str) -> Vec<(Tok<'_>, usize, usize)> {
    let b = code.as_bytes();
    let mut v = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            v.push((Tok::Ident(&code[s..i]), line, s));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if c == b'"' || c == b'\'' {
            let s = i;
            i += 1;
            while i < b.len() && b[i] != c && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            v.push((Tok::Str(&code[s + 1..i.saturating_sub(1).max(s + 1)]), line, s));
        } else {
            let ch = code[i..].chars().next().unwrap();
            v.push((Tok::Punct(ch), line, i));
            i += ch.len_utf8();
        }
    }
    v
}

/// For the emulator: every `extern __shared__ [attributes] T name[];` of `src` becomes
/// `T* name = ::emu::dynamic_shared<T>(__func__);`, a pointer to the block's dynamic shared
/// memory, so that all such names alias the same bytes as on a GPU. Line numbers are kept; the
/// rewritten text starts with `#line 1 "<rel>"` so that __FILE__ and diagnostics name the
/// original file. (`__func__` makes a declaration outside a function a compile error: a
/// namespace-scope pointer could not follow the running block.)
fn rewrite_dynamic_shared(src: &str, rel: &str) -> Result<String, String> {
    let code = strip_comments(src);
    let t = tokenize_at(&code);
    let mut out = format!("#line 1 {rel:?}\n");
    let mut copied = 0;
    let mut i = 0;
    while i + 1 < t.len() {
        if !(t[i].0 == Tok::Ident("extern") && t[i + 1].0 == Tok::Ident("__shared__")) {
            i += 1;
            continue;
        }
        let (line, start) = (t[i].1, t[i].2);
        let bad = |what: &str| format!("{rel}:{line}: {what}: write `extern __shared__ T name[];`, one name per declaration");
        // Declaration tokens up to ';', without attribute groups.
        let mut j = i + 2;
        let mut decl: Vec<usize> = Vec::new();
        while j < t.len() && t[j].0 != Tok::Punct(';') {
            if matches!(t[j].0, Tok::Ident("__align__" | "alignas" | "__attribute__")) {
                j = skip_parens(&t, j + 1);
                continue;
            }
            decl.push(j);
            j += 1;
        }
        if j >= t.len() {
            return Err(bad("unterminated extern __shared__ declaration"));
        }
        // ... type name [ ]
        let n = decl.len();
        if n < 4 || t[decl[n - 2]].0 != Tok::Punct('[') || t[decl[n - 1]].0 != Tok::Punct(']') {
            return Err(bad("unexpected extern __shared__ declaration"));
        }
        let Tok::Ident(name) = t[decl[n - 3]].0 else { return Err(bad("no name in extern __shared__ declaration")) };
        if decl[..n - 3].iter().any(|&k| t[k].0 == Tok::Punct(',')) {
            return Err(bad("several names in one extern __shared__ declaration"));
        }
        let ty = code[t[decl[0]].2..t[decl[n - 3]].2].trim().to_string();
        let end = t[j].2 + 1;
        let newlines = code[start..end].matches('\n').count();
        out.push_str(&src[copied..start]);
        write!(out, "{ty}* {name} = ::emu::dynamic_shared<{ty}>(__func__);{}", "\n".repeat(newlines)).unwrap();
        copied = end;
        i = j + 1;
    }
    out.push_str(&src[copied..]);
    Ok(out)
}

/// A token list entry: the token plus whatever position data its scanner keeps.
trait TokAt<'a> {
    fn tok(&self) -> &Tok<'a>;
}
impl<'a> TokAt<'a> for (Tok<'a>, usize) {
    fn tok(&self) -> &Tok<'a> {
        &self.0
    }
}
impl<'a, T> TokAt<'a> for (Tok<'a>, usize, T) {
    fn tok(&self) -> &Tok<'a> {
        &self.0
    }
}

/// Index just past the balanced parenthesis group starting at `j` (or `j` if none starts there).
fn skip_parens<'a, E: TokAt<'a>>(t: &[E], mut j: usize) -> usize {
    if !t.get(j).is_some_and(|x| *x.tok() == Tok::Punct('(')) {
        return j;
    }
    let mut depth = 0;
    while j < t.len() {
        match t[j].tok() {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// Names of the `extern "C" __global__ void NAME(...)` entry points, in source order.
/// `__launch_bounds__(...)` may stand anywhere before the name.
fn scan_entries(code: &str) -> Result<Vec<String>, String> {
    let t = tokenize(code);
    let mut names = Vec::new();
    let mut i = 0;
    while i + 1 < t.len() {
        if !(t[i].0 == Tok::Ident("extern") && t[i + 1].0 == Tok::Str("C")) {
            i += 1;
            continue;
        }
        let line = t[i].1;
        let mut j = i + 2;
        if t.get(j).is_some_and(|x| x.0 == Tok::Punct('{')) {
            // extern "C" { ... }: only an error if it holds a kernel.
            let mut depth = 0;
            let mut k = j;
            while k < t.len() {
                match t[k].0 {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Ident("__global__") => {
                        return Err(format!(
                            "line {}: a kernel inside an `extern \"C\" {{ }}` block: write each entry point as \
                             `extern \"C\" __global__ void NAME(...)`",
                            t[k].1
                        ));
                    }
                    _ => {}
                }
                k += 1;
            }
            i = k;
            continue;
        }
        // Tokens up to the parameter list's '(' (skipping the parentheses of attributes).
        let mut is_global = false;
        let mut name = None;
        while j < t.len() {
            match &t[j].0 {
                Tok::Ident("__launch_bounds__" | "__maxnreg__" | "__align__" | "alignas" | "__attribute__" | "__cluster_dims__") => {
                    j = skip_parens(&t, j + 1);
                    continue;
                }
                Tok::Ident("__global__") => is_global = true,
                Tok::Ident(id) => name = Some(*id),
                Tok::Punct('(') => break,
                Tok::Punct(';') | Tok::Punct('{') | Tok::Punct('=') => {
                    name = None;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        if is_global {
            match name {
                Some(n) => names.push(n.to_string()),
                None => return Err(format!("line {line}: cannot read the name of this `extern \"C\" __global__` entry point")),
            }
        }
        i = j;
    }
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// 2. NVRTC
// ---------------------------------------------------------------------------------------------

/// Finds the wheel's NVRTC and headers; `(None, why)` when they are not there.
fn locate_cuda(manifest: &Path) -> (Option<Cuda>, String) {
    let root = env::var_os("PATCHBAY_CUDA_ROOT").map(PathBuf::from).unwrap_or_else(|| manifest.join(".cache/cuda"));
    let nvrtc_lib = root.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    let include = root.join("nvidia/cuda_runtime/include");
    if !include.join("cuda_bf16.h").is_file() {
        return (None, format!("no CUDA headers at {}", include.display()));
    }
    (Some(Cuda { nvrtc_lib, include }), String::new())
}

/// Loads libnvrtc by absolute path, so that cudarc's dlopen by soname finds it (environment
/// variables set here would not reach the dynamic loader).
fn load_nvrtc(cuda: &Cuda) -> Result<(), String> {
    if !cuda.nvrtc_lib.is_file() {
        return Err(format!("no {}", cuda.nvrtc_lib.display()));
    }
    // SAFETY: loading NVRTC runs its initialisers only; the library stays loaded for the
    // build script's life (forgotten below).
    let lib = unsafe { libloading::Library::new(&cuda.nvrtc_lib) }
        .map_err(|e| format!("cannot load {}: {e}", cuda.nvrtc_lib.display()))?;
    std::mem::forget(lib);
    // SAFETY: only probes for the library (cudarc would panic on first use if it were missing).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!("{} was loaded but cudarc cannot find it", cuda.nvrtc_lib.display()));
    }
    Ok(())
}

/// The NVRTC version, for cache keys.
fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: NVRTC is loaded (load_nvrtc) before any task runs.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

fn nvrtc_options(f: &KernelFile, manifest: &Path, cuda: &Cuda, arch: &str, kind: Output) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "-lineinfo".into(),
        format!("-I{}", cuda.include.display()),
        format!("-I{}", manifest.join("kernels").display()),
        format!("-I{}", f.path.parent().unwrap().display()),
    ];
    if kind == Output::Cubin {
        o.push("--ptxas-options=-v".into());
    }
    o
}

/// Compiles `src` with NVRTC: the CUBIN or PTX, and the log (ptxas -v lines, warnings).
fn nvrtc_compile(src: &str, name: &str, opts: &[String], kind: Output) -> Result<(Vec<u8>, String), String> {
    use cudarc::nvrtc::sys;
    let c_src = CString::new(src).map_err(|_| "source holds a NUL byte".to_string())?;
    let c_name = CString::new(name).unwrap();
    let c_opts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers are valid C strings that outlive the program; the program is
    // destroyed before returning.
    unsafe {
        let r = sys::nvrtcCreateProgram(&mut prog, c_src.as_ptr(), c_name.as_ptr(), 0, std::ptr::null(), std::ptr::null());
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcCreateProgram: {r:?}"));
        }
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_len = 0usize;
        sys::nvrtcGetProgramLogSize(prog, &mut log_len);
        let mut log = vec![0u8; log_len.max(1)];
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
        let log = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            Err(format!("{compiled:?}\n{log}"))
        } else {
            let mut n = 0usize;
            let mut bin;
            if kind == Output::Cubin {
                sys::nvrtcGetCUBINSize(prog, &mut n);
                bin = vec![0u8; n];
                sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _);
            } else {
                sys::nvrtcGetPTXSize(prog, &mut n);
                bin = vec![0u8; n];
                sys::nvrtcGetPTX(prog, bin.as_mut_ptr() as *mut _);
                while bin.last() == Some(&0) {
                    bin.pop();
                }
            }
            Ok((bin, log))
        };
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// Parses the ptxas -v lines of every CUBIN compilation into the resource table:
/// `kernel  arch  registers  spill_stores  spill_loads  smem  cmem` (bytes; cmem sums all banks).
fn resource_table(files: &[KernelFile], logs: &BTreeMap<(usize, usize), String>) -> Result<String, String> {
    let mut rows = Vec::new();
    for ((file, target), log) in logs {
        let (arch, kind, _) = NVRTC_TARGETS[*target];
        if kind != Output::Cubin {
            continue;
        }
        // Per entry: "Compiling entry function 'K' for 'sm_80'", "Function properties for K",
        // "N bytes stack frame, S bytes spill stores, L bytes spill loads", "Used R registers, ...".
        let mut cur: Option<String> = None;
        let mut props_of: Option<String> = None;
        let mut spills = (0u64, 0u64);
        for line in log.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
                cur = rest.split('\'').next().map(str::to_string);
                spills = (0, 0);
            } else if let Some(rest) = line.strip_prefix("ptxas info    : Function properties for ") {
                props_of = Some(rest.trim().to_string());
            } else if line.contains("bytes spill stores") {
                if cur.is_some() && props_of == cur {
                    spills = (number_before(line, "bytes spill stores"), number_before(line, "bytes spill loads"));
                }
            } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
                let Some(kernel) = cur.take() else { continue };
                let regs = number_before(rest, "registers");
                let smem = number_before(rest, "bytes smem");
                let cmem: u64 = rest
                    .split(',')
                    .filter(|p| p.contains("bytes cmem"))
                    .map(|p| number_before(p, "bytes cmem"))
                    .sum();
                rows.push(format!("{kernel}\t{arch}\t{regs}\t{}\t{}\t{smem}\t{cmem}", spills.0, spills.1));
            }
        }
        for e in &files[*file].entries {
            if !rows.iter().any(|l| l.starts_with(&format!("{e}\t{arch}\t"))) {
                return Err(format!(
                    "{}: no ptxas resource line for entry point `{e}` ({arch}); the NVRTC log was:\n{log}",
                    files[*file].rel
                ));
            }
        }
    }
    rows.sort();
    Ok(format!("kernel\tarch\tregisters\tspill_stores\tspill_loads\tsmem\tcmem\n{}", rows.iter().map(|r| format!("{r}\n")).collect::<String>()))
}

/// The number just before `marker` in `s` ("16 registers" -> 16), 0 if none.
fn number_before(s: &str, marker: &str) -> u64 {
    let Some(at) = s.find(marker) else { return 0 };
    s[..at].split(|c: char| !c.is_ascii_digit()).rfind(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}

/// OUT_DIR/kernels.rs: the kernel table of src/backend/kernels.rs.
fn kernels_rs(files: &[KernelFile], headers: &[(String, PathBuf)], out: &Path, nvrtc: bool) -> String {
    let mut s = String::from("// Generated by build.rs: the kernels of kernels/*.cu (see src/backend/kernels.rs).\n\n");
    for (table, selftest) in [("MODULES", false), ("SELFTEST_MODULES", true)] {
        writeln!(s, "pub static {table}: &[KernelModule] = &[").unwrap();
        for f in files.iter().filter(|f| f.selftest == selftest) {
            let bin = |suffix: &str, text: bool| {
                if !nvrtc {
                    return "None".to_string();
                }
                let p = out.join("nvrtc").join(format!("{}.{suffix}", f.ident()));
                if text { format!("Some(include_str!({:?}))", p.display().to_string()) } else { format!("Some(include_bytes!({:?}))", p.display().to_string()) }
            };
            writeln!(
                s,
                "    KernelModule {{\n        name: {:?},\n        path: {:?},\n        entries: &{:?},\n        source: include_str!({:?}),\n        sm_80: {},\n        sm_90a: {},\n        ptx: {},\n    }},",
                f.id,
                f.rel,
                f.entries,
                f.path.display().to_string(),
                bin("sm_80.cubin", false),
                bin("sm_90a.cubin", false),
                bin("compute_80.ptx", true),
            )
            .unwrap();
        }
        writeln!(s, "];\n").unwrap();
    }
    writeln!(s, "/// Headers under kernels/, by the name a kernel includes them with.").unwrap();
    writeln!(s, "pub static HEADERS: &[(&str, &str)] = &[").unwrap();
    for (name, p) in headers {
        writeln!(s, "    ({name:?}, include_str!({:?})),", p.display().to_string()).unwrap();
    }
    writeln!(s, "];").unwrap();
    s
}

// ---------------------------------------------------------------------------------------------
// 3. The emulator
// ---------------------------------------------------------------------------------------------

/// One host C++ translation unit of the emulator library.
struct EmuUnit {
    name: String,
    /// The file handed to the compiler (a generated wrapper, or a file of emu/).
    src: PathBuf,
    /// Text the object depends on beyond the shared inputs (the wrapper, the kernel source).
    key: String,
    /// Kernel units get cuda_emu.h force-included.
    kernel: bool,
}

/// Generates the emulator's sources: a copy of every kernel file and header with its
/// `extern __shared__` declarations rewritten (`rewrite_dynamic_shared`) under OUT_DIR/emu/src,
/// a wrapper per kernel file with its entry-point thunks, and the registry. Lists every unit.
fn emu_units(manifest: &Path, out: &Path, files: &[KernelFile], headers: &[(String, PathBuf)]) -> Result<Vec<EmuUnit>, String> {
    let dir = out.join("emu");
    let src_dir = dir.join("src");
    for (name, path) in headers {
        let text = rewrite_dynamic_shared(&read(path), &rel(manifest, path))?;
        let dst = src_dir.join("kernels").join(name);
        fs::create_dir_all(dst.parent().unwrap()).map_err(|e| e.to_string())?;
        write_if_changed(&dst, &text);
    }
    let mut units = Vec::new();
    let mut registry = String::from(
        "// Generated by build.rs: every kernel entry point of the emulator library.\n\
         struct patchbay_emu_entry { const char* name; void (*thunk)(void**); unsigned nparams; const char* file; };\n\
         typedef const patchbay_emu_entry* (*patchbay_emu_table)(unsigned*);\n",
    );
    let mut tables = Vec::new();
    for f in files {
        let ns = format!("patchbay_emu_k_{}", f.ident());
        let copy = src_dir.join(&f.rel);
        let text = rewrite_dynamic_shared(&f.source, &f.rel)?;
        fs::create_dir_all(copy.parent().unwrap()).map_err(|e| e.to_string())?;
        write_if_changed(&copy, &text);
        // The kernel file is included inside a namespace of its own, so that helper functions
        // and __shared__ variables of different files never clash at link time (on a GPU every
        // file is a separate module). Entry points keep their C names.
        let mut w = format!(
            "// Generated by build.rs from {rel}.\nnamespace {ns} {{\n#include {path:?}\n}}  // namespace {ns}\n\n\
             static const patchbay_emu_entry entries[] = {{\n",
            rel = f.rel,
            path = copy.display().to_string(),
        );
        for e in &f.entries {
            writeln!(w, "    {{{e:?}, &::emu::thunk<&{ns}::{e}>, ::emu::arity(&{ns}::{e}), {:?}}},", f.rel).unwrap();
        }
        if f.entries.is_empty() {
            writeln!(w, "    {{nullptr, nullptr, 0, nullptr}},").unwrap();
        }
        writeln!(
            w,
            "}};\n\nextern \"C\" const patchbay_emu_entry* {ns}_entries(unsigned* n) {{\n    *n = {};\n    return entries;\n}}",
            f.entries.len()
        )
        .unwrap();
        let src = dir.join(format!("{}.emu.cpp", f.ident()));
        write_if_changed(&src, &w);
        units.push(EmuUnit { name: f.ident(), src, key: format!("{w}\n{text}"), kernel: true });
        writeln!(registry, "extern \"C\" const patchbay_emu_entry* {ns}_entries(unsigned*);").unwrap();
        tables.push(format!("{ns}_entries"));
    }
    write!(
        registry,
        "\nstatic const patchbay_emu_table tables[] = {{{}}};\n\n\
         extern \"C\" unsigned patchbay_emu_module_count() {{ return {}; }}\n\
         extern \"C\" const patchbay_emu_entry* patchbay_emu_module_entries(unsigned i, unsigned* n) {{\n    \
         if (i >= {1}) {{ *n = 0; return nullptr; }}\n    return tables[i](n);\n}}\n",
        if tables.is_empty() { "nullptr".to_string() } else { tables.join(", ") },
        tables.len(),
    )
    .unwrap();
    let reg = dir.join("registry.cpp");
    write_if_changed(&reg, &registry);
    units.push(EmuUnit { name: "registry".into(), src: reg, key: registry, kernel: false });
    for (name, file) in [("runtime", "emu/runtime.cpp"), ("switch", "emu/switch_x86_64.S")] {
        units.push(EmuUnit { name: name.into(), src: manifest.join(file), key: String::new(), kernel: false });
    }
    Ok(units)
}

/// Compiles one emulator unit with the host C++ compiler; returns the object (cached).
fn emu_compile(u: &EmuUnit, manifest: &Path, out: &Path, cuda_include: &Path, deps_hash: u64) -> Result<PathBuf, String> {
    let flags: Vec<String> = vec![
        "-std=c++17".into(),
        "-O2".into(),
        "-fno-strict-aliasing".into(), // kernels pun types through pointers, as CUDA code does
        "-fwrapv".into(),              // signed overflow wraps, as on a GPU
        "-fno-math-errno".into(),
    ];
    let dir = out.join("emu");
    let obj = dir.join(format!("{}.o", u.name));
    let stamp = dir.join(format!("{}.key", u.name));
    let mut h = DefaultHasher::new();
    (deps_hash, &u.key, &flags, u.kernel, &u.src).hash(&mut h);
    let key = format!("{:016x}", h.finish());
    if obj.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return Ok(obj);
    }
    let work = dir.join(format!("work-{}", u.name));
    let mut b = cc::Build::new();
    b.cpp(true).out_dir(&work).warnings(false).debug(false).opt_level(2).cargo_metadata(false).file(&u.src);
    let is_asm = u.src.extension().is_some_and(|e| e == "S");
    if !is_asm {
        for f in &flags {
            b.flag(f);
        }
        b.flag("-isystem").flag(manifest.join("emu/stub").to_str().unwrap());
        b.flag("-isystem").flag(cuda_include.to_str().unwrap());
        b.include(manifest.join("emu"));
        b.include(out.join("emu/src/kernels")); // the rewritten headers first
        b.include(manifest.join("kernels"));
        if u.kernel {
            b.flag("-include").flag(manifest.join("emu/cuda_emu.h").to_str().unwrap());
        }
    }
    let objs = b.try_compile_intermediates().map_err(|e| format!("emulator: compiling {}: {e}", rel(manifest, &u.src)))?;
    let [made] = objs.as_slice() else { return Err(format!("emulator: {} gave {} objects", u.name, objs.len())) };
    fs::copy(made, &obj).map_err(|e| format!("{}: {e}", obj.display()))?;
    fs::write(&stamp, key).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(obj)
}

// ---------------------------------------------------------------------------------------------
// Tasks, caching and parallelism
// ---------------------------------------------------------------------------------------------

enum Task<'a> {
    Nvrtc { file: usize, target: usize, cuda: &'a Cuda },
    Emu(&'a EmuUnit, &'a Cuda),
}

enum Done {
    Nvrtc { file: usize, target: usize, log: String },
    Emu(PathBuf),
}

impl Task<'_> {
    fn run(&self, files: &[KernelFile], manifest: &Path, out: &Path, deps: &Deps) -> Result<Done, String> {
        match *self {
            Task::Nvrtc { file, target, cuda } => {
                let f = &files[file];
                let (arch, kind, suffix) = NVRTC_TARGETS[target];
                let opts = nvrtc_options(f, manifest, cuda, arch, kind);
                let dir = out.join("nvrtc");
                fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let bin = dir.join(format!("{}.{suffix}", f.ident()));
                let log_path = dir.join(format!("{}.{suffix}.log", f.ident()));
                let stamp = dir.join(format!("{}.{suffix}.key", f.ident()));
                let mut h = DefaultHasher::new();
                (deps.nvrtc, &f.source, &opts, nvrtc_version()).hash(&mut h);
                let key = format!("{:016x}", h.finish());
                if bin.is_file()
                    && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str())
                    && let Ok(log) = fs::read_to_string(&log_path)
                {
                    return Ok(Done::Nvrtc { file, target, log });
                }
                let (code, log) = nvrtc_compile(&f.source, &f.rel, &opts, kind)
                    .map_err(|e| format!("NVRTC ({arch}) failed on {}:\n{e}", f.rel))?;
                fs::write(&bin, code).map_err(|e| e.to_string())?;
                fs::write(&log_path, &log).map_err(|e| e.to_string())?;
                fs::write(&stamp, key).map_err(|e| e.to_string())?;
                Ok(Done::Nvrtc { file, target, log })
            }
            Task::Emu(u, cuda) => emu_compile(u, manifest, out, &cuda.include, deps.emu).map(Done::Emu),
        }
    }
}

/// Hashes of the inputs shared by all NVRTC / all emulator compilations.
struct Deps {
    nvrtc: u64,
    emu: u64,
}

/// A hash of the inputs every compilation shares: headers under kernels/, the CUDA headers'
/// location and, for the emulator, everything in emu/.
fn hash_inputs(manifest: &Path, headers: &[(String, PathBuf)], cuda: Option<&Cuda>, with_emu: bool) -> u64 {
    let mut h = DefaultHasher::new();
    for (name, p) in headers {
        (name, fs::read(p).unwrap_or_default()).hash(&mut h);
    }
    fn walk(dir: &Path, h: &mut DefaultHasher) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        v.sort();
        for p in v {
            if p.is_dir() {
                walk(&p, h);
            } else {
                (p.to_string_lossy().into_owned(), fs::read(&p).unwrap_or_default()).hash(h);
            }
        }
    }
    if with_emu {
        walk(&manifest.join("emu"), &mut h);
    }
    if let Some(c) = cuda {
        c.include.hash(&mut h);
    }
    h.finish()
}

/// Runs `f` on every task with `jobs` threads; results in task order.
fn run_parallel<T: Sync, R: Send>(tasks: Vec<T>, jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let queue = Mutex::new((0..tasks.len()).collect::<VecDeque<usize>>());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..tasks.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(tasks.len()) {
            s.spawn(|| {
                loop {
                    let Some(i) = queue.lock().unwrap().pop_front() else { break };
                    let r = f(&tasks[i]);
                    results.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap().into_iter().map(|r| r.unwrap()).collect()
}
