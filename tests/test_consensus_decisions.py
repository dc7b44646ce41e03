"""The decided log as PBFT decisions, pure: certificates, the entry mapping, rules and votes.

Certificates here are signed by hand with the validators' keys (the tests hold them), so every
refusal the verifier must make can be built exactly; the end-to-end tests use real replicas.
"""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from consensus_sim import T0, ConsensusSim, ident

from mossnode.crypto.envelope import seal
from mossnode.crypto.identity import Identity
from mossnode.protocols.decisions import (
    NOOP,
    TASK_ASSIGN,
    VOTE_CAST,
    VOTE_OPEN,
    VOTE_OUTCOME,
    ConsensusCore,
    ConsensusMembership,
    Extension,
    Tally,
    cast_payload,
    decode_op,
    encode_op,
    exclusive_assignment,
    open_payload,
    outcome_payload,
    pbft_config,
    tally,
    verify_consensus_certificate,
)
from mossnode.protocols.entry_proof import EntryProof, proofs_for
from mossnode.protocols.membership import (
    Entry,
    Membership,
    MembershipError,
    make_genesis,
    make_invite,
)
from mossnode.protocols.pbft import PbftConfig, batch_digest
from mossnode.protocols.pbft.messages import COMMIT, REQUEST, Request, Vote
from mossnode.protocols.tasks import Assignment
from mossnode.protocols.tasks.recurring import Schedule
from mossnode.protocols.tasks.schedules import SCHEDULE_ADD, SCHEDULE_REMOVE
from mossnode.protocols.tasks.schedules import extensions as schedule_kinds
from mossnode.protocols.tasks.schedules import payload as schedule_payload

F, A, B, C, D, E = (ident(i) for i in range(6))
IDS = {i.public_key: i for i in (F, A, B, C, D, E)}
GENESIS = make_genesis(F, "unit", T0)
SWARM = GENESIS.swarm_id
_env_seq = [0]


def request(who: Identity, kind: str, payload: dict[str, Any], t: int) -> bytes:
    return request_op(who, encode_op(kind, payload), t)


def request_op(who: Identity, op: bytes, t: int) -> bytes:
    _env_seq[0] += 1
    body = Request(op, t).body()
    return seal(who, swarm_id=SWARM, type=REQUEST, seq=_env_seq[0], timestamp=T0, body=body)


def commit(who: Identity, view: int, seq: int, d: bytes) -> bytes:
    _env_seq[0] += 1
    body = Vote(view, seq, d).body()
    return seal(who, swarm_id=SWARM, type=COMMIT, seq=_env_seq[0], timestamp=T0, body=body)


