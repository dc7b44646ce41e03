"""The libp2p host, gossipsub tuned for swarms of 3-200 nodes, and length-prefixed stream framing.

py-libp2p 0.8.1 defaults do not suit a daemon (measured, see docs/mesh.md): the heartbeat is 120 s
and adaptive gossip silently raises it to 30-60 s, a 10 msg/s per-topic spam limit drops faster
publishers, and eclipse protection wants peers on 3+ distinct IPs, which a one-host test mesh never
has. Envelopes are verified by our own topic validators, so those heuristics add nothing here.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.io.abc import Reader
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, MessageTooLarge
from libp2p.io.trio import TrioTCPStream
from libp2p.io.utils import read_exactly
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.peer import peerstore as peerstore_module
from libp2p.peer.id import ID
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.security.noise.io import (
    MAX_PLAINTEXT_LENGTH,
    NoisePacketReadWriter,
    NoiseTransportReadWriter,
)
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from libp2p.utils.varint import decode_uvarint

from ..crypto.identity import Identity

GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
MAX_FRAME = 4 << 20
log = logging.getLogger(__name__)


class FrameError(Exception):
    """A peer sent a frame that is too large or cut short."""


class _Wire:
    """The usual stack under a yamux connection: a Noise transport session over a raw TCP
    connection. Holds what the fast paths below use, or is absent for any other stack."""

    __slots__ = ("broken", "noise", "pending", "session", "sock", "tcp")

    def __init__(self, session: Any, noise: Any, tcp: Any, sock: Any) -> None:
        self.session = session  # SecureSession: the decrypted read buffer
        self.noise = noise  # NoiseTransportReadWriter: encrypt/decrypt (the nonces)
        self.tcp = tcp  # TrioTCPStream: its write lock; its read buffer (BufferedTCPRead)
        self.sock = sock  # the non-blocking socket under trio's
        # the tail of a packet the socket did not take in send_now: written before anything
        # else (by a flush task, or by the next frame writer, under the write locks)
        self.pending = b""
        self.broken = False  # a synchronous send failed: only the library's paths from now

    @classmethod
    def of(cls, secured_conn: Any) -> _Wire | None:
        if type(secured_conn) is not SecureSession:
            return None
        noise = secured_conn.conn
        if type(noise) is not NoiseTransportReadWriter:
            return None
        packets = noise.read_writer
        if type(packets) is not NoisePacketReadWriter:
            return None
        raw = packets.read_write_closer
        if type(raw) is not RawConnection or type(raw.stream) is not TrioTCPStream:
            return None
        sock = getattr(getattr(raw.stream.stream, "socket", None), "_sock", None)
        if sock is None or not hasattr(raw.stream, "write_lock"):
            return None
        return cls(secured_conn, noise, raw.stream, sock)

    def take(self, n: int) -> bytes | None:
        """``n`` decrypted bytes if they have arrived (decrypting the complete Noise messages
        the TCP read buffer holds, in order), else None and nothing consumed. Synchronous: no
        socket read, no lock, no task switch."""
        s = self.session
        while s.high_watermark - s.low_watermark < n:
            buf: bytearray | None = self.tcp.__dict__.get("_mossnode_buf")
            if not buf or len(buf) < 2:
                return None
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                return None
            packet = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            plain = self.noise.decrypt(packet)  # a bad tag raises: the reader tears down
            rest = s._drain(None)
            s._fill(rest + plain if rest else plain)
        return bytes(s._drain(n))

    async def fill(self) -> bool:
        """Read what the socket has into the TCP read buffer; False at EOF."""
        read = _TCP_READ.unbuffered
        chunk = await read(self.tcp, BufferedTCPRead.CHUNK)
        if not chunk:
            return False
        buf: bytearray | None = self.tcp.__dict__.get("_mossnode_buf")
        if buf is None:
            self.tcp.__dict__["_mossnode_buf"] = bytearray(chunk)
        else:
            buf += chunk
        return True

    def send_now(self, mux_lock: trio.Lock, data: bytes) -> bool:
        """Hand one frame to the socket without waiting, if nothing else is being written on
        this connection; False, with nothing done, otherwise. What the socket does not take
        stays ``pending`` and a flush task writes it under the locks; every other writer
        writes it first (:meth:`CreditBatchingYamux._write_frame`), so frames never mix."""
        if (
            self.pending
            or self.broken
            or len(data) > MAX_PLAINTEXT_LENGTH
            or mux_lock.locked()
            or self.tcp.write_lock.locked()
        ):
            return False
        try:
            packet, sent = self._send_sealed(data)
        except OSError as exc:  # the connection is gone; its reader tears it down
            log.debug("TCP write failed: %s", exc)
            self.broken = True
            return False
        if sent < len(packet):
            self.pending = packet[sent:]
            trio.lowlevel.spawn_system_task(self._flush, mux_lock)
        return True

    def _send_sealed(self, data: bytes) -> tuple[bytes, int]:
        """``data`` as one Noise packet, and how much of it the socket took without waiting
        (other socket errors propagate)."""
        sealed = self.noise.encrypt(data)
        packet = len(sealed).to_bytes(2, "big") + sealed
        try:
            return packet, self.sock.send(packet)
        except BlockingIOError:
            return packet, 0

    async def _flush(self, mux_lock: trio.Lock) -> None:
        try:
            async with mux_lock:
                await self.flush_locked()
        except Exception as exc:  # a broken connection: its reader tears it down
            log.debug("TCP write failed: %s", exc)

    async def flush_locked(self) -> None:
        """Write what ``send_now`` left pending; the caller holds the muxer's write lock."""
        if not self.pending:
            return
        async with self.tcp.write_lock:
            pending, self.pending = self.pending, b""
            try:
                await self.tcp.stream.send_all(pending)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.broken = True
                raise ConnectionClosedError(f"TCP write failed: {exc}", transport="tcp") from exc

    async def send(self, mux_lock: trio.Lock, data: bytes) -> None:
        """One Noise message with ``data``, written under the muxer's and the TCP stream's
        write locks (taken without waiting: the caller checked they are free) and, when the
        socket takes it all, without a task switch."""
        tcp = self.tcp
        mux_lock.acquire_nowait()
        try:
            tcp.write_lock.acquire_nowait()
            try:
                try:
                    packet, sent = self._send_sealed(data)
                except OSError as exc:
                    raise ConnectionClosedError(
                        f"TCP write failed: {exc}", transport="tcp"
                    ) from exc
                if sent < len(packet):  # the socket buffer is full: wait for it, locks held
                    try:
                        await tcp.stream.send_all(packet[sent:])
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise ConnectionClosedError(
                            f"TCP write failed: {exc}", transport="tcp"
                        ) from exc
            finally:
                tcp.write_lock.release()
        finally:
            mux_lock.release()


