"""Shared helpers for the CRDT tests: a table policy, forged entries, a gossip simulator.

Imported by the other tests (``from test_crdt_support import ...``); its own tests check the
helpers themselves.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Map

from mossnode.crypto.envelope import Reason, seal
from mossnode.crypto.identity import Identity
from mossnode.protocols.crdt import STATE_UPDATE, Replica, WriteRefused, client_id_for
from mossnode.protocols.crdt.document import new_doc
from mossnode.protocols.crdt.entry import body
from mossnode.protocols.crdt.schema import NODE_ENTRIES
from mossnode.protocols.crdt.yrs_update import decode_state_vector

SWARM = b"\x5a" * 32
NOW = 1_800_000_000_000


def ident(i: int) -> Identity:
    return Identity(bytes([i + 1]) * 32)


@dataclass
class TablePolicy:
    """Members and grants per author; ``None`` grants mean every permission."""

    members: set[str] = field(default_factory=set)
    grants: dict[str, set[str] | None] = field(default_factory=dict)
    seq: int = 0
    floors: dict[str, tuple[int, int]] = field(default_factory=dict)  # author -> (cutoff, floor)
    joined: dict[str, int] = field(default_factory=dict)  # author -> first policy seq as member

    def latest_seq(self) -> int:
        return self.seq

    def is_member(self, author: str, policy_seq: int) -> bool:
        return author in self.members and policy_seq >= self.joined.get(author, 0)

    def may(self, author: str, permission: str, policy_seq: int) -> bool:
        granted = self.grants.get(author)
        return granted is None or permission in granted

    def floor(self, author: str, update_seq: int) -> int:
        cut = self.floors.get(author)
        return cut[1] if cut is not None and update_seq > cut[0] else 0


def policy_for(ids: Iterable[Identity]) -> TablePolicy:
    return TablePolicy(members={i.peer_id for i in ids})


def forge(
    replica: Replica,
    who: Identity,
    fn: Callable[[Doc[Map[Any]]], None] | None = None,
    *,
    update: bytes | None = None,
    seq: int | None = None,
    policy_seq: int = 0,
    deps: dict[int, int] | None = None,
    prev: bytes | None = None,
    client_id: int | None = None,
) -> bytes:
    """An entry signed by ``who`` whose update is ``fn`` run on a copy of ``replica``'s document
    (with ``who``'s client id unless told otherwise), or the raw ``update`` given."""
    doc = new_doc(client_id or client_id_for(who.public_key), replica.doc.get_update())
    sv = decode_state_vector(doc.get_state())
    if update is None:
        assert fn is not None
        captured: list[bytes] = []
        doc.observe(lambda ev: captured.append(ev.update))
        with doc.transaction():
            fn(doc)
        update = captured[-1]
    author = who.peer_id
    return seal(
        who,
        swarm_id=SWARM,
        type=STATE_UPDATE,
        seq=seq if seq is not None else replica.vector().get(author, 0) + 1,
        timestamp=NOW,
        body=body(
            update,
            sv if deps is None else deps,
            policy_seq,
            replica.heads().get(author, b"") if prev is None else prev,
        ),
    )


# -- a lossy gossip network of replicas -------------------------------------------------------


class Sim:
    """N replicas writing at random; gossip drops, duplicates, reorders and partitions."""

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        drop: float = 0.2,
        dup: float = 0.1,
        policy: TablePolicy | None = None,
        byzantine: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.ids = [ident(i) for i in range(n)]
        self.byz_id = ident(n)
        self.policy = policy or policy_for([*self.ids, self.byz_id])
        self.reps = [Replica(i, SWARM, self.policy) for i in self.ids]
        self.byz = Replica(self.byz_id, SWARM, self.policy) if byzantine else None
        self.stalled = 0  # honest writes refused because the writer's chain was stranded
        self.drop = drop
        self.dup = dup
        self.inflight: list[tuple[int, bytes]] = []
        self.groups: list[set[int]] | None = None
        self.writes = 0
        self.counter = 0

    def _reachable(self, a: int, b: int) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    def partition(self) -> None:
        order = list(range(len(self.reps)))
        self.rng.shuffle(order)
        cut = self.rng.randint(1, len(order) - 1)
        self.groups = [set(order[:cut]), set(order[cut:])]

    def heal_partition(self) -> None:
        self.groups = None

    def _value(self) -> Any:
        rng = self.rng
        return {
            "n": rng.randint(0, 1000),
            "s": rng.choice(["a", "b", "c"]),
            "ok": rng.random() < 0.5,
        }

    def random_write(self, i: int) -> None:
        try:
            self._random_write(self.reps[i])
        except WriteRefused as refused:
            assert "stalled" in str(refused) or "blocked" in str(refused)
            self.stalled += 1
            return
        self.writes += 1
        self._gossip(i, self.reps[i])

    def _random_write(self, rep: Replica) -> None:
        rng = self.rng
        tasks = list(rep.doc["tasks"].keys())
        mine = [t for t in tasks if t.startswith(rep.me + ":")]
        roll = rng.random()
        self.counter += 1
        now = NOW + self.counter
        if not tasks or roll < 0.12:
            suffix = f"t{self.counter}"
            rep.create_task(suffix, now, title=f"task {self.counter}", capabilities=["py"])
        elif roll < 0.47:
            kind = rng.choice(NODE_ENTRIES)
            tid = rng.choice(tasks)
            rep.write(lambda w: w.put(tid, kind, self._value()), now)
        elif roll < 0.57:
            kind = rng.choice(NODE_ENTRIES)
            tid = rng.choice(tasks)
            rep.write(lambda w: w.remove(tid, kind), now)
        elif roll < 0.72:
            tid = rng.choice(tasks)
            rep.write(lambda w: w.append_log(tid, {"at": now, "m": "x"}), now)
        elif roll < 0.80:
            agent = f"agent{rng.randint(0, 3)}"
            rep.write(lambda w: w.put_agent(agent, {"caps": ["py"], "load": rng.random()}), now)
        elif roll < 0.83:
            agent = f"agent{rng.randint(0, 3)}"
            rep.write(lambda w: w.remove_agent(agent), now)
        elif roll < 0.90:
            rep.write(lambda w: w.append_history({"event": "done", "at": now}), now)
        elif mine and roll < 0.97:
            tid = rng.choice(mine)
            rep.write(lambda w: w.update_task(tid, priority=rng.randint(0, 9)), now)
        elif mine:
            tid = rng.choice(mine)
            rep.write(lambda w: w.delete_task(tid), now)
        else:
            rep.write(lambda w: w.append_history({"event": "idle"}), now)

    def byzantine_step(self) -> None:
        """The Byzantine member writes validly, or signs two entries for one seq (one of them
        possibly forbidden) and shows each to a different part of the swarm."""
        byz, rng = self.byz, self.rng
        assert byz is not None
        src = rng.choice(self.reps)
        for batch in src.missing_for(byz.vector()):
            byz.receive_batch(batch, NOW)
        tasks = list(byz.doc["tasks"].keys())
        victim = rng.choice(self.ids).peer_id
        forged: bytes | None = None
        if tasks and rng.random() < 0.4:
            tid = rng.choice(tasks)
            if rng.random() < 0.5:
                forged = forge(
                    byz, self.byz_id, lambda d: d["tasks"][tid].__setitem__(f"claims/{victim}", 1)
                )
            else:
                forged = forge(
                    byz,
                    self.byz_id,
                    lambda d: d["history"].__setitem__(self.byz_id.peer_id, Array(["alt"])),
                )
        self.counter += 1
        try:
            if rng.random() < 0.5:
                _, entry = byz.create_task(f"b{self.counter}", NOW, title="bait")
            else:
                _, entry = byz.write(lambda w: w.append_history({"n": self.counter}), NOW)
        except WriteRefused:
            return
        assert entry is not None
        for j in range(len(self.reps)):
            if rng.random() < self.drop:
                continue
            if forged is not None and rng.random() < 0.5:
                self.inflight.append((j, forged))
            else:
                self.inflight.append((j, entry.data))

    def _gossip(self, i: int, rep: Replica) -> None:
        if not rep.entry_count():
            return
        last = next(rep.entries(rep.entry_count() - 1))
        if last.author != rep.me:
            return
        data = last.data
        for j in range(len(self.reps)):
            if j == i or self.rng.random() < self.drop:
                continue
            self.inflight.append((j, data))
            if self.rng.random() < self.dup:
                self.inflight.append((j, data))

    def deliver_some(self, k: int) -> None:
        for _ in range(min(k, len(self.inflight))):
            j, data = self.inflight.pop(self.rng.randrange(len(self.inflight)))
            self.reps[j].receive(data, NOW)

    def run(self, ops: int, *, partition_every: int = 0) -> None:
        for step in range(ops):
            if partition_every and step % partition_every == partition_every // 2:
                self.partition() if self.groups is None else self.heal_partition()
            if self.byz is not None and self.rng.random() < 0.08:
                self.byzantine_step()
            writer = self.rng.randrange(len(self.reps))
            self.random_write(writer)
            self.deliver_some(self.rng.randint(0, 3))
        # what is still in flight is delivered within partitions only, or lost
        for j, data in self.inflight:
            if self.rng.random() > self.drop:
                self.reps[j].receive(data, NOW)
        self.inflight.clear()

    def anti_entropy(self, *, max_rounds: int = 10, max_entries: int = 64) -> int:
        """Pairwise vector exchange until every replica holds every entry; returns rounds."""
        self.heal_partition()
        n = len(self.reps)
        for rnd in range(1, max_rounds + 1):
            for i in range(n):
                for j in range(n):
                    if i == j:
                        continue
                    a, b = self.reps[i], self.reps[j]
                    for batch in b.missing_for(
                        a.vector(), a.heads(), a.blocked_seqs(), max_entries=max_entries
                    ):
                        a.receive_batch(batch, NOW)
            if self.converged():
                return rnd
        return -1

    def converged(self) -> bool:
        vectors = [r.vector() for r in self.reps]
        digests = {r.digest() for r in self.reps}
        return all(v == vectors[0] for v in vectors) and len(digests) == 1

    def assert_healthy(self) -> None:
        for rep in self.reps:
            assert rep.pending_count() == 0
            assert not rep.blocked
            assert set(rep.rejections) <= {Reason.REPLAY}, rep.rejections
            sv = decode_state_vector(rep.doc.get_state())
            assert {c: k for c, k in sv.items() if k} == rep._sv


# -- tests of the helpers ---------------------------------------------------------------------


def test_table_policy_floors_and_grants() -> None:
    p = TablePolicy(members={"a"}, grants={"a": {"task.claim"}}, floors={"a": (5, 9)})
    assert p.is_member("a", 0) and not p.is_member("b", 0)
    assert p.may("a", "task.claim", 0) and not p.may("a", "task.create", 0)
    assert p.floor("a", 5) == 0 and p.floor("a", 6) == 9


def test_sim_small_run_converges() -> None:
    sim = Sim(3, seed=1, drop=0.5)
    sim.run(40)
    assert sim.anti_entropy() > 0
    sim.assert_healthy()


def test_direct_apply_update_matches_pycrdt() -> None:
    from mossnode.protocols.crdt.document import apply_update, state_digest

    src = new_doc(7)
    with src.transaction():
        src["tasks"]["a"] = Map({"x": 1, "l": Array([1, 2])})
    update = src.get_update()
    direct, public = new_doc(8), new_doc(9)
    seen: list[object] = []
    sub = direct["tasks"].integrated.observe_deep(seen.extend)
    apply_update(direct, update)
    public.apply_update(update)
    assert state_digest(direct) == state_digest(public) == state_digest(src)
    assert seen  # observers on the Rust objects fired at the commit
    del sub
    # inside an open transaction it takes pycrdt's own way (which joins that transaction)
    other = new_doc(10)
    with other.transaction():
        apply_update(other, update)
        other["tasks"]["b"] = 2
    assert other["tasks"]["b"] == 2 and "a" in other["tasks"]
