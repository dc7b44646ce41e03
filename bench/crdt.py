"""Shared-state throughput and catch-up.

1. One node's full receive path (signature, decode, authorization, apply to pycrdt, group commit
   to SQLite) on a stream of another member's signed updates, against raw PyNaCl verify and raw
   pycrdt ``apply_update`` of the same updates, in the same run.
2. Catch-up: a real daemon that missed 10,000 updates reconnects; time until its digest matches.
3. Document size and RSS with 100,000 tasks.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import cbor2
import nacl.signing
from pycrdt import Doc, Map

from mossnode.cluster import Cluster, wait_for
from mossnode.crypto.envelope import SIG_LEN
from mossnode.crypto.identity import Identity, load_identity
from mossnode.node.consensus import load_membership
from mossnode.node.daemon import tune_gc
from mossnode.node.ledger import load_ledger
from mossnode.node.store import Store, load_replica
from mossnode.protocols.crdt import Replica, task_id
from mossnode.protocols.membership import (
    Entry,
    Membership,
    MembershipPolicy,
    founder_certificate,
    make_genesis,
)

N_UPDATES = 10_000
N_TASKS = 100_000


def swarm_of(founder: Identity, other: Identity) -> Membership:
    now = time.time_ns() // 1_000_000
    state = Membership(make_genesis(founder, "bench", now))
    payload = {"public_key": other.public_key, "roles": ["planner", "executor"], "invite": b"1"}
    state.apply(
        Entry(
            1,
            "admit",
            payload,
            founder_certificate(state.genesis, founder, 1, "admit", payload, now),
        )
    )
    return state


def make_updates(
    author: Identity, state: Membership, n: int, kind: str = "create"
) -> tuple[list[bytes], list[bytes]]:
    """``n`` signed updates by ``author``: task creations, or (``kind="lease"``) lease renewals
    on tasks it created first (the commonest write of a running swarm), creations included."""
    rep = Replica(author, state.swarm_id, MembershipPolicy(state))
    now = time.time_ns() // 1_000_000
    wires, raw_updates = [], []
    for i in range(n):
        if kind == "lease" and i >= n // 10:
            tid = task_id(rep.me, f"t{i % (n // 10)}")
            _, e = rep.write(lambda w, tid=tid, i=i: w.lease(tid, {"until": now + i}), now)
        else:
            _, e = rep.write(
                lambda w, i=i: w.create_task(f"t{i}", title=f"task {i}", priority=i % 5), now
            )
        assert e is not None
        wires.append(e.data)
    # the Yrs updates themselves, for the raw apply baseline
    for w in wires:
        raw_updates.append(cbor2.loads(w[SIG_LEN:])[6]["u"])
    return wires, raw_updates


def _full_path(state: Membership, founder: Identity, wires: list[bytes]) -> tuple[float, float]:
    """Updates per second through one replica's receive path, in wall and CPU time."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.db")
        rep = Replica(founder, state.swarm_id, MembershipPolicy(state))
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(wires), 256):
            out = rep.receive_batch(wires[i : i + 256], time.time_ns() // 1_000_000)
            store.commit(entries=[(e.author, e.seq, e.data) for e in out.applied])
        full = len(wires) / (time.perf_counter() - t0)
        full_cpu = len(wires) / (time.process_time() - c0)
        assert sum(rep.vector().values()) == len(wires)
        store.close()
    return full, full_cpu


def receive_path() -> None:
    tune_gc()  # the daemon's collector settings: this is its receive path, in-process
    founder, author = Identity.generate(), Identity.generate()
    state = swarm_of(founder, author)
    wires, updates = make_updates(author, state, N_UPDATES)
    leases, _ = make_updates(author, state, N_UPDATES, kind="lease")
    # raw baselines
    vk = nacl.signing.VerifyKey(author.public_key)
    signed = [nacl.signing.SigningKey(author.seed).sign(w[SIG_LEN:]) for w in wires[:2000]]

    def verify_rate() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for s in signed:
            vk.verify(s)
        return len(signed) / (time.perf_counter() - t0), len(signed) / (time.process_time() - c0)

    raw_verify, raw_verify_cpu = verify_rate()
    doc: Doc = Doc()
    doc["tasks"] = Map()
    t0 = time.perf_counter()
    for u in updates:
        doc.apply_update(u)
    raw_apply = len(updates) / (time.perf_counter() - t0)
    # the full path: receive in gossip-sized batches, group commit each batch
    full, full_cpu = _full_path(state, founder, wires)
    lease, lease_cpu = _full_path(state, founder, leases)
    # the machine is shared: take the better of two baseline runs (the stricter comparison)
    again, again_cpu = verify_rate()
    raw_verify, raw_verify_cpu = max(raw_verify, again), max(raw_verify_cpu, again_cpu)
    print(f"raw PyNaCl verify            {raw_verify:9.0f} /s")
    print(f"raw pycrdt apply_update      {raw_apply:9.0f} /s")
    print(
        f"full path (verify, authorize, apply, store)  {full:9.0f} /s   "
        f"ratio to raw verify {full / raw_verify:.2f} (target >= 0.50)"
    )
    print(
        f"  same in CPU time: {1e6 / full_cpu:.0f} us per update vs {1e6 / raw_verify_cpu:.0f} us "
        f"per verify, ratio {full_cpu / raw_verify_cpu:.2f}"
    )
    print(
        f"  lease renewals (9 in 10 updates): {lease:.0f} /s, ratio {lease / raw_verify:.2f}; "
        f"{1e6 / lease_cpu:.0f} us of CPU per update, ratio {lease_cpu / raw_verify_cpu:.2f}"
    )


def catch_up() -> None:
    with Cluster(2, config={"presence_interval_s": 0.5}) as c:
        c.start(roles=["planner"])
        a, b = c.nodes
        b.stop()
        a.stop()
        # write 10,000 updates as node a, straight into its store, while b is away
        ident = load_identity(a.state_dir / "identity.key")
        ledger = load_ledger(a.state_dir)
        assert ledger is not None
        store = Store(a.state_dir / "state.db")
        state = load_membership(store, ledger.genesis)
        rep = load_replica(
            store, ident, state.swarm_id, MembershipPolicy(state), time.time_ns() // 1_000_000
        ).replica
        rows = []
        for i in range(N_UPDATES):
            _, e = rep.write(
                lambda w, i=i: w.create_task(f"c{i}", title=f"offline {i}"),
                time.time_ns() // 1_000_000,
            )
            assert e is not None
            rows.append((e.author, e.seq, e.data))
        store.commit(entries=rows)
        store.close()
        a.start()
        target = a.status()["state_digest"]
        b.start()  # returns once its API answers; it then dials a and syncs
        t0 = time.monotonic()
        wait_for(lambda: b.status()["state_digest"] == target, 120, "catch-up", interval=0.05)
        took = time.monotonic() - t0
    print(
        f"catch-up of {N_UPDATES} missed updates after restart: {took:.2f} s "
        f"(includes daemon start-up; target < 5 s)"
    )


def size_and_rss() -> None:
    founder, author = Identity.generate(), Identity.generate()
    state = swarm_of(founder, author)
    rep = Replica(author, state.swarm_id, MembershipPolicy(state))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    now = time.time_ns() // 1_000_000
    for b in range(N_TASKS // 200):

        def many(w, b=b):
            for i in range(200):
                w.create_task(f"s{b}-{i}", title=f"task {b}-{i}", capabilities=["python"])

        rep.write(many, now)
    snapshot = rep.snapshot()
    size = len(snapshot)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{N_TASKS} tasks: document snapshot {size / 1e6:.1f} MB, "
        f"process max RSS {rss / 1024:.0f} MB (+{(rss - before) / 1024:.0f} MB)"
    )
    yrs = len(cbor2.loads(snapshot)["doc"])
    print(
        f"  of the snapshot, the Yrs document update is {yrs / 1e6:.1f} MB; "
        f"the location index holds {len(rep._index)} rows"
    )


def run() -> None:
    receive_path()
    catch_up()
    size_and_rss()
