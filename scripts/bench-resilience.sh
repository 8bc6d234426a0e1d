#!/usr/bin/env bash
# Resilience filters: the latency a route with retries, rate limits (a
# request limit per route, and a request + model-token limit per tenant
# header) and circuit breaking adds over a plain route at 1,000 requests/s (p50, p99, p99.9 over
# every request), and retry amplification during an outage: an upstream that
# answers 503 to everything, a route allowing 5 attempts with the default
# retry budget (ratio 0.2, 10 retries/s), and the attempts the upstream saw
# per request sent.
#
#   scripts/bench-resilience.sh [--secs 10] [--reps 5] [--out DIR]
#
# Installs h2load (nghttp2-client) when missing, builds the release binaries,
# and writes DIR/results.json and a table on stdout. Targets run interleaved
# (direct, plain, guarded, direct, ...); figures are medians over the
# repetitions with min-max. The proxy has CPU 1 and one worker thread; the
# upstreams and the load generator share CPU 0. Rate limits are set high
# enough that nothing is refused: the figure is the cost of the filters.
# The guarded route's backend has outlier detection and in-flight/pending
# limits too. BENCH_GUARDED_EXTRA (YAML, one field per line) is appended to
# the guarded route's spec, to measure other settings.
#
#   scripts/bench-resilience.sh --killed-replica [--outage 5] [--reps 3] [--out DIR]
#
# measures something else, alone: two upstream replicas behind the proxy
# under 100 requests/s (h2load, 10 connections at 10/s each), one of them
# killed (SIGKILL, so connections are refused) for --outage seconds after
# 3 s and then started again on its port, the load going on 5 s more; for
# each balancer (round-robin, least-request, peak-ewma), with no retries
# and no outlier detection, a fresh proxy per run. It reports the requests
# that failed per second of outage and as a share of the outage's requests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
REPS=5
OUT="$ROOT/target/bench-resilience"
MODE=filters
OUTAGE=5
REPS_SET=
while [ $# -gt 0 ]; do
    case $1 in
        --secs) SECS=$2; shift 2 ;;
        --reps) REPS=$2; REPS_SET=1; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --killed-replica) MODE=killed-replica; shift ;;
        --outage) OUTAGE=$2; shift 2 ;;
        *) echo "usage: $0 [--secs N] [--reps N] [--out DIR] | --killed-replica [--outage N] [--reps N] [--out DIR]" >&2; exit 2 ;;
    esac
done
if [ "$MODE" = killed-replica ] && [ -z "$REPS_SET" ]; then REPS=3; fi
WARMUP=2
EXTRA=${BENCH_GUARDED_EXTRA:-}

log() { printf '[bench-resilience] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"
}
need h2load nghttp2-client
need python3 python3
need curl curl
need taskset util-linux

# The killed-replica figure is a count of failed requests at a rate any
# build sustains, so it uses the quick dev build.
if [ "$MODE" = killed-replica ]; then PROFILE=dev PROFILE_DIR=debug; else PROFILE=release PROFILE_DIR=release; fi
log "building $PROFILE binaries"
build_proxy_and "$PROFILE" infermesh-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE_DIR
for b in infermesh-proxy infermesh-bench-upstream; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b after the build"
done
rm -rf "$OUT"
mkdir -p "$OUT/raw"

if [ "$(nproc)" -ge 2 ]; then
    UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0
else
    UP_CPU='' PROXY_CPU='' LOAD_CPU=''
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
    local _
    for _ in $(seq 1 400); do
        if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || { cat "$1" "$1.err" >&2 2>/dev/null; return 1; }
        sleep 0.05
    done
    return 1
}
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }

