"""One contract, two stores: the in-memory store and the Redis store behave alike."""

from __future__ import annotations

import threading
import time

import pytest

from protogalaxy.protocol.stores import (
    GalaxyStore,
    MemoryGalaxyStore,
    Phase,
    PhaseClosed,
    RevealStage,
)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> GalaxyStore:
    if request.param == "memory":
        return MemoryGalaxyStore()
    from protogalaxy.services.redis_store import RedisGalaxyStore

    return RedisGalaxyStore.from_url(request.getfixturevalue("redis_url"), galaxy=3)


def test_state_is_compare_and_set(store: GalaxyStore) -> None:
    assert store.get_state() is None
    assert not store.compare_and_set_state((0, "commit"), (0, "reveal"))
    assert store.compare_and_set_state(None, (0, "commit"))
    assert not store.compare_and_set_state(None, (0, "commit"))
    assert store.compare_and_set_state((0, "commit"), (0, "committed"))
    assert store.get_state() == (0, "committed")


def test_exactly_one_of_many_racing_transitions_wins(store: GalaxyStore) -> None:
    store.compare_and_set_state(None, (5, "reveal"))
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        wins.append(store.compare_and_set_state((5, "reveal"), (5, "aggregating")))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_client_keys(store: GalaxyStore) -> None:
    assert store.register_client(7, b"k" * 32)
    assert store.register_client(7, b"k" * 32)  # idempotent
    assert not store.register_client(7, b"x" * 32)  # never replaced
    assert store.client_key(7) == b"k" * 32 and store.client_key(8) is None
    store.register_client(2, b"j" * 32)
    assert store.clients() == [2, 7]


def test_commitments_and_reveals_are_set_if_absent(store: GalaxyStore) -> None:
    c, sig = bytes(range(68)), b"s" * 64
    assert store.compare_and_set_state(None, (1, Phase.COMMIT))
    assert store.add_commitment(1, 4, c, sig)
    assert not store.add_commitment(1, 4, b"\x00" * 68, b"t" * 64)
    assert store.commitments(1) == {4: (c, sig)} and store.commitments(2) == {}
    assert store.commitment_count(1) == 1 and store.commitment_count(2) == 0
    assert store.compare_and_set_state((1, Phase.COMMIT), (1, Phase.REVEAL))
    body, nonce = b"\x00\x01body\xff" * 100, bytes(range(32))
    assert store.add_reveal(1, 4, body, nonce)
    assert not store.add_reveal(1, 4, b"other", nonce)
    assert store.reveals(1) == {4: (body, nonce)}
    assert store.get_reveal(1, 4) == (body, nonce) and store.get_reveal(1, 5) is None
    assert store.reveal_count(1) == 1 and store.reveal_count(2) == 0
    assert store.add_rejection(1, 5, "non_finite")
    assert not store.add_rejection(1, 5, "shape")
    assert store.rejections(1) == {5: "non_finite"}
    assert store.rejection_count(1) == 1 and store.rejection_count(2) == 0
    assert store.is_rejected(1, 5) and not store.is_rejected(1, 4)
    assert not store.is_rejected(2, 5)


def test_blobs_reputation_evidence_and_expiry(store: GalaxyStore) -> None:
    store.put_blob(1, "leaf", b"\x00leaf")
    assert store.get_meta("missed") is None
    store.put_meta("missed", b'{"4": 1}')
    assert store.get_meta("missed") == b'{"4": 1}'
    assert (
        store.get_blob(1, "leaf") == b"\x00leaf" and store.get_blob(2, "leaf") is None
    )
    state = {"galaxy": 3, "clients": {"4": {"reputation": 0.42}}, "events": []}
    store.save_reputation(state)
    assert store.load_reputation() == state
    store.append_evidence({"event": "client_quarantined", "client": 4, "round": 1})
    store.append_evidence({"event": "client_banned", "client": 5, "round": 2})
    assert [e["client"] for e in store.evidence()] == [4, 5]
    assert store.evidence(client=5)[0]["event"] == "client_banned"
    store.register_client(4, b"k" * 32)
    for rnd in (1, 2):
        store.compare_and_set_state(store.get_state(), (rnd, Phase.COMMIT))
        store.add_commitment(rnd, 4, bytes(68), bytes(64))
    store.drop_round(1)
    assert store.commitments(1) == {} and store.get_blob(1, "leaf") is None
    assert store.commitments(2) != {}
    assert store.load_reputation() == state and store.client_key(4) == b"k" * 32
    assert store.get_meta("missed") == b'{"4": 1}'  # galaxy-wide, not per round


