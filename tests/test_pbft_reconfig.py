"""Reconfiguration: a decided entry replaces the validator set at a defined sequence number."""

from __future__ import annotations

import cbor2
from test_pbft_sim import SWARM, Sim, ident, small_config

from mossnode.crypto.envelope import seal
from mossnode.protocols.pbft import Reconfigured, verify_certificate
from mossnode.protocols.pbft.messages import PREPARE, Vote


def test_validator_set_change_takes_effect_at_checkpoint_boundary() -> None:
    cfg = small_config(checkpoint_interval=4, window=8, max_batch=1, max_inflight=1)
    sim = Sim(4, 40, clients=1, config=cfg)
    old = list(sim.validators)
    newcomer = ident(4)
    new = [old[0], old[1], old[2], newcomer.public_key]  # replace validator 3 by a newcomer

    # Decided at seq 1; window 8, K 4 -> boundary 8: the new set governs seqs >= 9 (the
    # primary orders null batches 2-8, see the next test).
    sim.submit_at(0, 0, b"reconfig:" + cbor2.dumps(new))
    sim.run(60_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.run_for(3_000)
    for i in range(4):
        r = sim.replica(i)
        assert r.config_history == ((1, tuple(old)), (9, tuple(new)))
        assert r.last_executed == 8 and r.stable_seq == 8
        assert r.validators == tuple(new)
        assert sim.reconfigs[sim.pids[i]] == [Reconfigured(9, tuple(new))]

    # The newcomer starts knowing only the genesis set and catches up from certified entries.
    sim.add_replica(newcomer, validators=old)
    sim.crash(2)  # with validator 2 down, the new set can only make progress with the newcomer
    sim.clients[sim.client_ids[0].peer_id].set_validators(new)
    for k in range(4):
        sim.submit_in(100 + k, 0, b"after%d" % k)
    sim.run_for(60_000, stop=sim.clients_done)
    sim.check_liveness()
    sim.check_exactly_once()

    joined = sim.replica(newcomer.peer_id)
    assert joined.last_executed == 12
    assert joined.validators == tuple(new)
    decided = sim.decided[sim.pids[0]]
    for seq, d in decided.items():
        vals = old if seq <= 8 else new
        assert verify_certificate(d.certificate, d.payload, vals, SWARM, seq=seq)
    signers = {cbor2.loads(raw[64:])[3] for seq in range(9, 13) for raw in decided[seq].certificate}
    assert newcomer.public_key in signers
    late = decided[10]
    assert not verify_certificate(late.certificate, late.payload, old, SWARM)

    # The removed validator's messages are no longer accepted.
    r0 = sim.replica(0)
    raw = seal(
        sim.ids[3],
        swarm_id=SWARM,
        type=PREPARE,
        seq=10**6,
        timestamp=sim.now,
        body=Vote(r0.view, 13, b"\x01" * 32).body(),
    )
    before = r0.rejections.get("not_member", 0)
    r0.receive(raw, sim.now)
    assert r0.rejections.get("not_member", 0) == before + 1


def test_an_idle_swarm_brings_a_decided_change_into_force_with_null_batches() -> None:
    """Nothing follows the change: the primary orders null batches up to the boundary, so the
    new set takes over without waiting for other requests."""
    cfg = small_config(checkpoint_interval=4, window=8, max_batch=1, max_inflight=1)
    sim = Sim(4, 41, clients=1, config=cfg)
    old = list(sim.validators)
    new = [old[0], old[1], old[2], ident(4).public_key]
    sim.submit_at(0, 0, b"reconfig:" + cbor2.dumps(new))
    sim.run(60_000, stop=sim.clients_done)
    sim.run_for(10_000)
    for i in range(4):
        r = sim.replica(i)
        assert r.config_history == ((1, tuple(old)), (9, tuple(new)))
        assert r.last_executed == 8 and r.stable_seq == 8
        assert r.validators == tuple(new)
        assert r.view == 0  # the primary filled in time: no view change
    batches = sim.decided[sim.pids[0]]
    assert all(cbor2.loads(batches[n].payload) == [] for n in range(2, 9))
