#!/usr/bin/env bash
# Mutual TLS between sidecars: added latency of an outbound -> inbound proxy
# pair with mTLS vs the same pair in plaintext vs a pair of nginx proxies
# doing mutual TLS vs direct, at 1,000 requests/s (p50, p99, p99.9 and mean
# over every request, and the pair's CPU per request), the most requests/s
# each pair carries (saturation, a few connections, with its CPU per
# request), how many mTLS handshakes one infermesh inbound and the model-side
# nginx accept per second (with the server's CPU time per handshake), and
# whether a second connection resumes its TLS session.
#
#   scripts/bench-mtls.sh [--secs 10] [--reps 5] [--sat-conns 4] [--out DIR]
#
# Installs h2load (nghttp2-client), openssl and nginx (nginx-light) when
# missing, builds the release binaries, and writes DIR/results.json and a
# table on stdout. Targets run interleaved (direct, plain, mtls, nginx,
# direct, …); figures are medians over the repetitions with min–max. Each
# pair's two processes share CPU 1 (one worker thread or process each); the
# upstream and the load generator share CPU 0. Numbers come from a 2-core
# machine shared with other work: compare the ratios within one run.
#
# The nginx pair: an "app" nginx (plain HTTP in, proxy_pass to https with a
# client certificate signed by the mesh CA, the model nginx verified against
# the mesh CA, session reuse, a keep-alive upstream pool) -> a "model" nginx
# (TLS 1.3 only, client certificate required and verified against the mesh
# CA, keep-alive) -> the same upstream.
# The NAME_OUT, NAME_ADMIN and NAME_PID variables are set through printf -v.
# shellcheck disable=SC2154
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
REPS=5
SAT_CONNS=4
OUT="$ROOT/target/bench-mtls"
while [ $# -gt 0 ]; do
    case $1 in
        --secs) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --sat-conns) SAT_CONNS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--secs N] [--reps N] [--sat-conns N] [--out DIR]" >&2; exit 2 ;;
    esac
done
WARMUP=2

BENCH_TAG=bench-mtls
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
need h2load nghttp2-client
need openssl openssl
need python3 python3
need nginx nginx-light

log "building release binaries"
build_proxy_and release infermesh-control infermesh-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
rm -rf "$OUT"
mkdir -p "$OUT/raw" "$OUT/mesh/policies" "$OUT/plain"

if [ "$(nproc)" -ge 2 ]; then
    UP_CPU=0 PROXY_CPU=1 LOAD_CPU=0
else
    UP_CPU='' PROXY_CPU='' LOAD_CPU=''
fi
trap stop_pids EXIT

# --- upstream ----------------------------------------------------------------
start_upstream UP "$UP_CPU" "$OUT/upstream.out" 127.0.0.1:0 || die "the upstream did not start"
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
mesh_tokens "$OUT/mesh" models/server apps/client
start_control CP "$UP_CPU" "$OUT/control.out" "$OUT/mesh/policies" "$OUT/mesh/ca" "$OUT/mesh/tokens" 127.0.0.1:0 ||
    die "the control plane did not start"
mesh_args=(--control-plane "https://$CP" --trust-bundle "$OUT/mesh/ca/ca.crt")
proxy mtls_server "${mesh_args[@]}" --inbound "$MTLS_IN" --identity-token-file "$OUT/mesh/models-server.token" \
    --workload-namespace models --service-account server
proxy mtls_client "${mesh_args[@]}" --inbound 127.0.0.1:0 --identity-token-file "$OUT/mesh/apps-client.token" \
    --workload-namespace apps --service-account client
wait_ready "$mtls_server_ADMIN" || die "the mTLS server proxy is not ready"
wait_ready "$mtls_client_ADMIN" || die "the mTLS client proxy is not ready"
log "mTLS pair: client $mtls_client_OUT -> server $MTLS_IN (control plane $CP)"

# A client certificate for the handshake figure, signed by the mesh CA.
make_cert "$OUT/mesh/ca/ca.crt" "$OUT/mesh/ca/ca.key" "$OUT/mesh/probe" URI:spiffe://cluster.local/ns/bench/sa/probe

