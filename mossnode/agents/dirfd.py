"""Directories opened by descriptor, one plain name at a time, never through a symlink or across
a mount: how the daemon and the sweeper reach the directories a run could have tampered with.
(No trio here: the sweeper process imports this, and starts in a fraction of the time.)"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets

TRASH = ".trash"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# openat2(2): resolve without symlinks, without crossing a mount, without leaving the start
_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
_RESOLVE = 0x01 | 0x04 | 0x08  # RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works = True


def open_dir(dir_fd: int, name: str) -> int:
    """The directory ``name`` directly beneath ``dir_fd``: never through a symlink, and (with
    openat2, Linux 5.6+) never across a mount point, so a mount hung by its server is refused
    before it is touched. OSError otherwise."""
    global _openat2_works
    if "/" in name or name in ("", ".", ".."):
        raise OSError(errno.EINVAL, f"not a plain name: {name!r}")
    if _openat2_works:
        how = _OpenHow(DIR_FLAGS, 0, _RESOLVE)
        fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(name), ctypes.byref(how), 24)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter without it
            raise OSError(err, f"{os.strerror(err)}: {name!r}")
        _openat2_works = False
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    if _mount_id(fd) != _mount_id(dir_fd):  # what RESOLVE_NO_XDEV refuses, checked after
        os.close(fd)
        raise OSError(errno.EXDEV, f"a mount point: {name!r}")
    return fd


def _mount_id(fd: int) -> str | None:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next((line.split()[1] for line in f if line.startswith("mnt_id:")), None)


def open_trash(agent: int) -> int:
    """The agent's ``.trash`` (made if missing), opened as :func:`open_dir` opens."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(TRASH, 0o700, dir_fd=agent)
    return open_dir(agent, TRASH)


def to_trash(agent: int, name: str, trash: int) -> None:
    """Rename ``name`` (beneath ``agent``) into ``trash`` under a random suffix: the command
    cannot have made that name there to make the rename fail; a rename never follows a
    symlink put in place, nor moves a mount point."""
    os.rename(name, f"{name}.{secrets.token_hex(4)}", src_dir_fd=agent, dst_dir_fd=trash)


def has_leftovers(work: int, agent_name: str) -> bool:
    """Does the agent directory hold anything but an empty ``.trash`` (a sweep's work)?
    Descriptor reads only, nothing stat'ed: safe on the event loop. True if it cannot tell
    (the sweeper then says why)."""
    try:
        return _has_leftovers(work, agent_name)
    except OSError:
        return True


def _has_leftovers(work: int, agent_name: str) -> bool:
    agent = open_dir(work, agent_name)
    try:
        names = os.listdir(agent)
        if any(n != TRASH for n in names):
            return True
        if not names:
            return False
        trash = open_dir(agent, TRASH)
        try:
            return bool(os.listdir(trash))
        finally:
            os.close(trash)
    finally:
        os.close(agent)
