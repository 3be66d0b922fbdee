"""Run the benchmarks: ``python -m bench [NAME ...]``; results go to bench/results/."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

SUITES = ["crypto", "defense", "learning", "ingest", "up", "audit", "scale", "peers"]


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("suites", nargs="*", default=SUITES, choices=SUITES)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (smoke run)"
    )
    args = parser.parse_args()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    for name in args.suites:
        module = importlib.import_module(f"bench.{name}")
        results = module.run(quick=args.quick)
        meta = {"python": sys.version.split()[0], "machine": platform.machine()}
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
