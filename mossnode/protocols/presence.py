"""Failure detection from presence heartbeats: alive, suspect, dead by silence since last beat.

Plain timeouts rather than phi-accrual: heartbeats are periodic and local, the thresholds are what
operators reason about ("dead after 6 s"), and they are configurable.

Heartbeats are all-to-all, so a swarm of n nodes makes every node receive n - 1 of them per
period (more with gossip's duplicate deliveries), and at about a millisecond of CPU per received
gossip RPC in py-libp2p that, not the work, is what loads an idle daemon. The period therefore
stretches with the swarm so that a node receives at most ``budget`` heartbeats per second, and the
silence thresholds stretch by the same factor (``scale``): a 16-node swarm at the defaults beats
every 1.9 s and declares death after 11 s instead of 6 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Health = Literal["alive", "suspect", "dead"]


@dataclass
class PeerRecord:
    """What a member last said about itself in a presence heartbeat."""

    last_seen_ms: int
    addrs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def presence_scale(members: int, interval_ms: int, budget_per_s: float) -> float:
    """Factor (>= 1) by which the heartbeat period and the silence thresholds stretch so that
    each of ``members`` nodes receives at most ``budget_per_s`` heartbeats per second."""
    if budget_per_s <= 0 or interval_ms <= 0:
        raise ValueError("budget and interval must be positive")
    wanted_ms = 1000 * max(0, members - 1) / budget_per_s
    return max(1.0, wanted_ms / interval_ms)


class FailureDetector:
    def __init__(self, suspect_after_ms: int, dead_after_ms: int) -> None:
        if not 0 < suspect_after_ms < dead_after_ms:
            raise ValueError("need 0 < suspect_after_ms < dead_after_ms")
        self.suspect_after_ms = suspect_after_ms
        self.dead_after_ms = dead_after_ms
        self.scale = 1.0  # see presence_scale
        self.peers: dict[str, PeerRecord] = {}

    def heard(self, peer: str, now_ms: int, addrs: list[str], info: dict[str, Any]) -> bool:
        """Record a heartbeat; True if the peer was not alive before (it came back)."""
        before = self.health(peer, now_ms)
        self.peers[peer] = PeerRecord(now_ms, addrs, info)
        return before != "alive"

    def health(self, peer: str, now_ms: int) -> Health:
        rec = self.peers.get(peer)
        if rec is None:
            return "dead"
        silence = now_ms - rec.last_seen_ms
        if silence < self.suspect_after_ms * self.scale:
            return "alive"
        if silence < self.dead_after_ms * self.scale:
            return "suspect"
        return "dead"

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)
