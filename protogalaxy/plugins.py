"""Naming a user's component in a configuration: ``package.module:attr``.

Models, attacks and aggregators resolve the same way: a registered name first,
else an import path, imported in the process that reads the configuration (so in
a deployment the module must be in the image).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

__all__ = ["IMPORT_PATH", "import_object", "is_import_path"]

#: ``package.module:attr``, what the chart's schema accepts beside built-in names.
IMPORT_PATH = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


def is_import_path(name: str) -> bool:
    return re.fullmatch(IMPORT_PATH, name) is not None


def import_object(name: str, what: str) -> Any:
    """``attr`` of ``package.module`` for ``"package.module:attr"``; a ValueError
    that names ``what`` and the cause when it cannot be imported."""
    if not is_import_path(name):
        raise ValueError(f"{what} {name!r} is not an import path 'package.module:attr'")
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {name!r}: {exc}") from None
