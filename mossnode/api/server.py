"""Serve the API app with hypercorn on the daemon's trio loop, on a Unix socket."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from .app import build_app

if TYPE_CHECKING:
    from ..node.daemon import Daemon

log = logging.getLogger("mossnode.api")


async def serve_api(daemon: Daemon, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = daemon.api_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # stale socket of a dead daemon: the state-dir lock is held
    cfg = HyperConfig()
    cfg.bind = [f"unix:{path}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("mossnode.hypercorn")
    cfg.keep_alive_timeout = 30
    old = os.umask(0o177)  # the socket is born 0600; no window where others can connect
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, build_app(daemon), cfg)
            os.umask(old)
            os.chmod(path, daemon.cfg.api_socket_mode)
            task_status.started()
    finally:
        os.umask(old)
