"""Quorum certificates checked by a node that is not a validator: only payload, set, swarm id."""

from __future__ import annotations

import cbor2
import pytest
from test_pbft_sim import SWARM, T0, Sim, ident

from mossnode.crypto.envelope import seal
from mossnode.protocols.pbft import Decided, Invalid, Verified, quorum, verify_certificate
from mossnode.protocols.pbft.messages import COMMIT, PREPARE, Vote


@pytest.fixture(scope="module")
def decided() -> tuple[Sim, Decided]:
    sim = Sim(4, 21, clients=2)
    for k in range(3):
        sim.submit_at(k, k % 2, b"c%d" % k)
    sim.run(30_000, stop=sim.clients_done)
    return sim, sim.decided[sim.pids[1]][1]


def reason(result: Verified | Invalid) -> str:
    assert isinstance(result, Invalid) and not result
    return result.reason.split(":")[0]


def test_valid_certificate_verifies_for_anyone(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    ok = verify_certificate(d.certificate, d.payload, sim.validators, SWARM)
    assert ok and isinstance(ok, Verified)
    assert (ok.seq, ok.digest) == (1, d.digest)
    assert len(set(ok.signers)) == quorum(4) == 3
    assert verify_certificate(list(d.certificate), d.payload, sim.validators, SWARM, seq=1)
    # Every replica's certificate for the same entry verifies, though the envelopes differ.
    for pid in sim.replica_pids:
        other = sim.decided[pid][1]
        assert verify_certificate(other.certificate, other.payload, sim.validators, SWARM)


def test_too_few_signatures(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    assert reason(verify_certificate(d.certificate[:2], d.payload, sim.validators, SWARM)) == (
        "too_few_signatures"
    )
    assert reason(verify_certificate((), d.payload, sim.validators, SWARM)) == "empty certificate"


def test_duplicate_signer(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    cert = (d.certificate[0], d.certificate[0], d.certificate[1])
    assert reason(verify_certificate(cert, d.payload, sim.validators, SWARM)) == "duplicate_signer"
    # Two different commit envelopes by one signer (a re-sealed retransmission) count once too.
    first = cbor2.loads(d.certificate[0][64:])
    signer = next(i for i in sim.ids if i.public_key == first[3])
    again = seal(signer, swarm_id=SWARM, type=COMMIT, seq=99_999, timestamp=T0 + 1, body=first[6])
    cert2 = (*d.certificate[:2], again)
    assert reason(verify_certificate(cert2, d.payload, sim.validators, SWARM)) == (
        "duplicate_signer"
    )


def _signers(d: Decided) -> set[bytes]:
    return {cbor2.loads(raw[64:])[3] for raw in d.certificate}


def test_mismatched_digest_and_payload(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    assert reason(verify_certificate(d.certificate, d.payload + b"x", sim.validators, SWARM)) == (
        "digest_mismatch"
    )
    assert reason(verify_certificate(d.certificate, d.payload, sim.validators, SWARM, seq=2)) == (
        "wrong_seq"
    )


def test_commits_that_disagree(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    body = cbor2.loads(d.certificate[0][64:])[6]
    signer = next(i for i in sim.ids if i.public_key not in _signers(d))
    other = seal(
        signer,
        swarm_id=SWARM,
        type=COMMIT,
        seq=1,
        timestamp=T0,
        body=Vote(body["v"], body["n"], b"\x01" * 32).body(),
    )
    assert (
        reason(verify_certificate((*d.certificate[:2], other), d.payload, sim.validators, SWARM))
        == "mismatch"
    )


def test_wrong_set_type_swarm_and_tampering(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    strangers = [ident(60 + i).public_key for i in range(4)]
    assert reason(verify_certificate(d.certificate, d.payload, strangers, SWARM)) == (
        "not_validator"
    )
    assert reason(verify_certificate(d.certificate, d.payload, sim.validators, b"\x00" * 32)) == (
        "bad_signature"
    )
    tampered = bytearray(d.certificate[0])
    tampered[-1] ^= 1
    assert (
        reason(
            verify_certificate(
                (bytes(tampered), *d.certificate[1:]), d.payload, sim.validators, SWARM
            )
        )
        == "bad_signature"
    )
    body = cbor2.loads(d.certificate[0][64:])[6]
    prep = [
        seal(i, swarm_id=SWARM, type=PREPARE, seq=1, timestamp=T0, body=body) for i in sim.ids[:3]
    ]
    assert reason(verify_certificate(prep, d.payload, sim.validators, SWARM)) == "not_commit"


def test_certificate_larger_set_needs_larger_quorum(decided: tuple[Sim, Decided]) -> None:
    sim, d = decided
    seven = [*sim.validators, *(ident(70 + i).public_key for i in range(3))]
    assert reason(verify_certificate(d.certificate, d.payload, seven, SWARM)) == (
        "too_few_signatures"
    )
