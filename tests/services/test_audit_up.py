"""Compromised galaxies against the real services (`protogalaxy up`: Redis, the
global aggregator, three galaxies and the client runner as processes): each attack
is caught the round it starts, the galaxy isolated, its clients moved, and the run
directory verifies with `protogalaxy audit`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from protogalaxy.auditor import audit_run
from protogalaxy.cli import main
from protogalaxy.config import load_config
from protogalaxy.protocol.compromised import GALAXY_ATTACKS
from protogalaxy.services.up import LocalCluster
from tests.protocol.test_audit import EXPECTED

pytestmark = pytest.mark.slow


def run(
    tmp_path: Path,
    kind: str,
    during: Callable[[LocalCluster], None] | None = None,
    **overrides: Any,
) -> tuple[LocalCluster, Any]:
    config = load_config(
        overrides={
            "training.rounds": 3,
            "clients.count": 12,
            "clients.samples_per_client": 200,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "galaxy_attack.galaxy": 1,
            "galaxy_attack.kind": kind,
            "galaxy_attack.from_round": 1,
            **overrides,
        }
    )
    cluster = LocalCluster(
        config,
        tmp_path,
        commit_deadline_s=30,
        reveal_deadline_s=30,
        global_deadline_s=15,  # (a withheld transcript is waited for this long)
        evaluate=False,
    )
    try:
        cluster.start()
        status = cluster.wait_finished(timeout=300)
        summary = cluster.summary(status, 0.0)["galaxies"]
        moved = {
            c: httpx.get(
                cluster.galaxy_url(c % 3 if c % 3 != 1 else (0, 2)[c % 2])
                + f"/v1/clients/{c}"
            ).json()
            for c in (1, 4, 7, 10)
        }
        if during is not None:
            during(cluster)
    finally:
        cluster.stop()
    return cluster, (status, moved, summary)


@pytest.mark.parametrize("kind", GALAXY_ATTACKS)
def test_each_galaxy_attack_is_caught_the_round_it_starts(
    tmp_path: Path, kind: str
) -> None:
    cluster, (status, moved, summary) = run(tmp_path, kind)
    assert status["isolated"] == [1], status
    assert summary["isolated"] == {"1": 1} and summary["detection_rate"] == 1.0
    assert summary["false_attributions"] == 0, summary
    misbehaved = [h.get("misbehaved", {}) for h in status["history"]]
    assert misbehaved[0] == {} and misbehaved[2] == {}
    assert misbehaved[1].get("1") in EXPECTED[kind], misbehaved
    # Galaxy 1's clients moved to galaxies 0 and 2 and took part in round 2.
    for c, state in moved.items():
        assert state["last_round"] == 2, (c, state)
    # The run directory verifies, the misbehaviour and its proof included.
    lines: list[str] = []
    assert audit_run(cluster.out, out=lines.append) == 0, "\n".join(lines)
    assert any("galaxy 1 misbehaved" in line for line in lines), lines


def test_without_the_audit_a_dropping_galaxy_goes_unseen(tmp_path: Path) -> None:
    _, (status, _, summary) = run(tmp_path, "drop", **{"audit.enabled": False})
    assert status["isolated"] == []
    # ... and the honest clients it dropped lost reputation for it.
    assert summary["detection_rate"] == 0.0
    assert summary["false_attributions"] >= 1, summary
    assert all(not h.get("misbehaved") for h in status["history"])


def test_audit_url_verifies_the_live_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`protogalaxy audit --url` copies the artefacts from the running global
    aggregator (auditor token) and verifies them; without the token it is refused."""
    codes: dict[str, int] = {}

    def audit_live(cluster: LocalCluster) -> None:
        url = cluster.global_url
        key = str(cluster.out / "keys" / "global.pub")
        codes["no token"] = main(["audit", "--url", url, "--token", "x" * 32])
        token = cluster.auditor_token
        # The acknowledgement endpoint needs no token: it reads at most 4 KiB.
        acks = url + "/v1/rounds/1/acks"
        big = httpx.post(acks, content=b"[" * (64 << 10), timeout=30)
        assert big.status_code == 413 and "too_large" in big.text
        for junk in (b"{", b"[1]", b'{"statement": 3}'):
            assert httpx.post(acks, content=junk).status_code == 422, junk
        # A galaxy serves its transcripts and kept updates to auditors only.
        g0 = cluster.galaxy_url(0) + "/v1/audit/rounds/1"
        auth = {"authorization": f"Bearer {token}"}
        assert httpx.get(g0 + "/transcript").status_code == 401
        assert (
            httpx.get(
                g0 + "/transcript", headers={"authorization": "Bearer x"}
            ).status_code
            == 401
        )
        doc = httpx.get(g0 + "/transcript", headers=auth).json()["transcript"]
        digests = [
            e["reveal_digest"] for e in doc["body"]["clients"] if e.get("reveal_digest")
        ]
        assert digests
        assert httpx.get(f"{g0}/updates/{digests[0]}").status_code == 401
        kept = httpx.get(f"{g0}/updates/{digests[0]}", headers=auth)
        assert kept.status_code == 200 and kept.content[:4] == b"PGT1"
        assert httpx.get(f"{g0}/updates/{'0' * 64}", headers=auth).status_code == 404
        codes["token"] = main(
            ["audit", "--url", url, "--token", token, "--global-key", key]
        )

    run(tmp_path, "withhold_transcript", during=audit_live)
    out = capsys.readouterr()
    assert codes == {"no token": 2, "token": 0}, out
    assert "401" in out.err
    assert "galaxy 1 misbehaved" in out.out
