#!/usr/bin/env bash
# How much of infermesh-proxy's HTTP/1.1 cost is hyper's: the same JSON
# POSTs at saturation through infermesh-proxy, through
# infermesh-bench-floor (hyper's HTTP/1.1 server and client connections
# and tokio, nothing else: bench/src/bin/floor.rs) and through nginx (and
# HAProxy when installed), each with one worker pinned to CPU 1, the
# upstream and wrk on CPU 0, the targets taken in turn in every round.
# Prints each round's req/s and the target's user and system CPU µs per
# request, then the medians.
#
#   scripts/bench-floor.sh [--rounds N] [--seconds S] [--conns C]
set -euo pipefail
BENCH_TAG=bench-floor
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

ROUNDS=5 SECS=3 CONNS=16
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
    esac
done
need wrk wrk
need nginx nginx-light
need taskset util-linux
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (the load on one, the proxy on the other)"

ROOT="$(cd "$BENCH_LIB_DIR/.." && pwd)"
BIN="$ROOT/target/release"
log "building release binaries"
build_proxy_and release infermesh-bench
OUT=$(mktemp -d /tmp/infermesh-bench-floor.XXXXXX)
trap 'stop_pids; [ -f "$OUT/nginx/nginx.pid" ] && kill "$(cat "$OUT/nginx/nginx.pid")" 2>/dev/null; true' EXIT

start_upstream UP 0 "$OUT/upstream.out" 127.0.0.1:0
cat >"$OUT/policy.yaml" <<YAML
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: bench-http1}
spec:
  endpoints: ["$UP"]
  protocol: http1
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: bench-rest}
spec:
  backends: [{backend: bench-http1}]
YAML
P_OUT=$(free_port) P_IN=$(free_port) P_ADMIN=$(free_port)
spawn 1 "$BIN/infermesh-proxy" --config "$OUT/policy.yaml" --threads 1 \
    --outbound "127.0.0.1:$P_OUT" --inbound "127.0.0.1:$P_IN" --admin "127.0.0.1:$P_ADMIN" \
    >"$OUT/proxy.out" 2>&1 &
PIDS+=("$!")
PROXY_PID=$!
wait_ready "127.0.0.1:$P_ADMIN" || die "the proxy did not start"
spawn 1 "$BIN/infermesh-bench-floor" --addr 127.0.0.1:0 --upstream "$UP" >"$OUT/floor.out" 2>&1 &
PIDS+=("$!")
FLOOR_PID=$!
FLOOR=$(wait_line "$OUT/floor.out" '^listening' "$FLOOR_PID" | field addr)
mkdir -p "$OUT/nginx/logs"
P_NGINX=$(free_port)
cat >"$OUT/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx/body;
    proxy_temp_path $OUT/nginx/proxy;
    keepalive_requests 1000000;
    upstream bench_h1 { server $UP; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://bench_h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
spawn 1 nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" >"$OUT/nginx.out" 2>&1 &
PIDS+=("$!")
NGINX_PID=$!
# The worker does the work; the master only started it.
NGINX_WORKER=
for _ in $(seq 1 100); do
    NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1 || true)
    [ -n "$NGINX_WORKER" ] && break
    sleep 0.05
done
[ -n "$NGINX_WORKER" ] || die "nginx did not start: $(cat "$OUT/nginx.out")"
TARGETS="proxy:$PROXY_PID:127.0.0.1:$P_OUT floor:$FLOOR_PID:$FLOOR nginx:$NGINX_WORKER:127.0.0.1:$P_NGINX"
if command -v haproxy >/dev/null; then
    P_HAPROXY=$(free_port)
    cat >"$OUT/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend bench
    bind 127.0.0.1:$P_HAPROXY
    default_backend upstream
backend upstream
    server up $UP
CONF
    spawn 1 haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.out" 2>&1 &
    PIDS+=("$!")
    TARGETS="$TARGETS haproxy:$!:127.0.0.1:$P_HAPROXY"
fi
sleep 1
bench_body "$OUT/body.json"
cat >"$OUT/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$(cat "$OUT/body.json")'
LUA
log "$ROUNDS rounds of $SECS s, $CONNS connections; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    for target in $TARGETS; do
        IFS=: read -r name pid addr port <<<"$target"
        before=$(awk '{print $14, $15}' "/proc/$pid/stat")
        rps=$(on 0 wrk -t 1 -c "$CONNS" -d "${SECS}s" -s "$OUT/post.lua" "http://$addr:$port$BENCH_PATH" |
            awk '/Requests\/sec/ {print $2}')
        after=$(awk '{print $14, $15}' "/proc/$pid/stat")
        python3 - "$name" "$round" "$rps" "$SECS" "$(getconf CLK_TCK)" $before $after <<'PY'
import sys
name, rnd, rps, secs, tck, u0, s0, u1, s1 = sys.argv[1:]
n = float(rps) * float(secs)
us = 1e6 / float(tck) / n
print(f"round {rnd} {name:8} req/s {float(rps):9.0f}  user {(int(u1)-int(u0))*us:5.1f}  system {(int(s1)-int(s0))*us:5.1f}  total {(int(u1)-int(u0)+int(s1)-int(s0))*us:5.1f} µs/request")
PY
    done
done | tee "$OUT/rounds.txt"
python3 - "$OUT/rounds.txt" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p = line.split()
    rows[p[2]].append((float(p[4]), float(p[6]), float(p[8]), float(p[10])))
print("medians:")
for name, r in rows.items():
    med = [statistics.median(x[i] for x in r) for i in range(4)]
    print(f"  {name:8} req/s {med[0]:9.0f}  user {med[1]:5.1f}  system {med[2]:5.1f}  total {med[3]:5.1f} µs/request")
PY
log "raw output in $OUT"
