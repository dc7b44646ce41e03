"""When a node may take a bid window's winner as known: it has every bid that counts.

The winner rule (:mod:`.allocation`) is the same everywhere, but it is only applied to the same
bids if each node has received every bid made before the window closed. A fixed settle time
assumes gossip is faster than that; under load it is not, two nodes each see themselves win,
and the task runs twice. So a node decides only when, for every node that could have bid (a
live member advertising a capable agent), it either holds that node's bid for the attempt or
knows it holds everything that node wrote up to the close: its *horizon* for that node has
passed the close.

A horizon is that node's own clock on something it signed and this node has fully applied:
its latest applied state entry (entries apply in seq order, and a bid is stamped before the
entry carrying it is signed), or a presence heartbeat stamped T that reported its state seq S
once this node has applied that author's entries up to S. Both compare one author's clock with
itself, so clock skew between nodes does not matter.

A bidder that is not expected (it advertised no capable agent yet, or is not alive here) may
still be missed; the claim rule in :mod:`.lifecycle` (earliest claim keeps the work) settles
that rare case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .allocation import Window
from .model import Task

Stable = Callable[[Task, Window], bool]


@dataclass(slots=True)
class Horizons:
    """Per author: the newest heartbeat whose reported state seq is applied here."""

    known: dict[str, int] = field(default_factory=dict)
    pending: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def heard(self, author: str, at: int, seq: int, applied: int) -> bool:
        """A heartbeat stamped ``at`` said ``author`` had written ``seq`` entries; ``applied``
        is how many of them are applied here. True if the horizon moved."""
        if seq <= applied:
            if at > self.known.get(author, 0):
                self.known[author] = at
                self.pending.pop(author, None)
                return True
            return False
        waiting = self.pending.setdefault(author, [])
        waiting.append((at, seq))
        del waiting[:-8]  # a handful is enough: newer beats supersede older ones
        return False

    def applied(self, vector: Mapping[str, int]) -> bool:
        """Entries were applied; release the heartbeats they complete. True if any moved."""
        moved = False
        for author in list(self.pending):
            have = vector.get(author, 0)
            waiting = self.pending[author]
            done = [at for at, seq in waiting if seq <= have]
            if done:
                best = max(done)
                if best > self.known.get(author, 0):
                    self.known[author] = best
                    moved = True
                rest = [(at, seq) for at, seq in waiting if seq > have]
                if rest:
                    self.pending[author] = rest
                else:
                    del self.pending[author]
        return moved

    def of(self, author: str) -> int:
        return self.known.get(author, 0)


def stable_rule(
    me: str,
    expected: Callable[[Task], Iterable[str]],
    horizon: Callable[[str], int],
) -> Stable:
    """The gate :func:`.lifecycle.derive_all` applies before taking a window's winner."""

    def stable(task: Task, w: Window) -> bool:
        for node in expected(task):
            if node == me or node in w.bids:
                continue
            if horizon(node) <= w.closes_at:
                return False
        return True

    return stable
