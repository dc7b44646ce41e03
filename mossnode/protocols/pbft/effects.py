"""What the state machines ask the I/O layer to do, as plain values.

Effects come back from every call as a list that MUST be carried out in order. The one ordering
rule that matters for safety: a :class:`Persist` must be durable (written and fsynced) before any
:class:`Send` that follows it in the same list (or in the list of a later call: the lists of
successive calls form one sequence). A replica that sent a message it had not persisted could,
after a crash, send a conflicting one: that is equivocation, which PBFT cannot tolerate from more
than f replicas. A Send that comes before a Persist may go out while that Persist is written;
the replica orders its effects so (its replies and checkpoint come before its exec record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``data`` to the peer with PeerID ``to``; ``to=None`` means every validator."""

    to: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class SendAll:
    """Deliver ``data`` to each peer in ``to``. A peer reached through another node (a client
    behind a gateway) may share that route with others: the bytes need to cross it once."""

    to: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``on_timer(name, now_ms)`` once at or after ``at_ms``; replaces a timer of that name.

    A timer that fires when it is no longer wanted is harmless: the machine ignores it.
    """

    name: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Persist:
    """Append ``record`` (CBOR-plain dict with a ``"k"`` kind) to durable storage, in order.

    The stored records, fed back to ``restore``, rebuild the machine after a restart.
    """

    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Decided:
    """Entry ``seq`` is final: ``payload`` (batch of request envelopes) and its certificate.

    ``results`` holds one item per request in the batch: the application's result, or None for a
    request that was skipped (duplicate, stale, or malformed). Emitted strictly in seq order.
    """

    seq: int
    view: int
    digest: bytes
    payload: bytes
    certificate: tuple[bytes, ...]
    results: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """The validator set changes for sequence numbers >= ``first_seq`` (now in force locally)."""

    first_seq: int
    validators: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Completed:
    """Client side: f+1 validators replied the same ``result`` to request ``timestamp``."""

    timestamp: int
    op: bytes
    result: bytes


Effect = Send | SendAll | SetTimer | Persist | Decided | Reconfigured | Completed
