"""PBFT under Byzantine and crash faults, one scenario per test, on the simulated network."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from test_pbft_sim import SWARM, T0, Net, Sim, ident, small_config

from mossnode.crypto.envelope import DOMAIN, VERSION, Envelope, canonical, open_envelope, seal
from mossnode.crypto.identity import Identity
from mossnode.protocols.pbft import TIMER_VIEW, Effect, Replica, Send
from mossnode.protocols.pbft.messages import (
    PREPARE,
    PREPREPARE,
    PrePrepare,
    Vote,
)


def honest(sim: Sim, skip: set[int]) -> list[Replica]:
    return [sim.replica(i) for i in range(len(sim.pids)) if i not in skip]


class Scripted:
    """A Byzantine node: ``react(env_type, raw, now)`` decides what it sends; it never times out."""

    def __init__(self, sim: Sim, index: int) -> None:
        self.sim = sim
        self.identity = sim.ids[index]
        sim.unchecked.add(self.identity.peer_id)
        self.seq = 0
        self.seen: list[tuple[str, bytes]] = []

    def seal(self, type_: str, body: Any, now: int) -> bytes:
        self.seq += 1
        return seal(
            self.identity, swarm_id=SWARM, type=type_, seq=self.seq, timestamp=now, body=body
        )

    def receive(self, data: bytes, now_ms: int) -> list[Effect]:
        env = open_envelope(data, swarm_id=SWARM, now_ms=now_ms)
        if isinstance(env, Envelope):
            self.seen.append((env.type, data))
            return self.react(env.type, data, now_ms)
        return []

    def react(self, type_: str, raw: bytes, now: int) -> list[Effect]:
        return []

    def on_timer(self, name: str, now_ms: int) -> list[Effect]:
        return []


class EquivocatingPrimary(Scripted):
    """Primary of view 0 that proposes two different batches for seq 1."""

    def __init__(self, sim: Sim, index: int) -> None:
        super().__init__(sim, index)
        self.done = False

    def react(self, type_: str, raw: bytes, now: int) -> list[Effect]:
        if type_ != "pbft.request" or self.done:
            return []
        self.done = True
        a = PrePrepare.make(0, 1, [raw])
        b = PrePrepare.make(0, 1, [raw, raw])
        ra, rb = self.seal(PREPREPARE, a.body(), now), self.seal(PREPREPARE, b.body(), now)
        p = self.sim.pids
        return [Send(p[1], ra), Send(p[2], rb), Send(p[3], ra), Send(p[3], rb)]


def test_equivocating_primary_is_replaced_and_safety_holds() -> None:
    sim = Sim(4, 1)
    sim.nodes[sim.pids[0]] = EquivocatingPrimary(sim, 0)
    sim.submit_at(0, 0, b"pay")
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    reps = honest(sim, {0})
    assert all(r.view >= 1 for r in reps), "a view change must replace the primary"
    assert sim.replica(3).rejections.get("conflicting_preprepare", 0) >= 1
    digests = {sim.decided[sim.pids[i]][1].digest for i in (1, 2, 3)}
    assert len(digests) == 1  # (the Sim also asserts this on every Decided)


def test_silent_primary_view_change_elects_next() -> None:
    sim = Sim(4, 2)
    sim.crash(0)
    sim.submit_at(0, 0, b"x")
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    for r in honest(sim, {0}):
        assert r.view == 1 and r.active
        assert r.primary == sim.validators[1]
    assert sim.clients[sim.client_ids[0].peer_id].view == 1


def test_view_change_timeouts_double_per_failed_view() -> None:
    sim = Sim(7, 3, config=small_config(view_timeout_ms=500))
    sim.crash(0)
    sim.crash(1)  # primaries of views 0 and 1 are both down (f = 2)
    sim.submit_at(0, 0, b"x")
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    r = sim.replica(3)
    assert r.view == 2 and r.primary == sim.validators[2]
    waits = [
        at - now
        for src, name, now, at in sim.timer_log
        if src == sim.pids[3] and name == TIMER_VIEW
    ]
    # request timer 500, then waits for new-view of view 1 (1000), of view 2 (2000)...
    assert waits[0] == 500
    assert 1000 in waits and 2000 in waits


def test_f_crashed_replicas_still_live() -> None:
    for n, down in ((4, {2}), (4, {0}), (7, {0, 4}), (7, {5, 6})):
        sim = Sim(n, 4, clients=2)
        for i in down:
            sim.crash(i)
        for k in range(6):
            sim.submit_at(k * 7, k % 2, b"op%d" % k)
        sim.run(120_000, stop=sim.clients_done)
        sim.check_liveness()
        sim.check_exactly_once()


class Noisy:
    """Wraps an honest replica; also sends a forged copy and, later, a replay of each message."""

    def __init__(self, sim: Sim, inner: Replica) -> None:
        self.sim = sim
        self.inner = inner
        self.rng = random.Random(5)

    def _spoil(self, effects: list[Effect]) -> list[Effect]:
        out: list[Effect] = list(effects)
        for e in effects:
            if isinstance(e, Send):
                bad = bytearray(e.data)
                bad[self.rng.randrange(64, len(bad))] ^= 0x20
                out.append(Send(e.to, bytes(bad)))
                # replay the genuine bytes a little later to everyone
                for pid in self.sim.replica_pids:
                    if pid != self.inner.identity.peer_id:
                        self.sim.inject(pid, e.data, delay=50)
        return out

    def receive(self, data: bytes, now_ms: int) -> list[Effect]:
        return self._spoil(self.inner.receive(data, now_ms))

    def on_timer(self, name: str, now_ms: int) -> list[Effect]:
        return self._spoil(self.inner.on_timer(name, now_ms))


def test_forged_and_replayed_messages_are_rejected_and_counted() -> None:
    sim = Sim(4, 6, clients=2)
    sim.unchecked.add(sim.pids[3])  # its forged copies are not meant to pass the send checks
    sim.nodes[sim.pids[3]] = Noisy(sim, sim.replica(3))
    for k in range(6):
        sim.submit_at(k * 5, k % 2, b"op%d" % k)
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    for r in honest(sim, {3}):
        assert r.rejections.get("replay", 0) > 0
        assert r.rejections.get("bad_signature", 0) + r.rejections.get("malformed", 0) > 0


def test_hostile_bytes_never_raise() -> None:
    sim = Sim(4, 7)
    sim.submit_at(0, 0, b"seed traffic")
    captured: list[bytes] = []
    orig = sim._transmit

    def tap(src: str, dst: str, data: bytes) -> None:
        captured.append(data)
        orig(src, dst, data)

    sim._transmit = tap  # type: ignore[method-assign]
    sim.run(10_000, stop=sim.clients_done)
    r = sim.replica(1)
    rng = random.Random(8)
    before = sum(r.rejections.values())
    junk: list[Any] = [b"", b"\x00" * 10, b"\xff" * 200, "text", None, 42, bytearray(b"\x01" * 70)]
    for data in junk:
        r.receive(data, sim.now)
    for _ in range(400):
        data = bytearray(rng.choice(captured))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        r.receive(bytes(data[: rng.randint(1, len(data))]), sim.now)
    assert sum(r.rejections.values()) > before


def _impersonate(forger: Identity, victim: bytes, type_: str, body: Any, seq: int) -> bytes:
    """Envelope bytes naming ``victim`` as sender but signed with the forger's key."""
    payload = canonical([VERSION, SWARM, type_, victim, seq, T0, body])
    return forger.sign(DOMAIN + type_.encode() + b"\0" + payload) + payload


