#!/usr/bin/env bash
# Whole-process benchmark: the same load sent straight to a fixed-response
# upstream and through infermesh-proxy (and through nginx and HAProxy, when
# Debian has them), in one run with interleaved repetitions. Prints a table and
# writes target/bench/results.json. See docs/benchmarks.md.
#
#   scripts/bench.sh                               # everything
#   BENCH_PEERS= scripts/bench.sh                  # infermesh only
#   BENCH_SCENARIOS="idle_conns" scripts/bench.sh  # some scenarios only
#
# Knobs (environment): BENCH_REPS (5), BENCH_SECONDS per load run (2),
# BENCH_PEERS ("nginx haproxy"), BENCH_SCENARIOS (all), BENCH_IDLE_CONNS
# (1000), BENCH_BODY_BYTES (1048576), BENCH_PIN (1: pin to CPUs when there
# are two or more), BENCH_OUT (target/bench), BENCH_PROXY_BIN (another
# infermesh-proxy binary to measure, e.g. a build of an older commit).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/bench}
RAW=$OUT/raw
REPS=${BENCH_REPS:-5}
SECS=${BENCH_SECONDS:-2}
PEERS=${BENCH_PEERS-nginx haproxy}
PIN=${BENCH_PIN:-1}
IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}
BODY_BYTES=${BENCH_BODY_BYTES:-1048576}
WARMUP=300ms
# Scenarios run against servers started once, then scenarios that start
# every proxy afresh for each run, so that its memory figures are its own.
LOAD_SCENARIOS="h1_1k h1_5k h1_max h2_1k h2_5k h2_max grpc_1k grpc_5k grpc_max sse"
FRESH_SCENARIOS="idle_conns big_request big_response"
SCENARIOS=${BENCH_SCENARIOS:-$LOAD_SCENARIOS $FRESH_SCENARIOS}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

has() { case " $2 " in *" $1 "*) return 0 ;; esac; return 1; }
for s in $SCENARIOS; do
    has "$s" "$LOAD_SCENARIOS $FRESH_SCENARIOS" || die "unknown scenario $s (known: $LOAD_SCENARIOS $FRESH_SCENARIOS)"
done
LOAD_RUN='' FRESH_RUN=''
for s in $LOAD_SCENARIOS; do if has "$s" "$SCENARIOS"; then LOAD_RUN="$LOAD_RUN $s"; fi; done
for s in $FRESH_SCENARIOS; do if has "$s" "$SCENARIOS"; then FRESH_RUN="$FRESH_RUN $s"; fi; done
# 1,000 idle connections need more descriptors than the usual soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

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
# The proxy alone, as the images build it: its link order (proxy/build.rs)
# names functions as built without other packages' dependency features.
(cd "$ROOT" && cargo build --release -q -p infermesh-proxy)
(cd "$ROOT" && cargo build --release -q -p infermesh-bench)
# A stale link order costs the idle-memory figures megabytes: say so.
bash "$ROOT/scripts/link-order.sh" --check ||
    log "warning: the idle RSS figures below are measured without the link order"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
for b in infermesh-proxy infermesh-bench-upstream infermesh-bench-sse; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b after the build"
done
PROXY_BIN=${BENCH_PROXY_BIN:-$BIN/infermesh-proxy}
[ -x "$PROXY_BIN" ] || die "BENCH_PROXY_BIN=$PROXY_BIN is not an executable"

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
    UP_CPU='' PROXY_CPU='' LOAD_CPU=''
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

declare -A H1URL H2URL PIDOF
cleanup() {
    local pid
    for pid in "${PIDOF[@]}"; do
        if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    done
    for pid in "${PIDOF[@]}"; do
        if [ -n "$pid" ]; then wait "$pid" 2>/dev/null || true; fi
    done
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
# pids_of TARGET: the server's process and its children (nginx's workers).
pids_of() { echo "${PIDOF[$1]} $(pgrep -P "${PIDOF[$1]}" || true)"; }
# mem_kb TARGET FIELD: FIELD summed over the target's processes: VmRSS or
# VmHWM from /proc/PID/status, or Pss from /proc/PID/smaps_rollup.
mem_kb() {
    local p
    for p in $(pids_of "$1"); do
        case $2 in
            Pss) awk '$1=="Pss:" {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0 ;;
            *) rss_kb "$p" "$2" ;;
        esac
    done | awk '{s+=$1} END {print s+0}'
}

