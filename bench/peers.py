"""Robust aggregators against the fastest peer, paired in one process (issue 14).

Runs in the peers' own environment (``.tools/peers``, made by
``scripts/install-peers.sh``: ByzFL 0.0.11 beside the project's torch and numpy,
never installed into the project's environment). For coordinate median, trimmed
mean and geometric median at n=100, d=1M (float32 updates with a common component,
10 far outliers), it times ProtoGalaxy's rule and ByzFL's on numpy and on torch
inputs, interleaved, best of ``repeats``, each as a multiple of one ``torch.mm`` of
the stacked updates with their transpose (the Gram matrix, the floor every
distance-based rule pays), and checks exactness: the error against a float64
reference, relative to the updates' scale (median row norm / sqrt(d), one
coordinate's typical size). Goal: each rule no slower than the fastest peer, error
at most 1e-6 of the scale. ByzFL's geometric median runs its default 3 Weiszfeld
steps (not converged); ours runs to convergence and reports its iterations.

    ./dev bench peers            (installs the peers on first use)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".tools" / "peers" / "bin" / "python"


def _load_byzfl() -> Any:
    """ByzFL's aggregators module without its package __init__ (which imports
    torchvision and plotting libraries the comparison does not need)."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ByzFL is not installed: run scripts/install-peers.sh")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("byzfl", root), ("byzfl.utils", root / "utils")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    from byzfl.aggregators import aggregators

    return aggregators


def _best(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _measure(n: int, d: int, repeats: int) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from protogalaxy.defense.robust import (
        coordinate_median,
        geometric_median,
        trimmed_mean,
    )

    byz = _load_byzfl()
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(n, d, generator=g) + 0.05 * torch.randn(d, generator=g)
    x[:10] += torch.randn(10, d, generator=g)  # far outliers
    xn = x.numpy()
    xd = x.double()
    scale = float(xd.norm(dim=1).median()) / d**0.5
    f = 10

    def gram() -> Any:
        return torch.mm(x, x.T)

    # float64 references
    srt = xd.sort(dim=0).values
    refs = {
        "coordinate median": (srt[n // 2 - 1] + srt[n // 2]) / 2
        if n % 2 == 0
        else srt[n // 2],
        "trimmed mean": srt[f : n - f].mean(0),
    }
    del srt
    z = xd.median(dim=0).values
    for _ in range(300):  # plain float64 Weiszfeld, to convergence
        w = 1 / (xd - z).norm(dim=1).clamp(min=1e-12)
        z_new = (w[:, None] * xd).sum(0) / w.sum()
        moved = float((z_new - z).norm())
        z = z_new
        if moved <= 1e-12 * float(z.norm()):
            break
    refs["geometric median"] = z
    del xd

    cases = {
        "coordinate median": (
            lambda: coordinate_median(x).aggregate,
            {
                "ByzFL numpy": lambda: byz.Median()(xn),
                "ByzFL torch": lambda: byz.Median()(x),
            },
        ),
        "trimmed mean": (
            lambda: trimmed_mean(x, f=f).aggregate,
            {
                "ByzFL numpy": lambda: byz.TrMean(f=f)(xn),
                "ByzFL torch": lambda: byz.TrMean(f=f)(x),
            },
        ),
        "geometric median": (
            lambda: geometric_median(x),
            {
                "ByzFL numpy (3 steps)": lambda: byz.GeometricMedian()(xn),
                "ByzFL torch (3 steps)": lambda: byz.GeometricMedian()(x),
            },
        ),
    }
    rows = []
    for rule, (ours, peers) in cases.items():
        t_floor = t_ours = float("inf")
        t_peer = dict.fromkeys(peers, float("inf"))
        out_ours: Any = None
        peer_out: dict[str, Any] = {}
        for _ in range(repeats):  # interleaved: floor, ours, each peer
            t_floor = min(t_floor, _best(gram, 1)[0])
            t, out_ours = _best(ours, 1)
            t_ours = min(t_ours, t)
            for name, fn in peers.items():
                t, peer_out[name] = _best(fn, 1)
                t_peer[name] = min(t_peer[name], t)
        iterations = None
        if rule == "geometric median":
            iterations = out_ours.iterations
            out_ours = out_ours.aggregate
        ref = refs[rule]

        def err(v: Any, ref: Any = ref) -> float:
            t = torch.as_tensor(np.asarray(v)).double()
            return float((t - ref).abs().max()) / scale

        fastest = min(t_peer, key=t_peer.__getitem__)
        rows.append(
            {
                "rule": rule,
                "n": n,
                "d": d,
                "floor_seconds": t_floor,
                "ours_x_floor": t_ours / t_floor,
                "peers_x_floor": {k: v / t_floor for k, v in t_peer.items()},
                "fastest_peer": fastest,
                "ours_over_fastest": t_ours / t_peer[fastest],
                "error_ours": err(out_ours),
                "error_peers": {k: err(v) for k, v in peer_out.items()},
                "iterations": iterations,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench.common import report

    subprocess.run([str(ROOT / "scripts" / "install-peers.sh")], check=True)
    d = 200_000 if quick else 1_000_000
    proc = subprocess.run(
        [str(PEERS_PYTHON), "-m", "bench.peers", "100", str(d), "3" if quick else "5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"robust aggregators vs ByzFL 0.0.11, n=100, d={d} (x one torch.mm)")
    out = []
    for r in rows:
        peers = ", ".join(f"{k} {v:.2f}x" for k, v in r["peers_x_floor"].items())
        its = f", {r['iterations']} iterations" if r["iterations"] else ""
        out.append(
            report(
                f"{r['rule']} vs fastest peer",
                r["ours_over_fastest"],
                "<= 1.0, error <= 1e-6",
                r["ours_over_fastest"] <= 1.0 and r["error_ours"] <= 1e-6,
                f"ours {r['ours_x_floor']:.2f}x ({peers}); error {r['error_ours']:.1e} "
                f"of scale (peers {max(r['error_peers'].values()):.1e}){its}",
            )
        )
    out.append({"name": "peers detail", "detail": rows})
    return out


if __name__ == "__main__":
    n, d, repeats = (int(a) for a in sys.argv[1:4])
    print(json.dumps(_measure(n, d, repeats)))
