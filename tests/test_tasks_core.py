"""Task core, piece by piece: contracts, DAGs, the derived state machine, allocation, leases,
reviews, reputation, supervision and recurring tasks. Pure and deterministic: a plain-dict
document stands in for the CRDT, and time is an argument."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import random
from typing import Any

import pytest

from mossnode.protocols.tasks import (
    Assignment,
    Bid,
    Cancel,
    Claim,
    Contract,
    Create,
    Dispatch,
    DispatchReview,
    Draft,
    Finished,
    LateResult,
    Limits,
    LocalAgent,
    Params,
    Plan,
    ProposeExclusive,
    Refused,
    Release,
    RenewLease,
    Schedule,
    Scheduler,
    State,
    Submit,
    SubmitReview,
    Tally,
    bid_score,
    build_view,
    check_deps_update,
    check_raw_contract,
    check_schema,
    derive_all,
    leaderboard,
    period_suffix,
    plan_control,
    plan_create,
    plan_review,
    plan_submit,
    reputation,
    validate,
    winner,
    writes,
)
from mossnode.protocols.tasks.allocation import Window, best, rank_key, window
from mossnode.protocols.tasks.effects import Effect
from mossnode.protocols.tasks.lifecycle import Cache
from mossnode.protocols.tasks.model import MAX_ATTEMPTS, BidEntry, Task, changed_since
from mossnode.protocols.tasks.scheduler import SPREAD_MS

P = Params(
    settle_ms=100, lease_ms=1_000, claim_timeout_ms=500, backoff_base_ms=200, backoff_max_ms=1_000
)
ENTRY_KINDS = ("bids", "claims", "leases", "progress", "results", "reviews")
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


class Doc:
    """The ``tasks`` root as plain data, written the way the CRDT lets each node write it."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}

    def apply(self, node: str, now: int, effects: Effect | Plan | list[Effect]) -> None:
        if isinstance(effects, Plan):
            effects = list(effects.effects)
        elif not isinstance(effects, list):
            effects = [effects]
        for e in effects:
            for w in writes(e, now):
                if w.kind == "create":
                    fields = {k: v for k, v in w.value.items() if k != "suffix"}
                    self.tasks[w.task_id] = {
                        **fields,
                        "creator": node,
                        "created_at": now,
                        **{k: {} for k in ENTRY_KINDS},
                        "log": {},
                    }
                elif w.kind == "log":
                    self.tasks[w.task_id]["log"].setdefault(node, []).append(w.value)
                else:
                    self.tasks[w.task_id][w.kind][node] = w.value

    def view(self) -> dict[str, Task]:
        return build_view(self.tasks)

    def create(self, creator: str, suffix: str, now: int = 0, **kw: Any) -> str:
        got = plan_create(
            self.view(), Draft(suffix, kw.pop("title", suffix), **kw), creator=creator, now_ms=now
        )
        assert isinstance(got, Create), got
        self.apply(creator, now, got)
        return got.task_id

    def status(self, tid: str, now: int, **kw: Any) -> Any:
        return derive_all(self.view(), now, params=P, **kw)[tid]


def random_json(
    rng: random.Random,
    atoms: list[Any],
    keys: list[str],
    *,
    max_depth: int,
    atom: float,
    array: float,
    depth: int = 0,
) -> Any:
    """A random JSON-like value of ``atoms`` in arrays and objects keyed by ``keys``: an atom
    with probability ``atom`` (always below ``max_depth``), else an array up to ``array``,
    else an object."""
    r = rng.random()
    if depth > max_depth or r < atom:
        return rng.choice(atoms)
    kw = {"max_depth": max_depth, "atom": atom, "array": array, "depth": depth + 1}
    if r < array:
        return [random_json(rng, atoms, keys, **kw) for _ in range(rng.randint(0, 3))]
    return {rng.choice(keys): random_json(rng, atoms, keys, **kw) for _ in range(rng.randint(0, 4))}


def agent(
    name: str, *caps: str, roles: tuple[str, ...] = ("executor",), conc: int = 1
) -> LocalAgent:
    return LocalAgent(
        name, roles=frozenset(roles), capabilities=frozenset(caps), max_concurrency=conc
    )


def only(plan: Plan, kind: type) -> list[Any]:
    return [e for e in plan.effects if isinstance(e, kind)]


# -- contracts ---------------------------------------------------------------------------------


def test_validate_subset_reports_the_path_of_the_violation() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0}}},
            },
            "tag": {"enum": ["a", "b"]},
            "name": {"type": "string", "minLength": 2, "maxLength": 4},
        },
        "required": ["items"],
        "additionalProperties": False,
    }
    assert validate({"items": [{"x": 1}, {"x": 2.5}], "tag": "a", "name": "ab"}, schema) is None
    assert (
        str(validate({"items": [{"x": 1}, {"x": -1}]}, schema))
        == "at $.items[1].x: -1 violates minimum 0"
    )
    assert validate({}, schema) is not None and "missing required property 'items'" in str(
        validate({}, schema)
    )
    assert str(validate({"items": [], "extra": 1}, schema)).startswith(
        "at $.extra: additional property"
    )
    assert str(validate({"items": [], "tag": "c"}, schema)).startswith("at $.tag: must be one of")
    assert (
        str(validate({"items": [], "name": "x"}, schema)) == "at $.name: shorter than minLength 2"
    )
    # Yrs gives integers back as floats; JSON Schema counts 3.0 as an integer, but not True
    assert validate(3.0, {"type": "integer"}) is None
    assert validate(True, {"type": "integer"}) is not None
    assert validate(None, None) is None


def test_unsupported_schema_keywords_are_refused_up_front() -> None:
    assert check_schema(SCHEMA) is None
    bad = check_schema({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}})
    assert bad is not None and "unsupported schema keyword 'pattern'" in str(bad)
    assert check_schema({"type": "decimal"}) is not None


def test_a_stored_schema_outside_the_subset_rejects_every_output_and_breaks_nothing() -> None:
    # The creator writes its own core, so it can store any schema; validate() raised on one
    # outside the subset: the winner's scheduler on every tick, derive_all on every node.
    doc = Doc()
    tid = doc.create("A", "t")
    doc.tasks[tid]["contract"]["output_schema"] = {"type": 5}
    doc.tasks[tid]["contract"]["input_schema"] = {"minimum": "a"}
    c = doc.view()[tid].contract
    assert c.output_schema is False and c.input_schema is False
    assert Contract.from_raw(c.to_raw()) == c
    sched = Scheduler("B", params=P)
    ag = [agent("b")]
    for now in (1, 300, 301):
        doc.apply("B", now, sched.tick(doc.view(), agents=ag, now_ms=now))
    assert tid in sched.running
    plan = sched.tick(doc.view(), agents=ag, now_ms=400, finished=[Finished(tid, {"n": 1})])
    (sub,) = only(plan, Submit)
    assert not sub.ok and "no value is allowed here" in str(sub.error)
    # a result written anyway (any assignee may) is a schema fault, the same everywhere
    doc.tasks[tid]["results"]["B"] = {
        "attempt": 1,
        "round": 1,
        "agent": "b",
        "ok": True,
        "output": {"n": 1},
        "at": 400,
    }
    st = doc.status(tid, 500)
    assert st.outcomes[0].kind == "schema" and st.attempt == 2


def test_check_schema_never_raises_and_a_checked_schema_never_makes_validate_raise() -> None:
    """Seeded: junk schemas (what a creator could store) either fail check_schema or
    validate any JSON instance without raising; Contract.from_raw keeps only the former."""
    rng = random.Random(11)
    atoms: list[Any] = [None, True, False, 0, -1, 2**70, 1.5, "", "a", "string", "integer"]
    atoms += ["object", "array", [], ["number"], [["x"]], [1, "a"], {}, {"a": 1}]
    keys = sorted(
        {"type", "properties", "required", "additionalProperties", "items", "minItems"}
        | {"maxItems", "enum", "const", "minimum", "maximum", "exclusiveMinimum"}
        | {"exclusiveMaximum", "minLength", "maxLength", "title", "bogus"}
    )

    def junk() -> Any:
        return random_json(rng, atoms, keys, max_depth=3, atom=0.4, array=0.55)

    instances = [None, True, 0, 3.0, -2.5, "", "abc", [], [1, "x"], {}, {"a": 1, "b": [None]}]
    kept = 0
    for _ in range(3_000):
        schema = junk()
        bad = check_schema(schema)
        stored = Contract.from_raw({"output_schema": schema}).output_schema
        assert stored == (None if schema is None else schema if bad is None else False)
        if bad is None:
            kept += 1
            for inst in instances:
                validate(inst, stored)
    assert kept > 100


# -- bad input: each refused with a clear reason, nothing changed ------------------------------