# --- a killed replica, per balancer ----------------------------------------------
if [ "$MODE" = killed-replica ]; then
    WARM=3 AFTER=5
    LENGTH=$((WARM + OUTAGE + AFTER))
    replica() { # replica ADDR NAME: starts an upstream; sets REPLICA_PID and REPLICA
        spawn "$UP_CPU" "$BIN/infermesh-bench-upstream" --addr "$1" --threads 1 \
            >"$OUT/$2.out" 2>"$OUT/$2.out.err" &
        REPLICA_PID=$!
        PIDS+=("$REPLICA_PID")
        REPLICA=$(wait_line "$OUT/$2.out" '^listening' "$REPLICA_PID" | field addr)
        [ -n "$REPLICA" ]
    }
    printf '{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":false}' >"$OUT/body.json"
    echo "balancer rep requests failed outage_s" >"$OUT/killed-replica.txt"
    for r in $(seq 1 "$REPS"); do
        for balancer in round-robin least-request peak-ewma; do
            run="$balancer.$r"
            replica 127.0.0.1:0 "steady.$run" || die "an upstream did not start"
            STEADY=$REPLICA STEADY_PID=$REPLICA_PID
            replica 127.0.0.1:0 "doomed.$run" || die "an upstream did not start"
            DOOMED=$REPLICA DOOMED_PID=$REPLICA_PID
            printf '%s\n' \
                'apiVersion: infermesh.io/v1alpha1' 'kind: Backend' 'metadata: {name: pool}' \
                "spec: {endpoints: [\"$STEADY\", \"$DOOMED\"], balancer: $balancer}" '---' \
                'apiVersion: infermesh.io/v1alpha1' 'kind: ModelRoute' 'metadata: {name: pool}' \
                'spec: {backends: [{backend: pool}]}' >"$OUT/policy.$run.yaml"
            spawn "$PROXY_CPU" "$BIN/infermesh-proxy" --config "$OUT/policy.$run.yaml" --threads 1 \
                --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
                >"$OUT/proxy.$run.out" 2>"$OUT/proxy.$run.out.err" &
            PROXY_PID=$!
            PIDS+=("$PROXY_PID")
            line=$(wait_line "$OUT/proxy.$run.out" '^listening' "$PROXY_PID") || die "the proxy did not start"
            PROXY=$(echo "$line" | field outbound)
            log "rep $r/$REPS: $balancer at 100 req/s for ${LENGTH}s, one replica killed for ${OUTAGE}s after ${WARM}s"
            on "$LOAD_CPU" h2load --h1 -c 10 -m 1 --rps 10 -D "$LENGTH" \
                -d "$OUT/body.json" -H 'content-type: application/json' \
                "http://$PROXY/v1/chat/completions" >"$OUT/raw/killed.$run.out" 2>&1 &
            LOAD_PID=$!
            sleep "$WARM"
            kill -9 "$DOOMED_PID"
            wait "$DOOMED_PID" 2>/dev/null || true
            sleep "$OUTAGE"
            replica "$DOOMED" "revived.$run" || die "the killed replica did not start again on $DOOMED"
            REVIVED_PID=$REPLICA_PID
            wait "$LOAD_PID" || true
            summary="$OUT/raw/killed.$run.out"
            requests=$(sed -n 's/^requests: \([0-9]*\) total.*/\1/p' "$summary")
            ok=$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' "$summary")
            [ -n "$requests" ] && [ -n "$ok" ] || die "no h2load summary in $summary"
            echo "$balancer $r $requests $((requests - ok)) $OUTAGE" >>"$OUT/killed-replica.txt"
            kill "$PROXY_PID" "$STEADY_PID" "$REVIVED_PID" 2>/dev/null || true
            wait "$PROXY_PID" "$STEADY_PID" "$REVIVED_PID" 2>/dev/null || true
        done
    done
    python3 - "$OUT/killed-replica.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
print("\nOne of two replicas killed (SIGKILL) under 100 req/s, no retries, no outlier detection:")
print("failed requests per second of outage, median over the runs (min-max), and as a share of the outage's requests")
for b in ("round-robin", "least-request", "peak-ewma"):
    runs = [(int(req), int(fail), int(secs)) for bal, _, req, fail, secs in rows if bal == b]
    per_s = sorted(f / s for _, f, s in runs)
    share = statistics.median(f / (100 * s) for _, f, s in runs)
    print(f"{b:<14} {statistics.median(per_s):6.1f}/s ({per_s[0]:.1f}-{per_s[-1]:.1f})  {100 * share:5.1f}%  "
          f"failed per run: {[f for _, f, _ in runs]} of {[r for r, _, _ in runs]} requests")
