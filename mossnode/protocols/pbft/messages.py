"""PBFT message bodies: typed views of envelope bodies, parsed defensively.

Every PBFT message travels as a SignedEnvelope; these classes only describe the ``body``. A
sender's identity is the envelope's verified key, so no body carries a replica id. ``parse``
returns ``None`` for anything malformed: hostile input is a counted rejection, never an exception.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from ...crypto.envelope import Envelope, Rejection, canonical, open_envelope
from .merkle import batch_root

REQUEST = "pbft.request"
REPLY = "pbft.reply"
REPLIES = "pbft.replies"
PREPREPARE = "pbft.preprepare"
PREPARE = "pbft.prepare"
COMMIT = "pbft.commit"
CHECKPOINT = "pbft.checkpoint"
VIEWCHANGE = "pbft.viewchange"
NEWVIEW = "pbft.newview"
STATUS = "pbft.status"
SYNC = "pbft.sync"

DIGEST_LEN = 32
# Old certificates and embedded messages are judged by their signatures, not their age.
NO_SKEW = 2**62


def batch_payload(requests: Sequence[bytes]) -> bytes:
    """A decided payload: the canonical CBOR list of the batch's signed request envelopes."""
    return canonical(list(requests))


def requests_of(payload: bytes) -> tuple[bytes, ...] | None:
    """The requests of a decided payload, or None unless it is exactly a canonical list."""
    try:
        value = cbor2.loads(payload)
    except Exception:  # hostile bytes: cbor2 raises many types
        return None
    if not (isinstance(value, list) and all(isinstance(r, bytes) for r in value)):
        return None
    if batch_payload(value) != payload:  # trailing bytes or a non-canonical encoding
        return None
    return tuple(value)


def batch_digest(requests: Sequence[bytes]) -> bytes:
    """The digest that pre-prepares, prepares, commits and certificates name: the batch's
    Merkle root (see :mod:`.merkle`), so one request is provable without the others."""
    return batch_root(requests)


def digest(payload: bytes) -> bytes:
    """:func:`batch_digest` of a decided payload; a malformed payload gets a digest no batch
    has (domain-separated), so it never matches a certificate."""
    requests = requests_of(payload)
    if requests is None:
        return hashlib.sha256(b"mossnode/pbft/malformed\0" + payload).digest()
    return batch_digest(requests)


NULL_PAYLOAD = batch_payload(())
NULL_DIGEST = digest(NULL_PAYLOAD)


def open_embedded(raw: Any, swarm_id: bytes) -> Envelope | None:
    """Open an envelope carried inside another message: signature and swarm only.

    Embedded envelopes (requests in a batch, prepares in a prepared certificate, commits in a
    decided certificate) are facts that stay true: no clock-skew bound and no replay window.
    """
    if not isinstance(raw, bytes):
        return None
    env = open_envelope(raw, swarm_id=swarm_id, now_ms=0, max_skew_ms=NO_SKEW)
    return None if isinstance(env, Rejection) else env


class EnvelopeCache:
    """Embedded envelopes already opened, by their exact bytes (bounded, oldest out first).

    Opening is pure (signature and swarm only), so the answer for the same bytes never changes:
    a replica and the decided-log state that share one cache verify each request once.
    """

    def __init__(self, swarm_id: bytes, cap: int = 8192) -> None:
        self.swarm_id = swarm_id
        self.cap = cap
        self._known: dict[bytes, Envelope | None] = {}
        self._requests: dict[bytes, tuple[Envelope, Request] | None] = {}

    def open(self, raw: Any) -> Envelope | None:
        if not isinstance(raw, bytes):
            return None
        try:
            return self._known[raw]
        except KeyError:
            pass
        env = open_embedded(raw, self.swarm_id)
        self._remember(raw, env)
        return env

    def request(self, raw: Any) -> tuple[Envelope, Request] | None:
        """The envelope and parsed body of a signed request, or None unless ``raw`` is one.

        Memoized like :meth:`open`: a replica looks at each request of a batch when it accepts
        the pre-prepare, notes it pending, executes it, and the decided log judges it again."""
        if not isinstance(raw, bytes):
            return None
        try:
            return self._requests[raw]
        except KeyError:
            pass
        env = self.open(raw)
        req = Request.parse(env.body) if env is not None and env.type == REQUEST else None
        got = (env, req) if env is not None and req is not None else None
        _bounded_put(self._requests, raw, got, self.cap)
        return got

    def peek(self, raw: bytes) -> Envelope | None:
        """The envelope for these bytes if it was opened before (no verification here)."""
        return self._known.get(raw)

    def add(self, env: Envelope) -> None:
        """Remember an envelope opened elsewhere (e.g. received directly)."""
        if env.swarm_id == self.swarm_id:
            self._remember(env.raw, env)

    def _remember(self, raw: bytes, env: Envelope | None) -> None:
        _bounded_put(self._known, raw, env, self.cap)


