"""Deterministic network simulation of PBFT replicas and clients, and seeded sweeps over it.

The harness (:class:`Sim`) is a discrete-event loop with a fake clock: messages are dropped,
duplicated, delayed and reordered by a seeded RNG, parts of the network can be partitioned and
healed, nodes can crash and restart from their persisted records. Safety is checked on every
Decided effect (one digest per sequence number across all nodes, strictly sequential execution,
certificates that verify), and on every Send (the content was persisted first, envelope seqs
never repeat); liveness is checked at the end (every submitted request completed, exactly once).
Other pbft test modules import the harness from here.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2
import nacl.bindings
import pytest

from mossnode.crypto.envelope import Envelope, open_envelope
from mossnode.crypto.identity import Identity
from mossnode.protocols.pbft import (
    Client,
    Completed,
    Decided,
    Effect,
    Execution,
    Outcome,
    PbftConfig,
    Persist,
    Reconfigured,
    Replica,
    Send,
    SendAll,
    SetTimer,
    verify_certificate,
)
from mossnode.protocols.pbft.messages import NO_SKEW, Request

_REAL_SIGN_OPEN = nacl.bindings.crypto_sign_open
SWARM = b"\x42" * 32
T0 = 1_800_000_000_000


def ident(i: int) -> Identity:
    return Identity(bytes([i + 1]) * 32)


class Node(Protocol):
    def receive(self, data: bytes, now_ms: int) -> list[Effect]: ...
    def on_timer(self, name: str, now_ms: int) -> list[Effect]: ...


class App:
    """Deterministic toy application: results name the seq and op, and reconfig ops change the
    validator set (``b"reconfig:" + cbor list of keys``)."""

    def __init__(self) -> None:
        self.executed: list[tuple[int, bytes, int, bytes]] = []

    def __call__(self, ex: Execution) -> bytes | Outcome:
        self.executed.append((ex.seq, ex.client, ex.timestamp, ex.op))
        result = b"%d:" % ex.seq + ex.op
        if ex.op.startswith(b"reconfig:"):
            return Outcome(result, tuple(cbor2.loads(ex.op[len(b"reconfig:") :])))
        return result


@dataclass
class Net:
    drop: float = 0.0
    dup: float = 0.0
    min_delay: int = 1
    max_delay: int = 20
    stable_at: int = 0  # ms after T0 from which the network no longer drops or duplicates
    # (start ms, end ms, group): while active, nothing crosses between the group and the rest
    partitions: list[tuple[int, int, frozenset[str]]] = field(default_factory=list)


def small_config(**kw: Any) -> PbftConfig:
    base: dict[str, Any] = dict(
        swarm_id=SWARM,
        checkpoint_interval=4,
        window=8,
        max_batch=4,
        max_inflight=2,
        view_timeout_ms=600,
        retransmit_ms=200,
        max_backoff=4,
    )
    base.update(kw)
    return PbftConfig(**base)


_PERSISTED_TYPES = {"pbft.preprepare", "pbft.prepare", "pbft.commit"}


def _content_key(type_: str, body: Any) -> Any:
    """What a replica must have persisted before sending a message of this type."""
    if type_ in _PERSISTED_TYPES:
        return (type_, body["v"], body["n"], body["d"])
    if type_ in ("pbft.viewchange", "pbft.newview"):
        return (type_, body["v"])
    return None


class Sim:
    def __init__(
        self,
        n: int,
        seed: int,
        *,
        net: Net | None = None,
        config: PbftConfig | None = None,
        clients: int = 1,
        verify_certs: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.send_alls = 0  # SendAll effects: batches answered with one pbft.replies
        self.net = net or Net()
        self.cfg = config or small_config()
        self.now = T0
        self.ids = [ident(i) for i in range(n)]
        self.validators = [i.public_key for i in self.ids]
        self.pids = [i.peer_id for i in self.ids]
        self.nodes: dict[str, Node] = {}
        self.apps: dict[str, App] = {}
        self.storage: dict[str, list[dict[str, Any]]] = {}
        self.replica_pids: list[str] = []
        self.crashed: set[str] = set()
        self.decided: dict[str, dict[int, Decided]] = {}
        self.reconfigs: dict[str, list[Reconfigured]] = {}
        self.global_digest: dict[int, bytes] = {}
        self.verify_certs = verify_certs
        self.completed: dict[str, list[Completed]] = {}
        self.submitted: dict[str, list[int]] = {}
        self._q: list[tuple[int, int, str, str, Any]] = []
        self._ctr = 0
        self._sig_memo: dict[tuple[bytes, bytes], bytes] = {}
        self._unsubmitted = 0
        self.sent = 0
        self.check_sends = True
        self.last_env_seq: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.persisted: dict[str, set[Any]] = {}
        self.timer_log: list[tuple[str, str, int, int]] = []
        self.keys: dict[str, bytes] = {}
        self.torn: set[str] = set()  # crash in the middle of their next effect list
        self.torn_lost: list[dict[str, Any]] = []  # records a torn crash kept off the disk
        self.unchecked: set[str] = set()  # scripted Byzantine nodes
        self.byzantine: set[str] = set()  # their decisions are not held to the safety checks
        for i in range(n):
            self.add_replica(self.ids[i])
        self.client_ids = [ident(100 + c) for c in range(clients)]
        self.clients: dict[str, Client] = {}
        for cid in self.client_ids:
            cl = Client(cid, self.validators, SWARM, retransmit_ms=400, max_retransmit_ms=1600)
            self.keys[cid.peer_id] = cid.public_key
            self.clients[cid.peer_id] = cl
            self.nodes[cid.peer_id] = cl
            self.completed[cid.peer_id] = []
            self.submitted[cid.peer_id] = []
            self.storage[cid.peer_id] = []

    # ---------------------------------------------------------------- nodes

    def add_replica(
        self, identity: Identity, validators: Iterable[bytes] | None = None, start: bool = True
    ) -> Replica:
        pid = identity.peer_id
        self.keys[pid] = identity.public_key
        app = App()
        r = Replica(identity, validators or self.validators, self.cfg, app)
        self.nodes[pid] = r
        self.apps[pid] = app
        self.storage.setdefault(pid, [])
        self.decided.setdefault(pid, {})
        self.reconfigs.setdefault(pid, [])
        if pid not in self.replica_pids:
            self.replica_pids.append(pid)
        if start:
            self.handle(pid, r.start(self.now))
        return r

    def replica(self, i: int | str) -> Replica:
        node = self.nodes[self.pids[i] if isinstance(i, int) else i]
        node = getattr(node, "inner", node)  # unwrap test wrappers around a real replica
        assert isinstance(node, Replica)
        return node

    def crash(self, i: int) -> None:
        self.crashed.add(self.pids[i])

    def crash_torn(self, i: int) -> None:
        """Crash node i in the middle of the next effect list that has a Persist after a Send:
        the I/O layer sends in order, may send a message before the Persists that follow it
        are durable, and dies then; those Persists are lost (nothing after them happens)."""
        self.torn.add(self.pids[i])

    def restart(self, i: int) -> Replica:
        """Rebuild node i from its persisted records only (its memory is lost)."""
        pid = self.pids[i]
        app = App()
        r = Replica.restore(self.storage[pid], self.ids[i], self.validators, self.cfg, app)
        self.nodes[pid] = r
        self.apps[pid] = app
        self.crashed.discard(pid)
        # What it decides from here on continues what it has on disk (after a torn crash, that
        # may be less than it had executed: it executes those seqs again, same digests).
        mine = self.decided[pid]
        for n in [n for n in mine if n > r.last_executed]:
            del mine[n]
        self.handle(pid, r.start(self.now))
        return r

    # ---------------------------------------------------------------- events

    def _push(self, at: int, kind: str, target: str, payload: Any) -> None:
        self._ctr += 1
        heapq.heappush(self._q, (at, self._ctr, kind, target, payload))

    def submit_at(self, at_ms: int, client: int, op: bytes) -> None:
        self._unsubmitted += 1
        self._push(T0 + at_ms, "submit", self.client_ids[client].peer_id, op)

    def call_at(self, at_ms: int, fn: Callable[[], None]) -> None:
        self._push(T0 + at_ms, "call", "", fn)

    def inject(self, to: str, data: bytes, delay: int = 1) -> None:
        self._push(self.now + delay, "msg", to, data)

    def _partitioned(self, a: str, b: str) -> bool:
        t = self.now - T0
        for start, end, group in self.net.partitions:
            if start <= t < end and ((a in group) != (b in group)):
                return True
        return False

    def _transmit(self, src: str, dst: str, data: bytes) -> None:
        self.sent += 1
        if dst in self.crashed or self._partitioned(src, dst):
            return
        chaotic = self.now - T0 < self.net.stable_at
        if chaotic and self.rng.random() < self.net.drop:
            return
        copies = 2 if chaotic and self.rng.random() < self.net.dup else 1
        for _ in range(copies):
            delay = self.rng.randint(self.net.min_delay, self.net.max_delay)
            self._push(self.now + delay, "msg", dst, data)

    def _check_send(self, src: str, data: bytes) -> None:
        """Persist-before-send and monotonic envelope seqs, checked on every message sent."""
        if src in self.unchecked:
            return
        _, _, type_, sender, seq, _, body = cbor2.loads(data[64:])
        if sender != self.keys.get(src):
            return  # relaying someone else's envelope (a client request)
        assert seq > self.last_env_seq.get(src, 0), f"{src[-6:]} reused envelope seq {seq}"
        assert seq <= self.reserved.get(src, 0), f"{src[-6:]} sent seq {seq} before persisting"
        self.last_env_seq[src] = seq
        key = _content_key(type_, body)
        if key is not None:
            assert key in self.persisted[src], f"{src[-6:]} sent {key} before persisting it"

    def _note_persist(self, src: str, rec: dict[str, Any]) -> None:
        self.storage[src].append(rec)
        if rec.get("k") == "seq":
            self.reserved[src] = max(self.reserved.get(src, 0), rec["upto"])
        elif rec.get("k") == "sent":
            _, _, type_, _, _, _, body = cbor2.loads(rec["m"][64:])
            self.persisted.setdefault(src, set()).add(_content_key(type_, body))
            if type_ == "pbft.newview":
                for raw in body["O"]:
                    _, _, t2, _, _, _, b2 = cbor2.loads(raw[64:])
                    self.persisted[src].add(_content_key(t2, b2))

    def handle(self, src: str, effects: list[Effect]) -> None:
        if src in self.crashed:
            return
        if src in self.torn:
            sends = [k for k, e in enumerate(effects) if isinstance(e, Send | SendAll)]
            if sends and any(isinstance(e, Persist) for e in effects[sends[-1] :]):
                cut = sends[-1] + 1
                self.torn_lost.extend(e.record for e in effects[cut:] if isinstance(e, Persist))
                self.handle_all(src, effects[:cut])
                self.torn.discard(src)
                self.crashed.add(src)
                return
        self.handle_all(src, effects)

    def handle_all(self, src: str, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self._note_persist(src, e.record)
            elif isinstance(e, Send):
                if self.check_sends:
                    self._check_send(src, e.data)
                if e.to is None:
                    for dst in self.replica_pids:
                        if dst != src:
                            self._transmit(src, dst, e.data)
                else:
                    self._transmit(src, e.to, e.data)
            elif isinstance(e, SendAll):
                self.send_alls += 1
                if self.check_sends:
                    self._check_send(src, e.data)
                for dst in e.to:
                    self._transmit(src, dst, e.data)
            elif isinstance(e, SetTimer):
                self.timer_log.append((src, e.name, self.now, e.at_ms))
                self._push(e.at_ms, "timer", src, e.name)
            elif isinstance(e, Decided):
                self._on_decided(src, e)
            elif isinstance(e, Completed):
                self.completed[src].append(e)
            elif isinstance(e, Reconfigured):
                self.reconfigs[src].append(e)

    def _on_decided(self, src: str, d: Decided) -> None:
        if src in self.byzantine:
            return
        mine = self.decided[src]
        assert d.seq == max(mine, default=0) + 1, f"{src[-6:]} executed {d.seq} out of order"
        mine[d.seq] = d
        known = self.global_digest.get(d.seq)
        if known is None:
            self.global_digest[d.seq] = d.digest
            if self.verify_certs:
                vals = self.replica(src).validators_for(d.seq)
                ok = verify_certificate(d.certificate, d.payload, vals, SWARM, seq=d.seq)
                assert ok, f"certificate for {d.seq} refused: {ok}"
        else:
            assert known == d.digest, f"SAFETY: two digests decided at seq {d.seq}"

    def step(self) -> bool:
        if not self._q:
            return False
        at, _, kind, target, payload = heapq.heappop(self._q)
        self.now = max(self.now, at)
        if kind == "call":
            payload()
            return True
        if target in self.crashed:
            return True
        node = self.nodes[target]
        if kind == "msg":
            self.handle(target, node.receive(payload, self.now))
        elif kind == "timer":
            self.handle(target, node.on_timer(payload, self.now))
        elif kind == "submit":
            cl = self.clients[target]
            self._unsubmitted -= 1
            t, effects = cl.submit(payload, self.now)
            self.submitted[target].append(t)
            self.handle(target, effects)
        return True

    def _verify_once(self, signed: bytes, pk: bytes) -> bytes:
        """Memoized Ed25519 check (see run): same inputs, same answer, same exception."""
        key = (signed, pk)
        hit = self._sig_memo.get(key)
        if hit is None:
            hit = self._sig_memo[key] = _REAL_SIGN_OPEN(signed, pk)
        return hit

    def run(self, until_ms: int, stop: Callable[[], bool] | None = None) -> None:
        """Process events up to ``until_ms`` after T0, or until ``stop()`` holds.

        While it runs, signature verification is memoized per exact (signed bytes, key): it is a
        pure function, every distinct envelope is still verified for real (failures are never
        cached), and since a broadcast hands identical bytes to n-1 replicas it halves the cost
        of the seeded sweeps.
        """
        end = T0 + until_ms
        nacl.bindings.crypto_sign_open = self._verify_once
        try:
            while self._q and self._q[0][0] <= end:
                self.step()
                if stop is not None and stop():
                    return
            self.now = max(self.now, end)
        finally:
            nacl.bindings.crypto_sign_open = _REAL_SIGN_OPEN

    def run_for(self, ms: int, stop: Callable[[], bool] | None = None) -> None:
        self.run(self.now - T0 + ms, stop)

    def submit_in(self, delay_ms: int, client: int, op: bytes) -> None:
        self.submit_at(self.now - T0 + delay_ms, client, op)

    def all_submitted(self) -> bool:
        return self._unsubmitted == 0

    def clients_done(self) -> bool:
        return self.all_submitted() and not any(c.busy for c in self.clients.values())

    # ---------------------------------------------------------------- checks

    def check_exactly_once(self) -> None:
        """Each completed request was executed exactly once, with the result the client got."""
        longest = max((d for pid, d in self.decided.items() if pid not in self.byzantine), key=len)
        executed: dict[tuple[bytes, int], bytes] = {}
        for seq in sorted(longest):
            d = longest[seq]
            for raw, result in zip(cbor2.loads(d.payload), d.results, strict=True):
                if result is None:
                    continue
                env = open_envelope(raw, swarm_id=SWARM, now_ms=0, max_skew_ms=NO_SKEW)
                assert isinstance(env, Envelope)
                req = Request.parse(env.body)
                assert req is not None
                key = (env.sender, req.timestamp)
                assert key not in executed, f"request {key} executed twice"
                executed[key] = result
        for cid in self.client_ids:
            for c in self.completed[cid.peer_id]:
                assert executed.get((cid.public_key, c.timestamp)) == c.result

    def check_liveness(self) -> None:
        for cid in self.client_ids:
            pid = cid.peer_id
            got = sorted(c.timestamp for c in self.completed[pid])
            assert got == sorted(self.submitted[pid]), (
                f"client {pid[-6:]}: {len(got)}/{len(self.submitted[pid])} completed"
            )


# -------------------------------------------------------------------- seeded sweeps


def chaotic_run(
    n: int, seed: int, requests: int = 4, *, clients: int = 2, reply_batches: bool = False
) -> Sim:
    """One seeded run: lossy, duplicating, reordering network until ``stable_at``, maybe a
    partition that heals, maybe a replica that crashes and restarts from its records."""
    rng = random.Random(seed * 7919 + n)
    stable_at = 3_000
    net = Net(
        drop=rng.choice([0.0, 0.05, 0.15, 0.3]),
        dup=rng.choice([0.0, 0.1, 0.3]),
        min_delay=1,
        max_delay=rng.choice([5, 30, 120]),
        stable_at=stable_at,
    )
    sim = Sim(n, seed, net=net, clients=clients, config=small_config(reply_batches=reply_batches))
    if rng.random() < 0.5:  # a partition that heals (either side may lack a quorum)
        side = frozenset(rng.sample(sim.pids, rng.randint(1, n // 2)))
        start = rng.randint(0, 2_000)
        net.partitions.append((start, start + rng.randint(200, 2_500), side))
    if rng.random() < 0.3:  # crash one replica, restart it from its persisted records
        victim = rng.randrange(n)
        down = rng.randint(0, 2_000)
        sim.call_at(down, lambda: sim.crash(victim))
        sim.call_at(down + rng.randint(100, 2_000), lambda: sim.restart(victim))
    for k in range(requests):
        sim.submit_at(rng.randint(0, 2_800), k % clients, b"op-%d-%d" % (seed, k))
    sim.run(180_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    return sim


N4_CHUNKS = 10
N7_CHUNKS = 7
PER_CHUNK = 30


@pytest.mark.parametrize("chunk", range(N4_CHUNKS))
def test_sweep_n4(chunk: int) -> None:
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        chaotic_run(4, seed)


@pytest.mark.parametrize("chunk", range(N7_CHUNKS))
def test_sweep_n7(chunk: int) -> None:
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        chaotic_run(7, 10_000 + seed)


@pytest.mark.parametrize("chunk", range(4))
def test_sweep_with_batched_replies(chunk: int) -> None:
    """The same chaos with ``reply_batches``: a batch's replies travel as one envelope for all
    its clients (lost, duplicated and late like any message); every client still completes
    exactly once with the decided result."""
    batched = 0
    for seed in range(20_000 + chunk * PER_CHUNK, 20_000 + (chunk + 1) * PER_CHUNK):
        sim = chaotic_run(4 if chunk % 2 == 0 else 7, seed, 12, clients=6, reply_batches=True)
        batched += sim.send_alls
        for cid in sim.client_ids:  # the replies envelopes open and hold each client's item
            refused = set(sim.nodes[cid.peer_id].rejections)  # type: ignore[attr-defined]
            assert not refused & {"malformed", "malformed_body", "forbidden"}, refused
    assert batched > PER_CHUNK  # the runs did batch requests and answer them so


@pytest.mark.parametrize(("n", "seeds"), [(4, range(400, 430)), (7, range(10_400, 10_415))])
def test_all_replicas_converge_once_the_network_is_calm(n: int, seeds: range) -> None:
    """After the chaos, one more request brings every replica (crashed, partitioned, stuck in a
    later view) to the same decided prefix: status/sync repair whatever was lost."""
    for seed in seeds:
        sim = chaotic_run(n, seed)
        calm = max([sim.net.stable_at] + [end for _, end, _ in sim.net.partitions])
        sim.run(max(calm, sim.now - T0) + 500)
        sim.submit_in(100, 0, b"final")

        sim.run_for(60_000, stop=lambda s=sim: converged(s))
        assert converged(sim), f"seed {seed}: {[sim.replica(p).last_executed for p in sim.pids]}"


def converged(sim: Sim) -> bool:
    return sim.clients_done() and len({sim.replica(p).last_executed for p in sim.replica_pids}) == 1
