"""The task state machine, derived: facts plus ``now_ms`` in, one :class:`Status` per task out.

No replica writes a state. Each derives it from the replicated facts with the same pure
function, so replicas holding the same facts at the same ``now_ms`` agree, and a state cannot be
the subject of a write conflict. The machine (OpenMOSS's sub-task machine plus ``failed``):

    pending -> assigned -> in_progress -> review -> done
                               ^            |
                               +- rework <--+          (review: verdict rework)
    pending -> blocked   (a dependency failed or was cancelled, or a dependency cycle)
    any non-terminal -> cancelled  (creator, an ancestor's creator, or a supervisor)
    in_progress/assigned -> pending  (lease expired, deadline missed, error, invalid output,
                                      released, reassigned: the attempt closes, the next opens)
    -> failed  (``max_attempts`` faulty attempts, or an exclusive task's only attempt closed,
                including by its assignee not claiming it in time: see :func:`exclusive_deadline`)

Who causes each transition is in docs/tasks.md. Attempts: attempt ``j`` opens with its first
bid, is won per :mod:`.allocation`, claimed by the winner, and closes for the first of: release,
reassign, lease expiry, missed deadline, error, invalid output, rework limit, or a later
attempt's bid or claim (someone saw it closed; this is what makes closure monotonic when a
partition heals). A valid accepted submission for any attempt makes the task done, even if a
later attempt opened meanwhile: done never goes back.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mossnode.record import value

from . import control
from .allocation import Window, best, tiebreak, window
from .confidential import unsealed
from .contract import validate
from .model import (
    TERMINAL,
    Assignment,
    ClaimEntry,
    ResultEntry,
    ReviewEntry,
    State,
    Task,
    TaskView,
    View,
    as_float,
    as_int,
    changed_since,
)
from .params import Params
from .recurring import Index, Schedule, index
from .review import deciding_review
from .stability import Stable

FAULT_KINDS = frozenset(
    {"lease", "deadline", "error", "schema", "no_claim", "rework_limit", "superseded"}
)


@value
class Outcome:
    """How one attempt ended (``kind``), for reasons and for reputation."""

    attempt: int
    kind: str  # done, or a closure: released, reassigned, or one of FAULT_KINDS
    node: str | None
    agent: str | None
    at: int
    detail: str
    claimed_at: int | None = None
    submitted_at: int | None = None

    @property
    def fault(self) -> bool:
        return self.kind in FAULT_KINDS

    def describe(self) -> str:
        who = f" ({self.node}/{self.agent})" if self.node is not None else ""
        return f"attempt {self.attempt}{who}: {self.detail}"


@value
class Accepted:
    """The one accepted result of a done task."""

    node: str
    agent: str
    attempt: int
    round: int
    output: Any
    submitted_at: int
    done_at: int
    claimed_at: int
    review: ReviewEntry | None = None
    reviewer: str | None = None


@value
class Status:
    state: State
    attempt: int = 1
    assignee: str | None = None
    agent: str | None = None
    claimed: bool = False
    round: int = 1
    ready: bool = False
    paused: bool = False
    eligible_at: int | None = None  # bids for ``attempt`` are welcome from then (backoff)
    window: Window | None = None  # bid window of ``attempt``
    lease_expires_at: int | None = None
    deadline_at: int | None = None
    submitted_at: int | None = None  # the submission waiting in review
    rework: ReviewEntry | None = None  # the review that asked for the current rework round
    accepted: Accepted | None = None
    faults: int = 0
    outcomes: tuple[Outcome, ...] = ()
    reasons: tuple[str, ...] = ()
    wake_at: int | None = None  # next time this status may change with no new facts
    pause_mark: tuple[int, str, bool] | None = (
        None  # latest pause/resume in force (at, node, paused)
    )
    cancelled_at: int | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@value
class _Ctx:
    view: TaskView
    now: int
    params: Params
    exclusive: Mapping[str, Assignment]
    authority: control.Authority | None
    rec: Index  # recurring instances: duplicates and period starts
    stable: Stable | None = None


@value
class _Memo:
    task: Task
    exclusive: Assignment | None
    cyclic: tuple[str, ...]
    parent_cycle: bool
    at: int
    status: Status


@dataclass(slots=True)
class _Topology:
    """Evaluation order (deps and parent first) and cycles; depends only on deps/parent."""

    shape: dict[str, Task]  # the task objects it was computed from
    order: list[str]
    prereqs: dict[str, tuple[str, ...]]
    cyclic: dict[str, tuple[str, ...]]  # deps that close a cycle, per task
    parent_cycle: frozenset[str]

    dependents: dict[str, list[str]] = field(default_factory=dict)  # prereq -> tasks
    missing: set[str] = field(default_factory=set)  # prereqs named but not in the view
    pos: dict[str, int] = field(default_factory=dict)  # task -> its index in ``order``

    def fits(self, view: TaskView) -> bool:
        if len(view) != len(self.shape):
            return False
        for tid, old in self.shape.items():
            new = view.get(tid)
            if new is None:
                return False
            if new is not old and (new.deps != old.deps or new.parent != old.parent):
                return False
        return True

    def extended(self, view: TaskView, changed: list[str]) -> _Topology | None:
        """This topology for ``view``, where only the tasks ``changed`` may differ from the
        ones it was made for (new ones included), if that is cheap and gives the statuses a
        fresh :func:`_topology` would: no task was removed, none changed its deps or parent,
        the graph has no cycle, and no new task is a prerequisite of an older one or of
        another new one (so none closes a cycle, and new tasks go last in the order).
        Otherwise None (build it again)."""
        if self.cyclic or self.parent_cycle:
            return None
        added: list[str] = []
        for tid in changed:
            new, old = view.get(tid), self.shape.get(tid)
            if new is None:
                return None
            if old is None:
                if tid in self.missing:
                    return None
                added.append(tid)
            elif new.deps != old.deps or new.parent != old.parent:
                return None
        if len(view) != len(self.shape) + len(added):
            return None  # a task was removed
        new_ids = set(added)
        for tid in added:
            task = view[tid]
            if task.parent in new_ids or any(d in new_ids for d in task.deps):
                return None
        # Checked: now extend this one in place (the cache holds the only reference).
        for tid in sorted(added):
            task = view[tid]
            self.pos[tid] = len(self.order)
            self.order.append(tid)
            pre = (*task.deps, task.parent) if task.parent is not None else task.deps
            self.prereqs[tid] = pre
            for x in pre:
                self.dependents.setdefault(x, []).append(tid)
                if x not in view:
                    self.missing.add(x)
        for tid in changed:
            self.shape[tid] = view[tid]
        return self


def _topology(view: TaskView) -> _Topology:
    """Post-order DFS from tasks in id order, deps in stored order, then the parent: a
    deterministic order. A back edge through ``deps`` marks a dependency cycle; through
    ``parent`` it is ignored (a parent cycle cannot come from honest creators)."""
    order: list[str] = []
    done: set[str] = set()
    cyclic: dict[str, list[str]] = {}
    parent_cycle: set[str] = set()
    on_stack: set[str] = set()
    prereqs: dict[str, tuple[str, ...]] = {}
    for root in sorted(view):
        if root in done:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        on_stack.add(root)
        while stack:
            tid, i = stack[-1]
            task = view[tid]
            n_deps = len(task.deps)
            n_pre = n_deps + (1 if task.parent is not None else 0)
            if i < n_pre:
                stack[-1] = (tid, i + 1)
                pre = task.deps[i] if i < n_deps else task.parent
                assert pre is not None
                if pre in done or pre not in view:
                    continue
                if pre in on_stack:
                    if i < n_deps:
                        cyclic.setdefault(tid, []).append(pre)
                    else:
                        parent_cycle.add(tid)
                    continue
                on_stack.add(pre)
                stack.append((pre, 0))
                continue
            stack.pop()
            on_stack.discard(tid)
            done.add(tid)
            order.append(tid)
            prereqs[tid] = (*task.deps, task.parent) if task.parent is not None else task.deps
    dependents: dict[str, list[str]] = {}
    missing: set[str] = set()
    for tid, before in prereqs.items():
        for x in before:
            dependents.setdefault(x, []).append(tid)
            if x not in view:
                missing.add(x)
    return _Topology(
        dict(view),
        order,
        prereqs,
        {t: tuple(c) for t, c in cyclic.items()},
        frozenset(parent_cycle),
        dependents,
        missing,
        {t: i for i, t in enumerate(order)},
    )


@dataclass(slots=True)
class Cache:
    """What :func:`derive_all` may keep between calls (one per ``params``)."""

    topology: _Topology | None = None
    memo: dict[str, _Memo] = field(default_factory=dict)
    # What the last call was given and gave, so that the next call visits only the tasks
    # that may have changed (not every task of a long history).
    view: dict[str, Task] = field(default_factory=dict)
    exclusive: dict[str, Assignment] = field(default_factory=dict)
    rec: Index = field(default_factory=Index)
    schedules: dict[str, Schedule] = field(default_factory=dict)
    out: dict[str, Status] | None = None
    now: int = 0
    waking: dict[str, int] = field(default_factory=dict)  # task -> its status's wake_at
    live: set[str] = field(default_factory=set)  # tasks whose status is not terminal
    serial: int = 0  # of ``view``, when it was a :class:`~.model.View`
    # tasks whose status object changed since :meth:`take_restated` (None: any may have)
    restated: set[str] | None = None
    # (node, permission) -> what ``authority`` answered for the statuses kept here
    asked: dict[tuple[str, str], bool] = field(default_factory=dict)

    def clear(self) -> None:
        self.topology = None
        self.memo.clear()
        self.view = {}
        self.exclusive = {}
        self.rec = Index()
        self.schedules = {}
        self.out = None
        self.waking.clear()
        self.live.clear()
        self.serial = 0
        self.restated = None
        self.asked.clear()

    def policy(self, authority: control.Authority) -> control.Authority:
        """``authority``, answering as it does now and remembered. The statuses kept here
        hang on its earlier answers (a supervisor's cancel counts while it holds the right):
        when one of them changed (the decided log moved a role), everything is derived anew,
        as a node started now would derive it from the same view."""
        asked = self.asked
        if any(authority(n, p) != ok for (n, p), ok in asked.items()):
            self.clear()

        def answer(node: str, permission: str) -> bool:
            ok = asked[(node, permission)] = authority(node, permission)
            return ok

        return answer

    def take_restated(self) -> set[str] | None:
        """The tasks whose status changed (or vanished) since the last call, or None if any
        may have (a full pass ran): what a consumer of statuses must look at again."""
        got, self.restated = self.restated, set()
        return got

    def _seen(self, view: TaskView) -> None:
        """Remember ``view`` as the last one derived. A :class:`~.model.View` is kept by
        reference (it is never changed in place); a plain mapping is copied."""
        if isinstance(view, View):
            self.view, self.serial = view, view.serial
        else:
            self.view, self.serial = dict(view), 0

    def _record(self, tid: str, st: Status) -> None:
        if st.wake_at is None:
            self.waking.pop(tid, None)
        else:
            self.waking[tid] = st.wake_at
        if st.state in TERMINAL:
            self.live.discard(tid)
        else:
            self.live.add(tid)


def derive_all(
    view: TaskView,
    now_ms: int,
    *,
    params: Params | None = None,
    exclusive: Mapping[str, Assignment] | None = None,
    authority: control.Authority | None = None,
    cache: Cache | None = None,
    stable: Stable | None = None,
    schedules: Mapping[str, Schedule] | None = None,
) -> dict[str, Status]:
    """Statuses of every task in ``view`` at ``now_ms``.

    ``exclusive``: ``{task id: Assignment}`` decided by consensus for exclusive tasks.
    ``authority(node, permission)``: the decided log's policy, for supervisor actions.
    ``stable(task, window)``: whether this node holds every bid that counts in ``window``
    (:mod:`.stability`); a window is decided only then. None: assume it does.
    ``schedules``: the decided recurring schedules (id -> schedule), which tell instances
    (not ready before their period starts; duplicates cancelled) from other tasks.
    ``cache``: a :class:`Cache` the caller keeps between calls with the same ``params`` (time
    must not go backwards; a policy change that alters an answer the cache relied on is
    noticed, see :meth:`Cache.policy`). A status is
    reused while its task object is the same, its ``wake_at`` has not come, and no
    dependency or parent status changed; the result is the same as without a cache. With a
    cache, a call visits only the tasks that may have changed since the last one (and
    their dependents), not every task: see :func:`_derive_changes`. The mapping returned is
    then the cache's own, updated in place by the next call (a copy of every status per call
    cost more than the call at 100,000 tasks): copy it to keep a snapshot.
    """
    schedules = schedules or {}
    if cache is not None and authority is not None:
        authority = cache.policy(authority)
    if cache is not None and cache.schedules != schedules:
        cache.clear()  # which tasks are instances changed: derive everything anew
        cache.schedules = dict(schedules)
    if cache is not None and cache.out is not None and cache.now <= now_ms:
        quick = _derive_changes(view, now_ms, params, exclusive or {}, authority, cache, stable)
        if quick is not None:
            return quick
    rec = index(view, schedules)
    ctx = _Ctx(view, now_ms, params or Params(), exclusive or {}, authority, rec, stable)
    topo = cache.topology if cache is not None else None
    changed: set[str] = set()
    if topo is None or not topo.fits(view):
        old = topo
        topo = _topology(view)
        if cache is not None:
            cache.topology = topo
            if old is not None:  # a vanished task changes what its dependents see
                changed = {t for t in old.shape if t not in view}
            for gone in [t for t in cache.memo if t not in view]:
                del cache.memo[gone]
    memos = cache.memo if cache is not None else {}
    was_dup = cache.rec.dups if cache is not None else rec.dups  # what memos were made with
    if cache is not None:
        cache.waking.clear()
        cache.live.clear()
    out: dict[str, Status] = {}
    for tid in topo.order:
        task = view[tid]
        excl = ctx.exclusive.get(tid)
        cyc = topo.cyclic.get(tid, ())
        pcyc = tid in topo.parent_cycle
        memo = memos.get(tid)
        if (
            memo is not None
            and memo.task is task
            and memo.exclusive == excl
            and memo.cyclic == cyc
            and memo.parent_cycle == pcyc
            and memo.at <= now_ms
            and (memo.status.wake_at is None or now_ms < memo.status.wake_at)
            and rec.dups.get(tid) == was_dup.get(tid)
            and not (changed and any(p in changed for p in topo.prereqs[tid]))
        ):
            out[tid] = memo.status
            if cache is not None:
                cache._record(tid, memo.status)
            continue
        parent_st = None if pcyc or task.parent is None else out.get(task.parent)
        st = _derive(task, ctx, out, cyc, parent_st)
        if memo is not None and memo.status == st:
            st = memo.status
        else:
            changed.add(tid)
        out[tid] = st
        if cache is not None:
            memos[tid] = _Memo(task, excl, cyc, pcyc, now_ms, st)
            cache._record(tid, st)
    if cache is not None:
        cache._seen(view)
        cache.exclusive = dict(ctx.exclusive)
        cache.rec = rec
        cache.out = out
        cache.now = now_ms
        cache.restated = None
    return out


def _derive_changes(
    view: TaskView,
    now_ms: int,
    params: Params | None,
    exclusive: Mapping[str, Assignment],
    authority: control.Authority | None,
    cache: Cache,
    stable: Stable | None,
) -> dict[str, Status] | None:
    """:func:`derive_all` from the last call's result, visiting only the tasks whose memo
    :func:`derive_all` would not reuse (another task object, another exclusive assignment,
    ``wake_at`` come, a recurring duplicate, new) and, in evaluation order, the dependents and
    children of those whose status changed. None if the topology must be built again (a task removed,
    deps changed, a cycle somewhere): the caller then takes the full pass."""
    topo, out, memos = cache.topology, cache.out, cache.memo
    assert topo is not None and out is not None
    if topo.cyclic or topo.parent_cycle:
        return None  # the full pass handles cycles
    prev = cache.view
    known = frozenset() if view is prev else changed_since(view, cache.serial)
    if known is None:
        changed = [t for t, task in view.items() if prev.get(t) is not task]
    else:  # a long history: only the tasks the view says it touched
        changed = sorted(t for t in known if prev.get(t) is not view.get(t))
    if len(view) != len(prev) or changed:
        ext = topo.extended(view, changed)
        if ext is None:
            return None
        topo = ext
    excl = dict(exclusive)
    todo = set(changed)
    if excl != cache.exclusive:
        todo.update(t for t in excl.keys() | cache.exclusive.keys() if t in view)
    todo.update(t for t, at in cache.waking.items() if now_ms >= at)
    rec = cache.rec  # brought up to date in place: only the changed tasks are matched again
    todo.update(t for t in rec.update(view, changed) if t in view)
    cache.topology = topo
    if changed or len(view) != len(prev) or known is not None:
        cache._seen(view)
    cache.exclusive, cache.now = excl, now_ms
    if not todo:
        return out
    restated = cache.restated
    ctx = _Ctx(view, now_ms, params or Params(), excl, authority, rec, stable)
    pos = topo.pos
    heap = [(pos[t], t) for t in todo]
    heapq.heapify(heap)
    seen = set(todo)
    while heap:
        _, tid = heapq.heappop(heap)
        task = view[tid]
        e = excl.get(tid)
        memo = memos.get(tid)
        parent_st = None if task.parent is None else out.get(task.parent)
        st = _derive(task, ctx, out, (), parent_st)
        if memo is not None and memo.status == st:
            st = memo.status
        else:
            if restated is not None:
                restated.add(tid)
            if tid in topo.dependents:
                for d in topo.dependents[tid]:
                    if d not in seen:
                        seen.add(d)
                        heapq.heappush(heap, (pos[d], d))
        out[tid] = st
        memos[tid] = _Memo(task, e, (), False, now_ms, st)
        cache._record(tid, st)
    return out


def derive(view: TaskView, tid: str, now_ms: int, **kw: Any) -> Status | None:
    """One task's status (derives what it depends on; prefer :func:`derive_all` in loops)."""
    return derive_all(view, now_ms, **kw).get(tid)


