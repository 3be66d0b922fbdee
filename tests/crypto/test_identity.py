"""Ed25519 identities: raw keys, domain separation, fail-closed verification."""

from __future__ import annotations

import pytest

from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.heads import RoundHead, SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import (
    SigningKey,
    VerifyKey,
    domain_message,
    sign_commitment,
    verify_commitment_signature,
)

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
    sig = sign_commitment(key, c)
    verify_commitment_signature(key.public_key, c, sig)
    with pytest.raises(SignatureError):
        verify_commitment_signature(SigningKey.generate().public_key, c, sig)
    with pytest.raises(SignatureError):
        verify_commitment_signature(
            key.public_key, Commitment(3, 1, 10, 1234, bytes(range(32))), sig
        )
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(SignatureError):
        verify_commitment_signature(key.public_key, c, bad)
    with pytest.raises(SignatureError, match="64 bytes"):
        verify_commitment_signature(key.public_key, c, sig[:-1])


def test_domain_separation() -> None:
    key = SigningKey.generate()
    sig = key.sign("commitment", b"payload")
    key.public_key.verify("commitment", b"payload", sig)
    with pytest.raises(SignatureError):
        key.public_key.verify("round-head", b"payload", sig)
    assert domain_message("reveal", b"x") == b"protogalaxy/v1/reveal\x00x"
    with pytest.raises(ValueError, match="domain"):
        key.sign("anything", b"x")


def test_round_head_signing_and_serialization() -> None:
    key = SigningKey.generate()
    head = RoundHead(round=5, tree_size=3, root=bytes(range(32)), timestamp_ms=99)
    signed = sign_round_head(key, head)
    signed.verify(key.public_key)
    assert SignedRoundHead.from_bytes(signed.to_bytes()) == signed
    assert SignedRoundHead.from_dict(signed.to_dict()) == signed
    assert RoundHead.from_bytes(head.to_bytes()) == head
    other = SigningKey.generate()
    with pytest.raises(SignatureError, match="another key"):
        signed.verify(other.public_key)
    # A signature transplanted onto another head, even with the right signer field.
    forged = SignedRoundHead(
        RoundHead(6, 3, bytes(range(32)), 99), signed.signer, signed.signature
    )
    with pytest.raises(SignatureError):
        forged.verify(key.public_key)
    with pytest.raises(ValueError, match="expected"):
        SignedRoundHead.from_bytes(signed.to_bytes()[:-1])
    with pytest.raises(ValueError, match="tree_size"):
        RoundHead(round=5, tree_size=0, root=bytes(32), timestamp_ms=0)


def test_key_validation() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKey.from_bytes(bytes(31))
    with pytest.raises(TypeError):
        SigningKey.from_bytes("00" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        SigningKey.from_bytes(bytes(33))
