"""RBAC on the local API: every endpoint x every kind of caller, against a real daemon."""

from __future__ import annotations

import os
import pwd

import httpx
import pytest

from mossnode.cluster import Cluster
from mossnode.protocols.rbac import OPERATOR_LOCAL
from mossnode.protocols.roles import BUILTIN_ROLES, permissions_of

# (method, path, json body or None, permission). Bodies are invalid on purpose where a valid one
# would change state: an allowed call then gets 400, a denied one 401/403, and nothing changes.
CALLS = [
    ("GET", "/v1/status", None, "state.read"),
    ("GET", "/v1/whoami", None, "state.read"),
    ("GET", "/v1/peers", None, "state.read"),
    ("GET", "/v1/decisions", None, "state.read"),
    ("GET", "/v1/metrics", None, "state.read"),
    ("POST", "/v1/invites", {"roles": []}, "member.invite"),
    ("POST", "/v1/join", {"addr": 1}, "swarm.join"),
    ("GET", "/v1/agents", None, "agent.manage"),
    ("POST", "/v1/agents", {"name": "x"}, "agent.manage"),
    ("GET", "/v1/agents/exec1", None, "agent.manage"),
    ("DELETE", "/v1/agents/nobody-here", None, "agent.manage"),
    ("POST", "/v1/agents/nobody-here/rotate-token", {}, "agent.manage"),
    ("GET", "/v1/agents/me/work", None, "state.read"),
    ("POST", "/v1/tasks/nope:1/claim", {}, "task.claim"),
    ("POST", "/v1/tasks/nope:1/progress", {"fraction": 7}, "task.progress"),
    ("POST", "/v1/tasks/nope:1/submit", {}, "task.submit"),
    ("POST", "/v1/tasks/nope:1/review", {"score": 9}, "task.review"),
    # allowed calls below get a 400 or 404 (bad body, unknown id), so nothing changes
    ("POST", "/v1/tasks", {}, "task.create"),
    ("GET", "/v1/tasks", None, "state.read"),
    ("GET", "/v1/tasks/nope:1", None, "state.read"),
    ("POST", "/v1/tasks/nope:1/cancel", {}, "task.cancel"),
    ("POST", "/v1/tasks/nope:1/pause", {}, "task.pause"),
    ("POST", "/v1/tasks/nope:1/resume", {}, "task.resume"),
    ("POST", "/v1/tasks/nope:1/reassign", {}, "task.reassign"),
    ("POST", "/v1/schedules", {}, "task.create"),
    ("GET", "/v1/schedules", None, "state.read"),
    ("DELETE", "/v1/schedules/nope", None, "task.cancel"),
    ("POST", "/v1/swarm/pause", {"bogus": 1}, "swarm.pause"),
    ("POST", "/v1/swarm/resume", {"bogus": 1}, "swarm.pause"),
    ("POST", "/v1/members/nobody/roles", {"role": "executor"}, "role.grant"),
    ("DELETE", "/v1/members/nobody/roles/executor", None, "role.revoke"),
    ("DELETE", "/v1/members/nobody", None, "member.remove"),
    ("GET", "/v1/votes", None, "state.read"),
    ("GET", "/v1/votes/9999", None, "state.read"),
    ("POST", "/v1/votes", {}, "decision.propose"),
    ("POST", "/v1/votes/9999/vote", {}, "decision.vote"),
    ("POST", "/v1/votes/9999/close", {"bogus": 1}, "decision.propose"),
    ("GET", "/v1/leaderboard", None, "state.read"),
    ("GET", "/v1/activity", None, "state.read"),
    ("POST", "/v1/messages", {}, "messages.send"),
    ("GET", "/v1/messages", None, "messages.receive"),
    ("POST", "/v1/messages/nope/reply", {}, "messages.receive"),
    ("GET", "/v1/topics", None, "messages.receive"),
    ("POST", "/v1/topics/t/subscribe", {"bogus": 1}, "messages.receive"),
    ("POST", "/v1/topics/t/unsubscribe", {"bogus": 1}, "messages.receive"),
    ("POST", "/v1/topics/t/publish", {}, "messages.publish"),
    ("POST", "/v1/broadcast", {}, "messages.broadcast"),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    c = Cluster(1, root=tmp_path_factory.mktemp("rbac"))
    c.init()
    n = c.nodes[0]
    n.start()
    tokens = {}
    for role in sorted(BUILTIN_ROLES):
        out = n.cli_json("agent", "add", f"a-{role}", "--role", role, "--backend", "exec:true")
        tokens[role] = out["token"]
    n.cli_json("agent", "add", "exec1", "--role", "executor", "--backend", "exec:true")
    revoked = n.cli_json("agent", "add", "gone", "--role", "admin", "--backend", "exec:true")
    n.cli("agent", "remove", "gone")
    tokens["revoked"] = revoked["token"]
    rotated = n.cli_json("agent", "add", "rot", "--role", "admin", "--backend", "exec:true")
    n.cli("agent", "rotate-token", "rot")
    tokens["rotated-old"] = rotated["token"]
    tokens["bad"] = "mnt_not-a-real-token"
    yield n, tokens
    c.stop()


def client(n, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(n.state_dir / "api.sock")),
        base_url="http://x",
        headers=headers,
    )


