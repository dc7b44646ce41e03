"""Replica and client behaviour in isolation: checkpoints and GC, dedup, batching, restore."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from test_pbft_sim import SWARM, T0, Net, Sim, ident, small_config

from mossnode.crypto.envelope import Rejection, open_envelope, seal
from mossnode.crypto.peerid import peer_id_from_public_key
from mossnode.protocols.pbft import (
    TIMER_CLIENT,
    Client,
    Completed,
    PbftConfig,
    Persist,
    Replica,
    Send,
    SendAll,
    SetTimer,
    compact_records,
    max_faulty,
    quorum,
)
from mossnode.protocols.pbft.messages import (
    REPLIES,
    REPLY,
    PrePrepare,
    Reply,
    Request,
    replies_body,
    reply_in,
)


def test_quorum_arithmetic() -> None:
    assert [(n, max_faulty(n), quorum(n)) for n in (1, 4, 5, 6, 7, 10)] == [
        (1, 0, 1),
        (4, 1, 3),
        (5, 1, 4),
        (6, 1, 4),
        (7, 2, 5),
        (10, 3, 7),
    ]
    for n in range(1, 40):  # any two quorums share at least f+1 validators
        assert 2 * quorum(n) - n >= max_faulty(n) + 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PbftConfig(swarm_id=SWARM, checkpoint_interval=4, window=6)
    with pytest.raises(ValueError):
        PbftConfig(swarm_id=SWARM, max_batch=0)
    with pytest.raises(ValueError):
        Replica(ident(0), [], small_config())


def run_many(requests: int, clients: int = 3, **cfg: int) -> Sim:
    sim = Sim(4, 30, clients=clients, config=small_config(**cfg))
    for k in range(requests):
        sim.submit_at(k * 5, k % clients, b"r%d" % k)
    sim.run(120_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    return sim


def test_checkpoints_garbage_collect_the_log() -> None:
    sim = run_many(40, max_inflight=1, max_batch=1, retain_decided=8)
    sim.run_for(2_000)  # let the last checkpoint settle
    for pid in sim.replica_pids:
        r = sim.replica(pid)
        assert r.last_executed == 40
        assert r.stable_seq == 40
        assert all(n > r.stable_seq for n in r.log_seqs())
        assert not r._slots and not r._ckpt_votes
        assert len(r._decided) <= 8
        stables = [rec for rec in sim.storage[pid] if rec["k"] == "stable"]
        assert [rec["n"] for rec in stables] == list(range(4, 41, 4))


def test_log_is_bounded_while_running() -> None:
    sim = Sim(4, 31, clients=3, config=small_config(max_inflight=1, max_batch=1))
    sizes: list[int] = []
    for k in range(30):
        sim.submit_at(k * 5, k % 3, b"r%d" % k)
        sim.call_at(k * 5 + 3, lambda: sizes.append(len(sim.replica(1).log_seqs())))
    sim.run(120_000, stop=sim.clients_done)
    sim.check_liveness()
    assert max(sizes) <= sim.cfg.window
    assert sim.replica(1).stable_seq >= 24


def test_primary_batches_requests() -> None:
    sim = run_many(12, clients=6, max_inflight=1, max_batch=4)
    sizes = [len(d.results) for d in sim.decided[sim.pids[0]].values()]
    assert max(sizes) > 1 and max(sizes) <= 4
    assert sum(sizes) == 12


def test_duplicate_request_is_answered_from_cache_not_reexecuted() -> None:
    sim = Sim(4, 32)
    sim.submit_at(0, 0, b"once")
    sim.run(10_000, stop=sim.clients_done)
    sim.check_liveness()
    cid = sim.client_ids[0]
    t = sim.submitted[cid.peer_id][0]
    result = sim.completed[cid.peer_id][0].result
    again = seal(
        cid,
        swarm_id=SWARM,
        type="pbft.request",
        seq=5_000,
        timestamp=sim.now,
        body=Request(b"once", t).body(),
    )
    older = seal(
        cid,
        swarm_id=SWARM,
        type="pbft.request",
        seq=5_001,
        timestamp=sim.now,
        body=Request(b"older", t - 1).body(),
    )
    for pid in sim.replica_pids:
        r = sim.replica(pid)
        out = r.receive(again, sim.now)
        replies = [e for e in out if isinstance(e, Send) and e.to == cid.peer_id]
        assert len(replies) == 1
        body = Reply.parse(cbor2.loads(replies[0].data[64:])[6])
        assert body is not None and (body.timestamp, body.result) == (t, result)
        assert not r.receive(older, sim.now)
        assert r.rejections.get("stale_request") == 1
        assert [op for _, _, _, op in sim.apps[pid].executed] == [b"once"]


def test_client_needs_f_plus_1_matching_replies() -> None:
    ids = [ident(i) for i in range(4)]
    vals = [i.public_key for i in ids]
    me = ident(100)
    c = Client(me, vals, SWARM, retransmit_ms=100)
    t, out = c.submit(b"op", T0)
    sends = [e for e in out if isinstance(e, Send)]
    assert [s.to for s in sends] == [ids[0].peer_id]  # view 0's primary
    assert isinstance(out[0], Persist)  # timestamp and envelope seqs persisted before sending
    t2, out2 = c.submit(b"second", T0)
    assert t2 > t and not [e for e in out2 if isinstance(e, Send)]  # queued behind the first

    def reply(i: int, result: bytes, seq: int, who: bytes = me.public_key) -> bytes:
        return seal(
            ids[i] if i < 4 else ident(i),
            swarm_id=SWARM,
            type=REPLY,
            seq=seq,
            timestamp=T0,
            body=Reply(0, t, who, result).body(),
        )

    assert c.receive(reply(1, b"good", 1), T0) == []
    assert c.receive(reply(3, b"evil", 1), T0) == []  # a Byzantine replica's different result
    assert c.receive(reply(9, b"good", 1), T0) == []  # not a validator
    assert c.rejections == {"not_member": 1}
    assert c.receive(reply(1, b"good", 1), T0) == []  # replayed
    assert c.rejections["replay"] == 1
    out = c.receive(reply(2, b"good", 1), T0)
    assert Completed(t, b"op", b"good") in out
    sends = [e for e in out if isinstance(e, Send)]
    assert len(sends) == 1  # the queued request goes out now
    timers = [e for e in out if isinstance(e, SetTimer)]
    assert c.on_timer(TIMER_CLIENT, timers[-1].at_ms - 1) == []
    out = c.on_timer(TIMER_CLIENT, timers[-1].at_ms)
    assert [e.to for e in out if isinstance(e, Send)] == [None]  # retransmission: broadcast
    assert [e.at_ms - timers[-1].at_ms for e in out if isinstance(e, SetTimer)] == [200]


def test_client_restore_keeps_timestamps_and_seqs_increasing() -> None:
    vals = [ident(i).public_key for i in range(4)]
    c = Client(ident(100), vals, SWARM)
    records = []
    t1, out = c.submit(b"a", T0 + 50)
    records += [e.record for e in out if isinstance(e, Persist)]
    c2 = Client.restore(records, ident(100), vals, SWARM)
    t2, out2 = c2.submit(b"b", T0)  # even with a clock that went backwards
    assert t2 > t1
    seq1 = cbor2.loads(next(e for e in out if isinstance(e, Send)).data[64:])[4]
    seq2 = cbor2.loads(next(e for e in out2 if isinstance(e, Send)).data[64:])[4]
    assert seq2 > seq1


def test_restore_from_compacted_records_matches_full_restore() -> None:
    sim = run_many(22, max_inflight=1, max_batch=1)
    pid = sim.pids[1]
    full = Replica.restore(sim.storage[pid], sim.ids[1], sim.validators, sim.cfg)
    compacted = compact_records(sim.storage[pid])
    assert len(compacted) < len(sim.storage[pid]) / 3
    small = Replica.restore(compacted, sim.ids[1], sim.validators, sim.cfg)
    live = sim.replica(1)
    for r in (full, small):
        assert r.last_executed == live.last_executed
        assert r.stable_seq == live.stable_seq
        assert r._state == live._state
        assert r._clients == live._clients
        assert r._env_seq >= sim.last_env_seq[pid]


def test_stable_records_carry_only_changed_reply_rows_and_compaction_folds_them() -> None:
    """The first stable record of a replica object holds the whole reply table, later ones the
    rows changed since (at most K = 4 here, one request per batch); a restart starts whole
    again, and a compacted log restores exactly the table the live replica has."""
    sim = Sim(4, 31, clients=6, config=small_config(max_inflight=1, max_batch=1))
    for k in range(12):
        sim.submit_at(k * 5, k % 6, b"a%d" % k)
    sim.run(120_000, stop=sim.clients_done)
    sim.crash(1)
    sim.restart(1)
    for k in range(12, 24):
        sim.submit_in(k * 5, k % 6, b"b%d" % k)
    sim.run(120_000, stop=sim.clients_done)
    sim.run_for(2_000)
    sim.check_liveness()
    sim.check_exactly_once()
    pid = sim.pids[1]
    stables = [rec for rec in sim.storage[pid] if rec["k"] == "stable"]
    whole = [i for i, rec in enumerate(stables) if "clients" in rec]
    assert whole[0] == 0 and len(whole) == 2  # the first ever, and the first after the restart
    for rec in stables:
        assert ("clients" in rec) != ("clients+" in rec)
        assert len(rec.get("clients+", ())) <= 4  # K = 4, one request per batch
    live = sim.replica(1)
    compacted = compact_records(sim.storage[pid])
    assert [len(r["clients"]) for r in compacted if r["k"] == "stable"] == [6]
    for records in (sim.storage[pid], compacted):
        r = Replica.restore(records, sim.ids[1], sim.validators, sim.cfg)
        assert r._clients == live._clients
        assert r.last_executed == live.last_executed


def test_lagging_replica_catches_up_with_certified_entries() -> None:
    net = Net()
    sim = Sim(4, 33, net=net, clients=2, config=small_config(max_inflight=1, max_batch=1))
    net.partitions.append((0, 5_000, frozenset({sim.pids[3]})))
    for k in range(14):
        sim.submit_at(k * 5, k % 2, b"p%d" % k)
    sim.run(4_900, stop=sim.clients_done)
    assert sim.replica(3).last_executed == 0
    assert sim.replica(0).last_executed == 14
    sim.submit_at(6_000, 0, b"after heal")
    sim.run(60_000, stop=lambda: sim.replica(3).last_executed == 15)
    sim.check_liveness()
    r3 = sim.replica(3)
    assert r3.last_executed == 15
    assert r3.stable_seq >= 12
    assert r3.rejections.get("bad_certificate", 0) == 0


def test_state_transfer_through_deliver_when_peers_no_longer_hold_entries() -> None:
    from mossnode.protocols.pbft import Entry

    net = Net()
    sim = Sim(
        4,
        34,
        net=net,
        clients=2,
        config=small_config(max_inflight=1, max_batch=1, retain_decided=2),
    )
    net.partitions.append((0, 10_000, frozenset({sim.pids[3]})))
    for k in range(18):
        sim.submit_at(k * 5, k % 2, b"s%d" % k)
    sim.run(9_000, stop=sim.clients_done)
    sim.submit_at(11_000, 0, b"after heal")  # r3 hears of seq 19 and knows it is behind...
    sim.run(14_000)  # ...but peers only keep entries above their stable checkpoint (16)
    sim.check_liveness()
    r3 = sim.replica(3)
    assert r3.last_executed == 0 and r3.lagging
    donor = sim.decided[sim.pids[0]]
    forged = donor[1]
    bad = Entry(1, forged.view, forged.payload + b"x", forged.certificate)
    sim.handle(sim.pids[3], r3.deliver([bad], sim.now))
    assert r3.last_executed == 0 and r3.rejections["bad_certificate"] == 1
    entries = [Entry(d.seq, d.view, d.payload, d.certificate) for _, d in sorted(donor.items())]
    sim.handle(sim.pids[3], r3.deliver(entries, sim.now))
    assert r3.last_executed == 19
    sim.run_for(3_000)
    assert r3.stable_seq == 16 and not r3.lagging


def test_preprepare_outside_the_watermarks_is_refused() -> None:
    sim = Sim(4, 35)  # window 8 above the stable checkpoint 0: seqs 1..8 only
    primary, backup = sim.ids[0], sim.replica(1)
    req = seal(
        sim.client_ids[0],
        swarm_id=SWARM,
        type="pbft.request",
        seq=1,
        timestamp=T0,
        body={"op": b"x", "t": T0},
    )
    for seq, n in ((1, 9), (2, 100)):
        pp = PrePrepare.make(0, n, [req])
        raw = seal(
            primary, swarm_id=SWARM, type="pbft.preprepare", seq=seq, timestamp=T0, body=pp.body()
        )
        assert not [e for e in backup.receive(raw, T0) if isinstance(e, Send)]
    assert backup.rejections["out_of_window"] == 2
    assert backup.log_seqs() == []
    pp = PrePrepare.make(0, 8, [req])
    raw = seal(primary, swarm_id=SWARM, type="pbft.preprepare", seq=3, timestamp=T0, body=pp.body())
    assert [e for e in backup.receive(raw, T0) if isinstance(e, Send)]  # at the edge: prepared
    # A pre-prepare signed by a backup (not the view's primary) is refused too.
    raw = seal(
        sim.ids[2],
        swarm_id=SWARM,
        type="pbft.preprepare",
        seq=1,
        timestamp=T0,
        body=PrePrepare.make(0, 2, [req]).body(),
    )
    backup.receive(raw, T0)
    assert backup.rejections["not_primary"] == 1


def _env(data: bytes) -> tuple[str, Any]:
    """(type, body) of an envelope, unverified."""
    _, _, type_, _, _, _, body = cbor2.loads(data[64:])
    return type_, body


def test_replies_and_checkpoint_go_out_ahead_of_the_exec_record() -> None:
    """The exec record is the last thing an execution persists: the I/O layer may send the
    replies and the checkpoint while it is written (the stable record still follows it)."""
    sim = Sim(4, 34, clients=2, config=small_config(max_inflight=1, max_batch=1))
    lists: list[list[Any]] = []
    real = sim.handle

    def spy(src: str, effects: list[Any]) -> None:
        lists.append(list(effects))
        real(src, effects)

    sim.handle = spy  # type: ignore[method-assign]
    for k in range(12):
        sim.submit_at(k * 5, k % 2, b"o%d" % k)
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    replies = checkpoints = 0
    for effects in lists:
        execs = {
            e.record["n"]: i
            for i, e in enumerate(effects)
            if isinstance(e, Persist) and e.record["k"] == "exec"
        }
        for n, at in execs.items():
            clients = {_env(raw)[1]["t"] for raw in cbor2.loads(effects[at].record["p"])}
            for i, e in enumerate(effects):
                if isinstance(e, Persist) and e.record["k"] == "stable" and e.record["n"] == n:
                    assert i > at, "a stable record ahead of the exec record it covers"
                if not isinstance(e, Send):
                    continue
                type_, body = _env(e.data)
                if type_ == "pbft.checkpoint" and body["n"] == n:
                    assert i < at
                    checkpoints += 1
                elif type_ == "pbft.reply" and body["t"] in clients:
                    assert i < at
                    replies += 1
    assert replies >= 12 * 2 and checkpoints > 0  # f + 1 replies per request at least


def test_torn_crash_after_replies_and_checkpoint_is_safe() -> None:
    """A replica that sent its replies and checkpoint and crashed before its exec record was
    durable restarts without it: it learns the batch again (state transfer), re-derives the
    same state, and no client sees a result twice or a different one."""
    from test_pbft_sim import converged

    lost = 0
    for seed in range(24):
        sim = Sim(4, 500 + seed, clients=2, config=small_config(max_inflight=1, max_batch=1))
        victim = seed % 4
        for k in range(8):
            sim.submit_at(k * 7, k % 2, b"t%d-%d" % (seed, k))
        sim.call_at(5 + 3 * seed, lambda v=victim, s=sim: s.crash_torn(v))

        def back(v: int = victim, s: Sim = sim) -> None:
            s.torn.discard(s.pids[v])
            if s.pids[v] in s.crashed:
                s.restart(v)

        sim.call_at(400 + 5 * seed, back)
        sim.run(401 + 5 * seed)  # the victim is back (the final request must find it up)
        sim.run(120_000, stop=sim.clients_done)
        sim.check_liveness()
        sim.check_exactly_once()
        lost += sum(1 for rec in sim.torn_lost if rec["k"] == "exec")
        sim.submit_in(100, 0, b"final")
        sim.run_for(60_000, stop=lambda s=sim: converged(s))
        assert converged(sim), f"seed {seed}"
        states = {sim.replica(p)._state for p in sim.replica_pids}
        assert len(states) == 1, f"seed {seed}: replicas disagree on the state digest"
    assert lost > 0  # the torn crashes did lose exec records


def test_no_status_or_checkpoint_resend_while_progressing() -> None:
    """Under steady load the retransmit timer fires every period while replicas progress: they
    neither ask peers for status nor re-broadcast a checkpoint sent less than a period ago
    (at n = 7 that chatter was a third of the messages per decision). A replica that stops
    progressing still asks (see the lagging and convergence tests)."""
    sim = Sim(4, 35, clients=3, config=small_config(max_inflight=1, max_batch=1))
    for k in range(150):
        sim.submit_at(k * 20, k % 3, b"s%d" % k)
    sent: list[str] = []
    real = sim.handle

    def spy(src: str, effects: list[Any]) -> None:
        if 500 <= sim.now - T0 <= 2_500 and src in sim.replica_pids:
            sent.extend(_env(e.data)[0] for e in effects if isinstance(e, Send))
        real(src, effects)

    sim.handle = spy  # type: ignore[method-assign]
    sim.run(120_000, stop=sim.clients_done)
    sim.check_liveness()
    assert sent.count("pbft.commit") > 100  # it was busy deciding all along
    assert "pbft.status" not in sent and "pbft.sync" not in sent
    # one broadcast per replica per checkpoint (K = 4) as for commits per seq, and no resends
    assert sent.count("pbft.checkpoint") <= sent.count("pbft.commit") // 4 + 12


def test_envelope_cache_parses_each_request_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's requests are looked at when the pre-prepare is accepted, when they are noted
    pending, when they execute and when the decided log judges them: parsed once for all."""
    from mossnode.protocols.pbft.messages import REQUEST, EnvelopeCache

    cache = EnvelopeCache(SWARM)
    c = ident(30)
    raw = seal(c, swarm_id=SWARM, type=REQUEST, seq=1, timestamp=T0, body=Request(b"x", 7).body())
    other = seal(c, swarm_id=SWARM, type=REPLY, seq=2, timestamp=T0, body={"op": b"x", "t": 7})
    parsed: list[Any] = []
    real = Request.parse.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        Request, "parse", classmethod(lambda cls, b: parsed.append(b) or real(cls, b))
    )
    got = cache.request(raw)
    assert got is not None and got[0].sender == c.public_key and got[1] == Request(b"x", 7)
    assert cache.request(raw) is got and cache.request(raw) is got
    assert (
        cache.request(other) is None and cache.request(b"junk") is None and cache.request(3) is None
    )
    assert cache.request(other) is None
    assert len(parsed) == 1


