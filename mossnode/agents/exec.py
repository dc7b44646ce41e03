"""The exec backend: a local command is the agent (contract in CLI.md).

The command receives the task as one JSON object on stdin (``id, title, spec, input,
inputs_from_dependencies``), writes its result as one JSON value on stdout and exits 0. A
non-zero exit, a timeout or output that is not JSON fails the attempt, with stderr's tail kept.
Progress: a stderr line ``MOSS_PROGRESS <fraction 0..1> [message]``.

Isolation: its own working directory, a scrubbed environment, rlimits (CPU seconds, address
space, open files, no core dumps) and a wall-clock timeout; the command runs in its own session so
that cancel, timeout or lease loss kills the whole process tree, not only the direct child.

The rlimits are set by a ``/bin/sh`` launcher that then execs the command (same process, same
session), not by a ``preexec_fn``: a ``preexec_fn`` makes CPython ``fork()`` the whole daemon
and run Python in the child, about 20 ms of CPU per task for a daemon of 200 MB, where the
launcher lets it ``vfork()`` (about 2 ms, the launcher's exec included).

Working directory: a fresh ``<workdir>/<task id>.<random>`` per run (HOME and TMPDIR too),
removed when the run ends: at once if empty, else by the sweeper process (``workdirs``).

The command's path is looked up once per PATH (``shutil.which`` stats every PATH entry) and
re-checked each run with one ``stat``, so a command removed since still fails before anything
runs; it is looked up again every ``WHICH_TTL_S``.

``Popen`` runs on the event loop, not in a worker thread: with ``vfork`` it returns once the
launcher is exec'd (the loop waits about 0.25 ms, mostly the child's time), where the thread
hand-off and ``trio.Process`` cost the daemon CPU. The task JSON is written at once when the pipe
takes it (64 KiB); the pipes are read as raw non-blocking fds and the exit is awaited on a pidfd
(a thread without pidfds). With the lookup, the daemon's share of a run went from about 2.0 ms of
CPU to 1.2-1.5 (micro benchmark, alternating runs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .base import Outcome, ProgressFn
from .workdirs import TRASHED, discard, fresh

SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
SHELL = "/bin/sh"
# Sets the limits given as $1..$4, then replaces itself with the command ("$@" after them).
# Soft CPU limit before the hard one (a hard limit below the current soft one is refused);
# ``ulimit -v`` counts KiB; PWD and SHLVL, which shells export, are dropped (the command gets
# exactly the scrubbed environment). Only the arguments vary, never the script.
LAUNCHER = (
    'ulimit -St "$1" && ulimit -Ht "$2" && ulimit -v "$3" && ulimit -n "$4" && ulimit -c 0 '
    '&& unset PWD SHLVL && shift 4 && exec "$@"'
)
MAX_STDOUT = 16 << 20
STDERR_TAIL = 4096
MAX_PROGRESS_LINE = 4096
WHICH_TTL_S = 10.0
CHUNK = 65536


@dataclass
class ExecLimits:
    timeout_s: float = 600.0
    cpu_s: int = 600
    memory_bytes: int = 2 << 30
    open_files: int = 256


@functools.lru_cache(maxsize=256)
def _split(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))  # the daemon makes a backend per run


class ExecBackend:
    def __init__(
        self,
        command: str,
        workdir: Path,
        limits: ExecLimits | None = None,
        env: dict[str, str] | None = None,
        work_fd: int | None = None,
    ) -> None:
        self.argv = list(_split(command))
        if not self.argv:
            raise ValueError("exec backend needs a command")
        self.workdir = workdir
        self.limits = limits or ExecLimits()
        self.extra_env = env or {}
        self.work_fd = work_fd  # the daemon's descriptor of workdir's parent (open_work)
        self.trashed = False  # the last run left files: its directory awaits the sweeper

    def _env(self, task_id: str, workdir: str) -> dict[str, str]:
        env = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update({"HOME": workdir, "TMPDIR": workdir, "MOSS_TASK_ID": task_id})
        env.update(self.extra_env)
        return env

    def _launch_argv(self, cwd: str, env: dict[str, str]) -> list[str]:
        """The command behind the rlimit launcher. Looked up as the exec would (a path with a
        slash from ``cwd``, a bare name on the agent's PATH): FileNotFoundError if it is not
        an executable file, said before anything runs, as a failed exec said it."""
        found = _find(self.argv[0], cwd, env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(f"no executable file {self.argv[0]!r} (PATH {env.get('PATH')})")
        lim = self.limits
        return [
            SHELL,
            "-c",
            LAUNCHER,
            "moss-exec",  # $0: names the launcher in its own error messages
            str(lim.cpu_s),
            str(lim.cpu_s + 5),
            str(lim.memory_bytes // 1024),
            str(lim.open_files),
            found,
            *self.argv[1:],
        ]

    async def run(self, task: dict[str, Any], progress: ProgressFn) -> Outcome:
        task_id = str(task.get("id", "task"))
        payload = json.dumps(
            {k: task.get(k) for k in ("id", "title", "spec", "input", "inputs_from_dependencies")}
        ).encode()
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in task_id)[:64] or "task"
        try:
            workdir = fresh(self.workdir, safe_id, self.work_fd)
        except OSError as exc:
            return Outcome(False, error=f"cannot make a working directory: {exc}")
        try:
            return await self._run_in(workdir, task_id, payload, progress)
        finally:
            self.trashed = discard(workdir, self.work_fd) == TRASHED

    async def _run_in(
        self, workdir: Path, task_id: str, payload: bytes, progress: ProgressFn
    ) -> Outcome:
        cwd = str(workdir)
        started = time.monotonic()
        env = self._env(task_id, cwd)
        try:
            child = _Child(self._launch_argv(cwd, env), cwd, env, payload)
        except OSError as exc:
            return Outcome(False, error=f"cannot start {self.argv[0]}: {exc}")
        timed_out = False
        try:
            with trio.move_on_after(self.limits.timeout_s) as scope:
                await child.communicate(progress)
            timed_out = scope.cancelled_caught
        finally:
            _kill_tree(child.proc.pid)  # the exited leader, not yet reaped, still pins the group
            with trio.CancelScope(shield=True):
                await child.reap()
            child.close()
        took = time.monotonic() - started
        tail = bytes(child.stderr[-STDERR_TAIL:]).decode(errors="replace").strip()
        if timed_out:
            return Outcome(
                False, error=f"timed out after {self.limits.timeout_s:g} s; {tail}", duration_s=took
            )
        rc = child.proc.returncode or 0
        if rc != 0:
            how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit status {rc}"
            return Outcome(False, error=f"{how}; stderr: {tail}", duration_s=took)
        try:
            output = json.loads(bytes(child.stdout))
        except ValueError:
            return Outcome(
                False, error=f"stdout is not one JSON value; stderr: {tail}", duration_s=took
            )
        return Outcome(True, output=output, duration_s=took)


class _Child:
    """One spawned command and the daemon's ends of its pipes (raw non-blocking fds)."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], payload: bytes) -> None:
        pipes: list[tuple[int, int]] = []
        try:
            for _ in range(3):
                pipes.append(os.pipe())  # EMFILE on the second: the first is closed below
            (in_r, self.in_w), (self.out_r, out_w), (self.err_r, err_w) = pipes
            # No preexec_fn (see the module docstring): CPython then spawns with vfork().
            self.proc = subprocess.Popen(
                argv,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        for fd in (in_r, out_w, err_w):  # the child's ends
            os.close(fd)
        for fd in (self.in_w, self.out_r, self.err_r):
            os.set_blocking(fd, False)
        self.pidfd = -1
        with contextlib.suppress(OSError, AttributeError):  # no pidfds (old kernel, seccomp)
            self.pidfd = os.pidfd_open(self.proc.pid)
        self.rest = memoryview(payload)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.pending = b""
        if self.feed():  # usually all of it: the pipe holds 64 KiB
            self._close_stdin()

    def feed(self) -> bool:
        """Write what the stdin pipe takes now; True once all is written or nobody reads it."""
        try:
            self.rest = self.rest[os.write(self.in_w, self.rest) :]
        except BlockingIOError:
            return False
        except OSError:  # BrokenPipeError: the command exited or closed its stdin
            return True
        return not self.rest

    def _close_stdin(self) -> None:
        os.close(self.in_w)
        self.in_w = -1

    def on_out(self, data: bytes) -> None:
        if len(self.stdout) < MAX_STDOUT:
            self.stdout += data

    async def on_err(self, data: bytes, progress: ProgressFn) -> None:
        self.stderr += data
        del self.stderr[: -STDERR_TAIL * 4]
        self.pending += data
        *lines, rest = self.pending.split(b"\n")
        # a progress line is short: a stream without newlines (a \r progress bar) is not kept
        # whole, or each chunk would re-split all of it
        self.pending = rest[-MAX_PROGRESS_LINE:]
        for line in lines:
            await _maybe_progress(line, progress)

    async def communicate(self, progress: ProgressFn) -> None:
        """Feed stdin, read stdout and stderr to their ends and wait for the exit."""

        async def feed() -> None:
            while not self.feed():
                await trio.lowlevel.wait_writable(self.in_w)
            self._close_stdin()

        async def read_err() -> None:
            while True:
                await trio.lowlevel.wait_readable(self.err_r)
                data, done = _read(self.err_r)
                if done:
                    return
                await self.on_err(data, progress)

        async with trio.open_nursery() as nursery:
            if self.in_w >= 0:
                nursery.start_soon(feed)
            nursery.start_soon(read_err)
            while True:
                await trio.lowlevel.wait_readable(self.out_r)
                data, done = _read(self.out_r)
                if done:
                    break
                self.on_out(data)
            await self.exited()

    async def exited(self) -> None:
        """Until the command has exited, not reaped (the group is killed after it, see run):
        its pidfd, else waitid(WNOWAIT) in a thread."""
        if self.pidfd >= 0:
            await trio.lowlevel.wait_readable(self.pidfd)
        else:
            await trio.to_thread.run_sync(
                os.waitid,
                os.P_PID,
                self.proc.pid,
                os.WEXITED | os.WNOWAIT,
                # (mypy mistakes the keyword for one of the TypeVarTuple arguments)
                abandon_on_cancel=True,  # type: ignore[call-arg]
            )

    async def reap(self) -> None:
        if self.proc.poll() is None:
            if self.pidfd >= 0:
                await trio.lowlevel.wait_readable(self.pidfd)
                self.proc.wait()
            else:
                await trio.to_thread.run_sync(self._wait)

    def _wait(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        for fd in (self.in_w, self.out_r, self.err_r, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.in_w = self.out_r = self.err_r = self.pidfd = -1


def _read(fd: int) -> tuple[bytes, bool]:
    """One read of what the pipe holds, and whether that is its end."""
    try:
        data = os.read(fd, CHUNK)
    except BlockingIOError:
        return b"", False
    return data, not data


async def _maybe_progress(line: bytes, progress: ProgressFn) -> None:
    parts = line.decode(errors="replace").strip().split(maxsplit=2)
    if len(parts) >= 2 and parts[0] == "MOSS_PROGRESS":
        try:
            frac = min(1.0, max(0.0, float(parts[1])))
        except ValueError:
            return
        await progress(frac, parts[2] if len(parts) > 2 else "")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal: no name
        return f"signal {signum}"


def _kill_tree(pgid: int) -> None:
    """SIGKILL the command's whole session (it is its own process group leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --- command lookup -------------------------------------------------------------------------

_found: dict[tuple[str, str], tuple[str, float]] = {}


def _find(cmd: str, cwd: str, path: str) -> str | None:
    """What the launcher execs for ``cmd``, None if that is not an executable file."""
    if os.sep in cmd:
        return cmd if _executable(os.path.join(cwd, cmd)) else None
    hit = _found.get((cmd, path))
    now = time.monotonic()
    if hit is not None and now - hit[1] < WHICH_TTL_S and _executable(hit[0]):
        return hit[0]
    found = shutil.which(cmd, path=path)
    if found is not None:
        _found[cmd, path] = (found, now)
    return found


def _executable(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)
