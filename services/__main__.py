"""The container's entry point:
``python -m protogalaxy.services {galaxy|global|client|keygen}``.

Galaxy and global run under uvicorn on ``PG_HOST:PG_PORT`` (default 0.0.0.0:8000);
configuration comes from ``PG_*`` environment variables (see each service's
``Settings.from_env``). Logs are one JSON object per line on stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from protogalaxy.logs import setup_logging


def _cpu_quota() -> int | None:
    """The container's CPU limit in whole CPUs (cgroup v2 ``cpu.max``), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def _torch_threads() -> None:
    """Size torch's intra-op pool: ``PG_TORCH_THREADS``, else the container's CPU
    limit. torch otherwise starts one thread per host core, and on a shared node
    its parallel kernels then wait on threads that are not scheduled."""
    raw = os.environ.get("PG_TORCH_THREADS") or _cpu_quota()
    if raw:
        import torch

        torch.set_num_threads(int(raw))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("galaxy", "global", "client", "keygen"):
        print(
            "usage: python -m protogalaxy.services {galaxy|global|client|keygen}",
            file=sys.stderr,
        )
        return 2
    setup_logging(os.environ.get("PG_LOG_LEVEL", "warning"))
    role = argv[0]
    if role == "keygen":
        from protogalaxy.services import keygen

        return keygen.main()
    _torch_threads()
    if role == "client":
        from protogalaxy.services.client_runner import (
            ClientRunner,
            ClientSettings,
            ReceiptRejected,
        )

        try:
            rounds = ClientRunner(ClientSettings.from_env()).run()
        except ReceiptRejected as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        print(f"client runner done: took part in rounds {rounds}", file=sys.stderr)
        return 0
    import uvicorn

    if role == "galaxy":
        from protogalaxy.services import galaxy_app

        app = galaxy_app.create_app(galaxy_app.GalaxySettings.from_env())
    else:
        from protogalaxy.services import global_app

        app = global_app.create_app(global_app.GlobalSettings.from_env())
    from protogalaxy.services.server import ServerLimits, guarded_protocol

    limits = ServerLimits(
        max_per_peer=int(os.environ.get("PG_MAX_CONNECTIONS_PER_PEER", "64")),
        header_timeout_s=float(os.environ.get("PG_HEADER_TIMEOUT_S", "10")),
        body_idle_timeout_s=float(os.environ.get("PG_BODY_IDLE_TIMEOUT_S", "30")),
    )
    uvicorn.run(
        app,
        host=os.environ.get("PG_HOST", "0.0.0.0"),
        port=int(os.environ.get("PG_PORT", "8000")),
        log_config=None,
        access_log=False,
        # one peer holds at most max_per_peer of these (services.server)
        limit_concurrency=int(os.environ.get("PG_MAX_CONNECTIONS", "1024")),
        http=guarded_protocol(limits),
        ws="none",  # no upgrades: a connection stays under the limits above
        timeout_keep_alive=5,
        # Long polls would hold a graceful shutdown for their whole wait.
        timeout_graceful_shutdown=int(os.environ.get("PG_SHUTDOWN_GRACE_S", "3")),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
