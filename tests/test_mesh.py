"""Real daemons on loopback: joining, presence, failure detection, intruders, invite misuse."""

from __future__ import annotations

import time

import pytest
from intruder import run_intruder

from mossnode.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

FAST = {"presence_interval_s": 0.5, "suspect_after_s": 1.5, "dead_after_s": 3.0}


def health(node, peer_id: str) -> str | None:
    for p in node.peers():
        if p["peer_id"] == peer_id:
            return p["state"]
    return None


def test_five_nodes_join_detect_death_and_rejoin(cluster_factory) -> None:
    c: Cluster = cluster_factory(5, **FAST)
    c.start(roles=["executor"])
    c.wait_all_alive(timeout=30)
    ids = [n.cli_json("id")["peer_id"] for n in c.nodes]
    for n in c.nodes:
        s = n.status()
        assert s["members"] == 5
        assert s["decided_height"] == 4
    peers = c.nodes[1].peers()
    assert {p["peer_id"] for p in peers} == set(ids) - {ids[1]}
    founder = next(p for p in peers if p["peer_id"] == ids[0])
    assert founder["roles"] == ["admin", "validator"] and founder["addrs"]

    victim = c.nodes[3]
    victim.kill()
    for n in c.nodes[:3] + c.nodes[4:]:
        wait_for(
            lambda n=n: health(n, ids[3]) == "dead",
            FAST["dead_after_s"] + 5,
            f"{n.name} to mark node3 dead",
        )
    victim.start()  # no new invite: it rejoins from its ledger
    for n in c.nodes[:3] + c.nodes[4:]:
        wait_for(lambda n=n: health(n, ids[3]) == "alive", 30, f"{n.name} to see node3 again")
    assert victim.status()["members"] == 5


def test_intruder_is_not_relayed(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST, join_window_s=2.0)
    c.start()
    c.wait_all_alive()
    target = c.nodes[2]
    out, stderr = run_intruder(target, c.nodes[0].status()["peer_id"], 6)
    assert out["sent_rounds"] > 5
    rejected = target.status()["rejected"]
    assert rejected.get("not_member", 0) > 0
    assert rejected.get("bad_signature", 0) > 0
    assert rejected.get("malformed", 0) > 0
    # Nothing was relayed: the nodes the intruder never touched saw none of it.
    for n in c.nodes[:2]:
        st = n.status()
        assert st["rejected"].get("not_member", 0) == 0
        assert st["rejected"].get("bad_signature", 0) == 0
        assert st["decided_height"] == 2 and st["members"] == 3
    # It learned nothing: no gossip reached it, even while its connection was still open.
    assert out["received"] == 0, [x for x in stderr.splitlines() if x.startswith("received")]
    # Its connection was closed once the join window passed.
    assert target.status()["counters"].get("gated", 0) >= 1


def test_heartbeats_go_direct_and_non_members_beats_are_refused(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.start()
    c.wait_all_alive()
    for n in c.nodes:  # most heartbeats travel straight to each connected member
        wait_for(lambda n=n: n.status()["counters"].get("presence_in", 0) >= 4, 30, "direct beats")
    target = c.nodes[1]
    before = target.status()["rejected"]
    out, _ = run_intruder(target, c.nodes[0].status()["peer_id"], 1, "presence")
    assert out["frames"] == 20
    after = target.status()["rejected"]
    assert after.get("not_member", 0) - before.get("not_member", 0) == 10
    assert after.get("malformed", 0) - before.get("malformed", 0) == 10
    assert after.get("handler_error", 0) == 0
    assert len(target.peers()) == 2  # the intruder is nobody's peer


def test_invite_misuse(cluster_factory) -> None:
    c: Cluster = cluster_factory(3, **FAST)
    c.init()
    for n in c.nodes:
        n.start()
    founder, a, b = c.nodes
    token = founder.cli_json("invite", "--role", "executor")["token"]
    a.cli("join", founder.addr, "--invite", token)
    # reuse
    r = b.cli("join", founder.addr, "--invite", token, check=False)
    assert r.returncode == 1 and "already been used" in r.stderr
    # expiry
    short = founder.cli_json("invite", "--role", "executor", "--ttl", "1s")["token"]
    time.sleep(1.5)
    r = b.cli("join", founder.addr, "--invite", short, check=False)
    assert r.returncode == 1 and "expired" in r.stderr
    # forgery: a non-admin member signs its own invite
    r = a.cli("invite", "--role", "admin", check=False)
    assert r.returncode == 1 and "member.invite" in r.stderr
    good = founder.cli_json("invite", "--role", "executor")["token"]
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    r = b.cli("join", founder.addr, "--invite", tampered, check=False)
    assert r.returncode == 1 and ("forged" in r.stderr or "corrupted" in r.stderr)
    r = b.cli("join", founder.addr, "--invite", "hello", check=False)
    assert r.returncode == 1 and "not a mossnode invite" in r.stderr
    # another swarm's invite
    other = cluster_factory(1, **FAST)
    other.init()
    other.nodes[0].start()
    foreign = other.nodes[0].cli_json("invite", "--role", "executor")["token"]
    r = b.cli("join", founder.addr, "--invite", foreign, check=False)
    assert r.returncode == 1 and "another swarm" in r.stderr
    # after all that, the good invite still works and the log has exactly two admissions
    b.cli("join", founder.addr, "--invite", good)
    assert founder.status()["decided_height"] == 2
    kinds = [d["kind"] for d in founder.cli_json("decisions")]
    assert kinds == ["genesis", "admit", "admit"]
