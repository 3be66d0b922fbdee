#!/usr/bin/env bash
# checkov for the chart's Kubernetes checks (tests/deploy/test_chart_checkov.py), in
# its own virtual environment at .tools/checkov: it pins dozens of packages that
# must not meet the project's. Every package at the version in
# constraints-checkov.txt; reinstalled only when that file changes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/checkov"
PINS="$ROOT/constraints-checkov.txt"
STAMP="$DEST/.installed"
want="$(sha256sum "$PINS" | cut -d' ' -f1)"
if [ -x "$DEST/bin/checkov" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
echo "[install-checkov] installing checkov into $DEST" >&2
python3 -m venv "$DEST"
"$DEST/bin/python" -m pip install -q -r "$PINS" >&2
echo "$want" >"$STAMP"
