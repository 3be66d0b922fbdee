"""Layer 3: Byzantine-robust aggregation rules, as plain functions over a stacked
``(n, d)`` tensor of updates, on CPU or GPU.

* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning
  with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. The score of
  update ``i`` is the sum of squared distances to its ``n - f - 2`` nearest
  neighbours; Multi-Krum averages the ``m`` lowest-scoring updates.
* Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran, Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML 2018.
* Geometric median by Weiszfeld's algorithm, smoothed: Pillutla, Kakade, Harchaoui,
  "Robust Aggregation for Federated Learning", IEEE TSP 2022.

Pairwise distances come from one Gram matrix of the *centred* updates.
``|a|^2 + |b|^2 - 2 a.b`` in float32 cancels catastrophically when the updates share
a large common component (the distances are tiny against the norms), so the mean is
subtracted first: distances do not change under translation. The centring is done
column block by column block into a small buffer, so Multi-Krum allocates only the
mean, one block and the ``n x n`` Gram on top of its input.

The aggregate itself is bit-reproducible for float32 updates (what the protocol
aggregates): every rule that averages rows reports the integer weight it gave each
row (``AggregationResult.weights``: 0 or 1 for a selection, quantized reputations or
Weiszfeld weights) and the mean adds the rows in their given (canonical) order in
float64 (:mod:`protogalaxy.defense.exact`); median and trimmed mean need no order.
A choice that float kernels can flip on a near tie (Multi-Krum's scores) is then the
only thing an auditor must check within a tolerance.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar, Final

import torch

from protogalaxy.defense.exact import (
    MAX_WEIGHT,
    WEIGHT_SCALE,
    exact_median,
    exact_trimmed_mean,
    exact_weighted_mean,
    quantize_weights,
)
from protogalaxy.plugins import resolve

__all__ = [
    "AggregationResult",
    "Aggregator",
    "available_aggregators",
    "bulyan",
    "centered_clipping",
    "coordinate_median",
    "fltrust",
    "geometric_median",
    "get_aggregator",
    "krum_scores",
    "multi_krum",
    "pairwise_sq_distances",
    "register_aggregator",
    "resolve_aggregator",
    "share_of",
    "trimmed_mean",
    "weighted_mean",
]

#: Column block for centring and chunked coordinate-wise rules: 64k floats per row.
BLOCK: Final = 1 << 16


def _check_updates(updates: torch.Tensor) -> torch.Tensor:
    if not isinstance(updates, torch.Tensor):
        raise TypeError(f"updates must be a torch.Tensor, got {type(updates).__name__}")
    if updates.dim() != 2 or updates.shape[0] < 1:
        raise ValueError(
            f"updates must have shape (n, d) with n >= 1, got {tuple(updates.shape)}"
        )
    if not updates.is_floating_point():
        raise TypeError(f"updates must be floating point, got {updates.dtype}")
    return updates


def _centred_gram(
    x: torch.Tensor, block: int = BLOCK, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, mean)``: the Gram matrix of the rows less ``mean``, the mean of at most
    8 evenly spaced rows (any centre inside the cloud keeps the products small
    where rows are close), accumulated block by block of columns into a small
    buffer, in ``dtype`` (default: the rows' own)."""
    n, d = x.shape
    dtype = dtype or x.dtype
    mean = x[:: max(1, n // 8)][:8].to(dtype).mean(dim=0)
    gram = torch.zeros(n, n, dtype=dtype, device=x.device)
    buf = torch.empty(n, min(block, d), dtype=dtype, device=x.device)
    for start in range(0, d, block):
        stop = min(start + block, d)
        b = buf[:, : stop - start]
        torch.sub(x[:, start:stop], mean[start:stop], out=b)
        gram.addmm_(b, b.T)
    return gram, mean


def pairwise_sq_distances(updates: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``updates``, ``(n, n)``.

    Computed as ``diag(G) + diag(G)^T - 2 G`` from the Gram matrix ``G`` of the
    centred rows (:func:`_centred_gram`); clamped at zero, exact zero diagonal.
    Centring keeps the products small where rows are close (no cancellation);
    distances do not depend on the centre.
    """
    x = _check_updates(updates)
    gram, _ = _centred_gram(x, block)
    sq = gram.diagonal().clone()
    dist = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * gram
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of every row: the sum of its ``n - f - 2`` smallest distances to
    the other rows (Blanchard et al. 2017)."""
    n = dist.shape[0]
    k = n - f - 2
    if k < 1:
        raise ValueError(f"Krum needs n > f + 2 (n={n}, f={f})")
    others = dist + torch.diag(
        torch.full((n,), math.inf, dtype=dist.dtype, device=dist.device)
    )
    return others.topk(k, dim=1, largest=False).values.sum(dim=1)


@dataclass(frozen=True)
class AggregationResult:
    """The aggregate and, for selection rules, which rows were selected.

    ``weights``: for rules that average rows, the integer weight each row got (the
    aggregate is their exact weighted mean); None for coordinate-wise rules.
    """

    aggregate: torch.Tensor
    selected: torch.Tensor | None = None  # bool mask over rows, or None
    scores: torch.Tensor | None = None
    weights: tuple[int, ...] | None = None
    #: iterations an iterative rule (geometric median) ran to converge
    iterations: int | None = None
    #: FLTrust's trust score of each row (cosine with the server update, >= 0)
    trust: torch.Tensor | None = None
    #: the weight of a zero update in the mean (FLTrust: it sets the norm)
    null_weight: int | None = None


def _weighted_sum(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights.to(updates.dtype).unsqueeze(0) @ updates).squeeze(0)


def weighted_mean(
    updates: torch.Tensor, weights: list[int], *, null_weight: int = 0
) -> torch.Tensor:
    """The mean of the rows with integer ``weights`` (and a zero row of weight
    ``null_weight``): exact and reproducible for float32 (added in row order in
    float64), a plain product for other float dtypes."""
    if updates.dtype == torch.float32:
        return exact_weighted_mean(updates, weights, null_weight=null_weight)
    w = torch.tensor(weights, dtype=updates.dtype, device=updates.device)
    return _weighted_sum(updates, w / (w.sum() + null_weight))


def multi_krum(
    updates: torch.Tensor,
    *,
    f: int,
    m: int | None = None,
    weights: torch.Tensor | None = None,
) -> AggregationResult:
    """Multi-Krum: average the ``m`` (default ``n - f``) updates of lowest Krum score.

    ``weights`` (e.g. reputations) turn the plain average of the selected updates
    into a weighted one.
    """
    x = _check_updates(updates)
    n = x.shape[0]
    if not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be a non-negative int, got {f!r}")
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, n={n}], got {m}")
    if n <= f + 2:
        raise ValueError(f"Multi-Krum needs n > f + 2 updates (n={n}, f={f})")
    scores = krum_scores(pairwise_sq_distances(x), f)
    # Stable order: ties broken by index, so the selection is deterministic.
    order = torch.sort(scores, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[order[:m]] = True
    chosen = [int(v) for v in mask.tolist()]
    w = chosen
    if weights is not None:
        trust = quantize_weights(weights.clamp(min=0))
        w = [c * t for c, t in zip(chosen, trust, strict=True)]
        if sum(w) <= 0:
            w = chosen
    return AggregationResult(weighted_mean(x, w), mask, scores, tuple(w))


def krum(updates: torch.Tensor, *, f: int) -> AggregationResult:
    """Krum: the single update of lowest score."""
    return multi_krum(updates, f=f, m=1)


def _blockwise(
    updates: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    block: int = BLOCK,
) -> torch.Tensor:
    x = _check_updates(updates)
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], block):
        out[start : start + block] = fn(x[:, start : start + block])
    return out


def coordinate_median(updates: torch.Tensor) -> AggregationResult:
    """Coordinate-wise median (the mean of the two middle values for even ``n``)."""
    if _check_updates(updates).dtype == torch.float32:
        return AggregationResult(exact_median(updates))
    return AggregationResult(_blockwise(updates, lambda b: b.quantile(0.5, dim=0)))


def trimmed_mean(
    updates: torch.Tensor, *, beta: float = 0.1, f: int | None = None
) -> AggregationResult:
    """Coordinate-wise mean after dropping the ``k`` largest and ``k`` smallest values,
    ``k = f`` when given, else ``floor(beta * n)``."""
    n = _check_updates(updates).shape[0]
    k = f if f is not None else math.floor(share_of(beta, n))
    if not 0 <= 2 * k < n:
        raise ValueError(f"trimmed mean cannot drop 2*{k} of {n} values")
    if updates.dtype == torch.float32:
        return AggregationResult(exact_trimmed_mean(updates, k))

    def trim(b: torch.Tensor) -> torch.Tensor:
        s = b.sort(dim=0).values
        return s[k : n - k].mean(dim=0)

    return AggregationResult(_blockwise(updates, trim))


def geometric_median(
    updates: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float = 1e-7,
    eps: float = 1e-8,
) -> AggregationResult:
    """Smoothed Weiszfeld iterations for the geometric median (Pillutla et al.).

    Every iterate is a weighted mean ``z = sum_j b_j x_j`` of the rows, so the
    iterations run on the weights alone: with the Gram matrix ``G`` of the centred
    rows (one pass over the updates), ``|x_i - z|^2 = G_ii - 2 (G b)_i + b'Gb``
    and an iteration costs ``O(n^2)`` instead of two passes over ``(n, d)``. They
    stop when the aggregate moves less than ``tol`` of its norm (at most 1e-7:
    converged, not a fixed step count); ``iterations`` reports how many ran. The
    aggregate is the exact mean of the rows with the last weights quantized to
    integers up to 2^29 (``AggregationResult.weights``), so it is reproducible
    while the iterations' float arithmetic need not be."""
    x = _check_updates(updates)
    n = x.shape[0]
    alpha = (
        torch.full((n,), 1.0 / n, dtype=torch.float64)
        if weights is None
        else weights.detach().to(device="cpu", dtype=torch.float64)
        / float(weights.sum())
    )
    # In float64: a float32 Gram's rounding (1e-7 of the centred norms, large when
    # far outliers shift the centre) bounds the result's accuracy near 1e-5.
    gram64, centre = _centred_gram(x, dtype=torch.float64)
    gram = gram64.cpu()
    # |z|^2 = |c|^2 + 2 c.(C'b) + b'Gb with c the centre and C the centred rows;
    # c.C_j = c.x_j - |c|^2 (the rows times the centre, block by block)
    centre_sq = float(centre @ centre)
    centre_dot = torch.zeros(n, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[1], BLOCK):
        centre_dot += x[:, s : s + BLOCK].double() @ centre[s : s + BLOCK]
    centre_dot = centre_dot.cpu() - centre_sq
    diag = gram.diagonal()
    beta = alpha
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported below)
        g_beta = gram @ beta
        sq = (diag - 2.0 * g_beta + beta @ g_beta).clamp(min=0.0)
        new = alpha / sq.sqrt().clamp(min=eps)
        new = new / new.sum()
        step = new - beta
        moved = math.sqrt(max(float(step @ gram @ step), 0.0))
        beta = new
        z_sq = centre_sq + 2.0 * float(centre_dot @ beta) + float(beta @ gram @ beta)
        norm = math.sqrt(max(z_sq, 0.0))
        if moved <= tol * max(1.0, norm):
            break
    w = quantize_weights(beta * ((MAX_WEIGHT - 1) / WEIGHT_SCALE / float(beta.max())))
    if sum(w) <= 0:
        w = [1] * n
    return AggregationResult(
        weighted_mean(x, w), weights=tuple(w), iterations=iterations
    )


