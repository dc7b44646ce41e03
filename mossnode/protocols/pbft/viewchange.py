"""View-change validation and the new-view computation, as pure functions.

The new primary and every backup run the same :func:`plan_new_view` over the same 2f+1 signed
view-changes, so a backup accepts a new-view only if the primary's re-proposals are exactly the
ones the evidence forces: for each sequence number above the latest stable checkpoint, the batch
of the highest-view prepared certificate, else a null batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...crypto.envelope import Envelope
from .config import quorum
from .messages import (
    CHECKPOINT,
    NULL_DIGEST,
    PREPARE,
    PREPREPARE,
    VIEWCHANGE,
    Checkpoint,
    NewView,
    PrePrepare,
    ViewChange,
    Vote,
)

Opener = Callable[[bytes], Envelope | None]
ValidatorsFor = Callable[[int], tuple[bytes, ...]]

GENESIS_STATE = bytes(32)


@dataclass(frozen=True, slots=True)
class CheckedViewChange:
    sender: bytes
    raw: bytes
    vc: ViewChange
    stable_digest: bytes
    prepared: dict[int, PrePrepare]  # seq -> the pre-prepare of its prepared certificate


@dataclass(frozen=True, slots=True)
class NewViewPlan:
    stable_seq: int
    stable_digest: bytes
    checkpoint_proof: tuple[bytes, ...]
    slots: dict[int, tuple[bytes, tuple[bytes, ...]]]  # seq -> (digest, batch); null = ()

    @property
    def max_seq(self) -> int:
        return max(self.slots, default=self.stable_seq)


def primary_of(view: int, validators: Sequence[bytes]) -> bytes:
    return validators[view % len(validators)]


def check_checkpoint_proof(
    proof: Sequence[bytes], seq: int, validators_for: ValidatorsFor, opener: Opener
) -> bytes | str:
    """The state digest that ``quorum`` distinct validators signed for ``seq``, or a reason."""
    if seq == 0:
        return GENESIS_STATE if not proof else "checkpoint proof for seq 0 must be empty"
    members = validators_for(seq)
    signers: set[bytes] = set()
    agreed: bytes | None = None
    for raw in proof:
        env = opener(raw)
        if env is None or env.type != CHECKPOINT:
            return "checkpoint proof holds a bad envelope"
        ck = Checkpoint.parse(env.body)
        if ck is None or ck.seq != seq or env.sender not in members or env.sender in signers:
            return "checkpoint proof holds a mismatched or duplicate vote"
        if agreed is not None and ck.digest != agreed:
            return "checkpoint proof disagrees on the digest"
        agreed = ck.digest
        signers.add(env.sender)
    if agreed is None or len(signers) < quorum(len(members)):
        return "checkpoint proof has too few signers"
    return agreed


def check_view_change(
    env: Envelope,
    validators_for: ValidatorsFor,
    opener: Opener,
    window: int,
) -> CheckedViewChange | str:
    """Validate a view-change envelope and every certificate it carries."""
    vc = ViewChange.parse(env.body)
    if vc is None:
        return "malformed view-change"
    stable = check_checkpoint_proof(vc.checkpoint_proof, vc.stable_seq, validators_for, opener)
    if isinstance(stable, str):
        return stable
    prepared: dict[int, PrePrepare] = {}
    for proof in vc.prepared:
        ppe = opener(proof.preprepare)
        pp = PrePrepare.parse(ppe.body) if ppe is not None and ppe.type == PREPREPARE else None
        if ppe is None or pp is None:
            return "prepared certificate holds a bad pre-prepare"
        if pp.view >= vc.view or not vc.stable_seq < pp.seq <= vc.stable_seq + window:
            return "prepared certificate outside the view or the window"
        # a seq is prepared by the set that governs it, which a reconfiguration in force
        # since may have replaced (the certificate was made under the old set)
        members = validators_for(pp.seq)
        primary = primary_of(pp.view, members)
        if ppe.sender != primary or pp.seq in prepared:
            return "prepared certificate: wrong primary or duplicate seq"
        signers: set[bytes] = set()
        want = Vote(pp.view, pp.seq, pp.digest)
        for raw in proof.prepares:
            pe = opener(raw)
            if pe is None or pe.type != PREPARE or Vote.parse(pe.body) != want:
                return "prepared certificate holds a bad prepare"
            if pe.sender not in members or pe.sender == primary or pe.sender in signers:
                return "prepared certificate: bad or duplicate preparer"
            signers.add(pe.sender)
        if len(signers) < quorum(len(members)) - 1:
            return "prepared certificate has too few prepares"
        prepared[pp.seq] = pp
    return CheckedViewChange(env.sender, env.raw, vc, stable, prepared)


def plan_new_view(checked: Sequence[CheckedViewChange]) -> NewViewPlan:
    """Start from the latest stable checkpoint; re-propose what any certificate shows prepared."""
    base = max(checked, key=lambda c: c.vc.stable_seq)
    min_s = base.vc.stable_seq
    best: dict[int, PrePrepare] = {}
    for c in checked:
        for n, pp in c.prepared.items():
            if n > min_s and (n not in best or pp.view > best[n].view):
                best[n] = pp
    max_s = max(best, default=min_s)
    slots: dict[int, tuple[bytes, tuple[bytes, ...]]] = {}
    for n in range(min_s + 1, max_s + 1):
        chosen = best.get(n)
        slots[n] = (chosen.digest, chosen.batch) if chosen is not None else (NULL_DIGEST, ())
    return NewViewPlan(min_s, base.stable_digest, base.vc.checkpoint_proof, slots)


def check_new_view(
    env: Envelope,
    validators: Sequence[bytes],
    validators_for: ValidatorsFor,
    opener: Opener,
    window: int,
) -> tuple[NewView, NewViewPlan, list[tuple[PrePrepare, bytes]]] | str:
    """A backup's check of a new-view: 2f+1 valid view-changes, and O recomputed exactly."""
    nv = NewView.parse(env.body)
    if nv is None:
        return "malformed new-view"
    if env.sender != primary_of(nv.view, validators):
        return "new-view not from the view's primary"
    checked: dict[bytes, CheckedViewChange] = {}
    for raw in nv.view_changes:
        ve = opener(raw)
        if ve is None or ve.type != VIEWCHANGE or ve.sender not in validators:
            return "new-view holds a bad view-change envelope"
        if ve.sender in checked:
            return "new-view holds two view-changes from one replica"
        c = check_view_change(ve, validators_for, opener, window)
        if isinstance(c, str):
            return f"new-view holds an invalid view-change: {c}"
        if c.vc.view != nv.view:
            return "new-view holds a view-change for another view"
        checked[ve.sender] = c
    if len(checked) < quorum(len(validators)):
        return "new-view has too few view-changes"
    plan = plan_new_view(list(checked.values()))
    pps: dict[int, tuple[PrePrepare, bytes]] = {}
    for raw in nv.preprepares:
        pe = opener(raw)
        pp = PrePrepare.parse(pe.body) if pe is not None and pe.type == PREPREPARE else None
        if pe is None or pp is None or pe.sender != env.sender or pp.view != nv.view:
            return "new-view holds a bad pre-prepare"
        if pp.seq in pps:
            return "new-view re-proposes a seq twice"
        pps[pp.seq] = (pp, raw)
    if set(pps) != set(plan.slots):
        return "new-view re-proposes the wrong sequence numbers"
    for n, (d, _) in plan.slots.items():
        if pps[n][0].digest != d:
            return f"new-view re-proposes the wrong batch at {n}"
    return nv, plan, [pps[n] for n in sorted(pps)]
