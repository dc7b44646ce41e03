"""Behaviour boundaries and the checks that enforce them before anything is written.

Each ``plan_*`` function takes the current view and a request and returns either the effect to
apply (what to write) or a :class:`Refused` with a stable ``code`` and a clear ``reason``. They
are pure, so a refusal changes nothing; the daemon answers it as ``{error: {code, message}}``.

Boundaries (:class:`Limits`, swarm-wide): children per parent (fan-out), depth of a task tree,
tasks an agent runs at once, and the budget of a task tree (the sum of its tasks' contract
``cost``; the root's contract ``budget``, else ``Limits.tree_budget``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import field
from typing import Any

from mossnode.record import value

from . import control, dag
from .confidential import check_roles
from .contract import check_schema, validate
from .effects import Control, Create
from .lifecycle import Status
from .model import HELD, MAX_ATTEMPTS, MAX_ROUNDS, TERMINAL, Contract, State, TaskView

SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_SUFFIX = 64  # mirrors protocols/crdt/schema.py task_id()


@value
class Refused:
    code: str
    reason: str

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@value
class Limits:
    max_fanout: int = 64
    max_depth: int = 8
    max_concurrent_per_agent: int = 8
    tree_budget: float = 1_000.0
    max_deps: int = 64


@value
class Draft:
    """A task to create, as a user, planner agent or template asks for it."""

    suffix: str
    title: str
    spec: Any = None
    input: Any = None
    parent: str | None = None
    deps: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    role: str | None = None
    priority: float = 0.0
    contract: Contract = field(default_factory=Contract)


def task_id(creator: str, suffix: str) -> str:
    return f"{creator}:{suffix}"


def _check_contract(c: Contract) -> Refused | None:
    if not 1 <= c.max_attempts <= MAX_ATTEMPTS:
        return Refused(
            "max_attempts", f"max_attempts must be 1-{MAX_ATTEMPTS} (got {c.max_attempts})"
        )
    if not 1 <= c.max_rounds <= MAX_ROUNDS:
        return Refused("max_rounds", f"max_rounds must be 1-{MAX_ROUNDS} (got {c.max_rounds})")
    if c.confidential:
        bad_roles = check_roles(c.confidential)
        if bad_roles is not None:
            return Refused("bad_roles", bad_roles)
    for name, schema in (("input_schema", c.input_schema), ("output_schema", c.output_schema)):
        if schema is not None:
            bad = check_schema(schema)
            if bad is not None:
                return Refused("schema", f"{name} {bad}")
    return None


def check_raw_contract(raw: Mapping[str, Any]) -> Refused | None:
    """A requested contract before :meth:`Contract.from_raw`, which reads what it cannot use
    as a safe value (a bad schema as ``false``, max_attempts capped): the fields it would
    change, as requested, go through the same check, so a creator is told."""
    asked = Contract(input_schema=raw.get("input_schema"), output_schema=raw.get("output_schema"))
    for name in ("max_attempts", "max_rounds"):
        if type(raw.get(name)) is int:
            asked = dataclasses.replace(asked, **{name: raw[name]})
    return _check_contract(asked)


# What an agent may advertise and a task may ask for: one rule for both, so a task can only
# ask for what some agent could hold (a capability with a NUL or a newline matched nobody).
CAPABILITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}\Z")


def plan_create(
    view: TaskView,
    draft: Draft,
    *,
    creator: str,
    now_ms: int,
    statuses: Mapping[str, Status] | None = None,
    limits: Limits | None = None,
) -> Create | Refused:
    """Validate a new task; return the :class:`~.effects.Create` to write, or why not."""
    lim = limits or Limits()
    s = draft.suffix
    if not s or len(s) > MAX_SUFFIX or not set(s) <= SUFFIX_CHARS:
        return Refused("bad_id", f"task id suffix must be 1-{MAX_SUFFIX} of [A-Za-z0-9._-]")
    tid = task_id(creator, s)
    if tid in view:
        return Refused("exists", f"task {tid} exists; task ids are written once")
    if not draft.title.strip():
        return Refused("bad_title", "a task needs a title")
    bad_caps = [c for c in draft.capabilities if not CAPABILITY_RE.match(c)]
    if bad_caps:
        return Refused(
            "bad_capability",
            f"capabilities are 1-63 of [A-Za-z0-9_.:/-], starting alphanumeric: {bad_caps[:3]!r}",
        )
    bad = _check_contract(draft.contract)
    if bad is not None:
        return bad
    v = validate(draft.input, draft.contract.input_schema)
    if v is not None and draft.contract.input_schema is not None:
        return Refused("input_schema", f"input violates input_schema {v}")
    deps = tuple(dict.fromkeys(draft.deps))
    if len(deps) > lim.max_deps:
        return Refused(
            "too_many_deps", f"{len(deps)} dependencies exceed the limit of {lim.max_deps}"
        )
    for d in deps:
        if d not in view and d != tid:
            return Refused("unknown_dependency", f"dependency {d} does not exist")
    cycle = dag.find_cycle(view, tid, deps)
    if cycle is not None:
        return Refused("cycle", "dependencies would form a cycle: " + " -> ".join(cycle))
    budget_root = tid
    if draft.parent is not None:
        parent = view.get(draft.parent)
        if parent is None:
            return Refused("unknown_parent", f"parent {draft.parent} does not exist")
        pst = statuses.get(draft.parent) if statuses is not None else None
        if pst is not None and pst.state is State.CANCELLED:
            return Refused("parent_cancelled", f"parent {draft.parent} is cancelled")
        kids = dag.children(view)
        fan = len(kids.get(draft.parent, ())) + 1
        if fan > lim.max_fanout:
            return Refused(
                "fanout",
                f"parent {draft.parent} would have {fan} children (max_fanout {lim.max_fanout})",
            )
        depth = dag.depth(view, draft.parent) + 1
        if depth > lim.max_depth:
            return Refused("depth", f"task would be at depth {depth} (max_depth {lim.max_depth})")
        budget_root = dag.root_of(view, draft.parent)
        root = view.get(budget_root)
        if root is None:  # the parent is here but not yet its whole chain: budget unknown
            return Refused(
                "unknown_parent", f"ancestor {budget_root} of parent {draft.parent} is not known"
            )
        budget = root.contract.budget if root.contract.budget is not None else lim.tree_budget
        spent = sum(
            view[t].contract.cost for t in dag.subtree(view, budget_root, kids) if t in view
        )
        if spent + draft.contract.cost > budget:
            return Refused(
                "budget",
                f"tree {budget_root} would cost {spent + draft.contract.cost:g} (budget {budget:g})",
            )
    else:
        budget = draft.contract.budget if draft.contract.budget is not None else lim.tree_budget
        if draft.contract.cost > budget:
            return Refused("budget", f"task costs {draft.contract.cost:g} (budget {budget:g})")
    fields = {
        "title": draft.title,
        "spec": draft.spec,
        "input": draft.input,
        "parent": draft.parent,
        "deps": list(deps),
        "capabilities": sorted(set(draft.capabilities)),
        "role": draft.role,
        "priority": draft.priority,
        "contract": draft.contract.to_raw(),
    }
    return Create(tid, s, fields)


def check_deps_update(view: TaskView, tid: str, deps: Iterable[str]) -> Refused | None:
    """For a creator editing ``deps`` later: the same cycle and existence checks."""
    deps = tuple(deps)
    for d in deps:
        if d not in view:
            return Refused("unknown_dependency", f"dependency {d} does not exist")
    others = {k: v for k, v in view.items() if k != tid}
    cycle = dag.find_cycle(others, tid, deps)
    if cycle is not None:
        return Refused("cycle", "dependencies would form a cycle: " + " -> ".join(cycle))
    return None


def plan_control(
    view: TaskView,
    statuses: Mapping[str, Status],
    tid: str,
    verb: str,
    *,
    node: str,
    now_ms: int,
    reason: str = "",
    authority: control.Authority | None = None,
) -> Control | Refused:
    """Cancel, pause, resume or reassign ``tid`` (and, for cancel/pause/resume, its subtree)."""
    task = view.get(tid)
    st = statuses.get(tid)
    if task is None or st is None:
        return Refused("unknown_task", f"no task {tid}")
    if verb not in control.VERBS:
        return Refused("bad_verb", f"{verb!r} is not one of {list(control.VERBS)}")
    if not control.may_control(view, task, node, verb, authority):
        return Refused(
            "forbidden",
            f"{node} may not {verb} {tid}: only its creator, an ancestor's creator, or a holder of task.{verb}",
        )
    if st.state in TERMINAL:
        return Refused("terminal", f"task {tid} is already {st.state.value}")
    attempt = None
    if verb == control.REASSIGN:
        if st.state not in HELD:
            return Refused("not_held", f"task {tid} is {st.state.value}: nothing to reassign")
        attempt = st.attempt
    if verb == control.PAUSE and st.paused:
        return Refused("paused", f"task {tid} is already paused")
    if verb == control.RESUME and not st.paused:
        return Refused("not_paused", f"task {tid} is not paused")
    return Control(tid, control.record(verb, now_ms, reason, attempt))


def agent_capacity(max_concurrency: int, limits: Limits | None = None) -> int:
    """Tasks an agent may run at once: its own setting, capped by the swarm's boundary."""
    lim = limits or Limits()
    return max(0, min(max_concurrency, lim.max_concurrent_per_agent))


def check_capacity(
    agent: str, active: int, max_concurrency: int, limits: Limits | None = None
) -> Refused | None:
    cap = agent_capacity(max_concurrency, limits)
    if active >= cap:
        return Refused("concurrency", f"agent {agent} already runs {active} tasks (limit {cap})")
    return None