def test_replica_claiming_another_identity_is_rejected() -> None:
    sim = Sim(4, 9)
    r = sim.replica(1)
    forger = sim.ids[3]
    vote = Vote(0, 1, b"\x07" * 32).body()
    for i, victim in enumerate((sim.validators[0], sim.validators[2])):
        r.receive(_impersonate(forger, victim, PREPARE, vote, 1000 + i), T0)
    assert r.rejections.get("bad_signature") == 2
    # A body field naming someone else changes nothing: the vote counts for its signer only.
    spoof = dict(vote, sender=sim.validators[2], i=2)
    for seq in (1, 2):
        raw = seal(forger, swarm_id=SWARM, type=PREPARE, seq=seq, timestamp=T0, body=spoof)
        r.receive(raw, T0)
    slot = r._slots[1]
    assert set(slot.prepares[0]) == {forger.public_key}
    # A well-signed message from a key outside the validator set is refused outright.
    outsider = ident(50)
    raw = seal(outsider, swarm_id=SWARM, type=PREPARE, seq=1, timestamp=T0, body=vote)
    r.receive(raw, T0)
    assert r.rejections.get("not_member") == 1


def test_restarted_replica_rejoins_and_does_not_equivocate() -> None:
    sim = Sim(4, 10, clients=2)
    for k in range(4):
        sim.submit_at(k * 10, k % 2, b"a%d" % k)
    sim.run(3_000, stop=sim.clients_done)
    before_seq = sim.last_env_seq[sim.pids[2]]
    sim.crash(2)
    for k in range(4):
        sim.submit_at(3_100 + k * 10, k % 2, b"b%d" % k)
    sim.run(8_000, stop=sim.clients_done)
    r2 = sim.restart(2)
    assert r2.last_executed >= 1  # rebuilt from its exec records
    for k in range(4):
        sim.submit_at(9_000 + k * 10, k % 2, b"c%d" % k)
    sim.run(60_000, stop=sim.clients_done)
    sim.run_for(3_000)
    sim.check_liveness()
    sim.check_exactly_once()
    assert sim.last_env_seq[sim.pids[2]] > before_seq  # Sim also checks seqs never repeat
    assert r2.rejections.get("state_divergence", 0) == 0
    assert r2.last_executed == sim.replica(0).last_executed  # caught up via sync


