#!/usr/bin/env bash
# Runs every check CI runs: installs what is missing (scripts/setup.sh), then
# formatting, lints, the binaries the end-to-end tests start, and every test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The binaries the end-to-end tests start are built together with the tests:
# one build resolves dependency features once (dev-dependencies included), so
# `cargo test` below reuses every artifact instead of building the dependency
# tree a second time with other features.
echo "== cargo build --workspace --bins --tests"
cargo build --workspace --bins --tests

echo "== cargo test --workspace"
cargo test --workspace

# CI (.ci/run) frees the test build's disk before the fuzz build, which
# builds apart (fuzz/target): the run then needs the larger of the two
# (about 3 GB), not their sum.
if [ "${INFERMESH_CLEAN_BEFORE_FUZZ:-0}" = 1 ]; then
    echo "== cargo clean (INFERMESH_CLEAN_BEFORE_FUZZ=1)"
    cargo clean
fi

bash scripts/fuzz.sh 20
