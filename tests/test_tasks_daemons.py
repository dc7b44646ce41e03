"""Tasks across real daemons with exec agents: a DAG, takeover after kill -9, the kill switch."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from mossnode.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}
AGENT = f"exec:{sys.executable} {Path(__file__).with_name('agents') / 'adder.py'}"


def swarm(cluster_factory, n: int) -> Cluster:
    c: Cluster = cluster_factory(n, **FAST)
    c.start(roles=["planner", "executor"])
    for node in c.nodes:
        node.cli(
            "agent",
            "add",
            f"adder-{node.name}",
            "--role",
            "executor",
            "--role",
            "planner",
            "--capability",
            "math",
            "--backend",
            AGENT,
        )
    c.wait_all_alive()
    return c


def submit(node, title: str, n: int, after: list[str] = (), sleep: float = 0) -> str:
    # a node accepts dependencies it already holds: wait for them to replicate to it
    for dep in after:
        wait_for(
            lambda dep=dep: any(t["id"] == dep for t in node.api.get("/v1/tasks")),
            20,
            f"{dep} to reach {node.name}",
        )
    body = {
        "title": title,
        "capabilities": ["math"],
        "after": list(after),
        "input": {"n": n, "sleep": sleep},
    }
    return node.api.post("/v1/tasks", body)["id"]


def state(node, tid: str) -> dict:
    return node.api.get(f"/v1/tasks/{tid}")


def test_dag_across_four_nodes(cluster_factory) -> None:
    c = swarm(cluster_factory, 4)
    a = submit(c.nodes[1], "a", 1)
    b = submit(c.nodes[2], "b", 10, [a])
    d = submit(c.nodes[3], "c", 100, [a])
    e = submit(c.nodes[0], "d", 1000, [b, d])
    wait_for(lambda: state(c.nodes[0], e)["state"] == "done", 60, "the DAG to finish")
    # 1000 + (10 + 1) + (100 + 1)
    assert state(c.nodes[2], e)["result"] == {"n": 1112}
    assignees = {state(c.nodes[0], t)["assignee"] for t in (a, b, d, e)}
    assert all(assignees)
    for t in (a, b, d, e):  # every replica agrees
        assert len({state(node, t)["state"] for node in c.nodes}) == 1
    # listing by state: exactly the tasks in it, in id order
    done = c.nodes[0].api.get("/v1/tasks?state=done")
    assert [t["id"] for t in done] == sorted({a, b, d, e}) and {t["state"] for t in done} == {
        "done"
    }
    assert c.nodes[0].api.get("/v1/tasks?state=pending") == []
    # counts per state in status and metrics, as of the node's last tick
    wait_for(lambda: c.nodes[0].status()["tasks"] == {"total": 4, "done": 4}, 10, "status counts")
    sock = httpx.HTTPTransport(uds=str(c.nodes[0].state_dir / "api.sock"))
    metrics = httpx.Client(transport=sock, base_url="http://x").get("/v1/metrics").text
    assert 'mossnode_tasks{state="done"} 4' in metrics.splitlines()

    # the runs' working directories, scratch files and all, are gone (the sweeper's rm)
    def leftovers() -> list[str]:
        found = []
        for node in c.nodes:
            work = node.state_dir / "work"
            for agent in work.iterdir() if work.exists() else ():
                found += [p.name for p in agent.iterdir() if p.name != ".trash"]
                found += os.listdir(agent / ".trash") if (agent / ".trash").exists() else []
        return found

    assert sum((node.state_dir / "work").exists() for node in c.nodes) >= 1
    wait_for(lambda: not leftovers(), 20, "the working directories to be removed")


def test_takeover_after_kill9(cluster_factory) -> None:
    c = swarm(cluster_factory, 3)
    tid = submit(c.nodes[0], "slow", 5, sleep=4)
    first = wait_for(lambda: state(c.nodes[0], tid)["assignee"], 30, "an assignee")
    wait_for(lambda: state(c.nodes[0], tid)["state"] == "in_progress", 30, "start")
    victim = next(n for n in c.nodes if n.status()["peer_id"] == first)
    victim.kill()
    watcher = next(n for n in c.nodes if n is not victim)
    wait_for(lambda: state(watcher, tid)["state"] == "done", 60, "takeover and completion")
    t = state(watcher, tid)
    assert t["assignee"] != first
    assert t["result"] == {"n": 5}
    assert t["attempt"] >= 2


def test_swarm_pause_stops_dispatch(cluster_factory) -> None:
    c = swarm(cluster_factory, 3)
    founder = c.nodes[0]
    founder.cli("swarm", "pause")
    wait_for(lambda: all(n.status()["paused"] for n in c.nodes), 10, "pause everywhere")
    tid = submit(c.nodes[1], "held", 7)
    time.sleep(3)
    t = state(c.nodes[2], tid)
    assert t["state"] in ("pending", "assigned", "in_progress") and t["result"] is None
    assert not any(p.get("message") == "started" for p in t["progress"].values())
    founder.cli("swarm", "resume")
    wait_for(lambda: state(c.nodes[2], tid)["state"] == "done", 60, "completion after resume")
    assert state(c.nodes[2], tid)["result"] == {"n": 7}


def test_bad_task_input_is_refused(cluster_factory) -> None:
    c = swarm(cluster_factory, 2)
    node = c.nodes[1]
    before = node.status()["state_digest"]
    a = submit(node, "a", 1)
    cyc_err = node.cli("task", "submit", "--title", "x", "--after", "nope:abc", check=False)
    assert cyc_err.returncode == 1 and "unknown" in cyc_err.stderr
    r = node.cli(
        "task", "submit", "--title", "x", "--contract", '{"max_attempts": "many"}', check=False
    )
    assert r.returncode == 1 and "max_attempts" in r.stderr
    r = node.cli(
        "task",
        "submit",
        "--title",
        "x",
        "--contract",
        '{"output_schema": {"type": "object", "frobnicate": 1}}',
        check=False,
    )
    assert r.returncode == 1 and "frobnicate" in r.stderr
    assert before != node.status()["state_digest"]  # task a was written, nothing else
    wait_for(lambda: state(node, a)["state"] == "done", 60, "a")


def test_a_recurring_schedule_runs_once_per_period_until_removed(cluster_factory) -> None:
    """Every node may create tasks here, and each would start a period: one instance per
    period is created (duplicates, if a race makes any, are cancelled everywhere), each runs
    once, and after `schedule remove` no period starts."""
    c = swarm(cluster_factory, 3)
    founder = c.nodes[0]
    bad = founder.cli("schedule", "add", "tick", "--every", "0.5s", "--title", "t", check=False)
    assert bad.returncode != 0 and "interval_ms" in bad.stderr
    added = founder.cli_json(
        "schedule", "add", "tick", "--every", "2s", "--title", "tick",
        "--capability", "math", "--input", '{"n": 7}',
    )  # fmt: skip
    assert added["id"] == "tick" and added["seq"] >= 1

    def instances(node) -> dict[str, list[dict]]:
        by_period: dict[str, list[dict]] = {}
        for t in node.api.get("/v1/tasks"):
            if ":r-" in t["id"]:
                by_period.setdefault(t["id"].rpartition(":")[2], []).append(t)
        return by_period

    def done_periods() -> int:
        got = instances(c.nodes[1])
        return sum(any(t["state"] == "done" for t in ts) for ts in got.values())

    wait_for(lambda: done_periods() >= 3, 60, "three periods to run")
    listed = c.nodes[2].cli_json("schedule", "list")
    assert [s["id"] for s in listed] == ["tick"] and listed[0]["interval_ms"] == 2000
    assert listed[0]["next_at"] is not None and listed[0]["instance_count"] >= 3
    removed = c.nodes[1].cli_json("schedule", "remove", "tick")
    assert removed["kind"] == "schedule.remove"
    wait_for(lambda: all(n.api.get("/v1/schedules")[0]["removed"] for n in c.nodes), 20, "removal")
    before = set(instances(founder))
    time.sleep(5)  # two and a half periods
    assert set(instances(founder)) - before == set()
    for node in c.nodes:
        by_period = instances(node)
        assert set(by_period) == before
        for period, ts in by_period.items():
            live = [t for t in ts if t["state"] != "cancelled"]
            assert len(live) == 1, (period, ts)
            assert all(t["title"] == "tick" for t in ts)
    finished = [t for ts in instances(founder).values() for t in ts if t["state"] == "done"]
    for t in finished:
        assert state(founder, t["id"])["result"] == {"n": 7}
    again = founder.cli("schedule", "remove", "tick", check=False)
    assert again.returncode != 0 and "already removed" in again.stderr