async def _yamux_read_exactly(reader: Any, n: int, retry_count: int = 100) -> bytes:
    """``read_exactly`` as yamux's frame loop calls it for each frame header (body reads go
    through :meth:`CreditBatchingYamux._read_data_body`, not here). On a
    :class:`CreditBatchingYamux` connection, plain DATA frames whose bodies have arrived are
    delivered to their streams right here, as many as are buffered, and only the header of a
    frame that needs the library (flags, window updates, pings, new streams, a body still on
    the way) is returned to the library's loop."""
    mux: CreditBatchingYamux | None = reader.__dict__.get("_mossnode_mux")
    if mux is None or n != HEADER_SIZE:
        return await read_exactly(reader, n, retry_count)
    wire = mux.wire
    if wire is None:
        return await read_exactly(reader, n, retry_count)
    while True:
        header = wire.take(HEADER_SIZE)
        if header is None:
            if not await wire.fill():  # EOF: the library's read says how it ended
                return await read_exactly(reader, n, retry_count)
            continue
        if not mux.deliver(header):
            return header


class CreditBatchingYamux(Yamux):
    """Yamux that returns receive-window credit in batches, and frames without debug work.

    py-libp2p 0.8.1 answers every read with a WINDOW_UPDATE frame, whatever its hysteresis
    settings, so each small message costs a second Noise-encrypted frame and a wake-up on
    both ends (measured: half the frames an idle daemon sent). Here pure credit (a
    WINDOW_UPDATE without flags) is owed until a stream's debt reaches ``FLUSH`` bytes, as
    go-yamux does at half its window. The sender never stalls for it: unsent credit stays
    below ``FLUSH``, a quarter of the 256 KiB initial window, so a sender whose window runs
    out has at least three quarters of it unread at this end, and reading that flushes.

    Its frame writer also skips the library's, which decodes every header and formats a debug
    line whether or not debug logging is on, and a frame body already buffered is taken
    without arming a timeout.

    Over the usual stack (Noise over TCP, :class:`_Wire`) two more layers of per-frame work
    go. Writing a frame took four trio locks (muxer, TCP stream, each a task switch) and as
    many checkpoints on its way down through the secure session, the Noise and length-prefix
    writers and trio's socket stream; here it is encrypted and handed to the socket at once
    when no other writer holds the connection (else, and for what the socket does not take,
    the locks are waited for as before). Reading, the library's frame loop formatted five
    debug lines and took the streams lock for every frame; here plain DATA frames whose
    bodies have arrived are put in their stream's buffer straight from the decrypted bytes
    (:func:`_yamux_read_exactly`), and every other frame goes to the library's loop.
    """

    FLUSH = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owed: dict[int, int] = {}
        self.wire = _Wire.of(self.secured_conn)
        if self.wire is not None:  # the header reads of its frame loop come here
            self.secured_conn.__dict__["_mossnode_mux"] = self

    def owe(self, sid: int, credit: int) -> bytes | None:
        """Add ``credit`` to what stream ``sid`` is owed; the WINDOW_UPDATE frame to send
        now, or None while the debt stays below ``FLUSH``."""
        owed = self._owed.pop(sid, 0) + credit
        if owed >= self.FLUSH:
            return struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_WINDOW_UPDATE, 0, sid, owed)
        self._owed[sid] = owed
        if len(self._owed) > 2 * len(self.streams) + 64:  # forget closed streams
            self._owed = {k: v for k, v in self._owed.items() if k in self.streams}
        return None

    def deliver(self, header: bytes) -> bool:
        """Put a plain DATA frame (no flags, an open stream, its body already here) in its
        stream's buffer and wake the stream's reader, as the library's loop does; False,
        with nothing consumed beyond the header, for any frame the library must handle."""
        version, typ, flags, sid, length = struct.unpack(YAMUX_HEADER_FORMAT, header)
        if typ != TYPE_DATA or flags or version or not 0 < length <= MAX_WINDOW_SIZE:
            return False
        stream = self.streams.get(sid)
        buf = self.stream_buffers.get(sid)
        event = self.stream_events.get(sid)
        wire = self.wire
        if stream is None or buf is None or event is None or wire is None:
            return False
        if stream.closed or self.streams_lock.locked():
            return False
        body = wire.take(length)
        if body is None:
            return False
        buf.extend(body)
        stream.recv_window -= length
        if stream.recv_window < 0:
            log.warning("stream %d: peer exceeded the receive window", sid)
            stream.recv_window = 0
        event.set()
        return True

    async def _read_data_body(self, length: int) -> bytes:
        # The library arms a timeout (reading it from the environment) for every frame body;
        # yamux writes a frame as one Noise message, so its body is nearly always decrypted
        # and buffered already once its header is read, and then no wait can happen.
        wire = self.wire
        if wire is not None and length >= 0:
            body = wire.take(length)
            if body is not None:
                return body
        conn: Any = self.secured_conn
        if 0 <= length <= getattr(conn, "high_watermark", 0) - getattr(conn, "low_watermark", 0):
            return bytes(conn._drain(length))
        with trio.fail_after(yamux_module._yamux_data_read_timeout()):
            return await read_exactly(conn, length)  # not the frame-header hook

    async def _write_frame(self, data: bytes) -> None:
        if len(data) == HEADER_SIZE and data[1] == TYPE_WINDOW_UPDATE and data[2:4] == b"\0\0":
            sid, credit = struct.unpack_from(">II", data, 4)
            update = self.owe(sid, credit)
            if update is None:
                return
            data = update
        wire = self.wire
        lock = self._write_lock
        if (
            wire is not None
            and not wire.pending
            and len(data) <= MAX_PLAINTEXT_LENGTH
            and not lock.locked()
            and not wire.tcp.write_lock.locked()
        ):
            await wire.send(lock, data)
            return
        async with lock:
            if wire is not None:
                await wire.flush_locked()
            await self.secured_conn.write(data)
        await trio.lowlevel.checkpoint()


