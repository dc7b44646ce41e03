"""The node's scheduler loop: derive task states, bid, claim, dispatch to local agents.

Everything decided here is decided by ``protocols/tasks`` (pure); this loop only feeds it the
replicated view, the local agents and the clock, writes the facts it asks for (durably, before
acting on the next effect), and runs or cancels agent work. No polling by agents: the loop wakes
when the shared state changes or at the next time the scheduler said something may change.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..agents.base import Backend, Outcome
from ..agents.exec import ExecBackend
from ..crypto.sealed import Randomness, SealedError
from ..protocols import tasks as T
from ..protocols.crdt import Writer, WriteRefused
from ..protocols.tasks import confidential as C
from ..protocols.tasks.effects import Write

if TYPE_CHECKING:
    from .agents import Agent
    from .daemon import Daemon
    from .state import StateService

log = logging.getLogger("mossnode.tasks")

MIN_TICK_S = 0.02  # coalesce bursts of changes into one derivation


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


class TaskService:
    def __init__(self, daemon: Daemon, shared: StateService) -> None:
        self.d = daemon
        self.shared = shared
        self.params = T.Params()
        self.limits = T.Limits()
        self.sched = T.Scheduler(daemon.peer_id, params=self.params, limits=self.limits)
        self.horizons = T.Horizons()
        self._bidders: dict[tuple[Any, ...], list[str]] = {}
        self.sched.stable = T.stable_rule(daemon.peer_id, self._expected_bidders, self._horizon)
        self.view: T.TaskView = {}
        self.statuses: dict[str, T.Status] = {}
        self._wake = trio.Event()
        self._runs: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.workdir = daemon.state_dir / "work"
        self.events: list[dict[str, Any]] = []  # activity feed (bounded)
        self._last_states: dict[str, str] = {}
        # Plain copies of the tasks, refreshed only where the document changed.
        self._raw: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._rescan = True

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._loop)

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

    def changed(self, paths: list[tuple[Any, ...]] | None) -> None:
        """The shared state changed at ``paths`` (None: anywhere): refresh and wake up."""
        if self.horizons.pending:
            self.horizons.applied(self.shared.replica.vector())
        if paths is None:
            self._rescan = True
        else:
            for p in paths:
                if p and p[0] == "tasks":
                    if len(p) >= 2 and isinstance(p[1], str):
                        self._dirty.add(p[1])
                    else:
                        self._rescan = True
        self._wake.set()

    def _update_view(self) -> None:
        doc_tasks = self.shared.replica.doc["tasks"]
        changed = set(self._dirty)
        self._dirty.clear()
        if self._rescan:
            self._rescan = False
            keys = set(doc_tasks.keys())
            changed |= keys - self._raw.keys()
            for gone in self._raw.keys() - keys:
                del self._raw[gone]
                changed.add(gone)
        for tid in changed:
            t = self.shared.replica.task(tid)
            if t is None:
                self._raw.pop(tid, None)
            else:
                self._raw[tid] = t
        if changed or not self.view:
            self.view = T.build_view(self._raw, self.view or None, changed)

    # --- inputs to the pure scheduler -----------------------------------------------------

    def _agents(self) -> list[T.LocalAgent]:
        """Local agents with the roles the node itself holds: peers judge the node's writes
        by the node's roles, so an agent can only act within them."""
        load = min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        held = frozenset(self.d.node_roles())
        return [
            T.LocalAgent(
                a.name,
                frozenset(a.roles) & held,
                frozenset(a.capabilities),
                load,
                a.max_concurrency,
            )
            for a in self.d.agents.agents.values()
            if a.backend.startswith("exec:")  # the OpenClaw backend is not wired yet
            and frozenset(a.roles) & held
        ]

    def _authority(self, node: str, permission: str) -> bool:
        state = self.d._swarm()
        return self.shared.policy.may(node, permission, state.height)

    def refresh(self, now: int) -> None:
        self._update_view()
        self.statuses = self.sched.derive(
            self.view, now, exclusive=self.d.exclusive, authority=self._authority
        )
        self._feed(now)

    def _feed(self, now: int) -> None:
        for tid, st in self.statuses.items():
            s = str(st.state)
            if self._last_states.get(tid) != s:
                self._last_states[tid] = s
                self.events.append(
                    {"at": now, "task": tid, "state": s, "assignee": st.assignee, "agent": st.agent}
                )
        del self.events[:-1000]

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        wake_at: int | None = None
        while True:
            timeout = 5.0 if wake_at is None else max(0.0, (wake_at - now_ms()) / 1000)
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(MIN_TICK_S)
            try:
                wake_at = await self._tick()
            except Exception:
                log.exception("scheduler tick failed")
                wake_at = now_ms() + 1000

    async def _tick(self) -> int | None:
        now = now_ms()
        state = self.d._swarm()
        self._update_view()
        rep = T.reputation(self.view, self.statuses) if self.statuses else None
        plan = self.sched.tick(
            self.view,
            agents=self._agents(),
            now_ms=now,
            reputation=rep,
            paused=state.paused,
            exclusive=self.d.exclusive,
            authority=self._authority,
        )
        self.statuses = dict(self.sched.statuses)
        self._feed(now)
        await self._do_all(plan.effects)
        return plan.wake_at

    async def _do_all(self, effects: Sequence[T.Effect]) -> None:
        """Write the facts of all effects as one entry (one fsync, one gossip message), then
        act: every fact is durable before any agent starts or stops."""
        now = now_ms()
        ws = tuple(w for e in effects for w in T.writes(e, now))
        if ws:
            try:
                await self.shared.write(
                    lambda w: apply_writes(w, ws), touched=sorted({x.task_id for x in ws})
                )
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
                await self.shared.write(lambda w: apply_writes(w, ws), touched=[effect.task_id])
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
            scope = self._runs.pop(effect.task_id + ("#review" if effect.review else ""), None)
            if scope is not None:
                log.info("cancelling %s: %s", effect.task_id, effect.reason)
                scope.cancel()
        elif isinstance(effect, T.ProposeExclusive):
            await self.d.propose_exclusive(effect.task_id, effect.node)

    # --- running agent work -----------------------------------------------------------------

    def _backend(self, agent: Agent) -> Backend:
        kind, _, arg = agent.backend.partition(":")
        if kind == "exec":
            return ExecBackend(arg, Path(self.workdir) / agent.name)
        raise ValueError(f"backend {kind} is not available")

    def _start(self, tid: str, agent_name: str, payload: dict[str, Any], review: bool) -> None:
        key = tid + ("#review" if review else "")
        if key in self._runs or self._nursery is None:
            return
        agent = self.d.agents.agents.get(agent_name)
        if agent is None:
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
            await self.shared.write(lambda w: apply_writes(w, T.writes(eff, now_ms())), [tid])

        outcome: Outcome | None = None
        try:
            with scope:
                log.info("%s %s on agent %s", "reviewing" if review else "running", tid, agent.name)
                payload = self.open_payload(tid, payload, review)
                outcome = await self._backend(agent).run(payload, progress)
        except Exception as exc:
            outcome = Outcome(False, error=f"backend failed: {exc}")
        finally:
            self._runs.pop(key, None)
        if outcome is None:  # cancelled: the scheduler already knows why
            return
        await self._finish(tid, outcome, review)

    async def _finish(self, tid: str, outcome: Outcome, review: bool) -> None:
        now = now_ms()
        self._update_view()
        if review:
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
        else:
            unfit = T.storable(outcome.output) if outcome.ok else None
            if unfit is not None:  # Yrs would refuse it (or fail hard): a failed attempt
                outcome = Outcome(False, error=f"output cannot be stored: {unfit}")
            plan = self.sched.finished(
                self.view,
                tid,
                now_ms=now,
                output=outcome.output,
                ok=outcome.ok,
                error=outcome.error or None,
                exclusive=self.d.exclusive,
                authority=self._authority,
            )
            if self._confidential(tid):
                plan = replace(plan, effects=tuple(self.seal_outcome(e) for e in plan.effects))
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

    # --- views ------------------------------------------------------------------------------

    def running(self) -> list[str]:
        return sorted(self._runs)
