"""Per-run working directories of the exec backend, and their removal.

Each run gets a fresh directory (a random name, mode 0700), so no two runs ever share one,
whether they are re-runs of one task or tasks whose sanitised ids collide. When the run ends it
is removed at once if it is empty (one ``rmdir``, the common case); otherwise it is renamed into
the agent's ``.trash`` under a random name, which a sweeper process empties later (``sweep``).

The daemon never walks a tree the command shaped (FIFOs, hard links, symlinks to anywhere, any
depth, FUSE or bind mounts) and never resolves a path through it: the agent directory and its
``.trash`` are opened from the trusted ``<state>/work`` with ``openat2`` refusing symlinks and
mount crossings, and the rmdir and rename go through those descriptors. Emptying ``.trash`` is
the sweeper child's job, under a deadline (the daemon kills its process group when it expires).

The command runs as the daemon's uid, so it could remove these files itself: what this guards
against is the daemon being the one that follows a link or a mount a run left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .dirfd import DIR_FLAGS, TRASH, open_dir, open_trash, to_trash

log = logging.getLogger(__name__)

REMOVED, TRASHED, LEFT = "removed", "trashed", "left"  # what discard did
SWEEP_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _work(agent_dir: Path, work_fd: int | None) -> Iterator[int]:
    """A descriptor of ``agent_dir``'s parent: a copy of the daemon's :func:`open_work`, or
    (``work_fd`` None, an ExecBackend used on its own) one opened for the call."""
    fd = os.dup(work_fd) if work_fd is not None else open_work(agent_dir.parent)
    try:
        yield fd
    finally:
        os.close(fd)


def fresh(parent: Path, name: str, work_fd: int | None = None) -> Path:
    """A new, empty directory (mode 0700) for one run: ``<parent>/<name>.<random>``, made
    through descriptors (see :func:`_work`): a ``parent`` that a run replaced with a symlink
    or a mount is refused."""
    with _work(parent, work_fd) as work:
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent.name, 0o700, dir_fd=work)
        agent = open_dir(work, parent.name)
    try:
        while True:
            run = f"{name}.{secrets.token_hex(4)}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(run, 0o700, dir_fd=agent)
                return parent / run
    finally:
        os.close(agent)


def open_work(work: Path) -> int:
    """``<state>/work`` (made if missing), opened once by the daemon and kept: a run can
    rename or replace the path (it is the run's ``../..``), not what the descriptor holds."""
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(work, DIR_FLAGS)


def discard(run_dir: Path, work_fd: int | None = None) -> str:
    """Remove an empty ``run_dir`` (``<work>/<agent>/<run>``), or move it into the agent's
    ``.trash`` for the sweeper: REMOVED, TRASHED, or LEFT if it could do neither (it stays
    where it is; the reason is logged). ``work_fd``: see :func:`_work`."""
    agent = trash = -1
    try:
        with _work(run_dir.parent, work_fd) as work:
            agent = open_dir(work, run_dir.parent.name)
        try:
            os.rmdir(run_dir.name, dir_fd=agent)
            return REMOVED
        except FileNotFoundError:
            return REMOVED
        except OSError:
            pass  # not empty, or made unremovable by the command: the sweeper's
        trash = open_trash(agent)
        to_trash(agent, run_dir.name, trash)
        return TRASHED
    except OSError as exc:  # a mount point (EBUSY, EXDEV), a symlink put in place, ...
        log.warning("working directory %s left in place: %s", run_dir, exc)
        return LEFT
    finally:
        for fd in (trash, agent):
            if fd >= 0:
                os.close(fd)


async def _private_mounts_work() -> list[str]:
    """``unshare``'s prefix for a private mount namespace, if this process may make one (root
    with CAP_SYS_ADMIN); else none: a daemon that cannot, has commands that cannot mount
    into its namespace either (FUSE aside, which the sweeper's deadline bounds)."""
    unshare = shutil.which("unshare") if os.geteuid() == 0 else None
    if unshare is None:
        return []
    prefix = [unshare, "--mount", "--propagation", "private"]
    try:
        with trio.fail_after(10):
            done = await trio.run_process([*prefix, "true"], check=False, capture_stderr=True)
        ok = done.returncode == 0
    except (OSError, trio.TooSlowError):
        ok = False
    return prefix if ok else []


async def _kill_group(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # the sweeper leads its session: rm goes too
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Sweeper:
    """Runs the sweeper process (``python -m mossnode.agents.sweep``) over one agent directory
    at a time, killing its whole process group (``rm`` included) after ``timeout_s``. A root
    daemon runs it in a private mount namespace (``unshare``): mounts made after it starts,
    by a process that escaped its run's kill, never appear where it checks and removes."""

    timeout_s: float = SWEEP_TIMEOUT_S
    removed: int = 0
    failed: int = 0
    _reported: set[str] = field(default_factory=set)
    _unshare: list[str] | None = None  # the private-namespace prefix, once found to work

    def command(self, work_fd: int, agent: str, adopt_before: float | None) -> list[str]:
        argv = [sys.executable, "-P", "-m", "mossnode.agents.sweep", str(work_fd), agent]
        if adopt_before is not None:
            argv += ["--adopt-before", repr(adopt_before)]
        return [*(self._unshare or ()), *argv]

    async def sweep(self, work_fd: int, agent: str, adopt_before: float | None = None) -> bool:
        """Empty ``<work>/<agent>/.trash`` (``work_fd``: :func:`open_work`), first moving into
        it the run directories last modified before ``adopt_before`` (a crashed daemon's).
        False if something is left to retry (entries with a mount beneath stay for good,
        said once). Never raises."""
        if self._unshare is None:  # found out once, on the first sweep
            self._unshare = await _private_mounts_work()
        argv = self.command(work_fd, agent, adopt_before)
        where = f"work/{agent}"
        report: Any = None
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                done = await trio.run_process(
                    argv,
                    check=False,
                    capture_stdout=True,
                    pass_fds=(work_fd,),
                    start_new_session=True,
                    deliver_cancel=_kill_group,
                )
            except OSError as exc:
                self._report(where, f"cannot run the sweeper: {exc}")
                return False
            with contextlib.suppress(Exception):
                report = json.loads(done.stdout.decode().splitlines()[-1])
            if not isinstance(report, dict):
                report = {"error": f"the sweeper exited {done.returncode} without a report"}
        if scope.cancelled_caught:
            report = {"error": f"timed out after {self.timeout_s:g} s"}
        try:
            removed = int(report.get("removed") or 0)
            held = [str(n) for n in report.get("held") or ()]
        except (TypeError, ValueError):
            removed, held = 0, []
        self.removed += removed
        for name in held:
            self._report(f"{where}/{TRASH}/{name}", "a mount point is beneath it; not removed")
        error, left = report.get("error"), report.get("left")
        if error or left:
            self.failed += 1
            why = error or f"{report.get('left_count')} entries left ({report.get('why')})"
            self._report(where, f"not emptied: {why}; retried later")
            return False
        return True

    def _report(self, what: str, message: str) -> None:
        if what in self._reported:
            return
        if len(self._reported) > 4096:
            self._reported.clear()
        self._reported.add(what)
        log.warning("%s: %s", what, message.strip())
