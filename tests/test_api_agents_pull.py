"""Pull agents on real daemons: work arrives as events, progress/submit/review go through the
API as the calling agent only, and refused requests change nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from streams import Follow
from test_mcp import call, session

from mossnode.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}
SCHEMA = {
    "type": "object",
    "required": ["y"],
    "properties": {"y": {"type": "integer"}},
    "additionalProperties": False,
}


def client(node: Any, token: str | None) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")),
        base_url="http://x",
        headers={"Authorization": f"Bearer {token}"} if token else {},
        timeout=30,
    )


def add_agent(node: Any, name: str, *args: str) -> str:
    return str(node.cli_json("agent", "add", name, *args, "--backend", "api")["token"])


def task(node: Any, tid: str) -> dict[str, Any]:
    return dict(node.api.get(f"/v1/tasks/{tid}"))


def facts(node: Any, tid: str) -> tuple:
    """A task's own facts that submissions and reviews would change."""
    t = task(node, tid)
    return (t["state"], t["results"], t["reviews"], t["attempts"])


def refused_without_change(
    node: Any, call: Any, status: int, code: str, tid: str, tries: int = 5
) -> dict[str, Any]:
    """``call()`` is refused with ``status``/``code`` and leaves the state digest as it was.
    Lease renewals change the digest every few seconds, so the comparison is retried on a
    fresh window; a call that itself wrote something could never match."""
    before_facts = facts(node, tid)
    for _ in range(tries):
        before = node.status()["state_digest"]
        r = call()
        after = node.status()["state_digest"]
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code, err
        if before == after:
            assert facts(node, tid) == before_facts
            return dict(err)
    raise AssertionError(f"the state digest changed around every refused call ({code})")


