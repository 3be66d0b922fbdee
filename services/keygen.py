"""``python -m protogalaxy.services keygen``: provision every party's Ed25519
identity in a
Kubernetes Secret, or in a directory.

The Helm chart runs this as a pre-install/pre-upgrade hook Job. The Secret
(``PG_KEY_SECRET``) holds the files of :func:`protogalaxy.crypto.keyring.provision`:
``global.key`` (mounted only into the global aggregator), ``galaxy-<g>.key`` (each
mounted only into galaxy ``g``), ``clients.seed`` (only into the client Job: the
simulated clients derive their keys from it), and the public ``global.pub``,
``galaxies.pub`` and ``clients.pub``. Keys already in the Secret are never changed,
so identities survive upgrades; an upgrade to more galaxies or clients adds theirs
(``PG_GALAXIES``, ``PG_CLIENTS``) and rewrites the public keyrings.

Where there is no Kubernetes API (the rendered-chart driver of ``k8s-tests/``),
``PG_KEYGEN_DIR`` names a directory that stands in for the Secret: one file per
Secret key. The same :func:`provision` call reads the files already there and
keeps every key among them; only missing or changed files are written (private
ones mode 0600, public ones 0644, each by an atomic rename), and the directory is
locked while it is read and written, as the API's resourceVersion guards the
Secret.

Environment: ``PG_GALAXIES``, ``PG_CLIENTS``, and either ``PG_KEYGEN_DIR`` or
``PG_KEY_SECRET`` (the Secret's name) and ``POD_NAMESPACE``.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import stat
import sys
from pathlib import Path

from protogalaxy.crypto.keyring import provision
from protogalaxy.services.common import env

__all__ = ["main", "provision_dir"]

#: what a Secret key may be called (Kubernetes: ``[-._a-zA-Z0-9]+``)
_KEY_NAME = re.compile(r"[-._a-zA-Z0-9]+")


def _count(name: str) -> int:
    raw = env(name)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def main() -> int:
    try:
        galaxies, clients = _count("PG_GALAXIES"), _count("PG_CLIENTS")
        directory = os.environ.get("PG_KEYGEN_DIR", "")
        if directory:
            return provision_dir(Path(directory), galaxies=galaxies, clients=clients)
        return _provision_secret(galaxies=galaxies, clients=clients)
    except ValueError as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 1


def _read_dir(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` (the Secret's keys); ``ValueError`` for anything
    a Secret could not hold: a link, a sub-directory, a name no key may have."""
    have: dict[str, bytes] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".pg-keygen-"):
            continue  # a temporary file of an interrupted write
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"PG_KEYGEN_DIR: {entry} is not a regular file (links and "
                "directories are refused: the directory stands for one Secret)"
            )
        if not _KEY_NAME.fullmatch(entry.name):
            raise ValueError(
                f"PG_KEYGEN_DIR: {entry.name!r} is not a valid Secret key name"
            )
        have[entry.name] = entry.read_bytes()
    return have


def _write_file(directory: Path, name: str, data: bytes) -> None:
    """``data`` into ``directory/name`` by an atomic rename, private files 0600
    from the start (never readable by others, not even for a moment)."""
    mode = 0o644 if name.endswith(".pub") else 0o600
    tmp = directory / f".pg-keygen-{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)


def provision_dir(directory: Path, *, galaxies: int, clients: int) -> int:
    """Provision the identity files in ``directory`` (made 0700 when missing):
    keys already there never change; missing ones are added and the public files
    recomputed. Returns the process's exit code."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"PG_KEYGEN_DIR: {directory} exists and is not a directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another keygen waits for this one
        have = _read_dir(directory)
        files = provision(galaxies=galaxies, clients=clients, existing=have)
        changed = sorted(k for k, v in files.items() if have.get(k) != v)
        for name in changed:
            _write_file(directory, name, files[name])
    finally:
        os.close(fd)  # releases the lock
    public = files["global.pub"].decode()
    if not changed:
        print(f"keygen: {directory} is complete; global public key {public}")
    else:
        added = sorted(set(files) - set(have))
        print(
            f"keygen: {directory} provisioned ({', '.join(added) or 'updated'}); "
            f"global public key {public}"
        )
    return 0


def _provision_secret(*, galaxies: int, clients: int) -> int:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    name, namespace = env("PG_KEY_SECRET"), env("POD_NAMESPACE")
    api = client.CoreV1Api()
    for _ in range(5):  # another keygen may write between our read and our write
        existing = None
        try:
            existing = api.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        have = {
            k: base64.b64decode(v)
            for k, v in ((existing.data or {}) if existing else {}).items()
        }
        files = provision(galaxies=galaxies, clients=clients, existing=have)
        public = files["global.pub"].decode()
        if files == have:
            print(f"keygen: secret {name} is complete; global public key {public}")
            return 0
        data: dict[str, bytes | str] = {
            k: base64.b64encode(v).decode() for k, v in files.items()
        }
        try:
            if existing is None:
                api.create_namespaced_secret(
                    namespace,
                    client.V1Secret(
                        metadata=client.V1ObjectMeta(
                            name=name,
                            labels={
                                "app.kubernetes.io/managed-by": "protogalaxy-keygen"
                            },
                        ),
                        type="Opaque",
                        data=data,
                    ),
                )
            else:
                # resourceVersion makes the replace fail (409) if the Secret
                # changed since we read it: then read again and merge again.
                existing.data = data
                api.replace_namespaced_secret(name, namespace, existing)
        except ApiException as exc:
            if exc.status != 409:
                raise
            continue
        added = sorted(set(files) - set(have))
        print(
            f"keygen: secret {name} provisioned ({', '.join(added) or 'updated'}); "
            f"global public key {public}"
        )
        return 0
    print(f"keygen: secret {name} kept changing under us", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
