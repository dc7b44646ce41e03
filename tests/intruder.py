"""A rogue process for the mesh tests: its own identity, never admitted, injecting envelopes.

Usage: python tests/intruder.py MULTIADDR SWARM_ID_HEX MEMBER_PEER_ID SECONDS [sync|presence]
It connects to one member, subscribes to the swarm's topics and publishes (1) envelopes it signs
itself, (2) envelopes claiming to come from a member (bad signatures) and (3) garbage, then prints
how many messages it received on the topics as JSON. ``sync`` asks for the task state instead;
``presence`` writes its own heartbeats and garbage on the direct presence stream.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import cbor2
import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from mossnode.crypto.envelope import SIG_LEN, seal
from mossnode.crypto.identity import Identity
from mossnode.crypto.peerid import public_key_from_peer_id
from mossnode.node.daemon import PRESENCE_PROTO
from mossnode.node.host import frame, make_host, make_pubsub, read_frame, topic, write_frame
from mossnode.node.state import SYNC_PROTO


async def main(addr: str, swarm_hex: str, member: str, seconds: float, mode: str) -> None:
    ident = Identity.generate()
    swarm_id = bytes.fromhex(swarm_hex)
    host = make_host(ident)
    pubsub, router = make_pubsub(host, 1.0)
    received = 0
    async with (
        host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        background_trio_service(pubsub),
        background_trio_service(router),
    ):
        await pubsub.wait_until_ready()
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await host.connect(info)
        if mode == "sync":  # ask for the task state over anti-entropy, as a member would
            got = 0
            try:
                stream = await host.new_stream(info.peer_id, [SYNC_PROTO])
                await write_frame(stream, cbor2.dumps({"vector": {}, "heads": {}, "blocked": {}}))
                while batch := cbor2.loads(await read_frame(stream)):
                    got += len(batch)
            except Exception:
                pass
            print(json.dumps({"entries": got}))
            return
        if mode == "presence":  # heartbeats of its own, and garbage, straight to the member
            frames = 0
            stream = await host.new_stream(info.peer_id, [PRESENCE_PROTO])
            for seq in range(1, 11):
                own = seal(
                    ident,
                    swarm_id=swarm_id,
                    type="presence",
                    seq=seq,
                    timestamp=time.time_ns() // 1_000_000,
                    body={"addrs": [], "height": 99},
                )
                with contextlib.suppress(Exception):
                    await stream.write(frame(own) + frame(b"\x00garbage"))
                    frames += 2
                await trio.sleep(0.05)
            print(json.dumps({"frames": frames}))
            return
        names = ("presence", "consensus", "state", "msg")
        subs = [await pubsub.subscribe(topic(swarm_id, t)) for t in names]
        me = host.get_id().to_bytes()

        async def count(sub) -> None:
            nonlocal received
            while True:
                msg = await sub.get()
                if msg.from_id != me:  # the library hands our own publishes back to us
                    received += 1
                    print("received", list(msg.topicIDs), msg.from_id.hex(), file=sys.stderr)

        async with trio.open_nursery() as nursery:
            for s in subs:
                nursery.start_soon(count, s)
            await trio.sleep(1.5)
            seq = 1
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                now = time.time_ns() // 1_000_000
                own = seal(
                    ident,
                    swarm_id=swarm_id,
                    type="presence",
                    seq=seq,
                    timestamp=now,
                    body={"addrs": [], "height": 99},
                )
                # claim to be the member: splice its key into our own signed payload
                forged = bytearray(
                    seal(
                        ident,
                        swarm_id=swarm_id,
                        type="decision",
                        seq=seq,
                        timestamp=now,
                        body={"seq": 1},
                    )
                )

                fields = cbor2.loads(bytes(forged[SIG_LEN:]))
                fields[3] = public_key_from_peer_id(member)
                forged_bytes = bytes(forged[:SIG_LEN]) + cbor2.dumps(fields, canonical=True)
                for t, data in (
                    ("presence", own),
                    ("consensus", forged_bytes),
                    ("presence", b"\x00garbage"),
                ):
                    with contextlib.suppress(Exception):
                        await pubsub.publish(topic(swarm_id, t), data)
                seq += 1
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    print(json.dumps({"received": received, "sent_rounds": seq - 1}))


def run_intruder(target: Any, member: str, seconds: float, mode: str = "inject") -> Any:
    """This script against daemon ``target`` (a cluster node), as a separate process: what it
    printed last (JSON) and its stderr."""
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            target.addr,
            target.status()["swarm_id"],
            member,
            str(seconds),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


if __name__ == "__main__":
    mode = sys.argv[5] if len(sys.argv) > 5 else "inject"
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), mode)
