"""A user's own data through the whole pipeline (issue 15): the number of classes
comes from the data, for the model and for every attack."""

from __future__ import annotations

import pytest
import torch

from protogalaxy.config import load_config
from protogalaxy.learning.attacks import ATTACKS
from protogalaxy.learning.datasets import Dataset
from protogalaxy.simulation import Simulation


def three_classes(n: int = 600, seed: int = 0) -> Dataset:
    """28x28 images whose class shows as a bright band at one of three heights."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.randn(n, 1, 28, 28, generator=g)
    for c in range(3):
        x[y == c, :, 4 + 8 * c : 8 + 8 * c, :] += 1.0
    cut = n * 5 // 6
    return Dataset("three", x[:cut], y[:cut], x[cut:], y[cut:], 3)


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_on_a_three_class_dataset(attack: str) -> None:
    """The reported crash: the default attack flipped labels as if there were
    ten classes (``index 9 is out of bounds for dimension 2 with size 3``)."""
    config = load_config(
        overrides={
            "clients.count": 10,
            "galaxies.count": 2,
            "clients.samples_per_client": 40,
            "byzantine.fraction": 0.2,
            "byzantine.attack": attack,
            "training.rounds": 2,
        }
    )
    result = Simulation(config, dataset=three_classes()).run()
    assert len(result.rounds) == 2
    assert 0.0 <= result.rounds[-1].accuracy <= 1.0


def test_label_flip_uses_the_datas_classes() -> None:
    config = load_config(
        overrides={"byzantine.attack": "label_flip", "clients.samples_per_client": 10}
    )
    sim = Simulation(config, dataset=three_classes())
    flip = sim.attack
    from protogalaxy.learning.attacks import data_transform

    fn = data_transform(flip)
    assert fn is not None
    _, y = fn(torch.zeros(3, 1, 28, 28), torch.tensor([0, 1, 2]))
    assert y.tolist() == [2, 1, 0]


def test_a_backdoor_target_that_is_not_a_class_is_a_clear_error() -> None:
    config = load_config(
        overrides={
            "byzantine.attack": "backdoor",
            "byzantine.backdoor_target": 7,
            "clients.samples_per_client": 10,
        }
    )
    with pytest.raises(ValueError, match="backdoor_target 7 is not a class"):
        Simulation(config, dataset=three_classes())


def test_a_torch_dataset_pair_runs_and_gives_its_classes() -> None:
    from torch.utils.data import TensorDataset

    data = three_classes()
    own = Dataset.from_torch(
        "mine",
        TensorDataset(data.x_train, data.y_train),
        TensorDataset(data.x_test, data.y_test),
    )
    assert own.num_classes == 3 and own.input_shape == (1, 28, 28)
    assert torch.equal(own.x_train, data.x_train)
    config = load_config(
        overrides={
            "clients.count": 10, "galaxies.count": 2, "clients.samples_per_client": 40,
            "byzantine.fraction": 0.2, "training.rounds": 1,
        }
    )  # fmt: skip
    assert len(Simulation(config, dataset=own).run().rounds) == 1


def test_own_tensors_that_do_not_fit_are_clear_errors() -> None:
    x, y = torch.zeros(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="one label per input"):
        Dataset.from_tensors("d", x, y[:9], x, y)
    with pytest.raises(ValueError, match="must be integers"):
        Dataset.from_tensors("d", x, y.float(), x, y)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        Dataset.from_tensors("d", x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="one shape"):
        Dataset.from_tensors("d", x, y, torch.zeros(10, 5), y)
    assert Dataset.from_tensors("d", x, y, x, y).num_classes == 3