def snapshot(n) -> tuple:
    s = n.status()
    agents = client(n, None).get("/v1/agents").json()
    return (
        s["decided_height"],
        s["members"],
        s["state_digest"],
        sorted((a["name"], tuple(a["roles"])) for a in agents),
    )


# The founder node holds admin + validator, so an agent's effective roles are its own roles
# intersected with those.
NODE_ROLES = frozenset({"admin", "validator"})


@pytest.mark.parametrize(
    "who", ["operator", *sorted(BUILTIN_ROLES), "revoked", "rotated-old", "bad"]
)
def test_matrix(node, who: str) -> None:
    n, tokens = node
    before = snapshot(n)
    c = client(n, None if who == "operator" else tokens[who])
    if who == "operator":
        perms = OPERATOR_LOCAL | permissions_of(NODE_ROLES)
    elif who in BUILTIN_ROLES:
        perms = permissions_of(frozenset({who}) & NODE_ROLES)
    else:
        perms = frozenset()
    for method, path, body, perm in CALLS:
        r = c.request(method, path, json=body)
        if who in ("revoked", "rotated-old", "bad"):
            assert r.status_code == 401, (who, path, r.text)
        elif perm in perms:
            assert r.status_code in (200, 400, 404), (who, path, r.status_code, r.text)
        else:
            assert r.status_code == 403, (who, path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["details"]["permission"] == perm and perm in err["message"]
    assert snapshot(n) == before
    assert c.get("/v1/openapi.json").status_code == 200


def test_denials_are_counted(node) -> None:
    n, tokens = node
    client(n, tokens["reviewer"]).get("/v1/agents")
    counters = n.status()["counters"]
    assert counters.get("api_denied:agent.manage", 0) >= 1


def test_matrix_covers_every_endpoint(node) -> None:
    n, _ = node
    doc = client(n, None).get("/v1/openapi.json").json()
    listed = {(m, p) for p, item in doc["paths"].items() for m in item}
    templates = {"exec1": "{name}", "nobody-here": "{name}", "nope:1": "{id}", "nope": "{id}"}
    templates |= {"9999": "{id}", "t": "{name}", "nobody": "{peer_id}", "executor": "{role}"}
    covered = {
        (m.lower(), "/".join(templates.get(x, x) for x in p.split("/"))) for m, p, _, _ in CALLS
    }
    # the event stream never ends: its 401/403 are tested in test_api_socket.py
    assert listed - covered == {("get", "/v1/events"), ("get", "/v1/openapi.json")}


def test_openapi_names_permissions(node) -> None:
    n, _ = node
    doc = client(n, None).get("/v1/openapi.json").json()
    templates = {
        "exec1": "{name}",
        "nobody-here": "{name}",
        "nope:1": "{id}",
        "nope": "{id}",
        "9999": "{id}",
        "t": "{name}",
        "nobody": "{peer_id}",
        "executor": "{role}",
    }
    for method, path, _, perm in CALLS:
        tpl = "/".join(templates.get(p, p) for p in path.split("/"))
        assert doc["paths"][tpl][method.lower()]["x-permission"] == perm


def _as_user(uid: int, gid: int, sock: str, request: bytes) -> bytes:
    """Send one raw request from a forked child running as another uid; return the reply."""
    import socket

    r, w = os.pipe()
    # The test's temp dirs are 0700 root: the child keeps a directory fd opened as root and
    # reaches the socket through /proc/self/fd, which skips the ancestors' permission checks.
    dfd = os.open(os.path.dirname(sock), os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # child: drop to the other user, talk, report, exit without cleanup
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(f"/proc/self/fd/{dfd}/{os.path.basename(sock)}")
            s.sendall(request)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            os.write(w, out[:4096])
        finally:
            os._exit(0)
    os.close(w)
    os.close(dfd)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data


def test_other_local_user_refused(node) -> None:
    """Another local user is refused without a token, even when the socket mode lets it in."""
    assert os.getuid() == 0, "this test acts as another user and needs root (CI runs as root)"
    n, tokens = node
    sock = n.state_dir / "api.sock"
    nobody = pwd.getpwnam("nobody")
    os.chmod(n.state_dir, 0o755)
    os.chmod(sock, 0o666)
    try:
        plain = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with_token = (
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + tokens["executor"].encode() + b"\r\n\r\n"
        )
        assert _as_user(nobody.pw_uid, nobody.pw_gid, str(sock), plain).startswith(b"HTTP/1.1 401")
        assert _as_user(nobody.pw_uid, nobody.pw_gid, str(sock), with_token).startswith(
            b"HTTP/1.1 200"
        )
    finally:
        os.chmod(sock, 0o600)
        os.chmod(n.state_dir, 0o700)
