"""Confidential tasks in the pure task core: recipients, who bids and reviews, sealed outputs."""

from __future__ import annotations

import hashlib
from typing import Any

from test_tasks_core import Doc, P, agent, only

from mossnode.crypto.identity import Identity
from mossnode.crypto.sealed import Randomness
from mossnode.protocols.tasks import (
    Bid,
    Claim,
    Contract,
    Dispatch,
    DispatchReview,
    Draft,
    Refused,
    Scheduler,
    State,
    Submit,
    plan_create,
)
from mossnode.protocols.tasks import confidential as C


def ident(name: str) -> Identity:
    return Identity(hashlib.sha256(name.encode()).digest())


A, B, X = ident("a"), ident("b"), ident("x")  # creator, a reader, an outsider
KEYS = {i.peer_id: i.public_key for i in (A, B, X)}
ROLES = ("reviewer",)
SECRET = Contract(confidential=ROLES)


def rand(tag: str) -> Randomness:
    raw = b"".join(hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(4))
    return Randomness.from_bytes(raw[: Randomness.SIZE])


def sealed(value: Any, context: str, *to: Identity) -> dict[str, Any]:
    return C.seal_value(
        value, context=context, recipients={i.peer_id: i.public_key for i in to}, rand=rand(context)
    )


def test_recipients_rule_needs_the_role_in_the_log_and_an_agent_in_presence() -> None:
    members = {
        A.peer_id: (A.public_key, frozenset({"admin"})),
        B.peer_id: (B.public_key, frozenset({"executor", "reviewer"})),
        X.peer_id: (X.public_key, frozenset({"executor"})),
    }
    advertised = {
        B.peer_id: {"reviewer", "executor"},
        X.peer_id: {"reviewer"},  # claims an agent role its node does not hold
        "stranger": {"reviewer"},
    }
    got = C.recipients(ROLES, members, advertised, author=A.peer_id)
    assert got == {A.peer_id: A.public_key, B.peer_id: B.public_key}
    # B without a reviewer agent in presence is no reader; non-members never are
    got = C.recipients(ROLES, members, {B.peer_id: {"executor"}}, author="stranger", also=["z"])
    assert got == {}
    assert C.recipients(ROLES, members, advertised, author=X.peer_id, also=[A.peer_id]) == {
        A.peer_id: A.public_key,
        B.peer_id: B.public_key,
        X.peer_id: X.public_key,
    }


def test_roles_are_checked_at_creation_and_kept_in_the_contract() -> None:
    for bad in (("Bad Role",), ("",), tuple(f"r{i}" for i in range(17))):
        got = plan_create(
            {}, Draft("t", "t", contract=Contract(confidential=bad)), creator="A", now_ms=0
        )
        assert isinstance(got, Refused) and got.code == "bad_roles", got
    assert C.check_roles([]) is not None and C.check_roles("reviewer") is not None
    raw = SECRET.to_raw()
    assert raw["confidential"] == ["reviewer"] and Contract.from_raw(raw) == SECRET
    assert "confidential" not in Contract().to_raw()  # ordinary tasks keep their stored form


def test_only_nodes_that_can_open_the_input_bid() -> None:
    doc = Doc()
    tid = f"{A.peer_id}:t"
    doc.create(A.peer_id, "t", contract=SECRET, input=sealed({"n": 1}, C.input_context(tid), A, B))
    view = doc.view()
    outsider = Scheduler(X.peer_id, params=P).tick(view, agents=[agent("x")], now_ms=0)
    assert not only(outsider, Bid)
    reader = Scheduler(B.peer_id, params=P).tick(view, agents=[agent("b")], now_ms=0)
    assert [e.task_id for e in only(reader, Bid)] == [tid]


def test_a_task_after_a_confidential_one_goes_to_nodes_that_can_open_its_output() -> None:
    doc = Doc()
    secret = f"{A.peer_id}:s"
    doc.create(A.peer_id, "s", contract=SECRET, input=sealed(1, C.input_context(secret), A, B))
    after = doc.create(A.peer_id, "after", deps=(secret,))
    doc.apply(B.peer_id, 0, Bid(secret, 1, "b", 0.5))
    doc.apply(B.peer_id, 200, Claim(secret, 1, "b", 10_000))
    out = sealed({"n": 2}, C.output_context(secret, B.peer_id), A, B)
    doc.apply(B.peer_id, 300, Submit(secret, 1, 1, "b", True, out))
    assert doc.status(secret, 300).state is State.DONE
    view = doc.view()
    assert not only(Scheduler(X.peer_id, params=P).tick(view, agents=[agent("x")], now_ms=400), Bid)
    (bid,) = only(Scheduler(B.peer_id, params=P).tick(view, agents=[agent("b")], now_ms=400), Bid)
    assert bid.task_id == after


def test_replicas_accept_only_sealed_outputs_of_a_confidential_task() -> None:
    doc = Doc()
    tid = f"{A.peer_id}:t"
    schema = {"type": "object", "required": ["n"]}
    doc.create(
        A.peer_id,
        "t",
        contract=Contract(confidential=ROLES, output_schema=schema, max_attempts=1),
        input=sealed(None, C.input_context(tid), A, B),
    )
    doc.apply(B.peer_id, 0, Bid(tid, 1, "b", 0.5))
    doc.apply(B.peer_id, 200, Claim(tid, 1, "b", 10_000))
    # a faulty assignee writes its output in the clear: a schema breach, not a result
    doc.apply(B.peer_id, 300, Submit(tid, 1, 1, "b", True, {"n": 1}))
    st = doc.status(tid, 300)
    assert st.state is State.FAILED and "not sealed" in st.reasons[0]


def test_reviews_only_by_nodes_that_can_open_the_submission() -> None:
    doc = Doc()
    tid = f"{A.peer_id}:t"
    doc.create(
        A.peer_id,
        "t",
        contract=Contract(confidential=ROLES, review_required=True),
        input=sealed(0, C.input_context(tid), A, B, X),
    )
    doc.apply(A.peer_id, 0, Bid(tid, 1, "a", 0.5))
    doc.apply(A.peer_id, 200, Claim(tid, 1, "a", 10_000))
    doc.apply(
        A.peer_id,
        300,
        Submit(tid, 1, 1, "a", True, sealed(5, C.output_context(tid, A.peer_id), A, B)),
    )
    assert doc.status(tid, 300).state is State.REVIEW
    view = doc.view()
    rev = [agent("r", roles=("reviewer",))]
    late = 300 + P.review_delay_ms + 1
    assert not only(
        Scheduler(X.peer_id, params=P).tick(view, agents=rev, now_ms=late), DispatchReview
    )
    assert only(Scheduler(B.peer_id, params=P).tick(view, agents=rev, now_ms=late), DispatchReview)


def test_the_reader_is_dispatched_the_sealed_payload_for_its_node_to_open() -> None:
    doc = Doc()
    tid = f"{A.peer_id}:t"
    doc.create(
        A.peer_id, "t", contract=SECRET, input=sealed({"k": "v"}, C.input_context(tid), A, B)
    )
    s = Scheduler(B.peer_id, params=P)
    doc.apply(B.peer_id, 0, s.tick(doc.view(), agents=[agent("b")], now_ms=0))
    (d,) = only(s.tick(doc.view(), agents=[agent("b")], now_ms=2 * P.settle_ms), Dispatch)
    assert "k" not in str(d.payload["input"]["ct"])
    got = C.open_value(
        d.payload["input"], context=C.input_context(tid), peer_id=B.peer_id, seed=B.seed
    )
    assert got == {"k": "v"}
