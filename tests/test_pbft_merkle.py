"""Batch digests: RFC 9162 Merkle tree hashes, and one tree per batch for naming and proving."""

from __future__ import annotations

import hashlib

import pytest

from mossnode.protocols.entry_proof import proofs_for
from mossnode.protocols.pbft import merkle
from mossnode.protocols.pbft.messages import PrePrepare


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1, recursively (split at the largest power of two below n)."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 100, 128, 129])
def test_root_is_the_rfc_tree_and_every_path_proves_its_request(k: int) -> None:
    reqs = [b"request %d" % i for i in range(k)]
    want = hashlib.sha256(merkle.DOMAIN + k.to_bytes(4, "big") + _mth(reqs)).digest()
    root, paths = merkle.batch_proofs(reqs)
    assert merkle.batch_root(reqs) == root == want
    for i, r in enumerate(reqs):
        assert merkle.root_from_path(r, i, k, paths[i]) == root


def test_one_tree_names_and_proves_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-prepare's digest and the execution's entry proofs hash each request once."""
    hashed: list[bytes] = []
    real = merkle.leaf_hash

    def counting(data: bytes) -> bytes:
        hashed.append(data)
        return real(data)

    monkeypatch.setattr(merkle, "leaf_hash", counting)
    batch = [b"one-tree %d" % i for i in range(37)]
    pp = PrePrepare.make(0, 9, batch)
    parsed = PrePrepare.parse(pp.body())
    root, proofs = proofs_for(9, batch)
    assert parsed == pp and root == pp.digest and len(proofs) == 37
    assert sorted(hashed) == sorted(batch)