def inputs_from_dependencies(
    view: TaskView, statuses: Mapping[str, Status], tid: str
) -> dict[str, Any]:
    """``{dep id: accepted output}`` handed to a ready task."""
    task = view.get(tid)
    out: dict[str, Any] = {}
    if task is None:
        return out
    for dep in task.deps:
        st = statuses.get(dep)
        if st is not None and st.accepted is not None:
            out[dep] = st.accepted.output
    return out


# -- one task ----------------------------------------------------------------------------------


def _derive(
    task: Task, ctx: _Ctx, out: Mapping[str, Status], cyc: Collection[str], parent_st: Status | None
) -> Status:
    dup = ctx.rec.dups.get(task.id)
    if dup is not None:
        return Status(
            State.CANCELLED, reasons=(f"duplicate of recurring instance {dup}",), cancelled_at=0
        )

    recs = control.controls(ctx.view, task, ctx.authority)
    mark = parent_st.pause_mark if parent_st is not None else None
    cancel_at: int | None = None
    cancel_reason = ""
    reassigns: dict[int, control.Control] = {}
    for c in recs:
        if c.verb in (control.PAUSE, control.RESUME):
            m = (c.at, c.node, c.verb == control.PAUSE)
            if mark is None or m[:2] > mark[:2]:
                mark = m
        elif c.verb == control.CANCEL and cancel_at is None:
            cancel_at, cancel_reason = (
                c.at,
                f"cancelled by {c.node}" + (f": {c.reason}" if c.reason else ""),
            )
        elif c.verb == control.REASSIGN and c.attempt is not None and c.attempt not in reassigns:
            reassigns[c.attempt] = c
    if parent_st is not None and parent_st.state is State.CANCELLED:
        p_at = parent_st.cancelled_at if parent_st.cancelled_at is not None else 0
        if cancel_at is None or p_at < cancel_at:
            cancel_at, cancel_reason = p_at, f"parent {task.parent} cancelled"
    paused = mark[2] if mark is not None else False

    waiting: list[str] = []
    blocked: list[str] = []
    for dep in task.deps:
        if dep in cyc:
            blocked.append(f"dependency cycle through {dep}")
            continue
        st = out.get(dep)
        if st is None:
            waiting.append(f"waiting for unknown dependency {dep}")
        elif st.state is State.DONE:
            continue
        elif st.state in (State.FAILED, State.CANCELLED, State.BLOCKED):
            blocked.append(f"dependency {dep} is {st.state.value}")
        else:
            waiting.append(f"waiting for {dep} ({st.state.value})")
    starts = ctx.rec.starts.get(task.id)
    if starts is not None and ctx.now >= starts:
        starts = None  # its period has begun: nothing to wait for
    if starts is not None:
        waiting.append(f"its recurring period starts at {starts}")
    ready = not waiting and not blocked

    ev: Status | None = None
    if ready or task.results:
        # ready, paused and the mark go into the attempts' status as it is made: a
        # dataclasses.replace per derivation was a tenth of the derivation's time
        ev = _attempts(task, ctx, reassigns, _Marks(ready, paused, mark))
        if ev.state is State.DONE:
            acc = ev.accepted
            assert acc is not None
            if cancel_at is None or acc.done_at <= cancel_at:
                return ev
    if cancel_at is not None:
        return Status(
            State.CANCELLED,
            reasons=(cancel_reason,),
            pause_mark=mark,
            paused=paused,
            cancelled_at=cancel_at,
        )
    if blocked:
        return Status(State.BLOCKED, reasons=tuple(blocked), pause_mark=mark, paused=paused)
    if not ready or ev is None:
        return Status(
            State.PENDING, reasons=tuple(waiting), pause_mark=mark, paused=paused, wake_at=starts
        )
    return ev


