#!/usr/bin/env bash
# The test command of README.md: does its own set-up, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVRTC and the CUDA headers (pinned PyPI wheels): the build script (build/) compiles every kernel with them
# and builds the CPU emulator that runs the kernels in the tests.
scripts/fetch-cuda.sh
export PATCHBAY_CUDA_ROOT="$PWD/.cache/cuda"
export LD_LIBRARY_PATH="$PATCHBAY_CUDA_ROOT/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --locked "$@"
# With no arguments, also the criterion benches, each run once as a test (benches/engine.rs).
if [ $# -eq 0 ]; then cargo test --locked --bench engine; fi
