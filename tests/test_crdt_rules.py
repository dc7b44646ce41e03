"""The owner table, the Yrs update decoder and the helpers it rests on."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map
from test_crdt_support import TablePolicy, ident

from mossnode.protocols.crdt import client_id_for, task_creator, task_id
from mossnode.protocols.crdt.lib0 import DecodeError, Reader
from mossnode.protocols.crdt.locations import Loc, LocationIndex
from mossnode.protocols.crdt.rules import RULES, Op, find_rule, judge
from mossnode.protocols.crdt.yrs_update import Content, decode_state_vector, decode_update

A, B = ident(0).peer_id, ident(1).peer_id
T = task_id(A, "t1")
EVERYTHING = TablePolicy(members={A, B})


@pytest.mark.parametrize(
    ("path", "op", "author", "allowed"),
    [
        (("tasks", T), Op.WRITE, A, True),
        (("tasks", T), Op.WRITE, B, False),
        (("tasks", T), Op.DELETE, A, True),
        (("tasks", T, "core"), Op.WRITE, A, True),
        (("tasks", T, "core"), Op.WRITE, B, False),
        (("tasks", T, "core"), Op.DELETE, A, True),
        (("tasks", T, "title"), Op.WRITE, A, False),
        (("tasks", T, "nonsense"), Op.WRITE, A, False),
        (("tasks", T, "claims"), Op.WRITE, A, False),
        (("tasks", T, f"claims/{B}"), Op.WRITE, B, True),
        (("tasks", T, f"claims/{B}"), Op.DELETE, B, True),
        (("tasks", T, f"claims/{B}"), Op.WRITE, A, False),
        (("tasks", T, f"claims/{B}"), Op.DELETE, A, False),
        (("tasks", T, f"claims/{B}/x"), Op.WRITE, B, False),
        (("tasks", T, "claims/"), Op.WRITE, B, False),
        (("tasks", T, f"claimsX/{B}"), Op.WRITE, B, False),
        (("tasks", T, f"reviews/{B}"), Op.WRITE, B, True),
        (("tasks", T, f"log/{B}"), Op.WRITE, B, True),
        (("tasks", T, f"log/{B}"), Op.DELETE, B, False),
        (("tasks", T, f"log/{B}", None), Op.WRITE, B, True),
        (("tasks", T, f"log/{B}", None), Op.DELETE, B, False),
        (("tasks", T, f"log/{B}", None), Op.WRITE, A, False),
        (("tasks", T, f"claims/{B}", "deeper"), Op.WRITE, B, False),
        (("tasks", T, "claims", B), Op.WRITE, B, False),
        (("agents", B), Op.WRITE, B, True),
        (("agents", B, "agent1", "caps", None), Op.WRITE, B, True),
        (("agents", B, "agent1"), Op.DELETE, B, True),
        (("agents", B, "agent1"), Op.WRITE, A, False),
        (("history", B), Op.WRITE, B, True),
        (("history", B, None), Op.WRITE, B, True),
        (("history", B, None), Op.DELETE, B, False),
        (("tasks", "no-creator"), Op.WRITE, A, False),
        (("elsewhere", A), Op.WRITE, A, False),
    ],
)
def test_owner_table(path: tuple[str | None, ...], op: Op, author: str, allowed: bool) -> None:
    _, refused = judge(author, path, op, None, EVERYTHING, 0)
    assert (refused is None) == allowed, refused


def test_permissions_come_from_the_cited_policy() -> None:
    policy = TablePolicy(members={A, B}, grants={B: {"task.claim"}})
    assert judge(B, ("tasks", T, f"claims/{B}"), Op.WRITE, None, policy, 0)[1] is None
    assert judge(B, ("tasks", T, f"reviews/{B}"), Op.WRITE, None, policy, 0)[1] is not None
    assert judge(B, ("tasks", T, f"progress/{B}"), Op.WRITE, None, policy, 0)[1] is not None
    assert judge(B, ("tasks", T, f"results/{B}"), Op.WRITE, None, policy, 0)[1] is not None
    executor = TablePolicy(members={B}, grants={B: {"task.claim", "task.progress", "task.submit"}})
    for kind in ("claims", "bids", "leases", "progress", "results"):
        assert judge(B, ("tasks", T, f"{kind}/{B}"), Op.WRITE, None, executor, 0)[1] is None
    assert judge(A, ("tasks", T, "core"), Op.WRITE, Content.MAP, EVERYTHING, 0)[1] is not None


def test_every_rule_is_reachable() -> None:
    samples: dict[str, tuple[str | None, ...]] = {}
    for rule in RULES:
        path = tuple(
            {"{task}": T, "{node}": B, "[]": None}.get(
                seg, "x" if seg == "**" else seg.replace("{node}", B)
            )
            for seg in rule.pattern
        )
        found = find_rule(path)
        assert found is not None
        samples[str(found[0])] = path
    assert len(samples) == len(RULES)


def test_task_ids_name_their_creator() -> None:
    assert task_creator(task_id(A, "abc-1.2_x")) == A
    for bad in ("", "x", ":y", f"{A}:", f"{A}:a/b", f"{A}:" + "z" * 65):
        assert task_creator(bad) is None
    with pytest.raises(ValueError):
        task_id(A, "has space")


def test_client_ids_are_stable_and_fit_pycrdt() -> None:
    ids = {client_id_for(ident(i).public_key) for i in range(200)}
    assert len(ids) == 200 and all(0 < c < 2**53 for c in ids)
    assert client_id_for(ident(3).public_key) == client_id_for(ident(3).public_key)
    Doc(client_id=max(ids))  # pycrdt accepts it


def _updates() -> tuple[int, list[bytes], Doc[Any]]:
    doc: Doc[Any] = Doc(client_id=12345)
    root = doc.get("tasks", type=Map)
    ups: list[bytes] = []
    doc.observe(lambda ev: ups.append(ev.update))
    with doc.transaction():
        root["t"] = Map({"title": "x", "claims": Map(), "log": Array([1, 2]), "b": b"\x00"})
    root["t"]["claims"]["n"] = {"deep": [1, None, True, 2.5, "s", {"k": -7}]}
    root["t"]["log"].append(3)
    with doc.transaction():
        root["t"]["title"] = "y"
        root["t"]["title"] = "z"
    del root["t"]["claims"]["n"]
    del root["t"]
    return 12345, ups, doc


def test_decoder_reads_what_pycrdt_writes() -> None:
    client, ups, doc = _updates()
    first = decode_update(ups[0])
    assert [i.content for i in first.items] == [
        Content.MAP,
        Content.VALUE,
        Content.MAP,
        Content.ARRAY,
        Content.VALUE,
        Content.VALUE,
    ]
    assert first.items[0].parent == "tasks" and first.items[0].parent_sub == "t"
    assert first.items[1].parent == (client, 0) and first.items[1].parent_sub == "title"
    assert first.items[4].length == 2 and first.items[4].parent == (client, 3)
    append = decode_update(ups[2]).items[0]
    assert append.origin is not None and append.parent is None
    overwrite = decode_update(ups[3])
    assert overwrite.items[0].content is Content.DELETED and overwrite.deletes
    assert decode_update(ups[-1]).deletes and not decode_update(ups[-1]).items
    clocks = [(i.clock, i.length) for u in ups for i in decode_update(u).items]
    assert sum(n for _, n in clocks) == decode_state_vector(doc.get_state())[client]
    decode_update(doc.get_update())  # a whole-document update, with GC structs, decodes too


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_junk(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_update(data)


def test_lib0_reader_bounds() -> None:
    assert Reader(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01").var_uint() == 2**64 - 1
    with pytest.raises(DecodeError):
        Reader(b"\xff" * 11).var_uint()
    with pytest.raises(DecodeError):
        Reader(b"\x05ab").string()
    with pytest.raises(DecodeError):
        Reader(b"\x75\xff\xff\x03").any()  # an array claiming more elements than bytes
    assert Reader(b"\x7d\x41").any() == -1
    deep = b"\x75\x01" * 40 + b"\x7e"
    with pytest.raises(DecodeError):
        Reader(deep).any()


def test_location_index_dump_roundtrip() -> None:
    index = LocationIndex()
    index.add(7, 0, 1, Loc(("tasks",), "t", Content.MAP, None))
    index.add(7, 1, 4, Loc(("tasks", "t", "log", "n"), None, Content.VALUE, (7, 0)))
    index.add(9, 0, 2, Loc((), None, Content.GC, None))
    again = LocationIndex.load(index.dump())
    assert again.lookup((7, 3)) == index.lookup((7, 3))
    assert again.lookup((7, 4)) is None and again.lookup((8, 0)) is None
    assert [loc.key for loc in again.overlapping(7, 0, 10)] == ["t", None]
    assert list(again.overlapping(7, 3, 3)) == []


def test_location_index_dump_after_more_rows_matches_a_fresh_dump() -> None:
    """dump() keeps the containers it encoded and extends them: a later dump must be what a
    dump of the same index from scratch gives, and an earlier dump must stay as it was."""
    index = LocationIndex()
    index.add(7, 0, 1, Loc(("tasks",), "t", Content.MAP, None))
    first = index.dump()
    first_conts = [list(c) for c in first["containers"]]
    index.add(7, 1, 4, Loc(("tasks", "t", "log", "n"), None, Content.VALUE, (7, 0)))
    index.add(9, 0, 2, Loc((), None, Content.GC, None))
    index.add(9, 2, 3, Loc(("tasks", "t"), "title", Content.VALUE, (7, 0)))
    second = index.dump()
    assert first["containers"] == first_conts
    fresh = LocationIndex.load(second).dump()
    assert fresh == second
    assert len(second["containers"]) > len(first["containers"])
    again = LocationIndex.load(second)
    assert again.lookup((9, 2)) == index.lookup((9, 2))
    assert again.lookup((7, 2)) == index.lookup((7, 2))
