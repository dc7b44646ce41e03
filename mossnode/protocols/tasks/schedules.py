"""Schedules of recurring tasks as decisions of the decided log, so every node holds one list.

``schedule.add`` (permission ``task.create``: whoever may create tasks may have the swarm
create them) with payload::

    {"id": str, "interval_ms": int, "start_ms": int, "end_ms": int | None, "overlap": bool,
     "task": {"title", "spec", "input", "capabilities", "role", "priority", "contract"}}

``overlap`` (default false): may a period start while an earlier instance is still live?

``schedule.remove`` (permission ``task.cancel``) with ``{"id": str}``: the schedule creates no
more instances; it stays known, so its instances stay recognised. Ids are never reused. A
template is checked as a task creation is (:func:`.supervision.plan_create`), so an instance
cannot be refused when a node writes it. Confidential templates are refused: an instance is
written by whichever node's turn it is, and sealing needs the requester's keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..decisions import ConsensusMembership, Extension
from ..membership import Entry
from .contract import STORE_DEPTH, storable
from .model import Contract, as_float
from .recurring import Schedule, schedule_key
from .supervision import Draft, Refused, check_raw_contract, plan_create

SCHEDULE_ADD = "schedule.add"
SCHEDULE_REMOVE = "schedule.remove"
MIN_INTERVAL_MS = 1_000
MAX_INTERVAL_MS = 366 * 24 * 3600 * 1000
MAX_TIME_MS = 2**53  # times are stored as floats by the document: keep them exact
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PAYLOAD_FIELDS = frozenset({"id", "interval_ms", "start_ms", "end_ms", "task", "overlap"})
TEMPLATE_FIELDS = frozenset(
    {"title", "spec", "input", "capabilities", "role", "priority", "contract"}
)


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def parse(payload: Mapping[str, Any]) -> Schedule | str:
    """The schedule a ``schedule.add`` payload asks for, or what is wrong with it."""
    if not set(payload) <= PAYLOAD_FIELDS:
        return f"payload fields are {sorted(PAYLOAD_FIELDS)}"
    # what the instances will hold must go into the shared document as it is (a number Yrs
    # cannot store made every maker's write fail, period after period)
    bad_value = storable(payload, "payload", max_depth=STORE_DEPTH + 2)
    if bad_value is not None:
        return f"{bad_value.path}: {bad_value.message}"
    sid = payload.get("id")
    if not isinstance(sid, str) or not ID_RE.match(sid):
        return "payload.id must be 1-64 of [A-Za-z0-9._-], starting alphanumeric"
    interval, start, end = (_int(payload.get(k)) for k in ("interval_ms", "start_ms", "end_ms"))
    if interval is None or not MIN_INTERVAL_MS <= interval <= MAX_INTERVAL_MS:
        return f"payload.interval_ms must be an integer {MIN_INTERVAL_MS}-{MAX_INTERVAL_MS}"
    if start is None or not 0 <= start < MAX_TIME_MS:
        return "payload.start_ms must be a time in ms since the epoch"
    if payload.get("end_ms") is not None and (end is None or not start < end < MAX_TIME_MS):
        return "payload.end_ms must be null or a time after start_ms"
    overlap = payload.get("overlap", False)
    if not isinstance(overlap, bool):
        return "payload.overlap must be true or false"
    t = payload.get("task")
    if not isinstance(t, dict) or not set(t) <= TEMPLATE_FIELDS:
        return f"payload.task must be an object with fields among {sorted(TEMPLATE_FIELDS)}"
    title, role, caps = t.get("title"), t.get("role"), t.get("capabilities", [])
    if not isinstance(title, str) or not 0 < len(title) <= 500:
        return "payload.task.title must be 1-500 characters"
    if role is not None and not isinstance(role, str):
        return "payload.task.role must be a role name or null"
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        return "payload.task.capabilities must be a list of strings"
    priority = as_float(t.get("priority", 0.0))
    if priority is None or not math.isfinite(priority):
        return "payload.task.priority must be a number"
    raw_contract = t.get("contract") or {}
    if not isinstance(raw_contract, dict):
        return "payload.task.contract must be an object"
    if raw_contract.get("confidential"):
        return "a schedule's tasks cannot be confidential"
    bad = check_raw_contract(raw_contract)
    if bad is not None:
        return f"payload.task.contract: {bad.reason}"
    contract = Contract.from_raw(raw_contract)
    draft = Draft(
        suffix="template",
        title=title,
        spec=t.get("spec"),
        input=t.get("input"),
        capabilities=tuple(caps),
        role=role,
        priority=priority,
        contract=contract,
    )
    refused = plan_create({}, draft, creator="schedule", now_ms=start)
    if isinstance(refused, Refused):
        return f"payload.task: {refused.reason}"
    got = Schedule(
        id=sid,
        interval_ms=interval,
        title=title,
        start_ms=start,
        end_ms=end,
        spec=draft.spec,
        input=draft.input,
        capabilities=tuple(sorted(set(caps))),
        role=role,
        priority=priority,
        contract=contract,
        overlap=overlap,
    )
    # and as the contract reads it back (a float deadline of 1e308 reads as a huge integer)
    bad_value = storable(got.fields(), "payload.task", max_depth=STORE_DEPTH + 1)
    if bad_value is not None:
        return f"{bad_value.path}: {bad_value.message}"
    return got


def payload(schedule: Schedule) -> dict[str, Any]:
    """The ``schedule.add`` payload of ``schedule`` (what :func:`parse` reads back)."""
    fields = schedule.fields()
    return {
        "id": schedule.id,
        "interval_ms": schedule.interval_ms,
        "start_ms": schedule.start_ms,
        "end_ms": schedule.end_ms,
        "task": {k: fields[k] for k in sorted(TEMPLATE_FIELDS)},
        "overlap": schedule.overlap,
    }


def extensions(schedules: dict[str, Schedule]) -> dict[str, Extension]:
    """The two decision kinds; decided schedules are kept in ``schedules`` (id -> schedule)."""

    def check_add(state: ConsensusMembership, p: dict[str, Any]) -> str | None:
        got = parse(p)
        if isinstance(got, str):
            return got
        if got.id in schedules:
            return f"schedule {got.id} exists (ids are never reused)"
        if any(s.key == schedule_key(got.id) for s in schedules.values()):
            return f"schedule id {got.id} collides with another schedule's; pick another"
        return None

    def apply_add(state: ConsensusMembership, entry: Entry) -> None:
        got = parse(entry.payload)
        if isinstance(got, Schedule):  # check() passed when it was decided
            schedules[got.id] = got

    def check_remove(state: ConsensusMembership, p: dict[str, Any]) -> str | None:
        sid = p.get("id")
        s = schedules.get(sid) if isinstance(sid, str) else None
        if s is None:
            return "payload.id must name a schedule"
        if s.removed or set(p) != {"id"}:
            return f"schedule {sid} is already removed" if s.removed else "payload is {id}"
        return None

    def apply_remove(state: ConsensusMembership, entry: Entry) -> None:
        sid = entry.payload["id"]
        schedules[sid] = replace(schedules[sid], removed=True)

    return {
        SCHEDULE_ADD: Extension(permission="task.create", check=check_add, apply=apply_add),
        SCHEDULE_REMOVE: Extension(
            permission="task.cancel", check=check_remove, apply=apply_remove
        ),
    }
