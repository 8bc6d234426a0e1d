#!/usr/bin/env bash
# Memory of infermesh-proxy holding N idle keep-alive client connections
# (default 1,000), each of which has carried one request, with the pooled
# upstream connections those requests opened. Prints idle RSS before, RSS
# with the connections open, and the growth per connection.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-1000}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p infermesh-proxy -p infermesh-bench
BIN=target/release
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT
"$BIN/infermesh-bench-upstream" --addr 127.0.0.1:0 --threads 1 >"$OUT/up" 2>&1 &
for _ in $(seq 50); do grep -q listening "$OUT/up" && break; sleep 0.1; done
UP=$(sed -E 's/.*addr=([^ ]+).*/\1/' "$OUT/up")
cat >"$OUT/policy.yaml" <<P
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: up}
spec: {endpoints: ["$UP"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: all}
spec: {backends: [{backend: up}]}
P
"$BIN/infermesh-proxy" --config "$OUT/policy.yaml" --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 \
    --admin 127.0.0.1:0 --threads 1 >"$OUT/px" 2>"$OUT/px.err" &
PX_PID=$!
for _ in $(seq 50); do grep -q listening "$OUT/px" && break; sleep 0.1; done
PX=$(sed -E 's/.*outbound=([^ ]+).*/\1/' "$OUT/px")
rss() { awk '$1=="VmRSS:" {print $2}' "/proc/$PX_PID/status"; }
sleep 0.5
IDLE=$(rss)
exec 3> >(python3 scripts/bench_idle.py "$PX" "$N" /health >"$OUT/client" 2>&1)
for _ in $(seq 600); do grep -q "^open" "$OUT/client" 2>/dev/null && break; sleep 0.1; done
grep -q "^open" "$OUT/client" || { cat "$OUT/client"; exit 1; }
sleep 1
HELD=$(rss)
exec 3>&-
echo "idle_rss_kb=$IDLE rss_with_${N}_idle_connections_kb=$HELD per_connection_bytes=$(( (HELD - IDLE) * 1024 / N ))"
