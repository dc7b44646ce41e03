"""The decided log's consensus as an I/O service: libp2p streams, trio timers, SQLite records.

All decisions are made by :class:`~mossnode.protocols.decisions.ConsensusCore` (sans-IO). This
module moves its bytes and keeps its promises:

- calls into the core are synchronous (trio never switches inside one), and their outputs are
  persisted in call order by one committer task: every output that arrived while the previous
  write was under way goes into the next SQLite transaction (replica records, client state and
  new decided-log entries, ONE fsync), and only then are their messages sent, in order; so a
  restarted validator can never contradict what it sent, and a burst costs one fsync. The one
  exception: sends the core emitted before any record of their output (``Output.free_sends``:
  the replies and checkpoint of a batch just executed, ahead of its exec record) go out as
  soon as everything queued before them is durable, without waiting for their own write;
- PBFT envelopes travel over ``/moss/pbft/1``: one long-lived outbound stream per peer, frames
  length-prefixed and written together when several are queued, sends best-effort (a full
  queue or a broken stream drops; the core retransmits). A client that is not a validator and
  reaches the validators through another node (a gateway, e.g. the benchmark's) gets its
  replies back through that node;
- state transfer over ``/moss/decided/1``: a node behind asks a peer for entries from its
  height on, in pages, and verifies every certificate before applying (:meth:`ingest`, which
  the daemon also calls with entries it gets from gossip or a join; :func:`fetch_log` pages a
  whole log into a scratch state for a joining node);
- ``on_decided(entries)`` is awaited with every new entry, in order, once it is durable: all
  the entries that became durable since the previous call at once (a decided batch), so that
  what the node does per decision (rebuild views, wake the scheduler) is done once per batch.

Records live in the store's ``meta`` table: ``pbft/rec/<i>`` (CBOR, i < ``pbft/rec/n``) for the
replica, compacted after stable checkpoints; ``pbft/client`` for the proposer's timestamps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cbor2
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..crypto.envelope import DEFAULT_MAX_SIZE, canonical
from ..crypto.identity import Identity
from ..crypto.peerid import peer_id_from_public_key
from ..protocols.decisions import (
    NOOP,
    ConsensusCore,
    ConsensusMembership,
    Extension,
    Output,
    encode_op,
    pbft_config,
)
from ..protocols.membership import Entry, Genesis, MembershipError
from ..protocols.pbft import compact_records
from ..protocols.pbft.messages import REQUEST
from .host import read_frame, write_frame
from .links import FrameReader, Links, close_stream
from .store import Decided as StoredDecided
from .store import Store, commit_from_loop

log = logging.getLogger("mossnode.consensus")

PBFT_PROTO = TProtocol("/moss/pbft/1")
DECIDED_PROTO = TProtocol("/moss/decided/1")

REC_PREFIX = "pbft/rec/"
REC_COUNT = "pbft/rec/n"
CLIENT_KEY = "pbft/client"
COMPACT_AFTER = 64  # records kept before a compaction is tried
MAX_FRAME = DEFAULT_MAX_SIZE + 1024
PEER_QUEUE = 1024
PULL_BATCH = 256
PULL_BYTES = 2 << 20
MAX_QUEUED = 512  # outputs waiting for the committer before readers wait for it too
ROUTES = 4096  # client peer id -> the gateway its requests came through


class ConsensusError(Exception):
    """A proposal could not be decided; the message is for the user."""


class ProposalRefused(ConsensusError):
    """The operation is invalid: refused locally, or decided as a no-op by the validators."""


class ProposalTimeout(ConsensusError):
    """Not decided in time. The request stays queued and may still be decided later."""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def load_membership(
    store: Store, genesis: Genesis, extensions: dict[str, Extension] | None = None
) -> ConsensusMembership:
    """The decided-log state at start-up: genesis plus the stored log, every certificate
    verified again (raises MembershipError naming the first bad entry)."""
    state = ConsensusMembership(genesis, extensions=dict(extensions or {}))
    for d in store.decided():
        entry = Entry(d.seq, d.kind, cbor2.loads(d.payload), list(cbor2.loads(d.cert)))
        state.apply(entry)
    return state


def load_records(store: Store) -> list[dict[str, Any]]:
    raw = store.get_meta(REC_COUNT)
    n = int(raw) if raw else 0
    out: list[dict[str, Any]] = []
    for i in range(n):
        rec = store.get_meta(_rec_key(i))
        if rec is None:
            raise MembershipError(f"{store.path}: PBFT record {i} of {n} is missing")
        out.append(cbor2.loads(rec))
    return out


def _rec_key(i: int) -> str:
    return f"{REC_PREFIX}{i:08d}"


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    seq: int = 0


async def pull_pages(
    stream: INetStream, start: int, *, limit: int = PULL_BATCH
) -> tuple[list[Entry], int]:
    """One page of a peer's decided log from ``start`` on, and the peer's height."""
    await write_frame(stream, canonical({"from": start, "max": limit}))
    reply = cbor2.loads(await read_frame(stream, 4 * PULL_BYTES))
    if not isinstance(reply, dict):
        raise MembershipError("malformed decided-log page")
    entries = [Entry.from_wire(w) for w in reply.get("entries", [])]
    height = reply.get("height")
    return entries, height if type(height) is int else 0


async def fetch_log(
    host: IHost,
    peer: ID,
    state: ConsensusMembership,
    height: int,
    timeout_s: float = 60.0,
    *,
    page: int = PULL_BATCH,
) -> None:
    """Page a peer's decided log into ``state`` until it reaches ``height``, every certificate
    verified before the entry is applied (raises MembershipError on a bad entry, a peer that
    stops short, or a timeout). For a joining node, before it has a store to ingest into."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream = await host.new_stream(peer, [DECIDED_PROTO])
        except Exception as exc:
            raise MembershipError(f"cannot open the decided log stream: {exc}") from None
        try:
            while state.height < height:
                try:
                    entries, _ = await pull_pages(stream, state.height + 1, limit=page)
                except MembershipError:
                    raise
                except Exception as exc:  # reset, oversized or garbled page
                    raise MembershipError(f"decided log transfer failed: {exc}") from None
                if not entries:
                    raise MembershipError(f"the peer's log stops at {state.height} of {height}")
                for e in entries:
                    if e.seq == state.height + 1:
                        state.apply(e)
        finally:
            await close_stream(stream)
    if scope.cancelled_caught:
        raise MembershipError(f"decided log transfer timed out at {state.height} of {height}")