def test_writes_only_while_their_phase_is_open(store: GalaxyStore) -> None:
    """The check of the phase and the write are one step: a commitment, reveal or
    rejection that loses the race to a close is refused and stored nowhere."""
    c, sig, body, nonce = bytes(68), bytes(64), b"body" * 10, bytes(32)
    with pytest.raises(PhaseClosed):
        store.add_commitment(0, 1, c, sig)  # no round open at all
    store.compare_and_set_state(None, (0, Phase.COMMIT))
    with pytest.raises(PhaseClosed):
        store.add_commitment(1, 1, c, sig)  # another round
    with pytest.raises(PhaseClosed):
        store.add_reveal(0, 1, body, nonce)  # not the reveal phase yet
    assert store.add_commitment(0, 1, c, sig)
    store.compare_and_set_state((0, Phase.COMMIT), (0, Phase.CLOSING))
    with pytest.raises(PhaseClosed):
        store.add_commitment(0, 2, c, sig)
    store.compare_and_set_state((0, Phase.CLOSING), (0, Phase.REVEAL))
    assert store.add_reveal(0, 1, body, nonce)
    assert store.add_rejection(0, 3, "non_finite")
    store.compare_and_set_state((0, Phase.REVEAL), (0, Phase.AGGREGATING))
    with pytest.raises(PhaseClosed):
        store.add_reveal(0, 2, body, nonce)
    with pytest.raises(PhaseClosed):
        store.add_rejection(0, 4, "shape")  # the close already read them
    assert list(store.commitments(0)) == [1] and list(store.reveals(0)) == [1]
    assert store.rejections(0) == {3: "non_finite"}


def _staged(store: GalaxyStore, rnd: int, client: int, body: bytes, size: bool):
    stage = store.stage_reveal(rnd, client, len(body) if size else None)
    for at in range(0, len(body), 7):  # pieces as they would arrive
        stage.write(memoryview(body)[at : at + 7])
    return stage


@pytest.mark.parametrize("size", [True, False], ids=["sized", "chunked"])
def test_a_staged_reveal_is_committed_whole_or_not_at_all(
    store: GalaxyStore, size: bool
) -> None:
    """A body streamed into a stage becomes the reveal only when committed, and a
    stage that is not committed leaves nothing behind."""
    body, nonce = bytes(range(256)) * 3, bytes(range(32))
    store.compare_and_set_state(None, (2, Phase.REVEAL))
    dropped = _staged(store, 2, 4, b"x" * len(body), size)
    dropped.discard()
    dropped.discard()  # idempotent
    assert store.get_reveal(2, 4) is None and store.reveal_count(2) == 0
    stage = _staged(store, 2, 4, body, size)
    assert store.get_reveal(2, 4) is None  # staged is not revealed
    assert store.add_reveal(2, 4, body, nonce, staged=stage)
    stage.discard()  # a no-op once committed
    assert store.get_reveal(2, 4) == (body, nonce)
    assert store.reveals(2) == {4: (body, nonce)} and store.reveal_count(2) == 1
    # set-if-absent as without a stage: the second is refused, the first kept
    again = _staged(store, 2, 4, body[::-1], size)
    assert not store.add_reveal(2, 4, body[::-1], nonce, staged=again)
    assert store.get_reveal(2, 4) == (body, nonce)
    # a stage that does not hold the body is a fault of the store: nothing written
    short = _staged(store, 2, 5, body[:-7], size)
    with pytest.raises(RuntimeError):
        store.add_reveal(2, 5, body, nonce, staged=short)
    assert store.get_reveal(2, 5) is None
    # a discarded stage cannot be committed afterwards
    gone = _staged(store, 2, 7, body, size)
    gone.discard()
    with pytest.raises(RuntimeError):
        store.add_reveal(2, 7, body, nonce, staged=gone)
    assert store.get_reveal(2, 7) is None
    # and only while the reveal phase is open
    late = _staged(store, 2, 6, body, size)
    store.compare_and_set_state((2, Phase.REVEAL), (2, Phase.AGGREGATING))
    with pytest.raises(PhaseClosed):
        store.add_reveal(2, 6, body, nonce, staged=late)
    assert list(store.reveals(2)) == [4]


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "plain"])
def test_a_client_has_one_fate_a_round(store: GalaxyStore, staged: bool) -> None:
    """An accepted reveal and a rejection exclude each other, whichever is written
    first: a client's racing valid and garbage reveals can never leave it both
    acknowledged and rejected."""
    body, nonce = bytes(range(256)), bytes(range(32))
    store.compare_and_set_state(None, (1, Phase.REVEAL))

    def reveal(client: int) -> bool:
        stage = _staged(store, 1, client, body, True) if staged else None
        return store.add_reveal(1, client, body, nonce, staged=stage)

    assert reveal(1)
    assert not store.add_rejection(1, 1, "shape")
    assert store.add_rejection(1, 2, "shape")
    assert not reveal(2)
    assert store.reveals(1) == {1: (body, nonce)}
    assert store.rejections(1) == {2: "shape"}


