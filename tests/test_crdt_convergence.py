"""Replicas converge whatever gossip does: drops, duplicates, reordering, partitions.

Deterministic: every run is seeded, hypothesis is derandomized. No sockets, no clocks.
"""

from __future__ import annotations

import random

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crdt_support import NOW, SWARM, Sim, ident, policy_for

from mossnode.crypto.envelope import SIG_LEN
from mossnode.protocols.crdt import Replica
from mossnode.protocols.crdt.yrs_update import decode_update


@pytest.mark.slow
@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    drop=st.floats(0.0, 0.8),
    dup=st.floats(0.0, 0.5),
    ops=st.integers(20, 300),
    partition_every=st.sampled_from([0, 15, 40]),
)
def test_random_histories_converge(
    seed: int, drop: float, dup: float, ops: int, partition_every: int
) -> None:
    sim = Sim(5, seed, drop=drop, dup=dup)
    sim.run(ops, partition_every=partition_every)
    rounds = sim.anti_entropy(max_entries=random.Random(seed).randint(1, 50))
    assert rounds == 1  # one pairwise sweep delivers everything
    sim.assert_healthy()


@pytest.mark.slow
def test_thousands_of_updates_converge() -> None:
    sim = Sim(5, seed=20240601, drop=0.35, dup=0.15)
    sim.run(2000, partition_every=150)
    assert sim.writes == 2000
    assert sim.anti_entropy(max_entries=100) > 0
    sim.assert_healthy()
    content = sim.reps[0].content()
    assert content["tasks"] and content["agents"] and content["history"]


def test_same_content_same_digest_in_any_order() -> None:
    sim = Sim(3, seed=5, drop=1.0)  # no gossip at all: every replica alone
    sim.run(60)
    entries = [e.data for rep in sim.reps for e in rep.entries() if e.author == rep.me]
    ids = [ident(i) for i in range(3)]
    digests = set()
    for shuffle_seed in range(4):
        fresh = Replica(ident(9), SWARM, policy_for([*ids, ident(9)]))
        order = list(entries)
        random.Random(shuffle_seed).shuffle(order)
        fresh.receive_batch(order, NOW)
        assert fresh.pending_count() == 0
        digests.add(fresh.digest())
    assert len(digests) == 1
    assert sim.anti_entropy() > 0
    assert {r.digest() for r in sim.reps} == digests


def test_anti_entropy_batches_are_bounded_and_ordered() -> None:
    sim = Sim(3, seed=11, drop=1.0)
    sim.run(90)
    src = sim.reps[0]
    sim.anti_entropy()
    batches = list(src.missing_for({}, max_entries=7, max_bytes=4000))
    assert all(1 <= len(b) <= 7 for b in batches)
    assert all(len(b) == 1 or sum(map(len, b)) <= 4000 for b in batches)
    fresh = Replica(ident(8), SWARM, sim.policy)
    seen: dict[str, int] = {}
    for batch in batches:
        out = fresh.receive_batch(batch, NOW)
        assert not out.refused
        for entry in out.applied:  # per author in seq order, nothing ever waits
            assert entry.seq == seen.get(entry.author, 0) + 1
            seen[entry.author] = entry.seq
    assert fresh.pending_count() == 0
    assert fresh.digest() == src.digest()
    assert fresh.vector() == src.vector()
    assert list(src.missing_for(fresh.vector(), fresh.heads())) == []


def test_out_of_order_entries_wait_then_apply() -> None:
    sim = Sim(2, seed=3, drop=1.0)
    sim.run(30)
    sim.anti_entropy()
    src = sim.reps[0]
    entries = [e for batch in src.missing_for({}) for e in batch]
    fresh = Replica(ident(7), SWARM, sim.policy)
    fresh.receive_batch(reversed(entries), NOW)
    assert fresh.pending_count() == 0
    assert fresh.digest() == src.digest()


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), drop=st.floats(0.0, 0.6))
def test_honest_replicas_converge_around_an_equivocating_member(seed: int, drop: float) -> None:
    """A member signs two entries for one seq (one of them at times forbidden) and shows each
    to part of the swarm, while honest nodes build on whatever they saw. After anti-entropy the
    honest replicas agree on everything, and no honest write is lost or stranded."""
    sim = Sim(4, seed, drop=drop, dup=0.1, byzantine=True)
    sim.run(200, partition_every=30)
    assert sim.anti_entropy(max_rounds=8) > 0
    assert sim.stalled == 0
    honest = {i.peer_id for i in sim.ids}
    for rep in sim.reps:
        assert not set(rep._pending) & honest  # only the Byzantine's own entries may wait
        assert rep.vector().get(rep.me, 0) == rep.own_signed
        assert not set(rep.blocked_authors()) - {sim.byz_id.peer_id}
    assert len({tuple(sorted(r.vector().items())) for r in sim.reps}) == 1


def test_a_task_is_two_items_and_every_node_writes_without_waiting_for_a_container() -> None:
    """Layout 2: creating a task writes the map and its core value only; nodes that never saw
    each other's writes each add their own claims, logs and results, and all of them survive."""
    ids = [ident(i) for i in range(3)]
    policy = policy_for(ids)
    reps = [Replica(i, SWARM, policy) for i in ids]
    tid, created = reps[0].write(lambda w: w.create_task("t", title="shared"), NOW)
    assert created is not None
    update = cbor2.loads(created.data[SIG_LEN:])[6]["u"]
    assert len(decode_update(update).items) == 2
    for rep in reps[1:]:
        assert rep.receive(created.data, NOW).applied
    # partitioned: each node writes its entries without seeing the others'
    written = []
    for n, rep in enumerate(reps):
        for fn in (
            lambda w, n=n: w.claim(tid, {"n": n}),
            lambda w, n=n: w.append_log(tid, {"kind": "note", "n": n}),
            lambda w, n=n: w.result(tid, {"out": n}),
        ):
            _, entry = rep.write(fn, NOW)
            assert entry is not None
            written.append(entry.data)
    for rep in reps:
        rep.receive_batch(written, NOW)
    views = [rep.task(tid) for rep in reps]
    assert views[0] == views[1] == views[2]
    task = views[0]
    assert task is not None and task["title"] == "shared"
    assert task["claims"] == {i.peer_id: {"n": n} for n, i in enumerate(ids)}
    assert task["results"] == {i.peer_id: {"out": n} for n, i in enumerate(ids)}
    assert task["log"] == {i.peer_id: [{"kind": "note", "n": n}] for n, i in enumerate(ids)}
    assert len({rep.digest() for rep in reps}) == 1
