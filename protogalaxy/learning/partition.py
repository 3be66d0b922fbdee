"""Client data partitions: IID, Dirichlet label skew, power-law quantity skew."""

from __future__ import annotations

import torch

__all__ = ["partition"]


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
    raise ValueError(
        f"partition scheme must be iid, dirichlet or powerlaw; got {scheme!r}"
    )
