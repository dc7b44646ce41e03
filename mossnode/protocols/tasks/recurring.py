"""Recurring tasks: created by the swarm itself, one live instance per period.

A schedule (``id``, ``interval_ms``, ``start_ms``, a task template) is a decided log entry
(:mod:`.schedules`), so every node holds the same list. Period ``p`` starts at
``start_ms + p * interval_ms``; its instance's id suffix is ``period_suffix(id, p)``:
``r-<hash of the schedule id>-<p>``, which every node computes alike and reads back.

Task ids embed their creator (``<creator>:<suffix>``: the CRDT owner rules read the writer
from the id), so two nodes creating "the same" instance create two tasks. To keep that rare,
the makers (members that may create tasks) rank themselves per period by a hash of
(suffix, node): the first creates at the period start, the k-th only if no instance is visible
``k * grace_ms`` later. If duplicates still appear (partition), exactly one is canonical - the
one whose creator ranks first - and every replica derives the others as cancelled
(:func:`index`), so each period's work is live once.

A task counts as an instance only if its id names a known schedule and a period inside it,
and its core fields are the schedule's template: any member can write a task with such an id,
but not one that takes a period's place with other work, or cancels the real instance by
ranking first. An instance is not ready before its period starts, so creating one early
changes nothing either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import field
from typing import Any

from mossnode.record import value

from .model import Contract, Task, TaskView

PREFIX = "r-"
_KEY_CHARS = 16  # hex digits of the schedule id's hash in an instance's suffix


def schedule_key(schedule_id: str) -> str:
    return hashlib.sha256(f"mossnode/recurring\0{schedule_id}".encode()).hexdigest()[:_KEY_CHARS]


@value
class Schedule:
    """A decided schedule. ``removed`` ones create nothing more, but their instances stay
    recognised (a duplicate must not come back to life when its schedule goes)."""

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
    removed: bool = False
    # may a period start while an earlier period's instance is still live? Not by default: a
    # template no agent can run would otherwise pile up one pending task per period
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.interval_ms <= 0:
            raise ValueError("interval_ms must be positive")

    @property
    def key(self) -> str:
        return schedule_key(self.id)

    def fields(self) -> dict[str, Any]:
        """An instance's core fields (the create call's; the same on every node)."""
        return {
            "title": self.title,
            "spec": self.spec,
            "input": self.input,
            "parent": None,
            "deps": [],
            "capabilities": sorted(set(self.capabilities)),
            "role": self.role,
            "priority": self.priority,
            "contract": self.contract.to_raw(),
        }

    def made(self, task: Task) -> bool:
        """Is ``task``'s content this schedule's template? (Stored numbers read back as
        floats, which compare equal to the ints written.)"""
        return (
            task.title == self.title
            and task.spec == self.spec
            and task.input == self.input
            and task.parent is None
            and not task.deps
            and task.capabilities == tuple(sorted(set(self.capabilities)))
            and task.role == self.role
            and task.priority == self.priority
            and task.contract == self.contract
        )


def period_at(schedule: Schedule, now_ms: int) -> int | None:
    """Index of the period running at ``now_ms``, or None outside the schedule."""
    if now_ms < schedule.start_ms or (schedule.end_ms is not None and now_ms >= schedule.end_ms):
        return None
    return (now_ms - schedule.start_ms) // schedule.interval_ms


def period_start(schedule: Schedule, period: int) -> int:
    return schedule.start_ms + period * schedule.interval_ms


def next_start(schedule: Schedule, now_ms: int) -> int | None:
    """When the next period after ``now_ms`` starts, or None if no period starts any more."""
    p = period_at(schedule, now_ms)
    if p is None:
        return schedule.start_ms if now_ms < schedule.start_ms else None
    return period_start(schedule, p + 1) if _in_schedule(schedule, p + 1) else None


def _in_schedule(schedule: Schedule, period: int) -> bool:
    return period >= 0 and (
        schedule.end_ms is None or period_start(schedule, period) < schedule.end_ms
    )


def period_suffix(schedule_id: str, period: int) -> str:
    """The task id suffix of a period's instance: the same on every node."""
    return f"{PREFIX}{schedule_key(schedule_id)}-{period}"


def parse_suffix(suffix: str) -> tuple[str, int] | None:
    """``(schedule key, period)`` of an instance suffix, or None."""
    if not suffix.startswith(PREFIX):
        return None
    key, sep, num = suffix[len(PREFIX) :].partition("-")
    if not sep or len(key) != _KEY_CHARS or not all(c in "0123456789abcdef" for c in key):
        return None
    if not num.isdigit() or len(num) > 18 or (num != "0" and num.startswith("0")):
        return None
    return key, int(num)


def _rank_key(suffix: str, node: str) -> str:
    return hashlib.sha256(f"{suffix}\0{node}".encode()).hexdigest()


def makers(suffix: str, members: Iterable[str]) -> list[str]:
    """Members in the order in which they should create the instance."""
    return sorted(set(members), key=lambda n: (_rank_key(suffix, n), n))


@value
class Instance:
    schedule: Schedule
    period: int
    suffix: str
    start: int


