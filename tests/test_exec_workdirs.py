"""Removing a run's working directory (agents/workdirs.py): whatever the command left there,
nothing outside it is touched, nothing blocks, and what cannot go is left, not raised."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import trio

from mossnode.agents.exec import ExecBackend
from mossnode.agents.workdirs import MAX_DEPTH, remove_tree


def outside(tmp: Path) -> Path:
    keep = tmp / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    (keep / "precious").chmod(0o644)
    return keep


def assert_intact(keep: Path) -> None:
    f = keep / "precious"
    assert f.read_text() == "x" and stat.S_IMODE(f.stat().st_mode) == 0o644


def dev(p: Path) -> int:
    return os.stat(p).st_dev


def test_removes_litter_without_following_anything(tmp_path: Path) -> None:
    keep = outside(tmp_path)
    w = tmp_path / "w"
    (w / "deep" / "er").mkdir(parents=True)
    (w / "deep" / "er" / "f").write_text("x")
    (w / "deep" / "er").chmod(0o500)
    (w / "deep").chmod(0o500)
    (w / "file").write_text("x")
    (w / "link").symlink_to(keep)
    (w / "filelink").symlink_to(keep / "precious")
    os.link(keep / "precious", w / "hard")  # a hard link to a file outside
    os.mkfifo(w / "fifo")
    assert remove_tree(str(w), dev(tmp_path)) is True
    assert not w.exists()
    assert_intact(keep)
    assert (keep / "precious").stat().st_nlink == 1


def test_a_symlink_in_place_of_the_directory_is_not_followed(tmp_path: Path) -> None:
    keep = outside(tmp_path)
    w = tmp_path / "w"
    w.symlink_to(keep)
    assert remove_tree(str(w), dev(tmp_path)) is False
    assert w.is_symlink()
    assert_intact(keep)


def test_too_deep_is_left_not_raised(tmp_path: Path) -> None:
    w = tmp_path / "w"
    p = w
    for _ in range(MAX_DEPTH + 5):
        p = p / "d"
    p.mkdir(parents=True)
    (w / "top").write_text("x")
    assert remove_tree(str(w), dev(tmp_path)) is False
    assert not (w / "top").exists()  # what it could reach is gone
    assert w.exists()


def test_another_device_is_left(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "f").write_text("x")
    assert remove_tree(str(w), dev(tmp_path) + 1) is False
    assert (w / "f").exists()


def test_gone_already(tmp_path: Path) -> None:
    assert remove_tree(str(tmp_path / "never"), dev(tmp_path)) is True


async def test_runs_leave_nothing_behind(tmp_path: Path) -> None:
    keep = outside(tmp_path)
    script = tmp_path / "litter.py"
    script.write_text(
        "import json, os, sys\n"
        "json.load(sys.stdin)\n"
        "os.makedirs('a/b')\n"
        "os.chmod('a', 0o500)\n"
        "os.symlink(sys.argv[1], 'out')\n"
        "os.mkfifo('pipe')\n"
        "print(json.dumps(os.getcwd()))\n"
    )
    work = tmp_path / "work"

    async def nothing(frac: float, msg: str) -> None:
        pass

    backend = ExecBackend(f"{sys.executable} {script} {keep}", work)
    for i in range(3):
        out = await backend.run({"id": f"t{i}", "title": "x"}, nothing)
        assert out.ok and out.output == str(work / f"t{i}"), out.error
    with trio.fail_after(10):  # removed in the background
        while any(work.iterdir()):
            await trio.sleep(0.02)
    assert_intact(keep)
