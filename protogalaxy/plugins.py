"""Naming a user's component in a configuration: ``package.module:attr``.

Models, attacks and aggregators resolve the same way: a registered name first,
else an import path, imported in the process that reads the configuration (so in
a deployment the module must be in the image).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = [
    "IMPORT_PATH",
    "ImportRefused",
    "import_object",
    "imports_allowed",
    "is_import_path",
    "resolve",
    "untrusted",
]

_ALLOWED: ContextVar[bool] = ContextVar("protogalaxy_imports_allowed", default=True)


class ImportRefused(ValueError):
    """A configuration that someone else wrote names code to import."""


@contextmanager
def untrusted() -> Iterator[None]:
    """Read configurations that someone else wrote (an audited run's
    ``run.json``): no ``package.module:attr`` they name is imported (importing
    runs the module's code), and the components an audit does not need (model,
    attack, dataset, partition) are not resolved at all."""
    token = _ALLOWED.set(False)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def imports_allowed() -> bool:
    return _ALLOWED.get()


#: ``package.module:attr``, what the chart's schema accepts beside built-in names.
IMPORT_PATH = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


def is_import_path(name: str) -> bool:
    return re.fullmatch(IMPORT_PATH, name) is not None


def import_object(name: str, what: str) -> Any:
    """``attr`` of ``package.module`` for ``"package.module:attr"``; a ValueError
    that names ``what`` and the cause when it cannot be imported."""
    if not is_import_path(name):
        raise ValueError(f"{what} {name!r} is not an import path 'package.module:attr'")
    if not _ALLOWED.get():
        raise ImportRefused(
            f"{what} {name!r} names code to import, and this configuration is not "
            "trusted (importing runs the module's code): `protogalaxy audit "
            "--allow-imports` imports it, for runs you trust"
        )
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {name!r}: {exc}") from None


def resolve(
    name: str,
    registry: Mapping[str, Any],
    what: str,
    *,
    choices: Sequence[str],
    accepts: Callable[[Any], bool],
    expected: str,
) -> Any:
    """The component ``registry`` holds under ``name``, or the one
    ``package.module:attr`` names (imported, and checked with ``accepts``); a
    ValueError naming the choices, or what the import found instead of
    ``expected``."""
    if name in registry:
        return registry[name]
    if not is_import_path(name):
        raise ValueError(
            f"{what} must be one of {', '.join(choices)} or an import path "
            f"'package.module:attr'; got {name!r}"
        )
    found = import_object(name, what)
    if not accepts(found):
        raise ValueError(f"{what} {name!r} is not {expected}")
    return found
