#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need, and only what is
# missing, so it is cheap to run again:
#   - Debian packages: curl, nghttp2-client (h2load, for benchmarks), and
#     python3-venv when no Python at hand can make a venv;
#   - a Python venv at <repo>/.venv with the pinned packages of
#     tests/python/requirements.txt (openai, grpcio, grpcio-tools).
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
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
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
    try:
        if version(name.strip()) != pinned.strip():
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
import openai, grpc, grpc_tools  # noqa: E401,F401  (they import, not just exist)
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

log "ready: curl $(curl --version | head -n1 | cut -d' ' -f2), $("$VENV/bin/python" --version 2>&1) in .venv"
