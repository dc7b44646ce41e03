"""PBFT decision throughput and latency, unbatched and batched, for n = 4 and n = 7.

The sans-IO replicas and clients run in one process with instant, reliable delivery, so the
figures are the protocol's CPU cost on this machine (signing and verifying every message,
persist records, execution), without network or fsync; the real daemons' decided log adds a
libp2p stream hop and one fsync per decision. Raw Ed25519 verifies per second are measured in
the same run, and the ratio of achieved throughput to the verify-bound limit is printed:
(verifies per decision x decisions per second) / raw verify rate.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import nacl.signing

from mossnode.crypto.identity import Identity
from mossnode.protocols.pbft import (
    Client,
    Completed,
    Execution,
    PbftConfig,
    Replica,
    Send,
)

SWARM = b"\x05" * 32


def run_once(
    n: int, clients: int, per_client: int, max_batch: int
) -> tuple[float, list[float], int]:
    ids = [Identity.generate() for _ in range(n)]
    validators = [i.public_key for i in ids]
    cfg = PbftConfig(
        swarm_id=SWARM, max_batch=max_batch, checkpoint_interval=64, window=256, max_inflight=8
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


def raw_verify_rate() -> float:
    sk = nacl.signing.SigningKey.generate()
    signed = sk.sign(b"x" * 200)
    vk = sk.verify_key
    t0 = time.perf_counter()
    for _ in range(3000):
        vk.verify(signed)
    return 3000 / (time.perf_counter() - t0)


def run() -> None:
    raw = raw_verify_rate()
    print(f"raw Ed25519 verify (PyNaCl): {raw:.0f} /s")
    print("in-process replicas, instant delivery; latency = request to f+1 matching replies")
    for n in (4, 7):
        for label, clients, per_client, batch in (
            ("unbatched", 1, 200, 1),
            ("batched", 32, 40, 32),
        ):
            rate, lat, vpd = run_once(n, clients, per_client, batch)
            lat.sort()
            p50 = statistics.median(lat) * 1000
            p99 = lat[int(len(lat) * 0.99)] * 1000
            print(
                f"n={n} {label:9}: {rate:7.0f} decisions/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
                f"  verifies/decision {vpd:3d}  verify-bound ratio {vpd * rate / raw:.2f}"
            )
    print("targets at n=4: p50 <= 25 ms unbatched, >= 1,000 decisions/s batched")
