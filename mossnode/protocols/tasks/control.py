"""Control records: cancel, pause, resume, reassign, and the assignee's own release.

There is no writable "state" field, so a control action is a record a node appends to its own
append-only log of the task, ``tasks/<id>/log/<node>``: ``{kind, at, reason, attempt?}``. The log
path proves the author; whether the record counts is decided here from the author alone, the
same way on every replica:

- ``cancel``, ``pause``, ``resume``, ``reassign`` count when the author created the task or one
  of its ancestors (a planner controls the tree it planned), or holds the permission
  ``task.<verb>`` (the supervisor role; see ``protocols/roles.py``) per the decided log.
- ``release`` counts only from the node that holds the attempt it names.

Cancel and pause act on the whole subtree (children by ``parent``); reassign names one attempt
of one task (reassigning a tree is one record per task: :func:`tree_records`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mossnode.record import value

from . import dag
from .model import Task, TaskView, as_int

CANCEL = "cancel"
PAUSE = "pause"
RESUME = "resume"
REASSIGN = "reassign"
RELEASE = "release"
VERBS = (CANCEL, PAUSE, RESUME, REASSIGN)

# may(node, permission) per the decided log's current policy
Authority = Callable[[str, str], bool]


@value
class Control:
    verb: str
    node: str
    at: int
    reason: str = ""
    attempt: int | None = None


def may_control(
    view: TaskView, task: Task, node: str, verb: str, authority: Authority | None
) -> bool:
    if node == task.creator:
        return True
    for anc in dag.ancestors(view, task.id):
        up = view.get(anc)
        if up is not None and up.creator == node:
            return True
    return authority is not None and authority(node, f"task.{verb}")


def controls(view: TaskView, task: Task, authority: Authority | None) -> list[Control]:
    """The task's valid control records, earliest first (ties by node)."""
    recs = task.records(VERBS)
    if not recs:
        return []  # most tasks: nobody controlled them
    out: list[Control] = []
    allowed: dict[tuple[str, str], bool] = {}
    for node, rec in recs:
        verb = str(rec.get("kind"))
        at = as_int(rec.get("at"))
        if at is None:
            continue
        key = (node, verb)
        if key not in allowed:
            allowed[key] = may_control(view, task, node, verb, authority)
        if not allowed[key]:
            continue
        attempt = as_int(rec.get("attempt"))
        reason = rec.get("reason")
        out.append(Control(verb, node, at, reason if isinstance(reason, str) else "", attempt))
    out.sort(key=lambda c: (c.at, c.node, c.verb))
    return out


def releases(task: Task) -> dict[tuple[str, int], int]:
    """``{(node, attempt): at}`` of release records (validated against the holder later)."""
    out: dict[tuple[str, int], int] = {}
    recs = task.records((RELEASE,))
    if not recs:
        return out
    for node, rec in recs:
        at, attempt = as_int(rec.get("at")), as_int(rec.get("attempt"))
        if at is not None and attempt is not None:
            key = (node, attempt)
            out[key] = min(at, out.get(key, at))
    return out


def record(verb: str, now_ms: int, reason: str = "", attempt: int | None = None) -> dict[str, Any]:
    """The log record a node appends for a control action."""
    rec: dict[str, Any] = {"kind": verb, "at": now_ms, "reason": reason}
    if attempt is not None:
        rec["attempt"] = attempt
    return rec


def tree_records(
    view: TaskView,
    root: str,
    verb: str,
    now_ms: int,
    reason: str = "",
    attempts: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """One record per task of ``root``'s subtree, e.g. to reassign a whole tree.

    ``attempts`` gives each task's current attempt (from the derived statuses) for reassign.
    """
    out: dict[str, dict[str, Any]] = {}
    for tid in dag.subtree(view, root):
        attempt = attempts.get(tid) if attempts is not None else None
        out[tid] = record(verb, now_ms, reason, attempt)
    return out