spawn "$UP_CPU" "$BIN/infermesh-bench-upstream" --addr 127.0.0.1:0 --threads 1 \
    >"$OUT/upstream.out" 2>"$OUT/upstream.out.err" &
UP_PID=$!
PIDOF[direct]=$UP_PID
UP=$(wait_line "$OUT/upstream.out" '^listening' "$UP_PID" | sed 's/.*addr=//') || die "the upstream did not start"
H1URL[direct]=$UP H2URL[direct]=$UP
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

# Equivalent peers: one worker each, keep-alive pools to the same upstream,
# no access log (infermesh-proxy writes none by default either).
NGINX_P1=$(free_port) NGINX_P2=$(free_port)
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
        listen 127.0.0.1:$NGINX_P1;
        listen 127.0.0.1:$NGINX_P2 http2;
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
        # Large bodies stream both ways, as through infermesh and HAProxy,
        # instead of nginx's defaults (a request body is read whole, to a
        # temporary file past 8 KB, before the upstream sees a byte; a
        # response that outruns the client goes to a temporary file), and
        # no body size limit (the default is 1 MB).
        location = /v1/embeddings {
            proxy_pass http://bench_h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            client_max_body_size 0;
        }
        location = /blob {
            proxy_pass http://bench_h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }
        location /inference.GRPCInferenceService/ {
            grpc_pass grpc://bench_h2;
        }
    }
}
EOF
HAPROXY_P1=$(free_port)
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
    bind 127.0.0.1:$HAPROXY_P1
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

PROXY_STARTS=0
: >"$OUT/proxy.log"
# start_target TARGET: starts infermesh-proxy ("proxy") or a peer afresh and
# waits until a request through it succeeds; fails when it does not.
start_target() {
    local t=$1 line
    case $t in
    proxy)
        PROXY_STARTS=$((PROXY_STARTS + 1))
        # Emptied here, not by the background job's redirection, so that the
        # wait below cannot read the previous run's address.
        : >"$OUT/proxy.out"
        spawn "$PROXY_CPU" "$PROXY_BIN" --config "$OUT/policy.yaml" --threads 1 \
            --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
            >>"$OUT/proxy.out" 2>>"$OUT/proxy.log" &
        PIDOF[proxy]=$!
        line=$(wait_line "$OUT/proxy.out" '^listening' "${PIDOF[proxy]}") || return 1
        PROXY=${line#*outbound=} PROXY=${PROXY%% *}
        PROXY_ADMIN=${line#*admin=} PROXY_ADMIN=${PROXY_ADMIN%% *}
        H1URL[proxy]=$PROXY H2URL[proxy]=$PROXY
        ;;
    nginx)
        # nginx cannot serve HTTP/1.1 and h2c on one cleartext port.
        spawn "$PROXY_CPU" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" >>"$OUT/nginx/out" 2>&1 &
        PIDOF[nginx]=$!
        H1URL[nginx]=127.0.0.1:$NGINX_P1 H2URL[nginx]=127.0.0.1:$NGINX_P2
        ;;
    haproxy)
        spawn "$PROXY_CPU" haproxy -db -f "$OUT/haproxy/haproxy.cfg" >>"$OUT/haproxy/out" 2>&1 &
        PIDOF[haproxy]=$!
        H1URL[haproxy]=127.0.0.1:$HAPROXY_P1 H2URL[haproxy]=127.0.0.1:$HAPROXY_P1
        ;;
    esac
    for _ in $(seq 1 100); do
        if curl -fs -o /dev/null "http://${H1URL[$t]}/ready"; then return 0; fi
        kill -0 "${PIDOF[$t]}" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
# stop_target TARGET: SIGTERM, then SIGKILL after 5 s (infermesh-proxy
# drains open connections first; none should be left when this is called).
stop_target() {
    local pid=${PIDOF[$1]:-}
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PIDOF[$1]=
}

