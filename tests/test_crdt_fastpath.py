"""The fast paths against the reference code they stand in for.

``entry.read_entry``, ``yrs_update.decode_raw`` and ``authorize.admit`` may only ever accept what the reference
(``decode_update``, ``check_update``) accepts, with the same result; anything else they hand to
the reference. The compact ``LocationIndex`` and ``WrittenSet`` must answer as the plain
structures did. And a change the document should not have taken is undone exactly.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map
from test_crdt_support import NOW, SWARM, Sim, TablePolicy, forge, ident, policy_for

from mossnode.crypto.envelope import DOMAIN, SIG_LEN, Reason, Rejection
from mossnode.protocols.crdt import (
    Replica,
    WriteRefused,
    authorize,
    entry,
    locations,
    nest_task,
    replica,
)
from mossnode.protocols.crdt.authorize import Accepted, Admitted, check_update, references
from mossnode.protocols.crdt.document import content, state_digest
from mossnode.protocols.crdt.entry import open_signed, parse_body, read_entry
from mossnode.protocols.crdt.lib0 import DecodeError
from mossnode.protocols.crdt.locations import GONE, Container, Loc, LocationIndex, WrittenSet
from mossnode.protocols.crdt.rules import Op, judge, permits
from mossnode.protocols.crdt.yrs_update import Content, decode_raw, decode_update

A, B, C, D = (ident(i) for i in range(4))


# -- the envelope of a state entry ------------------------------------------------------------


def _reference_open(data: bytes) -> object:
    env = open_signed(data, swarm_id=SWARM, now_ms=NOW)
    return env if isinstance(env, Rejection) else parse_body(env)


def _signed(payload: bytes, who: Any = None) -> bytes:
    """``payload`` signed by ``who`` (A) under the type it names, so only its structure is odd."""
    try:
        kind = cbor2.loads(payload)[2]
    except Exception:
        kind = "state.update"
    kind = kind if isinstance(kind, str) else "state.update"
    return (who or A).sign(DOMAIN + kind.encode() + b"\0" + payload) + payload


def _odd_entries() -> list[bytes]:
    """Valid entries, then the same fields with one thing wrong each (re-signed)."""
    rep = Replica(A, SWARM, policy_for([A, B]))
    valid = [e.data for e in (rep.create_task(f"t{i}", NOW, title="x")[1] for i in range(2))]
    assert all(valid)
    fields = cbor2.loads(valid[1][SIG_LEN:])
    body = fields[6]
    odd: list[list[Any]] = []
    for i, value in [
        (0, True), (0, 2), (1, b"\x00" * 32), (1, "swarm"), (2, "state.other"), (2, 7),
        (3, b"\x01" * 31), (3, "key"), (4, 0), (4, True), (4, 2**70), (5, 1.5), (5, 2**63),
        (5, -(2**63)), (6, []), (6, {**body, "x": 1}), (6, {k: v for k, v in body.items() if k != "h"}),
    ]:  # fmt: skip
        changed = list(fields)
        changed[i] = value
        odd.append(changed)
    for key, value in [
        ("u", "text"), ("u", bytearray(b"x")), ("d", [[2, 1], [1, 1]]), ("d", [[1, 0]]),
        ("d", [[1, 1, 1]]), ("d", [[True, 1]]), ("d", [[-1, 1]]), ("d", [[2**64, 1]]),
        ("d", {}), ("p", -1), ("p", True), ("p", 1.0), ("h", b""), ("h", "x" * 32),
        ("d", [[1, 2**64]]),
    ]:  # fmt: skip
        changed = list(fields)
        changed[6] = {**body, key: value}
        odd.append(changed)
    out = list(valid)
    for f in odd:
        try:
            out.append(_signed(cbor2.dumps(f)))
        except Exception:  # a value cbor2 will not encode
            continue
    out.append(valid[0][:SIG_LEN] + valid[1][SIG_LEN:])  # a signature of another entry
    out.append(_signed(valid[0][SIG_LEN:], B))  # signed by someone else than the sender
    return out


_ODD = _odd_entries()


def test_read_entry_agrees_with_the_envelope_and_body_checks() -> None:
    fast = 0
    for data in _ODD:
        got = read_entry(data, swarm_id=SWARM, now_ms=NOW)
        if got is not None:
            fast += 1
            assert got == _reference_open(data)
    assert fast >= 4  # the valid ones, and the bad signatures, take the fast way


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(_ODD) - 1), sign=st.booleans())
def test_read_entry_agrees_on_mutated_entries(seed: int, which: int, sign: bool) -> None:
    rng = random.Random(seed)
    data = _ODD[which]
    data = _signed(_mutate(rng, data[SIG_LEN:])) if sign else _mutate(rng, data)
    got = read_entry(data, swarm_id=SWARM, now_ms=NOW)
    assert got is None or got == _reference_open(data)


def _payloads() -> list[bytes]:
    """Payloads in the canonical layout, with the encodings it must tell apart."""
    out = [data[SIG_LEN:] for data in _ODD]
    rep = Replica(A, SWARM, policy_for([A, B]))
    out += [
        e.data[SIG_LEN:]
        for e in (rep.create_task(f"u{i}", NOW, title="x")[1] for i in range(3))
        if e
    ]
    fields = cbor2.loads(out[0])
    body = fields[6]
    for i, value in [
        (4, 23),
        (4, 24),
        (4, 255),
        (4, 256),
        (4, 2**32),
        (4, 2**64 - 1),
        (5, 0),
        (5, 2**64 - 1),
    ]:
        changed = list(fields)
        changed[i] = value
        out.append(cbor2.dumps(changed, canonical=True))
    for key, value in [
        ("d", []), ("d", [[c, 1] for c in range(30)]), ("d", [[2**64 - 1, 2**64 - 1]]), ("p", 2**40),
        ("u", b""), ("u", b"x" * 23), ("u", b"x" * 24), ("u", b"x" * 300), ("u", b"x" * 70000),
        ("h", b"\x01" * 32), ("h", b"\x01" * 31),
    ]:  # fmt: skip
        changed = list(fields)
        changed[6] = {**body, key: value}
        out.append(cbor2.dumps(changed, canonical=True))
    return out


_PAYLOADS = _payloads()


def test_canonical_reading_agrees_with_cbor2() -> None:
    canonical = 0
    for payload in _PAYLOADS:
        got = entry._read_canonical(payload, SWARM)
        if got is not None:
            canonical += 1
            assert got == entry._read_cbor(payload, SWARM)
    assert canonical >= 20
    rep = Replica(B, SWARM, policy_for([A, B]))
    for i in range(3):  # the layout every node writes takes it
        written = rep.create_task(f"w{i}", NOW, title="x")[1]
        assert written is not None
        assert entry._read_canonical(written.data[SIG_LEN:], SWARM) is not None


@settings(max_examples=500, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(_PAYLOADS) - 1))
def test_canonical_reading_agrees_on_mutated_payloads(seed: int, which: int) -> None:
    payload = _mutate(random.Random(seed), _PAYLOADS[which])
    got = entry._read_canonical(payload, SWARM)
    assert got is None or got == entry._read_cbor(payload, SWARM)
    signed = _signed(payload)
    fast = read_entry(signed, swarm_id=SWARM, now_ms=NOW)
    assert fast is None or fast == _reference_open(signed)


# -- the decoder ------------------------------------------------------------------------------


def _corpus() -> list[bytes]:
    ups: list[bytes] = []
    doc: Doc[Any] = Doc(client_id=2**52 + 12345)
    root = doc.get("tasks", type=Map)
    doc.get("history", type=Map)
    doc.observe(lambda ev: ups.append(ev.update))
    with doc.transaction():
        root["t"] = Map(
            {
                "title": "x",
                "claims": Map(),
                "log": Array([1, 2]),
                "b": b"\x00",
                "f": 2.5,
                "i": -7,
                "big": 2**40,
                "n": None,
                "yes": True,
                "u": "ünï" * 60,
                "d": {"a": [1, {"b": None}], "e": []},
            }
        )
    root["t"]["claims"]["n"] = {"deep": [1, None, True, 2.5, "s", {"k": -7}]}
    root["t"]["log"].append(3)
    with doc.transaction():
        root["t"]["title"] = "y"
        root["t"]["title"] = "z"
    del root["t"]["claims"]["n"]
    other: Doc[Any] = Doc(client_id=77)
    other.get("tasks", type=Map)
    other.get("history", type=Map)
    other.apply_update(doc.get_update())
    more: list[bytes] = []
    other.observe(lambda ev: more.append(ev.update))
    other["tasks"]["t"]["log"].append("from 77" * 30)
    other["tasks"]["t"]["claims"]["x"] = "y"
    other["history"]["h"] = Array(["a"] * 200)
    del other["tasks"]["t"]
    return [*ups, *more, doc.get_update(), other.get_update()]


CORPUS = _corpus()


def _decoded(fn: Any, data: bytes) -> tuple[Any, ...]:
    try:
        u = fn(data)
    except DecodeError as exc:
        return ("error", str(exc))
    return (
        "ok",
        [tuple(i) for i in u.items],
        list(u.deletes),
        # what the replica derives from it: what it refers to, per possible author
        [references(u, c) for c in (0, 77, 2**52 + 12345)],
        sorted({i.client if hasattr(i, "client") else i[0] for i in u.items}),
    )


def _mutate(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "byte", "cut", "insert"])
        pos = rng.randrange(max(len(raw), 1))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte" and raw:
            raw[pos] = rng.randrange(256)
        elif kind == "cut":
            del raw[pos : pos + rng.randint(1, 8)]
        else:
            raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    return bytes(raw)


def test_decoder_agrees_on_valid_updates() -> None:
    for data in CORPUS:
        for client in (0, 77, 2**52 + 12345):
            assert _decoded(lambda d, c=client: decode_raw(d, client=c), data) == _decoded(
                decode_update, data
            )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(CORPUS) - 1))
def test_decoder_agrees_on_mutated_updates(seed: int, which: int) -> None:
    rng = random.Random(seed)
    data = _mutate(rng, CORPUS[which])
    expected = _decoded(decode_update, data)
    for client in (0, 77, 2**52 + 12345):
        assert _decoded(lambda d, c=client: decode_raw(d, client=c), data) == expected


_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.integers(-(2**40), 2**40),
    st.text(max_size=140),  # past 127 bytes a length takes two bytes
    st.text(alphabet=st.characters(max_codepoint=127), max_size=130),
    st.binary(max_size=6),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=130), inner, max_size=18)
    ),
    max_leaves=24,
)


def _update_holding(value: Any) -> bytes:
    doc: Doc[Any] = Doc(client_id=77)
    root = doc.get("tasks", type=Map)
    ups: list[bytes] = []
    doc.observe(lambda ev: ups.append(ev.update))
    root["v"] = value
    return ups[-1]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=_VALUES, seed=st.integers(0, 2**32 - 1))
def test_decoder_agrees_on_any_values(value: Any, seed: int) -> None:
    """Values the walk skips (and the regex of simple values in it), valid and mutated."""
    data = _update_holding(value)
    for candidate in (data, _mutate(random.Random(seed), data)):
        expected = _decoded(decode_update, candidate)
        assert _decoded(lambda d: decode_raw(d, client=77), candidate) == expected
    assert _decoded(decode_update, data)[0] == "ok"


@pytest.mark.parametrize("pairs", [1, 2, 12, 16, 17])
def test_decoder_agrees_on_one_object_every_byte_changed(pairs: int) -> None:
    """The one-object shortcut of ContentAny (a task's core, a lease): every byte of the
    update replaced, cut short or followed by a byte, with simple and non-simple values."""
    for tail in ("s", 1.5, [1], {"k": None}, "\u00e9"):
        value = {f"k{i}": (tail if i == pairs - 1 else i) for i in range(pairs)}
        data = _update_holding(value)
        candidates = [data[:n] for n in range(len(data))] + [data + b"\x00"]
        for pos in range(len(data)):
            for byte in (0x00, 0x01, 0x10, 0x11, 0x75, 0x76, 0x77, 0x7F, 0x80, 0xFF):
                candidates.append(data[:pos] + bytes([byte]) + data[pos + 1 :])
        for candidate in candidates:
            expected = _decoded(decode_update, candidate)
            assert _decoded(lambda d: decode_raw(d, client=77), candidate) == expected


@pytest.mark.parametrize("depth", [30, 31, 32, 33, 34])
def test_decoder_agrees_on_deep_values(depth: int) -> None:
    """The depth limit with simple values (and empty containers) at the bottom."""
    for leaf in ("s", None, 1.5, [], {}, {"k": "v"}):
        value: Any = leaf
        for i in range(depth):
            value = [value] if i % 2 else {"k": value}
        data = _update_holding(value)
        assert _decoded(lambda d: decode_raw(d, client=77), data) == _decoded(decode_update, data)


# -- authorization ----------------------------------------------------------------------------


class Differential:
    """Wraps ``admit`` in the replica: every call also runs the reference and compares."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, update: Any, **kw: Any) -> Accepted | None:
        fast = authorize.admit(update, **kw)
        kw.pop("may", None)
        ref = check_update(update.as_update(), **kw)
        if fast is None:
            self.counts["reference accepts" if isinstance(ref, Admitted) else "refused"] += 1
            return None
        assert isinstance(ref, Admitted), ref
        assert [(s, e, LocationIndex.loc(p)) for s, e, p in fast.spans] == list(ref.runs)
        once = [(*container, key) for container, key in fast.once]
        assert len(once) == len(set(once)) and set(once) == set(ref.once_paths)
        assert fast.end_clock == ref.end_clock
        # the second line takes a write observed at one of these paths as allowed: the rows
        # must say so too
        for path in fast.paths():
            assert (
                judge(kw["author"], path, Op.WRITE, None, kw["policy"], kw["policy_seq"])[1] is None
            )
        assert fast.paths() == {loc.path for _, _, loc in ref.runs if not loc.gone}
        self.counts["fast accepts"] += 1
        return fast


@pytest.fixture
def differential(monkeypatch: pytest.MonkeyPatch) -> Differential:
    diff = Differential()
    monkeypatch.setattr(replica, "admit", diff)
    return diff


def test_random_histories_admit_as_the_reference(differential: Differential) -> None:
    sim = Sim(4, seed=7, drop=0.3, dup=0.1, byzantine=True)
    sim.run(500, partition_every=60)
    sim.anti_entropy(max_entries=20)
    assert differential.counts["fast accepts"] > 500
    # every honest write takes the fast path; the reference only sees refusals
    assert differential.counts["reference accepts"] == 0, differential.counts


def _history() -> tuple[TablePolicy, list[bytes], Replica, str]:
    policy = policy_for([A, B, C, D])
    ra, rb = Replica(A, SWARM, policy), Replica(B, SWARM, policy)
    tid, e1 = ra.create_task("job", NOW, title="build")
    assert e1 is not None
    rb.receive(e1.data, NOW)
    entries = [e1.data]
    for step in range(3):
        _, e = rb.write(lambda w, s=step: w.claim(tid, {"n": s}), NOW)
        assert e is not None
        entries.append(e.data)
        _, e = rb.write(lambda w, s=step: w.append_log(tid, s), NOW)
        assert e is not None
        entries.append(e.data)
    _, e = rb.write(lambda w: w.put_agent("g", {"caps": ["x"]}), NOW)
    assert e is not None
    entries.append(e.data)
    return policy, entries, rb, tid


def _updates_of(rep: Replica, tid: str) -> list[bytes]:
    def capture(fn: Any) -> bytes:
        doc: Doc[Any] = Doc(client_id=replica.client_id_for(D.public_key))
        for name in ("tasks", "agents", "history"):
            doc.get(name, type=Map)
        doc.apply_update(rep.doc.get_update())
        got: list[bytes] = []
        doc.observe(lambda ev: got.append(ev.update))
        with doc.transaction():
            fn(doc)
        return got[-1]

    d = D.peer_id
    return [
        capture(lambda doc: doc["tasks"][tid].__setitem__(f"claims/{d}", {"x": 1})),
        capture(lambda doc: doc["tasks"][tid].__setitem__(f"claims/{B.peer_id}", 1)),
        capture(lambda doc: doc["tasks"][tid].__delitem__(f"claims/{B.peer_id}")),
        capture(lambda doc: doc["tasks"][tid].__setitem__(f"log/{d}", Array([1]))),
        capture(lambda doc: doc["tasks"][tid][f"log/{B.peer_id}"].append(9)),
        capture(lambda doc: doc["history"].__setitem__(d, Array([1, "a"]))),
        capture(lambda doc: doc["agents"].__setitem__(d, Map({"g": Map({"c": [1]})}))),
        capture(lambda doc: doc["tasks"].__setitem__(f"{d}:own", Map({"title": "t"}))),
        capture(lambda doc: doc["tasks"].__delitem__(tid)),
    ]


_POLICY, _ENTRIES, _RB, _TID = _history()
_UPDATES = _updates_of(_RB, _TID)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(_UPDATES) - 1))
def test_mutated_updates_admit_as_the_reference(seed: int, which: int) -> None:
    diff = Differential()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replica, "admit", diff)
        rng = random.Random(seed)
        data = _UPDATES[which] if seed % 5 == 0 else _mutate(rng, _UPDATES[which])
        rep = Replica(C, SWARM, _POLICY)
        rep.receive_batch(_ENTRIES, NOW)
        before = rep.digest()
        out = rep.receive(forge(rep, D, update=data), NOW)
        if not out.applied:
            assert rep.digest() == before


