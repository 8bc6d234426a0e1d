#!/usr/bin/env bash
# Balancing on a simulated vLLM fleet: 8 `infermesh-sim` servers, 2–4
# `infermesh-proxy` sidecars whose Backend lists all 8 with `balancer: B`,
# and `infermesh-sim-load` sending streaming chat completions through the
# sidecars (round robin over them) as a Poisson process, for each balancer
# × workload × load. Prints a markdown table (TTFT p50/p90, ITL p90, output
# tokens/s, the fleet's prefix-cache hit rate) and writes DIR/results.jsonl.
#
#   scripts/bench-balancing.sh [--out DIR] [--sidecars N] [--duration SIM-SECONDS]
#
# Environment (defaults in brackets):
#   BALANCERS  [round-robin least-request peak-ewma model-aware]; a balancer
#              the proxy refuses is skipped with its error
#   WORKLOADS  [shared-prefix no-shared-prefix]
#   LOADS      [0.5 0.8 0.95]: shares of the fleet's capacity (below)
#   SERVERS [8]  TIME_SCALE [10]  TENANTS [64]  SYSTEM_TOKENS [2000]
#   QUESTION_TOKENS [50]  OUTPUT_TOKENS [128]  KV_BLOCKS [2048]
#   STREAM_INTERVAL [8]  PROFILE [release]
#   BENCH_BACKEND_EXTRA  YAML appended to the Backend's spec (one field per
#              line, indented two spaces), e.g. settings of a balancer; without
#              it a model-aware Backend polls its servers' metrics every
#              1000/TIME_SCALE ms (1 s of model time, the default interval)
#   SIM_ARGS   more flags for every server (e.g. --load-report)
#
# The servers' profile is the simulator's default, an 8B model on one H100
# (docs/simulator.md): prefill 30 ms + 0.2 ms per uncached prompt token, one
# prefill at a time; 12 ms per output token alone, up to 2× with 256
# running; a KV cache cut down to KV_BLOCKS blocks of 16 tokens so that one
# server holds the system prompts of at most a quarter of the tenants.
#
# Capacity is computed from that profile, not measured: a prompt is
# SYSTEM_TOKENS + QUESTION_TOKENS + 15 tokens (the simulator's chat
# template adds 5 per message), its uncached prefill takes 30 ms + 0.2 ms ×
# that, and prefills run one at a time, so a server serves at most
# 1 / prefill requests/s of prompts it has not cached, and the fleet SERVERS
# times that. Every load is a share of this no-cache capacity, for both
# workloads: on the shared-prefix workload, a balancer that keeps a tenant
# on the servers holding its prefix is far below capacity, one that sprays
# tenants over the fleet is near it.
#
# Every figure is in simulated time (wall × TIME_SCALE). Each run starts a
# fresh fleet and fresh sidecars (so no run inherits a warm cache), sends
# --duration (60) simulated seconds of arrivals and waits for what is in
# flight: 6 s of wall time at scale 10, about 13 s a run with start-up, so
# the 24 runs of the defaults take about 5 minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/target/bench-balancing"
SIDECARS=2
DURATION=60
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --sidecars) SIDECARS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        *) echo "usage: $0 [--out DIR] [--sidecars N] [--duration SIM-SECONDS]" >&2; exit 2 ;;
    esac
done
BALANCERS=${BALANCERS:-round-robin least-request peak-ewma model-aware}
WORKLOADS=${WORKLOADS:-shared-prefix no-shared-prefix}
LOADS=${LOADS:-0.5 0.8 0.95}
SERVERS=${SERVERS:-8}
TIME_SCALE=${TIME_SCALE:-10}
TENANTS=${TENANTS:-64}
SYSTEM_TOKENS=${SYSTEM_TOKENS:-2000}
QUESTION_TOKENS=${QUESTION_TOKENS:-50}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}
KV_BLOCKS=${KV_BLOCKS:-2048}
STREAM_INTERVAL=${STREAM_INTERVAL:-8}
PROFILE=${PROFILE:-release}
EXTRA=${BENCH_BACKEND_EXTRA:-}
read -ra SIM_EXTRA <<<"${SIM_ARGS:-}"

# shellcheck disable=SC2034 # read by bench-lib.sh
BENCH_TAG=bench-balancing
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
need python3 python3

case $PROFILE in dev) PROFILE_DIR=debug ;; *) PROFILE_DIR=$PROFILE ;; esac
log "building $PROFILE binaries"
build_proxy_and "$PROFILE" infermesh-sim
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE_DIR
for b in infermesh-proxy infermesh-sim infermesh-sim-load; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b after the build"
done
rm -rf "$OUT"
mkdir -p "$OUT/raw"

