#!/usr/bin/env bash
# Whole-process benchmark: the same load sent straight to a fixed-response
# upstream and through infermesh-proxy (and through nginx and HAProxy, when
# Debian has them), in one run with interleaved repetitions. Prints a table and
# writes target/bench/results.json. See docs/benchmarks.md.
#
#   scripts/bench.sh                 # everything, ~8 minutes on 2 cores
#   BENCH_PEERS= scripts/bench.sh    # infermesh only, ~4 minutes
#
# Knobs (environment): BENCH_REPS (5), BENCH_SECONDS per load run (2),
# BENCH_PEERS ("nginx haproxy"), BENCH_PIN (1: pin to CPUs when there are
# two or more), BENCH_OUT (target/bench).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/bench}
RAW=$OUT/raw
REPS=${BENCH_REPS:-5}
SECS=${BENCH_SECONDS:-2}
PEERS=${BENCH_PEERS-nginx haproxy}
PIN=${BENCH_PIN:-1}
WARMUP=300ms

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools: install only what is missing -----------------------------------

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || return 1
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null && return 0
    log "installing $2 (for $1)"
    apt_install "$2" || die "cannot install $2; install it and run again"
    command -v "$1" >/dev/null || die "$2 installed but $1 is still missing"
}
need h2load nghttp2-client
need wrk wrk
need taskset util-linux
need python3 python3
command -v cargo >/dev/null || die "cargo is needed (install Rust with rustup)"
need curl curl

WANT_PEERS=
for peer in $PEERS; do
    case $peer in
        nginx) command -v nginx >/dev/null || { log "installing nginx-light (peer)"; apt_install nginx-light || true; } ;;
        haproxy) command -v haproxy >/dev/null || { log "installing haproxy (peer)"; apt_install haproxy || true; } ;;
        *) die "unknown peer $peer (known: nginx haproxy)" ;;
    esac
    if command -v "$peer" >/dev/null; then
        WANT_PEERS="$WANT_PEERS $peer"
    else
        log "skipping peer $peer: it does not install here"
    fi
done

# --- build -----------------------------------------------------------------

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p infermesh-proxy -p infermesh-bench)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
for b in infermesh-proxy infermesh-bench-upstream infermesh-bench-sse; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b after the build"
done

rm -rf "$RAW" "$OUT/nginx" "$OUT/haproxy"
mkdir -p "$RAW" "$OUT/nginx/logs" "$OUT/haproxy"

# --- CPUs ------------------------------------------------------------------

CPUS=$(nproc)
if [ "$PIN" = 1 ] && [ "$CPUS" -ge 2 ]; then
    # Upstream and load generator share CPU 0; the proxy under test (ours or
    # a peer) has CPU 1 to itself, so "proxy" figures are one worker on one
    # core, and direct and proxied runs give the load generator the same CPU.
    UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0
    PINNING="upstream+load generator on CPU 0, proxy on CPU 1"
else
    UP_CPU= PROXY_CPU= LOAD_CPU=
    PINNING="not pinned ($CPUS CPU(s))"
fi
# Everything measured runs at a raised priority (when allowed), so that
# other work on a shared machine disturbs it less.
NICE=()
if nice -n -10 true 2>/dev/null && [ "$(nice -n -10 nice)" -lt 0 ]; then NICE=(nice -n -10); fi
# on CPU COMMAND...: run COMMAND pinned to CPU (when pinning) and raised.
on() {
    local cpu=$1
    shift
    if [ -n "$cpu" ]; then set -- taskset -c "$cpu" "$@"; fi
    "${NICE[@]}" "$@"
}
# spawn CPU COMMAND... &: like `on`, but the process replaces the subshell, so
# that $! is the server's own pid (for kill and /proc/PID/status).
spawn() {
    local cpu=$1
    shift
    if [ -n "$cpu" ]; then set -- taskset -c "$cpu" "$@"; fi
    exec "${NICE[@]}" "$@"
}
log "$CPUS CPUs: $PINNING${NICE:+, nice -10}"

