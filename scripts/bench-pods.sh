#!/usr/bin/env bash
# Two meshed "pods" built from network namespaces: the latency a sidecar pair
# adds between an application pod and a model pod, and the CPU the pair spends
# per request, against the same requests sent straight across the same veth
# pair and against a pair of nginx proxies doing mutual TLS (what a user
# would build without a mesh). Runs as root (it creates network namespaces).
#
#   scripts/bench-pods.sh
#   BENCH_DURATION=5 BENCH_REPS=1 scripts/bench-pods.sh     # a quick look
#
# Knobs (environment):
#   BENCH_DURATION  measured seconds of each load run (10)
#   BENCH_RATE      the fixed rate, requests/s over BENCH_CONNS connections (1000)
#   BENCH_CONNS     connections of the fixed-rate runs (10)
#   BENCH_MAX_CONNS connections of the saturation runs, one request in flight on each (16)
#   BENCH_REPS      repetitions; variants run interleaved in each (3)
#   BENCH_VARIANTS  which variants, in order ("direct plain mtls nginx intercept")
#   BENCH_SUBNET    the pods' /24, first three octets (10.231.0)
#   BENCH_BUILD     1: build the release binaries first; 0: use target/release as it is (1)
#   BENCH_OUT       where results go (target/bench-pods)
#   BENCH_INTERCEPT_INBOUND_ROUTE  1: the intercepted pair's model sidecar
#                   gets an inbound route to 127.0.0.1:8000 instead of
#                   delivering through the passthrough (0)
#
# The pods: namespaces imb-PID-node (a bridge, SUBNET.1, and the control
# plane), imb-PID-app (SUBNET.2: the load generator, h2load) and imb-PID-model
# (SUBNET.3: the fixed-response upstream from bench/ on :8000), each pod on a
# veth pair into the node's bridge. All of it is removed on exit, also on
# failure. The variants:
#   direct     h2load -> SUBNET.3:8000
#   plain      h2load -> app sidecar 127.0.0.1:4150 -> model sidecar SUBNET.3:4153
#              -> 127.0.0.1:8000 (policy files, --config)
#   mtls       the same on 4240/4243 with mutual TLS, certificates and policy
#              from infermesh-control serve (the CA) in the node namespace
#   nginx      app nginx 127.0.0.1:8080 (HTTP -> HTTPS with a client
#              certificate, keep-alive pool) -> model nginx SUBNET.3:8443 (TLS,
#              client certificate verified) -> 127.0.0.1:8000; certificates
#              from openssl (ECDSA P-256, TLS 1.3, as the mesh's)
#   intercept  h2load -> SUBNET.3:8000, unchanged, caught by infermesh-init's
#              rules in both pods: app sidecar :4140 -> mTLS -> model sidecar
#              :4143 -> 127.0.0.1:8000. Its rules are installed for its own
#              runs only and removed after each, so the other variants are
#              not redirected. Skipped, saying so, without infermesh-init.
# Sidecars and nginx run as UID/GID 2102 (setpriv), one worker each, and
# every proxy shares CPU 1; the upstream, the load generator and the control
# plane share CPU 0. Each run is preceded by a 1 s warm-up run (discarded);
# the pair's CPU time (user + system, /proc/PID/stat, both processes and
# their children) is read around each measured run and divided by the
# requests it completed. Writes OUT/results.json and a markdown table.
# The NAME_PID and NAME_ADMIN variables are set through printf -v.
# shellcheck disable=SC2154
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=${BENCH_DURATION:-10}
RATE=${BENCH_RATE:-1000}
CONNS=${BENCH_CONNS:-10}
MAX_CONNS=${BENCH_MAX_CONNS:-16}
REPS=${BENCH_REPS:-3}
VARIANTS=${BENCH_VARIANTS:-direct plain mtls nginx intercept}
SUBNET=${BENCH_SUBNET:-10.231.0}
BUILD=${BENCH_BUILD:-1}
OUT=${BENCH_OUT:-$ROOT/target/bench-pods}
INTERCEPT_INBOUND_ROUTE=${BENCH_INTERCEPT_INBOUND_ROUTE:-0}
PROXY_UID=2102

BENCH_TAG=bench-pods
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root: the pods are network namespaces"
[ $((RATE % CONNS)) -eq 0 ] || die "BENCH_RATE ($RATE) must be a multiple of BENCH_CONNS ($CONNS)"
for v in $VARIANTS; do
    case $v in direct | plain | mtls | nginx | intercept) ;; *) die "unknown variant $v" ;; esac