class _History:
    """Claims and results per (node, attempt), from the entries and, for attempts whose entry
    the same node has since overwritten with a later attempt's, from its append-only log.
    The log's results are parsed only when an entry does not answer (an attempt that was
    retried): most derivations ask for the attempt the entries hold."""

    __slots__ = ("_claims", "_results", "_rounds", "task")

    def __init__(self, task: Task) -> None:
        self.task = task
        self._claims: dict[int, dict[str, ClaimEntry]] = {}
        self._results: dict[tuple[str, int], ResultEntry] | None = None
        self._rounds: dict[tuple[str, int, int], ResultEntry] | None = None
        for node, cl in task.claims.items():
            self._claims.setdefault(cl.attempt, {})[node] = cl
        for node, rec in task.records(("claim",)):
            attempt, at, agent = as_int(rec.get("attempt")), as_int(rec.get("at")), rec.get("agent")
            if attempt is None or at is None or not isinstance(agent, str):
                continue
            mine = self._claims.setdefault(attempt, {})
            if node not in mine:
                mine[node] = ClaimEntry(attempt, agent, at, as_float(rec.get("score")))

    def attempts(self) -> list[int]:
        return sorted(self._claims)

    def claims(self, attempt: int) -> dict[str, ClaimEntry]:
        return self._claims.get(attempt, {})

    def result(self, node: str, attempt: int) -> ResultEntry | None:
        """The node's latest result for an attempt (entry, else its log)."""
        entry = self.task.results.get(node)
        if entry is not None and entry.attempt == attempt:
            return entry
        return self._logged()[0].get((node, attempt))

    def result_of_round(self, node: str, attempt: int, rnd: int) -> ResultEntry | None:
        """The node's latest result for one round of an attempt (entry, else its log)."""
        entry = self.task.results.get(node)
        if entry is not None and (entry.attempt, entry.round) == (attempt, rnd):
            return entry
        return self._logged()[1].get((node, attempt, rnd))

    def _logged(
        self,
    ) -> tuple[dict[tuple[str, int], ResultEntry], dict[tuple[str, int, int], ResultEntry]]:
        """The log's results, latest per (node, attempt) and per (node, attempt, round): one
        pass over the records, on first need."""
        if self._results is None or self._rounds is None:
            by_attempt: dict[tuple[str, int], ResultEntry] = {}
            by_round: dict[tuple[str, int, int], ResultEntry] = {}
            for author, rec in self.task.records(("result",)):
                r = ResultEntry.from_raw(rec)
                if r is None:
                    continue
                old = by_attempt.get((author, r.attempt))
                if old is None or (r.round, r.at) >= (old.round, old.at):
                    by_attempt[(author, r.attempt)] = r
                same = by_round.get((author, r.attempt, r.round))
                if same is None or r.at >= same.at:
                    by_round[(author, r.attempt, r.round)] = r
            self._results, self._rounds = by_attempt, by_round
        return self._results, self._rounds


