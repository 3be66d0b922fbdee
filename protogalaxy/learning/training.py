"""Local training of many clients at once.

Every client runs plain minibatch SGD (optionally with momentum) on its own data,
from the same global model. Instead of a Python loop over clients, the clients'
parameters are stacked and one step of all of them is a single vectorized call. A
model may provide ``batched_forward(stacked_params, x)`` (the MNIST CNN does: grouped
convolutions and batched matmuls), and one autograd pass then gives every client's
gradient; any other model goes through ``torch.func.vmap`` over ``grad`` of a
``functional_call``. Both compute the same gradients (tested). A round of K clients
with batch B therefore costs about one pass of plain SGD with batch K*B.

Each epoch a client reshuffles its data and takes ``len // batch_size`` full batches
(drop-last), so all clients step in lockstep; a client with less data (quantity
skew) is masked out once its batches are used up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

__all__ = [
    "BatchedTrainer",
    "ClientTask",
    "evaluate",
    "flatten_params",
    "unflatten_into",
]

#: A transform applied to batches (images, labels) before the step. It must work on
#: a leading client dimension too, ``(clients, batch, ...)``: the trainer applies each
#: distinct transform once per step to all the clients that share it.
BatchTransform = Callable[
    [torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class ClientTask:
    """One client's local work: indices into the training set, and an optional
    data-poisoning transform (label flipping, backdoor trigger)."""

    indices: torch.Tensor
    transform: BatchTransform | None = None


def flatten_params(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_into(
    vector: torch.Tensor, like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = {}
    pos = 0
    for name, p in like.items():
        n = p.numel()
        out[name] = vector[pos : pos + n].view_as(p)
        pos += n
    if pos != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the model {pos}")
    return out


class BatchedTrainer:
    """Trains K clients in parallel with vmap; returns their updates as ``(K, d)``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        batch_size: int = 32,
        epochs: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if lr <= 0 or batch_size < 1 or epochs < 1 or not 0 <= momentum < 1:
            raise ValueError(
                "need lr > 0, batch_size >= 1, epochs >= 1, 0 <= momentum < 1"
            )
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            # Running statistics are updated in place, which vmap cannot batch; the
            # clients normalize with batch statistics instead (torch.func's remedy).
            replace_all_batch_norm_modules_(model)
        self.model = model.to(device)
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.epochs = epochs
        self.device = torch.device(device)
        self.model.train()

        def loss(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            logits = functional_call(self.model, params, (x,))
            return F.cross_entropy(logits, y)

        self._grad = vmap(grad(loss), randomness="different")
        self._batched = getattr(self.model, "batched_forward", None)

    def _grads(
        self, params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if self._batched is None:
            grads: dict[str, torch.Tensor] = self._grad(params, xb, yb)
            return grads
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logits = self._batched(leaves, xb)
        k, b = yb.shape
        # sum over clients of each client's mean loss: client k's block of the
        # stacked parameters receives exactly client k's gradient
        loss = (
            F.cross_entropy(logits.reshape(k * b, -1), yb.reshape(-1), reduction="sum")
            / b
        )
        return dict(
            zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True)
        )

    def train(
        self,
        global_params: dict[str, torch.Tensor],
        tasks: Sequence[ClientTask],
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Run local training for every task; return ``new - global`` per client,
        each row flattened in the order of ``global_params``' keys."""
        k = len(tasks)
        b = self.batch_size
        params = {
            n: p.detach().to(self.device).unsqueeze(0).repeat(k, *([1] * p.dim()))
            for n, p in global_params.items()
        }
        velocity = (
            {n: torch.zeros_like(p) for n, p in params.items()}
            if self.momentum
            else None
        )
        steps_per_epoch = [len(t.indices) // b for t in tasks]
        by_transform: dict[int, tuple[BatchTransform, list[int]]] = {}
        for i, t in enumerate(tasks):
            if t.transform is not None:
                by_transform.setdefault(id(t.transform), (t.transform, []))[1].append(i)
        groups = [(fn, torch.tensor(rows)) for fn, rows in by_transform.values()]
        max_steps = max(steps_per_epoch)
        if max_steps == 0:
            raise ValueError(f"every client has fewer than batch_size={b} samples")
        for _ in range(self.epochs):
            orders = []
            for t, steps in zip(tasks, steps_per_epoch, strict=True):
                perm = t.indices[torch.randperm(len(t.indices), generator=generator)]
                used = perm[: steps * b]
                if steps < max_steps:  # pad with repeats; those steps are masked out
                    pad = perm[
                        torch.randint(
                            len(perm), ((max_steps - steps) * b,), generator=generator
                        )
                    ]
                    used = torch.cat([used, pad])
                orders.append(used.view(max_steps, b))
            order = torch.stack(orders)  # (k, steps, b)
            for s in range(max_steps):
                idx = order[:, s]
                xb = x[idx.reshape(-1)].view(k, b, *x.shape[1:])
                yb = y[idx.reshape(-1)].view(k, b)
                for transform, rows in groups:
                    xb[rows], yb[rows] = transform(xb[rows], yb[rows])
                grads = self._grads(params, xb.to(self.device), yb.to(self.device))
                active = torch.tensor(
                    [s < steps for steps in steps_per_epoch],
                    dtype=torch.float32,
                    device=self.device,
                )
                with torch.no_grad():
                    for n, p in params.items():
                        g = grads[n]
                        if velocity is not None:
                            v = velocity[n]
                            v.mul_(self.momentum).add_(g)
                            g = v
                        scale = (active * self.lr).view(k, *([1] * (p.dim() - 1)))
                        p.sub_(g * scale)
        flat_global = flatten_params(
            {n: p.to(self.device) for n, p in global_params.items()}
        )
        return (
            torch.cat([p.reshape(k, -1) for p in params.values()], dim=1) - flat_global
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2000
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    loss = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(x), loss / len(x)
