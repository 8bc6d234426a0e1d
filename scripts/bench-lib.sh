# shellcheck shell=bash
# Shared parts of the benchmark scripts (scripts/bench-*.sh but bench.sh, and
# scripts/link-order.sh): tools, the proxy's build, process start-up, the
# load generator, and for the sidecar pair (scripts/bench-mtls.sh,
# scripts/bench-pods.sh) the mesh's control plane and bootstrap tokens,
# certificates made with openssl, the nginx pair's configuration, and CPU
# accounting from /proc. Source it after setting BENCH_TAG (the log
# prefix); it defines functions and BENCH_LIB_DIR only.

# shellcheck disable=SC2034 # for the scripts that source this file
BENCH_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[%s] %s\n' "${BENCH_TAG:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"
}

# on CPU CMD...: runs CMD pinned to CPU (unpinned when CPU is empty).
on() { local cpu=$1; shift; if [ -n "$cpu" ]; then taskset -c "$cpu" "$@"; else "$@"; fi; }
# spawn CPU CMD...: as on, but replaces the shell (for `spawn … &`, so that
# $! is the process itself: taskset, `ip netns exec` and setpriv all exec).
spawn() { local cpu=$1; shift; if [ -n "$cpu" ]; then exec taskset -c "$cpu" "$@"; else exec "$@"; fi; }