def test_a_batch_is_answered_with_one_replies_envelope_for_all_its_clients() -> None:
    """With ``reply_batches`` each replica seals one ``pbft.replies`` per executed batch of
    several requests (SendAll to its clients) and a lone request still gets a ``pbft.reply``;
    every client completes with f+1 matching results."""
    sim = Sim(4, 35, clients=4, config=small_config(reply_batches=True, max_inflight=1))
    emitted: list[Any] = []
    real = sim.handle_all

    def spy(src: str, effects: list[Any]) -> None:
        emitted.extend(e for e in effects if isinstance(e, Send | SendAll))
        real(src, effects)

    sim.handle_all = spy  # type: ignore[method-assign]
    for k in range(4):
        sim.submit_at(0, k, b"together-%d" % k)  # the first goes alone, three wait for it
    sim.submit_at(400, 0, b"alone")
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()
    multi = [e for e in emitted if isinstance(e, SendAll)]
    singles = [e for e in emitted if isinstance(e, Send) and _env(e.data)[0] == REPLY]
    assert multi and all(_env(e.data)[0] == REPLIES for e in multi)
    clients = {c.peer_id for c in sim.client_ids}
    for e in multi:
        _, body = _env(e.data)
        assert len(body["rs"]) == len(e.to) > 1 and set(e.to) <= clients
        assert {peer_id_from_public_key(bytes.fromhex(k)) for k in body["rs"]} == set(e.to)
    assert singles  # batches of one request keep the single reply
    for cid in sim.client_ids:  # every reply envelope opened and matched, none refused
        assert not set(sim.nodes[cid.peer_id].rejections) - {"stale_reply"}
    for cid in sim.client_ids:
        assert len(sim.completed[cid.peer_id]) == (2 if cid == sim.client_ids[0] else 1)


