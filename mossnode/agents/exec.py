"""The exec backend: a local command is the agent (contract in CLI.md).

The command receives the task as one JSON object on stdin (``id, title, spec, input,
inputs_from_dependencies``), writes its result as one JSON value on stdout and exits 0. A
non-zero exit, a timeout or output that is not JSON fails the attempt, with stderr's tail kept.
Progress: a stderr line ``MOSS_PROGRESS <fraction 0..1> [message]``.

Isolation: its own working directory, a scrubbed environment, rlimits (CPU seconds, address
space, open files) and a wall-clock timeout; the command runs in its own session so that cancel,
timeout or lease loss kills the whole process tree, not only the direct child.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .base import Outcome, ProgressFn

SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
MAX_STDOUT = 16 << 20
STDERR_TAIL = 4096


@dataclass
class ExecLimits:
    timeout_s: float = 600.0
    cpu_s: int = 600
    memory_bytes: int = 2 << 30
    open_files: int = 256


class ExecBackend:
    def __init__(
        self,
        command: str,
        workdir: Path,
        limits: ExecLimits | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("exec backend needs a command")
        self.workdir = workdir
        self.limits = limits or ExecLimits()
        self.extra_env = env or {}

    def _env(self, task_id: str, workdir: Path) -> dict[str, str]:
        env = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update({"HOME": str(workdir), "TMPDIR": str(workdir), "MOSS_TASK_ID": task_id})
        env.update(self.extra_env)
        return env

    def _preexec(self) -> None:
        lim = self.limits
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.open_files, lim.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    async def run(self, task: dict[str, Any], progress: ProgressFn) -> Outcome:
        task_id = str(task.get("id", "task"))
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in task_id)[:64]
        workdir = self.workdir / safe_id
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        payload = json.dumps(
            {k: task.get(k) for k in ("id", "title", "spec", "input", "inputs_from_dependencies")}
        ).encode()
        started = time.monotonic()
        try:
            proc = await trio.lowlevel.open_process(
                self.argv,
                stdin=-1,
                stdout=-1,
                stderr=-1,
                cwd=workdir,
                env=self._env(task_id, workdir),
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        except OSError as exc:
            return Outcome(False, error=f"cannot start {self.argv[0]}: {exc}")
        stdout = bytearray()
        stderr = bytearray()

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                await proc.stdin.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await proc.stdin.aclose()

        async def read_out() -> None:
            assert proc.stdout is not None
            while chunk := await proc.stdout.receive_some(65536):
                if len(stdout) < MAX_STDOUT:
                    stdout.extend(chunk)

        async def read_err() -> None:
            assert proc.stderr is not None
            pending = b""
            while chunk := await proc.stderr.receive_some(65536):
                stderr.extend(chunk)
                del stderr[: -STDERR_TAIL * 4]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    await _maybe_progress(line, progress)

        timed_out = False
        try:
            with trio.move_on_after(self.limits.timeout_s) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed)
                    nursery.start_soon(read_out)
                    nursery.start_soon(read_err)
                    await proc.wait()
            timed_out = scope.cancelled_caught
        finally:
            _kill_tree(proc.pid)
            with trio.CancelScope(shield=True):
                await proc.wait()
        took = time.monotonic() - started
        tail = bytes(stderr[-STDERR_TAIL:]).decode(errors="replace").strip()
        if timed_out:
            return Outcome(
                False, error=f"timed out after {self.limits.timeout_s:g} s; {tail}", duration_s=took
            )
        rc = proc.returncode or 0
        if rc != 0:
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            return Outcome(False, error=f"{how}; stderr: {tail}", duration_s=took)
        try:
            output = json.loads(bytes(stdout))
        except ValueError:
            return Outcome(
                False, error=f"stdout is not one JSON value; stderr: {tail}", duration_s=took
            )
        return Outcome(True, output=output, duration_s=took)


async def _maybe_progress(line: bytes, progress: ProgressFn) -> None:
    parts = line.decode(errors="replace").strip().split(maxsplit=2)
    if len(parts) >= 2 and parts[0] == "MOSS_PROGRESS":
        try:
            frac = min(1.0, max(0.0, float(parts[1])))
        except ValueError:
            return
        await progress(frac, parts[2] if len(parts) > 2 else "")


def _kill_tree(pgid: int) -> None:
    """SIGKILL the command's whole session (it is its own process group leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