def _own_deletions() -> list[Any]:
    """Changes by B that delete B's own earlier items: allowed (a claim, an agent, a claim
    replaced) and forbidden (log elements, one and several, which nobody may delete)."""
    tid, b = _TID, B.peer_id

    def log(d: Doc[Any]) -> Any:
        return d["tasks"][tid][f"log/{b}"]

    return [
        lambda d: d["tasks"][tid].__delitem__(f"claims/{b}"),
        lambda d: d["tasks"][tid].__setitem__(f"claims/{b}", {"n": 9}),
        lambda d: log(d).__delitem__(0),
        lambda d: log(d).__delitem__(slice(0, 2)),
        lambda d: d["agents"].__delitem__(b),
        lambda d: (log(d).append(7), d["tasks"][tid].__delitem__(f"claims/{b}")),
    ]


@pytest.mark.parametrize("which", range(len(_own_deletions())))
@pytest.mark.parametrize("grants", [None, {"task.create"}])
def test_deleting_own_items_admits_as_the_reference(which: int, grants: set[str] | None) -> None:
    """Deletions of the author's own earlier items (the fast path looks one item up directly):
    the fast path accepts exactly what the reference accepts, with the same result, and a
    refused deletion leaves the document as it was."""
    diff = Differential()
    policy = policy_for([A, B, C, D])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replica, "admit", diff)
        rep = Replica(C, SWARM, policy)
        rep.receive_batch(_ENTRIES, NOW)
        assert rep.vector()[B.peer_id] == len(_ENTRIES) - 1
        policy.grants[B.peer_id] = grants  # without task.claim, B may not delete its claim
        before = rep.digest()
        out = rep.receive(forge(rep, B, _own_deletions()[which]), NOW)
    forbidden = which in (2, 3) or (grants is not None and which in (0, 1, 5))
    assert bool(out.refused) == forbidden, out.refused
    if forbidden:
        assert rep.digest() == before and B.peer_id in rep.blocked_authors()
    else:
        assert out.applied and diff.counts["fast accepts"] >= 1


