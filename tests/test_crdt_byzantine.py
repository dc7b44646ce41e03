"""Hostile entries are refused with a counted reason, change nothing, and raise nothing."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text
from test_crdt_support import NOW, SWARM, TablePolicy, forge, ident, policy_for

from mossnode.crypto.envelope import Reason, seal
from mossnode.protocols.crdt import (
    MAX_ENTRY_BYTES,
    STATE_UPDATE,
    Replica,
    WriteRefused,
    client_id_for,
    verify_equivocation,
)
from mossnode.protocols.crdt.entry import body

A, B, C, D = (ident(i) for i in range(4))
OUTSIDER = ident(50)


def setup(policy: TablePolicy | None = None) -> tuple[Replica, Replica, str]:
    """Replica of C (the victim's view) and of A; A created a task that B claimed."""
    policy = policy or policy_for([A, B, C, D])
    ra = Replica(A, SWARM, policy)
    rb = Replica(B, SWARM, policy)
    rc = Replica(C, SWARM, policy)
    tid, e1 = ra.create_task("job", NOW, title="build")
    assert e1 is not None
    rb.receive(e1.data, NOW)
    _, e2 = rb.write(lambda w: w.claim(tid, {"score": 1}), NOW)
    assert e2 is not None
    rc.receive_batch([e1.data, e2.data], NOW)
    ra.receive(e2.data, NOW)
    return rc, ra, tid


def refused_unchanged(rep: Replica, data: bytes, reason: Reason) -> None:
    before = rep.digest()
    vector = rep.vector()
    counted = rep.rejections[reason]
    out = rep.receive(data, NOW)
    assert rep.rejections[reason] == counted + 1, (out.refused, rep.rejections)
    assert [r.rejection.reason for r in out.refused] == [reason]
    assert not out.applied
    assert rep.digest() == before
    assert rep.vector() == vector


def tasks(doc: Doc[Map[Any]]) -> Map[Any]:
    return doc["tasks"]


def test_writing_someone_elses_claim_is_forbidden() -> None:
    rc, _, tid = setup()
    bad = forge(rc, A, lambda d: tasks(d)[tid].__setitem__(f"claims/{B.peer_id}", {"score": 0}))
    refused_unchanged(rc, bad, Reason.FORBIDDEN)
    assert A.peer_id in rc.blocked_authors()


def test_deleting_another_nodes_entry_is_forbidden() -> None:
    rc, _, tid = setup()
    bad = forge(rc, D, lambda d: tasks(d)[tid].__delitem__(f"claims/{B.peer_id}"))
    refused_unchanged(rc, bad, Reason.FORBIDDEN)
    # even the task's creator may not delete a single entry of another node
    bad = forge(rc, A, lambda d: tasks(d)[tid].__delitem__(f"claims/{B.peer_id}"))
    refused_unchanged(rc, bad, Reason.FORBIDDEN)


def test_replayed_entry_is_refused() -> None:
    rc, ra, _ = setup()
    first = next(ra.entries()).data
    refused_unchanged(rc, first, Reason.REPLAY)
    refused_unchanged(rc, first, Reason.REPLAY)


def test_valid_signature_from_a_non_member() -> None:
    rc, _, _ = setup()
    bad = forge(rc, OUTSIDER, lambda d: d["agents"].__setitem__(OUTSIDER.peer_id, Map({"x": 1})))
    refused_unchanged(rc, bad, Reason.NOT_MEMBER)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xff\xff\xff",
        bytes(range(40)),  # Yrs itself accepts this one and ignores the tail
        b"\x01\x01\x07\x00\x08",
    ],
)
def test_garbage_yrs_bytes_in_a_signed_envelope(garbage: bytes) -> None:
    rc, _, _ = setup()
    refused_unchanged(rc, forge(rc, D, update=garbage), Reason.MALFORMED)