def instance_of(task: Task, by_key: Mapping[str, Schedule]) -> Instance | None:
    """The period ``task`` is the instance of, if it is one (see the module doc)."""
    creator, sep, suffix = task.id.rpartition(":")
    if not sep or creator != task.creator:
        return None
    parsed = parse_suffix(suffix)
    if parsed is None:
        return None
    s = by_key.get(parsed[0])
    if s is None or not _in_schedule(s, parsed[1]) or not s.made(task):
        return None
    return Instance(s, parsed[1], suffix, period_start(s, parsed[1]))


class Index:
    """The recurring instances of a view: ``dups`` maps each duplicate to its canonical
    instance, ``starts`` each instance to its period's start, ``periods`` each period's
    suffix to its canonical instance. Kept up to date task by task (:meth:`update`): a
    schedule running for months has tens of thousands of past instances, and matching them
    all again whenever the live one got a bid cost a derivation tens of milliseconds."""

    __slots__ = ("_groups", "by_key", "dups", "periods", "starts")

    def __init__(self, schedules: Mapping[str, Schedule] | None = None) -> None:
        self.by_key = {s.key: s for s in (schedules or {}).values()}
        self.dups: dict[str, str] = {}
        self.starts: dict[str, int] = {}
        self.periods: dict[str, str] = {}
        self._groups: dict[str, list[tuple[str, str]]] = {}  # suffix -> (creator, tid)

    def update(self, view: TaskView, tids: Iterable[str]) -> set[str]:
        """Take in the tasks ``tids`` as ``view`` now holds them (gone ones included); returns
        the tasks whose entry in :attr:`dups` may have changed."""
        if not self.by_key:
            return set()
        marker = ":" + PREFIX
        touched: set[str] = set()
        changed: set[str] = set()
        for tid in tids:
            if marker not in tid:
                continue
            task = view.get(tid)
            inst = None if task is None else instance_of(task, self.by_key)
            was = tid in self.starts
            if (inst is not None) == was:
                continue  # still (or still not) an instance: its id fixes its period
            suffix = tid.rpartition(":")[2]
            group = self._groups.setdefault(suffix, [])
            if inst is None:
                del self.starts[tid]
                self.dups.pop(tid, None)
                changed.add(tid)
                group[:] = [m for m in group if m[1] != tid]
            else:
                assert task is not None
                self.starts[tid] = inst.start
                group.append((task.creator, tid))
            touched.add(suffix)
        for suffix in touched:
            group = self._groups[suffix]
            old = self.periods.pop(suffix, None)
            if old is not None:
                changed.add(old)
            for _, tid in group:
                self.dups.pop(tid, None)  # put back below while still a duplicate
                changed.add(tid)
            if not group:
                del self._groups[suffix]
                continue
            group.sort(key=lambda ct: (_rank_key(suffix, ct[0]), ct[0]))
            canonical = self.periods[suffix] = group[0][1]
            for _, tid in group[1:]:
                self.dups[tid] = canonical
        return changed


def index(view: TaskView, schedules: Mapping[str, Schedule]) -> Index:
    """Instances of ``schedules`` (id -> schedule) in ``view``, and their duplicates."""
    found = Index(schedules)
    found.update(view, view.keys())
    return found


def _running(schedule: Schedule, found: Index, live: Collection[str]) -> bool:
    """Is an earlier instance of ``schedule`` still live? (Asked once per period and maker.)"""
    mark = f":{PREFIX}{schedule.key}-"
    return any(mark in tid and tid in found.starts for tid in live)


@value
class Due:
    """An instance this node should create now (``suffix`` under its own peer id)."""

    schedule: Schedule
    period: int
    suffix: str


def due(
    schedules: Iterable[Schedule],
    found: Index,
    view: TaskView,
    me: str,
    members: Iterable[str],
    now_ms: int,
    grace_ms: int,
    live: Collection[str] = (),
) -> tuple[list[Due], int | None]:
    """Instances ``me`` (one of the makers ``members``) should create now, and the next time
    to ask again. ``found``: :func:`index` of ``view``; ``live``: the tasks not yet ended
    (a schedule without ``overlap`` skips a period while one of its instances is live).

    The k-th maker waits ``k * grace_ms``, or ``k * interval / makers`` where that is shorter,
    so every maker's turn comes within the period. Only the current period is considered: a
    period missed entirely (the whole swarm down, or paused) is skipped, not backfilled.
    """
    ranked_members = sorted(set(members) | {me})
    out: list[Due] = []
    wake: list[int] = []
    for s in schedules:
        if s.removed:
            continue
        nxt = next_start(s, now_ms)
        if nxt is not None:
            wake.append(nxt)
        p = period_at(s, now_ms)
        if p is None:
            continue
        suffix = period_suffix(s.id, p)
        if suffix in found.periods or f"{me}:{suffix}" in view:
            continue
        rank = makers(suffix, ranked_members).index(me)
        # every maker's turn comes within the period, however short
        at = period_start(s, p) + rank * min(grace_ms, s.interval_ms // len(ranked_members))
        if now_ms < at:
            wake.append(at)
        elif s.overlap or not _running(s, found, live):
            out.append(Due(s, p, suffix))
    return out, (min(wake) if wake else None)
