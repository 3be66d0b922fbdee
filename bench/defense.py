"""Defense benchmarks (issue 3): Multi-Krum at n=100, d=1,000,000.

Time is reported against one ``torch.mm`` of the stacked updates with their
transpose (goal: <= 2x); extra memory as the peak resident-set growth while
Multi-Krum runs, measured in a fresh subprocess after the input is allocated and
touched, as a fraction of the input's size (goal: <= 10%).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from bench.common import interleaved, report
from protogalaxy.defense.robust import multi_krum

N, D = 100, 1_000_000

_MEMORY_PROBE = """
import json, torch
from protogalaxy.defense.robust import multi_krum

def hwm_kib():  # peak RSS of this address space (ru_maxrss would inherit the parent's)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])

x = torch.randn(%d, %d, generator=torch.Generator().manual_seed(0))
torch.mm(x[:, :1000], x[:, :1000].T)  # warm up BLAS; no Multi-Krum before base
base = hwm_kib()
multi_krum(x, f=30)
print(json.dumps({"extra_kib": hwm_kib() - base, "input_kib": x.numel() * 4 // 1024}))
"""


def run(quick: bool = False) -> list[dict[str, Any]]:
    print("defense benchmarks")
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    f, s = interleaved(
        lambda: torch.mm(x, x.T), lambda: multi_krum(x, f=30), 3 if quick else 7
    )
    out = [
        report(
            "multi-krum n=100 d=1M (vs one torch.mm)",
            s / f,
            "<= 2.0",
            s / f <= 2.0,
            f"mm {f * 1e3:.0f} ms, multi-krum {s * 1e3:.0f} ms",
        )
    ]
    probe = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE % (N, D)],
        capture_output=True,
        text=True,
        check=True,
    )
    mem = json.loads(probe.stdout)
    frac = mem["extra_kib"] / mem["input_kib"]
    out.append(
        report(
            "multi-krum extra peak memory (vs input)",
            frac,
            "<= 0.10",
            frac <= 0.10,
            f"{mem['extra_kib'] / 1024:.1f} MiB over a "
            f"{mem['input_kib'] / 1024:.0f} MiB input",
        )
    )
    return out