TARGETS="direct proxy"
declare -A IDLE_RSS
start_target proxy || die "infermesh-proxy did not start (see $OUT/proxy.log)"
sleep 1
IDLE_RSS[proxy]=$(mem_kb proxy VmRSS)
log "infermesh-proxy on $PROXY (pid ${PIDOF[proxy]}), idle RSS ${IDLE_RSS[proxy]} kB"
for peer in $WANT_PEERS; do
    if start_target "$peer"; then
        TARGETS="$TARGETS $peer"
        sleep 0.5
        # nginx: master + worker; HAProxy: one process.
        IDLE_RSS[$peer]=$(mem_kb "$peer" VmRSS)
        log "$peer on ${H1URL[$peer]} (pid ${PIDOF[$peer]}), idle RSS ${IDLE_RSS[$peer]} kB"
    else
        log "skipping $peer: it did not start (see $OUT/$peer/)"
        stop_target "$peer"
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

: >"$RAW/events.txt"
cat /proc/loadavg >"$RAW/loadavg.before"
START=$(date +%s)
for rep in $(seq 1 "$REPS"); do
    [ -n "$LOAD_RUN" ] || break
    log "repetition $rep/$REPS ($TARGETS)"
    for s in $LOAD_RUN; do
        for t in $TARGETS; do
            cpu_of "$t" >"$RAW/$s.$t.$rep.cpu"
            run "$s" "$t" "$rep"
            cpu_of "$t" >>"$RAW/$s.$t.$rep.cpu"
            if ! kill -0 "${PIDOF[$t]}" 2>/dev/null; then
                echo "rep=$rep scenario=$s target=$t: process exited" >>"$RAW/events.txt"
                log "$t exited during $s (rep $rep)"
                if [ "$t" = proxy ]; then
                    echo "proxy peak RSS before the crash: unknown" >>"$RAW/events.txt"
                    start_target proxy || die "infermesh-proxy did not restart (see $OUT/proxy.log)"
                else
                    TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | grep -vx "$t" | tr '\n' ' ')
                fi
            fi
        done
    done
done
LOAD_ELAPSED=$(($(date +%s) - START))

# Memory after the load, and what the proxy counted.
declare -A PEAK_RSS AFTER_RSS
for t in $TARGETS; do
    [ "$t" = direct ] && continue
    PEAK_RSS[$t]=$(mem_kb "$t" VmHWM)
    AFTER_RSS[$t]=$(mem_kb "$t" VmRSS)
done
curl -fs "http://$PROXY_ADMIN/metrics" >"$RAW/proxy-metrics.load.txt" 2>/dev/null || true

# --- fresh processes: idle connections and large bodies --------------------
#
# Each run starts the proxy under test afresh and stops it afterwards, so
# that its VmHWM (peak RSS) belongs to that run alone. The upstream stays.

for t in $TARGETS; do [ "$t" = direct ] || stop_target "$t"; done
python3 - "$OUT/big.json" "$BODY_BYTES" <<'PY'
import sys
# A JSON embeddings request of exactly N bytes: the model name first, as
# clients write it, then one long input string.
path, n = sys.argv[1], int(sys.argv[2])
head, tail = b'{"model":"bench","input":"', b'"}'
open(path, "wb").write(head + b"x" * max(0, n - len(head) - len(tail)) + tail)
PY
BIG_CONNS=16

# idle_run TARGET REP: opens IDLE_CONNS keep-alive connections through
# TARGET, one request on each, and records its memory before and with them.
idle_run() {
    local t=$1 f="$RAW/idle_conns.$1.$2" cpid i held=0
    {
        echo "conns=$IDLE_CONNS"
        echo "idle_rss_kb=$(mem_kb "$t" VmRSS)"
        echo "idle_pss_kb=$(mem_kb "$t" Pss)"
    } >"$f.mem"
    rm -f "$OUT/idle.fifo"
    mkfifo "$OUT/idle.fifo"
    # The client holds its connections until its stdin closes.
    spawn "$LOAD_CPU" python3 "$ROOT/scripts/bench_idle.py" "${H1URL[$t]}" "$IDLE_CONNS" /health \
        <"$OUT/idle.fifo" >"$f.out" 2>&1 &
    cpid=$!
    exec 3>"$OUT/idle.fifo"
    for i in $(seq 1 1200); do
        if grep -q '^open' "$f.out"; then held=1; break; fi
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.05
    done
    if [ "$held" = 1 ]; then
        sleep 1
        {
            echo "held_rss_kb=$(mem_kb "$t" VmRSS)"
            echo "held_pss_kb=$(mem_kb "$t" Pss)"
            echo "open_s=$(awk '/^open/ {print $3}' "$f.out")"
        } >>"$f.mem"
    else
        echo "exit=client did not open its connections (after ${i} polls)" >>"$f.out"
    fi
    exec 3>&-
    wait "$cpid" 2>/dev/null || true
    rm -f "$OUT/idle.fifo"
}

