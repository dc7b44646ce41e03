"""node.state.ChangeBatch: what a sync stream changed reaches the reader at once, all of it;
only the reader's wake-ups are coalesced."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from mossnode.crypto.identity import Identity
from mossnode.node.state import ChangeBatch, StateService

Path = tuple[Any, ...]


class Reader:
    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.wakes = 0

    def __call__(self, paths: list[Path], wake: bool = True) -> None:
        self.paths.extend(paths)
        self.wakes += wake


def test_paths_reach_the_reader_at_once_and_wake_ups_at_most_every_interval() -> None:
    """A view that lags the replica makes the bid-window gate take a winner without bids the
    replica holds (two nodes then run the same attempt): paths are never held back."""
    now = [0.0]
    r = Reader()
    batch = ChangeBatch(r, 1.0, clock=lambda: now[0])
    batch.add([("tasks", "a")])
    now[0] = 0.5
    batch.add([("tasks", "b"), ("tasks", "c")])
    assert r.paths == [("tasks", "a"), ("tasks", "b"), ("tasks", "c")]  # not held
    assert r.wakes == 0  # within the interval: no wake-up yet
    now[0] = 1.0
    batch.add([("tasks", "d")])
    assert r.paths[-1] == ("tasks", "d") and r.wakes == 1
    now[0] = 1.2
    batch.add([])
    batch.add([("agents", "n")])
    assert r.paths[-1] == ("agents", "n") and r.wakes == 1
    batch.flush()  # the end of the stream wakes the reader for what it has not woken it for
    assert r.wakes == 2
    batch.flush()  # nothing owed: no wake-up
    assert r.wakes == 2
    batch.add([])  # applied entries that changed no path still wake the reader, once
    batch.flush()
    batch.flush()
    assert r.wakes == 3
    assert len(r.paths) == 5


def test_change_batch_flush_with_nothing_gathered_delivers_nothing() -> None:
    r = Reader()
    ChangeBatch(r, 0.0).flush()
    assert r.paths == [] and r.wakes == 0


async def test_a_sync_round_asked_for_during_one_with_the_same_peer_waits_for_it() -> None:
    """The first round after start-up gates writes and the scheduler: a round that merely found
    another one (say, triggered by presence) under way must not end before it."""
    peer = Identity.generate().peer_id
    svc = object.__new__(StateService)  # only the sync bookkeeping is exercised
    svc._syncing = {}
    svc.counters = Counter()
    svc.on_change = lambda paths, wake=True: None
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
