"""SignedEnvelope: the one wire form of every message a node originates.

Wire bytes are ``signature (64) || payload`` where ``payload`` is the canonical CBOR array
``[version, swarm_id, type, sender, seq, timestamp_ms, body]``. The signature covers
``b"mossnode/v1/" + type + b"\\0" + payload`` so a signature made for one message type can never be
replayed as another. ``sender`` is the raw Ed25519 public key: identity is the key, never a name
the sender chooses.

:func:`open_envelope` is pure: the clock reading and the replay window come in as arguments, and a
rejection comes back as a value with a typed reason, never as an exception.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.bindings
import nacl.exceptions

from ..record import Record
from .identity import Identity
from .peerid import peer_id_from_public_key

try:  # PyNaCl's cffi module: one verify without its binding's allocations (signature_valid)
    from nacl._sodium import ffi as _ffi  # type: ignore[import-not-found,unused-ignore]
    from nacl._sodium import lib as _lib  # type: ignore[import-not-found,unused-ignore]

    _sign_open: Any = _lib.crypto_sign_open
    _NULL: Any = _ffi.NULL
except (ImportError, AttributeError):  # pragma: no cover (PyNaCl internals moved)
    _sign_open = None
    _NULL = None

VERSION = 1
_KEY_LEN = 32  # an Ed25519 public key
DOMAIN = b"mossnode/v1/"
SIG_LEN = 64
DEFAULT_MAX_SIZE = 1 << 20
DEFAULT_MAX_SKEW_MS = 30_000
MAX_DEPTH = 32
MAX_TYPE_LEN = 64


class Reason(enum.Enum):
    """Why an envelope was refused; the value is the metric label."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    WRONG_SWARM = "wrong_swarm"
    BAD_SIGNATURE = "bad_signature"
    CLOCK_SKEW = "clock_skew"
    REPLAY = "replay"
    NOT_MEMBER = "not_member"
    FORBIDDEN = "forbidden"
    EQUIVOCATION = "equivocation"


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class Envelope(Record):
    """An opened envelope (a value: see :class:`mossnode.record.Record`)."""

    __slots__ = ("body", "raw", "sender", "seq", "swarm_id", "timestamp", "type", "version")

    def __init__(
        self,
        version: int,
        swarm_id: bytes,
        type: str,
        sender: bytes,
        seq: int,
        timestamp: int,
        body: Any,
        raw: bytes,
    ) -> None:
        self.version = version
        self.swarm_id = swarm_id
        self.type = type
        self.sender = sender
        self.seq = seq
        self.timestamp = timestamp
        self.body = body
        self.raw = raw

    @property
    def sender_id(self) -> str:
        return peer_id_from_public_key(self.sender)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the wire bytes: a stable id for dedup and certificates."""
        return hashlib.sha256(self.raw).digest()


def canonical(value: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 core deterministic encoding): same content, same bytes."""
    return cbor2.dumps(value, canonical=True)


def _signed_bytes(type_: str, payload: bytes) -> bytes:
    return DOMAIN + type_.encode() + b"\0" + payload


def seal(
    identity: Identity,
    *,
    swarm_id: bytes,
    type: str,
    seq: int,
    timestamp: int,
    body: Any,
) -> bytes:
    """Encode and sign one envelope; returns its wire bytes."""
    if not type or len(type) > MAX_TYPE_LEN:
        raise ValueError("envelope type must be 1-64 characters")
    if seq < 1:
        raise ValueError("envelope seq starts at 1")
    payload = canonical([VERSION, swarm_id, type, identity.public_key, seq, timestamp, body])
    return identity.sign(_signed_bytes(type, payload)) + payload


class ReplayWindow:
    """Per-sender sliding window of accepted sequence numbers (IPsec style).

    A seq is fresh if it is above the sender's highest, or within ``width`` below it and not yet
    seen. Senders beyond ``max_senders`` are evicted least-recently-used, which is safe only
    together with the clock-skew bound (an evicted sender's old envelopes are stale by then).
    """

    def __init__(self, width: int = 1024, max_senders: int = 100_000) -> None:
        self.width = width
        self.max_senders = max_senders
        self._state: OrderedDict[bytes, tuple[int, int]] = OrderedDict()

    def is_fresh(self, sender: bytes, seq: int) -> bool:
        st = self._state.get(sender)
        if st is None:
            return True
        top, mask = st
        if seq > top:
            return True
        off = top - seq
        return off < self.width and not (mask >> off) & 1

    def accept(self, sender: bytes, seq: int) -> None:
        top, mask = self._state.pop(sender, (0, 0))
        if seq > top:
            shift = seq - top
            mask = 1 if shift >= self.width else ((mask << shift) | 1) & ((1 << self.width) - 1)
            top = seq
        else:
            mask |= 1 << (top - seq)
        self._state[sender] = (top, mask)
        if len(self._state) > self.max_senders:
            self._state.popitem(last=False)

    def highest(self, sender: bytes) -> int:
        return self._state.get(sender, (0, 0))[0]


