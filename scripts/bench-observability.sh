#!/usr/bin/env bash
# What observability costs the proxy: CPU per request at saturation for the
# same route with tracing off, tracing at 1% and at 100% sampling (spans
# exported over OTLP/gRPC), and JSON access logs on (every request a line,
# written to a file). GenAI metrics are always on: the requests are OpenAI
# chat completions, so every variant records them.
#
#   scripts/bench-observability.sh [--requests 50000] [--reps 5] [--out DIR]
#
# Installs h2load (nghttp2-client) when missing, builds the binaries
# (PROFILE, default release), and starts one upstream (CPU 0) that is also
# the span sink (an OTLP/gRPC export gets a fixed gRPC answer, so the proxy
# does all of an export's work), and one proxy per variant (CPU 1, one
# worker thread, all started at once and idle when not measured). Each
# repetition runs every variant in turn (interleaved): h2load sends
# --requests requests over 8 HTTP/1.1 connections; the proxy's user +
# system CPU time from /proc over the requests it served gives
# microseconds per request. Writes DIR/results.txt and a table on stdout
# (median and min-max over the repetitions, and the ratio to tracing off
# within each repetition: its median and range).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUESTS=50000
REPS=5
OUT="$ROOT/target/bench-observability"
while [ $# -gt 0 ]; do
    case $1 in
        --requests) REQUESTS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--requests N] [--reps N] [--out DIR]" >&2; exit 2 ;;
    esac
done
BENCH_TAG=bench-observability
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
need h2load nghttp2-client
need python3 python3
need curl curl
need taskset util-linux

PROFILE=${PROFILE:-release}
case $PROFILE in dev) PROFILE_DIR=debug ;; *) PROFILE_DIR=$PROFILE ;; esac
log "building $PROFILE binaries"
build_proxy_and "$PROFILE" infermesh-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE_DIR
rm -rf "$OUT"
mkdir -p "$OUT"
if [ "$(nproc)" -ge 2 ]; then UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0; else UP_CPU='' PROXY_CPU='' LOAD_CPU=''; fi
trap stop_pids EXIT

start_upstream UPSTREAM "$UP_CPU" "$OUT/upstream.out" 127.0.0.1:0 || die "the upstream did not start"
bench_body "$OUT/body.json"

VARIANTS=(off traced-1pct traced-100pct access-log)
declare -A PROXY PROXY_PID
for variant in "${VARIANTS[@]}"; do
    mesh=
    case $variant in
        traced-1pct) mesh="tracing: {endpoint: \"http://$UPSTREAM\", sampling: 0.01}" ;;
        traced-100pct) mesh="tracing: {endpoint: \"http://$UPSTREAM\", sampling: 1.0}" ;;
        access-log) mesh="accessLog: {requests: true}" ;;
    esac
    {
        printf '%s\n' 'apiVersion: infermesh.io/v1alpha1' 'kind: Backend' 'metadata: {name: bench}' \
            "spec: {endpoints: [\"$UPSTREAM\"]}" '---' \
            'apiVersion: infermesh.io/v1alpha1' 'kind: ModelRoute' 'metadata: {name: bench}' \
            'spec: {match: [{model: {exact: bench}}], backends: [{backend: bench}]}'
        if [ -n "$mesh" ]; then
            printf '%s\n' '---' 'apiVersion: infermesh.io/v1alpha1' 'kind: MeshConfig' \
                'metadata: {name: mesh}' 'spec:' "  $mesh"
        fi
    } >"$OUT/policy.$variant.yaml"
    spawn "$PROXY_CPU" "$BIN/infermesh-proxy" --config "$OUT/policy.$variant.yaml" --threads 1 \
        --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
        >"$OUT/proxy.$variant.out" 2>"$OUT/proxy.$variant.out.err" &
    PROXY_PID[$variant]=$!
    PIDS+=("$!")
    line=$(wait_line "$OUT/proxy.$variant.out" '^listening' "$!") || die "the $variant proxy did not start"
    PROXY[$variant]=$(echo "$line" | field outbound)
    wait_ready "$(echo "$line" | field admin)" || die "the $variant proxy is not ready"
done

TICK=$(getconf CLK_TCK)
echo "variant rep requests cpu_us_per_request" >"$OUT/results.txt"
for r in $(seq 1 "$REPS"); do
    for variant in "${VARIANTS[@]}"; do
        pid=${PROXY_PID[$variant]}
        before=$(cpu_ticks "$pid")
        h1_load "$LOAD_CPU" "$OUT/body.json" "$OUT/h2load.$variant.$r.log" \
            "http://${PROXY[$variant]}$BENCH_PATH" -n "$REQUESTS" -c 8 >"$OUT/h2load.$variant.$r.txt"
        after=$(cpu_ticks "$pid")
        done_ok=$(sed -n 's/.*requests: .* \([0-9]*\) succeeded.*/\1/p' "$OUT/h2load.$variant.$r.txt")
        [ "${done_ok:-0}" -gt 0 ] || die "$variant: no request succeeded (see $OUT/h2load.$variant.$r.txt)"
        us=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$done_ok" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}')
        log "rep $r/$REPS $variant: $done_ok requests, $us us CPU per request"
        echo "$variant $r $done_ok $us" >>"$OUT/results.txt"
    done
done

python3 - "$OUT/results.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
by, reps = {}, {}
for variant, rep, _, us in rows:
    by.setdefault(variant, []).append(float(us))
    reps.setdefault(rep, {})[variant] = float(us)
# The ratio to tracing off within each repetition (they ran back to back),
# then its median: steadier than a ratio of medians on a shared machine.
print(f"{'variant':<16} {'CPU us/request (median)':>24} {'min-max':>14}   ratio to off per rep: median (min-max)")
for variant, values in by.items():
    ratios = [r[variant] / r["off"] for r in reps.values()]
    m = statistics.median(values)
    print(f"{variant:<16} {m:>24.2f} {min(values):>6.2f}-{max(values):<7.2f}   "
          f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
EOF
