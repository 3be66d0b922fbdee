"""The global aggregator's fetch of a galaxy's revealed updates for its audit,
against galaxies that lie, stall or fail, played by a raw HTTP server on
loopback: the fetch ends by its deadline (PG_AUDIT_FETCH_S) whatever the galaxy
does, takes only bytes framed exactly for the digest asked, never inflates or
reads past its cap, and asks again when the answer is not the galaxy's (a 5xx,
or a 409 from a pod of another run) instead of calling its updates missing."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from protogalaxy.services.global_app import fetch_updates

FETCH_S = 2.0
MAX_UPDATE = 1 << 16

Answer = Callable[[int, list[str]], Awaitable[bytes | None]]


def head(status: int, **extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def framed(bodies: list[bytes], count: int | None = None) -> bytes:
    body = b"".join(len(b).to_bytes(8, "little") + b for b in bodies)
    n = len(bodies) if count is None else count
    return head(200, x_pg_count=str(n), content_length=str(len(body))) + body


def update(digest: str) -> bytes:
    return b"u" + digest[:8].encode()


def fetch(answer: Answer, n: int = 3) -> tuple[dict[int, bytes], set[int], int, float]:
    """Run the real fetch against a galaxy answering with ``answer(request
    number, digests asked)``: what it took, whether the galaxy was unreachable,
    how many requests it sent, and how long it took."""
    requests = 0

    async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
            target = raw.split(b" ")[1].decode()
            asked = parse_qs(urlsplit(target).query)["digests"][0].split(",")
            out = await answer(requests, asked)
            if out is not None:
                w.write(out)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def main() -> tuple[dict[int, dict[int, bytes]], set[int]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [{"client": c, "reveal_digest": f"{c:064x}"} for c in range(n)]
        r = SimpleNamespace(
            lock=threading.Lock(),
            agg=SimpleNamespace(
                round_state=SimpleNamespace(
                    transcripts={0: (SimpleNamespace(body={"clients": clients}),)}
                )
            ),
            settings=SimpleNamespace(
                auditor_token="t",
                run_id="run",
                audit_fetch_s=FETCH_S,
                max_update_bytes=MAX_UPDATE,
            ),
            galaxy_url=lambda g: f"http://127.0.0.1:{port}",
        )
        try:
            return await asyncio.wait_for(
                fetch_updates(r, 0, {0: list(range(n))}),  # type: ignore[arg-type]
                FETCH_S + 10,
            )
        finally:
            server.close()

    t0 = time.monotonic()
    out, unreachable = asyncio.run(main())
    return out.get(0, {}), unreachable, requests, time.monotonic() - t0


def test_an_honest_galaxy_in_pages() -> None:
    async def answer(_: int, asked: list[str]) -> bytes:
        return framed([update(d) for d in asked[:100]])  # 100 an answer

    got, unreachable, requests, _ = fetch(answer, n=300)
    assert unreachable == set() and requests == 3
    assert got == {c: update(f"{c:064x}") for c in range(300)}


def test_a_galaxy_that_is_briefly_down_is_asked_again() -> None:
    async def answer(i: int, asked: list[str]) -> bytes:
        if i == 1:
            return head(503, content_length="0")
        if i == 2:
            return head(409, content_length="0")  # a pod of another run
        return framed([update(d) for d in asked])

    got, unreachable, requests, _ = fetch(answer)
    assert unreachable == set() and requests == 3 and len(got) == 3


@pytest.mark.parametrize(
    "stall", ["drip", "late", "page_at_a_time", "always_503"], ids=str
)
def test_a_stalling_galaxy_is_unreachable_by_the_deadline(stall: str) -> None:
    async def answer(i: int, asked: list[str]) -> bytes | None:
        if stall == "always_503":
            return head(503, content_length="0")
        if stall == "late":
            await asyncio.sleep(FETCH_S + 5)
            return framed([update(d) for d in asked])
        if stall == "page_at_a_time":
            await asyncio.sleep(0.6)
            return framed([update(asked[0])])
        body = framed([update(d) for d in asked])
        return body[: len(body) // 2]  # and then nothing more

    got, unreachable, _, took = fetch(answer, n=8)
    assert unreachable == {0} and got == {}
    assert took < FETCH_S + 2


@pytest.mark.parametrize(
    "lie",
    ["count_past_asked", "length_past_body", "trailing", "gzip", "over_cap"],
    ids=str,
)
def test_a_lying_answer_credits_nothing_and_is_not_read_on(lie: str) -> None:
    async def answer(_: int, asked: list[str]) -> bytes:
        bodies = [update(d) for d in asked]
        if lie == "count_past_asked":
            return framed(bodies, count=len(asked) + 1)
        if lie == "length_past_body":
            raw = (100).to_bytes(8, "little") + b"abc"
            return head(200, x_pg_count="1", content_length=str(len(raw))) + raw
        if lie == "trailing":
            raw = b"".join(len(b).to_bytes(8, "little") + b for b in bodies) + b"x"
            count = str(len(bodies))
            return head(200, x_pg_count=count, content_length=str(len(raw))) + raw
        if lie == "gzip":  # small on the wire, far past the cap inflated
            z = gzip.compress(b"\0" * (80 << 20))
            return (
                head(200, x_pg_count="1", content_encoding="gzip",
                     content_length=str(len(z)))
                + z
            )  # fmt: skip
        return head(200, x_pg_count="1", content_length=str(200 << 20))

    got, unreachable, requests, _ = fetch(answer)
    assert got == {} and unreachable == set()
    assert requests == 1  # a lie is the galaxy's answer: not asked again
