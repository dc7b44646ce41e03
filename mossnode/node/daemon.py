"""The mossnode daemon: wires the libp2p host, membership, presence and the local API together.

All decisions about messages are made by the sans-IO cores in ``protocols/`` and ``crypto/``;
this module only moves bytes, keeps timers and persists what the cores decided.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from .. import __version__
from ..crypto.envelope import (
    Envelope,
    Reason,
    Rejection,
    ReplayWindow,
    canonical,
    open_envelope,
    seal,
)
from ..crypto.identity import Identity
from ..crypto.peerid import peer_id_from_public_key, public_key_from_peer_id
from ..protocols import tasks as T
from ..protocols.crdt import WriteRefused
from ..protocols.decisions import (
    NOOP,
    TASK_ASSIGN,
    VOTE_CAST,
    VOTE_OPEN,
    VOTE_OUTCOME,
    ConsensusMembership,
    Extension,
    Poll,
    cast_payload,
    encode_op,
    exclusive_assignment,
    open_payload,
    outcome_payload,
    tally,
)
from ..protocols.membership import (
    Entry,
    Genesis,
    MembershipError,
    check_invite,
    decode_invite,
    make_invite,
    parse_genesis,
)
from ..protocols.presence import FailureDetector, presence_scale
from ..protocols.tasks import recurring
from ..protocols.tasks.schedules import SCHEDULE_ADD
from ..protocols.tasks.schedules import extensions as schedule_kinds
from . import systemd
from .agents import AgentRegistry
from .config import DB_FILE, LISTEN_FILE, SOCKET_FILE, Config
from .consensus import (
    ConsensusError,
    ConsensusService,
    ProposalRefused,
    ProposalTimeout,
    fetch_log,
    load_membership,
)
from .events import EventHub
from .host import FrameError, maddrs, make_host, make_pubsub, read_frame, topic, write_frame
from .ledger import FOUNDED_BEFORE_CONSENSUS, load_ledger, save_ledger
from .links import FrameReader, Links, close_stream
from .messaging import MSG_PROTO, TOPIC_NAME, MessagingService
from .state import StateService
from .store import Store, StoreError
from .tasks import TaskService, apply_writes, json_numbers, paths_of

log = logging.getLogger("mossnode")

# Young-generation collections every 50,000 net allocations instead of 700, full ones rarer: the
# daemon holds a large, growing, mostly acyclic heap (entry logs, the location index), which
# each collection walks again; almost everything is freed by reference counts anyway.
GC_THRESHOLDS = (50_000, 20, 100)


def _state_name(st: T.Status | None) -> str:
    """A task's state as the API names it (a task not derived yet is pending)."""
    return str(st.state) if st else "pending"


def tune_gc() -> None:
    """The daemon's garbage-collector settings (also applied by benchmarks of its parts)."""
    gc.set_threshold(*GC_THRESHOLDS)


JOIN_PROTO = TProtocol("/moss/join/1")
PRESENCE_PROTO = TProtocol("/moss/presence/1")
# one heartbeat in this many goes over gossip, the others straight to connected members
PRESENCE_GOSSIP_EVERY = 5
ADMIT_TIMEOUT_S = 25.0  # a joiner waits 30 s by default
LOCK_FILE = "daemon.lock"


def announces(me: bytes, validators: Sequence[bytes], seq: int, listeners: set[str]) -> bool:
    """Whether this validator gossips decided entry ``seq``: only if a peer that is no
    validator listens on the consensus topic (validators decide every entry themselves, so an
    all-validator swarm needs no announcement at all), and then only f + 1 validators, chosen
    by rotation with ``seq`` (at least one of them honest). Every gossiped copy costs each
    receiver a signature check and py-libp2p about a millisecond, and all validators used to
    announce every entry: at n = 4 that was about a third of a validator's CPU per decision.
    Members are connected directly (``_reconnect``), so a listening non-validator is a direct
    topic peer of every validator; gossip relays the f + 1 copies to the rest of the mesh."""
    if me not in validators:
        return False
    pids = {peer_id_from_public_key(v) for v in validators}
    if all(p in pids for p in listeners):
        return False
    n = len(validators)
    return (validators.index(me) - seq) % n <= (n - 1) // 3


def _log_decided(entries: list[Entry]) -> None:
    """One INFO line per decided batch (per entry at DEBUG): a swarm deciding hundreds of
    entries a second should not spend its time formatting log lines."""
    real = [e for e in entries if e.kind != NOOP]
    if log.isEnabledFor(logging.DEBUG):
        for e in entries:
            log.debug("decided #%d %s %s", e.seq, e.kind, e.payload.get("reason", ""))
    if len(real) == 1:
        log.info("decided #%d %s", real[0].seq, real[0].kind)
    elif real:
        kinds = Counter(e.kind for e in real)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        log.info("decided #%d..#%d: %s", entries[0].seq, entries[-1].seq, summary)


def task_kinds(
    exclusive: dict[str, T.Assignment], schedules: dict[str, T.Schedule]
) -> dict[str, Extension]:
    """The decision kinds tasks add to the decided log, filling ``exclusive`` (task.assign)
    and ``schedules`` (schedule.add/remove) as entries are applied."""
    return {TASK_ASSIGN: exclusive_assignment(exclusive), **schedule_kinds(schedules)}