# big_run SCENARIO TARGET REP: a large request or response body at full
# speed, with the proxy's peak RSS.
big_run() {
    local s=$1 t=$2 f="$RAW/$1.$2.$3" h1=${H1URL[$2]}
    local load=(--h1 -c "$BIG_CONNS" -m 1 -D "$SECS" --warm-up-time="$WARMUP")
    [ "$t" = direct ] || echo "start_rss_kb=$(mem_kb "$t" VmRSS)" >"$f.mem"
    cpu_of "$t" >"$f.cpu"
    case $s in
        big_request) on "$LOAD_CPU" timeout $LIMIT h2load "${load[@]}" -d "$OUT/big.json" \
            -H 'content-type: application/json' "http://$h1/v1/embeddings" ;;
        big_response) on "$LOAD_CPU" timeout $LIMIT h2load "${load[@]}" "http://$h1/blob?bytes=$BODY_BYTES" ;;
    esac >"$f.out" 2>&1 || echo "exit=$?" >>"$f.out"
    cpu_of "$t" >>"$f.cpu"
    if [ "$t" != direct ]; then
        echo "peak_rss_kb=$(mem_kb "$t" VmHWM)" >>"$f.mem"
        echo "after_rss_kb=$(mem_kb "$t" VmRSS)" >>"$f.mem"
    fi
}

START=$(date +%s)
for rep in $(seq 1 "$REPS"); do
    [ -n "$FRESH_RUN" ] || break
    log "fresh-process repetition $rep/$REPS ($TARGETS)"
    for s in $FRESH_RUN; do
        for t in $TARGETS; do
            if [ "$t" = direct ]; then
                # The upstream runs all along: its throughput is the
                # baseline; idle connections to it measure nothing of a proxy.
                [ "$s" = idle_conns ] || big_run "$s" direct "$rep"
                continue
            fi
            if ! start_target "$t"; then
                echo "rep=$rep scenario=$s target=$t: did not start" >>"$RAW/events.txt"
                log "$t did not start for $s (rep $rep)"
                stop_target "$t"
                continue
            fi
            sleep 0.5
            case $s in
                idle_conns) idle_run "$t" "$rep" ;;
                *) big_run "$s" "$t" "$rep" ;;
            esac
            if ! kill -0 "${PIDOF[$t]}" 2>/dev/null; then
                echo "rep=$rep scenario=$s target=$t: process exited" >>"$RAW/events.txt"
                log "$t exited during $s (rep $rep)"
            elif [ "$t" = proxy ]; then
                curl -fs "http://$PROXY_ADMIN/metrics" >"$RAW/proxy-metrics.$s.$rep.txt" 2>/dev/null || true
            fi
            stop_target "$t"
        done
    done
done
FRESH_ELAPSED=$(($(date +%s) - START))
ELAPSED=$((LOAD_ELAPSED + FRESH_ELAPSED))
cat /proc/loadavg >"$RAW/loadavg.after"