def test_truncated_and_padded_real_updates() -> None:
    rc, _, _ = setup()
    good = _update_of(rc, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1, 2, 3])))
    for variant in (good[:-1], good + b"\x00", good[: len(good) // 2]):
        fresh, _, _ = setup()
        refused_unchanged(fresh, forge(fresh, D, update=variant), Reason.MALFORMED)
    ok = rc.receive(forge(rc, D, update=good), NOW)
    assert ok.applied and not ok.refused


def _update_of(rep: Replica, who: Any, fn: Callable[[Doc[Map[Any]]], None]) -> bytes:
    from mossnode.protocols.crdt.document import new_doc

    doc = new_doc(client_id_for(who.public_key), rep.doc.get_update())
    captured: list[bytes] = []
    doc.observe(lambda ev: captured.append(ev.update))
    with doc.transaction():
        fn(doc)
    return captured[-1]


def test_huge_entry_is_refused_before_anything_else() -> None:
    rc, _, _ = setup()
    blob = random.Random(1).randbytes(MAX_ENTRY_BYTES)
    bad = forge(rc, D, lambda d: d["history"].__setitem__(D.peer_id, Array([blob])))
    assert len(bad) > MAX_ENTRY_BYTES
    refused_unchanged(rc, bad, Reason.TOO_LARGE)
    assert D.peer_id not in rc.blocked_authors()  # size is checked before the signature


def test_tombstone_run_claiming_a_huge_clock_span() -> None:
    rc, _, _ = setup()
    client = client_id_for(D.public_key)
    # one struct: ContentDeleted (ref 1) with parent root "history", key = D, length 2**30
    key = D.peer_id.encode()
    upd = (
        b"\x01\x01"
        + _var(client)
        + b"\x00"
        + bytes([0x21])
        + b"\x01"
        + _var(7)
        + b"history"
        + _var(len(key))
        + key
        + _var(1 << 30)
        + b"\x00"
    )
    refused_unchanged(rc, forge(rc, D, update=upd), Reason.TOO_LARGE)


def _var(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def test_items_under_another_client_id() -> None:
    rc, _, _ = setup()
    spoof = forge(
        rc,
        D,
        lambda d: d["history"].__setitem__(D.peer_id, Array(["x"])),
        client_id=client_id_for(B.public_key),
    )
    refused_unchanged(rc, spoof, Reason.FORBIDDEN)


def test_unknown_root_and_disallowed_content() -> None:
    rc, _, _ = setup()
    refused_unchanged(
        rc, forge(rc, D, lambda d: d.get("evil", type=Map).__setitem__("k", 1)), Reason.FORBIDDEN
    )
    rc2, _, _ = setup()
    refused_unchanged(
        rc2,
        forge(rc2, D, lambda d: d["agents"].__setitem__(D.peer_id, Map({"t": Text("x")}))),
        Reason.FORBIDDEN,
    )


def test_task_creation_rules() -> None:
    policy = policy_for([A, B, C, D])
    policy.grants[D.peer_id] = {"task.claim"}  # D may not create tasks
    rc, _, _ = setup(policy)
    bad = forge(rc, D, lambda d: tasks(d).__setitem__(f"{D.peer_id}:x", Map({"title": "t"})))
    refused_unchanged(rc, bad, Reason.FORBIDDEN)
    # a task id naming someone else as creator
    rc2, _, _ = setup()
    bad = forge(rc2, C, lambda d: tasks(d).__setitem__(f"{A.peer_id}:x", Map({"title": "t"})))
    refused_unchanged(rc2, bad, Reason.FORBIDDEN)
    # core fields of A's task by B
    rc3, _, tid = setup()
    bad = forge(rc3, B, lambda d: tasks(d)[tid].__setitem__("title", "mine now"))
    refused_unchanged(rc3, bad, Reason.FORBIDDEN)


def test_reference_outside_declared_dependencies() -> None:
    rc, _, tid = setup()
    bad = forge(rc, D, lambda d: tasks(d)[tid].__setitem__(f"claims/{D.peer_id}", 1), deps={})
    refused_unchanged(rc, bad, Reason.MALFORMED)


def test_write_once_paths() -> None:
    rc, _, tid = setup()
    ok = rc.receive(forge(rc, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1]))), NOW)
    assert ok.applied
    again = forge(rc, D, lambda d: d["history"].__setitem__(D.peer_id, Array([])))
    refused_unchanged(rc, again, Reason.FORBIDDEN)  # replacing a history would erase it
    rc2, _, _ = setup()
    wipe = forge(rc2, A, lambda d: tasks(d)[tid].__setitem__("claims", Map()))
    refused_unchanged(rc2, wipe, Reason.FORBIDDEN)  # the creator cannot wipe claims
    rc3, _, _ = setup()
    rc3.receive(forge(rc3, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1, 2]))), NOW)
    trim = forge(rc3, D, lambda d: d["history"][D.peer_id].__delitem__(0))
    refused_unchanged(rc3, trim, Reason.FORBIDDEN)  # append-only