def test_restored_backup_refuses_a_conflicting_preprepare() -> None:
    """A backup prepares digest A, restarts, then the (Byzantine) primary offers B: refused."""
    sim = Sim(4, 11)
    primary = sim.ids[0]
    client = sim.client_ids[0]
    req = seal(
        client, swarm_id=SWARM, type="pbft.request", seq=1, timestamp=T0, body={"op": b"x", "t": T0}
    )
    a = PrePrepare.make(0, 1, [req])
    b = PrePrepare.make(0, 1, [req, req])
    backup = sim.replica(1)
    out = backup.receive(
        seal(primary, swarm_id=SWARM, type=PREPREPARE, seq=1, timestamp=T0, body=a.body()), T0
    )
    sim.handle(sim.pids[1], out)  # stores its Persist records
    sent = [e for e in out if isinstance(e, Send)]
    assert len(sent) == 1
    restored = Replica.restore(sim.storage[sim.pids[1]], sim.ids[1], sim.validators, sim.cfg)
    out = restored.start(T0 + 10)
    resent = [e for e in out if isinstance(e, Send)]
    assert resent, "the restored replica re-sends its prepare"
    out = restored.receive(
        seal(primary, swarm_id=SWARM, type=PREPREPARE, seq=2, timestamp=T0 + 20, body=b.body()),
        T0 + 20,
    )
    assert restored.rejections.get("conflicting_preprepare") == 1
    assert not [e for e in out if isinstance(e, Send)]
    before = max(cbor2.loads(e.data[64:])[4] for e in sent)
    for e in resent:
        _, _, t, _, seq, _, body = cbor2.loads(e.data[64:])
        assert seq > before  # a fresh envelope seq: peers' replay windows accept it
        if t == PREPARE:
            assert body["d"] == a.digest  # the same digest as before the restart


def test_restored_primary_does_not_reuse_a_sequence_number() -> None:
    sim = Sim(4, 12)
    for i in (1, 2, 3):
        sim.crash(i)  # nobody answers: the primary's proposal stays undecided
    sim.submit_at(0, 0, b"first")
    sim.run(100)
    p0 = sim.replica(0)
    assert 1 in p0.log_seqs()
    first = p0._slots[1].preprepares[0].digest
    r0 = sim.restart(0)
    for i in (1, 2, 3):
        sim.crashed.discard(sim.pids[i])
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    assert sim.decided[sim.pids[1]][1].digest == first
    assert r0.rejections.get("own_viewchange_invalid", 0) == 0