PY
    exit 0
fi

# --- upstreams -----------------------------------------------------------------
spawn "$UP_CPU" "$BIN/infermesh-bench-upstream" --addr 127.0.0.1:0 --threads 1 \
    >"$OUT/upstream.out" 2>"$OUT/upstream.out.err" &
PIDS+=("$!")
UP=$(wait_line "$OUT/upstream.out" '^listening' "$!" | field addr) || die "the upstream did not start"
log "upstream on $UP"

# The outage: every request gets 503 at once (HTTP/1.1 keep-alive), and
# `GET /attempts` (answered 200) says how many requests it has seen.
cat >"$OUT/outage.py" <<'PY'
import asyncio, sys

seen = 0

async def serve(reader, writer):
    global seen
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            if head.startswith(b"GET /attempts "):
                body = str(seen).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            else:
                seen += 1
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening addr={host}:{port}", flush=True)
    await server.serve_forever()

asyncio.run(main())
PY
spawn "$UP_CPU" python3 "$OUT/outage.py" >"$OUT/outage.out" 2>"$OUT/outage.out.err" &
PIDS+=("$!")
DOWN=$(wait_line "$OUT/outage.out" '^listening' "$!" | field addr) || die "the outage upstream did not start"
log "outage upstream (503 to everything) on $DOWN"
attempts() { curl -sf "http://$DOWN/attempts"; }

# --- the proxy -------------------------------------------------------------------
{
    cat <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: up}
spec: {endpoints: ["$UP"]}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: up-guarded}
spec:
  endpoints: ["$UP"]
  # Circuit breaking, set so that a healthy upstream never trips it: the
  # figure is the cost of the bookkeeping on every attempt.
  outlierDetection: {consecutiveFailures: 5, failureRate: {threshold: 0.5, minRequests: 20}}
  limits: {maxInFlight: 10000, maxPending: 10000}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: down}
spec: {endpoints: ["$DOWN"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: plain}
spec:
  match: [{headers: [{name: x-bench, value: plain}]}]
  backends: [{backend: up}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: guarded}
spec:
  match: [{headers: [{name: x-bench, value: guarded}]}]
  backends: [{backend: up-guarded}]
  retries: {maxAttempts: 3, on: {statuses: [429, 503]}}
  rateLimits:
    - {key: route, requestsPerSecond: 100000}
    - {key: {header: x-tenant}, requestsPerSecond: 100000, tokensPerMinute: 1000000000}
EOF
    while IFS= read -r line; do
        [ -n "$line" ] && printf '  %s\n' "$line"
    done <<<"$EXTRA"
    cat <<EOF
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: outage}
spec:
  match: [{headers: [{name: x-bench, value: outage}]}]
  backends: [{backend: down}]
  retries: {maxAttempts: 5, backoffBase: 5ms, on: {statuses: [503]}, budget: {ratio: 0.2, minPerSecond: 10}}
EOF
} >"$OUT/policy.yaml"

spawn "$PROXY_CPU" "$BIN/infermesh-proxy" --config "$OUT/policy.yaml" --threads 1 \
    --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
    >"$OUT/proxy.out" 2>"$OUT/proxy.out.err" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
line=$(wait_line "$OUT/proxy.out" '^listening' "$PROXY_PID") || die "the proxy did not start (see $OUT/proxy.out.err)"
PROXY=$(echo "$line" | field outbound)
ADMIN=$(echo "$line" | field admin)
log "proxy on $PROXY (admin $ADMIN)"

# --- load ------------------------------------------------------------------------
printf '{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":false}' >"$OUT/body.json"
declare -A URL=([direct]="$UP" [plain]="$PROXY" [guarded]="$PROXY")
for t in direct plain guarded; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -H "x-bench: $t" -H 'x-tenant: bench' --data @"$OUT/body.json" \
        "http://${URL[$t]}/v1/chat/completions") || true
    [ "$code" = 200 ] || die "$t answers $code"
