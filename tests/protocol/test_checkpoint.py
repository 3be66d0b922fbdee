"""Global checkpoints: atomic, verified, pruned, and enough to resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protogalaxy.crypto import SigningKey
from protogalaxy.crypto.statements import (
    AggregateStatement,
    Signed,
    aggregate_digest,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf
from protogalaxy.defense.pipeline import DefenseConfig, GlobalDefense
from protogalaxy.learning.server import ServerStep
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.checkpoint import (
    Checkpoint,
    CheckpointDir,
    decode_checkpoint,
    encode_checkpoint,
)
from protogalaxy.protocol.global_aggregator import GlobalAggregator


def ckpt(r: int) -> Checkpoint:
    return Checkpoint(r, {"note": f"round {r}"}, {"w": torch.full((4,), float(r))})


def test_round_trip_and_tamper_detection() -> None:
    data = encode_checkpoint(ckpt(3))
    back = decode_checkpoint(data)
    assert back.round == 3 and back.meta == {"note": "round 3"}
    assert torch.equal(back.tensors["w"], torch.full((4,), 3.0))
    damaged = bytearray(data)
    damaged[20] ^= 1
    for bad in (bytes(damaged), data[:-1], data[:40], b"junk"):
        with pytest.raises(ValueError, match="checkpoint"):
            decode_checkpoint(bad)


def test_keeps_the_last_n_and_falls_back_past_damage(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path, keep=3)
    for r in range(1, 6):
        d.save(ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.pgck",
        "ckpt-00000004.pgck",
        "ckpt-00000005.pgck",
    ]
    latest = d.latest()
    assert latest is not None and latest.round == 5
    # The newest file is damaged (say a torn write by a broken disk): round 4 serves.
    newest = d.path(5)
    newest.write_bytes(newest.read_bytes()[:-10])
    (tmp_path / ".ckpt-00000006.pgck.tmp-1").write_bytes(b"half written")
    fallback = d.latest()
    assert fallback is not None and fallback.round == 4
    assert CheckpointDir(tmp_path / "empty").latest() is None


GALAXY_KEYS = {g: SigningKey.generate() for g in (0, 1)}
RUN = "r1"


def leaf(r: int, gid: int) -> Signed[GalaxyLeaf]:
    return sign_statement(
        GALAXY_KEYS[gid], GalaxyLeaf(r, gid, 5, bytes([gid]) * 32), run=RUN
    )


def aggregate(r: int, gid: int, values: torch.Tensor) -> Signed[AggregateStatement]:
    digest = aggregate_digest(values.numpy().tobytes())
    st = AggregateStatement(r, gid, 5, bytes([gid]) * 32, 5, digest, bytes(32))
    return sign_statement(GALAXY_KEYS[gid], st, run=RUN)


@pytest.mark.parametrize(
    "server",
    [ServerStep("fedavgm", 1.0, 0.5), ServerStep("fedyogi", 0.01, 0.9)],
    ids=["fedavgm", "fedyogi"],
)
def test_the_global_aggregator_resumes_where_it_left_off(
    tmp_path: Path, server: ServerStep
) -> None:
    """Model, momentum and (FedYogi) second moment come back: the next round is
    the same on the restored aggregator as on the original."""
    key = SigningKey.generate()
    galaxy_keys = {g: k.public_key for g, k in GALAXY_KEYS.items()}

    def fresh(run: str = RUN) -> GlobalAggregator:
        return GlobalAggregator(
            key=key,
            galaxy_keys=galaxy_keys,
            assignment=Assignment(10, 2),
            run=run,
            params=torch.zeros(6),
            defense=GlobalDefense(DefenseConfig()),
            server=server,
        )

    g = fresh()
    for r in range(3):
        for gid in (0, 1):
            g.submit_leaf(leaf(r, gid))
        g.close_leaves(r)
        for gid in (0, 1):
            values = torch.ones(6) * (r + 1)
            g.submit_aggregate(aggregate(r, gid, values), values)
        g.finish_round(r)
    d = CheckpointDir(tmp_path)
    d.save(g.checkpoint())
    restored = fresh()
    latest = d.latest()
    assert latest is not None
    restored.restore(latest)
    assert restored.round == 3
    assert torch.equal(restored.params, g.params) and torch.equal(
        restored.velocity, g.velocity
    )
    assert torch.equal(restored.second_moment, g.second_moment)
    if server.adaptive:  # it moved away from its start, so restoring it matters
        assert not torch.equal(g.second_moment, torch.full((6,), server.tau**2))
    assert restored.audit_log.root == g.audit_log.root and restored.audit_log.size == 3
    # Round 3 proceeds on the restored state exactly as on the original.
    for agg in (g, restored):
        for gid in (0, 1):
            agg.submit_leaf(leaf(3, gid))
        agg.close_leaves(3, timestamp_ms=7)
        for gid in (0, 1):
            agg.submit_aggregate(aggregate(3, gid, torch.ones(6)), torch.ones(6))
        agg.finish_round(3)
    assert torch.equal(restored.params, g.params)
    other = GlobalAggregator(
        key=SigningKey.generate(),
        galaxy_keys=galaxy_keys,
        assignment=Assignment(10, 2),
        run=RUN,
        params=torch.zeros(6),
        defense=GlobalDefense(DefenseConfig()),
    )
    with pytest.raises(ValueError, match="another global aggregator key"):
        other.restore(latest)
    # The same key resuming another run's checkpoint would re-sign its history.
    with pytest.raises(ValueError, match="run"):
        fresh("r2").restore(latest)


def test_a_checkpoint_of_another_server_optimizer_starts_its_moments_afresh() -> None:
    key = SigningKey.generate()
    galaxy_keys = {g: k.public_key for g, k in GALAXY_KEYS.items()}

    def fresh(server: ServerStep) -> GlobalAggregator:
        return GlobalAggregator(
            key=key,
            galaxy_keys=galaxy_keys,
            assignment=Assignment(10, 2),
            run=RUN,
            params=torch.zeros(6),
            defense=GlobalDefense(DefenseConfig()),
            server=server,
        )

    g = fresh(ServerStep("fedavgm", 1.0, 0.5))
    for gid in (0, 1):
        g.submit_leaf(leaf(0, gid))
    g.close_leaves(0)
    for gid in (0, 1):
        g.submit_aggregate(aggregate(0, gid, torch.ones(6)), torch.ones(6))
    g.finish_round(0)
    assert bool(g.velocity.any())
    adam = fresh(ServerStep("fedadam", 0.03, 0.9))
    adam.restore(g.checkpoint())
    assert torch.equal(adam.params, g.params)  # the model carries over
    assert not adam.velocity.any()  # FedAvgM's velocity is not Adam's m
    assert torch.equal(adam.second_moment, torch.full((6,), 1e-6))
