"""Galaxy statements and provisioned keyrings: round trips, and every corruption
of a signed statement refused."""

from __future__ import annotations

import pytest

from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.keyring import (
    client_key,
    format_keyring,
    parse_keyring,
    provision,
)
from protogalaxy.crypto.statements import (
    Abstention,
    Acknowledgement,
    AggregateStatement,
    ModelStatement,
    Signed,
    aggregate_digest,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf

RUN = "r3"
KEY = SigningKey.generate()
STATEMENTS = [
    GalaxyLeaf(4, 1, 9, bytes(range(32))),
    Abstention(4, 1),
    AggregateStatement(
        4, 1, 9, bytes(range(32)), 7, aggregate_digest(b"\x00" * 16), bytes(32)
    ),
    Acknowledgement(4, 1, 7, bytes(68), bytes(range(32))),
    ModelStatement(4, bytes(range(32))),
]


@pytest.mark.parametrize("statement", STATEMENTS, ids=lambda s: type(s).__name__)
def test_a_signed_statement_round_trips_and_fails_closed(statement: object) -> None:
    signed = sign_statement(KEY, statement, run=RUN)  # type: ignore[type-var]
    signed.verify(KEY.public_key, run=RUN)
    kind = type(statement)
    assert Signed.from_dict(kind, signed.to_dict()) == signed  # type: ignore[type-var]
    assert kind.from_bytes(statement.to_bytes()) == statement  # type: ignore[attr-defined]
    with pytest.raises(SignatureError):
        signed.verify(SigningKey.generate().public_key, run=RUN)
    with pytest.raises(SignatureError):
        signed.verify(KEY.public_key, run="r4")
    # Every single-byte change of the signed bytes breaks the signature (or the
    # parse), so no field can be altered under a galaxy's signature.
    raw = statement.to_bytes()  # type: ignore[attr-defined]
    for i in range(len(raw)):
        flipped = raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :]
        try:
            other = kind.from_bytes(flipped)  # type: ignore[attr-defined]
        except ValueError:
            continue
        with pytest.raises(SignatureError):
            Signed(other, signed.signature).verify(KEY.public_key, run=RUN)
    with pytest.raises(ValueError):
        kind.from_bytes(raw[:-1])  # type: ignore[attr-defined]


def test_a_signature_for_one_kind_does_not_pass_as_another() -> None:
    abst = sign_statement(KEY, Abstention(4, 1), run=RUN)
    # The same 20 bytes could never be a leaf, but the domain separates anyway:
    # a root's signature never verifies as an aggregate's and so on.
    leaf = sign_statement(KEY, STATEMENTS[0], run=RUN)
    with pytest.raises(SignatureError):
        KEY.public_key.verify(
            "abstention", leaf.statement.to_bytes(), leaf.signature, run=RUN
        )
    with pytest.raises(SignatureError):
        KEY.public_key.verify(
            "galaxy-root", abst.statement.to_bytes(), abst.signature, run=RUN
        )


def test_an_aggregate_weight_is_between_one_and_the_tree_size() -> None:
    for weight in (0, 10, 2**64):
        with pytest.raises(ValueError):
            AggregateStatement(4, 1, 9, bytes(32), weight, bytes(32), bytes(32))
    for weight in (-1, 1.0, "3", True):
        with pytest.raises((TypeError, ValueError)):
            AggregateStatement(4, 1, 9, bytes(32), weight, bytes(32), bytes(32))  # type: ignore[arg-type]
    # Bytes that claim a weight above the tree size do not parse.
    st = AggregateStatement(4, 1, 9, bytes(32), 9, bytes(32), bytes(32))
    raw = bytearray(st.to_bytes())
    raw[60:68] = (10).to_bytes(8, "little")
    with pytest.raises(ValueError, match="exceeds"):
        AggregateStatement.from_bytes(bytes(raw))
    with pytest.raises(ValueError):
        Signed.from_dict(Abstention, {"statement": {"round": 1}, "signature": "00"})


def test_keyrings_parse_strictly() -> None:
    keys = {i: SigningKey.generate().public_key for i in (0, 3, 12)}
    text = format_keyring(keys, what="client")
    assert parse_keyring(text) == keys
    for bad, match in [
        ("1;abcd", "line 1"),
        ("x,00", "line 1"),
        ("1," + "00" * 31, "32 bytes"),
        ("1," + "zz" * 32, "line 1"),
        (f"1,{'11' * 32}\n1,{'22' * 32}", "twice"),
        ("-1," + "00" * 32, "line 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_keyring(bad)


def test_provisioning_keeps_keys_and_adds_the_missing() -> None:
    first = provision(galaxies=2, clients=4)
    assert set(first) == {
        "global.key",
        "global.pub",
        "galaxy-0.key",
        "galaxy-1.key",
        "galaxies.pub",
        "clients.seed",
        "clients.pub",
    }
    clients = parse_keyring(first["clients.pub"].decode())
    assert [clients[c] for c in range(4)] == [
        client_key(first["clients.seed"], c).public_key for c in range(4)
    ]
    assert provision(galaxies=2, clients=4, existing=first) == first
    grown = provision(galaxies=3, clients=6, existing=first)
    for name in ("global.key", "galaxy-0.key", "galaxy-1.key", "clients.seed"):
        assert grown[name] == first[name]
    galaxies = parse_keyring(grown["galaxies.pub"].decode())
    assert sorted(galaxies) == [0, 1, 2]
    assert galaxies[2] == SigningKey.from_bytes(grown["galaxy-2.key"]).public_key
    assert sorted(parse_keyring(grown["clients.pub"].decode())) == list(range(6))
    with pytest.raises(ValueError, match=r"global\.key"):
        provision(galaxies=1, clients=1, existing={"global.key": b"short"})
