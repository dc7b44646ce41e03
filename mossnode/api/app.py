"""The local API as an ASGI app. Every endpoint names the permission it needs.

Errors are ``{"error": {"code", "message", "details"?}}`` with a 4xx/5xx status. Input is fully
validated before the daemon is touched, and authorization happens before that, so a refused
request changes nothing.

Requests and responses are Starlette's; routing is a table lookup here instead of Starlette's
middleware stack and linear regex router, which cost a measurable share of every call.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .. import __version__
from ..node.agents import Agent, AgentError
from ..node.events import TYPES as EVENT_TYPES
from ..node.events import EventHub, Subscriber, pump
from ..node.messaging import MessagingError
from ..node.tasks import WorkRefused
from ..protocols import rbac
from ..protocols.roles import BUILTIN_ROLES
from ..protocols.tasks.confidential import check_roles
from ..protocols.tasks.contract import STORE_DEPTH, storable, validate
from ..protocols.tasks.schedules import SCHEDULE_REMOVE
from . import schemas as S

if TYPE_CHECKING:
    from ..node.daemon import Daemon

log = logging.getLogger("mossnode.api")
Handler = Callable[[Request], Awaitable[Response]]
PUBLIC = ""  # permission of routes anyone who can open the socket may call
PRINCIPAL = "mossnode.principal"  # scope keys: who is calling, and as which agent if any
AGENT = "mossnode.agent"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class JSONResponse(Response):
    """Starlette's JSONResponse without its per-call costs: one shared encoder, headers
    built directly."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200) -> None:
        self.status_code = status_code
        self.background = None
        self.body = _ENCODE(content).encode()
        self.raw_headers = [
            (b"content-length", str(len(self.body)).encode()),
            (b"content-type", b"application/json"),
        ]


def header(request: Request, name: bytes) -> str | None:
    """One request header (the server lower-cases names), without building a Headers map."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def decimal(raw: str) -> int | None:
    """A non-negative id written in ASCII digits that fits 64 bits, else None. ``str.isdigit``
    alone lets through other scripts' digits ("²", which ``int`` refuses) and numbers too long
    for ``int`` to read."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
        return None
    value = int(raw)
    return value if value < 1 << 64 else None


def error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return JSONResponse({"error": err}, status_code=status)


# scope key: the request's parsed body (the guard checks it, then the handler reads it)
BODY = "mossnode.body"


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object (400 otherwise), parsed once per request."""
    parsed: dict[str, Any] | None = request.scope.get(BODY)
    if parsed is not None:
        return parsed
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
        # a lone surrogate (``"\\ud800"``) parses but cannot be stored or answered as UTF-8
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    request.scope[BODY] = body
    return body


def check_body(body: dict[str, Any], schema: S.Schema) -> None:
    """A body against its endpoint's schema: 400 naming the first offending field. Values
    must also be storable as they are (numbers in range, bounded nesting), whatever field."""
    bad = storable(body, max_depth=STORE_DEPTH + 1) or validate(body, schema)
    if bad is not None:
        code = "missing_field" if bad.message.startswith("missing required") else "bad_field"
        raise ApiError(400, code, f"invalid request body {bad}", {"path": bad.path})


def check_query(request: Request, schema: S.Schema) -> None:
    """Query parameters against the endpoint's query schema (integers parsed first)."""
    props = schema.get("properties", {})
    args: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name in args:
            raise ApiError(400, "bad_field", f"query parameter {name!r} given twice")
        want = props.get(name, {}).get("type")
        if want in ("integer", "number"):
            try:
                num = int(value) if want == "integer" else float(value)
                args[name] = num if len(value) <= 20 else value
            except ValueError:
                args[name] = value
        else:
            args[name] = value
    bad = validate(args, schema)
    if bad is not None:
        raise ApiError(400, "bad_field", f"invalid query {bad}", {"path": bad.path})


def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """Typed field lookup; a missing or mistyped field is a 400 naming it."""
    if name not in body:
        if default is ...:
            raise ApiError(400, "missing_field", f"field {name!r} is required")
        return default
    value = body[name]
    numeric = kind in (int, float) and isinstance(value, bool)
    ok = isinstance(value, kind) and not numeric
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ApiError(400, "bad_field", f"field {name!r} must be {kind.__name__}")
    return value