{
    echo "reps=$REPS"
    echo "seconds=$SECS"
    echo "targets=$TARGETS"
    echo "pinning=$PINNING"
    echo "cpus=$CPUS"
    echo "cpu_model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "kernel=$(uname -r)"
    echo "elapsed_s=$ELAPSED"
    echo "load_elapsed_s=$LOAD_ELAPSED"
    echo "fresh_elapsed_s=$FRESH_ELAPSED"
    echo "scenarios=$LOAD_RUN $FRESH_RUN"
    echo "idle_conns=$IDLE_CONNS"
    echo "body_bytes=$BODY_BYTES"
    echo "big_conns=$BIG_CONNS"
    echo "proxy_starts=$PROXY_STARTS"
    echo "proxy_bin=$PROXY_BIN"
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
# nginx and HAProxy: "the best peer" is the better of these in each repetition.
others = [t for t in targets if t not in ("direct", "proxy")]
ran = meta.get("scenarios", "").split()
IDLE_N = int(meta.get("idle_conns", "1000"))
BODY = int(meta.get("body_bytes", str(1 << 20)))
BIG_CONNS = meta.get("big_conns", "16")

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
    "idle_conns": (f"{IDLE_N:,} idle HTTP/1.1 keep-alive connections, one request each (fresh process per run)", "idle"),
    "big_request": (f"HTTP/1.1 POST of a {BODY:,}-byte JSON body, max throughput, {BIG_CONNS} conns (h2load; fresh process per run)", "big"),
    "big_response": (f"HTTP/1.1 GET of a {BODY:,}-byte body, max throughput, {BIG_CONNS} conns (h2load; fresh process per run)", "big"),
}
SCEN = {k: v for k, v in SCEN.items() if not ran or k in ran}

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
    if kind in ("idle", "big") and os.path.exists(path + ".mem"):
        for line in open(path + ".mem"):
            k, _, v = line.strip().partition("=")
            try:
                m[k] = float(v)
            except ValueError:
                pass
    if kind == "idle":
        if "unexpected answer" in text or "Error" in text:
            m["errors"] += 1
        if "held_rss_kb" in m and "idle_rss_kb" in m:
            n = m.get("conns") or IDLE_N
            m["per_conn_bytes"] = (m["held_rss_kb"] - m["idle_rss_kb"]) * 1024 / n
            m["per_conn_pss_bytes"] = (m["held_pss_kb"] - m["idle_pss_kb"]) * 1024 / n
        return m
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
    if kind == "big" and "rps" in m:
        m["mb_per_s"] = m["rps"] * BODY / 1e6
        if "cpu_us_per_req" in m:
            m["cpu_us_per_mb"] = m["cpu_us_per_req"] * 1e6 / BODY
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

# Figures compared with the best peer, and whether lower is better.
VS_PEER = {"p50_ms": True, "mean_ms": True, "rps": False, "mb_per_s": False, "cpu_us_per_req": True,
           "first_event_p50_us": True, "idle_rss_kb": True, "held_rss_kb": True, "held_pss_kb": True,
           "per_conn_bytes": True, "peak_rss_kb": True}

LAT = ["p50_ms", "p99_ms", "mean_ms", "first_event_p50_us", "first_event_p99_us", "first_event_mean_us"]
results = {"meta": meta, "scenarios": {}, "memory_kb": {}, "errors": {}, "events": []}
for scen, (title, kind) in SCEN.items():
    runs = {t: [parse(scen, kind, os.path.join(raw, f"{scen}.{t}.{r}")) for r in range(1, reps + 1)] for t in targets}
    entry = {"title": title, "kind": kind, "targets": {}, "added": {}, "ratio": {}, "vs_best_peer": {}}
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
        if kind in ("max", "big") and r:
            ratio["rps"] = r
        entry["added"][t], entry["ratio"][t] = added, ratio
        # Ratio to the better of nginx and HAProxy in the same repetition.
        vs = {}
        for k, lower in VS_PEER.items():
            xs = []
            for r_ in range(reps):
                mine = runs[t][r_].get(k) if runs[t][r_] else None
                theirs = [runs[o][r_].get(k) for o in others if runs[o][r_] and runs[o][r_].get(k)]
                if mine is not None and theirs:
                    best = min(theirs) if lower else max(theirs)
                    xs.append(mine / best)
            if xs:
                vs[k] = summary(xs)
        entry["vs_best_peer"][t] = vs
    results["scenarios"][scen] = entry

LOAD_KINDS = ("fixed", "max", "sse")
if any(SCEN[k][1] in LOAD_KINDS for k in SCEN):
    for t in peers:
        results["memory_kb"][t] = {k: int(meta.get(f"{k}_rss_kb.{t}", 0) or 0) for k in ("idle", "peak", "after")}
