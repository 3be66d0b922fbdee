"""One JSON object per log line, with ``event``, ``galaxy``, ``round``, ``client``
where relevant, so an operator can grep ``"event": "client_quarantined"``."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["HumanFormatter", "JsonFormatter", "setup_logging"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        payload = getattr(record, "event_record", None)
        if isinstance(payload, dict):
            out.update(payload)
        else:
            out["event"] = getattr(record, "event", "log")
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class HumanFormatter(logging.Formatter):
    """One short line per record for a terminal: the event and who it is about
    (the full record stays in the run's files, and in JSON when asked)."""

    WIDTH = 120

    def format(self, record: logging.LogRecord) -> str:
        payload = getattr(record, "event_record", None)
        if not isinstance(payload, dict):
            line = f"{record.levelname.lower()}: {record.getMessage()}"
            if record.exc_info:
                line += "\n" + self.formatException(record.exc_info)
            return line
        who = " ".join(
            f"{k} {payload[k]}" for k in ("round", "galaxy", "client") if k in payload
        )
        detail = ""
        if isinstance(payload.get("reasons"), list):
            detail = ": " + ", ".join(str(r) for r in payload["reasons"])
        elif "detail" in payload:
            detail = f": {payload['detail']}"
        elif "reason" in payload:
            detail = f": {payload['reason']}"
        if isinstance(payload.get("reputation"), (int, float)):
            detail += f" (reputation {payload['reputation']:.2f})"
        line = (
            f"{record.levelname.lower()}: {payload.get('event', 'log')} {who}{detail}"
        )
        return line if len(line) <= self.WIDTH else line[: self.WIDTH - 3] + "..."


def setup_logging(level: str = "info", stream: Any = None, fmt: str = "json") -> None:
    """Log records at ``level`` and above to ``stream`` (stderr): as JSON lines
    (``fmt`` "json", what services and files keep), as short lines ("human"), or
    human on a terminal and JSON otherwise ("auto")."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    human = fmt == "human" or (
        fmt == "auto" and hasattr(out, "isatty") and out.isatty()
    )
    handler.setFormatter(HumanFormatter() if human else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