done
need h2load nghttp2-client
need openssl openssl
need python3 python3
need ip iproute2
need setpriv util-linux
case " $VARIANTS " in *" nginx "*) need nginx nginx-light ;; esac

TARGET_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
if [ "$BUILD" = 1 ]; then
    log "building release binaries"
    build_proxy_and release infermesh-control infermesh-bench
fi

if [ "$(nproc)" -ge 2 ]; then
    UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0
else
    UP_CPU='' PROXY_CPU='' LOAD_CPU=''
fi

NS_NODE=imb-$$-node NS_APP=imb-$$-app NS_MODEL=imb-$$-model
NODE=(ip netns exec "$NS_NODE")
APP=(ip netns exec "$NS_APP")
MODEL=(ip netns exec "$NS_MODEL")
AS_PROXY=(setpriv --reuid "$PROXY_UID" --regid "$PROXY_UID" --clear-groups)
NODE_IP=$SUBNET.1 APP_IP=$SUBNET.2 MODEL_IP=$SUBNET.3
RUN=''
PIDS=()
INTERCEPT_RULES=0
cleanup() {
    local pid ns
    if [ "$INTERCEPT_RULES" = 1 ]; then intercept_rules --clean || true; fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$NS_APP" "$NS_MODEL" "$NS_NODE"; do ip netns del "$ns" 2>/dev/null || true; done
    if [ -n "$RUN" ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT

rm -rf "$OUT"
mkdir -p "$OUT/raw"
# Everything the pods' processes read lives in a world-readable directory:
# the binaries (copied), policies, certificates and tokens.
RUN=$(mktemp -d /tmp/imb-$$.XXXXXX)
chmod 755 "$RUN"
mkdir -p "$RUN/bin" "$RUN/plain" "$RUN/mesh/policies" "$RUN/intercept/policies"
for b in infermesh-proxy infermesh-control infermesh-bench-upstream infermesh-init; do
    if [ -x "$TARGET_BIN/$b" ]; then cp "$TARGET_BIN/$b" "$RUN/bin/"; fi
done
BIN=$RUN/bin

# --- the pods ------------------------------------------------------------------
log "pods: $NS_APP ($APP_IP) and $NS_MODEL ($MODEL_IP) on a bridge in $NS_NODE ($NODE_IP)"
ip netns add "$NS_NODE"
ip netns add "$NS_APP"
ip netns add "$NS_MODEL"
ip -n "$NS_NODE" link set lo up
ip -n "$NS_NODE" link add br0 type bridge
ip -n "$NS_NODE" addr add "$NODE_IP/24" dev br0
ip -n "$NS_NODE" link set br0 up
pod_net() { # pod_net NS NAME IP
    ip -n "$1" link set lo up
    ip -n "$1" link add eth0 type veth peer name "$2" netns "$NS_NODE"
    ip -n "$NS_NODE" link set "$2" master br0
    ip -n "$NS_NODE" link set "$2" up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
}
pod_net "$NS_APP" app "$APP_IP"
pod_net "$NS_MODEL" model "$MODEL_IP"

start_upstream UP "$UP_CPU" "$OUT/upstream.out" 0.0.0.0:8000 "${MODEL[@]}" || die "the upstream did not start"
log "upstream on $MODEL_IP:${UP##*:} in the model pod"

# sidecar NAME NS ARGS...: infermesh-proxy in namespace NS as the proxy's
# UID, one worker, on the proxy CPU; sets NAME_PID and NAME_ADMIN.
sidecar() {
    local name=$1 ns=$2 pid line
    shift 2
    spawn "$PROXY_CPU" ip netns exec "$ns" "${AS_PROXY[@]}" "$BIN/infermesh-proxy" --threads 1 "$@" \
        >"$OUT/$name.out" 2>"$OUT/$name.out.err" &
    pid=$!
    PIDS+=("$pid")
    line=$(wait_line "$OUT/$name.out" '^listening' "$pid") || die "sidecar $name did not start (see $OUT/$name.out.err)"
    printf -v "${name}_PID" '%s' "$pid"
    printf -v "${name}_ADMIN" '%s' "$(echo "$line" | field admin)"
}
has_variant() { case " $VARIANTS " in *" $1 "*) return 0 ;; esac; return 1; }

declare -A URL PAIR
URL[direct]=$MODEL_IP:8000

# --- the plaintext pair ----------------------------------------------------------
if has_variant plain; then
    cat >"$RUN/plain/model.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: local-model}
spec: {endpoints: ["127.0.0.1:8000"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: inbound}
spec: {listener: inbound, backends: [{backend: local-model}]}
EOF
    cat >"$RUN/plain/app.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: model-pod}
spec: {endpoints: ["$MODEL_IP:4153"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: outbound}
spec: {backends: [{backend: model-pod}]}
EOF
    sidecar plain_model "$NS_MODEL" --config "$RUN/plain/model.yaml" \
        --inbound 0.0.0.0:4153 --outbound 127.0.0.1:4154 --admin 127.0.0.1:4155
    sidecar plain_app "$NS_APP" --config "$RUN/plain/app.yaml" \
        --outbound 127.0.0.1:4150 --inbound 127.0.0.1:4151 --admin 127.0.0.1:4152
    URL[plain]=127.0.0.1:4150
    PAIR[plain]="$plain_app_PID $plain_model_PID"
fi

# The intercepted pair needs infermesh-init (the proxy crate's binary).
SKIPPED=()
if has_variant intercept && [ ! -x "$BIN/infermesh-init" ]; then
    log "intercept: skipped: needs infermesh-init (not in $TARGET_BIN)"
    SKIPPED+=("intercept: skipped: needs infermesh-init")
    VARIANTS=$(tr ' ' '\n' <<<"$VARIANTS" | grep -vx intercept | tr '\n' ' ')
fi
# intercept_policy: the app pod's traffic to the model pod's own address
# (MODEL_IP:8000, which its sidecar sees as the original destination) goes
# there over mutual TLS; the model pod's inbound rules hand it to its
# sidecar, which has no inbound route and delivers it to 127.0.0.1:8000.
# The route names the backend so that the control plane sends the backend
# to the app pod's proxy (a backend reaches a proxy when a route names it).
intercept_policy() {
    cat <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: model-pod-ip}
spec:
  addresses: ["$MODEL_IP:8000"]
  endpoints: ["$MODEL_IP:8000"]
  mtls: {identity: "spiffe://cluster.local/ns/pods-model/sa/server"}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: to-model-pod, namespace: pods-app}
spec:
  match: [{destination: ["$MODEL_IP:8000"]}]
  backends: [{backend: model-pod-ip}]
EOF
    if [ "$INTERCEPT_INBOUND_ROUTE" = 1 ]; then
        cat <<EOF
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: inbound-pods, namespace: pods-model}
spec: {listener: inbound, backends: [{backend: local-model}]}
EOF
    fi
}

