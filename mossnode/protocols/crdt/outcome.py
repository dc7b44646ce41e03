"""What a replica hands back: applied entries, refusals, blocks, proofs of equivocation.

Plain values, so the daemon can persist, relay and report them without touching the replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mossnode.crypto.envelope import Envelope, Rejection
from mossnode.record import Record

from .entry import (
    STATE_UPDATE,
    StateEntry,
    open_signed,
    parse_body,
    proves_equivocation,
)
from .schema import Path


class Entry(Record):
    """A signed entry of one author's log: what the store keeps and anti-entropy ships."""

    __slots__ = ("author", "data", "seq")

    def __init__(self, author: str, seq: int, data: bytes) -> None:
        self.author = author
        self.seq = seq
        self.data = data


@dataclass(frozen=True, slots=True)
class Refusal:
    author: str | None  # None when the signature did not verify: nobody to blame
    seq: int | None
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class Blocked:
    """An author stopped for good at ``seq``: nothing it signs from there on is applied."""

    author: str
    seq: int
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Two entries signed by one author that cannot share one history: proof for consensus."""

    author: str
    seq: int  # where the histories part: the author's entries from here on are disputed
    first: bytes
    second: bytes


@dataclass(slots=True)
class Outcome:
    applied: list[Entry] = field(default_factory=list)  # persist, then relay
    refused: list[Refusal] = field(default_factory=list)
    equivocations: list[Equivocation] = field(default_factory=list)  # persist, report
    retracted: list[Entry] = field(default_factory=list)  # only from rebuild(): drop from store
    changed: list[Path] = field(default_factory=list)  # paths observed changing, for readers
    # A rebuild dropped entries applied before (retracted, or own ones back to waiting): what
    # vanished is not in ``changed``, so readers must read everything again.
    rolled_back: bool = False

    def retract_from(self) -> dict[str, int]:
        """``{author: first retracted seq}``, the form ``Store.commit(retract=...)`` takes."""
        out: dict[str, int] = {}
        for e in self.retracted:
            out[e.author] = min(e.seq, out.get(e.author, e.seq))
        return out

    def merge(self, other: Outcome) -> None:
        self.applied += other.applied
        self.refused += other.refused
        self.equivocations += other.equivocations
        self.retracted += other.retracted
        self.changed += other.changed
        self.rolled_back = self.rolled_back or other.rolled_back


@dataclass(frozen=True)
class Limits:
    """Local resource bounds; unlike the entry limits, these never change a verdict."""

    max_pending_per_author: int = 1024
    max_pending_total: int = 50_000


class WriteRefused(Exception):
    """A local write that the node's own checks refuse; the document is unchanged."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(str(rejection))
        self.rejection = rejection


class StateError(Exception):
    """Persisted state that does not fit together (snapshot vs. log); needs an operator."""


def verify_equivocation(proof: Equivocation, swarm_id: bytes) -> bool:
    """Check a proof someone else sent: two entries signed by ``proof.author`` that cannot
    share one history (same seq, different bytes; or a successor naming another predecessor)."""
    envs: list[Envelope] = []
    for raw in (proof.first, proof.second):
        env = open_signed(raw, swarm_id=swarm_id, now_ms=0)
        if not isinstance(env, Envelope) or env.type != STATE_UPDATE:
            return False
        if env.sender_id != proof.author:
            return False
        envs.append(env)
    first, second = envs
    if first.digest == second.digest:
        return False
    if first.seq == second.seq:
        return True
    a, b = parse_body(first), parse_body(second)
    return isinstance(a, StateEntry) and isinstance(b, StateEntry) and proves_equivocation(a, b)
