"""``mossnode mcp --agent NAME``: an MCP server on stdio for one local agent.

OpenClaw (or any MCP client) starts it as a stdio server (``mcp.servers.<name>.command``). It
speaks JSON-RPC 2.0, one message per line, and turns tool calls into local API calls made as
that agent, so the agent never has to know or remember its identity or token: the operator's
process binds it with ``X-Mossnode-Agent``, or the agent's own token comes from
``MOSSNODE_TOKEN``. Every call is RBAC-checked by the daemon as that agent.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from .. import __version__
from .client import ApiClient, ClientError

log = logging.getLogger("mossnode.mcp")

PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]
    call: Callable[[ApiClient, dict[str, Any]], Any]
    # The server keeps the inbox cursor for this tool: it passes ``after`` unless the agent
    # does, and advances it to the answer's ``next`` (so reading again acknowledges).
    cursor: bool = False


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required or [],
        "additionalProperties": False,
    }


STR = {"type": "string"}
STRS = {"type": "array", "items": {"type": "string"}}
ANY = {"description": "any JSON value"}


def _quoted(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe=":@")


def _task_post(client: Any, args: dict[str, Any], verb: str) -> Any:
    """``POST /v1/tasks/{id}/<verb>`` with the tool's arguments other than the task id."""
    return client.post(
        f"/v1/tasks/{_quoted(args['id'])}/{verb}", {k: v for k, v in args.items() if k != "id"}
    )