_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _plain(value: Any, depth: int = 0) -> bool:
    """Bodies hold only JSON-like values plus bytes: no CBOR tags, no exotic objects.

    Exact types first (what cbor2 builds for plain CBOR), ``isinstance`` for the rest, so the
    answer is that of the plain isinstance walk, with less work on the common case."""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if kind in _SCALARS:
        return True
    scalars = _SCALARS if depth < MAX_DEPTH else ()  # at the limit, children fail the check
    if kind is dict:
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                return False
            if type(v) not in scalars and not _plain(v, depth + 1):
                return False
        return True
    if kind is list:
        for v in value:  # noqa: SIM110 (a loop: no generator per list)
            if type(v) not in scalars and not _plain(v, depth + 1):
                return False
        return True
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def signature_valid(sig: bytes, type_: str, payload: bytes, sender: bytes) -> bool:
    """Does ``sig`` sign envelope ``payload`` of type ``type_`` under key ``sender``?"""
    if _sign_open is not None and len(sig) == SIG_LEN and len(sender) == _KEY_LEN:
        # libsodium's crypto_sign_open itself, as PyNaCl's binding calls it, without the
        # message buffer it allocates and copies out (nothing here reads the message)
        signed = b"".join((sig, DOMAIN, type_.encode(), b"\0", payload))  # one copy
        return bool(_sign_open(_NULL, _NULL, signed, len(signed), sender) == 0)
    try:
        nacl.bindings.crypto_sign_open(sig + _signed_bytes(type_, payload), sender)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def bad_signature(type_: str) -> Rejection:
    return Rejection(Reason.BAD_SIGNATURE, f"signature does not verify for {type_}")


Authorizer = Callable[[bytes, str], "Rejection | None"]


def open_envelope(
    data: bytes,
    *,
    swarm_id: bytes,
    now_ms: int,
    replay: ReplayWindow | None = None,
    authorize: Authorizer | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> Envelope | Rejection:
    """Check and decode wire bytes. Order: cheap structural checks, signature, then policy.

    The replay window is updated only for an envelope that passed every check, so forged or
    refused traffic cannot burn sequence numbers of an honest sender.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return Rejection(Reason.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > max_size:
        return Rejection(Reason.TOO_LARGE, f"{len(data)} bytes > limit {max_size}")
    if len(data) <= SIG_LEN:
        return Rejection(Reason.MALFORMED, "shorter than a signature")
    sig, payload = data[:SIG_LEN], data[SIG_LEN:]
    try:
        fields = cbor2.loads(payload)
    except RecursionError:
        return Rejection(Reason.MALFORMED, "nesting too deep")
    except Exception as exc:  # cbor2 raises many types on hostile input
        return Rejection(Reason.MALFORMED, f"not CBOR: {type(exc).__name__}")
    if not isinstance(fields, list) or len(fields) != 7:
        return Rejection(Reason.MALFORMED, "payload is not a 7-field array")
    version, sid, type_, sender, seq, ts, body = fields
    if not isinstance(version, int) or isinstance(version, bool):
        return Rejection(Reason.MALFORMED, "version is not an integer")
    if version != VERSION:
        return Rejection(Reason.BAD_VERSION, f"version {version}, expected {VERSION}")
    if not (isinstance(sid, bytes) and isinstance(type_, str) and isinstance(sender, bytes)):
        return Rejection(Reason.MALFORMED, "bad swarm_id, type or sender field")
    if not 0 < len(type_) <= MAX_TYPE_LEN or len(sender) != 32:
        return Rejection(Reason.MALFORMED, "bad type length or sender key length")
    if type(seq) is not int or type(ts) is not int or seq < 1:
        return Rejection(Reason.MALFORMED, "seq and timestamp must be integers, seq >= 1")
    if not _plain(body):
        return Rejection(Reason.MALFORMED, "body holds non-plain values or nests too deep")
    if sid != swarm_id:
        return Rejection(Reason.WRONG_SWARM, f"swarm {sid.hex()[:16]}")
    if not signature_valid(sig, type_, payload, sender):
        return bad_signature(type_)
    if abs(ts - now_ms) > max_skew_ms:
        return Rejection(Reason.CLOCK_SKEW, f"timestamp off by {ts - now_ms} ms")
    if authorize is not None:
        refused = authorize(sender, type_)
        if refused is not None:
            return refused
    if replay is not None:
        if not replay.is_fresh(sender, seq):
            return Rejection(Reason.REPLAY, f"seq {seq} already seen or too old")
        replay.accept(sender, seq)
    return Envelope(version, sid, type_, sender, seq, ts, body, data)
