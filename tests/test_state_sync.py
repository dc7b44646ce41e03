"""node.state: a syncing node lets the serving peer send its frames ahead (the window grant)."""

from __future__ import annotations

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from mossnode.crypto.identity import Identity
from mossnode.node.host import make_host, widen_receive_window
from mossnode.node.state import SYNC_WINDOW

PROTO = TProtocol("/moss-test/sync-window/1")
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
AHEAD = 4 << 20  # four 1 MB frames: 16 times py-libp2p's initial window


async def test_the_server_writes_frames_ahead_of_a_receiver_that_is_busy() -> None:
    """The receiver reads nothing until the server has written AHEAD bytes: without the grant
    the server's writes would wait for reads (and py-libp2p's sender give up after 5 s)."""
    written = trio.Event()

    async def serve(stream: INetStream) -> None:
        for _ in range(AHEAD // (1 << 20)):
            await stream.write(b"f" * (1 << 20))
        written.set()
        await stream.close()

    syncing, serving = make_host(Identity.generate()), make_host(Identity.generate())
    async with syncing.run(LISTEN), serving.run(LISTEN):
        serving.set_stream_handler(PROTO, serve)
        addr = multiaddr.Multiaddr(str(serving.get_addrs()[0]))
        await syncing.connect(info_from_p2p_addr(addr))
        stream = await syncing.new_stream(serving.get_id(), [PROTO])
        await widen_receive_window(stream, SYNC_WINDOW)
        await stream.write(b"?")
        with trio.fail_after(30):  # without the grant, never: the writes wait for reads
            await written.wait()
        got = 0
        with trio.fail_after(20):
            while got < AHEAD:
                got += len(await stream.read(1 << 16))
        assert got == AHEAD
