"""``mossnode demo``: a local swarm on loopback doing real work, run as an operator would.

N daemons form a swarm by invite; each registers an exec agent (a word counter); a task DAG is
submitted on one node (three counting tasks, one merge task after them); the swarm bids,
assigns, runs and hands results along the DAG by itself; the demo shows the tree, the merged
result and the leaderboard.
"""

from __future__ import annotations

import json
import sys
import time

from .cluster import Cluster, wait_for

TEXTS = [
    "The swarm has no center. Every node signs what it says and checks what it hears.",
    "Tasks find agents by themselves: nodes bid, every node computes the same winner.",
    "A node that dies loses its lease, and another node takes the task over.",
]


def run_demo(nodes: int, keep: bool) -> None:
    print(f"starting a {nodes}-node swarm on loopback ...", flush=True)
    t0 = time.monotonic()
    cluster = Cluster(nodes, config={"presence_interval_s": 0.5})
    agent = f"exec:{sys.executable} -m mossnode.examples.wordcount"
    try:
        cluster.start(roles=["planner", "executor", "reviewer"])
        for node in cluster.nodes:
            node.cli(
                "agent",
                "add",
                f"counter-{node.name}",
                "--role",
                "executor",
                "--capability",
                "text",
                "--backend",
                agent,
            )
        cluster.wait_all_alive(timeout=60)
        print(f"swarm formed in {time.monotonic() - t0:.1f} s; state dirs under {cluster.root}\n")
        founder = cluster.nodes[0]
        print("$ mossnode peers    (on node1)")
        print(cluster.nodes[1].cli("peers").stdout)
        planner = cluster.nodes[-1]
        t1 = time.monotonic()
        parts = [
            planner.api.post(
                "/v1/tasks",
                {"title": f"count part {i + 1}", "capabilities": ["text"], "input": {"text": text}},
            )["id"]
            for i, text in enumerate(TEXTS)
        ]
        merge = planner.api.post(
            "/v1/tasks",
            {
                "title": "merge counts",
                "capabilities": ["text"],
                "after": parts,
                "input": {"top": 5},
            },
        )["id"]
        print(f"submitted 4 tasks on {planner.name}: 3 counts, then a merge after them\n")
        wait_for(
            lambda: planner.api.get(f"/v1/tasks/{merge}")["state"] == "done",
            120,
            "the DAG to finish",
            interval=0.2,
        )
        took = time.monotonic() - t1
        print("$ mossnode task tree")
        print(founder.cli("task", "tree").stdout)
        result = founder.api.get(f"/v1/tasks/{merge}")["result"]
        print(f"merged result (read on {founder.name}): {json.dumps(result)}")
        print(f"the DAG ran across the swarm in {took:.1f} s\n")
        print("$ mossnode schedule add census --every 2s --title census ...    (3 periods)")
        start = int(time.time() * 1000)
        planner.api.post(
            "/v1/schedules",
            {
                "id": "census",
                "interval_ms": 2000,
                "start_ms": start,
                "end_ms": start + 3 * 2000,
                "task": {"title": "census", "capabilities": ["text"], "input": {"text": TEXTS[0]}},
            },
        )

        def census_done() -> bool:
            (s,) = founder.api.get("/v1/schedules")
            return s["instance_count"] == 3 and all(i["state"] == "done" for i in s["instances"])

        wait_for(census_done, 60, "three census periods", interval=0.2)
        print(founder.cli("schedule", "list").stdout)
        print("$ mossnode leaderboard")
        print(founder.cli("leaderboard").stdout)
        digests = {n.status()["state_digest"] for n in cluster.nodes}
        print(f"state digests on all {nodes} nodes equal: {len(digests) == 1}")
        if keep:
            pids = " ".join(str(n.proc.pid) for n in cluster.nodes if n.proc)
            print(f"nodes keep running; stop them with: kill {pids}")
            for n in cluster.nodes:
                n.proc = None  # detach: do not stop them on exit
            cluster.own_root = False
    finally:
        if not keep:
            cluster.stop()
