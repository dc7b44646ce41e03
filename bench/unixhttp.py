"""A lean HTTP/1.1 client of a node's API socket, for benchmarks that make many calls.

The benchmarks share the machine's two cores with the daemons they measure: the CLI's httpx
client costs its caller about 1.4 ms of CPU per call, this one (``http.client`` on a Unix
socket, one keep-alive connection) about 0.4 ms, so the load the daemons see is what the
benchmark asks of them, not the client's overhead. The caller is the operator (the daemon
recognises the socket peer's uid), as with the CLI.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("mossnode")
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


class UnixApi:
    """One connection; one call at a time (give each thread its own)."""

    def __init__(self, socket_path: Path) -> None:
        self._conn = _UnixConnection(socket_path)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        self._conn.request(method, path, data, headers)
        resp = self._conn.getresponse()
        out = resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {out.decode(errors='replace')}")
        return out

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return json.loads(self._call(method, path, body))

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def text(self, path: str) -> str:
        """A non-JSON answer (``/v1/metrics``)."""
        return self._call("GET", path, None).decode()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def close(self) -> None:
        self._conn.close()