def str_list(body: dict[str, Any], name: str, required: bool = True) -> list[str]:
    value = field(body, name, list, ... if required else [])
    if not all(isinstance(v, str) for v in value) or (required and not value):
        raise ApiError(400, "bad_field", f"field {name!r} must be a non-empty list of strings")
    return list(value)


CONTRACT_FIELDS: dict[str, tuple[type, ...]] = {
    "input_schema": (dict,),
    "output_schema": (dict,),
    "deadline_ms": (int,),
    "max_attempts": (int,),
    "review_required": (bool,),
    "exclusive": (bool,),
    "max_rounds": (int,),
    "cost": (int, float),
    "budget": (int, float),
}


def check_contract(contract: dict[str, Any]) -> None:
    """Refuse unknown or mistyped contract fields instead of silently defaulting them."""
    for key, value in contract.items():
        kinds = CONTRACT_FIELDS.get(key)
        if kinds is None:
            raise ApiError(
                400,
                "bad_field",
                f"unknown contract field {key!r}; known: " + ", ".join(CONTRACT_FIELDS),
            )
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if value is not None and (not isinstance(value, kinds) or wrong_bool):
            raise ApiError(400, "bad_field", f"contract.{key} has the wrong type")
        positive = key in ("deadline_ms", "max_attempts", "max_rounds")
        if positive and isinstance(value, int) and value < 1:
            raise ApiError(400, "bad_field", f"contract.{key} must be >= 1")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    permission: str
    summary: str
    handler: Handler
    body: S.Schema | None = None  # JSON Schema of the request body (POST), enforced
    query: S.Schema | None = None  # JSON Schema of the query parameters, enforced
    media: str = "application/json"  # of the response


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


class EventStream(Response):
    """``text/event-stream`` of one subscriber, until the client leaves or is dropped."""

    def __init__(self, hub: EventHub, sub: Subscriber, keepalive_s: float) -> None:
        self.hub, self.sub, self.keepalive_s = hub, sub, keepalive_s
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
        ]

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                await pump(self.sub, write, self.keepalive_s)
            except trio.TooSlowError:
                return  # a stalled client: the connection is closed without the last chunk
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.hub.unsubscribe(self.sub)


class Router:
    """Endpoints by method and path; ``{name}`` segments match one non-empty segment."""

    def __init__(self, endpoints: list[Endpoint], wrap: Callable[[Endpoint], Handler]) -> None:
        self.static: dict[str, dict[str, Handler]] = {}
        self.templates: list[tuple[tuple[str, ...], dict[str, Handler]]] = []
        for ep in endpoints:
            parts = tuple(ep.path.split("/"))
            if any(p.startswith("{") for p in parts):
                for tpl, methods in self.templates:
                    if tpl == parts:
                        methods[ep.method] = wrap(ep)
                        break
                else:
                    self.templates.append((parts, {ep.method: wrap(ep)}))
            else:
                self.static.setdefault(ep.path, {})[ep.method] = wrap(ep)

    def match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        methods = self.static.get(path)
        if methods is not None:
            return methods, {}
        parts = path.split("/")
        for tpl, methods in self.templates:
            if len(tpl) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(tpl, parts, strict=True):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, params
        return None


