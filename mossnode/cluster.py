"""Start and steer N real mossnode daemons on loopback, each its own process and state dir.

Used by the integration tests (as a pytest fixture), ``scripts/demo`` and the benchmarks, so all
three exercise the daemon exactly as an operator would: through the ``mossnode`` CLI and the
API socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .api.client import ApiClient, ClientError
from .node.config import LISTEN_FILE, SOCKET_FILE, Config, write_config


class ClusterError(Exception):
    pass


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until ``pred()`` is truthy; raises ClusterError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (ClientError, OSError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:g} s waiting for {what} (last error: {last_exc})")


class Node:
    def __init__(self, state_dir: Path, name: str, prefix: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.name = name
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", "moss-0"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ApiClient(state_dir / SOCKET_FILE)
        self.log_path = state_dir / "daemon.log"

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mossnode", "--state-dir", str(self.state_dir), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ClusterError(f"{self.name}: mossnode {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, wait: bool = True) -> None:
        (self.state_dir / LISTEN_FILE).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "mossnode",
                    "--state-dir",
                    str(self.state_dir),
                    "run",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            wait_for(self.ready, 30, f"{self.name} to start")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
        return (self.state_dir / LISTEN_FILE).exists() and bool(self.api.get("/v1/status"))

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    @property
    def addr(self) -> str:
        return (self.state_dir / LISTEN_FILE).read_text().split()[0]

    def status(self) -> dict[str, Any]:
        return dict(self.api.get("/v1/status"))

    def peers(self) -> list[dict[str, Any]]:
        return list(self.api.get("/v1/peers"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """N daemons in one temporary directory; node 0 founds the swarm, the others join it."""

    def __init__(
        self, n: int, root: Path | None = None, config: dict[str, Any] | None = None
    ) -> None:
        self.own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="mossnode-cluster-"))
        self.config = {"listen": ["/ip4/127.0.0.1/tcp/0"], **(config or {})}
        self.nodes = [Node(self.root / f"node{i}", f"node{i}") for i in range(n)]

    def init(self) -> None:
        for i, node in enumerate(self.nodes):
            args = ["init", "--new-swarm", "testnet"] if i == 0 else ["init"]
            node.cli(*args)
            cfg = Config()
            for k, v in self.config.items():
                setattr(cfg, k, v)
            if cfg.listen == ["/ip4/127.0.0.1/tcp/0"]:
                # A fixed port per node, as on a real host: restarts keep their address.
                cfg.listen = [f"/ip4/127.0.0.1/tcp/{free_port()}"]
            write_config(node.state_dir, cfg)

    def start(self, roles: list[str] | None = None) -> Cluster:
        """Init, start every daemon, and admit nodes 1..n-1 through node 0."""
        self.init()
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            wait_for(node.ready, 30, f"{node.name} to start")
        founder = self.nodes[0]
        for node in self.nodes[1:]:
            token = founder.cli_json(
                "invite", *[a for r in roles or ["executor"] for a in ("--role", r)]
            )["token"]
            node.cli("join", founder.addr, "--invite", token)
        return self

    def wait_all_alive(self, timeout: float = 30) -> None:
        want = len(self.nodes) - 1

        def ok() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                alive = [p for p in node.peers() if p["state"] == "alive"]
                if len(alive) < want:
                    return False
            return True

        wait_for(ok, timeout, "every node to see every other alive")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.own_root and not os.environ.get("MOSSNODE_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
