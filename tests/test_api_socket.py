"""The API socket's mode and group, and who counts as the operator on it (real daemons)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys

import pytest
from test_api_rbac import _as_user

from mossnode.node.config import Config, ConfigError

STATUS = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_api_section_parses_and_round_trips() -> None:
    cfg = Config.from_toml('[api]\ngroup = "daemon"\nmode = "0640"\n')
    assert (cfg.api_socket_group, cfg.api_socket_mode) == ("daemon", 0o640)
    assert Config.from_toml(cfg.to_toml()) == cfg
    assert Config().api_socket_mode == 0o660
    with pytest.raises(ConfigError, match=r"api\.colour"):
        Config.from_toml('[api]\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="octal"):
        Config.from_toml('[api]\nmode = "rw-rw----"\n')


@pytest.mark.slow
def test_socket_mode_group_and_group_members(cluster_factory) -> None:
    assert os.getuid() == 0, "needs root to act as another user (CI runs as root)"
    group = grp.getgrnam("daemon")
    c = cluster_factory(1, api_socket_group="daemon")
    c.init()
    n = c.nodes[0]
    n.start()
    sock = n.state_dir / "api.sock"
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    token = n.cli_json("agent", "add", "grp-a", "--role", "executor", "--backend", "exec:true")[
        "token"
    ]
    # A member of the group that is not the daemon's user reaches the socket through the group
    # bits, but is no operator: without a token it is refused, with one it acts as the agent.
    nobody = pwd.getpwnam("nobody")
    os.chmod(n.state_dir, 0o750)
    os.chown(n.state_dir, -1, group.gr_gid)
    try:
        plain = _as_user(nobody.pw_uid, group.gr_gid, str(sock), STATUS)
        assert plain.startswith(b"HTTP/1.1 401"), plain[:200]
        events = STATUS.replace(b"/v1/status", b"/v1/events")
        assert _as_user(nobody.pw_uid, group.gr_gid, str(sock), events).startswith(b"HTTP/1.1 401")
        with_token = STATUS.replace(
            b"\r\n\r\n", b"\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        assert _as_user(nobody.pw_uid, group.gr_gid, str(sock), with_token).startswith(
            b"HTTP/1.1 200"
        )
        # ... and it cannot borrow an agent's identity by naming it (operator-only header)
        borrowed = STATUS.replace(b"\r\n\r\n", b"\r\nX-Mossnode-Agent: grp-a\r\n\r\n")
        assert _as_user(nobody.pw_uid, group.gr_gid, str(sock), borrowed).startswith(
            b"HTTP/1.1 401"
        )
        # outside the group, the socket's mode keeps it out entirely
        assert _as_user(nobody.pw_uid, nobody.pw_gid, str(sock), STATUS) == b""
    finally:
        os.chmod(n.state_dir, 0o700)
    # the daemon's own user is the operator, without a token
    assert n.api.get("/v1/whoami")["kind"] == "operator"


@pytest.mark.slow
def test_missing_group_stops_the_start(cluster_factory) -> None:
    c = cluster_factory(1, api_socket_group="no-such-group-mossnode")
    c.init()
    n = c.nodes[0]
    r = subprocess.run(
        [sys.executable, "-m", "mossnode", "--state-dir", str(n.state_dir), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "no-such-group-mossnode" in r.stderr and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (n.state_dir / "api.sock").exists()
