"""Many hosts on one machine: one daemon per network namespace, joined by veth to a bridge.

Each node lives in namespace ``moss-<i>`` with address 10.77.0.<i+1>/24 on its own veth; the
host side of every veth hangs on bridge ``mossbr0``. A partition moves the host side of some
nodes' veths to a second bridge ``mossbr1``: the two groups then cannot reach each other while
each group stays connected. Killing, pausing (SIGSTOP) and restarting act on the processes.
Only addresses inside these namespaces are used. Needs root and iproute2.

``scripts/testnet`` runs the scenario below and prints what it observed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from .cluster import Cluster, ClusterError, Node, wait_for

SUBNET = "10.77.0"
BRIDGES = ("mossbr0", "mossbr1")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


class Testnet:
    def __init__(self, n: int, root: Path) -> None:
        self.n = n
        self.root = root
        self.cluster = Cluster(n, root=root)
        for i, node in enumerate(self.cluster.nodes):
            node.prefix = ["ip", "netns", "exec", self.ns(i)]

    @staticmethod
    def ns(i: int) -> str:
        return f"moss-{i}"

    @staticmethod
    def veth(i: int) -> str:
        return f"mossv{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def up(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("the testnet needs root (network namespaces)")
        self.down_network()
        for br in BRIDGES:
            sh("ip", "link", "add", br, "type", "bridge")
            sh("ip", "link", "set", br, "up")
        for i in range(self.n):
            ns, veth = self.ns(i), self.veth(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGES[0])
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        from .node.config import Config, write_config

        self.cluster.init()
        for i, node in enumerate(self.cluster.nodes):
            cfg = Config(
                listen=[f"/ip4/{self.ip(i)}/tcp/4001"],
                presence_interval_s=0.5,
                suspect_after_s=1.5,
                dead_after_s=3.0,
            )
            write_config(node.state_dir, cfg)
        for node in self.cluster.nodes:
            node.start(wait=False)
        for node in self.cluster.nodes:
            wait_for(node.ready, 60, f"{node.name} to start")
        founder = self.cluster.nodes[0]
        for node in self.cluster.nodes[1:]:
            token = founder.cli_json("invite", "--role", "executor")["token"]
            node.cli("join", founder.addr, "--invite", token)

    def partition(self, group: list[int]) -> None:
        """Cut ``group`` off from the rest (each side stays connected within itself)."""
        for i in range(self.n):
            sh("ip", "link", "set", self.veth(i), "master", BRIDGES[1 if i in group else 0])

    def heal(self) -> None:
        self.partition([])

    def pause(self, i: int) -> None:
        node = self.cluster.nodes[i]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        node = self.cluster.nodes[i]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def down_network(self) -> None:
        for i in range(64):
            sh("ip", "netns", "del", self.ns(i), check=False)
        for br in BRIDGES:
            sh("ip", "link", "del", br, check=False)

    def down(self) -> None:
        for node in self.cluster.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
        self.cluster.stop()
        self.down_network()


def health(node: Node, peer: str) -> str | None:
    return next((p["state"] for p in node.peers() if p["peer_id"] == peer), None)


def has_health(node: Node, peer: str, state: str) -> bool:
    return health(node, peer) == state


def wait_health(nodes: list[Node], peer: str, state: str, timeout: float) -> None:
    for node in nodes:
        wait_for(partial(has_health, node, peer, state), timeout, f"{node.name}: {peer} {state}")


def scenario(n: int, root: Path, out: list[str]) -> dict[str, float]:
    """Form the swarm, partition, heal, pause, kill and restart; return what took how long."""
    figures: dict[str, float] = {}
    net = Testnet(n, root)
    try:
        t0 = time.monotonic()
        net.up()
        net.cluster.wait_all_alive(timeout=60)
        figures["form_s"] = time.monotonic() - t0
        out.append(f"{n} nodes in {n} namespaces formed one swarm in {figures['form_s']:.1f} s")
        nodes = net.cluster.nodes
        ids = [node.cli_json("id")["peer_id"] for node in nodes]
        last = n - 1

        t0 = time.monotonic()
        net.partition([last])
        wait_health(nodes[:last], ids[last], "dead", 30)
        figures["partition_detect_s"] = time.monotonic() - t0
        out.append(
            f"partition of node{last} detected by all in {figures['partition_detect_s']:.1f} s"
        )
        t0 = time.monotonic()
        net.heal()
        wait_health(nodes[:last], ids[last], "alive", 60)
        figures["heal_s"] = time.monotonic() - t0
        out.append(f"healed: node{last} alive again everywhere in {figures['heal_s']:.1f} s")

        t0 = time.monotonic()
        net.pause(1)
        wait_health(nodes[:1], ids[1], "dead", 30)
        net.resume(1)
        wait_health(nodes[:1], ids[1], "alive", 30)
        figures["pause_cycle_s"] = time.monotonic() - t0
        out.append(f"SIGSTOP/SIGCONT of node1: dead then alive in {figures['pause_cycle_s']:.1f} s")

        t0 = time.monotonic()
        nodes[2].kill()
        wait_health(nodes[:1], ids[2], "dead", 30)
        nodes[2].start()
        wait_health(nodes[:1], ids[2], "alive", 60)
        figures["kill_restart_s"] = time.monotonic() - t0
        out.append(
            f"kill -9 and restart of node2 (no new invite): back in {figures['kill_restart_s']:.1f} s"
        )
        net.cluster.wait_all_alive(timeout=60)
        out.append(
            "all nodes alive; every status agrees on membership: "
            + str(sorted({node.status()["members"] for node in nodes}))
        )
    finally:
        net.down()
    return figures


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/testnet", description=__doc__)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not 3 <= args.nodes <= 32:
        p.error("--nodes must be 3..32")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mossnode-testnet-") as tmp:
        out: list[str] = []
        try:
            figures = scenario(args.nodes, Path(tmp), out)
        except ClusterError as exc:
            print("\n".join(out), file=sys.stderr)
            print(f"testnet: error: {exc}", file=sys.stderr)
            sys.exit(1)
    print(json.dumps(figures) if args.json else "\n".join(out))


if __name__ == "__main__":
    main()
