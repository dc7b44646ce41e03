"""Starlette app for the local API. Errors are ``{"error": {"code", "message"}}`` with 4xx/5xx.

Every handler validates its input before touching the daemon, so a bad request changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import __version__

if TYPE_CHECKING:
    from ..node.daemon import Daemon

Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 1 << 20:
        raise ApiError(413, "too_large", "request body over 1 MiB")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise ApiError(400, "missing_field", f"field {name!r} is required")
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ApiError(400, "bad_field", f"field {name!r} must be {kind.__name__}")
    return value


def build_app(daemon: Daemon) -> Starlette:
    from ..node.daemon import DaemonError

    def wrap(fn: Handler) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return error(exc.status, exc.code, exc.message)
            except DaemonError as exc:
                return error(exc.status, exc.code, str(exc))

        return handler

    async def status(request: Request) -> Response:
        return JSONResponse(daemon.status())

    async def peers(request: Request) -> Response:
        return JSONResponse(daemon.peers())

    async def decisions(request: Request) -> Response:
        return JSONResponse(daemon.decisions())

    async def invites(request: Request) -> Response:
        body = await json_body(request)
        roles = field(body, "roles", list)
        if not roles or not all(isinstance(r, str) for r in roles):
            raise ApiError(400, "bad_field", "field 'roles' must be a non-empty list of role names")
        ttl = field(body, "ttl_s", float, 3600.0)
        return JSONResponse(await daemon.create_invite(roles, float(ttl)), status_code=201)

    async def join(request: Request) -> Response:
        body = await json_body(request)
        addr = field(body, "addr", str)
        token = field(body, "invite", str)
        timeout = float(field(body, "timeout_s", float, 30.0))
        if not 0 < timeout <= 600:
            raise ApiError(400, "bad_field", "timeout_s must be in (0, 600]")
        return JSONResponse(await daemon.join(addr, token, timeout))

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(daemon.metrics_text(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(routes))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "not_found", f"no such endpoint: {request.method} {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(
            405, "method_not_allowed", f"{request.method} not allowed on {request.url.path}"
        )

    routes = [
        Route("/v1/status", wrap(status), methods=["GET"], name="Status of this node"),
        Route("/v1/peers", wrap(peers), methods=["GET"], name="Members and their health"),
        Route("/v1/decisions", wrap(decisions), methods=["GET"], name="The decided log"),
        Route("/v1/invites", wrap(invites), methods=["POST"], name="Create an invite"),
        Route("/v1/join", wrap(join), methods=["POST"], name="Join a swarm through a peer"),
        Route("/v1/metrics", wrap(metrics), methods=["GET"], name="Prometheus metrics"),
        Route("/v1/openapi.json", wrap(openapi), methods=["GET"], name="This document"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_allowed},
    )


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        for m in sorted((r.methods or set()) - {"HEAD"}):
            paths.setdefault(r.path, {})[m.lower()] = {
                "summary": r.name,
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {}}},
                    "4XX": {"description": "error object {error: {code, message}}"},
                },
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mossnode local API", "version": __version__},
        "paths": paths,
    }
