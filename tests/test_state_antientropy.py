"""node.state anti-entropy (/moss/sync/1) on both sides: what the server may send, and what
the requesting side refuses from a peer."""

from __future__ import annotations

from pathlib import Path

import cbor2
import trio
import trio.testing
from state_fakes import FakeDaemon, FakeStream, service
from test_crdt_support import SWARM, ident, policy_for

from mossnode.crypto.envelope import canonical
from mossnode.node.state import SYNC_BATCH_ENTRIES, SYNC_ROUND_S
from mossnode.node.store import Store
from mossnode.protocols.crdt import Replica

A, B, C = ident(0), ident(1), ident(2)
NOW = 1_800_000_000_000
REQUEST = canonical({"vector": {}, "heads": {}, "blocked": {}})


async def served(svc: object, peer: str) -> list[bytes]:
    """The entries ``svc`` sends a peer that holds nothing."""
    stream = FakeStream([REQUEST], peer=peer)
    await svc._on_sync_stream(stream)  # type: ignore[attr-defined]
    return [raw for frame in stream.frames() for raw in cbor2.loads(frame)]


async def test_own_entry_is_served_only_once_it_is_durable(tmp_path: Path) -> None:
    """Duty 1: an own entry a peer got before it was on disk is lost in a kill -9; the node
    then signs another entry at that seq and peers block it as an equivocator."""
    b = Replica(B, SWARM, policy_for([A, B, C]))
    _, theirs = b.create_task("tb", NOW, title="B's")
    assert theirs is not None
    with Store(tmp_path / "a.db") as store:
        svc = service(store, A, [A, B, C], FakeDaemon({A.peer_id, B.peer_id, C.peer_id}))
        svc._queue(svc.replica.receive(theirs.data, NOW))
        _, mine = svc.replica.write(lambda w: w.create_task("ta", title="A's"), NOW)
        svc._wrote(mine, None, 1)  # applied and queued; the committer has not run
        assert list(store.entries()) == []
        # another author's entry may go out at once; our own waits for the disk
        assert await served(svc, C.peer_id) == [theirs.data]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc._committer)
            await svc._persisted()
            nursery.cancel_scope.cancel()
        assert (A.peer_id, 1, mine.data) in list(store.entries())
        assert await served(svc, C.peer_id) == [theirs.data, mine.data]


def test_missing_for_upto_holds_back_an_authors_later_entries() -> None:
    rep = Replica(A, SWARM, policy_for([A, B]))
    mine = [rep.create_task(f"t{i}", NOW, title=str(i))[1] for i in range(3)]
    got = [raw for batch in rep.missing_for({}, upto={A.peer_id: 1}) for raw in batch]
    assert got == [mine[0].data]  # type: ignore[union-attr]
    # nor the entry at a peer's head that differs (a fork), past the limit
    heads = {A.peer_id: b"\0" * 32}
    got = [r for bt in rep.missing_for({A.peer_id: 2}, heads, upto={A.peer_id: 1}) for r in bt]
    assert got == []


async def pull(tmp_path: Path, frames: list[bytes]) -> tuple[object, FakeDaemon]:
    """A runs one sync round against B, which answers with ``frames``."""
    daemon = FakeDaemon({A.peer_id, B.peer_id}, FakeStream(frames))
    with Store(tmp_path / "a.db") as store:
        svc = service(store, A, [A, B], daemon)
        await svc.sync_from(B.peer_id)
    return svc, daemon


async def test_a_frame_with_more_entries_than_a_peer_sends_is_refused(tmp_path: Path) -> None:
    """The count is read before decoding: millions of 1-byte entries in one 4 MiB frame would
    block the loop for seconds in one receive_batch."""
    b = Replica(B, SWARM, policy_for([A, B]))
    first = b.create_task("t", NOW, title="kept")[1]
    assert first is not None
    too_many = cbor2.dumps([b""] * (SYNC_BATCH_ENTRIES + 1))
    svc, daemon = await pull(tmp_path, [canonical([first.data]), too_many, canonical([])])
    assert daemon.rejected["malformed"] == 1
    assert svc.replica.vector() == {B.peer_id: 1}  # what came before the bad frame is kept
    assert sum(svc.replica.rejections.values()) == 0  # the big frame never reached the replica
    assert svc.counters["sync_rounds"] == 0  # a round cut short is not a round


async def test_a_full_frame_is_taken(tmp_path: Path) -> None:
    full = canonical([b""] * SYNC_BATCH_ENTRIES)
    svc, daemon = await pull(tmp_path, [full, canonical([])])
    assert not daemon.rejected
    assert sum(svc.replica.rejections.values()) == SYNC_BATCH_ENTRIES  # judged, one by one
    assert svc.counters["sync_rounds"] == 1


