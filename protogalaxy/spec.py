"""The shape of a model's update: ordered parameter names, shapes and dtypes.

Updates travel as named tensors (``PGT1``), and the defense works on flat vectors;
:class:`UpdateSpec` converts between the two and checks a decoded update against
the model (layer 1: names, shapes, dtypes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["UpdateSpec"]


@dataclass(frozen=True)
class UpdateSpec:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor]) -> UpdateSpec:
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        if vector.numel() != self.numel:
            raise ValueError(
                f"vector has {vector.numel()} values, the model {self.numel}"
            )
        out = {}
        pos = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = 1
            for s in shape:
                n *= s
            out[name] = vector[pos : pos + n].view(shape)
            pos += n
        return out

    def check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` with a reason code prefix unless ``tensors`` matches.

        Reason codes: ``shape:`` (names or shapes differ), ``dtype:``,
        ``non_finite:``.
        """
        if set(tensors) != set(self.names):
            missing = sorted(set(self.names) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.names))[:3]
            raise ValueError(
                f"shape: tensor names differ (missing {missing}, unexpected {extra})"
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"shape: {name} has shape {tuple(t.shape)}, expected {shape}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"dtype: {name} is {t.dtype}, expected {self.dtype}")
        for name in self.names:
            t = tensors[name]
            # A finite sum proves every value finite (NaN and Inf propagate through
            # IEEE addition) in one pass without a mask; only a sum that is not
            # finite, or overflowed, needs the exact check.
            if (
                t.is_floating_point()
                and not bool(torch.isfinite(t.sum()))
                and not bool(torch.isfinite(t).all())
            ):
                raise ValueError(f"non_finite: {name} holds NaN or Inf values")