# --- processes -------------------------------------------------------------

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_line() { # wait_line FILE PATTERN PID → prints the first matching line
    local i
    for i in $(seq 1 200); do
        if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || { cat "$1" "$1.err" >&2 2>/dev/null; return 1; }
        sleep 0.05
    done
    return 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

spawn "$UP_CPU" "$BIN/infermesh-bench-upstream" --addr 127.0.0.1:0 --threads 1 \
    >"$OUT/upstream.out" 2>"$OUT/upstream.out.err" &
UP_PID=$!
PIDS+=("$UP_PID")
UP=$(wait_line "$OUT/upstream.out" '^listening' "$UP_PID" | sed 's/.*addr=//') || die "the upstream did not start"
log "upstream on $UP (pid $UP_PID)"

cat >"$OUT/policy.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: bench-http1}
spec:
  endpoints: ["$UP"]
  protocol: http1
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: bench-http2}
spec:
  endpoints: ["$UP"]
  protocol: http2
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: bench-grpc}
spec:
  match: [{grpc: {service: inference.GRPCInferenceService}}]
  backends: [{backend: bench-http2}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: bench-rest}
spec:
  backends: [{backend: bench-http1}]
EOF

PROXY_PID=
PROXY_STARTS=0
start_proxy() {
    PROXY_STARTS=$((PROXY_STARTS + 1))
    spawn "$PROXY_CPU" "$BIN/infermesh-proxy" --config "$OUT/policy.yaml" --threads 1 \
        --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
        >"$OUT/proxy.out" 2>>"$OUT/proxy.log" &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    local line
    line=$(wait_line "$OUT/proxy.out" '^listening' "$PROXY_PID") || die "infermesh-proxy did not start (see $OUT/proxy.log)"
    PROXY=$(sed 's/.*outbound=\([^ ]*\).*/\1/' <<<"$line")
    PROXY_ADMIN=$(sed 's/.*admin=\([^ ]*\).*/\1/' <<<"$line")
}
: >"$OUT/proxy.log"
start_proxy
sleep 1
PROXY_IDLE_RSS=$(rss_kb "$PROXY_PID" VmRSS)
log "infermesh-proxy on $PROXY (pid $PROXY_PID), idle RSS ${PROXY_IDLE_RSS} kB"

# Equivalent peers: one worker each, keep-alive pools to the same upstream,
# no access log (infermesh-proxy writes none by default either).
declare -A H1URL H2URL PIDOF
H1URL[direct]=$UP H2URL[direct]=$UP
H1URL[proxy]=$PROXY H2URL[proxy]=$PROXY
PIDOF[direct]=$UP_PID PIDOF[proxy]=$PROXY_PID
TARGETS="direct proxy"
declare -A IDLE_RSS
IDLE_RSS[proxy]=$PROXY_IDLE_RSS

for peer in $WANT_PEERS; do
    case $peer in
    nginx)
        P1=$(free_port) P2=$(free_port)
        cat >"$OUT/nginx/nginx.conf" <<EOF
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
    upstream bench_h2 { server $UP; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P1;
        listen 127.0.0.1:$P2 http2;
        location / {
            proxy_pass http://bench_h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location /sse {
            proxy_pass http://bench_h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
        location /inference.GRPCInferenceService/ {
            grpc_pass grpc://bench_h2;
        }
    }
}
EOF
        spawn "$PROXY_CPU" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" >"$OUT/nginx/out" 2>&1 &
        PIDOF[nginx]=$!
        H1URL[nginx]=127.0.0.1:$P1 H2URL[nginx]=127.0.0.1:$P2
        ;;
    haproxy)
        P1=$(free_port)
        cat >"$OUT/haproxy/haproxy.cfg" <<EOF
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
    bind 127.0.0.1:$P1
    use_backend bench_h2 if { req.hdr(content-type) -m beg application/grpc }
    use_backend bench_sse if { path /sse }
    default_backend bench_h1
backend bench_h1
    server up $UP
backend bench_sse
    # Forward each event as it comes (HAProxy otherwise waits to fill a packet).
    option http-no-delay
    server up $UP