def test_a_client_takes_its_item_of_a_replies_envelope_opened_once() -> None:
    ids = [ident(i) for i in range(4)]
    vals = [i.public_key for i in ids]
    me, other = ident(100), ident(101)
    clients = {c.public_key: Client(c, vals, SWARM) for c in (me, other)}
    ts = {k: c.submit(b"op", T0)[0] for k, c in clients.items()}

    def replies(i: int, seq: int, items: dict[str, list[Any]]) -> Any:
        raw = seal(
            ids[i] if i < 4 else ident(i),
            swarm_id=SWARM,
            type=REPLIES,
            seq=seq,
            timestamp=T0,
            body={"v": 0, "rs": items},
        )
        env = open_envelope(raw, swarm_id=SWARM, now_ms=T0)
        assert not isinstance(env, Rejection)
        return env

    good = {k.hex(): [t, b"ok-%d" % t] for k, t in ts.items()}
    env1 = replies(1, 1, good)
    for c in clients.values():
        assert c.wants(env1)
        assert c.receive_opened(env1, T0) == []
    assert clients[me.public_key].receive_opened(env1, T0) == []  # replayed
    assert clients[me.public_key].rejections == {"replay": 1}
    assert clients[me.public_key].receive_opened(replies(9, 1, good), T0) == []  # no validator
    lying = {k.hex(): [t, b"evil"] for k, t in ts.items()}
    assert clients[me.public_key].receive_opened(replies(3, 1, lying), T0) == []  # Byzantine
    only_other = {other.public_key.hex(): good[other.public_key.hex()]}
    assert clients[me.public_key].receive_opened(replies(0, 1, only_other), T0) == []
    assert clients[me.public_key].rejections == {
        "replay": 1,
        "not_member": 1,
        "malformed_body": 1,
    }
    env2 = replies(2, 1, good)
    for k, c in clients.items():
        out = c.receive_opened(env2, T0)
        assert Completed(ts[k], b"op", b"ok-%d" % ts[k]) in out
        assert not c.wants(env2) and c.outstanding is None
    raw = seal(ids[3], swarm_id=SWARM, type=REPLIES, seq=2, timestamp=T0, body={"v": 0, "rs": {}})
    assert clients[me.public_key].receive(raw, T0) == []  # nothing outstanding: not checked


def test_replies_items_are_parsed_defensively() -> None:
    key = b"k" * 32
    k = key.hex()
    assert reply_in({"v": 1, "rs": {k: [5, b"r"]}}, key) == Reply(1, 5, key, b"r")
    assert replies_body(1, [(key, 5, b"r")]) == {"v": 1, "rs": {k: [5, b"r"]}}
    for body in (
        None,
        {"v": 1},
        {"v": -1, "rs": {k: [5, b"r"]}},
        {"v": 1, "rs": [[key, 5, b"r"]]},
        {"v": 1, "rs": {k: [5]}},
        {"v": 1, "rs": {k: ["5", b"r"]}},
        {"v": 1, "rs": {k: [5, "r"]}},
        {"v": 1, "rs": {"other": [5, b"r"]}},
    ):
        assert reply_in(body, key) is None