def test_cyclic_dependencies_are_refused_and_nothing_changes() -> None:
    doc = Doc()
    a = doc.create("A", "a")
    b = doc.create("A", "b", deps=(a,))
    before = copy.deepcopy(doc.tasks)
    # editing a's deps to depend on b closes a -> b -> a
    got = check_deps_update(doc.view(), a, [b])
    assert isinstance(got, Refused) and got.code == "cycle"
    assert f"{a} -> {b} -> {a}" in got.reason
    # a faulty creator pre-referenced a task that does not exist yet: creating it closes the loop
    doc.tasks[a]["deps"] = ["A:c"]
    before = copy.deepcopy(doc.tasks)
    got = plan_create(doc.view(), Draft("c", "c", deps=(b,)), creator="A", now_ms=0)
    assert isinstance(got, Refused) and got.code == "cycle", got
    assert got.reason == "dependencies would form a cycle: A:c -> A:b -> A:a -> A:c"
    assert doc.tasks == before
    # and a cycle that reached the replicated view anyway blocks its tasks instead of hanging
    doc.tasks["A:c"] = {**copy.deepcopy(doc.tasks[b]), "deps": [b], "title": "c"}
    st = derive_all(doc.view(), 0, params=P)
    assert {st[t].state for t in (a, b, "A:c")} == {State.BLOCKED}
    assert any("dependency cycle" in r for t in (a, b, "A:c") for r in st[t].reasons)


def test_create_refuses_unknown_deps_bad_input_fanout_depth_and_budget() -> None:
    doc = Doc()
    root = doc.create("A", "root", contract=Contract(budget=4))
    kid = doc.create("A", "kid", parent=root)
    before = copy.deepcopy(doc.tasks)
    view = doc.view()
    cases = {
        "unknown_dependency": Draft("x", "x", deps=("A:nope",)),
        "unknown_parent": Draft("x", "x", parent="A:nope"),
        "input_schema": Draft("x", "x", input={"n": "one"}, contract=Contract(input_schema=SCHEMA)),
        "schema": Draft(
            "x", "x", contract=Contract(output_schema={"type": "string", "format": "email"})
        ),
        "exists": Draft("root", "again"),
        "bad_id": Draft("has space", "x"),
    }
    for code, draft in cases.items():
        got = plan_create(view, draft, creator="A", now_ms=1)
        assert isinstance(got, Refused) and got.code == code, (code, got)
    got = plan_create(
        view,
        Draft("x", "x", input={"n": "one"}, contract=Contract(input_schema=SCHEMA)),
        creator="A",
        now_ms=1,
    )
    assert (
        isinstance(got, Refused)
        and got.reason == "input violates input_schema at $.n: expected integer, got string"
    )

    tight = Limits(max_fanout=1, max_depth=1)
    got = plan_create(view, Draft("x", "x", parent=root), creator="A", now_ms=1, limits=tight)
    assert isinstance(got, Refused) and got.code == "fanout"
    assert got.reason == f"parent {root} would have 2 children (max_fanout 1)"
    got = plan_create(view, Draft("x", "x", parent=kid), creator="A", now_ms=1, limits=tight)
    assert isinstance(got, Refused) and got.code == "depth"
    assert got.reason == "task would be at depth 2 (max_depth 1)"
    got = plan_create(
        view, Draft("x", "x", parent=kid, contract=Contract(cost=3)), creator="A", now_ms=1
    )
    assert isinstance(got, Refused) and got.code == "budget"
    assert got.reason == f"tree {root} would cost 5 (budget 4)"
    assert doc.tasks == before
    assert isinstance(
        plan_create(
            view, Draft("x", "x", parent=kid, contract=Contract(cost=2)), creator="A", now_ms=1
        ),
        Create,
    )
    # a replica that holds the parent but not yet the parent's own parent (gossip order)
    # cannot check the tree's budget: refused as unknown, to be retried, not a crash
    partial = {t: task for t, task in view.items() if t != root}
    got = plan_create(partial, Draft("x", "x", parent=kid), creator="A", now_ms=1)
    assert isinstance(got, Refused) and got.code == "unknown_parent", got
    assert got.reason == f"ancestor {root} of parent {kid} is not known"


def _running_task(doc: Doc, *, contract: Contract | None = None) -> tuple[str, Scheduler]:
    """A task bid on by B and C; B wins, claims and runs it."""
    tid = doc.create(
        "A", "t", capabilities=("py",), contract=contract or Contract(output_schema=SCHEMA)
    )
    b, c = Scheduler("B", params=P), Scheduler("C", params=P)
    doc.apply("B", 0, Bid(tid, 1, "b1", 0.9))
    doc.apply("C", 10, Bid(tid, 1, "c1", 0.5))
    plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=200)
    assert only(plan, Claim) and only(plan, Dispatch), plan
    doc.apply("B", 200, plan)
    assert c.tick(doc.view(), agents=[agent("c1", "py")], now_ms=200).effects == ()
    return tid, b


def test_a_claim_writes_no_lease_and_implies_one_that_renewals_replace() -> None:
    doc = Doc()
    tid, b = _running_task(doc)  # B claimed at 200 (lease_ms 1,000)
    assert doc.tasks[tid]["leases"] == {} and doc.tasks[tid]["claims"]["B"]["at"] == 200
    assert doc.status(tid, 300).lease_expires_at == 1_200
    assert doc.status(tid, 1_200).state is State.PENDING  # the implied lease expired
    plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=700)  # at half-life
    assert [e.expires_at for e in only(plan, RenewLease)] == [1_700], plan
    doc.apply("B", 700, plan)
    assert doc.status(tid, 1_200).lease_expires_at == 1_700
    # an explicit expiry is written as a lease, as before
    assert [w.kind for w in writes(Claim(tid, 1, "b1", 900), 200)] == ["claims", "leases", "log"]


def test_submission_by_non_assignee_or_invalid_output_is_refused() -> None:
    doc = Doc()
    tid, _ = _running_task(doc)
    st = doc.status(tid, 300)
    assert (st.state, st.assignee, st.agent) == (State.IN_PROGRESS, "B", "b1")
    before = copy.deepcopy(doc.tasks)
    task = doc.view()[tid]
    got = plan_submit(task, st, node="C", agent="c1", output={"n": 1})
    assert isinstance(got, Refused) and got.code == "not_assignee"
    assert got.reason == f"C/c1 is not the assignee of {tid} (held by B/b1)"
    got = plan_submit(task, st, node="B", agent="other", output={"n": 1})
    assert isinstance(got, Refused) and got.code == "not_assignee"
    got = plan_submit(task, st, node="B", agent="b1", output={"n": "1"})
    assert isinstance(got, Refused) and got.code == "output_schema"
    assert got.reason == "output violates output_schema at $.n: expected integer, got string"
    assert doc.tasks == before
    ok = plan_submit(task, st, node="B", agent="b1", output={"n": 1})
    assert isinstance(ok, Submit)
    doc.apply("B", 400, ok)
    assert doc.status(tid, 400).state is State.DONE


def test_review_by_the_assignee_is_refused_and_cannot_bypass_review() -> None:
    doc = Doc()
    tid, b = _running_task(doc, contract=Contract(output_schema=SCHEMA, review_required=True))
    doc.apply("B", 300, b.finished(doc.view(), tid, now_ms=300, output={"n": 7}))
    st = doc.status(tid, 300)
    assert st.state is State.REVIEW
    task = doc.view()[tid]
    before = copy.deepcopy(doc.tasks)
    got = plan_review(task, st, node="B", agent="b1", score=5, verdict="done")
    assert isinstance(got, Refused) and got.code == "self_review"
    assert got.reason == "B/b1 cannot review work by B/b1: reviews must be independent"
    got = plan_review(task, st, node="B", agent="b-reviewer", score=5, verdict="done")
    assert isinstance(got, Refused) and got.code == "self_review"  # same node signs for both
    assert isinstance(plan_review(task, st, node="C", agent="c", score=6, verdict="done"), Refused)
    assert isinstance(plan_review(task, st, node="C", agent="c", score=3, verdict="ok"), Refused)
    assert doc.tasks == before
    # a faulty assignee writing its own review anyway changes nothing either
    doc.apply("B", 310, SubmitReview(tid, 1, 1, "b-reviewer", 5, "done"))
    assert doc.status(tid, 320).state is State.REVIEW
    assert isinstance(
        plan_review(
            task,
            st,
            node="B",
            agent="b2",
            score=4,
            verdict="done",
            params=Params(same_node_review=True),
        ),
        SubmitReview,
    )
    # an independent review completes it
    doc.apply("C", 330, SubmitReview(tid, 1, 1, "c-rev", 4, "done", "fine"))
    st = doc.status(tid, 340)
    assert st.state is State.DONE and st.accepted.reviewer == "C" and st.accepted.output == {"n": 7}


# -- lifecycle ---------------------------------------------------------------------------------


def test_review_rework_loop_follows_the_openmoss_machine() -> None:
    doc = Doc()
    tid, b = _running_task(doc, contract=Contract(review_required=True, max_rounds=2))
    seen = [doc.status(tid, 300).state]
    doc.apply("B", 300, b.finished(doc.view(), tid, now_ms=300, output={"n": 1}))
    seen.append(doc.status(tid, 300).state)
    doc.apply("C", 350, SubmitReview(tid, 1, 1, "c-rev", 2, "rework", "add tests"))
    seen.append(doc.status(tid, 360).state)
    plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=360)
    (d,) = only(plan, Dispatch)
    assert d.round == 2 and d.payload["rework"] == {"score": 2, "comments": "add tests"}
    doc.apply("B", 360, plan)
    seen.append(doc.status(tid, 360).state)
    doc.apply("B", 400, b.finished(doc.view(), tid, now_ms=400, output={"n": 2}))
    seen.append(doc.status(tid, 400).state)
    doc.apply("C", 450, SubmitReview(tid, 1, 2, "c-rev", 5, "done"))
    seen.append(doc.status(tid, 450).state)
    assert seen == [
        State.IN_PROGRESS,
        State.REVIEW,
        State.REWORK,
        State.IN_PROGRESS,
        State.REVIEW,
        State.DONE,
    ]
    acc = doc.status(tid, 450).accepted
    assert (acc.round, acc.output, acc.review.score) == (2, {"n": 2}, 5)


