"""The backend interface every local agent runner implements: start, progress, cancel, result.

A run reports progress through a callback and ends with an :class:`Outcome`; cancelling the
surrounding trio scope (task cancelled, lease lost, swarm paused) must stop the work entirely.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

ProgressFn = Callable[[float, str], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: Any = None
    error: str = ""
    duration_s: float = 0.0


class Backend(Protocol):
    async def run(self, task: dict[str, Any], progress: ProgressFn) -> Outcome:
        """Run one task to completion; cancellation of the caller's scope kills the work."""
        ...
