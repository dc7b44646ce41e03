"""The interface between a replica and the application it orders requests for.

The application runs synchronously inside the replica, on every replica, in decided order: it
must be deterministic (same requests in, same results and state out), or replicas diverge and
their checkpoints stop matching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Execution:
    """One request handed to the application, in decided order (``index``: its position in
    the batch decided at ``seq``; requests PBFT skips are not handed over)."""

    seq: int
    client: bytes
    timestamp: int
    op: bytes
    index: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """An application result that also replaces the validator set (reconfiguration).

    The new set applies to sequence numbers above the first checkpoint boundary at or after
    ``seq + window - 1``: no replica can have touched those slots before it executed ``seq``.
    """

    result: bytes
    validators: tuple[bytes, ...] | None = None


Application = Callable[[Execution], "bytes | Outcome"]
# Called with (seq, batch) right before a decided batch executes, also when every request of it
# is skipped (null or duplicate batches): an application that numbers every request of the log
# learns the batch's size before its first Execution.
BatchHook = Callable[[int, "tuple[bytes, ...]"], None]