backend bench_h2
    server up $UP proto h2
EOF
        spawn "$PROXY_CPU" haproxy -db -f "$OUT/haproxy/haproxy.cfg" >"$OUT/haproxy/out" 2>&1 &
        PIDOF[haproxy]=$!
        H1URL[haproxy]=127.0.0.1:$P1 H2URL[haproxy]=127.0.0.1:$P1
        ;;
    esac
    PIDS+=("${PIDOF[$peer]}")
    ok=0
    for _ in $(seq 1 100); do
        if curl -fs -o /dev/null "http://${H1URL[$peer]}/ready"; then ok=1; break; fi
        sleep 0.05
    done
    if [ $ok = 1 ]; then
        TARGETS="$TARGETS $peer"
        sleep 0.5
        # nginx: master + worker; HAProxy: one process.
        IDLE_RSS[$peer]=$(for p in ${PIDOF[$peer]} $(pgrep -P "${PIDOF[$peer]}" || true); do rss_kb "$p" VmRSS; done | awk '{s+=$1} END {print s+0}')
        log "$peer on ${H1URL[$peer]} (pid ${PIDOF[$peer]}), idle RSS ${IDLE_RSS[$peer]} kB"
    else
        log "skipping $peer: it did not start (see $OUT/$peer/)"
    fi
done

# --- load ------------------------------------------------------------------

printf '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":false}' >"$OUT/body.json"
# A KServe v2 ModelInferRequest {model_name: "bench"} in one gRPC frame.
printf '\x00\x00\x00\x00\x07\x0a\x05bench' >"$OUT/grpc.bin"
cat >"$OUT/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":false}'
EOF

JSON_PATH=/v1/chat/completions
GRPC_PATH=/inference.GRPCInferenceService/ModelInfer
LIMIT=$((SECS + 30))

# run SCENARIO TARGET REP: one load run, its output in $RAW.
run() {
    local s=$1 t=$2 r=$3 h1=${H1URL[$2]} h2=${H2URL[$2]}
    local f="$RAW/$s.$t.$r"
    local json=(-d "$OUT/body.json" -H 'content-type: application/json')
    local grpc=(-d "$OUT/grpc.bin" -H 'content-type: application/grpc' -H 'te: trailers')
    local fixed=(-c 10 -m 1 -D "$SECS" --warm-up-time="$WARMUP" --log-file="$f.log")
    local max=(-c 16 -m 1 -D "$SECS" --warm-up-time="$WARMUP")
    case $s in
        h1_1k) on "$LOAD_CPU" timeout $LIMIT h2load --h1 "${fixed[@]}" --rps 100 "${json[@]}" "http://$h1$JSON_PATH" ;;
        h1_5k) on "$LOAD_CPU" timeout $LIMIT h2load --h1 "${fixed[@]}" --rps 500 "${json[@]}" "http://$h1$JSON_PATH" ;;
        h1_max) on "$LOAD_CPU" timeout $LIMIT wrk -t 1 -c 16 -d "${SECS}s" --latency -s "$OUT/post.lua" "http://$h1$JSON_PATH" ;;
        h2_1k) on "$LOAD_CPU" timeout $LIMIT h2load "${fixed[@]}" --rps 100 "${json[@]}" "http://$h2$JSON_PATH" ;;
        h2_5k) on "$LOAD_CPU" timeout $LIMIT h2load "${fixed[@]}" --rps 500 "${json[@]}" "http://$h2$JSON_PATH" ;;
        h2_max) on "$LOAD_CPU" timeout $LIMIT h2load "${max[@]}" "${json[@]}" "http://$h2$JSON_PATH" ;;
        grpc_1k) on "$LOAD_CPU" timeout $LIMIT h2load "${fixed[@]}" --rps 100 "${grpc[@]}" "http://$h2$GRPC_PATH" ;;
        grpc_5k) on "$LOAD_CPU" timeout $LIMIT h2load "${fixed[@]}" --rps 500 "${grpc[@]}" "http://$h2$GRPC_PATH" ;;
        grpc_max) on "$LOAD_CPU" timeout $LIMIT h2load "${max[@]}" "${grpc[@]}" "http://$h2$GRPC_PATH" ;;
        sse) on "$LOAD_CPU" timeout $LIMIT "$BIN/infermesh-bench-sse" --addr "$h1" --requests 100 --events 200 --gap-ms 5 ;;
    esac >"$f.out" 2>&1 || echo "exit=$?" >>"$f.out"
}

