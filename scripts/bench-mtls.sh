#!/usr/bin/env bash
# Mutual TLS between sidecars: added latency of an outbound -> inbound proxy
# pair with mTLS vs the same pair in plaintext vs direct, at 1,000 requests/s
# (p50, p99, p99.9 over every request), and how many mTLS handshakes one
# proxy accepts per second (with the proxy's CPU time per handshake).
#
#   scripts/bench-mtls.sh [--secs 10] [--reps 5] [--out DIR]
#
# Installs h2load (nghttp2-client) and openssl when missing, builds the
# release binaries, and writes DIR/results.json and a table on stdout.
# Targets run interleaved (direct, plain, mtls, direct, …); figures are
# medians over the repetitions with min–max. The pair's two proxies share
# CPU 1 (one worker thread each); the upstream and the load generator share
# CPU 0. Numbers come from a 2-core machine shared with other work: compare
# the ratios within one run.
# The NAME_OUT, NAME_ADMIN and NAME_PID variables are set through printf -v.
# shellcheck disable=SC2154
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
REPS=5
OUT="$ROOT/target/bench-mtls"
while [ $# -gt 0 ]; do
    case $1 in
        --secs) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--secs N] [--reps N] [--out DIR]" >&2; exit 2 ;;
    esac
done
WARMUP=2

BENCH_TAG=bench-mtls
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
need h2load nghttp2-client
need openssl openssl
need python3 python3

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p infermesh-proxy -p infermesh-control -p infermesh-bench)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
rm -rf "$OUT"
mkdir -p "$OUT/raw" "$OUT/mesh/policies" "$OUT/plain"

if [ "$(nproc)" -ge 2 ]; then
    UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0
else
    UP_CPU='' PROXY_CPU='' LOAD_CPU=''
fi
trap stop_pids EXIT

# --- upstream ----------------------------------------------------------------
start_upstream UP "$UP_CPU" "$OUT/upstream.out" 127.0.0.1:0 || die "the upstream did not start"
log "upstream on $UP"

# proxy NAME ARGS...: starts a proxy pinned to the proxy CPU with one worker;
# sets ${NAME}_OUT, ${NAME}_IN, ${NAME}_ADMIN, ${NAME}_PID.
proxy() {
    local name=$1
    shift
    spawn "$PROXY_CPU" "$BIN/infermesh-proxy" --threads 1 --outbound 127.0.0.1:0 \
        --admin 127.0.0.1:0 "$@" >"$OUT/$name.out" 2>"$OUT/$name.out.err" &
    local pid=$!
    PIDS+=("$pid")
    local line
    line=$(wait_line "$OUT/$name.out" '^listening' "$pid") || die "proxy $name did not start"
    printf -v "${name}_OUT" '%s' "$(echo "$line" | field outbound)"
    printf -v "${name}_IN" '%s' "$(echo "$line" | field inbound)"
    printf -v "${name}_ADMIN" '%s' "$(echo "$line" | field admin)"
    printf -v "${name}_PID" '%s' "$pid"
}

