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

log() { printf '[bench-mtls] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"
}
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
    UP_CPU= PROXY_CPU= LOAD_CPU=
fi
on() { local cpu=$1; shift; if [ -n "$cpu" ]; then taskset -c "$cpu" "$@"; else "$@"; fi; }
spawn() { local cpu=$1; shift; if [ -n "$cpu" ]; then exec taskset -c "$cpu" "$@"; else exec "$@"; fi; }

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
wait_line() { # wait_line FILE PATTERN PID
    local i
    for i in $(seq 1 400); do
        if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || { cat "$1" "$1.err" >&2 2>/dev/null; return 1; }
        sleep 0.05
    done
    return 1
}
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
wait_ready() { # wait_ready ADMIN
    local i
    for i in $(seq 1 400); do
        if curl -sf "http://$1/ready" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    curl -s "http://$1/ready" >&2 || true
    return 1
}

# --- upstream ----------------------------------------------------------------
spawn "$UP_CPU" "$BIN/infermesh-bench-upstream" --addr 127.0.0.1:0 --threads 1 \
    >"$OUT/upstream.out" 2>"$OUT/upstream.out.err" &
PIDS+=("$!")
UP=$(wait_line "$OUT/upstream.out" '^listening' "$!" | field addr) || die "the upstream did not start"
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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
printf 'models/server bench-token-models-server-0123\napps/client bench-token-apps-client-0123\n' >"$OUT/mesh/tokens"
echo bench-token-models-server-0123 >"$OUT/mesh/server.token"
echo bench-token-apps-client-0123 >"$OUT/mesh/client.token"
spawn "$UP_CPU" "$BIN/infermesh-control" serve --policies "$OUT/mesh/policies" \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 --ca-dir "$OUT/mesh/ca" \
    --bootstrap-tokens "$OUT/mesh/tokens" >"$OUT/control.out" 2>"$OUT/control.out.err" &
PIDS+=("$!")
CP=$(wait_line "$OUT/control.out" '^listening' "$!" | field grpc) || die "the control plane did not start"
mesh_args=(--control-plane "https://$CP" --trust-bundle "$OUT/mesh/ca/ca.crt")
proxy mtls_server "${mesh_args[@]}" --inbound "$MTLS_IN" --identity-token-file "$OUT/mesh/server.token" \
    --workload-namespace models --service-account server
proxy mtls_client "${mesh_args[@]}" --inbound 127.0.0.1:0 --identity-token-file "$OUT/mesh/client.token" \
    --workload-namespace apps --service-account client
wait_ready "$mtls_server_ADMIN" || die "the mTLS server proxy is not ready"
wait_ready "$mtls_client_ADMIN" || die "the mTLS client proxy is not ready"
log "mTLS pair: client $mtls_client_OUT -> server $MTLS_IN (control plane $CP)"

# A client certificate for the handshake figure, signed by the mesh CA.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /O=bench \
    -keyout "$OUT/mesh/probe.key" -out "$OUT/mesh/probe.csr" \
    -addext "subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/probe" 2>/dev/null
openssl x509 -req -in "$OUT/mesh/probe.csr" -CA "$OUT/mesh/ca/ca.crt" -CAkey "$OUT/mesh/ca/ca.key" \
    -CAcreateserial -days 1 -copy_extensions copyall -out "$OUT/mesh/probe.crt" 2>/dev/null

# --- load ----------------------------------------------------------------------
printf '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":false}' >"$OUT/body.json"
declare -A URL=([direct]="$UP" [plain]="$plain_client_OUT" [mtls]="$mtls_client_OUT")
for t in direct plain mtls; do
    curl -sf -o /dev/null -H 'content-type: application/json' --data @"$OUT/body.json" \
        "http://${URL[$t]}/v1/chat/completions" || die "$t does not answer"
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for r in $(seq 1 "$REPS"); do
    for t in direct plain mtls; do
        log "rep $r/$REPS: $t at 1,000 req/s for ${SECS}s"
        on "$LOAD_CPU" h2load --h1 -c 10 -m 1 --rps 100 -D "$SECS" --warm-up-time="$WARMUP" \
            -d "$OUT/body.json" -H 'content-type: application/json' \
            --log-file="$OUT/raw/lat.$t.$r.log" "http://${URL[$t]}/v1/chat/completions" \
            >"$OUT/raw/lat.$t.$r.out" 2>&1 || true
    done
    log "rep $r/$REPS: mTLS handshakes for ${SECS}s"
    before=$(cpu_ticks "$mtls_server_PID")
    on "$LOAD_CPU" openssl s_time -connect "$MTLS_IN" -new -time "$SECS" \
        -cert "$OUT/mesh/probe.crt" -key "$OUT/mesh/probe.key" \
        >"$OUT/raw/hs.$r.out" 2>&1 || true
    after=$(cpu_ticks "$mtls_server_PID")
    echo "server_cpu_ticks=$((after - before)) clk_tck=$(getconf CLK_TCK)" >>"$OUT/raw/hs.$r.out"
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
    m = re.search(r"(\d+) connections in ([\d.]+)s", text)
    c = re.search(r"server_cpu_ticks=(\d+) clk_tck=(\d+)", text)
    if m:
        conns, secs = int(m.group(1)), float(m.group(2))
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