def _window(task: Task, attempt: int, settle_ms: int) -> Window | None:
    """:func:`.allocation.window` of the task's bids, kept with them: the task objects that
    follow a claim, a progress report or a result keep the bids object, and its windows."""
    memo = task._by_bids
    if memo is None:
        memo = task._by_bids = {}
    key = ("window", attempt, settle_ms)
    if key in memo:
        w: Window | None = memo[key]
        return w
    w = memo[key] = window(task.bids, attempt, settle_ms)
    return w


def _claim_score(node: str, claim: ClaimEntry, w: Window | None) -> float:
    """A claimant's bid score (tie-break among claims made at the same time)."""
    if claim.score is not None:
        return claim.score
    bid = w.bids.get(node) if w is not None else None
    return bid.score if bid is not None else 0.0


@value
class _One:
    """One attempt evaluated: accepted, closed (outcome) or open (status fields)."""

    accepted: Accepted | None = None
    outcome: Outcome | None = None
    state: State = State.PENDING
    assignee: str | None = None
    agent: str | None = None
    claimed: bool = False
    round: int = 1
    window: Window | None = None
    lease_expires_at: int | None = None
    deadline_at: int | None = None
    submitted_at: int | None = None
    rework: ReviewEntry | None = None
    wake: int | None = None