def test_a_done_review_decides_whatever_order_the_reviews_and_rework_arrive_in() -> None:
    # Two honest reviewers race on one submission: C says rework at 340, D says done at 350.
    # The earliest review used to decide, so a node that had seen only D's review (task done,
    # dependents run on its output) went back to rework when C's arrived.
    base = Doc()
    tid, b = _running_task(base, contract=Contract(review_required=True))
    base.apply("B", 300, b.finished(base.view(), tid, now_ms=300, output={"n": 1}))
    rework = ("C", 340, [SubmitReview(tid, 1, 1, "c-rev", 2, "rework", "again")])
    done = ("D", 350, [SubmitReview(tid, 1, 1, "d-rev", 5, "done")])
    # B saw only the rework: it resumes and submits round 2
    seen_by_b = copy.deepcopy(base)
    seen_by_b.apply(*rework)
    plan = b.tick(seen_by_b.view(), agents=[agent("b1", "py")], now_ms=360)
    assert [d.round for d in only(plan, Dispatch)] == [2]
    seen_by_b.apply("B", 360, plan)
    second = b.finished(seen_by_b.view(), tid, now_ms=400, output={"n": 2})
    round2 = [("B", 360, list(plan.effects)), ("B", 400, list(second.effects))]
    finals = set()
    for order in itertools.permutations([[rework], [done], round2]):
        doc = copy.deepcopy(base)
        has_done = False
        for facts in order:
            for fact in facts:
                doc.apply(*fact)
                has_done = has_done or fact is done
                st = doc.status(tid, 500)
                if has_done:  # once done, done: with the round D accepted
                    assert st.state is State.DONE and st.accepted.round == 1
                    assert st.accepted.output == {"n": 1} and st.accepted.review.score == 5
        finals.add(repr(doc.status(tid, 500)))
    assert len(finals) == 1


def test_rework_limit_closes_the_attempt() -> None:
    doc = Doc()
    tid, b = _running_task(
        doc, contract=Contract(review_required=True, max_rounds=1, max_attempts=1)
    )
    doc.apply("B", 300, b.finished(doc.view(), tid, now_ms=300, output={"n": 1}))
    doc.apply("C", 350, SubmitReview(tid, 1, 1, "c-rev", 1, "rework", "wrong"))
    st = doc.status(tid, 360)
    assert st.state is State.FAILED
    assert st.reasons[0] == "attempt 1 (B/b1): rework requested in round 1 of 1"


def test_max_attempts_is_capped_and_a_far_attempt_mark_costs_nothing() -> None:
    # A bid for attempt K made every replica walk attempts 1..K, rebuilding the reasons at
    # each: 15 s per derivation at K = 10,000 with an unbounded max_attempts.
    doc = Doc()
    got = plan_create(
        doc.view(), Draft("t", "t", contract=Contract(max_attempts=101)), creator="A", now_ms=0
    )
    assert isinstance(got, Refused) and got.code == "max_attempts"
    assert "1-100" in got.reason
    # the daemon checks the requested contract before from_raw makes it safe
    assert check_raw_contract({"max_attempts": 101}).code == "max_attempts"
    assert check_raw_contract({"output_schema": {"type": 5}}).code == "schema"
    assert check_raw_contract({"max_attempts": 100, "output_schema": SCHEMA}) is None
    # review rounds have the same bound: a creator is told, a stored larger one reads as 100
    assert check_raw_contract({"max_rounds": 101}).code == "max_rounds"
    assert Contract.from_raw({"max_rounds": 10**9}).max_rounds == 100
    tid = doc.create("A", "t", contract=Contract(max_attempts=MAX_ATTEMPTS))
    doc.tasks[tid]["contract"]["max_attempts"] = 10**9  # the creator rewrites its own core
    assert doc.view()[tid].contract.max_attempts == MAX_ATTEMPTS
    doc.tasks[tid]["bids"]["M"] = {"attempt": 10**6, "agent": "m", "score": 1.0, "at": 5}
    st = doc.status(tid, 10)
    assert st.state is State.PENDING and st.attempt == 1  # beyond the cap: noise
    # a mark within the cap supersedes every attempt before it, each once
    doc.tasks[tid]["bids"]["M"] = {"attempt": 50, "agent": "m", "score": 1.0, "at": 5}
    st = doc.status(tid, 10)
    assert st.attempt == 50 and len(st.reasons) == 49
    assert all(r.endswith("superseded by a later attempt") for r in st.reasons)


def test_one_bid_for_the_last_attempt_does_not_fail_a_task() -> None:
    """M bids for attempt 3 of a fresh task with max_attempts 3: attempts 1 and 2, which
    nobody had won, are skipped, not faults (they failed the task at once before), and the
    task can still be done in attempt 3."""
    doc = Doc()
    tid = doc.create("A", "t", capabilities=("py",))
    doc.tasks[tid]["bids"]["M"] = {"attempt": 3, "agent": "m", "score": 0.1, "at": 5}
    st = doc.status(tid, 10)
    assert (st.state, st.attempt, st.faults) == (State.PENDING, 3, 0)
    assert [o.kind for o in st.outcomes] == ["skipped", "skipped"]
    b = Scheduler("B", params=P)
    doc.apply("B", 20, b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=20))
    doc.apply("B", 400, b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=400))
    assert doc.status(tid, 400).state is State.IN_PROGRESS
    doc.apply("B", 450, b.finished(doc.view(), tid, now_ms=450, output={"n": 1}))
    assert doc.status(tid, 450).state is State.DONE


def test_winner_is_deterministic_and_waits_for_the_settle_window() -> None:
    doc = Doc()
    tid = doc.create("A", "t")
    task = doc.view()[tid]
    bids = {
        "n1": BidEntry(1, "a", 0.7, 0),
        "n2": BidEntry(1, "a", 0.9, 50),
        "n3": BidEntry(1, "a", 0.9, 100),
        "late": BidEntry(1, "a", 1.0, 101),  # after the window closed: not counted
    }
    assert winner(task, bids, now_ms=199, settle_ms=100) is None
    got = {winner(task, dict(perm), 200, 100) for perm in itertools.permutations(bids.items())}
    assert len(got) == 1 and got.pop() in ("n2", "n3")
    assert winner(task, {"n1": bids["n1"]}, 200, 100) == "n1"
    assert bid_score(0.5, 0, 2, 0.0) > bid_score(0.5, 1, 2, 0.0) > bid_score(0.5, 2, 2, 0.0)
    assert bid_score(0.9, 0, 1, 0.0) > bid_score(0.1, 0, 1, 0.0)


def test_capability_and_role_match_is_required_to_bid() -> None:
    doc = Doc()
    doc.create("A", "py", capabilities=("py",))
    doc.create("A", "rev", role="reviewer")
    s = Scheduler("B", params=P)
    plan = s.tick(
        doc.view(), agents=[agent("sql", "sql"), agent("r", "py", roles=("reviewer",))], now_ms=0
    )
    assert [(e.task_id, e.agent) for e in only(plan, Bid)] == [("A:rev", "r")]


def test_lease_expiry_reoffers_with_backoff_then_fails_with_reasons() -> None:
    doc = Doc()
    tid = doc.create("A", "t", contract=Contract(max_attempts=2))
    doc.apply("B", 0, Bid(tid, 1, "b", 0.5))
    doc.apply("B", 200, Claim(tid, 1, "b", 1_200))
    assert doc.status(tid, 1_199).state is State.IN_PROGRESS
    st = doc.status(tid, 1_200)  # B went silent: its lease ran out
    assert (st.state, st.attempt, st.eligible_at, st.assignee) == (State.PENDING, 2, 1_400, None)
    assert st.reasons == ("attempt 1 (B/b): lease expired at 1200",)
    c = Scheduler("C", params=P)
    assert not only(c.tick(doc.view(), agents=[agent("c")], now_ms=1_300), Bid)  # backoff
    plan = c.tick(doc.view(), agents=[agent("c")], now_ms=1_400)
    (bid,) = only(plan, Bid)
    assert bid.attempt == 2
    doc.apply("C", 1_400, plan)
    plan = c.tick(doc.view(), agents=[agent("c")], now_ms=1_600)
    assert only(plan, Claim) and only(plan, Dispatch)
    doc.apply("C", 1_600, plan)
    # the old holder's late result goes to the log and overrides nothing
    doc.apply("B", 1_700, Submit(tid, 1, 1, "b", True, {"late": True}))
    st = doc.status(tid, 1_700)
    assert (st.state, st.assignee) == (State.IN_PROGRESS, "C")
    assert any(r.get("kind") == "result" for r in doc.view()[tid].log["B"])
    # C crashes too: attempts exhausted
    st = doc.status(tid, 2_600)
    assert st.state is State.FAILED
    assert st.reasons == (
        "attempt 1 (B/b): lease expired at 1200, before the submission at 1700",
        "attempt 2 (C/c): lease expired at 2600",
        "2 faulty attempts (max_attempts 2)",
    )
    assert P.backoff(1) == 200 and P.backoff(3) == 800 and P.backoff(9) == 1_000