if os.path.exists(os.path.join(raw, "events.txt")):
    results["events"] = [l.strip() for l in open(os.path.join(raw, "events.txt")) if l.strip()]

# Responses the proxy itself counted as not 2xx (gRPC errors hide in 200s).
non2xx = {}
for mpath in sorted(os.path.join(raw, f) for f in os.listdir(raw) if f.startswith("proxy-metrics")):
    for line in open(mpath):
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, _, value = rest.rpartition("}")
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        code = lab.get("status") or lab.get("code")
        grpc_status = lab.get("grpc_status")
        if (code is None and grpc_status is None) or not name.endswith("_total"):
            continue
        # An HTTP status must be 2xx (a gRPC-named counter's code 0), and a
        # gRPC status, when the sample has one, 0.
        http_ok = code is None or (code == "0" if "grpc" in name else code.startswith("2"))
        ok = http_ok and grpc_status in (None, "", "0")
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
    elif e["kind"] == "idle":
        print(f"  {'target':<9}{'RSS idle kB':<{W}}{'RSS with conns kB':<{W}}{'bytes/conn':<{W}}"
              f"{'PSS with conns kB':<{W}}{'RSS x best peer':<{W}}{'PSS x best peer':<{W}}")
        for t in peers:
            v, b = e["targets"][t], e["vs_best_peer"].get(t, {})
            print(f"  {t:<9}{cell(v.get('idle_rss_kb'), '{:.0f}'):<{W}}{cell(v.get('held_rss_kb'), '{:.0f}'):<{W}}"
                  f"{cell(v.get('per_conn_bytes'), '{:.0f}'):<{W}}{cell(v.get('held_pss_kb'), '{:.0f}'):<{W}}"
                  f"{cell(b.get('held_rss_kb'), '{:.2f}'):<{W}}{cell(b.get('held_pss_kb'), '{:.2f}'):<{W}}")
    elif e["kind"] == "big":
        print(f"  {'target':<9}{'req/s':<{W}}{'MB/s':<{W}}{'ratio to direct':<{W}}{'x best peer':<{W}}"
              f"{'CPU µs/req':<{W}}{'peak RSS kB':<{W}}{'peak x best peer':<{W}}")
        for t in targets:
            v, r, b = e["targets"][t], e["ratio"].get(t, {}), e["vs_best_peer"].get(t, {})
            print(f"  {t:<9}{cell(v.get('rps'), '{:.0f}'):<{W}}{cell(v.get('mb_per_s'), '{:.0f}'):<{W}}"
                  f"{cell(r.get('rps'), '{:.2f}'):<{W}}{cell(b.get('rps'), '{:.2f}'):<{W}}"
                  f"{cell(v.get('cpu_us_per_req'), '{:.0f}'):<{W}}{cell(v.get('peak_rss_kb'), '{:.0f}'):<{W}}"
                  f"{cell(b.get('peak_rss_kb'), '{:.2f}'):<{W}}")
    else:
        print(f"  {'target':<9}{'first event p50 µs':<{W}}{'p99 µs':<{W}}{'+p50 µs':<{W}}{'+p99 µs':<{W}}{'reads / events':<{W}}")
        for t in targets:
            v, a = e["targets"][t], e["added"].get(t, {})
            reads = v.get("stream_reads"), v.get("stream_events")
            re_ = f"{reads[0]['median']:.0f} / {reads[1]['median']:.0f}" if all(reads) else "-"
            print(f"  {t:<9}{cell(v.get('first_event_p50_us'), '{:.0f}'):<{W}}{cell(v.get('first_event_p99_us'), '{:.0f}'):<{W}}"
                  f"{cell(a.get('first_event_p50_us'), '{:.0f}'):<{W}}{cell(a.get('first_event_p99_us'), '{:.0f}'):<{W}}{re_:<{W}}")
if results["memory_kb"]:
    print()
    print("memory of the long-running servers (kB, VmRSS idle before load / VmHWM peak / VmRSS after load):")
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
log "wrote $OUT/results.json (load phase ${LOAD_ELAPSED}s, fresh-process phase ${FRESH_ELAPSED}s)"
