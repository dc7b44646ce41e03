"""ConsensusService over real libp2p hosts on loopback, in-process: the founder alone, then four
validators deciding a membership change while one is stopped, which then catches up."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.peer.peerinfo import info_from_p2p_addr

from mossnode.crypto.identity import Identity
from mossnode.node.consensus import (
    ConsensusService,
    ProposalRefused,
    fetch_log,
    load_membership,
)
from mossnode.node.host import make_host
from mossnode.node.store import Store
from mossnode.protocols.decisions import ConsensusMembership, Output, origin_of
from mossnode.protocols.entry_proof import EntryProof
from mossnode.protocols.membership import Entry, Genesis, MembershipError, make_genesis
from mossnode.protocols.pbft import verify_commits

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def ident(i: int) -> Identity:
    return Identity(bytes([0x40 + i]) * 32)


class Node:
    """One in-process node: its own host, store and service; stop() is a crash-like stop
    (cancelled mid-flight, store closed), start() restores from the same store."""

    def __init__(self, identity: Identity, genesis: Genesis, root: Path) -> None:
        self.identity = identity
        self.genesis = genesis
        self.db = root / f"{identity.peer_id[-8:]}.db"
        self.decided: list[Entry] = []
        self.svc: ConsensusService | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def state(self) -> ConsensusMembership:
        assert self.svc is not None
        return self.svc.state

    async def start(self, nursery: trio.Nursery) -> None:
        self._stopped = trio.Event()
        await nursery.start(self._serve)

    async def _serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        store = Store(self.db)
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                self.host = make_host(self.identity)
                async with self.host.run(LOOPBACK), trio.open_nursery() as nursery:
                    self.svc = ConsensusService(
                        self.identity,
                        load_membership(store, self.genesis),
                        store,
                        self.host,
                        on_decided=self._on_decided,
                        view_timeout_ms=1_000,
                        retransmit_ms=200,
                        client_retransmit_ms=400,
                        sync_interval_s=0.3,
                    )
                    await nursery.start(self.svc.run)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            store.close()
            self._stopped.set()

    async def _on_decided(self, entries: list[Entry]) -> None:
        self.decided.extend(entries)

    async def stop(self) -> None:
        """Like a crash: sockets close (peers see resets), nothing is flushed gracefully."""
        assert self._scope is not None
        with trio.move_on_after(5):
            await self.host.close()
        self._scope.cancel()
        await self._stopped.wait()

    async def connect(self, other: Node) -> None:
        await self.host.connect(info_from_p2p_addr(other.host.get_addrs()[0]))


async def wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def admit(who: Identity, roles: list[str], nonce: bytes) -> dict:  # type: ignore[type-arg]
    return {"public_key": who.public_key, "roles": roles, "invite": nonce}


def voting(node: Node, size: int, entry: Entry | None = None) -> bool:
    """Its replica runs with ``size`` validators in force (the null batches after a change
    brought them in) and has executed the batch of ``entry``."""
    if node.svc is None or node.svc.core.replica is None:
        return False
    r = node.svc.core.replica
    if len(r.validators) != size:
        return False
    if entry is None:
        return True
    proof = EntryProof.parse(entry.certificate[0])
    return proof is not None and node.svc.state.height >= entry.seq and r.last_executed >= proof.n


async def test_founder_alone_decides_restarts_and_a_member_proposes(tmp_path: Path) -> None:
    founder, member = ident(0), ident(9)
    genesis = make_genesis(founder, "solo", 1_700_000_000_000)
    node, other = Node(founder, genesis, tmp_path), Node(member, genesis, tmp_path)
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        svc = node.svc
        assert svc is not None
        e1 = await svc.propose("admit", admit(member, ["admin"], b"i1"), 5)
        assert (e1.seq, e1.kind) == (1, "admit")
        # n = 1: one commit from the founder is the whole quorum, over the batch's digest
        cert = e1.certificate
        root = EntryProof.parse(cert[0]).root()  # type: ignore[union-attr]
        vals = [founder.public_key]
        assert verify_commits(cert[1:], vals, genesis.swarm_id, seq=1, batch_digest=root)
        with pytest.raises(ProposalRefused, match="already a member"):
            await svc.propose("admit", admit(member, ["executor"], b"i2"), 5)
        # enough decisions for the replica's records to be compacted
        for k in range(40):
            await svc.propose("pause" if k % 2 == 0 else "resume", {}, 5)
        assert svc.state.height == 41 and not svc.state.paused
        assert int(svc.store.get_meta("pbft/rec/n") or b"0") < 64
        await wait_for(lambda: len(node.decided) == 41, 5)
        await node.stop()

        # restart from the compacted records and the stored log, and go on deciding
        await node.start(nursery)
        svc = node.svc
        assert svc is not None and svc.core.replica is not None
        assert svc.state.height == 41 and svc.core.replica.last_executed == 41
        assert (await svc.propose("pause", {}, 5)).seq == 42

        # a member that is not a validator follows by state transfer and proposes too
        await other.start(nursery)
        await other.connect(node)
        await wait_for(lambda: other.state.height == 42)
        assert other.svc is not None and not other.svc.is_validator
        e = await other.svc.propose("resume", {}, 10)
        assert e.seq == 43 and other.state.origin[43][0] == member.public_key
        await wait_for(lambda: node.state.height == 43 and len(other.decided) == 43)

        # a joiner's transfer: the whole log in pages of 10, every certificate verified
        scratch = ConsensusMembership(genesis)
        await fetch_log(other.host, node.host.get_id(), scratch, 43, 10, page=10)
        assert scratch.entries == node.state.entries and scratch.position == node.state.position
        with pytest.raises(MembershipError, match="stops at 43 of 50"):
            await fetch_log(other.host, node.host.get_id(), scratch, 50, 10, page=10)
        nursery.cancel_scope.cancel()
    with Store(node.db) as store:
        assert load_membership(store, genesis).height == 43


@pytest.mark.slow
async def test_four_validators_decide_with_one_stopped_and_it_catches_up(tmp_path: Path) -> None:
    ids = [ident(i) for i in range(5)]
    genesis = make_genesis(ids[0], "four", 1_700_000_000_000)
    nodes = [Node(i, genesis, tmp_path) for i in ids[:4]]
    f, *others = nodes
    async with trio.open_nursery() as nursery:
        for n in nodes:
            await n.start(nursery)
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                await a.connect(b)
        assert f.svc is not None

        # Grow from the founder alone to four validators; each newcomer catches up by state
        # transfer, verifying every certificate, then votes.
        for k, n in enumerate(others, start=1):
            entry = await f.svc.propose("admit", admit(n.identity, ["validator"], b"v%d" % k), 20)
            assert entry.kind == "admit" and f.state.entries[k - 1] is not None
            await wait_for(lambda k=k: all(voting(m, k + 1) for m in nodes[: k + 1]))
        assert len(f.state.validators()) == 4

        # Stop one validator (a backup); the other three decide (quorum 3 of 4).
        primary = f.svc.core.replica.primary  # type: ignore[union-attr]
        down = next(n for n in others if n.identity.public_key != primary)
        await down.stop()
        newcomer = ids[4]
        entry = await f.svc.propose("admit", admit(newcomer, ["executor"], b"m1"), 30)
        assert entry.kind == "admit"
        signers = {e[0] for e in _signers(entry)}
        assert down.identity.public_key not in signers and len(signers) >= 3
        up = [n for n in nodes if n is not down]
        await wait_for(lambda: all(n.state.height >= entry.seq for n in up))

        # Restart it: it restores its replica from its records, catches up, verifies.
        await down.start(nursery)
        for n in up:
            await down.connect(n)
        await wait_for(lambda: voting(down, 4, entry), 30)
        assert down.state.is_member(newcomer.public_key)

        # It votes again: with the primary stopped (or, if the founder is primary, another
        # backup) it is needed for the quorum, and for the view change.
        primary = f.svc.core.replica.primary  # type: ignore[union-attr]
        spare = next(
            (n for n in up if n is not f and n.identity.public_key == primary),
            next(n for n in up if n is not f),
        )
        await spare.stop()
        entry = await f.svc.propose(
            "grant", {"public_key": newcomer.public_key, "role": "reviewer"}, 30
        )
        assert entry.kind == "grant"
        assert down.identity.public_key in {s for s, _ in _signers(entry)}
        await wait_for(lambda: down.state.height >= entry.seq)
        nursery.cancel_scope.cancel()

    # Every store replays from genesis with every certificate verified, and all agree.
    logs = []
    for n in nodes:
        with Store(n.db) as store:
            state = load_membership(store, genesis)
        logs.append([(e.seq, e.kind, e.certificate[0]) for e in state.entries])
        real = [e for e in state.entries if e.payload.get("reason") != "null"]
        assert origin_of(state.entries[0], genesis.swarm_id) == [
            (ids[0].public_key, state.origin[1][1])
        ]
        kinds = [e.kind for e in real]
        assert kinds == (["admit"] * 4 + ["grant"])[: len(kinds)] and len(kinds) >= 4
        if n is f or n is down:
            assert len(kinds) == 5
    assert logs[nodes.index(down)] == logs[0]
    for lg in logs:
        assert len(lg) >= 4 and lg == logs[0][: len(lg)]


def _signers(entry: Entry) -> list[tuple[bytes, int]]:
    import cbor2

    out = []
    for raw in entry.certificate[1:]:
        fields = cbor2.loads(raw[64:])
        out.append((fields[3], fields[6]["n"]))
    return out


class _SlowStore:
    """A store that is always busy when asked to write in place, so writes go to a worker
    thread, where they wait until the test releases them."""

    path = "slow"

    def __init__(self) -> None:
        self.gates: list[threading.Event] = []
        self.writes: list[dict[str, Any]] = []

    def get_meta(self, key: str) -> bytes | None:
        return None

    def commit(self, wait: bool = True, **kw: Any) -> bool:
        if not wait:
            return False
        gate = threading.Event()
        self.gates.append(gate)
        gate.wait(10)
        self.writes.append(kw)
        return True


async def test_free_sends_go_out_before_their_own_write_but_after_earlier_ones() -> None:
    """Sends an output emitted before any of its records (a replica's replies and checkpoint,
    ahead of its exec record) wait for what earlier outputs persist, not for their own write;
    every other send still waits for its output to be durable."""
    founder = ident(0)
    store = _SlowStore()
    svc = ConsensusService(
        founder,
        ConsensusMembership(make_genesis(founder, "free", 1_700_000_000_000)),
        store,  # type: ignore[arg-type]
        make_host(founder),
    )
    sent: list[bytes] = []
    svc._send = lambda route, datas: sent.extend(datas)  # type: ignore[method-assign]

    def output(records: int, sends: list[bytes], free: int) -> Output:
        return Output(
            records=[{"k": "test", "i": i} for i in range(records)],
            sends=[("peer", s) for s in sends],
            free_sends=free,
        )

    async def gate_open(i: int) -> None:
        await wait_for(lambda: len(store.gates) > i)
        assert len(store.writes) == i  # write i is under way
        store.gates[i].set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc._committer)
        # 1: nothing pending, so its free send goes at once; its other send waits for write 0.
        nursery.start_soon(svc._drive, lambda now: output(1, [b"reply", b"commit"], 1))
        await wait_for(lambda: len(store.gates) == 1)
        assert sent == [b"reply"]
        # 2: queued behind write 0 (which it may depend on): even its free send waits for it,
        # then goes before write 1 (its own) is done.
        nursery.start_soon(svc._drive, lambda now: output(1, [b"checkpoint", b"prepare"], 1))
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"reply"]
        await gate_open(0)
        await wait_for(lambda: len(store.gates) == 2)
        assert sent == [b"reply", b"commit", b"checkpoint"]
        await gate_open(1)
        await wait_for(lambda: sent == [b"reply", b"commit", b"checkpoint", b"prepare"])
        assert [len(w["meta"]) for w in store.writes] == [2, 2]  # one record + the count each
        assert svc.counters["sent_before_write"] == 2
        nursery.cancel_scope.cancel()


def test_the_same_bytes_cross_each_route_once() -> None:
    """A batch's pbft.replies goes to each of its clients (one SendAll); clients behind one
    gateway share the gateway's copy, a client reached directly gets its own, and other
    messages for several peers (a broadcast) are not merged."""
    founder = ident(0)
    svc = ConsensusService(
        founder,
        ConsensusMembership(make_genesis(founder, "routes", 1_700_000_000_000)),
        _SlowStore(),  # type: ignore[arg-type]
        make_host(founder),
    )
    sent: list[tuple[str, bytes]] = []
    svc._send = lambda route, datas: sent.extend((route, d) for d in datas)  # type: ignore[method-assign]
    svc._via.update({"c1": "gw", "c2": "gw", "c3": "gw2"})
    replies, commit = b"replies", b"commit"
    batch = [("c1", replies), ("c2", replies), ("c4", replies), ("c3", replies)]
    svc._send_each([*batch, ("v1", commit), ("v2", commit), ("c1", replies)])
    assert sent == [  # each route's messages together, in order
        ("gw", replies),
        ("gw", replies),  # not next to the others: a later send of its own
        ("c4", replies),
        ("gw2", replies),
        ("v1", commit),
        ("v2", commit),
    ]
