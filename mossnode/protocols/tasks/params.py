"""Swarm-wide timing and policy parameters of the task machine.

Every replica must derive the same state from the same facts, so these numbers are part of the
rules, not local tuning: the daemon reads them from the swarm's configuration (ideally a decided
log entry) and passes the same :class:`Params` to every derivation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Params:
    """Times in milliseconds.

    ``settle_ms``: a bid window stays open this long after its first bid, and the winner is
    decided ``settle_ms`` after the window closed, so every counted bid is at least
    ``settle_ms`` old when it is counted (room for gossip to deliver it everywhere).
    ``lease_ms``: length of a lease; the assignee renews when half of it is left.
    ``claim_timeout_ms``: a winner that has not claimed this long after the decision loses
    the attempt (it is probably dead).
    ``exclusive_claim_ms``: an exclusive task's assignee must claim it this long after it
    proposed itself (the ``at`` of its decided ``task.assign``), or the task fails (it never
    runs twice, so it is not reassigned). Generous: the decision itself may take seconds
    (a view change).
    ``backoff_base_ms`` / ``backoff_max_ms``: pause before re-offering a task after the
    n-th faulty attempt: ``min(max, base * 2**(n-1))``.
    ``extra_attempts``: attempts closed without a fault (released, reassigned) allowed on top
    of ``max_attempts``, so a task cannot bounce forever.
    ``review_delay_ms``: reviewers stagger by a hash rank within this span so that usually
    only one reviews a submission.
    ``same_node_review``: allow a reviewer agent on the assignee's own node (a different
    agent). Off by default: a node signs for all its agents, so only another node's review
    is independent.
    """

    settle_ms: int = 200
    lease_ms: int = 5_000
    claim_timeout_ms: int = 5_000
    exclusive_claim_ms: int = 60_000
    backoff_base_ms: int = 500
    backoff_max_ms: int = 30_000
    extra_attempts: int = 8
    review_delay_ms: int = 400
    same_node_review: bool = False

    def __post_init__(self) -> None:
        if self.settle_ms < 0 or self.lease_ms <= 0 or self.claim_timeout_ms <= 0:
            raise ValueError("settle_ms >= 0, lease_ms > 0 and claim_timeout_ms > 0 required")
        if self.exclusive_claim_ms <= 0:
            raise ValueError("exclusive_claim_ms > 0 required")
        if self.backoff_base_ms < 0 or self.backoff_max_ms < self.backoff_base_ms:
            raise ValueError("need 0 <= backoff_base_ms <= backoff_max_ms")

    def backoff(self, faults: int) -> int:
        """Pause after the ``faults``-th faulty attempt (0 after none)."""
        if faults <= 0 or self.backoff_base_ms == 0:
            return 0
        return min(self.backoff_max_ms, self.backoff_base_ms << min(faults - 1, 30))
