"""Shared state across real daemons: concurrent writes, a partitioned node, kill -9 durability."""

from __future__ import annotations

import threading

import pytest
from intruder import run_intruder

from mossnode.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}


def digests(nodes) -> set[str]:
    return {n.status()["state_digest"] for n in nodes if n.running}


def submit_many(node, prefix: str, count: int, out: list[str]) -> None:
    for i in range(count):
        out.append(node.api.post("/v1/tasks", {"title": f"{prefix}-{i}"})["id"])


def test_concurrent_writes_partition_and_heal(cluster_factory) -> None:
    c: Cluster = cluster_factory(4, **FAST)
    c.start(roles=["planner", "executor"])
    c.wait_all_alive()
    ids: list[str] = []
    threads = [threading.Thread(target=submit_many, args=(n, n.name, 15, ids)) for n in c.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 60
    wait_for(lambda: len(digests(c.nodes)) == 1, 30, "convergence after concurrent writes")
    # partition: stop node3's process, keep writing elsewhere and on node3 (offline) later
    cut = c.nodes[3]
    cut.stop()
    more: list[str] = []
    submit_many(c.nodes[0], "during-a", 10, more)
    submit_many(c.nodes[1], "during-b", 10, more)
    cut.start()
    submit_many(cut, "after-heal", 5, more)
    wait_for(lambda: len(digests(c.nodes)) == 1, 45, "convergence after heal")
    tasks = c.nodes[3].api.get("/v1/tasks")
    assert len(tasks) == 85
    assert {t["id"] for t in tasks} == set(ids) | set(more)


def test_acknowledged_write_survives_kill9(cluster_factory) -> None:
    c: Cluster = cluster_factory(1, **FAST)
    c.init()
    node = c.nodes[0]
    node.start()
    tid = node.api.post("/v1/tasks", {"title": "must survive"})["id"]
    node.kill()  # SIGKILL right after the acknowledgement
    node.start()
    t = node.api.get(f"/v1/tasks/{tid}")
    assert t["title"] == "must survive"


def test_nonmember_learns_nothing(cluster_factory) -> None:
    """A stranger that asks for the task state over /moss/sync/1 gets nothing."""
    c: Cluster = cluster_factory(2, **FAST)
    c.start(roles=["planner"])
    c.nodes[0].api.post("/v1/tasks", {"title": "secret plan"})
    wait_for(lambda: len(digests(c.nodes)) == 1, 20, "convergence")
    target = c.nodes[1]
    s = target.status()
    assert s["state"]["entries"] >= 1
    out, _ = run_intruder(target, s["peer_id"], 1, "sync")
    assert out == {"entries": 0}
    assert target.status()["rejected"].get("not_member", 0) >= 1