# -- a batch decides as single entries do ------------------------------------------------------


def _plan_entries(plan: list[tuple[int, int, int]]) -> tuple[TablePolicy, list[bytes]]:
    """Entries of four authors with different grants, built in order on one replica: task
    creations, claims, deletions and core writes, on their own tasks or others'. An author
    whose entry that replica refuses writes nothing more (it is blocked)."""
    who = [A, B, C, D]
    policy = policy_for(who)
    policy.grants[B.peer_id] = {"task.claim"}  # may claim, may not create
    policy.grants[C.peer_id] = {"task.create"}  # may create, may not delete or claim
    builder = Replica(ident(9), SWARM, policy)
    entries: list[bytes] = []
    tids: list[str] = []
    for step, (a, action, target) in enumerate(plan):
        author = who[a]
        if author.peer_id in builder.blocked_authors():
            continue
        tid = tids[target % len(tids)] if tids else None
        if action == 0 or tid is None:
            tid = f"{author.peer_id}:t{step}"
            tids.append(tid)

            def fn(d: Doc[Any], tid: str = tid) -> None:
                d["tasks"][tid] = Map({"core": {"title": "t"}})
        elif action == 1:

            def fn(d: Doc[Any], tid: str = tid, p: str = author.peer_id, n: int = step) -> None:
                if tid in d["tasks"]:
                    d["tasks"][tid][f"claims/{p}"] = {"n": n}
        elif action == 2:

            def fn(d: Doc[Any], tid: str = tid) -> None:
                if tid in d["tasks"]:
                    del d["tasks"][tid]
        else:

            def fn(d: Doc[Any], tid: str = tid) -> None:
                if tid in d["tasks"]:
                    d["tasks"][tid]["core"] = {"title": "mine"}

        try:
            data = forge(builder, author, fn)
        except IndexError:  # nothing changed: no update to sign
            continue
        builder.receive(data, NOW)
        entries.append(data)
    return policy, entries


