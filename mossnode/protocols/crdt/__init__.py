"""The swarm's shared task state: a pycrdt (Yrs) document, written only through signed,
per-author, authorized updates, and replicated by anti-entropy over version vectors.

Sans-IO: nothing here opens a socket or a file or reads a clock. See docs/state-schema.md.
"""

from .clients import client_id_for
from .entry import MAX_ENTRY_BYTES, STATE_UPDATE, StateEntry, open_entry
from .outcome import (
    Blocked,
    Entry,
    Equivocation,
    Limits,
    Outcome,
    Refusal,
    StateError,
    WriteRefused,
    verify_equivocation,
)
from .replica import Replica
from .rules import (
    MEMBER,
    RULES,
    TASK_CLAIM,
    TASK_CREATE,
    TASK_DELETE,
    TASK_PROGRESS,
    TASK_REVIEW,
    TASK_SUBMIT,
    Policy,
)
from .schema import CORE_FIELDS, NODE_ENTRIES, ROOTS, nest_task, node_key, task_creator, task_id
from .writes import Writer

__all__ = [
    "CORE_FIELDS",
    "MAX_ENTRY_BYTES",
    "MEMBER",
    "NODE_ENTRIES",
    "ROOTS",
    "RULES",
    "STATE_UPDATE",
    "TASK_CLAIM",
    "TASK_CREATE",
    "TASK_DELETE",
    "TASK_PROGRESS",
    "TASK_REVIEW",
    "TASK_SUBMIT",
    "Blocked",
    "Entry",
    "Equivocation",
    "Limits",
    "Outcome",
    "Policy",
    "Refusal",
    "Replica",
    "StateEntry",
    "StateError",
    "WriteRefused",
    "Writer",
    "client_id_for",
    "nest_task",
    "node_key",
    "open_entry",
    "task_creator",
    "task_id",
    "verify_equivocation",
]
