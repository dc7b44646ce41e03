"""Long-lived one-way streams to peers, for traffic that is sent often and may be lost.

PBFT messages and presence heartbeats go straight to each peer: over gossip every message
would reach each node once per mesh neighbour (about six copies), and in py-libp2p every copy
costs a millisecond of CPU. A :class:`Links` keeps one outbound stream per peer, opened on
demand and reused; frames queued while a write is under way go out together; a full queue or a
broken stream drops frames for a moment instead of piling them up (callers retransmit or send
again next period).
"""

from __future__ import annotations

import logging
from collections import Counter

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF

from .host import FrameError, frame, open_muxed

log = logging.getLogger("mossnode.links")

QUIET_S = 0.3  # after a failed write, frames for that peer are dropped this long


class FrameReader:
    """Length-prefixed frames from a stream, read in large chunks (one read call per burst of
    frames instead of two per frame), from the yamux stream itself while the stream is open
    (:func:`~mossnode.node.host.open_muxed`)."""

    def __init__(self, stream: INetStream, chunk: int = 1 << 16) -> None:
        self.stream = stream
        self.chunk = chunk
        self._buf = bytearray()

    async def read(self, max_size: int) -> bytes:
        buf = self._buf
        while True:
            if len(buf) >= 4:
                n = int.from_bytes(buf[:4], "big")
                if n > max_size:
                    raise FrameError(f"frame of {n} bytes exceeds limit {max_size}")
                if len(buf) >= 4 + n:
                    data = bytes(buf[4 : 4 + n])
                    del buf[: 4 + n]
                    return data
            muxed = open_muxed(self.stream)
            if muxed is None:
                chunk = await self.stream.read(self.chunk)
            else:
                try:
                    chunk = await muxed.read(self.chunk)
                except MuxedStreamEOF:
                    chunk = b""
            if not chunk:
                raise FrameError(f"stream closed with {len(buf)} bytes of a frame")
            buf += chunk


async def close_stream(stream: INetStream) -> None:
    try:
        with trio.move_on_after(2):
            await stream.close()
    except Exception:
        pass


class Links:
    """Outbound streams on ``proto``, one per peer. ``counters`` gets ``<prefix>out``,
    ``<prefix>dropped`` and ``<prefix>failed``."""

    def __init__(
        self,
        host: IHost,
        proto: TProtocol,
        counters: Counter[str],
        *,
        prefix: str = "",
        queue: int = 1024,
        max_batch: int = 1 << 20,
    ) -> None:
        self.host = host
        self.proto = proto
        self.counters = counters
        self.prefix = prefix
        self.queue = queue
        self.max_batch = max_batch
        self._links: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._idle: dict[str, INetStream] = {}  # links whose task waits, nothing queued
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """Streams are served from ``nursery``; until then sends are dropped."""
        self._nursery = nursery

    def send(self, pid: str, data: bytes) -> None:
        """Send ``data`` to ``pid`` now if its stream is idle and the connection free
        (:meth:`~mossnode.node.host.FastYamuxStream.write_nowait`), else queue it for the
        link's task; never blocks."""
        stream = self._idle.get(pid)
        if stream is not None:
            muxed = open_muxed(stream)
            if muxed is not None and muxed.write_nowait(frame(data)):
                self.counters[self.prefix + "out"] += 1
                return
            del self._idle[pid]  # the link's task writes this and what follows, in order
        self._queue(pid, data)

    def send_many(self, pid: str, datas: list[bytes]) -> None:
        """Send several messages to ``pid`` in order: from an idle link as one write (one
        Noise message and one socket send for all, as the link's task writes what queued up
        meanwhile), else queued."""
        if len(datas) == 1:
            self.send(pid, datas[0])
            return
        stream = self._idle.get(pid)
        if stream is not None:
            muxed = open_muxed(stream)
            if muxed is not None and muxed.write_nowait(b"".join(frame(d) for d in datas)):
                self.counters[self.prefix + "out"] += len(datas)
                return
            del self._idle[pid]
        for data in datas:
            self._queue(pid, data)

    def _queue(self, pid: str, data: bytes) -> None:
        link = self._links.get(pid)
        if link is None:
            if self._nursery is None:
                self.counters[self.prefix + "dropped"] += 1
                return
            link, recv = trio.open_memory_channel[bytes](self.queue)
            self._links[pid] = link
            self._nursery.start_soon(self._serve, pid, recv)
        try:
            link.send_nowait(data)
            self.counters[self.prefix + "out"] += 1
        except trio.WouldBlock:
            self.counters[self.prefix + "dropped"] += 1

    async def _serve(self, pid: str, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        try:
            await self._serve_link(pid, recv)
        finally:
            self._idle.pop(pid, None)

    async def _serve_link(self, pid: str, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        stream: INetStream | None = None
        quiet_until = 0.0
        while True:
            try:
                data = recv.receive_nowait()
            except trio.WouldBlock:
                # Idle: while nothing is queued, send() may write to the stream itself. It
                # stops as soon as it queues anything, and this task's next write follows.
                if stream is not None:
                    self._idle[pid] = stream
                try:
                    data = await recv.receive()
                except trio.EndOfChannel:
                    return
                finally:
                    self._idle.pop(pid, None)
            if trio.current_time() < quiet_until:
                self.counters[self.prefix + "dropped"] += 1
                continue
            frames = [frame(data)]
            size = len(frames[0])
            while size < self.max_batch:  # write what queued up meanwhile in one go
                try:
                    more = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                frames.append(frame(more))
                size += len(frames[-1])
            try:
                with trio.fail_after(5):
                    if stream is None:
                        stream = await self.host.new_stream(ID.from_base58(pid), [self.proto])
                    muxed = open_muxed(stream)
                    await (muxed or stream).write(b"".join(frames))
            except Exception as exc:
                self.counters[self.prefix + "failed"] += 1
                log.debug("%s to %s failed: %s", self.proto, pid, exc)
                if stream is not None:
                    await close_stream(stream)
                stream = None
                quiet_until = trio.current_time() + QUIET_S
