"""The node's scheduler loop: derive task states, bid, claim, dispatch to local agents.

Everything decided here is decided by ``protocols/tasks`` (pure); this loop only feeds it the
replicated view, the local agents and the clock, writes the facts it asks for (durably, before
acting on the next effect), and runs or cancels agent work. No polling by agents: the loop wakes
when the shared state changes or at the next time the scheduler said something may change.

Pull agents (backend ``api``, and ``openclaw:`` until a gateway runner exists) have no runner
here. They bid like the others while they are online (an open event stream, or an API call in
the last ``pull_idle_s``); work their node wins for them is handed over as a ``work`` event
and listed by :meth:`TaskService.my_work`, and they report through the API (progress, submit,
review), which this service checks with the same pure rules before writing anything. Work held
by an agent that went offline is released, so a vanished agent cannot hold a task forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..agents.base import Backend, Outcome
from ..agents.dirfd import has_leftovers
from ..agents.exec import ExecBackend
from ..agents.workdirs import Sweeper, open_work
from ..crypto.sealed import Randomness, SealedError
from ..protocols import tasks as T
from ..protocols.crdt import Replica, Writer, WriteRefused
from ..protocols.crdt.schema import KEY_SEP, node_key
from ..protocols.tasks import confidential as C
from ..protocols.tasks.effects import Write
from ..protocols.tasks.supervision import agent_capacity

if TYPE_CHECKING:
    from ..protocols.decisions import ConsensusMembership
    from .agents import Agent
    from .daemon import Daemon
    from .state import StateService

log = logging.getLogger("mossnode.tasks")

MIN_TICK_S = 0.02  # coalesce bursts of changes into one derivation
# A busy node ticks at most this often: the changes that arrive meanwhile share one derivation,
# and what it writes one entry (each costs every node a verification, an apply and a view
# rebuild). An idle node still ticks MIN_TICK_S after a change. Its entries go out at most
# every state.PUBLISH_SPACING_S (0.2 s) anyway; measured (bench tasks, alternating runs):
# 27-28 ms of CPU per task at 0.2 s, 33-34 ms at 0.1 s.
TICK_SPACING_S = 0.2
# ... but only this long after the last tick once local work has ended: the result goes out and
# the freed slot takes the next claimed task without waiting out a whole spacing. A slot held
# until the next full-spacing tick capped a node at its capacity / TICK_SPACING_S runs per second
# (4 nodes x 8 slots / 0.2 s: the 4-node swarm topped out near 140 tasks/s, with CPU to spare).
FINISH_SPACING_S = 0.05
SWEEP_INTERVAL_S = 5.0  # at most this often a run's leftover files are removed (workdirs)
SWEEP_BACKOFF_S = 300.0  # the longest wait before retrying what a sweep could not remove
SYNC_FIRST_S = 30.0  # longest the scheduler waits for the first anti-entropy round
PULL_BACKENDS = frozenset({"api", "openclaw"})  # agents that fetch their work over the API
# Refusal codes of the pure task rules, as HTTP statuses for the API.
REFUSAL_STATUS = {
    "not_found": 404,
    "state": 409,
    "window": 409,
    "exclusive": 409,
    "capacity": 409,
    "not_capable": 409,
    "not_assignee": 403,
    "self_review": 403,
    "forbidden": 403,
    "output_schema": 422,
    "bad_score": 400,
    "bad_verdict": 400,
}


class WorkRefused(Exception):
    """An agent's request about its work was refused; nothing was written."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = REFUSAL_STATUS.get(code, 400)


@dataclass(frozen=True, slots=True)
class Work:
    """Work handed to a pull agent: a task attempt and round to do, or a submission to review."""

    agent: str
    task: str
    review: bool
    attempt: int
    round: int
    payload: dict[str, Any]
    since: int

    def public(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": "review" if self.review else "run",
            "attempt": self.attempt,
            "round": self.round,
            "since": self.since,
            "payload": self.payload,
        }


