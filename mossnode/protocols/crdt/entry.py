"""The signed form of one author's document update: a ``state.update`` SignedEnvelope.

Body (canonical CBOR map, exactly these keys):
  ``u`` Yrs v1 update bytes of one local transaction,
  ``d`` the author's state vector before that transaction, as sorted ``[client, clock]`` pairs:
        the dependencies a replica must hold before applying it,
  ``p`` the decided-log sequence whose policy the author wrote under,
  ``h`` SHA-256 digest of the author's previous entry (empty for seq 1): a hash chain, so two
        different histories signed by one author are provable (equivocation).
The envelope's ``seq`` is the author's entry number, 1, 2, 3, ... without gaps.

The two size bounds below change verdicts, so they are swarm-wide protocol constants.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import cbor2

from mossnode.crypto.envelope import (
    SIG_LEN,
    VERSION,
    Envelope,
    Reason,
    Rejection,
    bad_signature,
    open_envelope,
    signature_valid,
)
from mossnode.crypto.peerid import peer_id_from_public_key
from mossnode.record import Record

STATE_UPDATE = "state.update"
MAX_ENTRY_BYTES = 256 * 1024
MAX_SPAN = 1 << 20  # clocks one update may add: bounds what a tiny tombstone run can claim
MAX_DEPS = 100_000
DIGEST_LEN = 32
NO_SKEW_LIMIT = 1 << 62  # stored entries are replayed years later; seq, not time, stops replay
_U64 = 1 << 64
_BODY_KEYS = frozenset({"u", "d", "p", "h"})


class StateEntry(Record):
    """A verified, decoded state entry (a value: see :class:`mossnode.record.Record`)."""

    __slots__ = (
        "author",
        "deps",
        "digest",
        "policy_seq",
        "prev",
        "public_key",
        "raw",
        "seq",
        "timestamp",
        "update",
    )

    def __init__(
        self,
        author: str,
        public_key: bytes,
        seq: int,
        update: bytes,
        deps: Mapping[int, int],
        policy_seq: int,
        prev: bytes,
        timestamp: int,
        raw: bytes,
        digest: bytes,
    ) -> None:
        self.author = author
        self.public_key = public_key
        self.seq = seq
        self.update = update
        self.deps = deps
        self.policy_seq = policy_seq
        self.prev = prev
        self.timestamp = timestamp
        self.raw = raw
        self.digest = digest


def body(update: bytes, deps: Mapping[int, int], policy_seq: int, prev: bytes) -> dict[str, object]:
    pairs = [[c, k] for c, k in sorted(deps.items()) if k > 0]
    return {"u": update, "d": pairs, "p": policy_seq, "h": prev}


def parse_body(env: Envelope) -> StateEntry | Rejection:
    """Decode the body of an already verified envelope; refusals here are the author's fault."""
    if env.type != STATE_UPDATE:
        return Rejection(Reason.MALFORMED, f"type {env.type!r} is not {STATE_UPDATE}")
    b = env.body
    if not isinstance(b, dict) or b.keys() != _BODY_KEYS:
        return Rejection(Reason.MALFORMED, "body is not {u, d, p, h}")
    update, pairs, policy_seq, prev = b["u"], b["d"], b["p"], b["h"]
    if not isinstance(update, bytes):
        return Rejection(Reason.MALFORMED, "update is not bytes")
    if type(policy_seq) is not int or policy_seq < 0:
        return Rejection(Reason.MALFORMED, "policy seq is not a non-negative integer")
    if not isinstance(prev, bytes) or len(prev) != (0 if env.seq == 1 else DIGEST_LEN):
        return Rejection(Reason.MALFORMED, "previous-entry digest has the wrong length")
    if not isinstance(pairs, list) or len(pairs) > MAX_DEPS:
        return Rejection(Reason.MALFORMED, "dependencies are not a bounded list")
    deps = _deps(pairs)
    if deps is None:
        return Rejection(Reason.MALFORMED, "dependencies are not sorted [client, clock] pairs")
    return StateEntry(
        _peer_id(env.sender),
        env.sender,
        env.seq,
        update,
        deps,
        policy_seq,
        prev,
        env.timestamp,
        env.raw,
        env.digest,
    )


