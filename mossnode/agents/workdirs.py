"""Per-run working directories of the exec backend, and their removal.

Each run gets a fresh directory (``mkdtemp``: unique, mode 0700), so no two runs ever share one,
whether they are re-runs of one task or tasks whose sanitised ids collide. When the run ends its
directory is removed at once if it is empty (one ``rmdir``, the common case); otherwise it is
renamed into the agent's ``.trash`` directory, which a sweeper empties later.

The sweeper never walks the tree in the daemon. A tree the command shaped can hold FIFOs, hard
links, symlinks to anywhere, any depth, and mounts (FUSE, whose server may never answer; bind
mounts, which share the device). It runs GNU ``rm -rf --one-file-system`` in a child process
under a deadline: ``rm`` unlinks what it finds (it opens only directories, never follows a
symlink, never chmods), walks any depth with ``openat``, and a hung one is killed, not a daemon
thread. Before that, every entry with a mount point beneath it (``/proc/self/mountinfo``) is
left alone and reported once: only root can mount there, and emptying a bind mount would empty
its source. What ``rm`` could not remove stays in ``.trash`` and is retried at the next sweep.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

TRASH = ".trash"
RM = ("rm", "-rf", "--one-file-system", "--")
SWEEP_TIMEOUT_S = 60.0
MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def fresh(parent: Path, name: str) -> Path:
    """A new, empty directory for one run, named ``<name>.<random>`` under ``parent``."""
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Path(tempfile.mkdtemp(prefix=name + ".", dir=parent))


def discard(run_dir: Path) -> bool:
    """Remove an empty ``run_dir``, or move it into its parent's ``.trash`` for the sweeper;
    False if it could do neither (the directory stays where it is; the reason is logged)."""
    try:
        os.rmdir(run_dir)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass  # not empty (or the command made it unremovable): the sweeper's
    trash = run_dir.parent / TRASH
    try:
        trash.mkdir(mode=0o700, exist_ok=True)
        os.rename(run_dir, trash / run_dir.name)  # never follows a symlink put in its place
        return True
    except OSError as exc:  # a mount point (EBUSY), a replaced parent, ...
        log.warning("working directory %s left in place: %s", run_dir, exc)
        return False


def _unescape(path: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash are written as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), path) if "\\" in path else path


def mount_points(mountinfo: str) -> list[str]:
    """The mount points listed in the text of a ``/proc/<pid>/mountinfo``."""
    points = []
    for line in mountinfo.splitlines():
        parts = line.split(" ")
        if len(parts) > 4:
            points.append(_unescape(parts[4]))
    return points


def holding_mounts(trash: Path, names: list[str], points: list[str]) -> set[str]:
    """Which of the entries ``names`` of ``trash`` are, or have beneath them, a mount point."""
    root = os.path.realpath(trash)
    held = set()
    for point in points:
        if point.startswith(root + "/"):
            held.add(point[len(root) + 1 :].split("/", 1)[0])
    return held & set(names)


@dataclass
class Sweeper:
    """Empties ``.trash`` directories with ``rm`` in a child process, one sweep at a time."""

    timeout_s: float = SWEEP_TIMEOUT_S
    removed: int = 0
    failed: int = 0
    _reported: set[str] = field(default_factory=set)

    async def sweep(self, trash: Path) -> int:
        """Remove what ``trash`` holds (except entries with mounts beneath); the number of
        entries removed. Never raises for what it finds there."""
        try:
            names = sorted(os.listdir(trash))
        except OSError:
            return 0
        if not names:
            return 0
        try:
            with open(MOUNTINFO, errors="surrogateescape") as f:
                points = mount_points(f.read())
        except OSError as exc:  # no /proc: nothing is removed blind
            self._report(str(trash), f"cannot read {MOUNTINFO} ({exc}); not emptied")
            return 0
        held = holding_mounts(trash, names, points)
        for name in held:
            self._report(str(trash / name), "a mount point is beneath it; not removed")
        todo = [str(trash / n) for n in names if n not in held]
        if not todo:
            return 0
        err = b""
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                done = await trio.run_process(
                    [*RM, *todo], check=False, capture_stdout=True, capture_stderr=True
                )
                err = done.stderr
            except OSError as exc:  # no rm
                self._report(str(trash), f"cannot run rm: {exc}")
                return 0
        left = [p for p in todo if os.path.lexists(p)]
        gone = len(todo) - len(left)
        self.removed += gone
        if left:
            self.failed += 1
            why = "timed out" if scope.cancelled_caught else err.decode(errors="replace")[-500:]
            self._report(
                str(trash), f"{len(left)} entries not removed ({why.strip()}); retried later"
            )
        return gone

    def _report(self, what: str, message: str) -> None:
        if what in self._reported:
            return
        if len(self._reported) > 4096:
            self._reported.clear()
        self._reported.add(what)
        log.warning("%s: %s", what, message)
