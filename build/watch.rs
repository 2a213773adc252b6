//! What the build script watches for the CUDA root (NVRTC and the CUDA headers), so that a build
//! made before `scripts/fetch-cuda.sh` reruns once they appear (and when they change), without
//! touching build/: the root itself when it exists, else its nearest existing ancestor inside the
//! package (`.cache`, committed with a README so a fresh clone has it), whose contents change when
//! the root is made. Nothing is watched for a missing root outside the package (cargo would rerun
//! the script on every build for a missing path); `PATCHBAY_CUDA_ROOT` itself is watched as a variable.

use std::path::{Path, PathBuf};

pub fn cuda_watch_path(root: &Path, manifest: &Path) -> Option<PathBuf> {
    if root.exists() {
        return Some(root.to_path_buf());
    }
    root.ancestors().skip(1).take_while(|a| a.starts_with(manifest) && *a != manifest).find(|a| a.exists()).map(Path::to_path_buf)
}
