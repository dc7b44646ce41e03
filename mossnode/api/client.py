"""A small synchronous client of the local API over its Unix socket, used by the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class ClientError(Exception):
    """The daemon refused the request or could not be reached; the message is for the user."""


class ApiClient:
    def __init__(
        self,
        socket_path: Path,
        timeout: float = 30.0,
        token: str | None = None,
        as_agent: str | None = None,
    ) -> None:
        self.socket_path = socket_path
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if as_agent and not token:
            headers["X-Mossnode-Agent"] = as_agent  # honoured only for the operator's own uid
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://mossnode",
            timeout=timeout,
            headers=headers,
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not self.socket_path.exists():
            raise ClientError(
                f"no mossnode daemon is running (no socket at {self.socket_path}); "
                "start one with `mossnode run`"
            )
        try:
            resp = self._client.request(method, path, json=body)
        except httpx.ConnectError:
            raise ClientError(
                f"no mossnode daemon answers at {self.socket_path}; start one with `mossnode run`"
            ) from None
        except httpx.TimeoutException:
            raise ClientError("the daemon did not answer in time") from None
        try:
            data = resp.json()
        except ValueError:
            raise ClientError(f"daemon answered {resp.status_code} without JSON") from None
        if resp.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ClientError(err.get("message") or f"daemon answered {resp.status_code}")
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
