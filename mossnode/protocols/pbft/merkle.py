"""Batch digests as Merkle roots, so that one request of a decided batch is provable alone.

A batch of ``k`` requests is named by ``sha256(DOMAIN || k as 4 bytes || MTH(requests))``, where
MTH is the Merkle tree hash of RFC 9162 (leaf ``H(0x00 || request)``, node
``H(0x01 || left || right)``, split at the largest power of two below the size). Binding ``k``
into the digest tells a verifier of request ``i`` whether request ``i + 1`` belongs to the same
batch, so a sequence of single-request proofs cannot silently skip one. An inclusion proof is the
list of sibling hashes from the leaf up (RFC 9162 section 2.1.3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DOMAIN = b"mossnode/pbft/batch\0"
MAX_COUNT = 1 << 20
_EMPTY = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _tree(leaves: Sequence[bytes], paths: list[list[bytes]] | None, lo: int, hi: int) -> bytes:
    if hi - lo == 1:
        return leaves[lo]
    mid = lo + _split(hi - lo)
    left = _tree(leaves, paths, lo, mid)
    right = _tree(leaves, paths, mid, hi)
    if paths is not None:
        for i in range(lo, mid):
            paths[i].append(right)
        for i in range(mid, hi):
            paths[i].append(left)
    return _node(left, right)


def _seal(count: int, mth: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + count.to_bytes(4, "big") + mth).digest()


def batch_root(requests: Sequence[bytes]) -> bytes:
    """The digest that names a batch (pre-prepares, votes and certificates carry it)."""
    if not requests:
        return _seal(0, _EMPTY)
    leaves = [leaf_hash(r) for r in requests]
    return _seal(len(leaves), _tree(leaves, None, 0, len(leaves)))


def batch_proofs(requests: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The batch digest and every request's inclusion path, in O(k log k)."""
    if not requests:
        return _seal(0, _EMPTY), []
    leaves = [leaf_hash(r) for r in requests]
    paths: list[list[bytes]] = [[] for _ in leaves]
    return _seal(len(leaves), _tree(leaves, paths, 0, len(leaves))), paths


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
