"""The node's task view, kept up to date entry by entry: when a peer's update touches only
per-node entries of a task (a bid, a claim, a lease, a result, a log record), the node reads
and parses those and keeps the rest of the task as it was. The view must always equal a
fresh parse of the replica, whatever arrives in whatever mix."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_crdt_support import NOW, SWARM, ident, policy_for

from mossnode.node.tasks import TaskService, apply_writes, paths_of
from mossnode.protocols import tasks as T
from mossnode.protocols.crdt import Replica

A, B, C = ident(0), ident(1), ident(2)


def write(replica: Replica, now: int, effects: list[Any]) -> bytes:
    ws = tuple(w for e in effects for w in T.writes(e, now))
    _, entry = replica.write(lambda w: apply_writes(w, ws), now)
    assert entry is not None
    return entry.data


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_view_read_entry_by_entry_equals_a_fresh_parse(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    policy = policy_for([A, B, C])
    writers = {i.peer_id: Replica(i, SWARM, policy) for i in (A, B, C)}
    reader = Replica(ident(3), SWARM, policy)
    svc = TaskService(
        SimpleNamespace(peer_id=ident(3).peer_id, state_dir=tmp_path, schedules={}),  # type: ignore[arg-type]
        SimpleNamespace(replica=reader),  # type: ignore[arg-type]
    )
    partial = 0
    task_entries = reader.task_entries

    def counted(tid: str, keys: list[str]) -> dict[str, Any] | None:
        nonlocal partial
        partial += 1
        assert reader.doc._txn is not None  # the refresh's one transaction, shared by its reads
        return task_entries(tid, keys)

    reader.task_entries = counted  # type: ignore[method-assign]
    svc.changed(None)
    svc._update_view()
    tids: list[str] = []
    pending: list[bytes] = []
    for step in range(120):
        now = NOW + 10 * step
        node = rng.choice(sorted(writers))
        rep = writers[node]
        if not tids or rng.random() < 0.2:
            plan = T.plan_create(
                {t: v for t, v in svc.view.items()},
                T.Draft(f"t{step}", f"task {step}", capabilities=("py",), spec={"n": step}),
                creator=A.peer_id,
                now_ms=now,
            )
            assert isinstance(plan, T.Create)
            rep = writers[A.peer_id]
            tids.append(plan.task_id)
            effects: list[Any] = [plan]
        else:
            tid = rng.choice(tids)
            n = rng.randint(1, 3)
            effects = [
                rng.choice(
                    [
                        T.Bid(tid, 1, "a1", rng.random()),
                        T.Claim(tid, 1, "a1", now + 5_000),
                        T.RenewLease(tid, 1, now + 9_000),
                        T.Progress(tid, 1, 1, f"step {step}", 0.5),
                        T.Submit(tid, 1, 1, "a1", True, {"out": step}),
                        T.Release(tid, 1, "busy"),
                    ]
                )
                for _ in range(n)
            ]
        # every writer holds every task it writes to: deliver creations to all at once
        data = write(rep, now, effects)
        for other in writers.values():
            if other is not rep:
                other.receive_batch([data], now)
        pending.append(data)
        if rng.random() < 0.5:  # the reader takes what arrived, in gossip-sized batches
            out = reader.receive_batch(pending, now)
            assert len(out.applied) == len(pending)
            pending = []
            # now and then a rescan too (the whole root, as after a snapshot or a rebuild)
            svc.changed(None if rng.random() < 0.1 else list(out.changed))
            svc._update_view()
            fresh = {}
            ids = sorted(reader.doc["tasks"].keys())
            for tid in ids:
                task = T.Task.from_raw(tid, reader.task(tid))
                if task is not None:
                    fresh[tid] = task
            assert svc._known == set(ids), step
            assert dict(svc.view) == fresh, step
    assert partial > 20  # the entry-by-entry path was taken, and agreed every time


def test_with_entries_equals_a_fresh_parse_including_malformed_entries() -> None:
    raw: dict[str, Any] = {
        "title": "t",
        "creator": "A",
        "created_at": 1,
        **{k: {} for k in T.SUB_KINDS},
    }
    task = T.Task.from_raw("A:t", raw)
    assert task is not None
    changes = {
        "bids": {"B": {"attempt": 1, "agent": "b", "score": 0.5, "at": 2}, "C": "junk"},
        "claims": {"B": {"attempt": 1, "agent": "b", "at": 3}},
        "log": {"B": [{"kind": "claim"}, "junk"], "C": "not a list"},
        "results": {"B": {"attempt": 0, "round": 1, "agent": "b", "ok": True, "at": 4}},
    }
    for kind, entries in changes.items():
        raw = {**raw, kind: entries}
        task = task.with_entries(raw, [kind])
        assert task == T.Task.from_raw("A:t", raw), kind


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_entries_of_named_nodes_equals_a_fresh_parse(seed: int) -> None:
    """Re-parsing only the entries of the nodes that changed (added, replaced, removed,
    malformed; nodes arriving out of order) gives what a full parse gives, the maps' node
    order included (derivations iterate them)."""
    rng = random.Random(seed)
    samples = {
        "bids": lambda: {"attempt": rng.randint(1, 3), "agent": "a", "score": 0.5, "at": 2},
        "claims": lambda: {"attempt": 1, "agent": "a", "at": rng.randint(1, 9)},
        "leases": lambda: {"attempt": 1, "expires_at": rng.randint(1, 9)},
        "progress": lambda: {"attempt": 1, "round": 1, "at": 3},
        "results": lambda: {"attempt": 1, "round": 1, "agent": "a", "ok": True, "at": 4},
        "reviews": lambda: {"attempt": 1, "agent": "r", "score": 4, "verdict": "done", "at": 5},
        "log": lambda: [
            {"kind": rng.choice(("claim", "release", "pause")), "at": rng.randint(1, 9)},
            {"kind": "claim", "attempt": rng.randint(1, 2), "agent": "a", "at": rng.randint(1, 9)},
            "junk",
        ][: rng.randint(0, 3)],
    }
    raw: dict[str, Any] = {"title": "t", "creator": "A", "created_at": 1}
    raw.update({k: {} for k in T.SUB_KINDS})
    task = T.Task.from_raw("A:t", raw)
    assert task is not None
    for step in range(300):
        nodes: dict[str, list[str]] = {}
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(sorted(T.SUB_KINDS))
            node = rng.choice("EBDAC")
            entries = dict(raw[kind])
            r = rng.random()
            if r < 0.2:
                entries.pop(node, None)
            elif r < 0.3:
                entries[node] = rng.choice(("junk", None, {"attempt": 0}))
            else:
                entries[node] = samples[kind]()
            raw = {**raw, kind: entries}
            nodes.setdefault(kind, []).append(node)
        task = task.with_entries(raw, nodes, nodes)
        fresh = T.Task.from_raw("A:t", raw)
        assert task == fresh, step
        for kind in T.SUB_KINDS:
            assert list(getattr(task, kind)) == list(getattr(fresh, kind)), step
        # what derivations keep with a task object (the log's index, bid windows) and hand
        # on to the next one while that part is unchanged gives what a fresh parse gives
        for kinds in (("claim",), ("release",), ("cancel", "pause", "resume", "reassign")):
            assert task.records(kinds) == fresh.records(kinds), step
        for now in (3, 60, 10_000):
            assert T.derive_all({"A:t": task}, now) == T.derive_all({"A:t": fresh}, now), step


def test_a_local_write_names_the_paths_a_peer_sees_it_change() -> None:
    """The node refreshes its own writes by the paths ``paths_of`` names: they must be the
    ones a peer's replica reports for the same entry (else the view would miss a change)."""
    policy = policy_for([A, B])
    ra, rb = Replica(A, SWARM, policy), Replica(B, SWARM, policy)
    plan = T.plan_create({}, T.Draft("t", "t", capabilities=("py",)), creator=A.peer_id, now_ms=NOW)
    assert isinstance(plan, T.Create)
    tid = plan.task_id
    cases: list[tuple[Replica, list[Any]]] = [
        (ra, [plan]),
        (rb, [T.Bid(tid, 1, "b", 0.5)]),
        (rb, [T.Claim(tid, 1, "b", NOW + 5_000), T.Progress(tid, 1, 1, "half", 0.5)]),
        (rb, [T.Submit(tid, 1, 1, "b", True, {"n": 1}), T.Release(tid, 1, "done")]),
    ]
    for rep, effects in cases:
        ws = tuple(w for e in effects for w in T.writes(e, NOW))
        _, entry = rep.write(lambda w, ws=ws: apply_writes(w, ws), NOW)
        assert entry is not None
        peer = rb if rep is ra else ra
        seen = {tuple(p[:3]) for p in peer.receive_batch([entry.data], NOW).changed}
        assert set(paths_of(ws, rep.me)) == seen, effects