def test_refused_author_stays_blocked_and_later_entries_wait() -> None:
    rc, _, tid = setup()
    bad = forge(rc, D, lambda d: tasks(d)[tid].__setitem__(f"claims/{B.peer_id}", 0))
    refused_unchanged(rc, bad, Reason.FORBIDDEN)
    later = forge(rc, D, lambda d: tasks(d)[tid].__setitem__(f"claims/{D.peer_id}", 1), seq=2)
    before = rc.digest()
    out = rc.receive(later, NOW)
    assert not out.applied and rc.digest() == before
    assert rc.blocked_authors()[D.peer_id].seq == 1


def test_conflicting_forbidden_write_is_refused_in_every_arrival_order() -> None:
    """The case pycrdt events get wrong: a forbidden write that loses a concurrent conflict
    emits no event at all. The structural check refuses it wherever it lands."""
    policy = policy_for([A, B, C, D])
    ra = Replica(A, SWARM, policy)
    tid, e1 = ra.create_task("job", NOW, title="t")
    assert e1 is not None
    rb = Replica(B, SWARM, policy)
    rb.receive(e1.data, NOW)
    _, honest = rb.write(lambda w: w.claim(tid, {"by": "B"}), NOW)
    assert honest is not None
    forged = forge(ra, D, lambda d: tasks(d)[tid].__setitem__(f"claims/{B.peer_id}", "stolen"))
    finals = []
    for order in ((honest.data, forged), (forged, honest.data)):
        rep = Replica(C, SWARM, policy)
        rep.receive(e1.data, NOW)
        for data in order:
            rep.receive(data, NOW)
        assert set(rep.blocked_authors()) == {D.peer_id}
        assert rep.rejections[Reason.FORBIDDEN] == 1
        finals.append((rep.digest(), rep.vector()))
    assert finals[0] == finals[1]


def test_equivocation_is_detected_proved_and_spread() -> None:
    policy = policy_for([A, B, C, D])
    r1, r2, r3 = (Replica(x, SWARM, policy) for x in (B, C, ident(60)))
    policy.members.add(ident(60).peer_id)
    fork1 = forge(r1, D, lambda d: d["history"].__setitem__(D.peer_id, Array(["one"])))
    fork2 = forge(r1, D, lambda d: d["history"].__setitem__(D.peer_id, Array(["two"])))
    r1.receive(fork1, NOW)
    r2.receive(fork2, NOW)
    r3.receive(fork1, NOW)
    out = r1.receive(fork2, NOW)  # same seq, different entry
    assert out.equivocations and verify_equivocation(out.equivocations[0], SWARM)
    assert D.peer_id in r1.blocked_authors()
    # r2 and r3 learn it through ordinary anti-entropy with r1
    for rep in (r2, r3):
        for batch in r1.missing_for(rep.vector(), rep.heads()):
            rep.receive_batch(batch, NOW)
        assert D.peer_id in rep.evidence and D.peer_id in rep.blocked_authors()
    # a later, honest-looking entry of D goes nowhere
    nxt = forge(r1, D, lambda d: d["agents"].__setitem__(D.peer_id, Map()), seq=2)
    for rep in (r1, r2, r3):
        before = rep.digest()
        assert not rep.receive(nxt, NOW).applied and rep.digest() == before


