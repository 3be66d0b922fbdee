"""Bit-reproducible aggregation: the same bytes on any machine, thread count, CPU or
CUDA, whatever order the updates arrived in.

A floating-point sum in an *unspecified* order (a BLAS product, ``torch.sum``)
depends on the thread count, the vector width and the device. A sum in a *specified*
order does not: IEEE 754 defines every single addition, so a fixed sequence of them
gives the same bits everywhere. Every mean an aggregate is made of is therefore
taken like this (``exact_weighted_mean``):

1. the rows are taken in the canonical order of the parties they come from (a
   galaxy sorts its clients' updates by client id, the global aggregator its
   galaxies by galaxy id; a replay does the same), rows of weight 0 skipped;
2. per coordinate, a float64 accumulator adds ``w_i * x_i`` row after row. Each
   product is exact (an integer weight below ``2^29`` times a float32's 24-bit
   significand fits in float64's 53 bits), so a fused multiply-add and a separate
   multiply and add give the same result; each addition is one correctly rounded
   IEEE binary64 operation, element-wise, so neither the number of threads (they
   split the coordinates, never a coordinate's additions) nor SIMD width nor the
   device changes it;
3. the sum is divided by ``W = sum_i w_i`` in float64 and rounded once to float32.

The error against the exact weighted mean is at most ``(n - 1) * 2^-53 *
sum_i w_i |x_i| / W`` from the additions (float64's rounding, far below float32's),
plus ``2^-53`` relative from the division and one float32 rounding of the result:
what any float32 result has (tests/defense/test_exact.py checks the bound).

Integer weights come from the rules: Multi-Krum's 0/1 selection, reputations and
Weiszfeld's weights quantized as ``round(w * 2^20)`` (``quantize_weights``), and
galaxies' update counts; the transcript publishes them.

Coordinate-wise rules need no order at all: a median is an element (or the float64
mean of the two middle ones, rounded once), a trimmed mean adds the sorted middle
in sorted order. ``-0.0`` never comes out of a median's tie order: zeros are
``+0.0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import torch

from protogalaxy.defense.select import for_blocks, order_statistics

__all__ = [
    "MAX_WEIGHT",
    "WEIGHT_SCALE",
    "exact_median",
    "exact_trimmed_mean",
    "exact_weighted_mean",
    "quantize_weights",
]

#: Real-valued weights (reputations, Weiszfeld weights) become integers
#: ``round(w * 2^20)`` before they weigh anything, so they are exact too.
WEIGHT_SCALE: Final = 1 << 20
#: Integer weights must stay below this for every product ``w * x`` to be exact.
MAX_WEIGHT: Final = 1 << 29
#: Columns summed at a time: a float64 accumulator of 512 KiB stays in cache.
_BLOCK: Final = 1 << 16
#: Columns sorted at a time (median, trimmed mean).
_SORT_BLOCK: Final = 4096


def _check(updates: torch.Tensor) -> torch.Tensor:
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        raise ValueError("updates must be a (n, d) tensor")
    if updates.dtype != torch.float32:
        raise TypeError(f"exact aggregation takes float32, got {updates.dtype}")
    return updates


def quantize_weights(weights: torch.Tensor | Sequence[float]) -> list[int]:
    """Non-negative real weights as integers ``round(w * 2^20)`` (half to even),
    scaled down first when the largest would reach :data:`MAX_WEIGHT`."""
    w = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite and non-negative")
    q = torch.round(w * WEIGHT_SCALE)
    top = float(q.max()) if q.numel() else 0.0
    if top >= MAX_WEIGHT:
        q = torch.round(w * (WEIGHT_SCALE * (MAX_WEIGHT - 1) / top))
        q = q.clamp(max=MAX_WEIGHT - 1)
    return [int(v) for v in q.to(torch.int64).tolist()]


def _accumulate(
    x: torch.Tensor,
    rows: Sequence[int],
    weights: Sequence[int],
    out: torch.Tensor,
    null_weight: int = 0,
) -> None:
    """``out[j] = float32(sum_i w_i x[rows_i, j] / (sum_i w_i + null_weight))``,
    added in the given row order in float64, block by block of columns."""
    d = x.shape[1]
    total = float(sum(weights) + null_weight)
    acc = torch.empty(min(_BLOCK, d), dtype=torch.float64, device=x.device)
    for start in range(0, d, _BLOCK):
        stop = min(start + _BLOCK, d)
        a = acc[: stop - start]
        a.zero_()
        for i, w in zip(rows, weights, strict=True):
            if w == 1:
                a.add_(x[i, start:stop])
            else:  # w * x is exact in float64: fused or not, the same sum
                a.add_(x[i, start:stop], alpha=w)
        out[start:stop] = a.div_(total)
    out.add_(0.0)  # -0.0 -> +0.0: a zero's sign never depends on the rows


def exact_weighted_mean(
    updates: torch.Tensor,
    weights: Sequence[int] | None = None,
    *,
    null_weight: int = 0,
) -> torch.Tensor:
    """``sum_i w_i x_i / (sum_i w_i + null_weight)`` over the rows of ``updates``
    (float32), with integer weights (default: all 1), added row after row in the
    given order in float64: bit-identical on every machine and thread count for
    that order. ``null_weight`` weighs a zero update (it only adds to the divisor):
    how FLTrust's aggregate gets its norm."""
    x = _check(updates)
    n, d = x.shape
    w = [1] * n if weights is None else [int(v) for v in weights]
    if len(w) != n or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"need {n} non-negative integer weights with a positive sum")
    if max([*w, null_weight]) >= MAX_WEIGHT or null_weight < 0:
        raise ValueError(f"integer weights must be in [0, 2^29), got {max(w)}")
    rows = [i for i, v in enumerate(w) if v > 0]
    out = torch.empty(d, dtype=torch.float32, device=x.device)
    _accumulate(x, rows, [w[i] for i in rows], out, null_weight)
    return out


def exact_median(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median: the middle value for odd ``n``, the float64 mean of
    the two middle values rounded once to float32 for even ``n``."""
    x = _check(updates)
    n = x.shape[0]
    if n % 2:
        mid = order_statistics(x, [n // 2])[0]
    else:
        lo, hi = order_statistics(x, [n // 2 - 1, n // 2]).double()
        mid = ((lo + hi) / 2).float()
    return (mid + 0.0).to(x.device)  # -0.0 -> +0.0


def exact_trimmed_mean(updates: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinate-wise mean of the values left after dropping the ``k`` largest and
    ``k`` smallest, added in sorted order in float64 (so in an order the values
    themselves fix) and rounded once."""
    x = _check(updates)
    n, d = x.shape
    if not 0 <= 2 * k < n:
        raise ValueError(f"trimmed mean cannot drop 2*{k} of {n} values")
    keep = n - 2 * k
    if x.device.type != "cpu":
        out = torch.empty(d, dtype=torch.float32, device=x.device)
        for start in range(0, d, _SORT_BLOCK):
            middle = x[:, start : start + _SORT_BLOCK].sort(dim=0).values[k : n - k]
            acc = middle[0].double()
            for i in range(1, keep):
                acc.add_(middle[i])
            out[start : start + _SORT_BLOCK] = acc.div_(keep)
        return out.add_(0.0)
    src = x.detach().numpy()
    result = np.empty(d, dtype=np.float32)

    def work(start: int) -> None:
        block = np.sort(np.ascontiguousarray(src[:, start : start + _SORT_BLOCK].T))
        middle = np.ascontiguousarray(block[:, k : n - k].T)  # (keep, columns)
        acc = middle[0].astype(np.float64)
        for i in range(1, keep):
            acc += middle[i]  # one IEEE binary64 addition per element, in order
        result[start : start + _SORT_BLOCK] = acc / keep

    for_blocks(work, range(0, d, _SORT_BLOCK))
    return torch.from_numpy(result).add_(0.0)