def test_deadline_breach_and_schema_violation_close_the_attempt() -> None:
    doc = Doc()
    tid = doc.create("A", "t", contract=Contract(deadline_ms=300, output_schema=SCHEMA))
    doc.apply("B", 0, Bid(tid, 1, "b", 0.5))
    doc.apply("B", 200, Claim(tid, 1, "b", 5_000))
    assert doc.status(tid, 499).state is State.IN_PROGRESS
    st = doc.status(tid, 500)
    assert st.attempt == 2 and st.reasons == ("attempt 1 (B/b): deadline missed (due 500)",)
    # a faulty node writing an invalid output directly is judged the same everywhere
    doc2 = Doc()
    tid = doc2.create("A", "t", contract=Contract(output_schema=SCHEMA))
    doc2.apply("B", 0, Bid(tid, 1, "b", 0.5))
    doc2.apply("B", 200, Claim(tid, 1, "b", 5_000))
    doc2.apply("B", 300, Submit(tid, 1, 1, "b", True, {"n": 1.5}))
    st = doc2.status(tid, 300)
    assert st.outcomes[0].kind == "schema"
    assert st.reasons == (
        "attempt 1 (B/b): output violates output_schema at $.n: expected integer, got number",
    )


def test_dependencies_gate_readiness_and_feed_inputs() -> None:
    doc = Doc()
    a = doc.create("A", "a")
    b = doc.create("A", "b", deps=(a,))
    s = Scheduler("B", params=P)
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=0)
    assert [e.task_id for e in only(plan, Bid)] == [a]  # b is not ready
    assert doc.status(b, 0).state is State.PENDING and doc.status(b, 0).reasons == (
        f"waiting for {a} (pending)",
    )
    doc.apply("B", 0, plan)
    doc.apply("B", 200, s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=200))
    doc.apply("B", 250, s.finished(doc.view(), a, now_ms=250, output={"n": 41}))
    doc.apply("B", 250, s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=250))
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=450)
    (d,) = only(plan, Dispatch)
    assert d.payload["inputs_from_dependencies"] == {a: {"n": 41}}
    assert set(d.payload) >= {"id", "title", "spec", "input", "inputs_from_dependencies"}


def test_failed_or_cancelled_dependency_blocks() -> None:
    doc = Doc()
    a = doc.create("A", "a", contract=Contract(max_attempts=1))
    b = doc.create("A", "b", deps=(a,))
    doc.apply("B", 0, Bid(a, 1, "x", 0.5))
    doc.apply("B", 200, Claim(a, 1, "x", 2_000))
    doc.apply("B", 300, Submit(a, 1, 1, "x", False, None, "boom"))
    assert doc.status(a, 300).state is State.FAILED
    st = doc.status(b, 300)
    assert st.state is State.BLOCKED and st.reasons == (f"dependency {a} is failed",)


# -- supervision: cancel, pause, reassign --------------------------------------------------


def test_cancel_by_creator_or_supervisor_only_and_it_covers_the_subtree() -> None:
    doc = Doc()
    root = doc.create("A", "root")
    kid = doc.create("A", "kid", parent=root)
    after = doc.create("A", "after", deps=(kid,))
    st = derive_all(doc.view(), 0, params=P)
    got = plan_control(doc.view(), st, root, "cancel", node="X", now_ms=5)
    assert isinstance(got, Refused) and got.code == "forbidden"
    # a record by X slipped in anyway is ignored by every replica
    doc.tasks[root]["log"]["X"] = [{"kind": "cancel", "at": 5}]
    assert doc.status(root, 10).state is State.PENDING
    sup = plan_control(
        doc.view(),
        st,
        root,
        "cancel",
        node="S",
        now_ms=20,
        reason="stop",
        authority=lambda n, perm: n == "S" and perm == "task.cancel",
    )
    assert not isinstance(sup, Refused)
    doc.apply("S", 20, sup)
    st = derive_all(doc.view(), 30, params=P, authority=lambda n, perm: n == "S")
    assert st[root].state is State.CANCELLED and st[root].reasons == ("cancelled by S: stop",)
    assert st[kid].state is State.CANCELLED and st[kid].reasons == (f"parent {root} cancelled",)
    assert st[after].state is State.BLOCKED
    again = plan_control(doc.view(), st, root, "cancel", node="A", now_ms=40)
    assert isinstance(again, Refused) and again.code == "terminal"


def test_running_work_is_cancelled_when_the_task_is_cancelled() -> None:
    doc = Doc()
    tid, b = _running_task(doc)
    st = derive_all(doc.view(), 300, params=P)
    doc.apply("A", 300, plan_control(doc.view(), st, tid, "cancel", node="A", now_ms=300))  # type: ignore[arg-type]
    plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=310)
    assert only(plan, Cancel) == [Cancel(tid, "task cancelled")]
    assert tid not in b.running


def test_pause_tree_stops_dispatch_until_resume() -> None:
    doc = Doc()
    root = doc.create("A", "root")
    kid = doc.create("A", "kid", parent=root)
    st = derive_all(doc.view(), 0, params=P)
    doc.apply("A", 0, plan_control(doc.view(), st, root, "pause", node="A", now_ms=0))  # type: ignore[arg-type]
    s = Scheduler("B", params=P)
    assert doc.status(kid, 1).paused
    assert s.tick(doc.view(), agents=[agent("x", conc=3)], now_ms=1).effects == ()
    st = derive_all(doc.view(), 2, params=P)
    assert isinstance(plan_control(doc.view(), st, root, "pause", node="A", now_ms=2), Refused)
    doc.apply("A", 5, plan_control(doc.view(), st, root, "resume", node="A", now_ms=5))  # type: ignore[arg-type]
    assert len(only(s.tick(doc.view(), agents=[agent("x", conc=3)], now_ms=6), Bid)) == 2


def test_swarm_pause_claims_but_dispatches_nothing() -> None:
    doc = Doc()
    tid = doc.create("A", "t")
    s = Scheduler("B", params=P)
    assert s.tick(doc.view(), agents=[agent("x")], now_ms=0, paused=True).effects == ()
    doc.apply("B", 0, Bid(tid, 1, "x", 0.5))  # bid before the pause
    plan = s.tick(doc.view(), agents=[agent("x")], now_ms=200, paused=True)
    assert only(plan, Claim) and not only(plan, Dispatch)
    doc.apply("B", 200, plan)
    plan = s.tick(doc.view(), agents=[agent("x")], now_ms=700, paused=True)
    assert only(plan, RenewLease) and not only(plan, Dispatch)
    doc.apply("B", 700, plan)
    assert only(s.tick(doc.view(), agents=[agent("x")], now_ms=710), Dispatch)


def test_supervisor_reassign_moves_the_task_without_a_fault() -> None:
    doc = Doc()
    tid, b = _running_task(doc)
    st = derive_all(doc.view(), 300, params=P)
    got = plan_control(doc.view(), st, tid, "reassign", node="A", now_ms=300, reason="slow")
    assert not isinstance(got, Refused) and got.record["attempt"] == 1
    doc.apply("A", 300, got)
    st2 = doc.status(tid, 301)
    assert (st2.state, st2.attempt, st2.faults) == (State.PENDING, 2, 0)
    assert st2.reasons == ("attempt 1 (B/b1): reassigned by A: slow",)
    plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=301)
    assert only(plan, Cancel) and tid not in b.running


# -- load-based reorganization -----------------------------------------------------------------


def test_over_capacity_winner_releases_and_lowered_limit_gives_work_back() -> None:
    doc = Doc()
    t1 = doc.create("A", "t1")
    t2 = doc.create("A", "t2")
    doc.apply("B", 0, [Bid(t1, 1, "x", 0.5), Bid(t2, 1, "x", 0.5)])  # raced: won two, room for one
    s = Scheduler("B", params=P, queue_factor=1)  # no waiting room
    plan = s.tick(doc.view(), agents=[agent("x")], now_ms=200)
    assert [e.task_id for e in only(plan, Claim)] == [t1]
    assert [e.task_id for e in only(plan, Release)] == [t2]
    doc.apply("B", 200, plan)
    st = doc.status(t2, 200)
    assert (st.state, st.attempt, st.faults) == (State.PENDING, 2, 0)
    # a second agent's work is given back when its concurrency drops
    doc.apply("B", 210, Bid(t2, 2, "y", 0.5))
    plan = s.tick(doc.view(), agents=[agent("x"), agent("y")], now_ms=410)
    doc.apply("B", 410, plan)
    assert set(s.running) == {t1, t2}
    plan = s.tick(doc.view(), agents=[agent("x"), agent("y", conc=0)], now_ms=420)
    assert only(plan, Cancel) == [Cancel(t2, "agent y over its concurrency limit")]
    assert [e.task_id for e in only(plan, Release)] == [t2]


