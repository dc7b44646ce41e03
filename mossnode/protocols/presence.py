"""Failure detection from presence heartbeats: alive, suspect, dead by silence since last beat.

Plain timeouts rather than phi-accrual: heartbeats are periodic and local, the thresholds are what
operators reason about ("dead after 6 s"), and they are configurable.
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


class FailureDetector:
    def __init__(self, suspect_after_ms: int, dead_after_ms: int) -> None:
        if not 0 < suspect_after_ms < dead_after_ms:
            raise ValueError("need 0 < suspect_after_ms < dead_after_ms")
        self.suspect_after_ms = suspect_after_ms
        self.dead_after_ms = dead_after_ms
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
        if silence < self.suspect_after_ms:
            return "alive"
        if silence < self.dead_after_ms:
            return "suspect"
        return "dead"

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)
