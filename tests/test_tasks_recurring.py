"""Recurring tasks, pure: makers take turns per period, duplicates from a partition leave one
live instance, a period's place cannot be taken by other work, and nothing runs early.
Deterministic: plain-dict documents and a given clock (see test_tasks_core.Doc)."""

from __future__ import annotations

from typing import Any

import pytest
from test_tasks_core import Doc, agent, only

from mossnode.protocols.tasks import (
    Bid,
    Contract,
    Control,
    Create,
    Params,
    Schedule,
    Scheduler,
    State,
    derive_all,
    period_suffix,
)
from mossnode.protocols.tasks.recurring import index, makers
from mossnode.protocols.tasks.scheduler import RECURRING_GRACE_MS
from mossnode.protocols.tasks.schedules import parse, payload

P = Params(settle_ms=100, lease_ms=1_000, claim_timeout_ms=500)
NIGHTLY = Schedule("nightly", 60_000, "report", start_ms=0, capabilities=("py",))
SCHEDULES = {"nightly": NIGHTLY}
MEMBERS = ["n1", "n2", "n3"]


def scheduler(me: str, schedules: dict[str, Schedule] | None = None) -> Scheduler:
    s = Scheduler(me, params=P)
    s.schedules = SCHEDULES if schedules is None else schedules
    return s


def creates(s: Scheduler, doc: Doc, now: int, members: list[str] = MEMBERS) -> list[Create]:
    return only(s.tick(doc.view(), agents=[], now_ms=now, makers=members), Create)


def test_the_first_maker_starts_a_period_and_the_others_wait_their_turn() -> None:
    doc = Doc()
    order = makers(period_suffix("nightly", 2), MEMBERS)
    start = 2 * 60_000
    got = {n: creates(scheduler(n), doc, start) for n in MEMBERS}
    assert [n for n in MEMBERS if got[n]] == [order[0]]
    (c,) = got[order[0]]
    assert c.task_id == f"{order[0]}:{period_suffix('nightly', 2)}"
    assert c.fields == NIGHTLY.fields()
    # the second maker waits a grace period; with nothing visible by then it creates
    second = scheduler(order[1])
    plan = second.tick(doc.view(), agents=[], now_ms=start, makers=MEMBERS)
    assert not only(plan, Create) and plan.wake_at == start + RECURRING_GRACE_MS
    assert creates(second, doc, start + RECURRING_GRACE_MS)
    # once the first maker's instance is visible nobody else creates this period
    doc.apply(order[0], start, c)
    for n in MEMBERS:
        assert not creates(scheduler(n), doc, start + 5 * RECURRING_GRACE_MS)
    # a node that may not create tasks never starts one, and a swarm-wide pause skips
    assert not creates(scheduler("outsider"), Doc(), start, MEMBERS)
    plan = scheduler(order[0]).tick(
        Doc().view(), agents=[], now_ms=start, paused=True, makers=MEMBERS
    )
    assert not only(plan, Create)


def test_the_next_period_gets_its_own_instance_and_no_backfill() -> None:
    doc = Doc()
    overlapping = {"nightly": NIGHTLY.__class__(**{**_fields(NIGHTLY), "overlap": True})}
    for period in (0, 1, 5):
        at = period * 60_000 + 10 * RECURRING_GRACE_MS  # every maker's turn has come
        (c,) = creates(scheduler("n1", overlapping), doc, at)
        assert c.suffix == period_suffix("nightly", period)
        doc.apply("n1", at, c)
    # periods 2-4 passed while the swarm was down: skipped, not created now
    assert sorted(index(doc.view(), overlapping).periods) == sorted(
        period_suffix("nightly", p) for p in (0, 1, 5)
    )


def _instance(doc: Doc, node: str, period: int, now: int, **change: Any) -> str:
    suffix = period_suffix("nightly", period)
    doc.apply(node, now, Create(f"{node}:{suffix}", suffix, {**NIGHTLY.fields(), **change}))
    return f"{node}:{suffix}"


def test_duplicates_from_a_partition_leave_one_live_instance_everywhere() -> None:
    doc = Doc()
    start = 3 * 60_000
    made = [_instance(doc, n, 3, start) for n in MEMBERS]  # each side of a partition made one
    canonical = f"{makers(period_suffix('nightly', 3), MEMBERS)[0]}:{period_suffix('nightly', 3)}"
    st = derive_all(doc.view(), start + 1, params=P, schedules=SCHEDULES)
    live = [t for t in made if st[t].state is not State.CANCELLED]
    assert live == [canonical]
    for t in made:
        if t != canonical:
            assert st[t].reasons == (f"duplicate of recurring instance {canonical}",)
    # without the schedule (another swarm's rules) they are three ordinary tasks
    plain = derive_all(doc.view(), start + 1, params=P)
    assert all(plain[t].state is State.PENDING for t in made)