def _bounded_put(known: dict[bytes, Any], key: bytes, value: Any, cap: int) -> None:
    """Remember ``key``; past ``cap`` entries the oldest goes (dicts keep insertion order)."""
    known[key] = value
    if len(known) > cap:
        del known[next(iter(known))]


def _nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _dig(x: Any) -> bool:
    return isinstance(x, bytes) and len(x) == DIGEST_LEN


def _raws(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(r, bytes) for r in x)


def _get(body: Any, *keys: str) -> list[Any] | None:
    if not isinstance(body, dict):
        return None
    try:
        return [body[k] for k in keys]
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class Request:
    """A client operation; ``timestamp`` orders one client's requests and de-duplicates them."""

    op: bytes
    timestamp: int

    def body(self) -> dict[str, Any]:
        return {"op": self.op, "t": self.timestamp}

    @classmethod
    def parse(cls, body: Any) -> Request | None:
        f = _get(body, "op", "t")
        if f is None or not isinstance(f[0], bytes) or not _nat(f[1]):
            return None
        return cls(f[0], f[1])


@dataclass(frozen=True, slots=True)
class Reply:
    view: int
    timestamp: int
    client: bytes
    result: bytes

    def body(self) -> dict[str, Any]:
        return {"v": self.view, "t": self.timestamp, "c": self.client, "r": self.result}

    @classmethod
    def parse(cls, body: Any) -> Reply | None:
        f = _get(body, "v", "t", "c", "r")
        if f is None or not (_nat(f[0]) and _nat(f[1])):
            return None
        if not (isinstance(f[2], bytes) and isinstance(f[3], bytes)):
            return None
        return cls(f[0], f[1], f[2], f[3])


def replies_body(view: int, items: Sequence[tuple[bytes, int, bytes]]) -> dict[str, Any]:
    """The body of a ``pbft.replies`` envelope: one validator's replies to every request of a
    batch it executed, ``{v, rs: {client key in hex: [t, r]}}`` (a client finds its own by
    key; envelope bodies have text keys)."""
    return {"v": view, "rs": {c.hex(): [t, r] for c, t, r in items}}


def reply_in(body: Any, client: bytes, key: str | None = None) -> Reply | None:
    """``client``'s reply in a ``pbft.replies`` body, or None (absent or malformed); ``key``
    is ``client.hex()`` if the caller has it. Only that item is looked at: a gateway hands one
    envelope to each of its many clients."""
    f = _get(body, "v", "rs")
    if f is None or not _nat(f[0]) or not isinstance(f[1], dict):
        return None
    item = f[1].get(key if key is not None else client.hex())
    if not (isinstance(item, list) and len(item) == 2 and _nat(item[0])):
        return None
    if not isinstance(item[1], bytes):
        return None
    return Reply(f[0], item[0], client, item[1])


@dataclass(frozen=True, slots=True)
class PrePrepare:
    """The primary's proposal of a batch at (view, seq); the batch rides along with its digest."""

    view: int
    seq: int
    digest: bytes
    batch: tuple[bytes, ...]

    @classmethod
    def make(cls, view: int, seq: int, batch: Sequence[bytes]) -> PrePrepare:
        return cls(view, seq, batch_digest(batch), tuple(batch))

    @property
    def payload(self) -> bytes:
        return batch_payload(self.batch)

    def body(self) -> dict[str, Any]:
        return {"v": self.view, "n": self.seq, "d": self.digest, "b": list(self.batch)}

    @classmethod
    def parse(cls, body: Any) -> PrePrepare | None:
        f = _get(body, "v", "n", "d", "b")
        if f is None or not (_nat(f[0]) and _nat(f[1]) and f[1] > 0 and _dig(f[2]) and _raws(f[3])):
            return None
        if batch_digest(f[3]) != f[2]:
            return None
        return cls(f[0], f[1], f[2], tuple(f[3]))


@dataclass(frozen=True, slots=True)
class Vote:
    """A prepare or a commit: the sender's agreement on (view, seq, digest)."""

    view: int
    seq: int
    digest: bytes

    def body(self) -> dict[str, Any]:
        return {"v": self.view, "n": self.seq, "d": self.digest}

    @classmethod
    def parse(cls, body: Any) -> Vote | None:
        f = _get(body, "v", "n", "d")
        if f is None or not (_nat(f[0]) and _nat(f[1]) and f[1] > 0 and _dig(f[2])):
            return None
        return cls(f[0], f[1], f[2])


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    digest: bytes

    def body(self) -> dict[str, Any]:
        return {"n": self.seq, "d": self.digest}

    @classmethod
    def parse(cls, body: Any) -> Checkpoint | None:
        f = _get(body, "n", "d")
        if f is None or not (_nat(f[0]) and f[0] > 0 and _dig(f[1])):
            return None
        return cls(f[0], f[1])