# cpu_of TARGET: "RUN-NS UTIME STIME" of the server behind TARGET (the
# upstream for direct), summed over its processes and threads: CPU time
# spent per request is a figure that other work on the machine barely moves.
cpu_of() {
    local pids p task ns=0 ut=0 st=0 a b
    pids="${PIDOF[$1]} $(pgrep -P "${PIDOF[$1]}" || true)"
    for p in $pids; do
        for task in /proc/"$p"/task/*/schedstat; do
            read -r a _ <"$task" 2>/dev/null && ns=$((ns + a))
        done
        read -r a b < <(awk '{print $14, $15}' /proc/"$p"/stat 2>/dev/null || echo 0 0)
        ut=$((ut + a)) st=$((st + b))
    done
    echo "$ns $ut $st"
}

SCENARIOS="h1_1k h1_5k h1_max h2_1k h2_5k h2_max grpc_1k grpc_5k grpc_max sse"
: >"$RAW/events.txt"
cat /proc/loadavg >"$RAW/loadavg.before"
START=$(date +%s)
for rep in $(seq 1 "$REPS"); do
    log "repetition $rep/$REPS ($TARGETS)"
    for s in $SCENARIOS; do
        for t in $TARGETS; do
            cpu_of "$t" >"$RAW/$s.$t.$rep.cpu"
            run "$s" "$t" "$rep"
            cpu_of "$t" >>"$RAW/$s.$t.$rep.cpu"
            if ! kill -0 "${PIDOF[$t]}" 2>/dev/null; then
                echo "rep=$rep scenario=$s target=$t: process exited" >>"$RAW/events.txt"
                log "$t exited during $s (rep $rep)"
                if [ "$t" = proxy ]; then
                    echo "proxy peak RSS before the crash: unknown" >>"$RAW/events.txt"
                    start_proxy
                    H1URL[proxy]=$PROXY H2URL[proxy]=$PROXY PIDOF[proxy]=$PROXY_PID
                else
                    TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | grep -vx "$t" | tr '\n' ' ')
                fi
            fi
        done
    done
done
ELAPSED=$(($(date +%s) - START))
cat /proc/loadavg >"$RAW/loadavg.after"

# Memory after the load, and what the proxy counted.
declare -A PEAK_RSS AFTER_RSS
for t in $TARGETS; do
    [ "$t" = direct ] && continue
    pids="${PIDOF[$t]} $(pgrep -P "${PIDOF[$t]}" || true)"
    PEAK_RSS[$t]=$(for p in $pids; do rss_kb "$p" VmHWM; done | awk '{s+=$1} END {print s+0}')
    AFTER_RSS[$t]=$(for p in $pids; do rss_kb "$p" VmRSS; done | awk '{s+=$1} END {print s+0}')
done
curl -fs "http://$PROXY_ADMIN/metrics" >"$RAW/proxy-metrics.txt" 2>/dev/null || true

{
    echo "reps=$REPS"
    echo "seconds=$SECS"
    echo "targets=$TARGETS"
    echo "pinning=$PINNING"
    echo "cpus=$CPUS"
    echo "cpu_model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "kernel=$(uname -r)"
    echo "elapsed_s=$ELAPSED"
    echo "proxy_starts=$PROXY_STARTS"
    echo "proxy_log_lines=$(wc -l <"$OUT/proxy.log")"
    echo "loadavg_before=$(cut -d' ' -f1-3 "$RAW/loadavg.before")"
    echo "loadavg_after=$(cut -d' ' -f1-3 "$RAW/loadavg.after")"
    echo "h2load=$(h2load --version 2>&1 | head -1)"
    echo "warmup_s=${WARMUP%ms}e-3"
    echo "clk_tck=$(getconf CLK_TCK)"
    echo "wrk=$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
    for t in $TARGETS; do
        [ "$t" = direct ] && continue
        echo "idle_rss_kb.$t=${IDLE_RSS[$t]}"
        echo "peak_rss_kb.$t=${PEAK_RSS[$t]}"
        echo "after_rss_kb.$t=${AFTER_RSS[$t]}"
    done
    case " $TARGETS " in *" nginx "*) echo "nginx=$(nginx -v 2>&1 | sed 's/.*: //')" ;; esac
    case " $TARGETS " in *" haproxy "*) echo "haproxy=$(haproxy -v 2>&1 | head -1 | cut -d' ' -f1-3)" ;; esac
} >"$RAW/meta.txt"

# --- report ----------------------------------------------------------------

# report RAW-DIR RESULTS-JSON: reads every run's output, prints the table and
# writes the JSON (medians over repetitions, min–max spread, paired deltas).
report() {
    python3 - "$1" "$2" <<'PY'
import json, math, os, re, statistics, sys

raw, out = sys.argv[1], sys.argv[2]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(raw, "meta.txt")) if "=" in l)
reps, targets = int(meta["reps"]), meta["targets"].split()
peers = [t for t in targets if t != "direct"]

SCEN = {
    "h1_1k": ("HTTP/1.1 JSON POST, 1,000 req/s, 10 conns (h2load)", "fixed"),
    "h1_5k": ("HTTP/1.1 JSON POST, 5,000 req/s, 10 conns (h2load)", "fixed"),
    "h1_max": ("HTTP/1.1 JSON POST, max throughput, 16 conns (wrk)", "max"),
    "h2_1k": ("HTTP/2 JSON POST, 1,000 req/s, 10 conns (h2load)", "fixed"),
    "h2_5k": ("HTTP/2 JSON POST, 5,000 req/s, 10 conns (h2load)", "fixed"),
    "h2_max": ("HTTP/2 JSON POST, max throughput, 16 conns x 1 stream (h2load)", "max"),
    "grpc_1k": ("gRPC unary, 1,000 req/s, 10 conns (h2load)", "fixed"),
    "grpc_5k": ("gRPC unary, 5,000 req/s, 10 conns (h2load)", "fixed"),
    "grpc_max": ("gRPC unary, max throughput, 16 conns x 1 stream (h2load)", "max"),
    "sse": ("SSE over HTTP/1.1: time to first event (100 streams), reads of a 200-event stream 5 ms apart", "sse"),
}

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]

def to_ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

def parse(scen, kind, path):
    try:
        text = open(path + ".out").read()
    except OSError:
        return None
    m = {"errors": 0}
    if "exit=" in text:
        m["errors"] += 1
        m["exit"] = text.rsplit("exit=", 1)[1].strip()
    if kind == "sse":
        line = next((l for l in text.splitlines() if l.startswith("{")), None)
        if not line:
            return m
        j = json.loads(line)
        m["errors"] += j.get("errors", 0)
        fe = j.get("first_event_us", {})
        if fe.get("count"):
            m["first_event_p50_us"], m["first_event_p99_us"], m["first_event_mean_us"] = fe["p50"], fe["p99"], fe["mean"]
        st = j.get("stream", {})
        if "reads" in st:
            m["stream_reads"], m["stream_events"] = st["reads"], st["events"]
        return m
    if scen == "h1_max":  # wrk
        r = re.search(r"Requests/sec:\s*([\d.]+)", text)
        if r:
            m["rps"] = float(r.group(1))
        for q, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
            r = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % q, text, re.M)
            if r:
                m[key] = to_ms(r.group(1), r.group(2))
        r = re.search(r"(\d+) requests in", text)
        if r:
            m["requests"] = int(r.group(1))
            add_cpu(scen, m, path)
        r = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
        if r:
            m["errors"] += int(r.group(1))
        r = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        if r:
            m["errors"] += sum(int(x) for x in r.groups())
        return m
    # h2load
    r = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    if r:
        m["rps"] = float(r.group(1))
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    if r:
        total, _, done, ok, failed, errored, timeout = map(int, r.groups())
        m["errors"] += failed + errored + timeout
        m["requests"] = done
    r = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if r:
        m["errors"] += sum(int(x) for x in r.groups()[1:])
    add_cpu(scen, m, path)
    if kind == "fixed" and os.path.exists(path + ".log"):
        lat = []
        for line in open(path + ".log"):
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                lat.append(int(parts[2]) / 1000.0)
        if lat:
            m["p50_ms"], m["p99_ms"] = pct(lat, 0.50), pct(lat, 0.99)
            m["mean_ms"] = sum(lat) / len(lat)
    return m

SECS = float(meta["seconds"])
WARM = float(meta.get("warmup_s", "0"))
TCK = float(meta.get("clk_tck", "100"))

def add_cpu(scen, m, path):
    """CPU µs per request of the server under test, and its kernel share."""
    try:
        before, after = [list(map(int, l.split())) for l in open(path + ".cpu").read().split("\n")[:2]]
    except (OSError, ValueError):
        return
    n = m.get("requests")
    if not n:
        return
    if scen != "h1_max":  # h2load's warm-up requests are not in its count
        n = n * (SECS + WARM) / SECS
    m["cpu_us_per_req"] = (after[0] - before[0]) / 1e3 / n
    ticks = (after[1] - before[1]) + (after[2] - before[2])
    if ticks >= 10:
        m["cpu_kernel_share"] = (after[2] - before[2]) / ticks

def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}

LAT = ["p50_ms", "p99_ms", "mean_ms", "first_event_p50_us", "first_event_p99_us", "first_event_mean_us"]
results = {"meta": meta, "scenarios": {}, "memory_kb": {}, "errors": {}, "events": []}
for scen, (title, kind) in SCEN.items():
    runs = {t: [parse(scen, kind, os.path.join(raw, f"{scen}.{t}.{r}")) for r in range(1, reps + 1)] for t in targets}
    entry = {"title": title, "kind": kind, "targets": {}, "added": {}, "ratio": {}}
    for t in targets:
        keys = sorted({k for m in runs[t] if m for k, v in m.items() if isinstance(v, (int, float))})
        entry["targets"][t] = {k: summary([m.get(k) if m else None for m in runs[t]]) for k in keys}
        errs = sum(m.get("errors", 0) for m in runs[t] if m)
        if errs:
            results["errors"][f"{scen}.{t}"] = errs
    for t in peers:
        added, ratio = {}, {}
        for k in LAT:
            pairs = [(p.get(k), d.get(k)) for p, d in zip(runs[t], runs["direct"]) if p and d]
            d = summary([a - b for a, b in pairs if a is not None and b is not None])
            if d:
                added[k] = d
        pairs = [(p.get("rps"), d.get("rps")) for p, d in zip(runs[t], runs["direct"]) if p and d]
        r = summary([a / b for a, b in pairs if a and b])
        if kind == "max" and r:
            ratio["rps"] = r
        entry["added"][t], entry["ratio"][t] = added, ratio
    results["scenarios"][scen] = entry

for t in peers:
    results["memory_kb"][t] = {k: int(meta.get(f"{k}_rss_kb.{t}", 0) or 0) for k in ("idle", "peak", "after")}
if os.path.exists(os.path.join(raw, "events.txt")):
    results["events"] = [l.strip() for l in open(os.path.join(raw, "events.txt")) if l.strip()]

# Responses the proxy itself counted as not 2xx (gRPC errors hide in 200s).
non2xx = {}
mpath = os.path.join(raw, "proxy-metrics.txt")
if os.path.exists(mpath):
    for line in open(mpath):
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, _, value = rest.rpartition("}")
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        code = lab.get("status") or lab.get("code") or lab.get("grpc_status")
        if code is None or not name.endswith("_total"):
            continue
        ok = code.startswith("2") if "grpc" not in name and "grpc_status" not in lab else code == "0"
        if not ok:
            key = f"{name}{{{labels}}}"
            non2xx[key] = non2xx.get(key, 0) + float(value.split()[0])
results["proxy_metrics_not_ok"] = non2xx

os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(results, open(out, "w"), indent=1)

# --- table ---
def cell(s, fmt="{:.3f}"):
    if not s:
        return "-"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"

W = 26
print()
print(f"infermesh benchmark: {reps} interleaved repetitions of {meta['seconds']} s per load run; "
      f"{meta['cpus']} CPUs ({meta['cpu_model']}); {meta['pinning']}")
print(f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}; "
      "cells are median [min–max] over repetitions; '+' columns are paired differences target − direct; "
      "CPU µs/req is the CPU time of the server under test (the upstream for direct) per request")
for scen, e in results["scenarios"].items():
    print()
    print(e["title"])
    if e["kind"] == "fixed":
        print(f"  {'target':<9}{'p50 ms':<{W}}{'p99 ms':<{W}}{'mean ms':<{W}}{'+p50 ms':<{W}}{'+p99 ms':<{W}}{'+mean ms':<{W}}{'CPU µs/req':<{W}}")
        for t in targets:
            v, a = e["targets"][t], e["added"].get(t, {})
            print(f"  {t:<9}{cell(v.get('p50_ms')):<{W}}{cell(v.get('p99_ms')):<{W}}{cell(v.get('mean_ms')):<{W}}"
                  f"{cell(a.get('p50_ms')):<{W}}{cell(a.get('p99_ms')):<{W}}{cell(a.get('mean_ms')):<{W}}"
                  f"{cell(v.get('cpu_us_per_req'), '{:.1f}'):<{W}}")
    elif e["kind"] == "max":
        print(f"  {'target':<9}{'req/s':<{W+6}}{'ratio to direct':<{W}}{'p50 ms':<{W}}{'p99 ms':<{W}}{'CPU µs/req':<{W}}{'kernel share':<{W}}")
        for t in targets:
            v, r = e["targets"][t], e["ratio"].get(t, {})
            print(f"  {t:<9}{cell(v.get('rps'), '{:.0f}'):<{W+6}}{cell(r.get('rps'), '{:.2f}'):<{W}}"
                  f"{cell(v.get('p50_ms')):<{W}}{cell(v.get('p99_ms')):<{W}}"
                  f"{cell(v.get('cpu_us_per_req'), '{:.1f}'):<{W}}{cell(v.get('cpu_kernel_share'), '{:.2f}'):<{W}}")
    else:
        print(f"  {'target':<9}{'first event p50 µs':<{W}}{'p99 µs':<{W}}{'+p50 µs':<{W}}{'+p99 µs':<{W}}{'reads / events':<{W}}")
        for t in targets:
            v, a = e["targets"][t], e["added"].get(t, {})
            reads = v.get("stream_reads"), v.get("stream_events")
            re_ = f"{reads[0]['median']:.0f} / {reads[1]['median']:.0f}" if all(reads) else "-"
            print(f"  {t:<9}{cell(v.get('first_event_p50_us'), '{:.0f}'):<{W}}{cell(v.get('first_event_p99_us'), '{:.0f}'):<{W}}"
                  f"{cell(a.get('first_event_p50_us'), '{:.0f}'):<{W}}{cell(a.get('first_event_p99_us'), '{:.0f}'):<{W}}{re_:<{W}}")
print()
print("memory (kB, VmRSS idle before load / VmHWM peak / VmRSS after load):")
for t, m in results["memory_kb"].items():
    print(f"  {t:<9}idle {m['idle']:>7}   peak {m['peak']:>7}   after {m['after']:>7}")
print()
print("errors (failed, non-2xx, socket errors) by scenario.target:", results["errors"] or "none")
print("proxy /metrics responses not OK:", non2xx or "none")
if results["events"]:
    print("process events:", *results["events"], sep="\n  ")
PY
}

report "$RAW" "$OUT/results.json"
log "wrote $OUT/results.json (load phase ${ELAPSED}s)"
