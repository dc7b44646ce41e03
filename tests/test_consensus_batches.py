"""The batched decided log end to end in the deterministic simulator: many clients propose at
once over a lossy, duplicating, reordering network; batches hold many entries; every node's log
verifies from genesis and agrees; every proposal is decided exactly once; a validator-set
change in the middle of the stream takes over after the watermark."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from consensus_sim import ConsensusSim, SimNode, ident
from test_consensus_decisions import admit, grow

from mossnode.protocols.decisions import (
    CHECKPOINT_INTERVAL,
    WINDOW,
    proof_of,
    verify_consensus_certificate,
)
from mossnode.protocols.membership import Entry
from mossnode.protocols.pbft.config import takes_over

CLIENTS = 8


def signers(entry: Entry) -> set[bytes]:
    return {bytes(cbor2.loads(raw[64:])[3]) for raw in entry.certificate[1:]}


def with_clients(sim: ConsensusSim, k: int = CLIENTS) -> tuple[list[SimNode], list[SimNode]]:
    """Four validators grown from the founder, then ``k`` admin members that only propose."""
    validators = grow(sim)
    f = validators[0]
    clients = []
    for i in range(k):
        who = ident(20 + i)
        t = sim.propose(f, "admit", admit(who, ["admin"], b"c%d" % i))
        assert sim.run(60_000, lambda t=t: sim.decided(f, t))
        clients.append(sim.add(who))
    top = f.state.height
    assert sim.run(60_000, lambda: all(c.state.height >= top for c in clients))
    return validators, clients


def stream(sim: ConsensusSim, clients: list[SimNode], per_client: int) -> list[tuple[Any, int]]:
    """Every client queues ``per_client`` proposals at once (its PBFT client sends one at a
    time; the others queue), so the primary sees many concurrent requests."""
    out = []
    for c in clients:
        for j in range(per_client):
            out.append((c, sim.propose(c, "pause" if j % 2 == 0 else "resume", {})))
    return out


def all_decided(sim: ConsensusSim, proposals: list[tuple[Any, int]]) -> bool:
    return all(sim.decided(c, t) for c, t in proposals)


def batch_sizes(node: SimNode) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for e in node.log:
        p = proof_of(e)
        assert p is not None
        sizes[p.n] = p.slots
    return sizes


def check_once(node: SimNode, proposals: list[tuple[Any, int]]) -> None:
    """Each proposal is the origin of exactly one entry of the log, and that entry is its."""
    origins = list(node.state.origin.values())
    assert len(origins) == len(set(origins))
    for c, t in proposals:
        seq = c.completed[t]
        assert node.state.origin[seq] == (c.identity.public_key, t)
        assert node.log[seq - 1].kind in ("pause", "resume")


@pytest.mark.parametrize("seed", range(12))
def test_many_concurrent_clients_batch_safely_under_loss(seed: int) -> None:
    rng = random.Random(seed)
    sim = ConsensusSim(
        seed,
        drop=rng.choice([0.0, 0.05, 0.15]),
        dup=rng.choice([0.0, 0.1]),
        max_delay=rng.choice([5, 30, 100]),
    )
    validators, clients = with_clients(sim)
    proposals = stream(sim, clients, 3)
    if seed % 3 == 0:  # a backup crashes in the middle of the stream and comes back later
        down = validators[1 + seed % 3]
        sim.run(200)
        sim.crash(down)
        sim.run(3_000)
        sim.restart(down)
    assert sim.run(240_000, lambda: all_decided(sim, proposals))
    f = validators[0]
    top = max(n.state.height for n in sim.nodes.values())
    assert sim.run(60_000, lambda: all(n.state.height >= top for n in sim.nodes.values()))
    sim.check_logs()
    check_once(f, proposals)
    assert max(batch_sizes(f).values()) > 1  # the stream was batched
    for node in sim.nodes.values():
        assert [e.certificate[0] for e in node.log] == [e.certificate[0] for e in f.log[:top]]


@pytest.mark.parametrize("seed", range(6))
def test_reconfiguration_inside_a_stream_takes_over_after_the_watermark(seed: int) -> None:
    rng = random.Random(100 + seed)
    sim = ConsensusSim(100 + seed, drop=rng.choice([0.0, 0.05]), max_delay=rng.choice([5, 40]))
    validators, clients = with_clients(sim, 6)
    f = validators[0]
    leaving = validators[3]
    proposals = stream(sim, clients, 2)
    sim.run(rng.randint(0, 60))  # the stream is under way
    revoke = {"public_key": leaving.identity.public_key, "role": "validator"}
    t = sim.propose(f, "revoke", revoke)
    proposals += stream(sim, clients, 2)
    assert sim.run(240_000, lambda: sim.decided(f, t) and all_decided(sim, proposals))
    sim.check_logs()
    check_once(f, [p for p in proposals if p[0] is not f])
    seq = f.completed[t]
    entry = f.log[seq - 1]
    assert entry.kind == "revoke"
    n = proof_of(entry).n  # type: ignore[union-attr]
    old = set(f.state.validators_at(seq))
    gone = leaving.identity.public_key
    assert gone in old and gone not in f.state.validators()
    first = takes_over(n, CHECKPOINT_INTERVAL, WINDOW)  # the batch after the watermark
    assert f.state.schedule[-1] == (first, f.state.validators())
    for e in f.log[seq:]:
        p = proof_of(e)
        assert p is not None
        if p.n < first:  # up to the watermark: still certified by the old set
            assert signers(e) <= old
        else:  # from then on, the new set alone
            assert gone not in signers(e)
            assert signers(e) <= set(f.state.validators())
    # with nothing left to order, null batches bring the new set in
    assert sim.run(60_000, lambda: gone not in f.core.replica.validators)  # type: ignore[union-attr]
    assert proof_of(f.log[-1]).n >= first - 1  # type: ignore[union-attr]
    # any node, validator or not, checks an entry in the middle of a batch alone, from the
    # state just before it
    mid = next(
        (e for e in f.log if (p := proof_of(e)) is not None and 0 < p.index < p.count - 1),
        None,
    )
    if mid is not None:
        state = sim.fresh_state()
        state.replay(f.log[: mid.seq - 1])
        assert verify_consensus_certificate(state, mid) is None
        assert verify_consensus_certificate(state, f.log[mid.seq]) is not None  # not next
