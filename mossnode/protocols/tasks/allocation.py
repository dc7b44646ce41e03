"""Bids and the deterministic winner rule: allocation without a central scheduler.

Each node bids for a ready task on behalf of its best local agent; a bid is the node's own CRDT
entry ``tasks/<id>/bids/<node> = {attempt, agent, score, at}``. The window for an attempt opens
with its first bid and closes ``settle_ms`` later; the winner is decided once the window has
been closed for another ``settle_ms`` (every counted bid is then at least ``settle_ms`` old, time
for gossip to carry it everywhere). Every node evaluates :func:`winner` on the same bids and gets
the same node: highest score, then the lowest ``tiebreak`` hash of (task, attempt, node), then
the node id. Scores are rounded to 6 decimals when bid, so all replicas compare equal floats.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping

from mossnode.record import value

from .model import BidEntry, Task

NEUTRAL = 0.5  # reputation of an agent with no history: newcomers can win from day one

W_REPUTATION = 0.45
W_FREE = 0.35
W_IDLE = 0.20


@value
class LocalAgent:
    """One agent of this node as the scheduler sees it.

    ``load`` is external busyness in [0, 1] (e.g. host CPU share) reported by the backend;
    ``max_concurrency`` the tasks it runs at once.
    """

    name: str
    roles: frozenset[str] = frozenset({"executor"})
    capabilities: frozenset[str] = frozenset()
    load: float = 0.0
    max_concurrency: int = 1


DEFAULT_ROLE = "executor"


def capable(agent: LocalAgent, task: Task) -> bool:
    """Capability match is required: every required capability, and the task's role
    (``executor`` when it names none, so a reviewer-only agent never takes work)."""
    if not set(task.capabilities) <= agent.capabilities:
        return False
    return (task.role or DEFAULT_ROLE) in agent.roles


def bid_score(reputation: float, active: int, capacity: int, load: float) -> float:
    """``0.45*reputation + 0.35*free_share + 0.20*(1 - load)``, rounded to 6 decimals.

    ``free_share`` is the agent's unused concurrency ``1 - active/capacity``. Reputation is for
    the task's capabilities (see :mod:`.reputation`); ``NEUTRAL`` without history.
    """
    cap = max(1, capacity)
    free = max(0.0, 1.0 - min(active, cap) / cap)
    rep = min(1.0, max(0.0, reputation))
    idle = 1.0 - min(1.0, max(0.0, load))
    return round(W_REPUTATION * rep + W_FREE * free + W_IDLE * idle, 6)


@functools.lru_cache(maxsize=4096)
def tiebreak(task_id: str, attempt: int, node: str) -> str:
    """A per-task, per-attempt pseudo-random order of nodes that no node can choose for itself.
    Cached: a pure function, asked again at each derivation of a decided window whose bids
    tie (equal scores are common: idle agents on equally loaded hosts)."""
    return hashlib.sha256(f"{task_id}\0{attempt}\0{node}".encode()).hexdigest()


def rank_key(task_id: str, attempt: int, node: str, bid: BidEntry) -> tuple[float, str, str]:
    return (-bid.score, tiebreak(task_id, attempt, node), node)


def best(
    task_id: str, attempt: int, bids: Mapping[str, BidEntry], among: Iterable[str]
) -> str | None:
    """The best-ranked node among ``among`` (all must have a bid in ``bids``)."""
    nodes = [n for n in among if n in bids]
    if len(nodes) <= 1:
        return nodes[0] if nodes else None
    # the score decides unless it ties: hash only the nodes tied at the top (a hash each
    # was most of a derivation's cost once a window was decided)
    top = max(bids[n].score for n in nodes)
    tied = [n for n in nodes if bids[n].score == top]
    if len(tied) == 1:
        return tied[0]
    return min(tied, key=lambda n: rank_key(task_id, attempt, n, bids[n]))


@value
class Window:
    """The bid window of one attempt: who counts, and when the decision falls."""

    attempt: int
    opened_at: int
    closes_at: int  # bids made after this do not count
    decide_at: int  # the winner is known from this time on
    bids: Mapping[str, BidEntry]  # the counted bids


def window(bids: Mapping[str, BidEntry], attempt: int, settle_ms: int) -> Window | None:
    """The window of ``attempt``, or None while nobody has bid for it."""
    mine = {n: b for n, b in bids.items() if b.attempt == attempt}
    if not mine:
        return None
    opened = min([b.at for b in mine.values()])
    closes = opened + settle_ms
    late = [n for n, b in mine.items() if b.at > closes]
    for n in late:  # usually none: every bid came within the window
        del mine[n]
    return Window(attempt, opened, closes, closes + settle_ms, mine)


def winner(
    task: Task,
    bids: Mapping[str, BidEntry],
    now_ms: int,
    settle_ms: int,
    attempt: int | None = None,
) -> str | None:
    """The node that wins ``attempt`` (default: the highest attempt bid for), or None if
    nobody bid or the decision time has not come. Pure: same bids, same answer everywhere."""
    if attempt is None:
        if not bids:
            return None
        attempt = max(b.attempt for b in bids.values())
    w = window(bids, attempt, settle_ms)
    if w is None or now_ms < w.decide_at:
        return None
    return best(task.id, attempt, w.bids, w.bids)
