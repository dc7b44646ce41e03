"""node.state.StateService.write: local writes made in the same pass of the event loop share one
signed entry; a refused or failing write among them fails alone; every caller gets its own
result once the shared entry is on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import state_fakes as fakes
import trio
from test_crdt_support import SWARM, ident, policy_for

from mossnode.node import state as state_mod
from mossnode.node.store import Store
from mossnode.protocols.crdt import Replica, WriteRefused

A, B = ident(0), ident(1)


def service(store: Store) -> Any:
    """A StateService around a real replica and store, without a daemon: only the local
    write path (write, the committer) is used."""
    return fakes.service(store, A, [A, B])


def stored(store: Store) -> list[tuple[str, int]]:
    return [(author, seq) for author, seq, _ in store.entries()]


def run_writes(
    tmp_path: Path, fns: list[Any], *, first: Any = None, limit: int | None = None
) -> tuple[Any, list]:
    """Write ``first`` on its own, then start one writer per fn in the same pass (trio starts
    them in any order); return the service and each writer's outcome."""
    outcomes: list[Any] = [None] * len(fns)

    async def one(i: int, svc: Any) -> None:
        try:
            outcomes[i] = ("ok", await svc.write(fns[i], [("tasks", f"p{i}")]))
        except Exception as exc:
            outcomes[i] = ("error", exc)

    async def main() -> Any:
        with Store(tmp_path / "s.db") as store:
            svc = service(store)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc._committer)
                if first is not None:
                    await svc.write(first)
                async with trio.open_nursery() as writers:
                    for i in range(len(fns)):
                        writers.start_soon(one, i, svc)
                nursery.cancel_scope.cancel()
            svc.rows = stored(store)
            return svc

    if limit is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(state_mod, "MAX_WRITES_PER_ENTRY", limit)
            return trio.run(main), outcomes
    return trio.run(main), outcomes


def create(i: int) -> Any:
    return lambda w: w.create_task(f"t{i}", title=f"task {i}")


def test_writes_of_one_pass_share_one_entry(tmp_path: Path) -> None:
    svc, outcomes = run_writes(tmp_path, [create(i) for i in range(10)])
    assert [o[0] for o in outcomes] == ["ok"] * 10
    assert [o[1] for o in outcomes] == [f"{A.peer_id}:t{i}" for i in range(10)]
    assert svc.rows == [(A.peer_id, 1)]  # one signed entry, durable
    assert all(svc.replica.task(f"{A.peer_id}:t{i}") is not None for i in range(10))
    assert svc.counters["written"] == 10 and svc.counters["entries_written"] == 1
    ((paths, _),) = svc.changes  # every writer's paths, in one notice
    assert sorted(paths) == [("tasks", f"p{i}") for i in range(10)]


def test_a_refused_or_failing_write_fails_alone(tmp_path: Path) -> None:
    foreign = f"claims/{B.peer_id}"

    def refused(w: Any) -> None:  # writes under another member's key: the rules refuse it
        w._task(f"{A.peer_id}:t0").__setitem__(foreign, 1)

    def failing(w: Any) -> None:
        raise ValueError("bad input")

    fns = [create(1), refused, create(2), failing, create(3)]
    svc, outcomes = run_writes(tmp_path, fns, first=create(0))
    assert [o[0] for o in outcomes] == ["ok", "error", "ok", "error", "ok"]
    assert isinstance(outcomes[1][1], WriteRefused)
    assert isinstance(outcomes[3][1], ValueError)
    # the shared entry was refused: each good write went on its own; nothing of the bad ones
    assert svc.rows == [(A.peer_id, s) for s in range(1, 5)]
    assert all(svc.replica.task(f"{A.peer_id}:t{i}") is not None for i in range(4))
    task = svc.replica.task(f"{A.peer_id}:t0")
    assert task is not None and foreign not in task
    assert svc.counters["written"] == 4 and svc.counters["entries_written"] == 4


def test_more_writes_than_an_entry_takes_go_in_several(tmp_path: Path) -> None:
    svc, outcomes = run_writes(tmp_path, [create(i) for i in range(7)], limit=3)
    assert [o[1] for o in outcomes] == [f"{A.peer_id}:t{i}" for i in range(7)]
    assert svc.rows == [(A.peer_id, 1), (A.peer_id, 2), (A.peer_id, 3)]


def test_a_write_that_changes_nothing_makes_no_entry(tmp_path: Path) -> None:
    svc, outcomes = run_writes(tmp_path, [lambda w: "nothing"])
    assert outcomes == [("ok", "nothing")]
    assert svc.rows == [] and svc.counters["written"] == 0


