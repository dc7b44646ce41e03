"""The event hub and the SSE pump in one process: ring buffer, resume, gap, filters, slow
clients. The pump writes into one end of a real socket pair; the test reads (or does not read)
the other end."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from mossnode.node import events as E
from mossnode.node.events import EventHub


def parse(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


def test_ids_increase_and_resume_replays_exactly_what_followed() -> None:
    hub = EventHub(capacity=100)
    ids = [hub.publish("task", {"n": i}).id for i in range(10)]
    assert ids == list(range(ids[0], ids[0] + 10))
    sub = hub.subscribe(ids[3])
    assert [e.id for e in sub.backlog] == ids[4:]
    assert hub.subscribe(ids[-1]).backlog == []
    assert hub.subscribe(None).backlog == []  # live only
    assert hub.subscribe(ids[-1] + 50).backlog == []


def test_gap_when_the_buffer_no_longer_holds_the_events() -> None:
    hub = EventHub(capacity=3)
    ids = [hub.publish("decision", {"seq": i}).id for i in range(6)]
    sub = hub.subscribe(ids[0])
    assert sub.backlog[0].type == "gap"
    assert sub.backlog[0].data == {"since": ids[0], "first_available": ids[3]}
    assert [e.id for e in sub.backlog[1:]] == ids[3:]
    # a client from before this daemon started missed events too
    fresh = EventHub()
    assert fresh.subscribe(1).backlog[0].type == "gap"
    # right at the floor nothing is missing
    assert [e.type for e in hub.subscribe(ids[2]).backlog] == ["decision"] * 3


def test_type_filter_and_agent_only_events() -> None:
    hub = EventHub()
    start = hub.last_id
    hub.publish("task", {"task": "t"})
    hub.publish("work", {"task": "t"}, agent="alice")
    hub.publish("peer", {"peer_id": "p"})
    assert [e.type for e in hub.subscribe(start, ["task", "peer"]).backlog] == ["task", "peer"]
    assert [e.type for e in hub.subscribe(start, agent="bob").backlog] == ["task", "peer"]
    assert [e.type for e in hub.subscribe(start, agent="alice").backlog] == [
        "task",
        "work",
        "peer",
    ]
    assert len(hub.subscribe(start, operator=True).backlog) == 3


def test_overflow_drops_only_that_subscriber() -> None:
    hub = EventHub(queue_limit=3)
    slow = hub.subscribe(None)
    picky = hub.subscribe(None, ["decision"])
    for i in range(5):
        hub.publish("task", {"n": i})
    assert slow.overflowed and slow not in hub.subscribers
    assert not picky.overflowed and picky in hub.subscribers
    assert hub.dropped == 1


async def _pair() -> tuple[trio.SocketStream, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


async def test_pump_streams_backlog_then_live_events_and_keepalives() -> None:
    hub = EventHub()
    first = hub.publish("task", {"n": 0})
    sub = hub.subscribe(first.id - 1)
    stream, peer = await _pair()
    peer.setblocking(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(E.pump, sub, stream.send_all, 0.05)
        await trio.sleep(0.2)
        hub.publish("decision", {"seq": 1})
        await trio.sleep(0.2)
        raw = peer.recv(65536)
        nursery.cancel_scope.cancel()
    assert raw.startswith(b": connected\n\n")
    assert b": keep-alive\n\n" in raw
    got = parse(raw)
    assert [(e["type"], e["data"]) for e in got] == [
        ("task", {"n": 0}),
        ("decision", {"seq": 1}),
    ]
    assert got[1]["id"] == got[0]["id"] + 1


async def test_a_slow_client_gets_a_final_dropped_event_and_can_resume() -> None:
    hub = EventHub(queue_limit=5)
    sub = hub.subscribe(None)
    start = sub.last_sent
    stream, peer = await _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(E.pump, sub, stream.send_all, 10.0)
        await trio.sleep(0.1)
        # the client reads nothing: the pump blocks on a full socket, the queue overflows
        for i in range(2000):
            hub.publish("task", {"n": i, "pad": "x" * 200})
            if sub.overflowed:
                break
            await trio.sleep(0)
        assert sub.overflowed and sub not in hub.subscribers
        # the daemon side never blocked; now the client catches up and sees the final event
        peer.setblocking(False)
        raw = b""
        with trio.move_on_after(5):
            while b'"type":"dropped"' not in raw:
                try:
                    raw += peer.recv(1 << 20)
                except BlockingIOError:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    got = parse(raw)
    assert got[-1]["type"] == "dropped"
    resume = got[-1]["data"]["resume_from"]
    delivered = [e for e in got if e["type"] == "task"]
    assert resume == (delivered[-1]["id"] if delivered else start)
    # resuming from there replays the rest from the buffer, without a gap
    again = hub.subscribe(resume)
    assert again.backlog and again.backlog[0].type == "task"
    assert again.backlog[0].id == resume + 1


async def test_a_client_that_never_reads_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "STALL_S", 0.3)
    hub = EventHub()
    sub = hub.subscribe(None)
    stream, _peer = await _pair()

    async def publish() -> None:
        for i in range(500):
            hub.publish("task", {"n": i, "pad": "x" * 500})
            await trio.sleep(0)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            with pytest.raises(trio.TooSlowError):
                await E.pump(sub, stream.send_all, 10.0)
            nursery.cancel_scope.cancel()
