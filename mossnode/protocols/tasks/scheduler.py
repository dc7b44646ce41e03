"""One node's scheduler: the task view, local agents and the clock in; effects out.

Sans-IO, in the manner of h11's Connection: the daemon calls :meth:`Scheduler.tick` whenever
its view of the document changed or the returned ``wake_at`` has come, applies the effects in
order (writes first, see :mod:`.effects`), and reports finished work with :meth:`finished` and
:meth:`review_finished`. The scheduler remembers only what runs locally; everything else is
derived again from the view each tick, so a restarted node picks up where the shared state says
it is (and re-runs held non-exclusive work whose process died with it).

What a tick does, in order:

1. cancel local work that is no longer this node's (lease lost, reassigned, cancelled, done
   elsewhere) and reviews that became moot;
2. for attempts this node won: claim them (or release them if no local agent has room), renew
   leases at half-life, dispatch claimed work to the agent as slots free (not while paused),
   keeping the rest waiting (claimed), and release work beyond an agent's limits;
3. bid on ready tasks in priority order while agents have room (running, waiting and undecided
   bids count against ``queue_factor`` times the capacity, see :func:`queueable`); propose
   itself for ready exclusive tasks (consensus picks one; the proposal carries the time, and
   the node claims the task only before :func:`.lifecycle.exclusive_deadline`);
4. let idle reviewer agents review submissions of other nodes, staggered by a hash rank;
5. create the instances of recurring schedules whose period it is this node's turn to start
   (:mod:`.recurring`), when ``makers`` (the members that may create tasks) includes it.

A swarm-wide pause (a consensus decision the daemon passes as ``paused``) and a paused task tree
stop bids, dispatches and new reviews (and a swarm-wide pause the creation of recurring
instances: a period that passes paused is skipped); leases of running work are still renewed.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from typing import Any

from mossnode.record import value

from . import control
from .allocation import LocalAgent, bid_score, capable
from .confidential import readable, reviewable
from .contract import validate
from .effects import (
    Bid,
    Cancel,
    Claim,
    Create,
    Dispatch,
    DispatchReview,
    Effect,
    LateResult,
    Plan,
    ProposeExclusive,
    Release,
    RenewLease,
    Submit,
)
from .lifecycle import Cache, Status, derive_all, exclusive_deadline, inputs_from_dependencies
from .model import HELD, TERMINAL, Assignment, State, Task, TaskView, View, changed_since
from .params import Params
from .recurring import Index, Schedule, due
from .reputation import Reputation
from .review import independent
from .stability import Stable
from .submission import SUBMITTABLE, plan_review
from .supervision import Limits, Refused, agent_capacity, task_id

REVIEWER = "reviewer"
SPREAD_MS = 1_000  # tasks created within this span are taken in a per-node order
QUEUE_FACTOR = 4  # an agent takes on (bids, won, waiting) up to this many times its capacity
# the k-th maker of a period's recurring instance creates it k times this late if none is seen
RECURRING_GRACE_MS = 2_000


def queueable(task: Task) -> bool:
    """May won work wait for a free slot? Not with a deadline (it runs from the claim) nor when
    exclusive (consensus assigns it, and a release would end it): those need a free slot."""
    return task.contract.deadline_ms is None and not task.contract.exclusive


@dataclass(slots=True)
class Run:
    """Work running on this node: which attempt and round, by which agent, since when."""

    attempt: int
    round: int
    agent: str
    started_at: int


@value
class Finished:
    """A local agent ended its work on ``task_id`` (reported to :meth:`Scheduler.tick`)."""

    task_id: str
    output: Any = None
    ok: bool = True
    error: str | None = None


@dataclass(slots=True)
class Scheduler:
    me: str
    params: Params = field(default_factory=Params)
    limits: Limits = field(default_factory=Limits)
    running: dict[str, Run] = field(default_factory=dict)
    reviewing: dict[str, Run] = field(default_factory=dict)
    statuses: dict[str, Status] = field(default_factory=dict)
    stable: Stable | None = None  # see .stability; None in simulations with bounded delays
    queue_factor: int = QUEUE_FACTOR  # local policy, see docs/tasks.md "Allocation"
    # the decided recurring schedules (id -> schedule): the daemon keeps this map up to date
    schedules: Mapping[str, Schedule] = field(default_factory=dict)
    _proposed: dict[str, int] = field(default_factory=dict)
    _cache: Cache = field(default_factory=Cache)
    _ordered: tuple[TaskView | None, frozenset[str], list[str]] = (None, frozenset(), [])
    _keys: dict[str, tuple[float, int, bytes]] = field(default_factory=dict)

    def depth(self, capacity: int) -> int:
        """What an agent of ``capacity`` may take on: running, waiting and undecided bids."""
        return capacity * max(1, self.queue_factor)

    # -- deriving ------------------------------------------------------------------------------

    def derive(
        self,
        view: TaskView,
        now_ms: int,
        exclusive: Mapping[str, Assignment] | None = None,
        authority: control.Authority | None = None,
    ) -> dict[str, Status]:
        self.statuses = derive_all(
            view,
            now_ms,
            params=self.params,
            exclusive=exclusive,
            authority=authority,
            cache=self._cache,
            stable=self.stable,
            schedules=self.schedules,
        )
        return self.statuses

    def recurring(self) -> Index:
        """The recurring instances as of the last derivation."""
        return self._cache.rec

    def take_restated(self) -> set[str] | None:
        """Tasks whose status changed since the last call (None: any may have); see
        :meth:`.lifecycle.Cache.take_restated`."""
        return self._cache.take_restated()

    # -- the step ------------------------------------------------------------------------------

    def tick(
        self,
        view: TaskView,
        *,
        agents: Sequence[LocalAgent],
        now_ms: int,
        reputation: Reputation | None = None,
        paused: bool = False,
        exclusive: Mapping[str, Assignment] | None = None,
        authority: control.Authority | None = None,
        finished: Sequence[Finished] = (),
        makers: Collection[str] = (),
    ) -> Plan:
        """One step. ``finished``: local work that ended since the last step; its submissions
        (or late results) come first in the plan, so that one entry carries them with
        everything else this step writes, and one derivation serves them all. ``makers``: the
        members that may create tasks (they take turns starting recurring instances)."""
        now, p, me = now_ms, self.params, self.me
        excl = exclusive or {}
        st = self.derive(view, now, excl, authority)
        effects: list[Effect] = []
        ended: set[str] = set()  # submitted this step: the view does not show it yet
        for f in finished:
            effects.extend(self._finished(view, st, f))
            ended.add(f.task_id)
        wakes: list[int] = list(self._cache.waking.values())  # every wake_at in ``st``
        local = {a.name: a for a in agents}
        cap = {a.name: agent_capacity(a.max_concurrency, self.limits) for a in agents}
        # what an agent may have taken on: running, claimed and waiting for a slot, undecided
        # bids. A bid holds no slot for its window and decision, so a node keeps bidding while
        # its agents are busy; a queueable win waits (claimed, lease renewed) for a free slot.
        depth = {n: self.depth(c) for n, c in cap.items()}
        # one pass: live tasks in priority order, sorted into what each phase looks at
        held: list[str] = []
        open_: list[str] = []
        in_review: list[str] = []
        for tid in self._order(view, self._cache.live):
            s = st[tid]
            if s.state in TERMINAL or s.state is State.BLOCKED or tid in ended:
                continue
            if s.assignee == me and s.state in HELD:
                held.append(tid)
            if s.state is State.PENDING and s.ready:
                open_.append(tid)
            elif s.state is State.REVIEW:
                in_review.append(tid)

        # 1. stop what is no longer ours
        for tid in sorted(self.running):
            why = self._lost(st.get(tid), self.running[tid], now)
            if why is not None:
                effects.append(Cancel(tid, why))
                del self.running[tid]
        for tid in sorted(self.reviewing):
            rs, r = st.get(tid), self.reviewing[tid]
            if (
                rs is None
                or rs.state is not State.REVIEW
                or (rs.attempt, rs.round) != (r.attempt, r.round)
            ):
                effects.append(Cancel(tid, "review no longer needed", review=True))
                del self.reviewing[tid]

        # load: running + claimed but not running + undecided bids (wins not yet claimed are
        # granted below in priority order)
        load: Counter[str] = Counter(r.agent for r in self.running.values())
        for tid in held:
            s = st[tid]
            if tid not in self.running and s.claimed and s.state is not State.REVIEW and s.agent:
                load[s.agent] += 1
        for tid in open_:
            s = st[tid]
            b = view[tid].bids.get(me)
            if s.assignee is None and b is not None and b.attempt == s.attempt:
                load[b.agent] += 1

        def room(name: str, task: Task) -> bool:
            return load[name] < (depth if queueable(task) else cap).get(name, 0)

        def pick(task: Task) -> LocalAgent | None:
            best: tuple[float, str] | None = None
            chosen = None
            for a in agents:
                if not capable(a, task) or not room(a.name, task):
                    continue
                rep = reputation.score(me, a.name, task.capabilities) if reputation else 0.5
                score = bid_score(rep, load[a.name], depth[a.name], a.load)
                key = (-score, a.name)
                if best is None or key < best:
                    best, chosen = key, a
            return chosen

        # 2. attempts this node won
        running_per_agent: Counter[str] = Counter(r.agent for r in self.running.values())
        waiting: Counter[str] = Counter()  # claimed, waiting for a slot (in priority order)
        for tid in held:
            s, task = st[tid], view[tid]
            if not s.claimed:
                a_excl = excl.get(tid) if task.contract.exclusive else None
                deadline = exclusive_deadline(a_excl, p) if a_excl is not None else None
                if deadline is not None and now >= deadline:
                    continue  # too late: it failed (others derive so a lease later); never run it
                mine = local.get(s.agent) if s.agent is not None else None
                agent: LocalAgent | None = None
                if not readable(view, st, tid, me):
                    agent = None  # won without being able to read it (keys changed): give up
                elif mine is not None and capable(mine, task) and room(mine.name, task):
                    agent = mine
                else:
                    agent = pick(task)
                if agent is None and task.contract.exclusive:
                    # claim it before its deadline even with every capable agent busy: it then
                    # waits for a slot as claimed work does (its lease renewed meanwhile)
                    agent = min(
                        (a for a in agents if capable(a, task)),
                        key=lambda a: (load[a.name] - cap[a.name], a.name),
                        default=None,
                    )
                if agent is not None:
                    load[agent.name] += 1
                if agent is None:
                    if not task.contract.exclusive:  # an exclusive release would end it: wait
                        effects.append(Release(tid, s.attempt, "no local agent with capacity"))
                    continue
                bid = task.bids.get(me)
                score = bid.score if bid is not None and bid.attempt == s.attempt else 0.0
                # an exclusive claim is stamped with this tick's time, which the derivation
                # found before the deadline: it counts, so the agent may run it
                at = now if task.contract.exclusive else None
                effects.append(Claim(tid, s.attempt, agent.name, None, score, at))
                wakes.append(now + p.lease_ms // 2)
                if paused or s.paused or running_per_agent[agent.name] >= cap[agent.name]:
                    waiting[agent.name] += 1
                    continue
                claimed = _with_claim(s, agent.name, now + p.lease_ms)
                effects.append(
                    Dispatch(tid, s.attempt, 1, agent.name, self._payload(view, st, task, claimed))
                )
                self.running[tid] = Run(s.attempt, 1, agent.name, now)
                running_per_agent[agent.name] += 1
                continue
            exp = s.lease_expires_at
            if exp is not None:
                renew_at = exp - p.lease_ms // 2
                if now >= renew_at:
                    effects.append(RenewLease(tid, s.attempt, now + p.lease_ms))
                    wakes.append(now + p.lease_ms // 2)
                else:
                    wakes.append(renew_at)
            if s.state not in (State.IN_PROGRESS, State.REWORK) or tid in self.running:
                continue
            if paused or s.paused:
                continue
            a = local.get(s.agent or "")
            if a is None or not capable(a, task):
                effects.append(
                    Release(tid, s.attempt, f"agent {s.agent} is gone or no longer capable")
                )
                continue
            prog = task.progress.get(me)
            if (
                task.contract.exclusive
                and prog is not None
                and prog.attempt == s.attempt
                and prog.round >= s.round
            ):
                effects.append(
                    Release(tid, s.attempt, "interrupted; an exclusive task is never restarted")
                )
                continue
            if running_per_agent[a.name] >= cap[a.name]:
                limit = depth[a.name] if queueable(task) else cap[a.name]
                # An exclusive task always waits: releasing its attempt would fail it ("runs
                # at most once"), though nothing ran twice (a rework verdict that finds its
                # agent busy with work taken while the task was in review, say).
                if task.contract.exclusive or running_per_agent[a.name] + waiting[a.name] < limit:
                    waiting[a.name] += 1  # its lease is renewed above until a slot frees
                    continue
                effects.append(
                    Release(tid, s.attempt, f"agent {a.name} is at its concurrency limit")
                )
                continue
            effects.append(
                Dispatch(tid, s.attempt, s.round, a.name, self._payload(view, st, task, s))
            )
            self.running[tid] = Run(s.attempt, s.round, a.name, now)
            running_per_agent[a.name] += 1

        # over the limit (capacity lowered, agent removed): give back the least important work
        for name in sorted(running_per_agent):
            extra = running_per_agent[name] - cap.get(name, 0)
            if extra <= 0:
                continue
            mine_running = [
                t
                for t in reversed(self._order(view, self._cache.live))
                if t in self.running and self.running[t].agent == name
            ]
            for tid in mine_running[:extra]:
                run = self.running.pop(tid)
                effects.append(Cancel(tid, f"agent {name} over its concurrency limit"))
                effects.append(
                    Release(tid, run.attempt, f"agent {name} over its concurrency limit")
                )

        # 3. bids and exclusive proposals
        if not paused:
            for tid in open_:
                if all(load[a.name] >= max(cap[a.name], depth[a.name]) for a in agents):
                    break  # no agent can take on anything more: no pick would find one
                s, task = st[tid], view[tid]
                if s.paused or s.assignee is not None:
                    continue
                if task.contract.exclusive:
                    if tid in excl:
                        continue
                    last = self._proposed.get(tid)
                    if last is not None and now - last < p.lease_ms:
                        wakes.append(last + p.lease_ms)
                        continue
                    if pick(task) is not None and readable(view, st, tid, me):
                        effects.append(ProposeExclusive(tid, me, now))
                        self._proposed[tid] = now
                        wakes.append(now + p.lease_ms)
                    continue
                if s.eligible_at is not None and now < s.eligible_at:
                    wakes.append(s.eligible_at)
                    continue
                w = s.window
                if w is not None and now > w.closes_at:
                    continue  # too late for this window; its decision wakes us
                b = task.bids.get(me)
                if b is not None and b.attempt == s.attempt:
                    continue
                if not readable(view, st, tid, me):
                    continue  # confidential input this node cannot open: leave it to others
                agent = pick(task)
                if agent is None:
                    continue
                rep = reputation.score(me, agent.name, task.capabilities) if reputation else 0.5
                score = bid_score(rep, load[agent.name], depth[agent.name], agent.load)
                effects.append(Bid(tid, s.attempt, agent.name, score))
                load[agent.name] += 1
                wakes.append(now + 2 * p.settle_ms)

        # 4. reviews by idle reviewers
        if not paused:
            reviews_per_agent: Counter[str] = Counter(r.agent for r in self.reviewing.values())
            reviewers = [a for a in agents if REVIEWER in a.roles]
            for tid in in_review:
                s, task = st[tid], view[tid]
                if tid in self.reviewing or s.paused or not reviewers:
                    continue
                if not reviewable(view, tid, s.assignee, me):
                    continue
                mine_rev = task.reviews.get(me)
                if mine_rev is not None and (mine_rev.attempt, mine_rev.round) == (
                    s.attempt,
                    s.round,
                ):
                    continue
                start = (
                    s.submitted_at if s.submitted_at is not None else now
                ) + self._review_delay(tid, s)
                if now < start:
                    wakes.append(start)
                    continue
                for a in reviewers:
                    if reviews_per_agent[a.name] >= cap[a.name]:
                        continue
                    if not independent(me, a.name, s.assignee, s.agent, p.same_node_review):
                        continue
                    effects.append(
                        DispatchReview(
                            tid, s.attempt, s.round, a.name, self._review_payload(task, s)
                        )
                    )
                    self.reviewing[tid] = Run(s.attempt, s.round, a.name, now)
                    reviews_per_agent[a.name] += 1
                    break

        # 5. recurring instances
        if self.schedules and not paused and me in makers:
            todo, wake = due(
                self.schedules.values(),
                self.recurring(),
                view,
                me,
                makers,
                now,
                RECURRING_GRACE_MS,
                self._cache.live,
            )
            for d in todo:
                effects.append(Create(task_id(me, d.suffix), d.suffix, d.schedule.fields()))
            if wake is not None:
                wakes.append(wake)

        future = [t for t in wakes if t > now]
        return Plan(tuple(effects), min(future) if future else None)

    # -- reports from local agents ---------------------------------------------------------

    def finished(
        self,
        view: TaskView,
        task_id: str,
        *,
        now_ms: int,
        output: Any = None,
        ok: bool = True,
        error: str | None = None,
        exclusive: Mapping[str, Assignment] | None = None,
        authority: control.Authority | None = None,
    ) -> Plan:
        """The local agent finished ``task_id``: a submission if this node still holds the
        work, else a late result that only goes to the log. An output violating the contract
        is submitted as a failed attempt with the violation, so the breach is on record."""
        if task_id not in self.running or task_id not in view:
            self.running.pop(task_id, None)
            return Plan()
        st = self.derive(view, now_ms, exclusive, authority)
        return Plan(self._finished(view, st, Finished(task_id, output, ok, error)))

    def _finished(
        self, view: TaskView, st: Mapping[str, Status], f: Finished
    ) -> tuple[Effect, ...]:
        task_id, output, ok, error = f.task_id, f.output, f.ok, f.error
        run = self.running.pop(task_id, None)
        task = view.get(task_id)
        if run is None or task is None:
            return ()
        s = st.get(task_id)
        current = (
            s is not None
            and s.assignee == self.me
            and s.state in SUBMITTABLE
            and (s.attempt, s.round, s.agent) == (run.attempt, run.round, run.agent)
        )
        if not current:
            return (LateResult(task_id, run.attempt, run.round, run.agent, ok, output, error),)
        if ok:
            bad = validate(output, task.contract.output_schema)
            if bad is not None:
                why = f"output violates output_schema {bad}"
                return (
                    Submit(task_id, run.attempt, run.round, run.agent, False, output, why, why),
                )
        return (
            Submit(
                task_id,
                run.attempt,
                run.round,
                run.agent,
                ok,
                output if ok else None,
                None if ok else error,
            ),
        )

    def review_finished(
        self,
        view: TaskView,
        task_id: str,
        *,
        now_ms: int,
        score: int,
        verdict: str,
        comments: str = "",
        exclusive: Mapping[str, Assignment] | None = None,
        authority: control.Authority | None = None,
    ) -> Plan | Refused:
        run = self.reviewing.pop(task_id, None)
        task = view.get(task_id)
        if run is None or task is None:
            return Plan()
        s = self.derive(view, now_ms, exclusive, authority).get(task_id)
        if (
            s is None
            or s.state is not State.REVIEW
            or (s.attempt, s.round) != (run.attempt, run.round)
        ):
            return Plan()
        review = plan_review(
            task,
            s,
            node=self.me,
            agent=run.agent,
            score=score,
            verdict=verdict,
            comments=comments,
            params=self.params,
        )
        if isinstance(review, Refused):
            return review
        return Plan((review,))

    # -- helpers -------------------------------------------------------------------------------

    def _order(self, view: TaskView, live: Collection[str]) -> list[str]:
        """The ``live`` task ids (not terminal: what a tick looks at, not the whole history)
        by priority (highest first), then age in ``SPREAD_MS`` buckets, then a per-node hash;
        recomputed when the view or the live set changed.

        The hash spreads the nodes: were every node to bid on the same few oldest tasks first,
        each task would collect a bid from every node while the others waited for a window, and
        the swarm would run only one node's capacity at a time. Older buckets still go first.

        Keys are kept per task id and checked again only for the tasks the view says changed
        and the newly live ones (a tick's view differs from the last in a few tasks, and a
        task's priority and age almost never change): the sort then compares stored keys.
        """
        last, last_live, order = self._ordered
        frozen = frozenset(live)
        if last is view and last_live == frozen:
            return order
        keys = self._keys
        touched = changed_since(view, last.serial) if isinstance(last, View) else None
        if len(keys) > 4 * len(frozen) + 1024:
            keys.clear()
            touched = None
        joined = frozen - last_live
        check: Collection[str] = (
            frozen if touched is None else [*(t for t in touched if t in frozen), *joined]
        )
        me = self.me.encode()[-64:]
        moved = set(joined)  # tasks placed afresh: new in the live set, or (re)keyed
        for t in check:
            task = view[t]
            k = keys.get(t)
            prio, bucket = -task.priority, task.created_at // SPREAD_MS
            if k is None or k[0] != prio or k[1] != bucket:
                h = k[2] if k is not None else blake2b(t.encode(), key=me, digest_size=8).digest()
                keys[t] = (prio, bucket, h)
                moved.add(t)
        if touched is None or len(moved) > 64:
            new = sorted(live, key=keys.__getitem__)
        else:
            # keys are unique (the hash), so the order is one: keep the last one, minus the
            # tasks that left or moved, and insert the moved ones where they belong
            gone = last_live - frozen
            new = [t for t in order if t not in gone and t not in moved] if gone or moved else order
            for t in moved:
                bisect.insort(new, t, key=keys.__getitem__)
        self._ordered = (view, frozen, new)
        return new

    def _lost(self, s: Status | None, run: Run, now: int) -> str | None:
        if s is None:
            return "task vanished"
        if s.state is State.CANCELLED:
            return "task cancelled"
        if s.state in (State.DONE, State.FAILED, State.BLOCKED):
            return f"task is {s.state.value}"
        if s.assignee != self.me or s.attempt != run.attempt:
            return f"lease lost: attempt {s.attempt} belongs to {s.assignee or 'nobody yet'}"
        if s.lease_expires_at is not None and now >= s.lease_expires_at:
            return "lease expired"
        if s.round != run.round:
            return f"round {run.round} is over"
        return None

    def _payload(
        self, view: TaskView, st: Mapping[str, Status], task: Task, s: Status
    ) -> dict[str, Any]:
        """The exec backend's stdin object (CLI.md), plus attempt/round and rework notes."""
        payload: dict[str, Any] = {
            "id": task.id,
            "title": task.title,
            "spec": task.spec,
            "input": task.input,
            "inputs_from_dependencies": inputs_from_dependencies(view, st, task.id),
            "attempt": s.attempt,
            "round": s.round,
        }
        if s.rework is not None:
            payload["rework"] = {"score": s.rework.score, "comments": s.rework.comments}
        return payload

    def _review_payload(self, task: Task, s: Status) -> dict[str, Any]:
        res = task.results.get(s.assignee or "")
        return {
            "id": task.id,
            "title": task.title,
            "spec": task.spec,
            "input": task.input,
            "attempt": s.attempt,
            "round": s.round,
            "output": res.output if res is not None else None,
            "output_schema": task.contract.output_schema,
        }

    def _review_delay(self, tid: str, s: Status) -> int:
        span = self.params.review_delay_ms
        if span <= 0:
            return 0
        h = hashlib.sha256(f"review\0{tid}\0{s.attempt}\0{s.round}\0{self.me}".encode()).digest()
        return int.from_bytes(h[:8], "big") % (span + 1)


def _with_claim(s: Status, agent: str, expires_at: int) -> Status:
    """The status the claim is about to produce, to dispatch in the same step."""
    return replace(
        s, state=State.IN_PROGRESS, agent=agent, claimed=True, lease_expires_at=expires_at
    )
