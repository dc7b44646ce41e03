"""Agent messaging between two real daemons, in all three modes, through the API with tokens.

node0 founded the swarm (admin + validator); node1 joined as planner + executor. An agent acts
with those of its roles that its node holds, so ``mute`` (a reviewer on node1) may neither send
nor receive.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from mossnode.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}
AGENTS = {
    0: {"alice": "admin", "erin": "admin"},
    1: {"bob": "executor", "carol": "planner", "mute": "reviewer"},
}


class Swarm:
    def __init__(self, cluster: Cluster, tokens: dict[str, str], ids: list[str]) -> None:
        self.cluster = cluster
        self.tokens = tokens
        self.ids = ids
        self.home = {name: i for i, agents in AGENTS.items() for name in agents}

    def client(self, agent: str) -> httpx.Client:
        node = self.cluster.nodes[self.home[agent]]
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")),
            base_url="http://x",
            headers={"Authorization": f"Bearer {self.tokens[agent]}"},
            timeout=90,
        )

    def addr(self, agent: str) -> str:
        return f"{agent}@{self.ids[self.home[agent]]}"

    def call(self, agent: str, method: str, path: str, body: Any = None) -> httpx.Response:
        with self.client(agent) as c:
            return c.request(method, path, json=body)

    def drain(self, agent: str) -> list[dict[str, Any]]:
        """Everything in the agent's inbox now, acknowledged."""
        r = self.call(agent, "GET", "/v1/messages").json()
        if r["messages"]:
            self.call(agent, "GET", f"/v1/messages?after={r['next']}")
        return r["messages"]

    def wait_inbox(self, agent: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []

        def enough() -> bool:
            got[:] = self.call(agent, "GET", "/v1/messages").json()["messages"]
            return len(got) >= n

        wait_for(enough, timeout, f"{n} message(s) in {agent}'s inbox", interval=0.2)
        return got


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    c = Cluster(2, root=tmp_path_factory.mktemp("msg"), config=FAST)
    try:
        c.start(roles=["planner", "executor"])
        tokens = {}
        for i, agents in AGENTS.items():
            for name, role in agents.items():
                out = c.nodes[i].cli_json(
                    "agent", "add", name, "--role", role, "--backend", "exec:true"
                )
                tokens[name] = out["token"]
        c.wait_all_alive()
        ids = [n.status()["peer_id"] for n in c.nodes]
        for i, node in enumerate(c.nodes):  # each node has heard the other's agents
            other = AGENTS[1 - i]
            wait_for(
                lambda node=node, other=other: (
                    {a["name"] for p in node.peers() for a in p["agents"]} >= set(other)
                ),
                30,
                f"{node.name} to see the other node's agents",
            )
        yield Swarm(c, tokens, ids)
    finally:
        for node in c.nodes:
            if node.running:
                print(f"--- {node.name} log tail ---\n{node.tail(30)}")
        c.stop()


def test_request_reply_across_nodes(swarm: Swarm) -> None:
    swarm.drain("bob")
    result: dict[str, Any] = {}

    def ask() -> None:
        r = swarm.call(
            "alice",
            "POST",
            "/v1/messages",
            {"to": swarm.addr("bob"), "body": {"q": "sum", "n": [1, 2]}, "timeout_s": 60},
        )
        result["status"], result["json"] = r.status_code, r.json()

    t = threading.Thread(target=ask)
    t.start()
    # bob long-polls its inbox and answers
    r = swarm.call("bob", "GET", "/v1/messages?wait_s=30").json()
    assert len(r["messages"]) == 1, r
    m = r["messages"][0]
    assert m["mode"] == "direct" and m["body"] == {"q": "sum", "n": [1, 2]}
    assert m["from"] == swarm.addr("alice") and m["from_roles"] == ["admin"]
    assert m["to"] == swarm.addr("bob") and m["reply_expected"] is True
    rep = swarm.call("bob", "POST", f"/v1/messages/{m['id']}/reply", {"body": {"sum": 3}})
    assert rep.status_code == 200, rep.text
    assert rep.json()["delivered"] is True
    t.join(60)
    assert result["status"] == 200, result
    reply = result["json"]["reply"]
    assert reply["body"] == {"sum": 3} and reply["mode"] == "reply"
    assert reply["from"] == swarm.addr("bob") and reply["reply_to"] == m["id"]
    assert result["json"]["id"] == m["id"]
    # answered once only; the request left bob's pending set
    again = swarm.call("bob", "POST", f"/v1/messages/{m['id']}/reply", {"body": 1})
    assert again.status_code == 404
    # acknowledging with the cursor empties the inbox
    r = swarm.call("bob", "GET", f"/v1/messages?after={r['next']}").json()
    assert r["messages"] == []


def test_request_to_a_bare_name_and_on_the_same_node(swarm: Swarm) -> None:
    swarm.drain("erin")
    result: dict[str, Any] = {}

    def ask() -> None:
        r = swarm.call("alice", "POST", "/v1/messages", {"to": "erin", "body": "ping"})
        result["status"], result["json"] = r.status_code, r.json()

    t = threading.Thread(target=ask)
    t.start()
    m = swarm.call("erin", "GET", "/v1/messages?wait_s=30").json()["messages"][0]
    assert m["from"] == swarm.addr("alice") and m["body"] == "ping"
    assert swarm.call("erin", "POST", f"/v1/messages/{m['id']}/reply", {"body": "pong"}).is_success
    t.join(60)
    assert result["status"] == 200 and result["json"]["reply"]["body"] == "pong"
    assert result["json"]["to"] == swarm.addr("erin")
    swarm.drain("erin")


def test_request_timeout_is_504(swarm: Swarm) -> None:
    swarm.drain("bob")
    r = swarm.call(
        "alice", "POST", "/v1/messages", {"to": swarm.addr("bob"), "body": 1, "timeout_s": 2}
    )
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "timeout" and "no reply" in err["message"]
    # delivered, but too late to answer: the reply finds no waiting request
    m = swarm.wait_inbox("bob", 1)[0]
    wait_for(
        lambda: (
            swarm.call("bob", "POST", f"/v1/messages/{m['id']}/reply", {"body": 2}).status_code
            == 404
        ),
        20,
        "the expired request to be forgotten",
    )
    swarm.drain("bob")


def test_unknown_recipient_is_404(swarm: Swarm) -> None:
    r = swarm.call("alice", "POST", "/v1/messages", {"to": f"nobody@{swarm.ids[1]}", "body": 1})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "unknown_agent" and "nobody" in r.json()["error"]["message"]
    r = swarm.call("alice", "POST", "/v1/messages", {"to": "nobody-anywhere", "body": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_agent"
    not_member = "12D3KooWHHzSeKaY8xuZVzkLbKFfvNgPPeKhFBGrMbNzbm5akpqu"
    r = swarm.call("alice", "POST", "/v1/messages", {"to": f"bob@{not_member}", "body": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_node"


def test_denied_sender_gets_403_and_nothing_is_delivered(swarm: Swarm) -> None:
    swarm.drain("alice")
    swarm.drain("erin")
    before = swarm.cluster.nodes[0].status()["messaging"]
    for path, body, perm in (
        ("/v1/messages", {"to": swarm.addr("alice"), "body": 1}, "messages.send"),
        ("/v1/topics/news/publish", {"body": 1}, "messages.publish"),
        ("/v1/broadcast", {"role": "admin", "body": 1}, "messages.broadcast"),
    ):
        r = swarm.call("mute", "POST", path, body)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["details"]["permission"] == perm
    # an executor may talk but not broadcast
    r = swarm.call("bob", "POST", "/v1/broadcast", {"role": "admin", "body": 1})
    assert (
        r.status_code == 403 and r.json()["error"]["details"]["permission"] == "messages.broadcast"
    )
    time.sleep(2)
    assert swarm.drain("alice") == [] and swarm.drain("erin") == []
    assert swarm.cluster.nodes[0].status()["messaging"] == before


def test_recipient_that_may_not_receive_is_refused_at_its_node(swarm: Swarm) -> None:
    node1 = swarm.cluster.nodes[1]
    r = swarm.call("alice", "POST", "/v1/messages", {"to": swarm.addr("mute"), "body": 1})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "recipient_forbidden"
    assert node1.status()["rejected"].get("msg_recipient_forbidden", 0) >= 1
    metrics = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node1.state_dir / "api.sock")), base_url="http://x"
    ).get("/v1/metrics")
    assert 'mossnode_rejected_total{reason="msg_recipient_forbidden"}' in metrics.text
    # and mute has no inbox to read
    assert swarm.call("mute", "GET", "/v1/messages").status_code == 403


def test_publish_subscribe_across_nodes(swarm: Swarm) -> None:
    for a in ("alice", "erin", "bob", "carol"):
        swarm.drain(a)
    for a in ("bob", "erin", "alice"):
        r = swarm.call(a, "POST", "/v1/topics/builds/subscribe")
        assert r.status_code == 200 and "builds" in r.json()["topics"]
    assert swarm.call("bob", "GET", "/v1/topics").json() == {"topics": ["builds"]}
    r = swarm.call("alice", "POST", "/v1/topics/builds/publish", {"body": {"build": 7}})
    assert r.status_code == 200, r.text
    assert r.json()["delivered_local"] == 1  # erin; the sender itself is left out
    mid = r.json()["id"]
    for a in ("bob", "erin"):
        got = swarm.wait_inbox(a, 1)
        assert [(m["id"], m["mode"], m["topic"], m["body"]) for m in got] == [
            (mid, "topic", "builds", {"build": 7})
        ]
        assert got[0]["from"] == swarm.addr("alice")
    time.sleep(2)  # at most once: nothing more arrives, nobody else got it
    assert [m["id"] for m in swarm.drain("bob")] == [mid]
    assert [m["id"] for m in swarm.drain("erin")] == [mid]
    assert swarm.drain("carol") == [] and swarm.drain("alice") == []
    # after unsubscribing, bob gets nothing; erin still does
    assert swarm.call("bob", "POST", "/v1/topics/builds/unsubscribe").json()["subscribed"] is False
    r = swarm.call("carol", "POST", "/v1/topics/builds/publish", {"body": "second"})
    assert r.status_code == 200 and r.json()["delivered_local"] == 0
    got = swarm.wait_inbox("erin", 1)
    assert got[0]["body"] == "second" and got[0]["from"] == swarm.addr("carol")
    time.sleep(1)
    assert swarm.drain("bob") == []
    swarm.drain("erin")
    swarm.drain("alice")


def test_broadcast_to_a_role(swarm: Swarm) -> None:
    for a in ("alice", "erin", "bob", "carol"):
        swarm.drain(a)
    r = swarm.call("carol", "POST", "/v1/broadcast", {"role": "admin", "body": {"alert": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "admin" and r.json()["delivered_local"] == 0
    for a in ("alice", "erin"):
        got = swarm.wait_inbox(a, 1)
        assert got[0]["mode"] == "broadcast" and got[0]["role"] == "admin"
        assert got[0]["body"] == {"alert": 1} and got[0]["from"] == swarm.addr("carol")
    # to executors: bob, on the sender's own node
    r = swarm.call("alice", "POST", "/v1/broadcast", {"role": "executor", "body": "go"})
    assert r.status_code == 200
    assert swarm.wait_inbox("bob", 1)[0]["body"] == "go"
    time.sleep(1.5)
    assert swarm.drain("carol") == [] and len(swarm.drain("alice")) == 1
    swarm.drain("erin")
    swarm.drain("bob")


def test_bad_input_is_refused(swarm: Swarm) -> None:
    cases = [
        ("/v1/messages", {"to": swarm.addr("bob")}, 400, "missing_field"),
        ("/v1/messages", {"to": "Bad Name", "body": 1}, 400, "bad_agent"),
        ("/v1/messages", {"to": swarm.addr("bob"), "body": 1, "timeout_s": 0}, 400, "bad_field"),
        ("/v1/messages", {"to": swarm.addr("bob"), "body": "x" * 70_000}, 413, "too_large"),
        ("/v1/topics/has space/publish", {"body": 1}, 400, "bad_topic"),
        ("/v1/broadcast", {"role": 5, "body": 1}, 400, "bad_field"),
    ]
    for path, body, status, code in cases:
        r = swarm.call("alice", "POST", path, body)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["code"] == code, (path, r.text)
    r = swarm.call("alice", "GET", "/v1/messages?wait_s=-1")
    assert r.status_code == 400
    # the operator must act as an agent
    node0 = swarm.cluster.nodes[0]
    op = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node0.state_dir / "api.sock")), base_url="http://x"
    )
    r = op.get("/v1/messages")
    assert r.status_code == 400 and r.json()["error"]["code"] == "agent_required"


def test_cli_and_long_poll(swarm: Swarm) -> None:
    node0, node1 = swarm.cluster.nodes
    swarm.drain("bob")
    out = node1.cli_json("msg", "--agent", "bob", "subscribe", "ci")
    assert out["topics"] == ["ci"]

    def later() -> None:
        time.sleep(1.0)
        node0.cli("msg", "--agent", "alice", "publish", "ci", '{"ok": true}')

    t = threading.Thread(target=later)
    t.start()
    got = node1.cli_json("msg", "--agent", "bob", "inbox", "--wait", "30")
    t.join()
    assert [m["body"] for m in got["messages"]] == [{"ok": True}]
    # not yet acknowledged: read again with the cursor to acknowledge
    again = node1.cli_json("msg", "--agent", "bob", "inbox", "--after", str(got["next"]))
    assert again["messages"] == []
    r = node1.cli("msg", "--agent", "mute", "publish", "ci", "1", check=False)
    assert r.returncode == 1 and "messages.publish" in r.stderr
    r = node1.cli("msg", "--agent", "bob", "send", "nobody-anywhere", "1", check=False)
    assert r.returncode == 1 and "nobody-anywhere" in r.stderr
    text = node1.cli("msg", "--agent", "bob", "topics").stdout
    assert "ci" in text
    node1.cli("msg", "--agent", "bob", "unsubscribe", "ci")
    assert node1.cli_json("msg", "topics", "--agent", "bob") == {"topics": []}


def test_stream_paths_were_used(swarm: Swarm) -> None:
    """The cross-node cases above went over /moss/msg/1 and gossip, not a local shortcut."""
    c0 = swarm.cluster.nodes[0].status()["counters"]
    c1 = swarm.cluster.nodes[1].status()["counters"]
    assert c0["msg_out_direct"] >= 1 and c0["msg_in_reply"] >= 1
    assert c1["msg_in_direct"] >= 1 and c1["msg_out_reply"] >= 1
    assert c1["msg_in_topic"] >= 1 and c0["msg_in_broadcast"] >= 1


async def test_non_member_request_is_refused_and_counted(swarm: Swarm) -> None:
    import multiaddr
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from mossnode.crypto.envelope import seal
    from mossnode.crypto.identity import Identity
    from mossnode.node.host import FrameError, make_host, read_frame, write_frame
    from mossnode.node.messaging import MSG_PROTO, REQUEST
    from mossnode.protocols import messages as M

    node1 = swarm.cluster.nodes[1]
    status = node1.status()
    before = status["rejected"].get("not_member", 0)
    swarm.drain("bob")
    rogue = Identity.generate()
    m = M.new_message(
        suffix="0123456789abcdef",
        mode=M.DIRECT,
        origin=rogue.peer_id,
        sender="alice",
        roles=["admin"],
        body="let me in",
        sent_at=int(time.time() * 1000),
        to="bob",
        node=swarm.ids[1],
        timeout_ms=5000,
    )
    assert isinstance(m, M.Message)
    data = seal(
        rogue,
        swarm_id=bytes.fromhex(status["swarm_id"]),
        type=REQUEST,
        seq=1,
        timestamp=int(time.time() * 1000),
        body=m.wire(),
    )
    host = make_host(rogue)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(node1.addr))
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [MSG_PROTO])
        await write_frame(stream, data)
        try:
            answer: bytes | None = await read_frame(stream)
        except (FrameError, StreamEOF):
            answer = None
        assert answer is None  # closed without an answer
    assert node1.status()["rejected"].get("not_member", 0) > before
    assert swarm.drain("bob") == []