@dataclass(frozen=True, slots=True)
class PreparedProof:
    """A pre-prepare plus the prepares that prepared it, as the signed wire bytes."""

    preprepare: bytes
    prepares: tuple[bytes, ...]

    def body(self) -> list[Any]:
        return [self.preprepare, list(self.prepares)]

    @classmethod
    def parse(cls, body: Any) -> PreparedProof | None:
        if not (isinstance(body, list) and len(body) == 2):
            return None
        if not (isinstance(body[0], bytes) and _raws(body[1])):
            return None
        return cls(body[0], tuple(body[1]))


@dataclass(frozen=True, slots=True)
class ViewChange:
    """A replica's move to ``view``: its stable checkpoint (with proof) and prepared slots."""

    view: int
    stable_seq: int
    checkpoint_proof: tuple[bytes, ...]
    prepared: tuple[PreparedProof, ...]

    def body(self) -> dict[str, Any]:
        return {
            "v": self.view,
            "h": self.stable_seq,
            "C": list(self.checkpoint_proof),
            "P": [p.body() for p in self.prepared],
        }

    @classmethod
    def parse(cls, body: Any) -> ViewChange | None:
        f = _get(body, "v", "h", "C", "P")
        if f is None or not (_nat(f[0]) and _nat(f[1]) and _raws(f[2]) and isinstance(f[3], list)):
            return None
        proofs = [PreparedProof.parse(p) for p in f[3]]
        if any(p is None for p in proofs):
            return None
        return cls(f[0], f[1], tuple(f[2]), tuple(p for p in proofs if p is not None))


@dataclass(frozen=True, slots=True)
class NewView:
    """The new primary's proof (2f+1 view-changes) and its re-proposals for the gap."""

    view: int
    view_changes: tuple[bytes, ...]
    preprepares: tuple[bytes, ...]

    def body(self) -> dict[str, Any]:
        return {"v": self.view, "V": list(self.view_changes), "O": list(self.preprepares)}

    @classmethod
    def parse(cls, body: Any) -> NewView | None:
        f = _get(body, "v", "V", "O")
        if f is None or not (_nat(f[0]) and _raws(f[1]) and _raws(f[2])):
            return None
        return cls(f[0], tuple(f[1]), tuple(f[2]))


@dataclass(frozen=True, slots=True)
class Status:
    """Where a replica stands; peers answer with what it is missing (anti-entropy)."""

    view: int
    active: bool
    last_executed: int
    stable_seq: int

    def body(self) -> dict[str, Any]:
        return {"v": self.view, "a": self.active, "x": self.last_executed, "h": self.stable_seq}

    @classmethod
    def parse(cls, body: Any) -> Status | None:
        f = _get(body, "v", "a", "x", "h")
        if f is None or not (_nat(f[0]) and isinstance(f[1], bool) and _nat(f[2]) and _nat(f[3])):
            return None
        return cls(f[0], f[1], f[2], f[3])


@dataclass(frozen=True, slots=True)
class Entry:
    """A decided entry as shipped to a lagging replica: its certificate makes it self-proving."""

    seq: int
    view: int
    payload: bytes
    certificate: tuple[bytes, ...]

    def body(self) -> list[Any]:
        return [self.seq, self.view, self.payload, list(self.certificate)]

    @classmethod
    def parse(cls, body: Any) -> Entry | None:
        if not (isinstance(body, list) and len(body) == 4):
            return None
        n, v, p, c = body
        if not (_nat(n) and n > 0 and _nat(v) and isinstance(p, bytes) and _raws(c)):
            return None
        return cls(n, v, p, tuple(c))


@dataclass(frozen=True, slots=True)
class Sync:
    """Answer to a status: decided entries, a stable-checkpoint proof, the current new-view."""

    entries: tuple[Entry, ...]
    checkpoint_proof: tuple[bytes, ...]
    newview: bytes | None

    def body(self) -> dict[str, Any]:
        return {
            "e": [e.body() for e in self.entries],
            "C": list(self.checkpoint_proof),
            "nv": self.newview,
        }

    @classmethod
    def parse(cls, body: Any) -> Sync | None:
        f = _get(body, "e", "C", "nv")
        if f is None or not (isinstance(f[0], list) and _raws(f[1])):
            return None
        if f[2] is not None and not isinstance(f[2], bytes):
            return None
        entries = [Entry.parse(e) for e in f[0]]
        if any(e is None for e in entries):
            return None
        return cls(tuple(e for e in entries if e is not None), tuple(f[1]), f[2])
