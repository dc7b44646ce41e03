"""``GET /v1/events`` and ``mossnode events`` against real daemons."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
from streams import Follow

from mossnode.cluster import Cluster

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}


def one_node(cluster_factory: Any, **config: Any) -> Any:
    c: Cluster = cluster_factory(1, **config)
    c.init()
    c.nodes[0].start()
    return c.nodes[0]


def new_task(node: Any, title: str) -> str:
    # a capability nobody has: the task stays pending and adds no events of its own
    body = {"title": title, "capabilities": ["nobody-has-this"]}
    return str(node.api.post("/v1/tasks", body)["id"])


def test_task_and_decision_events_resume_and_cli(cluster_factory) -> None:
    node = one_node(cluster_factory)
    follow = Follow(node, since=0)
    tid = new_task(node, "watched")
    ev = follow.wait(lambda e: e["type"] == "task" and e["data"]["task"] == tid, "task event")
    assert ev["data"]["state"] == "pending" and ev["data"]["old"] is None
    node.cli("swarm", "pause")
    node.cli("swarm", "resume")
    paused = follow.wait(
        lambda e: e["type"] == "decision" and e["data"]["kind"] == "pause", "pause decision"
    )
    resumed = follow.wait(
        lambda e: e["type"] == "decision" and e["data"]["kind"] == "resume", "resume decision"
    )
    assert resumed["data"]["seq"] == paused["data"]["seq"] + 1
    assert resumed["id"] > paused["id"] > ev["id"]
    assert follow.events[0]["type"] == "gap"  # since=0 predates this daemon
    ids = [e["id"] for e in follow.events[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # resuming after an id gives exactly what followed it, with no gap
    again = Follow(node, since=paused["id"])
    first = again.wait(lambda e: True, "the first resumed event")
    assert first["id"] == paused["id"] + 1
    assert first["type"] != "gap"
    # the Last-Event-ID header works the same as ?since=
    uds = httpx.HTTPTransport(uds=str(node.state_dir / "api.sock"))
    last = {"Last-Event-ID": str(paused["id"])}
    with httpx.Client(transport=uds) as h, h.stream("GET", "http://x/v1/events", headers=last) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id: "):
                assert int(line[4:]) == paused["id"] + 1
                break

    out = node.cli("events", "--json", "--since", str(ev["id"]), "--count", "2").stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["id"] for x in lines] == [paused["id"], resumed["id"]]
    assert lines[1] == resumed
    text = node.cli("events", "--since", str(ev["id"] - 1), "--count", "1").stdout
    assert text.startswith(f"{ev['id']}  task") and tid in text and "-> pending" in text


def test_gap_filters_keepalive_and_bad_input(cluster_factory) -> None:
    node = one_node(cluster_factory, api_event_buffer=4, api_keepalive_s=0.3)
    all_events = Follow(node, since=0)
    decisions = Follow(node, since=0, types=["decision"])
    tids = [new_task(node, f"t{i}") for i in range(6)]
    for tid in tids:  # tasks created within one scheduler tick are announced in any order
        all_events.wait(lambda e, tid=tid: e["type"] == "task" and e["data"]["task"] == tid, tid)
    first = min((e for e in all_events.events if e["type"] == "task"), key=lambda e: e["id"])
    last = max((e for e in all_events.events if e["type"] == "task"), key=lambda e: e["id"])
    late = Follow(node, since=first["id"])
    gap = late.wait(lambda e: True, "the gap event")
    assert gap["type"] == "gap" and gap["data"]["since"] == first["id"]
    later = late.wait(lambda e: e["id"] == last["id"], "replay")
    assert later["id"] > gap["data"]["first_available"] - 1
    assert not [e for e in decisions.events if e["type"] not in ("decision", "gap")]

    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(node.state_dir / "api.sock"))
    sock.sendall(b"GET /v1/events?types=peer HTTP/1.1\r\nHost: x\r\n\r\n")
    raw, deadline = b"", time.monotonic() + 20
    while raw.count(b": keep-alive") < 2 and time.monotonic() < deadline:
        raw += sock.recv(4096)
    sock.close()
    assert raw.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in raw.lower()
    assert raw.count(b": keep-alive") >= 2

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock"))) as h:
        for query, word in (("since=soon", "since"), ("types=task,gossip", "gossip")):
            r = h.get(f"http://x/v1/events?{query}")
            assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    r = node.cli("events", "--types", "bogus", check=False)
    assert r.returncode == 1 and "bogus" in r.stderr and len(r.stderr.splitlines()) == 1


def test_peer_health_events(cluster_factory) -> None:
    c: Cluster = cluster_factory(2, **FAST)
    c.start(roles=["executor"])
    c.wait_all_alive()
    watcher, other = c.nodes
    peer = other.status()["peer_id"]
    follow = Follow(watcher, since=0, types=["peer"])

    def health(state: str) -> Any:
        return lambda e: (
            e["type"] == "peer" and e["data"] == {**e["data"], "peer_id": peer, "state": state}
        )

    alive = follow.wait(health("alive"), "alive")
    other.stop()
    dead = follow.wait(lambda e: health("dead")(e) and e["id"] > alive["id"], "dead")
    assert dead["data"]["old"] in ("alive", "suspect")
    assert {e["type"] for e in follow.events} == {"gap", "peer"}
