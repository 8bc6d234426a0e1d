#!/usr/bin/env bash
# Memory of infermesh-proxy, nginx and HAProxy holding N idle keep-alive
# client connections (default 1,000), each of which has carried one request:
# the `idle_conns` scenario of scripts/bench.sh on its own. Other knobs as for
# bench.sh (BENCH_REPS, BENCH_PEERS, ...).
set -euo pipefail
BENCH_SCENARIOS=idle_conns BENCH_IDLE_CONNS=${1:-${BENCH_IDLE_CONNS:-1000}} \
    exec "$(dirname "${BASH_SOURCE[0]}")/bench.sh"
