#!/usr/bin/env python3
"""Write the values table of charts/README.md from the ``# --`` comments of
charts/values.yaml (between the BEGIN/END markers). ``--check`` fails instead when
the README is out of date or a value has no comment."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts"
BEGIN, END = "<!-- BEGIN VALUES -->", "<!-- END VALUES -->"


def documented_keys(text: str) -> dict[str, str]:
    """Dotted key -> its ``# --`` comment, for every key that has one."""
    docs: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-]+):", line)
        if not m or stripped.startswith("-"):
            continue
        indent = len(m.group(1))
        path = [(i, k) for i, k in path if i < indent] + [(indent, m.group(2))]
        if pending:
            docs[".".join(k for _, k in path)] = " ".join(pending)
            pending = []
    return docs


def leaves(values: object, schema: dict, prefix: str = "") -> list[str]:
    props = schema.get("properties")
    if isinstance(values, dict) and values and props:
        out: list[str] = []
        for k, v in values.items():
            out += leaves(v, props[k], f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")]


def table() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    docs = documented_keys(text)
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    missing = []
    for key in leaves(values, schema):
        node = values
        for part in key.split("."):
            node = node[part]
        if key not in docs:
            missing.append(key)
            continue
        default = json.dumps(node).replace("|", "\\|")
        rows.append(f"| `{key}` | `{default}` | {docs[key]} |")
    if missing:
        sys.exit(f"values without a '# --' comment: {', '.join(missing)}")
    return "\n".join(rows)


def main() -> int:
    readme = CHART / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("charts/README.md is out of date: run scripts/chart-readme.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
