"""A sans-IO PBFT replica (Castro & Liskov, OSDI 1999), with signed messages.

Inputs: wire bytes (:meth:`Replica.receive`), timer expiries (:meth:`Replica.on_timer`) and the
current time as an argument. Outputs: lists of effects (Send, SetTimer, Persist, Decided,
Reconfigured) that the I/O layer carries out in order, persisting before it sends. No sockets,
threads, clock or randomness here, so the whole protocol runs deterministically in tests.

Normal case: the primary of view v (``validators[v % n]``) assigns a sequence number to a batch
of client requests (pre-prepare); backups that accept it prepare; a replica holding the
pre-prepare and quorum-1 matching prepares is *prepared* and commits; quorum matching commits make
the entry *committed*; entries execute strictly in sequence order and each client gets a reply.
Every K-th entry a replica signs a checkpoint of its state digest; quorum matching checkpoints make
it stable, which moves the watermarks and garbage-collects the log below it. A replica whose
requests do not get executed in time moves to the next view; the new primary proves with quorum
view-changes which batches might have committed and re-proposes exactly those (nulls elsewhere).

Nothing here relies on reliable delivery: while work is outstanding a retransmit timer re-sends
this replica's own messages for undecided slots (re-sealed, so replay windows accept them) and a
status message, which peers answer with the decided entries (certificates included) the sender
is missing and the new-view it may have lost.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from ...crypto.envelope import (
    DEFAULT_MAX_SIZE,
    Envelope,
    Rejection,
    ReplayWindow,
    open_envelope,
    seal,
)
from ...crypto.identity import Identity
from ...crypto.peerid import peer_id_from_public_key
from .application import Application, BatchHook, Execution, Outcome
from .certificate import Verified, verify_certificate
from .config import PbftConfig, max_faulty, quorum, rescheduled
from .effects import Decided, Effect, Persist, Reconfigured, Send, SendAll, SetTimer
from .log import Accepted, Committed, PreparedCert, Slot, matching
from .messages import (
    CHECKPOINT,
    COMMIT,
    NEWVIEW,
    PREPARE,
    PREPREPARE,
    REPLIES,
    REPLY,
    REQUEST,
    STATUS,
    SYNC,
    VIEWCHANGE,
    Checkpoint,
    Entry,
    EnvelopeCache,
    NewView,
    PrePrepare,
    Reply,
    Request,
    Status,
    Sync,
    ViewChange,
    Vote,
    batch_payload,
    replies_body,
    requests_of,
)
from .viewchange import (
    GENESIS_STATE,
    CheckedViewChange,
    NewViewPlan,
    check_checkpoint_proof,
    check_new_view,
    check_view_change,
    plan_new_view,
    primary_of,
)

TIMER_VIEW = "pbft.view"
TIMER_RETRANSMIT = "pbft.retransmit"

REPLICA_TYPES = frozenset(
    {PREPREPARE, PREPARE, COMMIT, CHECKPOINT, VIEWCHANGE, NEWVIEW, STATUS, SYNC}
)
_SEEN_CAP = 8192
_SYNC_BYTES = DEFAULT_MAX_SIZE // 2


def _no_application(_: Execution) -> bytes:
    return b""


def _state_step(prev: bytes, seq: int, d: bytes) -> bytes:
    """State digest chain over the decided log; deterministic execution makes it the state's id."""
    return hashlib.sha256(prev + seq.to_bytes(8, "big") + d).digest()