def test_lossy_network_reaches_decision_by_retransmission() -> None:
    sim = Sim(4, 13, net=Net(drop=0.5, stable_at=20_000), clients=2)
    for k in range(4):
        sim.submit_at(k * 3, k % 2, b"l%d" % k)
    sim.run(20_000, stop=sim.clients_done)  # decided while the network is still lossy
    sim.check_liveness()


class Traitor:
    """Wraps a replica and corrupts what it sends, at random but reproducibly: silence towards
    some peers, two different pre-prepares for one slot, votes and checkpoints for made-up
    digests, wrong results to clients, verbatim replays of its old messages. It re-seals every
    outgoing envelope with its own counter so its lies are well-signed."""

    def __init__(self, sim: Sim, index: int, seed: int) -> None:
        self.sim = sim
        self.inner = sim.replica(index)
        self.identity = sim.ids[index]
        self.me = self.identity.peer_id
        self.rng = random.Random(seed)
        self.seq = 0
        self.old: list[bytes] = []
        sim.unchecked.add(self.me)
        sim.byzantine.add(self.me)

    def _seal(self, type_: str, body: Any, ts: int) -> bytes:
        self.seq += 1
        return seal(
            self.identity, swarm_id=SWARM, type=type_, seq=self.seq, timestamp=ts, body=body
        )

    def _lie(self, type_: str, body: Any) -> Any:
        if type_ == PREPREPARE:
            batch = list(body["b"])
            alt = PrePrepare.make(body["v"], body["n"], batch + batch[:1] if batch else [])
            return alt.body()
        if type_ in (PREPARE, "pbft.commit", "pbft.checkpoint"):
            return dict(body, d=bytes(self.rng.randrange(256) for _ in range(32)))
        if type_ == "pbft.reply":
            return dict(body, r=b"evil")
        return body

    def _corrupt(self, effects: list[Effect]) -> list[Effect]:
        out: list[Effect] = []
        for e in effects:
            if not isinstance(e, Send):
                out.append(e)
                continue
            _, _, type_, sender, _, ts, body = cbor2.loads(e.data[64:])
            if sender != self.identity.public_key:
                out.append(e)  # a relayed client request
                continue
            targets = (
                [e.to] if e.to is not None else [p for p in self.sim.replica_pids if p != self.me]
            )
            for to in targets:
                roll = self.rng.random()
                if roll < 0.25:
                    continue  # silent towards this peer
                lie = roll < 0.6
                raw = self._seal(type_, self._lie(type_, body) if lie else body, ts)
                out.append(Send(to, raw))
                self.old.append(raw)
            if self.old and self.rng.random() < 0.2:
                out.append(Send(None, self.rng.choice(self.old)))  # replay
        return out

    def receive(self, data: bytes, now_ms: int) -> list[Effect]:
        return self._corrupt(self.inner.receive(data, now_ms))

    def on_timer(self, name: str, now_ms: int) -> list[Effect]:
        return self._corrupt(self.inner.on_timer(name, now_ms))


