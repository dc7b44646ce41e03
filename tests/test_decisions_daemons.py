"""The consensus-backed decided log across real daemons: four validators decide a membership
change while one is killed, the restarted one catches up and its log verifies; a vote from
proposal to outcome; an exclusive task assigned by a decision runs exactly once."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest

from mossnode.cluster import Cluster, Node, wait_for
from mossnode.crypto.peerid import public_key_from_peer_id
from mossnode.node.daemon import _jsonable
from mossnode.protocols.decisions import (
    TASK_ASSIGN,
    ConsensusMembership,
    exclusive_assignment,
)
from mossnode.protocols.membership import Entry, parse_genesis

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}
AGENT = f"exec:{sys.executable} {Path(__file__).with_name('agents') / 'adder.py'}"


def verify_log(ds: list[dict[str, Any]]) -> ConsensusMembership:
    """Replay ``mossnode decisions --json`` from its genesis record, as any node would: each
    entry is recomputed from the decided batch in its certificate and the quorum commits are
    checked against the validators in force at its seq. Raises on the first bad entry."""
    assert ds[0]["seq"] == 0 and ds[0]["kind"] == "genesis"
    genesis = parse_genesis(bytes.fromhex(ds[0]["certificate"][0]))
    state = ConsensusMembership(genesis, extensions={TASK_ASSIGN: exclusive_assignment({})})
    for d in ds[1:]:
        cert = [bytes.fromhex(c) for c in d["certificate"]]
        got = state.analyze(cert[0])
        assert not isinstance(got, str), got
        state.apply(Entry(d["seq"], got.kind, got.payload, cert))  # verifies the certificate
        assert (d["kind"], d["payload"]) == (got.kind, _jsonable(got.payload))
    return state


def signers(d: dict[str, Any]) -> set[bytes]:
    """Keys that signed the commits of one entry of ``decisions --json``."""
    return {cbor2.loads(bytes.fromhex(c)[64:])[3] for c in d["certificate"][1:]}


def consensus(node: Node) -> dict[str, Any]:
    return dict(node.status()["consensus"])


def voting(node: Node, size: int, height: int = 0) -> bool:
    """A validator caught up to ``height`` whose replica counts ``size`` validators in force
    (the null batches after a change brought them in)."""
    c = consensus(node)
    return bool(c["validator"] and c["in_force"] == size and c["height"] >= height)


def peer_id(node: Node) -> str:
    return str(node.cli_json("id")["peer_id"])


def start_all(c: Cluster) -> None:
    c.init()
    for node in c.nodes:
        node.start(wait=False)
    for node in c.nodes:
        wait_for(node.ready, 30, f"{node.name} to start")


def test_validators_decide_with_one_killed_and_it_catches_up(cluster_factory) -> None:
    c: Cluster = cluster_factory(5, **FAST)
    start_all(c)
    founder, *validators, newcomer = c.nodes
    # Grow from the founder alone to four validators, one at a time: each newcomer is needed
    # for the next decision (n = 2 has no fault tolerance), so wait until it votes.
    for k, node in enumerate(validators, start=1):
        token = founder.cli_json("invite", "--role", "validator")["token"]
        node.cli("join", founder.addr, "--invite", token)
        wait_for(
            lambda k=k: all(voting(n, k + 1) for n in [founder, *validators[:k]]),
            30,
            f"{node.name} to vote",
        )
    assert consensus(founder)["validators"] == 4

    # Kill a backup validator; the other three decide an admission (quorum 3 of 4), proposed
    # by a validator that is not the founder and holds no member.invite itself.
    primary = consensus(founder)["primary"]
    victim = next(n for n in validators if peer_id(n) != primary)
    via = next(n for n in validators if n is not victim)
    victim.kill()
    before = founder.status()["decided_height"]
    token = founder.cli_json("invite", "--role", "executor")["token"]
    newcomer.cli("join", via.addr, "--invite", token)
    up = [n for n in c.nodes if n is not victim]
    wait_for(lambda: founder.status()["members"] == 5, 20, "the admission")
    admit = next(d for d in founder.cli_json("decisions")[before + 1 :] if d["kind"] == "admit")
    height = admit["seq"]
    wait_for(lambda: all(n.status()["decided_height"] >= height for n in up), 20, "all of them")
    assert admit["payload"]["public_key"] == peer_id(newcomer)
    victim_key = public_key_from_peer_id(peer_id(victim))
    assert victim_key not in signers(admit) and len(signers(admit)) >= 3

    # Restart it: it restores its replica from its records, catches up, verifies, votes.
    victim.start()
    wait_for(lambda: voting(victim, 4, height), 30, "the restarted validator to catch up")
    assert victim.status()["members"] == 5

    # With another validator down, nothing is decided without the restarted one.
    spare = next(n for n in validators if n not in (victim, via))
    spare.stop(signal.SIGKILL)
    seq = founder.cli_json("swarm", "pause")["seq"]
    assert seq > height
    wait_for(lambda: victim.status()["paused"], 10, "the pause to reach the restarted node")
    pause = victim.cli_json("decisions")[seq]
    assert pause["kind"] == "pause" and victim_key in signers(pause)

    # Its log, as `decisions --json` prints it, verifies from genesis on and matches the founder's.
    ds = victim.cli_json("decisions")
    state = verify_log(ds)
    assert state.height >= seq and state.paused
    assert state.is_member(public_key_from_peer_id(peer_id(newcomer)))
    assert len(state.validators()) == 4
    assert state.swarm_id.hex() == founder.status()["swarm_id"]
    ref = founder.cli_json("decisions")
    key = [(d["seq"], d["kind"], d["payload"], d["certificate"][0]) for d in ds]
    assert key == [(d["seq"], d["kind"], d["payload"], d["certificate"][0]) for d in ref]


def test_vote_from_proposal_to_outcome(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.start(roles=["executor"])  # executors hold decision.vote; the founder also proposes
    founder, a, b = c.nodes
    v = founder.cli_json("decide", "propose", "majority", "--title", "ship it?")
    vid = v["id"]
    assert v["rule"] == "majority" and v["result"] is None
    assert set(v["electorate"]) == {peer_id(n) for n in c.nodes}  # one ballot each
    # a node that is not a validator learns of the vote and casts its ballot through PBFT
    wait_for(lambda: a.api.get("/v1/votes"), 10, "the vote to reach node1")
    r = a.cli_json("decide", "vote", str(vid), "yes")
    assert (r["id"], r["yes"], r["result"]) == (vid, 1, None)
    again = a.cli("decide", "vote", str(vid), "no", check=False)
    assert again.returncode == 1 and "already voted" in again.stderr
    wait_for(lambda: b.api.get(f"/v1/votes/{vid}")["yes"] == 1, 10, "the ballot to reach node2")
    r = b.cli_json("decide", "vote", str(vid), "yes")  # 2 of 3: certain, so it closes it
    assert (r["yes"], r["total"], r["result"]) == (2, 3, "passed")
    late = founder.cli("decide", "vote", str(vid), "no", check=False)
    assert late.returncode == 1 and "closed" in late.stderr

    # a reputation-weighted vote: no task history yet, so everyone weighs a newcomer's 500;
    # its proposer closes it early, and without a majority of the weight it is rejected
    w = founder.cli_json("decide", "propose", "reputation", "--title", "weights?")
    assert set(w["electorate"].values()) == {500}
    founder.cli_json("decide", "vote", str(w["id"]), "yes")
    closed = founder.cli_json("decide", "close", str(w["id"]))
    assert (closed["yes"], closed["total"], closed["result"]) == (500, 1500, "rejected")

    # the outcomes are in the decided log, certified, on every node
    wait_for(lambda: a.status()["decided_height"] == founder.status()["decided_height"], 10, "a")
    ds = a.cli_json("decisions")
    state = verify_log(ds)
    kinds = [d["kind"] for d in ds]
    assert kinds == [
        "genesis",
        "admit",
        "admit",
        "vote.open",
        "vote.cast",
        "vote.cast",
        "vote.outcome",
        "vote.open",
        "vote.cast",
        "vote.outcome",
    ]
    outcome = ds[6]["payload"]
    assert (outcome["vote"], outcome["result"], outcome["closed_by"]) == (vid, "passed", peer_id(b))
    assert state.polls[vid].result == "passed" and state.polls[w["id"]].result == "rejected"
    assert [v["result"] for v in a.cli_json("decide", "list")] == ["passed", "rejected"]


def test_exclusive_task_runs_exactly_once(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.start(roles=["planner", "executor"])
    for node in c.nodes:  # every node can run it, so every node proposes itself
        node.cli(
            "agent",
            "add",
            f"adder-{node.name}",
            "--role",
            "executor",
            "--capability",
            "math",
            "--backend",
            AGENT,
        )
    c.wait_all_alive()
    body = {
        "title": "once",
        "capabilities": ["math"],
        "input": {"n": 7, "sleep": 1},
        "contract": {"exclusive": True},
    }
    tid = c.nodes[1].api.post("/v1/tasks", body)["id"]
    wait_for(lambda: c.nodes[2].api.get(f"/v1/tasks/{tid}")["state"] == "done", 45, "the task")
    t = c.nodes[0].api.get(f"/v1/tasks/{tid}")
    assert t["result"] == {"n": 7} and t["attempt"] == 1
    ds = c.nodes[0].cli_json("decisions")
    verify_log(ds)
    assigned = [d for d in ds if d["kind"] == TASK_ASSIGN and d["payload"]["task"] == tid]
    assert len(assigned) == 1 and assigned[0]["payload"]["node"] == t["assignee"]
    runs = sum(
        line.count(f"running {tid} on agent")
        for n in c.nodes
        for line in n.log_path.read_text().splitlines()
    )
    assert runs == 1


def test_vote_endpoints_name_their_permissions(cluster_factory) -> None:
    c: Cluster = cluster_factory(1)
    c.init()
    node = c.nodes[0]
    node.start()
    # the founder node holds admin + validator: a validator agent may read but not propose or
    # vote, an admin agent may do both (bodies are invalid: allowed calls get 400, nothing
    # changes)
    tokens = {
        role: node.cli_json("agent", "add", f"a-{role}", "--role", role, "--backend", "exec:true")[
            "token"
        ]
        for role in ("admin", "validator")
    }
    calls = [
        ("GET", "/v1/votes", None, "state.read"),
        ("POST", "/v1/votes", {"rule": "majority"}, "decision.propose"),
        ("GET", "/v1/votes/1", None, "state.read"),
        ("POST", "/v1/votes/1/vote", {"choice": "maybe"}, "decision.vote"),
        ("POST", "/v1/votes/1/close", {"timeout_s": -1}, "decision.propose"),
    ]
    for role, token in tokens.items():
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")),
            base_url="http://x",
            headers={"Authorization": f"Bearer {token}"},
        )
        for method, path, body, perm in calls:
            r = client.request(method, path, json=body)
            if role == "admin" or perm == "state.read":
                assert r.status_code in (200, 400, 404), (role, path, r.text)
            else:
                assert r.status_code == 403, (role, path, r.text)
                assert r.json()["error"]["details"]["permission"] == perm
    doc = node.api.get("/v1/openapi.json")
    for method, path, _, perm in calls:
        tpl = path.replace("/1", "/{id}")
        assert doc["paths"][tpl][method.lower()]["x-permission"] == perm
    assert node.status()["decided_height"] == 0
    r = node.cli("decide", "vote", "1", "yes", check=False)
    assert r.returncode == 1 and "no vote 1" in r.stderr


def test_ledger_founded_before_consensus_is_refused(cluster_factory) -> None:
    from mossnode.crypto.envelope import canonical
    from mossnode.node.ledger import LEDGER_FILE

    c: Cluster = cluster_factory(1)
    c.init()
    node = c.nodes[0]
    path = node.state_dir / LEDGER_FILE
    doc = cbor2.loads(path.read_bytes())
    doc["entries"] = [{"seq": 1, "kind": "pause", "payload": {}, "certificate": [b"x"]}]
    path.write_bytes(canonical(doc))  # a founder-authority ledger with one decision
    r = node.cli("run", check=False, timeout=30)
    assert r.returncode == 1 and "founded before consensus" in r.stderr


def test_operators_grant_revoke_and_remove_by_consensus(cluster_factory) -> None:
    c: Cluster = cluster_factory(2, **FAST)
    c.start(roles=["planner"])
    founder, member = c.nodes
    me, other = peer_id(founder), peer_id(member)

    def roles() -> dict[str, list[str]]:
        return {p["peer_id"]: sorted(p["roles"]) for p in founder.cli_json("peers")}

    height = founder.status()["decided_height"]
    for bad, word in (
        (("role", "grant", other, "bogus"), "unknown role"),
        (("role", "revoke", other, "nope"), "unknown role"),
        (("role", "grant", "12D3KooWnobody", "executor"), "no member"),
        (("member", "remove", "12D3KooWnobody"), "no member"),
    ):
        r = founder.cli(*bad, check=False)
        assert r.returncode == 1 and word in r.stderr and len(r.stderr.splitlines()) == 1, r
    assert founder.status()["decided_height"] == height  # refused: nothing decided

    founder.cli("role", "grant", me, "executor")  # the founder takes work too
    founder.cli("role", "grant", other, "reviewer")
    out = founder.cli_json("role", "revoke", other, "planner")
    assert out["kind"] == "revoke" and out["seq"] > height
    wait_for(lambda: "executor" in founder.status()["roles"], 20, "the grant")
    wait_for(lambda: roles()[other] == ["reviewer"], 20, "the revocation")
    founder.cli("member", "remove", other)
    wait_for(lambda: other not in roles(), 20, "the removal")
    ds = founder.cli_json("decisions")
    verify_log(ds)  # every entry carries a certificate any node checks alone
    kinds = [d["kind"] for d in ds]
    assert kinds[-4:] == ["grant", "grant", "revoke", "remove"]