@value
class _Marks:
    """What :func:`_derive` knows of a task before its attempts: the Status fields it sets."""

    ready: bool
    paused: bool
    pause_mark: tuple[int, str, bool] | None


def _attempts(
    task: Task, ctx: _Ctx, reassigns: Mapping[int, control.Control], given: _Marks
) -> Status:
    p, c = ctx.params, task.contract
    excl = ctx.exclusive.get(task.id) if c.exclusive else None
    cap = 1 if c.exclusive else c.max_attempts + p.extra_attempts
    rel = control.releases(task)
    hist = _History(task)
    # a bid or claim for a later attempt means its author saw this one closed; this is what
    # makes closure monotonic after a partition heals. Exclusive tasks take no bids, and marks
    # beyond the attempt cap are noise. Only marks of attempt 2 on can close an attempt (the
    # first attempt's, almost all of them, are skipped at once).
    later: dict[int, int] = {}
    if not c.exclusive:
        for b in task.bids.values():
            if 1 < b.attempt <= cap:
                later[b.attempt] = min(b.at, later.get(b.attempt, b.at))
        for a in hist.attempts():
            if 1 < a <= cap:
                for cl in hist.claims(a).values():
                    later[a] = min(cl.at, later.get(a, cl.at))
    outcomes: list[Outcome] = []
    faults = 0
    eligible: int | None = None
    j = 1
    while True:
        sup: int | None = None  # the earliest mark of a later attempt
        for a, at in later.items():
            if a > j and (sup is None or at < sup):
                sup = at
        one = _one(task, j, ctx, excl, sup, rel, reassigns.get(j), hist)
        if one.accepted is not None:
            acc = one.accepted
            outcomes.append(
                Outcome(
                    j,
                    "done",
                    acc.node,
                    acc.agent,
                    acc.done_at,
                    "done",
                    acc.claimed_at,
                    acc.submitted_at,
                )
            )
            return Status(
                State.DONE,
                attempt=j,
                assignee=acc.node,
                agent=acc.agent,
                claimed=True,
                round=acc.round,
                accepted=acc,
                faults=faults,
                outcomes=tuple(outcomes),
                reasons=tuple(o.describe() for o in outcomes if o.kind != "done"),
                ready=given.ready,
                paused=given.paused,
                pause_mark=given.pause_mark,
            )
        if one.outcome is None:
            wakes = [t for t in (one.wake, eligible) if t is not None and t > ctx.now]
            return Status(
                one.state,
                attempt=j,
                assignee=one.assignee,
                agent=one.agent,
                claimed=one.claimed,
                round=one.round,
                eligible_at=eligible,
                window=one.window,
                lease_expires_at=one.lease_expires_at,
                deadline_at=one.deadline_at,
                submitted_at=one.submitted_at,
                rework=one.rework,
                faults=faults,
                outcomes=tuple(outcomes),
                reasons=tuple([o.describe() for o in outcomes]) if outcomes else (),
                wake_at=min(wakes) if wakes else None,
                ready=given.ready,
                paused=given.paused,
                pause_mark=given.pause_mark,
            )
        o = one.outcome
        outcomes.append(o)
        if o.fault:
            faults += 1
        failed: str | None = None
        if c.exclusive and o.kind == "no_claim":
            failed = (
                f"{o.node} did not claim it by {o.at}; it was never reassigned: "
                "an exclusive task never runs twice"
            )
        elif c.exclusive:
            failed = "exclusive task runs at most once and its attempt ended"
        elif faults >= c.max_attempts:
            failed = f"{faults} faulty attempts (max_attempts {c.max_attempts})"
        elif j >= cap:
            failed = f"{j} attempts, {faults} faulty: too many reassignments"
        if failed is not None:
            return Status(
                State.FAILED,
                attempt=j,
                assignee=o.node,
                agent=o.agent,
                faults=faults,
                outcomes=tuple(outcomes),
                # built once, at the end: per attempt it made the walk quadratic
                reasons=(*(x.describe() for x in outcomes), failed),
                ready=given.ready,
                paused=given.paused,
                pause_mark=given.pause_mark,
            )
        eligible = o.at + (p.backoff(faults) if o.fault else 0)
        j += 1