def bulyan(updates: torch.Tensor, *, f: int) -> AggregationResult:
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018): select ``theta = n - 2f``
    rows by repeated Krum (each time the row of lowest score among those left,
    scores over those left), then the coordinate-wise trimmed mean of the selected
    rows dropping ``f`` at each end (the ``beta = theta - 2f`` central values;
    ByzFL's reading of "closest to the median"). Needs ``n >= 4f + 3``."""
    x = _check_updates(updates)
    n = x.shape[0]
    if n < 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 updates (n={n}, f={f})")
    dist = pairwise_sq_distances(x)
    left = list(range(n))
    chosen: list[int] = []
    for _ in range(n - 2 * f):
        sub = dist[left][:, left]
        f_sub = min(f, len(left) - 3) if len(left) > 2 else 0
        scores = krum_scores(sub, f_sub) if len(left) > 2 else torch.zeros(len(left))
        pick = left[int(torch.sort(scores, stable=True).indices[0])]
        chosen.append(pick)
        left.remove(pick)
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[sorted(chosen)] = True
    kept = x[mask]
    agg = (
        exact_trimmed_mean(kept, f)
        if kept.dtype == torch.float32
        else _blockwise(kept, lambda b: b.sort(dim=0).values[f : len(b) - f].mean(0))
    )
    return AggregationResult(agg, mask)


def centered_clipping(
    updates: torch.Tensor, *, f: int, iterations: int = 3
) -> AggregationResult:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021), stateless:
    ``v <- v + mean_i clip(x_i - v, tau)`` for ``iterations`` steps, from the row
    of lowest Krum score (the paper starts from the last round's momentum, which
    a stateless rule does not have), with ``tau`` the median distance of the rows
    to that start. Every iterate is a weighted mean of the rows, so it runs on the
    weights over the Gram matrix, and the aggregate is their exact mean with the
    weights quantized (reproducible, as :func:`geometric_median`)."""
    x = _check_updates(updates)
    n = x.shape[0]
    gram64, _ = _centred_gram(x, dtype=torch.float64)
    gram = gram64.cpu()
    diag = gram.diagonal()
    dist = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * gram).clamp(min=0.0)
    dist.fill_diagonal_(0.0)
    start = (
        int(torch.sort(krum_scores(dist, min(f, n - 3)), stable=True).indices[0])
        if n > 3
        else 0
    )
    beta = torch.zeros(n, dtype=torch.float64)
    beta[start] = 1.0
    tau = float(dist[start].sqrt().median())
    for _ in range(iterations):
        g_beta = gram @ beta
        far = (diag - 2.0 * g_beta + beta @ g_beta).clamp(min=0.0).sqrt()
        c = (tau / far.clamp(min=1e-30)).clamp(max=1.0) if tau > 0 else far * 0
        beta = (1.0 - float(c.mean())) * beta + c / n
    w = quantize_weights(beta * ((MAX_WEIGHT - 1) / WEIGHT_SCALE / float(beta.max())))
    if sum(w) <= 0:
        w = [1] * n
    return AggregationResult(weighted_mean(x, w), weights=tuple(w))


def fltrust(updates: torch.Tensor, *, server_update: torch.Tensor) -> AggregationResult:
    """FLTrust (Cao, Fang, Liu, Gong, NDSS 2021): the server trains the global model
    on a small clean root dataset of its own; each update's trust score is
    ``TS_i = ReLU(cos(x_i, g_0))`` with that server update ``g_0``, and the
    aggregate is the trust-weighted mean of the updates' directions.

    The rows with ``TS_i = 0`` are not selected. FLTrust rescales every update to
    the server's norm: ``|g_0| sum_i TS_i x_i/|x_i| / sum_i TS_i``. Here a row
    weighs ``TS_i / max(|x_i|, |g_0|)`` and a zero update weighs
    ``sum_i TS_i/|g_0| - sum_i TS_i/max(|x_i|, |g_0|)`` (never negative), all
    quantized like :func:`geometric_median`'s weights: the aggregate is their
    exact weighted mean, which a replay reproduces bit for bit, and it is
    ``|g_0| sum_i TS_i x_i/|x_i| min(1, |x_i|/|g_0|) / sum_i TS_i``. For every row
    at least as long as the server's update that is FLTrust; a shorter row is not
    stretched to ``|g_0|`` but counts as it is. So one tiny update cannot take
    the galaxy's step down (weights ``TS_i/|x_i|`` without the zero update made
    the norm a harmonic mean of the rows', which one update at ``eps`` took to
    zero: a review's finding), nor can a huge one take it up. With no positive
    score nothing is selected and the aggregate is zero (FLTrust's empty update).
    """
    x = _check_updates(updates)
    n, d = x.shape
    g0 = server_update.detach().reshape(-1)
    if g0.numel() != d:
        raise ValueError(f"the server update has {g0.numel()} values, not {d}")
    g0 = g0.to(device=x.device, dtype=torch.float64)
    g0_norm = float(torch.linalg.vector_norm(g0))
    if not math.isfinite(g0_norm) or g0_norm == 0.0:
        raise ValueError("the server update is zero or not finite")
    dots = torch.zeros(n, dtype=torch.float64, device=x.device)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for s in range(0, d, BLOCK):
        b = x[:, s : s + BLOCK].double()
        dots += b @ g0[s : s + BLOCK]
        sq += (b * b).sum(dim=1)
    norms = sq.sqrt().cpu()
    trust = (dots.cpu() / (norms.clamp(min=1e-30) * g0_norm)).clamp(min=0.0)
    trust[norms == 0] = 0.0
    beta = torch.where(trust > 0, trust / norms.clamp(min=g0_norm), 0.0)
    if float(beta.max()) <= 0:
        return AggregationResult(
            torch.zeros(d, dtype=x.dtype, device=x.device),
            selected=torch.zeros(n, dtype=torch.bool, device=x.device),
            weights=(0,) * n,
            trust=trust,
            null_weight=0,
        )
    null = max(float(trust.sum()) / g0_norm - float(beta.sum()), 0.0)
    scale = (MAX_WEIGHT - 1) / WEIGHT_SCALE / max(float(beta.max()), null)
    w = quantize_weights(
        torch.cat([beta, torch.tensor([null], dtype=beta.dtype)]) * scale
    )
    w, null_weight = w[:-1], w[-1]
    mask = torch.tensor([v > 0 for v in w], dtype=torch.bool, device=x.device)
    if not any(w):  # every trust too small to weigh against the zero update
        return AggregationResult(
            torch.zeros(d, dtype=x.dtype, device=x.device),
            selected=mask,
            weights=tuple(w),
            trust=trust,
            null_weight=0,
        )
    return AggregationResult(
        weighted_mean(x, w, null_weight=null_weight),
        mask,
        weights=tuple(w),
        trust=trust,
        null_weight=null_weight,
    )


def mean(
    updates: torch.Tensor, *, weights: torch.Tensor | None = None
) -> AggregationResult:
    """Plain (FedAvg) mean, optionally weighted: no robustness at all."""
    x = _check_updates(updates)
    n = x.shape[0]
    w = [1] * n if weights is None else quantize_weights(weights)
    if sum(w) <= 0:
        w = [1] * n
    return AggregationResult(weighted_mean(x, w), weights=tuple(w))


# -- registry ------------------------------------------------------------------


def share_of(fraction: float, n: int) -> Fraction:
    """``fraction * n`` exactly, reading ``fraction`` as the decimal it is written
    as: 0.29 of 100 is 29, not the 28.999999999999996 of binary floats (which
    floor would make 28). The Helm chart computes the same way (Sprig's decimal
    arithmetic), so both refuse the same settings."""
    return Fraction(Decimal(repr(float(fraction)))) * n


class Aggregator(ABC):
    """A named aggregation rule: a thin wrapper around one of the functions above.

    ``f``, the number of Byzantine updates tolerated, defaults per call to
    ``floor(byzantine_fraction * n)``; callers that know better pass it.
    """

    name: ClassVar[str]
    #: A rule that needs the server's update on its root dataset this round
    #: (FLTrust) gets it as ``server_update``; the others never see it.
    needs_server_update: ClassVar[bool] = False

    def __init__(self, *, byzantine_fraction: float = 0.3) -> None:
        if not 0.0 <= byzantine_fraction < 0.5:
            raise ValueError(
                f"byzantine_fraction must be in [0, 0.5), got {byzantine_fraction}"
            )
        self.byzantine_fraction = byzantine_fraction

    def f_for(self, n: int) -> int:
        return math.floor(share_of(self.byzantine_fraction, n))

    def __call__(
        self,
        updates: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        f: int | None = None,
        server_update: torch.Tensor | None = None,
    ) -> AggregationResult:
        """Aggregate the rows of ``updates``, tolerating ``f`` Byzantine rows.
        What a rule returns is checked (a user's rule too): an
        :class:`AggregationResult` whose aggregate is one finite row of the
        updates' width, else a ValueError naming the rule."""
        f = self.f_for(updates.shape[0]) if f is None else f
        if self.needs_server_update:
            if server_update is None:
                raise ValueError(
                    f"aggregator {self.name!r} needs the server's update on its "
                    "root dataset, and this round has none"
                )
            out = self._aggregate_with_server(updates, f, weights, server_update)
        else:
            out = self._aggregate(updates, f, weights)
        if not isinstance(out, AggregationResult):
            raise ValueError(
                f"aggregator {self.name!r} returned {type(out).__name__}, not an "
                "AggregationResult"
            )
        agg = out.aggregate
        if not isinstance(agg, torch.Tensor) or tuple(agg.shape) != (updates.shape[1],):
            got = tuple(agg.shape) if isinstance(agg, torch.Tensor) else type(agg)
            raise ValueError(
                f"aggregator {self.name!r} returned an aggregate of shape {got}, "
                f"not ({updates.shape[1]},)"
            )
        if not bool(torch.isfinite(agg).all()):
            raise ValueError(f"aggregator {self.name!r} returned non-finite values")
        return out

    @abstractmethod
    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: torch.Tensor | None
    ) -> AggregationResult: ...

    def _aggregate_with_server(
        self,
        updates: torch.Tensor,
        f: int,
        weights: torch.Tensor | None,
        server_update: torch.Tensor,
    ) -> AggregationResult:
        return self._aggregate(updates, f, weights)

    def min_clients(self, f: int) -> int:
        """Fewest updates this rule needs to tolerate ``f`` Byzantine ones."""
        return 2 * f + 1


_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: register ``cls`` under ``cls.name``; duplicates are rejected."""
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """An aggregator by name, e.g. ``get_aggregator("multikrum")``, or by import
    path ``package.module:Class`` (an :class:`Aggregator` subclass)."""
    return resolve_aggregator(name)(**kwargs)


def resolve_aggregator(name: str) -> type[Aggregator]:
    """The class of a registered aggregator or of ``package.module:Class``."""
    found: type[Aggregator] = resolve(
        name,
        _REGISTRY,
        "aggregator",
        choices=available_aggregators(),
        accepts=lambda a: isinstance(a, type) and issubclass(a, Aggregator),
        expected="a subclass of protogalaxy.defense.robust.Aggregator",
    )
    return found


def available_aggregators() -> list[str]:
    return sorted(_REGISTRY)


Weights = torch.Tensor | None


@register_aggregator
class MultiKrum(Aggregator):
    name = "multikrum"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return multi_krum(updates, f=f, weights=weights)

    def min_clients(self, f: int) -> int:
        return 2 * f + 3


@register_aggregator
class Krum(Aggregator):
    name = "krum"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return krum(updates, f=f)

    def min_clients(self, f: int) -> int:
        return 2 * f + 3


@register_aggregator
class Median(Aggregator):
    name = "median"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return coordinate_median(updates)


@register_aggregator
class TrimmedMean(Aggregator):
    name = "trimmed_mean"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return trimmed_mean(updates, f=f)


@register_aggregator
class GeometricMedian(Aggregator):
    name = "geometric_median"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return geometric_median(updates, weights=weights)


@register_aggregator
class Bulyan(Aggregator):
    name = "bulyan"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return bulyan(updates, f=f)

    def min_clients(self, f: int) -> int:
        return 4 * f + 3


@register_aggregator
class CenteredClipping(Aggregator):
    name = "centered_clipping"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return centered_clipping(updates, f=f)


@register_aggregator
class FLTrust(Aggregator):
    name = "fltrust"
    needs_server_update = True

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        raise ValueError("fltrust needs the server update (see Aggregator.__call__)")

    def _aggregate_with_server(
        self,
        updates: torch.Tensor,
        f: int,
        weights: Weights,
        server_update: torch.Tensor,
    ) -> AggregationResult:
        return fltrust(updates, server_update=server_update)

    def min_clients(self, f: int) -> int:
        return 1  # the root dataset, not a majority, is what it trusts


@register_aggregator
class FedAvg(Aggregator):
    name = "fedavg"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: Weights
    ) -> AggregationResult:
        return mean(updates, weights=weights)

    def min_clients(self, f: int) -> int:
        return 1