class FastYamuxStream(YamuxStream):
    """A yamux stream whose common reads and writes skip the library's slow path.

    py-libp2p's read takes the muxer's stream lock, formats debug lines and runs window
    auto-tuning under a lock on every call; its write takes two locks per frame. Measured on a
    loopback ping-pong, that is most of the muxer's share of a small message's CPU. Here a read
    on a :class:`CreditBatchingYamux` waits for data, takes it and owes the peer the credit
    (what the library's credit release amounts to, batched as above), and a write that fits
    one frame and the send window goes out as one frame when no other writer holds the
    window. Anything else (no data yet, a closed or reset stream, a full window, a large
    write) takes the library's path.
    """

    async def read(self, n: int | None = -1) -> bytes:
        conn = self.conn
        if n is None or n <= 0 or not isinstance(conn, CreditBatchingYamux):
            return await super().read(n)
        sid = self.stream_id
        while True:
            buf = conn.stream_buffers.get(sid)
            if buf is None or self.reset_received or self.closed:
                return await super().read(n)  # EOF, reset, teardown: the library's answers
            if buf:
                data = bytes(buf[:n])
                del buf[:n]
                self.recv_window += len(data)
                update = conn.owe(sid, len(data))
                if update is not None:
                    try:
                        await conn._write_frame(update)
                    except Exception as exc:  # the connection failed: its reader finds out
                        log.debug("window update failed: %s", exc)
                return data
            event = conn.stream_events.get(sid)
            if self.recv_closed or event is None or conn.event_shutting_down.is_set():
                return await super().read(n)
            await event.wait()
            conn.stream_events[sid] = trio.Event()

    def write_nowait(self, data: bytes) -> bool:
        """Write ``data`` as one frame at once, without a task switch, when it fits one frame
        and the send window, no write of this stream is under way, and nothing else is being
        written on the connection (:meth:`_Wire.send_now`); False, with nothing done, else.
        The caller must not have a write of its own on this stream in progress."""
        conn = self.conn
        wire = getattr(conn, "wire", None)
        size = len(data)
        if (
            wire is None
            or not 0 < size <= MAX_MESSAGE_SIZE - HEADER_SIZE
            or size > self.send_window
            or self.send_closed
            or self.closed
            or self.window_lock.locked()
        ):
            return False
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
        if not wire.send_now(conn._write_lock, header + data):
            return False
        self.send_window -= size
        return True

    async def write(self, data: bytes) -> None:
        size = len(data)
        if (
            0 < size <= MAX_MESSAGE_SIZE - HEADER_SIZE
            and size <= self.send_window
            and not (self.send_closed or self.closed or self.window_lock.locked())
        ):
            self.send_window -= size
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
            await self.conn._write_frame(header + data)
            return
        await super().write(data)


