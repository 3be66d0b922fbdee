"""The pump that hashes and stages a reveal's body while it arrives."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from protogalaxy.services.common import Pump


def test_sinks_see_every_piece_in_order_on_another_thread() -> None:
    seen: list[bytes] = []
    threads: set[int] = set()
    hasher = hashlib.sha256()

    def record(piece: memoryview) -> None:
        threads.add(threading.get_ident())
        seen.append(bytes(piece))

    async def main() -> None:
        pump = Pump(hasher.update, record)
        for i in range(200):
            pump.feed(memoryview(i.to_bytes(2, "big") * 3))
        await pump.close()

    asyncio.run(main())
    pieces = [i.to_bytes(2, "big") * 3 for i in range(200)]
    assert seen == pieces
    assert hasher.digest() == hashlib.sha256(b"".join(pieces)).digest()
    assert threads and threading.get_ident() not in threads


def test_a_failing_sink_stops_the_sinks_and_close_raises_it() -> None:
    later: list[int] = []

    def fail_on_third(piece: memoryview) -> None:
        if piece[0] == 3:
            raise OSError("store went away")

    async def main() -> None:
        pump = Pump(fail_on_third, lambda piece: later.append(piece[0]))
        for i in range(6):
            pump.feed(memoryview(bytes([i])))
        with pytest.raises(OSError, match="store went away"):
            await pump.close()

    asyncio.run(main())
    assert later == [0, 1, 2]  # nothing after the failure reached any sink


def test_clean_up_runs_once_the_last_piece_went_through() -> None:
    release = threading.Event()
    order: list[str] = []

    def slow(piece: memoryview) -> None:
        release.wait(5)
        order.append("piece")

    pump = Pump(slow)
    pump.feed(memoryview(b"x"))
    pump.then(lambda: order.append("clean-up"))  # nobody waits for the pump
    assert order == []
    release.set()
    done = threading.Event()
    pump.then(done.set)
    assert done.wait(5)
    assert order == ["piece", "clean-up"]
