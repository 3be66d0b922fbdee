"""Order statistics along the rows of a stacked ``(n, d)`` tensor, fast.

The coordinate-wise rules and the layer-2 statistics need, per coordinate, the
k-th smallest of ``n`` values. A sort costs ``n log n`` per coordinate and a
strided ``torch.median(dim=0)`` walks memory across rows; selection
(``numpy.partition``, introselect, linear time) on a transposed, contiguous block
of columns does neither. On CPU the blocks are split over the threads torch uses
(numpy releases the GIL while it partitions); on CUDA ``torch.kthvalue`` does the
same work. The results are the selected *elements*, so they are identical
whichever algorithm, device or thread count found them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import torch

__all__ = ["for_blocks", "order_statistics"]

#: Columns per block: a transposed float32 block of 100 rows is 3 MiB.
_COLUMNS: Final = 8192
_pools: dict[int, ThreadPoolExecutor] = {}


def _executor() -> ThreadPoolExecutor | None:
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pg-select")
    return _pools[threads]


def for_blocks(work: Callable[[int], None], starts: range) -> None:
    """``work(start)`` for every block start, over the threads torch uses (the
    blocks must write disjoint outputs)."""
    pool = _executor() if len(starts) > 1 else None
    if pool is None:
        for s in starts:
            work(s)
    else:
        list(pool.map(work, starts))


def order_statistics(x: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """``out[j, c]``: the ``ks[j]``-th smallest (0-based) of column ``c`` of ``x``.

    ``x`` is ``(n, d)``; the result has ``x``'s dtype and device, shape
    ``(len(ks), d)``. NaNs are not supported (updates are finite by layer 1).
    """
    if x.dim() != 2:
        raise ValueError(f"need a (n, d) tensor, got shape {tuple(x.shape)}")
    n, d = x.shape
    kth = sorted(set(int(k) for k in ks))
    if not kth or kth[0] < 0 or kth[-1] >= n:
        raise ValueError(f"order statistics {list(ks)} out of range for {n} rows")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.stack([x.kthvalue(k + 1, dim=0).values for k in ks])
    src = x.detach().numpy()
    out = np.empty((len(ks), d), dtype=src.dtype)
    rows = [kth.index(int(k)) for k in ks]

    def work(start: int) -> None:
        block = np.ascontiguousarray(src[:, start : start + _COLUMNS].T)
        part = np.partition(block, kth, axis=1)
        out[:, start : start + _COLUMNS] = part[:, kth].T[rows]

    for_blocks(work, range(0, d, _COLUMNS))
    return torch.from_numpy(out)
