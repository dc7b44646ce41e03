"""A small synchronous client of the local API over its Unix socket, used by the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

IDLE_S = 60.0  # the daemon comments every ~15 s on an idle stream; this much silence is death


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
        self._args = (timeout, token, as_agent)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if as_agent and not token:
            headers["X-Mossnode-Agent"] = as_agent  # honoured only for the operator's own uid
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://mossnode",
            timeout=timeout,
            headers=headers,
        )

    def clone(self) -> ApiClient:
        """Another client for the same caller, with its own connections (e.g. for a thread)."""
        return ApiClient(self.socket_path, *self._args)

    def _check_socket(self) -> None:
        if not self.socket_path.exists():
            raise ClientError(
                f"no mossnode daemon is running (no socket at {self.socket_path}); "
                "start one with `mossnode run`"
            )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self._check_socket()
        try:
            resp = self._client.request(method, path, json=body)
        except httpx.ConnectError:
            raise ClientError(
                f"no mossnode daemon answers at {self.socket_path}; start one with `mossnode run`"
            ) from None
        except httpx.TimeoutException:
            raise ClientError("the daemon did not answer in time") from None
        return _decode(resp)

    def events(
        self, since: int | None = None, types: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Follow ``GET /v1/events``: each event as ``{"id", "type", "at", "data"}``. When the
        daemon drops this client for falling behind, resume where it stopped (the ``dropped``
        event is yielded first, so the caller sees it happened)."""
        while True:
            resume: int | None = None
            for ev in self._event_stream(since, types):
                yield ev
                if ev["type"] == "dropped":
                    resume = ev["data"].get("resume_from")
            if resume is None:
                raise ClientError("the daemon closed the event stream")
            since = resume

    def _event_stream(self, since: int | None, types: list[str] | None) -> Iterator[dict[str, Any]]:
        self._check_socket()
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = str(since)
        if types:
            params["types"] = ",".join(types)
        timeout = httpx.Timeout(self._client.timeout.connect or 30.0, read=IDLE_S)
        try:
            with self._client.stream("GET", "/v1/events", params=params, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    _decode(r)
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        try:
                            yield json.loads("\n".join(data))
                        except ValueError:
                            raise ClientError("the daemon sent an unreadable event") from None
                        data = []
        except httpx.ConnectError:
            raise ClientError(
                f"no mossnode daemon answers at {self.socket_path}; start one with `mossnode run`"
            ) from None
        except httpx.ReadTimeout:
            raise ClientError(f"the event stream was silent for {IDLE_S:g} s") from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            raise ClientError("the daemon closed the event stream") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _decode(resp: httpx.Response) -> Any:
    try:
        data = resp.json()
    except ValueError:
        raise ClientError(f"daemon answered {resp.status_code} without JSON") from None
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise ClientError(err.get("message") or f"daemon answered {resp.status_code}")
    return data
