"""A StateService around a real replica and store, without a daemon (as test_state_writes
builds it), and the fake libp2p stream and daemon its sync paths talk to."""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import trio
from test_crdt_support import SWARM, policy_for

from mossnode.crypto.identity import Identity
from mossnode.node.state import StateService
from mossnode.protocols.crdt import Replica


class FakeStream:
    """Hands out ``frames``, then blocks forever (a silent peer); records what is written."""

    def __init__(self, frames: list[bytes] | None = None, peer: str = "") -> None:
        self.inbuf = bytearray(b"".join(struct.pack(">I", len(f)) + f for f in frames or []))
        self.written: list[bytes] = []
        self.closed = False
        self.muxed_conn = type("Conn", (), {"peer_id": peer})()

    async def read(self, n: int) -> bytes:
        if not self.inbuf:
            await trio.sleep_forever()
        chunk = bytes(self.inbuf[:n])
        del self.inbuf[:n]
        await trio.lowlevel.checkpoint()
        return chunk

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        self.closed = True

    def frames(self) -> list[bytes]:
        """What was written, split into frames."""
        buf, out = b"".join(self.written), []
        while buf:
            (n,) = struct.unpack(">I", buf[:4])
            out.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
        return out


class FakeDaemon:
    """Members by peer id; ``host.new_stream`` hands out ``self.stream``."""

    def __init__(self, members: set[str], stream: Any = None) -> None:
        self.rejected: Counter[str] = Counter()
        self.members = members
        self.stream = stream
        self.started = 0.0
        daemon = self

        class Host:
            async def new_stream(self, peer: Any, protos: Any) -> Any:
                return daemon.stream

            def get_connected_peers(self) -> list[str]:
                return []

        self.host = Host()

    def _swarm(self) -> Any:
        members = self.members

        class Swarm:
            def by_peer_id(self, p: str) -> Any:
                return object() if p in members else None

        return Swarm()


def service(store: Any, me: Identity, members: list[Identity], daemon: Any = None) -> Any:
    svc: Any = object.__new__(StateService)
    svc.d = daemon
    svc.replica = Replica(me, SWARM, policy_for(members))
    svc.store = store
    svc.counters = Counter()
    svc._to_commit, svc._queued, svc._stored = [], 0, 0
    svc._durable_own = 0
    svc._to_retract = {}
    svc._commit_wanted, svc._committed = trio.Event(), trio.Event()
    svc._to_publish, svc._publish_wanted = [], trio.Event()
    svc._since_snapshot = 0
    svc._writes = []
    svc._synced = trio.Event()
    svc._synced.set()
    svc._syncing = {}
    svc._nursery = None
    svc.changes = []
    svc.on_change = lambda paths, wake: svc.changes.append((paths, wake))
    return svc
