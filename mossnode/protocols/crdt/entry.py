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
import re
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


def read_entry(
    data: bytes, *, swarm_id: bytes, now_ms: int, signed_here: bool = False
) -> StateEntry | Rejection | None:
    """:func:`open_entry` for the common case, in one pass: a well-formed state entry of this
    swarm comes back verified and decoded (or refused for its signature), without the generic
    envelope (its plain-body walk and :class:`Envelope`). None for anything else, including
    every malformed input: :func:`open_signed` and :func:`parse_body` then decide and word it.

    Every check of both is here, in exact-type form, so what this returns is what they return.
    The payload is read by :func:`_read_canonical` when it has the canonical layout every
    node writes, else by ``cbor2``. ``signed_here``: the caller made the signature itself a
    moment ago (a replica's own write), so every check but the signature's is made.
    """
    if type(data) is not bytes or not SIG_LEN < len(data) <= MAX_ENTRY_BYTES:
        return None
    payload = data[SIG_LEN:]
    fields = _read_canonical(payload, swarm_id)
    if fields is None:
        fields = _read_cbor(payload, swarm_id)
        if fields is None:
            return None
    sender, seq, ts, update, deps, policy_seq, prev = fields
    if abs(ts - now_ms) > NO_SKEW_LIMIT or len(prev) != (0 if seq == 1 else DIGEST_LEN):
        return None
    if not signed_here and not signature_valid(data[:SIG_LEN], STATE_UPDATE, payload, sender):
        return bad_signature(STATE_UPDATE)
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


# (sender, seq, timestamp, update, deps, policy seq, previous digest) of a payload whose
# version, swarm and type are those of a state entry of this swarm, each field of its type
_Fields = tuple[bytes, int, int, bytes, dict[int, int], int, bytes]


def _read_cbor(payload: bytes, swarm_id: bytes) -> _Fields | None:
    """The payload's fields, read by ``cbor2`` and checked in exact-type form; None if it is
    not a state entry of ``swarm_id`` of the right shape."""
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
    ):
        return None
    deps = _deps(pairs)
    if deps is None:
        return None
    return sender, seq, ts, update, deps, policy_seq, prev


# The canonical payload, as ``seal`` writes it: [1, swarm id, "state.update", sender, seq,
# timestamp, {"d": [[client, clock], ...], "h": prev, "p": policy seq, "u": update}], map keys
# in canonical order. Everything up to the sender's 32 bytes is the same for every entry of a
# swarm; the rest is matched by one regular expression per swarm (in C), and anything else
# (another encoding, a negative or non-integer number, 24 or more dependencies, trailing
# bytes, ...) is left to ``cbor2``. A CBOR unsigned integer is a head byte below 24, or one
# of 24-27 followed by 1, 2, 4 or 8 big-endian bytes: read whole as one big-endian number,
# masking off the head (_MASK) leaves its value.
_RX_UINT = rb"(?:[\x00-\x17]|\x18.|\x19.{2}|\x1a.{4}|\x1b.{8})"
_RX_FIELDS = (
    rb"(.{32})(%(u)s)(%(u)s)\xa4ad([\x80-\x97])((?:\x82%(u)s%(u)s)*)"
    rb"ah(\x40|\x58\x20.{32})ap(%(u)s)au([\x40-\x57]|\x58.|\x59.{2}|\x5a.{4})"
) % {b"u": _RX_UINT}
_PAIR = re.compile(rb"\x82(%(u)s)(%(u)s)" % {b"u": _RX_UINT}, re.DOTALL)
_MASK = (0, 0xFF, 0xFF, 0xFFFF, 0, 0xFFFFFFFF, 0, 0, 0, (1 << 64) - 1)
_LAYOUTS: dict[bytes, Any] = {}  # swarm id -> the compiled layout's match


def _layout(swarm_id: bytes) -> Any:
    if len(_LAYOUTS) > 64:
        _LAYOUTS.clear()
    prefix = b"\x87\x01" + cbor2.dumps(swarm_id) + cbor2.dumps(STATE_UPDATE) + b"\x58\x20"
    match = _LAYOUTS[swarm_id] = re.compile(re.escape(prefix) + _RX_FIELDS, re.DOTALL).match
    return match


def _read_canonical(payload: bytes, swarm_id: bytes) -> _Fields | None:
    """:func:`_read_cbor`'s result for a payload in the canonical layout (None otherwise):
    what ``cbor2`` decodes those bytes to."""
    match = _LAYOUTS.get(swarm_id)
    if match is None:
        match = _layout(swarm_id)
    m = match(payload)
    if m is None:
        return None
    sender, g_seq, g_ts, count, pairs, h, g_p, head = m.groups()
    at = m.end()
    # a byte string's head: its length less 0x40 inline, else in the bytes after it
    length = head[0] - 0x40 if len(head) == 1 else int.from_bytes(head, "big") & _MASK[len(head)]
    seq = int.from_bytes(g_seq, "big") & _MASK[len(g_seq)]
    if at + length != len(payload) or seq < 1:
        return None
    deps: dict[int, int] = {}
    if pairs:
        last = -1
        found = _PAIR.findall(pairs)
        if len(found) != count[0] - 0x80:
            return None
        mask = _MASK
        for g_client, g_clock in found:
            client = int.from_bytes(g_client, "big") & mask[len(g_client)]
            clock = int.from_bytes(g_clock, "big") & mask[len(g_clock)]
            if client <= last or clock < 1:  # sorted, in range (a uint is below 2^64)
                return None
            deps[client] = clock
            last = client
    elif count != b"\x80":
        return None
    return (
        sender,
        seq,
        int.from_bytes(g_ts, "big") & _MASK[len(g_ts)],
        payload[at:],
        deps,
        int.from_bytes(g_p, "big") & _MASK[len(g_p)],
        h[2:],
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
