"""The py-libp2p tuning in node/host.py: batched yamux credit and once-checked peer records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.pb import rpc_pb2
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import TYPE_WINDOW_UPDATE
from libp2p.tools.anyio_service import background_trio_service

from mossnode.crypto.identity import Identity
from mossnode.node import host as host_module
from mossnode.node.host import (
    BufferedTCPRead,
    CreditBatchingYamux,
    FastYamuxStream,
    KnownRecords,
    LocalRecord,
    _Wire,
    make_host,
    make_pubsub,
    write_frame,
)
from mossnode.node.links import FrameReader

PROTO = TProtocol("/moss-test/bulk/1")
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[IHost, IHost]]:
    a, b = make_host(Identity.generate()), make_host(Identity.generate())
    async with a.run(LISTEN), b.run(LISTEN):
        await a.connect(info_from_p2p_addr(multiaddr.Multiaddr(str(b.get_addrs()[0]))))
        yield a, b


@asynccontextmanager
async def gossip_pair() -> AsyncIterator[tuple[IHost, Any, Any]]:
    """Host a, its pubsub and host b's subscription to topic "t", once the mesh carries a's
    messages to b (later reads may still return a stray warm-up)."""
    a, b = make_host(Identity.generate()), make_host(Identity.generate())
    pa, ra = make_pubsub(a, 0.2, envelopes=True)
    pb, rb = make_pubsub(b, 0.2, envelopes=True)
    async with (
        a.run(LISTEN),
        b.run(LISTEN),
        background_trio_service(pa),
        background_trio_service(ra),
        background_trio_service(pb),
        background_trio_service(rb),
    ):
        await pa.wait_until_ready()
        await pb.wait_until_ready()
        await pa.subscribe("t")
        sub = await pb.subscribe("t")
        await a.connect(info_from_p2p_addr(multiaddr.Multiaddr(str(b.get_addrs()[0]))))
        with trio.fail_after(30):
            while True:
                await pa.publish("t", b"warm-up")
                with trio.move_on_after(0.5):
                    if (await sub.get()).data == b"warm-up":
                        break
        yield a, pa, sub


def muxer_of(stream: INetStream) -> Any:
    return stream.muxed_conn


def muxer_of_conn(conn: Any) -> Any:
    """The yamux muxer of a swarm connection (the library's list or single connection)."""
    conn = conn[0] if isinstance(conn, list) else conn
    return conn.muxed_conn


async def test_hosts_use_the_batching_muxer_and_small_reads_owe_credit(monkeypatch: Any) -> None:
    credit_frames: list[bytes] = []
    frames = 0
    write = SecureSession.write

    async def counting(self: SecureSession, data: bytes) -> None:  # every frame on the wire
        nonlocal frames
        frames += 1
        if data[1] == TYPE_WINDOW_UPDATE and data[2:4] == b"\0\0":
            credit_frames.append(data)
        await write(self, data)

    fast_send = _Wire.send

    async def counting_fast(self: _Wire, lock: trio.Lock, data: bytes) -> None:
        nonlocal frames
        frames += 1
        if data[1] == TYPE_WINDOW_UPDATE and data[2:4] == b"\0\0":
            credit_frames.append(data)
        await fast_send(self, lock, data)

    monkeypatch.setattr(SecureSession, "write", counting)
    monkeypatch.setattr(_Wire, "send", counting_fast)  # the fast path's frames (Noise over TCP)
    got: list[bytes] = []
    server_streams: list[INetStream] = []

    async def handler(stream: INetStream) -> None:
        server_streams.append(stream)
        while data := await stream.read(4096):
            got.append(data)

    async with two_hosts() as (a, b):
        b.set_stream_handler(PROTO, handler)
        stream = await a.new_stream(b.get_id(), [PROTO])
        assert isinstance(muxer_of(stream), CreditBatchingYamux)
        assert isinstance(stream.muxed_stream, FastYamuxStream)
        reader: Any = None
        for rounds in (1, 2):
            for _ in range(50):
                await stream.write(b"m" * 100)
            with trio.fail_after(10):
                while sum(map(len, got)) < 5000 * rounds:
                    await trio.sleep(0.01)
            reader = muxer_of(server_streams[0])
            if rounds == 1:
                assert frames >= 50, "the frames on the wire are counted"
                credit_frames.clear()
        assert isinstance(reader, CreditBatchingYamux)
        # then 50 reads of 100 bytes: the credit is owed, not sent as 50 WINDOW_UPDATE frames
        assert len(credit_frames) <= 1
        assert sum(reader._owed.values()) > 0
        await stream.close()


async def test_bulk_transfer_through_a_slow_reader_never_stalls_the_sender() -> None:
    total = 8 * 1024 * 1024  # 32 times the initial window
    received = 0
    done = trio.Event()

    async def handler(stream: INetStream) -> None:
        nonlocal received
        while received < total:
            data = await stream.read(7001)  # reads that leave odd amounts of credit
            assert data, "stream ended early"
            received += len(data)
            if received % 5 == 0:
                await trio.sleep(0.001)
        done.set()

    async with two_hosts() as (a, b):
        b.set_stream_handler(PROTO, handler)
        stream = await a.new_stream(b.get_id(), [PROTO])
        chunk = b"b" * 10_000
        with trio.fail_after(60):  # py-libp2p's sender gives up after 5 s without credit
            for _ in range(total // len(chunk) + 1):
                await stream.write(chunk)
            await done.wait()
    assert received >= total


async def test_frames_of_every_size_arrive_whole_and_in_order_then_eof() -> None:
    """Writes that fit one frame take the fast path, larger ones the library's (several
    frames); reads of any size see the same bytes in order, then end-of-stream."""
    sizes = [1, 100, 70_000, 5, 300_000, 65_524, 65_525, 64]
    sent = b"".join(bytes([i]) * n for i, n in enumerate(sizes))
    got = bytearray()
    done = trio.Event()

    async def handler(stream: INetStream) -> None:
        reads = iter([3, 50_000, 1, 65_536, 7] * 100)
        try:
            while data := await stream.read(next(reads)):
                got.extend(data)
        except Exception:  # the writer's close ends the stream
            pass
        done.set()

    async with two_hosts() as (a, b):
        b.set_stream_handler(PROTO, handler)
        stream = await a.new_stream(b.get_id(), [PROTO])
        with trio.fail_after(30):
            for i, n in enumerate(sizes):
                await stream.write(bytes([i]) * n)
            await stream.close()
            await done.wait()
    assert bytes(got) == sent


def count_true(monkeypatch: Any, cls: type, name: str) -> list[int]:
    """Wrap the method ``cls.name`` (which answers a bool) to count its True answers; the
    count is the returned list's one element."""
    count = [0]
    method = getattr(cls, name)

    def counting(self: Any, *args: Any) -> bool:
        ok = method(self, *args)
        count[0] += ok
        return bool(ok)

    monkeypatch.setattr(cls, name, counting)
    return count


class ShortSocket:
    """A socket that takes at most ``limit`` bytes per send and refuses every
    ``refuse_every``-th send (BlockingIOError), as a full socket buffer does."""

    def __init__(self, sock: Any, limit: int, refuse_every: int = 2) -> None:
        self.sock, self.limit, self.every, self.calls = sock, limit, refuse_every, 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.calls % self.every == 0:
            raise BlockingIOError
        return int(self.sock.send(data[: self.limit]))


async def test_interleaved_streams_through_the_fast_frame_paths_arrive_whole_and_in_order(
    monkeypatch: Any,
) -> None:
    """Several streams written at once, small and large frames, with the sender's socket
    taking a few bytes at a time (the rest waits for the socket under the write locks): each
    stream reads exactly its own bytes in order; the fast paths carried the frames."""
    delivered = count_true(monkeypatch, CreditBatchingYamux, "deliver")
    sizes = [1, 300, 12, 70_000, 5, 4_000, 65_524, 64] * 3
    got: dict[int, bytearray] = {}
    done = trio.Event()

    async def handler(stream: INetStream) -> None:
        reader = FrameReader(stream)
        first = await reader.read(1 << 20)
        buf = got.setdefault(first[0], bytearray(first))
        try:
            while True:
                buf.extend(await reader.read(1 << 20))
        except Exception:  # the writer's close ends the stream
            pass
        if len(got) == 3 and all(len(b) == 2 * sum(sizes) for b in got.values()):
            done.set()

    async with two_hosts() as (a, b):
        b.set_stream_handler(PROTO, handler)
        streams = [await a.new_stream(b.get_id(), [PROTO]) for _ in range(3)]
        wire = muxer_of(streams[0]).wire
        assert isinstance(wire, _Wire)
        short = ShortSocket(wire.sock, 700)
        monkeypatch.setattr(wire, "sock", short)

        async def write(k: int, stream: INetStream) -> None:
            for n in sizes:
                await write_frame(stream, bytes([k]) * n)
            await stream.close()

        with trio.fail_after(60):
            for n in sizes:  # one writer, the streams' frames interleaved
                for k, stream in enumerate(streams):
                    await write_frame(stream, bytes([k]) * n)
            async with trio.open_nursery() as nursery:  # then writers racing for the locks
                for k, stream in enumerate(streams):
                    nursery.start_soon(write, k, stream)
            await done.wait()
    assert short.calls > len(sizes) * 3
    assert delivered[0] > 0
    for k in range(3):
        assert bytes(got[k]) == bytes([k]) * (2 * sum(sizes))


async def test_links_write_at_once_when_idle_and_keep_order_through_a_short_socket(
    monkeypatch: Any,
) -> None:
    """An idle link's sends go to the socket from send() itself (no task switch); what the
    socket does not take is written by a flush task before any later frame, and sends made
    meanwhile queue behind it: the peer reads every frame whole and in order."""
    from collections import Counter

    from mossnode.node.links import Links

    at_once = count_true(monkeypatch, FastYamuxStream, "write_nowait")
    flushes = 0
    flush = _Wire._flush

    async def counting_flush(self: _Wire, lock: trio.Lock) -> None:
        nonlocal flushes
        flushes += 1
        await flush(self, lock)

    monkeypatch.setattr(_Wire, "_flush", counting_flush)
    got: list[bytes] = []
    sent = [bytes([k % 251]) * (1 + (k * 977) % 9000) for k in range(300)]

    async def handler(stream: INetStream) -> None:
        reader = FrameReader(stream)
        while True:
            got.append(await reader.read(1 << 20))

    async with two_hosts() as (a, b), trio.open_nursery() as nursery:
        b.set_stream_handler(PROTO, handler)
        links = Links(a, PROTO, Counter())
        links.bind(nursery)
        links.send(str(b.get_id()), b"first")  # opens the stream
        with trio.fail_after(30):
            while not got:
                await trio.sleep(0.01)
            wire = next(iter(a.get_network().connections.values()))
            wire = muxer_of_conn(wire).wire
            assert isinstance(wire, _Wire)
            short = ShortSocket(wire.sock, 6000, refuse_every=5)
            monkeypatch.setattr(wire, "sock", short)
            k = 0
            while k < len(sent):  # single sends and bursts (send_many: one write if idle)
                burst = sent[k : k + k % 4 + 1]
                if len(burst) == 1:
                    links.send(str(b.get_id()), burst[0])
                else:
                    links.send_many(str(b.get_id()), burst)
                k += len(burst)
                if k % 3 == 0:
                    await trio.sleep(0.001)  # let the flush task and the link's task run
            while len(got) < len(sent) + 1:
                await trio.sleep(0.01)
            # then frames sent one at a time to a link that is idle again: how many of the
            # burst's frames went at once depends on how busy the machine was, these do not
            tail = [b"tail %d" % i for i in range(6)]
            for i, frame in enumerate(tail):
                links.send(str(b.get_id()), frame)
                while len(got) < len(sent) + 2 + i:
                    await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert got == [b"first", *sent, *tail]
    assert at_once[0] > 0 and flushes > 0  # both paths ran


async def test_a_closed_connection_ends_the_fast_reader_with_eof() -> None:
    ended = trio.Event()
    got = bytearray()

    async def handler(stream: INetStream) -> None:
        try:
            while data := await stream.read(4096):
                got.extend(data)
        except Exception:
            pass
        ended.set()

    async with two_hosts() as (a, b):
        b.set_stream_handler(PROTO, handler)
        stream = await a.new_stream(b.get_id(), [PROTO])
        await stream.write(b"x" * 100)
        with trio.fail_after(10):
            while len(got) < 100:
                await trio.sleep(0.01)
            await a.disconnect(b.get_id())
            await ended.wait()
    assert bytes(got) == b"x" * 100


async def test_the_buffered_socket_read_serves_exact_and_open_reads_from_one_chunk() -> None:
    chunks = [b"abcdefghij", b"", b"klm"]
    asked: list[int | None] = []

    async def unbuffered(stream: Any, n: int | None) -> bytes:
        asked.append(n)
        return chunks.pop(0)

    class Stream:
        pass

    read, s = BufferedTCPRead(unbuffered).read, Stream()
    assert await read(s, 2) == b"ab"  # one socket read of a whole chunk
    assert await read(s, 3) == b"cde"
    assert await read(s, None) == b"fghij"  # what is buffered, without a socket read
    assert asked == [BufferedTCPRead.CHUNK]
    assert await read(s, 4) == b""  # end of stream passes through
    assert await read(s, 10) == b"klm"
    assert asked == [BufferedTCPRead.CHUNK] * 3


def test_a_peer_record_is_checked_once_until_it_changes(monkeypatch: Any) -> None:
    checked: list[bytes] = []

    def check(msg: Any, host: Any, peer_id: Any) -> bool:
        checked.append(msg.senderRecord)
        return bool(msg.senderRecord != b"forged")

    monkeypatch.setattr(host_module, "maybe_consume_signed_record", check)
    sender = make_host(Identity.generate())
    record, _ = env_to_send_in_RPC(sender)
    known = KnownRecords(ttl_s=600)
    peer = sender.get_id()

    def rpc(sender_record: bytes | None) -> Any:
        msg = rpc_pb2.RPC()
        if sender_record is not None:
            msg.senderRecord = sender_record
        return msg

    assert known.consume(rpc(record), sender, peer)
    assert known.consume(rpc(record), sender, peer)
    assert checked == [record]  # the same bytes again are not checked again
    assert not known.consume(rpc(b"forged"), sender, peer)
    assert not known.consume(rpc(b"forged"), sender, peer)
    assert checked == [record, b"forged", b"forged"]  # a refused record is never remembered
    assert known.consume(rpc(None), sender, peer)  # no record: nothing to check
    assert known.consume(rpc(b"moved"), sender, peer)  # new addresses, new record: checked
    assert known.consume(rpc(record), sender, peer)
    assert checked[3:] == [b"moved", record]
    expired = KnownRecords(ttl_s=0)
    assert expired.consume(rpc(record), sender, peer)
    assert expired.consume(rpc(record), sender, peer)
    assert checked[5:] == [record, record]  # past its ttl a record is checked again


def test_the_own_record_is_built_once_per_ttl_and_stays_valid(monkeypatch: Any) -> None:
    from libp2p.peer import peerstore

    built: list[Any] = []
    real = peerstore.env_to_send_in_RPC

    def counting(host: Any) -> tuple[bytes, bool]:
        built.append(host)
        return real(host)

    monkeypatch.setattr(peerstore, "env_to_send_in_RPC", counting)
    a, b = make_host(Identity.generate()), make_host(Identity.generate())
    from libp2p.pubsub import gossipsub, pubsub

    for module in (gossipsub, pubsub):  # what the hosts' gossip calls
        assert isinstance(module.env_to_send_in_RPC.__self__, LocalRecord)
    local = LocalRecord(ttl_s=600)
    first, _ = local.envelope(a)
    assert local.envelope(a) == (first, False)
    assert built == [a]  # reused, not rebuilt
    other, _ = local.envelope(b)
    assert other != first and built == [a, b]  # one record per host
    msg = rpc_pb2.RPC()
    msg.senderRecord = first
    assert KnownRecords().consume(msg, b, a.get_id())  # what it hands out is a's valid record
    expired = LocalRecord(ttl_s=0)
    expired.envelope(a)
    expired.envelope(a)
    assert built[2:] == [a, a]  # past its ttl the library builds (and checks) it again


def test_the_real_record_check_still_refuses_a_record_of_another_peer() -> None:
    a, b = make_host(Identity.generate()), make_host(Identity.generate())
    record, _ = env_to_send_in_RPC(a)
    msg = rpc_pb2.RPC()
    msg.senderRecord = record
    known = KnownRecords()
    assert not known.consume(msg, b, b.get_id())  # a's record, claimed by b
    assert known.consume(msg, b, a.get_id())


async def test_a_reused_from_and_seqno_cannot_suppress_another_message() -> None:
    """Daemon pubsub signs nothing itself (envelopes do) and names messages by content: a
    message reusing another's unsigned (from, seqno) is a different message, not a duplicate."""
    async with gossip_pair() as (a, pa, sub):
        assert not pa.strict_signing
        got: list[bytes] = []
        with trio.fail_after(30):
            for data in (b"honest", b"same from and seqno"):
                msg = rpc_pb2.Message(
                    data=data, topicIDs=["t"], from_id=a.get_id().to_bytes(), seqno=b"\0" * 8
                )
                await pa.push_msg(a.get_id(), msg)
            # both arrive (a suppressed one would time out), in either order: pubsub hands
            # each message to its own task
            while not {b"honest", b"same from and seqno"} <= set(got):
                got.append(bytes((await sub.get()).data))


class ChunkStream:
    """A stream that hands out what it holds in pieces of a given size, then ends."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece, self.reads = data, piece, 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        size = min(self.piece, n if n is not None and n > 0 else self.piece)
        out, self.data = self.data[:size], self.data[size:]
        return out


async def test_rpcs_are_cut_from_chunked_reads_with_the_librarys_limits() -> None:
    from libp2p.exceptions import ParseError
    from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
    from libp2p.utils.varint import encode_varint_prefixed

    from mossnode.node.host import RpcReader

    bodies = [b"", b"x", b"y" * 127, b"z" * 128, b"w" * 70_000, b"v" * 300]
    wire = b"".join(encode_varint_prefixed(m) for m in bodies)
    for piece in (1, 2, 3, 1000, 1 << 20):  # however the bytes arrive
        stream, reader = ChunkStream(wire, piece), RpcReader()
        assert [await reader.read(stream, 1 << 20) for _ in bodies] == bodies
        if piece == 1 << 20:
            assert stream.reads <= 3  # not one read per length byte
        with pytest.raises(IncompleteReadError):  # the stream ended between RPCs
            await reader.read(stream, 1 << 20)
    cut = ChunkStream(encode_varint_prefixed(b"a" * 500)[:300], 64)
    with pytest.raises(IncompleteReadError):  # it ended inside one
        await RpcReader().read(cut, 1 << 20)
    big = ChunkStream(encode_varint_prefixed(b"b" * 5000), 1 << 20)
    with pytest.raises(MessageTooLarge):  # refused on its length, before its body
        await RpcReader().read(big, 4096)
    with pytest.raises(ParseError):
        await RpcReader().read(ChunkStream(b"\xff" * 12, 4), 1 << 20)


async def test_gossip_carries_small_and_large_messages_through_the_buffered_reader() -> None:
    from libp2p.pubsub import pubsub

    from mossnode.node.host import RpcReader

    async with gossip_pair() as (_, pa, sub):
        assert isinstance(pubsub.read_varint_prefixed_bytes_limited.__self__, RpcReader)
        with trio.fail_after(30):
            sent = [bytes([i]) * size for i, size in enumerate((1, 200, 70_000, 3, 300_000, 5))]
            for data in sent:
                await pa.publish("t", data)
            got: list[bytes] = []
            while len(got) < len(sent):
                data = bytes((await sub.get()).data)
                if data != b"warm-up":
                    got.append(data)
        # pubsub hands each message to its own task, so gossip keeps no order between them
        assert sorted(got) == sorted(sent)
