"""The test playing a galaxy's clients over HTTP (register, commit, reveal)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from protogalaxy.codec import encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto import commit
from protogalaxy.crypto.identity import sign_commitment, sign_registration, sign_reveal
from protogalaxy.crypto.keyring import client_key
from protogalaxy.learning.models import build_model
from protogalaxy.services.up import LocalCluster
from protogalaxy.spec import UpdateSpec

SPEC = UpdateSpec.from_params(dict(build_model("mnist_cnn").named_parameters()))


def played_cluster(
    out: Path,
    *,
    clients: int = 4,
    reveal_deadline_s: float = 600,
    extra_env: dict[str, str] | None = None,
    max_update_bytes: int = 64 << 20,
    **overrides: Any,
) -> Iterator[LocalCluster]:
    """One galaxy of ``clients`` clients that the test plays (FedAvg, layer 1
    only, no Byzantine clients unless ``overrides`` say so), with deadlines long
    enough that only the test moves the rounds on; stopped when done."""
    config = load_config(
        overrides={
            "clients.count": clients,
            "galaxies.count": 1,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "defense.layers": [1],
            "defense.aggregator": "fedavg",
            "training.rounds": 2,
            **overrides,
        }
    )
    cluster = LocalCluster(
        config,
        out,
        commit_deadline_s=600,
        reveal_deadline_s=reveal_deadline_s,
        max_update_bytes=max_update_bytes,
        extra_env=extra_env or {},
    )
    try:
        cluster.start(clients=False)
        yield cluster
    finally:
        cluster.stop()


def update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return SPEC.unflatten(0.01 * torch.randn(SPEC.numel, generator=g))


class Players:
    """Clients ``0..n-1`` of galaxy 0 of ``cluster``, played by the test with the
    keys provisioned for them (derived from the cluster's clients' seed)."""

    def __init__(self, cluster: LocalCluster, n: int) -> None:
        self.cluster = cluster
        self.run = cluster.run_id
        seed = (cluster.keys / "clients.seed").read_bytes()
        self.keys = {c: client_key(seed, c) for c in range(n)}
        self.made: dict[int, tuple[Any, bytes, bytes]] = {}

    def url(self, path: str) -> str:
        return self.cluster.galaxy_url(0) + path

    def registration(self, client: int, galaxy: int = 0) -> dict[str, Any]:
        key = self.keys[client]
        return {
            "client_id": client,
            "public_key": key.public_key.to_bytes().hex(),
            "signature": sign_registration(
                key, client_id=client, galaxy_id=galaxy, run=self.run
            ).hex(),
        }

    def register(self) -> None:
        for c in self.keys:
            resp = httpx.post(self.url("/v1/register"), json=self.registration(c))
            assert resp.status_code == 201, resp.text

    def commit(self, rnd: int, client: int, tensors: dict[str, torch.Tensor]) -> None:
        com, nonce = commit(tensors, client_id=client, galaxy_id=0, round=rnd)
        sig = sign_commitment(self.keys[client], com, run=self.run)
        resp = httpx.post(
            self.url("/v1/commitments"),
            json={"commitment": com.to_dict(), "signature": sig.hex()},
        )
        assert resp.status_code == 202, resp.text
        self.made[client] = (com, nonce, encode_update(tensors))

    def reveal(
        self,
        rnd: int,
        client: int,
        body: bytes | None = None,
        nonce: bytes | None = None,
        *,
        chunked: bool = False,
    ) -> httpx.Response:
        """Reveal; ``chunked`` sends the body in pieces without a Content-Length."""
        com, nonce0, body0 = self.made[client]
        body = body0 if body is None else body
        nonce = nonce0 if nonce is None else nonce
        sig = sign_reveal(self.keys[client], com, body, nonce, run=self.run)
        content: bytes | Iterator[bytes] = body
        if chunked:
            content = (body[i : i + 4096] for i in range(0, len(body), 4096))
        return httpx.put(
            self.url(f"/v1/rounds/{rnd}/reveals/{client}"),
            content=content,
            headers={
                "x-pg-nonce": nonce.hex(),
                "x-pg-signature": sig.hex(),
                "content-type": "application/octet-stream",
            },
        )

    def wait_phase(self, rnd: int, phase: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        s: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                s = httpx.get(self.url("/v1/round")).json()
            except httpx.HTTPError:
                s = {}
            if s.get("round") == rnd and s.get("phase") == phase:
                return
            time.sleep(0.05)
        raise AssertionError(f"galaxy never reached round {rnd} {phase}; it is at {s}")

    def wait_global_round(self, rnd: int, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status: dict[str, Any] = self.cluster.status()
                if status["round"] >= rnd:
                    return status
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (
                f"the global aggregator never reached {rnd}"
            )
            time.sleep(0.1)
