"""The daemon's side of the shared task state: replica, store, gossip and anti-entropy.

Duties (docs/state-schema.md): an own entry is committed before it is sent; received entries are
committed in groups (one fsync per batch); one anti-entropy round runs before the first local
write after start-up; the replica is drained when the decided log advances, and rebuilt when a
decision sets a cut-off. Gossip is best effort; anti-entropy over ``/moss/sync/1`` repairs loss.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import cbor2
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..crypto.envelope import canonical
from ..protocols.crdt import Entry, Outcome, Replica
from ..protocols.membership import MembershipPolicy
from .host import read_frame, topic, widen_receive_window, write_frame
from .store import Store, commit_from_loop, load_replica

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("mossnode.state")
T = TypeVar("T")

SYNC_PROTO = TProtocol("/moss/sync/1")
PUBLISH_WINDOW_S = 0.005  # own entries written within this window share one gossip message
# A busy node publishes state at most this often: what it writes meanwhile shares a message.
# Each message costs every member a fixed price in py-libp2p (about a millisecond, whatever
# its size) and the mesh relays several copies of it; the tasks benchmark wrote ~2 entries per
# task, nearly one message each. An idle node's entry still goes out after PUBLISH_WINDOW_S.
PUBLISH_SPACING_S = 0.2
SYNC_INTERVAL_S = 10.0  # fallback only: presence says when a peer holds more (daemon._on_presence)
# Entries between snapshots. A restart verifies up to this many tail entries in full (about
# 1.5 s for 5,000 at ~3,000 entries/s); a snapshot blocks the loop for a pass over the document.
SNAPSHOT_EVERY = 5000
INLINE_COMMIT_ROWS = 64  # group commits up to this many entries are written on the event loop
MAX_BUNDLE = 256
# Anti-entropy frames: a catching-up node takes each frame in one receive_batch, so one frame
# is one group commit and one pass of the task service over what changed. 1024 entries keep a
# frame's processing near a quarter of a second; 2 MiB stays well inside host.MAX_FRAME.
SYNC_BATCH_ENTRIES = 2048
SYNC_BATCH_BYTES = 3 << 20
SYNC_WINDOW = 8 << 20  # a sync stream's receive window: the next frames wait in our buffers
# One round, on either side: a peer that stalls (sends no request, reads nothing) gives up its
# stream then, instead of holding a handler and a yamux stream for good.
SYNC_ROUND_S = 60.0
# While a sync stream runs, readers (the scheduler) are woken at most this often, and at its
# end: a catch-up of many frames is not interleaved with a derivation per frame. What changed
# reaches them at once (see ChangeBatch). A pass over a frame's new tasks costs about half of
# what applying them did, and the view it derives is of a half-synced log anyway: at one wake a
# second, a 10,000-entry catch-up ran four such passes before its digest matched (about a
# second of the catch-up's CPU, most of it when the machine is busy). The scheduler's own
# timers and other changes (gossip) still wake it meanwhile.
SYNC_NOTIFY_S = 5.0


# At most this many local writes share one entry (an entry is at most MAX_ENTRY_BYTES; a
# write that would overflow it makes the shared entry fail, and the writes go one by one).
MAX_WRITES_PER_ENTRY = 64


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sync_batch(frame: bytes) -> list[bytes] | None:
    """One anti-entropy frame's entries, or None if no honest peer sends it. The entry count
    is read from the CBOR header before decoding: a 4 MiB frame of 1-byte entries would
    decode into millions of objects and take seconds of one synchronous receive_batch."""
    if not frame or frame[0] >> 5 != 4:  # major type 4: array
        return None
    info = frame[0] & 0x1F
    if info < 24:
        count = info
    elif 24 <= info <= 27:
        width = 1 << (info - 24)
        count = int.from_bytes(frame[1 : 1 + width], "big")
    else:  # indefinite length: canonical CBOR never has it
        return None
    if count > SYNC_BATCH_ENTRIES:
        return None
    try:
        batch = cbor2.loads(frame)
    except Exception:
        return None
    if not isinstance(batch, list) or not all(isinstance(b, bytes) for b in batch):
        return None
    return batch


def _sync_request(frame: bytes) -> tuple[dict[str, int], dict[str, bytes], dict[str, int]] | None:
    """A peer's ``summary()`` (vector, heads, blocked seqs), or None if malformed."""
    try:
        req = cbor2.loads(frame)
        if not isinstance(req, dict):
            return None
        parts = [req.get(k, {}) for k in ("vector", "heads", "blocked")]
        if not all(isinstance(p, dict) for p in parts):
            return None
        vector, heads, blocked = parts
        if not all(
            isinstance(a, str) and type(v) is int and v >= 0
            for m in (vector, blocked)
            for a, v in m.items()
        ) or not all(isinstance(a, str) and isinstance(h, bytes) for a, h in heads.items()):
            return None
        return vector, heads, blocked
    except Exception:
        return None


