"""node.state.ChangeBatch: what a sync stream changed reaches readers in time, all of it."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from mossnode.crypto.identity import Identity
from mossnode.node.state import ChangeBatch, StateService


def test_change_batch_delivers_everything_in_order_at_most_every_interval() -> None:
    now = [0.0]
    got: list[list[tuple[Any, ...]]] = []
    batch = ChangeBatch(got.append, 1.0, clock=lambda: now[0])
    batch.add([("tasks", "a")])
    now[0] = 0.5
    batch.add([("tasks", "b"), ("tasks", "c")])
    assert got == []  # within the interval: held
    now[0] = 1.0
    batch.add([("tasks", "d")])
    assert got == [[("tasks", "a"), ("tasks", "b"), ("tasks", "c"), ("tasks", "d")]]
    now[0] = 1.2
    batch.add([])
    batch.add([("agents", "n")])
    assert len(got) == 1
    batch.flush()
    assert got[-1] == [("agents", "n")]
    batch.flush()  # nothing left: no empty delivery
    assert len(got) == 2
    batch.add([])  # applied entries that changed no path still wake the reader, once
    batch.flush()
    batch.flush()
    assert got[2:] == [[]]


def test_change_batch_flush_with_nothing_gathered_delivers_nothing() -> None:
    got: list[list[tuple[Any, ...]]] = []
    ChangeBatch(got.append, 0.0).flush()
    assert got == []


async def test_a_sync_round_asked_for_during_one_with_the_same_peer_waits_for_it() -> None:
    """The first round after start-up gates writes and the scheduler: a round that merely found
    another one (say, triggered by presence) under way must not end before it."""
    peer = Identity.generate().peer_id
    svc = object.__new__(StateService)  # only the sync bookkeeping is exercised
    svc._syncing = {}
    svc.counters = Counter()
    svc.on_change = lambda paths: None
    opened = trio.Event()
    gate = trio.Event()

    class Host:
        async def new_stream(self, *_: Any) -> Any:
            opened.set()
            await gate.wait()
            raise OSError("peer went away")

    svc.d = SimpleNamespace(host=Host())
    ended: list[str] = []

    async def round_(name: str) -> None:
        await svc.sync_from(peer)
        ended.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(round_, "first")
        await opened.wait()
        nursery.start_soon(round_, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert ended == []  # the second waits for the first
        gate.set()
    assert sorted(ended) == ["first", "second"] and not svc._syncing