PIDS=()
stop_all() {
    local p
    for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null || true; done
    for p in ${PIDS[@]+"${PIDS[@]}"}; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap stop_all EXIT

PROMPT=$((SYSTEM_TOKENS + QUESTION_TOKENS + 15))
CAPACITY=$(python3 -c "print(round($SERVERS / (0.030 + 0.0002 * $PROMPT), 3))")
log "fleet: $SERVERS servers, prompts of $PROMPT tokens, capacity $CAPACITY requests/s (simulated) without prefix hits"

# start_fleet RUN: SERVERS simulated servers; sets SIM_ADDRS.
start_fleet() {
    local run=$1 i line
    SIM_ADDRS=()
    for i in $(seq 1 "$SERVERS"); do
        "$BIN/infermesh-sim" --addr 127.0.0.1:0 --name "sim-$i" --time-scale "$TIME_SCALE" \
            --kv-blocks "$KV_BLOCKS" --stream-interval "$STREAM_INTERVAL" ${SIM_EXTRA[@]+"${SIM_EXTRA[@]}"} \
            >"$OUT/raw/sim.$run.$i.out" 2>"$OUT/raw/sim.$run.$i.out.err" &
        PIDS+=("$!")
        line=$(wait_line "$OUT/raw/sim.$run.$i.out" '^listening' "$!") || die "infermesh-sim did not start"
        SIM_ADDRS+=("$(echo "$line" | field addr)")
    done
}

# start_sidecars RUN BALANCER: sets SIDECAR_ADDRS; returns 3 when the proxy
# refuses the policy (the reason in REFUSAL).
start_sidecars() {
    local run=$1 balancer=$2 i line pid endpoints policy
    endpoints=$(printf '"%s", ' "${SIM_ADDRS[@]}")
    policy="$OUT/raw/policy.$run.yaml"
    {
        echo 'apiVersion: infermesh.io/v1alpha1'
        echo 'kind: Backend'
        echo 'metadata: {name: fleet}'
        echo 'spec:'
        echo "  endpoints: [${endpoints%, }]"
        echo "  balancer: $balancer"
        if [ -n "$EXTRA" ]; then
            echo "$EXTRA"
        elif [ "$balancer" = model-aware ]; then
            # The servers run TIME_SCALE times faster than real time, so the
            # metrics are polled that much more often: 1 s of model time,
            # the default interval, as every other duration is scaled.
            echo "  modelAware: {metrics: {interval: $((1000 / TIME_SCALE))ms}}"
        fi
        echo '---'
        echo 'apiVersion: infermesh.io/v1alpha1'
        echo 'kind: ModelRoute'
        echo 'metadata: {name: fleet}'
        echo 'spec: {backends: [{backend: fleet}]}'
    } >"$policy"
    SIDECAR_ADDRS=()
    for i in $(seq 1 "$SIDECARS"); do
        "$BIN/infermesh-proxy" --config "$policy" --threads 1 \
            --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
            >"$OUT/raw/proxy.$run.$i.out" 2>"$OUT/raw/proxy.$run.$i.out.err" &
        pid=$!
        PIDS+=("$pid")
        if ! line=$(wait_line "$OUT/raw/proxy.$run.$i.out" '^listening' "$pid" 2>/dev/null); then
            REFUSAL=$(grep -v '^\s*$' "$OUT/raw/proxy.$run.$i.out.err" | tail -n 3 | tr '\n' ' ')
            return 3
        fi
        SIDECAR_ADDRS+=("$(echo "$line" | field outbound)")
    done
}

declare -A REFUSED=()
run=0
for workload in $WORKLOADS; do
    for load in $LOADS; do
        for balancer in $BALANCERS; do
            if [ -n "${REFUSED[$balancer]:-}" ]; then continue; fi
            run=$((run + 1))
            start_fleet "$run"
            status=0
            start_sidecars "$run" "$balancer" || status=$?
            if [ "$status" -eq 3 ]; then
                log "skipping $balancer: the proxy refuses it: $REFUSAL"
                REFUSED[$balancer]=1
                stop_all
                continue
            fi
            [ "$status" -eq 0 ] || die "the sidecars did not start"
            args=()
            for a in "${SIDECAR_ADDRS[@]}"; do args+=(--target "http://$a"); done
            for a in "${SIM_ADDRS[@]}"; do args+=(--metrics "http://$a/metrics"); done
            log "run $run: $balancer, $workload, ${load} × $CAPACITY req/s for ${DURATION}s simulated (${TIME_SCALE}× faster)"
            "$BIN/infermesh-sim-load" "${args[@]}" --load "$load" --capacity "$CAPACITY" \
                --duration "$DURATION" --time-scale "$TIME_SCALE" --workload "$workload" \
                --tenants "$TENANTS" --system-tokens "$SYSTEM_TOKENS" \
                --question-tokens "$QUESTION_TOKENS" --output-tokens "$OUTPUT_TOKENS" \
                --label "$balancer $workload $load" \
                >"$OUT/raw/load.$run.json" 2>"$OUT/raw/load.$run.err" ||
                die "infermesh-sim-load failed: $(cat "$OUT/raw/load.$run.err")"
            python3 - "$OUT/raw/load.$run.json" "$balancer" "$workload" "$load" >>"$OUT/results.jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r.update(balancer=sys.argv[2], workload=sys.argv[3], load=float(sys.argv[4]))
print(json.dumps(r))
PY
            stop_all
        done
    done
done

python3 - "$OUT/results.jsonl" "$SERVERS" "$SIDECARS" "$TIME_SCALE" "$DURATION" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]} simulated servers, {sys.argv[3]} sidecars, time scale {sys.argv[4]}, "
      f"{sys.argv[5]} s of arrivals per run; times in simulated seconds\n")
print("| workload | load | balancer | req/s | TTFT p50 | TTFT p90 | ITL p90 | output tok/s | prefix-cache hits | ok / failed |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    hit = r.get("prefix_cache_hit_rate")
    print(f"| {r['workload']} | {r['load']:.0%} | {r['balancer']} | {r['rate_rps']:.1f} | "
          f"{r['ttft_s']['p50']:.3f} s | {r['ttft_s']['p90']:.3f} s | {r['itl_s']['p90'] * 1000:.1f} ms | "
          f"{r['output_tokens_per_s']:.0f} | {'-' if hit is None else f'{hit:.1%}'} | "
          f"{r['requests']['ok']} / {r['requests']['failed']} |")
PY