TOOLS = [
    Tool(
        "swarm_status",
        "This node's status: peer id, swarm, members, state digest.",
        _obj({}),
        lambda c, a: c.get("/v1/status"),
    ),
    Tool(
        "whoami",
        "Which agent you are in the swarm, your roles and permissions.",
        _obj({}),
        lambda c, a: c.get("/v1/whoami"),
    ),
    Tool(
        "list_peers",
        "Members of the swarm with health, roles and agents.",
        _obj({}),
        lambda c, a: c.get("/v1/peers"),
    ),
    Tool(
        "list_tasks",
        "Tasks in the swarm, optionally only those in one state.",
        _obj(
            {
                "state": {
                    "type": "string",
                    "enum": [
                        "pending",
                        "assigned",
                        "in_progress",
                        "review",
                        "rework",
                        "blocked",
                        "done",
                        "cancelled",
                        "failed",
                    ],
                }
            }
        ),
        lambda c, a: c.get("/v1/tasks" + (f"?state={a['state']}" if a.get("state") else "")),
    ),
    Tool(
        "show_task",
        "One task with its state, result, reviews and log.",
        _obj({"id": STR}, ["id"]),
        lambda c, a: c.get(f"/v1/tasks/{_quoted(a['id'])}"),
    ),
    Tool(
        "submit_task",
        "Create a task for the swarm. Agents with matching capabilities bid for it; use "
        "'after' to make it wait for other tasks, whose results it then receives.",
        _obj(
            {
                "title": STR,
                "spec": STR,
                "capabilities": STRS,
                "after": STRS,
                "input": {},
                "parent": STR,
                "contract": {"type": "object"},
            },
            ["title"],
        ),
        lambda c, a: c.post("/v1/tasks", a),
    ),
    Tool(
        "schedule_task",
        "Have the swarm create a task every interval_ms (one instance per period, whichever "
        "nodes are up): a consensus decision. 'task' is the template: title, spec, input, "
        "capabilities, role, priority, contract.",
        _obj(
            {
                "id": STR,
                "interval_ms": {"type": "integer"},
                "start_ms": {"type": "integer"},
                "end_ms": {"type": "integer"},
                "task": {"type": "object"},
            },
            ["id", "interval_ms", "task"],
        ),
        lambda c, a: c.post("/v1/schedules", a),
    ),
    Tool(
        "list_schedules",
        "Recurring schedules with their next period and latest instances.",
        _obj({}),
        lambda c, a: c.get("/v1/schedules"),
    ),
    Tool(
        "cancel_task",
        "Cancel a task and its subtree (creator or supervisor).",
        _obj({"id": STR, "reason": STR}, ["id"]),
        lambda c, a: c.post(
            f"/v1/tasks/{_quoted(a['id'])}/cancel", {"reason": a.get("reason", "")}
        ),
    ),
    Tool(
        "my_work",
        "Work your node won for you: tasks to do (kind 'run', with their input and the results "
        "of their dependencies) and submissions to review (kind 'review').",
        _obj({}),
        lambda c, a: c.get("/v1/agents/me/work"),
    ),
    Tool(
        "claim_task",
        "Bid for a ready task yourself (your node also bids for you on its own); the best bid "
        "wins, and won work then appears in my_work.",
        _obj({"id": STR}, ["id"]),
        lambda c, a: c.post(f"/v1/tasks/{_quoted(a['id'])}/claim", {}),
    ),
    Tool(
        "report_progress",
        "Report progress on a task you hold: fraction done (0 to 1) and/or a short message.",
        _obj(
            {"id": STR, "fraction": {"type": "number", "minimum": 0, "maximum": 1}, "message": STR},
            ["id"],
        ),
        lambda c, a: _task_post(c, a, "progress"),
    ),
    Tool(
        "submit_result",
        "Submit your result for a task you hold. 'output' must satisfy the task's output "
        "schema; send 'error' instead if you cannot do the task.",
        _obj({"id": STR, "output": {}, "error": STR}, ["id"]),
        lambda c, a: _task_post(c, a, "submit"),
    ),
    Tool(
        "review_task",
        "Review another agent's submission waiting in review: score 1-5, verdict 'done' or "
        "'rework', and comments that say what to fix.",
        _obj(
            {
                "id": STR,
                "score": {"type": "integer", "minimum": 1, "maximum": 5},
                "verdict": {"type": "string", "enum": ["done", "rework"]},
                "comments": STR,
            },
            ["id", "score", "verdict"],
        ),
        lambda c, a: _task_post(c, a, "review"),
    ),
    Tool(
        "leaderboard",
        "Reputation of agents derived from the swarm's history.",
        _obj({}),
        lambda c, a: c.get("/v1/leaderboard"),
    ),
    Tool(
        "activity",
        "Recent task state changes in the swarm.",
        _obj({}),
        lambda c, a: c.get("/v1/activity"),
    ),
    Tool(
        "send_message",
        "Send a request to another agent ('name@peer_id', or a name known in the swarm) and "
        "wait for its reply, which this returns. Fails after timeout_s (default 30).",
        _obj({"to": STR, "body": ANY, "timeout_s": {"type": "number"}}, ["to", "body"]),
        lambda c, a: c.post("/v1/messages", a),
    ),
    Tool(
        "read_messages",
        "Your inbox: requests to you (answer them with reply_message), topic messages and "
        "broadcasts. Each call acknowledges what the previous call returned. wait_s waits "
        "up to that many seconds for a first message.",
        _obj(
            {
                "wait_s": {"type": "number"},
                "limit": {"type": "integer"},
                "after": {"type": "integer"},
            }
        ),
        lambda c, a: c.get(
            f"/v1/messages?after={int(a.get('after', 0))}&wait_s={float(a.get('wait_s', 0))}"
            f"&limit={int(a.get('limit', 100))}"
        ),
        cursor=True,
    ),
    Tool(
        "reply_message",
        "Reply to a request from your inbox (its id); the sender is waiting for it.",
        _obj({"id": STR, "body": ANY}, ["id", "body"]),
        lambda c, a: c.post(f"/v1/messages/{_quoted(a['id'])}/reply", {"body": a["body"]}),
    ),
    Tool(
        "publish_message",
        "Publish to a named topic: every agent subscribed to it, on every node, receives it.",
        _obj({"topic": STR, "body": ANY}, ["topic", "body"]),
        lambda c, a: c.post(f"/v1/topics/{_quoted(a['topic'])}/publish", {"body": a["body"]}),
    ),
    Tool(
        "broadcast_message",
        "Send to every agent in the swarm holding a role (e.g. reviewer).",
        _obj({"role": STR, "body": ANY}, ["role", "body"]),
        lambda c, a: c.post("/v1/broadcast", {"role": a["role"], "body": a["body"]}),
    ),
    Tool(
        "subscribe_topic",
        "Receive the messages published to a topic from now on.",
        _obj({"topic": STR}, ["topic"]),
        lambda c, a: c.post(f"/v1/topics/{_quoted(a['topic'])}/subscribe", {}),
    ),
    Tool(
        "unsubscribe_topic",
        "Stop receiving a topic's messages.",
        _obj({"topic": STR}, ["topic"]),
        lambda c, a: c.post(f"/v1/topics/{_quoted(a['topic'])}/unsubscribe", {}),
    ),
]
BY_NAME = {t.name: t for t in TOOLS}


