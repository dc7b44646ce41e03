"""Local API throughput: authorized calls per second over the Unix socket, and latency p50/p99.

A trio client keeps C keep-alive connections busy with sequential requests (no pipelining), the
way agents and the CLI use the socket. Status is measured as the operator (kernel-checked uid)
and as an agent (bearer token); task submission as an agent holding task.create, each call
creating a task in the replicated state (a durable write).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio

from mossnode.cluster import Cluster

CONNECTIONS = 8
SECONDS = 4.0


async def _one_conn(path: str, request: bytes, stop_at: float, lat: list[float]) -> None:
    stream = await trio.open_unix_socket(path)
    buf = b""
    async with stream:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await stream.send_all(request)
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep:
                    n = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            n = int(v)
                    if len(rest) >= n:
                        buf = rest[n:]
                        break
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError("server closed the connection")
                buf += chunk
            if not head.startswith(b"HTTP/1.1 2"):
                raise RuntimeError(f"request failed: {head[:200]!r}")
            lat.append(time.perf_counter() - t0)


async def load(path: Path, request: bytes) -> tuple[float, float, float]:
    """Calls per second, p50 and p99 in milliseconds."""
    lat: list[float] = []
    stop_at = time.perf_counter() + SECONDS
    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(CONNECTIONS):
            n.start_soon(_one_conn, str(path), request, stop_at, lat)
    elapsed = time.perf_counter() - t0
    lat.sort()
    return len(lat) / elapsed, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def http(method: str, path: str, body: dict | None = None, token: str | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: mossnode\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n" + data


def run() -> None:
    with Cluster(1) as c:
        c.init()
        node = c.nodes[0]
        node.start()
        sock = node.state_dir / "api.sock"
        # the founder node holds admin, so an admin agent has task.create
        token = node.cli_json("agent", "add", "bench", "--role", "admin", "--backend", "api")[
            "token"
        ]
        task = {"title": "bench", "capabilities": ["nobody-has-this"]}
        print(f"{CONNECTIONS} keep-alive connections, {SECONDS:g} s per endpoint")
        for name, req, target in [
            ("GET /v1/status (operator)", http("GET", "/v1/status"), True),
            ("GET /v1/status (agent)", http("GET", "/v1/status", token=token), True),
            ("POST /v1/tasks (agent)", http("POST", "/v1/tasks", task, token), False),
        ]:
            rate, p50, p99 = trio.run(load, sock, req)
            goal = "   (target >= 2000/s, p99 <= 10 ms)" if target else ""
            print(f"{name:28} {rate:8.0f} calls/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms{goal}")
