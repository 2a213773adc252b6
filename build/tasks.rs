//! Tasks, caching and parallelism: every NVRTC and emulator compilation is one task.

use std::collections::VecDeque;
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::emu::{EmuUnit, emu_compile};
use crate::nvrtc::{Cuda, NVRTC_TARGETS, nvrtc_compile, nvrtc_options, nvrtc_version};
use crate::sources::KernelFile;

pub enum Task<'a> {
    Nvrtc { file: usize, target: usize, cuda: &'a Cuda },
    Emu(&'a EmuUnit, &'a Cuda),
}

pub enum Done {
    Nvrtc { file: usize, target: usize, log: String },
    Emu(PathBuf),
}

impl Task<'_> {
    pub fn run(&self, files: &[KernelFile], manifest: &Path, out: &Path, deps: &Deps) -> Result<Done, String> {
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
pub struct Deps {
    pub nvrtc: u64,
    pub emu: u64,
}

/// A hash of the inputs every compilation shares: headers under kernels/, the CUDA headers'
/// location and, for the emulator, everything in emu/.
pub fn hash_inputs(manifest: &Path, headers: &[(String, PathBuf)], cuda: Option<&Cuda>, with_emu: bool) -> u64 {
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
pub fn run_parallel<T: Sync, R: Send>(tasks: Vec<T>, jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
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