class Replica:
    """One validator's PBFT state machine. See the module docstring and docs/pbft.md."""

    def __init__(
        self,
        identity: Identity,
        validators: Iterable[bytes],
        config: PbftConfig,
        execute: Application | None = None,
        *,
        on_batch: BatchHook | None = None,
        envelopes: EnvelopeCache | None = None,
    ) -> None:
        vals = tuple(validators)
        if not vals or len(set(vals)) != len(vals) or any(len(v) != 32 for v in vals):
            raise ValueError("validators must be distinct 32-byte Ed25519 public keys")
        self.identity = identity
        self.me = identity.public_key
        self.cfg = config
        self._app: Application = execute or _no_application
        self._on_batch = on_batch
        self.rejections: dict[str, int] = {}

        self._configs: list[tuple[int, tuple[bytes, ...]]] = [(1, vals)]
        self.view = 0
        self.active = True  # False between sending a view-change and installing the new view
        self.last_executed = 0
        self.stable_seq = 0  # h, the low watermark
        self._stable_digest = GENESIS_STATE
        self._stable_proof: tuple[bytes, ...] = ()
        self._stable_target = 0  # highest stable checkpoint others proved, maybe above us
        self._state = GENESIS_STATE
        self._ckpt_digests: dict[int, bytes] = {}
        self._ckpt_votes: dict[int, dict[bytes, tuple[bytes, bytes]]] = {}
        self._claims: dict[bytes, int] = {}
        self._my_ckpt: Checkpoint | None = None
        self._ckpt_sent_at = 0
        self._status_mark: tuple[int, bool, int, int] | None = None  # at the last retransmit

        self._slots: dict[int, Slot] = {}
        self._certified: dict[int, Committed] = {}
        self._decided: OrderedDict[int, Entry] = OrderedDict()
        self._clients: dict[bytes, tuple[int, bytes]] = {}  # client -> (timestamp, result)
        # Clients whose row changed since the last stable record; None: that record must carry
        # the whole table (none was written by this object yet). See _persist_stable.
        self._clients_changed: set[bytes] | None = None
        self._pending: dict[bytes, tuple[int, bytes]] = {}  # client -> (timestamp, request raw)
        self._assigned: dict[bytes, int] = {}  # client -> highest timestamp proposed this view
        self._next_seq = 1

        self._vcs: dict[int, dict[bytes, CheckedViewChange]] = {}
        self._my_vc: tuple[int, dict[str, Any]] | None = None
        self._nv_raw: bytes | None = None
        self._nv_sent: set[int] = set()
        self._backoff = 0
        self._view_hint = 0

        self._env_seq = 0
        self._seq_reserved = 0
        self._replay = ReplayWindow()
        self._client_replay = ReplayWindow()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._envelopes = envelopes or EnvelopeCache(config.swarm_id)
        self._peer_ids: dict[bytes, str] = {}
        self._helped: dict[bytes, int] = {}
        self._rr = 0

        self._timers: dict[str, int] = {}
        self._now = 0
        self._out: list[Effect] = []

    # ------------------------------------------------------------------ public API

    @classmethod
    def restore(
        cls,
        records: Iterable[Mapping[str, Any]],
        identity: Identity,
        validators: Iterable[bytes],
        config: PbftConfig,
        execute: Application | None = None,
        **kwargs: Any,
    ) -> Replica:
        """Rebuild a replica from the records its Persist effects wrote, in order.

        The application state must already match the last ``exec`` record (the I/O layer keeps
        it with the decided log); restore does not re-execute. Call :meth:`start` afterwards.
        """
        r = cls(identity, validators, config, execute, **kwargs)
        for rec in records:
            r._apply_record(rec)
        return r

    def start(self, now_ms: int) -> list[Effect]:
        """Arm timers and re-send unfinished work; call once after construction or restore."""
        self._begin(now_ms)
        if self.active and (self._pending or self._fill_to()):
            self._arm_view()
        self._retransmit()
        self._arm_retransmit()
        return self._end()

    def receive(self, data: bytes, now_ms: int) -> list[Effect]:
        """Handle one wire message from anyone. Bad input is counted in ``rejections``."""
        self._begin(now_ms)
        self._receive(data)
        return self._end()

    def submit(self, data: bytes, now_ms: int) -> list[Effect]:
        """Hand in a signed request envelope from a local client (same checks as receive)."""
        return self.receive(data, now_ms)

    def deliver(self, entries: Iterable[Entry], now_ms: int) -> list[Effect]:
        """State transfer from outside: decided entries (e.g. from a peer's decided log, for a
        replica further behind than peers retain in memory). Each is checked by its certificate
        and executed in order; entries that do not continue our log are ignored."""
        self._begin(now_ms)
        self._deliver(entries)
        self._arm_retransmit()
        return self._end()

    @property
    def lagging(self) -> bool:
        """True while this replica knows it is behind the others (see :meth:`deliver`)."""
        return self._lagging()

    def on_timer(self, name: str, now_ms: int) -> list[Effect]:
        self._begin(now_ms)
        at = self._timers.get(name)
        if at is not None and now_ms >= at:
            del self._timers[name]
            if name == TIMER_VIEW:
                self._on_view_timer()
            elif name == TIMER_RETRANSMIT:
                self._retransmit()
            self._arm_retransmit()
        return self._end()

    @property
    def validators(self) -> tuple[bytes, ...]:
        """The validator set in force for the current window."""
        return self.validators_for(self.stable_seq + 1)

    def validators_for(self, seq: int) -> tuple[bytes, ...]:
        for first, vals in reversed(self._configs):
            if first <= seq:
                return vals
        return self._configs[0][1]

    @property
    def config_history(self) -> tuple[tuple[int, tuple[bytes, ...]], ...]:
        """(first seq, validators) pairs, including scheduled changes not yet in force."""
        return tuple(self._configs)

    @property
    def primary(self) -> bytes:
        return primary_of(self.view, self.validators)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.me

    def log_seqs(self) -> list[int]:
        """Sequence numbers that still hold protocol messages (for inspection and tests)."""
        return sorted(self._slots)

    def pending_requests(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ plumbing

    def _begin(self, now_ms: int) -> None:
        self._now = now_ms
        self._out = []

    def _end(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    def _count(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _persist(self, record: dict[str, Any]) -> None:
        self._out.append(Persist(record))

    def _pid(self, key: bytes) -> str:
        pid = self._peer_ids.get(key)
        if pid is None:
            pid = self._peer_ids[key] = peer_id_from_public_key(key)
        return pid

    def _seal(self, type_: str, body: Any) -> bytes:
        if self._env_seq >= self._seq_reserved:
            self._seq_reserved = self._env_seq + self.cfg.seq_block
            self._persist({"k": "seq", "upto": self._seq_reserved})
        self._env_seq += 1
        return seal(
            self.identity,
            swarm_id=self.cfg.swarm_id,
            type=type_,
            seq=self._env_seq,
            timestamp=self._now,
            body=body,
        )

    def _broadcast(self, raw: bytes) -> None:
        self._out.append(Send(None, raw))

    def _send(self, to: bytes, raw: bytes) -> None:
        if to != self.me:
            self._out.append(Send(self._pid(to), raw))

    def _open(self, raw: bytes) -> Envelope | None:
        """Open an embedded envelope, caching the (costly) signature check by content."""
        return self._envelopes.open(raw)

    def _arm(self, name: str, at: int) -> None:
        if self._timers.get(name) != at:
            self._timers[name] = at
            self._out.append(SetTimer(name, at))

    def _arm_retransmit(self) -> None:
        if TIMER_RETRANSMIT not in self._timers and self._busy():
            self._arm(TIMER_RETRANSMIT, self._now + self.cfg.retransmit_ms)

    def _view_timeout(self) -> int:
        return self.cfg.view_timeout_ms << min(self._backoff, self.cfg.max_backoff)

    def _arm_view(self) -> None:
        if TIMER_VIEW not in self._timers:
            self._arm(TIMER_VIEW, self._now + self._view_timeout())

    @property
    def _voter(self) -> bool:
        """Only members of the set in force vote; others (joining, removed) just follow."""
        return self.me in self.validators

    @property
    def _f(self) -> int:
        return max_faulty(len(self.validators))

    @property
    def _q(self) -> int:
        return quorum(len(self.validators))

    def _high(self) -> int:
        """High watermark; capped below a scheduled reconfiguration until it is in force."""
        h = self.stable_seq
        high = h + self.cfg.window
        for first, _ in self._configs:
            if first > h + 1:
                high = min(high, first - 1)
                break
        return high

    def _fill_to(self) -> int:
        """While a validator set is scheduled, the last seq before it takes over (else 0): the
        primary orders null batches up to it when it has no requests, since an idle swarm would
        otherwise never bring a decided change into force, and the others time a primary that
        does not."""
        for first, _ in self._configs:
            if first > self.last_executed + 1:
                return first - 1
        return 0

    def _in_window(self, n: int) -> bool:
        return self.stable_seq < n <= self._high()

    def _authorized(self, sender: bytes) -> bool:
        h = self.stable_seq
        return any(sender in vals for first, vals in self._configs if first > h + 1) or (
            sender in self.validators
        )

    # ------------------------------------------------------------------ receive path

    def _receive(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray)):
            self._count("malformed")
            return
        data = bytes(data)
        key = hashlib.sha256(data).digest()
        if key in self._seen:
            self._count("replay")
            return
        env = open_envelope(
            data,
            swarm_id=self.cfg.swarm_id,
            now_ms=self._now,
            max_size=DEFAULT_MAX_SIZE,
            max_skew_ms=self.cfg.max_skew_ms,
        )
        if isinstance(env, Rejection):
            self._count(env.reason.value)
            return
        if env.type == REQUEST:
            window = self._client_replay
            self._envelopes.add(env)  # it will come back inside a pre-prepare
        elif env.type in REPLICA_TYPES:
            if not self._authorized(env.sender):
                self._count("not_member")
                return
            window = self._replay
        else:
            self._count("forbidden")
            return
        if not window.is_fresh(env.sender, env.seq):
            self._count("replay")
            return
        window.accept(env.sender, env.seq)
        self._seen[key] = None
        if len(self._seen) > _SEEN_CAP:
            self._seen.popitem(last=False)
        handler = {
            REQUEST: self._on_request,
            PREPREPARE: self._on_preprepare,
            PREPARE: self._on_prepare,
            COMMIT: self._on_commit,
            CHECKPOINT: self._on_checkpoint,
            VIEWCHANGE: self._on_viewchange,
            NEWVIEW: self._on_newview,
            STATUS: self._on_status,
            SYNC: self._on_sync,
        }[env.type]
        handler(env)
        self._arm_retransmit()

    # ------------------------------------------------------------------ requests

    def _on_request(self, env: Envelope) -> None:
        req = Request.parse(env.body)
        if req is None:
            self._count("malformed_body")
            return
        client = env.sender
        done = self._clients.get(client)
        if done is not None and req.timestamp <= done[0]:
            if req.timestamp == done[0]:
                self._reply(client, req.timestamp, done[1])
            else:
                self._count("stale_request")
            return
        cur = self._pending.get(client)
        if cur is not None and cur[0] > req.timestamp:
            self._count("stale_request")
            return
        self._pending[client] = (req.timestamp, env.raw)  # a retransmission refreshes the bytes
        if self.active and self.is_primary:
            self._propose()
        elif self.active and self.me in self.validators:
            self._send(self.primary, env.raw)
            self._arm_view()

    def _note_pending(self, batch: Iterable[bytes], assign: bool = False) -> None:
        """Remember requests seen in pre-prepares: a later primary may have to re-propose them."""
        for raw in batch:
            got = self._envelopes.request(raw)
            if got is None:
                continue
            env, req = got
            if assign:
                self._assigned[env.sender] = max(self._assigned.get(env.sender, 0), req.timestamp)
            done = self._clients.get(env.sender)
            cur = self._pending.get(env.sender)
            if (done is None or req.timestamp > done[0]) and (
                cur is None or req.timestamp > cur[0]
            ):
                self._pending[env.sender] = (req.timestamp, raw)

    def _propose(self) -> None:
        """Primary: batch unassigned pending requests into pre-prepares while the window allows."""
        if not (self.active and self.is_primary):
            return
        self._next_seq = max(self._next_seq, self.last_executed + 1, self.stable_seq + 1)
        while (
            self._next_seq <= self._high()
            and self._next_seq - 1 - self.last_executed < self.cfg.max_inflight
        ):
            batch: list[bytes] = []
            size = 0
            for client, (t, raw) in self._pending.items():
                if t > self._assigned.get(client, 0):
                    if batch and size + len(raw) > self.cfg.max_batch_bytes:
                        break
                    batch.append(raw)
                    size += len(raw)
                    self._assigned[client] = t
                    if len(batch) == self.cfg.max_batch:
                        break
            if not batch and self._next_seq > self._fill_to():
                return
            n = self._next_seq
            self._next_seq += 1
            self._send_preprepare(PrePrepare.make(self.view, n, batch))
        if self._pending or self._fill_to():
            self._arm_view()

    def _send_preprepare(self, pp: PrePrepare) -> None:
        raw = self._seal(PREPREPARE, pp.body())
        slot = self._slot(pp.seq)
        slot.preprepares[pp.view] = Accepted(pp.digest, pp.batch, raw)
        self._persist({"k": "sent", "m": raw})
        self._broadcast(raw)
        slot.sent_at = self._now
        self._check_prepared(slot, pp.view)

    def _reply(self, client: bytes, timestamp: int, result: bytes) -> None:
        raw = self._seal(REPLY, Reply(self.view, timestamp, client, result).body())
        self._send(client, raw)

    def _reply_all(self, replies: list[tuple[bytes, int, bytes]]) -> None:
        """The replies to an executed batch as one ``pbft.replies`` envelope for all its
        clients (``reply_batches``): one signature instead of one per request."""
        raw = self._seal(REPLIES, replies_body(self.view, replies))
        to = tuple(dict.fromkeys(self._pid(c) for c, _, _ in replies if c != self.me))
        if to:
            self._out.append(SendAll(to, raw))

    # ------------------------------------------------------------------ normal case

    def _slot(self, n: int) -> Slot:
        slot = self._slots.get(n)
        if slot is None:
            slot = self._slots[n] = Slot(n)
        return slot

    def _current(self, view: int) -> bool:
        if view != self.view or not self.active:
            self._count("wrong_view")
            if view > self.view:
                self._view_hint = max(self._view_hint, view)  # we may have missed a new-view
            return False
        return True

    def _on_preprepare(self, env: Envelope) -> None:
        pp = PrePrepare.parse(env.body)
        if pp is None:
            self._count("malformed_body")
            return
        if env.sender != primary_of(pp.view, self.validators):
            self._count("not_primary")
            return
        self._claim(env.sender, pp.seq)
        if not self._current(pp.view):
            return
        self._accept_preprepare(pp, env.raw)

    def _accept_preprepare(self, pp: PrePrepare, raw: bytes) -> None:
        if not self._in_window(pp.seq):
            self._count("out_of_window")
            return
        slot = self._slot(pp.seq)
        acc = slot.preprepares.get(pp.view)
        if acc is not None and acc.digest != pp.digest:
            self._count("conflicting_preprepare")
            return
        if acc is None or acc.raw is None:
            requests = self._envelopes.request
            for r in pp.batch:
                if requests(r) is None:
                    self._count("bad_request")
                    return
            slot.preprepares[pp.view] = Accepted(pp.digest, pp.batch, raw)
            self._note_pending(pp.batch, assign=True)
            if self._pending and pp.seq > self.last_executed:
                self._arm_view()
        if self._voter and not self.is_primary and pp.view not in slot.my_prepare:
            vote = Vote(pp.view, pp.seq, pp.digest)
            praw = self._seal(PREPARE, vote.body())
            slot.my_prepare[pp.view] = pp.digest
            slot.prepares.setdefault(pp.view, {})[self.me] = (pp.digest, praw)
            self._persist({"k": "sent", "m": praw})
            self._broadcast(praw)
            slot.sent_at = self._now
        self._check_prepared(slot, pp.view)

    def _vote(self, env: Envelope, kind: str) -> tuple[Vote, Slot] | None:
        vote = Vote.parse(env.body)
        if vote is None:
            self._count("malformed_body")
            return None
        self._claim(env.sender, vote.seq)
        if vote.seq <= self.last_executed:
            return None  # decided here; a peer that still needs it will ask (status)
        if not self._current(vote.view):
            return None
        if not self._in_window(vote.seq):
            self._count("out_of_window")
            return None
        if kind == PREPARE and env.sender == self.primary:
            self._count("prepare_from_primary")  # the pre-prepare is the primary's vote
            return None
        slot = self._slot(vote.seq)
        votes = (slot.prepares if kind == PREPARE else slot.commits).setdefault(vote.view, {})
        had = votes.get(env.sender)
        if had is not None:
            if had[0] != vote.digest:
                self._count("equivocation")
            return None
        votes[env.sender] = (vote.digest, env.raw)
        return vote, slot

    def _on_prepare(self, env: Envelope) -> None:
        got = self._vote(env, PREPARE)
        if got is not None:
            self._check_prepared(got[1], got[0].view)

    def _on_commit(self, env: Envelope) -> None:
        got = self._vote(env, COMMIT)
        if got is not None:
            self._check_committed(got[1], got[0].view)

    def _check_prepared(self, slot: Slot, view: int) -> None:
        acc = slot.preprepares.get(view)
        if acc is None or acc.raw is None or acc.batch is None:
            return
        if slot.prepared is None or slot.prepared.view < view:
            primary = primary_of(view, self.validators)
            proofs = matching(slot.prepares.get(view), acc.digest, self.validators, primary)
            if len(proofs) < self._q - 1:
                return
            cert = PreparedCert(view, acc.digest, acc.batch, acc.raw, tuple(proofs[: self._q - 1]))
            slot.prepared = cert
            self._persist(
                {"k": "prepared", "n": slot.seq, "pp": cert.preprepare, "p": list(cert.prepares)}
            )
        if slot.prepared.view == view and view not in slot.my_commit and self._voter:
            vote = Vote(view, slot.seq, acc.digest)
            craw = self._seal(COMMIT, vote.body())
            slot.my_commit[view] = acc.digest
            slot.commits.setdefault(view, {})[self.me] = (acc.digest, craw)
            self._persist({"k": "sent", "m": craw})
            self._broadcast(craw)
            slot.sent_at = self._now
        self._check_committed(slot, view)

    def _check_committed(self, slot: Slot, view: int) -> None:
        if slot.committed is not None or slot.seq <= self.last_executed:
            return
        acc = slot.preprepares.get(view)
        if acc is None or acc.batch is None:
            return
        cert = matching(slot.commits.get(view), acc.digest, self.validators)
        if len(cert) < self._q:
            return
        slot.committed = Committed(view, acc.digest, acc.batch, tuple(cert[: self._q]))
        self._try_execute()

    # ------------------------------------------------------------------ execution

    def _try_execute(self) -> None:
        progressed = False
        while True:
            n = self.last_executed + 1
            slot = self._slots.get(n)
            done = slot.committed if slot is not None else None
            if done is None:
                done = self._certified.pop(n, None)
            if done is None:
                break
            filling = n <= self._fill_to()  # a null batch toward a reconfiguration is progress
            progressed |= self._execute(n, done) or filling
        if progressed and self.active:
            self._backoff = 0
            self._timers.pop(TIMER_VIEW, None)
            if self._pending or self._fill_to():
                self._arm_view()
        self._propose()

    def _execute(self, n: int, c: Committed) -> bool:
        """Run one decided batch; returns whether any request was new (progress)."""
        results: list[bytes | None] = []
        replies: list[tuple[bytes, int, bytes]] = []
        scheduled: tuple[int, tuple[bytes, ...]] | None = None
        if self._on_batch is not None:
            self._on_batch(n, c.batch)
        requests = self._envelopes.request
        for index, raw in enumerate(c.batch):
            got = requests(raw)
            if got is None:
                results.append(None)
                continue
            env, req = got
            client = env.sender
            done = self._clients.get(client)
            if done is not None and req.timestamp <= done[0]:
                results.append(None)
                if req.timestamp == done[0]:
                    replies.append((client, done[0], done[1]))
                continue
            out = self._app(Execution(n, client, req.timestamp, req.op, index))
            result = out if isinstance(out, bytes) else out.result
            if isinstance(out, Outcome) and out.validators:
                scheduled = self._schedule(n, out.validators)
            self._clients[client] = (req.timestamp, result)
            if self._clients_changed is not None:
                self._clients_changed.add(client)
            cur = self._pending.get(client)
            if cur is not None and cur[0] <= req.timestamp:
                del self._pending[client]
            results.append(result)
            replies.append((client, req.timestamp, result))
        payload = batch_payload(c.batch)
        self._state = _state_step(self._state, n, c.digest)
        self.last_executed = n
        entry = Entry(n, c.view, payload, c.certificate)
        self._decided[n] = entry
        self._trim_decided()
        record: dict[str, Any] = {
            "k": "exec",
            "n": n,
            "v": c.view,
            "p": payload,
            "c": list(c.certificate),
            "r": results,
            "s": self._state,
        }
        if scheduled is not None:
            record["cfg"] = [scheduled[0], list(scheduled[1])]
        self._out.append(Decided(n, c.view, c.digest, payload, c.certificate, tuple(results)))
        # Replies and our checkpoint go out before the exec record (the I/O layer may send them
        # while it is being written): neither can make a restarted replica contradict itself.
        # The batch at n is fixed by a quorum of commits that their senders persisted before
        # sending, and execution is deterministic, so a replica that loses this record executes
        # the same batch again (learning it by state transfer) and re-derives the very results
        # and state digest it announced here. Everything we persisted before (our prepare,
        # prepared certificate and commit, envelope seq reservations) still precedes them.
        if self.cfg.reply_batches and len(replies) > 1:
            self._reply_all(replies)
        else:
            for client, t, result in replies:
                self._reply(client, t, result)
        checkpoint = n != self.stable_seq and n % self.cfg.checkpoint_interval == 0
        if checkpoint:
            self._send_checkpoint(n)
        self._persist(record)
        if n == self.stable_seq:  # we had adopted this checkpoint before reaching it
            if self._state == self._stable_digest:
                self._persist_stable()
            else:
                self._count("state_divergence")
        elif checkpoint:
            self._check_stable(n)  # may persist a stable record: after the exec record
        return any(r is not None for r in results)

    def _trim_decided(self) -> None:
        """Keep every entry above the stable checkpoint (peers may still need it to reach the
        next one) and up to ``retain_decided`` entries in all, the oldest going first."""
        while len(self._decided) > self.cfg.retain_decided:
            oldest = next(iter(self._decided))
            if oldest > self.stable_seq:
                break
            del self._decided[oldest]

    def _schedule(self, n: int, validators: tuple[bytes, ...]) -> tuple[int, tuple[bytes, ...]]:
        first = self.cfg.takes_over(n)
        self._configs = rescheduled(self._configs, first, tuple(validators))
        return first, tuple(validators)

    # ------------------------------------------------------------------ checkpoints

    def _send_checkpoint(self, n: int) -> None:
        """Vote for the state after executing ``n``; the caller checks stability after it has
        persisted the exec record (a stable record must follow the exec record it covers)."""
        self._ckpt_digests[n] = self._state
        ck = Checkpoint(n, self._state)
        self._my_ckpt = ck
        raw = self._seal(CHECKPOINT, ck.body())
        self._ckpt_votes.setdefault(n, {})[self.me] = (ck.digest, raw)
        self._broadcast(raw)
        self._ckpt_sent_at = self._now

    def _on_checkpoint(self, env: Envelope) -> None:
        ck = Checkpoint.parse(env.body)
        if ck is None or ck.seq % self.cfg.checkpoint_interval:
            self._count("malformed_body")
            return
        if env.sender not in self.validators_for(ck.seq):
            self._count("not_member")
            return
        self._claim(env.sender, ck.seq)
        if ck.seq <= self.stable_seq or ck.seq > self.stable_seq + 4 * self.cfg.window:
            return
        votes = self._ckpt_votes.setdefault(ck.seq, {})
        had = votes.get(env.sender)
        if had is not None:
            if had[0] != ck.digest:
                self._count("equivocation")
            return
        votes[env.sender] = (ck.digest, env.raw)
        self._check_stable(ck.seq)

    def _claim(self, sender: bytes, seq: int) -> None:
        """Highest seq a validator has spoken about: f+1 claims above us mean we are behind."""
        if seq > self._claims.get(sender, 0):
            self._claims[sender] = seq

    def _check_stable(self, n: int) -> None:
        votes = self._ckpt_votes.get(n, {})
        mine = self._ckpt_digests.get(n)
        members = self.validators_for(n)
        q = quorum(len(members))
        by_digest: dict[bytes, list[bytes]] = {}
        for s, (d, raw) in sorted(votes.items()):
            if s in members:
                by_digest.setdefault(d, []).append(raw)
        for d, raws in by_digest.items():
            if len(raws) < q:
                continue
            if mine is None:
                self._stable_target = max(self._stable_target, n)
            elif mine == d and n > self.stable_seq:
                self._make_stable(n, d, tuple(raws[:q]))
            elif mine != d:
                self._count("state_divergence")

    def _make_stable(
        self, n: int, d: bytes, proof: tuple[bytes, ...], propose: bool = True
    ) -> None:
        """Move the low watermark to ``n`` and drop everything the checkpoint makes redundant."""
        before = self.validators
        self.stable_seq = n
        self._stable_digest = d
        self._stable_proof = proof
        self._stable_target = max(self._stable_target, n)
        keep_above = min(n, self.last_executed)
        for s in [s for s in self._slots if s <= keep_above]:
            del self._slots[s]
        for s in [s for s in self._slots if s <= n and self._slots[s].committed is None]:
            del self._slots[s]
        for s in [s for s in self._ckpt_votes if s <= n]:
            del self._ckpt_votes[s]
        for s in [s for s in self._ckpt_digests if s < n]:
            del self._ckpt_digests[s]
        for s in [s for s in self._certified if s <= self.last_executed]:
            del self._certified[s]
        self._trim_decided()
        if self.last_executed >= n:
            self._persist_stable()
        after = self.validators
        if after != before:
            self._on_reconfigured(n + 1, after)
        if propose:
            self._propose()

    def _persist_stable(self) -> None:
        """The reply table goes in whole only into the first stable record this object writes;
        later ones carry the rows changed since the previous one (``clients+``), and
        :func:`~.records.compact_records` folds them together. A record per decision that
        repeated every client's last reply grew with the swarm (25 KB at 128 clients)."""
        rec: dict[str, Any] = {
            "k": "stable",
            "n": self.stable_seq,
            "d": self._stable_digest,
            "C": list(self._stable_proof),
            "cfg": [[first, list(vals)] for first, vals in self._configs],
        }
        changed = self._clients_changed
        if changed is None:
            rec["clients"] = [[c, t, r] for c, (t, r) in sorted(self._clients.items())]
        else:
            rec["clients+"] = [[c, *self._clients[c]] for c in sorted(changed)]
        self._clients_changed = set()
        self._persist(rec)

    def _on_reconfigured(self, first: int, validators: tuple[bytes, ...]) -> None:
        """A new validator set is in force: primaries, quorums and votes are counted anew."""
        self._out.append(Reconfigured(first, validators))
        self._vcs.clear()
        self._assigned.clear()
        self._next_seq = max(self._next_seq, first)
        if self.me not in validators:
            self._timers.pop(TIMER_VIEW, None)

    def _adopt_proof(self, proof: tuple[bytes, ...]) -> None:
        """A checkpoint proof from a peer: becomes our stable checkpoint once our state matches."""
        if not proof:
            return
        first = self._open(proof[0])
        ck = Checkpoint.parse(first.body) if first is not None else None
        if ck is None or ck.seq <= self.stable_seq:
            return
        d = check_checkpoint_proof(proof, ck.seq, self.validators_for, self._open)
        if isinstance(d, str):
            self._count("bad_checkpoint_proof")
            return
        if ck.seq > self.last_executed:
            self._stable_target = max(self._stable_target, ck.seq)
        elif self._ckpt_digests.get(ck.seq) == d:
            self._make_stable(ck.seq, d, proof)

    # ------------------------------------------------------------------ view change

    def _on_view_timer(self) -> None:
        if self.me not in self.validators:
            return
        if not self.active or self._pending or self._fill_to():
            self._start_view_change(self.view + 1)

    def _start_view_change(self, view: int) -> None:
        self.view = view
        self.active = False
        self._nv_raw = None
        self._backoff += 1
        self._timers.pop(TIMER_VIEW, None)
        for slot in self._slots.values():
            slot.forget_views_below(view)
        for v in [v for v in self._vcs if v < view]:
            del self._vcs[v]
        if self._my_vc is not None and self._my_vc[0] == view:
            body = self._my_vc[1]  # restored: re-send what we already said for this view
        else:
            prepared = [
                s.prepared.proof()
                for n, s in sorted(self._slots.items())
                if n > self.stable_seq and s.prepared is not None
            ]
            body = ViewChange(view, self.stable_seq, self._stable_proof, tuple(prepared)).body()
            self._my_vc = (view, body)
        self._persist({"k": "view", "v": view, "a": False})
        raw = self._seal(VIEWCHANGE, body)
        self._persist({"k": "sent", "m": raw})
        self._broadcast(raw)
        self._add_own_vc(raw)
        self._check_vc_quorum()

    def _add_own_vc(self, raw: bytes) -> None:
        env = self._open(raw)
        if env is not None:
            checked = check_view_change(env, self.validators_for, self._open, self.cfg.window)
            if isinstance(checked, str):
                self._count("own_viewchange_invalid")
            else:
                self._vcs.setdefault(checked.vc.view, {})[self.me] = checked

    def _on_viewchange(self, env: Envelope) -> None:
        checked = check_view_change(env, self.validators_for, self._open, self.cfg.window)
        if isinstance(checked, str):
            self._count("invalid_viewchange")
            return
        v = checked.vc.view
        if v < self.view or (v == self.view and self.active):
            if self.active and self._nv_raw is not None:
                self._help(env.sender, self.last_executed + 1, checked.vc.stable_seq, newview=True)
            return
        for w in list(self._vcs):  # keep one view-change per sender, its latest: bounded memory
            by = self._vcs[w]
            if env.sender in by and w != v:
                if w > v:
                    return
                del by[env.sender]
                if not by:
                    del self._vcs[w]
        self._vcs.setdefault(v, {})[env.sender] = checked
        # f+1 replicas are already in later views: at least one is honest, so follow them.
        later: dict[bytes, int] = {}
        for w, by in self._vcs.items():
            if w > self.view:
                for s in by:
                    later[s] = min(later.get(s, w), w)
        if len(later) >= self._f + 1 and self._voter:
            self._start_view_change(min(later.values()))
            return
        self._check_vc_quorum()

    def _check_vc_quorum(self) -> None:
        if self.active:
            return
        vcs = self._vcs.get(self.view, {})
        if len(vcs) < self._q:
            return
        self._arm_view()
        if self.is_primary and self.view not in self._nv_sent and self.me in vcs:
            chosen = [vcs[s] for s in sorted(vcs)][: self._q]
            if self.me not in (c.sender for c in chosen):
                chosen = [vcs[self.me], *[c for c in chosen if c.sender != self.me]][: self._q]
            self._send_newview(chosen)

    def _send_newview(self, chosen: list[CheckedViewChange]) -> None:
        plan = plan_new_view(chosen)
        pps: list[tuple[PrePrepare, bytes]] = []
        for n, (_, batch) in sorted(plan.slots.items()):
            pp = PrePrepare.make(self.view, n, batch)
            pps.append((pp, self._seal(PREPREPARE, pp.body())))
        nv = NewView(self.view, tuple(c.raw for c in chosen), tuple(r for _, r in pps))
        raw = self._seal(NEWVIEW, nv.body())
        self._nv_sent.add(self.view)
        self._install(plan, pps, raw)
        self._persist({"k": "sent", "m": raw})
        self._broadcast(raw)
        self._propose()

    def _on_newview(self, env: Envelope) -> None:
        nv = NewView.parse(env.body)
        if nv is None:
            self._count("malformed_body")
            return
        if nv.view < self.view or (nv.view == self.view and self.active):
            return
        got = check_new_view(env, self.validators, self.validators_for, self._open, self.cfg.window)
        if isinstance(got, str):
            self._count("invalid_newview")
            return
        _, plan, pps = got
        self.view = nv.view
        for slot in self._slots.values():
            slot.forget_views_below(nv.view)
        self._install(plan, pps, env.raw)
        for client, (_, raw) in self._pending.items():
            if self._assigned.get(client, 0) < self._pending[client][0]:
                self._send(self.primary, raw)

    def _install(
        self, plan: NewViewPlan, pps: list[tuple[PrePrepare, bytes]], nv_raw: bytes
    ) -> None:
        """Enter the new view: adopt its checkpoint, accept its re-proposals, prepare them."""
        self.active = True
        self._nv_raw = nv_raw
        self._timers.pop(TIMER_VIEW, None)
        for v in [v for v in self._vcs if v <= self.view]:
            del self._vcs[v]
        self._next_seq = max(plan.max_seq, plan.stable_seq) + 1
        self._persist({"k": "view", "v": self.view, "a": True, "nv": nv_raw, "n": self._next_seq})
        if plan.stable_seq > self.stable_seq:
            mine = self._ckpt_digests.get(plan.stable_seq)
            if plan.stable_seq <= self.last_executed and mine == plan.stable_digest:
                self._make_stable(
                    plan.stable_seq, plan.stable_digest, plan.checkpoint_proof, propose=False
                )
            else:
                # Certified by a quorum: raise the low watermark even before our state gets there
                # (sync brings the entries), so nothing at or below it can be prepared again.
                if plan.stable_seq <= self.last_executed:
                    self._count("state_divergence")
                self._stable_target = max(self._stable_target, plan.stable_seq)
                self.stable_seq = plan.stable_seq
                self._stable_digest = plan.stable_digest
                self._stable_proof = plan.checkpoint_proof
                for s in [s for s in self._slots if s <= self.stable_seq]:
                    if self._slots[s].committed is None:
                        del self._slots[s]
        self._assigned = {}
        for pp, _ in pps:
            self._note_pending(pp.batch, assign=True)
        for pp, raw in pps:
            if pp.seq > self.stable_seq:
                self._accept_preprepare(pp, raw)
        if self._pending or self._fill_to():
            self._arm_view()

    # ------------------------------------------------------------------ retransmission, sync

    def _busy(self) -> bool:
        if not self.active or self._pending or self._lagging() or self._view_hint > self.view:
            return True
        if self._fill_to():  # null batches are due
            return True
        if self._my_ckpt is not None and self._my_ckpt.seq > self.stable_seq:
            return True
        return any(n > self.last_executed for n in self._slots)

    def _lagging(self) -> bool:
        if self.me not in self.validators:
            # joining (named by a scheduled set, or not yet aware of it): keep asking; removed: rest
            upcoming = [v for first, v in self._configs if first > self.stable_seq + 1]
            known = any(self.me in v for _, v in self._configs)
            return any(self.me in v for v in upcoming) or not known
        if self._stable_target > self.last_executed:
            return True
        claims = sorted(self._claims.values(), reverse=True)
        f = self._f
        return len(claims) > f and claims[f] > self.last_executed

    def _retransmit(self) -> None:
        """Re-send our own part of unfinished work that has not moved for a retransmit period
        (under steady load the timer is always armed, and re-sending slots, or a checkpoint,
        that are progressing only adds load); ask a peer for what we may be missing."""
        if self.active:
            for n, slot in sorted(self._slots.items()):
                if n <= self.last_executed or not self._in_window(n):
                    continue
                if slot.sent_at and self._now - slot.sent_at < self.cfg.retransmit_ms:
                    continue
                slot.sent_at = self._now
                acc = slot.preprepares.get(self.view)
                if self.is_primary and acc is not None and acc.batch is not None:
                    pp = PrePrepare(self.view, n, acc.digest, acc.batch)
                    self._broadcast(self._seal(PREPREPARE, pp.body()))
                d = slot.my_prepare.get(self.view)
                if d is not None:
                    self._broadcast(self._seal(PREPARE, Vote(self.view, n, d).body()))
                d = slot.my_commit.get(self.view)
                if d is not None:
                    self._broadcast(self._seal(COMMIT, Vote(self.view, n, d).body()))
            if self._voter and not self.is_primary:
                for client, (t, raw) in self._pending.items():
                    if self._assigned.get(client, 0) < t:
                        self._send(self.primary, raw)
        elif self._my_vc is not None and self._my_vc[0] == self.view:
            raw = self._seal(VIEWCHANGE, self._my_vc[1])
            self._broadcast(raw)
            if self.me not in self._vcs.get(self.view, {}):  # e.g. after a restart
                self._add_own_vc(raw)
                self._check_vc_quorum()
        ck = self._my_ckpt
        due = self._now - self._ckpt_sent_at >= self.cfg.retransmit_ms
        if ck is not None and ck.seq > self.stable_seq and due:
            self._ckpt_sent_at = self._now
            self._broadcast(self._seal(CHECKPOINT, ck.body()))
        # A status asks one peer for what we miss. While we make progress (under steady load
        # the timer fires every period) there is nothing to ask for: only when nothing moved
        # since the last period, when peers proved a stable checkpoint above what we executed,
        # or when we are out of the current view. (Peers' votes for the slot in flight make
        # ``_lagging`` true in the middle of every round, so it is no sign of being behind.)
        mark = (self.view, self.active, self.last_executed, self.stable_seq)
        stalled = self._status_mark in (None, mark)
        self._status_mark = mark
        behind = self._stable_target > self.last_executed or self._view_hint > self.view
        if self._busy() and (stalled or behind or not self.active):
            peers = [v for v in self.validators if v != self.me]
            if peers:
                to = peers[self._rr % len(peers)]
                self._rr += 1
                st = Status(self.view, self.active, self.last_executed, self.stable_seq)
                self._send(to, self._seal(STATUS, st.body()))

    def _on_status(self, env: Envelope) -> None:
        st = Status.parse(env.body)
        if st is None:
            self._count("malformed_body")
            return
        behind_view = self.active and (
            st.view < self.view or (st.view == self.view and not st.active)
        )
        if st.last_executed < self.last_executed or behind_view or st.stable_seq < self.stable_seq:
            self._help(env.sender, st.last_executed + 1, st.stable_seq, newview=behind_view)
        elif not self.active and st.view < self.view and self._my_vc is not None:
            self._send(env.sender, self._seal(VIEWCHANGE, self._my_vc[1]))

    def _help(self, to: bytes, first: int, stable: int, *, newview: bool = False) -> None:
        """Send a peer that is behind: decided entries from ``first``, our stable checkpoint's
        proof if theirs (``stable``) is older, the current new-view if asked (rate-limited)."""
        last = self._helped.get(to)
        if last is not None and self._now - last < self.cfg.retransmit_ms // 2:
            return
        self._helped[to] = self._now
        entries: list[Entry] = []
        size = 0
        n = first
        while n <= self.last_executed and len(entries) < self.cfg.sync_batch:
            e = self._decided.get(n)
            if e is None:
                break
            size += len(e.payload) + sum(len(c) for c in e.certificate)
            if entries and size > _SYNC_BYTES:  # stay well inside the envelope size limit
                break
            entries.append(e)
            n += 1
        nv = self._nv_raw if newview and self.active else None
        proof = self._stable_proof if self.stable_seq > stable else ()
        if not entries and nv is None and not proof:
            return
        self._send(to, self._seal(SYNC, Sync(tuple(entries), proof, nv).body()))

    def _deliver(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.seq != self.last_executed + 1:
                continue
            ok = verify_certificate(
                e.certificate,
                e.payload,
                self.validators_for(e.seq),
                self.cfg.swarm_id,
                seq=e.seq,
            )
            if not isinstance(ok, Verified):
                self._count("bad_certificate")
                return
            batch = requests_of(e.payload)
            if batch is None:  # a certified payload is well-formed; be defensive anyway
                self._count("malformed_body")
                return
            self._certified[e.seq] = Committed(ok.view, ok.digest, tuple(batch), e.certificate)
            self._try_execute()

    def _on_sync(self, env: Envelope) -> None:
        sync = Sync.parse(env.body)
        if sync is None:
            self._count("malformed_body")
            return
        self._deliver(sync.entries)
        self._adopt_proof(sync.checkpoint_proof)
        if sync.newview is not None:
            nve = self._open(sync.newview)
            if nve is not None and nve.type == NEWVIEW and self._authorized(nve.sender):
                self._on_newview(nve)

    # ------------------------------------------------------------------ restore

    def _apply_record(self, rec: Mapping[str, Any]) -> None:
        kind = rec.get("k")
        if kind == "seq":
            self._seq_reserved = max(self._seq_reserved, int(rec["upto"]))
            self._env_seq = self._seq_reserved
        elif kind == "view":
            self.view = int(rec["v"])
            self.active = bool(rec["a"])
            nv = rec.get("nv")
            self._nv_raw = nv if isinstance(nv, bytes) else None
            if self.active:
                self._next_seq = int(rec.get("n", self.stable_seq + 1))
        elif kind == "sent":
            self._restore_sent(rec["m"])
        elif kind == "prepared":
            pe = self._open(rec["pp"])
            pp = PrePrepare.parse(pe.body) if pe is not None else None
            if pp is not None and pp.seq > self.stable_seq:
                slot = self._slot(pp.seq)
                slot.prepared = PreparedCert(
                    pp.view, pp.digest, pp.batch, rec["pp"], tuple(rec["p"])
                )
        elif kind == "exec":
            self._restore_exec(rec)
        elif kind == "stable":
            self._restore_stable(rec)

    def _restore_sent(self, raw: bytes) -> None:
        env = self._open(raw)
        if env is None or env.sender != self.me:
            return
        if env.type == PREPREPARE:
            pp = PrePrepare.parse(env.body)
            if pp is not None and pp.seq > self.stable_seq:
                self._slot(pp.seq).preprepares[pp.view] = Accepted(pp.digest, pp.batch, raw)
                if pp.view == self.view:
                    self._next_seq = max(self._next_seq, pp.seq + 1)
        elif env.type in (PREPARE, COMMIT):
            vote = Vote.parse(env.body)
            if vote is None or vote.seq <= self.stable_seq:
                return
            slot = self._slot(vote.seq)
            if env.type == PREPARE:
                slot.my_prepare[vote.view] = vote.digest
                slot.prepares.setdefault(vote.view, {})[self.me] = (vote.digest, raw)
                slot.preprepares.setdefault(vote.view, Accepted(vote.digest))
            else:
                slot.my_commit[vote.view] = vote.digest
                slot.commits.setdefault(vote.view, {})[self.me] = (vote.digest, raw)
        elif env.type == VIEWCHANGE:
            vc = ViewChange.parse(env.body)
            if vc is not None:
                self._my_vc = (vc.view, env.body)
        elif env.type == NEWVIEW:
            nv = NewView.parse(env.body)
            if nv is not None:
                self._nv_sent.add(nv.view)
                for r in nv.preprepares:
                    self._restore_sent(r)

    def _restore_exec(self, rec: Mapping[str, Any]) -> None:
        n = int(rec["n"])
        if n != self.last_executed + 1:
            return
        batch = cbor2.loads(rec["p"])
        for raw, result in zip(batch, rec["r"], strict=False):
            env = self._open(raw)
            req = Request.parse(env.body) if env is not None else None
            if env is not None and req is not None and result is not None:
                self._clients[env.sender] = (req.timestamp, result)
                cur = self._pending.get(env.sender)
                if cur is not None and cur[0] <= req.timestamp:
                    del self._pending[env.sender]
        cfg = rec.get("cfg")
        if cfg is not None:
            self._configs = rescheduled(self._configs, int(cfg[0]), tuple(cfg[1]))
        self._state = rec["s"]
        self.last_executed = n
        self._decided[n] = Entry(n, int(rec["v"]), rec["p"], tuple(rec["c"]))
        self._trim_decided()
        if n % self.cfg.checkpoint_interval == 0:
            self._ckpt_digests[n] = self._state
        self._next_seq = max(self._next_seq, n + 1)

    def _restore_stable(self, rec: Mapping[str, Any]) -> None:
        n = int(rec["n"])
        if n < self.stable_seq:
            return
        self.stable_seq = n
        self._stable_digest = rec["d"]
        self._stable_proof = tuple(rec["C"])
        if self.last_executed < n:
            self.last_executed = n
            self._state = rec["d"]
            if "clients" in rec:
                self._clients = {c: (t, r) for c, t, r in rec["clients"]}
            self._clients.update((c, (t, r)) for c, t, r in rec.get("clients+", ()))
        self._configs = [(int(first), tuple(vals)) for first, vals in rec["cfg"]]
        for s in [s for s in self._slots if s <= n]:
            del self._slots[s]
        for s in [s for s in self._ckpt_digests if s < n]:
            del self._ckpt_digests[s]
        self._ckpt_digests[n] = rec["d"]