def test_a_busy_agent_bids_on_and_queues_won_work_and_runs_it_as_slots_free() -> None:
    doc = Doc()
    for i in range(6):
        doc.create("A", f"t{i}")
    s = Scheduler("B", params=P, queue_factor=2)
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=0)
    bids = only(plan, Bid)
    # 2 slots x 2: four bids, each scored by the share of the queue still free
    assert [b.score for b in bids] == [0.775, 0.6875, 0.6, 0.5125]
    doc.apply("B", 0, plan)
    won = [b.task_id for b in bids]
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=200)
    assert [e.task_id for e in only(plan, Claim)] == won and not only(plan, Release)
    assert [e.task_id for e in only(plan, Dispatch)] == won[:2]
    assert not only(plan, Bid)  # the queue is full
    doc.apply("B", 200, plan)
    # the waiting ones keep their leases (renewed at half-life), so nobody takes them over
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=700)
    assert {e.task_id for e in only(plan, RenewLease)} == set(won)
    doc.apply("B", 700, plan)
    assert doc.status(won[3], 1_300).state is State.IN_PROGRESS
    # a slot frees: the next waiting task starts and the node bids again, but not on a task
    # with a deadline (it runs from the claim): that one needs a free slot
    timed = doc.create("A", "timed", now=1_000, contract=Contract(deadline_ms=5_000))
    plan = s.tick(
        doc.view(), agents=[agent("x", conc=2)], now_ms=1_300, finished=[Finished(won[0])]
    )
    assert only(plan, Submit)[0].task_id == won[0]
    assert [e.task_id for e in only(plan, Dispatch)] == [won[2]]
    assert len(only(plan, Bid)) == 1 and timed not in {b.task_id for b in only(plan, Bid)}
    doc.apply("B", 1_300, plan)
    assert doc.status(won[0], 1_300).state is State.DONE
    # the agent's capacity drops: running work beyond it and waiting work beyond the queue
    # are given back
    plan = s.tick(doc.view(), agents=[agent("x", conc=1)], now_ms=1_310)
    assert only(plan, Cancel) == [Cancel(won[2], "agent x over its concurrency limit")]
    assert {e.task_id for e in only(plan, Release)} == {won[2], won[3]}


def test_newcomer_wins_against_a_loaded_node() -> None:
    doc = Doc()
    doc.create("A", "t")
    old, new = Scheduler("OLD", params=P), Scheduler("NEW", params=P)
    busy = [LocalAgent("o", capabilities=frozenset(), load=0.9)]
    fresh = [LocalAgent("n")]
    doc.apply("OLD", 0, old.tick(doc.view(), agents=busy, now_ms=0))
    doc.apply("NEW", 0, new.tick(doc.view(), agents=fresh, now_ms=0))
    assert doc.status("A:t", 200).assignee == "NEW"


def test_restart_redispatches_held_work_but_never_an_exclusive_task() -> None:
    doc = Doc()
    tid = doc.create("A", "plain")
    ex = doc.create("A", "ex", contract=Contract(exclusive=True, max_attempts=1))
    s = Scheduler("B", params=P)
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=0)
    assert only(plan, ProposeExclusive) == [ProposeExclusive(ex, "B", 0)]
    doc.apply("B", 0, plan)
    decided = {ex: Assignment("B", 0)}  # consensus picked B
    plan = s.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=200, exclusive=decided)
    assert {e.task_id for e in only(plan, Dispatch)} == {tid, ex}
    doc.apply("B", 200, plan)
    fresh = Scheduler("B", params=P)  # the daemon restarted; the agents' processes died
    plan = fresh.tick(doc.view(), agents=[agent("x", conc=2)], now_ms=300, exclusive=decided)
    assert [e.task_id for e in only(plan, Dispatch)] == [tid]
    assert [e.task_id for e in only(plan, Release)] == [ex]
    doc.apply("B", 300, plan)
    st = doc.status(ex, 300, exclusive=decided)
    assert st.state is State.FAILED and "at most once" in st.reasons[-1]


def test_exclusive_task_ignores_bids_and_waits_for_consensus() -> None:
    doc = Doc()
    ex = doc.create("A", "ex", contract=Contract(exclusive=True, max_attempts=1))
    doc.apply("C", 0, Bid(ex, 1, "c", 1.0))
    doc.apply("C", 200, Claim(ex, 1, "c", 5_000))
    assert doc.status(ex, 300).state is State.PENDING
    st = doc.status(ex, 300, exclusive={ex: Assignment("B", 250)})
    assert (st.state, st.assignee) == (State.ASSIGNED, "B")


def _assigned_exclusive(doc: Doc) -> tuple[str, dict[str, Assignment], int]:
    """An exclusive task that consensus assigned to B, as B proposed itself at 1_000; the
    claim deadline that follows."""
    ex = doc.create("A", "ex", contract=Contract(exclusive=True, max_attempts=1))
    return ex, {ex: Assignment("B", 1_000)}, 1_000 + P.exclusive_claim_ms


def test_an_exclusive_assignee_that_never_claims_fails_at_its_deadline() -> None:
    """B was assigned the task and died before claiming it: no claim by ``at +
    exclusive_claim_ms`` and the task fails, as of the deadline, naming B; every node derives
    that a lease's length later (a claim made just in time may still be on its way), never
    earlier. It is never offered again, since an exclusive task never runs twice."""
    doc = Doc()
    ex, excl, deadline = _assigned_exclusive(doc)
    settled = deadline + P.lease_ms
    before = doc.status(ex, settled - 1, exclusive=excl)
    assert (before.state, before.assignee, before.claimed) == (State.ASSIGNED, "B", False)
    assert before.wake_at == settled  # caches and ticks look again then
    st = doc.status(ex, settled, exclusive=excl)
    assert st.state is State.FAILED and st.assignee == "B"
    assert [(o.kind, o.node, o.at) for o in st.outcomes] == [("no_claim", "B", deadline)]
    assert st.faults == 1 and st.wake_at is None
    assert st.reasons[-1] == (
        f"B did not claim it by {deadline}; it was never reassigned: "
        "an exclusive task never runs twice"
    )
    # a cache kept from before wakes for it, with no new fact
    cache = Cache()
    assert derive_all(doc.view(), settled - 1, params=P, exclusive=excl, cache=cache)[ex] == (
        before
    )
    got = derive_all(doc.view(), settled, params=P, exclusive=excl, cache=cache)[ex]
    assert got == st
    # another node waits, then has nothing left to do (no new proposal)
    c = Scheduler("C", params=P)
    plan = c.tick(doc.view(), agents=[agent("c1")], now_ms=settled - 1, exclusive=excl)
    assert plan.effects == () and plan.wake_at == settled
    plan = c.tick(doc.view(), agents=[agent("c1")], now_ms=settled, exclusive=excl)
    assert plan.effects == () and plan.wake_at is None
    # B comes back too late (past its deadline, before the others call it failed): it
    # neither claims nor runs the task
    b = Scheduler("B", params=P)
    plan = b.tick(doc.view(), agents=[agent("b1")], now_ms=deadline + 5, exclusive=excl)
    assert plan.effects == ()


def test_a_claim_just_before_the_deadline_that_arrives_late_never_shows_failed() -> None:
    """B claims 100 ms before its deadline and its claim reaches C 50 ms after it: C must not
    have called the task failed meanwhile (a final state that a cancel or a watcher trusts)."""
    doc = Doc()
    ex, excl, deadline = _assigned_exclusive(doc)
    seen_by_c = doc.status(ex, deadline + 50, exclusive=excl)
    assert seen_by_c.state is State.ASSIGNED
    doc.apply("B", deadline - 100, Claim(ex, 1, "b1", None, 0.0, deadline - 100))
    assert doc.status(ex, deadline + 50, exclusive=excl).state is State.IN_PROGRESS


def test_a_busy_exclusive_assignee_claims_before_its_deadline_and_waits_for_a_slot() -> None:
    """B's only agent is busy when consensus assigns B the exclusive task: B claims it at
    once (it would fail at its deadline otherwise) and runs it when the slot frees."""
    doc = Doc()
    other, b = _running_task(doc)  # b1's one slot is taken
    ex, excl, _ = _assigned_exclusive(doc)
    b1 = [agent("b1", "py")]
    plan = b.tick(doc.view(), agents=b1, now_ms=300, exclusive=excl)
    (claim,) = only(plan, Claim)
    assert (claim.task_id, claim.agent, claim.at) == (ex, "b1", 300)
    assert not only(plan, Dispatch)
    doc.apply("B", 300, plan)
    assert doc.status(ex, 350, exclusive=excl).state is State.IN_PROGRESS  # claimed, waiting
    doc.apply("B", 400, b.finished(doc.view(), other, now_ms=400, output={"n": 1}))
    plan = b.tick(doc.view(), agents=b1, now_ms=450, exclusive=excl)
    assert [d.task_id for d in only(plan, Dispatch)] == [ex]


def test_an_exclusive_claim_in_time_runs_as_before() -> None:
    """The assignee claims before its deadline: in progress as ever, then done. The claim
    carries the time of the tick that found the deadline ahead, even when written later."""
    doc = Doc()
    ex, excl, deadline = _assigned_exclusive(doc)
    b = Scheduler("B", params=P)
    plan = b.tick(doc.view(), agents=[agent("b1")], now_ms=deadline - 1, exclusive=excl)
    assert [(e.task_id, e.at) for e in only(plan, Claim)] == [(ex, deadline - 1)]
    assert [e.task_id for e in only(plan, Dispatch)] == [ex]
    doc.apply("B", deadline + 20, plan)  # a slow write: the claim still counts
    st = doc.status(ex, deadline + 30, exclusive=excl)
    assert (st.state, st.assignee, st.claimed) == (State.IN_PROGRESS, "B", True)
    assert st.wake_at != deadline and not st.outcomes
    plan = b.tick(
        doc.view(),
        agents=[agent("b1")],
        now_ms=deadline + 40,
        exclusive=excl,
        finished=[Finished(ex, "out")],
    )
    doc.apply("B", deadline + 40, plan)
    assert doc.status(ex, deadline + 50, exclusive=excl).state is State.DONE