class DaemonError(Exception):
    """A request to the daemon cannot be carried out; the message is for the user."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Daemon:
    def __init__(
        self, state_dir: Path, cfg: Config, identity: Identity, listen: list[str] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.cfg = cfg
        self.identity = identity
        self._peer_id = identity.peer_id  # base58 on every call is measurable on the API path
        self._addrs: tuple[float, list[str]] = (-1.0, [])
        self.listen = listen or cfg.listen
        self.started = time.monotonic()
        self.host = make_host(identity, mdns=cfg.mdns)
        self.pubsub, self.router = make_pubsub(self.host, cfg.gossip_heartbeat_s, envelopes=True)
        self.router.admit = self._admits
        self._host_id = self.host.get_id()
        self._members_at: tuple[int, frozenset[str]] = (-1, frozenset())
        ledger = load_ledger(state_dir)
        self.genesis: Genesis | None = ledger.genesis if ledger else None
        self._legacy_entries = ledger.legacy_entries if ledger else 0
        # The decided-log state is rebuilt from the store (every certificate verified) in run().
        self.state: ConsensusMembership | None = None
        # task id -> exclusive assignment (node, at), filled by the decided log's task.assign
        self.exclusive: dict[str, T.Assignment] = {}
        # schedule id -> recurring schedule, filled by the decided log's schedule.add/remove
        self.schedules: dict[str, T.Schedule] = {}
        self.consensus: ConsensusService | None = None
        extra = ledger.extra if ledger else {}
        self.known_addrs: dict[str, list[str]] = dict(extra.get("addrs", {}))
        self._addrs_dirty = False
        self._proposing: set[str] = set()  # exclusive tasks with a proposal under way
        self._announced = 0  # highest decided seq this node gossiped
        self._peer_totals: dict[str, int] = {}
        self.detector = FailureDetector(
            int(cfg.suspect_after_s * 1000), int(cfg.dead_after_s * 1000)
        )
        self.replay = ReplayWindow()
        self.rejected: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.presence_links = Links(self.host, PRESENCE_PROTO, self.counters, prefix="presence_")
        self._beats = 0
        # Envelope seqs start at the wall clock in microseconds: never reused across restarts
        # without keeping a counter on disk, and far above any seq sent before.
        self._seq = time.time_ns() // 1000
        self._validated: dict[bytes, Envelope] = {}
        self._first_seen: dict[str, float] = {}
        self._backoff: dict[str, tuple[float, float]] = {}
        self._syncing: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._in_swarm = trio.Event()
        self.stopping = trio.Event()
        self.api_path = Path(cfg.api_socket) if cfg.api_socket else state_dir / SOCKET_FILE
        self.agents = AgentRegistry(state_dir)
        self.events = EventHub(cfg.api_event_buffer, cfg.api_event_queue)
        self.store: Store | None = None
        self.shared: StateService | None = None
        self.tasks: TaskService | None = None
        self.messaging = MessagingService(self)
        # The kernel-verified uids that act as this node's operator on the API socket.
        self.operator_uids = frozenset({0, os.getuid()})

    # --- small helpers -------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def seal(self, type_: str, body: Any, swarm_id: bytes | None = None) -> bytes:
        sid = swarm_id if swarm_id is not None else self._swarm().swarm_id
        return seal(
            self.identity,
            swarm_id=sid,
            type=type_,
            seq=self.next_seq(),
            timestamp=now_ms(),
            body=body,
        )

    def _swarm(self) -> ConsensusMembership:
        if self.state is None:
            raise DaemonError(
                "this node is not in a swarm yet: `mossnode init --new-swarm NAME` or "
                "`mossnode join ADDR --invite TOKEN`",
                "not_in_swarm",
                409,
            )
        return self.state

    def node_roles(self) -> set[str]:
        return self.state.roles_of(self.identity.public_key) if self.state else set()

    def agents_changed(self) -> None:
        """Local agents changed: advertise them now (receivers of their messages check them
        against presence) rather than at the next heartbeat."""
        self.counters["agents_changed"] += 1
        self.messaging.forget_missing()
        if self._nursery is not None and self._in_swarm.is_set():
            self._nursery.start_soon(self._publish_presence)

    def listen_addrs(self) -> list[str]:
        """The host's advertised addresses, recomputed at most once a second: building them
        (multiaddr parsing, base58) cost most of a status call."""
        t = time.monotonic()
        if t - self._addrs[0] >= 1.0 or not self._addrs[1]:
            self._addrs = (t, [str(a) for a in self.host.get_addrs()])
        return list(self._addrs[1])

    def _persist(self) -> None:
        """Save the genesis and the members' addresses (the decided log is in the store)."""
        assert self.genesis is not None
        save_ledger(self.state_dir, self.genesis, {"addrs": self.known_addrs})
        self._addrs_dirty = False

    def _load_state(self, genesis: Genesis) -> ConsensusMembership:
        """The decided-log state from the store, every certificate verified again."""
        assert self.store is not None
        self.exclusive.clear()
        self.schedules.clear()
        try:
            return load_membership(self.store, genesis, task_kinds(self.exclusive, self.schedules))
        except MembershipError as exc:
            raise DaemonError(f"{self.store.path}: decided log refused: {exc}") from None

    def _open(self, data: bytes) -> Envelope | Rejection:
        state = self._swarm()
        r = open_envelope(
            data,
            swarm_id=state.swarm_id,
            now_ms=now_ms(),
            replay=self.replay,
            authorize=state.authorize,
            max_size=self.cfg.max_envelope_bytes,
            max_skew_ms=int(self.cfg.max_clock_skew_s * 1000),
        )
        if isinstance(r, Rejection):
            self.rejected[r.reason.value] += 1
            log.debug("rejected envelope: %s", r)
        return r

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        lock = self._lock()
        try:
            try:
                self.store = Store(self.state_dir / DB_FILE)
            except StoreError as exc:
                raise DaemonError(str(exc)) from None
            if self.genesis is not None:
                if self._legacy_entries and self.store.last_decided_seq() == 0:
                    raise DaemonError(FOUNDED_BEFORE_CONSENSUS.format(n=self._legacy_entries))
                self.state = self._load_state(self.genesis)
            async with (
                self.host.run(maddrs(self.listen)),
                background_trio_service(self.pubsub),
                background_trio_service(self.router),
            ):
                await self.pubsub.wait_until_ready()
                self.host.set_stream_handler(JOIN_PROTO, self._on_join_stream)
                self.host.set_stream_handler(MSG_PROTO, self.messaging.on_stream)
                self.host.set_stream_handler(PRESENCE_PROTO, self._on_presence_stream)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.presence_links.bind(nursery)
                    from ..api.server import serve_api

                    await nursery.start(serve_api, self)
                    self._write_listen_file()
                    if self.state is not None:
                        await self._enter_swarm()
                    nursery.start_soon(self._maintenance)
                    log.info(
                        "mossnode %s running as %s on %s, api %s",
                        __version__,
                        self.peer_id,
                        ", ".join(self.listen_addrs()),
                        self.api_path,
                    )
                    task_status.started()
                    systemd.notify("READY=1\nSTATUS=running")
                    nursery.start_soon(self._watchdog)
                    await self.stopping.wait()
                    systemd.notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                if self._addrs_dirty and self.genesis is not None:
                    self._persist()
                # Close connections before leaving host.run, so peers see them go at once.
                with trio.move_on_after(5):
                    try:
                        await self.host.close()
                    except Exception as exc:
                        log.debug("host close: %s", exc)
        finally:
            for p in (self.state_dir / LISTEN_FILE, self.api_path):
                p.unlink(missing_ok=True)
            if self.store is not None:
                self.store.close()
            os.close(lock)
            log.info("mossnode stopped")

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop: a wedged loop stops the pings."""
        interval = systemd.watchdog_interval_s()
        while interval:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    def _lock(self) -> int:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"another mossnode daemon is running on {self.state_dir}") from None
        return fd

    def _write_listen_file(self) -> None:
        path = self.state_dir / LISTEN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(a + "\n" for a in self.listen_addrs()))
        os.replace(tmp, path)

    async def _enter_swarm(self, entries: Sequence[Entry] = ()) -> None:
        """Start consensus (ingesting ``entries``, a verified join reply, first), then subscribe
        to the swarm's topics and start presence, shared state and tasks; idempotent."""
        if self._in_swarm.is_set():
            return
        state = self._swarm()
        assert self._nursery is not None and self.store is not None
        self.consensus = ConsensusService(
            self.identity, state, self.store, self.host, on_decided=self._on_entries
        )
        await self._nursery.start(self.consensus.run)
        if entries:
            # Before presence starts: our own envelopes must pass our own membership check.
            await self.consensus.ingest(entries)
        for name, handler in (
            ("presence", self._on_presence),
            ("consensus", self._on_consensus),
            (TOPIC_NAME, self.messaging.on_gossip),
        ):
            t = topic(state.swarm_id, name)
            self.pubsub.set_topic_validator(t, self._validator, False)
            sub = await self.pubsub.subscribe(t)
            self._nursery.start_soon(self._reader, sub, handler)
        self._nursery.start_soon(self._presence_loop)
        self.shared = StateService(self, self.store)
        await self.shared.start(self._nursery)
        self.tasks = TaskService(self, self.shared)
        self.shared.on_change = self.tasks.changed
        await self.tasks.start(self._nursery)
        self._in_swarm.set()

    # --- gossip --------------------------------------------------------------------------

    def _validator(self, forwarder: ID, msg: Any) -> bool:
        """Topic validator: only envelopes that open are relayed; rejections are counted.
        Our own publishes (py-libp2p validates them too, as forwarded by us) were sealed here
        a moment ago: checking them again would only spend a signature check per message."""
        if forwarder == self._host_id:
            return True
        r = self._open(bytes(msg.data))
        if isinstance(r, Rejection):
            return False
        if len(self._validated) > 4096:
            self._validated.clear()
        self._validated[r.digest] = r
        return True

    async def _reader(self, sub: Any, handler: Any) -> None:
        import hashlib

        while True:
            msg = await sub.get()
            env = self._validated.pop(hashlib.sha256(bytes(msg.data)).digest(), None)
            if env is None or env.sender == self.identity.public_key:
                continue
            self.counters["gossip_in"] += 1
            await self._handle(env, handler)

    async def _handle(self, env: Envelope, handler: Any) -> None:
        try:
            await handler(env)
        except Exception:  # a bad message must never take the daemon down
            self.rejected["handler_error"] += 1
            log.exception("handling %s from %s failed", env.type, env.sender_id)

    async def publish(self, name: str, type_: str, body: Any) -> None:
        data = self.seal(type_, body)
        self.counters["gossip_out"] += 1
        await self.pubsub.publish(topic(self._swarm().swarm_id, name), data)
        # py-libp2p queues the message for each peer (32 deep, dropping beyond) and may not
        # yield: let the peers' writers run before a burst of publishes fills their queues
        await trio.sleep(0)

    # --- presence ------------------------------------------------------------------------

    def presence_body(self) -> dict[str, Any]:
        state = self._swarm()
        vector = self.shared.replica.vector() if self.shared is not None else {}
        return {
            "addrs": self.listen_addrs(),
            "load": os.getloadavg()[0],
            "agents": [
                {"name": a.name, "roles": a.roles, "capabilities": a.capabilities}
                for a in self.agents.agents.values()
            ],
            "version": __version__,
            "height": state.height,
            "uptime_s": round(time.monotonic() - self.started, 1),
            # own state entries written so far: with the envelope's timestamp, it tells peers
            # they hold all this node wrote up to then (protocols/tasks/stability.py)
            "state_seq": vector.get(self.peer_id, 0),
            # entries held from all authors: a peer holding fewer pulls from us at once, so
            # periodic anti-entropy is only the fallback
            "state_total": sum(vector.values()),
        }

    async def _publish_presence(self) -> None:
        """One heartbeat. Over gossip each would reach a node once per mesh neighbour, and
        heartbeats were most of an idle swarm's CPU; so most go straight to each connected
        member, one copy per peer. Every PRESENCE_GOSSIP_EVERY-th (the first included) goes
        over gossip, so members this node is not connected to hear of it and learn its
        addresses (peer exchange)."""
        try:
            self._beats += 1
            if self._beats % PRESENCE_GOSSIP_EVERY == 1:
                await self.publish("presence", "presence", self.presence_body())
                return
            data = self.seal("presence", self.presence_body())
            for peer in self.host.get_connected_peers():
                if self._admits(peer):
                    self.presence_links.send(str(peer), data)
        except Exception:
            log.exception("presence publish failed")

    async def _on_presence_stream(self, stream: INetStream) -> None:
        """``/moss/presence/1``: a member's own heartbeats, one per frame, checked as gossip
        is (signature, membership, replay; rejections counted)."""
        reader = FrameReader(stream)
        try:
            remote = str(stream.muxed_conn.peer_id)
            while True:
                data = await reader.read(self.cfg.max_envelope_bytes)
                env = self._open(data)
                if isinstance(env, Rejection):
                    continue
                if env.type != "presence" or env.sender_id != remote:
                    self.rejected["presence_not_own"] += 1
                    continue
                self.counters["presence_in"] += 1
                await self._handle(env, self._on_presence)
        except Exception as exc:  # EOF, reset, oversized frame: the peer opens a new stream
            log.debug("presence stream ended: %s", exc)
        finally:
            await close_stream(stream)

    async def _presence_loop(self) -> None:
        while True:
            await self._publish_presence()
            base_ms = int(self.cfg.presence_interval_s * 1000)
            scale = presence_scale(len(self._swarm().members), base_ms, self.cfg.presence_budget)
            self.detector.scale = scale
            await trio.sleep(self.cfg.presence_interval_s * scale)

    async def _on_presence(self, env: Envelope) -> None:
        body = env.body if isinstance(env.body, dict) else {}
        addrs = [a for a in body.get("addrs", []) if isinstance(a, str)][:16]
        peer = env.sender_id
        if self.detector.heard(peer, now_ms(), addrs, body):
            log.info("peer %s is alive", peer)
            if self.shared is not None:
                self.shared.trigger_sync(peer)
        if self.tasks is not None:
            self.tasks.heard(peer, env.timestamp, body)
        total = body.get("state_total")
        if self.shared is not None and isinstance(total, int):
            # still short of what the peer held a heartbeat ago: gossip lost something (entries
            # merely in flight arrive within a period), so pull from it now
            before = self._peer_totals.get(peer)
            self._peer_totals[peer] = total
            if before is not None and self.shared.total() < before:
                self.shared.trigger_sync(peer)
        if addrs and self.known_addrs.get(peer) != addrs:
            self.known_addrs[peer] = addrs
            self._addrs_dirty = True
        height = body.get("height")
        if isinstance(height, int) and height > self._swarm().height:
            self._start_sync(peer)

    # --- decided log ---------------------------------------------------------------------

    async def _on_consensus(self, env: Envelope) -> None:
        """A validator announced a decision: ingest it if it is our next entry (its certificate
        is verified first), or catch up from the sender if we are further behind."""
        if env.type != "decision" or self.consensus is None:
            return
        state = self._swarm()
        try:
            entry = Entry.from_wire(env.body)
        except MembershipError:
            self.rejected["bad_decision"] += 1
            return
        if entry.seq <= state.height:
            return
        if entry.seq > state.height + 1:
            self._start_sync(env.sender_id)
            return
        await self.consensus.ingest([entry])
        if state.height < entry.seq:
            self.rejected["bad_decision"] += 1
            log.warning("decision #%d refused: %s", entry.seq, self.consensus.core.last_refusal)

    async def _on_entries(self, entries: list[Entry]) -> None:
        """New decided-log entries, in order, once they are durable in the store (a decided
        batch at a time): events and votes per entry, views and the scheduler once."""
        self._decided(any(e.kind in ("remove", "revoke") for e in entries))
        for entry in entries:
            self.events.publish("decision", {"seq": entry.seq, "kind": entry.kind})
            if entry.kind == VOTE_CAST:
                self._maybe_close_vote(entry.payload.get("vote"))
        _log_decided(entries)
        c = self.consensus
        state = self._swarm()
        last = entries[-1]
        if c is not None and c.is_validator and last.seq == state.height:
            t = topic(state.swarm_id, "consensus")
            listeners = {str(p) for p in self.pubsub.peer_topics.get(t, ())}
            if announces(self.identity.public_key, state.validators(), last.seq, listeners):
                await self._announce(last)

    async def _announce(self, entry: Entry) -> None:
        """Gossip a decided entry, so that non-validators learn of it at once (else within a
        consensus sync interval). Receivers verify its certificate before applying it. For
        every entry, only the validators :func:`announces` picks call this."""
        if entry.seq <= self._announced:
            return
        self._announced = entry.seq
        try:
            await self.publish("consensus", "decision", entry.to_wire())
        except Exception as exc:
            log.debug("announcing decision #%d failed: %s", entry.seq, exc)

    def _decided(self, cutoff: bool) -> None:
        if self.shared is not None:
            self.shared.on_decided(cutoff=cutoff)
        if self.tasks is not None:
            self.tasks.poke()

    def _start_sync(self, peer: str) -> None:
        if peer in self._syncing or self._nursery is None or self.consensus is None:
            return
        self._syncing.add(peer)
        self._nursery.start_soon(self._catch_up, peer)

    async def _catch_up(self, peer: str) -> None:
        try:
            assert self.consensus is not None
            await self.consensus.catch_up(peer)
        finally:
            self._syncing.discard(peer)

    def _consensus(self) -> ConsensusService:
        self._swarm()
        if self.consensus is None:
            raise DaemonError("consensus is not running yet", "unavailable", 503)
        return self.consensus

    async def propose_exclusive(self, task_id: str, node: str, at: int) -> None:
        """Ask consensus to assign an exclusive task to ``node`` (this node: only a node itself
        may propose its assignment), proposed at ``at`` (ms; it must claim the task within
        ``Params.exclusive_claim_ms`` of it); the first decision for a task wins and lands in
        :attr:`exclusive`. Runs in the background: the scheduler must not wait for a PBFT
        round (it proposes again after its lease if nothing was decided)."""
        if (
            self.consensus is None
            or self._nursery is None
            or task_id in self._proposing
            or task_id in self.exclusive
        ):
            return
        self._proposing.add(task_id)
        self.counters["exclusive_proposals"] += 1
        self._nursery.start_soon(self._propose_exclusive, task_id, node, at)

    async def _propose_exclusive(self, task_id: str, node: str, at: int) -> None:
        try:
            assert self.consensus is not None
            payload = {"task": task_id, "node": node, "at": at}
            entry = await self.consensus.propose(TASK_ASSIGN, payload)
            log.info("exclusive task %s assigned to %s (#%d)", task_id, node, entry.seq)
        except ProposalRefused as exc:  # another node's proposal was decided first
            log.debug("exclusive assignment of %s: %s", task_id, exc)
        except ConsensusError as exc:
            log.warning("exclusive assignment of %s: %s", task_id, exc)
        finally:
            self._proposing.discard(task_id)

    async def decide(self, kind: str, payload: dict[str, Any], timeout_s: float = 30.0) -> Entry:
        """Propose one decision through PBFT, proposed (signed) by this node, and wait for it.

        Refused at once (400) if this node may not propose it or the current state rejects it;
        409 if the validators decided it as a no-op (the state changed meanwhile); 504 if it
        is not decided in time (it stays queued and may still be decided)."""
        state = self._swarm()
        if kind in ("remove", "revoke") and self.shared is not None and "cutoff" not in payload:
            author = peer_id_from_public_key(payload.get("public_key", b"\0" * 32))
            payload = {**payload, "cutoff": self.shared.replica.vector().get(author, 0)}
        consensus = self._consensus()
        verdict, body = state.judge(self.identity.public_key, now_ms(), encode_op(kind, payload))
        if verdict == NOOP:
            raise DaemonError(f"decision refused: {body.get('error', 'invalid operation')}")
        try:
            return await consensus.propose(kind, payload, timeout_s)
        except ProposalTimeout as exc:
            raise DaemonError(str(exc), "timeout", 504) from None
        except ProposalRefused as exc:
            raise DaemonError(str(exc), "conflict", 409) from None
        except ConsensusError as exc:
            raise DaemonError(str(exc), "unavailable", 503) from None

    # --- votes ---------------------------------------------------------------------------

    def reputation_weights(self) -> dict[str, int]:
        """Peer id -> weight in thousandths for a reputation-weighted vote: each member node's
        best agent score on the task leaderboard (members without history are left out and
        count as a newcomer, 500)."""
        state = self._swarm()
        weights: dict[str, int] = {}
        for row in self.leaderboard():
            node, score = row.get("node"), row.get("score")
            if not isinstance(node, str) or not isinstance(score, (int, float)):
                continue
            if state.by_peer_id(node) is None:
                continue
            w = max(0, min(1_000_000, round(float(score) * 1000)))
            weights[node] = max(w, weights.get(node, 0))
        return weights

    def _poll(self, vote_id: int) -> Poll:
        poll = self._swarm().polls.get(vote_id)
        if poll is None:
            raise DaemonError(f"no vote {vote_id}", "not_found", 404)
        return poll

    def vote_view(self, vote_id: int) -> dict[str, Any]:
        state = self._swarm()
        poll = self._poll(vote_id)
        t = tally(poll)
        opened = state.entries[vote_id - 1].payload
        return {
            "id": poll.id,
            "title": poll.title,
            "text": opened.get("text", ""),
            "rule": poll.rule,
            "proposer": peer_id_from_public_key(poll.proposer),
            "electorate": {peer_id_from_public_key(k): w for k, w in poll.weights.items()},
            "ballots": {
                peer_id_from_public_key(k): "yes" if v else "no" for k, v in poll.ballots.items()
            },
            "yes": t.yes,
            "no": t.no,
            "total": t.total,
            "decisive": t.decisive,
            "result": poll.result,
            "closed_at": poll.closed_at,
        }

    def list_votes(self) -> list[dict[str, Any]]:
        return [self.vote_view(i) for i in sorted(self._swarm().polls)]

    async def open_vote(
        self, rule: str, title: str, text: str = "", timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Open a vote (``vote.open``); its id is the seq of the decided entry. A reputation
        vote fixes the weights now, from this node's reading of the leaderboard."""
        weights = self.reputation_weights() if rule == "reputation" else None
        payload = open_payload(
            self.identity.public_key, title, text=text, rule=rule, weights=weights
        )
        entry = await self.decide(VOTE_OPEN, payload, timeout_s)
        return {**self.vote_view(entry.seq), "seq": entry.seq}

    async def cast_vote(self, vote_id: int, choice: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Cast this node's ballot; if it makes the result certain, finalize the outcome too."""
        self._poll(vote_id)
        entry = await self.decide(
            VOTE_CAST, cast_payload(self.identity.public_key, vote_id, choice), timeout_s
        )
        poll = self._poll(vote_id)
        if poll.result is None and tally(poll).decisive is not None:
            try:
                await self.close_vote(vote_id, timeout_s)
            except DaemonError as exc:  # someone else closed it first
                log.debug("closing vote %d: %s", vote_id, exc)
        return {**self.vote_view(vote_id), "seq": entry.seq, "choice": choice}

    async def close_vote(self, vote_id: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Decide the outcome (``vote.outcome``): anyone once the result is certain, the
        proposer at any time (then it passes only with a majority of all the weight)."""
        poll = self._poll(vote_id)
        if poll.result is not None:
            raise DaemonError(f"vote {vote_id} is closed ({poll.result})", "conflict", 409)
        payload = outcome_payload(self._swarm(), vote_id, self.identity.public_key)
        entry = await self.decide(VOTE_OUTCOME, payload, timeout_s)
        return {**self.vote_view(vote_id), "seq": entry.seq}

    def _maybe_close_vote(self, vote_id: Any) -> None:
        """Fallback for an outcome nobody proposed (the deciding voter's node went down): the
        vote's proposer finalizes it a little later if it is still open."""
        state = self.state
        poll = state.polls.get(vote_id) if state is not None and type(vote_id) is int else None
        if poll is None or poll.result is not None or self._nursery is None:
            return
        if poll.proposer != self.identity.public_key or tally(poll).decisive is None:
            return
        self._nursery.start_soon(self._close_later, poll.id)

    async def _close_later(self, vote_id: int, delay_s: float = 3.0) -> None:
        await trio.sleep(delay_s)
        try:
            if self._poll(vote_id).result is None:
                await self.close_vote(vote_id)
        except (DaemonError, MembershipError) as exc:
            log.debug("closing vote %d: %s", vote_id, exc)

    # --- joining -------------------------------------------------------------------------

    async def create_invite(self, roles: list[str], ttl_s: float) -> dict[str, Any]:
        state = self._swarm()
        if not state.may(self.identity.public_key, "member.invite"):
            raise DaemonError("this node does not hold a role with member.invite", "forbidden", 403)
        if not 1 <= ttl_s <= 30 * 86400:
            raise DaemonError("ttl must be between 1 second and 30 days")
        t = now_ms()
        try:
            token = make_invite(
                self.identity,
                state.swarm_id,
                roles,
                now_ms=t,
                ttl_ms=int(ttl_s * 1000),
                nonce=secrets.token_bytes(16),
                seq=self.next_seq(),
            )
        except MembershipError as exc:
            raise DaemonError(str(exc)) from None
        return {
            "token": token,
            "expires_at": (t + int(ttl_s * 1000)) / 1000,
            "roles": sorted(roles),
        }

    async def _on_join_stream(self, stream: INetStream) -> None:
        try:
            remote = str(stream.muxed_conn.peer_id)
            self._first_seen[remote] = time.monotonic()  # presenting an invite: a fresh window
            data = await read_frame(stream, 64 * 1024)
            try:
                reply = await self._admit(data, remote)
            except (DaemonError, MembershipError) as exc:
                self.counters["join_refused"] += 1
                reply = {"ok": False, "error": str(exc)}
            await write_frame(stream, canonical(reply))
        except (FrameError, Exception) as exc:
            log.debug("join stream failed: %s", exc)
        finally:
            await stream.close()

    async def _admit(self, data: bytes, remote: str) -> dict[str, Any]:
        """Any member admits a joiner: it checks the invite, then proposes the admission
        (carrying the signed invite, so it needs no member.invite itself) and answers with
        the decided log once the validators have decided it."""
        state = self._swarm()
        r = open_envelope(
            data,
            swarm_id=state.swarm_id,
            now_ms=now_ms(),
            max_skew_ms=int(self.cfg.max_clock_skew_s * 1000),
        )
        if isinstance(r, Rejection):
            self.rejected[r.reason.value] += 1
            if r.reason is Reason.WRONG_SWARM:
                raise DaemonError("the invite is for another swarm than this peer's")
            raise DaemonError(f"join request refused: {r}")
        if r.type != "join.request" or not isinstance(r.body, dict):
            raise DaemonError("not a join request")
        if r.sender_id != remote and state.by_peer_id(remote) is None:
            # Only a member may relay someone else's (joiner-signed) request.
            raise DaemonError("join request is signed by another key than the connection's")
        addrs = [a for a in r.body.get("addrs", []) if isinstance(a, str)][:16]
        if not state.is_member(r.sender):
            token = str(r.body.get("invite", ""))
            invite = check_invite(token, state, now_ms())
            wire, _ = decode_invite(token)
            entry = await self.decide(
                "admit",
                {
                    "public_key": r.sender,
                    "roles": invite.roles,
                    "invite": invite.nonce,
                    "invited_by": invite.issuer,
                    "invitation": wire,
                },
                timeout_s=ADMIT_TIMEOUT_S,
            )
            log.info("admitted %s with roles %s", r.sender_id, ",".join(invite.roles))
            # Before the reply: the other members should know the newcomer by the time its
            # first presence reaches them.
            await self._announce(entry)
        if addrs and self.known_addrs.get(r.sender_id) != addrs:
            self.known_addrs[r.sender_id] = addrs
            self._addrs_dirty = True
        # The log itself goes in pages over /moss/decided/1 (the joiner is a member now).
        return {
            "ok": True,
            "genesis": state.genesis.raw,
            "height": state.height,
            "addrs": {**self.known_addrs, self.peer_id: self.listen_addrs()},
        }

    async def join(self, addr: str, token: str, timeout: float) -> dict[str, Any]:
        try:
            _, swarm_id = decode_invite(token)
        except MembershipError as exc:
            raise DaemonError(str(exc)) from None
        if self.state is not None:
            if self.state.swarm_id == swarm_id and self.state.is_member(self.identity.public_key):
                return self._join_result()
            raise DaemonError("this node already belongs to another swarm", "conflict", 409)
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:
            raise DaemonError(f"not a peer multiaddr ending in /p2p/<id>: {addr!r}") from None
        request = self.seal(
            "join.request", {"invite": token, "addrs": self.listen_addrs()}, swarm_id=swarm_id
        )
        try:
            with trio.fail_after(timeout):
                stream = await self._join_stream(info)
                await write_frame(stream, request)
                reply = cbor2.loads(await read_frame(stream))
                await stream.close()
        except trio.TooSlowError:
            raise DaemonError(
                f"no answer from {addr} within {timeout:g} s", "timeout", 504
            ) from None
        except (OSError, FrameError, Exception) as exc:
            raise DaemonError(f"could not reach {addr}: {exc}", "unreachable", 502) from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            msg = reply.get("error") if isinstance(reply, dict) else "malformed reply"
            raise DaemonError(f"join refused: {msg}", "join_refused", 403)
        if self.state is not None:  # a concurrent join got there first
            return self._join_result()
        try:
            genesis = parse_genesis(reply["genesis"])
            if genesis.swarm_id != swarm_id:
                raise MembershipError("peer answered for another swarm")
            height = reply["height"]
            if type(height) is not int or height < 0:
                raise MembershipError("the reply names no log height")
            # The log comes in pages; every certificate is verified against the validators in
            # force at its position before the entry is applied.
            scratch = ConsensusMembership(genesis, extensions=task_kinds({}, {}))
            await fetch_log(self.host, info.peer_id, scratch, height, timeout)
        except (MembershipError, KeyError, TypeError) as exc:
            raise DaemonError(f"join reply failed verification: {exc}", "bad_reply", 502) from None
        if not scratch.is_member(self.identity.public_key):
            raise DaemonError("the swarm did not admit this node", "join_refused", 403)
        self.genesis = genesis
        self.state = self._load_state(genesis)
        for peer, addrs in dict(reply.get("addrs", {})).items():
            if isinstance(peer, str) and isinstance(addrs, list) and peer != self.peer_id:
                self.known_addrs[peer] = [a for a in addrs if isinstance(a, str)][:16]
        self.known_addrs.setdefault(str(info.peer_id), [addr])
        self._persist()
        await self._enter_swarm(scratch.entries)
        log.info("joined swarm %s", genesis.name)
        return self._join_result()

    async def _join_stream(self, info: PeerInfo) -> INetStream:
        """Open the join stream; once more on a fresh connection if the old one was closing
        (the peer gates non-members whose join window passed)."""
        for attempt in (1, 2):
            try:
                await self.host.connect(info)
                return await self.host.new_stream(info.peer_id, [JOIN_PROTO])
            except Exception:
                if attempt == 2:
                    raise
                with trio.move_on_after(2):
                    await self.host.disconnect(info.peer_id)
                await trio.sleep(0.2)
        raise AssertionError("unreachable")

    def _join_result(self) -> dict[str, Any]:
        state = self._swarm()
        return {"swarm_id": state.swarm_id.hex(), "members": len(state.members)}

    # --- maintenance: reconnect and gate -------------------------------------------------

    async def _maintenance(self) -> None:
        """Every half second, the first time at once: a restarted node dials its members
        (and so starts catching up) as soon as it runs, not half a second later."""
        while True:
            try:
                self._gate()
                if self.state is not None:
                    self._reconnect()
                if self._addrs_dirty and self.genesis is not None:
                    await trio.to_thread.run_sync(self._persist)
            except Exception:
                log.exception("maintenance failed")
            await trio.sleep(0.5)

    def _admits(self, peer: ID) -> bool:
        """Whether gossip may go to ``peer``: a member (anyone while this node has no swarm)."""
        if self.state is None:
            return True
        height, ids = self._members_at
        if height != self.state.height:
            ids = frozenset(m.peer_id for m in self.state.members.values())
            self._members_at = (self.state.height, ids)
        return str(peer) in ids

    def _gate(self) -> None:
        """Close connections of non-members once their join window has passed."""
        t = time.monotonic()
        connected = {str(p) for p in self.host.get_connected_peers()}
        for p in list(self._first_seen):
            if p not in connected:
                del self._first_seen[p]
        for p in connected:
            first = self._first_seen.setdefault(p, t)
            member = self.state is not None and self.state.by_peer_id(p) is not None
            if not member and self.state is not None and t - first > self.cfg.join_window_s:
                self.counters["gated"] += 1
                log.info("closing connection of non-member %s", p)
                assert self._nursery is not None
                self._nursery.start_soon(self._disconnect, p)
                self._first_seen[p] = t + 3600  # do not repeat while the close is under way

    async def _disconnect(self, peer: str) -> None:
        with trio.move_on_after(5):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as exc:
                log.debug("disconnect %s: %s", peer, exc)

    def _reconnect(self) -> None:
        state = self._swarm()
        connected = {str(p) for p in self.host.get_connected_peers()}
        t = time.monotonic()
        for member in state.members.values():
            p = member.peer_id
            if p == self.peer_id or p in connected:
                self._backoff.pop(p, None)
                continue
            due, delay = self._backoff.get(p, (0.0, 0.5))
            addrs = self.known_addrs.get(p) or []
            if t < due or not addrs:
                continue
            self._backoff[p] = (t + delay, min(delay * 2, 30.0))
            assert self._nursery is not None
            self._nursery.start_soon(self._dial, p, addrs)
        for addr in self.cfg.bootstrap:
            pid = addr.rsplit("/p2p/", 1)[-1]
            if pid not in connected and pid != self.peer_id and pid not in self._backoff:
                self._backoff[pid] = (t + 5, 5.0)
                assert self._nursery is not None
                self._nursery.start_soon(self._dial, pid, [addr.rsplit("/p2p/", 1)[0]])

    async def _dial(self, peer: str, addrs: list[str]) -> None:
        try:
            pid = ID.from_base58(peer)
            clean = [multiaddr.Multiaddr(a.rsplit("/p2p/", 1)[0]) for a in addrs]
            with trio.move_on_after(5):
                await self.host.connect(PeerInfo(pid, clean))
        except Exception as exc:
            log.debug("dial %s failed: %s", peer, exc)

    # --- views for the API ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "peer_id": self.peer_id,
            "swarm_id": state.swarm_id.hex() if state else None,
            "swarm_name": state.genesis.name if state else None,
            "listen_addrs": self.listen_addrs(),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "members": len(state.members) if state else 0,
            "roles": sorted(state.roles_of(self.identity.public_key)) if state else [],
            "decided_height": state.height if state else 0,
            "paused": state.paused if state else False,
            "connected_peers": len(self.host.get_connected_peers()),
            "state_digest": self.shared.replica.digest().hex() if self.shared else None,
            "state": self.shared.status() if self.shared else None,
            "tasks": self.tasks.counts() if self.tasks else None,
            "consensus": self.consensus.status() if self.consensus else None,
            "messaging": self.messaging.status(),
            "rejected": dict(self.rejected),
            "counters": dict(self.counters),
        }

    def metrics_text(self) -> str:
        """Prometheus text exposition of the daemon's counters and gauges."""
        state = self.state
        health = Counter(p["state"] for p in self.peers()) if state else Counter()
        cs = self.consensus.status() if self.consensus else None
        lines = [
            "# TYPE mossnode_uptime_seconds gauge",
            f"mossnode_uptime_seconds {time.monotonic() - self.started:.3f}",
            "# TYPE mossnode_members gauge",
            f"mossnode_members {len(state.members) if state else 0}",
            "# TYPE mossnode_decided_height gauge",
            f"mossnode_decided_height {state.height if state else 0}",
            "# TYPE mossnode_validators gauge",
            f"mossnode_validators {len(state.validators()) if state else 0}",
            "# TYPE mossnode_consensus_view gauge",
            f"mossnode_consensus_view {(cs or {}).get('view') or 0}",
            "# TYPE mossnode_connected_peers gauge",
            f"mossnode_connected_peers {len(self.host.get_connected_peers())}",
            "# TYPE mossnode_peers gauge",
            *(
                f'mossnode_peers{{state="{h}"}} {health.get(h, 0)}'
                for h in ("alive", "suspect", "dead")
            ),
            "# TYPE mossnode_messages_total counter",
            *(
                f'mossnode_messages_total{{kind="{k}"}} {v}'
                for k, v in sorted(self.counters.items())
            ),
            "# TYPE mossnode_rejected_total counter",
            *(
                f'mossnode_rejected_total{{reason="{k}"}} {v}'
                for k, v in sorted(self.rejected.items())
            ),
            "# TYPE mossnode_tasks gauge",
            *(
                f'mossnode_tasks{{state="{k}"}} {v}'
                for k, v in (self.tasks.counts() if self.tasks else {}).items()
                if k != "total"
            ),
        ]
        return "\n".join(lines) + "\n"

    # --- tasks ---------------------------------------------------------------------------

    def _shared(self) -> StateService:
        self._swarm()
        if self.shared is None:
            raise DaemonError("the shared state is not ready yet", "unavailable", 503)
        return self.shared

    async def submit_task(self, draft: dict[str, Any]) -> dict[str, Any]:
        tasks = self._tasks()
        now = now_ms()
        # plan_create reads a status only for the parent, and the view only for it and the
        # deps (a random suffix is new): without them the next tick refreshes the view, once
        # for whatever changed meanwhile instead of once per creation
        if draft["parent"] is not None or draft["deps"]:
            tasks.refresh(now, statuses=draft["parent"] is not None)
        contract = dict(draft["contract"] or {})
        if draft.get("confidential"):
            contract["confidential"] = list(draft["confidential"])
        bad = T.check_raw_contract(contract)
        if bad is not None:
            raise DaemonError(f"task refused ({bad.code}): {bad.reason}", bad.code)
        d = T.Draft(
            suffix=secrets.token_hex(6),
            title=draft["title"],
            spec=draft["spec"],
            input=draft["input"],
            parent=draft["parent"],
            deps=tuple(draft["deps"]),
            capabilities=tuple(draft["capabilities"]),
            role=draft["role"],
            priority=draft["priority"],
            contract=T.Contract.from_raw(contract),
        )
        plan = T.plan_create(
            tasks.view,
            d,
            creator=self.peer_id,
            now_ms=now,
            statuses=tasks.statuses,
            limits=tasks.limits,
        )
        if isinstance(plan, T.Refused):
            raise DaemonError(f"task refused ({plan.code}): {plan.reason}", plan.code)
        if d.contract.confidential:
            plan = tasks.seal_create(plan)
            if isinstance(plan, T.Refused):
                raise DaemonError(f"task refused ({plan.code}): {plan.reason}", plan.code, 409)
        ws = T.writes(plan, now)
        try:
            await self._shared().write(lambda w: apply_writes(w, ws), paths_of(ws, self.peer_id))
        except WriteRefused as exc:
            raise DaemonError(f"task refused: {exc}", "forbidden", 403) from None
        return {"id": plan.task_id, "state": "pending"}

    def _tasks(self) -> TaskService:
        self._shared()
        assert self.tasks is not None
        return self.tasks

    def _task_row(self, tid: str, task: Any, st: T.Status | None) -> dict[str, Any]:
        return {
            "id": tid,
            "title": task.title,
            "state": _state_name(st),
            "assignee": st.assignee if st else None,
            "agent": st.agent if st else None,
            "attempt": st.attempt if st else 1,
            "parent": task.parent,
            "deps": list(task.deps),
            "capabilities": list(task.capabilities),
            "priority": task.priority,
            "creator": tid.rsplit(":", 1)[0],
        }

    def list_tasks(self, state: str | None) -> list[dict[str, Any]]:
        tasks = self._tasks()
        tasks.refresh(now_ms())
        statuses = tasks.statuses
        # rows only for the tasks asked for: a long history is mostly done
        return [
            self._task_row(tid, tasks.view[tid], statuses.get(tid))
            for tid in sorted(tasks.view)
            if state is None or _state_name(statuses.get(tid)) == state
        ]

    async def add_schedule(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Decide a recurring schedule (``POST /v1/schedules``): its first period starts at
        ``start_ms``, by default now. Refused (400) with the reason if the template is not a
        task this swarm would create."""
        t = body["task"]
        start = body.get("start_ms")
        payload = {
            "id": body["id"],
            "interval_ms": body["interval_ms"],
            "start_ms": now_ms() if start is None else start,
            "end_ms": body.get("end_ms"),
            "overlap": body.get("overlap", False),
            "task": {
                "title": t["title"],
                "spec": t.get("spec", ""),
                "input": t.get("input"),
                "capabilities": sorted(set(t.get("capabilities", []))),
                "role": t.get("role"),
                "priority": float(t.get("priority", 0.0)),
                "contract": t.get("contract") or {},
            },
        }
        entry = await self.decide(SCHEDULE_ADD, payload, timeout_s)
        return {"id": body["id"], "seq": entry.seq, "start_ms": payload["start_ms"]}

    def list_schedules(self) -> list[dict[str, Any]]:
        """Decided schedules with their next period and their instances (canonical ones)."""
        tasks = self._tasks()
        now = now_ms()
        tasks.refresh(now)
        rec, statuses = tasks.sched.recurring(), tasks.statuses
        made: dict[str, list[str]] = {}  # schedule key -> its canonical instances
        for suffix, tid in rec.periods.items():
            parsed = recurring.parse_suffix(suffix)
            assert parsed is not None  # the index holds instances only
            made.setdefault(parsed[0], []).append(tid)
        rows = []
        for s in sorted(self.schedules.values(), key=lambda s: s.id):
            mine = sorted(made.get(s.key, []), key=rec.starts.__getitem__)
            rows.append(
                {
                    "id": s.id,
                    "interval_ms": s.interval_ms,
                    "start_ms": s.start_ms,
                    "end_ms": s.end_ms,
                    "removed": s.removed,
                    "overlap": s.overlap,
                    "next_at": None if s.removed else recurring.next_start(s, now),
                    "task": _jsonable(s.fields()),
                    "instances": [
                        {"id": tid, "state": _state_name(statuses.get(tid))} for tid in mine[-10:]
                    ],
                    "instance_count": len(mine),
                }
            )
        return rows

    def show_task(self, tid: str, reader: frozenset[str] = frozenset()) -> dict[str, Any]:
        """One task; ``reader`` are the caller's roles, which decide whether it sees the
        sealed values of a confidential task (see TaskService.reveal)."""
        tasks = self._tasks()
        tasks.refresh(now_ms())
        task = tasks.view.get(tid)
        raw = self._shared().replica.task(tid)
        if task is None or raw is None:
            raise DaemonError(f"no task {tid!r}", "not_found", 404)
        st = tasks.statuses.get(tid)
        row = self._task_row(tid, task, st)
        accepted = st.accepted if st else None
        logs: list[dict[str, Any]] = []
        for node, records in sorted(dict(raw.get("log") or {}).items()):
            logs.extend({"node": node, **r} for r in records if isinstance(r, dict))
        logs.sort(key=lambda r: (r.get("at", 0), r["node"]))
        row.update(
            {
                "spec": raw.get("spec"),
                "input": raw.get("input"),
                "contract": raw.get("contract"),
                "attempts": st.attempt if st else 0,
                "result": _jsonable(accepted.output) if accepted else None,
                "results": _jsonable(dict(raw.get("results") or {})),
                "progress": _jsonable(dict(raw.get("progress") or {})),
                "reviews": _jsonable(dict(raw.get("reviews") or {})),
                "reasons": list(st.reasons) if st else [],
                "log": _jsonable(logs),
            }
        )
        return tasks.reveal(tid, row, reader)

    async def control_task(self, tid: str, verb: str, reason: str) -> dict[str, Any]:
        """cancel, pause, resume or reassign a task tree, as this node (creator or supervisor)."""
        tasks = self._tasks()
        now = now_ms()
        tasks.refresh(now)
        if tid not in tasks.view:
            raise DaemonError(f"no task {tid!r}", "not_found", 404)
        plan = T.plan_control(
            tasks.view,
            tasks.statuses,
            tid,
            verb,
            node=self.peer_id,
            now_ms=now,
            reason=reason,
            authority=tasks._authority,
        )
        if isinstance(plan, T.Refused):
            raise DaemonError(f"{verb} refused ({plan.code}): {plan.reason}", plan.code, 409)
        ws = T.writes(plan, now)
        await self._shared().write(lambda w: apply_writes(w, ws), paths_of(ws, self.peer_id))
        return {"id": tid, "action": verb}

    def leaderboard(self) -> list[dict[str, Any]]:
        return self._tasks().leaderboard(now_ms())

    def activity(self, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self._tasks().events if e["at"] > since]

    def peers(self) -> list[dict[str, Any]]:
        state = self._swarm()
        t = now_ms()
        out = []
        for m in state.members.values():
            if m.public_key == self.identity.public_key:
                continue
            rec = self.detector.peers.get(m.peer_id)
            out.append(
                {
                    "peer_id": m.peer_id,
                    "state": self.detector.health(m.peer_id, t),
                    "last_seen": rec.last_seen_ms / 1000 if rec else None,
                    "addrs": rec.addrs if rec else self.known_addrs.get(m.peer_id, []),
                    "roles": sorted(m.roles),
                    "agents": rec.info.get("agents", []) if rec else [],
                }
            )
        return sorted(out, key=lambda p: p["peer_id"])

    def decisions(self) -> list[dict[str, Any]]:
        state = self._swarm()
        return [
            {
                "seq": 0,
                "kind": "genesis",
                "payload": {
                    "name": state.genesis.name,
                    "founder": state.genesis.founder_id,
                    "created_at": state.genesis.created_at,
                },
                # the genesis record itself, signed by the founder: the root of every check
                "certificate": [state.genesis.raw.hex()],
            },
            *(
                {
                    "seq": e.seq,
                    "kind": e.kind,
                    "payload": _jsonable(e.payload),
                    "certificate": [c.hex() for c in e.certificate],
                }
                for e in state.entries
            ),
        ]


def _jsonable(value: Any) -> Any:
    """JSON for API answers: keys as peer ids, bytes as hex, Yrs' floats back to ints."""
    if isinstance(value, float):
        return json_numbers(value)
    if isinstance(value, bytes):
        if len(value) == 32:
            try:
                return peer_id_from_public_key(value)
            except ValueError:
                pass
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


__all__ = ["Daemon", "DaemonError", "public_key_from_peer_id"]
