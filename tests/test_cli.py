"""The protogalaxy command, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from protogalaxy import __version__
from protogalaxy.crypto import GalaxyTree, GlobalTree, SigningKey, commit, issue_receipt
from protogalaxy.crypto.heads import sign_round_head


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", *args], capture_output=True, text=True
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_verify_receipt(tmp_path: Path) -> None:
    key = SigningKey.generate()
    cs = [
        commit({"w": np.ones(3, np.float32)}, client_id=c, galaxy_id=0, round=2)[0]
        for c in range(5)
    ]
    galaxy = GalaxyTree(cs, galaxy_id=0, round=2)
    glob = GlobalTree([galaxy.leaf()], round=2)
    receipt = issue_receipt(
        3, galaxy, glob, sign_round_head(key, glob.head(1, run="r7"))
    )
    path = tmp_path / "receipt.json"
    path.write_text(receipt.to_json())
    pub = key.public_key.to_bytes().hex()
    ok = run("verify-receipt", str(path), "--global-key", pub, "--round", "2")
    assert ok.returncode == 0, ok.stderr
    assert "OK: client 3 galaxy 0 round 2 of run r7" in ok.stdout
    mine = run("verify-receipt", str(path), "--global-key", pub, "--run", "r7")
    assert mine.returncode == 0, mine.stderr
    other = run("verify-receipt", str(path), "--global-key", pub, "--run", "r8")
    assert other.returncode == 1 and "run" in other.stdout
    bad = json.loads(path.read_text())
    bad["client_proof"]["path"][0] = "00" * 32
    path.write_text(json.dumps(bad))
    fail = run("verify-receipt", str(path), "--global-key", pub)
    assert fail.returncode == 1 and "INVALID: RootMismatchError" in fail.stdout
    path.write_text("{not json")
    assert run("verify-receipt", str(path), "--global-key", pub).returncode == 2
