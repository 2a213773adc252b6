#!/usr/bin/env bash
# The test command of README.md: does its own set-up, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