def test_chain_fork_via_previous_digest() -> None:
    policy = policy_for([A, B, C, D])
    rep = Replica(C, SWARM, policy)
    first = forge(rep, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1])))
    rep.receive(first, NOW)
    liar = forge(rep, D, lambda d: d["history"][D.peer_id].append(2), prev=b"\x00" * 32)
    out = rep.receive(liar, NOW)
    assert out.equivocations and verify_equivocation(out.equivocations[0], SWARM)
    # D signed a second history from seq 1 on: seq 1 is disputed and rolled back everywhere
    assert [(e.author, e.seq) for e in out.retracted] == [(D.peer_id, 1)]
    assert rep.digest() == Replica(C, SWARM, policy).digest()
    assert rep.blocked_authors()[D.peer_id].seq == 1


def test_backdating_below_a_cut_off_and_rebuild() -> None:
    policy = policy_for([A, B, C, D])
    rep = Replica(C, SWARM, policy)
    e1 = forge(rep, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1])))
    rep.receive(e1, NOW)
    e2 = forge(rep, D, lambda d: d["history"][D.peer_id].append(2))
    assert rep.receive(e2, NOW).applied
    with_two = rep.digest()
    # the decided log revokes D at seq 3 with cut-off 1: entry 2 (citing policy 0) is invalid
    policy.seq = 3
    policy.floors[D.peer_id] = (1, 3)
    out = rep.rebuild(NOW)
    assert [(e.author, e.seq) for e in out.retracted] == [(D.peer_id, 2)]
    assert rep.digest() != with_two and rep.vector()[D.peer_id] == 1
    assert rep.rejections[Reason.NOT_MEMBER] == 1


def test_entry_citing_a_future_policy_waits_for_it() -> None:
    policy = policy_for([A, B, C, D])
    rep = Replica(C, SWARM, policy)
    future = forge(rep, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1])), policy_seq=4)
    out = rep.receive(future, NOW)
    assert not out.applied and rep.pending_count() == 1
    policy.seq = 4
    assert rep.drain().applied and rep.pending_count() == 0


def test_unsigned_or_foreign_swarm_bytes() -> None:
    rc, ra, _ = setup()
    good = next(ra.entries()).data
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    refused_unchanged(rc, tampered, Reason.BAD_SIGNATURE)
    other_swarm = seal(
        D,
        swarm_id=b"\x00" * 32,
        type=STATE_UPDATE,
        seq=1,
        timestamp=NOW,
        body=body(b"\x00\x00", {}, 0, b""),
    )
    refused_unchanged(rc, other_swarm, Reason.WRONG_SWARM)
    refused_unchanged(rc, b"\x00" * 80, Reason.MALFORMED)


def test_local_write_outside_the_rules_changes_nothing() -> None:
    rc, _, tid = setup()
    before = rc.digest()
    with pytest.raises(WriteRefused):
        rc.write(lambda w: w._task(tid).__setitem__(f"claims/{B.peer_id}", 1), NOW)
    with pytest.raises(KeyError):
        rc.write(lambda w: w.claim("nope:x", 1), NOW)
    assert rc.digest() == before and rc.vector().get(C.peer_id) is None
    _, entry = rc.write(lambda w: w.claim(tid, 2), NOW)  # the chain continues at seq 1
    assert entry is not None and entry.seq == 1


def test_creator_may_delete_its_task_with_everything_under_it() -> None:
    policy = policy_for([A, B, C, D])
    rc, ra, tid = setup(policy)
    _, gone = ra.write(lambda w: w.delete_task(tid), NOW)
    assert gone is not None
    assert rc.receive(gone.data, NOW).applied and rc.task(tid) is None
    policy.grants[A.peer_id] = {"task.create"}  # without task.delete it is refused
    _, ra2, tid2 = setup(policy)
    with pytest.raises(WriteRefused):
        ra2.write(lambda w: w.delete_task(tid2), NOW)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(data=st.data())