# --- the nginx mTLS pair -----------------------------------------------------------
# Certificates signed by the mesh CA the control plane made: the model side
# as a DNS name the app side checks, the app side with the client's SPIFFE
# ID (nginx checks the chain only).
N=$OUT/nginx
mkdir -p "$N"
NGINX_MODEL=127.0.0.1:$(free_port)
NGINX_APP=127.0.0.1:$(free_port)
make_cert "$OUT/mesh/ca/ca.crt" "$OUT/mesh/ca/ca.key" "$N/server" \
    "DNS:model.mtls.bench,URI:spiffe://cluster.local/ns/models/sa/server"
make_cert "$OUT/mesh/ca/ca.crt" "$OUT/mesh/ca/ca.key" "$N/client" URI:spiffe://cluster.local/ns/apps/sa/client
nginx_conf "$N/model" "$UP" "\
        listen $NGINX_MODEL ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate $N/server.crt;
        ssl_certificate_key $N/server.key;
        ssl_client_certificate $OUT/mesh/ca/ca.crt;
        ssl_verify_client on;" "\
            proxy_pass http://next_hop;"
nginx_conf "$N/app" "$NGINX_MODEL" "\
        listen $NGINX_APP;" "\
            proxy_pass https://next_hop;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $N/client.crt;
            proxy_ssl_certificate_key $N/client.key;
            proxy_ssl_trusted_certificate $OUT/mesh/ca/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name model.mtls.bench;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"
for side in model app; do
    spawn "$PROXY_CPU" nginx -p "$N/$side" -e "$N/$side/logs/error.log" -c "$N/$side/nginx.conf" \
        >"$OUT/nginx-$side.out" 2>&1 &
    PIDS+=("$!")
    printf -v "nginx_${side}_PID" '%s' "$!"
done
for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$NGINX_APP/" && break
    sleep 0.05
