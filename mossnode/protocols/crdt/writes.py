"""Local write helpers: the only ways a node changes the document, each inside the schema.

A :class:`Writer` is handed to the callback of :meth:`Replica.write`; everything it does happens
in one Yrs transaction on the replica's document, becomes one signed entry, and passes the
same authorization as a remote update (or the document is put back). Values are JSON-like
(None, bool, int, float, str, bytes, lists and string-keyed dicts of those); Yrs returns numbers
as floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pycrdt import Array, Doc, Map
from pycrdt._base import BaseDoc, BaseType

from .document import RAW_MAP
from .schema import AGENTS, CORE, CORE_FIELDS, HISTORY, LOG, NODE_ENTRIES, TASKS, node_key, task_id


class Writer:
    """Write access for one local transaction by node ``me`` at time ``now_ms``."""

    def __init__(
        self, doc: Doc[Map[Any]], me: str, now_ms: int, *, roots: dict[str, Map[Any]] | None = None
    ) -> None:
        """``roots``: root maps of ``doc`` the caller already holds (kept and added to)."""
        self._doc = doc
        self.me = me
        self.now_ms = now_ms
        self._roots = {} if roots is None else roots

    def _root(self, name: str) -> Map[Any]:
        # pycrdt builds every root anew at each doc[name]: a root is looked up once
        root = self._roots.get(name)
        if root is None:
            root = self._roots[name] = self._doc[name]
        return root

    def _task(self, tid: str) -> Map[Any]:
        task = self._root(TASKS).get(tid)
        if not isinstance(task, Map):
            raise KeyError(f"no task {tid!r}")
        return task

    # -- tasks (creator) -------------------------------------------------------------------

    def create_task(
        self,
        suffix: str,
        *,
        title: str,
        spec: Any = None,
        input: Any = None,
        parent: str | None = None,
        deps: Iterable[str] = (),
        capabilities: Iterable[str] = (),
        role: str | None = None,
        priority: float = 0,
        contract: Mapping[str, Any] | None = None,
    ) -> str:
        """Create ``tasks/<me>:<suffix>``: a map holding the core fields as one value."""
        tid = task_id(self.me, suffix)
        tasks = self._root(TASKS)
        if tid in tasks:
            raise ValueError(f"task {tid} exists; task ids are written once")
        core: dict[str, Any] = {
            "title": title,
            "spec": spec,
            "input": input,
            "parent": parent,
            "deps": list(deps),
            "capabilities": list(capabilities),
            "role": role,
            "priority": priority,
            "creator": self.me,
            "created_at": self.now_ms,
            "contract": dict(contract) if contract is not None else None,
        }
        tasks[tid] = Map({CORE: core})
        return tid

    def update_task(self, tid: str, **fields: Any) -> None:
        """Change core fields of a task this node created (the core value is rewritten)."""
        unknown = set(fields) - set(CORE_FIELDS) - {"creator", "created_at"}
        if unknown or "creator" in fields or "created_at" in fields:
            raise ValueError(f"not updatable core fields: {sorted(set(fields) - set(CORE_FIELDS))}")
        task = self._task(tid)
        current = task.get(CORE)
        core = dict(current) if isinstance(current, dict) else {}
        core.update(fields)
        task[CORE] = core

    def delete_task(self, tid: str) -> None:
        self._task(tid)
        del self._root(TASKS)[tid]

    # -- tasks (per-node entries) ----------------------------------------------------------

    def put(self, tid: str, kind: str, value: Any) -> None:
        """Set this node's entry ``tasks/<tid>/<kind>/<me>`` (kind: claims, bids, ...): one key."""
        if kind not in NODE_ENTRIES:
            raise ValueError(f"{kind!r} is not one of {NODE_ENTRIES}")
        key = node_key(kind, self.me)
        raw = None if isinstance(value, (BaseType, BaseDoc)) else self._raw_task(tid)
        if raw is None:  # a shared type to integrate, or the public way (and its errors)
            self._task(tid)[key] = value
        else:  # what Map.__setitem__ does for a plain value, without its wrappers
            raw[0].insert(raw[1], key, value)

    def _raw_task(self, tid: str) -> tuple[Any, Any] | None:
        """pycrdt's Rust map of task ``tid`` and the open Rust transaction (as
        :mod:`.document` reads them), or None if either is not there as expected."""
        txn = self._doc._txn
        t = txn._txn if txn is not None else None
        if t is None:
            return None
        try:
            tasks = self._root(TASKS).integrated
            raw = tasks.get(t, tid) if tasks.has(t, tid) else None
        except Exception:  # pycrdt internals moved
            return None
        return (raw, t) if type(raw) is RAW_MAP else None

    def remove(self, tid: str, kind: str) -> None:
        """Delete this node's own entry under ``kind`` (no-op if absent)."""
        if kind not in NODE_ENTRIES:
            raise ValueError(f"{kind!r} is not one of {NODE_ENTRIES}")
        task, key = self._task(tid), node_key(kind, self.me)
        if key in task:
            del task[key]

    def claim(self, tid: str, value: Any) -> None:
        self.put(tid, "claims", value)

    def bid(self, tid: str, value: Any) -> None:
        self.put(tid, "bids", value)

    def lease(self, tid: str, value: Any) -> None:
        self.put(tid, "leases", value)

    def progress(self, tid: str, value: Any) -> None:
        self.put(tid, "progress", value)

    def result(self, tid: str, value: Any) -> None:
        self.put(tid, "results", value)

    def review(self, tid: str, value: Any) -> None:
        self.put(tid, "reviews", value)

    def append_log(self, tid: str, record: Any) -> None:
        """Append to this node's append-only log of the task, ``tasks/<tid>/log/<me>``."""
        task, key = self._task(tid), node_key(LOG, self.me)
        mine = task.get(key)
        if not isinstance(mine, Array):
            task[key] = Array([record])
        else:
            mine.append(record)

    # -- agents and history ----------------------------------------------------------------

    def _my_agents(self) -> Map[Any]:
        agents = self._root(AGENTS)
        mine = agents.get(self.me)
        if not isinstance(mine, Map):
            mine = Map()
            agents[self.me] = mine
        return mine

    def put_agent(self, agent_id: str, record: Any) -> None:
        """Publish one local agent: ``agents/<me>/<agent_id>`` (capabilities, role, load...)."""
        self._my_agents()[agent_id] = record

    def remove_agent(self, agent_id: str) -> None:
        mine = self._root(AGENTS).get(self.me)
        if isinstance(mine, Map) and agent_id in mine:
            del mine[agent_id]

    def append_history(self, record: Any) -> None:
        """Append to this node's append-only history, ``history/<me>``."""
        history = self._root(HISTORY)
        mine = history.get(self.me)
        if not isinstance(mine, Array):
            history[self.me] = Array([record])
        else:
            mine.append(record)