def open_muxed(stream: INetStream) -> FastYamuxStream | None:
    """The yamux stream under ``stream`` while it is an open libp2p stream of ours, else None.
    ``NetStream.read`` and ``write`` take the stream's state lock (a task switch) on every call
    only to refuse a stream that failed, was reset or closed: a caller that reads or writes it
    all the time (:class:`~mossnode.node.links.FrameReader`, :class:`~mossnode.node.links.Links`)
    checks the state here and calls the yamux stream itself, and gives the stream up on any
    error, as it would on the errors ``NetStream`` raises."""
    if type(stream) is not NetStream or stream._state is not StreamState.OPEN:
        return None
    muxed = stream.muxed_stream
    return muxed if type(muxed) is FastYamuxStream else None


class BufferedTCPRead:
    """``TrioTCPStream.read`` through a buffer. Noise reads each message as a two-byte length
    and then its body, two socket reads (and trio round trips) per message; here one read of
    up to ``CHUNK`` bytes serves every message that has arrived."""

    CHUNK = 1 << 16

    def __init__(self, read: Callable[[Any, int | None], Any]) -> None:
        self.unbuffered = read

    async def read(self, stream: Any, n: int | None = None) -> bytes:
        buf: bytearray | None = stream.__dict__.get("_mossnode_buf")
        if buf:
            if n is None or n >= len(buf):
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:n])
                del buf[:n]
            return data
        if n is None or n == 0:
            return bytes(await self.unbuffered(stream, n))
        data = await self.unbuffered(stream, max(n, self.CHUNK))
        if len(data) <= n:
            return bytes(data)
        stream.__dict__["_mossnode_buf"] = bytearray(data[n:])
        return bytes(data[:n])


