"""The CLI contract without a running daemon: init, id, errors as one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def mossnode(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mossnode", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0]


def test_init_and_id(tmp_path: Path) -> None:
    sd = tmp_path / "s"
    r = mossnode(sd, "init", "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["peer_id"]
    assert pid.startswith("12D3KooW")
    assert (sd / "identity.key").stat().st_mode & 0o777 == 0o600
    assert (sd / "config.toml").exists()
    assert mossnode(sd, "id").stdout.strip() == pid
    assert json.loads(mossnode(sd, "id", "--json").stdout) == {"peer_id": pid}
    # --state-dir after the subcommand works too
    r = subprocess.run(
        [sys.executable, "-m", "mossnode", "id", "--state-dir", str(sd)],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == pid


def test_init_refuses_overwrite(tmp_path: Path) -> None:
    sd = tmp_path / "s"
    assert mossnode(sd, "init").returncode == 0
    key = (sd / "identity.key").read_bytes()
    assert_one_line_error(mossnode(sd, "init"), "refusing to overwrite")
    assert (sd / "identity.key").read_bytes() == key


def test_new_swarm(tmp_path: Path) -> None:
    r = mossnode(tmp_path / "s", "init", "--new-swarm", "alpha", "--json")
    out = json.loads(r.stdout)
    assert len(bytes.fromhex(out["swarm_id"])) == 32


def test_status_without_daemon(tmp_path: Path) -> None:
    sd = tmp_path / "s"
    mossnode(sd, "init")
    assert_one_line_error(mossnode(sd, "status"), "no mossnode daemon")
    assert_one_line_error(mossnode(sd, "peers", "--json"), "no mossnode daemon")


def test_id_without_init(tmp_path: Path) -> None:
    assert_one_line_error(mossnode(tmp_path / "none", "id"), "mossnode init")


def test_bad_key_file_mode(tmp_path: Path) -> None:
    sd = tmp_path / "s"
    mossnode(sd, "init")
    (sd / "identity.key").chmod(0o644)
    assert_one_line_error(mossnode(sd, "id"), "chmod 600")
    assert_one_line_error(mossnode(sd, "run"), "chmod 600")


def test_bad_config(tmp_path: Path) -> None:
    sd = tmp_path / "s"
    mossnode(sd, "init")
    (sd / "config.toml").write_text('[node]\npresence_interval_s = "fast"\n')
    assert_one_line_error(mossnode(sd, "run"), "presence_interval_s")
    (sd / "config.toml").write_text("[node]\nbogus = 1\n")
    assert_one_line_error(mossnode(sd, "run"), "node.bogus")


def test_bad_arguments(tmp_path: Path) -> None:
    r = mossnode(tmp_path, "invite", "--role", "executor", "--ttl", "soon")
    assert r.returncode == 2 and "not a duration" in r.stderr and "Traceback" not in r.stderr
    r = mossnode(tmp_path, "frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_install_service_print(tmp_path: Path) -> None:
    r = mossnode(tmp_path, "install-service", "--print")
    assert r.returncode == 0
    assert "Type=notify" in r.stdout and "WatchdogSec=" in r.stdout
    assert "MOSSNODE_API_SOCKET=/run/mossnode/api.sock" in r.stdout
    assert "ProtectSystem=strict" in r.stdout
