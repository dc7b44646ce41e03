"""Schema-driven fuzzing of the local API against a real daemon over its Unix socket.

Requests are generated from the daemon's own ``/v1/openapi.json``: bodies and queries valid by
their schemas (:func:`from_schema` below), the same bodies mutated into invalid ones (wrong types,
missing or unknown fields, huge strings, bad numbers, deep nesting), raw bytes and bad JSON,
unknown paths and methods, path parameters with odd characters, and garbage HTTP. Every answer
must be below 500, the daemon must stay up, and a refused (4xx) request must leave the shared
state digest, the decided log and the agent registry as they were.

The node is a one-node swarm (its founder: admin and validator). A few fields of valid bodies
are pinned so the fuzzer cannot make the daemon run things: registered agents get a role the
node does not hold (so the scheduler never dispatches to them) and ``exec:true`` as backend;
recurring schedules start in the far future (so no instance appears while the run goes on);
waits on consensus get a generous timeout, so no legitimate 504 can come from a timing
accident.
"""

from __future__ import annotations

import json
import socket
import string
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mossnode.cluster import Cluster, Node
from mossnode.protocols.tasks import storable

pytestmark = pytest.mark.slow

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ODD = st.sampled_from(
    [
        "..",
        ".",
        "%00",
        "%2F",
        "a%2Fb",
        "%",
        "%zz",
        "~",
        "\u202e",
        "💥",
        "a b",
        "x" * 3000,
        "-1",
        "0",
    ]
)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Any:
    c = Cluster(1, root=tmp_path_factory.mktemp("fuzz"))
    c.init()
    node = c.nodes[0]
    node.start()
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(node.state_dir / "api.sock")),
        base_url="http://mossnode",
        timeout=60,
    )
    doc = client.get("/v1/openapi.json").json()
    ops = [
        (method.upper(), path, op)
        for path, item in sorted(doc["paths"].items())
        for method, op in sorted(item.items())
        # an event stream never ends; its input checks are in test_api_events.py
        if "text/event-stream" not in op["responses"]["200"]["content"]
    ]
    yield node, client, ops
    client.close()
    c.stop()


def test_the_document_describes_every_input(api) -> None:
    _node, _client, ops = api
    for method, path, op in ops:
        if method == "POST":
            assert body_schema(op) is not None, path
    queries = {path for method, path, op in ops if query_schema(op) is not None}
    assert queries == {"/v1/tasks", "/v1/activity", "/v1/messages"}  # /v1/events: streamed
    task = next(body_schema(op) for m, p, op in ops if (m, p) == ("POST", "/v1/tasks"))
    assert task is not None and task["required"] == ["title"]
    assert task["properties"]["confidential"]["properties"]["roles"]["type"] == "array"


def test_storable_values() -> None:
    assert storable({"a": [1, 2.5, None, True, "x"], "n": 2**53}) is None
    for bad, why in (
        ({"n": 2**53 + 1}, "integer out of range"),
        ([float("inf")], "not finite"),
        ({"k": b"bytes"}, "not a JSON value"),
        ({1: 2}, "keys must be strings"),
        ([[[[]]]], "nested more than 3"),
    ):
        got = storable(bad, max_depth=3)
        assert got is not None and why in got.message, (bad, got)


def snapshot(client: httpx.Client) -> tuple[Any, ...]:
    status = client.get("/v1/status").json()
    decided = client.get("/v1/decisions").json()
    agents = client.get("/v1/agents").json()
    return (
        status["state_digest"],
        status["decided_height"],
        json.dumps(decided, sort_keys=True),
        sorted(a["name"] for a in agents),
    )


def send(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    body: Any = None,
    content: bytes | None = None,
    refused: bool = False,
) -> httpx.Response:
    """One request; no 5xx, and a 4xx (required if ``refused``) changes nothing."""
    before = snapshot(client)
    if content is None and body is not None:
        content = json.dumps(body).encode()
    headers = {"content-type": "application/json"} if content is not None else {}
    r = client.request(method, path, content=content, headers=headers)
    assert r.status_code < 500, (method, path, content and content[:300], r.text[:500])
    if refused:
        assert 400 <= r.status_code < 500, (method, path, content and content[:300], r.text)
    if 400 <= r.status_code < 500:
        assert r.json()["error"]["code"], r.text
        assert snapshot(client) == before, (method, path, content and content[:300], r.text)
    return r


def concrete(path: str, draw: Any, segment: st.SearchStrategy[str]) -> str:
    parts = []
    for part in path.split("/"):
        if part.startswith("{"):
            part = quote(draw(segment), safe="") or "x"
        parts.append(part)
    return "/".join(parts)


def pinned(path: str, body: Any) -> Any:
    """Valid bodies with the two fields pinned (see the module doc)."""
    if not isinstance(body, dict):
        return body
    if path == "/v1/agents":
        body = {**body, "roles": ["patrol"], "backend": "exec:true"}
    if path == "/v1/schedules":
        body = {**body, "start_ms": 2**52, "end_ms": None}
    if "timeout_s" in body or path.startswith("/v1/votes"):
        body = {**body, "timeout_s": 60}
    return body