def backend_kind(agent: Agent) -> str:
    return agent.backend.partition(":")[0]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def json_numbers(value: Any) -> Any:
    """Yrs stores every number as a float; give agents back the integers they wrote."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_numbers(v) for v in value]
    return value


def apply_writes(w: Writer, ws: tuple[Write, ...]) -> None:
    for x in ws:
        if x.kind == "create":
            fields = dict(x.value)
            suffix = fields.pop("suffix")
            w.create_task(suffix, **fields)
        elif x.kind == "log":
            w.append_log(x.task_id, x.value)
        else:
            w.put(x.task_id, x.kind, x.value)


def paths_of(ws: Iterable[Write], me: str) -> list[tuple[Any, ...]]:
    """The document paths :func:`apply_writes` of ``ws`` changes as node ``me`` (for
    :meth:`.state.StateService.write`): one key per per-node entry, a whole task otherwise."""
    out: dict[tuple[Any, ...], None] = {}
    for x in ws:
        if x.kind in T.SUB_KINDS:
            out[("tasks", x.task_id, node_key(x.kind, me))] = None
        else:
            out[("tasks", x.task_id)] = None
    return list(out)


def reread(
    replica: Replica, tid: str, before: T.Task | None, keys: set[str] | None
) -> tuple[bool, T.Task | None]:
    """Task ``tid`` as the replica now holds it, given ``before`` (its parse as of the last read)
    and the ``keys`` of its map changed since (None: any): ``(exists, task)``, ``task`` None
    where there is no such task or it does not parse. When only per-node entries changed (a
    bid, a lease, a result), reads and parses those into the task as it was; otherwise reads
    and parses the whole task. No plain copy of a task outlives the read: the parsed task is
    the node's only copy besides the document (a copy per task grew a daemon by about 6 KB a
    task, for good)."""
    if keys is None or before is None:
        return _parse(tid, replica.task(tid))
    nodes: dict[str, list[tuple[str, str]]] = {}  # kind -> (key, node) changed
    for key in keys:
        kind, _, node = key.partition(KEY_SEP)
        nodes.setdefault(kind, []).append((key, node))
    if not nodes.keys() <= T.SUB_KINDS:
        return _parse(tid, replica.task(tid))
    got = replica.task_entries(tid, sorted(keys))
    if got is None:
        return False, None
    # the changed entries only (a deleted one absent): with_entries keeps the others' parses
    fresh = {
        kind: {node: got[key] for key, node in changed if key in got}
        for kind, changed in nodes.items()
    }
    names = {kind: [node for _, node in changed] for kind, changed in nodes.items()}
    return True, before.with_entries(fresh, nodes, names)


def _parse(tid: str, raw: dict[str, Any] | None) -> tuple[bool, T.Task | None]:
    return raw is not None, None if raw is None else T.Task.from_raw(tid, raw)


async def pause_before_tick(last: float, ended: Sequence[T.Finished], finish: trio.Event) -> None:
    """Wait until the scheduler's next tick may run: MIN_TICK_S after now (a burst of changes
    shares one derivation) and TICK_SPACING_S after the ``last`` tick, or only
    FINISH_SPACING_S after it once local work has ``ended`` (``finish`` is set then)."""
    woke = trio.current_time()
    if not ended:
        with trio.move_on_at(last + TICK_SPACING_S):
            await finish.wait()
        if ended:
            woke = trio.current_time()  # others ending about now share the tick
    spacing = FINISH_SPACING_S if ended else TICK_SPACING_S
    await trio.sleep_until(max(woke + MIN_TICK_S, last + spacing))


class TaskService:
    def __init__(self, daemon: Daemon, shared: StateService) -> None:
        self.d = daemon
        self.shared = shared
        self.params = T.Params()
        self.limits = T.Limits()
        self.sched = T.Scheduler(daemon.peer_id, params=self.params, limits=self.limits)
        # the daemon's map, kept up to date in place by the decided log (the derivation cache
        # compares it with what it derived with)
        self.sched.schedules = daemon.schedules
        self._makers: tuple[int, list[str]] = (-1, [])  # (log height, members with task.create)
        self.horizons = T.Horizons()
        self._tally = T.Tally()  # reputation, kept up to date task by task
        self._rep: T.Reputation | None = None  # the tally's table as bids read it
        self._bidders: dict[tuple[Any, ...], list[str]] = {}
        self.sched.stable = T.stable_rule(daemon.peer_id, self._expected_bidders, self._horizon)
        self.view: T.TaskView = {}
        self.statuses: dict[str, T.Status] = {}
        self._wake = trio.Event()
        self._finish = trio.Event()  # set when local work ends (see FINISH_SPACING_S)
        self._runs: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.workdir = daemon.state_dir / "work"
        self.sweeper = Sweeper()
        self._sweep_agents: set[str] = set()  # agents whose .trash has something to remove
        self._sweep_wanted = trio.Event()
        self._work_fd: int | None = None  # <state>/work, held open (workdirs.open_work)
        self.events: list[dict[str, Any]] = []  # activity feed (bounded)
        self._last_states: dict[str, str] = {}
        # the tasks the document held at the last refresh (those that parse are in the view)
        self._known: set[str] = set()
        # task -> keys of its map changed since the last refresh (None: re-read all of it)
        self._dirty: dict[str, set[str] | None] = {}
        self._rescan = True
        self._retold: set[str] | None = set()  # tasks re-read since _restated (None: all)
        self.work: dict[str, Work] = {}  # "<task>" or "<task>#review" -> pull agent's work
        self._seen: dict[str, float] = {}  # pull agent -> monotonic time of its last API call
        self._born = time.monotonic()
        self._load_at = (-1.0, 0.0)  # (monotonic time, load) of the last reading
        # Work local agents ended, submitted by the next tick (one entry for all of them).
        self._ended: list[T.Finished] = []

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        # A crashed daemon's run directories are taken in before any run of this one starts.
        try:
            self._work_fd = open_work(self.workdir)
        except OSError as exc:
            log.warning(
                "%s cannot be opened (%s): run directories are not removed", self.workdir, exc
            )
        else:
            for name in self._agent_dirs():  # a sweeper process only where there is work
                if has_leftovers(self._work_fd, name) and not await self.sweeper.sweep(
                    self._work_fd, name, adopt_before=time.time()
                ):
                    self._sweep_agents.add(name)
            nursery.start_soon(self._sweep_loop)
        nursery.start_soon(self._loop)

    def _agent_dirs(self) -> list[str]:
        try:
            return sorted(
                e.name for e in os.scandir(self._work_fd) if e.is_dir(follow_symlinks=False)
            )
        except OSError:
            return []

    async def _sweep_loop(self) -> None:
        """Empty the ``.trash`` of agents whose runs left files (their working directories), at
        most once per SWEEP_INTERVAL_S: one sweeper process per agent and sweep. What a sweep
        could not remove is retried, waiting twice as long each time (up to SWEEP_BACKOFF_S)."""
        assert self._work_fd is not None
        wait = SWEEP_INTERVAL_S
        while True:
            await trio.sleep(wait)
            if not self._sweep_agents:
                await self._sweep_wanted.wait()
            self._sweep_wanted = trio.Event()
            agents, self._sweep_agents = self._sweep_agents, set()
            failed = False
            for name in sorted(agents):
                if not await self.sweeper.sweep(self._work_fd, name):
                    self._sweep_agents.add(name)
                    failed = True
            wait = min(wait * 2, SWEEP_BACKOFF_S) if failed else SWEEP_INTERVAL_S

    def poke(self) -> None:
        self._wake.set()

    def heard(self, peer: str, at: int, body: dict[str, Any]) -> None:
        """A presence heartbeat: it may complete what this node knows ``peer`` wrote."""
        seq = body.get("state_seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            applied = self.shared.replica.vector().get(peer, 0)
            if self.horizons.heard(peer, at, seq, applied):
                self._wake.set()

    def _horizon(self, node: str) -> int:
        return max(self.shared.replica.horizon(node), self.horizons.of(node))

    def _expected_bidders(self, task: T.Task) -> list[str]:
        """Live members advertising an agent able to take ``task``: those whose bids a
        window's decision must not miss (see protocols/tasks/stability.py)."""
        now = now_ms()
        key = (frozenset(task.capabilities), task.role, now // 100)
        if key in self._bidders:
            return self._bidders[key]
        if len(self._bidders) > 256:
            self._bidders.clear()
        state = self.d._swarm()
        out: list[str] = []
        for peer, rec in self.d.detector.peers.items():
            agents = rec.info.get("agents")
            if not isinstance(agents, list) or self.d.detector.health(peer, now) != "alive":
                continue
            member = state.by_peer_id(peer)
            if member is None:
                continue
            held = frozenset(member.roles)  # a node's agents act only within its own roles
            for a in agents:
                if not isinstance(a, dict):
                    continue
                roles, caps = a.get("roles"), a.get("capabilities")
                if not isinstance(roles, list) or not isinstance(caps, list):
                    continue
                try:
                    agent = T.LocalAgent("", frozenset(roles) & held, frozenset(caps))
                except TypeError:  # unhashable junk from a peer
                    continue
                if T.capable(agent, task):
                    out.append(peer)
                    break
        self._bidders[key] = out
        return out

    def changed(self, paths: list[tuple[Any, ...]] | None, wake: bool = True) -> None:
        """The shared state changed at ``paths`` (None: anywhere): mark them for the next
        view refresh, and wake up unless told not to (a sync stream wakes us itself)."""
        if self.horizons.pending:
            self.horizons.applied(self.shared.replica.vector())
        if paths is None:
            self._rescan = True
        else:
            dirty = self._dirty
            for p in paths:
                if p and p[0] == "tasks":
                    if len(p) >= 2 and isinstance(p[1], str):
                        tid = p[1]
                        if len(p) >= 3 and isinstance(p[2], str):
                            keys = dirty.setdefault(tid, set())
                            if keys is not None:
                                keys.add(p[2])
                        else:
                            dirty[tid] = None
                    else:
                        self._rescan = True
        if wake:
            self._wake.set()

    def _update_view(self) -> None:
        dirty, self._dirty = self._dirty, {}
        known = self._known
        if self._rescan:
            self._rescan = False
            # "changed anywhere": every task is read again, those gone included
            ids = set(self.shared.replica.doc["tasks"].keys())  # pycrdt: a pass over roots
            for tid in ids | known:
                dirty[tid] = None
        parsed: dict[str, T.Task] = {}
        view = self.view
        # One pycrdt transaction for all the re-reads: each read's own nests in it, and the
        # reads commit (empty) once, not once per task.
        with self.shared.replica.doc.transaction():
            for tid, keys in dirty.items():
                exists, task = reread(self.shared.replica, tid, view.get(tid), keys)
                if exists:
                    known.add(tid)
                else:
                    known.discard(tid)
                if task is not None:
                    parsed[tid] = task
        changed = set(dirty)
        if changed or not view:
            full = not view
            # the same view build_view makes of plain copies, from the parses: a fresh view
            # in id order, or the last one with the changed tasks replaced or dropped
            self.view = (
                T.View({tid: parsed[tid] for tid in sorted(parsed)})
                if full
                else T.build_view({}, view, changed, parsed)
            )
            if full:
                self._retold = None
            elif self._retold is not None:
                self._retold |= changed

    # --- inputs to the pure scheduler -----------------------------------------------------

    def _load(self) -> float:
        """The host's load per CPU (0..1), read at most once a second (it is a minute's
        average; every tick and bid asked /proc for it)."""
        t = time.monotonic()
        if t - self._load_at[0] >= 1.0:
            self._load_at = (t, min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))
        return self._load_at[1]

    def _agents(self) -> list[T.LocalAgent]:
        """Local agents with the roles the node itself holds: peers judge the node's writes
        by the node's roles, so an agent can only act within them."""
        load = self._load()
        held = frozenset(self.d.node_roles())
        out = []
        for a in self.d.agents.agents.values():
            kind = backend_kind(a)
            roles = frozenset(a.roles) & held
            if not roles or (kind != "exec" and kind not in PULL_BACKENDS):
                continue
            if kind in PULL_BACKENDS and not self.online(a.name):
                # Offline: it keeps (and finishes) the work it holds, but takes nothing new.
                roles = frozenset()
            out.append(
                T.LocalAgent(a.name, roles, frozenset(a.capabilities), load, a.max_concurrency)
            )
        return out

    def online(self, name: str) -> bool:
        """Is this pull agent around to take work? Right after a start every agent counts as
        online for a while, so that work it held is not given away before it reconnects."""
        t, idle = time.monotonic(), self.d.cfg.pull_idle_s
        return (
            self.d.events.listeners(name) > 0
            or t - self._seen.get(name, -idle) < idle
            or t - self._born < idle
        )

    def seen(self, name: str) -> None:
        """A pull agent called the API: it is online (wake the loop if it was not)."""
        was = self.online(name)
        self._seen[name] = time.monotonic()
        if not was:
            self.poke()

    def _reputation(self) -> T.Reputation:
        """Reputation from the replicated history, as of the last derivation."""
        if self._rep is None:
            self._rep = self._tally.reputation()
        return self._rep

    def counts(self) -> dict[str, int]:
        """Tasks per state as of the last tick (tasks it has not seen yet count as pending):
        a cheap progress figure for status, without a derivation or a row per task."""
        statuses = self.statuses
        by_state = Counter(
            statuses[tid].state.value if tid in statuses else "pending" for tid in self.view
        )
        return {"total": len(self.view), **dict(sorted(by_state.items()))}

    def leaderboard(self, now: int) -> list[dict[str, Any]]:
        """``mossnode leaderboard``: the tally after bringing the statuses up to date."""
        self.refresh(now)
        return self._reputation().leaderboard()

    def _restated(self, now: int) -> None:
        """After a derivation: report the tasks whose state changed to the activity feed and
        fold the changed tasks into the reputation tally. Both cost the changes, not the
        history (a node with 100,000 finished tasks spent most of its time on full passes)."""
        restated = self.sched.take_restated()
        tids = None if restated is None or self._retold is None else restated | self._retold
        self._retold = set()
        self._feed(now, restated)
        self._tally.update(self.view, self.statuses, tids)
        self._rep = None

    def _task_creators(self, state: ConsensusMembership) -> list[str]:
        """Members that may create tasks (they take turns starting recurring instances)."""
        if not self.d.schedules:
            return []
        if self._makers[0] != state.height:
            ids = sorted(m.peer_id for k, m in state.members.items() if state.may(k, "task.create"))
            self._makers = (state.height, ids)
        return self._makers[1]

    def _authority(self, node: str, permission: str) -> bool:
        state = self.d._swarm()
        return self.shared.policy.may(node, permission, state.height)

    def refresh(self, now: int, statuses: bool = True) -> None:
        """Bring the view up to date with the replica and, unless ``statuses`` is false,
        derive every task's status at ``now`` (a pass over all tasks)."""
        self._update_view()
        if not statuses:
            return
        self.statuses = self.sched.derive(
            self.view, now, exclusive=self.d.exclusive, authority=self._authority
        )
        self._restated(now)

    def _feed(self, now: int, tids: Iterable[str] | None) -> None:
        """Activity entries for the tasks ``tids`` (None: all) whose state changed."""
        statuses = self.statuses
        for tid in list(statuses) if tids is None else sorted(tids):
            st = statuses.get(tid)
            if st is None:
                self._last_states.pop(tid, None)
                continue
            s = str(st.state)
            old = self._last_states.get(tid)
            if old != s:
                self._last_states[tid] = s
                entry = {
                    "at": now,
                    "task": tid,
                    "state": s,
                    "assignee": st.assignee,
                    "agent": st.agent,
                }
                self.events.append(entry)
                self.d.events.publish("task", {**entry, "old": old})
        del self.events[:-1000]

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        # A restarted node first catches up: a view of half the log would bid on work already
        # done elsewhere, its writes wait for the sync anyway, and the CPU goes to the sync.
        await self.shared.wait_synced(SYNC_FIRST_S)
        # The first pass at once, not at the first change or after 5 s: over a restarted
        # node's tasks it is its longest, and the first change is usually a peer connecting
        # to sync from it, which then waited for the pass (about a second per 10,000 tasks).
        wake_at: int | None = now_ms()
        last = -TICK_SPACING_S
        while True:
            timeout = 5.0 if wake_at is None else max(0.0, (wake_at - now_ms()) / 1000)
            with trio.move_on_after(timeout):
                await self._wake.wait()
            await pause_before_tick(last, self._ended, self._finish)
            self._wake = trio.Event()
            self._finish = trio.Event()
            last = trio.current_time()
            try:
                wake_at = await self._tick()
            except Exception:
                log.exception("scheduler tick failed")
                wake_at = now_ms() + 1000

    async def _tick(self) -> int | None:
        now = now_ms()
        state = self.d._swarm()
        self._update_view()
        rep = self._reputation()
        ended, self._ended = self._ended, []
        try:
            plan = self.sched.tick(
                self.view,
                agents=self._agents(),
                now_ms=now,
                reputation=rep,
                paused=state.paused,
                exclusive=self.d.exclusive,
                authority=self._authority,
                finished=ended,
                makers=self._task_creators(state),
            )
        except BaseException:
            self._ended[:0] = ended  # reported again by the next tick
            raise
        self.statuses = self.sched.statuses
        self._restated(now)
        effects = [self.seal_outcome(e) for e in plan.effects] if ended else list(plan.effects)
        await self._do_all(self._reclaim() + effects)
        return plan.wake_at

    async def _do_all(self, effects: Sequence[T.Effect]) -> None:
        """Write the facts of all effects as one entry (one fsync, one gossip message), then
        act: every fact is durable before any agent starts or stops."""
        now = now_ms()
        ws = tuple(w for e in effects for w in T.writes(e, now))
        if ws:
            try:
                await self.shared.write(lambda w: apply_writes(w, ws), paths_of(ws, self.d.peer_id))
            except WriteRefused as exc:
                # One refused fact must not hold back the others: write them one by one.
                log.warning("batched task write refused (%s); writing effects singly", exc)
                for e in effects:
                    await self._do(e)
                return
        for e in effects:
            await self._act(e)

    async def _do(self, effect: T.Effect) -> None:
        ws = T.writes(effect, now_ms())
        if ws:
            try:
                await self.shared.write(lambda w: apply_writes(w, ws), paths_of(ws, self.d.peer_id))
            except WriteRefused as exc:
                self.d.counters["task_write_refused"] += 1
                log.warning("%s on %s refused: %s", type(effect).__name__, effect.task_id, exc)
                return
        await self._act(effect)

    async def _act(self, effect: T.Effect) -> None:
        if isinstance(effect, T.Dispatch):
            self._start(effect.task_id, effect.agent, effect.payload, review=False)
        elif isinstance(effect, T.DispatchReview):
            self._start(effect.task_id, effect.agent, effect.payload, review=True)
        elif isinstance(effect, T.Cancel):
            key = effect.task_id + ("#review" if effect.review else "")
            scope = self._runs.pop(key, None)
            if scope is not None:
                log.info("cancelling %s: %s", effect.task_id, effect.reason)
                scope.cancel()
            work = self.work.pop(key, None)
            if work is not None:
                info = {"action": "cancel", "task": work.task, "review": work.review}
                self.d.events.publish("work", {**info, "reason": effect.reason}, work.agent)
        elif isinstance(effect, T.ProposeExclusive):
            await self.d.propose_exclusive(effect.task_id, effect.node, effect.at)

    # --- running agent work -----------------------------------------------------------------

    def _backend(self, agent: Agent) -> Backend:
        kind, _, arg = agent.backend.partition(":")
        if kind == "exec":
            return ExecBackend(arg, Path(self.workdir) / agent.name, work_fd=self._work_fd)
        raise ValueError(f"backend {kind} is not available")

    def _start(self, tid: str, agent_name: str, payload: dict[str, Any], review: bool) -> None:
        key = tid + ("#review" if review else "")
        if key in self._runs or self._nursery is None:
            return
        agent = self.d.agents.agents.get(agent_name)
        if agent is None:
            return
        if backend_kind(agent) in PULL_BACKENDS:
            try:
                opened = self.open_payload(tid, json_numbers(payload), review)
            except SealedError as exc:  # cannot happen for work this node bid on: say so loudly
                log.error("cannot open confidential %s for %s: %s", tid, agent.name, exc)
                return
            self._hand_over(key, agent.name, opened, review)
            return
        scope = trio.CancelScope()
        self._runs[key] = scope
        self._nursery.start_soon(self._run, tid, agent, json_numbers(payload), review, scope)

    async def _run(
        self, tid: str, agent: Agent, payload: dict[str, Any], review: bool, scope: trio.CancelScope
    ) -> None:
        key = tid + ("#review" if review else "")
        attempt, rnd = int(payload.get("attempt", 1)), int(payload.get("round", 1))

        secret = self._confidential(tid)

        async def progress(fraction: float, message: str) -> None:
            # an agent's progress text may quote what it reads: not written for secret tasks
            eff = T.Progress(tid, attempt, rnd, None if secret else message or None, fraction)
            ws = T.writes(eff, now_ms())
            await self.shared.write(lambda w: apply_writes(w, ws), paths_of(ws, self.d.peer_id))

        outcome: Outcome | None = None
        try:
            with scope:
                log.info("%s %s on agent %s", "reviewing" if review else "running", tid, agent.name)
                payload = self.open_payload(tid, payload, review)
                backend = self._backend(agent)
                try:
                    outcome = await backend.run(payload, progress)
                finally:
                    if isinstance(backend, ExecBackend) and backend.trashed:
                        self._sweep_agents.add(agent.name)
                        self._sweep_wanted.set()
        except Exception as exc:
            outcome = Outcome(False, error=f"backend failed: {exc}")
        finally:
            self._runs.pop(key, None)
        if outcome is None:  # cancelled: the scheduler already knows why
            return
        if review:
            await self._finish_review(tid, outcome)
            return
        unfit = T.storable(outcome.output) if outcome.ok else None
        if unfit is not None:  # Yrs would refuse it (or fail hard): a failed attempt
            outcome = Outcome(False, error=f"output cannot be stored: {unfit}")
        # Submitted by the next tick, with whatever else ended by then: one entry, one
        # derivation for all of them (the tick seals confidential outcomes).
        self._ended.append(T.Finished(tid, outcome.output, outcome.ok, outcome.error or None))
        self._finish.set()
        self.poke()

    async def _finish_review(self, tid: str, outcome: Outcome) -> None:
        now = now_ms()
        self._update_view()
        out = outcome.output if outcome.ok and isinstance(outcome.output, dict) else {}
        score, verdict = out.get("score"), out.get("verdict")
        if type(score) is not int or verdict not in ("done", "rework"):
            why = C.SEALED_DETAILS if self._confidential(tid) else outcome.error
            log.warning("review of %s gave no {score, verdict}: %s", tid, why)
            score, verdict = 1, "rework"
        plan = self.sched.review_finished(
            self.view,
            tid,
            now_ms=now,
            score=score,
            verdict=str(verdict),
            comments=str(out.get("comments", ""))[:2000],
            exclusive=self.d.exclusive,
            authority=self._authority,
        )
        if isinstance(plan, T.Refused):
            log.warning("review of %s refused: %s", tid, plan.reason)
            return
        await self._do_all(plan.effects)
        self.poke()

    # --- confidential tasks (protocols/tasks/confidential.py has the rules) -----------------

    def _confidential(self, tid: str) -> bool:
        task = self.view.get(tid)
        return task is not None and bool(task.contract.confidential)

    def members(self) -> C.Members:
        state = self.d._swarm()
        return {m.peer_id: (m.public_key, frozenset(m.roles)) for m in state.members.values()}

    def advertised(self) -> dict[str, set[str]]:
        """Peer id -> roles of the agents each node advertises in presence (ours: local)."""
        out: dict[str, set[str]] = {}
        for peer, rec in self.d.detector.peers.items():
            agents = rec.info.get("agents")
            for a in agents if isinstance(agents, list) else []:
                roles = a.get("roles") if isinstance(a, dict) else None
                if isinstance(roles, list):
                    out.setdefault(peer, set()).update(r for r in roles if isinstance(r, str))
        out[self.d.peer_id] = {r for a in self.d.agents.agents.values() for r in a.roles}
        return out

    def _seal(self, value: Any, context: str, to: dict[str, bytes]) -> dict[str, Any]:
        rand = Randomness.from_bytes(os.urandom(Randomness.SIZE))
        return C.seal_value(value, context=context, recipients=to, rand=rand)

    def _open(self, value: Any, context: str) -> Any:
        return C.open_value(
            value, context=context, peer_id=self.d.peer_id, seed=self.d.identity.seed
        )

    def seal_create(self, plan: T.Create) -> T.Create | T.Refused:
        """Seal a new confidential task's input to its readers (refused if nobody could read
        it: no member node holds one of its roles with an agent of that role)."""
        roles = plan.fields["contract"]["confidential"]
        members = self.members()
        readers = C.recipients(roles, members, self.advertised(), author="")
        if not readers:
            return T.Refused(
                "no_reader",
                f"no member node holds one of the roles {roles} with an agent of that role "
                "in presence: nobody could read or run this task",
            )
        to = C.recipients(roles, members, self.advertised(), author=self.d.peer_id)
        sealed = self._seal(plan.fields["input"], C.input_context(plan.task_id), to)
        return replace(plan, fields={**plan.fields, "input": sealed})

    def seal_outcome(self, e: T.Effect) -> T.Effect:
        """An outcome of a confidential task as written: the output (or, for a failure, the
        error and the offending output) sealed to the readers, plain text only generic.
        Every path that writes a Submit or LateResult must pass it through here."""
        if not isinstance(e, T.Submit | T.LateResult):
            return e
        task = self.view.get(e.task_id)
        if task is None or not task.contract.confidential:
            return e
        violation = e.violation if isinstance(e, T.Submit) else None
        if e.ok and violation is None:
            value: Any = e.output
        else:
            value = {"error": e.error, "violation": violation, "output": e.output}
        to = C.recipients(
            task.contract.confidential,
            self.members(),
            self.advertised(),
            author=self.d.peer_id,
            also=C.holders(task.input),
        )
        sealed = self._seal(value, C.output_context(e.task_id, self.d.peer_id), to)
        generic = None if e.ok else f"agent reported failure ({C.SEALED_DETAILS})"
        if isinstance(e, T.Submit):
            if violation is not None:
                generic = f"output violates output_schema ({C.SEALED_DETAILS})"
                return replace(e, output=sealed, error=generic, violation=generic)
            return replace(e, output=sealed, error=generic)
        return replace(e, output=sealed, error=generic)

    def open_payload(self, tid: str, payload: dict[str, Any], review: bool) -> dict[str, Any]:
        """The agent's payload with the sealed values of the task and of its confidential
        dependencies opened with this node's key (SealedError if one does not open)."""
        out = dict(payload)
        if self._confidential(tid):
            out["input"] = self._open(payload.get("input"), C.input_context(tid))
        deps = dict(payload.get("inputs_from_dependencies") or {})
        for dep, value in deps.items():
            d, st = self.view.get(dep), self.statuses.get(dep)
            if d is not None and d.contract.confidential and st is not None and st.accepted:
                deps[dep] = self._open(value, C.output_context(dep, st.accepted.node))
        if "inputs_from_dependencies" in payload:
            out["inputs_from_dependencies"] = deps
        st = self.statuses.get(tid)
        if review and self._confidential(tid) and st is not None and st.assignee:
            out["output"] = self._open(payload.get("output"), C.output_context(tid, st.assignee))
        return out

    def reveal(self, tid: str, row: dict[str, Any], reader: frozenset[str]) -> dict[str, Any]:
        """A task row for a caller holding ``reader`` roles: sealed values opened if one of
        them is a role the task is confidential to and this node holds the key; otherwise
        (and for anything that does not open) the redacted placeholder."""
        task = self.view.get(tid)
        if task is None or not task.contract.confidential:
            return row
        roles = task.contract.confidential
        entitled = bool(reader & frozenset(roles))

        def show(value: Any, context: str) -> Any:
            if entitled:
                try:
                    return self._open(value, context)
                except SealedError:
                    pass
            return C.redacted(roles)

        out = dict(row)
        out["input"] = show(row.get("input"), C.input_context(tid))
        st = self.statuses.get(tid)
        if row.get("result") is not None and st is not None and st.accepted is not None:
            out["result"] = show(row["result"], C.output_context(tid, st.accepted.node))
        results = {}
        for node, r in dict(row.get("results") or {}).items():
            if isinstance(r, dict) and r.get("output") is not None:
                r = {**r, "output": show(r["output"], C.output_context(tid, node))}
            results[node] = r
        out["results"] = results
        logs = []
        for rec in row.get("log") or []:
            if isinstance(rec, dict) and rec.get("output") is not None:
                rec = {**rec, "output": show(rec["output"], C.output_context(tid, rec["node"]))}
            logs.append(rec)
        out["log"] = logs
        if not entitled:
            progress = {}
            for node, p in dict(row.get("progress") or {}).items():
                if isinstance(p, dict) and p.get("message") not in (None, "started"):
                    p = {**p, "message": None}
                progress[node] = p
            out["progress"] = progress
        return out

    # --- pull agents ------------------------------------------------------------------------

    def _hand_over(self, key: str, agent: str, payload: dict[str, Any], review: bool) -> None:
        tid = key.removesuffix("#review")
        work = Work(
            agent,
            tid,
            review,
            int(payload.get("attempt", 1)),
            int(payload.get("round", 1)),
            payload,
            now_ms(),
        )
        self.work[key] = work
        log.info("%s %s handed to pull agent %s", "review of" if review else "task", tid, agent)
        self.d.events.publish(
            "work", {"action": "review" if review else "run", **work.public()}, agent
        )

    def _reclaim(self) -> list[T.Effect]:
        """Take back work from pull agents that went offline: a task is released (the swarm
        offers it again), a review is dropped (another reviewer takes it)."""
        effects: list[T.Effect] = []
        for key, work in sorted(self.work.items()):
            if self.online(work.agent):
                continue
            why = f"pull agent {work.agent} went offline"
            del self.work[key]
            info = {"action": "cancel", "task": work.task, "review": work.review}
            self.d.events.publish("work", {**info, "reason": why}, work.agent)
            held = self.sched.reviewing if work.review else self.sched.running
            run = held.get(work.task)
            if run is None or run.agent != work.agent:
                continue
            del held[work.task]
            if not work.review:
                log.info("releasing %s: %s", work.task, why)
                effects.append(T.Release(work.task, work.attempt, why))
        return effects

    def my_work(self, agent: str) -> list[dict[str, Any]]:
        return [w.public() for _, w in sorted(self.work.items()) if w.agent == agent]

    def _task(self, tid: str) -> tuple[T.Task, T.Status]:
        self.refresh(now_ms())
        task, st = self.view.get(tid), self.statuses.get(tid)
        if task is None or st is None:
            raise WorkRefused("not_found", f"no task {tid!r}")
        return task, st

    async def _write(self, effect: T.Effect) -> None:
        ws = T.writes(effect, now_ms())
        try:
            await self.shared.write(lambda w: apply_writes(w, ws), paths_of(ws, self.d.peer_id))
        except WriteRefused as exc:
            raise WorkRefused("forbidden", f"the swarm refuses this node's write: {exc}") from None
        self.poke()

    async def progress(self, agent: str, tid: str, fraction: float | None, message: str) -> None:
        """Progress on work this agent holds (not on a review). The text of a confidential
        task's progress is not written: it may quote what the agent reads."""
        self._task(tid)
        work = self.work.get(tid)
        if work is None or work.agent != agent:
            raise WorkRefused("not_assignee", f"agent {agent} holds no work on task {tid}")
        text = None if self._confidential(tid) else message or None
        eff = T.Progress(tid, work.attempt, work.round, text, fraction)
        await self._write(eff)

    async def submit(self, agent: str, tid: str, output: Any, error: str | None) -> dict[str, Any]:
        """The assignee's deliverable (or its failure, with ``error``), checked by the same
        rules every replica applies: only the current assignee node and agent, only while it
        holds the work, and only an output that satisfies the contract's output schema."""
        task, st = self._task(tid)
        plan = T.plan_submit(
            task, st, node=self.d.peer_id, agent=agent, output=output, ok=error is None, error=error
        )
        if isinstance(plan, T.Refused):
            raise WorkRefused(plan.code, plan.reason)
        # Let go of the work before the write yields: a tick in between would otherwise see
        # the task move on and hand the agent a cancel for work it just finished.
        with self._letting_go(self.sched.running, tid, tid, agent):
            await self._write(self.seal_outcome(plan))
        return {"id": tid, "attempt": plan.attempt, "round": plan.round, "ok": plan.ok}

    @contextlib.contextmanager
    def _letting_go(self, held: dict[str, T.Run], tid: str, key: str, agent: str) -> Iterator[None]:
        """Drop ``agent``'s hold on ``tid`` (scheduler entry and hand-over) for a write that
        ends it; put both back if the write is refused."""
        run = held.get(tid)
        run = held.pop(tid) if run is not None and run.agent == agent else None
        work = self.work.get(key)
        work = self.work.pop(key) if work is not None and work.agent == agent else None
        try:
            yield
        except BaseException:
            if run is not None:
                held.setdefault(tid, run)
            if work is not None:
                self.work.setdefault(key, work)
            raise

    async def review(
        self, agent: str, tid: str, score: int, verdict: str, comments: str
    ) -> dict[str, Any]:
        """A review of the submission waiting in review; never by its author's node (or, if
        the swarm allows same-node reviews, never by the author agent)."""
        task, st = self._task(tid)
        plan = T.plan_review(
            task,
            st,
            node=self.d.peer_id,
            agent=agent,
            score=score,
            verdict=verdict,
            comments=comments,
            params=self.params,
        )
        if isinstance(plan, T.Refused):
            raise WorkRefused(plan.code, plan.reason)
        with self._letting_go(self.sched.reviewing, tid, tid + "#review", agent):
            await self._write(plan)
        return {"id": tid, "attempt": plan.attempt, "round": plan.round, "verdict": plan.verdict}

    async def bid(self, agent: str, tid: str) -> dict[str, Any]:
        """This node's bid on a ready task, on behalf of ``agent``. The swarm's model has no
        separate claim: the best bid wins the attempt, and the winning node then claims it for
        the agent named in its bid. A node bids once per attempt; if it already has, the
        existing bid is returned unchanged (``placed: false``)."""
        task, st = self._task(tid)
        now = now_ms()
        me = self.d.peer_id
        if st.state is not T.State.PENDING or not st.ready:
            why = "waiting for its dependencies" if st.state is T.State.PENDING else st.state
            raise WorkRefused("state", f"task {tid} takes no bids: it is {why}")
        if st.paused or self.d._swarm().paused:
            raise WorkRefused("state", f"task {tid} is paused")
        if task.contract.exclusive:
            raise WorkRefused("exclusive", "exclusive tasks are assigned by consensus, not by bids")
        if not C.readable(self.view, self.statuses, tid, me):
            raise WorkRefused(
                "not_capable", f"task {tid} is confidential and this node holds no key to it"
            )
        mine = task.bids.get(me)
        if mine is not None and mine.attempt == st.attempt:
            return {
                "id": tid,
                "attempt": st.attempt,
                "agent": mine.agent,
                "score": mine.score,
                "placed": False,
            }
        if st.eligible_at is not None and now < st.eligible_at:
            raise WorkRefused("window", f"attempt {st.attempt} takes bids from {st.eligible_at}")
        if st.window is not None and now > st.window.closes_at:
            raise WorkRefused("window", f"the bid window of attempt {st.attempt} has closed")
        local = {a.name: a for a in self._agents()}.get(agent)
        if local is None or not T.capable(local, task):
            need = [*sorted(task.capabilities), f"role {task.role or 'executor'}"]
            raise WorkRefused(
                "not_capable", f"agent {agent} lacks what task {tid} needs ({', '.join(need)})"
            )
        cap = agent_capacity(local.max_concurrency, self.limits)
        active = sum(1 for r in self.sched.running.values() if r.agent == agent)
        if active >= cap:
            raise WorkRefused("capacity", f"agent {agent} already runs {active} of {cap} tasks")
        rep = self._reputation().score(me, agent, task.capabilities)
        # scored as the scheduler scores its own agents' bids (free share of what an agent may
        # take on), so a pulling agent competes on the same scale
        score = T.bid_score(rep, active, self.sched.depth(cap), local.load)
        await self._write(T.Bid(tid, st.attempt, agent, score))
        return {"id": tid, "attempt": st.attempt, "agent": agent, "score": score, "placed": True}

    # --- views ------------------------------------------------------------------------------

    def running(self) -> list[str]:
        return sorted(self._runs)
