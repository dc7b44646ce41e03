"""Quorum certificates: proof, checkable by anyone alone, that an entry was decided.

A certificate is the list of wire bytes of 2f+1 (precisely: ``quorum(n)``) ``pbft.commit``
envelopes from distinct validators, all naming the same (view, seq, digest), where digest is the
decided batch's Merkle root (:func:`~.messages.batch_digest`). Checking it needs only the payload, the validator set in force
for that seq and the swarm id: no clock (commits are judged by signature, not age), no state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .config import quorum
from .messages import COMMIT, Vote, digest, open_embedded


@dataclass(frozen=True, slots=True)
class Verified:
    """A good certificate; truthy."""

    view: int
    seq: int
    digest: bytes
    signers: tuple[bytes, ...]

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Invalid:
    """A refused certificate and why; falsy, so ``if verify_certificate(...)`` reads right."""

    reason: str

    def __bool__(self) -> bool:
        return False


def verify_certificate(
    cert: Sequence[bytes],
    payload: bytes,
    validators: Iterable[bytes],
    swarm_id: bytes,
    *,
    seq: int | None = None,
) -> Verified | Invalid:
    """Check a decided entry's certificate against the validator set in force at its seq.

    Refuses: a non-bytes or unverifiable envelope, a non-commit, a signer outside the set, the
    same signer twice, commits that disagree on (view, seq, digest), a digest that is not the
    payload's, a seq other than the expected one, and fewer than quorum(n) signers.
    """
    return verify_commits(cert, validators, swarm_id, seq=seq, payload=payload)


def verify_commits(
    cert: Sequence[bytes],
    validators: Iterable[bytes],
    swarm_id: bytes,
    *,
    seq: int | None = None,
    payload: bytes | None = None,
    batch_digest: bytes | None = None,
) -> Verified | Invalid:
    """:func:`verify_certificate` for a batch known by its payload or only by its digest (a
    Merkle proof of one request names the digest without the rest of the batch)."""
    members = frozenset(validators)
    if not isinstance(cert, (list, tuple)) or not cert:
        return Invalid("empty certificate")
    signers: list[bytes] = []
    agreed: Vote | None = None
    for raw in cert:
        env = open_embedded(raw, swarm_id)
        if env is None:
            return Invalid("bad_signature: a commit does not verify")
        if env.type != COMMIT:
            return Invalid(f"not_commit: {env.type}")
        if env.sender not in members:
            return Invalid("not_validator: a signer is not in the validator set")
        if env.sender in signers:
            return Invalid("duplicate_signer: one validator signed twice")
        vote = Vote.parse(env.body)
        if vote is None:
            return Invalid("malformed: commit body")
        if agreed is None:
            agreed = vote
        elif vote != agreed:
            return Invalid("mismatch: commits disagree on (view, seq, digest)")
        signers.append(env.sender)
    assert agreed is not None
    want = digest(payload) if payload is not None else batch_digest
    if agreed.digest != want:
        return Invalid("digest_mismatch: payload does not hash to the committed digest")
    if seq is not None and agreed.seq != seq:
        return Invalid(f"wrong_seq: certificate is for {agreed.seq}, not {seq}")
    need = quorum(len(members))
    if len(signers) < need:
        return Invalid(f"too_few_signatures: {len(signers)} < {need}")
    return Verified(agreed.view, agreed.seq, agreed.digest, tuple(signers))