@functools.lru_cache(maxsize=4096)
def _peer_id(public_key: bytes) -> str:
    return peer_id_from_public_key(public_key)


def open_signed(data: bytes, *, swarm_id: bytes, now_ms: int) -> Envelope | Rejection:
    """Signature, swarm and size of a state entry (no clock-skew limit: see NO_SKEW_LIMIT)."""
    return open_envelope(
        data,
        swarm_id=swarm_id,
        now_ms=now_ms,
        max_size=MAX_ENTRY_BYTES,
        max_skew_ms=NO_SKEW_LIMIT,
    )


def _deps(pairs: list[Any]) -> dict[int, int] | None:
    """``{client: clock}`` from an entry's dependency pairs, or None unless they are
    ``[client, clock]`` integer pairs sorted by client, each in range."""
    deps: dict[int, int] = {}
    last = -1
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        client, clock = pair
        if (
            type(client) is not int
            or type(clock) is not int
            or not last < client < _U64
            or not 0 < clock < _U64
        ):
            return None
        last = client
        deps[client] = clock
    return deps


def open_entry(data: bytes, *, swarm_id: bytes, now_ms: int) -> StateEntry | Rejection:
    """Verify signature and decode; the whole check a stored or relayed entry goes through."""
    fast = read_entry(data, swarm_id=swarm_id, now_ms=now_ms)
    if fast is not None:
        return fast
    env = open_signed(data, swarm_id=swarm_id, now_ms=now_ms)
    return env if isinstance(env, Rejection) else parse_body(env)


def read_entry(data: bytes, *, swarm_id: bytes, now_ms: int) -> StateEntry | Rejection | None:
    """:func:`open_entry` for the common case, in one pass: a well-formed state entry of this
    swarm comes back verified and decoded (or refused for its signature), without the generic
    envelope (its plain-body walk and :class:`Envelope`). None for anything else, including
    every malformed input: :func:`open_signed` and :func:`parse_body` then decide and word it.

    Every check of both is here, in exact-type form, so what this returns is what they return.
    """
    if type(data) is not bytes or not SIG_LEN < len(data) <= MAX_ENTRY_BYTES:
        return None
    payload = data[SIG_LEN:]
    try:
        fields = cbor2.loads(payload)
    except Exception:
        return None
    if type(fields) is not list or len(fields) != 7:
        return None
    version, sid, type_, sender, seq, ts, b = fields
    if (
        type(version) is not int
        or version != VERSION
        or type(sid) is not bytes
        or sid != swarm_id
        or type(type_) is not str
        or type_ != STATE_UPDATE
        or type(sender) is not bytes
        or len(sender) != 32
        or type(seq) is not int
        or seq < 1
        or type(ts) is not int
        or abs(ts - now_ms) > NO_SKEW_LIMIT
        or type(b) is not dict
        or len(b) != 4
    ):
        return None
    # four str keys, each of u, d, p, h present: exactly the body's keys
    update, pairs, policy_seq, prev = b.get("u"), b.get("d"), b.get("p"), b.get("h")
    if (
        type(update) is not bytes
        or type(pairs) is not list
        or len(pairs) > MAX_DEPS
        or type(policy_seq) is not int
        or policy_seq < 0
        or type(prev) is not bytes
        or len(prev) != (0 if seq == 1 else DIGEST_LEN)
    ):
        return None
    deps = _deps(pairs)
    if deps is None:
        return None
    if not signature_valid(data[:SIG_LEN], type_, payload, sender):
        return bad_signature(type_)
    return StateEntry(
        _peer_id(sender),
        sender,
        seq,
        update,
        deps,
        policy_seq,
        prev,
        ts,
        data,
        hashlib.sha256(data).digest(),
    )


def entry_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def proves_equivocation(a: StateEntry, b: StateEntry) -> bool:
    """Two verified entries by one author that cannot both belong to one history."""
    if a.author != b.author or a.digest == b.digest:
        return False
    if a.seq == b.seq:
        return True
    first, second = (a, b) if a.seq < b.seq else (b, a)
    return second.seq == first.seq + 1 and second.prev != first.digest
