"""``python -m protogalaxy.services keygen`` with ``PG_KEYGEN_DIR``: the key hook's
local mode,
run as the real process (what the rendered-chart driver of k8s-tests runs)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.keyring import client_key, parse_keyring

ROOT = Path(__file__).resolve().parents[2]


def keygen(directory: Path, galaxies: object, clients: object) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_")}
    env.update(
        PG_KEYGEN_DIR=str(directory),
        PG_GALAXIES=str(galaxies),
        PG_CLIENTS=str(clients),
        # what the chart also sets; the local mode does not use them
        PG_KEY_SECRET="pg-protogalaxy-keys",
        POD_NAMESPACE="default",
    )
    done = subprocess.run(
        [sys.executable, "-m", "protogalaxy.services", "keygen"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(directory.iterdir())
    }


def test_a_fresh_directory_gets_every_identity(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    code, out = keygen(keys, 2, 5)
    assert code == 0, out
    assert sorted(p.name for p in keys.iterdir()) == [
        "clients.pub",
        "clients.seed",
        "galaxies.pub",
        "galaxy-0.key",
        "galaxy-1.key",
        "global.key",
        "global.pub",
    ]
    glob = SigningKey.from_bytes((keys / "global.key").read_bytes())
    public = glob.public_key.to_bytes().hex()
    assert (keys / "global.pub").read_text() == public
    assert f"global public key {public}" in out
    galaxies = parse_keyring((keys / "galaxies.pub").read_text())
    for g in range(2):
        key = SigningKey.from_bytes((keys / f"galaxy-{g}.key").read_bytes())
        assert galaxies[g].to_bytes() == key.public_key.to_bytes()
    seed = (keys / "clients.seed").read_bytes()
    clients = parse_keyring((keys / "clients.pub").read_text())
    assert sorted(clients) == list(range(5))
    assert clients[4].to_bytes() == client_key(seed, 4).public_key.to_bytes()


def test_private_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """The directory stands for a Secret: nobody else on the machine may read a
    private key or the clients' seed, nor list the directory."""
    keys = tmp_path / "keys"
    old = os.umask(0o022)  # a permissive umask must not leak into the modes
    try:
        code, out = keygen(keys, 1, 3)
    finally:
        os.umask(old)
    assert code == 0, out
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for p in keys.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o644 if p.name.endswith(".pub") else 0o600), (p.name, mode)


def test_keys_never_change_and_an_upgrade_adds_the_new_parties(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    assert keygen(keys, 2, 4)[0] == 0
    before = snapshot(keys)
    # The same settings again: nothing is rewritten (the same inodes, bytes).
    code, out = keygen(keys, 2, 4)
    assert code == 0 and "is complete" in out, out
    assert snapshot(keys) == before
    # More galaxies and clients: the keys already there stay, byte for byte; the
    # new galaxy gets a key and the keyrings name everybody.
    code, out = keygen(keys, 3, 6)
    assert code == 0, out
    assert "galaxy-2.key" in out
    after = snapshot(keys)
    for name in ("global.key", "galaxy-0.key", "galaxy-1.key", "clients.seed"):
        assert after[name] == before[name], name
    assert sorted(parse_keyring((keys / "galaxies.pub").read_text())) == [0, 1, 2]
    assert sorted(parse_keyring((keys / "clients.pub").read_text())) == list(range(6))
    assert after["global.pub"][0] == before["global.pub"][0]
    # Fewer parties than provisioned: nothing is taken away.
    assert keygen(keys, 1, 2)[0] == 0
    assert snapshot(keys)["galaxy-2.key"] == after["galaxy-2.key"]


@pytest.mark.parametrize(
    ("galaxies", "clients", "message"),
    [
        ("three", 5, "PG_GALAXIES must be a whole number, got 'three'"),
        (2, "", "PG_CLIENTS must be a whole number, got ''"),
        (0, 5, "PG_GALAXIES must be at least 1, got 0"),
    ],
)
def test_bad_counts_are_refused_by_name(
    tmp_path: Path, galaxies: object, clients: object, message: str
) -> None:
    code, out = keygen(tmp_path / "keys", galaxies, clients)
    assert code == 1
    assert message in out
    assert not (tmp_path / "keys").exists()


def test_a_damaged_key_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert keygen(keys, 2, 4)[0] == 0
    (keys / "galaxy-1.key").write_bytes(b"short")
    before = snapshot(keys)
    code, out = keygen(keys, 3, 4)
    assert code == 1
    assert "galaxy-1.key: 5 bytes, expected 32" in out
    assert snapshot(keys) == before  # no galaxy-2.key, keyrings untouched


def test_what_a_secret_cannot_hold_is_refused(tmp_path: Path) -> None:
    """A link or a directory among the files is refused, not followed: a link
    named like a key would make keygen adopt (and mount) whatever it points at."""
    keys = tmp_path / "keys"
    assert keygen(keys, 1, 2)[0] == 0
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(bytes(32))
    (keys / "galaxy-1.key").symlink_to(elsewhere)
    code, out = keygen(keys, 2, 2)
    assert code == 1
    assert "galaxy-1.key is not a regular file" in out
    assert not parse_keyring((keys / "galaxies.pub").read_text()).get(1)
    (keys / "galaxy-1.key").unlink()
    (keys / "sub").mkdir()
    code, out = keygen(keys, 2, 2)
    assert code == 1 and "sub is not a regular file" in out
    (keys / "sub").rmdir()
    (tmp_path / "file").write_text("x")
    code, out = keygen(tmp_path / "file", 1, 1)
    assert code == 1 and "exists and is not a directory" in out