def test_an_exclusive_claim_after_the_deadline_does_not_count() -> None:
    """A claim written at or after the deadline (a clock behind, a scheduler that does not
    check) is ignored, and so is what its node submits: the task failed at the deadline
    (derived so once a claim made in time would have arrived, a lease's length later)."""
    doc = Doc()
    ex, excl, deadline = _assigned_exclusive(doc)
    doc.apply("B", deadline, Claim(ex, 1, "b1"))
    doc.apply("B", deadline + 10, Submit(ex, 1, 1, "b1", True, "out"))
    settled = deadline + P.lease_ms
    for now in (settled, settled + 100):
        st = doc.status(ex, now, exclusive=excl)
        assert st.state is State.FAILED and not st.claimed and st.accepted is None
        assert [(o.kind, o.at) for o in st.outcomes] == [("no_claim", deadline)]
    # until then the late claim does not count either: assigned, waiting
    for now in (deadline - 1, deadline, settled - 1):
        assert doc.status(ex, now, exclusive=excl).state is State.ASSIGNED
    # one millisecond earlier it would have counted
    doc2 = Doc()
    ex2, excl2, _ = _assigned_exclusive(doc2)
    doc2.apply("B", deadline - 1, Claim(ex2, 1, "b1"))
    assert doc2.status(ex2, deadline + 100, exclusive=excl2).state is State.IN_PROGRESS


def test_an_exclusive_proposal_carries_its_time() -> None:
    doc = Doc()
    ex = doc.create("A", "ex", contract=Contract(exclusive=True, max_attempts=1))
    plan = Scheduler("B", params=P).tick(doc.view(), agents=[agent("b1")], now_ms=4_321)
    assert only(plan, ProposeExclusive) == [ProposeExclusive(ex, "B", 4_321)]


def test_late_finish_after_losing_the_lease_goes_to_the_log_only() -> None:
    doc = Doc()
    tid, b = _running_task(doc)
    doc.apply("C", 1_300, Bid(tid, 2, "c1", 0.5))  # C saw B's lease expire
    plan = b.finished(doc.view(), tid, now_ms=1_310, output={"n": 1})
    assert only(plan, LateResult) and not only(plan, Submit)
    doc.apply("B", 1_310, plan)
    assert "B" not in doc.tasks[tid]["results"]
    assert doc.tasks[tid]["log"]["B"][-1]["kind"] == "late_result"


def test_work_ended_since_the_last_tick_is_submitted_by_the_tick_without_a_rerun() -> None:
    """Finished work goes into the next tick: its submission leads the plan (one entry with
    the rest), a lost attempt's result is a late result, and the task, still in progress in
    the view until the submission is written, is not dispatched again."""
    doc = Doc()
    tid, b = _running_task(doc)
    agents = [agent("b1", "py"), agent("b2", "py")]
    lost = doc.create("A", "v", 250, capabilities=("py",))
    doc.apply("B", 300, Bid(lost, 1, "b2", 0.9))
    plan = b.tick(doc.view(), agents=agents, now_ms=500)
    doc.apply("B", 500, plan)
    assert [d.task_id for d in only(plan, Dispatch)] == [lost]
    doc.apply("C", 850, Bid(lost, 2, "c1", 0.5))  # C took attempt 1 of ``lost`` for closed
    ended = [Finished(tid, {"n": 1}), Finished(lost, {"n": 2})]
    plan = b.tick(doc.view(), agents=agents, now_ms=900, finished=ended)
    sub, late = plan.effects[0], plan.effects[1]
    assert isinstance(sub, Submit) and (sub.task_id, sub.ok, sub.output) == (tid, True, {"n": 1})
    assert isinstance(late, LateResult) and late.task_id == lost
    assert not [e for e in plan.effects if isinstance(e, Dispatch) and e.task_id in (tid, lost)]
    assert tid not in b.running and lost not in b.running
    doc.apply("B", 900, plan)
    assert doc.status(tid, 910).state is State.DONE
    again = b.tick(doc.view(), agents=agents, now_ms=910, finished=ended)
    assert not only(again, Submit) and not only(again, LateResult)  # reported once only


def test_idle_reviewer_on_another_node_picks_up_a_review() -> None:
    doc = Doc()
    tid, b = _running_task(doc, contract=Contract(review_required=True))
    doc.apply("B", 300, b.finished(doc.view(), tid, now_ms=300, output={"n": 3}))
    rev = [agent("r", roles=("reviewer",))]
    assert not only(
        b.tick(doc.view(), agents=[agent("b1", "py"), *rev], now_ms=2_000), DispatchReview
    )
    c = Scheduler("C", params=P)
    plan = c.tick(doc.view(), agents=rev, now_ms=2_000)
    (d,) = only(plan, DispatchReview)
    assert d.payload["output"] == {"n": 3}
    out = c.review_finished(doc.view(), tid, now_ms=2_050, score=4, verdict="done")
    assert isinstance(out, Plan)
    doc.apply("C", 2_050, out)
    assert doc.status(tid, 2_050).state is State.DONE


# -- reputation --------------------------------------------------------------------------------


def test_reputation_is_derived_from_history_and_deterministic() -> None:
    doc = Doc()
    good = doc.create("A", "good", capabilities=("py",), contract=Contract(deadline_ms=1_000))
    bad = doc.create("A", "bad", capabilities=("py",), contract=Contract(max_attempts=1))
    doc.apply("B", 0, [Bid(good, 1, "b1", 0.5), Bid(bad, 1, "b2", 0.5)])
    doc.apply("B", 200, [Claim(good, 1, "b1", 5_000), Claim(bad, 1, "b2", 5_000)])
    doc.apply(
        "B", 400, [Submit(good, 1, 1, "b1", True, {}), Submit(bad, 1, 1, "b2", False, None, "x")]
    )
    doc.apply("C", 450, SubmitReview(good, 1, 1, "c", 5, "done"))
    st = derive_all(doc.view(), 500, params=P)
    rows = leaderboard(doc.view(), st)
    assert_tally_matches_the_fold(doc, 500)
    assert [(r["agent"], r["node"], r["done"], r["failed"]) for r in rows] == [
        ("b1", "B", 1, 0),
        ("b2", "B", 0, 1),
    ]
    assert rows[0]["avg_review"] == 5.0 and rows[0]["avg_latency_ms"] == 200
    rep = reputation(doc.view(), st)
    assert rep.score("B", "b1", ["py"]) > 0.5 > rep.score("B", "b2", ["py"])
    assert rep.score("NEW", "n", ["py"]) == 0.5
    # the same view in another order gives the same board
    shuffled = dict(reversed(list(doc.view().items())))
    assert leaderboard(shuffled, derive_all(shuffled, 500, params=P)) == rows
    # a node's claims about itself do not matter: only outcomes count
    doc.tasks[bad]["progress"]["B"] = {
        "attempt": 1,
        "round": 1,
        "at": 450,
        "message": "great success",
    }
    assert leaderboard(doc.view(), derive_all(doc.view(), 500, params=P)) == rows


def assert_tally_matches_the_fold(doc: Doc, now: int) -> None:
    """A tally that takes the tasks in one by one, then sees each changed or removed in turn,
    holds the table of a full fold after every step, and ends empty."""
    view = doc.view()
    st = derive_all(view, now, params=P)
    tally = Tally()
    for tid in sorted(view):
        tally.update(view, st, [tid])
    assert tally.reputation().leaderboard() == leaderboard(view, st)
    # a review the tally has not seen yet changes one task; then tasks go away one by one
    for tid in sorted(view):
        task = view[tid]
        if task.reviews:
            view = {**view, tid: dataclasses.replace(task, reviews={})}
            st = derive_all(view, now, params=P)
            tally.update(view, st, [tid])
            assert tally.reputation().stats == reputation(view, st).stats
    for tid in sorted(view):
        view = {t: v for t, v in view.items() if t != tid}
        tally.update(view, st, [tid])
        assert tally.reputation().stats == reputation(view, st).stats
    assert tally.reputation().stats == {}


# -- the cache gives the same answers ----------------------------------------------------------


