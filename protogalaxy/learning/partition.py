"""Client data partitions: IID, Dirichlet label skew, power-law quantity skew, and
your own (:func:`register_partition`, or ``clients.partition: package.module:fn``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from protogalaxy.plugins import resolve

__all__ = ["PARTITIONS", "partition", "partition_names", "register_partition"]

#: the built-in schemes
PARTITIONS = ("iid", "dirichlet", "powerlaw")

#: ``fn(labels, num_clients, samples_per_client, generator) -> [indices, ...]``
PartitionFn = Callable[[torch.Tensor, int, int, torch.Generator], list[torch.Tensor]]
_OWN: dict[str, PartitionFn] = {}


def register_partition(name: str, fn: PartitionFn) -> None:
    """Make ``name`` a scheme a configuration can name (``clients.partition``):
    ``fn(labels, num_clients, samples_per_client, generator)`` returns one index
    tensor into the training set per client (draw from ``generator`` only, so that
    every party computes the same split)."""
    if not name or ":" in name or name in PARTITIONS or name in _OWN:
        raise ValueError(f"partition {name!r} is built in, registered, or not a word")
    _OWN[name] = fn


def partition_names() -> list[str]:
    return [*PARTITIONS, *_OWN]


def resolve_partition(name: str) -> PartitionFn | None:
    """A user's scheme (None for a built-in one); a ValueError for an unknown."""
    if name in PARTITIONS:
        return None
    fn: PartitionFn = resolve(
        name,
        _OWN,
        "partition",
        choices=partition_names(),
        accepts=callable,
        expected="a function",
    )
    return fn


def _checked(name: str, parts: object, n: int, num_clients: int) -> list[torch.Tensor]:
    if not isinstance(parts, (list, tuple)) or len(parts) != num_clients:
        got = len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__
        raise ValueError(
            f"partition {name!r} returned {got} parts for {num_clients} clients"
        )
    out = []
    for c, p in enumerate(parts):
        if (
            not isinstance(p, torch.Tensor)
            or p.dim() != 1
            or p.dtype.is_floating_point
            or p.dtype == torch.bool
            or len(p) == 0
        ):
            raise ValueError(
                f"partition {name!r}: client {c}'s part must be a non-empty 1-D "
                "integer tensor of indices"
            )
        if int(p.min()) < 0 or int(p.max()) >= n:
            raise ValueError(f"partition {name!r}: client {c}'s indices leave [0, {n})")
        out.append(p.long())
    return out


def partition(
    labels: torch.Tensor,
    *,
    num_clients: int,
    samples_per_client: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    power: float = 1.5,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Index tensors into the training set, one per client, disjoint.

    * ``iid``: a uniform random split, ``samples_per_client`` each.
    * ``dirichlet``: per client, class proportions drawn from Dirichlet(``alpha``)
      (Hsu et al. 2019); ``samples_per_client`` each.
    * ``powerlaw``: client sizes proportional to ``rank ** -power`` (quantity
      skew), ``num_clients * samples_per_client`` in all, at least
      ``min(32, samples_per_client)`` each; IID labels.
    """
    n = labels.shape[0]
    own = resolve_partition(scheme)
    if own is not None:
        parts = own(labels, num_clients, samples_per_client, generator)
        return _checked(scheme, parts, n, num_clients)
    total = num_clients * samples_per_client
    if total > n:
        raise ValueError(
            f"{num_clients} clients x {samples_per_client} samples = {total} "
            "exceeds the "
            f"{n} training samples"
        )
    if scheme == "iid":
        perm = torch.randperm(n, generator=generator)[:total]
        return list(perm.view(num_clients, samples_per_client))
    if scheme == "powerlaw":
        ranks = torch.arange(1, num_clients + 1, dtype=torch.float64)
        share = ranks.pow(-power)
        least = min(32, samples_per_client)
        spread = total - least * num_clients
        sizes = (share / share.sum() * spread).floor().long() + least
        perm = torch.randperm(n, generator=generator)
        return list(torch.split(perm[: int(sizes.sum())], sizes.tolist()))
    if scheme == "dirichlet":
        num_classes = int(labels.max()) + 1
        pools = [
            (labels == c)
            .nonzero()
            .squeeze(1)[torch.randperm(int((labels == c).sum()), generator=generator)]
            for c in range(num_classes)
        ]
        used = [0] * num_classes
        conc = torch.full((num_classes,), float(alpha), dtype=torch.float64)
        out = []
        for _ in range(num_clients):
            g = torch._standard_gamma(conc, generator=generator)  # Dirichlet via Gammas
            props = g / g.sum()
            want = (props * samples_per_client).floor().long()
            want[int(props.argmax())] += samples_per_client - int(want.sum())
            idx = []
            for c in range(num_classes):
                k = int(want[c])
                take = min(k, len(pools[c]) - used[c])
                idx.append(pools[c][used[c] : used[c] + take])
                used[c] += take
                short = k - take
                while short > 0:  # class exhausted: fill from the fullest class left
                    c2 = max(range(num_classes), key=lambda j: len(pools[j]) - used[j])
                    t2 = min(short, len(pools[c2]) - used[c2])
                    idx.append(pools[c2][used[c2] : used[c2] + t2])
                    used[c2] += t2
                    short -= t2
            out.append(torch.cat(idx))
        return out
    raise AssertionError(scheme)  # resolve_partition refused anything else
