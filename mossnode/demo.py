"""``mossnode demo``: a local swarm on loopback, run exactly as an operator would run it."""

from __future__ import annotations

import json
import time

from .cluster import Cluster


def run_demo(nodes: int, keep: bool) -> None:
    print(f"starting a {nodes}-node swarm on loopback ...", flush=True)
    t0 = time.monotonic()
    cluster = Cluster(nodes, config={"presence_interval_s": 0.5})
    try:
        cluster.start(roles=["executor", "reviewer"])
        cluster.wait_all_alive(timeout=60)
        print(f"swarm formed in {time.monotonic() - t0:.1f} s; state dirs under {cluster.root}\n")
        founder = cluster.nodes[0]
        print("$ mossnode status   (on node0)")
        print(founder.cli("status").stdout)
        print("$ mossnode peers    (on node1)")
        print(cluster.nodes[1].cli("peers").stdout)
        print("$ mossnode decisions")
        print(founder.cli("decisions").stdout)
        if keep:
            print(
                "nodes keep running; stop them with: kill "
                + " ".join(str(n.proc.pid) for n in cluster.nodes if n.proc)
            )
            for n in cluster.nodes:
                n.proc = None  # detach: do not stop them on exit
            cluster.own_root = False
            return
        print(json.dumps({"nodes": nodes, "members": founder.status()["members"]}))
    finally:
        if not keep:
            cluster.stop()