def test_a_cancelled_first_writer_still_writes_the_others(tmp_path: Path) -> None:
    async def main() -> tuple[Any, list[str]]:
        got: list[str] = []
        with Store(tmp_path / "s.db") as store:
            svc = service(store)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc._committer)
                with trio.CancelScope() as first:
                    first.cancel()  # cancelled before it even starts waiting

                    async def second() -> None:
                        got.append(await svc.write(create(1)))

                    nursery.start_soon(second)
                    with pytest.raises(trio.Cancelled):
                        await svc.write(create(0))
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
            return svc, got

    svc, got = trio.run(main)
    assert got == [f"{A.peer_id}:t1"]
    assert svc.replica.task(f"{A.peer_id}:t0") is not None  # written, though its caller left
    assert svc.replica.task(f"{A.peer_id}:t1") is not None


def test_writes_in_separate_passes_make_separate_entries(tmp_path: Path) -> None:
    async def main() -> list[tuple[str, int]]:
        with Store(tmp_path / "s.db") as store:
            svc = service(store)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc._committer)
                for i in range(3):
                    await svc.write(create(i))
                nursery.cancel_scope.cancel()
            return stored(store)

    assert trio.run(main) == [(A.peer_id, 1), (A.peer_id, 2), (A.peer_id, 3)]


def test_own_entries_are_read_as_opening_them_would() -> None:
    """Replica.write takes its own entry's fields from what it signed rather than opening the
    bytes again (no second verification): the same entry as opening them gives."""
    rep = Replica(A, SWARM, policy_for([A, B]))
    seen: list[Any] = []
    prepare = rep._prepare
    rep._prepare = lambda parsed: seen.append(parsed) or prepare(parsed)  # type: ignore[method-assign]
    now = 1_700_000_000_000
    tid, _ = rep.create_task("t", now, title="t", capabilities=["echo"])
    for kind in ("bids", "claims", "leases", "results"):
        rep.write(lambda w, kind=kind: w.put(tid, kind, {"attempt": 1, "kind": kind}), now + 1)
    rep.write(lambda w: w.append_log(tid, {"k": "done"}), now + 2)
    assert len(seen) == 6 and [e.seq for e in seen] == list(range(1, 7))
    for entry in seen:
        assert rep._open(entry.raw, now) == entry


def test_an_own_entry_too_large_is_refused_as_before() -> None:
    rep = Replica(A, SWARM, policy_for([A, B]))
    now = 1_700_000_000_000
    tid, _ = rep.create_task("t", now, title="t")
    before = rep.task(tid)
    with pytest.raises(WriteRefused, match=r"large|size|bytes"):
        rep.write(lambda w: w.put(tid, "results", "x" * 300_000), now)
    assert rep.task(tid) == before and rep.entry_count() == 1


def test_a_writer_holding_the_roots_writes_what_a_plain_one_does() -> None:
    """Writer(roots=...) keeps the root maps it is given or looked up (pycrdt builds them anew
    at each doc[name]), and puts a plain value on pycrdt's Rust map: the same document as a
    Writer that looks every root up and puts through Map.__setitem__."""
    from mossnode.protocols.crdt.document import new_doc
    from mossnode.protocols.crdt.schema import ROOTS, TASKS
    from mossnode.protocols.crdt.writes import Writer

    def script(w: Writer) -> None:
        tid = w.create_task("t", title="t", capabilities=["echo"])
        for kind in ("bids", "claims", "results"):
            w.put(tid, kind, {"attempt": 1, "kind": kind})
        w.append_log(tid, {"k": "done"})
        w.append_log(tid, {"k": "again"})
        w.remove(tid, "claims")
        w.put_agent("cat", {"roles": ["executor"]})
        w.append_history({"k": "h"})

    contents = []
    for cached in (False, True):
        doc = new_doc(7)
        writer = Writer(doc, "me", 5, roots={TASKS: doc[TASKS]} if cached else None)
        if not cached:  # and put as Map.__setitem__ does it, not on the Rust map
            writer._raw_task = lambda tid: None  # type: ignore[method-assign]
        with doc.transaction():
            script(writer)
            with pytest.raises(KeyError):
                writer.put("me:none", "bids", 1)
        # (Yrs encodes a JSON object's keys in hash order: the contents are compared)
        contents.append(({name: doc[name].to_py() for name in ROOTS}, doc.get_state()))
    assert contents[0] == contents[1] and contents[0][0]["tasks"]
