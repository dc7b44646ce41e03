"""Confidential tasks: who can read a task's input and output, and where sealed values sit.

A task is confidential when its contract names roles (``contract.confidential``). Its input
and every output written for it (results, late results, failure details) are stored sealed
(:mod:`mossnode.crypto.sealed`); title, spec, contract and the per-node facts that drive the
state machine stay in the clear, so every replica still derives the same states.

Recipients (who gets a wrapped key), decided by the node that seals, deterministically from
its decided log and its latest presence snapshot (:func:`recipients`):

* every member node that holds one of the roles in the decided log *and* advertises in presence
  a local agent with one of those roles (an agent acts only within roles its node holds);
* the value's author: the creator for the input, the submitting node for an output;
* for an output, also every recipient of the task's input, so whoever could read the question
  can read the answer.

The key set is fixed when a value is sealed: a node that gains the role later cannot read
older values. A node only bids on (proposes itself for, reviews) a task whose sealed values it
can open, the input and the accepted outputs of confidential dependencies included
(:func:`readable`), so a confidential task is only ever run where it can be read; if no such
node exists it stays pending.

Replicas that cannot read an output cannot check it against ``output_schema``; the submitting
node checks the plaintext before sealing and records a violation, and every replica checks that
an accepted output of a confidential task is a well-formed sealed value (:func:`unsealed`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ...crypto.sealed import Randomness, Sealed, SealedError, open_sealed, recipients_of, seal
from .contract import Violation

if TYPE_CHECKING:  # lifecycle imports this module
    from .lifecycle import Status
    from .model import TaskView

ROLE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}\Z")
MAX_ROLES = 16
SEALED_DETAILS = "details sealed: confidential task"

# peer id -> (Ed25519 public key, roles the node holds in the decided log)
Members = Mapping[str, tuple[bytes, frozenset[str]]]


def check_roles(roles: Any) -> str | None:
    """Why ``roles`` cannot name a confidential audience, or None."""
    if not isinstance(roles, list | tuple) or not 0 < len(roles) <= MAX_ROLES:
        return f"confidential roles must be a list of 1-{MAX_ROLES} role names"
    for r in roles:
        if not isinstance(r, str) or not ROLE_RE.match(r):
            return f"bad role name {r!r}: [a-z][a-z0-9_.-]{{0,31}}"
    return None


def redacted(roles: Iterable[str]) -> dict[str, Any]:
    """What a caller without the role (or on a node without the key) sees in place of a value."""
    return {"confidential": True, "roles": sorted(set(roles))}


def input_context(tid: str) -> str:
    return f"task/{tid}/input"


def output_context(tid: str, node: str) -> str:
    """Outputs are bound to their author: a node cannot pass another's sealed work as its own."""
    return f"task/{tid}/output/{node}"


def recipients(
    roles: Iterable[str],
    members: Members,
    advertised: Mapping[str, Iterable[str]],
    *,
    author: str,
    also: Iterable[str] = (),
) -> dict[str, bytes]:
    """Peer id -> Ed25519 key of the nodes a value is sealed to (rule in the module doc).

    ``advertised``: peer id -> roles of the agents it advertises (presence; this node's own
    agents for itself). Non-members never receive a key, whatever ``also`` says."""
    wanted = frozenset(roles)
    out: dict[str, bytes] = {}
    for peer in sorted(members):
        key, held = members[peer]
        usable = wanted & held & frozenset(advertised.get(peer, ()))
        if usable:
            out[peer] = key
    for peer in (author, *also):
        if peer in members:
            out[peer] = members[peer][0]
    return out


def _encode(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal_value(
    value: Any, *, context: str, recipients: Mapping[str, bytes], rand: Randomness
) -> dict[str, Any]:
    """A JSON value sealed for the document (see :meth:`Sealed.to_raw`)."""
    return seal(_encode(value), context=context, recipients=recipients, rand=rand).to_raw()


def open_value(raw: Any, *, context: str, peer_id: str, seed: bytes) -> Any:
    """The JSON value inside a stored sealed value; SealedError if this node cannot open it."""
    plain = open_sealed(Sealed.from_raw(raw), context=context, peer_id=peer_id, seed=seed)
    try:
        return json.loads(plain)
    except ValueError:
        raise SealedError("the sealed value does not hold JSON") from None


def holders(raw: Any) -> tuple[str, ...]:
    """Recipients of a stored sealed value; () if it is not one."""
    return recipients_of(raw)


def unsealed(value: Any) -> Violation | None:
    """A confidential task's accepted output must be sealed; replicas check only that."""
    try:
        Sealed.from_raw(value)
    except SealedError as exc:
        return Violation("$", f"output of a confidential task is not sealed ({exc})")
    return None


def readable(view: TaskView, statuses: Mapping[str, Status], tid: str, node: str) -> bool:
    """Can ``node`` open everything a run of ``tid`` is handed: the task's own input if it is
    confidential, and the accepted output of each confidential dependency?"""
    task = view.get(tid)
    if task is None:
        return False
    if task.contract.confidential and node not in holders(task.input):
        return False
    for dep in task.deps:
        d, st = view.get(dep), statuses.get(dep)
        if d is None or not d.contract.confidential:
            continue
        acc = st.accepted if st is not None else None
        if acc is not None and node not in holders(acc.output):
            return False
    return True


def reviewable(view: TaskView, tid: str, assignee: str | None, node: str) -> bool:
    """Can ``node`` open the input and the submission under review of ``tid``?"""
    task = view.get(tid)
    if task is None or not task.contract.confidential:
        return task is not None
    res = task.results.get(assignee or "")
    return node in holders(task.input) and res is not None and node in holders(res.output)
