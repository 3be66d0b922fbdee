"""Every party speaks for itself, over a real global aggregator process: the test
plays the galaxies with the keys provisioned for them (``<out>/secrets``), as an
honest galaxy, a compromised one, or one that holds another galaxy's credentials.

Each attack here was reproduced against the services before galaxies had keys of
their own (one shared service token, an unchecked ``X-PG-Weight`` header).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto import SigningKey, VerifyKey
from protogalaxy.crypto.heads import SignedRoundHead
from protogalaxy.crypto.identity import sign_registration
from protogalaxy.crypto.statements import (
    Abstention,
    AggregateStatement,
    aggregate_digest,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf
from protogalaxy.services.up import LocalCluster
from tests.services.players import SPEC

pytestmark = pytest.mark.slow

TREE = 10  # each galaxy's committed tree size


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # 3 galaxies, layer 5 on; the test plays the galaxies' identities, not their
    # transcripts (tests/services/test_audit_up.py plays those)
    config = load_config(overrides={"training.rounds": 2, "audit.enabled": False})
    c = LocalCluster(config, Path(tmp_path_factory.mktemp("identity")), evaluate=False)
    try:
        c.start(clients=False, galaxies=False)  # the test is every galaxy
        yield c
    finally:
        c.stop()


class Galaxies:
    """The galaxies of ``cluster``, each with its provisioned key."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.c = cluster
        self.keys = {
            g: SigningKey.from_bytes((cluster.keys / f"galaxy-{g}.key").read_bytes())
            for g in range(3)
        }
        self.token = {"authorization": f"Bearer {cluster.service_token}"}
        self.roots = {g: bytes([g + 1]) * 32 for g in range(3)}

    def url(self, path: str) -> str:
        return self.c.global_url + path

    def leaf(self, rnd: int, galaxy: int, *, signer: int) -> httpx.Response:
        leaf = GalaxyLeaf(rnd, galaxy, TREE, self.roots[galaxy])
        signed = sign_statement(self.keys[signer], leaf, run=self.c.run_id)
        return httpx.post(
            self.url(f"/v1/rounds/{rnd}/leaves"),
            json=signed.to_dict(),
            headers=self.token,
        )

    def abstain(self, rnd: int, galaxy: int, *, signer: int) -> httpx.Response:
        signed = sign_statement(
            self.keys[signer], Abstention(rnd, galaxy), run=self.c.run_id
        )
        return httpx.post(
            self.url(f"/v1/rounds/{rnd}/abstentions/{galaxy}"),
            json=signed.to_dict(),
            headers=self.token,
        )

    def aggregate(
        self,
        rnd: int,
        galaxy: int,
        values: torch.Tensor,
        *,
        signer: int,
        weight: int = TREE,
        raw_weight: int | None = None,
    ) -> httpx.Response:
        """Post ``values`` as galaxy ``galaxy``'s aggregate, signed by ``signer``;
        ``raw_weight`` writes a weight into the statement's bytes that the
        statement type itself would refuse to hold."""
        digest = aggregate_digest(values.contiguous().numpy().tobytes())
        st = AggregateStatement(
            rnd, galaxy, TREE, self.roots[galaxy], weight, digest, bytes(32)
        )
        raw = bytearray(st.to_bytes())
        if raw_weight is not None:
            raw[60:68] = raw_weight.to_bytes(8, "little")
        signature = self.keys[signer].sign("aggregate", bytes(raw), run=self.c.run_id)
        return httpx.post(
            self.url(f"/v1/rounds/{rnd}/aggregates/{galaxy}"),
            content=encode_update({"aggregate": values}),
            headers={
                **self.token,
                "x-pg-statement": bytes(raw).hex(),
                "x-pg-signature": signature.hex(),
            },
        )

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(self.url("/v1/status")).json()
        return out

    def wait(self, rnd: int, phase: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            s = self.status()
            if (s["round"], s["phase"]) == (rnd, phase) or s["round"] > rnd:
                return s
            assert time.monotonic() < deadline, s
            time.sleep(0.05)

    def model(self) -> torch.Tensor:
        body = httpx.get(self.url("/v1/model")).content
        return SPEC.flatten(decode_update(body))


def refused(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == reason, resp.text


def rejected_total(c: LocalCluster, reason: str) -> float:
    for line in httpx.get(c.global_url + "/metrics").text.splitlines():
        if line.startswith(f'protogalaxy_global_rejected_total{{reason="{reason}"}} '):
            return float(line.split()[-1])
    return 0.0


def honest(seed: int) -> dict[int, torch.Tensor]:
    """Three galaxy aggregates of norms 1.0, 1.1 and 1.2 around one direction."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SPEC.numel, generator=g)
    out = {}
    for i, norm in enumerate((1.0, 1.1, 1.2)):
        v = base + 0.3 * torch.randn(SPEC.numel, generator=g)
        out[i] = norm * v / v.norm()
    return out


def test_a_galaxy_with_another_galaxys_key_cannot_speak_for_it(
    cluster: LocalCluster,
) -> None:
    gx = Galaxies(cluster)
    w0 = gx.model()
    before = rejected_total(cluster, "bad_signature")
    # Galaxy 1 (or anyone holding its key and the service token) tries to send a
    # root for galaxy 0, and to abstain for it.
    refused(gx.leaf(0, 0, signer=1), 401, "bad_signature")
    refused(gx.abstain(0, 0, signer=1), 401, "bad_signature")
    # Without the transport token nothing is even read.
    refused(httpx.post(gx.url("/v1/rounds/0/leaves"), json={}), 401, "bad_signature")
    # A galaxy's tree size bounds its weight: galaxy 2 cannot claim more leaves
    # than it has clients (it would own the global average).
    inflated = GalaxyLeaf(0, 2, 2**64 - 1, gx.roots[2])
    refused(
        httpx.post(
            gx.url("/v1/rounds/0/leaves"),
            json=sign_statement(gx.keys[2], inflated, run=cluster.run_id).to_dict(),
            headers=gx.token,
        ),
        422,
        "tree_too_large",
    )
    # Fields of the wrong JSON type are a 4xx with a reason, never a 500.
    good = sign_statement(
        gx.keys[2], GalaxyLeaf(0, 2, TREE, gx.roots[2]), run=cluster.run_id
    ).to_dict()
    for bad in ("0", None, 0.0, True):
        body = {**good, "statement": {**good["statement"], "round": bad}}
        resp = httpx.post(gx.url("/v1/rounds/0/leaves"), json=body, headers=gx.token)
        assert 400 <= resp.status_code < 500, (bad, resp.text)
    # Nothing was stored under galaxy 0: its own root is taken, and the round
    # still waits for it (it was not counted as abstaining).
    assert gx.leaf(0, 1, signer=1).status_code == 202
    assert gx.leaf(0, 2, signer=2).status_code == 202
    assert gx.status()["phase"] == "leaves"
    assert gx.leaf(0, 0, signer=0).status_code == 202
    s = gx.wait(0, "aggregates")
    assert s["phase"] == "aggregates"
    for nobody in (99, -1):  # no leaf in this round: 404, not a 500
        refused(
            httpx.get(gx.url("/v1/rounds/0/head"), params={"galaxy": nobody}),
            404,
            "unknown_client",
        )
    head = httpx.get(gx.url("/v1/rounds/0/head"), params={"galaxy": 0}).json()
    signed = SignedRoundHead.from_dict(head["head"])
    signed.verify(
        VerifyKey.from_bytes(bytes.fromhex(cluster.global_public_key)),
        run=cluster.run_id,
    )
    aggs = honest(0)
    # Galaxy 0's real root is public (every receipt carries it); the attacker binds
    # a forged aggregate to it, but cannot sign as galaxy 0.
    forged = 50 * aggs[0]
    refused(gx.aggregate(0, 0, forged, signer=1), 401, "bad_signature")
    assert rejected_total(cluster, "bad_signature") >= before + 4
    for g in range(3):
        assert gx.aggregate(0, g, aggs[g], signer=g).status_code == 202
    s = gx.wait(1, "leaves")
    assert s["history"][0]["galaxies"] == [0, 1, 2]
    assert s["history"][0]["excluded"] == {} and s["history"][0]["clipped"] == {}
    expected = w0 + 1.3 * torch.stack(list(aggs.values())).mean(0)
    assert torch.allclose(gx.model(), expected, atol=1e-6)


def test_weights_dtypes_and_norms_a_compromised_galaxy_cannot_abuse(
    cluster: LocalCluster,
) -> None:
    """Galaxies 0 and 2 are compromised (their own keys); galaxy 1 is honest."""
    gx = Galaxies(cluster)
    gx.wait(1, "leaves")
    w1 = gx.model()
    ref = decode_update(httpx.get(gx.url("/v1/reference")).content)["direction"]
    for g in range(3):
        assert gx.leaf(1, g, signer=g).status_code == 202
    gx.wait(1, "aggregates")
    aggs = honest(1)
    # A weight is the galaxy's signed count of aggregated updates, 1..tree size:
    # 0, more than it committed to, or huge (the old header took 10**400) are
    # refused before anything is decoded; there is no negative u64.
    for raw_weight in (0, TREE + 1, 2**64 - 1):
        refused(
            gx.aggregate(1, 2, aggs[2], signer=2, raw_weight=raw_weight),
            422,
            "malformed",
        )
    # float32 of the model's shape, nothing else (a float64 of 1e300 once turned
    # the model to inf).
    for bad in (
        torch.full((SPEC.numel,), 1e300, dtype=torch.float64),
        aggs[2].half(),
        aggs[2].to(torch.int64),
        aggs[2].bool(),
    ):
        refused(gx.aggregate(1, 2, bad, signer=2), 422, "dtype")
    refused(gx.aggregate(1, 2, aggs[2][:-1], signer=2), 422, "shape")
    # Galaxy 0 sends 1000x the public reference direction: direction and agreement
    # pass, only the norm fails; the norm alone is enough to clip it.
    attack = 1000 * ref.float()
    assert gx.aggregate(1, 0, attack, signer=0).status_code == 202
    assert gx.aggregate(1, 1, aggs[1], signer=1).status_code == 202
    assert gx.aggregate(1, 2, aggs[2], signer=2).status_code == 202
    s = gx.wait(2, "leaves")
    record = s["history"][1]
    assert record["applied"] and "0" in record["clipped"], record
    step = gx.model() - w1
    assert torch.isfinite(step).all()
    # What the step would have been had galaxy 0 been honest (FedAvgM, momentum 0.5
    # on the previous round's combined update).
    prev = torch.stack(list(honest(0).values())).mean(0)
    honest_step = 1.3 * (0.5 * prev + torch.stack(list(aggs.values())).mean(0))
    assert float(step.norm()) <= 1.5 * float(honest_step.norm()), (
        float(step.norm()),
        float(honest_step.norm()),
    )


def test_a_galaxy_admits_only_its_own_clients_with_their_credentials(
    tmp_path: Path,
) -> None:
    """Two real galaxies: a client's registration is refused at the other galaxy,
    and a caller can neither mint identities nor take another client's id."""
    from tests.services.players import Players

    config = load_config(
        overrides={
            "clients.count": 6,
            "galaxies.count": 2,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
        }
    )
    cluster = LocalCluster(config, tmp_path, evaluate=False)
    try:
        cluster.start(clients=False)
        p = Players(cluster, 6)
        at0 = cluster.galaxy_url(0) + "/v1/register"
        # Client 1 belongs to galaxy 1 (1 mod 2), whichever galaxy it signs for.
        refused(httpx.post(at0, json=p.registration(1, galaxy=1)), 403, "wrong_galaxy")
        refused(httpx.post(at0, json=p.registration(1, galaxy=0)), 403, "wrong_galaxy")
        # Minting: one caller, fresh keys, every free id of galaxy 0 (bounded).
        minted = SigningKey.generate()
        for c in (0, 2, 4) * 10:
            body = {
                "client_id": c,
                "public_key": minted.public_key.to_bytes().hex(),
                "signature": sign_registration(
                    minted, client_id=c, galaxy_id=0, run=cluster.run_id
                ).hex(),
            }
            refused(httpx.post(at0, json=body), 401, "bad_signature")
        for c in (0, 2, 4):
            assert httpx.post(at0, json=p.registration(c)).status_code == 201
        at1 = cluster.galaxy_url(1) + "/v1/register"
        assert httpx.post(at1, json=p.registration(1, galaxy=1)).status_code == 201
    finally:
        cluster.stop()


def test_a_client_trains_only_on_the_model_the_global_aggregator_signed(
    cluster: LocalCluster,
) -> None:
    """A galaxy relays the global model to its clients. One that scales it (all of
    its clients would then train on it, commit non-finite updates and be blamed at
    their honest galaxies) is caught by the signature, and the client takes the
    model from another galaxy (attack review)."""
    import http.server
    import threading

    from protogalaxy.services.client_runner import (
        ClientRunner,
        ClientSettings,
        ReceiptRejected,
    )

    real = httpx.get(cluster.global_url + "/v1/model")
    version = int(real.headers["x-pg-model-version"])
    tampered = encode_update(
        {k: v * 1e30 for k, v in decode_update(real.content).items()}
    )

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            # a compromised galaxy of this run: it names the run like any other
            self.send_header("x-pg-run", cluster.run_id)
            self.send_header("x-pg-model-version", str(version))
            self.send_header(
                "x-pg-model-signature", real.headers["x-pg-model-signature"]
            )
            self.send_header("content-length", str(len(tampered)))
            self.end_headers()
            self.wfile.write(tampered)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    evil = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        runner = ClientRunner(
            ClientSettings(
                client_ids=[0, 1],
                galaxy_url_template=None,
                galaxy_urls=(evil, cluster.global_url, evil),
                client_seed_file=str(cluster.keys / "clients.seed"),
                global_public_key=cluster.global_public_key,
                run_id=cluster.run_id,
                config_path=str(cluster.config_path),
                retries=0,
            )
        )
        assert runner.fetch_model(version, [0, 1]) == real.content
        assert runner.fetch_model(version + 1, [1]) is None  # not that version
        # Only liars: the runner stops rather than train on an unsigned model.
        with pytest.raises(ReceiptRejected, match="pinned global key"):
            runner.fetch_model(version, [0, 2])
    finally:
        server.shutdown()
