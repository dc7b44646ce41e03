"""Layout of the shared task document: root names, task fields, and how paths are spelled.

Every place in the document has a path: the map keys from a root down to it, with ``None`` for
"an element of this array". Ownership is read off the path alone (see :mod:`.rules`), so the
layout puts the owner's peer id into the path wherever a node writes, and the creator's peer id
into every task id.

A task is one map holding few items, because every item costs each replica a decode, an owner
check and an apply: the creator's fields are one value (``core``), and each node's entries are
keys of the task map itself, ``<kind>/<node>`` (``claims/<node>``, ``log/<node>``, ...). Keys
name their owner, so no shared sub-map has to exist before a node can write, and creating a
task writes two items.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

TASKS = "tasks"
AGENTS = "agents"
HISTORY = "history"
ROOTS = (TASKS, AGENTS, HISTORY)

CORE_FIELDS = (
    "title",
    "spec",
    "input",
    "parent",
    "deps",
    "capabilities",
    "role",
    "priority",
    "creator",
    "created_at",
    "contract",
)
CORE = "core"  # the task map's key holding CORE_FIELDS as one value
NODE_ENTRIES = ("claims", "bids", "leases", "progress", "results", "reviews")
LOG = "log"
SUB_MAPS = (*NODE_ENTRIES, LOG)  # what a task reads as, nested: kind -> node -> entry
KEY_SEP = "/"  # a node's key in a task map: <kind>/<node>

TASK_ID_SEP = ":"
MAX_SUFFIX = 64
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

Path = tuple[str | None, ...]
ELEMENT = None  # path segment of an array element


def task_id(creator: str, suffix: str) -> str:
    """``<creator peer id>:<suffix>``: the creator is readable from the id, so from every path."""
    if not suffix or len(suffix) > MAX_SUFFIX or not set(suffix) <= _SUFFIX_CHARS:
        raise ValueError(f"task id suffix must be 1-{MAX_SUFFIX} of [A-Za-z0-9._-]")
    return f"{creator}{TASK_ID_SEP}{suffix}"


@lru_cache(maxsize=1 << 16)  # owner rules ask for every item a task's update writes
def task_creator(tid: str) -> str | None:
    """The creator peer id embedded in a task id, or None if the id is not well formed."""
    creator, sep, suffix = tid.partition(TASK_ID_SEP)
    if not sep or not creator or not suffix or len(suffix) > MAX_SUFFIX:
        return None
    if not set(suffix) <= _SUFFIX_CHARS:
        return None
    return creator


def node_key(kind: str, node: str) -> str:
    """The task-map key of ``node``'s entry of ``kind`` (one of SUB_MAPS)."""
    return f"{kind}{KEY_SEP}{node}"


_SUBS = frozenset(SUB_MAPS)


def nest_task(raw: dict[str, Any]) -> dict[str, Any]:
    """A task map as readers see it: the core fields at the top and each node's entries under
    their kind (``{"title": ..., "claims": {node: value}, "log": {node: [...]}, ...}``).
    Keys outside the schema are left out (the owner rules never admit them)."""
    core = raw.get(CORE)
    out: dict[str, Any] = dict(core) if isinstance(core, dict) else {}
    for sub in SUB_MAPS:
        out[sub] = {}
    for key, value in raw.items():
        kind, sep, node = key.partition(KEY_SEP)
        if sep and kind in _SUBS:
            out[kind][node] = value
    return out


def render(path: Path) -> str:
    return "/".join("[]" if seg is None else seg for seg in path)
