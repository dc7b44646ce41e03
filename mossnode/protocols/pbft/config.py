"""Tunables of a replica, and the quorum arithmetic every node must agree on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

V = TypeVar("V")


def max_faulty(n: int) -> int:
    """f: how many of ``n`` validators may be Byzantine (n >= 3f + 1)."""
    return (n - 1) // 3


def quorum(n: int) -> int:
    """Smallest set size such that any two such sets share f+1 validators (2f+1 when n = 3f+1).

    Written as ``(n + f) // 2 + 1`` rather than ``2f + 1`` so that a validator set whose size is
    not 3f+1 (e.g. 5 or 6 after a reconfiguration) still gets intersecting quorums.
    """
    return (n + max_faulty(n)) // 2 + 1


def rescheduled(
    schedule: Sequence[tuple[int, V]], first: int, validators: V
) -> list[tuple[int, V]]:
    """``schedule`` ((first seq, set) pairs in order) with ``validators`` governing from
    ``first``: a later decision replaces what was scheduled at or after it. The replicas and
    the decided log keep their schedules with this one rule."""
    return [c for c in schedule if c[0] < first] + [(first, validators)]


def takes_over(n: int, checkpoint_interval: int, window: int) -> int:
    """See :meth:`PbftConfig.takes_over` (a function too: the decided log applies the same
    rule without a config)."""
    k = checkpoint_interval
    return -(-(n + window - 1) // k) * k + 1


@dataclass(frozen=True, slots=True)
class PbftConfig:
    """Protocol parameters. All validators of a swarm MUST use the same checkpoint_interval and
    window: they decide where checkpoints and reconfigurations fall."""

    swarm_id: bytes
    checkpoint_interval: int = 16  # K: a checkpoint every K decided sequence numbers
    window: int = 32  # L: sequence numbers accepted above the stable checkpoint (h, h + L]
    max_batch: int = 32  # requests per pre-prepare
    max_batch_bytes: int = 1 << 19  # request bytes per pre-prepare (envelopes are <= 1 MiB)
    max_inflight: int = 4  # slots the primary keeps proposed but not executed
    view_timeout_ms: int = 2_000  # base request/view-change timeout, doubled per failed view
    max_backoff: int = 6  # cap on the doubling (timeout <= base * 2**max_backoff)
    retransmit_ms: int = 500  # period of retransmission and status while work is outstanding
    max_skew_ms: int = 30_000  # envelope timestamp bound for directly received messages
    retain_decided: int = 256  # decided entries kept in memory to bring lagging peers up to date
    sync_batch: int = 16  # decided entries per sync message
    seq_block: int = 1024  # envelope sequence numbers reserved per Persist
    # replies to a batch of several requests as one pbft.replies envelope (SendAll) instead of
    # one pbft.reply each: one signature per batch, and one check per batch at a gateway
    reply_batches: bool = False

    def takes_over(self, n: int) -> int:
        """The first seq governed by a validator set decided in seq ``n``: the one after the
        first checkpoint at or after ``n + window - 1``, so every seq that may already be
        prepared under the old set (up to the watermark) stays with it."""
        return takes_over(n, self.checkpoint_interval, self.window)

    def __post_init__(self) -> None:
        k, w = self.checkpoint_interval, self.window
        if k < 1 or w < k or w % k:
            raise ValueError("window must be a positive multiple of checkpoint_interval")
        if self.max_batch < 1 or self.max_inflight < 1 or self.max_batch_bytes < 1:
            raise ValueError("max_batch, max_batch_bytes and max_inflight must be >= 1")
        if min(self.view_timeout_ms, self.retransmit_ms, self.seq_block) < 1:
            raise ValueError("timeouts and seq_block must be positive")
