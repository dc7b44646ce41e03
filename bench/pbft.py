"""PBFT decision throughput and latency on real validator daemons, n = 4 and n = 7.

Each validator is its own ``mossnode run`` process (:mod:`mossnode.cluster`, loopback). A
bench-only gateway (:mod:`bench.pbft_clients`) holds many client keys, each admitted as a
member, and proposes ``pause``/``resume`` decisions through the daemons exactly as a node does:
signed requests over ``/moss/pbft/1``, the validators' signed replies back, f+1 matching replies
per decision, every entry persisted with its certificate in each validator's store.

- unbatched: one outstanding request (latency = request to f+1 matching replies);
- batched: many client keys (``BENCH_PBFT_LANES``, default 256), one outstanding request
  each, so the primary batches. The log orders one batch at a time (``max_inflight`` 1), so with
  too few clients the batches stay small and the figure measures the clients, not the swarm:
  with 64 clients the batches averaged 18 requests, with 128 about 44 (528 decisions/s), with
  256 about 96 (742/s), with 512 the log's limit of 128 (791/s). Each batch costs the
  validators about 57 ms of CPU whatever its size, each request about 1.4 ms more; the
  requests per batch are printed.

Raw Ed25519 verifies per second are measured in the same run; verifies per decision are counted
(frames the validators received, requests verified inside pre-prepares, replies the clients
verified), and the ratio of achieved throughput to the verify-bound limit is printed:
(verifies per decision x decisions per second) / raw verify rate. The in-process figures (sans-IO
replicas, instant delivery, no fsync) follow for comparison. ``BENCH_PBFT_PROFILE=DIR`` writes
each daemon's cProfile stats (CPU time) there; ``BENCH_PBFT_SIZES=4`` (comma-separated) picks the cluster
sizes, ``BENCH_PBFT_PHASES=unbatched`` (or ``batched``) the phases, ``BENCH_PBFT_UNBATCHED``
the unbatched decisions (200), and ``BENCH_PBFT_INPROC=0`` skips the in-process figures.
The gateway's own CPU per decision (signing requests, checking replies) is printed beside the
validators'; on this machine it shares the two cores with them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import multiaddr
import nacl.signing
import trio

from mossnode.cluster import Cluster, Node, wait_for
from mossnode.crypto.identity import Identity
from mossnode.crypto.peerid import public_key_from_peer_id
from mossnode.node.host import make_host
from mossnode.protocols.decisions import encode_op
from mossnode.protocols.pbft import (
    Client,
    Completed,
    Execution,
    PbftConfig,
    Replica,
    Send,
    SendAll,
)

from .pbft_clients import Gateway, Lane

SWARM = b"\x05" * 32
LANES = int(os.environ.get("BENCH_PBFT_LANES", "256"))
UNBATCHED = int(os.environ.get("BENCH_PBFT_UNBATCHED", "200"))
PER_LANE = int(os.environ.get("BENCH_PBFT_PER_LANE", "40"))


def run_once(
    n: int, clients: int, per_client: int, max_batch: int
) -> tuple[float, list[float], int]:
    ids = [Identity.generate() for _ in range(n)]
    validators = [i.public_key for i in ids]
    cfg = PbftConfig(
        swarm_id=SWARM,
        max_batch=max_batch,
        checkpoint_interval=64,
        window=256,
        max_inflight=8,
        reply_batches=True,  # as the decided log runs
    )

    def execute(ex: Execution) -> bytes:
        return b"ok"

    replicas = {i.peer_id: Replica(i, validators, cfg, execute=execute) for i in ids}
    cids = [Identity.generate() for _ in range(clients)]
    cls = {c.peer_id: Client(c, validators, SWARM) for c in cids}
    queue: deque[tuple[str, bytes]] = deque()
    verifies = 0
    sent_at: dict[tuple[str, int], float] = {}
    latencies: list[float] = []
    remaining = {pid: per_client for pid in cls}

    def now() -> int:
        return time.time_ns() // 1_000_000

    def handle(src: str, effects: list) -> None:
        for e in effects:
            if isinstance(e, Send):
                targets = list(replicas) if e.to is None else [e.to]
                for t in targets:
                    if t != src or e.to is not None:
                        queue.append((t, e.data))
            elif isinstance(e, SendAll):  # a batch's replies, one envelope for its clients
                queue.extend((t, e.data) for t in e.to)
            elif isinstance(e, Completed):
                latencies.append(time.perf_counter() - sent_at.pop((src, e.timestamp)))
                remaining[src] -= 1
                if remaining[src] > 0:
                    submit(src)

    def submit(pid: str) -> None:
        ts, effects = cls[pid].submit(b"op-%d" % remaining[pid], now())
        sent_at[(pid, ts)] = time.perf_counter()
        handle(pid, effects)

    for pid, r in replicas.items():
        handle(pid, r.start(now()))
    t0 = time.perf_counter()
    for pid in cls:
        submit(pid)
    while queue:
        dest, data = queue.popleft()
        if dest in replicas:
            verifies += 1
            handle(dest, replicas[dest].receive(data, now()))
        elif dest in cls:
            verifies += 1
            handle(dest, cls[dest].receive(data, now()))
    elapsed = time.perf_counter() - t0
    decided = clients * per_client
    assert not any(remaining.values()), "not every request completed"
    return decided / elapsed, latencies, verifies // max(1, decided)


def _stats(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return statistics.median(lat) * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000


def in_process(raw: float) -> None:
    print("in-process replicas, instant delivery; latency = request to f+1 matching replies")
    for n in (4, 7):
        for label, clients, per_client, batch in (
            ("unbatched", 1, 200, 1),
            ("batched", 32, 40, 32),
        ):
            rate, lat, vpd = run_once(n, clients, per_client, batch)
            p50, p99 = _stats(lat)
            print(
                f"  n={n} {label:9}: {rate:7.0f} decisions/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
                f"  verifies/decision {vpd:3d}  verify-bound ratio {vpd * rate / raw:.2f}"
            )


# --------------------------------------------------------------------------- real daemons


def _consensus(node: Node) -> dict[str, Any]:
    return dict(node.status()["consensus"] or {})


def _voting(node: Node, size: int) -> bool:
    """A validator whose replica counts ``size`` validators in force (after a change, the
    primary's null batches bring the new set in at the next checkpoint boundary)."""
    c = _consensus(node)
    return bool(c.get("validator") and c.get("in_force") == size)


def _cpu_s(nodes: list[Node]) -> float:
    """CPU seconds (user + system) the validator processes have used so far (Linux /proc);
    per decision it is a steadier figure than latency on a shared machine."""
    total = 0.0
    for node in nodes:
        try:
            assert node.proc is not None
            with open(f"/proc/{node.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AssertionError, IndexError, ValueError):
            return float("nan")
    return total


def _msg_in(nodes: list[Node]) -> int:
    return sum(int(_consensus(n).get("io", {}).get("msg_in", 0)) for n in nodes)


def start_validators(n: int, root: Path) -> Cluster:
    """A running cluster of ``n`` voting validators; stopped again if it cannot be formed."""
    c = Cluster(n, root=root)
    try:
        c.init()
        profile = os.environ.get("BENCH_PBFT_PROFILE")
        for node in c.nodes:
            if profile:
                os.environ["MOSSNODE_PROFILE"] = str(Path(profile) / f"n{n}-{node.name}.prof")
            node.start(wait=False)
        os.environ.pop("MOSSNODE_PROFILE", None)
        for node in c.nodes:
            wait_for(node.ready, 60, f"{node.name} to start")
        founder = c.nodes[0]
        for k, node in enumerate(c.nodes[1:], start=1):
            token = founder.cli_json("invite", "--role", "validator")["token"]
            node.cli("join", founder.addr, "--invite", token)
            wait_for(
                lambda k=k: all(_voting(m, k + 1) for m in c.nodes[: k + 1]),
                60,
                f"{node.name} to vote",
            )
    except BaseException:
        c.stop()
        raise
    return c


async def _drive(c: Cluster, raw: float) -> None:
    n = len(c.nodes)
    founder = c.nodes[0]
    me = Identity.generate()
    host = make_host(me)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as ns:
        status = await trio.to_thread.run_sync(founder.status)
        gw = Gateway(host, me, bytes.fromhex(status["swarm_id"]))
        invite = await trio.to_thread.run_sync(founder.cli_json, "invite", "--role", "admin")
        await gw.join(founder.addr, invite["token"])
        gw.validators = sorted(
            public_key_from_peer_id(str(node.cli_json("id")["peer_id"])) for node in c.nodes
        )
        await ns.start(gw.run, [node.addr for node in c.nodes])

        # The gateway's own key admits the client keys (it holds member.invite).
        keys = [Identity.generate() for _ in range(LANES)]
        admits = iter(
            encode_op(
                "admit", {"public_key": k.public_key, "roles": ["admin"], "invite": os.urandom(16)}
            )
            for k in keys
        )
        gw.op = lambda lane: next(admits)
        gw.start(gw.add_lane(me), LANES)
        await gw.wait_idle(300)
        lanes = [gw.add_lane(k) for k in keys]
        flips: dict[bytes, int] = {}

        def flip(lane: Lane) -> bytes:
            k = flips[lane.identity.public_key] = flips.get(lane.identity.public_key, 0) + 1
            return encode_op("pause" if k % 2 else "resume", {})

        gw.op = flip
        # Warm-up: every validator sees each key's request through the gateway once.
        gw.broadcast_all = True
        for lane in lanes:
            gw.start(lane, 1)
        await gw.wait_idle(300)
        gw.broadcast_all = False

        phases = os.environ.get("BENCH_PBFT_PHASES", "unbatched,batched").split(",")
        for label, active, per in (
            ("unbatched", lanes[:1], UNBATCHED),
            ("batched", lanes, PER_LANE),
        ):
            if label not in phases:
                continue
            before = await trio.to_thread.run_sync(_msg_in, c.nodes)
            batch0 = (await trio.to_thread.run_sync(_consensus, founder))["last_executed"]
            cpu0 = _cpu_s(c.nodes)
            gw0 = time.process_time()
            verified0 = gw.verified
            gw.latencies.clear()
            done0 = gw.completed
            t0 = time.perf_counter()
            for lane in active:
                gw.start(lane, per)
            await gw.wait_idle(600)
            elapsed = time.perf_counter() - t0
            decided = gw.completed - done0
            cpu = _cpu_s(c.nodes) - cpu0
            gw_cpu = time.process_time() - gw0
            after = await trio.to_thread.run_sync(_msg_in, c.nodes)
            batches = (await trio.to_thread.run_sync(_consensus, founder))["last_executed"] - batch0
            client_verifies = gw.verified - verified0
            verifies = (after - before) + (n - 1) * decided + client_verifies
            vpd = verifies / max(decided, 1)
            rate = decided / elapsed
            p50, p99 = _stats(gw.latencies)
            print(
                f"  n={n} {label:9}: {rate:7.0f} decisions/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
                f"  verifies/decision {vpd:5.1f}  verify-bound ratio {vpd * rate / raw:.2f}"
                f"  validator CPU/decision {cpu * 1000 / max(decided, 1):6.2f} ms"
                f" (clients' gateway {gw_cpu * 1000 / max(decided, 1):5.2f} ms)"
                f"  requests per batch {decided / max(batches, 1):5.1f}"
            )
        ns.cancel_scope.cancel()


def daemons(n: int, raw: float, root: Path) -> None:
    c = start_validators(n, root / f"n{n}")
    try:
        trio.run(_drive, c, raw)
    finally:
        c.stop()


def raw_verify_rate() -> float:
    sk = nacl.signing.SigningKey.generate()
    signed = sk.sign(b"x" * 200)
    vk = sk.verify_key
    t0 = time.perf_counter()
    for _ in range(3000):
        vk.verify(signed)
    return 3000 / (time.perf_counter() - t0)


def run() -> None:
    import tempfile

    raw = raw_verify_rate()
    print(f"raw Ed25519 verify (PyNaCl, one core): {raw:.0f} /s")
    print(
        f"real validator daemons on loopback; {LANES} client keys behind one gateway;"
        " latency = request to f+1 matching replies"
    )
    sizes = [int(x) for x in os.environ.get("BENCH_PBFT_SIZES", "4,7").split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-pbft-") as tmp:
        for n in sizes:
            daemons(n, raw, Path(tmp))
    if os.environ.get("BENCH_PBFT_INPROC", "1") != "0":
        in_process(raw)
    print("targets at n=4 (daemons): p50 <= 25 ms unbatched, >= 1,000 decisions/s batched")