def _verdicts(rep: Replica, outs: list[Any]) -> tuple[Any, ...]:
    applied = [(e.author, e.seq) for o in outs for e in o.applied]
    refused = [(r.author, r.seq, r.rejection.reason) for o in outs for r in o.refused]
    return applied, refused, rep.vector(), rep.digest(), dict(rep.rejections), rep.blocked_seqs()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 20)), max_size=30),
    split=st.integers(1, 8),
)
def test_a_batch_decides_as_its_entries_one_by_one(
    plan: list[tuple[int, int, int]], split: int
) -> None:
    """Per-batch work (policy answers shared by a batch) never changes a verdict: the same
    entries in one batch, one by one, or in batches of ``split`` give the same applied entries,
    the same refusals (counted alike) and the same document."""
    policy, entries = _plan_entries(plan)
    one = Replica(C, SWARM, policy)
    by_one = _verdicts(one, [one.receive(e, NOW) for e in entries])
    whole = Replica(C, SWARM, policy)
    assert _verdicts(whole, [whole.receive_batch(entries, NOW)]) == by_one
    parts = Replica(C, SWARM, policy)
    outs = [parts.receive_batch(entries[i : i + split], NOW) for i in range(0, len(entries), split)]
    assert _verdicts(parts, outs) == by_one


