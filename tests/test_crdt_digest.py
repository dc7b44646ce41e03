"""The kept state digest (``document.ContentDigest``) against the reference ``state_digest``.

A change inside a task re-encodes only the task-map entries it touched; these runs make every
kind of change (entries put, removed, logs appended, core fields updated, tasks deleted and
re-created, agents, history) on replicas that also receive each other's entries out of order,
and check the kept digest after every step, with the split cache small enough to evict.
"""

from __future__ import annotations

import pytest
from test_crdt_support import NOW, SWARM, Sim, ident, policy_for

from mossnode.protocols.crdt import Replica
from mossnode.protocols.crdt.document import ContentDigest, state_digest

A = ident(0)


@pytest.mark.parametrize("split", [0, 2, 4096])
def test_kept_digest_follows_every_change(monkeypatch: pytest.MonkeyPatch, split: int) -> None:
    monkeypatch.setattr(ContentDigest, "MAX_SPLIT", split)
    sim = Sim(3, seed=5 + split, drop=0.1)
    for step in range(30):
        sim.run(8, partition_every=5)
        for rep in sim.reps:
            assert rep.digest() == state_digest(rep.doc), (split, step)
    sim.anti_entropy()
    assert len({rep.digest() for rep in sim.reps}) == 1


def test_entry_changes_reencode_only_the_entry() -> None:
    rep = Replica(A, SWARM, policy_for([A]))
    tid, _ = rep.create_task("t", NOW, title="x")
    rep.digest()
    split = rep._content_digest._split
    assert ("tasks", tid) in split
    before = split[("tasks", tid)].pairs.copy()
    rep.write(lambda w: w.bid(tid, {"attempt": 1, "score": 0.5}), NOW)
    assert rep.digest() == state_digest(rep.doc)
    after = split[("tasks", tid)].pairs
    assert set(after) - set(before) == {f"bids/{A.peer_id}"}
    assert all(after[k] is before[k] for k in before)  # the other entries were not re-encoded
    rep.write(lambda w: w.remove(tid, "bids"), NOW)
    assert rep.digest() == state_digest(rep.doc)
    assert set(split[("tasks", tid)].pairs) == set(before)
    rep.write(lambda w: w.delete_task(tid), NOW)
    assert rep.digest() == state_digest(rep.doc)
    assert ("tasks", tid) not in split