def byzantine_run(n: int, seed: int) -> Sim:
    rng = random.Random(seed)
    net = Net(drop=rng.choice([0.0, 0.1]), dup=0.1, max_delay=rng.choice([5, 40]), stable_at=2_000)
    sim = Sim(n, seed, net=net, clients=2)
    f = (n - 1) // 3
    traitors = rng.sample(range(n), f)
    for i in traitors:
        sim.nodes[sim.pids[i]] = Traitor(sim, i, seed * 31 + i)
    for k in range(4):
        sim.submit_at(rng.randint(0, 1_800), k % 2, b"b-%d-%d" % (seed, k))
    sim.run(240_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    return sim


@pytest.mark.parametrize(("n", "seeds"), [(4, range(60)), (7, range(500, 530))])
def test_sweep_with_f_byzantine_replicas(n: int, seeds: range) -> None:
    """f replicas lie at random; honest ones stay safe (checked on every Decided by the Sim)
    and every client request completes."""
    for seed in seeds:
        byzantine_run(n, seed)


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "neg", "big", "bytes", "digest", "str", "none", "bool", "list", "dict"]
    k = rng.choice(kinds if depth < 3 else kinds[:8])
    if k == "int":
        return rng.randint(0, 40)
    if k == "neg":
        return -rng.randint(1, 5)
    if k == "big":
        return 2**63 + rng.randint(0, 9)
    if k == "bytes":
        return rng.randbytes(rng.randint(0, 80))
    if k == "digest":
        return rng.randbytes(32)
    if k == "str":
        return "x" * rng.randint(0, 5)
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "list":
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice("vndbhCPVOaxetcr") + rng.choice(["", "v"]): _junk(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def test_well_signed_hostile_bodies_never_raise() -> None:
    """A Byzantine validator signs bodies of every type with wrong shapes and values."""
    sim = Sim(4, 14, clients=1)
    sim.crash(0)  # warm up through a view change, so there are view-changes to reuse
    sim.submit_at(0, 0, b"warm up")
    captured: list[bytes] = []
    orig = sim._transmit

    def tap(src: str, dst: str, data: bytes) -> None:
        captured.append(data)
        orig(src, dst, data)

    sim._transmit = tap  # type: ignore[method-assign]
    sim.run(20_000, stop=sim.clients_done)
    sim.restart(0)
    by_type: dict[str, list[bytes]] = {}
    for raw in captured:
        by_type.setdefault(cbor2.loads(raw[64:])[2], []).append(raw)
    assert by_type.get("pbft.viewchange") and by_type.get("pbft.newview")

    def some(type_: str, k: int = 3) -> list[bytes]:
        pool = [*by_type.get(type_, []), rng.randbytes(100)]
        return [rng.choice(pool) for _ in range(rng.randint(0, k))]

    def shaped(type_: str) -> Any:
        v, n = rng.choice([0, 1, 2, 7]), rng.choice([0, 1, 4, 8, 9, 2**40])
        if type_ == "pbft.viewchange":
            return {
                "v": v,
                "h": rng.choice([0, 4, 8, 2**40]),
                "C": some("pbft.checkpoint"),
                "P": [
                    [rng.choice(some("pbft.preprepare", 1) or [b""]), some("pbft.prepare")]
                    for _ in range(rng.randint(0, 2))
                ],
            }
        if type_ == "pbft.newview":
            return {"v": v, "V": some("pbft.viewchange", 4), "O": some("pbft.preprepare")}
        if type_ == "pbft.sync":
            return {
                "e": [[n, v, rng.randbytes(20), some("pbft.commit")]],
                "C": some("pbft.checkpoint"),
                "nv": rng.choice(some("pbft.newview", 1) or [None]),
            }
        if type_ == "pbft.preprepare":
            batch = some("pbft.request")
            return PrePrepare.make(v, max(n, 1), batch).body()
        return Vote(v, max(n, 1), rng.randbytes(32)).body()

    rng = random.Random(15)
    liar = sim.ids[3]
    types = [
        "pbft.request",
        "pbft.preprepare",
        "pbft.prepare",
        "pbft.commit",
        "pbft.checkpoint",
        "pbft.viewchange",
        "pbft.newview",
        "pbft.status",
        "pbft.sync",
        "pbft.reply",
        "pbft.other",
    ]
    seq = 10_000
    for i in range(1_500):
        r = sim.replica(i % 3)
        type_ = rng.choice(types)
        body = shaped(type_) if rng.random() < 0.4 else _junk(rng)
        if rng.random() < 0.3 and isinstance(body, dict):
            # plausible keys with hostile values, sometimes embedding real captured envelopes
            for key in ("v", "n", "d", "b", "h", "C", "P", "V", "O", "a", "x", "e", "nv", "t"):
                if rng.random() < 0.5:
                    body[key] = (
                        rng.sample(captured, rng.randint(0, 3))
                        if rng.random() < 0.3
                        else _junk(rng, 1)
                    )
        seq += 1
        raw = seal(liar, swarm_id=SWARM, type=type_, seq=seq, timestamp=sim.now, body=body)
        r.receive(raw, sim.now)
    for i in range(3):
        assert sum(sim.replica(i).rejections.values()) > 0
    # and the system still works afterwards
    sim.submit_in(10, 0, b"still alive")
    sim.run_for(30_000, stop=sim.clients_done)
    sim.check_liveness()