def _stuck_entry() -> bytes:
    """A valid entry of a fifth author's seq 2, whose seq 1 never comes: held pending for good,
    it keeps a receiver on the general path (hold, then apply the author's chain or drain)."""
    e = ident(8)
    rep = Replica(e, SWARM, policy_for([e]))
    rep.create_task("first", NOW, title="a")
    _, second = rep.create_task("second", NOW, title="b")
    assert second is not None and second.seq == 2
    return second.data


_STUCK = _stuck_entry()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 20)), max_size=30),
    seed=st.integers(0, 2**32 - 1),
    split=st.integers(1, 8),
)
def test_applying_at_once_decides_as_holding_first(
    plan: list[tuple[int, int, int]], seed: int, split: int
) -> None:
    """An entry that is its author's next and ready while nothing waits is applied at once
    (Replica._accept) instead of held and then applied: the same applied entries in the same
    order, the same refusals, the same document. Entries arrive shuffled, repeated, mixed with
    garbage and other authors' forbidden writes and deletions; the reference replica is kept
    on the general path by an entry that waits for good."""
    policy, entries = _plan_entries(plan)
    rng = random.Random(seed)
    stream = entries + rng.sample(entries, min(3, len(entries))) + [b"garbage", b"\x00" * 80]
    if seed % 2:
        rng.shuffle(stream)
    batches = [stream[i : i + split] for i in range(0, len(stream), split)]
    fast = Replica(C, SWARM, policy)
    general = Replica(C, SWARM, policy)
    assert not general.receive(_STUCK, NOW).applied
    outs = [fast.receive_batch(b, NOW) for b in batches] + [fast.drain(NOW)]
    refs = [general.receive_batch(b, NOW) for b in batches] + [general.drain(NOW)]
    assert _verdicts(fast, outs) == _verdicts(general, refs)
    assert [o.changed for o in outs] == [o.changed for o in refs]


# -- the index and the write-once set ---------------------------------------------------------


