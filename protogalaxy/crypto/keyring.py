"""Provisioned identities: who may speak for what.

A *keyring* is a public allow-list, one ``<id>,<public key hex>`` line per party
(``#`` starts a comment): the galaxies' keys, which the global aggregator is
configured with, and the clients' keys, which each galaxy admits registrations
against. Private keys are raw 32-byte files that only their owner mounts.

:func:`provision` makes (or completes) the set of files a deployment needs; the
Helm chart's key hook and ``protogalaxy up`` both call it:

=================  ===========================================================
file               held by
=================  ===========================================================
``global.key``     the global aggregator (private)
``global.pub``     everyone: galaxies and clients pin it (hex)
``galaxy-<g>.key`` galaxy ``g`` (private)
``galaxies.pub``   the global aggregator: keyring of the galaxies' keys
``clients.seed``   the simulated clients (private): each client's key is derived
                   from it and the client's id (:func:`client_key`)
``clients.pub``    the galaxies: keyring of the clients' keys
=================  ===========================================================
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from protogalaxy.crypto.identity import (
    KEY_SIZE,
    SigningKey,
    VerifyKey,
    derive_signing_key,
)

__all__ = ["client_key", "format_keyring", "parse_keyring", "provision"]

_SEED_SIZE = 32


def parse_keyring(text: str, *, what: str = "keyring") -> dict[int, VerifyKey]:
    """``{id: key}`` from ``<id>,<hex>`` lines; ``ValueError`` naming the line for a
    malformed line, a repeated id or a key that is not 32 bytes of hex."""
    out: dict[int, VerifyKey] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        ident, sep, hexkey = (part.strip() for part in line.partition(","))
        if not sep or not ident.isdigit():
            raise ValueError(f"{what} line {number}: expected '<id>,<public key hex>'")
        try:
            key = VerifyKey.from_bytes(bytes.fromhex(hexkey))
        except ValueError as exc:
            raise ValueError(f"{what} line {number}: {exc}") from None
        if int(ident) in out:
            raise ValueError(f"{what} line {number}: id {ident} appears twice")
        out[int(ident)] = key
    return out


def format_keyring(keys: Mapping[int, VerifyKey], *, what: str = "id") -> str:
    lines = [f"# {what},ed25519 public key (hex)"]
    lines += [f"{i},{keys[i].to_bytes().hex()}" for i in sorted(keys)]
    return "\n".join(lines) + "\n"


def client_key(seed: bytes, client_id: int) -> SigningKey:
    """Simulated client ``client_id``'s key, derived from the clients' seed."""
    return derive_signing_key(seed, purpose="client", index=client_id)


def provision(
    *, galaxies: int, clients: int, existing: Mapping[str, bytes] | None = None
) -> dict[str, bytes]:
    """The identity files of a deployment of ``galaxies`` galaxies and ``clients``
    clients (see the module docstring).

    Private keys and the clients' seed already in ``existing`` are kept (an upgrade
    that adds galaxies keeps the others' keys); missing ones are made; the public
    files are computed again from the private ones.
    """
    if galaxies < 1 or clients < 1:
        raise ValueError(
            f"need galaxies >= 1 and clients >= 1, got {galaxies}, {clients}"
        )
    files = dict(existing or {})

    def private(name: str, size: int) -> bytes:
        value = files.get(name)
        if value is None:
            value = files[name] = secrets.token_bytes(size)
        if len(value) != size:
            raise ValueError(f"{name}: {len(value)} bytes, expected {size}")
        return value

    glob = SigningKey.from_bytes(private("global.key", KEY_SIZE))
    files["global.pub"] = glob.public_key.to_bytes().hex().encode()
    galaxy_keys = {
        g: SigningKey.from_bytes(private(f"galaxy-{g}.key", KEY_SIZE)).public_key
        for g in range(galaxies)
    }
    files["galaxies.pub"] = format_keyring(galaxy_keys, what="galaxy").encode()
    seed = private("clients.seed", _SEED_SIZE)
    client_keys = {c: client_key(seed, c).public_key for c in range(clients)}
    files["clients.pub"] = format_keyring(client_keys, what="client").encode()
    return files
