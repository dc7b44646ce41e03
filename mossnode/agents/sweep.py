"""The sweeper process: empties one exec agent's ``.trash`` (see ``workdirs``).

    python -P -m mossnode.agents.sweep <work fd> <agent> [--adopt-before <unix time>]

Run by the daemon in its own session, under a deadline; prints one JSON line, ``{"removed": n,
"held": [names], "left": [up to 20 names], "left_count": n, "why": rm's last error, "error":
text}``.

``<work fd>``: the daemon's descriptor of ``<state>/work``, inherited. It opens ``<agent>`` and
``.trash`` from it without following symlinks or crossing
mounts, skips every entry with a mount point beneath it (``/proc/self/mountinfo``; a root daemon
runs this in a private mount namespace, so the list cannot change under it), and hands the rest
to GNU ``rm -rf --one-file-system`` with ``.trash`` as its working directory (held by descriptor)
and ``./<name>`` arguments, in batches that fit an argument list. ``rm`` unlinks FIFOs and links
without opening or chmodding them and walks any depth relative to each directory.
``--adopt-before``: first move into ``.trash`` the run directories last changed before that time
(a daemon that crashed mid-run left them; none of its runs is going on now).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

from .dirfd import TRASH, open_dir, open_trash, to_trash

RM_ARGS = ("-rf", "--one-file-system", "--")
RM_PATHS = ("/usr/bin/rm", "/bin/rm")  # never the PATH, which the command may write to
BATCH = 512  # names per rm (a run directory's name is under 80 bytes)
MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


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


def holding_mounts(trash: str, names: list[str], points: list[str]) -> set[str] | None:
    """Which entries ``names`` of the directory ``trash`` are, or have beneath them, a mount
    point; None if ``trash`` itself is one (nothing there is removed then)."""
    held = set()
    for point in points:
        if point == trash:
            return None
        if point.startswith(trash + "/"):
            held.add(point[len(trash) + 1 :].split("/", 1)[0])
    return held & set(names)


def adopt(agent: int, trash: int, before: float) -> None:
    """Move run directories of ``agent`` last changed before ``before`` into ``trash``."""
    for entry in os.scandir(agent):
        if entry.name == TRASH or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_mtime < before:
            with contextlib.suppress(OSError):  # a mount point, gone meanwhile: left alone
                to_trash(agent, entry.name, trash)


def rm_binary() -> str | None:
    return next((p for p in RM_PATHS if os.access(p, os.X_OK)), None)


def remove(trash: int, names: list[str]) -> str:
    """``rm`` the entries ``names`` of the directory open as ``trash``; rm's last error."""
    binary = rm_binary()
    if binary is None:
        return f"no rm at {' or '.join(RM_PATHS)}"
    why = ""
    with tempfile.TemporaryFile() as errors:
        for i in range(0, len(names), BATCH):
            subprocess.run(
                [binary, *RM_ARGS, *(f"./{n}" for n in names[i : i + BATCH])],
                cwd=f"/proc/self/fd/{trash}",  # the child's copy of the descriptor
                pass_fds=(trash,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                check=False,
            )
        size = errors.seek(0, os.SEEK_END)
        if size:
            errors.seek(max(0, size - 300))
            why = errors.read().decode(errors="replace").strip().splitlines()[-1]
    return why


def sweep(work_fd: int, agent_name: str, adopt_before: float | None) -> dict[str, object]:
    agent = open_dir(work_fd, agent_name)
    trash = open_trash(agent)
    if adopt_before is not None:
        adopt(agent, trash, adopt_before)
    names = sorted(os.listdir(trash))
    if not names:
        return {"removed": 0}
    with open(MOUNTINFO, errors="surrogateescape") as f:
        points = mount_points(f.read())
    where = os.readlink(f"/proc/self/fd/{trash}")
    held = holding_mounts(where, names, points)
    if held is None:
        return {"removed": 0, "error": f"{where} is a mount point"}
    todo = [n for n in names if n not in held]
    why = remove(trash, todo) if todo else ""
    left = [n for n in todo if _exists(trash, n)]
    report: dict[str, object] = {"removed": len(todo) - len(left), "held": sorted(held)}
    if left:
        report.update(left=left[:20], left_count=len(left), why=why)
    return report


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    args = list(argv)
    adopt_before = None
    if "--adopt-before" in args:
        at = args.index("--adopt-before")
        adopt_before = float(args[at + 1])
        del args[at : at + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        report = sweep(int(args[0]), args[1], adopt_before)
    except OSError as exc:
        report = {"removed": 0, "error": str(exc)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
