"""One real daemon: socket API, file modes, clean stop on signals."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys

import httpx
import pytest

from mossnode.cluster import Cluster, wait_for


@pytest.fixture
def node(solo):
    return solo


def test_status_over_socket(node) -> None:
    s = node.cli_json("status")
    assert s["peer_id"] == node.cli_json("id")["peer_id"]
    assert s["version"]
    assert s["uptime_s"] >= 0
    assert s["members"] == 1
    assert all(a.endswith("/p2p/" + s["peer_id"]) for a in s["listen_addrs"])
    assert node.addr in s["listen_addrs"]
    assert "state_digest" in s and "swarm_id" in s


def test_socket_mode(node) -> None:
    st = (node.state_dir / "api.sock").stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660  # group may connect (see test_api_socket)


def test_api_errors(node) -> None:
    c = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")), base_url="http://x"
    )
    r = c.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = c.post("/v1/invites", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
    r = c.post("/v1/invites", json={"roles": ["emperor"]})
    assert r.status_code == 400 and "emperor" in r.json()["error"]["message"]
    r = c.post("/v1/invites", json={"roles": "executor"})
    assert r.status_code == 400
    r = c.post("/v1/join", json={"addr": "/ip4/1.2.3.4", "invite": "moss1AAAA"})
    assert r.status_code == 400
    # more concurrency than the scheduler would ever use: refused, not registered
    agent = {"name": "wide", "roles": ["executor"], "backend": "exec:true", "max_concurrency": 9}
    r = c.post("/v1/agents", json=agent)
    assert r.status_code == 400 and "1..8" in r.json()["error"]["message"]
    assert all(a["name"] != "wide" for a in c.get("/v1/agents").json())
    doc = c.get("/v1/openapi.json").json()
    assert "/v1/status" in doc["paths"]
    assert node.status()["decided_height"] == 0


def test_second_daemon_refused(node) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mossnode", "--state-dir", str(node.state_dir), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "another mossnode daemon is running" in r.stderr
    assert node.status()  # the first one is unharmed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop(node, sig) -> None:
    assert node.stop(sig) == 0
    assert not (node.state_dir / "api.sock").exists()
    assert not (node.state_dir / "listen_addrs").exists()
    node.start()  # restarts on the same state dir
    wait_for(node.status, 10, "restart")


def test_metrics(node) -> None:
    c = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")), base_url="http://x"
    )
    r = c.get("/v1/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "mossnode_members 1" in r.text
    assert "mossnode_uptime_seconds" in r.text


def test_systemd_notify(cluster_factory, tmp_path) -> None:
    import os
    import socket

    c: Cluster = cluster_factory(1)
    c.init()
    n = c.nodes[0]
    sock_path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock_path))
    s.settimeout(30)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        n.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    msgs = set()
    while not {"READY=1", "WATCHDOG=1"} <= msgs:
        msgs.update(s.recv(1024).decode().splitlines())
    n.stop()
    while "STOPPING=1" not in msgs:
        msgs.update(s.recv(1024).decode().splitlines())
    s.close()


def _raw(node, data: bytes) -> bytes:
    import socket as pysocket

    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(node.state_dir / "api.sock"))
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_http_edge_cases(node) -> None:
    # keep-alive: two requests on one connection, the second closes it
    two = (
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out = _raw(node, two)
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert _raw(node, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(node, b"GET / HTTP/2\r\n\r\n").startswith(b"HTTP/1.1 400")
    chunked = b"POST /v1/invites HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(node, chunked).startswith(b"HTTP/1.1 411")
    big = b"POST /v1/invites HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
    assert _raw(node, big).startswith(b"HTTP/1.1 413")
    huge_head = b"GET /v1/status HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    assert _raw(node, huge_head).startswith(b"HTTP/1.1 431")
    assert _raw(node, b"GET /v1/status HTTP/1.1\r\nContent-Length: -5\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert node.status()["decided_height"] == 0  # the daemon is fine


def test_decided_entries_are_announced_by_f_plus_1_validators_and_only_when_heard() -> None:
    """Gossiping a decided entry serves only nodes that are no validators: none listening, no
    validator announces; else f + 1 of them per entry (at least one honest), in rotation."""
    from mossnode.crypto.identity import Identity
    from mossnode.node.daemon import announces

    ids = [Identity(bytes([0x60 + i]) * 32) for i in range(7)]
    outsider = Identity(b"\x7f" * 32).peer_id
    for n in (1, 4, 7):
        vals = [i.public_key for i in ids[:n]]
        pids = {i.peer_id for i in ids[:n]}
        f = (n - 1) // 3
        for seq in range(1, 3 * n):
            heard = [v for v in vals if announces(v, vals, seq, pids | {outsider})]
            assert len(heard) == f + 1
            assert not any(announces(v, vals, seq, pids) for v in vals)
            assert not announces(Identity(b"\x7e" * 32).public_key, vals, seq, {outsider})
        # every validator takes its turn
        assert {v for s in range(n) for v in vals if announces(v, vals, s, {outsider})} == set(vals)
