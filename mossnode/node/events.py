"""The daemon's event stream: what changed, in order, for ``GET /v1/events``.

Producers (the task loop, the decided log, the peer watcher) call :meth:`EventHub.publish`,
which never blocks: it appends to a bounded ring buffer and to each subscriber's bounded queue.
A subscriber that lets its queue overflow is dropped (it gets a final ``dropped`` event naming
the id to resume from), so a slow client costs memory up to its bound and nothing else.

Ids increase by one per event and start at the wall clock in microseconds, so they also
increase across restarts: a client resuming with an id from before a restart is told it missed
events (``gap``) instead of silently receiving a different run's events under old numbers.

Event types: ``task`` (a task's derived state changed: the activity feed), ``decision`` (an
entry was appended to the decided log), ``peer`` (a member's health changed), ``work`` (work
handed to or taken from one local pull agent; only that agent and the operator see these).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .daemon import Daemon

TYPES = frozenset({"task", "decision", "peer", "work"})
REPLAY_SLICE = 256  # events per write while replaying the buffer
STALL_S = 60.0  # a client that takes no bytes for this long is cut off
PEER_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str
    at: int  # ms since the epoch
    data: dict[str, Any]
    agent: str | None = None  # for one local agent only (work hand-offs)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, "data": self.data}

    def sse(self) -> bytes:
        body = json.dumps(self.public(), separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.type}\ndata: {body}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


class Subscriber:
    """One open stream: its filters, its backlog (replay) and its bounded live queue."""

    def __init__(
        self,
        types: frozenset[str] | None,
        agent: str | None,
        operator: bool,
        limit: int,
        start: int,
    ) -> None:
        self.types = types
        self.agent = agent
        self.operator = operator
        self.limit = limit
        self.backlog: list[Event] = []
        self.queue: deque[Event] = deque()
        self.overflowed = False
        self.last_sent = start  # the id to resume from if the stream ends now
        self._wake = trio.Event()

    def wants(self, ev: Event) -> bool:
        if self.types is not None and ev.type not in self.types:
            return False
        return ev.agent is None or self.operator or ev.agent == self.agent

    def offer(self, ev: Event) -> bool:
        """Queue ``ev`` if wanted; False once the queue has overflowed (drop me)."""
        if self.overflowed:
            return False
        if not self.wants(ev):
            return True
        if len(self.queue) >= self.limit:
            self.overflowed = True
            self.queue.clear()
            self._wake.set()
            return False
        self.queue.append(ev)
        self._wake.set()
        return True

    async def next_batch(self, timeout: float) -> list[Event]:
        """Everything queued, waiting up to ``timeout`` s for something (empty: time's up)."""
        if not self.queue and not self.overflowed:
            with trio.move_on_after(timeout):
                await self._wake.wait()
        self._wake = trio.Event()
        batch = list(self.queue)
        self.queue.clear()
        return batch


class EventHub:
    def __init__(self, capacity: int = 10_000, queue_limit: int = 1_000) -> None:
        if capacity < 1 or queue_limit < 1:
            raise ValueError("event buffer and queue sizes must be >= 1")
        self.buffer: deque[Event] = deque(maxlen=capacity)
        self.queue_limit = queue_limit
        self.last_id = time.time_ns() // 1000
        self.floor = self.last_id  # ids up to here are no longer (or never were) held
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0

    def publish(self, type_: str, data: dict[str, Any], agent: str | None = None) -> Event:
        self.last_id += 1
        ev = Event(self.last_id, type_, time.time_ns() // 1_000_000, data, agent)
        if len(self.buffer) == self.buffer.maxlen:
            self.floor = self.buffer[0].id
        self.buffer.append(ev)
        for sub in list(self.subscribers):
            if not sub.offer(ev):
                self.subscribers.discard(sub)
                self.dropped += 1
        return ev

    def subscribe(
        self,
        since: int | None,
        types: Iterable[str] | None = None,
        agent: str | None = None,
        operator: bool = False,
    ) -> Subscriber:
        """A new subscriber; with ``since``, its backlog holds every buffered event after it,
        led by a ``gap`` event if some of those are no longer held."""
        sub = Subscriber(
            frozenset(types) if types is not None else None,
            agent,
            operator,
            self.queue_limit,
            since if since is not None else self.last_id,
        )
        if since is not None and since < self.last_id:
            if since < self.floor:
                gap = {"since": since, "first_available": self.floor + 1}
                sub.backlog.append(Event(self.floor, "gap", time.time_ns() // 1_000_000, gap))
            start = max(0, since - self.buffer[0].id + 1) if self.buffer else 0
            held = itertools.islice(self.buffer, start, None)
            sub.backlog.extend(ev for ev in held if ev.id > since and sub.wants(ev))
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def listeners(self, agent: str) -> int:
        """Open streams of one agent (a pull agent with a stream is online)."""
        return sum(1 for s in self.subscribers if s.agent == agent)


Write = Callable[[bytes], Awaitable[None]]


async def pump(sub: Subscriber, write: Write, keepalive_s: float) -> None:
    """Write a subscriber's backlog, then its live events, as server-sent events until the
    client goes away or the subscriber overflows (then a final ``dropped`` event). A write
    the client does not take for :data:`STALL_S` ends the stream: it is dead or stuck."""

    async def send(data: bytes) -> None:
        with trio.fail_after(STALL_S):
            await write(data)

    await send(b": connected\n\n")  # headers and a first byte now, not at the first event
    backlog, sub.backlog = sub.backlog, []
    for i in range(0, len(backlog), REPLAY_SLICE):
        part = backlog[i : i + REPLAY_SLICE]
        await send(b"".join(ev.sse() for ev in part))
        sub.last_sent = part[-1].id
    while True:
        batch = await sub.next_batch(keepalive_s)
        if sub.overflowed:
            info = {
                "reason": f"slow client: more than {sub.limit} events waited for it",
                "resume_from": sub.last_sent,
            }
            final = Event(sub.last_sent, "dropped", time.time_ns() // 1_000_000, info)
            with trio.move_on_after(2.0):
                await write(final.sse())
            return
        if batch:
            await send(b"".join(ev.sse() for ev in batch))
            sub.last_sent = batch[-1].id
        else:
            await send(KEEPALIVE)


async def watch_peers(daemon: Daemon, hub: EventHub) -> None:
    """Publish ``peer`` events when a member's health (alive, suspect, dead) changes; health
    is a function of time since the last heartbeat, so it is sampled."""
    known: dict[str, str] = {}
    while True:
        await trio.sleep(PEER_POLL_S)
        if daemon.state is None:
            continue
        now = time.time_ns() // 1_000_000
        me = daemon.peer_id
        members = {m.peer_id for m in daemon.state.members.values()} - {me}
        for peer in sorted(members):
            health = daemon.detector.health(peer, now)
            before = known.get(peer)
            if health != before:
                known[peer] = health
                hub.publish("peer", {"peer_id": peer, "state": health, "old": before})
        for gone in set(known) - members:
            del known[gone]
            hub.publish("peer", {"peer_id": gone, "state": "removed", "old": None})
