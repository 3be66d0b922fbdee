"""Commitments: canonical, deterministic, hiding, binding, verified on reveal."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protogalaxy.codec import encode_update
from protogalaxy.crypto.commitment import (
    Commitment,
    commit,
    update_digest,
    verify_reveal,
)
from protogalaxy.crypto.errors import CommitmentMismatchError
from protogalaxy.crypto.merkle import hash_leaf

# The worked example of docs/commitment-encoding.md.
EXAMPLE_UPDATE = {
    "w": np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32),
    "b": np.array([1.0], dtype=np.float16),
}
EXAMPLE_META = dict(client_id=7, galaxy_id=1, round=3, timestamp_ms=1_700_000_000_000)
EXAMPLE_NONCE = bytes(range(32))


def example_commitment() -> Commitment:
    c, _ = commit(EXAMPLE_UPDATE, nonce=EXAMPLE_NONCE, **EXAMPLE_META)
    return c


def test_digest_is_sha256_of_the_documented_bytes() -> None:
    encoding = encode_update(EXAMPLE_UPDATE)
    assert encoding.hex() == (
        "50475431"  # magic "PGT1"
        "02000000"  # two tensors
        "0100"
        "62"
        "01"
        "01"
        "0100000000000000"  # "b": float16, shape (1,)
        "0100"
        "77"
        "03"
        "02"
        "0200000000000000"
        "0200000000000000"  # "w": float32 (2,2)
        "000000000000"  # header padding to 40 bytes
        "003c"
        "000000000000"  # b = [1.0] as float16, padded to 8
        "0000803f"
        "000000c0"
        "0000003f"
        "00000000"  # w, row-major
    )
    prefix = (
        b"PGD1"
        + (7).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + (3).to_bytes(8, "little")
        + (1_700_000_000_000).to_bytes(8, "little")
        + EXAMPLE_NONCE
    )
    expected = hashlib.sha256(prefix + encoding).digest()
    c = example_commitment()
    assert c.digest == expected
    assert c.to_bytes() == b"PGC1" + prefix[4:36] + expected
    assert c.leaf_hash == hashlib.sha256(b"\x00" + c.to_bytes()).digest()


def test_known_answer_matches_docs() -> None:
    doc = Path("docs/commitment-encoding.md").read_text(encoding="utf-8")
    c = example_commitment()
    assert c.digest.hex() in doc
    assert c.leaf_hash.hex() in doc


def test_deterministic_across_processes() -> None:
    code = (
        "import numpy as np\n"
        "from protogalaxy.crypto.commitment import commit\n"
        "u={'w':np.array([[1.0,-2.0],[0.5,0.0]],dtype=np.float32),"
        "'b':np.array([1.0],dtype=np.float16)}\n"
        "c,_=commit(u,client_id=7,galaxy_id=1,round=3,timestamp_ms=1700000000000,"
        "nonce=bytes(range(32)))\n"
        "print(c.to_bytes().hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == example_commitment().to_bytes().hex()


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 1, 3, 4)])
def test_every_float_dtype_and_shape(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    meta = dict(EXAMPLE_META, nonce=EXAMPLE_NONCE)
    d = update_digest({"x": x}, **meta)
    assert d == update_digest({"x": x.clone()}, **meta)
    assert d == update_digest([encode_update({"x": x})], **meta)
    if x.numel() > 1:
        y = x.clone().view(-1)
        y[0] = y[1] + 1
        assert update_digest({"x": y.view(shape)}, **meta) != d


def test_numpy_and_torch_agree() -> None:
    meta = dict(EXAMPLE_META, nonce=EXAMPLE_NONCE)
    torch_update = {k: torch.from_numpy(v) for k, v in EXAMPLE_UPDATE.items()}
    assert update_digest(torch_update, **meta) == update_digest(EXAMPLE_UPDATE, **meta)


def test_every_field_is_bound() -> None:
    base = dict(EXAMPLE_META, nonce=EXAMPLE_NONCE)
    d = update_digest(EXAMPLE_UPDATE, **base)
    variants = [
        dict(base, client_id=8),
        dict(base, galaxy_id=2),
        dict(base, round=4),
        dict(base, timestamp_ms=base["timestamp_ms"] + 1),  # type: ignore[operator]
        dict(base, nonce=bytes(31) + b"\x01"),
    ]
    for v in variants:
        assert update_digest(EXAMPLE_UPDATE, **v) != d  # type: ignore[arg-type]
    w = EXAMPLE_UPDATE["w"]
    for update in [
        {"w": w.reshape(4), "b": EXAMPLE_UPDATE["b"]},  # same bytes, other shape
        {"w": w.astype(np.float64), "b": EXAMPLE_UPDATE["b"]},  # other dtype
        {"v": w, "b": EXAMPLE_UPDATE["b"]},  # other name
        {"w": w},  # a tensor dropped
    ]:
        assert update_digest(update, **base) != d  # type: ignore[arg-type]


def test_commitment_hides_the_nonce_and_verifies_the_reveal() -> None:
    c, nonce = commit(EXAMPLE_UPDATE, client_id=1, galaxy_id=0, round=0)
    assert len(nonce) == 32 and nonce not in c.to_bytes()
    verify_reveal(c, EXAMPLE_UPDATE, nonce)
    verify_reveal(c, [encode_update(EXAMPLE_UPDATE)], nonce)  # the received body as is
    with pytest.raises(CommitmentMismatchError):
        verify_reveal(c, EXAMPLE_UPDATE, bytes(32))
    tampered = {"w": EXAMPLE_UPDATE["w"] * 2, "b": EXAMPLE_UPDATE["b"]}
    with pytest.raises(CommitmentMismatchError):
        verify_reveal(c, tampered, nonce)
    with pytest.raises(CommitmentMismatchError, match="cannot be hashed"):
        verify_reveal(c, EXAMPLE_UPDATE, b"short")
    # Two commitments to the same update differ (fresh nonces).
    assert (
        commit(EXAMPLE_UPDATE, client_id=1, galaxy_id=0, round=0)[0].digest != c.digest
    )


def test_commitment_serialization() -> None:
    c = example_commitment()
    assert Commitment.from_bytes(c.to_bytes()) == c
    assert Commitment.from_dict(c.to_dict()) == c
    assert c.leaf_hash == hash_leaf(c.to_bytes())
    with pytest.raises(ValueError, match="68"):
        Commitment.from_bytes(c.to_bytes()[:-1])
    with pytest.raises(ValueError, match="magic"):
        Commitment.from_bytes(b"XXXX" + c.to_bytes()[4:])
    with pytest.raises(ValueError, match="keys"):
        Commitment.from_dict({"client_id": 1})
    with pytest.raises(TypeError, match="client_id"):
        Commitment("1", 0, 0, 0, bytes(32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round"):
        Commitment(1, 0, -1, 0, bytes(32))
    with pytest.raises(ValueError, match="digest"):
        Commitment(1, 0, 0, 0, bytes(31))
