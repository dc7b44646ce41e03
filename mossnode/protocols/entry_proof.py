"""Where a decided-log entry sits in a PBFT batch, and the proof that ties it to the batch digest.

The decided log has one entry per request slot of every decided PBFT batch (a null batch has
one slot), in (PBFT seq, index) order; the entry's ``seq`` is its flat position in that order.
The first item of an entry's certificate is an :class:`EntryProof`: the batch's PBFT seq, the
entry's index, the batch size, the signed request at that index and its Merkle path. The batch
digest recomputed from it is what the quorum commits in the rest of the certificate sign, and
the size is part of that digest, so a verifier knows exactly which position must come next
(:meth:`Position.follows`): no entry of a batch and no batch can be left out or renumbered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from ..crypto.envelope import canonical
from .pbft.merkle import MAX_COUNT, batch_proofs, batch_root, root_from_path


@dataclass(frozen=True, slots=True)
class EntryProof:
    """Entry ``index`` of the batch decided at PBFT seq ``n`` holding ``count`` requests."""

    n: int
    index: int
    count: int
    request: bytes  # the signed request envelope; b"" for the slot of a null batch
    path: tuple[bytes, ...]

    @property
    def slots(self) -> int:
        """Entries the batch yields: one per request, one for a null batch."""
        return max(self.count, 1)

    def encode(self) -> bytes:
        return canonical(
            {"n": self.n, "i": self.index, "k": self.count, "r": self.request, "p": list(self.path)}
        )

    @classmethod
    def parse(cls, raw: Any) -> EntryProof | None:
        if not isinstance(raw, bytes):
            return None
        try:
            v = cbor2.loads(raw)
        except Exception:  # hostile bytes: cbor2 raises many types
            return None
        if not (isinstance(v, dict) and set(v) == {"n", "i", "k", "r", "p"}):
            return None
        n, i, k, r, p = v["n"], v["i"], v["k"], v["r"], v["p"]
        if not (type(n) is int and type(i) is int and type(k) is int and isinstance(r, bytes)):
            return None
        if not (isinstance(p, list) and all(isinstance(h, bytes) and len(h) == 32 for h in p)):
            return None
        if n < 1 or not 0 <= i < max(k, 1) or not 0 <= k <= MAX_COUNT or len(p) > 64:
            return None
        if k == 0 and (r or p):
            return None
        return cls(n, i, k, r, tuple(p))

    def root(self) -> bytes | None:
        """The batch digest this proof implies, or None if the path does not fit the position."""
        if self.count == 0:
            return batch_root(())
        return root_from_path(self.request, self.index, self.count, self.path)


@dataclass(frozen=True, slots=True)
class Position:
    """The last entry of a log: its batch (seq, size, digest) and index in it."""

    n: int
    index: int
    count: int
    root: bytes

    @property
    def closes_batch(self) -> bool:
        return self.index + 1 >= max(self.count, 1)

    def follows(self, proof: EntryProof, root: bytes) -> str | None:
        """Why an entry with ``proof`` (batch digest ``root``) cannot come next, or None."""
        if self.closes_batch:
            if (proof.n, proof.index) != (self.n + 1, 0):
                return f"expected entry 0 of batch {self.n + 1}, got {proof.index} of {proof.n}"
            return None
        if (proof.n, proof.index) != (self.n, self.index + 1):
            return (
                f"expected entry {self.index + 1} of batch {self.n}, got {proof.index} of {proof.n}"
            )
        if proof.count != self.count or root != self.root:
            return f"entry {proof.index} of batch {self.n} names another batch than entry 0"
        return None


GENESIS_POSITION = Position(0, 0, 0, b"")


def proofs_for(n: int, batch: Sequence[bytes]) -> tuple[bytes, list[EntryProof]]:
    """The batch digest and one proof per entry of the batch decided at ``n``."""
    root, paths = batch_proofs(batch)
    if not batch:
        return root, [EntryProof(n, 0, 0, b"", ())]
    k = len(batch)
    return root, [EntryProof(n, i, k, r, tuple(paths[i])) for i, r in enumerate(batch)]
