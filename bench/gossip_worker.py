"""One mesh member for ``bench/gossip.py``: the real Daemon (mode moss) or bare gossipsub (bare).

Both modes use the same host factory, gossipsub settings and topology, and authenticate every
message with one Ed25519 signature: bare with py-libp2p's message signing (its default), moss
with its SignedEnvelope (py-libp2p's own signing is off there, see ``make_pubsub``). Moss adds
what the daemon really does per message: sealing, the topic validator that opens every envelope
(signature, membership, replay), presence traffic and the rest of the running daemon.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from mossnode.crypto.identity import Identity
from mossnode.node.config import load_config
from mossnode.node.daemon import Daemon
from mossnode.node.host import maddrs, make_host, make_pubsub, topic


async def read_line() -> str:
    stdin = trio.lowlevel.FdStream(0)
    buf = b""
    while b"\n" not in buf:
        chunk = await stdin.receive_some(4096)
        if not chunk:
            raise SystemExit("orchestrator went away")
        buf += chunk
    return buf.decode().strip()


async def main(spec: dict[str, Any]) -> None:
    ident = Identity(bytes.fromhex(spec["seed"]))
    rates: list[int] = spec["rates"]
    send_s: float = spec["send_s"]
    phase_s = send_s + spec["drain_s"]
    recv: dict[int, list[tuple[int, float]]] = {k: [] for k in range(len(rates))}
    async with trio.open_nursery() as nursery:
        if spec["mode"] == "moss":
            sd = Path(spec["state_dir"])
            daemon = Daemon(sd, load_config(sd), ident, ["/ip4/127.0.0.1/tcp/0"])
            await nursery.start(daemon.run)
            host, pubsub = daemon.host, daemon.pubsub
            t = topic(daemon._swarm().swarm_id, "bench")
            pubsub.set_topic_validator(t, daemon._validator, False)

            async def publish(body: dict[str, Any]) -> None:
                await daemon.publish("bench", "bench", body)

            def decode(data: bytes) -> Any:
                env = daemon._validated.pop(hashlib.sha256(data).digest(), None)
                return env.body if env is not None else None
        else:
            host = make_host(ident)
            pubsub, router = make_pubsub(host, 1.0)
            t = "/bench"
            cm = host.run(maddrs(["/ip4/127.0.0.1/tcp/0"]))
            await cm.__aenter__()
            s1 = background_trio_service(pubsub)
            await s1.__aenter__()
            s2 = background_trio_service(router)
            await s2.__aenter__()
            await pubsub.wait_until_ready()

            async def publish(body: dict[str, Any]) -> None:
                await pubsub.publish(t, cbor2.dumps(body))

            def decode(data: bytes) -> Any:
                return cbor2.loads(data)

        sub = await pubsub.subscribe(t)
        for a in spec["connect"]:
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(a)))
        print("ready " + str(host.get_addrs()[0]), flush=True)
        t0 = float((await read_line()).split()[1])

        async def receive() -> None:
            while True:
                msg = await sub.get()
                now = time.time()
                body = decode(bytes(msg.data))
                if isinstance(body, dict) and "p" in body:
                    recv[body["p"]].append((body["i"], now - body["t"]))

        if not spec["publisher"]:
            nursery.start_soon(receive)
        else:
            for k, rate in enumerate(rates):
                start = t0 + k * phase_s
                for i in range(int(rate * send_s)):
                    await trio.sleep(max(0.0, start + i / rate - time.time()))
                    await publish({"p": k, "i": i, "t": time.time()})
        await trio.sleep(max(0.0, t0 + len(rates) * phase_s - time.time()))
        print(json.dumps({"recv": recv}), flush=True)
        sys.stdout.flush()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
