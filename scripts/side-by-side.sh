#!/usr/bin/env bash
# patchbay against Hugging Face PyTorch, side by side on this machine (scripts/side-by-side.py:
# prefill in float32 and bfloat16, Tak et al.'s patching method with HF hooks, patchbay bench).
# Makes a throwaway venv with the pinned torch and transformers (removed on exit), or uses
# PYTHON when given (a venv that already has them, e.g. the golden generators' /root/goldenv).
#   scripts/side-by-side.sh --quick
#   PYTHON=/root/goldenv/bin/python scripts/side-by-side.sh --model /tmp/l1b
# Not part of the test run.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --bin patchbay
if [[ -z "${PYTHON:-}" ]]; then
    venv=$(mktemp -d)
    trap 'rm -rf "$venv"' EXIT
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6
    PYTHON="$venv/bin/python"
fi
"$PYTHON" scripts/side-by-side.py --patchbay "$target/release/patchbay" "$@"