def test_a_task_with_an_instance_id_but_other_content_takes_no_period() -> None:
    doc = Doc()
    suffix = period_suffix("nightly", 4)
    start = 4 * 60_000
    # the maker ranked first for the period writes other work under the period's id
    first = makers(suffix, MEMBERS)[0]
    forged = _instance(doc, first, 4, start, title="something else")
    # it does not count as the period's instance: the next maker still starts it ...
    second = makers(suffix, MEMBERS)[1]
    (c,) = creates(scheduler(second), doc, start + RECURRING_GRACE_MS)
    doc.apply(second, start + RECURRING_GRACE_MS, c)
    # ... and, though its creator ranks first, it cancels nothing: both are live
    st = derive_all(doc.view(), start + 3_000, params=P, schedules=SCHEDULES)
    assert st[forged].state is State.PENDING and st[c.task_id].state is State.PENDING
    assert index(doc.view(), SCHEDULES).periods == {suffix: c.task_id}
    # the same holds for every core field that differs from the template
    for change in (
        {"input": {"x": 1}},
        {"capabilities": ["py", "gpu"]},
        {"priority": 5.0},
        {"contract": Contract(max_attempts=9).to_raw()},
        {"deps": [c.task_id]},
    ):
        other = Doc()
        t = _instance(other, first, 4, start, **change)
        assert index(other.view(), SCHEDULES).starts == {}, change
        assert creates(scheduler(second), other, start + RECURRING_GRACE_MS), (change, t)


def test_an_instance_created_before_its_period_waits_for_it() -> None:
    doc = Doc()
    early = _instance(doc, "n1", 7, now=0)  # period 7 starts at 420 s
    st = derive_all(doc.view(), 1_000, params=P, schedules=SCHEDULES)[early]
    assert st.state is State.PENDING and not st.ready and st.wake_at == 7 * 60_000
    assert st.reasons == (f"its recurring period starts at {7 * 60_000}",)
    b = scheduler("n2")
    assert not only(b.tick(doc.view(), agents=[agent("b", "py")], now_ms=1_000), Bid)
    plan = b.tick(doc.view(), agents=[agent("b", "py")], now_ms=7 * 60_000)
    assert [e.task_id for e in only(plan, Bid)] == [early]


def test_a_schedule_decided_later_is_noticed_by_the_derivation_cache() -> None:
    doc = Doc()
    made = [_instance(doc, n, 1, 60_000) for n in MEMBERS]
    schedules: dict[str, Schedule] = {}
    s = scheduler("n1", schedules)
    before = s.derive(doc.view(), 61_000)
    assert all(before[t].state is State.PENDING for t in made)
    schedules["nightly"] = NIGHTLY  # the decided log moved on: the same map, filled in place
    after = s.derive(doc.view(), 61_000)
    assert after == derive_all(doc.view(), 61_000, params=P, schedules=schedules)
    assert sum(after[t].state is State.CANCELLED for t in made) == 2


def test_a_removed_schedule_starts_nothing_and_keeps_its_duplicates_cancelled() -> None:
    doc = Doc()
    made = [_instance(doc, n, 1, 60_000) for n in MEMBERS]
    gone = {"nightly": NIGHTLY.__class__(**{**_fields(NIGHTLY), "removed": True})}
    assert not creates(scheduler("n1", gone), doc, 2 * 60_000 + 10 * RECURRING_GRACE_MS)
    st = derive_all(doc.view(), 61_000, params=P, schedules=gone)
    assert sum(st[t].state is State.CANCELLED for t in made) == 2


def test_a_period_waits_while_the_last_instance_is_still_live() -> None:
    """Without ``overlap`` a period starts only once the earlier instance has ended (a
    template no agent can run would otherwise pile up a pending task per period); one whose
    whole span passes with it live is skipped."""
    doc = Doc()
    (c,) = creates(scheduler("n1"), doc, 10 * RECURRING_GRACE_MS)
    doc.apply("n1", 10 * RECURRING_GRACE_MS, c)  # period 0's instance: pending, nobody runs it
    for now in (60_000 + 10 * RECURRING_GRACE_MS, 119_999):
        plan = scheduler("n1").tick(doc.view(), agents=[], now_ms=now, makers=MEMBERS)
        assert not only(plan, Create) and plan.wake_at == 120_000
    # it ends (cancelled by its creator) within period 1: period 1 starts, late
    doc.apply("n1", 100_000, Control(c.task_id, {"kind": "cancel", "at": 100_000, "reason": ""}))
    (late,) = creates(scheduler("n1"), doc, 100_001)
    assert late.suffix == period_suffix("nightly", 1)
    # an overlapping schedule starts every period on time
    overlapping = {"nightly": NIGHTLY.__class__(**{**_fields(NIGHTLY), "overlap": True})}
    other = Doc()
    other.apply("n1", 0, c)
    assert creates(scheduler("n1", overlapping), other, 60_000 + 10 * RECURRING_GRACE_MS)


