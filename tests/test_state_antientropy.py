"""node.state anti-entropy (/moss/sync/1) on both sides: what the server may send, and what
the requesting side refuses from a peer."""

from __future__ import annotations

from pathlib import Path

import cbor2
import trio
from state_fakes import FakeDaemon, FakeStream, service
from test_crdt_support import SWARM, ident, policy_for

from mossnode.crypto.envelope import canonical
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
