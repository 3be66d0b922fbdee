"""Timing helpers: interleaved best-of-N so floor and subject see the same machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved(
    floor: Callable[[], Any], subject: Callable[[], Any], repeats: int
) -> tuple[float, float]:
    """Best time of each over ``repeats`` alternating runs."""
    f = s = float("inf")
    for _ in range(repeats):
        f = min(f, best_of(floor, 1))
        s = min(s, best_of(subject, 1))
    return f, s


def report(name: str, ratio: float, goal: str, ok: bool, detail: str) -> dict[str, Any]:
    mark = "meets goal" if ok else "MISSES goal"
    print(f"{name:<44} {ratio:7.3f}  ({goal}; {mark})  {detail}")
    return {
        "name": name,
        "ratio": ratio,
        "goal": goal,
        "meets_goal": ok,
        "detail": detail,
    }
