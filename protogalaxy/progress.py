"""Progress on a terminal: a bar across a run's rounds with an ETA, and a bar
through the current round's phases; the round lines print above them.

Only on a terminal (``rich``); off one (a pipe, a file, ``kubectl logs``) the
commands print their plain lines only. Log records on stderr go above the bars.
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ROUND_PHASES", "RunProgress"]

#: what :meth:`Simulation.run_round` reports, in order
ROUND_PHASES = (
    "training",
    "commitments",
    "Merkle trees",
    "receipts and reveals",
    "galaxy defense",
    "audit and global step",
    "evaluation",
)


class RunProgress:
    """``with RunProgress(total, done=0, unit="round") as p:`` then
    ``p.phase(name)`` as a step starts and ``p.finished(line)`` as one ends."""

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        unit: str = "round",
        phases: tuple[str, ...] = ROUND_PHASES,
    ) -> None:
        self.console = Console(file=sys.stdout)
        self.unit = unit
        self.phases = phases
        self._progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._run: TaskID = self._progress.add_task(
            f"{unit}s", total=total, completed=done
        )
        self._step: TaskID | None = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    @staticmethod
    def wanted() -> bool:
        """Whether stdout is a terminal (bars are drawn only there)."""
        return sys.stdout.isatty()

    def __enter__(self) -> RunProgress:
        self._progress.start()
        # log records on the terminal go through the bars' console (above them),
        # not over them; stderr sent elsewhere (2>events.jsonl) keeps them
        if not (sys.stderr.isatty() and os.isatty(1)):
            return self
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (
                sys.__stderr__,
                sys.stderr,
            ):
                self._handlers.append((h, h.stream))
                h.setStream(_Above(self.console))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h, stream in self._handlers:
            h.setStream(stream)
        self._progress.stop()

    def phase(self, index: int, name: str) -> None:
        """Step ``name`` of the ``index``-th unit (a round) starts."""
        if self._step is None:
            self._step = self._progress.add_task("", total=len(self.phases))
        done = self.phases.index(name) if name in self.phases else 0
        self._progress.update(
            self._step,
            completed=done,
            description=f"{self.unit} {index}: {name}",
        )

    def finished(self, line: str | None = None) -> None:
        """One unit is done; ``line`` prints above the bars."""
        if line is not None:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        self._progress.advance(self._run)
        if self._step is not None:
            self._progress.update(self._step, completed=0, description="")


class _Above:
    """A text stream that prints through a rich console (above live bars)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        text = text.rstrip("\n")
        if text:
            self._console.print(text, highlight=False, markup=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass
