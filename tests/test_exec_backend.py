"""The exec backend with real processes: the CLI.md contract, limits, and killing the tree."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

from mossnode.agents.exec import ExecBackend, ExecLimits

TASK = {
    "id": "t1",
    "title": "add",
    "spec": "sum",
    "input": {"a": 2, "b": 3},
    "inputs_from_dependencies": {},
}


def script(tmp: Path, body: str) -> str:
    p = tmp / "agent.py"
    p.write_text(body)
    return f"{sys.executable} {p}"


async def nothing(frac: float, msg: str) -> None:
    pass


async def test_success_and_progress(tmp_path: Path) -> None:
    cmd = script(
        tmp_path,
        """
import json, sys
t = json.load(sys.stdin)
print("MOSS_PROGRESS 0.5 halfway", file=sys.stderr, flush=True)
print(json.dumps({"sum": t["input"]["a"] + t["input"]["b"], "cwd": __import__("os").getcwd()}))
""",
    )
    seen = []

    async def progress(frac: float, msg: str) -> None:
        seen.append((frac, msg))

    out = await ExecBackend(cmd, tmp_path / "work").run(TASK, progress)
    assert out.ok, out.error
    assert out.output["sum"] == 5
    assert out.output["cwd"] == str(tmp_path / "work" / "t1")
    assert seen == [(0.5, "halfway")]


async def test_failure_modes(tmp_path: Path) -> None:
    bad_exit = script(tmp_path, "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    out = await ExecBackend(bad_exit, tmp_path / "w").run(TASK, nothing)
    assert not out.ok and "exit status 3" in out.error and "boom" in out.error
    (tmp_path / "b.py").write_text("print('not json')")
    out = await ExecBackend(f"{sys.executable} {tmp_path / 'b.py'}", tmp_path / "w").run(
        TASK, nothing
    )
    assert not out.ok and "not one JSON value" in out.error
    out = await ExecBackend("/nonexistent/agent", tmp_path / "w").run(TASK, nothing)
    assert not out.ok and "cannot start" in out.error


async def test_scrubbed_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    cmd = script(tmp_path, "import json, os; print(json.dumps(dict(os.environ)))")
    out = await ExecBackend(cmd, tmp_path / "w").run(TASK, nothing)
    assert out.ok
    assert "SECRET_TOKEN" not in out.output
    assert out.output["MOSS_TASK_ID"] == "t1"
    # nothing but the scrubbed set (LC_CTYPE: the Python agent's own C-locale coercion)
    allowed = {"PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR", "MOSS_TASK_ID", "LC_CTYPE"}
    assert set(out.output) <= allowed, set(out.output) - allowed


async def test_memory_limit(tmp_path: Path) -> None:
    cmd = script(tmp_path, "x = bytearray(512 * 1024 * 1024); print(1)")
    limits = ExecLimits(memory_bytes=256 << 20)
    out = await ExecBackend(cmd, tmp_path / "w", limits).run(TASK, nothing)
    assert not out.ok and "MemoryError" in out.error


async def test_limits_session_and_workdir(tmp_path: Path) -> None:
    """The limits are those of ExecLimits (hard and soft), no core dumps, and the command is
    its own session leader (what cancel kills), in its own working directory."""
    cmd = script(
        tmp_path,
        """
import json, os, resource as r
lim = {n: list(r.getrlimit(getattr(r, "RLIMIT_" + n))) for n in ("CPU", "AS", "NOFILE", "CORE")}
print(json.dumps({"lim": lim, "leader": os.getsid(0) == os.getpid() == os.getpgid(0),
                  "cwd": os.getcwd()}))
""",
    )
    limits = ExecLimits(cpu_s=77, memory_bytes=768 << 20, open_files=99)
    out = await ExecBackend(cmd, tmp_path / "w", limits).run(TASK, nothing)
    assert out.ok, out.error
    assert out.output["lim"] == {
        "CPU": [77, 82],
        "AS": [768 << 20, 768 << 20],
        "NOFILE": [99, 99],
        "CORE": [0, 0],
    }
    assert out.output["leader"] is True
    assert out.output["cwd"] == str(tmp_path / "w" / "t1")


async def test_command_with_arguments_and_relative_name(tmp_path: Path) -> None:
    """Arguments reach the command verbatim (no shell word splitting or expansion); a bare
    name is found on PATH."""
    out = await ExecBackend("printf %s '\"$HOME *\"'", tmp_path / "w").run(TASK, nothing)
    assert out.ok, out.error
    assert out.output == "$HOME *"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_timeout_kills_whole_tree(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = script(
        tmp_path,
        f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(600)
""",
    )
    out = await ExecBackend(cmd, tmp_path / "w", ExecLimits(timeout_s=1.5)).run(TASK, nothing)
    assert not out.ok and "timed out" in out.error
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert not _alive(child)


async def test_cancel_kills_whole_tree(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = script(
        tmp_path,
        f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(600)
""",
    )
    with trio.move_on_after(1.5):
        await ExecBackend(cmd, tmp_path / "w").run(TASK, nothing)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert not _alive(child)