def _ignore(paths: list[tuple[Any, ...]] | None, wake: bool) -> None:
    pass


class ChangeBatch:
    """What one sync stream applies, handed to the reader: the changed paths at once, the
    wake-up at most every ``interval`` seconds (:meth:`add`) and at :meth:`flush`.

    Paths are never held back. The reader's view must not lag the replica: the bid-window
    gate (protocols/tasks/stability.py) compares the view's bids with how far the replica
    holds each author's entries, so a view missing entries the replica applied took a
    winner without bids it believed it held, and two nodes ran the same attempt. Only the
    wake-up is coalesced, so a catch-up of many frames is not a derivation per frame."""

    def __init__(
        self,
        deliver: Callable[[list[tuple[Any, ...]], bool], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deliver = deliver  # deliver(paths, wake)
        self.interval = interval
        self.clock = clock
        self.held = False  # a wake-up is owed for something added since the last one
        self.last = clock()

    def add(self, paths: list[tuple[Any, ...]]) -> None:
        self.held = True
        wake = self.clock() - self.last >= self.interval
        if wake:
            self.last = self.clock()
            self.held = False
        if paths or wake:
            self.deliver(list(paths), wake)

    def flush(self) -> None:
        self.last = self.clock()
        if self.held:
            self.held = False
            self.deliver([], True)


class _Write:
    """One local write waiting to share an entry with the writes made beside it."""

    __slots__ = ("done", "entry", "error", "fn", "paths", "result")

    def __init__(self, fn: Callable[[Any], Any], paths: list[tuple[Any, ...]] | None) -> None:
        self.fn = fn
        self.paths = paths
        self.done = trio.Event()
        self.result: Any = None
        self.entry = False  # it changed the document: an entry holds it
        self.error: Exception | None = None


class StateService:
    def __init__(self, daemon: Daemon, store: Store) -> None:
        self.d = daemon
        self.store = store
        state = daemon._swarm()
        self.policy = MembershipPolicy(state)
        restored = load_replica(store, daemon.identity, state.swarm_id, self.policy, now_ms())
        self.replica: Replica = restored.replica
        if restored.snapshot_problem:
            log.warning("snapshot not used: %s", restored.snapshot_problem)
        self.topic = topic(state.swarm_id, "state")
        self.counters: Counter[str] = Counter()
        self._to_commit: list[Entry] = []
        self._to_retract: dict[str, int] = {}  # {author: first seq to delete}, next commit
        self._writes: list[_Write] = []  # local writes of this pass of the loop, not yet written
        self._queued = 0  # entries ever queued for commit
        self._stored = 0  # entries ever committed
        # Highest own seq on disk: anti-entropy serves own entries only up to it (duty 1).
        self._durable_own = self.replica.vector().get(self.replica.me, 0)
        self._commit_wanted = trio.Event()
        self._committed = trio.Event()
        self._to_publish: list[bytes] = []
        self._publish_wanted = trio.Event()
        self._synced = trio.Event()
        self._since_snapshot = 0
        self._syncing: dict[str, trio.Event] = {}  # peer -> set when that round ends
        self._nursery: trio.Nursery | None = None
        # The scheduler's view refresh and wake-up: the document paths that changed (None:
        # unknown), and whether to wake it now (a sync stream wakes it at most every
        # SYNC_NOTIFY_S; its paths still arrive at once).
        self.on_change: Callable[[list[tuple[Any, ...]] | None, bool], None] = _ignore

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        pubsub = self.d.pubsub
        pubsub.set_topic_validator(self.topic, self._validate, False)
        sub = await pubsub.subscribe(self.topic)
        self.d.host.set_stream_handler(SYNC_PROTO, self._on_sync_stream)
        nursery.start_soon(self._drain_subscription, sub)
        nursery.start_soon(self._committer)
        nursery.start_soon(self._publisher)
        nursery.start_soon(self._sync_loop)

    # --- persistence ----------------------------------------------------------------------

    def _enqueue(self, entries: list[Entry]) -> None:
        self._to_commit.extend(entries)
        self._queued += len(entries)
        self._commit_wanted.set()

    def _queue(self, out: Outcome, changes: ChangeBatch | None = None) -> None:
        if out.applied:
            self._enqueue(out.applied)
        if out.rolled_back:
            # content vanished, at paths nobody observed: readers read everything again
            self.on_change(None, True)
        elif out.applied:
            if changes is None:
                self.on_change(list(out.changed), True)
            else:
                changes.add(out.changed)
        for ref in out.refused:
            self.counters[f"refused:{ref.rejection.reason.value}"] += 1
        if out.equivocations:
            self.counters["equivocations"] += len(out.equivocations)
            log.warning(
                "equivocation proven against %s",
                ", ".join(sorted({e.author for e in out.equivocations})),
            )
        if out.retracted:
            self._retract(out)

    def _retract(self, out: Outcome) -> None:
        """Drop retracted entries from the store, in the committer's next transaction (its
        DELETE runs before its INSERTs). Deleting at once let the committer store them again
        afterwards: they may still wait in ``_to_commit``, or in a commit under way."""
        gone = {(e.author, e.seq) for e in out.retracted}
        self._to_commit = [e for e in self._to_commit if (e.author, e.seq) not in gone]
        for author, first in out.retract_from().items():
            self._to_retract[author] = min(first, self._to_retract.get(author, first))
        self._commit_wanted.set()

    async def _committer(self) -> None:
        """Group commit: whatever arrived since the last fsync goes in one transaction."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            batch, self._to_commit = self._to_commit, []
            retract, self._to_retract = self._to_retract, {}
            upto = self._queued
            rows = [(e.author, e.seq, e.data) for e in batch]
            snapshot = None
            self._since_snapshot += len(rows)
            if self._since_snapshot >= SNAPSHOT_EVERY:
                # No await since the swap: the replica holds exactly what is stored plus rows.
                self._since_snapshot = 0
                snapshot = (self.replica.snapshot(), self.replica.vector(), now_ms())
            # Large batches (catch-up, a snapshot) go to a worker thread, so the loop keeps
            # applying meanwhile.
            small = snapshot is None and len(rows) <= INLINE_COMMIT_ROWS
            await commit_from_loop(
                self.store, in_place=small, entries=rows, snapshot=snapshot, retract=retract
            )
            self.counters["stored"] += len(rows)
            self._stored = upto
            # Own entries go out only now that they are durable, in seq order.
            me = self.replica.me
            own = [e for e in batch if e.author == me]
            if own:
                self._durable_own = max(self._durable_own, own[-1].seq)
                self._to_publish.extend(e.data for e in own)
                self._publish_wanted.set()
            done, self._committed = self._committed, trio.Event()
            done.set()

    async def _persisted(self) -> None:
        """Wait until everything queued so far is on disk (group commit)."""
        target = self._queued
        while self._stored < target:
            await self._committed.wait()

    async def wait_synced(self, limit_s: float) -> None:
        """Until the first anti-entropy round after start-up has ended, or ``limit_s``."""
        if not self._synced.is_set():
            with trio.move_on_after(limit_s):
                await self._synced.wait()

    # --- local writes ---------------------------------------------------------------------

    async def write(self, fn: Callable[[Any], T], paths: list[tuple[Any, ...]] | None = None) -> T:
        """Run one local write; returns once the entry holding it is durable (then it is
        gossiped). Raises what ``fn`` or the replica raised (WriteRefused), nothing written.

        Writes made in the same pass of the event loop (concurrent API calls, the scheduler's
        tick) share one signed entry: one signature, and one entry for every member to verify,
        apply and store, instead of one per write.

        ``paths``: the document paths it writes (``("tasks", tid)`` or, for one key of the
        task's map, ``("tasks", tid, key)``), so readers refresh only those."""
        # Duty 2: the first anti-entropy round after a start must end before this node signs,
        # so that a node restored from an old backup learns its own later entries first and
        # never signs those seqs again. A round ends or is cut off within SYNC_ROUND_S; a
        # shorter wait let a slow catch-up's first write re-use a seq (an equivocation).
        await self.wait_synced(SYNC_ROUND_S + 5)
        job = _Write(fn, paths)
        self._writes.append(job)
        if len(self._writes) == 1:
            # The first writer of this pass lets the writers runnable now join, then writes
            # for all of them; shielded, so the others' writes happen even if it is cancelled.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._write_queued()
        else:
            await job.done.wait()
        if job.error is not None:
            raise job.error
        if job.entry:
            await self._persisted()
        return cast(T, job.result)

    def _write_queued(self) -> None:
        """Write the queued writes, up to MAX_WRITES_PER_ENTRY to an entry. Synchronous from
        signing to queueing, so seqs reach the store in order; writers then share group
        commits (no lock held)."""
        queued, self._writes = self._writes, []
        for i in range(0, len(queued), MAX_WRITES_PER_ENTRY):
            self._write_shared(queued[i : i + MAX_WRITES_PER_ENTRY])

    def _write_shared(self, jobs: list[_Write]) -> None:
        """``jobs`` as one entry; if that is refused or fails, each on its own, so that only
        the offending write fails."""
        if len(jobs) > 1:
            try:
                results, entry = self.replica.write(lambda w: [j.fn(w) for j in jobs], now_ms())
            except Exception:
                pass
            else:
                paths = (
                    None
                    if any(j.paths is None for j in jobs)
                    else [p for j in jobs for p in j.paths or ()]
                )
                self._wrote(entry, paths, len(jobs))
                for j, result in zip(jobs, results, strict=True):
                    j.result, j.entry = result, entry is not None
                    j.done.set()
                return
        for j in jobs:
            try:
                j.result, entry = self.replica.write(j.fn, now_ms())
            except Exception as exc:
                j.error = exc
            else:
                j.entry = entry is not None
                self._wrote(entry, j.paths, 1)
            j.done.set()

    def _wrote(self, entry: Entry | None, paths: list[tuple[Any, ...]] | None, n: int) -> None:
        if entry is not None:
            self._enqueue([entry])
            self.on_change(paths, True)
            self.counters["written"] += n
            self.counters["entries_written"] += 1

    async def _publisher(self) -> None:
        last = -PUBLISH_SPACING_S
        while True:
            await self._publish_wanted.wait()
            # an idle node publishes within PUBLISH_WINDOW_S; a busy one at most every
            # PUBLISH_SPACING_S, so that what it wrote meanwhile shares one message
            await trio.sleep(max(PUBLISH_WINDOW_S, last + PUBLISH_SPACING_S - trio.current_time()))
            last = trio.current_time()
            self._publish_wanted = trio.Event()
            while self._to_publish:
                bundle = self._to_publish[:MAX_BUNDLE]
                del self._to_publish[:MAX_BUNDLE]
                try:
                    await self.d.pubsub.publish(self.topic, canonical(bundle))
                    self.counters["bundles_out"] += 1
                except Exception as exc:  # gossip is best effort; anti-entropy repairs
                    log.debug("state publish failed: %s", exc)

    # --- receiving ------------------------------------------------------------------------

    def _validate(self, forwarder: ID, msg: Any) -> bool:
        """Topic validator: apply the bundle's signed entries; relay only if none was refused."""
        if forwarder == self.d.host.get_id():
            return True  # our own publish: already applied and stored
        try:
            bundle = cbor2.loads(bytes(msg.data))
        except Exception:
            self.d.rejected["malformed"] += 1
            return False
        if (
            not isinstance(bundle, list)
            or not bundle
            or len(bundle) > MAX_BUNDLE
            or not all(isinstance(b, bytes) for b in bundle)
        ):
            self.d.rejected["malformed"] += 1
            return False
        out = self.replica.receive_batch(bundle, now_ms())
        self._queue(out)
        self.counters["received"] += len(bundle)
        fresh = [r for r in out.refused if r.rejection.reason.value != "replay"]
        if fresh:
            for r in fresh:
                self.d.rejected[r.rejection.reason.value] += 1
            return False
        return len(out.refused) < len(bundle)  # relay what is new to us

    async def _drain_subscription(self, sub: Any) -> None:
        while True:
            await sub.get()  # the validator did the work; keep the channel empty

    def on_decided(self, cutoff: bool) -> None:
        """The decided log advanced: entries waiting on it may apply; cut-offs need a rebuild."""
        out = self.replica.rebuild(now_ms()) if cutoff else self.replica.drain(now_ms())
        self._queue(out)

    # --- anti-entropy ---------------------------------------------------------------------

    def total(self) -> int:
        """Entries applied here, from all authors (compared with peers' presence)."""
        return sum(self.replica.vector().values())

    def summary(self) -> dict[str, Any]:
        return {
            "vector": self.replica.vector(),
            "heads": self.replica.heads(),
            "blocked": self.replica.blocked_seqs(),
        }

    async def _sync_loop(self) -> None:
        first = True
        while True:
            peers = [str(p) for p in self.d.host.get_connected_peers()]
            members = [p for p in peers if self.d._swarm().by_peer_id(p) is not None]
            if members:
                peer = random.choice(members)
                await self.sync_from(peer)
            if first and (members or time.monotonic() - self.d.started > 3):
                first = False
                self._synced.set()
            await trio.sleep(SYNC_INTERVAL_S if not first else 0.5)

    def trigger_sync(self, peer: str) -> None:
        if self._nursery is not None and peer not in self._syncing:
            self._nursery.start_soon(self.sync_from, peer)

    async def sync_from(self, peer: str) -> int:
        """Pull what ``peer`` has and we lack; returns how many entries arrived."""
        running = self._syncing.get(peer)
        if running is not None:  # a round with this peer is under way: it counts as this one
            await running.wait()
            return 0
        done = self._syncing[peer] = trio.Event()
        got = 0
        changes = ChangeBatch(lambda paths, wake: self.on_change(paths, wake), SYNC_NOTIFY_S)
        try:
            with trio.move_on_after(SYNC_ROUND_S):
                stream = await self.d.host.new_stream(ID.from_base58(peer), [SYNC_PROTO])
                try:
                    await widen_receive_window(stream, SYNC_WINDOW)
                    await write_frame(stream, canonical(self.summary()))
                    while True:
                        batch = _sync_batch(await read_frame(stream))
                        if batch is None:  # the round ends; what arrived before is kept
                            self.d.rejected["malformed"] += 1
                            log.debug("sync from %s: malformed frame", peer)
                            break
                        if not batch:
                            self.counters["sync_rounds"] += 1
                            break
                        self._queue(self.replica.receive_batch(batch, now_ms()), changes)
                        got += len(batch)
                        await trio.sleep(0)
                finally:
                    await stream.close()
            self.counters["sync_entries"] += got
        except Exception as exc:
            log.debug("sync from %s failed: %s", peer, exc)
        finally:
            del self._syncing[peer]
            done.set()
            changes.flush()
        return got

    async def _on_sync_stream(self, stream: INetStream) -> None:
        try:
            with trio.move_on_after(SYNC_ROUND_S):
                await self._serve_sync(stream)
        except Exception as exc:
            log.debug("sync stream: %s", exc)
        finally:
            await stream.close()

    async def _serve_sync(self, stream: INetStream) -> None:
        remote = str(stream.muxed_conn.peer_id)
        if self.d._swarm().by_peer_id(remote) is None:
            self.d.rejected["not_member"] += 1
            return  # non-members learn nothing of the task state
        req = _sync_request(await read_frame(stream, 4 << 20))
        if req is None:
            self.d.rejected["malformed"] += 1
            log.debug("sync request from %s: malformed", remote)
            return
        vector, heads, blocked = req
        for batch in self.replica.missing_for(
            vector,
            heads,
            blocked,
            max_entries=SYNC_BATCH_ENTRIES,
            max_bytes=SYNC_BATCH_BYTES,
            upto={self.replica.me: self._durable_own},
        ):
            await write_frame(stream, canonical(batch))
        await write_frame(stream, canonical([]))

    # --- views ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "entries": sum(self.replica.vector().values()),
            "pending": self.replica.pending_count(),
            "blocked_authors": sorted(self.replica.blocked_authors()),
            "counters": dict(self.counters),
        }
