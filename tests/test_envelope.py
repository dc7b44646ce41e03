import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from mossnode.crypto.envelope import (
    MAX_DEPTH,
    SIG_LEN,
    Envelope,
    Reason,
    Rejection,
    ReplayWindow,
    _plain,
    canonical,
    open_envelope,
    seal,
)
from mossnode.crypto.identity import Identity

SWARM = b"\x01" * 32
ALICE = Identity(b"\x11" * 32)
NOW = 1_800_000_000_000


def make(seq: int = 1, ts: int = NOW, body: object = None, type_: str = "t", who=ALICE) -> bytes:
    return seal(who, swarm_id=SWARM, type=type_, seq=seq, timestamp=ts, body=body or {"x": 1})


def opened(data: bytes, **kw):
    kw.setdefault("swarm_id", SWARM)
    kw.setdefault("now_ms", NOW)
    return open_envelope(data, **kw)


def test_roundtrip() -> None:
    env = opened(make(body={"a": [1, b"x", None, 2.5, "s"]}))
    assert isinstance(env, Envelope)
    assert env.body == {"a": [1, b"x", None, 2.5, "s"]}
    assert env.sender == ALICE.public_key
    assert env.sender_id == ALICE.peer_id


def test_canonical_is_deterministic() -> None:
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert make(body={"b": 1, "a": 2}) == make(body={"a": 2, "b": 1})


def test_wrong_swarm() -> None:
    r = opened(make(), swarm_id=b"\x02" * 32)
    assert isinstance(r, Rejection) and r.reason is Reason.WRONG_SWARM


def test_tampered_body() -> None:
    data = bytearray(make(body={"amount": 1}))
    data[-1] ^= 0x01
    r = opened(bytes(data))
    assert isinstance(r, Rejection)
    assert r.reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED)


def test_type_domain_separation() -> None:
    # Re-label a signed "a" message as "b": the signature no longer covers it.
    data = make(type_="a")
    fields = cbor2.loads(data[SIG_LEN:])
    fields[2] = "b"
    r = opened(data[:SIG_LEN] + canonical(fields))
    assert isinstance(r, Rejection) and r.reason is Reason.BAD_SIGNATURE


def test_impersonation() -> None:
    mallory = Identity(b"\x22" * 32)
    data = make(who=mallory)
    fields = cbor2.loads(data[SIG_LEN:])
    fields[3] = ALICE.public_key
    r = opened(data[:SIG_LEN] + canonical(fields))
    assert isinstance(r, Rejection) and r.reason is Reason.BAD_SIGNATURE


def test_size_limit() -> None:
    r = opened(make(body={"blob": b"x" * 2000}), max_size=1000)
    assert isinstance(r, Rejection) and r.reason is Reason.TOO_LARGE


def test_clock_skew() -> None:
    r = opened(make(ts=NOW - 60_000), max_skew_ms=30_000)
    assert isinstance(r, Rejection) and r.reason is Reason.CLOCK_SKEW
    assert isinstance(opened(make(ts=NOW - 10_000)), Envelope)


def test_replay_window() -> None:
    w = ReplayWindow(width=8)
    assert isinstance(opened(make(seq=5), replay=w), Envelope)
    r = opened(make(seq=5), replay=w)
    assert isinstance(r, Rejection) and r.reason is Reason.REPLAY
    assert isinstance(opened(make(seq=3), replay=w), Envelope)  # late but in window
    assert isinstance(opened(make(seq=20), replay=w), Envelope)
    r = opened(make(seq=10), replay=w)  # fell out of the 8-wide window
    assert isinstance(r, Rejection) and r.reason is Reason.REPLAY
    assert w.highest(ALICE.public_key) == 20


def test_forgery_does_not_burn_seq() -> None:
    w = ReplayWindow()
    data = bytearray(make(seq=7))
    data[0] ^= 1
    assert isinstance(opened(bytes(data), replay=w), Rejection)
    assert isinstance(opened(make(seq=7), replay=w), Envelope)