class PlainIndex:
    """The index as it was: one Loc per run in Python lists."""

    def __init__(self) -> None:
        self.runs: dict[int, tuple[list[int], list[int], list[Loc]]] = {}

    def add(self, client: int, start: int, end: int, loc: Loc) -> None:
        s, e, locs = self.runs.setdefault(client, ([], [], []))
        s.append(start)
        e.append(end)
        locs.append(loc)

    def lookup(self, client: int, clock: int) -> Loc | None:
        if client not in self.runs:
            return None
        s, e, locs = self.runs[client]
        i = bisect.bisect_right(s, clock) - 1
        return locs[i] if i >= 0 and clock < e[i] else None

    def overlapping(self, client: int, lo: int, hi: int) -> Iterator[Loc]:
        if client not in self.runs or hi <= lo:
            return
        s, e, locs = self.runs[client]
        i = max(bisect.bisect_right(s, lo) - 1, 0)
        while i < len(s) and s[i] < hi:
            if e[i] > lo:
                yield locs[i]
            i += 1


def test_compact_index_answers_as_the_plain_one() -> None:
    rng = random.Random(3)
    plain, compact, chunked = PlainIndex(), LocationIndex(), LocationIndex()
    pending: dict[int, list[tuple[int, int, Loc]]] = {}
    parents: list[tuple[tuple[str | None, ...], tuple[int, int] | None]] = [(("tasks",), None)]
    clocks = dict.fromkeys((1, 2, 2**52 + 1), 0)
    where, kind = parents[0], Content.VALUE
    for _ in range(3000):
        client = rng.choice(list(clocks))
        start = clocks[client]
        end = start + rng.choice([1, 1, 1, 2, 4])
        clocks[client] = end
        roll = rng.random()
        if roll < 0.1:
            loc = GONE
        else:
            if rng.random() < 0.4:  # neighbours alike, so that rows merge
                where = rng.choice(parents)
                kind = rng.choice([Content.MAP, Content.ARRAY, Content.VALUE, Content.DELETED])
            container, parent = where
            key = None if container[-1] == "log" else rng.choice(["a", "b", "log", "é", "x" * 70])
            loc = Loc(container, key, kind, parent)
            if kind in (Content.MAP, Content.ARRAY):
                parents.append(((*container, key), (client, start)))
        plain.add(client, start, end, loc)
        compact.add(client, start, end, loc)
        pending.setdefault(client, []).append((start, end, loc))
        if rng.random() < 0.1:  # whole updates' worth at once, as the replica adds them
            for c, rows in pending.items():
                chunked.add_spans(c, [(s, e, chunked.place_of(loc)) for s, e, loc in rows])
            pending.clear()
    for c, rows in pending.items():
        chunked.add_spans(c, [(s, e, chunked.place_of(loc)) for s, e, loc in rows])
    again = LocationIndex.load(chunked.dump())
    for client, top in [*clocks.items(), (5, 10)]:
        for clock in range(0, top + 3):
            assert compact.lookup((client, clock)) == plain.lookup(client, clock)
            assert chunked.lookup((client, clock)) == plain.lookup(client, clock)
            assert again.lookup((client, clock)) == plain.lookup(client, clock)
        for _ in range(50):
            lo = rng.randrange(top + 2)
            hi = lo + rng.randrange(8)
            # rows of one key are merged: alike neighbours come once (judged alike anyway)
            expected = _distinct(plain.overlapping(client, lo, hi))
            assert _distinct(compact.overlapping(client, lo, hi)) == expected
            assert _distinct(again.overlapping(client, lo, hi)) == expected
    rows = sum(len(starts) for starts, _, _ in plain.runs.values())
    assert len(chunked) < rows and len(compact) < rows


