"""Boundary checks shared by the crypto types: ``TypeError`` for a wrong type,
``ValueError`` for a wrong value, each message naming the field."""

from __future__ import annotations

__all__ = ["check_bytes", "check_u64"]


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
