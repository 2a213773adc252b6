//! The kernel sources: `kernels/*.cu`, `kernels/selftest/*.cu` and the headers under kernels/.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::scan::{scan_entries, strip_comments};
use crate::{read, rel};

/// One kernel source file.
pub struct KernelFile {
    /// File stem, unique among product kernels ("rmsnorm"); "selftest/<stem>" for self-tests.
    pub id: String,
    pub path: PathBuf,
    /// Path relative to the crate root, as messages print it ("kernels/rmsnorm.cu").
    pub rel: String,
    pub source: String,
    pub entries: Vec<String>,
    pub selftest: bool,
}

impl KernelFile {
    /// `id` as a C++/file-name-safe identifier.
    pub fn ident(&self) -> String {
        self.id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
    }
}


/// `*.cu` files of `dir` (not subdirectories), sorted.
pub fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Headers under kernels/ (any depth): `(name relative to kernels/, path)`.
pub fn kernel_headers(manifest: &Path) -> Vec<(String, PathBuf)> {
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

pub fn scan_kernels(manifest: &Path) -> Result<Vec<KernelFile>, String> {
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

