"""Binary wire format for model updates and model states (``PGT1``).

A named set of tensors travels as raw little-endian buffers behind a small binary
header. The same bytes are the canonical encoding that commitments hash, so a galaxy
can hash a received body as it is, without decoding and encoding it again. Decoding
is strict: any input that is not exactly the canonical encoding of some tensor set
is rejected with a ``ValueError`` naming the problem. Never pickle.

Layout (all integers little-endian)::

    magic      4 bytes   b"PGT1"
    count      u32       number of tensors, 0..MAX_TENSORS
    count times, tensors sorted by the UTF-8 bytes of their names, names unique:
      name_len u16       1..MAX_NAME_BYTES
      name     name_len bytes of UTF-8
      dtype    u8        a code from DTYPE_CODES
      ndim     u8        0..MAX_NDIM
      dims     ndim x u64
    zero bytes up to the next multiple of 8 (counted from the magic)
    count times, in the same order:
      data     prod(dims) * itemsize bytes, C order, little-endian
      zero bytes up to the next multiple of 8

See ``docs/commitment-encoding.md`` for a worked example.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import numpy as np
import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DTYPE_CODES",
    "MAGIC",
    "TensorHeader",
    "UpdateHeader",
    "decode_update",
    "encode_update",
    "encoded_size",
    "iter_encoded_chunks",
    "parse_header",
    "read_update",
]

MAGIC: Final = b"PGT1"
ALIGN: Final = 8
MAX_TENSORS: Final = 65_536
MAX_NAME_BYTES: Final = 1_024
MAX_NDIM: Final = 32
#: Default size limit for one encoded update or model: 1 GiB.
DEFAULT_MAX_BYTES: Final = 1 << 30

#: Wire code of every supported dtype. Codes are part of the format: never reuse one.
DTYPE_CODES: Final[Mapping[torch.dtype, int]] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
    torch.int8: 5,
    torch.uint8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
_CODE_DTYPES: Final = {code: dtype for dtype, code in DTYPE_CODES.items()}
_NUMPY_DTYPES: Final[Mapping[np.dtype[np.generic], torch.dtype]] = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.bool_): torch.bool,
}
_ZEROS: Final = bytes(ALIGN)
_BIG_ENDIAN: Final = sys.byteorder == "big"


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """Name, dtype and shape of one tensor in an encoded update."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    """The parsed header of an encoded update: where the data starts and ends."""

    tensors: tuple[TensorHeader, ...]
    header_size: int
    total_size: int


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _as_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype not in _NUMPY_DTYPES:
            raise TypeError(
                f"tensor {name!r}: numpy dtype {value.dtype} is not supported; "
                f"use one of {sorted(str(d) for d in _NUMPY_DTYPES)}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(
            f"tensor {name!r}: expected torch.Tensor or numpy.ndarray, "
            f"got {type(value).__name__}"
        )
    if tensor.dtype not in DTYPE_CODES:
        raise TypeError(
            f"tensor {name!r}: dtype {tensor.dtype} is not supported; "
            f"use one of {sorted(str(d) for d in DTYPE_CODES)}"
        )
    if tensor.dim() > MAX_NDIM:
        raise ValueError(
            f"tensor {name!r}: {tensor.dim()} dimensions, at most {MAX_NDIM}"
        )
    return tensor.detach()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """Little-endian C-order bytes of ``tensor``; no copy for contiguous CPU data."""
    t = tensor.cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    if _BIG_ENDIAN and arr.dtype.itemsize > 1:  # pragma: no cover - little-endian CI
        arr = arr.byteswap()
    flat: Any = arr.reshape(-1)
    return memoryview(flat).cast("B")


def _sorted_items(
    tensors: Mapping[str, object],
) -> list[tuple[bytes, str, torch.Tensor]]:
    if not isinstance(tensors, Mapping):
        raise TypeError(
            "tensors: expected a mapping of name to tensor, "
            f"got {type(tensors).__name__}"
        )
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"tensors: {len(tensors)} tensors, at most {MAX_TENSORS}")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        raw = name.encode("utf-8")
        if not 1 <= len(raw) <= MAX_NAME_BYTES:
            raise ValueError(
                f"tensor name {name!r}: 1..{MAX_NAME_BYTES} UTF-8 bytes allowed"
            )
        items.append((raw, name, _as_tensor(name, value)))
    items.sort(key=lambda item: item[0])
    return items


def iter_encoded_chunks(tensors: Mapping[str, object]) -> Iterator[bytes | memoryview]:
    """Yield the canonical encoding of ``tensors`` piece by piece, without copying data.

    Feeding every chunk to one ``hashlib.sha256`` object hashes the update in a
    single pass; ``b"".join`` of the chunks is :func:`encode_update`.
    """
    items = _sorted_items(tensors)
    header = bytearray(MAGIC)
    header += struct.pack("<I", len(items))
    for raw, _, tensor in items:
        shape = tuple(tensor.shape)
        header += struct.pack("<H", len(raw))
        header += raw
        header += struct.pack("<BB", DTYPE_CODES[tensor.dtype], len(shape))
        header += struct.pack(f"<{len(shape)}Q", *shape)
    header += _ZEROS[: _pad(len(header))]
    yield bytes(header)
    for _, _, tensor in items:
        view = _byte_view(tensor)
        if len(view):
            yield view
        pad = _pad(len(view))
        if pad:
            yield _ZEROS[:pad]


def encode_update(tensors: Mapping[str, object]) -> bytes:
    """Encode a mapping of name to tensor (torch or numpy) as ``PGT1`` bytes."""
    return b"".join(iter_encoded_chunks(tensors))


def encoded_size(tensors: Mapping[str, object]) -> int:
    """Size in bytes of :func:`encode_update` of ``tensors``, without encoding."""
    items = _sorted_items(tensors)
    size = 8 + sum(2 + len(raw) + 2 + 8 * t.dim() for raw, _, t in items)
    size += _pad(size)
    for _, _, t in items:
        nbytes = t.numel() * t.element_size()
        size += nbytes + _pad(nbytes)
    return size


class _Reader:
    """Bounds-checked cursor over the header bytes."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str, arg: object = None) -> memoryview:
        """The next ``n`` bytes; ``what`` (formatted with ``arg`` only on failure,
        as this runs per tensor) names them in the error."""
        end = self.pos + n
        if end > len(self.data):
            raise _Truncated(what.format(arg))
        out = self.data[self.pos : end]
        self.pos = end
        return out