async def test_undecodable_and_non_list_frames_are_counted(tmp_path: Path) -> None:
    for bad in (b"\xff\xff", cbor2.dumps({"not": "a list"}), cbor2.dumps([1, 2])):
        svc, daemon = await pull(tmp_path, [bad, canonical([])])
        assert daemon.rejected["malformed"] == 1, bad
        assert svc.counters["sync_rounds"] == 0


async def test_malformed_sync_requests_are_counted(tmp_path: Path) -> None:
    daemon = FakeDaemon({A.peer_id, C.peer_id})
    bad = [
        b"\xff\xff",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"vector": [1]}),
        cbor2.dumps({"vector": {C.peer_id: -1}}),
        cbor2.dumps({"heads": {C.peer_id: "text"}}),
    ]
    with Store(tmp_path / "a.db") as store:
        svc = service(store, A, [A, C], daemon)
        for frame in bad:
            stream = FakeStream([frame], peer=C.peer_id)
            await svc._on_sync_stream(stream)
            assert stream.closed and stream.written == []
        assert daemon.rejected["malformed"] == len(bad)
        assert await served(svc, C.peer_id) == []  # a well-formed request is still answered


async def test_a_silent_peer_does_not_hold_the_sync_handler(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A member that opens /moss/sync/1 and sends nothing loses the stream after a round's
    time (autojump clock: no real waiting)."""
    with Store(tmp_path / "a.db") as store:
        svc = service(store, A, [A, C], FakeDaemon({A.peer_id, C.peer_id}))
        stream = FakeStream([], peer=C.peer_id)
        start = trio.current_time()
        with trio.move_on_after(10 * SYNC_ROUND_S) as scope:
            await svc._on_sync_stream(stream)
        assert not scope.cancelled_caught and stream.closed
        assert trio.current_time() - start == SYNC_ROUND_S


class _SlowStream(FakeStream):
    """A peer serving a catch-up one frame every ``gap`` seconds (a CPU-bound transfer)."""

    def __init__(self, frames: list[bytes], gap: float) -> None:
        super().__init__(frames)
        self.gap = gap

    async def read(self, n: int) -> bytes:
        await trio.sleep(self.gap)
        return await super().read(n)


async def test_a_write_after_a_restart_waits_for_the_whole_first_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Duty 2: a node restored from an old backup learns its own later entries before it signs
    again. A first round longer than a few seconds must hold the first write back until it
    ends: signing at a timeout re-used a seq, and the node proved an equivocation on itself."""
    members = [A, B]
    old_a = Replica(A, SWARM, policy_for(members))
    a1 = old_a.create_task("t1", NOW, title="one")[1]
    a2 = old_a.create_task("t2", NOW, title="two")[1]
    assert a1 is not None and a2 is not None
    b = Replica(B, SWARM, policy_for(members))
    b.receive_batch([a1.data, a2.data], NOW)
    for i in range(40):  # B's work after A's backup was taken
        b.create_task(f"b{i}", NOW, title=f"b{i}")
    old_a.receive_batch([e.data for e in b.entries(2)], NOW)
    a3 = old_a.create_task("t3", NOW, title="three")[1]  # seq 3: B holds it, the backup not
    assert a3 is not None and b.receive(a3.data, NOW).applied
    frames = [canonical(batch) for batch in b.missing_for({A.peer_id: 2}, max_entries=10)]
    frames.append(canonical([]))
    with Store(tmp_path / "a.db") as store:
        store.commit(entries=[(e.author, e.seq, e.data) for e in (a1, a2)])  # the backup
        daemon = FakeDaemon({A.peer_id, B.peer_id}, _SlowStream(frames, gap=1.5))
        daemon.host.get_connected_peers = lambda: [B.peer_id]  # type: ignore[method-assign]
        svc = service(store, A, members, daemon)
        svc.replica, _ = Replica.restore(
            A, SWARM, policy_for(members), snapshot=None, entries=list(store.entries()), now_ms=NOW
        )
        svc._synced = trio.Event()  # a fresh start: the first round has not run
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc._committer)
            nursery.start_soon(svc._sync_loop)
            await trio.sleep(0.1)
            await svc.write(lambda w: w.create_task("t4", title="four"))  # an agent's first call
            nursery.cancel_scope.cancel()
    assert not svc.replica.evidence, "the node signed a seq it had already signed"
    assert svc.replica.vector()[A.peer_id] == 4  # t3 learnt from B, then t4 signed as seq 4