def quorum_of(state: ConsensusMembership) -> list[Identity]:
    vals = state.validators_at(state.height + 1)
    return [IDS[k] for k in vals[: (len(vals) + (len(vals) - 1) // 3) // 2 + 1]]


def batch_entries(
    state: ConsensusMembership,
    batch: list[bytes],
    signers: list[Identity] | None = None,
    *,
    view: int = 0,
    commit_seq: int | None = None,
) -> Any:
    """The entries a batch decided next yields, one by one, each computed from the state as
    it is when taken (apply each before taking the next), with commits from ``signers``
    (default: a quorum of the validators in force)."""
    n = state.pbft_height + 1
    root, proofs = proofs_for(n, batch)
    cs = [commit(s, view, commit_seq or n, root) for s in signers or quorum_of(state)]
    for p in proofs:
        got = state.analyze(p)
        assert not isinstance(got, str), got
        yield Entry(state.height + 1, got.kind, got.payload, [p.encode(), *cs])


def certified(
    state: ConsensusMembership,
    batch: list[bytes],
    signers: list[Identity] | None = None,
    **kwargs: Any,
) -> Entry:
    """The entry a batch of at most one request decided next yields."""
    assert len(batch) <= 1
    return next(batch_entries(state, batch, signers, **kwargs))


def admit(who: Identity, roles: list[str], nonce: bytes) -> dict[str, Any]:
    return {"public_key": who.public_key, "roles": roles, "invite": nonce}


def fresh() -> ConsensusMembership:
    return ConsensusMembership(GENESIS)


def settle(st: ConsensusMembership) -> None:
    """Null batches until the validator set decided last governs the next batch (as a primary
    with nothing to order brings it in)."""
    while st.validators_at(st.height + 1) != st.validators():
        st.apply(certified(st, []))


def four() -> ConsensusMembership:
    """F, A, B, C validators (A, B, C admitted at seqs 1-3 by the founder, then null batches
    until they certify: batch 13 on)."""
    st = fresh()
    for t, who in enumerate((A, B, C), start=1):
        st.apply(certified(st, [request(F, "admit", admit(who, ["validator"], b"v%d" % t), t)]))
    settle(st)
    assert len(st.validators()) == 4 and st.next_batch == 13
    return st


def refused(state: ConsensusMembership, entry: Entry) -> str:
    reason = verify_consensus_certificate(state, entry)
    assert reason is not None
    with pytest.raises(MembershipError):
        state.apply(entry)
    return reason


# --------------------------------------------------------------------------- certificates


def test_valid_certificate_applies_and_replays_from_genesis() -> None:
    st = four()
    e = certified(st, [request(F, "grant", {"public_key": A.public_key, "role": "planner"}, 9)])
    assert verify_consensus_certificate(st, e) is None
    st.apply(e)
    assert "planner" in st.roles_of(A.public_key)
    again = fresh()
    again.replay(st.entries)
    assert again.roles_of(A.public_key) == st.roles_of(A.public_key)
    assert again.clients == st.clients and again.origin == st.origin
    # the plain founder-authority Membership cannot read this log: noop/vote kinds, commits
    with pytest.raises(MembershipError):
        Membership(GENESIS).replay(st.entries)


def test_2f_signatures_are_not_a_quorum() -> None:
    st = four()
    e = certified(st, [request(F, "pause", {}, 9)], [F, A])  # 2f = 2 of n = 4
    assert "too_few_signatures" in refused(st, e)


def test_commits_for_another_digest_are_refused() -> None:
    st = four()
    e = certified(st, [request(F, "pause", {}, 9)])
    other = [request(F, "resume", {}, 9)]
    forged = Entry(
        e.seq,
        e.kind,
        e.payload,
        [e.certificate[0]] + [commit(s, 0, 13, batch_digest(other)) for s in (F, A, B)],
    )
    assert "digest_mismatch" in refused(st, forged)
    # and a request swapped under honest commits does not hash to them either
    swapped = Entry(e.seq, "resume", {}, [proofs_for(13, other)[1][0].encode(), *e.certificate[1:]])
    assert "digest_mismatch" in refused(st, swapped)


def test_entry_that_is_not_the_decided_operation_is_refused() -> None:
    st = four()
    e = certified(st, [request(F, "pause", {}, 9)])
    for kind, payload in (
        ("resume", {}),
        ("grant", {"public_key": A.public_key, "role": "admin"}),
        (NOOP, {"reason": "invalid", "kind": "pause", "error": "x"}),  # hiding a decision
        (NOOP, {"reason": "duplicate"}),
        (NOOP, {"reason": "null"}),
    ):
        assert "decided request yields" in refused(st, Entry(e.seq, kind, payload, e.certificate))
    assert verify_consensus_certificate(st, e) is None


def test_validator_set_at_the_wrong_seq_is_refused() -> None:
    st = four()
    batch = [request(F, "pause", {}, 9)]
    # signed by the genesis set (the founder alone): a quorum up to batch 12, not at 13
    assert "too_few_signatures" in refused(st, certified(st, batch, [F]))
    # a quorum of keys of which one is not a validator (yet)
    assert "not_validator" in refused(st, certified(st, batch, [F, A, D]))
    # a good quorum, but for another seq
    assert "wrong_seq" in refused(st, certified(st, batch, commit_seq=14))
    # commits that disagree on the view
    proof, d = proofs_for(13, batch)[1][0].encode(), batch_digest(batch)
    mixed = [proof, commit(F, 0, 13, d), commit(A, 1, 13, d), commit(B, 0, 13, d)]
    assert "mismatch" in refused(st, Entry(13, "pause", {}, mixed))
    dup = [proof, commit(F, 0, 13, d), commit(F, 0, 13, d), commit(A, 0, 13, d)]
    assert "duplicate_signer" in refused(st, Entry(13, "pause", {}, dup))


def test_a_reconfiguration_governs_from_the_batch_after_the_watermark() -> None:
    st = fresh()
    e1 = certified(st, [request(F, "admit", admit(A, ["validator"], b"a"), 1)], [F])
    st.apply(e1)
    # decided in batch 1 with K = 4 and window 8: batches 2-8 may already be prepared by the
    # founder alone, so F and A certify from batch 9 (n = 2, quorum 2)
    assert len(st.validators()) == 2 and st.schedule[-1] == (9, st.validators())
    assert st.validators_at(2) == [F.public_key] and st.batch_validators(8) == [F.public_key]
    batch = [request(F, "pause", {}, 2)]
    assert "not_validator" in refused(st, certified(st, batch, [F, A]))
    st.apply(certified(st, batch, [F]))
    for _ in range(6):
        st.apply(certified(st, [], [F]))
    assert st.next_batch == 9 and len(st.validators_at(9)) == 2
    assert "too_few_signatures" in refused(st, certified(st, [], [F]))
    # revoking A's validator role in batch 9 leaves F alone from batch 17 (16 + 1)
    revoke = request(F, "revoke", {"public_key": A.public_key, "role": "validator"}, 3)
    st.apply(certified(st, [revoke], [F, A]))
    assert st.validators() == [F.public_key] and st.schedule[-1] == (17, [F.public_key])
    settle(st)
    assert st.next_batch == 17
    assert "not_validator" in refused(st, certified(st, [request(F, "resume", {}, 4)], [F, A]))
    st.apply(certified(st, [request(F, "resume", {}, 4)], [F]))
    again = fresh()
    again.replay(st.entries)
    assert again.schedule == st.schedule


# --------------------------------------------------------------------------- mapping


def test_null_and_duplicate_batches_decide_noops() -> None:
    st = four()
    null = certified(st, [])
    assert (null.kind, null.payload) == (NOOP, {"reason": "null"})
    assert EntryProof.parse(null.certificate[0]) == EntryProof(13, 0, 0, b"", ())
    st.apply(null)
    first = request(F, "pause", {}, 50)
    st.apply(certified(st, [first]))
    assert st.paused and st.clients[F.public_key] == 50
    # the same request decided again (a view change re-proposed it), or an older one
    for raw in (first, request(F, "resume", {}, 49)):
        dup = certified(st, [raw])
        assert (dup.kind, dup.payload) == (NOOP, {"reason": "duplicate"})
        claim = Entry(dup.seq, "resume", {}, dup.certificate)
        assert "decided request yields" in refused(st, claim)
        st.apply(dup)
    assert st.paused
    assert st.origin[14] == (F.public_key, 50) and 15 not in st.origin


def test_invalid_operations_decide_noops_with_the_reason() -> None:
    st = four()
    cases = [
        (request(A, "pause", {}, 1), "the proposer does not hold swarm.pause"),
        (request(D, "pause", {}, 1), "the proposer is not a member"),
        (request(F, "admit", admit(A, ["executor"], b"x"), 60), "already a member"),
        (request(F, "frobnicate", {}, 61), "unknown decision kind 'frobnicate'"),
        (request(F, NOOP, {"reason": "null"}, 62), "noop entries cannot be proposed"),
        (request_op(F, b"\xff\x00garbage", 63), "malformed operation"),
    ]
    for raw, error in cases:
        e = certified(st, [raw])
        assert e.kind == NOOP and e.payload["reason"] == "invalid"
        assert e.payload["error"] == error
        st.apply(e)
    assert not st.paused
    assert st.clients[A.public_key] == 1  # executed (as a no-op): PBFT will not run it again


def test_every_request_of_a_batch_is_an_entry_in_order() -> None:
    st = four()
    forged = bytearray(request(A, "pause", {}, 5))
    forged[3] ^= 1  # bad signature: skipped like the replicas skip it
    batch = [
        bytes(forged),
        request(F, "pause", {}, 70),
        request(F, "resume", {}, 71),
        request(F, "resume", {}, 71),  # the same timestamp again: a duplicate
        request(B, "resume", {}, 7),  # B holds no swarm.pause
    ]
    got = []
    for e in batch_entries(st, batch):
        st.apply(e)
        got.append((e.seq, e.kind, e.payload.get("reason"), e.payload.get("error")))
    assert got == [
        (13, NOOP, "invalid", "not a signed request"),
        (14, "pause", None, None),
        (15, "resume", None, None),
        (16, NOOP, "duplicate", None),
        (17, NOOP, "invalid", "the proposer does not hold swarm.pause"),
    ]
    assert not st.paused and st.clients[F.public_key] == 71 and st.clients[B.public_key] == 7
    assert A.public_key not in st.clients and st.origin[14] == (F.public_key, 70)
    assert 13 not in st.origin and 16 not in st.origin
    assert st.position.n == 13 and st.position.closes_batch and st.batch_first[13] == 13
    # every entry of the batch is certified by the set in force when the batch began
    assert all(st.validators_at(s) == st.validators_at(4) for s in range(4, 9))
    again = fresh()
    again.replay(st.entries)
    assert again.clients == st.clients and again.origin == st.origin


def test_nobody_may_leave_the_swarm_without_validators() -> None:
    st = fresh()
    st.apply(certified(st, [request(F, "admit", admit(A, ["executor"], b"a"), 1)], [F]))
    e = certified(
        st, [request(F, "revoke", {"public_key": F.public_key, "role": "validator"}, 2)], [F]
    )
    assert e.payload["error"] == "the swarm would be left without validators"
    # a member may remove itself without member.remove
    e = certified(st, [request(A, "remove", {"public_key": A.public_key}, 1)], [F])
    assert e.kind == "remove"


def test_admission_on_an_invitation_needs_no_member_invite() -> None:
    st = four()
    st.apply(certified(st, [request(F, "admit", admit(D, ["executor"], b"d"), 8)]))
    token = make_invite(F, SWARM, ["reviewer"], now_ms=T0, ttl_ms=60_000, nonce=b"N" * 16, seq=1)
    import base64

    wire = base64.urlsafe_b64decode(token[5:] + "=" * (-len(token[5:]) % 4))
    body = {**admit(E, ["reviewer"], b"N" * 16), "invitation": wire, "invited_by": F.public_key}
    # relayed by D (executor: no member.invite) before expiry: admitted
    ok = certified(st, [request(D, "admit", body, T0 + 1_000)])
    assert ok.kind == "admit"
    # after expiry (by the request's timestamp), or with more roles than granted: refused
    late = certified(st, [request(D, "admit", body, T0 + 120_000)])
    assert late.payload["error"] == "the invitation had expired when the admission was proposed"
    greedy = certified(st, [request(D, "admit", {**body, "roles": ["admin"]}, T0 + 2_000)])
    assert "differ" in greedy.payload["error"]
    # a non-member may propose only its own admission
    other = certified(st, [request(E, "admit", {**body, "public_key": A.public_key}, T0 + 3)])
    assert other.kind == NOOP
    own = certified(st, [request(E, "admit", body, T0 + 4)])
    assert own.kind == "admit"
    st.apply(own)
    assert st.roles_of(E.public_key) == {"reviewer"}
    # single use
    again = certified(st, [request(D, "admit", {**body, "public_key": b"\x07" * 32}, T0 + 5)])
    assert again.payload["error"] == "invite already used"


def test_extension_kinds_are_pluggable() -> None:
    assigned: dict[str, bytes] = {}

    def check(state: ConsensusMembership, p: dict[str, Any]) -> str | None:
        if not isinstance(p.get("task"), str):
            return "payload.task must be a string"
        return "task already assigned" if p["task"] in assigned else None

    def apply(state: ConsensusMembership, e: Entry) -> None:
        assigned[e.payload["task"]] = e.payload["assignee"]

    ext = {"task.assign": Extension("task.create", check, apply, actor="by")}
    st = ConsensusMembership(GENESIS, extensions=ext)
    body = {"task": "t1", "assignee": F.public_key, "by": F.public_key}
    st.apply(certified(st, [request(F, "task.assign", body, 1)], [F]))
    assert assigned == {"t1": F.public_key}
    e = certified(st, [request(F, "task.assign", body, 2)], [F])
    assert e.payload["error"] == "task already assigned"
    e = certified(
        st, [request(F, "task.assign", {**body, "task": "t2", "by": A.public_key}, 3)], [F]
    )
    assert e.payload["error"] == "payload.by must be the proposer's own key"


def test_exclusive_assignment_first_decision_wins() -> None:
    assignments: dict[str, Assignment] = {}
    st = ConsensusMembership(GENESIS, extensions={TASK_ASSIGN: exclusive_assignment(assignments)})
    st.apply(certified(st, [request(F, "admit", admit(A, ["executor"], b"a"), 1)], [F]))
    mine = {"task": "t1", "node": A.peer_id, "at": 1_000}
    first = certified(st, [request(A, TASK_ASSIGN, mine, 1)], [F])
    st.apply(first)
    second = certified(
        st, [request(F, TASK_ASSIGN, {"task": "t1", "node": F.peer_id, "at": 900}, 2)], [F]
    )
    assert second.payload["error"] == "task t1 is already assigned"
    st.apply(second)
    bad = certified(st, [request(D, TASK_ASSIGN, {"task": "t2", "node": D.peer_id, "at": 0}, 3)])
    assert bad.payload["error"] == "the proposer is not a member"
    assert assignments == {"t1": Assignment(A.peer_id, 1_000)}
    # the assignee may move its own deadline later (its first proposal decided late, a newer
    # one queued behind it), never earlier; nobody else may touch it
    for body, t, ok in (({**mine, "at": 1_000}, 2, False), ({**mine, "at": 5_000}, 3, True)):
        e = certified(st, [request(A, TASK_ASSIGN, body, t)], [F])
        assert (e.kind == TASK_ASSIGN) is ok, e.payload
        st.apply(e)
    assert assignments == {"t1": Assignment(A.peer_id, 5_000)}
    # replaying elsewhere rebuilds the same map from the log
    again: dict[str, Assignment] = {}
    ConsensusMembership(GENESIS, extensions={TASK_ASSIGN: exclusive_assignment(again)}).replay(
        st.entries
    )
    assert again == assignments


AT_ERROR = "payload.at must be a time in ms (an integer >= 0)"
BAD_TIMES = (-1, 1.5, True, "5", None, 2**64)


def test_exclusive_assignment_is_a_self_proposal_with_a_time() -> None:
    """A node assigns only itself, stating when it proposed (its claim deadline follows from
    that): naming another member, or a missing, negative or non-integer time, is invalid."""
    assignments: dict[str, Assignment] = {}
    st = ConsensusMembership(GENESIS, extensions={TASK_ASSIGN: exclusive_assignment(assignments)})
    st.apply(certified(st, [request(F, "admit", admit(A, ["executor"], b"a"), 1)], [F]))
    other, bad_at = "payload.node must name the proposer itself", AT_ERROR
    cases: list[tuple[dict[str, Any], str]] = [
        ({"task": "t1", "node": A.peer_id, "at": 5}, other),  # F names A
        ({"task": "t1", "at": 5}, other),
        *(({"task": "t1", "node": F.peer_id, "at": at}, bad_at) for at in BAD_TIMES),
        (
            {"task": "t1", "node": F.peer_id, "at": 5, "x": 1},
            "payload fields are task, node and at",
        ),
    ]
    for t, (body, error) in enumerate(cases, start=10):
        e = certified(st, [request(F, TASK_ASSIGN, body, t)], [F])
        assert (e.kind, e.payload["error"]) == (NOOP, error), body
        st.apply(e)
    assert assignments == {}
    # A proposes itself: A's assignment, at A's time
    ok = certified(st, [request(A, TASK_ASSIGN, {"task": "t1", "node": A.peer_id, "at": 0}, 1)])
    assert ok.kind == TASK_ASSIGN
    st.apply(ok)
    assert assignments == {"t1": Assignment(A.peer_id, 0)}
    # a decision from before deadlines existed has no time: it sets no deadline (old logs load)
    old = certified(st, [request(F, TASK_ASSIGN, {"task": "t0", "node": F.peer_id}, 90)], [F])
    assert old.kind == TASK_ASSIGN
    st.apply(old)
    assert assignments["t0"] == Assignment(F.peer_id, None)


def test_operation_codec() -> None:
    op = encode_op("grant", {"public_key": b"k", "role": "x"})
    assert decode_op(op) == ("grant", {"public_key": b"k", "role": "x"})
    for bad in (b"", b"\xa1akx", encode_op("", {}), b"\xa2dkindagpayload\xc1\x00"):
        assert decode_op(bad) is None
    with pytest.raises(ValueError):
        ConsensusCore(F, fresh(), PbftConfig(swarm_id=SWARM))
    assert (pbft_config(SWARM).checkpoint_interval, pbft_config(SWARM).window) == (4, 8)


# --------------------------------------------------------------------------- votes


def voters() -> ConsensusMembership:
    st = four()
    for t, (who, role) in enumerate(((D, "executor"), (E, "reviewer")), start=20):
        st.apply(certified(st, [request(F, "admit", admit(who, [role], b"e%d" % t), t)]))
    return st


def decide(
    st: ConsensusMembership, who: Identity, kind: str, payload: dict[str, Any], t: int
) -> Entry:
    e = certified(st, [request(who, kind, payload, t)])
    st.apply(e)
    return e


def test_majority_vote_passes_once_certain_and_is_final() -> None:
    st = voters()
    # electorate: members holding decision.vote: F (admin), D (executor), E (reviewer)
    opened = decide(st, F, VOTE_OPEN, open_payload(F.public_key, "ship it?"), 30)
    vid = opened.seq
    assert set(st.polls[vid].weights) == {F.public_key, D.public_key, E.public_key}
    assert decide(st, D, VOTE_CAST, cast_payload(D.public_key, vid, "yes"), 1).kind == VOTE_CAST
    again = decide(st, D, VOTE_CAST, cast_payload(D.public_key, vid, "no"), 2)
    assert again.payload["error"] == "the voter has already voted"
    outsider = decide(st, A, VOTE_CAST, cast_payload(A.public_key, vid, "yes"), 3)
    assert outsider.kind == NOOP  # validators hold no decision.vote
    # not certain yet (1 of 3): only the proposer may close early, and then it is rejected
    early = outcome_payload(st, vid, E.public_key)
    assert decide(st, E, VOTE_OUTCOME, early, 4).payload["error"].startswith("only the proposer")
    decide(st, E, VOTE_CAST, cast_payload(E.public_key, vid, "yes"), 5)
    assert tally(st.polls[vid]).decisive == "passed"
    out = outcome_payload(st, vid, E.public_key)
    wrong = {**out, "yes": 3}
    assert (
        decide(st, E, VOTE_OUTCOME, wrong, 6).payload["error"]
        == "payload tally differs from the votes cast"
    )
    assert decide(st, E, VOTE_OUTCOME, out, 7).kind == VOTE_OUTCOME
    assert st.polls[vid].result == "passed"
    late = decide(st, F, VOTE_CAST, cast_payload(F.public_key, vid, "no"), 31)
    assert late.payload["error"] == f"vote {vid} is closed"
    # the whole history replays identically elsewhere
    other = fresh()
    other.replay(st.entries)
    assert other.polls == st.polls


def test_reputation_weighted_vote_uses_the_weights_fixed_in_the_proposal() -> None:
    st = voters()
    weights = {F.peer_id: 100, D.peer_id: 600}  # E unlisted: neutral 500
    opened = decide(
        st, F, VOTE_OPEN, open_payload(F.public_key, "w", rule="reputation", weights=weights), 30
    )
    vid = opened.seq
    assert st.polls[vid].weights == {F.public_key: 100, D.public_key: 600, E.public_key: 500}
    decide(st, D, VOTE_CAST, cast_payload(D.public_key, vid, "yes"), 1)
    assert tally(st.polls[vid]).decisive is None  # 600 of 1200 is not a majority
    decide(st, F, VOTE_CAST, cast_payload(F.public_key, vid, "no"), 31)
    assert tally(st.polls[vid]) == Tally(600, 100, 1200) and tally(st.polls[vid]).decisive is None
    decide(st, E, VOTE_CAST, cast_payload(E.public_key, vid, "yes"), 2)
    assert tally(st.polls[vid]).decisive == "passed"
    # the proposer may also close early: the result is what the tally says
    opened = decide(st, F, VOTE_OPEN, open_payload(F.public_key, "again"), 32)
    decide(st, F, VOTE_CAST, cast_payload(F.public_key, opened.seq, "yes"), 33)
    closed = decide(st, F, VOTE_OUTCOME, outcome_payload(st, opened.seq, F.public_key), 34)
    assert closed.payload["result"] == "rejected"  # 1 of 3 is no majority of the electorate
    bad = open_payload(F.public_key, "x", rule="majority", weights={F.peer_id: 1})
    assert decide(st, F, VOTE_OPEN, bad, 35).kind == NOOP


# --------------------------------------------------------------------------- replicas


def test_single_validator_decides_alone() -> None:
    sim = ConsensusSim(0)
    f = sim.nodes[F.peer_id]
    t = sim.propose(f, "admit", admit(A, ["executor"], b"a"))
    # n = 1, f = 0: the founder's own commit is the quorum; decided within the call itself
    assert f.completed == {t: 1} and [e.kind for e in f.log] == ["admit"]
    assert len(f.log[0].certificate) == 2
    t = sim.propose(f, "admit", admit(A, ["executor"], b"b"))
    assert f.log[-1].payload["error"] == "already a member" and f.completed[t] == 2
    sim.check_logs()


def grow(sim: ConsensusSim) -> list[Any]:
    f = sim.nodes[F.peer_id]
    nodes = [f]
    for k, who in enumerate((A, B, C), start=1):
        t = sim.propose(f, "admit", admit(who, ["validator"], b"v%d" % k))
        assert sim.run(30_000, lambda t=t: sim.decided(f, t))
        node = sim.add(who)
        nodes.append(node)
        # the primary's null batches bring the k + 1 validators in at the next boundary
        assert sim.run(
            30_000,
            lambda k=k: all(
                n.core.replica is not None and len(n.core.replica.validators) == k + 1
                for n in nodes
            ),
        )
    return nodes


def real(log: list[Entry]) -> list[Entry]:
    """The entries that are not null batches."""
    return [e for e in log if e.payload.get("reason") != "null"]


def signer(raw: bytes) -> bytes:
    return bytes(cbor2.loads(raw[64:])[3])


@pytest.mark.parametrize("seed", range(16))
def test_four_validators_grown_from_the_founder_survive_a_crash(seed: int) -> None:
    """Seeded: lossy, duplicating, reordering network; a backup or the primary crashes while
    the others decide (an invalid op and an admission); it restarts from its records and
    stored log, catches up, and is then needed for the next quorum."""
    rng = random.Random(seed)
    sim = ConsensusSim(
        seed,
        drop=rng.choice([0.0, 0.05, 0.2]),
        dup=rng.choice([0.0, 0.1]),
        max_delay=rng.choice([5, 40, 150]),
    )
    f, a, b, c = grow(sim)
    primary = f.core.replica.primary
    backups = [n for n in (a, b, c) if n.identity.public_key != primary]
    down = next((n for n in (a, b, c) if n.identity.public_key == primary), backups[0])
    if seed % 2:
        down = rng.choice(backups)
    sim.crash(down)
    t1 = sim.propose(f, "grant", {"public_key": D.public_key, "role": "planner"})
    t2 = sim.propose(f, "admit", admit(D, ["executor"], b"d"))
    assert sim.run(60_000, lambda: sim.decided(f, t1) and sim.decided(f, t2))
    assert [e.kind for e in real(f.log)[3:]] == [NOOP, "admit"]
    assert real(f.log)[3].payload["error"] == "not a member"
    sim.restart(down)
    top = len(f.log)
    assert sim.run(
        60_000,
        lambda: (
            down.state.height >= top
            and down.core.replica.last_executed >= f.core.replica.last_executed
        ),
    )
    other = next(n for n in (a, b, c) if n is not down)
    sim.crash(other)
    t = sim.propose(f, "grant", {"public_key": D.public_key, "role": "reviewer"})
    assert sim.run(60_000, lambda: sim.decided(f, t))
    entry = f.log[-1]
    assert entry.kind == "grant"
    assert down.identity.public_key in {signer(raw) for raw in entry.certificate[1:]}
    sim.check_logs()


def test_non_validators_follow_by_state_transfer_and_can_propose() -> None:
    sim = ConsensusSim(7)
    f = sim.nodes[F.peer_id]
    t = sim.propose(f, "admit", admit(D, ["admin"], b"d"))
    d = sim.add(D)
    assert sim.run(10_000, lambda: d.state.height >= 1)
    assert d.core.replica is None and not d.core.is_validator
    t = sim.propose(d, "pause", {})
    assert sim.run(10_000, lambda: sim.decided(d, t))
    assert d.log[-1].kind == "pause" and d.state.origin[2] == (D.public_key, t)
    sim.check_logs()


# --------------------------------------------------------------------------- batches


def decided_batch(st: ConsensusMembership, batch: list[bytes], **kwargs: Any) -> list[Entry]:
    out = []
    for e in batch_entries(st, batch, **kwargs):
        st.apply(e)
        out.append(e)
    return out


def test_a_reconfiguration_inside_a_batch_takes_over_after_the_watermark() -> None:
    st = four()  # F, A, B, C: quorum 3
    old = quorum_of(st)
    grant = request(F, "admit", admit(D, ["validator"], b"d"), 40)
    after = request(F, "pause", {}, 41)  # decided after the change, in the same batch
    entries = decided_batch(st, [grant, after], signers=old)
    assert [e.kind for e in entries] == ["admit", "pause"]
    assert len(st.validators()) == 5 and st.validators_at(entries[1].seq) == st.validators_at(13)
    # decided in batch 13: the old set certifies up to batch 20, the five from batch 21
    assert st.schedule[-1][0] == 21 and len(st.validators_at(st.height + 1)) == 4
    settle(st)
    assert st.next_batch == 21
    # that batch needs a quorum of the five (4 of 5): the old quorum of 3 is refused
    nxt = [request(F, "resume", {}, 42)]
    assert "too_few_signatures" in refused(st, certified(st, nxt, old))
    assert "not_validator" not in refused(st, certified(st, nxt, [F, A, B]))
    st.apply(certified(st, nxt, [F, A, B, D]))
    assert not st.paused
    # replayed from genesis by anyone, with the same sets
    again = fresh()
    again.replay(st.entries)
    assert again.validators() == st.validators() and again.position == st.position


def test_an_entry_in_a_batch_verifies_alone_and_tampered_proofs_are_refused() -> None:
    st = four()
    batch = [request(F, "grant", _grant(i), 50 + i) for i in range(4)]
    root, proofs = proofs_for(st.pbft_height + 1, batch)
    cs = [commit(s, 0, st.pbft_height + 1, root) for s in quorum_of(st)]
    raws = [p.encode() for p in proofs]
    # a non-validator that holds the log up to entry 1 of the batch checks entry 2 alone
    st.apply(Entry(st.height + 1, "grant", _grant(0), [raws[0], *cs]))
    st.apply(Entry(st.height + 1, "grant", _grant(1), [raws[1], *cs]))
    base = st.height

    def bad(proof: bytes, kind: str = "grant", payload: dict[str, Any] | None = None) -> str:
        return refused(st, Entry(base + 1, kind, payload or _grant(2), [proof, *cs]))

    good = Entry(base + 1, "grant", _grant(2), [raws[2], *cs])
    assert verify_consensus_certificate(st, good) is None
    p = proofs[2]
    # inside a batch, the proof must give the digest the batch's entry 0 gave
    assert "another batch" in bad(_flip(p, 0))
    assert "does not fit" in bad(EntryProof(p.n, p.index, p.count, p.request, p.path[1:]).encode())
    assert "another batch" in bad(EntryProof(p.n, 2, 4, batch[3], p.path).encode())
    assert "fit" in bad(EntryProof(p.n, 2, 5, p.request, p.path).encode())  # a 5-leaf tree
    # skipping an entry of the batch, restarting it, or jumping to the next batch
    assert "does not continue" in bad(raws[3], payload=_grant(3))
    assert "does not continue" in bad(raws[1], payload=_grant(1))
    nxt = proofs_for(p.n + 1, [])[1][0].encode()
    assert "does not continue" in bad(nxt, NOOP, {"reason": "null"})
    assert "malformed" in bad(b"\xa0")
    st.apply(good)
    st.apply(Entry(st.height + 1, "grant", _grant(3), [raws[3], *cs]))
    assert st.position.closes_batch and st.roles_of(A.public_key) >= {"planner", "executor"}
    # entry 0 of the next batch: a tampered path no longer gives the digest the commits sign
    pair = [request(F, "pause", {}, 60), request(F, "resume", {}, 61)]
    first = next(batch_entries(st, pair))
    tampered = Entry(
        first.seq,
        first.kind,
        first.payload,
        [_flip(EntryProof.parse(first.certificate[0]), 0), *first.certificate[1:]],
    )
    assert "digest_mismatch" in refused(st, tampered)
    st.apply(first)


def _flip(p: EntryProof | None, k: int) -> bytes:
    assert p is not None
    h = bytearray(p.path[k])
    h[0] ^= 1
    path = (*p.path[:k], bytes(h), *p.path[k + 1 :])
    return EntryProof(p.n, p.index, p.count, p.request, path).encode()


def _grant(i: int) -> dict[str, Any]:
    role = ["planner", "reviewer", "executor", "planner"][i]
    return {"public_key": A.public_key, "role": role}


def test_schedules_are_decided_once_by_task_creators_and_removed_by_cancellers() -> None:
    schedules: dict[str, Schedule] = {}
    st = ConsensusMembership(GENESIS, extensions=schedule_kinds(schedules))
    st.apply(certified(st, [request(F, "admit", admit(A, ["executor"], b"a"), 1)], [F]))
    st.apply(certified(st, [request(F, "admit", admit(B, ["planner"], b"b"), 2)], [F]))
    nightly = Schedule("nightly", 60_000, "report", capabilities=("py",))
    add = schedule_payload(nightly)
    refused = certified(st, [request(A, SCHEDULE_ADD, add, 1)], [F])
    assert refused.payload["error"] == "the proposer does not hold task.create"
    st.apply(refused)
    st.apply(certified(st, [request(B, SCHEDULE_ADD, add, 1)], [F]))
    assert schedules == {"nightly": nightly}
    again = certified(st, [request(F, SCHEDULE_ADD, {**add, "interval_ms": 1_000}, 3)], [F])
    assert again.payload["error"] == "schedule nightly exists (ids are never reused)"
    st.apply(again)
    bad = certified(st, [request(F, SCHEDULE_ADD, {**add, "id": "x", "interval_ms": 5}, 4)], [F])
    assert bad.payload["error"].startswith("payload.interval_ms must be an integer")
    st.apply(bad)
    # an executor holds neither task.create nor task.cancel
    no = certified(st, [request(A, SCHEDULE_REMOVE, {"id": "nightly"}, 2)], [F])
    assert no.payload["error"] == "the proposer does not hold task.cancel"
    st.apply(no)
    st.apply(certified(st, [request(B, SCHEDULE_REMOVE, {"id": "nightly"}, 2)], [F]))
    assert schedules["nightly"].removed
    twice = certified(st, [request(B, SCHEDULE_REMOVE, {"id": "nightly"}, 3)], [F])
    assert twice.payload["error"] == "schedule nightly is already removed"
    st.apply(twice)
    unknown = certified(st, [request(B, SCHEDULE_REMOVE, {"id": "weekly"}, 4)], [F])
    assert unknown.payload["error"] == "payload.id must name a schedule"
    # replaying the log elsewhere rebuilds the same schedules
    again_map: dict[str, Schedule] = {}
    ConsensusMembership(GENESIS, extensions=schedule_kinds(again_map)).replay(st.entries)
    assert again_map == schedules
