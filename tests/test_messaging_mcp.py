"""Messaging through the MCP server (`mossnode mcp --agent NAME`) on one real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def node(solo):
    n = solo
    for name, role in (("ann", "admin"), ("ben", "admin"), ("rev", "reviewer")):
        n.cli("agent", "add", name, "--role", role, "--backend", "exec:true")
    return n


class Session:
    """One interactive MCP server process bound to an agent."""

    def __init__(self, node, agent: str) -> None:
        cmd = [sys.executable, "-m", "mossnode", "--state-dir", str(node.state_dir), "mcp"]
        self.proc = subprocess.Popen(
            [*cmd, "--agent", agent],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.n = 0

    def call(self, tool: str, args: dict[str, Any] | None = None) -> tuple[bool, Any]:
        self.n += 1
        req = {
            "jsonrpc": "2.0",
            "id": self.n,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args or {}},
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        resp = json.loads(self.proc.stdout.readline())
        assert resp["id"] == self.n
        text = resp["result"]["content"][0]["text"]
        if resp["result"]["isError"]:
            return False, text
        return True, json.loads(text)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def test_messaging_tools(node) -> None:
    ann, ben, rev = Session(node, "ann"), Session(node, "ben"), Session(node, "rev")
    try:
        ok, r = ann.call("subscribe_topic", {"topic": "news"})
        assert ok and r["topics"] == ["news"]
        ok, r = ben.call("publish_message", {"topic": "news", "body": {"n": 1}})
        assert ok and r["delivered_local"] == 1
        ok, r = ben.call("broadcast_message", {"role": "admin", "body": "all hands"})
        assert ok and r["delivered_local"] == 1  # ann; ben is the sender
        ok, r = ann.call("read_messages")
        assert ok and [m["body"] for m in r["messages"]] == [{"n": 1}, "all hands"]
        ok, r = ann.call("read_messages")  # the server acknowledged the first read
        assert ok and r["messages"] == []

        # a request from ben, answered by ann through read_messages and reply_message
        answer: dict[str, Any] = {}

        def ask() -> None:
            answer["ok"], answer["r"] = ben.call(
                "send_message", {"to": "ann", "body": {"q": "?"}, "timeout_s": 60}
            )

        t = threading.Thread(target=ask)
        t.start()
        ok, r = ann.call("read_messages", {"wait_s": 30})
        assert ok and len(r["messages"]) == 1
        req = r["messages"][0]
        assert req["mode"] == "direct" and req["from_agent"] == "ben"
        ok, r = ann.call("reply_message", {"id": req["id"], "body": {"a": 42}})
        assert ok and r["delivered"] is True
        t.join(60)
        assert answer["ok"] and answer["r"]["reply"]["body"] == {"a": 42}

        ok, text = ann.call("send_message", {"to": "ben", "body": 1, "timeout_s": 1})
        assert not ok and "no reply" in text
        ok, text = rev.call("send_message", {"to": "ann", "body": 1})
        assert not ok and "messages.send" in text
        ok, text = rev.call("read_messages")
        assert not ok and "messages.receive" in text
    finally:
        for s in (ann, ben, rev):
            s.close()
