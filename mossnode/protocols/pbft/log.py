"""The message log of one sequence number, and the prepared certificate it may hold."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .messages import PreparedProof

# sender key -> (digest, wire bytes): one vote per sender and view, the first one wins.
Votes = dict[bytes, tuple[bytes, bytes]]


@dataclass(slots=True)
class Accepted:
    """The pre-prepare a replica accepted for (view, seq).

    ``raw`` and ``batch`` are None when only the digest is known (restored from this replica's
    own persisted prepare): it still pins the digest, so the replica cannot prepare another.
    """

    digest: bytes
    batch: tuple[bytes, ...] | None = None
    raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class PreparedCert:
    """pre-prepare + quorum-1 matching prepares: what a view change must carry forward."""

    view: int
    digest: bytes
    batch: tuple[bytes, ...]
    preprepare: bytes
    prepares: tuple[bytes, ...]

    def proof(self) -> PreparedProof:
        return PreparedProof(self.preprepare, self.prepares)


@dataclass(frozen=True, slots=True)
class Committed:
    view: int
    digest: bytes
    batch: tuple[bytes, ...]
    certificate: tuple[bytes, ...]


@dataclass(slots=True)
class Slot:
    seq: int
    preprepares: dict[int, Accepted] = field(default_factory=dict)
    prepares: dict[int, Votes] = field(default_factory=dict)
    commits: dict[int, Votes] = field(default_factory=dict)
    my_prepare: dict[int, bytes] = field(default_factory=dict)
    my_commit: dict[int, bytes] = field(default_factory=dict)
    prepared: PreparedCert | None = None
    committed: Committed | None = None
    sent_at: int = 0  # when this replica last sent its part for this slot (0: after a restart)

    def forget_views_below(self, view: int) -> None:
        """Messages of abandoned views are useless once the prepared certificate is kept."""
        for d in (self.preprepares, self.prepares, self.commits, self.my_prepare, self.my_commit):
            for v in [v for v in d if v < view]:
                del d[v]


def matching(
    votes: Votes | None, digest: bytes, members: Collection[bytes], exclude: bytes | None = None
) -> list[bytes]:
    """Wire bytes of members' votes for ``digest``, ordered by sender key (deterministic)."""
    if not votes:
        return []
    return [
        raw
        for s, (d, raw) in sorted(votes.items())
        if d == digest and s != exclude and s in members
    ]
