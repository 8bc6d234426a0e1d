#!/usr/bin/env bash
# Writes proxy/link-order.txt: the functions of a release infermesh-proxy
# that run when it starts, serves its first requests and stays idle, in the
# order the linker is to place them (proxy/build.rs passes the file to lld
# as --symbol-ordering-file).
#
# Grouped at the start of .text, the code a sidecar runs fills about 2 MB of
# contiguous pages instead of being scattered over 13 MB, where the kernel's
# fault-around maps 64 KB around every page touched: idle RSS after one
# request fell from 10.2 to 6.2 MB (docs/benchmarks.md, "Issue 18, seventh
# steps").
#
# The names are mangled symbols, whose hashes change with the compiler and
# with dependency versions and features: rerun this after either changes,
# and build the proxy on its own (`cargo build --release -p
# infermesh-proxy`), as this script, the benchmarks and the image do. A stale file
# links as well as a fresh one (unknown names are skipped) and only loses
# the grouping; `scripts/link-order.sh --check` says how much of the file
# still names functions of the current release binary.
#
#   scripts/link-order.sh            # profile and rewrite proxy/link-order.txt
#   scripts/link-order.sh --check    # how many of its names the binary has
set -euo pipefail
BENCH_TAG=link-order
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

ROOT="$(cd "$BENCH_LIB_DIR/.." && pwd)"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
ORDER="$ROOT/proxy/link-order.txt"

log "building release binaries"
build_proxy_and release

if [ "${1:-}" = "--check" ]; then
    have=$(nm --defined-only "$BIN/infermesh-proxy" | awk '{print $3}' | sort -u)
    total=$(grep -c . "$ORDER")
    found=$(comm -12 <(echo "$have") <(sort -u "$ORDER") | wc -l)
    log "$found of $total names in $ORDER are functions of $BIN/infermesh-proxy"
    # Four in five still found: regenerate below that.
    [ $((found * 5)) -ge $((total * 4)) ] || die "the link order is stale: run scripts/link-order.sh"
    exit 0
fi

(cd "$ROOT" && cargo build --release -q -p infermesh-tests --bin infermesh-demo-upstream)
need valgrind valgrind
need curl curl
OUT=$(mktemp -d /tmp/infermesh-link-order.XXXXXX)
trap 'stop_pids; rm -rf "$OUT"' EXIT

UP=$(free_port) GRPC=$(free_port)
"$BIN/infermesh-demo-upstream" --addr "127.0.0.1:$UP" --grpc-addr "127.0.0.1:$GRPC" \
    --chunks 3 --gap-ms 1 >"$OUT/upstream.out" 2>&1 &
PIDS+=("$!")
cat >"$OUT/policy.yaml" <<YAML
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: rest}
spec:
  endpoints: ["127.0.0.1:$UP"]
  protocol: http1
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: grpc}
spec:
  endpoints: ["127.0.0.1:$GRPC"]
  protocol: http2
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: grpc}
spec:
  match: [{grpc: {service: inference.GRPCInferenceService}}]
  backends: [{backend: grpc}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: rest}
spec:
  backends: [{backend: rest}]
YAML

P_OUT=$(free_port) P_IN=$(free_port) P_ADMIN=$(free_port)
log "profiling infermesh-proxy under callgrind"
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN/infermesh-proxy" --config "$OUT/policy.yaml" --threads 1 \
    --outbound "127.0.0.1:$P_OUT" --inbound "127.0.0.1:$P_IN" --admin "127.0.0.1:$P_ADMIN" \
    >"$OUT/proxy.out" 2>"$OUT/proxy.err" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_ready "127.0.0.1:$P_ADMIN" || die "the proxy did not start under valgrind (see $OUT/proxy.err)"
sleep 1
# What ran until the proxy was ready and idle goes first in the order, what
# only requests run after it.
callgrind_control --dump=ready "$PROXY_PID" >/dev/null

# What a sidecar serves: the probes, chat completions whole and streamed
# over HTTP/1.1 and h2c, a KServe v2 REST inference, a gRPC call, an error,
# and a metrics scrape.
chat='{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
stream='{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
url="http://127.0.0.1:$P_OUT"
for _ in 1 2 3; do
    curl -sf -o /dev/null "$url/ready" || true
    curl -sf -o /dev/null -H 'content-type: application/json' -d "$chat" "$url/v1/chat/completions"
    curl -sf -o /dev/null -H 'content-type: application/json' -d "$stream" "$url/v1/chat/completions"
    curl -sf -o /dev/null --http2-prior-knowledge -H 'content-type: application/json' -d "$chat" \
        "$url/v1/chat/completions"
    curl -sf -o /dev/null --http2-prior-knowledge -H 'content-type: application/json' -d "$stream" \
        "$url/v1/chat/completions"
    curl -sf -o /dev/null -H 'content-type: application/json' \
        -d '{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}' \
        "$url/v2/models/demo/infer" || true
    # An empty, uncompressed gRPC message: ServerLive takes no fields.
    printf '\0\0\0\0\0' | curl -s -o /dev/null --http2-prior-knowledge -H 'content-type: application/grpc' \
        -H 'te: trailers' --data-binary @- "$url/inference.GRPCInferenceService/ServerLive" || true
    curl -s -o /dev/null -H 'content-type: application/json' -d '{"model":' "$url/v1/chat/completions" || true
    curl -sf -o /dev/null "http://127.0.0.1:$P_ADMIN/metrics"
done
sleep 2
kill "$PROXY_PID"
wait "$PROXY_PID" 2>/dev/null || true

# Every function of the proxy binary that ran, the first dump's (start-up and
# readiness) before the rest of the last's (requests); callgrind marks recursion levels
# with a ' suffix, and gives a name once per file, then its number.
python3 - "$BIN/infermesh-proxy" "$OUT/callgrind.out.1" "$OUT/callgrind.out" >"$OUT/order.txt" <<'PY'
import os, re, sys
binary, seen = os.path.realpath(sys.argv[1]), set()

def name(table, text):
    m = re.match(r"\((\d+)\)(?: (.*))?", text)
    if m is None:
        return text
    if m.group(2):
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1), "")

def functions_run(path):
    objects, functions, current = {}, {}, None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("ob="):
            current = os.path.realpath(name(objects, line[3:]))
        elif line.startswith("cob="):
            name(objects, line[4:])
        elif line.startswith("cfn="):
            name(functions, line[4:])
        elif line.startswith("fn="):
            f = re.sub(r"'\d+$", "", name(functions, line[3:]))
            if current == binary and f and not f.startswith("0x"):
                yield f

# Sorted within each dump: callgrind's own order changes from run to run,
# and the place of a function within its group matters little.
for path in sys.argv[2:]:
    new = set(functions_run(path)) - seen
    seen |= new
    for f in sorted(new):
        print(f)
PY
count=$(wc -l <"$OUT/order.txt")
[ "$count" -gt 100 ] || die "only $count functions found in the profile"
cp "$OUT/order.txt" "$ORDER"
log "wrote $count functions to $ORDER; rebuild the proxy to link with it"
