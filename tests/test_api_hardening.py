"""The API server and handlers against hostile clients: request framing, ids that only look like
numbers, names with a trailing newline, a request trickled in byte by byte, one local user
holding many connections. Each case was found by an audit and answered 500, was misread, or
locked the operator out before it was fixed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from mossnode.api import server
from mossnode.cluster import Cluster, Node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(1, root=tmp_path_factory.mktemp("hardening"))
    c.init()
    n = c.nodes[0]
    n.start()
    yield n
    c.stop()


def exchange(node: Node, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 5 s pass)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(node.state_dir / "api.sock"))
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    s.close()
    return out


def status_of(out: bytes) -> int:
    return int(out.split(b" ", 2)[1])


@pytest.mark.slow
@pytest.mark.parametrize("value", ["\u00b2".encode("latin-1"), b"9" * 5000, b"-1", b"1e3"])
def test_an_event_id_that_only_looks_numeric_is_400(node: Node, value: bytes) -> None:
    out = exchange(
        node,
        b"GET /v1/events HTTP/1.1\r\nLast-Event-ID: " + value + b"\r\nConnection: close\r\n\r\n",
    )
    assert status_of(out) == 400, out[:300]
    assert b"Last-Event-ID" in out


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", "/vote", "/close"])
def test_a_vote_id_too_long_for_int_is_400(node: Node, suffix: str) -> None:
    method = b"GET" if not suffix else b"POST"
    body = b'{"choice": "yes"}' if suffix == "/vote" else b"{}"
    out = exchange(
        node,
        method
        + b" /v1/votes/"
        + b"9" * 5000
        + suffix.encode()
        + b" HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert status_of(out) == 400, out[:300]


@pytest.mark.slow
def test_two_differing_content_lengths_are_refused_not_read_as_the_next_request(
    node: Node,
) -> None:
    body = b'{"title": "hi"}'
    out = exchange(
        node,
        b"POST /v1/tasks HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: 0\r\n\r\n" % len(body)
        + body
        + b"GET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    assert status_of(out) == 400, out[:300]
    assert out.count(b"HTTP/1.1 ") == 1  # nothing after it was taken as a request


@pytest.mark.slow
@pytest.mark.parametrize("length", [b"1_4", b"+14", b" 14 14", b"0x0e"])
def test_a_content_length_must_be_plain_digits(node: Node, length: bytes) -> None:
    before = node.status()["state_digest"]
    out = exchange(
        node,
        b"POST /v1/tasks HTTP/1.1\r\nContent-Length: "
        + length
        + b'\r\nConnection: close\r\n\r\n{"title":"hi"}',
    )
    assert status_of(out) == 400, out[:300]
    assert node.status()["state_digest"] == before


@pytest.mark.slow
def test_paths_are_percent_decoded_as_asgi_says(node: Node) -> None:
    tid = node.cli_json("task", "submit", "--title", "decoded", "--capability", "nobody-has-this")[
        "id"
    ]
    encoded = tid.replace(":", "%3A").encode()
    out = exchange(node, b"GET /v1/tasks/" + encoded + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 200, out[:300]
    assert tid.encode() in out
    bad = exchange(node, b"GET /v1/tasks/%ff%fe HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(bad) == 400, bad[:300]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ghost\n", "ghost\r\n"])
def test_a_name_with_a_trailing_newline_is_refused(node: Node, name: str) -> None:
    import json

    body = json.dumps({"name": name, "roles": ["executor"], "backend": "exec:true"}).encode()
    out = exchange(
        node,
        b"POST /v1/agents HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert status_of(out) == 400, out[:300]
    assert "ghost" not in str(node.cli_json("agent", "list"))


@pytest.mark.slow
def test_an_invite_must_live_at_least_a_second(node: Node) -> None:
    body = b'{"roles": ["executor"], "ttl_s": 0.0001}'
    out = exchange(
        node,
        b"POST /v1/invites HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert status_of(out) == 400, out[:300]


# -- the server alone, with a trivial app and shortened limits ------------------------------


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(path: Path, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(64)
    listener = trio.SocketListener(sock)
    limiter = trio.CapacityLimiter(server.MAX_CONNECTIONS)
    per_uid: dict[int, int] = {}

    async def accept_loop() -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(server._handle, stream, _ok, limiter, per_uid)

    nursery.start_soon(accept_loop)


async def _read_all(stream: trio.SocketStream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def _prompt_request(path: Path) -> bytes:
    """A whole request at once on a fresh connection, and the answer."""
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    return await _read_all(stream)


async def test_a_request_trickled_in_is_cut_off_with_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.3)
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await _serve(path, nursery)
        stream = await trio.open_unix_socket(str(path))
        for byte in b"GET / HTTP/1.1\r\n":  # each byte in time for a read, never the whole head
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.05)
        out = await _read_all(stream)
        assert out.startswith(b"HTTP/1.1 408"), out
        assert (await _prompt_request(path)).startswith(b"HTTP/1.1 200")  # others still served
        nursery.cancel_scope.cancel()


async def test_one_uid_cannot_take_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_PER_UID", 3)
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await _serve(path, nursery)
        held = [await trio.open_unix_socket(str(path)) for _ in range(3)]
        for s in held:  # each has begun a request, so each holds its slot
            await s.send_all(b"G")
        await trio.sleep(0.1)
        extra = await trio.open_unix_socket(str(path))
        out = await _read_all(extra)
        assert out.startswith(b"HTTP/1.1 503"), out
        assert b"uid" in out
        await held[0].aclose()  # a slot comes back when a connection ends
        await trio.sleep(0.1)
        assert (await _prompt_request(path)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["\u0000", "py\n", "", "-leading-dash", "x" * 64])
def test_a_task_asks_only_for_capabilities_an_agent_could_hold(node: Node, cap: str) -> None:
    import json

    before = node.status()["state_digest"]
    body = json.dumps({"title": "t", "capabilities": [cap]}).encode()
    out = exchange(
        node,
        b"POST /v1/tasks HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert status_of(out) == 400, out[:300]
    assert b"capabilit" in out
    assert node.status()["state_digest"] == before
