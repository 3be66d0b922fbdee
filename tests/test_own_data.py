"""A user's own data through the whole pipeline (issue 15): the number of classes
comes from the data, for the model and for every attack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from protogalaxy.config import ConfigError, load_config
from protogalaxy.learning.attacks import ATTACKS
from protogalaxy.learning.datasets import Dataset
from protogalaxy.report import write_progress
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


class MLP(nn.Module):
    """A user's 3-class MLP, named in configs as ``tests.test_own_data:MLP``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(start_dim=-3), nn.Linear(28 * 28, 16), nn.ReLU(),
            nn.Linear(16, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def by_galaxy_blocks(
    labels: torch.Tensor, num_clients: int, samples: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A user's partition: contiguous blocks of a seeded permutation."""
    perm = torch.randperm(len(labels), generator=generator)
    return [perm[c * samples : (c + 1) * samples] for c in range(num_clients)]


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_on_a_three_class_dataset(
    attack: str, tmp_path: Path
) -> None:
    """The reported crash: the default attack flipped labels as if there were
    ten classes (``index 9 is out of bounds for dimension 2 with size 3``). A
    user's MLP, data and partition, through the whole pipeline with every
    attack; the recorded config names them."""
    config = load_config(
        overrides={
            "model": "tests.test_own_data:MLP",
            "clients.partition": "tests.test_own_data:by_galaxy_blocks",
            "clients.count": 10,
            "galaxies.count": 2,
            "clients.samples_per_client": 40,
            "byzantine.fraction": 0.2,
            "byzantine.attack": attack,
            # the targeted flip's default pair (3 -> 7) is no pair of three classes
            "byzantine.source_class": 0,
            "byzantine.target_class": 2,
            "training.rounds": 2,
        }
    )
    result = Simulation(config, dataset=three_classes()).run()
    assert len(result.rounds) == 2
    assert 0.0 <= result.rounds[-1].accuracy <= 1.0
    write_progress(result, tmp_path)
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recorded["model"] == "tests.test_own_data:MLP"
    assert recorded["clients"]["partition"] == "tests.test_own_data:by_galaxy_blocks"
    assert recorded["byzantine"]["attack"] == attack


def test_a_partition_that_breaks_its_contract_is_a_clear_error() -> None:
    from protogalaxy.learning.partition import partition, register_partition

    def too_few(labels, n, k, g):  # type: ignore[no-untyped-def]
        return [torch.arange(k)] * (n - 1)

    def out_of_range(labels, n, k, g):  # type: ignore[no-untyped-def]
        return [torch.arange(k) + len(labels)] * n

    register_partition("too_few_for_tests", too_few)
    register_partition("out_of_range_for_tests", out_of_range)
    labels = torch.zeros(100, dtype=torch.long)
    g = torch.Generator()
    with pytest.raises(ValueError, match="returned 3 parts for 4 clients"):
        partition(labels, num_clients=4, samples_per_client=5,
                  scheme="too_few_for_tests", generator=g)  # fmt: skip
    with pytest.raises(ValueError, match=r"indices leave \[0, 100\)"):
        partition(labels, num_clients=4, samples_per_client=5,
                  scheme="out_of_range_for_tests", generator=g)  # fmt: skip
    with pytest.raises(ConfigError, match="partition must be one of iid"):
        load_config(overrides={"clients.partition": "dirichlett"})
    with pytest.raises(ValueError, match="built in"):
        register_partition("iid", too_few)


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
