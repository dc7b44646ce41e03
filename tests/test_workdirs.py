"""Per-run working directories: a fresh one per run, removed after it; the sweeper process
against trees and directories a command shaped to hurt (FIFOs, links out, depth, mounts, a
symlinked ``.trash``, a hung ``rm``, more names than an argument list holds)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest
import trio
from test_exec_backend import TASK, nothing, script

from mossnode.agents import dirfd as D
from mossnode.agents import sweep as S
from mossnode.agents import workdirs as W
from mossnode.agents.exec import ExecBackend


@pytest.fixture
def wfd():
    """Opens a work directory as the daemon does (workdirs.open_work); closed after the test."""
    fds: list[int] = []

    def open_(path: Path) -> int:
        fds.append(W.open_work(path))
        return fds[-1]

    yield open_
    for fd in fds:
        os.close(fd)


def test_fresh_directories_are_private_and_never_shared(tmp_path: Path) -> None:
    a, b = W.fresh(tmp_path / "agent", "t1"), W.fresh(tmp_path / "agent", "t1")
    assert a != b and a.parent == b.parent == tmp_path / "agent"
    assert stat.S_IMODE(a.stat().st_mode) == 0o700


def test_fresh_through_the_held_work_directory(wfd, tmp_path: Path) -> None:
    fd = wfd(tmp_path / "work")
    run = W.fresh(tmp_path / "work" / "agent", "t1", fd)
    assert run.parent == tmp_path / "work" / "agent" and run.name.startswith("t1.")
    assert stat.S_IMODE(run.stat().st_mode) == 0o700 and os.listdir(run) == []
    assert W.discard(run, fd) == W.REMOVED
    os.rename(tmp_path / "work" / "agent", tmp_path / "real")
    (tmp_path / "work" / "agent").symlink_to(tmp_path / "real")  # a run's ../ replaced
    with pytest.raises(OSError):
        W.fresh(tmp_path / "work" / "agent", "t2", fd)
    assert os.listdir(tmp_path / "real") == []


def test_discard_removes_empty_and_moves_the_rest(tmp_path: Path) -> None:
    empty, full = W.fresh(tmp_path / "a", "e"), W.fresh(tmp_path / "a", "f")
    (full / "out.txt").write_text("x")
    assert W.discard(empty) == W.REMOVED and not empty.exists()
    assert W.discard(full) == W.TRASHED and not full.exists()
    [moved] = os.listdir(tmp_path / "a" / W.TRASH)
    assert moved.startswith(full.name + ".")  # plus a random part the command cannot guess
    assert (tmp_path / "a" / W.TRASH / moved / "out.txt").read_text() == "x"
    assert W.discard(tmp_path / "a" / "gone") == W.REMOVED  # already removed: nothing to do


def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    return outside


def test_a_symlinked_trash_or_agent_directory_is_not_followed(wfd, tmp_path: Path) -> None:
    """A command can replace ``.trash`` (or its agent's directory) with a symlink: the daemon
    then moves nothing there, and the sweeper removes nothing there."""
    outside = victim(tmp_path)
    run = W.fresh(tmp_path / "a", "t1")
    (run / "f").write_text("x")
    (tmp_path / "a" / W.TRASH).symlink_to(outside)
    assert W.discard(run) == W.LEFT and run.exists()
    with pytest.raises(OSError):
        S.sweep(wfd(tmp_path), "a", None)
    assert os.listdir(outside) == ["keep.txt"]
    os.rename(tmp_path / "a", tmp_path / "real")
    (tmp_path / "a").symlink_to(tmp_path / "real")
    assert W.discard(tmp_path / "a" / run.name) == W.LEFT
    with pytest.raises(OSError):
        S.sweep(wfd(tmp_path), "a", None)


def hostile_tree(root: Path, outside: Path) -> None:
    """Everything a command can leave that a naive removal trips on."""
    os.mkfifo(root / "fifo")  # opening it would hang
    (root / "to_outside").symlink_to(outside)  # following it would empty ``outside``
    os.link(outside / "keep.txt", root / "hardlink")  # chmod/truncate would reach the original
    fd = os.open(root, os.O_DIRECTORY)
    for _ in range(150):  # deeper than PATH_MAX (4096) as one path: made relative to each level
        os.mkdir("d" * 40, dir_fd=fd)
        below = os.open("d" * 40, os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    weird = root / "name with\nnewline and \\ and space"
    weird.mkdir()
    (weird / "f").write_text("x")
    locked = root / "locked"
    locked.mkdir()
    (locked / "f").write_text("x")
    locked.chmod(0o500)


async def test_sweeper_removes_a_hostile_tree_and_nothing_outside(wfd, tmp_path: Path) -> None:
    outside = victim(tmp_path)
    run = W.fresh(tmp_path / "agent", "t1")
    hostile_tree(run, outside)
    assert W.discard(run) == W.TRASHED
    sweeper = W.Sweeper()
    emptied = await sweeper.sweep(wfd(tmp_path), "agent")
    if os.geteuid() != 0:  # only root removes what sits in a directory without write access
        assert not emptied and sweeper.failed == 1
        [moved] = os.listdir(tmp_path / "agent" / W.TRASH)
        (tmp_path / "agent" / W.TRASH / moved / "locked").chmod(0o700)
        emptied = await sweeper.sweep(wfd(tmp_path), "agent")
    assert emptied and sweeper.removed == 1
    assert os.listdir(tmp_path / "agent" / W.TRASH) == []
    assert (outside / "keep.txt").read_text() == "precious"
    assert stat.S_IMODE((outside / "keep.txt").stat().st_mode) == 0o644


async def test_more_entries_than_one_argument_list_holds(wfd, tmp_path: Path) -> None:
    trash = tmp_path / "agent" / W.TRASH
    trash.mkdir(parents=True)
    for i in range(3 * S.BATCH + 7):
        (trash / f"t{i:05d}.{'x' * 60}").mkdir()
    assert await W.Sweeper().sweep(wfd(tmp_path), "agent")
    assert os.listdir(trash) == []


async def test_a_crashed_daemons_run_directories_are_taken_in(wfd, tmp_path: Path) -> None:
    old, new = W.fresh(tmp_path / "agent", "old"), W.fresh(tmp_path / "agent", "new")
    (old / "f").write_text("x")
    (new / "f").write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert await W.Sweeper().sweep(wfd(tmp_path), "agent", adopt_before=time.time() - 60)
    assert sorted(os.listdir(tmp_path / "agent")) == [W.TRASH, new.name]  # a live run's stays


def test_mount_points_are_read_unescaped() -> None:
    info = (
        "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 0:5 / /w/.trash/t1.ab/fuse rw - fuse.x x rw\n"
    )
    points = S.mount_points(info)
    assert points == ["/mnt/parent dir", "/w/.trash/t1.ab/fuse"]
    assert S.holding_mounts("/w/.trash", ["t1.ab", "t2.cd"], points) == {"t1.ab"}
    assert S.holding_mounts("/w/.trash/t1.ab/fuse", ["x"], points) is None


def test_entries_holding_a_mount_are_left(
    wfd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry with a mount point beneath it (a FUSE server that may hang, a bind mount whose
    source would be emptied) is never handed to rm; the others are removed. (The sweeper's own
    code, in process, to point it at a mount table of the test's making.)"""
    agent = tmp_path / "agent"
    held, free = W.fresh(agent, "held"), W.fresh(agent, "free")
    for d in (held, free):
        (d / "mnt").mkdir()
        W.discard(d)
    names = {n.split(".")[0]: n for n in os.listdir(agent / W.TRASH)}
    trash = os.path.realpath(agent / W.TRASH)
    info = tmp_path / "mountinfo"
    info.write_text(f"40 1 0:50 / {trash}/{names['held']}/mnt rw - fuse.hung hung rw\n")
    monkeypatch.setattr(S, "MOUNTINFO", str(info))
    assert S.sweep(wfd(tmp_path), "agent", None) == {"removed": 1, "held": [names["held"]]}
    assert os.listdir(agent / W.TRASH) == [names["held"]]
    info.write_text(f"40 1 0:50 / {trash} rw - fuse.hung hung rw\n")
    assert "is a mount point" in S.sweep(wfd(tmp_path), "agent", None)["error"]


async def test_a_hung_sweep_is_killed_with_its_children(
    wfd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "rm.pid"
    hung = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    monkeypatch.setattr(W.Sweeper, "command", lambda self, *a: hung)
    sweeper = W.Sweeper(timeout_s=0.5)
    assert not await sweeper.sweep(wfd(tmp_path), "agent")
    assert sweeper.failed == 1 and "timed out" in caplog.text
    child = int(pidfile.read_text())
    with trio.fail_after(5):
        while os.path.exists(f"/proc/{child}") and "Z" not in _state(child):
            await trio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


async def test_a_run_leaves_nothing_behind(wfd, tmp_path: Path) -> None:
    """What the command wrote goes to the trash with its directory; a re-run of the same task
    starts in a new, empty one."""
    cmd = script(
        tmp_path,
        "import json, os; seen = os.listdir('.'); open('out.bin', 'wb').write(b'x' * 100)\n"
        "os.makedirs('a/b'); print(json.dumps({'cwd': os.getcwd(), 'seen': seen}))",
    )
    backend = ExecBackend(cmd, tmp_path / "w")
    first = await backend.run(TASK, nothing)
    assert backend.trashed
    second = await ExecBackend(cmd, tmp_path / "w").run(TASK, nothing)
    assert first.ok and second.ok, (first.error, second.error)
    assert first.output["cwd"] != second.output["cwd"] and second.output["seen"] == []
    assert sorted(os.listdir(tmp_path / "w")) == [W.TRASH]
    assert await W.Sweeper().sweep(wfd(tmp_path), "w")
    assert os.listdir(tmp_path / "w" / W.TRASH) == []


async def test_a_run_whose_directory_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = await ExecBackend(f"{sys.executable} -c pass", tmp_path / "file").run(TASK, nothing)
    assert not out.ok and "cannot make a working directory" in out.error


async def test_a_replaced_work_directory_is_not_followed(wfd, tmp_path: Path) -> None:
    """``<state>/work`` is a run's ``../..``: a command can swap it for a symlink to anything.
    The daemon holds it open from start-up, so the sweep stays in the real one."""
    outside = victim(tmp_path)
    old = outside / "agent" / "t1.abc"
    old.mkdir(parents=True)
    (old / "f").write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    work = tmp_path / "work"
    fd = wfd(work)
    os.rename(work, tmp_path / "was")
    work.symlink_to(outside)
    assert not await W.Sweeper().sweep(fd, "agent", adopt_before=time.time())
    assert (old / "f").read_text() == "x" and (outside / "keep.txt").exists()


def test_without_openat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older kernels (or a seccomp filter): O_NOFOLLOW, then the mount ids compared."""
    monkeypatch.setattr(D, "_openat2_works", False)
    run = W.fresh(tmp_path / "a", "t1")
    (run / "f").write_text("x")
    assert W.discard(run) == W.TRASHED
    (tmp_path / "a" / "link").symlink_to(tmp_path)
    parent = os.open(tmp_path / "a", os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            W.open_dir(parent, "link")
    finally:
        os.close(parent)
