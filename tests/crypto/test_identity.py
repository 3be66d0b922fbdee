"""Ed25519 identities: raw keys, domain separation, fail-closed verification."""

from __future__ import annotations

import pytest

from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.heads import RoundHead, SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import (
    SigningKey,
    VerifyKey,
    derive_signing_key,
    domain_message,
    sign_commitment,
    sign_registration,
    verify_commitment_signature,
    verify_registration,
)

RUN = "r1"

# RFC 8032 section 7.1, test 1: the empty message.
RFC8032_SECRET = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
)
RFC8032_PUBLIC = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)


def test_raw_keys_match_rfc8032() -> None:
    key = SigningKey.from_bytes(RFC8032_SECRET)
    assert key.public_key.to_bytes() == RFC8032_PUBLIC
    assert key.to_bytes() == RFC8032_SECRET
    assert VerifyKey.from_bytes(RFC8032_PUBLIC) == key.public_key


def test_sign_and_verify_commitment() -> None:
    key = SigningKey.generate()
    c = Commitment(3, 1, 9, 1234, bytes(range(32)))
    sig = sign_commitment(key, c, run=RUN)
    verify_commitment_signature(key.public_key, c, sig, run=RUN)
    with pytest.raises(SignatureError):
        verify_commitment_signature(SigningKey.generate().public_key, c, sig, run=RUN)
    with pytest.raises(SignatureError):
        verify_commitment_signature(
            key.public_key, Commitment(3, 1, 10, 1234, bytes(range(32))), sig, run=RUN
        )
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(SignatureError):
        verify_commitment_signature(key.public_key, c, bad, run=RUN)
    with pytest.raises(SignatureError, match="64 bytes"):
        verify_commitment_signature(key.public_key, c, sig[:-1], run=RUN)
    # The same commitment, signed in another run, does not pass in this one.
    with pytest.raises(SignatureError):
        verify_commitment_signature(key.public_key, c, sig, run="r2")


def test_domain_separation() -> None:
    key = SigningKey.generate()
    sig = key.sign("commitment", b"payload", run=RUN)
    key.public_key.verify("commitment", b"payload", sig, run=RUN)
    with pytest.raises(SignatureError):
        key.public_key.verify("round-head", b"payload", sig, run=RUN)
    with pytest.raises(SignatureError):
        key.public_key.verify("commitment", b"payload", sig, run="r10")
    assert (
        domain_message("reveal", b"x", run="r1") == b"protogalaxy/v1/reveal\x00\x02r1x"
    )
    with pytest.raises(ValueError, match="domain"):
        key.sign("anything", b"x", run=RUN)
    for bad in ("", "a b", "-lead", "x" * 65, "é"):
        with pytest.raises(ValueError, match="run"):
            key.sign("commitment", b"x", run=bad)


def test_registration_proves_the_key_for_the_id_galaxy_and_run() -> None:
    key = SigningKey.generate()
    sig = sign_registration(key, client_id=4, galaxy_id=1, run=RUN)
    verify_registration(key.public_key, sig, client_id=4, galaxy_id=1, run=RUN)
    for kwargs in (
        {"client_id": 5, "galaxy_id": 1, "run": RUN},
        {"client_id": 4, "galaxy_id": 2, "run": RUN},
        {"client_id": 4, "galaxy_id": 1, "run": "r2"},
    ):
        with pytest.raises(SignatureError):
            verify_registration(key.public_key, sig, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SignatureError):
        verify_registration(
            SigningKey.generate().public_key, sig, client_id=4, galaxy_id=1, run=RUN
        )


def test_derived_keys_are_stable_and_distinct() -> None:
    seed = bytes(range(32))
    a = derive_signing_key(seed, purpose="client", index=7)
    assert (
        a.to_bytes() == derive_signing_key(seed, purpose="client", index=7).to_bytes()
    )
    others = {
        derive_signing_key(seed, purpose="client", index=8).to_bytes(),
        derive_signing_key(seed, purpose="galaxy", index=7).to_bytes(),
        derive_signing_key(bytes(32), purpose="client", index=7).to_bytes(),
    }
    assert a.to_bytes() not in others and len(others) == 3
    with pytest.raises(ValueError, match="seed"):
        derive_signing_key(bytes(31), purpose="client", index=0)


def test_round_head_signing_and_serialization() -> None:
    key = SigningKey.generate()
    head = RoundHead(
        round=5, tree_size=3, root=bytes(range(32)), timestamp_ms=99, run=RUN
    )
    signed = sign_round_head(key, head)
    signed.verify(key.public_key, run=RUN)
    with pytest.raises(SignatureError, match="run"):
        signed.verify(key.public_key, run="r2")
    assert SignedRoundHead.from_bytes(signed.to_bytes()) == signed
    assert SignedRoundHead.from_dict(signed.to_dict()) == signed
    assert RoundHead.from_bytes(head.to_bytes()) == head
    other = SigningKey.generate()
    with pytest.raises(SignatureError, match="another key"):
        signed.verify(other.public_key, run=RUN)
    # A signature transplanted onto another head, even with the right signer field.
    forged = SignedRoundHead(
        RoundHead(6, 3, bytes(range(32)), 99, RUN), signed.signer, signed.signature
    )
    with pytest.raises(SignatureError):
        forged.verify(key.public_key, run=RUN)
    # The same head relabelled with another run: the signature does not follow.
    moved = SignedRoundHead(
        RoundHead(5, 3, bytes(range(32)), 99, "r2"), signed.signer, signed.signature
    )
    with pytest.raises(SignatureError):
        moved.verify(key.public_key, run="r2")
    with pytest.raises(ValueError, match="expected"):
        SignedRoundHead.from_bytes(signed.to_bytes()[:-1])
    with pytest.raises(ValueError, match="tree_size"):
        RoundHead(round=5, tree_size=0, root=bytes(32), timestamp_ms=0, run=RUN)


def test_key_validation() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKey.from_bytes(bytes(31))
    with pytest.raises(TypeError):
        SigningKey.from_bytes("00" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        SigningKey.from_bytes(bytes(33))


def test_verification_memo_never_accepts_what_does_not_verify() -> None:
    # The memo of verified signatures must not turn a forgery into a pass: the
    # same signature over another message, another run or under another key
    # still fails after the genuine one was verified (and remembered).
    from protogalaxy.crypto.identity import _VERIFIED, SigningKey

    key, other = SigningKey.generate(), SigningKey.generate()
    sig = key.sign("round-head", b"head", run="r1")
    key.public_key.verify("round-head", b"head", sig, run="r1")
    key.public_key.verify("round-head", b"head", sig, run="r1")  # remembered
    assert len(_VERIFIED) >= 1
    for args in (
        ("round-head", b"head2", sig),
        ("model", b"head", sig),
        ("round-head", b"head", bytes(64)),
    ):
        with pytest.raises(SignatureError):
            key.public_key.verify(*args, run="r1")
    with pytest.raises(SignatureError):
        key.public_key.verify("round-head", b"head", sig, run="r2")
    with pytest.raises(SignatureError):
        other.public_key.verify("round-head", b"head", sig, run="r1")