class _Truncated(ValueError):
    """The header ended early; :func:`read_update` reads more and tries again."""

    def __init__(self, what: str) -> None:
        super().__init__(f"truncated update: input ends inside the {what}")


def parse_header(
    prefix: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> UpdateHeader:
    """Parse and validate the header at the start of an encoded update.

    ``prefix`` needs to hold only the header. The declared total size is checked
    against ``max_bytes`` here, before any data is read or allocated.

    Raises
    ------
    ValueError
        If the header is truncated, malformed, not canonical, or declares more
        than ``max_bytes`` bytes in all.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 8:
        raise ValueError(f"max_bytes must be an int >= 8, got {max_bytes!r}")
    r = _Reader(memoryview(prefix).cast("B"))
    if bytes(r.take(4, "magic")) != MAGIC:
        raise ValueError(f"not a PGT1 update: bad magic (expected {MAGIC!r})")
    (count,) = struct.unpack("<I", r.take(4, "tensor count"))
    if count > MAX_TENSORS:
        raise ValueError(f"update declares {count} tensors, at most {MAX_TENSORS}")
    tensors: list[TensorHeader] = []
    previous = b""
    data_size = 0
    for i in range(count):
        (name_len,) = struct.unpack("<H", r.take(2, "name length of tensor {}", i))
        if not 1 <= name_len <= MAX_NAME_BYTES:
            raise ValueError(
                f"tensor {i}: name length {name_len}, allowed 1..{MAX_NAME_BYTES}"
            )
        raw = bytes(r.take(name_len, "name of tensor {}", i))
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"tensor {i}: name is not valid UTF-8") from None
        if raw <= previous:
            raise ValueError(
                f"tensor {i} ({name!r}): names must be unique and sorted by UTF-8 bytes"
            )
        previous = raw
        code, ndim = struct.unpack("<BB", r.take(2, "dtype of tensor {!r}", name))
        if code not in _CODE_DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r}: {ndim} dimensions, at most {MAX_NDIM}")
        shape = struct.unpack(
            f"<{ndim}Q", r.take(8 * ndim, "shape of tensor {!r}", name)
        )
        header = TensorHeader(name, _CODE_DTYPES[code], tuple(shape))
        nbytes = header.nbytes
        data_size += nbytes + _pad(nbytes)
        if data_size > max_bytes:
            raise ValueError(
                f"update declares more than max_bytes={max_bytes} bytes of tensor data"
            )
        tensors.append(header)
    pad = r.take(_pad(r.pos), "header padding")
    if any(pad):
        raise ValueError("header padding must be zero bytes")
    total = r.pos + data_size
    if total > max_bytes:
        raise ValueError(f"update of {total} bytes exceeds max_bytes={max_bytes}")
    return UpdateHeader(tuple(tensors), r.pos, total)


def _decode_body(
    header: UpdateHeader, body: memoryview, *, copy: bool = True
) -> dict[str, torch.Tensor]:
    if not copy and body.readonly:
        # Views of an immutable buffer, documented as read-only: silence torch's
        # warning about it once for the whole update.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _decode_tensors(header, body, copy=False)
    return _decode_tensors(header, body, copy=copy)


def _decode_tensors(
    header: UpdateHeader, body: memoryview, *, copy: bool
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for th in header.tensors:
        nbytes = th.nbytes
        if not copy and nbytes and not _BIG_ENDIAN:
            tensor = torch.frombuffer(
                body, dtype=th.dtype, count=math.prod(th.shape), offset=pos
            ).view(th.shape)
        else:
            raw = np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=pos)
            tensor = torch.empty(th.shape, dtype=th.dtype)
            if nbytes:
                flat = tensor.view(-1).view(torch.uint8).numpy()
                flat[:] = raw
                if _BIG_ENDIAN and tensor.element_size() > 1:  # pragma: no cover
                    tensor = _from_little_endian(tensor)
        pos += nbytes
        pad = _pad(nbytes)
        if pad and any(body[pos : pos + pad]):
            raise ValueError(
                f"tensor {th.name!r}: padding after the data must be zero bytes"
            )
        pos += pad
        out[th.name] = tensor
    return out


def _from_little_endian(tensor: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    swapped = torch.from_numpy(raw.numpy().byteswap())
    return swapped.view(torch.bfloat16) if tensor.dtype == torch.bfloat16 else swapped


def decode_update(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """Decode ``PGT1`` bytes into a dict of new CPU tensors.

    With ``copy=False`` the tensors are views of ``data`` (no copy): the caller must
    treat them as read-only and keep ``data`` unchanged while they live. Checking a
    received update needs nothing more.

    Raises
    ------
    ValueError
        If ``data`` is larger than ``max_bytes``, truncated, has trailing bytes, or
        is not the canonical encoding of its tensors.
    """
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise ValueError(f"update of {len(view)} bytes exceeds max_bytes={max_bytes}")
    header = parse_header(view, max_bytes=max_bytes)
    if len(view) < header.total_size:
        raise ValueError(
            f"truncated update: {len(view)} bytes, "
            f"the header declares {header.total_size}"
        )
    if len(view) > header.total_size:
        raise ValueError(
            f"{len(view) - header.total_size} trailing bytes after the declared "
            f"{header.total_size}-byte update"
        )
    return _decode_body(header, view[header.header_size :], copy=copy)


def read_update(
    stream: BinaryIO, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, torch.Tensor]:
    """Read the one encoded update in ``stream``, checking sizes before allocating.

    The header is read in growing pieces and validated first; the body buffer is
    allocated only once its declared size is known to be within ``max_bytes``.
    """
    prefix = bytearray()
    want = 64
    while True:
        chunk = stream.read(want - len(prefix))
        if not chunk:
            raise ValueError(
                f"truncated update: stream ended after {len(prefix)} header bytes"
            )
        prefix += chunk
        try:
            header = parse_header(prefix, max_bytes=max_bytes)
            break
        except _Truncated:
            if want >= max_bytes:
                raise ValueError(
                    f"update header exceeds max_bytes={max_bytes}"
                ) from None
            want = min(want * 2, max_bytes)
    if len(prefix) > header.total_size:
        raise ValueError(
            f"{len(prefix) - header.total_size} trailing bytes after the declared "
            f"{header.total_size}-byte update"
        )
    body = bytearray(header.total_size)
    have = len(prefix)
    body[:have] = prefix
    view = memoryview(body)
    while have < header.total_size:
        n = stream.readinto(view[have:])  # type: ignore[attr-defined]
        if not n:
            raise ValueError(
                f"truncated update: stream ended at {have} of {header.total_size} bytes"
            )
        have += n
    if stream.read(1):
        raise ValueError(
            f"trailing bytes after the declared {header.total_size}-byte update"
        )
    # The buffer is private to the tensors: they may view it without a copy.
    return _decode_body(header, view[header.header_size :], copy=False)