def build_app(daemon: Daemon) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    from ..node.daemon import DaemonError

    principals: dict[tuple[str, frozenset[str], frozenset[str]], rbac.Principal] = {}

    def as_agent(request: Request, agent: Any, node_roles: frozenset[str]) -> rbac.Principal:
        request.scope[AGENT] = agent
        if daemon.tasks is not None:
            daemon.tasks.seen(agent.name)
        key = (agent.name, frozenset(agent.roles), node_roles)
        if key not in principals:
            remember(key, rbac.agent(agent.name, key[1], node_roles))
        return principals[key]

    def remember(key: tuple[str, frozenset[str], frozenset[str]], who: rbac.Principal) -> None:
        if len(principals) >= 1024:
            principals.clear()
        principals[key] = who

    def principal(request: Request) -> rbac.Principal | None:
        """Who calls: an agent by its bearer token, else the operator by its kernel-reported
        uid. Principals are memoized per (name, roles, node roles): all three are in the key,
        so a role change (of the agent or of the node) is a new principal."""
        node_roles = frozenset(daemon.node_roles())
        auth = header(request, b"authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            agent = daemon.agents.by_token(token.strip())
            if agent is None:
                return None
            return as_agent(request, agent, node_roles)
        cred = request.scope.get("extensions", {}).get("peer_cred")
        if cred and cred["uid"] in daemon.operator_uids:
            acting = header(request, b"x-mossnode-agent")
            if acting:
                # The operator binds a process (e.g. `mossnode mcp --agent NAME`) to one of its
                # agents: that process then has the agent's permissions, never the operator's.
                bound = daemon.agents.agents.get(acting)
                if bound is None:
                    return None
                return as_agent(request, bound, node_roles)
            op: tuple[str, frozenset[str], frozenset[str]] = (
                f"uid:{cred['uid']}",
                frozenset(),
                node_roles,
            )
            if op not in principals:
                remember(op, rbac.operator(cred["uid"], node_roles))
            return principals[op]
        return None

    def guarded(ep: Endpoint) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                if ep.permission != PUBLIC:
                    who = principal(request)
                    denial = rbac.check(who, ep.permission)
                    if denial is not None:
                        daemon.counters[f"api_denied:{ep.permission}"] += 1
                        log.info("denied %s %s: %s", ep.method, ep.path, denial.message)
                        return error(
                            denial.status,
                            denial.code,
                            denial.message,
                            {"permission": denial.permission},
                        )
                    request.scope[PRINCIPAL] = who
                if ep.body is not None:
                    check_body(await json_body(request), ep.body)
                if ep.query is not None:
                    check_query(request, ep.query)
                return await ep.handler(request)
            except ApiError as exc:
                return error(exc.status, exc.code, exc.message, exc.details)
            except (DaemonError, AgentError, MessagingError, WorkRefused) as exc:
                status = getattr(exc, "status", 400)
                return error(status, getattr(exc, "code", "bad_request"), str(exc))

        return handler

    def calling_agent(request: Request) -> str:
        """The agent a work endpoint acts for: only ever the caller itself."""
        agent = request.scope.get(AGENT)
        if agent is None:
            raise ApiError(
                400,
                "agent_required",
                "only an agent acts on its work: present its token (or X-Mossnode-Agent)",
            )
        return str(agent.name)

    def work_tasks() -> Any:
        return daemon._tasks()

    async def status(request: Request) -> Response:
        return JSONResponse(daemon.status())

    async def whoami(request: Request) -> Response:
        who: rbac.Principal = request.scope[PRINCIPAL]
        return JSONResponse(
            {
                "kind": who.kind,
                "name": who.name,
                "roles": sorted(who.roles),
                "permissions": sorted(who.permissions),
            }
        )

    async def peers(request: Request) -> Response:
        return JSONResponse(daemon.peers())

    async def decisions(request: Request) -> Response:
        return JSONResponse(daemon.decisions())

    async def invites(request: Request) -> Response:
        body = await json_body(request)
        roles = str_list(body, "roles")
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

    async def agents_list(request: Request) -> Response:
        return JSONResponse([a.public() for a in daemon.agents.agents.values()])

    async def agents_add(request: Request) -> Response:
        body = await json_body(request)
        agent, token = daemon.agents.add(
            field(body, "name", str),
            str_list(body, "roles"),
            str_list(body, "capabilities", required=False),
            field(body, "backend", str),
            int(field(body, "max_concurrency", int, 1)),
        )
        daemon.agents_changed()
        return JSONResponse({**agent.public(), "token": token}, status_code=201)

    async def agents_show(request: Request) -> Response:
        return JSONResponse(daemon.agents.get(request.path_params["name"]).public())

    async def agents_remove(request: Request) -> Response:
        agent = daemon.agents.remove(request.path_params["name"])
        daemon.agents_changed()
        return JSONResponse({"removed": agent.name})

    async def agents_rotate(request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse({"name": name, "token": daemon.agents.rotate(name)})

    async def tasks_submit(request: Request) -> Response:
        body = await json_body(request)
        title = field(body, "title", str)
        if not title.strip() or len(title) > 500:
            raise ApiError(400, "bad_field", "field 'title' must be 1-500 characters")
        draft = {
            "title": title,
            "spec": field(body, "spec", str, ""),
            "input": body.get("input"),
            "capabilities": str_list(body, "capabilities", required=False),
            "deps": str_list(body, "after", required=False),
            "parent": field(body, "parent", str, None) if body.get("parent") is not None else None,
            "role": field(body, "role", str, None) if body.get("role") is not None else None,
            "priority": float(field(body, "priority", float, 0.0)),
            "contract": field(body, "contract", dict, None)
            if body.get("contract") is not None
            else None,
        }
        if draft["contract"] is not None:
            check_contract(draft["contract"])
        secret = body.get("confidential")
        if secret is not None:
            if not isinstance(secret, dict) or set(secret) != {"roles"}:
                raise ApiError(400, "bad_field", "field 'confidential' must be {\"roles\": [...]}")
            bad = check_roles(secret["roles"])
            if bad is not None:
                raise ApiError(400, "bad_field", f"confidential: {bad}")
            draft["confidential"] = sorted(set(secret["roles"]))
        return JSONResponse(await daemon.submit_task(draft), status_code=201)

    async def schedules_add(request: Request) -> Response:
        body = await json_body(request)
        contract = body["task"].get("contract")
        if contract is not None:
            check_contract(contract)
        added = await daemon.add_schedule(body, timeout_field(body))
        return JSONResponse(added, status_code=201)

    async def schedules_list(request: Request) -> Response:
        return JSONResponse(daemon.list_schedules())

    async def schedules_remove(request: Request) -> Response:
        return await decision(SCHEDULE_REMOVE, {"id": request.path_params["id"]}, {})

    async def tasks_list(request: Request) -> Response:
        state = request.query_params.get("state")
        return JSONResponse(daemon.list_tasks(state))

    def reader(request: Request) -> frozenset[str]:
        """Roles that let a caller read confidential values: an agent's roles that its node
        holds. The operator reads none (it can act as one of its agents to read)."""
        who: rbac.Principal = request.scope[PRINCIPAL]
        if who.kind != "agent":
            return frozenset()
        return who.roles & frozenset(daemon.node_roles())

    async def tasks_show(request: Request) -> Response:
        return JSONResponse(daemon.show_task(request.path_params["id"], reader(request)))

    def control(verb: str) -> Handler:
        async def handler(request: Request) -> Response:
            body = await json_body(request)
            reason = field(body, "reason", str, "")
            result = await daemon.control_task(request.path_params["id"], verb, reason)
            return JSONResponse(result)

        return handler

    async def decision(kind: str, payload: dict[str, Any], body: dict[str, Any]) -> Response:
        """Decide one decision through consensus; answers its seq and kind."""
        entry = await daemon.decide(kind, payload, timeout_field(body))
        return JSONResponse({"seq": entry.seq, "kind": entry.kind})

    def swarm_decision(kind: str) -> Handler:
        async def handler(request: Request) -> Response:
            return await decision(kind, {}, {})

        return handler

    def member_key(request: Request) -> bytes:
        member = daemon._swarm().by_peer_id(request.path_params["peer_id"])
        if member is None:
            raise ApiError(404, "not_found", "no member with that peer id")
        return bytes(member.public_key)

    def role_field(role: str) -> str:
        if role not in BUILTIN_ROLES:
            raise ApiError(400, "bad_field", f"unknown role {role!r}")
        return role

    async def roles_grant(request: Request) -> Response:
        key, body = member_key(request), await json_body(request)
        role = role_field(field(body, "role", str))
        return await decision("grant", {"public_key": key, "role": role}, body)

    async def roles_revoke(request: Request) -> Response:
        key = member_key(request)
        role = role_field(request.path_params["role"])
        return await decision("revoke", {"public_key": key, "role": role}, {})

    async def members_remove(request: Request) -> Response:
        return await decision("remove", {"public_key": member_key(request)}, {})

    def vote_id(request: Request) -> int:
        seq = decimal(request.path_params["id"])
        if seq is None or seq < 1:
            raise ApiError(400, "bad_field", "a vote id is the seq of its decision (>= 1)")
        return seq

    def timeout_field(body: dict[str, Any]) -> float:
        timeout = float(field(body, "timeout_s", float, 30.0))
        if not 0 < timeout <= 600:
            raise ApiError(400, "bad_field", "timeout_s must be in (0, 600]")
        return timeout

    async def votes_open(request: Request) -> Response:
        body = await json_body(request)
        rule = field(body, "rule", str, "majority")
        if rule not in ("majority", "reputation"):
            raise ApiError(400, "bad_field", "rule must be majority or reputation")
        title = field(body, "title", str)
        if not title.strip() or len(title) > 200:
            raise ApiError(400, "bad_field", "field 'title' must be 1-200 characters")
        text = field(body, "text", str, "")
        if len(text) > 4000:
            raise ApiError(400, "bad_field", "field 'text' must be at most 4000 characters")
        vote = await daemon.open_vote(rule, title, text, timeout_field(body))
        return JSONResponse(vote, status_code=201)

    async def votes_cast(request: Request) -> Response:
        vid = vote_id(request)
        body = await json_body(request)
        choice = field(body, "choice", str)
        if choice not in ("yes", "no"):
            raise ApiError(400, "bad_field", "choice must be yes or no")
        return JSONResponse(await daemon.cast_vote(vid, choice, timeout_field(body)))

    async def votes_close(request: Request) -> Response:
        vid = vote_id(request)
        body = await json_body(request)
        return JSONResponse(await daemon.close_vote(vid, timeout_field(body)))

    async def votes_list(request: Request) -> Response:
        return JSONResponse(daemon.list_votes())

    async def votes_show(request: Request) -> Response:
        return JSONResponse(daemon.vote_view(vote_id(request)))

    async def leaderboard(request: Request) -> Response:
        return JSONResponse(daemon.leaderboard())

    async def activity(request: Request) -> Response:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            raise ApiError(400, "bad_field", "since must be an integer (ms)") from None
        return JSONResponse(daemon.activity(since))

    # --- agent messaging ----------------------------------------------------------------

    def acting_agent(request: Request) -> Agent:
        agent: Agent | None = request.scope.get(AGENT)
        if agent is None:
            raise ApiError(
                400,
                "agent_required",
                "messages are sent and read as an agent: use its token, or bind one with "
                "X-Mossnode-Agent (`mossnode msg --agent NAME`)",
            )
        return agent

    def query_number(request: Request, name: str, default: float, low: float, high: float) -> float:
        raw = request.query_params.get(name)
        try:
            value = float(raw) if raw is not None else default
        except ValueError:
            raise ApiError(400, "bad_field", f"{name} must be a number") from None
        if not low <= value <= high:
            raise ApiError(400, "bad_field", f"{name} must be in [{low:g}, {high:g}]")
        return value

    def message_body(body: dict[str, Any]) -> Any:
        if "body" not in body:
            raise ApiError(400, "missing_field", "field 'body' is required (any JSON value)")
        return body["body"]

    async def messages_send(request: Request) -> Response:
        agent = acting_agent(request)
        body = await json_body(request)
        to = field(body, "to", str)
        node = field(body, "node", str, None) if body.get("node") is not None else None
        timeout = float(field(body, "timeout_s", float, 30.0))
        if not 0 < timeout <= 300:
            raise ApiError(400, "bad_field", "timeout_s must be in (0, 300]")
        payload = message_body(body)
        return JSONResponse(await daemon.messaging.request(agent, to, node, payload, timeout))

    async def messages_read(request: Request) -> Response:
        agent = acting_agent(request)
        after = int(query_number(request, "after", 0, 0, 2**53))
        wait = query_number(request, "wait_s", 0, 0, 300)
        limit = int(query_number(request, "limit", 100, 1, 1000))
        return JSONResponse(await daemon.messaging.read(agent, after, wait, limit))

    async def messages_reply(request: Request) -> Response:
        agent = acting_agent(request)
        body = await json_body(request)
        payload = message_body(body)
        mid = request.path_params["id"]
        return JSONResponse(await daemon.messaging.reply(agent, mid, payload))

    async def topics_list(request: Request) -> Response:
        return JSONResponse(daemon.messaging.topics(acting_agent(request)))

    def topic_action(verb: str) -> Handler:
        async def handler(request: Request) -> Response:
            agent = acting_agent(request)
            name = request.path_params["name"]
            if verb == "publish":
                payload = message_body(await json_body(request))
                return JSONResponse(await daemon.messaging.publish(agent, name, payload))
            if verb == "subscribe":
                return JSONResponse(daemon.messaging.subscribe(agent, name))
            return JSONResponse(daemon.messaging.unsubscribe(agent, name))

        return handler

    async def broadcast(request: Request) -> Response:
        agent = acting_agent(request)
        body = await json_body(request)
        role = field(body, "role", str)
        payload = message_body(body)
        return JSONResponse(await daemon.messaging.broadcast(agent, role, payload))

    async def events(request: Request) -> Response:
        raw = request.query_params.get("since") or header(request, b"last-event-id")
        since: int | None = None
        if raw:
            since = decimal(raw.strip())
            if since is None:
                raise ApiError(400, "bad_field", "since / Last-Event-ID must be an event id")
        types: list[str] | None = None
        if request.query_params.get("types"):
            types = [t.strip() for t in request.query_params["types"].split(",") if t.strip()]
            unknown = sorted(set(types) - EVENT_TYPES)
            if unknown:
                raise ApiError(
                    400,
                    "bad_field",
                    f"unknown event type(s) {', '.join(unknown)}; known: "
                    + ", ".join(sorted(EVENT_TYPES)),
                )
        who: rbac.Principal = request.scope[PRINCIPAL]
        agent = request.scope.get(AGENT)
        name = agent.name if agent is not None else None
        sub = daemon.events.subscribe(since, types, name, operator=who.kind == "operator")
        if name is not None and daemon.tasks is not None:
            daemon.tasks.seen(name)
        return EventStream(daemon.events, sub, daemon.cfg.api_keepalive_s)

    async def my_work(request: Request) -> Response:
        return JSONResponse(work_tasks().my_work(calling_agent(request)))

    async def task_claim(request: Request) -> Response:
        agent = calling_agent(request)
        await json_body(request)
        return JSONResponse(await work_tasks().bid(agent, request.path_params["id"]))

    async def task_progress(request: Request) -> Response:
        agent = calling_agent(request)
        body = await json_body(request)
        fraction = (
            field(body, "fraction", float, None) if body.get("fraction") is not None else None
        )
        if fraction is not None and not (math.isfinite(fraction) and 0 <= fraction <= 1):
            raise ApiError(400, "bad_field", "fraction must be a number from 0 to 1")
        message = field(body, "message", str, "")
        if len(message) > 2000:
            raise ApiError(400, "bad_field", "message must be at most 2000 characters")
        if fraction is None and not message:
            raise ApiError(400, "missing_field", "send a fraction, a message, or both")
        tid = request.path_params["id"]
        await work_tasks().progress(agent, tid, fraction, message)
        return JSONResponse({"id": tid, "fraction": fraction, "message": message})

    async def task_submit_work(request: Request) -> Response:
        agent = calling_agent(request)
        body = await json_body(request)
        err = field(body, "error", str, None) if body.get("error") is not None else None
        if err is None and "output" not in body:
            raise ApiError(400, "missing_field", "field 'output' (or 'error') is required")
        if err is not None and ("output" in body or not err.strip() or len(err) > 4000):
            raise ApiError(400, "bad_field", "'error' is 1-4000 characters and excludes 'output'")
        result = await work_tasks().submit(
            agent, request.path_params["id"], body.get("output"), err
        )
        return JSONResponse(result)

    async def task_review(request: Request) -> Response:
        agent = calling_agent(request)
        body = await json_body(request)
        score = field(body, "score", int)
        if not 1 <= score <= 5:
            raise ApiError(400, "bad_field", "score must be an integer from 1 to 5")
        verdict = field(body, "verdict", str)
        if verdict not in ("done", "rework"):
            raise ApiError(400, "bad_field", "verdict must be done or rework")
        comments = field(body, "comments", str, "")
        if len(comments) > 2000:
            raise ApiError(400, "bad_field", "comments must be at most 2000 characters")
        tid = request.path_params["id"]
        return JSONResponse(await work_tasks().review(agent, tid, score, verdict, comments))

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(daemon.metrics_text(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(endpoints))

    endpoints = [
        Endpoint("GET", "/v1/status", "state.read", "Status of this node", status),
        Endpoint("GET", "/v1/whoami", "state.read", "The caller and its permissions", whoami),
        Endpoint("GET", "/v1/peers", "state.read", "Members and their health", peers),
        Endpoint("GET", "/v1/decisions", "state.read", "The decided log", decisions),
        Endpoint("POST", "/v1/invites", "member.invite", "Create an invite", invites, S.INVITE),
        Endpoint("POST", "/v1/join", "swarm.join", "Join a swarm through a member", join, S.JOIN),
        Endpoint("GET", "/v1/agents", "agent.manage", "This host's agents", agents_list),
        Endpoint("POST", "/v1/agents", "agent.manage", "Register an agent", agents_add, S.AGENT),
        Endpoint("GET", "/v1/agents/{name}", "agent.manage", "One agent", agents_show),
        Endpoint("DELETE", "/v1/agents/{name}", "agent.manage", "Remove an agent", agents_remove),
        Endpoint(
            "POST",
            "/v1/agents/{name}/rotate-token",
            "agent.manage",
            "Replace an agent's token",
            agents_rotate,
            S.EMPTY,
        ),
        Endpoint("POST", "/v1/tasks", "task.create", "Create a task", tasks_submit, S.TASK),
        Endpoint(
            "GET",
            "/v1/tasks",
            "state.read",
            "Tasks in the swarm (?state=)",
            tasks_list,
            query=S.TASKS_QUERY,
        ),
        Endpoint("GET", "/v1/tasks/{id}", "state.read", "One task with its log", tasks_show),
        Endpoint(
            "POST",
            "/v1/schedules",
            "task.create",
            "Have the swarm create a task every interval (a consensus decision)",
            schedules_add,
            S.SCHEDULE,
        ),
        Endpoint("GET", "/v1/schedules", "state.read", "Recurring schedules", schedules_list),
        Endpoint(
            "DELETE",
            "/v1/schedules/{id}",
            "task.cancel",
            "Stop a recurring schedule (a consensus decision)",
            schedules_remove,
        ),
        *(
            Endpoint(
                "POST",
                f"/v1/tasks/{{id}}/{verb}",
                f"task.{verb}",
                summary,
                control(verb),
                S.CONTROL,
            )
            for verb, summary in (
                ("cancel", "Cancel a task tree"),
                ("pause", "Pause a task tree"),
                ("resume", "Resume a task tree"),
                ("reassign", "Reassign a task"),
            )
        ),
        Endpoint(
            "POST",
            "/v1/swarm/pause",
            "swarm.pause",
            "Pause all dispatch (kill switch)",
            swarm_decision("pause"),
            S.EMPTY,
        ),
        Endpoint(
            "POST",
            "/v1/swarm/resume",
            "swarm.pause",
            "Resume dispatch",
            swarm_decision("resume"),
            S.EMPTY,
        ),
        Endpoint(
            "POST",
            "/v1/members/{peer_id}/roles",
            "role.grant",
            "Grant a member a role (a consensus decision)",
            roles_grant,
            S.ROLE_GRANT,
        ),
        Endpoint(
            "DELETE",
            "/v1/members/{peer_id}/roles/{role}",
            "role.revoke",
            "Revoke a member's role (a consensus decision)",
            roles_revoke,
        ),
        Endpoint(
            "DELETE",
            "/v1/members/{peer_id}",
            "member.remove",
            "Remove a member from the swarm (a consensus decision)",
            members_remove,
        ),
        Endpoint("GET", "/v1/votes", "state.read", "Votes and their tallies", votes_list),
        Endpoint("POST", "/v1/votes", "decision.propose", "Open a vote", votes_open, S.VOTE_OPEN),
        Endpoint("GET", "/v1/votes/{id}", "state.read", "One vote with its ballots", votes_show),
        Endpoint(
            "POST",
            "/v1/votes/{id}/vote",
            "decision.vote",
            "Cast this node's ballot",
            votes_cast,
            S.VOTE_CAST,
        ),
        Endpoint(
            "POST",
            "/v1/votes/{id}/close",
            "decision.propose",
            "Finalize a vote's outcome",
            votes_close,
            S.VOTE_CLOSE,
        ),
        Endpoint(
            "POST",
            "/v1/tasks/{id}/claim",
            "task.claim",
            "Bid on a ready task for the calling agent (the best bid wins; no separate claim)",
            task_claim,
            S.EMPTY,
        ),
        Endpoint(
            "POST",
            "/v1/tasks/{id}/progress",
            "task.progress",
            "Report progress {fraction, message} on the calling agent's work",
            task_progress,
            S.PROGRESS,
        ),
        Endpoint(
            "POST",
            "/v1/tasks/{id}/submit",
            "task.submit",
            "Submit the calling agent's {output} (or {error}); checked against output_schema",
            task_submit_work,
            S.SUBMIT,
        ),
        Endpoint(
            "POST",
            "/v1/tasks/{id}/review",
            "task.review",
            "Review a submission {score 1-5, verdict done|rework, comments}; never one's own",
            task_review,
            S.REVIEW,
        ),
        Endpoint(
            "GET",
            "/v1/agents/me/work",
            "state.read",
            "Work handed to the calling agent (tasks to do, submissions to review)",
            my_work,
        ),
        Endpoint(
            "GET",
            "/v1/events",
            "state.read",
            "Server-sent events (?since=ID or Last-Event-ID, ?types=task,decision,peer,work)",
            events,
            query=S.EVENTS_QUERY,
            media="text/event-stream",
        ),
        Endpoint("GET", "/v1/leaderboard", "state.read", "Reputation by agent", leaderboard),
        Endpoint(
            "GET",
            "/v1/activity",
            "state.read",
            "Activity feed (?since=ms)",
            activity,
            query=S.ACTIVITY_QUERY,
        ),
        Endpoint(
            "POST",
            "/v1/messages",
            "messages.send",
            "Send a request to an agent (agent@peer) and wait for its reply",
            messages_send,
            S.MESSAGE,
        ),
        Endpoint(
            "GET",
            "/v1/messages",
            "messages.receive",
            "The caller's inbox (?after=seq acknowledges, &wait_s= long-polls, &limit=)",
            messages_read,
            query=S.MESSAGES_QUERY,
        ),
        Endpoint(
            "POST",
            "/v1/messages/{id}/reply",
            "messages.receive",
            "Reply to a request in the caller's inbox",
            messages_reply,
            S.MESSAGE_BODY,
        ),
        Endpoint("GET", "/v1/topics", "messages.receive", "The caller's topics", topics_list),
        Endpoint(
            "POST",
            "/v1/topics/{name}/subscribe",
            "messages.receive",
            "Subscribe the caller to a topic",
            topic_action("subscribe"),
            S.EMPTY,
        ),
        Endpoint(
            "POST",
            "/v1/topics/{name}/unsubscribe",
            "messages.receive",
            "Unsubscribe the caller from a topic",
            topic_action("unsubscribe"),
            S.EMPTY,
        ),
        Endpoint(
            "POST",
            "/v1/topics/{name}/publish",
            "messages.publish",
            "Publish to a topic's subscribers on every node",
            topic_action("publish"),
            S.MESSAGE_BODY,
        ),
        Endpoint(
            "POST",
            "/v1/broadcast",
            "messages.broadcast",
            "Send to every agent holding a role, on every node",
            broadcast,
            S.BROADCAST,
        ),
        Endpoint(
            "GET", "/v1/metrics", "state.read", "Prometheus metrics", metrics, media="text/plain"
        ),
        Endpoint("GET", "/v1/openapi.json", PUBLIC, "This document", openapi),
    ]

    router = Router(endpoints, guarded)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        found = router.match(path)
        if found is None:
            response: Response = error(404, "not_found", f"no such endpoint: {method} {path}")
        elif method not in found[0]:
            response = error(405, "method_not_allowed", f"{method} not allowed on {path}")
        else:
            scope["path_params"] = found[1]
            response = await found[0][method](Request(scope, receive, send))
        await response(scope, receive, send)

    return app


def openapi_document(endpoints: list[Endpoint]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "summary": ep.summary,
            "x-permission": ep.permission or None,
            "responses": {
                "200": {"description": "OK", "content": {ep.media: {}}},
                "400": {"description": "invalid input: {error: {code, message}}"},
                "401": {"description": "no valid token"},
                "403": {"description": "the caller lacks x-permission"},
            },
        }
        params: list[dict[str, Any]] = [
            {"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ep.path.split("/")
            if p.startswith("{")
        ]
        if ep.query is not None:
            required = ep.query.get("required", [])
            params += [
                {"name": name, "in": "query", "required": name in required, "schema": schema}
                for name, schema in ep.query["properties"].items()
            ]
        if params:
            op["parameters"] = params
        if ep.body is not None:
            op["requestBody"] = {
                "required": bool(ep.body.get("required")),
                "content": {"application/json": {"schema": ep.body}},
            }
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "mossnode local API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
