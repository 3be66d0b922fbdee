"""UpdateSpec.check: names, shapes, dtype, and finite values without false alarms."""

from __future__ import annotations

import math

import pytest
import torch

from protogalaxy.spec import UpdateSpec

SPEC = UpdateSpec(("b", "w"), ((3,), (2, 4)))


def tensors(w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {"b": torch.zeros(3), "w": torch.ones(2, 4) if w is None else w}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_any_non_finite_value_is_caught(bad: float) -> None:
    for i in range(8):
        w = torch.ones(2, 4)
        w.view(-1)[i] = bad
        with pytest.raises(ValueError, match=r"^non_finite: w"):
            SPEC.check(tensors(w))


def test_opposite_infinities_and_overflowing_sums() -> None:
    w = torch.ones(2, 4)
    w[0, 0], w[1, 3] = math.inf, -math.inf  # the sum is NaN, not a cancellation
    with pytest.raises(ValueError, match="non_finite"):
        SPEC.check(tensors(w))
    # Finite values whose sum overflows float32 are finite: no false alarm.
    SPEC.check(tensors(torch.full((2, 4), 3e38)))
    SPEC.check(tensors(torch.full((2, 4), -3e38)))


def test_names_shapes_and_dtype() -> None:
    SPEC.check(tensors())
    with pytest.raises(ValueError, match=r"^shape:"):
        SPEC.check({"b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"^shape:"):
        SPEC.check(tensors(torch.ones(4, 2)))
    with pytest.raises(ValueError, match=r"^dtype:"):
        SPEC.check(tensors(torch.ones(2, 4, dtype=torch.float64)))
