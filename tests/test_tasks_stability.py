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
