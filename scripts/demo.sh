#!/usr/bin/env bash
# The quick start: builds infermesh, starts two example OpenAI-compatible
# model servers and the proxy in front of them (policy:
# deploy/examples/quickstart/policy.yaml), sends a few requests through the
# proxy with curl so you can see traffic flow, and keeps running until Ctrl-C.
#
#   bash scripts/demo.sh          # run until Ctrl-C
#   bash scripts/demo.sh --once   # send the requests, then stop
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
POLICY="deploy/examples/quickstart/policy.yaml"
OUTBOUND="127.0.0.1:4140"
INBOUND="127.0.0.1:4143"
ADMIN="127.0.0.1:4191"
UPSTREAM_A="127.0.0.1:18001"
UPSTREAM_B="127.0.0.1:18002"
ONCE=0
[ "${1:-}" = "--once" ] && ONCE=1

if ! command -v curl >/dev/null 2>&1; then
    bash scripts/setup.sh
fi

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }

bold "Building infermesh-proxy and the demo model server"
cargo build --quiet -p infermesh-proxy -p infermesh-tests --bins
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"

LOGS="$(mktemp -d -t infermesh-demo.XXXXXX)"
PIDS=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    echo "stopped; logs are in $LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until FILE holds a line starting with `listening`, or the process dies.
wait_listening() {
    local pid="$1" file="$2" name="$3"
    for _ in $(seq 1 200); do
        if grep -q '^listening' "$file" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before listening:" >&2
            cat "$LOGS/$name.err" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    echo "$name did not start within 20 s; see $LOGS" >&2
    exit 1
}

start_upstream() {
    local name="$1" addr="$2"
    "$BIN/infermesh-demo-upstream" --addr "$addr" --name "$name" --chunks 8 --gap-ms 150 \
        >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
    PIDS+=("$!")
    wait_listening "$!" "$LOGS/$name.out" "$name"
    echo "model server $name on http://$addr"
}

bold "Starting two model servers"
start_upstream demo-a "$UPSTREAM_A"
start_upstream demo-b "$UPSTREAM_B"

bold "Starting infermesh-proxy with $POLICY"
"$BIN/infermesh-proxy" --config "$POLICY" --outbound "$OUTBOUND" --inbound "$INBOUND" --admin "$ADMIN" \
    >"$LOGS/proxy.out" 2>"$LOGS/proxy.err" &
PROXY_PID="$!"
PIDS+=("$PROXY_PID")
wait_listening "$PROXY_PID" "$LOGS/proxy.out" proxy
cat "$LOGS/proxy.out"

URL="http://$OUTBOUND/v1/chat/completions"
chat() { printf '{"model":"%s","messages":[{"role":"user","content":"Hello!"}],"stream":%s}' "$1" "$2"; }

bold "1. A chat completion for model llama-demo (split 80/20 between demo-a and demo-b)"
echo "\$ curl -si $URL -d '$(chat llama-demo false)'"
curl -sS -i --noproxy '*' "$URL" -H 'content-type: application/json' -d "$(chat llama-demo false)"
echo

bold "2. The same request 20 times: which server answered (the x-upstream header)"
for _ in $(seq 1 20); do
    curl -sS -o /dev/null -D - --noproxy '*' "$URL" -H 'content-type: application/json' \
        -d "$(chat llama-demo false)" | tr -d '\r' | sed -n 's/^x-upstream: //p'
done | sort | uniq -c

bold "3. A streamed chat completion: each SSE chunk is passed on as soon as the server sends it"
echo "\$ curl -N $URL -d '$(chat llama-demo true)'"
curl -sS -N --noproxy '*' "$URL" -H 'content-type: application/json' -d "$(chat llama-demo true)"

bold "4. The model alias: a request for 'fast' reaches demo-b as 'small-demo'"
curl -sS -i --noproxy '*' "$URL" -H 'content-type: application/json' -d "$(chat fast false)" \
    | tr -d '\r' | grep -Ei '^(HTTP/|x-upstream)|"model"' | sed -E 's/.*("model":"[^"]*").*/\1/'

bold "5. A request no route matches gets a JSON error from the proxy itself"
curl -sS -i --noproxy '*' "http://$OUTBOUND/unknown/path"
echo

bold "6. Metrics"
echo "Prometheus metrics: http://$ADMIN/metrics  (policy in force: http://$ADMIN/config)"
curl -sS --noproxy '*' "http://$ADMIN/metrics" | grep -E '^infermesh_requests_total' || true

if [ "$ONCE" -eq 1 ]; then
    exit 0
fi

bold "Running. Send your own requests to http://$OUTBOUND (logs: $LOGS). Ctrl-C to stop."
wait "$PROXY_PID"