# --- the plaintext pair --------------------------------------------------------
PLAIN_IN=127.0.0.1:$(free_port)
cat >"$OUT/plain/server.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: upstream}
spec: {endpoints: ["$UP"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: inbound}
spec: {listener: inbound, backends: [{backend: upstream}]}
EOF
cat >"$OUT/plain/client.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: server}
spec: {endpoints: ["$PLAIN_IN"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: outbound}
spec: {backends: [{backend: server}]}
EOF
proxy plain_server --config "$OUT/plain/server.yaml" --inbound "$PLAIN_IN"
proxy plain_client --config "$OUT/plain/client.yaml" --inbound 127.0.0.1:0
log "plaintext pair: client $plain_client_OUT -> server $PLAIN_IN"

# --- the mTLS pair ---------------------------------------------------------------
MTLS_IN=127.0.0.1:$(free_port)
SERVER_ID=spiffe://cluster.local/ns/models/sa/server
cat >"$OUT/mesh/policies/policy.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: upstream}
spec: {endpoints: ["$UP"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: inbound, namespace: models}
spec: {listener: inbound, backends: [{backend: upstream}]}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: server}
spec:
  endpoints: ["$MTLS_IN"]
  mtls: {identity: "$SERVER_ID"}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: outbound, namespace: apps}
spec: {backends: [{backend: server}]}
EOF
mesh_tokens "$OUT/mesh" models/server apps/client
start_control CP "$UP_CPU" "$OUT/control.out" "$OUT/mesh/policies" "$OUT/mesh/ca" "$OUT/mesh/tokens" 127.0.0.1:0 ||
    die "the control plane did not start"
mesh_args=(--control-plane "https://$CP" --trust-bundle "$OUT/mesh/ca/ca.crt")
proxy mtls_server "${mesh_args[@]}" --inbound "$MTLS_IN" --identity-token-file "$OUT/mesh/models-server.token" \
    --workload-namespace models --service-account server
proxy mtls_client "${mesh_args[@]}" --inbound 127.0.0.1:0 --identity-token-file "$OUT/mesh/apps-client.token" \
    --workload-namespace apps --service-account client
wait_ready "$mtls_server_ADMIN" || die "the mTLS server proxy is not ready"
wait_ready "$mtls_client_ADMIN" || die "the mTLS client proxy is not ready"
log "mTLS pair: client $mtls_client_OUT -> server $MTLS_IN (control plane $CP)"

# A client certificate for the handshake figure, signed by the mesh CA.
make_cert "$OUT/mesh/ca/ca.crt" "$OUT/mesh/ca/ca.key" "$OUT/mesh/probe" URI:spiffe://cluster.local/ns/bench/sa/probe

# --- load ----------------------------------------------------------------------
bench_body "$OUT/body.json"
declare -A URL=([direct]="$UP" [plain]="$plain_client_OUT" [mtls]="$mtls_client_OUT")
for t in direct plain mtls; do
    curl -sf -o /dev/null -H 'content-type: application/json' --data @"$OUT/body.json" \
        "http://${URL[$t]}/v1/chat/completions" || die "$t does not answer"
done
for r in $(seq 1 "$REPS"); do
    for t in direct plain mtls; do
        log "rep $r/$REPS: $t at 1,000 req/s for ${SECS}s"
        h1_load "$LOAD_CPU" "$OUT/body.json" "$OUT/raw/lat.$t.$r.log" "http://${URL[$t]}$BENCH_PATH" \
            -c 10 --rps 100 -D "$SECS" --warm-up-time="$WARMUP" \
            >"$OUT/raw/lat.$t.$r.out" 2>&1 || true
    done
    log "rep $r/$REPS: mTLS handshakes for ${SECS}s"
    before=$(cpu_ticks "$mtls_server_PID")
    # s_time's "N connections in X.XXs" line divides by the client's own
    # CPU time, not the elapsed time: the rate is taken over the wall clock
    # measured here instead.
    started=$(date +%s.%N)
    on "$LOAD_CPU" openssl s_time -connect "$MTLS_IN" -new -time "$SECS" \
        -cert "$OUT/mesh/probe.crt" -key "$OUT/mesh/probe.key" \
        >"$OUT/raw/hs.$r.out" 2>&1 || true
    ended=$(date +%s.%N)
    after=$(cpu_ticks "$mtls_server_PID")
    echo "server_cpu_ticks=$((after - before)) clk_tck=$(getconf CLK_TCK)" >>"$OUT/raw/hs.$r.out"
    echo "wall_seconds=$(python3 -c "print($ended - $started)")" >>"$OUT/raw/hs.$r.out"
done

# --- report ------------------------------------------------------------------------
python3 - "$OUT" "$REPS" <<'PY'
import json, re, statistics, sys, os
out, reps = sys.argv[1], int(sys.argv[2])

def lat(t, r):
    path = f"{out}/raw/lat.{t}.{r}.log"
    if not os.path.exists(path):
        return None
    us = [int(l.split()[2]) for l in open(path) if l.strip() and l.split()[1] == "200"]
    if not us:
        return None
    us.sort()
    q = lambda p: us[min(len(us) - 1, int(p * len(us)))] / 1000.0
    return {"n": len(us), "p50": q(0.50), "p99": q(0.99), "p999": q(0.999)}

res = {"latency_ms": {}, "handshakes": []}
for t in ("direct", "plain", "mtls"):
    res["latency_ms"][t] = [lat(t, r) for r in range(1, reps + 1)]
for r in range(1, reps + 1):
    text = open(f"{out}/raw/hs.{r}.out").read()
    # The count from s_time; the time from the wall clock (s_time's own
    # "in X.XXs" is its CPU time).
    m = re.search(r"(\d+) connections in [\d.]+s", text)
    w = re.search(r"wall_seconds=([\d.]+)", text)
    c = re.search(r"server_cpu_ticks=(\d+) clk_tck=(\d+)", text)
    if m and w:
        conns, secs = int(m.group(1)), float(w.group(1))
        cpu = int(c.group(1)) / int(c.group(2)) if c else 0.0
        res["handshakes"].append({"connections": conns, "seconds": secs,
                                  "per_second": conns / secs,
                                  "server_cpu_us_per_handshake": cpu * 1e6 / conns if conns else None})
json.dump(res, open(f"{out}/results.json", "w"), indent=2)

def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else (float("nan"),) * 3

print(f"\nLatency at 1,000 req/s (HTTP/1.1 JSON POST, 10 connections), ms; median of {reps} (min-max)")
print(f"{'target':<8} {'p50':>22} {'p99':>22} {'p99.9':>22}")
base = {}
for t in ("direct", "plain", "mtls"):
    row = []
    for k in ("p50", "p99", "p999"):
        m, lo, hi = med([x[k] if x else None for x in res["latency_ms"][t]])
        base.setdefault(k, {})[t] = m
        row.append(f"{m:7.3f} ({lo:.3f}-{hi:.3f})")
    print(f"{t:<8} " + " ".join(f"{c:>22}" for c in row))
print("\nAdded by the pair over direct, ms (medians):")
for t in ("plain", "mtls"):
    print(f"  {t:<6} p50 +{base['p50'][t] - base['p50']['direct']:.3f}  p99 +{base['p99'][t] - base['p99']['direct']:.3f}  p99.9 +{base['p999'][t] - base['p999']['direct']:.3f}")
print(f"  mTLS over plaintext: p50 +{base['p50']['mtls'] - base['p50']['plain']:.3f}  p99 +{base['p99']['mtls'] - base['p99']['plain']:.3f}")
hs = res["handshakes"]
if hs:
    m, lo, hi = med([h["per_second"] for h in hs])
    c, clo, chi = med([h["server_cpu_us_per_handshake"] for h in hs])
    print(f"\nmTLS handshakes accepted by one proxy (openssl s_time -new, one client): {m:.0f}/s ({lo:.0f}-{hi:.0f}); proxy CPU {c:.0f} us per handshake ({clo:.0f}-{chi:.0f})")
PY