# the library's own read, also when this module is loaded again after tune_libp2p() ran
_TCP_READ = BufferedTCPRead(
    getattr(TrioTCPStream.read, "__mossnode_unbuffered__", TrioTCPStream.read)
)


async def widen_receive_window(stream: INetStream, size: int) -> None:
    """Let the peer send up to ``size`` bytes ahead of what we have read. py-libp2p's yamux
    starts at 256 KiB and grants more only as we read, so each frame crossed the wire in round
    trips after the previous one was applied. Best effort: a muxer without these internals
    keeps its own window."""
    muxed: Any = getattr(stream, "muxed_stream", None)
    grant = getattr(muxed, "send_window_update", None)
    window = getattr(muxed, "recv_window", None)
    if grant is None or type(window) is not int or window >= size:
        return
    muxed.recv_window = size
    if getattr(muxed, "target_recv_window", size) < size:
        muxed.target_recv_window = size
    try:
        await grant(size - window)
    except Exception as exc:  # the stream failed: its reader will find out
        log.debug("window update failed: %s", exc)


class KnownRecords:
    """Gossipsub checks the signed peer record that every RPC carries (~1 ms of CPU each, the
    costliest step of an idle node's traffic), though a peer sends the same record bytes until
    its addresses change. A record already accepted from that peer is not checked again for
    ``ttl_s`` (the peerstore keeps it two hours); new or different bytes always are."""

    def __init__(self, ttl_s: float = 600.0, max_peers: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_peers = max_peers
        self._seen: OrderedDict[ID, tuple[bytes, float]] = OrderedDict()

    def consume(self, msg: Any, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        record, now = msg.senderRecord, time.monotonic()
        known = self._seen.get(peer_id)
        if known is not None and known[0] == record and now < known[1]:
            return True
        ok = maybe_consume_signed_record(msg, host, peer_id)
        if ok:
            self._seen[peer_id] = (record, now + self.ttl_s)
            self._seen.move_to_end(peer_id)
            if len(self._seen) > self.max_peers:
                self._seen.popitem(last=False)
        return ok


class LocalRecord:
    """The sending side of the same record: gossipsub attaches the node's signed peer record
    to every RPC it sends, and py-libp2p rebuilds it for each one (the listen addresses read
    from the sockets and parsed into multiaddrs, compared with the cached record, whose
    envelope is serialised again): 5% of a busy daemon's CPU. Here the bytes are reused for
    ``ttl_s``; after that the library looks at the addresses again (and signs a new record if
    they changed), so a moved node's record is at most ``ttl_s`` stale."""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._by_host: dict[int, tuple[IHost, bytes, float]] = {}

    def envelope(self, host: IHost) -> tuple[bytes, bool]:
        now = time.monotonic()
        known = self._by_host.get(id(host))
        if known is not None and known[0] is host and now < known[2]:
            return known[1], False
        record, created = peerstore_module.env_to_send_in_RPC(host)
        if len(self._by_host) > 64:  # hosts of a process: one, more only in tests
            self._by_host.clear()
        self._by_host[id(host)] = (host, record, now + self.ttl_s)
        return record, created


class RpcReader:
    """Gossipsub reads each RPC's varint length one byte per stream read, and every read goes
    through the stream's locks, yamux's flow-control bookkeeping and its debug-log formatting:
    four or more reads per RPC, 7% of a busy daemon's CPU. Here a pubsub stream is read in
    chunks into its own buffer (one reader per stream: pubsub's read loop) and RPCs are cut
    from it, with the library's limits and errors: a length over ``max_length`` is refused
    before its body is read, a stream ending mid-RPC is an IncompleteReadError."""

    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self._buffers: weakref.WeakKeyDictionary[Reader, bytearray] = weakref.WeakKeyDictionary()

    async def read(self, reader: Reader, max_length: int) -> bytes:
        if max_length <= 0:
            raise ValueError("max_length must be greater than 0")
        buf = self._buffers.get(reader)
        if buf is None:
            buf = self._buffers[reader] = bytearray()
        while True:
            end = next((i for i, b in enumerate(buf[:10]) if b < 0x80), None)
            if end is not None or len(buf) >= 10:
                break
            await self._fill(reader, buf, "while reading varint length prefix")
        if end is None:
            raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
        length = decode_uvarint(bytes(buf[: end + 1]))
        if length > max_length:
            raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
        start = end + 1
        while len(buf) < start + length:
            await self._fill(reader, buf, f"in a message of {length} bytes")
        out = bytes(buf[start : start + length])
        del buf[: start + length]
        return out

    async def _fill(self, reader: Reader, buf: bytearray, where: str) -> None:
        chunk = await reader.read(self.CHUNK)
        if not chunk:
            raise IncompleteReadError(f"Stream ended {where}")
        buf += chunk


def tune_libp2p() -> None:
    """Point py-libp2p 0.8.1 at the parts above. It offers no hook for any: its muxer
    negotiation constructs ``Yamux`` by name, ignoring the muxer class a host is given, and
    pubsub calls ``maybe_consume_signed_record``, ``env_to_send_in_RPC`` and
    ``read_varint_prefixed_bytes_limited`` by name, and yamux its streams. The replacements keep the library's
    behaviour and only drop repeated work; idempotent."""
    muxer_multistream.Yamux = CreditBatchingYamux  # type: ignore[attr-defined]
    yamux_module.YamuxStream = FastYamuxStream  # type: ignore[misc]
    yamux_module.read_exactly = _yamux_read_exactly  # type: ignore[attr-defined]
    if not hasattr(TrioTCPStream.read, "__mossnode_buffered__"):
        buffered = _TCP_READ.read

        async def read(self: TrioTCPStream, n: int | None = None) -> bytes:
            return await buffered(self, n)

        read.__mossnode_buffered__ = True  # type: ignore[attr-defined]
        read.__mossnode_unbuffered__ = _TCP_READ.unbuffered  # type: ignore[attr-defined]
        TrioTCPStream.read = read  # type: ignore[method-assign]
    current = pubsub_module.maybe_consume_signed_record  # type: ignore[attr-defined]
    if not isinstance(getattr(current, "__self__", None), KnownRecords):
        consume = KnownRecords().consume
        pubsub_module.maybe_consume_signed_record = consume  # type: ignore[attr-defined]
        gossipsub_module.maybe_consume_signed_record = consume  # type: ignore[attr-defined]
    reading = pubsub_module.read_varint_prefixed_bytes_limited  # type: ignore[attr-defined]
    if not isinstance(getattr(reading, "__self__", None), RpcReader):
        pubsub_module.read_varint_prefixed_bytes_limited = RpcReader().read  # type: ignore[attr-defined]
    sending = pubsub_module.env_to_send_in_RPC  # type: ignore[attr-defined]
    if not isinstance(getattr(sending, "__self__", None), LocalRecord):
        envelope = LocalRecord().envelope
        pubsub_module.env_to_send_in_RPC = envelope  # type: ignore[attr-defined]
        gossipsub_module.env_to_send_in_RPC = envelope  # type: ignore[attr-defined]


def make_host(identity: Identity, mdns: bool = False) -> IHost:
    """A TCP/Noise/yamux host whose key, hence PeerID, is the node's identity."""
    tune_libp2p()
    return new_host(key_pair=create_new_key_pair(identity.seed), enable_mDNS=mdns)


class MemberGossipSub(GossipSub):
    """Gossipsub that relays only to peers ``admit`` accepts (the swarm's members).

    Connection gating closes a non-member's connection only after its join window; until then
    it could subscribe, be grafted into the mesh and receive the swarm's gossip. Here nothing is
    forwarded or replayed to it, its IWANTs go unanswered, and its GRAFTs are ignored.
    """

    admit: Callable[[ID], bool] = staticmethod(lambda peer: True)
    content_ids = False  # set by make_pubsub(envelopes=True)

    def _check_equivocation(self, msg: Any) -> bool:
        # py-libp2p drops a message reusing the (from, seqno) of one it saw with other bytes.
        # Without library signing those two fields are unsigned, so that rule would let any
        # relaying member pre-empt someone else's next message; with content ids it has no
        # job (envelopes carry their own signed sequence numbers and replay checks).
        return True if self.content_ids else super()._check_equivocation(msg)

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        peers = super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id)
        return [p for p in peers if self.admit(p)]

    async def send_recent_messages(self, peer_id: ID, topic: str) -> None:
        # py-libp2p replays its recent messages to every newly subscribed peer
        if self.admit(peer_id):
            await super().send_recent_messages(peer_id, topic)

    async def flush_pending_messages(self, peer_id: ID) -> None:
        # and queues messages for peers whose subscriptions it has not seen yet
        if self.admit(peer_id):
            await super().flush_pending_messages(peer_id)
        else:
            self._pending_messages.pop(peer_id, None)

    async def handle_iwant(self, iwant_msg: Any, sender_peer_id: ID) -> None:
        if self.admit(sender_peer_id):
            await super().handle_iwant(iwant_msg, sender_peer_id)

    async def handle_graft(self, graft_msg: Any, sender_peer_id: ID) -> None:
        if self.admit(sender_peer_id):
            await super().handle_graft(graft_msg, sender_peer_id)


def content_id(msg: Any) -> bytes:
    """A gossip message's id is the hash of its bytes (the SignedEnvelope): an unsigned
    ``from``/``seqno`` pair cannot be used to make nodes drop someone else's message as seen."""
    return hashlib.sha256(msg.data).digest()


def make_pubsub(
    host: IHost, heartbeat_s: float, *, envelopes: bool = False
) -> tuple[Pubsub, MemberGossipSub]:
    """Gossipsub with the settings above. With ``envelopes`` every message is a SignedEnvelope
    that topic validators open before it is relayed, so py-libp2p's own message signature (a
    second signature and check per message, by the same key) is off, and messages are
    identified by content (and py-libp2p's rule on reused ``(from, seqno)`` pairs is off, see
    :meth:`MemberGossipSub._check_equivocation`). Without it (a bare host, the benchmark's
    substrate), the library's signing and ids are kept."""
    router = MemberGossipSub(
        protocols=GOSSIPSUB_PROTOCOLS,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=heartbeat_s,  # type: ignore[arg-type]  # int in the stub, float works
        heartbeat_initial_delay=0.1,
        gossip_window=3,
        gossip_history=5,
        time_to_live=30,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
        prune_back_off=10,
    )
    if envelopes:
        router.content_ids = True
        pubsub = Pubsub(
            host, router, strict_signing=False, msg_id_constructor=content_id, seen_ttl=120
        )
    else:
        pubsub = Pubsub(host, router, strict_signing=True, seen_ttl=120)
    return pubsub, router


def topic(swarm_id: bytes, name: str) -> str:
    return f"/moss/{swarm_id.hex()[:32]}/{name}"


def maddrs(addrs: list[str]) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(a) for a in addrs]


def frame(data: bytes) -> bytes:
    """A 4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(data)) + data


async def write_frame(stream: INetStream, data: bytes) -> None:
    await stream.write(frame(data))


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise FrameError(f"stream closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: INetStream, max_size: int = MAX_FRAME) -> bytes:
    (n,) = struct.unpack(">I", await _read_exactly(stream, 4))
    if n > max_size:
        raise FrameError(f"frame of {n} bytes exceeds limit {max_size}")
    return await _read_exactly(stream, n)
