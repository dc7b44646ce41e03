"""The MCP server on stdio against a real daemon: handshake, tools, calls bound to one agent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def node(solo):
    n = solo
    n.cli("agent", "add", "planner1", "--role", "admin", "--backend", "exec:true")
    n.cli("agent", "add", "reviewer1", "--role", "reviewer", "--backend", "exec:true")
    return n


def session(node, agent: str, messages: list[dict]) -> list[dict]:
    lines = "".join(json.dumps(m) + "\n" for m in messages)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mossnode",
            "--state-dir",
            str(node.state_dir),
            "mcp",
            "--agent",
            agent,
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def call(i: int, name: str, args: dict | None = None) -> dict:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": name, "arguments": args or {}},
    }


def test_handshake_and_calls(node) -> None:
    out = session(
        node,
        "planner1",
        [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"},
                },
            },
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            call(3, "whoami"),
            call(4, "submit_task", {"title": "from mcp"}),
            call(5, "list_tasks"),
            call(6, "nope"),
            call(7, "show_task", {}),
            {"jsonrpc": "2.0", "id": 8, "method": "resources/list"},
        ],
    )
    by_id = {m["id"]: m for m in out}
    assert set(by_id) == {1, 2, 3, 4, 5, 6, 7, 8}  # the notification got no answer
    assert by_id[1]["result"]["protocolVersion"] == "2025-06-18"
    assert "tools" in by_id[1]["result"]["capabilities"]
    names = {t["name"] for t in by_id[2]["result"]["tools"]}
    assert {"submit_task", "list_tasks", "show_task", "whoami"} <= names
    who = json.loads(by_id[3]["result"]["content"][0]["text"])
    assert who["kind"] == "agent" and who["name"] == "planner1"  # bound, not the operator
    assert not by_id[4]["result"]["isError"]
    tasks = json.loads(by_id[5]["result"]["content"][0]["text"])
    assert [t["title"] for t in tasks] == ["from mcp"]
    assert by_id[6]["error"]["code"] == -32602
    assert by_id[7]["result"]["isError"]
    assert by_id[8]["error"]["code"] == -32601


def test_a_planner_schedules_recurring_tasks(node) -> None:
    later = 2**52  # far away: the schedule creates nothing while the other tests run
    task = {"title": "nightly", "capabilities": ["math"]}
    out = session(
        node,
        "planner1",
        [
            call(1, "schedule_task", {"id": "nightly", "interval_ms": 5, "task": task}),
            call(2, "schedule_task", {"id": "nightly", "interval_ms": 60_000, "start_ms": later, "task": task}),
            call(3, "schedule_task", {"id": "over", "interval_ms": 1000, "start_ms": 1000, "end_ms": 5000, "task": task}),
            call(4, "list_schedules"),
        ],
    )  # fmt: skip
    by_id = {m["id"]: m for m in out}
    assert (
        by_id[1]["result"]["isError"] and "interval_ms" in by_id[1]["result"]["content"][0]["text"]
    )
    assert not by_id[2]["result"]["isError"], by_id[2]
    nightly, over = json.loads(by_id[4]["result"]["content"][0]["text"])
    assert (nightly["id"], nightly["next_at"], nightly["task"]["title"]) == (
        "nightly",
        later,
        "nightly",
    )
    # long over: no next period, and nothing was created for its past periods
    assert (over["id"], over["next_at"], over["instance_count"]) == ("over", None, 0)
    out = session(
        node,
        "reviewer1",
        [call(1, "schedule_task", {"id": "x", "interval_ms": 60_000, "task": task})],
    )
    assert out[0]["result"]["isError"] and "task.create" in out[0]["result"]["content"][0]["text"]


def test_agent_permissions_apply(node) -> None:
    out = session(node, "reviewer1", [call(1, "submit_task", {"title": "not allowed"})])
    res = out[0]["result"]
    assert res["isError"] and "task.create" in res["content"][0]["text"]
    out = session(node, "ghost", [call(1, "whoami")])
    assert out[0]["result"]["isError"]


CALL = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"%s","arguments":%s}}'
HOSTILE = {
    "after 1e400": CALL % ("read_messages", '{"after":1e400}'),
    "limit Infinity": CALL % ("read_messages", '{"limit":Infinity}'),
    "task id with NUL": CALL % ("show_task", '{"id":"a\\u0000b"}'),
    "task id not a string": CALL % ("cancel_task", '{"id":[1]}'),
    "nested too deep": '{"jsonrpc":"2.0","id":1,"method":"ping","params":'
    + "[" * 100_000
    + "]" * 100_000
    + "}",
}


@pytest.mark.parametrize("label", list(HOSTILE))
def test_a_hostile_line_is_answered_and_the_server_goes_on(tmp_path, label) -> None:
    """No daemon: each of these fails before or at the client, and must not end the server."""
    import io

    from mossnode.api.client import ApiClient
    from mossnode.api.mcp import McpServer

    sock = tmp_path / "api.sock"
    sock.touch()  # the client only checks it exists before building the URL
    server = McpServer(ApiClient(sock, timeout=1, as_agent="a"), "a")
    out = io.StringIO()
    server.serve(io.StringIO(HOSTILE[label] + '\n{"jsonrpc":"2.0","id":2,"method":"ping"}\n'), out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [a["id"] for a in answers] in ([1, 2], [None, 2]), answers
    first = answers[0]
    assert "error" in first or first["result"].get("isError"), first
