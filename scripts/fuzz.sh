#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20), one
# after the other, on the stable toolchain. A crash, panic, hang or broken
# invariant fails the run and leaves the input in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS]        (docs/fuzzing.md)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${1:-20}"
cargo_fuzz_version="0.13.1"

if [[ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz ${cargo_fuzz_version}" ]]; then
    echo "== cargo install cargo-fuzz ${cargo_fuzz_version}"
    cargo install cargo-fuzz --locked --version "${cargo_fuzz_version}"
fi

cd fuzz
# Without a sanitizer, cargo-fuzz needs no nightly compiler: the coverage
# instrumentation (sancov) and libFuzzer itself build on stable.
echo "== cargo fuzz build"
cargo fuzz build --sanitizer none

failed=()
for target in $(cargo fuzz list); do
    echo "== cargo fuzz run ${target} (${seconds} s)"
    # The committed seeds stay as they are: new inputs go to a scratch
    # corpus that libFuzzer reads the seeds into first.
    scratch="$(mktemp -d)"
    if ! cargo fuzz run --sanitizer none "${target}" "${scratch}" "corpus/${target}" -- \
        -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("${target}")
    fi
    rm -rf "${scratch}"
done

if ((${#failed[@]})); then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: every target ran ${seconds} s without a finding"
