"""node.state when the replica rolls back (an equivocation proven, a revocation's cut-off):
readers are told, and the store ends up holding what the replica holds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing
from state_fakes import service
from test_crdt_support import SWARM, ident, policy_for

from mossnode.node.store import Store
from mossnode.protocols.crdt import Entry, Replica

A, E = ident(0), ident(3)
NOW = 1_800_000_000_000


def forked() -> tuple[str, Entry, Entry, Entry]:
    """E's task t2 at seq 2, and another entry E signed at seq 2 (its second history)."""
    e1 = Replica(E, SWARM, policy_for([A, E]))
    _, s1 = e1.create_task("t1", NOW, title="one")
    t2, s2 = e1.create_task("t2", NOW, title="two")
    e2 = Replica(E, SWARM, policy_for([A, E]))
    assert s1 is not None and s2 is not None
    e2.receive(s1.data, NOW)
    _, s2b = e2.create_task("t3", NOW, title="three")
    assert s2b is not None
    return t2, s1, s2, s2b


def test_a_rollback_tells_readers_to_read_everything_again(tmp_path: Path) -> None:
    t2, s1, s2, s2b = forked()
    with Store(tmp_path / "a.db") as store:
        svc: Any = service(store, A, [A, E])
        svc._queue(svc.replica.receive_batch([s1.data, s2.data], NOW))
        assert svc.replica.task(t2) is not None
        svc.changes.clear()
        out = svc.replica.receive_batch([s2b.data], NOW)
        assert out.rolled_back and not out.applied  # the proof applies nothing new
        svc._queue(out)
        assert svc.replica.task(t2) is None
        assert svc.changes == [(None, True)]  # None: "anywhere", every task read again


def test_an_outcome_without_a_rollback_says_so() -> None:
    _, s1, s2, _ = forked()
    rep = Replica(A, SWARM, policy_for([A, E]))
    assert not rep.receive_batch([s1.data, s2.data], NOW).rolled_back
    assert not rep.rebuild(NOW).rolled_back  # replaying the same entries drops none


def stored(store: Store) -> list[tuple[str, int]]:
    return [(author, seq) for author, seq, _ in store.entries()]


async def settle(svc: Any, store: Store, gone: tuple[str, int]) -> None:
    """Until the retraction was committed (a test that fails waits out fail_after)."""
    with trio.fail_after(30):
        while svc._to_retract or svc._to_commit or gone in stored(store):
            await trio.sleep(0.01)


def restarted_digest(store: Store) -> bytes:
    rep, _ = Replica.restore(
        A, SWARM, policy_for([A, E]), snapshot=None, entries=list(store.entries()), now_ms=NOW
    )
    return rep.digest()


async def test_retracted_entries_waiting_for_the_committer_are_not_stored(tmp_path: Path) -> None:
    """Both bundles in one pass of the loop (validators are synchronous): E's seq 2 still waits
    in _to_commit when the rollback retracts it."""
    _, s1, s2, s2b = forked()
    with Store(tmp_path / "a.db") as store:
        svc: Any = service(store, A, [A, E])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc._committer)
            svc._queue(svc.replica.receive_batch([s1.data, s2.data], NOW))
            svc._queue(svc.replica.receive_batch([s2b.data], NOW))
            await settle(svc, store, (E.peer_id, 2))
            nursery.cancel_scope.cancel()
        assert stored(store) == [(E.peer_id, 1)]
        assert restarted_digest(store) == svc.replica.digest()


async def test_a_retraction_during_a_commit_is_stored_after_it(tmp_path: Path) -> None:
    """The batch holding E's seq 2 is in a worker thread's commit when the rollback comes."""
    _, s1, s2, s2b = forked()
    release = threading.Event()
    with Store(tmp_path / "a.db") as store:
        real = store.commit

        def commit(**kw: Any) -> bool:
            if not kw.pop("wait", True):
                return False  # every commit goes to a worker thread
            if kw.get("entries"):
                release.wait()
            return real(**kw)

        store.commit = commit  # type: ignore[method-assign]
        svc: Any = service(store, A, [A, E])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc._committer)
            svc._queue(svc.replica.receive_batch([s1.data, s2.data], NOW))
            await trio.testing.wait_all_tasks_blocked()
            assert not svc._to_commit  # taken by the commit under way
            svc._queue(svc.replica.receive_batch([s2b.data], NOW))
            release.set()
            await settle(svc, store, (E.peer_id, 2))
            nursery.cancel_scope.cancel()
        assert stored(store) == [(E.peer_id, 1)]
        assert restarted_digest(store) == svc.replica.digest()
