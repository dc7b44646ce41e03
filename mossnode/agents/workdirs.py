"""Removing a run's working directory: a tree its command shaped as it liked.

``shutil.rmtree`` is not made for that: it opens what it found a moment ago without checking
that it is still a directory (a FIFO swapped in blocks the open for good), recurses once per
level (a command can nest a few thousand levels without holding an fd), and crosses into file
systems mounted inside (an unprivileged FUSE mount). Here every directory is opened relative to
its parent with ``O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK`` (so only a real directory is ever
opened, chmodded or entered, and nothing blocks), on the device the tree started on, at most
``MAX_DEPTH`` levels down; what cannot be removed so is left where it is and reported.
"""

from __future__ import annotations

import logging
import os
import stat

import trio

log = logging.getLogger(__name__)

MAX_DEPTH = 64
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def remove_tree(path: str, dev: int) -> bool:
    """Remove the directory ``path`` and everything in it, if it is a directory on device
    ``dev``. True once it is gone; False if something had to stay (then it is left as is)."""
    try:
        top = os.open(path, _OPEN_DIR)
    except FileNotFoundError:
        return True
    except OSError:  # replaced by a symlink or a file: not ours to follow
        return False
    try:
        if os.fstat(top).st_dev != dev or not _empty(top, dev, 1):
            return False
    except OSError:
        return False
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _empty(dfd: int, dev: int, depth: int) -> bool:
    """Remove what the directory open as ``dfd`` holds; False if something had to stay."""
    if depth > MAX_DEPTH:
        return False
    st = os.fstat(dfd)
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:  # made read-only by the command
        os.fchmod(dfd, stat.S_IMODE(st.st_mode) | 0o700)
    with os.scandir(dfd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    whole = True
    for name, is_dir in entries:
        if not is_dir:
            try:
                os.unlink(name, dir_fd=dfd)
                continue
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                pass  # became a directory meanwhile: treated as one below
            except OSError:
                whole = False
                continue
        try:
            sub = os.open(name, _OPEN_DIR, dir_fd=dfd)
        except FileNotFoundError:
            continue
        except OSError:  # no longer a directory, or unreadable
            whole = False
            continue
        try:
            emptied = os.fstat(sub).st_dev == dev and _empty(sub, dev, depth + 1)
        except OSError:
            emptied = False
        finally:
            os.close(sub)
        try:
            if emptied:
                os.rmdir(name, dir_fd=dfd)
            else:
                whole = False
        except FileNotFoundError:
            pass
        except OSError:
            whole = False
    return whole


def remove_later(path: str, dev: int) -> None:
    """Remove ``path``: at once if it is an empty directory (the common case, one ``rmdir``),
    else in a worker thread, from a system task: the run's outcome does not wait for it, and a
    failure is logged, never raised."""
    try:
        os.rmdir(path)  # refuses a symlink, a non-empty directory and a mount point
        return
    except FileNotFoundError:
        return
    except OSError:
        pass

    async def remove() -> None:
        try:
            gone = await trio.to_thread.run_sync(
                remove_tree,
                path,
                dev,
                # (mypy mistakes the keyword for one of the TypeVarTuple arguments)
                abandon_on_cancel=True,  # type: ignore[call-arg]
            )
        except Exception as exc:  # a cleanup must never take the daemon down
            log.warning("cannot remove working directory %s: %s", path, exc)
            return
        if not gone:
            log.warning("working directory %s left in place: its command made it unremovable", path)

    trio.lowlevel.spawn_system_task(remove)