def test_mutated_updates_never_raise_and_verdicts_agree(data: st.DataObject) -> None:
    """Bit-flipped, truncated or spliced updates, validly signed by a member: no exception,
    refusal leaves the document alone, and two replicas in the same state decide alike."""
    rc, _, _ = _FUZZ_BASE
    seed_update = data.draw(st.sampled_from(_FUZZ_UPDATES))
    raw = bytearray(seed_update)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
    entry = forge(rc, D, update=bytes(raw))
    verdicts = []
    for _ in range(2):
        rep = Replica(C, SWARM, _FUZZ_POLICY)
        rep.receive_batch(_FUZZ_HISTORY, NOW)
        before = rep.digest()
        out = rep.receive(entry, NOW)
        if not out.applied:
            assert rep.digest() == before
        verdicts.append(([r.rejection.reason for r in out.refused], rep.digest()))
    assert verdicts[0] == verdicts[1]


def _fuzz_base() -> tuple[tuple[Replica, Replica, str], list[bytes], TablePolicy, list[bytes]]:
    policy = policy_for([A, B, C, D])
    base = setup(policy)
    rc, _, tid = base
    history = [e.data for e in rc.entries()]
    updates = [
        _update_of(rc, D, lambda d: tasks(d)[tid].__setitem__(f"claims/{D.peer_id}", {"x": 1})),
        _update_of(rc, D, lambda d: d["history"].__setitem__(D.peer_id, Array([1, "a"]))),
        _update_of(rc, D, lambda d: d["agents"].__setitem__(D.peer_id, Map({"g": Map({"c": 1})}))),
        _update_of(rc, D, lambda d: tasks(d)[tid].__delitem__(f"claims/{B.peer_id}")),
    ]
    return base, updates, policy, history


_FUZZ_BASE, _FUZZ_UPDATES, _FUZZ_POLICY, _FUZZ_HISTORY = _fuzz_base()


def _sync_all(reps: list[Replica], rounds: int = 6) -> None:
    for _ in range(rounds):
        for a in reps:
            for b in reps:
                if a is not b:
                    for batch in b.missing_for(
                        a.vector(), a.heads(), a.blocked_seqs(), max_entries=5
                    ):
                        a.receive_batch(batch, NOW)


def test_forbidden_to_some_valid_to_others_still_converges() -> None:
    """D signs two seq-1 entries: a forbidden one for r1, a valid one (and more on top) for
    r2 and B. B claims the task D's valid branch created. Everyone ends up excluding D from
    seq 1 on, with equal content; B's claim still applies (into a collected range, so it
    vanishes with the task) and B's chain goes on."""
    policy = policy_for([A, B, C, D])
    r1, r2, rb = Replica(A, SWARM, policy), Replica(C, SWARM, policy), Replica(B, SWARM, policy)
    forbidden = forge(r1, D, lambda d: d["agents"].__setitem__(B.peer_id, Map()))
    dreplica = Replica(D, SWARM, policy)
    tid, valid1 = dreplica.create_task("fork", NOW, title="bait")
    _, valid2 = dreplica.write(lambda w: w.append_history("x"), NOW)
    assert valid1 is not None and valid2 is not None
    r1.receive(forbidden, NOW)
    assert D.peer_id in r1.blocked_authors()
    for rep in (r2, rb):
        rep.receive_batch([valid1.data, valid2.data], NOW)
    _, dependent = rb.write(lambda w: w.claim(tid, {"bid": 1}), NOW)
    assert dependent is not None
    r2.receive(dependent.data, NOW)
    _sync_all([r1, r2, rb])
    assert len({r.digest() for r in (r1, r2, rb)}) == 1
    for rep in (r1, r2, rb):
        assert rep.vector() == {B.peer_id: 1}
        assert rep.blocked_authors()[D.peer_id].seq == 1
        assert rep.task(tid) is None and rep.pending_count() == 0
    _, more = rb.write(lambda w: w.append_history("still writing"), NOW)
    assert more is not None and more.seq == 2
    proof = r2.evidence[D.peer_id]
    assert verify_equivocation(proof, SWARM)