class ConsensusService:
    """One node's consensus I/O. See the module docstring; construct, then ``nursery.start(run)``."""

    def __init__(
        self,
        identity: Identity,
        membership: ConsensusMembership,
        store: Store,
        host: IHost,
        *,
        on_decided: Callable[[list[Entry]], Awaitable[None]] | None = None,
        now_ms: Callable[[], int] = wall_ms,
        view_timeout_ms: int = 2_000,
        retransmit_ms: int = 500,
        client_retransmit_ms: int = 1_000,
        sync_interval_s: float = 10.0,  # fallback: presence heights trigger catch-up at once
    ) -> None:
        if not isinstance(membership, ConsensusMembership):
            raise TypeError("ConsensusService needs a ConsensusMembership (see load_membership)")
        self.identity = identity
        self.state = membership
        self.store = store
        self.host = host
        self.on_decided = on_decided
        self.now_ms = now_ms
        self.sync_interval_s = sync_interval_s
        cfg = pbft_config(
            membership.swarm_id, view_timeout_ms=view_timeout_ms, retransmit_ms=retransmit_ms
        )
        self._records = load_records(store)
        client_raw = store.get_meta(CLIENT_KEY)
        self.core = ConsensusCore(
            identity,
            membership,
            cfg,
            records=self._records,
            client_state=cbor2.loads(client_raw) if client_raw else None,
            client_retransmit_ms=client_retransmit_ms,
        )
        self.counters: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        self._queue: list[Output] = []  # outputs waiting for the committer, in call order
        self._queue_done = trio.Event()  # set when the outputs queued now are released
        self._queue_wake = trio.Event()
        self._committing = False
        self._via: dict[str, str] = {}  # client peer id -> gateway peer id (replies go there)
        self._validator_pids: tuple[int, frozenset[str]] = (-1, frozenset())
        self._links = Links(host, PBFT_PROTO, self.counters, prefix="msg_", queue=PEER_QUEUE)
        self._timers: dict[tuple[str, str], int] = {}
        self._timer_wake = trio.Event()
        self._sync_wanted = trio.Event()
        self._height_changed = trio.Event()
        self._want_height = 0
        self._waiters: dict[int, _Waiter] = {}
        self._rr = 0
        send, recv = trio.open_memory_channel[list[Entry]](float("inf"))
        self._notify_send, self._notify_recv = send, recv
        self._broken: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: sets both stream handlers, restores the replica, runs timers,
        state transfer and the on_decided feed."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._links.bind(nursery)
            self.host.set_stream_handler(PBFT_PROTO, self.stream_handler)
            self.host.set_stream_handler(DECIDED_PROTO, self.decided_stream_handler)
            nursery.start_soon(self._committer)
            await self._drive(self.core.start)
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._notify_loop)
            task_status.started()

    @property
    def is_validator(self) -> bool:
        return self.core.is_validator

    def status(self) -> dict[str, Any]:
        return {**self.core.status(), "io": dict(self.counters)}

    # -- proposing --------------------------------------------------------------------------

    async def propose(self, kind: str, payload: dict[str, Any], timeout_s: float = 30.0) -> Entry:
        """Decide one operation through PBFT and return its decided-log entry.

        Raises :class:`ProposalRefused` if the operation is invalid (checked locally first, and
        again by the validators, whose verdict is final) and :class:`ProposalTimeout` if it is
        not decided within ``timeout_s``.
        """
        op = encode_op(kind, payload)
        me = self.identity.public_key
        kind_now, body = self.state.judge(me, self.now_ms(), op)
        if kind_now == NOOP:
            raise ProposalRefused(f"{kind} refused: {body.get('error', 'invalid operation')}")
        waiter = _Waiter()
        t = 0

        def submit(now: int) -> Output:
            nonlocal t
            t, out = self.core.submit(op, now)
            self._waiters[t] = waiter
            return out

        await self._drive(submit)
        try:
            with trio.fail_after(timeout_s):
                await waiter.done.wait()
                while self.state.height < waiter.seq:
                    self._want_height = max(self._want_height, waiter.seq)
                    self._sync_wanted.set()
                    await self._height_changed.wait()
        except trio.TooSlowError:
            vals = self.state.validators()
            up = {str(p) for p in self.host.get_connected_peers()}
            reach = sum(1 for v in vals if v == me or peer_id_from_public_key(v) in up)
            raise ProposalTimeout(
                f"{kind} was not decided within {timeout_s:g} s ({reach} of {len(vals)} "
                "validators reachable); the request stays queued and may still be decided"
            ) from None
        finally:
            self._waiters.pop(t, None)
        entry = self.state.entries[waiter.seq - 1]
        if self.state.origin.get(entry.seq) != (me, t):
            raise ProposalRefused(
                f"{kind} was not executed (seq {entry.seq} holds another request)"
            )
        if entry.kind == NOOP:
            error = entry.payload.get("error", entry.payload.get("reason"))
            raise ProposalRefused(f"{kind} refused by the validators: {error}")
        return entry

    # -- state transfer ---------------------------------------------------------------------

    async def ingest(self, entries: Iterable[Entry]) -> int:
        """Verify and apply entries received from anywhere (a peer's log, gossip, a join reply);
        entries that do not continue the log are ignored. Returns how many were applied."""
        batch = list(entries)
        applied = 0
        before = self.state.height

        def call(now: int) -> Output:
            nonlocal applied
            applied, out = self.core.ingest(batch, now)
            return out

        await self._drive(call)
        if applied < sum(1 for e in batch if e.seq > before):
            self.counters["ingest_stopped"] += 1
            log.debug("state transfer stopped at %d: %s", self.state.height, self.core.last_refusal)
        return applied

    def entries_from(self, seq: int, limit: int = PULL_BATCH) -> list[Entry]:
        """Up to ``limit`` decided entries from ``seq`` on (at most ~2 MiB)."""
        out: list[Entry] = []
        size = 0
        for e in self.state.entries[max(seq - 1, 0) : max(seq - 1, 0) + limit]:
            size += len(e.certificate[0]) + sum(len(c) for c in e.certificate)
            if out and size > PULL_BYTES:
                break
            out.append(e)
        return out

    async def catch_up(self, peer: str, timeout_s: float = 10.0) -> int:
        """Pull entries from ``peer`` until it has nothing more; returns how many applied."""
        got = 0
        with trio.move_on_after(timeout_s):
            try:
                stream = await self.host.new_stream(ID.from_base58(peer), [DECIDED_PROTO])
            except Exception as exc:
                self.counters["pull_failed"] += 1
                log.debug("pull from %s: %s", peer, exc)
                return 0
            try:
                while True:
                    entries, _ = await pull_pages(stream, self.state.height + 1)
                    if not entries:
                        break
                    n = await self.ingest(entries)
                    got += n
                    if n < len(entries):
                        break
            except Exception as exc:
                self.counters["pull_failed"] += 1
                log.debug("pull from %s: %s", peer, exc)
            finally:
                await close_stream(stream)
        self.counters["pulled"] += got
        return got

    # -- stream handlers --------------------------------------------------------------------

    async def stream_handler(self, stream: INetStream) -> None:
        """``/moss/pbft/1``: a sequence of frames, each one PBFT envelope. Frames are handed to
        the core as they come; only a long commit queue makes the reader wait."""
        reader = FrameReader(stream)
        try:
            remote = str(stream.muxed_conn.peer_id)
            while True:
                data = await reader.read(MAX_FRAME)
                self.counters["msg_in"] += 1
                await self._drive(partial(self.core.receive, data), wait=False)
                self._route(remote, data)
        except Exception as exc:  # EOF, reset, oversized frame: the peer re-opens
            log.debug("pbft stream ended: %s", exc)
        finally:
            await close_stream(stream)

    async def decided_stream_handler(self, stream: INetStream) -> None:
        """``/moss/decided/1``: requests ``{from, max}``, replies ``{entries, height}``.
        Members only (the log names every member and role)."""
        try:
            remote = str(stream.muxed_conn.peer_id)
            if self.state.by_peer_id(remote) is None:
                self.counters["pull_refused"] += 1
                return
            while True:
                req = cbor2.loads(await read_frame(stream, 4096))
                start, limit = int(req["from"]), min(int(req.get("max", PULL_BATCH)), 256)
                entries = self.entries_from(start, limit)
                reply = {"entries": [e.to_wire() for e in entries], "height": self.state.height}
                await write_frame(stream, canonical(reply))
                self.counters["served"] += len(entries)
        except Exception as exc:
            log.debug("decided stream ended: %s", exc)
        finally:
            await close_stream(stream)

    # -- driving the core -------------------------------------------------------------------

    async def _drive(self, call: Callable[[int], Output], wait: bool = True) -> None:
        """Run one core call and hand its output to the committer; with ``wait``, return once
        it is durable and its messages are out (without, only while the queue is short)."""
        if self._broken is not None:
            raise ConsensusError(f"consensus stopped: {self._broken}") from self._broken
        out = call(self.now_ms())
        if not self._queue and not self._committing and not _durable_part(out):
            self._release(out)  # nothing to write and nothing written before it is pending
            return
        self._queue.append(out)
        if not self._committing:
            self._release_free()
        done = self._queue_done
        self._queue_wake.set()
        if wait or len(self._queue) > MAX_QUEUED:
            await done.wait()
            if self._broken is not None:
                raise ConsensusError(f"consensus stopped: {self._broken}") from self._broken

    async def _committer(self) -> None:
        """Group commit: write every queued output in one transaction, then release them."""
        while True:
            await self._queue_wake.wait()
            self._queue_wake = trio.Event()
            while self._queue:
                batch, self._queue = self._queue, []
                done, self._queue_done = self._queue_done, trio.Event()
                self._committing = True
                try:
                    await self._persist(batch)
                except Exception as exc:
                    # Nothing may be sent that is not on disk: stop the service for good.
                    self._broken = exc
                    log.critical("consensus store write failed, stopping consensus: %s", exc)
                    done.set()
                    if self._nursery is not None:
                        self._nursery.cancel_scope.cancel()
                    raise
                finally:
                    self._committing = False
                for out in batch:
                    self._release(out)
                self._release_free()
                done.set()

    def _release_free(self) -> None:
        """Send the free sends (``Output.free_sends``) of queued outputs whose dependencies are
        durable: everything before the queue is written (the caller knows no write is under
        way), so the first output's are, and a later output's too while no output before it
        in the queue has anything to write. Their records are written afterwards as usual."""
        for out in self._queue:
            if out.free_sends:
                self._send_each(out.sends[: out.free_sends])
                del out.sends[: out.free_sends]
                out.free_sends = 0
                self.counters["sent_before_write"] += 1
            if _durable_part(out):
                break

    def _release(self, out: Output) -> None:
        """Carry out what a durable output asks for: sends, timers, notifications."""
        self._send_each(out.sends)
        if out.timers:
            for target, name, at in out.timers:
                self._timers[(target, name)] = at
            self._timer_wake.set()
        if out.entries:
            self._notify_send.send_nowait(out.entries)
            self._height_changed.set()
            self._height_changed = trio.Event()
        for t, seq in out.completed:
            w = self._waiters.get(t)
            if w is not None and seq:
                w.seq = seq
                w.done.set()
            if seq > self.state.height:
                self._want_height = max(self._want_height, seq)
                self._sync_wanted.set()

    async def _persist(self, outs: list[Output]) -> None:
        meta: dict[str, bytes] = {}
        decided: list[StoredDecided] = []
        records = [r for out in outs for r in out.records]
        if records:
            start = len(self._records)
            self._records.extend(records)
            if len(self._records) > COMPACT_AFTER and any(r.get("k") == "stable" for r in records):
                self._records = compact_records(self._records)
                start = 0
            for i in range(start, len(self._records)):
                meta[_rec_key(i)] = canonical(self._records[i])
            meta[REC_COUNT] = str(len(self._records)).encode()
        for out in outs:
            if out.client_state is not None:
                meta[CLIENT_KEY] = canonical(out.client_state)
            decided.extend(
                StoredDecided(e.seq, e.kind, canonical(e.payload), canonical(e.certificate))
                for e in out.entries
            )
        if meta or decided:
            await commit_from_loop(self.store, decided=decided, meta=meta)
            self.counters["commits"] += 1

    # -- network ----------------------------------------------------------------------------

    def _route(self, remote: str, data: bytes) -> None:
        """Remember the gateway of a client whose request reached us through another node that
        is not a validator (validators relay requests to the primary, and reply themselves)."""
        env = self.core.envelopes.peek(data)
        if env is None or env.type != REQUEST:
            return
        client = peer_id_from_public_key(env.sender)
        if client == remote:
            self._via.pop(client, None)
        elif remote not in self._validator_ids():
            self._via.pop(client, None)
            self._via[client] = remote
            if len(self._via) > ROUTES:
                del self._via[next(iter(self._via))]

    def _validator_ids(self) -> frozenset[str]:
        height, pids = self._validator_pids
        if height != self.state.height:
            pids = frozenset(peer_id_from_public_key(k) for k in self.state.validators())
            self._validator_pids = (self.state.height, pids)
        return pids

    def _send_each(self, sends: list[tuple[str, bytes]]) -> None:
        """Send in order, each peer's messages together (one write when its link is idle);
        the same bytes for several peers (a batch's ``pbft.replies`` for its clients) cross
        each route once: the clients behind one gateway share a copy."""
        last: bytes | None = None
        routes: set[str] = set()
        by_route: dict[str, list[bytes]] = {}
        for pid, data in sends:
            route = self._via.get(pid, pid)
            if data is not last:
                last, routes = data, set()
            elif route in routes:
                continue
            routes.add(route)
            by_route.setdefault(route, []).append(data)
        for route, datas in by_route.items():
            self._send(route, datas)

    def _send(self, route: str, datas: list[bytes]) -> None:
        self._links.send_many(route, datas)

    # -- background loops -------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            wake = self._timer_wake
            now = self.now_ms()
            due = sorted((at, key) for key, at in self._timers.items() if at <= now)
            for at, key in due:
                if self._timers.get(key) == at:
                    del self._timers[key]
                    await self._drive(partial(self.core.on_timer, key[0], key[1]))
            if due:
                continue
            nxt = min(self._timers.values(), default=None)
            delay = (nxt - now) / 1000 if nxt is not None else float("inf")
            with trio.move_on_after(max(delay, 0.001)):
                await wake.wait()
            if wake.is_set():
                self._timer_wake = trio.Event()

    def _sync_peers(self) -> list[str]:
        me = self.identity.public_key
        keys = [v for v in self.state.validators() if v != me]
        if not keys:
            keys = [k for k in sorted(self.state.members) if k != me]
        if not keys:
            return []
        self._rr += 1
        first = self._rr % len(keys)
        return [peer_id_from_public_key(k) for k in keys[first:] + keys[:first]]

    async def _sync_loop(self) -> None:
        """Every interval (or when asked), pull what one peer has beyond our height: an idle
        replica that missed decisions while it was down learns of them no other way. Costs one
        small request and an empty reply when nothing is new."""
        self._sync_wanted.set()
        while True:
            wanted = self._sync_wanted
            with trio.move_on_after(self.sync_interval_s):
                await wanted.wait()
            if wanted.is_set():
                self._sync_wanted = trio.Event()
            for peer in self._sync_peers()[:2]:
                if await self.catch_up(peer) and self._want_height <= self.state.height:
                    break
                if self._want_height <= self.state.height and not self._lagging():
                    break

    def _lagging(self) -> bool:
        r = self.core.replica
        return r is not None and r.lagging

    async def _notify_loop(self) -> None:
        async for entries in self._notify_recv:
            while True:  # everything that became durable meanwhile goes in the same call
                try:
                    entries = entries + self._notify_recv.receive_nowait()
                except trio.WouldBlock:
                    break
            if self.on_decided is None:
                continue
            try:
                await self.on_decided(entries)
            except Exception:
                log.exception("on_decided failed for #%d..#%d", entries[0].seq, entries[-1].seq)


def _durable_part(out: Output) -> bool:
    return bool(out.records or out.entries or out.client_state is not None)