# wait_line FILE PATTERN PID: waits (20 s at most) for a line matching
# PATTERN in FILE and prints it; fails when PID exits first.
wait_line() {
    local _
    for _ in $(seq 1 400); do
        if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || { cat "$1" "$1.err" >&2 2>/dev/null; return 1; }
        sleep 0.05
    done
    return 1
}
# field NAME: the value of NAME=VALUE in a `listening …` line on stdin.
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
# wait_ready ADMIN [WRAPPER...]: waits for the proxy's /ready, running curl
# under WRAPPER (e.g. `ip netns exec NS`) when given.
wait_ready() {
    local admin=$1 _
    shift
    for _ in $(seq 1 400); do
        if "$@" curl -sf "http://$admin/ready" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    "$@" curl -s "http://$admin/ready" >&2 || true
    return 1
}
# The processes a script started (spawn ... & PIDS+=("$!")); stop_pids,
# set as the EXIT trap, ends and reaps them all.
PIDS=()
stop_pids() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
# build_proxy_and PROFILE [PACKAGE...]: builds infermesh-proxy on its own,
# then PACKAGE... The proxy's link order (proxy/link-order.txt, read by
# proxy/build.rs) names functions as the images build them: cargo unifies
# dependency features across the packages of one invocation, and other
# features give generic functions other symbol names.
build_proxy_and() {
    local profile=$1 p packages=()
    shift
    for p in "$@"; do packages+=(-p "$p"); done
    (cd "$BENCH_LIB_DIR/.." && cargo build --profile "$profile" -q -p infermesh-proxy)
    [ $# -eq 0 ] || (cd "$BENCH_LIB_DIR/.." && cargo build --profile "$profile" -q "${packages[@]}")
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# cpu_ticks PID...: user + system CPU time (clock ticks, getconf CLK_TCK)
# summed over the processes given and their children (nginx's workers), all
# threads included.
cpu_ticks() {
    local p pids=()
    for p in "$@"; do
        pids+=("$p")
        # shellcheck disable=SC2207
        pids+=($(pgrep -P "$p" || true))
    done
    for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0; done |
        awk '{s += $1} END {print s + 0}'
}

# The request every latency run sends: an OpenAI chat completion, JSON POST.
# shellcheck disable=SC2034 # for the scripts that source this file
BENCH_PATH=/v1/chat/completions
bench_body() { # bench_body FILE
    printf '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":false}' >"$1"
}
# h1_load CPU BODY LOG URL [H2LOAD-ARGS...]: HTTP/1.1 POSTs of BODY to URL
# with h2load, every request's status and latency in LOG (--log-file); the
# summary goes to stdout. Wrap it (`ip netns exec NS`) by putting the
# wrapper in H1_LOAD_WRAP (an array).
h1_load() {
    local cpu=$1 body=$2 logf=$3 url=$4
    shift 4
    on "$cpu" ${H1_LOAD_WRAP[@]+"${H1_LOAD_WRAP[@]}"} h2load --h1 -m 1 -d "$body" -H 'content-type: application/json' \
        --log-file="$logf" "$@" "$url"
}

# start_upstream VAR CPU OUTFILE ADDR [WRAPPER...]: the fixed-response
# upstream (bench/), one thread, run under WRAPPER (e.g. `ip netns exec NS`)
# when given; sets VAR to the address it listens on, adds it to PIDS.
start_upstream() {
    local var=$1 cpu=$2 outf=$3 addr=$4 line
    shift 4
    spawn "$cpu" "$@" "$BIN/infermesh-bench-upstream" --addr "$addr" --threads 1 >"$outf" 2>"$outf.err" &
    PIDS+=("$!")
    line=$(wait_line "$outf" '^listening' "$!") || return 1
    printf -v "$var" '%s' "$(echo "$line" | field addr)"
}

# mesh_tokens DIR NS/SA...: bootstrap tokens for the control plane
# (DIR/tokens) and one token file per workload (DIR/NS-SA.token).
mesh_token() { echo "bench-token-${1//\//-}-0123"; }
mesh_tokens() {
    local dir=$1 w
    shift
    : >"$dir/tokens"
    for w in "$@"; do
        echo "$w $(mesh_token "$w")" >>"$dir/tokens"
        mesh_token "$w" >"$dir/${w//\//-}.token"
    done
}
# start_control VAR CPU OUTFILE POLICIES CA-DIR TOKENS LISTEN [WRAPPER...]:
# the control plane as the mesh's CA (24 h certificates) and policy source;
# sets VAR to its gRPC address, adds it to PIDS.
start_control() {
    local var=$1 cpu=$2 outf=$3 policies=$4 ca=$5 tokens=$6 listen=$7 line
    shift 7
    spawn "$cpu" "$@" "$BIN/infermesh-control" serve --policies "$policies" \
        --listen "$listen" --admin 127.0.0.1:0 --ca-dir "$ca" \
        --bootstrap-tokens "$tokens" >"$outf" 2>"$outf.err" &
    PIDS+=("$!")
    line=$(wait_line "$outf" '^listening' "$!") || return 1
    printf -v "$var" '%s' "$(echo "$line" | field grpc)"
}

# make_ca DIR: a self-signed ECDSA P-256 root, DIR/ca.crt and DIR/ca.key.
make_ca() {
    mkdir -p "$1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /O=bench/CN=bench-ca -keyout "$1/ca.key" -out "$1/ca.crt" 2>/dev/null
}
# make_cert CA-CRT CA-KEY PREFIX SAN: an ECDSA P-256 leaf signed by the CA,
# PREFIX.crt and PREFIX.key, with the subjectAltName SAN (e.g.
# "URI:spiffe://…" or "IP:10.0.0.1").
make_cert() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /O=bench \
        -keyout "$3.key" -out "$3.csr" -addext "subjectAltName=$4" 2>/dev/null
    openssl x509 -req -in "$3.csr" -CA "$1" -CAkey "$2" -CAcreateserial -days 1 \
        -copy_extensions copyall -out "$3.crt" 2>/dev/null
}

# nginx_pair_alive OUT N: dies with their output when the nginx pair's
# "model" or "app" process (nginx_model_PID, nginx_app_PID) has exited.
nginx_pair_alive() {
    local side pid_var
    for side in model app; do
        pid_var=nginx_${side}_PID
        kill -0 "${!pid_var}" 2>/dev/null || {
            cat "$1/nginx-$side.out" "$2/$side/logs/error.log" >&2
            die "nginx ($side) did not start"
        }
    done
}

# nginx_conf DIR UPSTREAM SERVER LOCATION: one worker, no access log, a
# keep-alive pool to UPSTREAM, every path it writes inside DIR (owned by
# PROXY_UID when that is set). SERVER is the server block's listen and TLS
# lines, LOCATION the proxy_pass and proxy_ssl lines.
nginx_conf() {
    mkdir -p "$1/logs"
    cat >"$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
    upstream next_hop { server $2; keepalive 64; keepalive_requests 1000000; }
    server {
$3
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
$4
        }
    }
}
EOF
    if [ -n "${PROXY_UID:-}" ]; then chown -R "$PROXY_UID:$PROXY_UID" "$1"; fi
}
