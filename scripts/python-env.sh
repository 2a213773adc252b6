#!/usr/bin/env bash
# The Python package's test environment: a venv in .cache/venv with pinned numpy and pytest,
# and the extension (python/) built by cargo with the `test` profile in the root's target
# directory, so that it links the patchbay library `cargo test` built instead of compiling it
# again, then put beside python/patchbay/__init__.py (python/ is on the venv's path). Idempotent:
# the venv is made and filled once; the build is incremental.
# (Maturin is not needed here: it builds with `cargo rustc`, which under the test profile makes a
# test harness. Users install with `pip install ./python`, a release build: README "Python".)
set -euo pipefail
cd "$(dirname "$0")/.."

REQS=(numpy==2.4.6 pytest==9.2.0)
VENV=.cache/venv
STAMP="$VENV/.complete-$(printf '%s ' "${REQS[@]}" | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ]; then
    PY=$(command -v python3 || command -v python || true)
    if [ -z "$PY" ] || ! "$PY" -m venv --help >/dev/null 2>&1; then
        echo "python-env.sh: needs python3 with venv (and pip) for the Python package's tests" >&2
        exit 1
    fi
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    echo "python-env.sh: installing ${REQS[*]} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQS[@]}" >&2
    "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | {
        read -r site
        echo "$PWD/python" > "$site/patchbay-tests.pth"
    }
    touch "$STAMP"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
lib=$(PYO3_PYTHON="$PWD/$VENV/bin/python" cargo build --locked --quiet --profile test --manifest-path python/Cargo.toml --message-format=json |
    sed -n 's/.*"filenames":\["\([^"]*lib_patchbay\.so\)".*/\1/p' | tail -n1)
[ -f "$lib" ] || { echo "python-env.sh: the build did not report lib_patchbay.so" >&2; exit 1; }
cp "$lib" python/patchbay/_patchbay.abi3.so