done
nginx_pair_alive "$OUT" "$N"
# The model side refuses a client without a certificate (nginx answers 400).
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$OUT/mesh/ca/ca.crt" \
    --resolve "model.mtls.bench:${NGINX_MODEL##*:}:127.0.0.1" "https://model.mtls.bench:${NGINX_MODEL##*:}/" || true)
[ "$code" = 400 ] || die "the model nginx answered $code to a client without a certificate, not 400"
log "nginx mTLS pair: app $NGINX_APP -> model $NGINX_MODEL"

# --- load ----------------------------------------------------------------------
bench_body "$OUT/body.json"
TARGETS=(direct plain mtls nginx)
PAIRS=(plain mtls nginx)
declare -A URL=([direct]="$UP" [plain]="$plain_client_OUT" [mtls]="$mtls_client_OUT" [nginx]="$NGINX_APP")
declare -A PAIR=([direct]="" [plain]="$plain_client_PID $plain_server_PID"
    [mtls]="$mtls_client_PID $mtls_server_PID" [nginx]="$nginx_app_PID $nginx_model_PID")
# The handshake targets: the infermesh inbound and the model-side nginx.
declare -A HS_ADDR=([mtls]="$MTLS_IN" [nginx]="$NGINX_MODEL")
declare -A HS_PID=([mtls]="$mtls_server_PID" [nginx]="$nginx_model_PID")
for t in "${TARGETS[@]}"; do
    curl -sf -o /dev/null -H 'content-type: application/json' --data @"$OUT/body.json" \
        "http://${URL[$t]}$BENCH_PATH" || die "$t does not answer"
done
pair_ticks() { # pair_ticks TARGET: the pair's CPU ticks (0 for direct)
    # shellcheck disable=SC2086
    if [ -n "${PAIR[$1]}" ]; then cpu_ticks ${PAIR[$1]}; else echo 0; fi
}
# measure TARGET MODE REP: a warm-up run, then the measured run with the
# pair's CPU ticks read around it. MODE rate: 10 connections at 1,000 req/s
# in all, every request logged; MODE max: SAT_CONNS connections, no limit.
measure() {
    local t=$1 mode=$2 r=$3 f="$OUT/raw/$2.$1.$3" args before after logf
    if [ "$mode" = rate ]; then
        args=(-c 10 --rps 100)
        logf=$f.log
    else
        args=(-c "$SAT_CONNS")
        logf=/dev/null
    fi
    h1_load "$LOAD_CPU" "$OUT/body.json" /dev/null "http://${URL[$t]}$BENCH_PATH" "${args[@]}" -D "$WARMUP" \
        >/dev/null 2>&1 || true
    before=$(pair_ticks "$t")
    h1_load "$LOAD_CPU" "$OUT/body.json" "$logf" "http://${URL[$t]}$BENCH_PATH" "${args[@]}" -D "$SECS" \
        >"$f.out" 2>&1 || echo "exit=$?" >>"$f.out"
    after=$(pair_ticks "$t")
    echo "pair_cpu_ticks=$((after - before)) clk_tck=$(getconf CLK_TCK)" >>"$f.out"
    echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$f.out"
}
# handshakes TARGET REP: openssl s_time -new (full handshakes, one client,
# the probe certificate) for SECS; the server's CPU ticks around it.
handshakes() {
    local t=$1 r=$2 f="$OUT/raw/hs.$1.$2.out" before after started ended
    before=$(cpu_ticks "${HS_PID[$t]}")
    # s_time's "N connections in X.XXs" line divides by the client's own
    # CPU time, not the elapsed time: the rate is taken over the wall clock
    # measured here instead.
    started=$(date +%s.%N)
    on "$LOAD_CPU" openssl s_time -connect "${HS_ADDR[$t]}" -new -time "$SECS" \
        -cert "$OUT/mesh/probe.crt" -key "$OUT/mesh/probe.key" >"$f" 2>&1 || true
    ended=$(date +%s.%N)
    after=$(cpu_ticks "${HS_PID[$t]}")
    echo "server_cpu_ticks=$((after - before)) clk_tck=$(getconf CLK_TCK)" >>"$f"
    echo "wall_seconds=$(python3 -c "print($ended - $started)")" >>"$f"
}
{
    echo "date=$(date -u +%FT%TZ)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "nproc=$(nproc)"
    echo "h2load=$(h2load --version | head -1)"
    echo "nginx=$(nginx -v 2>&1 | sed 's/.*: //')"
    echo "openssl=$(openssl version)"
    echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/raw/machine.txt"
cp "$N/model/nginx.conf" "$OUT/nginx-model.conf"
cp "$N/app/nginx.conf" "$OUT/nginx-app.conf"
for r in $(seq 1 "$REPS"); do
    for t in "${TARGETS[@]}"; do
        log "rep $r/$REPS: $t at 1,000 req/s for ${SECS}s"
        measure "$t" rate "$r"
    done
    for t in "${PAIRS[@]}"; do
        log "rep $r/$REPS: $t at saturation ($SAT_CONNS connections) for ${SECS}s"
        measure "$t" max "$r"
    done
    for t in mtls nginx; do
        log "rep $r/$REPS: $t mTLS handshakes for ${SECS}s"
        handshakes "$t" "$r"
    done
done
echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/raw/machine.txt"

# --- session resumption ------------------------------------------------------------
# resumes TARGET: a first connection with the probe certificate saves its
# session (stdin stays open a moment so the tickets sent after the handshake
# arrive), a second one offers it; prints "Reused" or "New".
resumes() {
    local addr=${HS_ADDR[$1]} sess="$OUT/raw/sess.$1"
    (sleep 0.5) | openssl s_client -connect "$addr" -cert "$OUT/mesh/probe.crt" -key "$OUT/mesh/probe.key" \
        -sess_out "$sess" >"$OUT/raw/resume.$1.first" 2>&1 || true
    (sleep 0.5) | openssl s_client -connect "$addr" -cert "$OUT/mesh/probe.crt" -key "$OUT/mesh/probe.key" \
        -sess_in "$sess" >"$OUT/raw/resume.$1.second" 2>&1 || true
    grep -m1 -o '^\(Reused\|New\)' "$OUT/raw/resume.$1.second" || echo none
}
PROBE_ID=spiffe://cluster.local/ns/bench/sa/probe
probe_conns() { # the infermesh inbound's mTLS connections from the probe
    curl -sf "http://$mtls_server_ADMIN/metrics" |
        sed -n "s|^infermesh_inbound_mtls_connections_total{caller=\"$PROBE_ID\"} \([0-9]*\).*|\1|p" | head -1
}
probe_before=$(probe_conns)
resumed_mtls=$(resumes mtls)
probe_after=$(probe_conns)
resumed_nginx=$(resumes nginx)
# Between the two sidecars: more concurrent requests than the outbound
# proxy has pooled connections make it open new ones to the inbound; a
# capture on loopback reads each ServerHello (sent in the clear in TLS 1.3)
# for the pre_shared_key extension, present when the server resumed.
pair_hellos=unmeasured
if command -v tcpdump >/dev/null 2>&1; then
    tcpdump -i lo -w "$OUT/raw/pair.pcap" -s 512 "tcp port ${MTLS_IN##*:}" >"$OUT/raw/tcpdump.out" 2>&1 &
    TCPDUMP=$!
    PIDS+=("$TCPDUMP")
    sleep 1
    h1_load "$LOAD_CPU" "$OUT/body.json" /dev/null "http://$mtls_client_OUT$BENCH_PATH" -c 64 -n 6400 \
        >"$OUT/raw/pair-resume.out" 2>&1 || true
    sleep 1
    kill -INT "$TCPDUMP" 2>/dev/null || true
    wait "$TCPDUMP" 2>/dev/null || true
    pair_hellos=$(python3 - "$OUT/raw/pair.pcap" "${MTLS_IN##*:}" <<'PY'
import struct, sys
data, port = open(sys.argv[1], "rb").read(), int(sys.argv[2])
link = struct.unpack("<I", data[20:24])[0]
off, full, resumed, offered = 24, 0, 0, 0
while off + 16 <= len(data):
    incl = struct.unpack("<I", data[off + 8:off + 12])[0]
    pkt = data[off + 16:off + 16 + incl]
    off += 16 + incl
    pkt = pkt[14:] if link == 1 else pkt[16:] if link == 113 else pkt[4:]  # Ethernet, Linux cooked, loopback
    if not pkt or pkt[0] >> 4 != 4:
        continue
    ip = (pkt[0] & 15) * 4
    sport, dport = struct.unpack(">HH", pkt[ip:ip + 4])
    tls = pkt[ip + (pkt[ip + 12] >> 4) * 4:]
    if len(tls) < 6 or tls[0] != 0x16 or tls[5] not in (1, 2):
        continue
    hs, b = tls[5], tls[9:]
    try:
        i = 2 + 32
        i += 1 + b[i]
        if hs == 1:
            i += 2 + struct.unpack(">H", b[i:i + 2])[0]
            i += 1 + b[i]
        else:
            i += 3
        end = i + 2 + struct.unpack(">H", b[i:i + 2])[0]
        i += 2
        exts = []
        while i + 4 <= end:
            kind, n = struct.unpack(">HH", b[i:i + 4])
            exts.append(kind)
            i += 4 + n
    except (IndexError, struct.error):
        continue
    if hs == 1 and dport == port and 41 in exts:
        offered += 1
    if hs == 2 and sport == port:
        if 41 in exts:
            resumed += 1
        else:
            full += 1
print(f"full={full} resumed={resumed} offered={offered}")
PY
)
fi
{
    echo "mtls=$resumed_mtls"
    echo "nginx=$resumed_nginx"
    echo "pair_handshakes=$pair_hellos"
    # Both connections counted under the probe's SPIFFE ID: the resumed
    # one carried the caller's identity too.
    echo "mtls_probe_connections=$(( ${probe_after:-0} - ${probe_before:-0} ))"
} >"$OUT/raw/resumption.txt"

# --- report ------------------------------------------------------------------------
python3 - "$OUT" "$REPS" "$SAT_CONNS" <<'PY'
import json, re, statistics, sys, os
out, reps, sat_conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
TARGETS = ("direct", "plain", "mtls", "nginx")
PAIRS = ("plain", "mtls", "nginx")
NAMES = {"direct": "direct", "plain": "plaintext pair", "mtls": "mTLS pair", "nginx": "nginx mTLS pair"}

def ticks(text):
    c = re.search(r"pair_cpu_ticks=(\d+) clk_tck=(\d+)", text)
    return int(c.group(1)) / int(c.group(2)) if c else None

def rate(t, r):
    path = f"{out}/raw/rate.{t}.{r}.log"
    if not os.path.exists(path):
        return None
    rows = [l.split() for l in open(path) if l.strip()]
    us = sorted(int(x[2]) for x in rows if x[1] == "200")
    if not us:
        return None
    q = lambda p: us[min(len(us) - 1, int(p * len(us)))] / 1000.0
    cpu = ticks(open(f"{out}/raw/rate.{t}.{r}.out").read())
    return {"n": len(rows), "ok": len(us), "p50": q(0.50), "p99": q(0.99), "p999": q(0.999),
            "mean": sum(us) / len(us) / 1000.0,
            "cpu_us_per_request": cpu * 1e6 / len(rows) if cpu is not None and t != "direct" else None}

def sat(t, r):
    path = f"{out}/raw/max.{t}.{r}.out"
    if not os.path.exists(path):
        return None
    text = open(path).read()
    f = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
    n = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text)
    if not (f and n):
        return None
    ok = int(n.group(1))
    cpu = ticks(text)
    return {"succeeded": ok, "req_per_s": float(f.group(2)),
            "cpu_us_per_request": cpu * 1e6 / ok if cpu is not None and ok else None}

def hs(t, r):
    path = f"{out}/raw/hs.{t}.{r}.out"
    if not os.path.exists(path):
        return None
    text = open(path).read()
    # The count from s_time; the time from the wall clock (s_time's own
    # "in X.XXs" is its CPU time).
    m = re.search(r"(\d+) connections in [\d.]+s", text)
    w = re.search(r"wall_seconds=([\d.]+)", text)
    c = re.search(r"server_cpu_ticks=(\d+) clk_tck=(\d+)", text)
    if not (m and w):
        return None
    conns, secs = int(m.group(1)), float(w.group(1))
    cpu = int(c.group(1)) / int(c.group(2)) if c else 0.0
    return {"connections": conns, "seconds": secs, "per_second": conns / secs,
            "server_cpu_us_per_handshake": cpu * 1e6 / conns if conns else None}

res = {"rate_1000": {t: [rate(t, r) for r in range(1, reps + 1)] for t in TARGETS},
       "saturation": {t: [sat(t, r) for r in range(1, reps + 1)] for t in PAIRS},
       "handshakes": {t: [hs(t, r) for r in range(1, reps + 1)] for t in ("mtls", "nginx")},
       "saturation_connections": sat_conns}
rpath = f"{out}/raw/resumption.txt"
if os.path.exists(rpath):
    res["resumption"] = dict(l.strip().split("=", 1) for l in open(rpath) if "=" in l)
json.dump(res, open(f"{out}/results.json", "w"), indent=2)

def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else (float("nan"),) * 3
def col(group, t, k):
    return med([x[k] if x else None for x in res[group][t]])
def cell(m):
    return f"{m[0]:.3f} ({m[1]:.3f}-{m[2]:.3f})"

print(f"\nAt 1,000 req/s (HTTP/1.1 JSON POST, 10 connections): latency ms and the pair's CPU us per request;"
      f" median of {reps} (min-max)")
print(f"{'target':<16} {'p50':>21} {'p99':>21} {'p99.9':>21} {'mean':>21} {'CPU us/req':>21}")
base = {}
for t in TARGETS:
    row = []
    for k in ("p50", "p99", "p999", "mean"):
        m = col("rate_1000", t, k)
        base.setdefault(k, {})[t] = m[0]
        row.append(cell(m))
    c = col("rate_1000", t, "cpu_us_per_request")
    base.setdefault("cpu", {})[t] = c[0]
    row.append("-" if t == "direct" else f"{c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f})")
    print(f"{NAMES[t]:<16} " + " ".join(f"{x:>21}" for x in row))
print("\nAdded by the pair over direct, ms (medians):")
added = {}
for t in PAIRS:
    added[t] = {k: base[k][t] - base[k]["direct"] for k in ("p50", "p99", "p999", "mean")}
    a = added[t]
    print(f"  {NAMES[t]:<16} p50 +{a['p50']:.3f}  p99 +{a['p99']:.3f}  p99.9 +{a['p999']:.3f}  mean +{a['mean']:.3f}")
print(f"  mTLS over plaintext: p50 +{base['p50']['mtls'] - base['p50']['plain']:.3f}"
      f"  p99 +{base['p99']['mtls'] - base['p99']['plain']:.3f}  mean +{base['mean']['mtls'] - base['mean']['plain']:.3f}")

print(f"\nSaturation ({sat_conns} connections, no rate limit): req/s and the pair's CPU us per request; median (min-max)")
sbase = {}
for t in PAIRS:
    q = col("saturation", t, "req_per_s")
    c = col("saturation", t, "cpu_us_per_request")
    sbase[t] = (q[0], c[0])
    print(f"  {NAMES[t]:<16} {q[0]:9.0f} req/s ({q[1]:.0f}-{q[2]:.0f})  {c[0]:6.1f} us/req ({c[1]:.1f}-{c[2]:.1f})")

print("\nmTLS handshakes (openssl s_time -new, one client, probe certificate): per second over the wall clock,"
      " server CPU us per handshake; median (min-max)")
hbase = {}
for t in ("mtls", "nginx"):
    p = col("handshakes", t, "per_second")
    c = col("handshakes", t, "server_cpu_us_per_handshake")
    hbase[t] = (p[0], c[0])
    who = "infermesh inbound" if t == "mtls" else "model nginx"
    print(f"  {who:<18} {p[0]:6.0f}/s ({p[1]:.0f}-{p[2]:.0f})  {c[0]:6.0f} us ({c[1]:.0f}-{c[2]:.0f})")

def ratio(a, b):
    return a / b if b else float("nan")
print("\nRatios, infermesh mTLS pair / nginx mTLS pair (medians; below 1 favours infermesh):")
for k, name in (("p50", "added p50"), ("p99", "added p99"), ("mean", "added mean")):
    print(f"  {name:<28} {ratio(added['mtls'][k], added['nginx'][k]):.2f}x"
          f"  (+{added['mtls'][k]:.3f} vs +{added['nginx'][k]:.3f} ms)")
print(f"  {'CPU per request, 1,000 req/s':<28} {ratio(base['cpu']['mtls'], base['cpu']['nginx']):.2f}x"
      f"  ({base['cpu']['mtls']:.1f} vs {base['cpu']['nginx']:.1f} us)")
print(f"  {'max req/s':<28} {ratio(sbase['mtls'][0], sbase['nginx'][0]):.2f}x")
print(f"  {'CPU per request, saturation':<28} {ratio(sbase['mtls'][1], sbase['nginx'][1]):.2f}x"
      f"  ({sbase['mtls'][1]:.1f} vs {sbase['nginx'][1]:.1f} us)")
print(f"  {'handshake CPU':<28} {ratio(hbase['mtls'][1], hbase['nginx'][1]):.2f}x"
      f"  ({hbase['mtls'][1]:.0f} vs {hbase['nginx'][1]:.0f} us)")
print(f"  {'handshakes/s':<28} {ratio(hbase['mtls'][0], hbase['nginx'][0]):.2f}x")
if "resumption" in res:
    r = res["resumption"]
    print(f"\nSession resumption (openssl s_client -sess_out, then -sess_in): infermesh inbound {r.get('mtls')},"
          f" model nginx {r.get('nginx')}; the inbound counted {r.get('mtls_probe_connections')} connections"
          f" under the probe's SPIFFE ID")
    print(f"Between the sidecars (new mesh connections under 64 concurrent requests; ServerHellos on loopback):"
          f" {r.get('pair_handshakes')} (offered = ClientHellos carrying a session)")
PY
