"""A client pod holds its own clients' data, not the whole training set."""

from __future__ import annotations

from pathlib import Path

import torch

from protogalaxy.config import load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.services.client_runner import ClientRunner, ClientSettings
from protogalaxy.services.up import LocalCluster
from protogalaxy.simulation import ClientSide


def test_a_client_pod_keeps_only_its_clients_rows(tmp_path: Path) -> None:
    config = load_config(overrides={"clients.samples_per_client": 200})
    cluster = LocalCluster(config, tmp_path)  # for its keys; nothing starts
    data = load_dataset("mnist")
    ids = [3, 4, 5]
    runner = ClientRunner(
        ClientSettings(
            client_ids=ids,
            galaxy_url_template="http://127.0.0.1:1/{galaxy}",
            client_seed_file=str(cluster.keys / "clients.seed"),
            global_public_key=cluster.global_public_key,
            run_id=cluster.run_id,
        ),
        config=config,
        dataset=data,
    )
    assert len(runner.data.x_train) <= 3 * 200
    assert len(runner.data.x_test) == 0
    # Each client sees exactly the samples the partition gave it, in order.
    parts = ClientSide.build(config, data).parts
    for c in ids:
        assert torch.equal(runner.data.x_train[runner.parts[c]], data.x_train[parts[c]])
        assert torch.equal(runner.data.y_train[runner.parts[c]], data.y_train[parts[c]])
