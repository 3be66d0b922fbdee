"""PGT1 wire format: exact round trips, strict decoding, limits before allocation."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protogalaxy.codec import (
    DTYPE_CODES,
    decode_update,
    encode_update,
    encoded_size,
    iter_encoded_chunks,
    parse_header,
    read_update,
)

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(10, 1, 5, 5, generator=g),
        "conv1.bias": torch.randn(10, generator=g).to(torch.float16),
        "fc.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # bitwise: NaN payloads and signed zeros must survive
        ua = a[k].reshape(-1).view(torch.uint8) if a[k].numel() else a[k]
        ub = b[k].reshape(-1).view(torch.uint8) if b[k].numel() else b[k]
        assert torch.equal(ua, ub), k


def test_round_trip_every_dtype() -> None:
    t = sample()
    for dtype in DTYPE_CODES:
        t[f"x.{dtype}"] = torch.arange(12).reshape(3, 4).to(dtype)
    blob = encode_update(t)
    assert len(blob) == encoded_size(t)
    assert len(blob) % 8 == 0
    assert_same(t, decode_update(blob))
    assert_same(t, read_update(io.BytesIO(blob)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_bit_exact(dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-8]).to(
        dtype
    )
    raw = x.view(torch.uint8).clone()
    # a NaN with a non-default payload
    raw[-x.element_size() :] = 0xFF
    x = raw.view(dtype)
    assert_same({"x": x}, decode_update(encode_update({"x": x})))


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from(FLOATS),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = {
        "w": torch.randn(tuple(shape), generator=g).to(dtype),
        "a": torch.randn(3, generator=g),
    }
    assert_same(t, decode_update(encode_update(t)))


def test_numpy_input_and_non_contiguous_tensors() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base.t()  # non-contiguous
    assert not view.is_contiguous()
    assert encode_update({"x": view}) == encode_update({"x": view.contiguous()})
    assert encode_update({"x": view.numpy()}) == encode_update({"x": view.contiguous()})


def test_canonical_regardless_of_insertion_order() -> None:
    t = sample()
    assert encode_update(dict(reversed(list(t.items())))) == encode_update(t)
    assert b"".join(bytes(c) for c in iter_encoded_chunks(t)) == encode_update(t)


def test_bad_inputs_to_encoder() -> None:
    with pytest.raises(TypeError, match=r"expected torch.Tensor"):
        encode_update({"x": [1.0, 2.0]})
    with pytest.raises(TypeError, match="not supported"):
        encode_update({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="not supported"):
        encode_update({"x": np.zeros(2, dtype=np.uint64)})
    with pytest.raises(ValueError, match="UTF-8 bytes"):
        encode_update({"": torch.zeros(1)})
    with pytest.raises(TypeError, match="names must be str"):
        encode_update({1: torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="mapping"):
        encode_update([torch.zeros(1)])  # type: ignore[arg-type]


def test_every_truncation_is_rejected() -> None:
    blob = encode_update({"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float16)})
    for n in range(len(blob)):
        with pytest.raises(ValueError, match=r"truncated|magic"):
            decode_update(blob[:n])
        with pytest.raises(ValueError, match=r"truncated|magic"):
            read_update(io.BytesIO(blob[:n]))


def test_trailing_bytes_rejected() -> None:
    blob = encode_update({"a": torch.ones(3)})
    with pytest.raises(ValueError, match="trailing"):
        decode_update(blob + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_update(io.BytesIO(blob + b"\x00" * 8))


def header(*tensors: tuple[bytes, int, tuple[int, ...]]) -> bytes:
    out = b"PGT1" + struct.pack("<I", len(tensors))
    for name, code, shape in tensors:
        out += (
            struct.pack("<H", len(name)) + name + struct.pack("<BB", code, len(shape))
        )
        out += struct.pack(f"<{len(shape)}Q", *shape)
    return out + bytes(-len(out) % 8)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"XXXX" + bytes(4), "magic"),
        (header((b"b", 3, (1,)), (b"a", 3, (1,))) + bytes(16), "sorted"),
        (header((b"a", 3, (1,)), (b"a", 3, (1,))) + bytes(16), "unique"),
        (header((b"a", 99, (1,))) + bytes(8), "unknown dtype"),
        (header((b"\xff\xfe", 3, (1,))) + bytes(8), "UTF-8"),
        (header((b"a", 3, (1,)))[:-1] + b"\x01" + bytes(8), "padding"),
        (header((b"a", 3, (1,))) + b"\x00" * 4 + b"\x01" + b"\x00" * 3, "padding"),
        (b"PGT1" + struct.pack("<I", 10**6), "at most"),
    ],
)
def test_malformed_headers(blob: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_update(blob)


def test_size_limit_enforced_before_allocation() -> None:
    # A 46-byte header that declares 2**40 float64 values (8 TiB).
    blob = header((b"w", 4, (2**20, 2**20)))
    tracemalloc.start()
    with pytest.raises(ValueError, match="max_bytes"):
        read_update(io.BytesIO(blob + bytes(64)), max_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_bytes"):
        decode_update(blob, max_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
    small = encode_update({"a": torch.ones(100)})
    with pytest.raises(ValueError, match="exceeds max_bytes"):
        decode_update(small, max_bytes=64)
    assert parse_header(small).total_size == len(small)


def test_decode_without_copy_views_the_buffer() -> None:
    tensors = sample()
    body = bytearray(encode_update(tensors))
    views = decode_update(body, copy=False)
    assert_same(views, tensors)
    # The float32 tensor shares the buffer: a change to the bytes shows through.
    w = views["conv1.weight"]
    before = w.flatten()[0].item()
    start = w.untyped_storage().data_ptr() - np.frombuffer(body, np.uint8).ctypes.data
    assert 0 < start < len(body)
    body[start : start + 4] = struct.pack("<f", before + 1.0)
    assert w.flatten()[0].item() == before + 1.0
    # An immutable buffer decodes the same, without a copy and without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(decode_update(bytes(body), copy=False), views)
