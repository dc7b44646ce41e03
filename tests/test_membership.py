"""The decided log and invites, as pure functions: no daemon, fixed clock."""

from __future__ import annotations

import pytest

from mossnode.crypto.identity import Identity
from mossnode.protocols.membership import (
    Entry,
    Membership,
    MembershipError,
    check_invite,
    founder_certificate,
    make_genesis,
    make_invite,
    parse_genesis,
)

NOW = 1_800_000_000_000
FOUNDER = Identity(b"\x01" * 32)
ALICE = Identity(b"\x02" * 32)
MALLORY = Identity(b"\x03" * 32)


def swarm() -> Membership:
    return Membership(make_genesis(FOUNDER, "test", NOW))


def decide(state: Membership, kind: str, payload: dict, who: Identity = FOUNDER) -> Entry:
    seq = state.height + 1
    cert = founder_certificate(state.genesis, who, seq, kind, payload, NOW)
    return Entry(seq, kind, payload, cert)


def admit(state: Membership, who: Identity, roles: list[str], nonce: bytes = b"n1") -> Entry:
    return decide(state, "admit", {"public_key": who.public_key, "roles": roles, "invite": nonce})


def test_genesis_roundtrip_and_swarm_id() -> None:
    g = make_genesis(FOUNDER, "test", NOW)
    assert parse_genesis(g.raw) == g
    assert len(g.swarm_id) == 32
    assert make_genesis(FOUNDER, "other", NOW).swarm_id != g.swarm_id
    tampered = bytearray(g.raw)
    tampered[-3] ^= 1
    with pytest.raises(MembershipError):
        parse_genesis(bytes(tampered))


def test_founder_is_admin_validator() -> None:
    s = swarm()
    assert s.roles_of(FOUNDER.public_key) == {"admin", "validator"}
    assert s.validators() == [FOUNDER.public_key]
    assert s.may(FOUNDER.public_key, "member.invite")


def test_admit_grant_revoke_remove_replay() -> None:
    s = swarm()
    entries = []
    for kind, payload in [
        ("admit", {"public_key": ALICE.public_key, "roles": ["executor"], "invite": b"n"}),
        ("grant", {"public_key": ALICE.public_key, "role": "reviewer"}),
        ("revoke", {"public_key": ALICE.public_key, "role": "executor"}),
        ("pause", {}),
    ]:
        e = decide(s, kind, payload)
        s.apply(e)
        entries.append(e)
    assert s.roles_of(ALICE.public_key) == {"reviewer"}
    assert s.paused
    copy = Membership(parse_genesis(s.genesis.raw))
    copy.replay(Entry.from_wire(e.to_wire()) for e in entries)
    assert copy.members.keys() == s.members.keys() and copy.paused
    e = decide(s, "remove", {"public_key": ALICE.public_key})
    s.apply(e)
    assert not s.is_member(ALICE.public_key)


def test_roles_history_is_copied_only_when_roles_change() -> None:
    """Pause and resume (like any entry that moves no roles) share the previous roles
    snapshot: no copy of every member's roles per decision, and memos keyed by it hold."""
    s = swarm()
    s.apply(admit(s, ALICE, ["executor"]))
    for kind in ("pause", "resume", "pause"):
        s.apply(decide(s, kind, {}))
        assert s.history[-1] is s.history[-2]
    s.apply(decide(s, "grant", {"public_key": ALICE.public_key, "role": "reviewer"}))
    assert s.history[-1] is not s.history[-2]
    assert s.history[-1][ALICE.public_key] == {"executor", "reviewer"}
    assert s.history[-2][ALICE.public_key] == {"executor"}


def test_entry_refused_changes_nothing() -> None:
    s = swarm()
    bad = [
        decide(s, "admit", {"public_key": ALICE.public_key, "roles": ["king"], "invite": b"n"}),
        decide(s, "grant", {"public_key": ALICE.public_key, "role": "reviewer"}),  # not a member
        decide(s, "coronate", {}),
    ]
    # signed by someone else than the founder
    e = admit(s, ALICE, ["executor"])
    forged_cert = founder_certificate(s.genesis, FOUNDER, 1, "admit", {"x": 1}, NOW)
    bad.append(Entry(1, "admit", e.payload, forged_cert))  # cert for another payload
    bad.append(Entry(2, "admit", e.payload, e.certificate))  # wrong seq
    for entry in bad:
        with pytest.raises(MembershipError):
            s.apply(entry)
        assert s.height == 0 and list(s.members) == [FOUNDER.public_key]
    with pytest.raises(MembershipError, match="founder"):
        decide(s, "pause", {}, who=MALLORY)


def test_invites() -> None:
    s = swarm()
    tok = make_invite(
        FOUNDER, s.swarm_id, ["executor"], now_ms=NOW, ttl_ms=60_000, nonce=b"n1", seq=1
    )
    inv = check_invite(tok, s, NOW + 1000)
    assert inv.roles == ["executor"] and inv.nonce == b"n1"
    with pytest.raises(MembershipError, match="expired"):
        check_invite(tok, s, NOW + 61_000)
    s.apply(admit(s, ALICE, inv.roles, inv.nonce))
    with pytest.raises(MembershipError, match="already been used"):
        check_invite(tok, s, NOW + 1000)
    # a member without member.invite cannot issue one
    tok2 = make_invite(ALICE, s.swarm_id, ["admin"], now_ms=NOW, ttl_ms=60_000, nonce=b"n2", seq=1)
    with pytest.raises(MembershipError, match="not issued by an admin"):
        check_invite(tok2, s, NOW)
    other = Membership(make_genesis(MALLORY, "evil", NOW))
    tok3 = make_invite(
        MALLORY, other.swarm_id, ["admin"], now_ms=NOW, ttl_ms=60_000, nonce=b"n3", seq=1
    )
    with pytest.raises(MembershipError, match="another swarm"):
        check_invite(tok3, s, NOW)
    for junk in ["", "moss1", "moss1!!!!", "moss1" + "A" * 200, tok[:-10]]:
        with pytest.raises(MembershipError):
            check_invite(junk, s, NOW)
    with pytest.raises(MembershipError, match="unknown role"):
        make_invite(FOUNDER, s.swarm_id, ["king"], now_ms=NOW, ttl_ms=1, nonce=b"x", seq=2)


def test_policy_judges_by_cited_seq_and_cutoffs() -> None:
    from mossnode.protocols.membership import MembershipPolicy

    s = swarm()
    pol = MembershipPolicy(s)
    alice = ALICE.peer_id
    assert not pol.is_member(alice, 0)
    s.apply(admit(s, ALICE, ["planner"]))
    assert pol.latest_seq() == 1
    assert pol.is_member(alice, 1) and pol.may(alice, "task.create", 1)
    assert not pol.may(alice, "task.create", 0)  # cited before admission
    assert not pol.may(alice, "task.claim", 1)
    s.apply(decide(s, "revoke", {"public_key": ALICE.public_key, "role": "planner", "cutoff": 7}))
    assert not pol.may(alice, "task.create", 2)
    assert pol.may(alice, "task.create", 1)  # still judged by the policy it cites...
    assert pol.floor(alice, 7) == 0
    assert pol.floor(alice, 8) == 2  # ...but updates past the cut-off must cite the revocation
    assert not pol.is_member("not-a-peer-id", 1)
    assert not pol.is_member(alice, 99)