def exclusive_deadline(assignment: Assignment, params: Params) -> int | None:
    """When an exclusive task's assignee must have claimed it by: ``exclusive_claim_ms`` after
    it proposed itself (None for a decision made before deadlines existed, without ``at``).
    A claim made at or after this time does not count, and with no claim the task fails
    (``no_claim``, at this time): it is never reassigned, since it never runs twice. Other
    nodes derive the failure only ``lease_ms`` later, time for a claim made just before the
    deadline to reach them (see :func:`_one`)."""
    if assignment.at is None:
        return None
    return assignment.at + params.exclusive_claim_ms


def _one(
    task: Task,
    j: int,
    ctx: _Ctx,
    excl: Assignment | None,
    sup: int | None,
    rel: Mapping[tuple[str, int], int],
    reassign: control.Control | None,
    hist: _History,
) -> _One:
    p, c = ctx.params, task.contract
    # A superseded attempt is judged as of the moment it was superseded, so its outcome (and
    # whom it is attributed to) no longer moves with the clock: closed attempts report no
    # wake-up time, and replicas at different clocks agree on them.
    now = ctx.now if sup is None else sup
    w: Window | None = None
    assignee: str | None = None
    claimed = False
    claim_deadline: int | None = None
    claims = hist.claims(j)
    if c.exclusive:
        if j == 1 and excl is not None:
            assignee = excl.node
            claim_deadline = exclusive_deadline(excl, p)
            # a claim made at or after the deadline does not count: the task failed then
            mine = claims.get(assignee)
            claimed = mine is not None and (claim_deadline is None or mine.at < claim_deadline)
    else:
        w = _window(task, j, p.settle_ms)
        if len(claims) == 1:
            assignee = next(iter(claims))
            claimed = True
        elif claims:
            # several claimants only after a split brain: the earliest claim keeps the work
            # (it has run longest), then the bid order
            scores = {n: _claim_score(n, cl, w) for n, cl in claims.items()}
            assignee = min(
                claims, key=lambda n: (claims[n].at, -scores[n], tiebreak(task.id, j, n), n)
            )
            claimed = True
        elif (
            w is not None
            and now >= w.decide_at
            and (
                sup is not None
                # past the claim timeout the gate no longer matters: nobody claims any more,
                # so the window closes as no_claim of the winner among the bids held, as on a
                # node whose gate opened and holds the same bids (a horizon that never
                # passes the close must not stall the task on every node)
                or now >= w.decide_at + p.claim_timeout_ms
                or ctx.stable is None
                or ctx.stable(task, w)
            )
        ):
            assignee = best(task.id, j, w.bids, w.bids)
            claim_deadline = w.decide_at + p.claim_timeout_ms

    def closed(at: int, kind: str, detail: str, agent: str | None = None, **kw: Any) -> _One:
        return _One(outcome=Outcome(j, kind, assignee, agent, at, detail, **kw), window=w)

    if assignee is None:
        if sup is not None:
            # nobody won it (as of then): nobody's fault, and no fault of the task's. A fault
            # here let one member's bid for attempt max_attempts fail any task at once.
            return closed(sup, "skipped", "superseded by a later attempt")
        wake = None
        if w is not None:
            # not yet known to hold every counted bid: look again soon (arrivals also wake us)
            wake = w.decide_at if now < w.decide_at else now + max(10, p.settle_ms // 4)
        return _One(state=State.PENDING, window=w, wake=wake)

    if not claimed:
        agent = w.bids[assignee].agent if w is not None and assignee in w.bids else None
        cands: list[tuple[int, int, str, str]] = []
        # An exclusive assignee that claimed just before its deadline may be running the task
        # already; its claim reaches the others later, so they wait a lease's length before
        # deriving the failure (which cannot be undone by a later attempt, as for other tasks).
        settles: int | None = None
        if claim_deadline is not None:
            settles = claim_deadline + (p.lease_ms if excl is not None else 0)
            if now >= settles:
                won = (
                    f"won at {w.decide_at}"
                    if w is not None
                    else f"assigned at {excl.at if excl is not None else '?'}"
                )
                cands.append((claim_deadline, 0, "no_claim", f"{won} but did not claim"))
        if sup is not None:
            cands.append((sup, 1, "superseded", "superseded by a later attempt"))
        if reassign is not None:
            cands.append((reassign.at, 2, "reassigned", f"reassigned by {reassign.node}"))
        gave_up = task.leases.get(assignee)
        released = rel.get((assignee, j))
        if gave_up is not None and gave_up.attempt == j and gave_up.released:
            released = gave_up.expires_at
        if released is not None:
            cands.append((released, 3, "released", f"released by {assignee} before claiming"))
        if cands:
            at, _, kind, detail = min(cands)
            return closed(at, kind, detail, agent)
        return _One(state=State.ASSIGNED, assignee=assignee, agent=agent, window=w, wake=settles)

    claim = claims[assignee]
    agent = claim.agent
    lease = task.leases.get(assignee)
    expires: int | None = claim.at + p.lease_ms  # no lease written: the claim's implied one
    if lease is not None and lease.attempt == j:
        expires = lease.expires_at
    elif lease is not None and lease.attempt > j:
        expires = None  # overwritten by the node's later attempt: unknown, not assumed
    released_at = (
        lease.expires_at
        if lease is not None and lease.attempt == j and lease.released
        else rel.get((assignee, j))
    )
    res = hist.result(assignee, j)
    if res is not None and c.review_required and res.round > 1:
        # An accepted round stays accepted (review.deciding_review): a "done" review of an
        # earlier round that arrives after a rework round was submitted makes that earlier
        # round's submission the one judged. Only rounds that reviews name are tried, so a
        # far round number costs nothing.
        named = {r.round for r in task.reviews.values() if r.attempt == j and r.round < res.round}
        for r in sorted(named):
            dr = deciding_review(task, j, r, assignee, agent, p.same_node_review)
            earlier = hist.result_of_round(assignee, j, r)
            if dr is not None and dr[1].verdict == "done" and earlier is not None:
                res = earlier
                break
    dl = c.deadline_ms
    cands = []
    if released_at is not None:
        cands.append((released_at, 0, "released", f"released by {assignee}"))
    if reassign is not None:
        cands.append(
            (
                reassign.at,
                1,
                "reassigned",
                f"reassigned by {reassign.node}"
                + (f": {reassign.reason}" if reassign.reason else ""),
            )
        )
    stop = min([c[0] for c in cands]) if cands else None  # the attempt was given up then

    rnd, start = 1, claim.at
    in_review = False
    n_given_up = len(cands)
    rework: ReviewEntry | None = None
    submitted_at: int | None = None
    if res is not None and (stop is None or res.at < stop):
        rnd = res.round
        start_r: int | None = claim.at
        if rnd > 1:
            prev = deciding_review(task, j, rnd - 1, assignee, agent, p.same_node_review)
            start_r = prev[1].at if prev is not None and prev[1].verdict == "rework" else None
        if expires is not None and res.at > expires:
            cands.append(
                (
                    expires,
                    2,
                    "lease",
                    f"lease expired at {expires}, before the submission at {res.at}",
                )
            )
        elif dl is not None and start_r is not None and res.at > start_r + dl:
            cands.append(
                (
                    start_r + dl,
                    3,
                    "deadline",
                    f"deadline missed: submitted at {res.at}, due {start_r + dl}",
                )
            )
        elif not res.ok:
            kind = "schema" if res.violation else "error"
            cands.append((res.at, 4, kind, res.violation or res.error or "agent reported failure"))
        else:
            # a confidential output is sealed: its author checked the schema before sealing
            bad = unsealed(res.output) if c.confidential else validate(res.output, c.output_schema)
            if bad is not None:
                cands.append((res.at, 4, "schema", f"output violates output_schema {bad}"))
            else:
                dr = (
                    deciding_review(task, j, rnd, assignee, agent, p.same_node_review)
                    if c.review_required
                    else None
                )
                if not c.review_required or (dr is not None and dr[1].verdict == "done"):
                    review = dr[1] if dr is not None else None
                    done_at = max(res.at, review.at) if review is not None else res.at
                    return _One(
                        accepted=Accepted(
                            assignee,
                            agent,
                            j,
                            rnd,
                            res.output,
                            res.at,
                            done_at,
                            claim.at,
                            review,
                            dr[0] if dr is not None else None,
                        )
                    )
                if dr is None:
                    in_review, submitted_at = True, res.at
                elif rnd >= c.max_rounds:
                    cands.append(
                        (
                            dr[1].at,
                            5,
                            "rework_limit",
                            f"rework requested in round {rnd} of {c.max_rounds}",
                        )
                    )
                else:
                    rnd, start, rework = rnd + 1, dr[1].at, dr[1]

    deadline_at = start + dl if dl is not None and not in_review else None
    if not in_review and len(cands) == n_given_up:  # the submission itself closed nothing
        if expires is not None and now >= expires:
            cands.append((expires, 2, "lease", f"lease expired at {expires}"))
        if deadline_at is not None and now >= deadline_at:
            cands.append((deadline_at, 3, "deadline", f"deadline missed (due {deadline_at})"))
    if sup is not None:
        cands.append((sup, 9, "superseded", "superseded by a later attempt"))
    if cands:
        at, _, kind, detail = min(cands)
        return closed(
            at,
            kind,
            detail,
            agent,
            claimed_at=claim.at,
            submitted_at=res.at if res is not None else None,
        )

    if in_review:
        state = State.REVIEW
    elif rnd > 1:
        prog = task.progress.get(assignee)
        resumed = prog is not None and prog.attempt == j and prog.round >= rnd
        state = State.IN_PROGRESS if resumed else State.REWORK
    else:
        state = State.IN_PROGRESS
    wakes = [t for t in (None if in_review else expires, deadline_at) if t is not None and t > now]
    return _One(
        state=state,
        assignee=assignee,
        agent=agent,
        claimed=True,
        round=rnd,
        window=w,
        lease_expires_at=expires,
        deadline_at=deadline_at,
        submitted_at=submitted_at,
        rework=rework,
        wake=min(wakes) if wakes else None,
    )
