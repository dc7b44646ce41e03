"""Gossip propagation through meshes of 4, 8 and 16 processes: mossnode daemons vs bare gossipsub.

For each size and mode: propagation latency to all nodes (p50/p99, at 5 msg/s), the highest
publish rate of the ladder with zero loss, and deliveries per second at that rate. Every process
dials every earlier one in both modes, so the topology is the same.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mossnode.crypto.envelope import canonical
from mossnode.crypto.identity import Identity, save_identity
from mossnode.node.config import DB_FILE, Config, write_config
from mossnode.node.ledger import save_ledger
from mossnode.node.store import Decided, Store
from mossnode.protocols.decisions import ConsensusCore, ConsensusMembership, encode_op, pbft_config
from mossnode.protocols.membership import make_genesis

RATES = [5, 20, 50, 100, 200]
SEND_S = 3.0
DRAIN_S = 2.0
SIZES = [int(x) for x in os.environ.get("BENCH_GOSSIP_SIZES", "4,8,16").split(",")]


def make_swarm(root: Path, n: int) -> list[Identity]:
    idents = [Identity.generate() for _ in range(n)]
    now = time.time_ns() // 1_000_000
    # The founder alone decides the admissions (n = 1: its own commit is the quorum); every
    # node starts with the certified log in its store.
    genesis = make_genesis(idents[0], "bench", now)
    core = ConsensusCore(idents[0], ConsensusMembership(genesis), pbft_config(genesis.swarm_id))
    core.start(now)
    rows: list[Decided] = []
    for i, ident in enumerate(idents[1:], 1):
        payload = {"public_key": ident.public_key, "roles": ["executor"], "invite": bytes([i])}
        _, out = core.submit(encode_op("admit", payload), now + i)
        rows += [
            Decided(e.seq, e.kind, canonical(e.payload), canonical(e.certificate))
            for e in out.entries
        ]
    assert len(rows) == n - 1
    for i, ident in enumerate(idents):
        sd = root / f"n{i}"
        sd.mkdir(parents=True)
        save_identity(ident, sd / "identity.key")
        write_config(sd, Config(listen=["/ip4/127.0.0.1/tcp/0"]))
        save_ledger(sd, genesis, {})
        with Store(sd / DB_FILE) as store:
            store.commit(decided=rows)
    return idents


def run_mesh(mode: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        idents = make_swarm(root, n)
        procs: list[subprocess.Popen[str]] = []
        addrs: list[str] = []
        try:
            for i, ident in enumerate(idents):
                spec = {
                    "mode": mode,
                    "seed": ident.seed.hex(),
                    "state_dir": str(root / f"n{i}"),
                    "connect": list(addrs),
                    "publisher": i == 0,
                    "rates": RATES,
                    "send_s": SEND_S,
                    "drain_s": DRAIN_S,
                }
                p = subprocess.Popen(
                    [sys.executable, "-m", "bench.gossip_worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                procs.append(p)
                line = p.stdout.readline() if p.stdout else ""
                if not line.startswith("ready "):
                    raise RuntimeError(f"worker {i} ({mode}) failed to start")
                addrs.append(line.split()[1])
            time.sleep(4)  # let the gossipsub mesh form (heartbeat 1 s)
            t0 = time.time() + 1
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"go {t0}\n")
                p.stdin.flush()
            results = []
            for p in procs[1:]:
                out, _ = p.communicate(timeout=len(RATES) * (SEND_S + DRAIN_S) + 60)
                results.append(json.loads(out.strip().splitlines()[-1])["recv"])
            procs[0].wait(timeout=30)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    return summarize(results)


def summarize(results: list[dict[str, list[list[float]]]]) -> dict[str, Any]:
    receivers = len(results)
    out: dict[str, Any] = {"phases": []}
    for k, rate in enumerate(RATES):
        sent = int(rate * SEND_S)
        per_msg: dict[int, list[float]] = {}
        delivered = 0
        for r in results:
            seen = {int(i): lat for i, lat in r[str(k)]}
            delivered += len(seen)
            for i, lat in seen.items():
                per_msg.setdefault(i, []).append(lat)
        to_all = sorted(max(v) for v in per_msg.values() if len(v) == receivers)
        lost = sent * receivers - delivered
        out["phases"].append(
            {
                "rate": rate,
                "lost": lost,
                "delivered_per_s": delivered / SEND_S,
                "p50_ms": 1000 * statistics.median(to_all) if to_all else float("nan"),
                "p99_ms": 1000 * to_all[min(len(to_all) - 1, int(len(to_all) * 0.99))]
                if to_all
                else float("nan"),
            }
        )
    ok = [ph for ph in out["phases"] if ph["lost"] == 0]
    out["zero_loss_rate"] = max((ph["rate"] for ph in ok), default=0)
    out["delivered_per_s"] = max((ph["delivered_per_s"] for ph in ok), default=0.0)
    out["p50_ms"] = out["phases"][0]["p50_ms"]
    out["p99_ms"] = out["phases"][0]["p99_ms"]
    return out


def run() -> None:
    print(
        f"publish-rate ladder {RATES} msg/s, {SEND_S:g} s each; latency = time to reach all nodes at 5 msg/s"
    )
    print(
        f"{'nodes':>5} {'mode':>5} {'p50 ms':>8} {'p99 ms':>8} {'0-loss rate':>11} {'deliv/s':>8}   losses per rate"
    )
    for n in SIZES:
        res = {m: run_mesh(m, n) for m in ("bare", "moss")}
        for m, r in res.items():
            losses = " ".join(str(ph["lost"]) for ph in r["phases"])
            print(
                f"{n:>5} {m:>5} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['zero_loss_rate']:>11} "
                f"{r['delivered_per_s']:8.0f}   {losses}"
            )
        b, o = res["bare"], res["moss"]
        lat = o["p50_ms"] / b["p50_ms"] if b["p50_ms"] else float("nan")
        rate = o["zero_loss_rate"] / b["zero_loss_rate"] if b["zero_loss_rate"] else float("nan")
        print(
            f"{n:>5} ratio moss/bare: latency p50 {lat:.2f}x (target <= 1.5), "
            f"zero-loss rate {rate:.2f}x (target >= 0.67)",
            flush=True,
        )
