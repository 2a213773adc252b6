#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (driver >= 525; the pinned NVRTC 12.9 emits PTX that CUDA 12.9+
# drivers accept): builds with every kernel compiled by NVRTC, runs the kernel tests and the whole
# device forward against Hugging Face goldens ON THE GPU (PATCHBAY_TEST_DEVICE), then the same
# capture through the CLI, resumed == naive patching on the GPU (tests/patch.rs), generation
# (tests/generate.rs: decoding in the paged KV pool, greedy tokens vs the CPU's), and the
# patching and generation benches.
#   scripts/gpu-check.sh            # cuda:0
#   scripts/gpu-check.sh cuda:1
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda:0}
scripts/fetch-cuda.sh
export PATCHBAY_CUDA_ROOT="$PWD/.cache/cuda" PATCHBAY_REQUIRE_NVRTC=1
export LD_LIBRARY_PATH="$PATCHBAY_CUDA_ROOT/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
tests=()
for f in tests/kernel_*.rs tests/device_forward.rs tests/patch.rs tests/generate.rs; do tests+=(--test "$(basename "$f" .rs)"); done
PATCHBAY_TEST_DEVICE="$DEVICE" cargo test --release --locked "${tests[@]}"
cargo build --release --locked
for fam in llama mistral qwen2 gemma2 phi3 olmo2; do
    ./target/release/patchbay capture --model "tests/fixtures/$fam" --device "$DEVICE" --text "I got the job I wanted" \
        --sites all --positions all --logits --quiet --out "/tmp/patchbay-gpu-$fam.safetensors"
done
./target/release/patchbay synth --like llama-3.2-1b --out /tmp/patchbay-l1b
./target/release/patchbay bench patch --model /tmp/patchbay-l1b --n-prompts 50 --prompt-len 48 --pairs 50 --naive-limit 20
./target/release/patchbay bench generate --model /tmp/patchbay-l1b --device "$DEVICE" --batch 16 --prompt-len 64 --new-tokens 32
echo "gpu-check: all passed on $DEVICE"
