"""Per-run working directories: a fresh one per run, removed after it; the sweeper's ``rm``
against trees a command shaped to hurt (FIFOs, links out, depth, mounts, a hung ``rm``)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from test_exec_backend import TASK, nothing, script

from mossnode.agents import workdirs as W
from mossnode.agents.exec import ExecBackend


def test_fresh_directories_are_private_and_never_shared(tmp_path: Path) -> None:
    a, b = W.fresh(tmp_path / "agent", "t1"), W.fresh(tmp_path / "agent", "t1")
    assert a != b and a.parent == b.parent == tmp_path / "agent"
    assert stat.S_IMODE(a.stat().st_mode) == 0o700


def test_discard_removes_empty_and_moves_the_rest(tmp_path: Path) -> None:
    empty, full = W.fresh(tmp_path, "e"), W.fresh(tmp_path, "f")
    (full / "out.txt").write_text("x")
    assert W.discard(empty) and not empty.exists()
    assert W.discard(full) and not full.exists()
    assert (tmp_path / W.TRASH / full.name / "out.txt").read_text() == "x"
    assert W.discard(tmp_path / "gone")  # already removed: nothing to do


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


async def test_sweep_removes_a_hostile_tree_and_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    agent = tmp_path / "agent"
    run = W.fresh(agent, "t1")
    hostile_tree(run, outside)
    assert W.discard(run)
    sweeper = W.Sweeper()
    removed = await sweeper.sweep(agent / W.TRASH)
    if os.geteuid() != 0:  # only root removes what sits in a directory without write access
        (agent / W.TRASH / run.name / "locked").chmod(0o700)
        removed = await sweeper.sweep(agent / W.TRASH)
    assert removed == 1 and os.listdir(agent / W.TRASH) == []
    assert (outside / "keep.txt").read_text() == "precious"
    assert stat.S_IMODE((outside / "keep.txt").stat().st_mode) == 0o644
    assert await sweeper.sweep(agent / W.TRASH) == 0  # nothing left: rm is not run


def test_mount_points_are_read_unescaped() -> None:
    info = (
        "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 0:5 / /w/.trash/t1.ab/fuse rw - fuse.x x rw\n"
    )
    points = W.mount_points(info)
    assert points == ["/mnt/parent dir", "/w/.trash/t1.ab/fuse"]
    held = W.holding_mounts(Path("/w/.trash"), ["t1.ab", "t2.cd"], points)
    assert held == {"t1.ab"}


async def test_sweep_leaves_entries_holding_a_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry with a mount point beneath it (a FUSE server that may hang, a bind mount whose
    source would be emptied) is never handed to rm; the others are removed."""
    agent = tmp_path / "agent"
    held, free = W.fresh(agent, "held"), W.fresh(agent, "free")
    for d in (held, free):
        (d / "mnt").mkdir()
        W.discard(d)
    trash = os.path.realpath(agent / W.TRASH)
    info = tmp_path / "mountinfo"
    info.write_text(f"40 1 0:50 / {trash}/{held.name}/mnt rw - fuse.hung hung rw\n")
    monkeypatch.setattr(W, "MOUNTINFO", str(info))
    sweeper = W.Sweeper()
    assert await sweeper.sweep(agent / W.TRASH) == 1
    assert os.listdir(agent / W.TRASH) == [held.name]
    assert "a mount point is beneath it" in caplog.text
    caplog.clear()
    assert await sweeper.sweep(agent / W.TRASH) == 0
    assert caplog.text == ""  # said once, not at every sweep


async def test_a_hung_rm_is_killed_and_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = tmp_path / "agent"
    run = W.fresh(agent, "t1")
    (run / "f").write_text("x")
    W.discard(run)
    monkeypatch.setattr(W, "RM", ("sh", "-c", "exec sleep 60", "rm"))
    sweeper = W.Sweeper(timeout_s=0.5)
    assert await sweeper.sweep(agent / W.TRASH) == 0
    assert sweeper.failed == 1 and "timed out" in caplog.text
    monkeypatch.setattr(W, "RM", ("rm", "-rf", "--one-file-system", "--"))
    assert await sweeper.sweep(agent / W.TRASH) == 1 and sweeper.removed == 1


async def test_a_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """What the command wrote goes to the trash with its directory; a re-run of the same task
    starts in a new, empty one."""
    cmd = script(
        tmp_path,
        "import json, os; seen = os.listdir('.'); open('out.bin', 'wb').write(b'x' * 100)\n"
        "os.makedirs('a/b'); print(json.dumps({'cwd': os.getcwd(), 'seen': seen}))",
    )
    work = tmp_path / "w"
    first = await ExecBackend(cmd, work).run(TASK, nothing)
    second = await ExecBackend(cmd, work).run(TASK, nothing)
    assert first.ok and second.ok, (first.error, second.error)
    assert first.output["cwd"] != second.output["cwd"] and second.output["seen"] == []
    assert sorted(os.listdir(work)) == [W.TRASH]
    assert await W.Sweeper().sweep(work / W.TRASH) == 2
    assert os.listdir(work / W.TRASH) == []


async def test_a_run_whose_directory_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = await ExecBackend(f"{sys.executable} -c pass", tmp_path / "file").run(TASK, nothing)
    assert not out.ok and "cannot make a working directory" in out.error