def test_authorizer() -> None:
    def deny(sender: bytes, type_: str) -> Rejection | None:
        return Rejection(Reason.NOT_MEMBER, "stranger")

    r = opened(make(), authorize=deny)
    assert isinstance(r, Rejection) and r.reason is Reason.NOT_MEMBER


def test_non_plain_body_rejected() -> None:
    sig = b"\0" * SIG_LEN
    payload = cbor2.dumps([1, SWARM, "t", ALICE.public_key, 1, NOW, cbor2.CBORTag(999, 1)])
    r = opened(sig + payload)
    assert isinstance(r, Rejection) and r.reason is Reason.MALFORMED


def test_replay_window_eviction() -> None:
    w = ReplayWindow(max_senders=2)
    for i in range(3):
        w.accept(bytes([i]) * 32, 1)
    assert w.highest(b"\0" * 32) == 0  # evicted
    assert w.highest(b"\2" * 32) == 1


VALID = make(body={"k": [1, 2, 3], "s": "text"})


def _assert_rejected_or_valid(data: bytes) -> None:
    r = opened(data, replay=ReplayWindow())
    assert isinstance(r, (Envelope, Rejection))
    if isinstance(r, Envelope):
        assert r.raw == data


@settings(max_examples=400)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    r = opened(data)
    assert isinstance(r, Rejection)


@settings(max_examples=400)
@given(st.integers(0, len(VALID) - 1))
def test_fuzz_truncation(n: int) -> None:
    assert isinstance(opened(VALID[:n]), Rejection)


@settings(max_examples=400)
@given(st.integers(0, len(VALID) * 8 - 1))
def test_fuzz_bit_flips(bit: int) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)
    assert isinstance(opened(bytes(data)), Rejection)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text() | st.integers(), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400)
@given(st.lists(cbor_values, max_size=9))
def test_fuzz_wrong_types(fields: list) -> None:
    _assert_rejected_or_valid(b"\0" * SIG_LEN + cbor2.dumps(fields))


@settings(max_examples=200)
@given(st.sampled_from([0x5B, 0x7B, 0x9B, 0xBB]), st.integers(2**32, 2**64 - 1))
def test_fuzz_huge_lengths(major: int, length: int) -> None:
    # A header claiming an enormous byte string / text / array / map must not allocate or hang.
    payload = bytes([0x87, 0x01, 0x58, 0x20]) + SWARM + bytes([major]) + length.to_bytes(8, "big")
    assert isinstance(opened(b"\0" * SIG_LEN + payload), Rejection)


def test_deep_nesting() -> None:
    payload = b"\x81" * 100_000 + b"\x00"
    assert isinstance(opened(b"\0" * SIG_LEN + payload), Rejection)


def _plain_reference(value: object, depth: int = 0) -> bool:
    """The plain isinstance walk that envelope._plain answers like, faster."""
    if depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, list):
        return all(_plain_reference(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_reference(v, depth + 1) for k, v in value.items())
    return False


class _IntSub(int):
    pass


class _DictSub(dict):  # type: ignore[type-arg]
    pass


_odd = st.sampled_from(
    [cbor2.CBORTag(1, 2), frozenset({1}), (1, 2), bytearray(b"x"), _IntSub(3), 1.5, 2**70]
)
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3) | st.binary(max_size=3) | _odd,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=2) | st.integers(0, 3), inner, max_size=3)
        | st.builds(_DictSub, st.dictionaries(st.text(max_size=2), inner, max_size=2))
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_plain_answers_as_the_isinstance_walk(value: object) -> None:
    assert _plain(value) == _plain_reference(value)


def test_plain_depth_limit_matches_reference() -> None:
    for depth in range(MAX_DEPTH - 2, MAX_DEPTH + 3):
        for leaf in (1, "s", None, [], {}, cbor2.CBORTag(1, 1)):
            nested_list: object = leaf
            nested_dict: object = leaf
            for _ in range(depth):
                nested_list = [nested_list]
                nested_dict = {"k": nested_dict}
            assert _plain(nested_list) == _plain_reference(nested_list)
            assert _plain(nested_dict) == _plain_reference(nested_dict)