@settings(max_examples=200, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_index_rows_of_the_common_case_are_the_general_rows(seed: int) -> None:
    """``add_spans`` writes each span as a row of its own when no two neighbours could share
    one: the same rows, tables and answers as the general (merging) way."""

    def build(general: bool) -> LocationIndex:
        rng = random.Random(seed)
        index = LocationIndex()
        conts = [index.root("tasks"), index.root("history")]
        clocks = dict.fromkeys((1, 2), 0)
        for _ in range(rng.randint(1, 40)):
            client = rng.choice([1, 2])
            spans = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.3:
                    parent = (client, rng.randrange(50))
                    conts.append(index.container(parent, ("tasks", f"t{parent[1] % 7}")))
                cont, kind = rng.choice(conts), rng.choice(list(Content)[:5])
                if kind is Content.GC:
                    cont = index.gone
                key = None if kind is Content.GC else rng.choice(["a", "b", None])
                start = clocks[client] + rng.choice([0, 0, 0, 1])
                clocks[client] = end = start + rng.choice([1, 1, 2])
                spans.append((start, end, (cont, key, kind)))
            if general:
                runs = index._clients.setdefault(client, locations._Runs())
                index._add_merging(runs, spans)
            else:
                index.add_spans(client, spans)
        return index

    fast, general = build(False), build(True)
    assert fast.dump() == general.dump()


def _distinct(locs: Iterator[Loc]) -> list[Loc]:
    return [loc for loc, _ in itertools.groupby(locs)]


def test_index_loads_the_older_snapshot_form() -> None:
    old = {
        "paths": [["tasks"], ["tasks", "t", "log", "n"], []],
        "clients": [
            [7, [[0, 1, 0, "t", "map", None], [1, 4, 1, None, "value", [7, 0]]]],
            [9, [[0, 2, 2, None, "gc", None]]],
        ],
    }
    index = LocationIndex.load(old)
    assert index.lookup((7, 0)) == Loc(("tasks",), "t", Content.MAP, None)
    assert index.lookup((7, 3)) == Loc(("tasks", "t", "log", "n"), None, Content.VALUE, (7, 0))
    assert index.lookup((9, 1)) == GONE


def test_written_set_is_a_set_of_paths() -> None:
    rng = random.Random(4)
    ws, plain = WrittenSet(), set()
    segs = ["tasks", "t1", "t2", "claims", "log/n", "history", "n", None, "title"]
    for _ in range(2000):
        path = tuple(rng.choice(segs) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:
            ws.add(path)
            plain.add(path)
        assert (path in ws) == (path in plain)
        assert ws.has_child(path[:-1], path[-1]) == (path in plain)
    assert set(ws) == plain and len(ws) == len(plain)
    again = WrittenSet.load(ws.dump())
    assert set(again) == plain
    assert set(WrittenSet.load([list(p) for p in plain])) == plain


def test_written_set_add_children_adds_each_child() -> None:
    rng = random.Random(5)
    segs = ["tasks", "t1", "t2", "claims", "log", "history", "n", None, "title"]
    for _ in range(200):
        children = [
            (tuple(rng.choice(segs) for _ in range(rng.randint(1, 3))), rng.choice(segs))
            for _ in range(rng.randint(0, 6))
        ]
        one, many = WrittenSet(), WrittenSet()
        for container, key in children:
            one.add_child(container, key)
        many.add_children(children)
        assert set(many) == set(one) == {(*c, k) for c, k in children}


# -- putting the document back ----------------------------------------------------------------


def test_a_change_the_second_line_refuses_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the observed changes ever refuse what the structural check admitted (a decoder
    gap), the update was already applied: the document is put back exactly."""
    policy, entries, _, _ = _history()
    rep = Replica(C, SWARM, policy)
    rep.receive_batch(entries[:4], NOW)
    before, vector = rep.digest(), rep.vector()
    real = replica.check_events
    monkeypatch.setattr(
        replica,
        "check_events",
        lambda *a: authorize.Rejection(Reason.FORBIDDEN, "observed: test"),
    )
    # the changes are all writes the structural pass admitted: let them reach check_events
    monkeypatch.setattr(authorize.Accepted, "covers", lambda self, changes: False)
    out = rep.receive(entries[4], NOW)
    assert [r.rejection.detail for r in out.refused] == ["observed: test"]
    assert rep.digest() == before and rep.vector() == vector
    monkeypatch.setattr(replica, "check_events", real)
    # the replica goes on from the restored document
    _, mine = rep.write(lambda w: w.append_history("after"), NOW)
    assert mine is not None and rep.content()["history"][C.peer_id] == ["after"]


def test_restore_after_many_updates_and_a_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica, "LAG_BYTES", 300)  # save the state often
    policy = policy_for([A, B, C])
    ra = Replica(A, SWARM, policy)
    for i in range(40):
        ra.create_task(f"t{i}", NOW, title=f"task {i}")
        if i == 20:
            ra.snapshot()
    before = ra.digest()
    with pytest.raises(WriteRefused):
        ra.write(lambda w: w._task(f"{A.peer_id}:t3").__setitem__(f"claims/{B.peer_id}", 1), NOW)
    assert ra.digest() == before
    with pytest.raises(ZeroDivisionError):
        ra.write(lambda w: (w.append_history("x"), 1 / 0), NOW)
    assert ra.digest() == before
    fresh = Replica(B, SWARM, policy)
    fresh.receive_batch([e.data for e in ra.entries()], NOW)
    assert fresh.digest() == before


# -- the digest -------------------------------------------------------------------------------


def test_kept_digest_is_the_digest_of_the_content() -> None:
    sim = Sim(3, seed=11, drop=0.2, byzantine=True)
    checked = 0
    for step in range(40):
        sim.run(10, partition_every=7)
        for rep in sim.reps:
            assert rep.digest() == state_digest(rep.doc), step
            assert rep.content() == content(rep.doc)
            for tid in rep.doc["tasks"]:
                assert rep.task(tid) == nest_task(content(rep.doc)["tasks"][tid])
            checked += 1
    sim.anti_entropy()
    for rep in sim.reps:
        assert rep.digest() == state_digest(rep.doc)
    big = Replica(A, SWARM, policy_for([A]))
    for i in range(30):
        big.create_task(f"t{i}", NOW, title="x" * i, spec={"b": b"\x00\x01", "n": [1.5, None]})
        big.write(lambda w, i=i: w.append_history({"i": i}), NOW)
    assert big.digest() == state_digest(big.doc)
    assert checked == 120


def _as_version_1(snapshot: bytes) -> bytes:
    """A snapshot in the form written before the compact index (version 1)."""
    data = cbor2.loads(snapshot)
    index = LocationIndex.load(data["index"])
    paths: dict[tuple[str | None, ...], int] = {}
    clients = []
    for client in sorted(index._clients):
        rows = []
        top = index.end(client)
        clock = 0
        while clock < top:
            loc = index.lookup((client, clock))
            assert loc is not None
            pid = paths.setdefault(loc.container, len(paths))
            parent = list(loc.parent) if loc.parent else None
            rows.append([clock, clock + 1, pid, loc.key, loc.content.value, parent])
            clock += 1
        clients.append([client, rows])
    data["index"] = {"paths": [list(p) for p in paths], "clients": clients}
    data["written"] = [list(p) for p in sorted(WrittenSet.load(data["written"]), key=repr)]
    data["v"] = 1
    return cbor2.dumps(data, canonical=True)


def test_version_1_snapshots_still_restore() -> None:
    sim = Sim(3, seed=8, drop=0.0, dup=0.0)
    sim.run(60)
    node = sim.reps[0]
    old = _as_version_1(node.snapshot())
    entries = [(e.author, e.seq, e.data) for e in node.entries()]
    again, out = Replica.restore(
        ident(0), SWARM, sim.policy, snapshot=old, entries=entries, now_ms=NOW
    )
    assert not out.refused and again.digest() == node.digest()
    assert again.vector() == node.vector()
    # and it judges the next entries exactly as the original does
    sim.run(40)
    tail = [e.data for e in node.entries(len(entries))]
    out = again.receive_batch(tail, NOW)
    assert again.digest() == node.digest() and not out.refused


_SEGMENTS = [
    "tasks",
    "agents",
    "history",
    "claims",
    "log",
    "title",
    "bids",
    "x",
    None,
    A.peer_id,
    B.peer_id,
    f"{A.peer_id}:t1",
    f"{B.peer_id}:t2",
    f"{A.peer_id}:",
    "**",
    "{node}",
    "core",
    f"claims/{A.peer_id}",
    f"bids/{B.peer_id}",
    f"log/{B.peer_id}",
    f"reviews/{A.peer_id}/x",
    "claims/",
    f"nope/{A.peer_id}",
]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    path=st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=6),
    op=st.sampled_from(list(Op)),
    author=st.sampled_from([A.peer_id, B.peer_id]),
    content=st.sampled_from([None, *Content]),
    grants=st.sampled_from([None, set(), {"task.create"}, {"task.claim", "task.review"}]),
)
def test_fast_rule_lookup_allows_only_what_judge_allows(
    path: list[str | None], op: Op, author: str, content: Content | None, grants: Any
) -> None:
    policy = TablePolicy(members={A.peer_id, B.peer_id}, grants={author: grants})
    p = tuple(path)
    fast = permits(author, p, op, content, policy, 0, {})
    assert fast == (judge(author, p, op, content, policy, 0)[1] is None)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    path=st.lists(st.sampled_from(_SEGMENTS), min_size=2, max_size=6),
    op=st.sampled_from(list(Op)),
    author=st.sampled_from([A.peer_id, B.peer_id]),
    content=st.sampled_from(list(Content)),
    grants=st.sampled_from([None, set(), {"task.create"}, {"task.claim", "task.review"}]),
)
def test_container_rule_lookup_allows_only_what_judge_allows(
    path: list[str | None], op: Op, author: str, content: Content, grants: Any
) -> None:
    policy = TablePolicy(members={A.peer_id, B.peer_id}, grants={author: grants})
    index = LocationIndex()
    container = index.container((1, 0), tuple(path[:-1]))
    kind = content if op is Op.WRITE else None
    rule = authorize._allowed(author, policy, 0, {}, container, path[-1], op, kind)
    expected = judge(author, tuple(path), op, content if op is Op.WRITE else None, policy, 0)
    assert (rule is not None) == (expected[1] is None)
    if rule is not None:
        assert rule is expected[0]


def test_covers_is_membership_in_paths() -> None:
    """``Accepted.covers`` (the replica's shortcut past check_events) answers exactly
    "every change is a write at one of ``paths()``", on random spans and changes."""
    rng = random.Random(7)
    roots = [Container(("tasks",), None), Container(("history",), None)]
    nested = [Container(("tasks", "a:t"), (1, 0)), Container(("tasks", "b:t"), (1, 1))]
    keys: list[str | None] = ["a:t", "b:t", "core", "claims/x", None]
    kinds = [Content.MAP, Content.VALUE, Content.GC, Content.ARRAY]
    for _ in range(3000):
        spans = [
            (i, i + 1, (rng.choice(roots + nested), rng.choice(keys), rng.choice(kinds)))
            for i in range(rng.randint(0, 3))
        ]
        verdict = Accepted(spans, [], len(spans))
        changes = [
            (
                (*rng.choice(roots + nested).path, rng.choice(keys)),
                rng.choice([Op.WRITE, Op.WRITE, Op.DELETE]),
            )
            for _ in range(rng.randint(0, 3))
        ]
        paths = verdict.paths()
        expected = all(op is Op.WRITE and path in paths for path, op in changes)
        assert verdict.covers(changes) == expected
