"""Confidential tasks across three real daemons: ciphertext everywhere, plaintext only to an
agent of the role on a node holding the key, work only where it can be read."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mossnode.api.client import ApiClient
from mossnode.cluster import Cluster, Node, wait_for
from mossnode.crypto.sealed import ALG
from mossnode.node.config import SOCKET_FILE

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}
AGENT = f"exec:{sys.executable} {Path(__file__).with_name('agents') / 'confidant.py'}"
SECRET_IN = "in-marker-5be1c07d"
SECRET_OUT = SECRET_IN[::-1]  # what the agent answers: only in the output
HIDDEN = {"confidential": True, "roles": ["reviewer"]}


def add_agent(node: Node, name: str, roles: list[str], caps: list[str]) -> ApiClient:
    args = [a for r in roles for a in ("--role", r)] + [
        a for c in caps for a in ("--capability", c)
    ]
    token = node.cli_json("agent", "add", name, *args, "--backend", AGENT)["token"]
    return ApiClient(node.state_dir / SOCKET_FILE, token=token)


def leaks(data: Any) -> bool:
    text = data if isinstance(data, str) else json.dumps(data)
    return SECRET_IN in text or SECRET_OUT in text


def stored_bytes(node: Node) -> bytes:
    """Every file the node keeps (SQLite database and WAL, logs, agents, config)."""
    out = b""
    for p in sorted(node.state_dir.rglob("*")):
        if p.is_file() and p.name != SOCKET_FILE:
            out += p.read_bytes()
    return out


def test_confidential_task_is_sealed_run_where_readable_and_redacted(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.init()
    for node in c.nodes:
        node.start()
    founder, reader, outsider = c.nodes
    # the reader node holds the reviewer role; the outsider is an executor only
    for node, roles in ((reader, ["executor", "reviewer"]), (outsider, ["executor"])):
        token = founder.cli_json("invite", *[a for r in roles for a in ("--role", r)])["token"]
        node.cli("join", founder.addr, "--invite", token)
    keeper = add_agent(reader, "keeper", ["executor", "reviewer"], ["math"])
    clerk = add_agent(reader, "clerk", ["executor"], ["paper"])  # same node, not the role
    add_agent(outsider, "outsider", ["executor"], ["math"])  # could run it, cannot read it
    c.wait_all_alive(60)
    reader_id = reader.status()["peer_id"]
    wait_for(
        lambda: any(p["peer_id"] == reader_id and p["agents"] for p in founder.peers()),
        60,
        "the founder to see the reader's agents",
    )

    # refused: bad roles, and roles nobody could read (no state change)
    before = founder.status()["state_digest"]
    bad = founder.cli(
        "task", "submit", "--title", "x", "--confidential-to", "Not A Role", check=False
    )
    assert bad.returncode == 1 and "role" in bad.stderr
    nobody = founder.cli(
        "task", "submit", "--title", "x", "--confidential-to", "patrol", check=False
    )
    assert nobody.returncode == 1 and "no_reader" in nobody.stderr
    assert founder.status()["state_digest"] == before

    secret = founder.cli_json(
        "task", "submit", "--title", "sealed sum", "--capability", "math",
        "--input", json.dumps({"n": 41, "secret": SECRET_IN}), "--confidential-to", "reviewer",
    )["id"]  # fmt: skip
    after = founder.api.post(
        "/v1/tasks",
        {"title": "after", "capabilities": ["math"], "after": [secret], "input": {"n": 1}},
    )["id"]

    def done(node: Node, tid: str) -> bool:
        return node.api.get(f"/v1/tasks/{tid}")["state"] == "done"

    for node in c.nodes:
        wait_for(lambda node=node: done(node, after), 180, f"both tasks done on {node.name}")

    # the agent of the role on the node with the key reads input and result
    mine = keeper.get(f"/v1/tasks/{secret}")
    assert mine["assignee"] == reader_id
    assert mine["input"] == {"n": 41, "secret": SECRET_IN}
    assert mine["result"] == {"n": 41, "seen": SECRET_OUT}
    assert [r["output"] for r in mine["results"].values()] == [mine["result"]]
    # only a node that could open the secret output took the task after it
    dep = founder.api.get(f"/v1/tasks/{after}")
    assert dep["assignee"] == reader_id and dep["result"] == {"n": 42, "seen": ""}

    # everyone else sees the placeholder: the outsider's and founder's operator, the reader
    # node's operator, and an agent on the reader node without the role
    for who, client in (
        ("outsider operator", outsider.api),
        ("founder operator", founder.api),
        ("reader operator", reader.api),
        ("reader agent without the role", clerk),
    ):
        t = client.get(f"/v1/tasks/{secret}")
        assert t["input"] == HIDDEN and t["result"] == HIDDEN, who
        assert all(r["output"] == HIDDEN for r in t["results"].values()), who
        assert t["state"] == "done" and not leaks(t), who
    for node in c.nodes:
        for path in ("/v1/tasks", "/v1/activity", "/v1/leaderboard"):
            assert not leaks(node.api.get(path)), (node.name, path)
        assert not leaks(node.status())
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.api.socket_path))) as h:
            metrics = h.get("http://mossnode/v1/metrics")
            assert metrics.status_code == 200 and not leaks(metrics.text)

    # what each node stores is ciphertext only: the sealed form is there, the plaintext is not
    for node in c.nodes:
        data = stored_bytes(node)
        assert ALG.encode() in data, node.name
        assert SECRET_IN.encode() not in data and SECRET_OUT.encode() not in data, node.name
