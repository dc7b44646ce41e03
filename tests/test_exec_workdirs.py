"""The exec backend's working directories (reused, emptied slots), command lookup cache, and
its pipes and exit wait with and without pidfds."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest
import trio

from mossnode.agents.exec import ExecBackend, ExecLimits

# Leaves files, a read-only subtree and a symlink out of its directory behind, and reports
# what it found on arrival, where it is and its HOME/TMPDIR.
LITTER = """
import json, os, sys, time
t = json.load(sys.stdin)
seen = sorted(os.listdir("."))
open("mine-" + t["id"], "w").write("x")
os.makedirs("deep/er", exist_ok=True)
open("deep/er/f", "w").write("x")
os.chmod("deep/er", 0o500)
os.chmod("deep", 0o500)
os.symlink(sys.argv[1], "outside")
time.sleep(float(t["input"] or 0))
print(json.dumps({"seen": seen, "cwd": os.getcwd(), "home": os.environ["HOME"],
                  "tmp": os.environ["TMPDIR"]}))
"""


def litter(tmp: Path) -> str:
    p = tmp / "litter.py"
    p.write_text(LITTER)
    keep = tmp / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    return f"{sys.executable} {p} {keep}"


def task(i: int, sleep: float = 0.0) -> dict:
    return {"id": f"t{i}", "title": "x", "input": sleep}


async def nothing(frac: float, msg: str) -> None:
    pass


def assert_only_empty_slots(work: Path) -> None:
    for entry in work.iterdir():
        assert entry.name.startswith("slot."), entry
        assert entry.is_dir() and not entry.is_symlink()
        assert list(entry.iterdir()) == [], entry
        assert stat.S_IMODE(entry.stat().st_mode) == 0o700


async def test_runs_leave_nothing_and_see_nothing(tmp_path: Path) -> None:
    cmd = litter(tmp_path)
    work = tmp_path / "w"
    for i in range(5):
        out = await ExecBackend(cmd, work).run(task(i), nothing)
        assert out.ok, out.error
        assert out.output["seen"] == [], "a run saw what an earlier one left"
        assert out.output["cwd"] == out.output["home"] == out.output["tmp"]
        assert Path(out.output["cwd"]).parent == work
    assert [p.name for p in work.iterdir()] == ["slot.0"]  # one run at a time: one slot
    assert_only_empty_slots(work)
    assert (tmp_path / "keep" / "precious").exists()  # the symlink was not followed


async def test_concurrent_runs_get_their_own_directories(tmp_path: Path) -> None:
    cmd = litter(tmp_path)
    work = tmp_path / "w"
    outs: list = []

    async def one(i: int) -> None:
        outs.append(await ExecBackend(cmd, work).run(task(i, 0.5), nothing))

    for _ in range(2):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert all(o.output["seen"] == [] for o in outs)
    first, second = [{o.output["cwd"] for o in outs[k : k + 3]} for k in (0, 3)]
    assert len(first) == 3 and len(second) == 3  # never shared while running
    assert first == second  # and reused afterwards
    assert_only_empty_slots(work)


async def test_failed_timed_out_and_cancelled_runs_are_cleaned(tmp_path: Path) -> None:
    work = tmp_path / "w"
    p = tmp_path / "a.py"
    p.write_text("import os, time; open('junk', 'w').write('x'); os.mkdir('d'); time.sleep(30)")
    cmd = f"{sys.executable} {p}"
    out = await ExecBackend(cmd, work, ExecLimits(timeout_s=1.0)).run(task(0), nothing)
    assert not out.ok and "timed out" in out.error
    assert_only_empty_slots(work)
    with trio.move_on_after(1.0):
        await ExecBackend(cmd, work).run(task(1), nothing)
    assert_only_empty_slots(work)


async def test_slot_moved_or_chmodded_by_the_command(tmp_path: Path) -> None:
    """A command that makes its directory unwritable, or moves it away, does not break the next
    run, which gets an empty, private directory."""
    work = tmp_path / "w"
    p = tmp_path / "a.py"
    p.write_text(
        "import json, os, sys\n"
        "t = json.load(sys.stdin)\n"
        "seen = sorted(os.listdir('.'))\n"
        "open('f', 'w').write('x')\n"
        "if t['input'] == 'chmod': os.chmod('.', 0o500)\n"
        "if t['input'] == 'move': os.rename(os.getcwd(), os.getcwd() + '.moved')\n"
        "print(json.dumps({'seen': seen, 'cwd': os.getcwd()}))\n"
    )
    cmd = f"{sys.executable} {p}"
    for how in ("chmod", "move", "none"):
        out = await ExecBackend(cmd, work).run({"id": how, "input": how}, nothing)
        assert out.ok, out.error
        assert out.output["seen"] == [], how
    moved = work / "slot.0.moved"
    assert list(moved.iterdir()) == []  # emptied all the same, then never used again
    moved.rmdir()
    assert_only_empty_slots(work)


async def test_leftovers_of_an_earlier_process_are_removed(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "slot.0" / "sub").mkdir(parents=True)
    (work / "slot.0" / "sub" / "old").write_text("x")
    (work / "slot.0" / "old").write_text("x")
    cmd = litter(tmp_path)
    out = await ExecBackend(cmd, work).run(task(0), nothing)
    assert out.ok, out.error
    assert out.output["seen"] == []
    assert_only_empty_slots(work)


async def test_slot_held_elsewhere_is_skipped(tmp_path: Path) -> None:
    """A slot flocked by another holder (another process on the same workdir) is not used."""
    import fcntl

    work = tmp_path / "w"
    (work / "slot.0").mkdir(parents=True)
    fd = os.open(work / "slot.0", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = await ExecBackend(litter(tmp_path), work).run(task(0), nothing)
        assert out.ok, out.error
        assert out.output["cwd"] != str(work / "slot.0")
    finally:
        os.close(fd)


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