def test_no_stage_outlives_its_upload(redis_url: str) -> None:
    """Redis: whatever becomes of a staged upload, the only keys left are the
    accepted reveal's, and dropping the round removes those too."""
    import redis

    from protogalaxy.services.redis_store import RedisGalaxyStore

    store = RedisGalaxyStore.from_url(redis_url, galaxy=8, prefix="pg:stagetest:")
    raw = redis.Redis.from_url(redis_url)
    body, nonce = bytes(1000), bytes(32)
    store.compare_and_set_state(None, (0, Phase.REVEAL))
    assert store.add_reveal(0, 1, body, nonce, staged=_staged(store, 0, 1, body, True))
    duplicate = _staged(store, 0, 1, body, True)
    assert not store.add_reveal(0, 1, body, nonce, staged=duplicate)
    for client, size in ((2, True), (3, False)):
        short = _staged(store, 0, client, body[:-1], size)
        with pytest.raises(RuntimeError):
            store.add_reveal(0, client, body, nonce, staged=short)
    abandoned = _staged(store, 0, 4, body, True)  # replies still unread
    abandoned.discard()
    assert store.ping()  # the pool is still usable
    leftovers = sorted(k.decode() for k in raw.scan_iter(match="pg:stagetest:*"))
    assert leftovers == [
        "pg:stagetest:r:0:reveal:1",
        "pg:stagetest:r:0:reveals",
        "pg:stagetest:state",
    ]
    store.drop_round(0)
    assert not list(raw.scan_iter(match="pg:stagetest:r:*"))


def test_an_empty_staged_body(store: GalaxyStore) -> None:
    store.compare_and_set_state(None, (0, Phase.REVEAL))
    stage = store.stage_reveal(0, 1, 0)
    assert store.add_reveal(0, 1, b"", bytes(32), staged=stage)
    assert store.get_reveal(0, 1) == (b"", bytes(32))


def test_a_discard_racing_a_commit_never_half_removes_a_reveal(redis_url: str) -> None:
    """Redis: a request's clean-up may discard its stage from another thread while
    the commit runs; the reveal is then either whole or absent."""
    from protogalaxy.services.redis_store import RedisGalaxyStore

    store = RedisGalaxyStore.from_url(redis_url, galaxy=9, prefix="pg:race:")
    body, nonce = bytes(range(256)) * 400, bytes(32)
    store.compare_and_set_state(None, (0, Phase.REVEAL))
    for client in range(20):
        stage = _staged(store, 0, client, body, True)
        outcome: list[object] = []

        def commit(c: int, st: RevealStage, out: list[object]) -> None:
            try:
                out.append(store.add_reveal(0, c, body, nonce, staged=st))
            except RuntimeError as exc:
                out.append(exc)

        worker = threading.Thread(target=commit, args=(client, stage, outcome))
        worker.start()
        stage.discard()
        worker.join()
        assert store.get_reveal(0, client) in (None, (body, nonce))
        assert (outcome == [True]) == (store.get_reveal(0, client) is not None)
    assert not [k for k in store.r.scan_iter(match="pg:race:r:0:stage:*")]