done
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -H 'x-bench: outage' --data @"$OUT/body.json" "http://$PROXY/v1/chat/completions") || true
[ "$code" = 503 ] || die "the outage route answers $code, not 503"

for r in $(seq 1 "$REPS"); do
    for t in direct plain guarded; do
        log "rep $r/$REPS: $t at 1,000 req/s for ${SECS}s"
        on "$LOAD_CPU" h2load --h1 -c 10 -m 1 --rps 100 -D "$SECS" --warm-up-time="$WARMUP" \
            -d "$OUT/body.json" -H 'content-type: application/json' \
            -H "x-bench: $t" -H 'x-tenant: bench' \
            --log-file="$OUT/raw/lat.$t.$r.log" "http://${URL[$t]}/v1/chat/completions" \
            >"$OUT/raw/lat.$t.$r.out" 2>&1 || true
    done
    log "rep $r/$REPS: outage at 1,000 req/s for ${SECS}s"
    before=$(attempts) || die "the outage upstream does not answer"
    on "$LOAD_CPU" h2load --h1 -c 10 -m 1 --rps 100 -D "$SECS" \
        -d "$OUT/body.json" -H 'content-type: application/json' -H 'x-bench: outage' \
        "http://$PROXY/v1/chat/completions" >"$OUT/raw/outage.$r.out" 2>&1 || true
    sleep 1 # retries still in back-off reach the upstream
    after=$(attempts) || die "the outage upstream does not answer"
    echo "attempts=$((after - before))" >>"$OUT/raw/outage.$r.out"
done
curl -sf "http://$ADMIN/metrics" >"$OUT/raw/proxy-metrics.txt" || true

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
    text = open(f"{out}/raw/lat.{t}.{r}.out").read()
    bad = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    return {"n": len(us), "p50": q(0.50), "p99": q(0.99), "p999": q(0.999),
            "non_2xx": sum(map(int, bad.groups())) if bad else None}

def outage(r):
    text = open(f"{out}/raw/outage.{r}.out").read()
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", text)
    seen = re.search(r"attempts=(\d+)", text)
    if not done or not seen or not int(done.group(1)):
        return None
    requests, attempts = int(done.group(1)), int(seen.group(1))
    return {"requests": requests, "attempts": attempts, "ratio": attempts / requests}

res = {"latency_ms": {t: [lat(t, r) for r in range(1, reps + 1)] for t in ("direct", "plain", "guarded")},
       "outage": [outage(r) for r in range(1, reps + 1)]}
json.dump(res, open(f"{out}/results.json", "w"), indent=2)

def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else (float("nan"),) * 3

print(f"\nLatency at 1,000 req/s (HTTP/1.1 JSON POST, 10 connections), ms; median of {reps} (min-max)")
print(f"{'target':<8} {'p50':>22} {'p99':>22} {'p99.9':>22}")
base = {}
for t in ("direct", "plain", "guarded"):
    row = []
    for k in ("p50", "p99", "p999"):
        m, lo, hi = med([x[k] if x else None for x in res["latency_ms"][t]])
        base.setdefault(k, {})[t] = m
        row.append(f"{m:7.3f} ({lo:.3f}-{hi:.3f})")
    print(f"{t:<8} " + " ".join(f"{c:>22}" for c in row))
refused = [x["non_2xx"] for t in ("plain", "guarded") for x in res["latency_ms"][t] if x and x["non_2xx"]]
if refused:
    print(f"  warning: {sum(refused)} non-2xx answers on proxied runs")
print("\nAdded by the filters (guarded over plain), ms (medians):")
print(f"  p50 +{base['p50']['guarded'] - base['p50']['plain']:.3f}  p99 +{base['p99']['guarded'] - base['p99']['plain']:.3f}  p99.9 +{base['p999']['guarded'] - base['p999']['plain']:.3f}")
o = [x for x in res["outage"] if x]
if o:
    m, lo, hi = med([x["ratio"] for x in o])
    print(f"\nOutage (503 to everything, maxAttempts 5, budget ratio 0.2 + 10/s): "
          f"{m:.3f} attempts per request ({lo:.3f}-{hi:.3f}); without the budget it would be 5")
PY
