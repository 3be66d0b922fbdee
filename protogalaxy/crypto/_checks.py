"""Boundary checks shared by the crypto types: ``TypeError`` for a wrong type,
``ValueError`` for a wrong value, each message naming the field."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["RUN_ID_MAX", "check_bytes", "check_run_id", "check_u64", "unhex"]

#: Longest run identifier (bytes); it is length-prefixed with one byte when signed.
RUN_ID_MAX: Final = 64
_RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_u64(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an unsigned 64-bit integer of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value < 1 << 64:
        raise ValueError(f"{name} must be in [{minimum}, 2**64), got {value}")
    return value


def check_bytes(name: str, value: object, size: int) -> bytes:
    """``value`` as ``bytes`` of exactly ``size`` bytes."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def check_run_id(value: object, name: str = "run") -> str:
    """``value`` as a run identifier: 1 to 64 ASCII letters, digits, ``.``, ``_``
    or ``-``, starting with a letter or digit (``r3``, ``up-9f2c``, ``sim-0``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not 0 < len(value) <= RUN_ID_MAX or not _RUN_ID.fullmatch(value):
        raise ValueError(
            f"{name} must be 1 to {RUN_ID_MAX} characters of [A-Za-z0-9._-], "
            f"starting with a letter or digit; got {value!r}"
        )
    return value


def unhex(value: object, what: str) -> bytes:
    """``value`` (a hex string, as in the JSON forms) as bytes; ``ValueError``
    naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what}: {value[:80]!r} is not valid hex") from None
