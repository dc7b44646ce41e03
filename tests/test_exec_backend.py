"""The exec backend with real processes: the CLI.md contract, limits, killing the tree, the
cached command lookup, the pipes and the exit wait (with and without pidfds), and what a
command can throw at them."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from mossnode.agents import exec as ex
from mossnode.agents.base import ProgressFn
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


def recorder() -> tuple[list[tuple[float, str]], ProgressFn]:
    """A progress callback, and the reports it got."""
    seen: list[tuple[float, str]] = []

    async def progress(frac: float, msg: str) -> None:
        seen.append((frac, msg))

    return seen, progress


def task(i: int) -> dict:
    return {"id": f"t{i}", "title": "x", "input": None}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    seen, progress = recorder()
    out = await ExecBackend(cmd, tmp_path / "work").run(TASK, progress)
    assert out.ok, out.error
    assert out.output["sum"] == 5
    cwd = Path(out.output["cwd"])  # a fresh directory of its own, removed (it was left empty)
    assert cwd.parent == tmp_path / "work" and cwd.name.startswith("t1.")
    assert not cwd.exists() and os.listdir(tmp_path / "work") == []
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
    assert Path(out.output["cwd"]).name.startswith("t1.")


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


async def test_removed_command_is_reported_before_running(tmp_path: Path) -> None:
    """The PATH lookup is cached, but a command removed since is still a clear error."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    agent = bindir / "moss-test-agent"
    agent.write_text("#!/bin/sh\necho 1\n")
    agent.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    backend = ExecBackend("moss-test-agent", tmp_path / "w", env=env)
    out = await backend.run(task(0), nothing)
    assert out.ok and out.output == 1, out.error
    agent.unlink()
    out = await backend.run(task(1), nothing)
    assert not out.ok and "cannot start" in out.error and "moss-test-agent" in out.error


async def test_without_pidfds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pidfds (old kernel, seccomp): the exit is awaited in a thread; progress, a payload
    larger than the pipe, a command that never reads stdin, a timeout."""

    def refused(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", refused)
    await _payload_progress_and_no_reader(tmp_path)


async def test_large_payload_and_command_ignoring_stdin(tmp_path: Path) -> None:
    await _payload_progress_and_no_reader(tmp_path)


async def _payload_progress_and_no_reader(tmp_path: Path) -> None:
    echo = script(
        tmp_path,
        "import json, sys\n"
        "t = json.load(sys.stdin)\n"
        "print('MOSS_PROGRESS 0.25 a', file=sys.stderr, flush=True)\n"
        "print('x' * 100000, file=sys.stderr)\n"
        "print('MOSS_PROGRESS 1 b', file=sys.stderr)\n"
        "print(json.dumps(len(t['input'])))\n",
    )
    seen, progress = recorder()
    big = {"id": "big", "title": "x", "input": "y" * 1_000_000}
    out = await ExecBackend(echo, tmp_path / "w").run(big, progress)
    assert out.ok, out.error
    assert out.output == 1_000_000
    assert seen == [(0.25, "a"), (1.0, "b")]
    # never reads its stdin, exits: the daemon does not block on the payload
    deaf = ExecBackend("printf 7", tmp_path / "w")
    with trio.fail_after(10):
        out = await deaf.run(big, nothing)
    assert out.ok and out.output == 7, out.error
    # never reads its stdin and does not exit: the timeout still applies
    out = await ExecBackend("sleep 30", tmp_path / "w", ExecLimits(timeout_s=0.5)).run(big, nothing)
    assert not out.ok and "timed out" in out.error


async def test_no_fd_left_when_pipes_run_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE on the second pipe: a clear failure, and the first pipe is closed."""
    real = os.pipe
    made = []

    def pipe() -> tuple[int, int]:
        if made:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(1)
        return real()

    backend = ExecBackend("cat", tmp_path / "w")
    before = open_fds()
    monkeypatch.setattr(os, "pipe", pipe)
    out = await backend.run(task(0), nothing)
    monkeypatch.setattr(os, "pipe", real)
    assert not out.ok and "cannot start" in out.error and "Too many open files" in out.error
    assert open_fds() == before


async def test_stderr_without_newlines_is_not_kept_whole(tmp_path: Path) -> None:
    """A progress bar drawn with \r: what waits for a newline stays bounded, and a progress
    line after it still counts."""
    bar = script(
        tmp_path,
        "import sys\n"
        "sys.stdin.read()\n"
        "for i in range(20000): sys.stderr.write('\\r%05d' % i)\n"
        "sys.stderr.write('\\nMOSS_PROGRESS 0.5 half\\n'); sys.stderr.flush()\n"
        "print(1)\n",
    )
    seen, progress = recorder()
    lengths: list[int] = []
    real = ex._Child.on_err

    async def on_err(self: ex._Child, data: bytes, progress: ex.ProgressFn) -> None:
        await real(self, data, progress)
        lengths.append(len(self.pending))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex._Child, "on_err", on_err)
        out = await ExecBackend(bar, tmp_path / "w").run(task(0), progress)
    assert out.ok and out.output == 1, out.error
    assert seen == [(0.5, "half")]
    assert max(lengths) <= ex.MAX_PROGRESS_LINE


async def test_killed_by_a_signal_without_a_name(tmp_path: Path) -> None:
    rt = signal.SIGRTMIN + 6
    out = await ExecBackend(
        f"{sys.executable} -c 'import os; os.kill(os.getpid(), {rt})'", tmp_path / "w"
    ).run(task(0), nothing)
    assert not out.ok and f"killed by signal {rt}" in out.error, out.error