def test_a_schedule_ends_at_end_ms() -> None:
    short = {"s": Schedule("s", 1_000, "tick", start_ms=10_000, end_ms=12_000, overlap=True)}
    doc = Doc()
    plan = scheduler("n1", short).tick(doc.view(), agents=[], now_ms=0, makers=["n1"])
    assert not only(plan, Create) and plan.wake_at == 10_000
    for now, period in ((10_000, 0), (11_500, 1)):
        (c,) = creates(scheduler("n1", short), doc, now, ["n1"])
        assert c.suffix == period_suffix("s", period)
        doc.apply("n1", now, c)
    plan = scheduler("n1", short).tick(doc.view(), agents=[], now_ms=12_000, makers=["n1"])
    assert not only(plan, Create) and plan.wake_at is None


def _fields(s: Schedule) -> dict[str, Any]:
    return {name: getattr(s, name) for name in s.__slots__}


# -- the decision's payload ------------------------------------------------------------------


def _payload(**change: Any) -> dict[str, Any]:
    base = payload(NIGHTLY)
    task = {**base["task"], **change.pop("task", {})}
    return {**base, **change, "task": task}


def test_a_schedule_payload_reads_back_as_the_schedule() -> None:
    assert parse(payload(NIGHTLY)) == NIGHTLY
    got = parse(_payload(end_ms=600_000, task={"input": {"n": 1}, "role": "executor"}))
    assert not isinstance(got, str) and got.end_ms == 600_000 and got.input == {"n": 1}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"id": "-x"}, "payload.id must be 1-64"),
        ({"id": "a" * 65}, "payload.id must be 1-64"),
        ({"interval_ms": 999}, "payload.interval_ms must be an integer 1000-"),
        ({"interval_ms": 1.5e3}, "payload.interval_ms must be an integer"),
        ({"start_ms": -1}, "payload.start_ms must be a time"),
        ({"end_ms": 0}, "payload.end_ms must be null or a time after start_ms"),
        ({"task": {"title": ""}}, "payload.task.title must be 1-500 characters"),
        ({"task": {"deps": ["x:y"]}}, "payload.task must be an object with fields among"),
        ({"task": {"capabilities": ["-bad"]}}, "payload.task: capabilities are 1-63"),
        ({"task": {"priority": "high"}}, "payload.task.priority must be a number"),
        ({"task": {"contract": {"max_attempts": 0}}}, "payload.task.contract: max_attempts"),
        (
            {"task": {"contract": {"confidential": ["executor"]}}},
            "a schedule's tasks cannot be confidential",
        ),
        # what Yrs cannot store would fail every maker's write of every instance
        ({"task": {"input": {"n": 2**64}}}, "payload.task.input.n: integer out of range"),
        ({"task": {"contract": {"deadline_ms": 1e308}}}, "payload.task.contract.deadline_ms: int"),
        ({"task": {"priority": 10**400}}, "payload.task.priority: integer out of range"),
        ({"bogus": 1}, "payload fields are"),
        (
            {"task": {"input": 3, "contract": {"input_schema": {"type": "string"}}}},
            "payload.task: input violates input_schema",
        ),
    ],
)
def test_a_bad_schedule_payload_is_refused_with_its_reason(
    change: dict[str, Any], error: str
) -> None:
    got = parse(_payload(**change))
    assert isinstance(got, str) and got.startswith(error), got


def test_the_cache_follows_instances_that_stop_being_instances() -> None:
    """The index is kept up to date task by task: a duplicate rewritten with other content
    is an ordinary live task, and a canonical instance rewritten hands its period to the next
    duplicate, in a cached derivation as in a fresh one."""
    doc = Doc()
    for n in MEMBERS:
        _instance(doc, n, 1, 60_000)
    suffix = period_suffix("nightly", 1)
    first, second, third = (f"{n}:{suffix}" for n in makers(suffix, MEMBERS))
    s = scheduler("n1")
    s.derive(doc.view(), 61_000)
    expect = [
        (second, {first: State.PENDING, second: State.PENDING, third: State.CANCELLED}),
        (first, {first: State.PENDING, second: State.PENDING, third: State.PENDING}),
    ]
    for now, (rewrite, states) in enumerate(expect, start=61_001):
        doc.tasks[rewrite] = {**doc.tasks[rewrite], "title": "other work"}
        view = doc.view()
        got = s.derive(view, now)
        assert got == derive_all(view, now, params=P, schedules=SCHEDULES)
        assert {t: got[t].state for t in states} == states
    assert s.recurring().periods == {suffix: third} and s.recurring().dups == {}
