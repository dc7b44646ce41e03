"""The decision gate for bid windows: a node takes a winner only once it holds every bid that
counts. Reproduces the overload case where gossip is slower than the settle time: without the
gate two nodes each see themselves win and both run the task; with it, both wait and agree."""

from __future__ import annotations

from test_tasks_core import Doc, P, agent, only

from mossnode.protocols.tasks import (
    Bid,
    Claim,
    Dispatch,
    Horizons,
    Scheduler,
    State,
    stable_rule,
)


def test_horizons_wait_for_the_entries_a_heartbeat_reports() -> None:
    h = Horizons()
    assert h.of("B") == 0
    assert not h.heard("B", at=1_000, seq=5, applied=3)  # B wrote 5, we hold 3: not yet
    assert h.of("B") == 0
    assert not h.applied({"B": 4})
    assert h.applied({"B": 5}) and h.of("B") == 1_000
    assert h.heard("B", at=1_500, seq=5, applied=5) and h.of("B") == 1_500
    assert not h.heard("B", at=1_200, seq=5, applied=5)  # an older beat never moves it back
    assert h.of("B") == 1_500
    for k in range(20):  # a stalled author keeps only its newest beats
        h.heard("C", at=k, seq=100 + k, applied=0)
    assert len(h.pending["C"]) == 8
    assert h.applied({"C": 200}) and h.of("C") == 19 and "C" not in h.pending


def test_window_is_decided_only_when_every_expected_bidder_is_accounted_for() -> None:
    doc = Doc()
    tid = doc.create("A", "t")
    doc.apply("B", 0, Bid(tid, 1, "b", 0.5))
    horizon = {"C": 0}
    gate = stable_rule("B", lambda task: ["B", "C"], lambda n: horizon.get(n, 0))
    # after decide_at, C neither bid nor is known to have written past the close (100)
    st = doc.status(tid, 250, stable=gate)
    assert (st.state, st.assignee) == (State.PENDING, None)
    assert st.wake_at is not None and st.wake_at > 250  # looks again by itself
    horizon["C"] = 100  # C's writes known up to the close itself: a bid stamped 100 counts
    assert doc.status(tid, 250, stable=gate).state is State.PENDING
    horizon["C"] = 101
    st = doc.status(tid, 250, stable=gate)
    assert (st.state, st.assignee) == (State.ASSIGNED, "B")
    # a counted bid from C stands in for its horizon
    doc2 = Doc()
    tid2 = doc2.create("A", "t")
    doc2.apply("B", 0, Bid(tid2, 1, "b", 0.5))
    doc2.apply("C", 50, Bid(tid2, 1, "c", 0.9))
    st = doc2.status(tid2, 200, stable=stable_rule("B", lambda t: ["B", "C"], lambda n: 0))
    assert (st.state, st.assignee) == (State.ASSIGNED, "C")


def test_slow_gossip_no_longer_makes_two_winners() -> None:
    """B and C bid inside the window; each sees the other's bid only after 500 ms (settle is
    100 ms, the claim timeout 500 ms after the decision at 210). Ungated, both claim and run;
    gated, both wait, then agree on one winner."""

    def run(gated: bool) -> list[str]:
        seen = {"B": Doc(), "C": Doc()}  # each node's own replica
        for d in seen.values():
            d.create("A", "t")
        scheds = {n: Scheduler(n, params=P) for n in seen}
        heard: dict[str, dict[str, int]] = {"B": {}, "C": {}}
        if gated:
            for n, s in scheds.items():
                s.stable = stable_rule(n, lambda t: ["B", "C"], lambda m, n=n: heard[n].get(m, 0))
        bids = {}
        for n in ("B", "C"):
            plan = scheds[n].tick(seen[n].view(), agents=[agent(n.lower())], now_ms=10)
            (bid,) = only(plan, Bid)
            bids[n] = bid
            seen[n].apply(n, 10, plan)
        runners = []
        for n in ("B", "C"):  # decision time, the other's bid still in flight
            plan = scheds[n].tick(seen[n].view(), agents=[agent(n.lower())], now_ms=300)
            if only(plan, Dispatch):
                runners.append(n)
                seen[n].apply(n, 300, plan)
        for n, other in (("B", "C"), ("C", "B")):  # gossip arrives, stamped at 500
            seen[n].apply(other, 10, bids[other])
            heard[n][other] = 500
        for n in ("B", "C"):
            if n in runners:
                continue
            plan = scheds[n].tick(seen[n].view(), agents=[agent(n.lower())], now_ms=510)
            if only(plan, Claim):
                runners.append(n)
        return sorted(runners)

    assert run(gated=False) == ["B", "C"]  # the failure the gate exists for
    (one,) = run(gated=True)
    assert one in ("B", "C")


def test_a_window_the_gate_never_opens_closes_as_no_claim_after_the_claim_timeout() -> None:
    # A member whose heartbeats report entries it never delivers keeps its horizon before
    # every close; the gated window used to stay pending forever, on every node.
    doc = Doc()
    tid = doc.create("A", "t")
    hz = Horizons()
    for t in range(0, 5_000, 500):
        hz.heard("H", at=t, seq=10**9, applied=0)
    expected = ["B", "C", "H"]
    b = Scheduler("B", params=P, stable=stable_rule("B", lambda task: expected, hz.of))
    c = Scheduler("C", params=P, stable=stable_rule("C", lambda task: expected, hz.of))
    doc.apply("B", 1, b.tick(doc.view(), agents=[agent("b")], now_ms=1))
    doc.apply("C", 2, c.tick(doc.view(), agents=[agent("c")], now_ms=2))
    w_close = doc.status(tid, 300).window
    assert w_close is not None
    timeout_at = w_close.decide_at + P.claim_timeout_ms
    plan = b.tick(doc.view(), agents=[agent("b")], now_ms=timeout_at - 1)
    assert b.statuses[tid].state is State.PENDING and not only(plan, Claim)
    # past the timeout: closed as the winner's no_claim, as an ungated node sees it
    for sched, me in ((b, "b"), (c, "c")):
        sched.tick(doc.view(), agents=[agent(me)], now_ms=timeout_at)
        st = sched.statuses[tid]
        assert st.attempt == 2 and st.outcomes == doc.status(tid, timeout_at).outcomes
        (o,) = st.outcomes
        assert (o.kind, o.node, o.at) == ("no_claim", "C", timeout_at)