def test_pull_agents_work_and_review_through_the_api(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.start(roles=["executor", "reviewer"])
    c.wait_all_alive()
    planner, n1, n2 = c.nodes
    worker = add_agent(
        n1, "worker", "--role", "executor", "--role", "reviewer", "--capability", "py"
    )
    bystander = add_agent(n1, "bystander", "--role", "executor", "--capability", "go")
    stranger = add_agent(n2, "stranger", "--role", "executor", "--capability", "go")
    reviewer = add_agent(n2, "rev", "--role", "reviewer")
    # since=0: everything the daemon still holds, so nothing is missed while the streams open
    w_events = Follow(n1, worker, since=0, types=["work"])
    r_events = Follow(n2, reviewer, since=0)
    b_events = Follow(n1, bystander, since=0)

    tid = planner.api.post(
        "/v1/tasks",
        {
            "title": "double x",
            "capabilities": ["py"],
            "input": {"x": 2},
            "contract": {"review_required": True, "output_schema": SCHEMA},
        },
    )["id"]

    # 1. the work arrives as an event for the worker, and in its work list
    run = w_events.wait(lambda e: e["data"].get("task") == tid, "the work event")
    assert run["type"] == "work" and run["data"]["action"] == "run"
    assert run["data"]["payload"]["input"] == {"x": 2}
    w = client(n1, worker)
    mine = w.get("/v1/agents/me/work").json()
    assert [(x["task"], x["kind"]) for x in mine] == [(tid, "run")]
    assert client(n1, bystander).get("/v1/agents/me/work").json() == []
    wait_for(lambda: task(planner, tid)["state"] == "in_progress", 30, "in_progress")

    # 2. progress, seen by the other members
    r = w.post(f"/v1/tasks/{tid}/progress", json={"fraction": 0.5, "message": "half way"})
    assert r.status_code == 200, r.text
    wait_for(
        lambda: any(p.get("message") == "half way" for p in task(n2, tid)["progress"].values()),
        30,
        "progress to replicate",
    )

    # 3. refusals: nobody but the assignee submits, and only valid output
    good = {"output": {"y": 4}}
    err = refused_without_change(
        n1,
        lambda: client(n1, bystander).post(f"/v1/tasks/{tid}/submit", json=good),
        403,
        "not_assignee",
        tid,
    )
    assert "bystander" in err["message"]
    refused_without_change(
        n2,
        lambda: client(n2, stranger).post(f"/v1/tasks/{tid}/submit", json=good),
        403,
        "not_assignee",
        tid,
    )
    refused_without_change(
        n1,
        lambda: client(n1, bystander).post(f"/v1/tasks/{tid}/progress", json={"fraction": 1}),
        403,
        "not_assignee",
        tid,
    )
    err = refused_without_change(
        n1,
        lambda: w.post(f"/v1/tasks/{tid}/submit", json={"output": {"y": "four"}}),
        422,
        "output_schema",
        tid,
    )
    assert "$.y" in err["message"]
    # a reviewer cannot review work still in progress
    refused_without_change(
        n2,
        lambda: client(n2, reviewer).post(
            f"/v1/tasks/{tid}/review", json={"score": 5, "verdict": "done"}
        ),
        409,
        "state",
        tid,
    )
    # the operator is no agent: work endpoints act only for an agent's own token
    r = n1.api._client.post(f"/v1/tasks/{tid}/review", json={"score": 5, "verdict": "done"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "agent_required", r.text

    # 4. the assignee submits; the reviewer on another node gets the review as an event
    r = w.post(f"/v1/tasks/{tid}/submit", json=good)
    assert r.status_code == 200, r.text
    assert w.get("/v1/agents/me/work").json() == []
    wait_for(lambda: task(n2, tid)["state"] == "review", 30, "review state")
    rev = r_events.wait(
        lambda e: e["type"] == "work" and e["data"].get("task") == tid, "the review hand-over"
    )
    assert rev["data"]["action"] == "review"
    assert rev["data"]["payload"]["output"] == {"y": 4}
    # the author never reviews its own work
    err = refused_without_change(
        n1,
        lambda: w.post(f"/v1/tasks/{tid}/review", json={"score": 5, "verdict": "done"}),
        403,
        "self_review",
        tid,
    )
    # 5. rework, a second round, then done
    r = client(n2, reviewer).post(
        f"/v1/tasks/{tid}/review",
        json={"score": 2, "verdict": "rework", "comments": "show your work"},
    )
    assert r.status_code == 200, r.text
    again = w_events.wait(
        lambda e: e["data"].get("task") == tid and e["data"].get("round") == 2, "round 2"
    )
    assert again["data"]["payload"]["rework"]["comments"] == "show your work"
    assert w.post(f"/v1/tasks/{tid}/submit", json={"output": {"y": 4}}).status_code == 200
    r_events.wait(
        lambda e: e["type"] == "work" and e["data"].get("round") == 2, "the second review"
    )
    r = client(n2, reviewer).post(
        f"/v1/tasks/{tid}/review", json={"score": 5, "verdict": "done", "comments": "good"}
    )
    assert r.status_code == 200, r.text
    for node in c.nodes:
        wait_for(lambda node=node: task(node, tid)["state"] == "done", 30, f"done on {node.name}")
    assert task(planner, tid)["result"] == {"y": 4}
    # work events go only to the agent they are for
    assert not [e for e in b_events.events if e["type"] == "work"]
    assert all(e["data"]["action"] == "review" for e in r_events.events if e["type"] == "work")


def test_claim_places_the_agents_bid(cluster_factory) -> None:
    c: Cluster = cluster_factory(2, **FAST)
    c.start(roles=["executor"])
    c.wait_all_alive()
    planner, n1 = c.nodes
    token = add_agent(n1, "puller", "--role", "executor", "--capability", "sql")
    other = add_agent(n1, "other", "--role", "executor", "--capability", "go")
    w = client(n1, token)
    # the task waits for a dependency, so the scheduler does not bid on it before we do
    dep = planner.api.post("/v1/tasks", {"title": "first", "capabilities": ["nobody-has"]})["id"]
    wait_for(lambda: any(t["id"] == dep for t in n1.api.get("/v1/tasks")), 30, "dep replicated")
    tid = planner.api.post(
        "/v1/tasks", {"title": "later", "capabilities": ["sql"], "after": [dep]}
    )["id"]
    wait_for(lambda: any(t["id"] == tid for t in n1.api.get("/v1/tasks")), 30, "task replicated")
    r = w.post(f"/v1/tasks/{tid}/claim", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "state", r.text
    r = client(n1, other).post(f"/v1/tasks/{dep}/claim", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_capable", r.text
    r = w.post("/v1/tasks/nobody:000000/claim", json={})
    assert r.status_code == 404, r.text
    # once ready, a claim bids for the agent and the agent gets the work
    free = planner.api.post("/v1/tasks", {"title": "now", "capabilities": ["sql"]})["id"]
    wait_for(lambda: any(t["id"] == free for t in n1.api.get("/v1/tasks")), 30, "replicated")
    r = w.post(f"/v1/tasks/{free}/claim", json={})
    assert r.status_code == 200, r.text
    assert r.json()["agent"] == "puller"
    wait_for(
        lambda: any(x["task"] == free for x in w.get("/v1/agents/me/work").json()),
        30,
        "the claimed task in the agent's work",
    )
    assert w.post(f"/v1/tasks/{free}/submit", json={"output": "ok"}).status_code == 200
    wait_for(lambda: task(planner, free)["state"] == "done", 30, "done")


def test_an_openclaw_agent_works_through_mcp(cluster_factory) -> None:
    """Until a gateway runner exists, an ``openclaw:`` agent pulls: it bids like any agent and
    does its work through the MCP tools of ``mossnode mcp --agent NAME``."""
    c: Cluster = cluster_factory(2, **FAST)
    c.start(roles=["executor"])
    c.wait_all_alive()
    planner, n1 = c.nodes
    n1.cli(
        "agent",
        "add",
        "oc",
        "--role",
        "executor",
        "--capability",
        "llm",
        "--backend",
        "openclaw:main",
    )
    tid = planner.api.post(
        "/v1/tasks",
        {"title": "write", "capabilities": ["llm"], "contract": {"output_schema": SCHEMA}},
    )["id"]
    wait_for(lambda: task(planner, tid)["state"] == "in_progress", 60, "the agent to win it")
    out = session(
        n1,
        "oc",
        [
            call(1, "my_work"),
            call(2, "report_progress", {"id": tid, "fraction": 0.3, "message": "drafting"}),
            call(3, "submit_result", {"id": tid, "output": {"y": "text"}}),
            call(4, "submit_result", {"id": tid, "output": {"y": 7}}),
            call(5, "my_work"),
        ],
    )
    res = {m["id"]: m["result"] for m in out}
    work = json.loads(res[1]["content"][0]["text"])
    assert [(w["task"], w["kind"]) for w in work] == [(tid, "run")]
    assert not res[2]["isError"]
    assert res[3]["isError"] and "output_schema" in res[3]["content"][0]["text"]
    assert not res[4]["isError"], res[4]
    assert json.loads(res[5]["content"][0]["text"]) == []
    wait_for(lambda: task(planner, tid)["state"] == "done", 30, "done")
    t = task(planner, tid)
    assert t["result"] == {"y": 7} and t["agent"] == "oc"


def test_work_of_an_agent_that_went_offline_goes_back(cluster_factory) -> None:
    c: Cluster = cluster_factory(2, pull_idle_s=4.0, **FAST)
    c.start(roles=["executor"])
    c.wait_all_alive()
    planner, n1 = c.nodes
    w = client(n1, add_agent(n1, "flaky", "--role", "executor", "--capability", "rare"))
    seen = Follow(n1, since=0, types=["work"])  # the operator sees every agent's work events
    tid = planner.api.post("/v1/tasks", {"title": "t", "capabilities": ["rare"]})["id"]
    wait_for(
        lambda: any(x["task"] == tid for x in w.get("/v1/agents/me/work").json()),
        60,
        "the agent to get the task",
    )
    # silence: no stream, no calls; its node releases the attempt and offers the task again
    gone = seen.wait(lambda e: e["data"].get("action") == "cancel", "the work taken back", 60)
    assert "offline" in gone["data"]["reason"] and gone["data"]["task"] == tid
    wait_for(lambda: task(planner, tid)["state"] == "pending", 30, "the task offered again")
    t = task(planner, tid)
    assert any("offline" in str(x.get("reason")) for x in t["log"]), t["log"]
    # back online: it bids again and gets the next attempt
    wait_for(
        lambda: [x["attempt"] for x in w.get("/v1/agents/me/work").json()] == [2],
        60,
        "attempt 2 for the returning agent",
    )
