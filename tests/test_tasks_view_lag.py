"""The node's task view never lags its replica: the duplicate-run bug of the tasks benchmark.

The bid-window gate (protocols/tasks/stability.py) takes a winner once, for every expected
bidder, the view holds its bid or the replica holds that bidder's entries past the window's
close. Entries that arrived over anti-entropy used to reach the view up to a second (a whole
sync stream) after the replica applied them, so the replica's horizon said "every bid is here"
while the view still lacked the best bid: this node took the window, claimed and ran it, and
so did the real winner. Here the best bid arrives over a sync stream that is still open."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from test_crdt_support import NOW, SWARM, ident, policy_for

from mossnode.node.state import ChangeBatch
from mossnode.node.tasks import TaskService, apply_writes
from mossnode.protocols import tasks as T
from mossnode.protocols.crdt import Replica

A, B, C = ident(0), ident(1), ident(2)


def write(replica: Replica, now: int, effect: Any) -> bytes:
    ws = T.writes(effect, now)
    _, entry = replica.write(lambda w: apply_writes(w, ws), now)
    assert entry is not None
    return entry.data


def test_bids_applied_by_an_open_sync_stream_count_before_the_gate_trusts_the_horizon(
    tmp_path: Path,
) -> None:
    policy = policy_for([A, B, C])
    ra, rb, rc = (Replica(i, SWARM, policy) for i in (A, B, C))
    plan = T.plan_create(
        {}, T.Draft("t", "t", capabilities=("echo",)), creator=A.peer_id, now_ms=NOW
    )
    assert isinstance(plan, T.Create)
    tid = plan.task_id
    created = write(ra, NOW, plan)
    late = NOW + 700
    for r in (rb, rc):
        assert r.receive_batch([created], late).applied

    svc = TaskService(
        SimpleNamespace(peer_id=B.peer_id, state_dir=tmp_path, schedules={}),  # type: ignore[arg-type]
        SimpleNamespace(replica=rb),  # type: ignore[arg-type]
    )
    svc.sched.stable = T.stable_rule(B.peer_id, lambda t: [B.peer_id, C.peer_id], svc._horizon)
    svc.changed(None)
    agent = T.LocalAgent("b", frozenset({"executor"}), frozenset({"echo"}), 0.0, 4)

    # B bids first (it opens the window: closes at NOW + 210, decided from NOW + 410)...
    svc._update_view()
    (bid,) = [
        e
        for e in svc.sched.tick(svc.view, agents=[agent], now_ms=NOW + 10).effects
        if isinstance(e, T.Bid)
    ]
    write(rb, NOW + 10, bid)
    svc.changed([("tasks", tid)])
    svc._update_view()  # the next tick's refresh: the view holds B's bid
    # ...C bids higher inside the window, then writes something else well after the close
    c_bid = write(rc, NOW + 20, T.Bid(tid, 1, "c", 0.99))
    c_after = rc.write(lambda w: w.put_agent("c", {"roles": ["executor"]}), NOW + 600)[1]
    assert c_after is not None

    # both reach B over anti-entropy; the stream is still open (no flush yet)
    changes = ChangeBatch(svc.changed, 1.0, clock=lambda: 0.0)
    out = rb.receive_batch([c_bid, c_after.data], late)
    assert len(out.applied) == 2
    changes.add(list(out.changed))
    assert rb.horizon(C.peer_id) == NOW + 600  # the replica holds C's entries past the close

    svc._update_view()
    plan_b = svc.sched.tick(svc.view, agents=[agent], now_ms=late)
    assert svc.sched.statuses[tid].assignee == C.peer_id
    assert not [e for e in plan_b.effects if isinstance(e, T.Claim | T.Dispatch)]


async def test_work_reported_to_a_tick_that_fails_is_reported_again(tmp_path: Path) -> None:
    """Ended work waits in a queue for the next tick; a tick that raises must not drop it
    (the scheduler would keep renewing a lease for a process that is gone)."""
    policy = policy_for([B])
    svc = TaskService(
        SimpleNamespace(  # type: ignore[arg-type]
            peer_id=B.peer_id,
            state_dir=tmp_path,
            exclusive={},
            schedules={},
            _swarm=lambda: SimpleNamespace(paused=False),
        ),
        SimpleNamespace(replica=Replica(B, SWARM, policy)),  # type: ignore[arg-type]
    )
    svc._agents = lambda: []  # type: ignore[method-assign]
    svc._reputation = lambda: None  # type: ignore[assignment, method-assign, return-value]
    ended = T.Finished("B:t", {"n": 1})
    svc._ended.append(ended)

    def broken(*args: Any, **kw: Any) -> T.Plan:
        raise RuntimeError("derivation failed")

    svc.sched = SimpleNamespace(tick=broken)  # type: ignore[assignment]
    with contextlib.suppress(RuntimeError):
        await svc._tick()
    assert svc._ended == [ended]