# Leaves include what JSON can carry but the document cannot: integers beyond 64 bits and lone
# surrogates (escaped as "\\udXXX" in the request).
EDGES = st.sampled_from([2**53 + 1, -(2**63) - 1, 10**30, "\ud800x", "\x00", "\u202e"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | EDGES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def from_schema(schema: Any) -> st.SearchStrategy[Any]:
    """Values valid by a schema of the keyword subset the API uses (the one its validator,
    protocols/tasks/contract.py, enforces). hypothesis-jsonschema would do this, but its
    release does not run on the pinned hypothesis (object schemas fail inside it)."""
    if schema is True or not schema:
        return JSON
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema.get("type") or ["null", "boolean", "number", "string", "array", "object"]
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return st.one_of([_of_type(k, schema) for k in kinds])


def _of_type(kind: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo_i = None if lo is None else int(lo) + (1 if "exclusiveMinimum" in schema else 0)
        hi_i = None if hi is None else int(hi) - (1 if "exclusiveMaximum" in schema else 0)
        return st.integers(lo_i, hi_i)
    if kind == "number":
        return st.floats(
            lo,
            hi,
            allow_nan=False,
            allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
        ) | _of_type("integer", schema)
    if kind == "string":
        least = schema.get("minLength", 0)
        return st.text(min_size=least, max_size=min(schema.get("maxLength", 40), least + 40))
    if kind == "array":
        least = schema.get("minItems", 0)
        most = min(schema.get("maxItems", 4), least + 4)
        return st.lists(from_schema(schema.get("items", {})), min_size=least, max_size=most)
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    fixed = {k: from_schema(v) for k, v in props.items() if k in required}
    optional = {k: from_schema(v) for k, v in props.items() if k not in required}
    return st.fixed_dictionaries(fixed, optional=optional)


_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {}


def valid(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    key = json.dumps(schema, sort_keys=True)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = from_schema(schema)
    return _STRATEGIES[key]


def body_schema(op: dict[str, Any]) -> dict[str, Any] | None:
    rb = op.get("requestBody")
    return rb["content"]["application/json"]["schema"] if rb else None


def query_schema(op: dict[str, Any]) -> dict[str, Any] | None:
    params = [p for p in op.get("parameters", []) if p["in"] == "query"]
    if not params:
        return None
    props = {p["name"]: p["schema"] for p in params}
    return {"type": "object", "properties": props, "additionalProperties": False}


def with_query(path: str, args: dict[str, Any]) -> str:
    if not args:
        return path
    return path + "?" + "&".join(f"{quote(k)}={quote(str(v))}" for k, v in args.items())


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_requests_valid_by_schema_never_fail_the_server(api, data) -> None:
    _node, client, ops = api
    method, path, op = data.draw(st.sampled_from(ops))
    url = concrete(path, data.draw, st.text(min_size=1, max_size=40))
    q = query_schema(op)
    if q is not None:
        url = with_query(url, data.draw(valid(q)))
    schema = body_schema(op)
    body = pinned(path, data.draw(valid(schema))) if schema is not None else None
    if path == "/v1/tasks" and isinstance(body, dict) and data.draw(st.booleans()):
        # random ids never exist: without them half the tasks get past the reference checks
        body = {k: v for k, v in body.items() if k not in ("after", "parent")}
    send(client, method, url, body=body)


def wrong_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A JSON value that the schema's ``type`` does not allow."""
    allowed = schema.get("type")
    allowed = {allowed} if isinstance(allowed, str) else set(allowed or ())
    samples = {
        "string": st.text(max_size=5),
        "integer": st.integers(-5, 5),
        "number": st.floats(-1e6, 1e6, allow_nan=False).filter(lambda f: not f.is_integer()),
        "boolean": st.booleans(),
        "null": st.none(),
        "array": st.lists(st.integers(), max_size=2),
        "object": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    }
    if "number" in allowed:
        allowed |= {"integer"}
    return st.one_of([s for t, s in samples.items() if t not in allowed])


def mutations(schema: dict[str, Any], base: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Bodies that break ``schema``: each is one mistake on top of a valid ``base``."""
    props: dict[str, Any] = schema.get("properties", {})
    typed = sorted(k for k, v in props.items() if v.get("type"))
    strs = sorted(k for k, v in props.items() if v.get("type") == "string" and "maxLength" in v)
    choices: list[st.SearchStrategy[Any]] = [
        st.builds(
            lambda k: {**base, k: 1},
            st.text(string.ascii_letters, min_size=1).filter(lambda k: k not in props),
        ),
        st.sampled_from([[], "body", 7, None, True, [base]]),
    ]
    if typed:
        choices.append(
            st.sampled_from(typed).flatmap(
                lambda k: wrong_value(props[k]).map(lambda v, k=k: {**base, k: v})
            )
        )
    for k in schema.get("required", []):
        choices.append(st.just({n: v for n, v in base.items() if n != k}))
    if strs:
        choices.append(
            st.sampled_from(strs).map(lambda k: {**base, k: "y" * (props[k]["maxLength"] + 1)})
        )
    nums = sorted(k for k, v in props.items() if v.get("type") in ("number", "integer"))
    if nums:
        choices.append(st.sampled_from(nums).map(lambda k: {**base, k: 10**400}))
    return st.one_of(choices)


BAD_JSON = [
    b"{",
    b'{"title": }',
    b"{'single': 1}",
    b'{"a": NaN}',
    b'{"title": "x", "priority": Infinity}',
    b'{"title": "\\ud800"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"title": "x"} trailing',
    b"\xff\xfe\x00",
    '{"title": "\u00e9"}'.encode("latin-1"),
    b'{"title": "deep", "input": ' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"title": "big", "input": {"n": 123456789012345678901234567890}}',
    b'{"title": "big", "contract": {"input_schema": {"maximum": 1e999}}}',
    b'{"roles": ["executor"], "ttl_s": 1e400}',
    b"null",
    b'"a string"',
    b"[]",
]


@pytest.mark.parametrize("raw", BAD_JSON, ids=[str(i) for i in range(len(BAD_JSON))])
def test_bad_json_is_refused_everywhere(api, raw: bytes) -> None:
    _node, client, ops = api
    for method, path, op in ops:
        if body_schema(op) is not None:
            url = path.replace("{id}", "1").replace("{name}", "nobody")
            send(client, method, url, content=raw, refused=True)


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_invalid_bodies_are_refused_and_change_nothing(api, data) -> None:
    _node, client, ops = api
    posts = [(m, p, o) for m, p, o in ops if body_schema(o) is not None]
    method, path, op = data.draw(st.sampled_from(posts))
    url = concrete(path, data.draw, st.text(min_size=1, max_size=20))
    schema = body_schema(op)
    assert schema is not None
    kind = data.draw(st.sampled_from(["mutated", "bytes"]))
    if kind == "mutated":
        base = pinned(path, data.draw(valid(schema)))
        bad = json.dumps(data.draw(mutations(schema, base))).encode()
        send(client, method, url, content=bad, refused=True)
    elif kind == "bytes":
        raw = data.draw(st.binary(min_size=1, max_size=2000))
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        send(client, method, url, content=raw, refused=not isinstance(parsed, dict))


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_unknown_paths_methods_and_odd_parameters(api, data) -> None:
    _node, client, ops = api
    routes = {(m, p) for m, p, _ in ops}
    method = data.draw(st.sampled_from(METHODS))
    kind = data.draw(st.sampled_from(["route", "unknown", "query"]))
    if kind == "route":  # a known route, any method, odd path parameters
        _, path, _ = data.draw(st.sampled_from(ops))
        url = concrete(path, data.draw, st.one_of(ODD, st.text(min_size=1, max_size=80)))
        send(client, method, url, refused=(method, path) not in routes)
    elif kind == "unknown":
        segs = data.draw(st.lists(st.one_of(ODD, st.text(min_size=1, max_size=12)), max_size=4))
        url = "/" + "/".join(quote(s, safe="") for s in segs)
        if data.draw(st.booleans()):
            url = "/v1" + url
        known = any(url == p for _, p in routes)
        send(client, method, url, refused=not known)
    else:  # a query with odd keys and values on a route that reads none or some
        _, path, _op = data.draw(st.sampled_from([o for o in ops if o[0] == "GET"]))
        args = data.draw(
            st.dictionaries(st.one_of(ODD, st.text(max_size=8)), st.text(max_size=30), max_size=3)
        )
        url = concrete(path, data.draw, st.text(min_size=1, max_size=12))
        url += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in args.items())
        send(client, "GET", url)


@settings(FUZZ, max_examples=50)
@given(
    raw=st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda m, p, h: f"{m} {p} HTTP/1.1\r\n{h}\r\n\r\n".encode("utf-8", "replace"),
            st.text(string.ascii_letters, min_size=1, max_size=8),
            st.text(max_size=40),
            st.text(max_size=80),
        ),
        st.sampled_from(
            [
                b"POST /v1/tasks HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n",
                b"POST /v1/tasks HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
                b"POST /v1/tasks HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET /v1/status HTTP/2.0\r\n\r\n",
                b"GET /v1/status HTTP/1.1\r\nno-colon\r\n\r\n",
                b"GET " + b"/a" * 9000 + b" HTTP/1.1\r\n\r\n",
            ]
        ),
    )
)
def test_garbage_http_never_fails_the_server(api, raw: bytes) -> None:
    node, client, _ = api
    before = snapshot(client)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(node.state_dir / "api.sock"))
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status < 500, answer[:300]
    assert snapshot(client) == before
    assert_alive(node)


def assert_alive(node: Node) -> None:
    assert node.running and node.status()["peer_id"]
