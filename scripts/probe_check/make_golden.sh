#!/usr/bin/env bash
# Regenerates the scikit-learn goldens of tests/probe_pipeline.rs: runs `patchbay probe` on the
# committed test dataset and the llama fixture (the same arguments as the test's
# `pipeline_args`), then check_sklearn.py on the captured features and splits.
#   python3 -m venv /root/probe-venv && /root/probe-venv/bin/pip install -r scripts/probe_check/requirements.txt
#   PYTHON=/root/probe-venv/bin/python scripts/probe_check/make_golden.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
${SKIP_BUILD:+:} cargo build --release --bin patchbay
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--model tests/fixtures/llama --dataset tests/data/emotions.csv --text-col text --label-col emotion
        --rename no-emotion=neutral --numeric-cols pleasantness,self_responsblt,suddenness --template tak
        --sites attn_out,mlp_out,resid_post --positions=-1..-5 --seed 3 --quiet)
target/release/patchbay probe "${common[@]}" --folds 5 --out "$work/kfold"
target/release/patchbay probe "${common[@]}" --test-fraction 0.25 --out "$work/holdout"
target/release/patchbay probe "${common[@]}" --folds 5 --C 0.01,1,100 --alpha auto --inner-folds 3 --out "$work/auto"
"$PYTHON" scripts/probe_check/check_sklearn.py "$work/kfold" tests/data/sklearn_golden_kfold.json
"$PYTHON" scripts/probe_check/check_sklearn.py "$work/holdout" tests/data/sklearn_golden_holdout.json
"$PYTHON" scripts/probe_check/check_sklearn.py "$work/auto" tests/data/sklearn_golden_auto.json