def test_a_round_finishes_once_and_whole(store: GalaxyStore) -> None:
    """The close of a round writes its blobs, reputations and evidence and moves
    to done in one step, only from ``aggregating``: a close racing another (a
    replica, or a resumed close) writes nothing, and a close killed before the
    step left nothing to undo."""
    before = {"galaxy": 3, "clients": {"4": {"reputation": 0.5}}, "events": []}
    store.save_reputation(before)
    version = store.reputation_version()

    def finish(tag: str) -> bool:
        return store.finish_round(
            2,
            blobs={"aggregate": tag.encode(), "transcript": tag.encode()},
            reputation={**before, "clients": {"4": {"reputation": len(tag) / 10}}},
            evidence=[{"event": "client_quarantined", "client": 4, "by": tag}],
        )

    store.compare_and_set_state(None, (2, Phase.REVEAL))
    assert not finish("early")  # not aggregating: nothing written
    assert store.get_blob(2, "aggregate") is None and store.evidence() == []
    assert store.load_reputation() == before
    assert store.reputation_version() == version
    store.compare_and_set_state((2, Phase.REVEAL), (2, Phase.AGGREGATING))
    wins: list[str] = []
    barrier = threading.Barrier(6)

    def attempt(tag: str) -> None:
        barrier.wait()
        if finish(tag):
            wins.append(tag)

    threads = [threading.Thread(target=attempt, args=("x" * n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    (tag,) = wins
    assert store.get_state() == (2, Phase.DONE)
    assert store.get_blob(2, "aggregate") == store.get_blob(2, "transcript")
    assert store.get_blob(2, "aggregate") == tag.encode()
    assert store.evidence() == [{"event": "client_quarantined", "client": 4, "by": tag}]
    saved = store.load_reputation()
    assert saved is not None and saved["clients"]["4"]["reputation"] == len(tag) / 10
    assert store.reputation_version() > version


def test_a_stage_holds_what_arrived_not_what_was_declared(redis_url: str) -> None:
    """A reveal that declares 64 MiB and sends a little: Redis holds at most
    twice what arrived (at least 1 MiB), not the declared size (a sender with
    no valid signature yet could otherwise make it hold 64 MiB for a few bytes)."""
    from protogalaxy.services.redis_store import RedisGalaxyStore, RedisRevealStage

    store = RedisGalaxyStore.from_url(redis_url, galaxy=3)
    stage = store.stage_reveal(0, 1, 64 << 20)
    assert isinstance(stage, RedisRevealStage)
    piece = b"\x01" * (1 << 20)
    for sent in range(1, 6):
        stage.write(piece)
        with pytest.raises(RuntimeError):
            stage.flush()  # not all of it arrived
        deadline = time.monotonic() + 10
        while (held := int(store.r.strlen(stage.key))) < sent * len(piece):
            assert time.monotonic() < deadline  # the pipelined writes land
            time.sleep(0.01)
        assert held <= 2 * sent * len(piece), (sent, held)
    stage.discard()
    assert not store.r.exists(stage.key)


def test_every_round_before_the_window_is_dropped(store: GalaxyStore) -> None:
    """A galaxy that skipped rounds (it took part in 1, 2 and 7) drops all the
    rounds before the window, not one a round; staged uploads left by killed
    uploads go when their round closes."""
    store.register_client(4, b"k" * 32)
    for rnd in (1, 2, 7):
        store.compare_and_set_state(store.get_state(), (rnd, Phase.COMMIT))
        store.add_commitment(rnd, 4, bytes(68), bytes(64))
        store.put_blob(rnd, "leaf", b"x")
    stage = store.stage_reveal(7, 4, 3)
    stage.write(b"abc")
    stage.flush()
    store.drop_rounds_before(7)
    assert store.commitments(1) == {} and store.commitments(2) == {}
    assert store.get_blob(2, "leaf") is None
    assert store.commitments(7) != {} and store.get_blob(7, "leaf") == b"x"
    store.drop_stages(7)
    if hasattr(store, "r"):  # Redis: the stage key itself is gone
        assert list(store.r.scan_iter(match="*stage*")) == []
    assert store.client_key(4) == b"k" * 32
