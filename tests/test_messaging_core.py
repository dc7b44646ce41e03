"""The sans-IO messaging core: validation, wire decoding, RBAC decisions, dedup, inboxes."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mossnode.crypto.identity import Identity
from mossnode.protocols import messages as M

A = Identity.generate().peer_id
B = Identity.generate().peer_id


def msg(**kw: Any) -> M.Message:
    base: dict[str, Any] = {
        "suffix": "00ff00ff00ff00ff",
        "mode": M.DIRECT,
        "origin": A,
        "sender": "alice",
        "roles": ["executor"],
        "body": {"q": 1},
        "sent_at": 1000,
        "to": "bob",
        "node": B,
        "timeout_ms": 5000,
    }
    base.update(kw)
    out = M.new_message(**base)
    assert isinstance(out, M.Message), out
    return out


def refused(**kw: Any) -> str:
    base: dict[str, Any] = {
        "suffix": "00ff00ff00ff00ff",
        "mode": M.DIRECT,
        "origin": A,
        "sender": "alice",
        "roles": ["executor"],
        "body": 1,
        "sent_at": 1000,
        "to": "bob",
        "node": B,
        "timeout_ms": 5000,
    }
    base.update(kw)
    out = M.new_message(**base)
    assert isinstance(out, M.Refusal), out
    return out.code


def test_each_mode_round_trips_on_the_wire() -> None:
    for m in (
        msg(),
        msg(mode=M.TOPIC, to="", node="", timeout_ms=0, topic="ci.builds"),
        msg(mode=M.BROADCAST, to="", node="", timeout_ms=0, role="reviewer"),
        msg(mode=M.REPLY, timeout_ms=0, reply_to=f"{B}:abcdef0123456789"),
    ):
        back = M.from_wire(m.wire(), A, 1000)
        assert back == m
        assert m.id.startswith(A + ":")
    view = msg().view()
    assert view["from"] == f"alice@{A}" and view["to"] == f"bob@{B}"
    assert view["reply_expected"] is True and "origin" not in view


def test_shape_is_checked() -> None:
    assert refused(mode="shout") == "malformed"
    assert refused(sender="Alice!") == "bad_agent"
    assert refused(to="") == "malformed"  # a direct request names its recipient
    assert refused(topic="x") == "malformed"  # ... and nothing else
    assert refused(node="not-a-peer-id") == "bad_node"
    assert refused(timeout_ms=0) == "bad_timeout"
    assert refused(timeout_ms=M.MAX_TIMEOUT_MS + 1) == "bad_timeout"
    assert refused(mode=M.TOPIC, to="", node="", timeout_ms=0, topic="a b") == "bad_topic"
    assert refused(mode=M.BROADCAST, to="", node="", timeout_ms=0, role="Admin") == "bad_role"
    assert refused(mode=M.TOPIC, to="", node="", topic="t") == "malformed"  # timeout on a topic
    assert refused(roles=["x"] * 2 + [f"r{i}" for i in range(40)]) == "malformed"
    assert refused(suffix="nothex") == "malformed"


def test_body_is_json_and_bounded() -> None:
    assert M.body_refusal({"a": [1, 2.5, None, True, "x"]}) is None
    assert M.body_refusal(b"raw") is not None
    assert M.body_refusal(float("nan")) is not None
    assert M.body_refusal({1: "int key"}) is not None
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    assert M.body_refusal(deep) is not None
    big = M.body_refusal("x" * M.MAX_BODY_BYTES)
    assert big is not None and big.code == "too_large" and big.status == 413
    assert M.body_refusal("x" * (M.MAX_BODY_BYTES - 2)) is None


def test_hostile_wire_bodies_are_refused() -> None:
    good = msg().wire()
    cases: list[Any] = [
        None,
        [1, 2],
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "from"},
        {**good, "roles": "executor"},
        {**good, "roles": [1]},
        {**good, "roles": ["executor", "executor"]},
        {**good, "timeout_ms": "5"},
        {**good, "timeout_ms": True},
        {**good, "to": 7},
        {**good, "body": b"bytes"},
    ]
    for body in cases:
        assert isinstance(M.from_wire(body, A, 0), M.Refusal), body
    # the id binds the message to its signer: another node cannot pass it as its own
    r = M.from_wire(good, B, 0)
    assert isinstance(r, M.Refusal) and r.code == "malformed"


@given(
    st.recursive(
        st.none() | st.integers() | st.text() | st.binary(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_from_wire_never_raises(body: Any) -> None:
    assert isinstance(M.from_wire(body, A, 0), (M.Message, M.Refusal))


def test_parse_address() -> None:
    assert M.parse_address(f"bob@{B}") == ("bob", B)
    assert M.parse_address("bob") == ("bob", None)
    assert M.parse_address("bob", B) == ("bob", B)
    assert M.parse_address(f"bob@{B}", B) == ("bob", B)
    bad = [M.parse_address(f"bob@{B}", A), M.parse_address("bob@nope"), M.parse_address("B@x")]
    assert all(isinstance(r, M.Refusal) for r in bad)


def test_sender_is_judged_by_the_receiver_own_knowledge() -> None:
    m = msg(roles=["executor"])
    ok = M.sender_refusal(m, origin_roles={"executor"}, advertised=frozenset({"executor"}))
    assert ok is None
    cases = {
        "not_member": M.sender_refusal(m, origin_roles=None, advertised=frozenset({"executor"})),
        "unknown_sender": M.sender_refusal(m, origin_roles={"executor"}, advertised=None),
        # claims a role its node does not advertise for it
        "roles_mismatch": M.sender_refusal(
            m, origin_roles={"executor"}, advertised=frozenset({"planner"})
        ),
        # the role is advertised, but the node itself does not hold it
        "forbidden": M.sender_refusal(
            m, origin_roles={"planner"}, advertised=frozenset({"executor"})
        ),
    }
    for code, r in cases.items():
        assert r is not None and r.code == code and r.status == 403, (code, r)
    # each mode needs its own permission: an executor may publish but not broadcast
    topic = msg(mode=M.TOPIC, to="", node="", timeout_ms=0, topic="t")
    cast = msg(mode=M.BROADCAST, to="", node="", timeout_ms=0, role="admin")
    held = {"executor"}
    adv = frozenset({"executor"})
    assert M.sender_refusal(topic, origin_roles=held, advertised=adv) is None
    r = M.sender_refusal(cast, origin_roles=held, advertised=adv)
    assert r is not None and "messages.broadcast" in r.message
    planner = msg(mode=M.BROADCAST, to="", node="", timeout_ms=0, role="admin", roles=["planner"])
    assert (
        M.sender_refusal(planner, origin_roles={"planner"}, advertised=frozenset({"planner"}))
        is None
    )
    # the validator role alone grants no messaging
    v = msg(roles=["validator"])
    assert M.sender_refusal(v, origin_roles={"validator"}, advertised=frozenset({"validator"}))


def test_recipient_checks() -> None:
    m = msg()
    local = {"bob": frozenset({"executor"}), "mute": frozenset({"reviewer"})}
    assert M.recipient_refusal(m, here=B, local=local, node_roles={"executor"}) is None
    codes = {
        M.recipient_refusal(m, here=A, local=local, node_roles={"executor"}).code,  # type: ignore[union-attr]
        M.recipient_refusal(msg(to="eve"), here=B, local=local, node_roles={"executor"}).code,  # type: ignore[union-attr]
        M.recipient_refusal(msg(to="mute"), here=B, local=local, node_roles={"executor"}).code,  # type: ignore[union-attr]
    }
    assert codes == {"wrong_node", "unknown_agent", "recipient_forbidden"}


def test_reply_must_answer_its_request() -> None:
    req = msg()
    rid = req.id
    good = msg(origin=B, sender="bob", to="alice", node=A, mode=M.REPLY, timeout_ms=0, reply_to=rid)
    assert M.reply_refusal(req, good) is None
    for bad in (
        msg(origin=B, sender="eve", to="alice", node=A, mode=M.REPLY, timeout_ms=0, reply_to=rid),
        msg(origin=B, sender="bob", to="carol", node=A, mode=M.REPLY, timeout_ms=0, reply_to=rid),
        msg(
            origin=B,
            sender="bob",
            to="alice",
            node=A,
            mode=M.REPLY,
            timeout_ms=0,
            reply_to=f"{A}:0123456789abcdef",
        ),
    ):
        assert M.reply_refusal(req, bad) is not None


def test_recipients_of_topics_and_broadcasts() -> None:
    local = {
        "alice": frozenset({"admin"}),
        "bob": frozenset({"executor"}),
        "carol": frozenset({"planner"}),
        "mute": frozenset({"reviewer"}),
    }
    node_roles = {"admin", "executor", "planner"}
    subs = {"alice": {"t"}, "bob": {"t", "u"}, "mute": {"t"}}
    topic = msg(mode=M.TOPIC, to="", node="", timeout_ms=0, topic="t", sender="alice")
    # from elsewhere: every subscriber that may receive (mute's node lacks reviewer)
    assert M.recipients(topic, here=B, local=local, node_roles=node_roles, subscribers=subs) == [
        "alice",
        "bob",
    ]
    # at the origin the sender itself is left out
    assert M.recipients(topic, here=A, local=local, node_roles=node_roles, subscribers=subs) == [
        "bob"
    ]
    cast = msg(mode=M.BROADCAST, to="", node="", timeout_ms=0, role="planner")
    assert M.recipients(cast, here=B, local=local, node_roles=node_roles, subscribers={}) == [
        "carol"
    ]
    # a role the node does not hold is not held by its agents either
    assert M.recipients(cast, here=B, local=local, node_roles={"admin"}, subscribers={}) == []
    assert M.recipients(msg(), here=B, local=local, node_roles=node_roles, subscribers=subs) == []


def test_advertised_roles_from_hostile_presence() -> None:
    good = {"agents": [{"name": "bob", "roles": ["executor", 3]}]}
    assert M.advertised_roles(good, "bob") == frozenset({"executor"})
    assert M.advertised_roles(good, "eve") is None
    for bad in (None, {}, {"agents": "bob"}, {"agents": [1, {"name": "bob", "roles": "x"}]}):
        assert M.advertised_roles(bad, "bob") is None


def test_dedup_is_bounded() -> None:
    d = M.Dedup(capacity=3)
    assert d.first("a") and not d.first("a")
    for k in "bcd":
        assert d.first(k)
    assert "a" not in d and "d" in d
    assert d.first("a")


def test_inbox_bounded_and_read_with_a_cursor() -> None:
    box = M.Inbox(capacity=3)
    for i in range(5):
        box.push(msg(suffix=f"{i:016x}"), 2000 + i)
    assert box.dropped == 2
    seqs = [d.seq for d in box.read(0, 10)]
    assert seqs == [3, 4, 5]
    assert [d.seq for d in box.read(0, 2)] == [3, 4]  # unacknowledged: read again
    assert [d.seq for d in box.read(4, 10)] == [5]  # acknowledges 3 and 4
    assert [d.seq for d in box.items] == [5]
    assert box.read(5, 10) == [] and not box.items
    view = box.push(msg(), 9).view()
    assert view["seq"] == 6 and view["received_at"] == 9 and view["body"] == {"q": 1}
    # a cursor from before a restart (beyond anything here) reads from the start
    fresh = M.Inbox()
    fresh.push(msg(), 1)
    assert [d.seq for d in fresh.read(40, 10)] == [1]