def test_derivation_cache_matches_a_fresh_derivation() -> None:
    doc = Doc()
    tid, b = _running_task(doc, contract=Contract(review_required=True))
    other = doc.create("A", "o", deps=(tid,))
    for now in (300, 800, 1_199, 1_200, 1_500, 5_000):
        plan = b.tick(doc.view(), agents=[agent("b1", "py")], now_ms=now)
        if now == 300:
            doc.apply("B", now, plan)
        assert b.statuses == derive_all(doc.view(), now, params=P), now
    assert b.statuses[other].state is State.PENDING


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_incremental_derivation_matches_a_fresh_one_through_random_changes(seed: int) -> None:
    """The cache visits only what may have changed: across random histories (new tasks on
    known, unknown and later ids, parents, cycles, removals, exclusive decisions, recurring
    duplicates, bids, claims, results, controls and time passing) a cached derivation and a
    scheduler's statuses always equal a fresh derivation, and a tick's wake-up is never later
    than the fresh statuses ask for. What the cache says was restated is exactly the tasks
    whose status changed, and a reputation tally fed only those tasks (and the re-read ones)
    equals a full fold."""
    rng = random.Random(seed)
    doc = Doc()
    scheds = {n: Scheduler(n, params=P) for n in "BC"}
    agents = {n: [agent(n.lower() + "1", "py", conc=3)] for n in "BC"}
    cache = Cache()
    tally = Tally()
    derived: dict[str, Any] = {}
    told = 0  # steps where the cache could say what changed
    view: dict[str, Task] = {}
    excl: dict[str, Assignment] = {}
    ids: list[str] = []
    recurring = [period_suffix("nightly", k) for k in (2, 3)]
    # the schedule is decided part-way: which tasks are instances changes under the cache
    schedules: dict[str, Schedule] = {}
    saw_duplicate = False
    for sched in scheds.values():
        sched.schedules = schedules
    now = 0
    for step in range(300):
        if step == 120:
            schedules["nightly"] = Schedule("nightly", 1_000, "nightly", capabilities=("py",))
        now += rng.choice((0, 5, 60, 150, 700))
        touched: set[str] = set()
        r = rng.random()
        if r < 0.3 or not ids:
            creator = rng.choice("ABC")
            instance = rng.random() < 0.1
            suffix = rng.choice(recurring) if instance else f"t{step}"
            tid = f"{creator}:{suffix}"
            later = [f"{rng.choice('ABC')}:t{step + rng.randint(1, 4)}"] if step % 5 == 0 else []
            pool = [*ids[-12:], *later, *(["X:never"] if step % 31 == 0 else [])]
            deps = rng.sample(pool, min(len(pool), rng.choice((0, 1, 1, 2))))
            if step % 70 == 35:  # now and then a cycle, through a task that will change
                deps = [*ids[-1:], f"{creator}:c{step}"]
                doc.tasks[f"{creator}:c{step}"] = {
                    **copy.deepcopy(doc.tasks[ids[-1]]),
                    "deps": [tid],
                }
                touched.add(f"{creator}:c{step}")
            parent = rng.choice(ids[-12:]) if ids and rng.random() < 0.3 else None
            if instance:  # the schedule's template (now and then another title: no instance)
                deps, parent = [], None
            if tid not in doc.tasks:
                ids.append(tid)
            doc.tasks[tid] = {
                "title": "nightly" if instance and rng.random() < 0.8 else tid,
                "parent": parent,
                "deps": deps,
                "capabilities": ["py"],
                "priority": 0.0 if instance else float(rng.choice((0, 0, 1))),
                "contract": {"exclusive": not instance and rng.random() < 0.15},
                "creator": creator,
                "created_at": now,
                **{k: {} for k in ENTRY_KINDS},
                "log": {},
            }
            touched.add(tid)
        elif r < 0.33:
            gone = rng.choice(ids)
            doc.tasks.pop(gone, None)
            ids.remove(gone)
            touched.add(gone)
        elif r < 0.4:
            exclusive = [t for t in ids if view.get(t) and view[t].contract.exclusive]
            if exclusive:
                # proposed now or long ago: some assignees are past their claim deadline
                at = max(0, now - (P.exclusive_claim_ms - 200 if step % 3 == 0 else 0))
                excl[rng.choice(exclusive)] = Assignment(rng.choice("BC"), at)
        elif r < 0.43 and excl:
            excl.pop(rng.choice(sorted(excl)))
        elif r < 0.48:
            tid = rng.choice(ids)
            if tid in view:
                verb = rng.choice(("cancel", "pause", "resume"))
                creator = view[tid].creator
                fresh = derive_all(view, now, params=P)
                got = plan_control(view, fresh, tid, verb, node=creator, now_ms=now)
                if not isinstance(got, Refused):
                    doc.apply(creator, now, got)
                    touched.add(tid)
        for n, sched in scheds.items():
            if rng.random() < 0.5:
                continue
            plan = sched.tick(view, agents=agents[n], now_ms=now, exclusive=excl)
            fresh = derive_all(view, now, params=P, exclusive=excl, schedules=schedules)
            assert sched.statuses == fresh, step
            wakes = [w for w in (s.wake_at for s in fresh.values()) if w is not None and w > now]
            if wakes:
                assert plan.wake_at is not None and plan.wake_at <= min(wakes), step
            done = [e for e in plan.effects if e.task_id in doc.tasks]  # not removed since
            doc.apply(n, now, [e for e in done if not isinstance(e, Cancel)])
            touched |= {e.task_id for e in done}
            for e in done:
                if isinstance(e, Dispatch) and rng.random() < 0.7:
                    sched.running.pop(e.task_id, None)
                    doc.apply(n, now, Submit(e.task_id, e.attempt, 1, e.agent, True, {"n": 1}))
        if step % 25 == 0:  # as after a sync round: every task a new object
            touched |= set(doc.tasks)
        view = build_view(doc.tasks, view, touched)
        before = dict(derived)
        derived = derive_all(view, now, params=P, exclusive=excl, cache=cache, schedules=schedules)
        assert derived == derive_all(view, now, params=P, exclusive=excl, schedules=schedules)
        restated = cache.take_restated()
        if restated is not None:
            told += 1
            assert restated == {
                t for t in before.keys() | derived.keys() if before.get(t) != derived.get(t)
            }
        tally.update(view, derived, None if restated is None else restated | touched)
        assert tally.reputation().stats == reputation(view, derived).stats, step
        saw_duplicate = saw_duplicate or any(
            "duplicate of" in s.reasons[0] for s in derived.values() if s.reasons
        )
    states = {s.state for s in derived.values()}
    assert {State.DONE, State.BLOCKED, State.CANCELLED} <= states, states
    assert saw_duplicate, "no recurring duplicate was derived"
    assert told > 20 and any(s.done for s in tally.reputation().stats.values()), told


# -- parsing the replicated document -----------------------------------------------------------


def test_view_parsing_tolerates_yrs_floats_and_drops_malformed_entries() -> None:
    raw = {
        "A:t": {
            "title": "t",
            "creator": "A",
            "created_at": 5.0,
            "deps": ["A:x", "A:x", 3],
            "priority": 2.0,
            "contract": {"max_attempts": 2.0, "deadline_ms": 100.0, "review_required": True},
            "bids": {"B": {"attempt": 1.0, "agent": "b", "score": 0.5, "at": 1.0}, "C": "garbage"},
            "reviews": {
                "D": {
                    "attempt": 1,
                    "round": 1,
                    "agent": "d",
                    "score": 9,
                    "verdict": "done",
                    "at": 1,
                }
            },
            "log": {"B": [{"kind": "claim"}, "junk"]},
        },
        "A:broken": {"title": 3},
        "A:notadict": [],
    }
    view = build_view(raw)
    assert list(view) == ["A:t"]
    t = view["A:t"]
    assert (t.created_at, t.deps, t.priority) == (5, ("A:x",), 2.0)
    assert (t.contract.max_attempts, t.contract.deadline_ms, t.contract.review_required) == (
        2,
        100,
        True,
    )
    assert list(t.bids) == ["B"] and t.bids["B"].attempt == 1
    assert t.reviews == {}  # a score of 9 is no review
    assert t.log["B"] == ({"kind": "claim"},)
    # incremental: untouched tasks keep their objects (what the derivation cache keys on)
    raw["A:u"] = {"title": "u", "creator": "A", "created_at": 6}
    again = build_view(raw, view, ["A:u"])
    assert again["A:t"] is t and "A:u" in again


def _done_task(tid: str, node: str, now: int) -> dict[str, Any]:
    """A done task as the document holds it: created, bid on, claimed and submitted by
    ``node``, whose log holds its claim and result records."""
    raw: dict[str, Any] = {"title": tid, "creator": "A", "created_at": now, "capabilities": ["py"]}
    for w in (
        writes(Bid(tid, 1, "a", 0.5), now)
        + writes(Claim(tid, 1, "a", None), now)
        + writes(Submit(tid, 1, 1, "a", True, {"n": 1}), now)
    ):
        if w.kind == "log":
            raw.setdefault("log", {}).setdefault(node, []).append(w.value)
        else:
            raw.setdefault(w.kind, {})[node] = w.value
    return raw


def test_a_log_record_of_any_shape_matches_no_kind_and_breaks_nothing() -> None:
    # A member writes what it likes into its own log: a record whose kind is a list made the
    # record lookup raise (unhashable), and with it every node's derivation of the task.
    now = 1_000
    raw = {"A:t": _done_task("A:t", "B", now)}
    raw["A:t"]["log"]["C"] = [{"kind": [1]}, {"kind": {"x": 1}}, {"kind": None}, {"at": 1}]
    view = build_view(raw)
    task = view["A:t"]
    assert [n for n, _ in task.records()] == ["B", "B", "C", "C", "C", "C"]
    assert [n for n, _ in task.records(("claim", "result"))] == ["B", "B"]
    assert task.records(("pause",)) == []
    assert derive_all(view, now + 10)["A:t"].state is State.DONE


