"""Copy a live run's published artefacts (``protogalaxy audit --url``).

The global aggregator lists them at ``GET /v1/audit/files`` and serves each at
``GET /v1/audit/files/<path>`` to holders of the auditor token. Nothing here is
trusted: the auditor verifies every byte afterwards against the signatures and the
pinned global key. This only refuses what could hurt the machine running the audit:
a path that leaves the target directory, too many files, or too many bytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath

import httpx

from protogalaxy.artefacts import is_published

__all__ = ["DEADLINE_S", "MAX_BYTES", "MAX_FILES", "FetchError", "fetch_run"]

#: bounds on what one fetch copies, and how long it may take; a larger run is
#: audited from its directory
MAX_FILES = 100_000
MAX_BYTES = 2 << 30
DEADLINE_S = 900.0


class FetchError(Exception):
    """The artefacts could not be copied: the server, the network or a bound."""


def _safe(name: object) -> PurePosixPath:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise FetchError(f"the server listed an unusable artefact name {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts):
        raise FetchError(f"the server listed a path outside the run: {name!r}")
    if not is_published(str(p)):
        raise FetchError(f"the server listed a file a run does not publish: {name!r}")
    return p


def fetch_run(
    url: str,
    into: Path,
    *,
    token: str | None = None,
    timeout_s: float = 30.0,
    deadline_s: float = DEADLINE_S,
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_BYTES,
) -> list[str]:
    """Download every artefact the global aggregator at ``url`` publishes into
    ``into``; returns their relative paths. Raises :class:`FetchError` for an
    unreachable or misbehaving server, a listing it will not follow, or a bound
    passed (files, bytes, the overall deadline)."""
    try:
        return _fetch(
            url, Path(into), token, timeout_s, time.monotonic() + deadline_s,
            max_files, max_bytes,
        )  # fmt: skip
    except httpx.HTTPError as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
    except (ValueError, TypeError) as exc:  # JSON that is not a listing
        raise FetchError(f"{url}: the artefact listing is unusable ({exc})") from None


def _fetch(
    url: str,
    into: Path,
    token: str | None,
    timeout_s: float,
    deadline: float,
    max_files: int,
    max_bytes: int,
) -> list[str]:
    token = token if token is not None else os.environ.get("PG_AUDITOR_TOKEN", "")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    base = url.rstrip("/")
    total = 0

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise FetchError("the copy took longer than its deadline")

    with httpx.Client(timeout=timeout_s, headers=headers) as http:
        listing = http.get(f"{base}/v1/audit/files")
        if listing.status_code != 200:
            raise FetchError(
                f"GET /v1/audit/files: {listing.status_code} {listing.text[:200]}"
            )
        names = listing.json()
        if not isinstance(names, list):
            raise FetchError("the server's artefact listing is not a list")
        if len(names) > max_files:
            raise FetchError(f"the server lists {len(names)} artefacts (> {max_files})")
        paths = [_safe(n) for n in names]
        for rel in paths:
            in_time()
            target = into.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with http.stream("GET", f"{base}/v1/audit/files/{rel}") as resp:
                if resp.status_code != 200:
                    resp.read()
                    why = f"{resp.status_code} {resp.text[:200]}"
                    raise FetchError(f"GET /v1/audit/files/{rel}: {why}")
                with open(target, "wb") as f:
                    for chunk in resp.iter_bytes():
                        total += len(chunk)
                        if total > max_bytes:
                            raise FetchError(
                                f"the run's artefacts exceed {max_bytes} bytes"
                            )
                        in_time()
                        f.write(chunk)
    return [str(p) for p in paths]
