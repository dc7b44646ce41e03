"""Sealed payloads (crypto/sealed.py): round trip, recipients only, tampering, determinism."""

from __future__ import annotations

import base64
import hashlib

import pytest

from mossnode.crypto.identity import Identity
from mossnode.crypto.sealed import (
    ALG,
    Randomness,
    Sealed,
    SealedError,
    open_sealed,
    recipients_of,
    seal,
    x25519_public,
)


def ident(name: str) -> Identity:
    return Identity(hashlib.sha256(name.encode()).digest())


def rand(tag: str = "r") -> Randomness:
    raw = b"".join(hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(4))
    return Randomness.from_bytes(raw[: Randomness.SIZE])


A, B, C = ident("a"), ident("b"), ident("c")
TO_AB = {A.peer_id: A.public_key, B.peer_id: B.public_key}


def test_round_trip_for_every_recipient_through_the_stored_form() -> None:
    s = seal(b"the launch codes", context="task/x/input", recipients=TO_AB, rand=rand())
    raw = s.to_raw()
    assert raw["alg"] == ALG and set(raw["keys"]) == {A.peer_id, B.peer_id}
    assert b"launch" not in repr(raw).encode()
    back = Sealed.from_raw(raw)
    assert back == s and back.recipients == tuple(sorted(TO_AB))
    for who in (A, B):
        got = open_sealed(back, context="task/x/input", peer_id=who.peer_id, seed=who.seed)
        assert got == b"the launch codes"
    empty = seal(b"", context="c", recipients={A.peer_id: A.public_key}, rand=rand())
    assert open_sealed(empty, context="c", peer_id=A.peer_id, seed=A.seed) == b""


def test_wrong_recipient_fails_cleanly() -> None:
    s = seal(b"secret", context="ctx", recipients=TO_AB, rand=rand())
    with pytest.raises(SealedError, match="not a recipient"):
        open_sealed(s, context="ctx", peer_id=C.peer_id, seed=C.seed)
    # C claims to be A: A's wrapped key does not open with C's key
    with pytest.raises(SealedError, match="does not open"):
        open_sealed(s, context="ctx", peer_id=A.peer_id, seed=C.seed)


def test_tampering_is_detected() -> None:
    s = seal(b"secret payload", context="ctx", recipients=TO_AB, rand=rand())

    def flipped(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]

    for bad in (
        Sealed(flipped(s.ciphertext, len(s.ciphertext) - 1), s.ephemeral_public, s.keys),
        Sealed(flipped(s.ciphertext, 0), s.ephemeral_public, s.keys),  # the nonce
        Sealed(s.ciphertext, flipped(s.ephemeral_public, 3), s.keys),
        Sealed(s.ciphertext, s.ephemeral_public, {A.peer_id: flipped(s.keys[A.peer_id], 40)}),
        # B's wrapped key offered to A
        Sealed(s.ciphertext, s.ephemeral_public, {A.peer_id: s.keys[B.peer_id]}),
    ):
        with pytest.raises(SealedError):
            open_sealed(bad, context="ctx", peer_id=A.peer_id, seed=A.seed)
    # a value sealed for one place does not open in another
    with pytest.raises(SealedError, match="not sealed for other"):
        open_sealed(s, context="other", peer_id=A.peer_id, seed=A.seed)


def test_deterministic_given_the_same_randomness() -> None:
    one = seal(b"x" * 100, context="ctx", recipients=TO_AB, rand=rand("same"))
    two = seal(
        b"x" * 100, context="ctx", recipients=dict(reversed(TO_AB.items())), rand=rand("same")
    )
    assert one.to_raw() == two.to_raw()
    three = seal(b"x" * 100, context="ctx", recipients=TO_AB, rand=rand("other"))
    assert three.ciphertext != one.ciphertext and three.ephemeral_public != one.ephemeral_public


def test_malformed_stored_values_are_refused_not_raised_as_crashes() -> None:
    good = seal(b"p", context="c", recipients=TO_AB, rand=rand()).to_raw()
    bad_values = [
        None,
        "sealed",
        [],
        {**good, "alg": "rot13"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "keys"},
        {**good, "epk": "not base64!"},
        {**good, "epk": base64.b64encode(b"short").decode()},
        {**good, "ct": base64.b64encode(b"x" * 10).decode()},
        {**good, "ct": 5},
        {**good, "keys": {}},
        {**good, "keys": []},
        {**good, "keys": {A.peer_id: base64.b64encode(b"x" * 10).decode()}},
        {**good, "keys": {A.peer_id: 7}},
        {**good, "keys": {"": good["keys"][A.peer_id]}},
    ]
    for value in bad_values:
        with pytest.raises(SealedError):
            Sealed.from_raw(value)
    # the cheap recipient lookup agrees on good values and never raises on bad ones
    assert recipients_of(good) == tuple(sorted(TO_AB))
    assert [recipients_of(v) for v in bad_values[:4]] == [(), (), (), ()]
    assert recipients_of({**good, "keys": {}}) == ()


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(SealedError, match="randomness"):
        Randomness.from_bytes(b"\0" * 10)
    with pytest.raises(SealedError, match="recipients"):
        seal(b"p", context="c", recipients={}, rand=rand())
    with pytest.raises(SealedError, match="Ed25519"):
        seal(b"p", context="c", recipients={"x": b"\1" * 31}, rand=rand())
    with pytest.raises(SealedError, match="Ed25519"):
        x25519_public(b"")