def test_hostile_task_maps_never_break_the_scheduler_or_reputation() -> None:
    """Seeded: done tasks whose fields, entries and log records are replaced by junk of every
    shape (what a Byzantine member could write under its own keys, or a creator into its
    task) go through parsing, derivation, a scheduler step and the reputation tally."""
    rng = random.Random(7)
    atoms: list[Any] = [None, True, 0, -1, 2**70, 1.5, float("nan"), float("inf"), "", "x"]
    atoms += ["claim", "result", "pause", "cancel", "release", "reassign", "done", [], [1], {}]
    keys = ["kind", "at", "attempt", "agent", "ok", "round", "score", "verdict", "output"]
    keys += ["expires_at", "released", "fraction"]

    def junk() -> Any:
        return random_json(rng, atoms, keys, max_depth=2, atom=0.6, array=0.8)

    def mutate(obj: Any, depth: int = 0) -> None:
        if isinstance(obj, dict) and obj:
            k = rng.choice(list(obj))
            if rng.random() < 0.5 or depth > 3:
                obj[k] = junk()
            else:
                mutate(obj[k], depth + 1)
        elif isinstance(obj, list) and obj:
            i = rng.randrange(len(obj))
            if rng.random() < 0.5:
                obj[i] = junk()
            else:
                mutate(obj[i], depth + 1)

    fields = ["deps", "parent", "contract", "capabilities", "priority", "title", "bids"]
    fields += ["claims", "leases", "results", "reviews", "log", "progress"]
    agents = [LocalAgent("a", frozenset({"executor"}), frozenset({"py"}), 0.0, 4)]
    now = 1_000_000
    for _ in range(600):
        raw = {f"A:h{i}": _done_task(f"A:h{i}", "B", now) for i in range(4)}
        raw["A:h1"]["deps"] = ["A:h0"]
        raw["A:h2"]["parent"] = "A:h0"
        for _ in range(rng.randint(1, 4)):
            task = raw[rng.choice(list(raw))]
            if rng.random() < 0.3:
                task[rng.choice(fields)] = junk()
            else:
                mutate(task)
            log = task.get("log")
            if isinstance(log, dict) and isinstance(log.get("C", []), list):
                log.setdefault("C", []).append(junk())
        view = build_view(raw)
        sched = Scheduler("B")
        sched.tick(view, agents=agents, now_ms=now + 10_000)
        tally = Tally()
        tally.update(view, sched.statuses)
        assert tally.reputation().leaderboard() == leaderboard(view, sched.statuses)


# -- shortcuts on hot paths give what the plain rules give -------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_winner_and_window_shortcuts_match_the_plain_rules(seed: int) -> None:
    """``best`` hashes only the nodes tied at the top score and ``window`` drops late bids in
    place: across random bids (ties, late bids, several attempts) they give what ranking every
    node by ``rank_key`` and filtering afresh give."""
    rng = random.Random(seed)
    for _ in range(500):
        bids = {
            n: BidEntry(
                rng.randint(1, 2), "a", rng.choice((0.5, 0.5, 0.7, 0.25)), rng.randint(0, 9)
            )
            for n in rng.sample("ABCDEFG", rng.randint(0, 6))
        }
        among = [n for n in "ABCDEFGH" if rng.random() < 0.8]
        nodes = [n for n in among if n in bids]
        plain = min(nodes, key=lambda n: rank_key("T:x", 1, n, bids[n])) if nodes else None
        assert best("T:x", 1, bids, among) == plain
        for attempt in (1, 2):
            mine = {n: b for n, b in bids.items() if b.attempt == attempt}
            w = window(bids, attempt, 3)
            if not mine:
                assert w is None
                continue
            opened = min(b.at for b in mine.values())
            counted = {n: b for n, b in mine.items() if b.at <= opened + 3}
            assert w == Window(attempt, opened, opened + 3, opened + 6, counted)
            assert list(w.bids) == list(counted)


def test_the_kept_priority_order_matches_a_fresh_sort() -> None:
    """The scheduler re-keys only the tasks a view changed and the newly live ones: through
    random changes (priorities, new tasks, tasks leaving and rejoining the live set, views
    that cannot say what changed) its order equals a fresh sort by the documented key."""
    rng = random.Random(5)
    doc = Doc()
    sched = Scheduler("B", params=P)
    view = build_view(doc.tasks)
    for step in range(200):
        touched: set[str] = set()
        for _ in range(rng.randint(0, 3)):
            tid = f"A:t{rng.randint(0, 30)}"
            doc.tasks[tid] = {
                "title": tid,
                "creator": "A",
                "created_at": rng.choice((0, 500, 1_500, 9_000)),
                "priority": float(rng.choice((0, 0, 1, 2))),
                **{k: {} for k in ENTRY_KINDS},
                "log": {},
            }
            touched.add(tid)
        view = build_view(doc.tasks) if step % 17 == 0 else build_view(doc.tasks, view, touched)
        live = {t for t in view if rng.random() < 0.8}
        keys = {
            t: (
                -view[t].priority,
                view[t].created_at // SPREAD_MS,
                hashlib.blake2b(t.encode(), key=b"B", digest_size=8).digest(),
            )
            for t in live
        }
        assert sched._order(view, live) == sorted(live, key=keys.__getitem__), step


def test_a_view_knows_what_changed_since_a_few_views_back() -> None:
    """Views built between two derivations (the API refreshes the view to answer a call)
    keep the link to the last derived one: each view names a superset of the tasks that
    differ from each of its last few ancestors, and a cached derivation that skipped views
    still equals a fresh one."""
    rng = random.Random(3)
    doc = Doc()
    views = [build_view(doc.tasks)]
    cache = Cache()
    linked = 0
    for step in range(200):
        touched: set[str] = set()
        for _ in range(rng.randint(0, 3)):
            tid = f"A:t{rng.randint(0, 40)}"
            if rng.random() < 0.1:
                doc.tasks.pop(tid, None)
            else:
                doc.tasks[tid] = {
                    "title": tid,
                    "creator": "A",
                    "created_at": step,
                    "capabilities": ["py"],
                    "deps": [f"A:t{rng.randint(0, 40)}"] if rng.random() < 0.2 else [],
                    **{k: {} for k in ENTRY_KINDS},
                    "log": {},
                }
            touched.add(tid)
        new = build_view(doc.tasks, views[-1], touched)
        views.append(new)
        assert changed_since(new, views[-2].serial) == touched
        for old in views[-12:-1]:
            got = changed_since(new, old.serial)
            if got is not None:
                linked += 1
                assert {t for t in old.keys() | new.keys() if old.get(t) is not new.get(t)} <= got
        if rng.random() < 0.3:
            assert derive_all(new, step, params=P, cache=cache) == derive_all(new, step, params=P)
    assert linked > 1_000


def test_a_role_change_makes_a_running_node_derive_as_a_restarted_one() -> None:
    """A supervisor's cancel counts while it holds task.cancel. Once the decided log revokes
    the role, a long-running node (its derivation cache full) must derive what a node started
    now derives from the same view: the cache notices the changed answer and derives anew."""
    from mossnode.protocols.tasks import control
    from mossnode.protocols.tasks.effects import Control

    doc = Doc()
    tid = doc.create("A", "t", now=0)
    doc.apply("S", 10, Control(tid, control.record("cancel", 10, "stop")))
    view = doc.view()
    roles = {"S": {"task.cancel"}}

    def authority(node: str, permission: str) -> bool:  # the decided log's current answer
        return permission in roles.get(node, set())

    running = Scheduler("X", params=P)
    running.tick(view, agents=[agent("x")], now_ms=20, authority=authority)
    assert running.statuses[tid].state is State.CANCELLED

    roles["S"] = set()  # the decided log revokes S's supervisor role: the view is unchanged
    running.tick(view, agents=[agent("x")], now_ms=30, authority=authority)
    fresh = Scheduler("Y", params=P)
    fresh.tick(view, agents=[agent("x")], now_ms=30, authority=authority)
    assert running.statuses[tid].state == fresh.statuses[tid].state != State.CANCELLED

    cached = running.statuses[tid]  # a decision that changes no answer keeps the cache
    running.tick(view, agents=[agent("x")], now_ms=30, authority=authority)
    assert running.statuses[tid] is cached


def test_an_exclusive_task_sent_back_for_rework_waits_for_a_busy_agent() -> None:
    """While an exclusive task is in review its slot is free, so its agent takes other work.
    A rework verdict that then finds the agent busy must wait for the slot: releasing the
    attempt would fail the task ("runs at most once") though nothing ran twice."""
    p2 = dataclasses.replace(P, review_delay_ms=0)
    doc = Doc()
    x = doc.create("A", "x", now=0, contract=Contract(exclusive=True, review_required=True))
    excl = {x: Assignment("N", 0)}
    n, r = Scheduler("N", params=p2), Scheduler("R", params=p2)
    agents = [agent("a", conc=1)]

    def tick_n(now: int, **kw: Any) -> Plan:
        plan = n.tick(doc.view(), agents=agents, now_ms=now, exclusive=excl, **kw)
        doc.apply("N", now, plan)
        return plan

    assert only(tick_n(10), Dispatch)
    tick_n(100, finished=[Finished(x, "v1")])  # submitted: in review, the slot is free
    y = doc.create("A", "y", now=110)
    for now in (120, 330):
        tick_n(now)  # N bids on y, wins it, runs it
    assert y in n.running
    r.tick(doc.view(), agents=[agent("r", roles=("reviewer",))], now_ms=340, exclusive=excl)
    verdict = r.review_finished(
        doc.view(), x, now_ms=350, score=3, verdict="rework", exclusive=excl
    )
    doc.apply("R", 350, verdict)
    assert not only(tick_n(360), Release)
    assert derive_all(doc.view(), 400, params=p2, exclusive=excl)[x].state is State.REWORK
    # y ends: the slot frees and x's rework runs, in that tick or the next
    ended = only(tick_n(500, finished=[Finished(y, "done")]), Dispatch)
    assert [d.task_id for d in ended + only(tick_n(600), Dispatch)] == [x]