# --- the control plane and the mTLS pair ------------------------------------------
SERVER_ID=spiffe://cluster.local/ns/models/sa/server
if has_variant mtls || has_variant intercept; then
    cat >"$RUN/mesh/policies/mtls.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: local-model}
spec: {endpoints: ["127.0.0.1:8000"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: inbound, namespace: models}
spec: {listener: inbound, backends: [{backend: local-model}]}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: model-pod}
spec:
  endpoints: ["$MODEL_IP:4243"]
  mtls: {identity: "$SERVER_ID"}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: outbound, namespace: apps}
spec: {backends: [{backend: model-pod}]}
EOF
    mesh_tokens "$RUN/mesh" models/server apps/client pods-model/server pods-app/client
    if has_variant intercept; then intercept_policy >"$RUN/mesh/policies/intercept.yaml"; fi
    start_control CP "$UP_CPU" "$OUT/control.out" "$RUN/mesh/policies" "$RUN/mesh/ca" "$RUN/mesh/tokens" \
        "$NODE_IP:0" "${NODE[@]}" || die "the control plane did not start"
    chmod 755 "$RUN/mesh/ca"
    chmod 644 "$RUN/mesh/ca/ca.crt"
    MESH_ARGS=(--control-plane "https://$CP" --trust-bundle "$RUN/mesh/ca/ca.crt")
    log "control plane on $CP in the node namespace"
fi
if has_variant mtls; then
    sidecar mtls_model "$NS_MODEL" "${MESH_ARGS[@]}" --identity-token-file "$RUN/mesh/models-server.token" \
        --workload-namespace models --service-account server \
        --inbound 0.0.0.0:4243 --outbound 127.0.0.1:4244 --admin 127.0.0.1:4245
    sidecar mtls_app "$NS_APP" "${MESH_ARGS[@]}" --identity-token-file "$RUN/mesh/apps-client.token" \
        --workload-namespace apps --service-account client \
        --outbound 127.0.0.1:4240 --inbound 127.0.0.1:4241 --admin 127.0.0.1:4242
    wait_ready "$mtls_model_ADMIN" "${MODEL[@]}" || die "the model pod's mTLS sidecar is not ready"
    wait_ready "$mtls_app_ADMIN" "${APP[@]}" || die "the app pod's mTLS sidecar is not ready"
    URL[mtls]=127.0.0.1:4240
    PAIR[mtls]="$mtls_app_PID $mtls_model_PID"