class McpServer:
    def __init__(self, client: ApiClient, agent: str) -> None:
        self.client = client
        self.agent = agent
        self.cursor = 0  # the inbox cursor for read_messages

    def handle(self, msg: Any) -> dict[str, Any] | None:
        """One JSON-RPC message in, its response out (None for notifications)."""
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or "method" not in msg:
            return _error(
                msg.get("id") if isinstance(msg, dict) else None, -32600, "invalid request"
            )
        mid, method = msg.get("id"), msg["method"]
        params = msg.get("params") or {}
        if "id" not in msg:
            return None  # notifications (initialized, cancelled) need no answer
        if method == "initialize":
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
            return _result(
                mid,
                {
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": "mossnode", "version": __version__},
                    "instructions": f"You are agent '{self.agent}' of this host's mossnode swarm "
                    "member. Use these tools to see and create swarm tasks, to message other "
                    "agents, and to do your work: my_work lists what you were given; "
                    "report_progress while you work; submit_result when done; review_task for "
                    "submissions you are to review.",
                },
            )
        if method == "ping":
            return _result(mid, {})
        if method == "tools/list":
            return _result(
                mid,
                {
                    "tools": [
                        {"name": t.name, "description": t.description, "inputSchema": t.schema}
                        for t in TOOLS
                    ]
                },
            )
        if method == "tools/call":
            if not isinstance(params, dict):
                return _error(mid, -32602, "params must be an object")
            tool = BY_NAME.get(str(params.get("name")))
            args = params.get("arguments") or {}
            if tool is None:
                return _error(mid, -32602, f"unknown tool {params.get('name')!r}")
            if not isinstance(args, dict):
                return _error(mid, -32602, "arguments must be an object")
            missing = [r for r in tool.schema["required"] if r not in args]
            unknown = [k for k in args if k not in tool.schema["properties"]]
            if missing or unknown:
                return _result(
                    mid, _text(f"bad arguments: missing {missing}, unknown {unknown}", error=True)
                )
            if tool.cursor:
                args = {"after": self.cursor, **args}
            try:
                answer = tool.call(self.client, args)
                if tool.cursor and isinstance(answer, dict):
                    self.cursor = int(answer.get("next", self.cursor))
                return _result(mid, _text(json.dumps(answer, indent=1)))
            except (ClientError, ValueError, TypeError, OverflowError) as exc:
                return _result(mid, _text(str(exc), error=True))
        return _error(mid, -32601, f"method not found: {method}")

    def serve(self, inp: IO[str], out: IO[str]) -> None:
        for line in inp:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                resp: dict[str, Any] | None = _error(None, -32700, "parse error")
            else:
                try:
                    resp = self.handle(msg)
                except Exception as exc:  # one request's failure must not end the server
                    log.exception("MCP request failed")
                    mid = msg.get("id") if isinstance(msg, dict) else None
                    resp = _error(mid, -32603, f"internal error: {type(exc).__name__}")
            if resp is not None:
                out.write(json.dumps(resp) + "\n")
                out.flush()


def _result(mid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": mid, "result": result}


def _error(mid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": code, "message": message}}


def _text(text: str, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": error}


def keep_online(client: ApiClient, stop: threading.Event) -> None:
    """Hold the agent's event stream open while the MCP server runs: a pull agent with an
    open stream is online, so it keeps getting work and keeps the work it holds however long
    its model thinks between tool calls."""
    while not stop.is_set():
        try:
            for _ in client.events(types=["work"]):
                if stop.is_set():
                    return
        except ClientError:
            pass
        stop.wait(2.0)


def run_stdio(client: ApiClient, agent: str) -> None:
    stop = threading.Event()
    threading.Thread(target=keep_online, args=(client.clone(), stop), daemon=True).start()
    try:
        McpServer(client, agent).serve(sys.stdin, sys.stdout)
    finally:
        stop.set()
