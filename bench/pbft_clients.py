"""A bench-only gateway: many PBFT clients (one Ed25519 key each) behind one libp2p host.

It speaks the daemons' protocol exactly: signed ``pbft.request`` envelopes over
``/moss/pbft/1`` streams to the validators, signed ``pbft.reply`` envelopes back, f+1 matching
replies per request (the sans-IO :class:`~mossnode.protocols.pbft.Client`, one per key, one
outstanding request each). Validators send a gateway's clients their replies through the
gateway (it relayed their requests), so one host serves every key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from mossnode.crypto.envelope import Rejection, open_envelope, seal
from mossnode.crypto.identity import Identity
from mossnode.crypto.peerid import peer_id_from_public_key
from mossnode.node.consensus import MAX_FRAME, PBFT_PROTO
from mossnode.node.host import frame, open_muxed, read_frame, write_frame
from mossnode.node.links import FrameReader
from mossnode.protocols.decisions import encode_op
from mossnode.protocols.membership import decode_invite
from mossnode.protocols.pbft import Client, Completed, Send, SetTimer
from mossnode.protocols.pbft.messages import REPLIES


@dataclass
class Lane:
    """One client key and the requests it still has to make."""

    identity: Identity
    client: Client
    todo: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)


class Gateway:
    def __init__(self, host: IHost, identity: Identity, swarm_id: bytes) -> None:
        self.host = host
        self.identity = identity
        self.swarm_id = swarm_id
        self.validators: list[bytes] = []
        self.lanes: dict[bytes, Lane] = {}
        self.latencies: list[float] = []
        self.completed = 0
        self.replies_in = 0
        self.verified = 0  # reply envelopes whose signature was checked
        self.stale = 0  # reply envelopes no client waited for any more
        self.results: dict[tuple[bytes, int], bytes] = {}
        self.broadcast_all = False  # warm-up: every validator sees each key through us
        self._links: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._timers: dict[bytes, float] = {}
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.op: Callable[[Lane], bytes] = lambda lane: encode_op("pause", {})

    # -- set-up ------------------------------------------------------------------------------

    async def join(self, founder_addr: str, token: str) -> None:
        """Become a member through an invite, as ``mossnode join`` does."""
        from mossnode.node.daemon import JOIN_PROTO

        info = info_from_p2p_addr(_maddr(founder_addr))
        _, swarm_id = decode_invite(token)
        await self.host.connect(info)
        stream = await self.host.new_stream(info.peer_id, [JOIN_PROTO])
        req = seal(
            self.identity,
            swarm_id=swarm_id,
            type="join.request",
            seq=1,
            timestamp=time.time_ns() // 1_000_000,
            body={"invite": token, "addrs": [str(a) for a in self.host.get_addrs()]},
        )
        await write_frame(stream, req)
        reply = cbor2.loads(await read_frame(stream))
        await stream.close()
        if not reply.get("ok"):
            raise RuntimeError(f"join refused: {reply.get('error')}")

    def add_lane(self, identity: Identity) -> Lane:
        c = Client(identity, self.validators, self.swarm_id, retransmit_ms=2_000)
        lane = self.lanes[identity.public_key] = Lane(identity, c)
        return lane

    async def run(self, addrs: list[str], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_stream_handler(PBFT_PROTO, self._on_stream)
            for a in addrs:
                await self.host.connect(info_from_p2p_addr(_maddr(a)))
            nursery.start_soon(self._timer_loop)
            task_status.started()
            await trio.sleep_forever()

    # -- driving -----------------------------------------------------------------------------

    def start(self, lane: Lane, count: int) -> None:
        lane.todo = count
        self._next(lane)

    async def wait_idle(self, timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            while any(lane.todo or lane.client.busy for lane in self.lanes.values()):
                self._idle = trio.Event()
                await self._idle.wait()

    def _next(self, lane: Lane) -> None:
        if lane.todo <= 0:
            return
        lane.todo -= 1
        now = time.time_ns() // 1_000_000
        t, effects = lane.client.submit(self.op(lane), now)
        lane.sent_at[t] = time.perf_counter()
        self._effects(lane, effects)

    def _effects(self, lane: Lane, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, Send):
                if e.to is None or self.broadcast_all:
                    for v in self.validators:
                        self._send(peer_id_from_public_key(v), e.data)
                else:
                    self._send(e.to, e.data)
            elif isinstance(e, SetTimer):
                self._timers[lane.identity.public_key] = e.at_ms
                self._wake.set()
            elif isinstance(e, Completed):
                started = lane.sent_at.pop(e.timestamp, None)
                if started is not None:
                    self.latencies.append(time.perf_counter() - started)
                self.completed += 1
                self.results[(lane.identity.public_key, e.timestamp)] = e.result
                self._timers.pop(lane.identity.public_key, None)
                self._next(lane)
                self._idle.set()

    # -- network -----------------------------------------------------------------------------

    def _send(self, pid: str, data: bytes) -> None:
        link = self._links.get(pid)
        if link is None:
            assert self._nursery is not None
            link, recv = trio.open_memory_channel[bytes](100_000)
            self._links[pid] = link
            self._nursery.start_soon(self._link, pid, recv)
        link.send_nowait(data)

    async def _link(self, pid: str, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        stream = await self.host.new_stream(ID.from_base58(pid), [PBFT_PROTO])
        async for data in recv:
            frames = [frame(data)]
            while True:
                try:
                    frames.append(frame(recv.receive_nowait()))
                except trio.WouldBlock:
                    break
            await (open_muxed(stream) or stream).write(b"".join(frames))

    async def _on_stream(self, stream: INetStream) -> None:
        reader = FrameReader(stream)
        try:
            while True:
                self._on_reply(await reader.read(MAX_FRAME))
        except Exception:
            pass

    def _on_reply(self, data: bytes) -> None:
        """A validator's ``pbft.reply`` (one client) or ``pbft.replies`` (every client of a
        batch): its signature is checked once, and only if a client still waits for it, then
        it goes to each waiting client it answers."""
        self.replies_in += 1
        try:
            fields = cbor2.loads(data[64:])
            body = fields[6]
            if fields[2] == REPLIES:
                items = [(bytes.fromhex(k), item) for k, item in body["rs"].items()]
            else:
                items = [(body["c"], [body["t"]])]
        except Exception:
            return
        waiting = []
        for client, item in items:
            lane = self.lanes.get(client)
            if lane is not None and lane.client.outstanding == item[0]:
                waiting.append(lane)
        if not waiting:
            self.stale += 1
            return
        now = time.time_ns() // 1_000_000
        env = open_envelope(data, swarm_id=self.swarm_id, now_ms=now)
        self.verified += 1
        if isinstance(env, Rejection):
            return
        for lane in waiting:
            self._effects(lane, lane.client.receive_opened(env, now))

    async def _timer_loop(self) -> None:
        while True:
            wake = self._wake
            now = time.time_ns() // 1_000_000
            for key, at in sorted(self._timers.items(), key=lambda kv: kv[1]):
                if at <= now:
                    del self._timers[key]
                    lane = self.lanes[key]
                    self._effects(lane, lane.client.on_timer("pbft.client", now))
            nxt = min(self._timers.values(), default=now + 1000)
            with trio.move_on_after(max(nxt - now, 1) / 1000):
                await wake.wait()
            if wake.is_set():
                self._wake = trio.Event()


def _maddr(addr: str) -> Any:
    import multiaddr

    return multiaddr.Multiaddr(addr)


__all__ = ["Gateway", "Lane"]
