"""Batch digests as Merkle roots, so that one request of a decided batch is provable alone.

A batch of ``k`` requests is named by ``sha256(DOMAIN || k as 4 bytes || MTH(requests))``, where
MTH is the Merkle tree hash of RFC 9162 (leaf ``H(0x00 || request)``, node
``H(0x01 || left || right)``, split at the largest power of two below the size). Binding ``k``
into the digest tells a verifier of request ``i`` whether request ``i + 1`` belongs to the same
batch, so a sequence of single-request proofs cannot silently skip one. An inclusion proof is the
list of sibling hashes from the leaf up (RFC 9162 section 2.1.3).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

DOMAIN = b"mossnode/pbft/batch\0"
MAX_COUNT = 1 << 20
_EMPTY = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    """The tree's levels, leaves first, built bottom-up: pairs are hashed left to right and a
    lone last node is carried up unchanged, which yields exactly RFC 9162's split-at-a-power-of
    -two tree (its left subtrees are perfect) without recursion."""
    levels = [leaves]
    level = leaves
    while len(level) > 1:
        up = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            up.append(level[-1])
        levels.append(up)
        level = up
    return levels


def _paths(levels: list[list[bytes]], count: int) -> list[list[bytes]]:
    """Every leaf's sibling hashes from the bottom up. Node ``j`` of level ``h`` covers leaves
    ``j << h`` up to ``(j + 1) << h``; a carried node (the odd last one) has no sibling."""
    paths: list[list[bytes]] = [[] for _ in range(count)]
    for h, level in enumerate(levels[:-1]):
        n = len(level)
        for j in range(n - (n & 1)):
            sibling = level[j ^ 1]
            for i in range(j << h, min((j + 1) << h, count)):
                paths[i].append(sibling)
    return paths


def _seal(count: int, mth: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + count.to_bytes(4, "big") + mth).digest()


@functools.lru_cache(maxsize=8)
def _tree(requests: tuple[bytes, ...]) -> tuple[bytes, list[list[bytes]]]:
    """Digest and levels of a batch, memoized: a replica names the batch when the pre-prepare
    is made or parsed and proves its requests when it executes it, one tree for both."""
    if not requests:
        return _seal(0, _EMPTY), []
    levels = _levels([leaf_hash(r) for r in requests])
    return _seal(len(requests), levels[-1][0]), levels


def batch_root(requests: Sequence[bytes]) -> bytes:
    """The digest that names a batch (pre-prepares, votes and certificates carry it)."""
    return _tree(tuple(requests))[0]


def batch_proofs(requests: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The batch digest and every request's inclusion path, in O(k log k)."""
    root, levels = _tree(tuple(requests))
    return root, _paths(levels, len(requests))


def root_from_path(request: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes | None:
    """The batch digest implied by ``request`` at ``index`` of ``count`` with this path, or None
    if the path cannot belong to such a position (RFC 9162 2.1.3.2)."""
    if not 0 <= index < count <= MAX_COUNT:
        return None
    fn, sn = index, count - 1
    r = leaf_hash(request)
    for p in path:
        if not isinstance(p, bytes) or len(p) != 32 or sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None
    return _seal(count, r)
