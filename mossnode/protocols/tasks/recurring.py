"""Recurring tasks: created by the swarm itself, one live instance per period.

A schedule (``id``, ``interval_ms``, ``start_ms``, a task template) comes from swarm config or a
decided log entry, so every node holds the same list. Period ``p`` starts at
``start_ms + p * interval_ms``; its instance's id suffix is ``period_suffix(id, p)``, a hash of
schedule id and period index that every node computes alike.

Task ids embed their creator (``<creator>:<suffix>``: the CRDT owner rules read the writer
from the id), so two nodes creating "the same" instance create two tasks. To keep that rare,
the nodes rank themselves per period by a hash of (suffix, node): the first creates at the
period start, the k-th only if no instance is visible ``k * grace_ms`` later. If duplicates still
appear (partition), exactly one is canonical - the one whose creator ranks first - and every
replica derives the others as cancelled (:func:`duplicates`), so each period's work is live once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any

from mossnode.record import value

from .model import Contract, TaskView

PREFIX = "r-"
_HASH_CHARS = 24


@value
class Schedule:
    id: str
    interval_ms: int
    title: str
    start_ms: int = 0
    end_ms: int | None = None
    spec: Any = None
    input: Any = None
    capabilities: tuple[str, ...] = ()
    role: str | None = None
    priority: float = 0.0
    contract: Contract = field(default_factory=Contract)

    def __post_init__(self) -> None:
        if self.interval_ms <= 0:
            raise ValueError("interval_ms must be positive")


def period_at(schedule: Schedule, now_ms: int) -> int | None:
    """Index of the period running at ``now_ms``, or None outside the schedule."""
    if now_ms < schedule.start_ms or (schedule.end_ms is not None and now_ms >= schedule.end_ms):
        return None
    return (now_ms - schedule.start_ms) // schedule.interval_ms


def period_start(schedule: Schedule, period: int) -> int:
    return schedule.start_ms + period * schedule.interval_ms


def period_suffix(schedule_id: str, period: int) -> str:
    """The task id suffix of a period's instance: the same on every node."""
    digest = hashlib.sha256(f"mossnode/recurring\0{schedule_id}\0{period}".encode()).hexdigest()
    return PREFIX + digest[:_HASH_CHARS]


def _is_recurring_suffix(suffix: str) -> bool:
    if not suffix.startswith(PREFIX) or len(suffix) != len(PREFIX) + _HASH_CHARS:
        return False
    return all(c in "0123456789abcdef" for c in suffix[len(PREFIX) :])


def _rank_key(suffix: str, node: str) -> str:
    return hashlib.sha256(f"{suffix}\0{node}".encode()).hexdigest()


def makers(suffix: str, members: Iterable[str]) -> list[str]:
    """Members in the order in which they should create the instance."""
    return sorted(set(members), key=lambda n: (_rank_key(suffix, n), n))


def _split(tid: str) -> tuple[str, str] | None:
    creator, sep, suffix = tid.rpartition(":")
    if not sep or not creator or not _is_recurring_suffix(suffix):
        return None
    return creator, suffix


def instances(view: TaskView, suffix: str) -> list[str]:
    """Visible instances of one period (ids ending in ``:<suffix>``)."""
    return sorted(tid for tid in view if tid.endswith(":" + suffix) and _split(tid) is not None)


def duplicates(view: TaskView) -> dict[str, str]:
    """``{duplicate task id: canonical task id}`` over all recurring instances in the view."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for tid in view:
        if ":" + PREFIX not in tid:
            continue
        split = _split(tid)
        if split is not None and view[tid].creator == split[0]:
            groups.setdefault(split[1], []).append((split[0], tid))
    out: dict[str, str] = {}
    for suffix, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda ct: (_rank_key(suffix, ct[0]), ct[0]))
        canonical = members[0][1]
        for _, tid in members[1:]:
            out[tid] = canonical
    return out


@value
class Due:
    """An instance this node should create now (``suffix`` under its own peer id)."""

    schedule: Schedule
    period: int
    suffix: str

    def fields(self, now_ms: int) -> dict[str, Any]:
        """Core fields for the create call (same template on every node)."""
        s = self.schedule
        return {
            "title": s.title,
            "spec": s.spec,
            "input": s.input,
            "parent": None,
            "deps": [],
            "capabilities": list(s.capabilities),
            "role": s.role,
            "priority": s.priority,
            "contract": s.contract.to_raw(),
        }


def due(
    schedules: Sequence[Schedule],
    view: TaskView,
    me: str,
    members: Iterable[str],
    now_ms: int,
    grace_ms: int,
) -> tuple[list[Due], int | None]:
    """Instances ``me`` should create now, and the next time to ask again.

    Only the current period is considered: a period missed entirely (the whole swarm down) is
    skipped, not backfilled.
    """
    ranked_members = sorted(set(members) | {me})
    out: list[Due] = []
    wake: list[int] = []
    for s in schedules:
        p = period_at(s, now_ms)
        if p is None:
            if now_ms < s.start_ms:
                wake.append(s.start_ms)
            continue
        nxt = period_start(s, p + 1)
        if s.end_ms is None or nxt < s.end_ms:
            wake.append(nxt)
        suffix = period_suffix(s.id, p)
        if instances(view, suffix):
            continue
        rank = makers(suffix, ranked_members).index(me)
        at = period_start(s, p) + rank * grace_ms
        if now_ms >= at:
            out.append(Due(s, p, suffix))
        else:
            wake.append(at)
    return out, (min(wake) if wake else None)


def by_suffix(view: TaskView) -> Mapping[str, list[str]]:
    """All recurring instances grouped by period suffix (for status displays)."""
    groups: dict[str, list[str]] = {}
    for tid in sorted(view):
        split = _split(tid)
        if split is not None:
            groups.setdefault(split[1], []).append(tid)
    return groups
