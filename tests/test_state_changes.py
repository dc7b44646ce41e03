"""node.state.ChangeBatch: what a sync stream changed reaches readers in time, all of it."""

from __future__ import annotations

from typing import Any

from mossnode.node.state import ChangeBatch


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
