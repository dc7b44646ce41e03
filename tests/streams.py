"""Following a daemon's event stream from a test, in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mossnode.api.client import ApiClient
from mossnode.cluster import wait_for


class Follow:
    """Collects the events of ``GET /v1/events`` as one caller (a token, or the operator)."""

    def __init__(self, node: Any, token: str | None = None, **query: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.client = ApiClient(node.state_dir / "api.sock", token=token)
        self.thread = threading.Thread(target=self._run, args=(query,), daemon=True)
        self.thread.start()

    def _run(self, query: dict[str, Any]) -> None:
        try:
            for ev in self.client.events(**query):
                self.events.append(ev)
        except Exception as exc:  # the daemon stopped: the test reads self.error if it cares
            self.error = exc

    def wait(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
    ) -> dict[str, Any]:
        return dict(
            wait_for(lambda: next((e for e in list(self.events) if pred(e)), None), timeout, what)
        )
