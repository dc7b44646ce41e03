"""The exec backend's spawning: the cached command lookup, the pipes and the exit wait (with and
without pidfds), and what a command can throw at them."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from mossnode.agents import exec as ex
from mossnode.agents.exec import ExecBackend, ExecLimits


def task(i: int) -> dict:
    return {"id": f"t{i}", "title": "x", "input": None}


async def nothing(frac: float, msg: str) -> None:
    pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    echo = tmp_path / "echo.py"
    echo.write_text(
        "import json, sys\n"
        "t = json.load(sys.stdin)\n"
        "print('MOSS_PROGRESS 0.25 a', file=sys.stderr, flush=True)\n"
        "print('x' * 100000, file=sys.stderr)\n"
        "print('MOSS_PROGRESS 1 b', file=sys.stderr)\n"
        "print(json.dumps(len(t['input'])))\n"
    )
    seen = []

    async def progress(frac: float, msg: str) -> None:
        seen.append((frac, msg))

    big = {"id": "big", "title": "x", "input": "y" * 1_000_000}
    out = await ExecBackend(f"{sys.executable} {echo}", tmp_path / "w").run(big, progress)
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
    bar = tmp_path / "bar.py"
    bar.write_text(
        "import sys\n"
        "sys.stdin.read()\n"
        "for i in range(20000): sys.stderr.write('\\r%05d' % i)\n"
        "sys.stderr.write('\\nMOSS_PROGRESS 0.5 half\\n'); sys.stderr.flush()\n"
        "print(1)\n"
    )
    seen = []

    async def progress(frac: float, msg: str) -> None:
        seen.append((frac, msg))

    lengths: list[int] = []
    real = ex._Child.on_err

    async def on_err(self: ex._Child, data: bytes, progress: ex.ProgressFn) -> None:
        await real(self, data, progress)
        lengths.append(len(self.pending))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex._Child, "on_err", on_err)
        out = await ExecBackend(f"{sys.executable} {bar}", tmp_path / "w").run(task(0), progress)
    assert out.ok and out.output == 1, out.error
    assert seen == [(0.5, "half")]
    assert max(lengths) <= ex.MAX_PROGRESS_LINE


async def test_killed_by_a_signal_without_a_name(tmp_path: Path) -> None:
    rt = signal.SIGRTMIN + 6
    out = await ExecBackend(
        f"{sys.executable} -c 'import os; os.kill(os.getpid(), {rt})'", tmp_path / "w"
    ).run(task(0), nothing)
    assert not out.ok and f"killed by signal {rt}" in out.error, out.error
