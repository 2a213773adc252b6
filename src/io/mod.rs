//! Result files. Every file is written to `NAME.partial` and renamed when complete, so a killed
//! run never leaves a truncated file under the final name.

pub mod plot;
pub mod tensorfile;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use self::tensorfile::TensorData;
use crate::{Error, Result};

/// The lock file of an output directory: `pid host` of the process that holds it.
pub const LOCK_FILE: &str = ".patchbay.lock";

/// An output directory owned by this process while the value lives (an advisory lock file,
/// [`LOCK_FILE`], created exclusively and removed on drop, with the directory itself when the
/// lock created it and the run wrote nothing). Every command that writes into an `--out`
/// directory holds one, so two runs never write into one directory at once.
pub struct OutLock {
    path: PathBuf,
    /// The directory, when this lock created it.
    created: Option<PathBuf>,
}

impl OutLock {
    /// Creates `dir` (and its parents) and takes its lock. Another live process's lock is an
    /// error naming it; the lock of a process that no longer runs on this host (a killed run)
    /// is taken over, with a note on stderr.
    pub fn acquire(dir: &Path) -> Result<OutLock> {
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let host = host_name();
        let me = format!("{} {host}\n", std::process::id());
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(me.as_bytes()).map_err(|e| Error::io(&path, e))?;
                    return Ok(OutLock { path, created });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut it = text.split_whitespace();
                    let (pid, holder) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next().unwrap_or(""));
                    match pid {
                        Some(pid) if holder == host && !process_alive(pid) => {
                            eprintln!("note: {} was locked by process {pid}, which no longer runs; taking it over", dir.display());
                            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                        }
                        _ => {
                            let who = pid.map_or("another process".to_string(), |p| format!("process {p} on {}", if holder.is_empty() { "an unknown host" } else { holder }));
                            return Err(Error::input(format!(
                                "{} is in use by {who} (lock file {}): wait for that run, or choose another --out (delete the lock file only if that run is gone)",
                                dir.display(),
                                path.display()
                            )));
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::input(format!("{}: the lock was taken by another run while this one took over a stale lock", path.display())))
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        // Only our own lock (a lock taken over by another run after ours was removed stays).
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t.split_whitespace().next() == Some(&std::process::id().to_string())) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(dir) = &self.created {
                // Only an empty directory is removed (a failed run that wrote nothing).
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// This machine's name (Linux: /proc/sys/kernel/hostname), or `unknown`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| std::fs::read_to_string("/etc/hostname")).map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "unknown".into())
}

/// Whether process `pid` runs on this machine (Linux: /proc/PID exists; elsewhere assumed).
fn process_alive(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid.to_string()).exists()
}

/// The checksum of one line of an appended results file (hex of the first 8 bytes of its
/// sha256), kept one per line in `FILE.sha256` so that `--resume` can verify kept lines.
pub fn line_sum(line: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(line.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the line checksums of `path` are kept.
pub fn sums_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Checks the complete lines of an appended results file against their checksums (see
/// [`line_sum`]): a changed line, or fewer lines than checksums, is an error naming the line;
/// lines after the last checksum (a run killed between the two writes) are cut off the file,
/// to be computed again.
pub fn verify_lines(path: &Path) -> Result<()> {
    let text = String::from_utf8_lossy(&crate::error::read_file(path)?).into_owned();
    let sums_file = sums_path(path);
    let sums_text = if sums_file.exists() { String::from_utf8_lossy(&crate::error::read_file(&sums_file)?).into_owned() } else { String::new() };
    let sums: Vec<&str> = sums_text.lines().collect();
    let lines: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| &l[..l.len() - 1]).collect();
    if let Some(i) = lines.iter().zip(&sums).position(|(l, s)| line_sum(l) != *s) {
        return Err(Error::file(path, format!("line {} is not the line written (its checksum in {} differs): the file was changed; cannot resume it", i + 1, sums_file.display())));
    }
    if lines.len() < sums.len() {
        return Err(Error::file(path, format!("{} lines but {} checksums in {}: lines were removed; cannot resume it", lines.len(), sums.len(), sums_file.display())));
    }
    if lines.len() > sums.len() {
        let keep: usize = lines[..sums.len()].iter().map(|l| l.len() + 1).sum();
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(keep as u64).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// serde `deserialize_with` helpers reading `null` (what JSON writes for NaN and +-Inf, kept
/// by --allow-nonfinite) back as NaN, so a results file with non-finite values can be read again.
pub mod null_as_nan {
    use serde::{Deserialize, Deserializer};

    pub fn f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<Option<f32>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
    }
}

/// A JSONL results file appended as work completes: created on its first line (so a run that
/// fails before any result writes nothing), flushed after every write.
pub struct JsonlFile {
    path: PathBuf,
    /// Append to an existing file (a resumed run) instead of replacing it.
    append: bool,
    w: Option<std::io::BufWriter<std::fs::File>>,
}

impl JsonlFile {
    pub fn new(path: PathBuf) -> JsonlFile {
        JsonlFile { path, append: false, w: None }
    }

    /// A file appended to (created if missing) on its first line.
    pub fn append(path: PathBuf) -> JsonlFile {
        JsonlFile { path, append: true, w: None }
    }

    /// Appends `lines`, one JSON object per line, and flushes.
    pub fn write(&mut self, lines: &[serde_json::Value]) -> Result<()> {
        if self.w.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let file = if self.append { std::fs::OpenOptions::new().create(true).append(true).open(&self.path) } else { std::fs::File::create(&self.path) };
            self.w = Some(std::io::BufWriter::new(file.map_err(|e| Error::io(&self.path, e))?));
        }
        let w = self.w.as_mut().expect("opened above");
        for l in lines {
            writeln!(w, "{l}").map_err(|e| Error::io(&self.path, e))?;
        }
        w.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// The complete lines of a results file appended line by line (None when it does not exist): a
/// torn last line (a killed write) is an error, or with `cut_torn` cut off the file.
pub fn complete_lines(path: &Path, cut_torn: bool) -> Result<Option<Vec<u8>>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut bytes = crate::error::read_file(path)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        if !cut_torn {
            return Err(Error::file(path, "the last line is cut short (a killed run)"));
        }
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(complete as u64).map_err(|e| Error::io(path, e))?;
        bytes.truncate(complete);
    }
    Ok(Some(bytes))
}

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    F32,
    Bf16,
}

/// A tensor to write: f32 values stored as f32 or bf16, or i64 values.
pub enum OutTensor {
    Float { shape: Vec<usize>, data: Vec<f32>, dtype: OutDtype },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

/// Writes `tensors` (name, tensor) with string `metadata` to `path` atomically, through the one
/// safetensors writer (`tensorfile::write`: sorted header, so the same inputs give the same bytes).
pub fn write_safetensors(path: &Path, tensors: &[(String, OutTensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let data: Vec<(String, Vec<usize>, TensorData)> = tensors
        .iter()
        .map(|(name, t)| match t {
            OutTensor::Float { shape, data, dtype } => (name.clone(), shape.clone(), TensorData::F32(data, *dtype)),
            OutTensor::I64 { shape, data } => (name.clone(), shape.clone(), TensorData::I64(data)),
        })
        .collect();
    tensorfile::write(path, &data, metadata)
}

/// Writes `bytes` to `path` through `path.partial` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
