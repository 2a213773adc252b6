#!/usr/bin/env bash
# Fetches the pinned NVRTC (libnvrtc.so.12) and the CUDA headers (cuda_bf16.h, cuda_fp16.h...)
# from their PyPI wheels into .cache/cuda/, for the build script in build/ (DESIGN.md section 6).
# Idempotent: prints nothing when everything is already there.
#
# Pinned on purpose: an NVRTC newer than the GPU machine's driver emits PTX the driver
# refuses (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). 12.9 is accepted by driver 580 (CUDA 13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79)
WHEEL_DIR=.cache/cuda-wheels
ROOT=.cache/cuda
STAMP="$ROOT/.complete-$(printf '%s ' "${WHEELS[@]}" | sha256sum | cut -c1-16)"

[ -f "$STAMP" ] && exit 0

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "fetch-cuda.sh: the pinned wheels are for Linux x86-64 only; this is $(uname -s)-$(uname -m)" >&2
    exit 1
fi
PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "fetch-cuda.sh: needs python3 with pip (to download ${WHEELS[*]})" >&2
    exit 1
fi

wheel_of() { # the downloaded wheel file of "name==version", or nothing
    local name=${1%%==*} version=${1##*==}
    ls "$WHEEL_DIR"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1
}

mkdir -p "$WHEEL_DIR"
for spec in "${WHEELS[@]}"; do
    [ -n "$(wheel_of "$spec")" ] && continue
    echo "fetch-cuda.sh: downloading $spec into $WHEEL_DIR" >&2
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3 --implementation py --abi none \
        -d "$WHEEL_DIR" "$spec" >&2
done

# Unpack into a scratch folder, then move it into place, so that an interrupted run leaves
# no half-unpacked tree behind.
TMP=$(mktemp -d .cache/cuda.tmp.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
for spec in "${WHEELS[@]}"; do
    whl=$(wheel_of "$spec")
    if [ -z "$whl" ]; then
        echo "fetch-cuda.sh: $spec was not downloaded" >&2
        exit 1
    fi
    "$PY" -m zipfile -e "$whl" "$TMP"
done
for f in nvidia/cuda_nvrtc/lib/libnvrtc.so.12 nvidia/cuda_runtime/include/cuda_bf16.h; do
    [ -f "$TMP/$f" ] || { echo "fetch-cuda.sh: $f missing from the wheels" >&2; exit 1; }
done
rm -rf "$ROOT"
mv "$TMP" "$ROOT"
touch "$STAMP"
echo "fetch-cuda.sh: NVRTC and CUDA headers are in $ROOT" >&2
