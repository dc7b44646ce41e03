"""One node's replica of the shared task document: signed per-author logs over a pycrdt Doc.

Sans-IO: bytes and ``now_ms`` come in, an :class:`Outcome` comes out. The caller persists
``Outcome.applied`` (group commit) *before* relaying it or answering for it, persists local
entries before sending them, and feeds the policy from the decided log.

Apply rule: an author's entry is applied only when (a) its seq is the author's next one and (b)
the document holds every item it refers to (the part of its declared dependency state vector it
uses); until then it waits in a bounded pending set. It is checked structurally against the
owner rules, then applied once, to the document itself, under deep observers whose changes are
checked again (the second line); should that second check (or Yrs) refuse it, the document is
put back from a saved state plus the updates applied since (:meth:`Replica._restore_doc`), so a
refused entry never leaves a trace. A refused entry blocks its author: everything it wrote
later depends on it and waits forever, the intended fate of a Byzantine author, reported in
:attr:`Replica.blocked`. An author caught signing two histories is excluded from the fork on,
identically everywhere (see docs/state-schema.md).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2
from pycrdt import Doc, Map, Subscription

from mossnode.crypto.envelope import (
    Reason,
    Rejection,
    seal,
)
from mossnode.crypto.identity import Identity
from mossnode.crypto.peerid import public_key_from_peer_id
from mossnode.record import Record

from .authorize import (
    Accepted,
    Admitted,
    admit,
    check_events,
    check_update,
    event_changes,
    references,
)
from .clients import client_id_for
from .document import ContentDigest, apply_update, fast_content, new_doc, task_entries, task_of
from .entry import (
    MAX_SPAN,
    STATE_UPDATE,
    StateEntry,
    body,
    open_signed,
    parse_body,
    read_entry,
)
from .lib0 import DecodeError
from .locations import LocationIndex, WrittenSet
from .outcome import (
    Blocked,
    Entry,
    Equivocation,
    Limits,
    Outcome,
    Refusal,
    StateError,
    WriteRefused,
)
from .rules import Op, Policy
from .schema import ROOTS, TASKS, Path
from .writes import Writer
from .yrs_update import RawUpdate, decode_raw, gc_update

T = TypeVar("T")
SNAPSHOT_VERSION = 2  # 2: compact location index and write-once set; 1 still loads
MAX_EXCLUDED_SPAN = 1 << 32  # how far past a blocked author's last entry others may refer
LAG_BYTES = 4 << 20  # updates remembered past the saved document state, at least (_applied)


@dataclass(frozen=True, slots=True)
class _Poison:
    """A verified envelope whose body is unusable: it blocks its author once it is next."""

    author: str
    seq: int
    digest: bytes
    raw: bytes
    rejection: Rejection


class _Waiting(Record):
    """A verified entry, its decoded update, and what the document must hold to apply it."""

    __slots__ = ("entry", "needs", "update")

    def __init__(self, entry: StateEntry, update: RawUpdate, needs: dict[int, int]) -> None:
        self.entry = entry
        self.update = update
        self.needs = needs

    @property
    def author(self) -> str:
        return self.entry.author

    @property
    def seq(self) -> int:
        return self.entry.seq

    @property
    def digest(self) -> bytes:
        return self.entry.digest

    @property
    def raw(self) -> bytes:
        return self.entry.raw


_Pending = _Waiting | _Poison


@dataclass(slots=True)
class _Author:
    public_key: bytes
    client: int
    seq: int = 0  # highest contiguous seq applied
    policy_seq: int = 0
    head: bytes = b""  # digest of entry `seq`
    at: int = 0  # the author's timestamp on its latest applied entry
    log: list[bytes] = field(default_factory=list)  # raw entries 1..seq
    digests: list[bytes] = field(default_factory=list)


class Replica:
    """The replicated document as seen by node ``identity`` in swarm ``swarm_id``."""

    def __init__(
        self,
        identity: Identity,
        swarm_id: bytes,
        policy: Policy,
        *,
        limits: Limits | None = None,
    ) -> None:
        self.identity = identity
        self.swarm_id = swarm_id
        self.policy = policy
        self.limits = limits or Limits()
        self.me = identity.peer_id
        self.client = client_id_for(identity.public_key)
        self._events: list[tuple[Path, Op]] = []
        self._observer_failed: list[Exception] = []
        self._content_digest = ContentDigest()
        self._subs: list[Subscription] = []
        self.doc: Doc[Map[Any]] = new_doc(self.client)  # read it; never write it directly
        self._tasks_root: Map[Any] = self.doc[TASKS]
        self._watch(self.doc)
        # What the document was: a saved state plus the updates applied since, to put it back
        # after a change it should not have taken (see _restore_doc).
        self._checkpoint: bytes | None = None
        self._lag: list[bytes] = []
        self._lag_bytes = 0
        self._index = LocationIndex()
        self._written = WrittenSet()
        self._sv: dict[int, int] = {}
        self._authors: dict[str, _Author] = {}
        self._excluded_from: dict[int, int] = {}  # client -> clock where its GC stand-in starts
        self._pending: dict[str, dict[int, _Pending]] = {}
        self._pending_count = 0
        self._order: list[tuple[str, int]] = []  # apply order, a causal order for anti-entropy
        self._pos: dict[str, list[int]] = {}
        self.blocked: dict[str, Blocked] = {}
        self._culprits: dict[str, bytes] = {}  # the refused entry that blocked each author
        self._rollback = False
        self.own_signed = 0  # highest seq this node ever signed: never sign that seq again
        self.evidence: dict[str, Equivocation] = {}
        self.rejections: Counter[Reason] = Counter()
        self.dropped = 0  # pending entries dropped for space; anti-entropy brings them back
        # policy.may answers per (author, policy seq), shared by the updates of one call
        # (receive_batch, drain, write): the policy does not change during one
        self._grants: dict[tuple[str, int], dict[str, bool]] = {}
        self._latest = 0  # policy.latest_seq(), read once per call that applies (_ready)

    # -- reading ---------------------------------------------------------------------------

    def digest(self) -> bytes:
        """Hash of the canonical content: equal on replicas with equal content. Kept per
        top-level key (``document.ContentDigest``): only what changed is encoded again."""
        return self._content_digest.digest(self.doc)

    def content(self) -> dict[str, Any]:
        return fast_content(self.doc)

    def task(self, tid: str) -> dict[str, Any] | None:
        return task_of(self.doc, self._tasks_root, tid)

    def task_entries(self, tid: str, keys: list[str]) -> dict[str, Any] | None:
        """Some keys of a task's map, as :func:`.document.task_entries` reads them."""
        return task_entries(self.doc, self._tasks_root, tid, keys)

    def vector(self) -> dict[str, int]:
        """``{author peer id: highest contiguous seq applied}``."""
        return {a: st.seq for a, st in self._authors.items() if st.seq}

    def horizon(self, author: str) -> int:
        """The author's own clock on its latest entry applied here: every entry it wrote
        before that moment is applied too (entries apply in seq order)."""
        st = self._authors.get(author)
        return st.at if st is not None else 0

    def heads(self) -> dict[str, bytes]:
        """Digest of each author's latest applied entry, to spot forks in anti-entropy."""
        return {a: st.head for a, st in self._authors.items() if st.seq}

    def entries(self, start: int = 0) -> Iterator[Entry]:
        """Every applied entry in apply order (a causal order), from position ``start``."""
        for author, seq in self._order[start:]:
            yield Entry(author, seq, self._authors[author].log[seq - 1])

    def entry_count(self) -> int:
        return len(self._order)

    def pending_count(self) -> int:
        return self._pending_count

    def blocked_authors(self) -> dict[str, Blocked]:
        return dict(self.blocked)

    def blocked_seqs(self) -> dict[str, int]:
        """``{author: seq it is blocked at}``, for :meth:`missing_for` on a peer."""
        return {a: b.seq for a, b in self.blocked.items()}

    # -- local writes ----------------------------------------------------------------------

    def write(self, fn: Callable[[Writer], T], now_ms: int) -> tuple[T, Entry | None]:
        """Run ``fn`` as one local transaction; returns its result and the new signed entry.

        The entry (None if nothing changed) is already applied; persist it, then send it.
        Raises :class:`WriteRefused` if the owner rules or the policy refuse it, leaving the
        document unchanged.
        """
        if self.me in self.blocked:
            raise WriteRefused(Rejection(Reason.FORBIDDEN, "this node's own chain is blocked"))
        st = self._author(self.me, self.identity.public_key)
        if self.own_signed > st.seq:
            detail = f"own entry {st.seq + 1} waits on entries that were excluded; chain stalled"
            raise WriteRefused(Rejection(Reason.FORBIDDEN, detail))
        # The transaction runs on the document itself; if the result is refused (or fn
        # raises), the document is put back as it was (_restore_doc).
        self._grants.clear()
        captured: list[bytes] = []
        self._events.clear()
        doc = self.doc
        sub = doc.observe(lambda ev: captured.append(ev.update))
        try:
            with doc.transaction():
                result = fn(Writer(doc, self.me, now_ms, roots={TASKS: self._tasks_root}))
            if self._observer_failed:
                raise self._observer_failed.pop()
        except BaseException:
            self._observer_failed.clear()
            doc.unobserve(sub)
            self._restore_doc()
            raise
        doc.unobserve(sub)
        updates = [u for u in captured if u != b"\x00\x00"]
        if not updates:
            return result, None
        if len(updates) != 1:
            self._restore_doc()
            raise WriteRefused(Rejection(Reason.MALFORMED, "write spanned several transactions"))
        raw = seal(
            self.identity,
            swarm_id=self.swarm_id,
            type=STATE_UPDATE,
            seq=st.seq + 1,
            timestamp=now_ms,
            body=body(updates[0], self._sv, self.policy.latest_seq(), st.head),
        )
        # The signature was made here a moment ago: verifying it again was a third of a
        # write's CPU. Every other check of opening is made.
        fast = read_entry(raw, swarm_id=self.swarm_id, now_ms=now_ms, signed_here=True)
        parsed = fast if isinstance(fast, StateEntry) else self._open(raw, now_ms)
        opened = self._prepare(parsed) if isinstance(parsed, StateEntry) else parsed
        if not isinstance(opened, _Waiting):
            self._restore_doc()
            raise WriteRefused(opened if isinstance(opened, Rejection) else opened.rejection)
        out = Outcome()
        refused = self._admit(opened, out, local_events=list(self._events))
        if refused is not None:
            self._restore_doc()
            raise WriteRefused(refused)
        self.own_signed = opened.seq
        return result, out.applied[0]

    def create_task(self, suffix: str, now_ms: int, **fields: Any) -> tuple[str, Entry | None]:
        return self.write(lambda w: w.create_task(suffix, **fields), now_ms)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, now_ms: int) -> Outcome:
        """Take one signed entry from anywhere (gossip, anti-entropy, the store)."""
        return self.receive_batch((data,), now_ms)

    def receive_batch(self, batch: Iterable[bytes], now_ms: int) -> Outcome:
        self._grants.clear()
        self._latest = self.policy.latest_seq()
        out = Outcome()
        pending = self._pending
        # Every signature first, then the rest entry by entry: opening an entry depends on its
        # bytes alone, and the verifications in a row keep the curve code and tables in the
        # caches (interleaved with the rest of the path, each one cost about 1.3 raw ones).
        sid = self.swarm_id
        opened_all: list[StateEntry | _Poison | Rejection] = []
        for data in batch:  # _open, with its common case inline
            fast = read_entry(data, swarm_id=sid, now_ms=now_ms)
            opened_all.append(fast if fast is not None else self._open_slow(data, now_ms))
        for opened in opened_all:
            author = self._accept(opened, out)
            if author is None and not pending:
                continue  # refused, or applied at once (_accept): nothing else waits
            if author is not None and len(pending) == 1 and author in pending:
                # only this author waits: _drain would apply its chain and find nothing else
                while self._apply_next(author, out):
                    pass
                if not pending[author]:
                    del pending[author]
            else:
                self._drain(out)
        return self._finish(out, now_ms)

    def drain(self, now_ms: int = 0) -> Outcome:
        """Retry waiting entries; call when the decided log advanced (new policy seqs)."""
        self._grants.clear()
        self._latest = self.policy.latest_seq()
        out = Outcome()
        self._drain(out)
        return self._finish(out, now_ms)

    def _finish(self, out: Outcome, now_ms: int) -> Outcome:
        """Roll back past a fork found while processing: see :meth:`rebuild`."""
        if not self._rollback:
            return out
        self._rollback = False
        undone = self.rebuild(now_ms)
        fresh = {(e.author, e.seq) for e in out.applied}
        gone = {(e.author, e.seq) for e in undone.retracted}
        out.applied = [e for e in out.applied if (e.author, e.seq) not in gone]
        undone.retracted = [e for e in undone.retracted if (e.author, e.seq) not in fresh]
        out.merge(undone)
        return out

    def _open(self, data: bytes, now_ms: int) -> StateEntry | _Poison | Rejection:
        """Signature and body. A signed entry that fails here, or in :meth:`_prepare`, is its
        author's fault (poison), not a forgery: it blocks the author when its turn comes."""
        fast = read_entry(data, swarm_id=self.swarm_id, now_ms=now_ms)
        return fast if fast is not None else self._open_slow(data, now_ms)

    def _open_slow(self, data: bytes, now_ms: int) -> StateEntry | _Poison | Rejection:
        """:meth:`_open` for what :func:`read_entry` leaves to the reference code."""
        env = open_signed(data, swarm_id=self.swarm_id, now_ms=now_ms)
        if isinstance(env, Rejection):
            return env
        parsed = parse_body(env)
        if isinstance(parsed, Rejection):
            return _Poison(env.sender_id, env.seq, env.digest, env.raw, parsed)
        return parsed

    def _prepare(self, parsed: StateEntry) -> _Waiting | _Poison:
        """Decode the update and find what it refers to: once, when the entry is kept."""
        client = _client_of_key(parsed.public_key)
        try:
            update = decode_raw(parsed.update, client=client)
        except DecodeError as exc:
            rejection = Rejection(Reason.MALFORMED, f"not a Yrs update: {exc}")
            return _Poison(parsed.author, parsed.seq, parsed.digest, parsed.raw, rejection)
        for c, _, _ in update.runs:
            if c != client:
                rejection = Rejection(Reason.FORBIDDEN, f"carries items of client {c}")
                return _Poison(parsed.author, parsed.seq, parsed.digest, parsed.raw, rejection)
        needs = references(update, client)
        deps = parsed.deps
        for c, k in needs.items():
            if k > deps.get(c, 0):
                rejection = Rejection(Reason.MALFORMED, "refers to items outside its dependencies")
                return _Poison(parsed.author, parsed.seq, parsed.digest, parsed.raw, rejection)
        return _Waiting(parsed, update, needs)

    def _refuse(
        self, out: Outcome, author: str | None, seq: int | None, reason: Reason, detail: str
    ) -> Rejection:
        rejection = Rejection(reason, detail)
        self.rejections[reason] += 1
        out.refused.append(Refusal(author, seq, rejection))
        return rejection

    def _accept(self, opened: StateEntry | _Poison | Rejection, out: Outcome) -> str | None:
        """Take an entry as :meth:`_open` verified it, and hold it; returns its author if it
        is now held (waiting)."""
        if isinstance(opened, Rejection):
            self._refuse(out, None, None, opened.reason, opened.detail)
            return None
        author, seq = opened.author, opened.seq
        if author == self.me:
            self.own_signed = max(self.own_signed, seq)
        st = self._authors.get(author)
        if st is not None and seq <= st.seq:
            if st.digests[seq - 1] == opened.digest:
                self._refuse(out, author, seq, Reason.REPLAY, "already applied")
            else:
                self._equivocation(author, seq, st.log[seq - 1], opened.raw, out)
            return None
        blocked = self.blocked.get(author)
        if blocked is not None and seq >= blocked.seq:
            culprit = self._culprits.get(author)
            if seq == blocked.seq and culprit is not None and culprit != opened.raw:
                self._equivocation(author, seq, culprit, opened.raw, out)
            elif culprit == opened.raw:
                self._refuse(out, author, seq, Reason.REPLAY, "already refused")
            else:
                self._refuse(out, author, seq, Reason.FORBIDDEN, "author is blocked")
            return None
        pending = self._pending
        if not pending and isinstance(opened, StateEntry):
            # Nothing waits (the steady state): if this entry is the author's next and ready,
            # apply it at once, as holding it and applying the author's chain would.
            item = self._prepare(opened)
            lim = self.limits
            if (
                seq == (st.seq if st is not None else 0) + 1
                and type(item) is _Waiting
                and lim.max_pending_per_author > 0
                and self._pending_count < lim.max_pending_total
                and self._ready(item)
            ):
                self._apply(author, seq, item, out)
                return None
            pend = pending[author] = {}
            self._hold(pend, item)
            return author
        pend = pending.setdefault(author, {})
        held = pend.get(seq)
        if held is not None:
            if held.digest == opened.digest:
                self._refuse(out, author, seq, Reason.REPLAY, "already pending")
            else:
                self._equivocation(author, seq, held.raw, opened.raw, out)
            return None
        self._hold(pend, self._prepare(opened) if isinstance(opened, StateEntry) else opened)
        return author

    def _hold(self, pend: dict[int, _Pending], item: _Pending) -> None:
        lim = self.limits
        if len(pend) >= lim.max_pending_per_author or self._pending_count >= lim.max_pending_total:
            far = max(pend) if pend else None
            self.dropped += 1
            if far is None or item.seq > far:
                return
            del pend[far]
            self._pending_count -= 1
        pend[item.seq] = item
        self._pending_count += 1

    def _drain(self, out: Outcome) -> None:
        progress = True
        while progress:
            progress = False
            for author in list(self._pending):
                while self._apply_next(author, out):
                    progress = True
                if not self._pending.get(author):
                    self._pending.pop(author, None)

    def _apply_next(self, author: str, out: Outcome) -> bool:
        pend = self._pending.get(author)
        if not pend:
            return False
        st = self._authors.get(author)
        nxt = (st.seq if st else 0) + 1
        blocked = self.blocked.get(author)
        if blocked is not None and nxt >= blocked.seq:
            return False
        item = pend.get(nxt)
        if item is None:
            return False
        if isinstance(item, _Waiting) and not self._ready(item):
            return False
        del pend[nxt]
        self._pending_count -= 1
        if isinstance(item, _Poison):
            self._block(author, nxt, item.rejection, out, item.raw)
            return False
        return self._apply(author, nxt, item, out)

    def _ready(self, item: _Waiting) -> bool:
        """Is the policy ``item`` cites decided, and does the document hold what it refers to?"""
        if item.entry.policy_seq > self._latest:
            return False
        sv = self._sv
        for c, k in item.needs.items():  # usually one: the author's own items
            if sv.get(c, 0) < k and not self._holds(c, k):
                break
        else:
            return True
        return False

    def _apply(self, author: str, seq: int, item: _Waiting, out: Outcome) -> bool:
        """Admit the author's next entry ``item`` (ready); blocks the author if refused."""
        refused = self._admit(item, out)
        if refused is not None:
            if author not in self.evidence:
                self._block(author, seq, refused, out, item.raw)
            return False
        return True

    def _holds(self, client: int, clock: int) -> bool:
        """Does the document hold ``client``'s items below ``clock``, or can it stand in for
        them? A blocked author's clocks past its last applied entry will never be filled: they
        are filled with a collected (GC) range instead, so entries of others that were built
        on the excluded part still apply, their writes into it vanishing as Yrs drops items
        anchored in collected ranges. Every replica excludes the same entries, so every
        replica reaches the same content and the same verdicts."""
        have = self._sv.get(client, 0)
        if have >= clock:
            return True
        blocked = next((b for a, b in self.blocked.items() if _client_of(a) == client), None)
        if blocked is None:
            return False
        st = self._authors.get(blocked.author)
        if (st.seq if st else 0) + 1 != blocked.seq:
            return False  # entries before the block are still to come
        base = self._excluded_from.setdefault(client, have)
        if clock - base > MAX_EXCLUDED_SPAN:
            return False
        gc = gc_update(client, have, clock)
        self.doc.apply_update(gc)
        self._applied(gc)
        self._index.add_gone(client, have, clock)
        self._sv[client] = clock
        return True

    def _block(
        self, author: str, seq: int, rejection: Rejection, out: Outcome, culprit: bytes | None
    ) -> None:
        """Stop ``author`` at ``seq`` for good. The refused entry is kept: a peer that applied a
        different entry at that seq is shown it, which proves a fork (see missing_for)."""
        self.rejections[rejection.reason] += 1
        self.blocked[author] = Blocked(author, seq, rejection)
        if culprit is not None:
            self._culprits[author] = culprit
        else:
            self._culprits.pop(author, None)
        out.refused.append(Refusal(author, seq, rejection))
        pend = self._pending.get(author, {})
        for s in [s for s in pend if s >= seq]:
            del pend[s]
            self._pending_count -= 1

    def _equivocation(
        self, author: str, seq: int, first: bytes, second: bytes, out: Outcome
    ) -> None:
        """Two signed entries of ``author`` that fork at ``seq``: keep the proof, exclude the
        author from ``seq`` on, and roll back if this replica already applied past it."""
        proof = Equivocation(author, seq, first, second)
        known = self.evidence.get(author)
        if known is None or seq < known.seq:
            self.evidence[author] = proof
        out.equivocations.append(proof)
        blocked = self.blocked.get(author)
        if blocked is None or seq <= blocked.seq:
            rejection = Rejection(Reason.FORBIDDEN, f"equivocation at seq {seq}")
            self._block(author, seq, rejection, out, None)
        else:
            self.rejections[Reason.FORBIDDEN] += 1
        st = self._authors.get(author)
        if st is not None and st.seq >= seq:
            self._rollback = True

    # -- the check -------------------------------------------------------------------------

    def _author(self, author: str, public_key: bytes) -> _Author:
        st = self._authors.get(author)
        if st is None:
            st = _Author(public_key, client_id_for(public_key))
            self._authors[author] = st
        return st

    def _admit(
        self, w: _Waiting, out: Outcome, local_events: list[tuple[Path, Op]] | None = None
    ) -> Rejection | None:
        """Verify ``w`` (the author's next entry, what it refers to present) and apply it.

        With ``local_events`` the update is this node's own, already in the document (the
        caller puts the document back if this refuses it).
        """
        e = w.entry
        author, policy_seq, policy = e.author, e.policy_seq, self.policy
        st = self._authors.get(author)
        if st is None:
            st = self._author(author, e.public_key)
        if e.seq > 1 and e.prev != st.head:  # the author signed another entry e.seq - 1
            self._equivocation(author, e.seq - 1, st.log[-1], e.raw, out)
            return self.blocked[author].rejection
        if policy_seq < st.policy_seq:
            return Rejection(Reason.MALFORMED, "policy seq went backwards")
        # an author's grants are kept only once it is found a member at that policy seq, so
        # within one call (the policy does not change) their presence answers is_member
        grants = self._grants.get((author, policy_seq))
        if grants is None:
            if not policy.is_member(author, policy_seq):
                return Rejection(Reason.NOT_MEMBER, f"not a member at policy {policy_seq}")
            grants = self._grants[(author, policy_seq)] = {}
        floor = policy.floor(author, e.seq)
        if policy_seq < floor:
            detail = f"cites policy {policy_seq}, below its cut-off floor {floor}"
            return Rejection(Reason.NOT_MEMBER, detail)
        start = self._sv.get(st.client, 0)
        verdict: Accepted | Admitted | Rejection | None = admit(
            w.update,
            author=e.author,
            client=st.client,
            start=start,
            deps=e.deps,
            index=self._index,
            written=self._written,
            policy=self.policy,
            policy_seq=e.policy_seq,
            max_span=MAX_SPAN,
            may=grants,
        )
        if verdict is None:  # not a plain success: the reference decides
            verdict = check_update(
                w.update.as_update(),
                author=e.author,
                client=st.client,
                start=start,
                deps=e.deps,
                index=self._index,
                written=self._written,
                policy=self.policy,
                policy_seq=e.policy_seq,
                max_span=MAX_SPAN,
            )
        if isinstance(verdict, Rejection):
            return verdict
        # Applied once, to the document itself, with deep observers: the events are the second
        # line (check_events). Should it refuse what the structural check admitted (a decoder
        # gap), or Yrs raise, the document is put back as it was before this update.
        if local_events is None:
            events = self._events  # filled by the observers (_watch); read before any reset
            events.clear()
            try:
                apply_update(self.doc, e.update)
                if self._observer_failed:
                    raise self._observer_failed.pop()
            except BaseException as exc:  # a Rust panic surfaces as a BaseException
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                self._observer_failed.clear()
                self._restore_doc()
                return Rejection(Reason.MALFORMED, f"Yrs refused the update: {exc!r}")
            if type(verdict) is not Accepted or not verdict.covers(events):
                written = verdict.paths() if type(verdict) is Accepted else ()
                observed = check_events(author, events, policy, policy_seq, grants, written)
                if observed is not None:
                    self._restore_doc()
                    return observed
        else:
            events = local_events
            observed = check_events(author, events, policy, policy_seq, grants)
            if observed is not None:
                return observed
        self._applied(e.update)
        self._commit(st, e, verdict)
        out.applied.append(Entry(author, e.seq, e.raw))
        changed = out.changed
        for path, _ in events:  # one or two: a loop here, not a comprehension's frame
            changed.append(path)
        return None

    def _commit(self, st: _Author, e: StateEntry, verdict: Accepted | Admitted) -> None:
        if type(verdict) is Accepted:
            spans = verdict.spans
            if spans:
                self._index.add_spans(st.client, spans)
                self._sv[st.client] = verdict.end_clock
            if verdict.once:
                self._written.add_children(verdict.once)
        else:
            assert isinstance(verdict, Admitted)
            index = self._index
            for start, end, loc in verdict.runs:
                index.add(st.client, start, end, loc)
            self._written.update(verdict.once_paths)
            if verdict.runs:
                self._sv[st.client] = verdict.end_clock
        self._record(st, e.author, e.raw, e.digest)
        st.policy_seq = e.policy_seq
        if e.timestamp > st.at:
            st.at = e.timestamp

    def _record(self, st: _Author, author: str, raw: bytes, digest: bytes) -> None:
        st.seq += 1
        st.head = digest
        st.log.append(raw)
        st.digests.append(digest)
        order = self._order
        pos = self._pos.get(author)
        if pos is None:
            pos = self._pos[author] = []
        pos.append(len(order))
        order.append((author, st.seq))

    # -- the document and how to put it back ------------------------------------------------

    def _watch(self, doc: Doc[Map[Any]]) -> None:
        """Deep observers on the roots, straight on pycrdt's Rust objects: its Python wrapper
        would convert every event's values, and the rules only need paths and actions."""
        events = self._events
        failed = self._observer_failed
        touch = self._content_digest.touch

        def watcher(name: str) -> Callable[[list[Any]], None]:
            def seen(evs: list[Any]) -> None:
                try:
                    changes = event_changes(name, evs)
                    events.extend(changes)
                    for path, _ in changes:
                        n = len(path)
                        if n > 1 and path[1] is not None:
                            touch(name, path[1], path[2] if n > 2 else None)
                except Exception as exc:  # judged as Yrs refusing the update
                    failed.append(exc)

            return seen

        self._subs = [doc[name].integrated.observe_deep(watcher(name)) for name in ROOTS]

    def _set_doc(self, doc: Doc[Map[Any]]) -> None:
        self.doc = doc
        self._tasks_root = doc[TASKS]
        self._watch(doc)
        self._events.clear()
        self._content_digest.reset()

    def _applied(self, update: bytes) -> None:
        """Remember an update the document took, for :meth:`_restore_doc`. Once what is
        remembered outweighs the saved state, the state is saved again (amortised: each save
        costs about what the updates since the last one did)."""
        self._lag.append(update)
        self._lag_bytes += len(update)
        lag = self._lag_bytes
        if lag > LAG_BYTES and lag > len(self._checkpoint or b""):
            self._save(self.doc.get_update())

    def _save(self, state: bytes) -> None:
        self._checkpoint = state
        self._lag = []
        self._lag_bytes = 0

    def _restore_doc(self) -> None:
        """Put the document back to the saved state plus every update applied since: what it
        was before the change now refused (or a local transaction that raised). This replaces
        the shadow copy the document used to be written through: one Yrs document in memory,
        one apply per update, and the cost of a copy paid only on this (rare) path."""
        doc = new_doc(self.client, self._checkpoint)
        for update in self._lag:
            doc.apply_update(update)
        self._set_doc(doc)

    # -- anti-entropy ----------------------------------------------------------------------

    def missing_for(
        self,
        peer_vector: Mapping[str, int],
        peer_heads: Mapping[str, bytes] | None = None,
        peer_blocked: Mapping[str, int] | None = None,
        *,
        max_entries: int = 256,
        max_bytes: int = 512 * 1024,
        upto: Mapping[str, int] | None = None,
    ) -> Iterator[list[bytes]]:
        """Entries a peer lacks, given its :meth:`vector` (and, optionally, its :meth:`heads`
        and :meth:`blocked_seqs`), in batches, in an order that respects every author's seq
        and every dependency (our own apply order).

        It also sends what a peer needs to exclude a blocked author as we do: the proof pair
        of an equivocation, or the entry that blocked the author, to a peer that has reached
        the seq before the block and has not blocked that author itself; and our entry at the
        peer's head when the digests differ (a fork the peer may not know of).

        ``upto``: ``{author: seq}``, nothing of that author past that seq is sent (the daemon
        holds back its own entries until they are durable: one sent and then lost in a crash
        would be signed again differently, an equivocation).
        """
        limit = upto or {}
        batch: list[bytes] = []
        size = 0

        def flush(raw: bytes) -> Iterator[list[bytes]]:
            nonlocal batch, size
            if batch and (len(batch) >= max_entries or size + len(raw) > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)

        stops = peer_blocked or {}
        for author, stop in self.blocked.items():
            if peer_vector.get(author, 0) < stop.seq - 1 or stops.get(author, 0) == stop.seq:
                continue
            proof = self.evidence.get(author)
            if proof is not None and proof.seq <= stop.seq:
                yield from flush(proof.first)
                yield from flush(proof.second)
            elif author in self._culprits:
                yield from flush(self._culprits[author])
        for author, digest in (peer_heads or {}).items():
            st = self._authors.get(author)
            theirs = peer_vector.get(author, 0)
            if (
                st is not None
                and 1 <= theirs <= min(st.seq, limit.get(author, theirs))
                and st.digests[theirs - 1] != digest
            ):
                yield from flush(st.log[theirs - 1])
        starts = [
            self._pos[a][peer_vector.get(a, 0)]
            for a, st in self._authors.items()
            if st.seq > peer_vector.get(a, 0) and a in self._pos
        ]
        for i in range(min(starts, default=len(self._order)), len(self._order)):
            author, seq = self._order[i]
            until = self.blocked.get(author)
            if (
                seq > peer_vector.get(author, 0)
                and (until is None or seq < until.seq)
                and seq <= limit.get(author, seq)
            ):
                yield from flush(self._authors[author].log[seq - 1])
        if batch:
            yield batch

    # -- snapshots, restore, rebuild -------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything needed to resume without replaying the logs (the logs stay in the store).

        Holds the document, the version vector with head digests, the location index and the
        write-once set: state derived from verified entries, so a restore trusts it.
        """
        state = self.doc.get_update()
        self._save(state)  # a fresh saved state for _restore_doc, for free
        # plain (not canonical) CBOR: nothing compares snapshots across nodes, and sorting
        # the map keys of the large tables triples the encoding time
        return cbor2.dumps(
            {
                "v": SNAPSHOT_VERSION,
                "own": self.own_signed,
                "doc": state,
                "sv": [[c, k] for c, k in sorted(self._sv.items())],
                "excluded": [[c, k] for c, k in sorted(self._excluded_from.items())],
                "authors": [
                    [a, st.seq, st.policy_seq, st.head]
                    for a, st in sorted(self._authors.items())
                    if st.seq
                ],
                "index": self._index.dump(),
                "written": self._written.dump(),
                "blocked": [
                    [a, r.seq, r.rejection.reason.value, r.rejection.detail, self._culprits.get(a)]
                    for a, r in sorted(self.blocked.items())
                ],
                "evidence": [
                    [p.author, p.seq, p.first, p.second] for _, p in sorted(self.evidence.items())
                ],
            }
        )

    def _load(self, snapshot: bytes) -> dict[str, tuple[int, bytes]]:
        try:
            data = cbor2.loads(snapshot)
            if data["v"] not in (1, SNAPSHOT_VERSION):
                raise StateError(f"snapshot version {data['v']} is not {SNAPSHOT_VERSION}")
            self._set_doc(new_doc(self.client, data["doc"]))
            self._save(data["doc"])
            self.own_signed = int(data["own"])
            self._sv = {c: k for c, k in data["sv"]}
            self._excluded_from = {c: k for c, k in data["excluded"]}
            self._index = LocationIndex.load(data["index"])
            self._written = WrittenSet.load(data["written"])
            expect: dict[str, tuple[int, bytes]] = {}
            for author, seq, policy_seq, head in data["authors"]:
                st = self._author(author, public_key_from_peer_id(author))
                st.policy_seq = policy_seq
                expect[author] = (seq, head)
            for author, seq, reason, detail, culprit in data["blocked"]:
                self.blocked[author] = Blocked(author, seq, Rejection(Reason(reason), detail))
                if culprit is not None:
                    self._culprits[author] = culprit
            for author, seq, first, second in data["evidence"]:
                self.evidence[author] = Equivocation(author, seq, first, second)
        except StateError:
            raise
        except Exception as exc:
            raise StateError(f"snapshot does not decode: {type(exc).__name__}: {exc}") from None
        return expect

    @classmethod
    def restore(
        cls,
        identity: Identity,
        swarm_id: bytes,
        policy: Policy,
        *,
        snapshot: bytes | None,
        entries: Iterable[tuple[str, int, bytes]],
        now_ms: int,
        limits: Limits | None = None,
    ) -> tuple[Replica, Outcome]:
        """Rebuild from the latest snapshot and the stored logs (in stored order).

        Fast path: entries the snapshot covers were verified before they were stored, so they
        are only parsed (no signature check) and chained, each to its predecessor and the last
        to the snapshot's head digest; a break raises StateError naming the entry. The tail goes through
        the full verification of :meth:`receive`.
        """
        replica = cls(identity, swarm_id, policy, limits=limits)
        expect = replica._load(snapshot) if snapshot is not None else {}
        tail: list[bytes] = []
        for author, seq, raw in entries:
            covered = expect.get(author, (0, b""))[0]
            if seq > covered:
                tail.append(raw)
                continue
            st = replica._authors[author]
            if seq != st.seq + 1:
                raise StateError(f"stored log of {author} is not contiguous at seq {seq}")
            # Each entry names its predecessor's digest (signed): a damaged stored entry
            # breaks the chain at the next one, the last at the snapshot's head.
            parsed = read_entry(raw, swarm_id=swarm_id, now_ms=now_ms, signed_here=True)
            if not isinstance(parsed, StateEntry) or (parsed.author, parsed.seq) != (author, seq):
                raise StateError(f"stored entry {author} seq {seq} does not decode as itself")
            if parsed.prev != st.head:
                raise StateError(
                    f"stored entry {author} seq {seq - 1} does not match the digest "
                    f"seq {seq} names (one of them is damaged)"
                )
            replica._record(st, author, raw, parsed.digest)
        for author, (seq, head) in expect.items():
            st = replica._authors[author]
            if st.seq != seq or st.head != head:
                raise StateError(f"stored log of {author} does not match the snapshot")
        out = replica.receive_batch(tail, now_ms)
        return replica, out

    def rebuild(self, now_ms: int) -> Outcome:
        """Replay every applied entry from scratch under the current policy and blocks.

        Runs by itself when an equivocation shows this replica applied past a fork. Call it
        after the decided log raises an author's floor (revocation with a cut-off): entries
        applied before this replica learned the decision are dropped, with anything built on
        them. ``Outcome.retracted`` lists what to delete from the store.
        """
        fresh = Replica(self.identity, self.swarm_id, self.policy, limits=self.limits)
        fresh.evidence = dict(self.evidence)
        fresh.blocked = {a: b for a, b in self.blocked.items() if a in self.evidence}
        fresh.own_signed = self.own_signed
        raws = [
            self._authors[a].log[s - 1]
            for a, s in self._order
            if a not in fresh.blocked or s < fresh.blocked[a].seq
        ]
        # entries refused before are judged again (what they referred to may have changed),
        # and waiting ones are kept
        raws += [raw for a, raw in sorted(self._culprits.items()) if a not in self.evidence]
        raws += [
            p.raw for _, pend in sorted(self._pending.items()) for _, p in sorted(pend.items())
        ]
        before = list(self._order)
        known = set(before)
        out = fresh.receive_batch(raws, now_ms)
        out.applied = [e for e in out.applied if (e.author, e.seq) not in known]
        keep = set(fresh._order)
        out.rolled_back = not known <= keep
        # this node's own entries stay stored: they wait in pending, and they are what keeps
        # it from ever signing those seqs again after a restart
        out.retracted = [
            Entry(a, s, self._authors[a].log[s - 1])
            for a, s in before
            if (a, s) not in keep and a != self.me
        ]
        self.__dict__.update(fresh.__dict__)
        return out


@functools.lru_cache(maxsize=4096)
def _client_of(author: str) -> int:
    return client_id_for(public_key_from_peer_id(author))


@functools.lru_cache(maxsize=4096)
def _client_of_key(public_key: bytes) -> int:
    return client_id_for(public_key)