fi

# --- the nginx pair -------------------------------------------------------------------
# nginx_conf (scripts/bench-lib.sh) writes each side's configuration.
if has_variant nginx; then
    N=$RUN/nginx
    make_ca "$N/ca"
    make_cert "$N/ca/ca.crt" "$N/ca/ca.key" "$N/server" DNS:model.pods.bench
    make_cert "$N/ca/ca.crt" "$N/ca/ca.key" "$N/client" URI:spiffe://cluster.local/ns/apps/sa/client
    chmod 644 "$N"/*.key
    nginx_conf "$N/model" 127.0.0.1:8000 "\
        listen $MODEL_IP:8443 ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate $N/server.crt;
        ssl_certificate_key $N/server.key;
        ssl_client_certificate $N/ca/ca.crt;
        ssl_verify_client on;" "\
            proxy_pass http://next_hop;"
    nginx_conf "$N/app" "$MODEL_IP:8443" "\
        listen 127.0.0.1:8080;" "\
            proxy_pass https://next_hop;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $N/client.crt;
            proxy_ssl_certificate_key $N/client.key;
            proxy_ssl_trusted_certificate $N/ca/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name model.pods.bench;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"
    for side in model app; do
        if [ "$side" = model ]; then ns=$NS_MODEL; else ns=$NS_APP; fi
        spawn "$PROXY_CPU" ip netns exec "$ns" "${AS_PROXY[@]}" nginx -p "$N/$side" -e "$N/$side/logs/error.log" \
            -c "$N/$side/nginx.conf" >"$OUT/nginx-$side.out" 2>&1 &
        PIDS+=("$!")
        printf -v "nginx_${side}_PID" '%s' "$!"
        cp "$N/$side/nginx.conf" "$OUT/nginx-$side.conf"
    done
    sleep 0.5
    nginx_pair_alive "$OUT" "$N"
    URL[nginx]=127.0.0.1:8080
    PAIR[nginx]="$nginx_app_PID $nginx_model_PID"
fi

# --- the intercepted mTLS pair ------------------------------------------------------
# intercept_rules [--clean]: infermesh-init in both pods (outbound to 4140,
# inbound to 4143, the proxy's UID excluded), or their removal.
intercept_rules() {
    "${APP[@]}" "$BIN/infermesh-init" --proxy-uid "$PROXY_UID" "$@" >>"$OUT/init.out" 2>&1
    "${MODEL[@]}" "$BIN/infermesh-init" --proxy-uid "$PROXY_UID" "$@" >>"$OUT/init.out" 2>&1
}
if has_variant intercept; then
    sidecar icpt_model "$NS_MODEL" "${MESH_ARGS[@]}" --identity-token-file "$RUN/mesh/pods-model-server.token" \
        --workload-namespace pods-model --service-account server \
        --inbound 0.0.0.0:4143 --outbound 127.0.0.1:4140 --admin 127.0.0.1:4191
    sidecar icpt_app "$NS_APP" "${MESH_ARGS[@]}" --identity-token-file "$RUN/mesh/pods-app-client.token" \
        --workload-namespace pods-app --service-account client \
        --outbound 127.0.0.1:4140 --inbound 0.0.0.0:4143 --admin 127.0.0.1:4191
    wait_ready "$icpt_model_ADMIN" "${MODEL[@]}" || die "the model pod's intercepting sidecar is not ready"
    wait_ready "$icpt_app_ADMIN" "${APP[@]}" || die "the app pod's intercepting sidecar is not ready"
    URL[intercept]=$MODEL_IP:8000
    PAIR[intercept]="$icpt_app_PID $icpt_model_PID"
fi

# --- load -------------------------------------------------------------------------------
bench_body "$RUN/body.json"
H1_LOAD_WRAP=("${APP[@]}")
check() { # check VARIANT: one request answers 200
    "${APP[@]}" curl -sf -o /dev/null -H 'content-type: application/json' --data @"$RUN/body.json" \
        "http://${URL[$1]}$BENCH_PATH" || die "$1 does not answer (logs in $OUT)"
}
# measure VARIANT MODE REP: a 1 s warm-up run, then the measured run with
# the pair's CPU ticks read around it.
measure() {
    local v=$1 mode=$2 r=$3 f="$OUT/raw/$1.$2.$3" args before after
    if [ "$mode" = rate ]; then
        args=(-c "$CONNS" --rps $((RATE / CONNS)))
    else
        args=(-c "$MAX_CONNS")
    fi
    h1_load "$LOAD_CPU" "$RUN/body.json" /dev/null "http://${URL[$v]}$BENCH_PATH" "${args[@]}" -D 1 >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    before=$(if [ -n "${PAIR[$v]:-}" ]; then cpu_ticks ${PAIR[$v]}; else echo 0; fi)
    h1_load "$LOAD_CPU" "$RUN/body.json" "$f.log" "http://${URL[$v]}$BENCH_PATH" "${args[@]}" -D "$SECS" \
        >"$f.out" 2>&1 || echo "exit=$?" >>"$f.out"
    # shellcheck disable=SC2086
    after=$(if [ -n "${PAIR[$v]:-}" ]; then cpu_ticks ${PAIR[$v]}; else echo 0; fi)
    echo "pair_cpu_ticks=$((after - before)) clk_tck=$(getconf CLK_TCK)" >>"$f.out"
    echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$f.out"
}

# What the figures stand on: every proxy runs as the proxy's UID, and the
# model pod's nginx refuses a client without a certificate.
for v in $VARIANTS; do
    for pid in ${PAIR[$v]:-}; do
        uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
        [ "$uid" = "$PROXY_UID" ] || die "$v: process $pid runs as UID $uid, not $PROXY_UID"
    done
done
if has_variant nginx; then
    code=$("${APP[@]}" curl -s -o /dev/null -w '%{http_code}' --cacert "$N/ca/ca.crt" \
        --resolve "model.pods.bench:8443:$MODEL_IP" https://model.pods.bench:8443/ || true)
    [ "$code" = 400 ] || die "the model pod's nginx answered $code to a client without a certificate, not 400"
fi
for v in $VARIANTS; do
    if [ "$v" = intercept ]; then
        intercept_rules
        INTERCEPT_RULES=1
        check "$v"
        intercept_rules --clean
        INTERCEPT_RULES=0
        # It went through both sidecars, over mutual TLS.
        "${APP[@]}" curl -sf "http://$icpt_app_ADMIN/metrics" | grep -q 'route="to-model-pod"' ||
            die "intercept: the app pod's sidecar did not route the request"
        "${MODEL[@]}" curl -sf "http://$icpt_model_ADMIN/metrics" |
            grep -q 'inbound_mtls_connections_total{caller="spiffe://cluster.local/ns/pods-app/sa/client"' ||
            die "intercept: the model pod's sidecar saw no mTLS connection from the app pod's"
    else
        check "$v"
    fi
done
{
    echo "date=$(date -u +%FT%TZ)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "h2load=$(h2load --version | head -1)"
    if has_variant nginx; then echo "nginx=$(nginx -v 2>&1 | sed 's/.*: //')"; fi
    echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/raw/machine.txt"
# What else runs on the machine (the busiest processes, for the notes).
others() {
    top -b -n 2 -d 1 -o %CPU | awk '/^top -/ {n++} n == 2 && $1 ~ /^[0-9]+$/ && k < 5 {
        printf "%s%s %s%%", (k++ ? ", " : ""), $12, $9 }'
}
echo "busiest_before=$(others)" >>"$OUT/raw/machine.txt"
START=$(date +%s)
for r in $(seq 1 "$REPS"); do
    for mode in rate max; do
        for v in $VARIANTS; do
            if [ "$mode" = rate ]; then what="$RATE req/s"; else what="saturation ($MAX_CONNS connections)"; fi
            log "rep $r/$REPS: $v at $what for ${SECS}s"
            if [ "$v" = intercept ]; then
                intercept_rules
                INTERCEPT_RULES=1
            fi
            measure "$v" "$mode" "$r"
            if [ "$v" = intercept ]; then
                intercept_rules --clean
                INTERCEPT_RULES=0
            fi
            for pid in ${PAIR[$v]:-}; do
                kill -0 "$pid" 2>/dev/null || die "a process of the $v pair exited (logs in $OUT)"
            done
        done
    done
done
{
    echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "busiest_after=$(others)"
    echo "elapsed_s=$(($(date +%s) - START))"
} >>"$OUT/raw/machine.txt"

# --- report --------------------------------------------------------------------------------
printf '%s\n' "${SKIPPED[@]}" >"$OUT/raw/skipped.txt"
# shellcheck disable=SC2086 # one argument per variant
python3 "$BENCH_LIB_DIR/bench_pods_report.py" "$OUT" "$REPS" "$RATE" "$MAX_CONNS" $VARIANTS
