"""Agent-to-agent messages: the record, its validation, the RBAC decisions, dedup and inboxes.

Three modes share one record. A *direct* request goes to one named agent on one node over the
``/moss/msg/1`` stream and waits for that agent's *reply*; a *topic* message goes over gossip to
every agent subscribed to the topic on any node; a *broadcast* goes over gossip to every agent
holding a role. The origin node signs the envelope that carries a message, so the message names
only the sending agent and the roles it claims; the node is the envelope's signer.

RBAC is judged at both ends. At the origin, the API checks the sending agent's permission. At a
receiving node, :func:`sender_refusal` re-derives it from what the receiver knows on its own: the
origin's roles in the decided log and the agents the origin advertises in presence. A claimed role
counts only if the origin both advertises it for that agent and holds it itself (an agent acts
with its roles that its node holds, as on the local API). Recipients must hold
``messages.receive`` the same way.

Pure: no clock, no randomness, no I/O. Ids and times come in as arguments.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .roles import permissions_of

DIRECT = "direct"
TOPIC = "topic"
BROADCAST = "broadcast"
REPLY = "reply"
MODES = (DIRECT, TOPIC, BROADCAST, REPLY)

# What the sender needs for each mode; a reply needs what receiving the request needed.
SEND_PERMISSION = {
    DIRECT: "messages.send",
    TOPIC: "messages.publish",
    BROADCAST: "messages.broadcast",
    REPLY: "messages.receive",
}
RECEIVE_PERMISSION = "messages.receive"

MAX_BODY_BYTES = 64 * 1024  # compact JSON of the body
MAX_TIMEOUT_MS = 300_000
MAX_ROLES = 32
INBOX_CAPACITY = 256
DEDUP_CAPACITY = 65_536

AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")  # as node/agents.py registers them
TOPIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
PEER_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{16,128}\Z")  # base58
SUFFIX_RE = re.compile(r"^[0-9a-f]{8,64}\Z")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message is refused. ``code`` is the API error code and the metric label."""

    code: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Message:
    """One message. ``origin`` and ``sent_at`` are the signing node and the envelope time."""

    id: str  # "<origin peer id>:<hex>", unique per origin
    mode: str
    origin: str
    sender: str  # the sending agent's name on the origin node
    roles: tuple[str, ...]  # the roles the sending agent claims
    body: Any
    sent_at: int
    to: str = ""  # direct, reply: the recipient agent
    node: str = ""  # direct, reply: the recipient's node
    topic: str = ""
    role: str = ""
    timeout_ms: int = 0  # direct: how long the sender waits for the reply
    reply_to: str = ""  # reply: the request's id

    def wire(self) -> dict[str, Any]:
        """The envelope body (origin and time are the envelope's own fields)."""
        out: dict[str, Any] = {
            "id": self.id,
            "mode": self.mode,
            "from": self.sender,
            "roles": list(self.roles),
            "body": self.body,
        }
        for key in ("to", "node", "topic", "role", "reply_to"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.timeout_ms:
            out["timeout_ms"] = self.timeout_ms
        return out

    def view(self) -> dict[str, Any]:
        """The JSON an agent reads."""
        out: dict[str, Any] = {
            "id": self.id,
            "mode": self.mode,
            "from": f"{self.sender}@{self.origin}",
            "from_agent": self.sender,
            "from_node": self.origin,
            "from_roles": list(self.roles),
            "body": self.body,
            "sent_at": self.sent_at,
        }
        if self.to:
            out["to"] = f"{self.to}@{self.node}"
        if self.topic:
            out["topic"] = self.topic
        if self.role:
            out["role"] = self.role
        if self.mode == DIRECT:
            out["reply_expected"] = True
            out["timeout_ms"] = self.timeout_ms
        if self.reply_to:
            out["reply_to"] = self.reply_to
        return out


def _json_only(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_json_only(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_only(v, depth + 1) for k, v in value.items())
    return False


def body_refusal(body: Any, max_bytes: int = MAX_BODY_BYTES) -> Refusal | None:
    """A body is any JSON value of at most ``max_bytes`` in compact form."""
    if not _json_only(body):
        return Refusal("bad_body", "the body must be a JSON value (no bytes, NaN, deep nesting)")
    size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        return Refusal("too_large", f"the body is {size} bytes, the limit is {max_bytes}", 413)
    return None


def name_refusal(kind: str, value: Any) -> Refusal | None:
    pattern = {"agent": AGENT_RE, "topic": TOPIC_RE, "role": ROLE_RE, "node": PEER_RE}[kind]
    if not isinstance(value, str) or not pattern.match(value):
        return Refusal(f"bad_{kind}", f"not a valid {kind} name: {str(value)[:80]!r}")
    return None


def parse_address(to: str, node: str | None = None) -> tuple[str, str | None] | Refusal:
    """``agent@<peer id>`` or a bare agent name (with ``node`` given apart, or to be resolved)."""
    name, at, where = to.partition("@")
    if at and node is not None and node != where:
        return Refusal("bad_address", f"{to!r} names another node than node={node!r}")
    target = where if at else node
    refused = name_refusal("agent", name) or (
        name_refusal("node", target) if target is not None else None
    )
    return refused or (name, target)


def new_message(
    *,
    suffix: str,
    mode: str,
    origin: str,
    sender: str,
    roles: Iterable[str],
    body: Any,
    sent_at: int,
    to: str = "",
    node: str = "",
    topic: str = "",
    role: str = "",
    timeout_ms: int = 0,
    reply_to: str = "",
) -> Message | Refusal:
    """Build and check an outgoing message; ``suffix`` is fresh random hex from the caller."""
    msg = Message(
        f"{origin}:{suffix}",
        mode,
        origin,
        sender,
        tuple(sorted(set(roles))),
        body,
        sent_at,
        to,
        node,
        topic,
        role,
        timeout_ms,
        reply_to,
    )
    return shape_refusal(msg) or msg


def shape_refusal(msg: Message) -> Refusal | None:
    """Everything about a message that does not depend on who judges it."""
    if msg.mode not in MODES:
        return Refusal("malformed", f"unknown mode {msg.mode!r}")
    origin, _, suffix = msg.id.rpartition(":")
    if origin != msg.origin or not SUFFIX_RE.match(suffix):
        return Refusal("malformed", "the id must be <origin peer id>:<hex>")
    if len(msg.roles) > MAX_ROLES or any(name_refusal("role", r) for r in msg.roles):
        return Refusal("malformed", "bad claimed roles")
    refused = name_refusal("agent", msg.sender) or body_refusal(msg.body)
    if refused:
        return refused
    needs = {
        DIRECT: ("to", "node"),
        REPLY: ("to", "node", "reply_to"),
        TOPIC: ("topic",),
        BROADCAST: ("role",),
    }[msg.mode]
    present = {k for k in ("to", "node", "topic", "role", "reply_to") if getattr(msg, k)}
    if present != set(needs):
        return Refusal("malformed", f"a {msg.mode} message has exactly: {', '.join(needs)}")
    for kind, value in (("agent", msg.to), ("node", msg.node), ("topic", msg.topic)):
        if value and (refused := name_refusal(kind, value)):
            return refused
    if msg.role and (refused := name_refusal("role", msg.role)):
        return refused
    if msg.mode == DIRECT and not 0 < msg.timeout_ms <= MAX_TIMEOUT_MS:
        return Refusal("bad_timeout", f"timeout must be 1 ms to {MAX_TIMEOUT_MS // 1000} s")
    if msg.mode != DIRECT and msg.timeout_ms:
        return Refusal("malformed", "only a direct request carries a timeout")
    return None


def from_wire(body: Any, origin: str, sent_at: int) -> Message | Refusal:
    """Decode an envelope body signed by ``origin``; hostile input gives a Refusal."""
    if not isinstance(body, dict):
        return Refusal("malformed", "a message is a map")
    known = {"id", "mode", "from", "roles", "body", "to", "node", "topic", "role", "reply_to"}
    if set(body) - known - {"timeout_ms"} or not {"id", "mode", "from", "roles"} <= set(body):
        return Refusal("malformed", "unknown or missing message fields")
    strs = [body.get(k, "") for k in known - {"roles", "body"}]
    roles, timeout = body["roles"], body.get("timeout_ms", 0)
    if not all(isinstance(s, str) for s in strs) or not isinstance(roles, list):
        return Refusal("malformed", "mistyped message fields")
    if not all(isinstance(r, str) for r in roles) or type(timeout) is not int:
        return Refusal("malformed", "mistyped message fields")
    msg = Message(
        body["id"],
        body["mode"],
        origin,
        body["from"],
        tuple(roles),
        body.get("body"),
        sent_at,
        body.get("to", ""),
        body.get("node", ""),
        body.get("topic", ""),
        body.get("role", ""),
        timeout,
        body.get("reply_to", ""),
    )
    if len(set(msg.roles)) != len(msg.roles):
        return Refusal("malformed", "repeated claimed role")
    return shape_refusal(msg) or msg


def effective_roles(agent_roles: Iterable[str], node_roles: Iterable[str]) -> frozenset[str]:
    """An agent acts with those of its roles that its node holds."""
    return frozenset(agent_roles) & frozenset(node_roles)


def may(agent_roles: Iterable[str], node_roles: Iterable[str], permission: str) -> bool:
    return permission in permissions_of(effective_roles(agent_roles, node_roles))


def advertised_roles(presence: Mapping[str, Any] | None, agent: str) -> frozenset[str] | None:
    """The roles a node advertises for one of its agents in its presence body, or None."""
    agents = presence.get("agents") if presence is not None else None
    if not isinstance(agents, list):
        return None
    for a in agents:
        if isinstance(a, dict) and a.get("name") == agent:
            roles = a.get("roles")
            if isinstance(roles, list):
                return frozenset(r for r in roles if isinstance(r, str))
            return None
    return None


def sender_refusal(
    msg: Message,
    *,
    origin_roles: Iterable[str] | None,
    advertised: frozenset[str] | None,
) -> Refusal | None:
    """The receiving node's check of the sender.

    ``origin_roles``: the origin's roles in the decided log, None if it is not a member.
    ``advertised``: the roles the origin advertises for the sending agent, None if it does not
    advertise that agent (for a local sender: the agent's registered roles).
    """
    if origin_roles is None:
        return Refusal("not_member", f"{msg.origin} is not a member", 403)
    if advertised is None:
        return Refusal(
            "unknown_sender",
            f"{msg.origin} does not advertise an agent {msg.sender!r} (yet)",
            403,
        )
    if not set(msg.roles) <= advertised:
        extra = ", ".join(sorted(set(msg.roles) - advertised))
        return Refusal("roles_mismatch", f"{msg.sender} claims roles it lacks: {extra}", 403)
    needed = SEND_PERMISSION[msg.mode]
    if not may(msg.roles, origin_roles, needed):
        return Refusal(
            "forbidden", f"agent {msg.sender}@{msg.origin} lacks permission {needed}", 403
        )
    return None


def recipient_refusal(
    msg: Message, *, here: str, local: Mapping[str, frozenset[str]], node_roles: Iterable[str]
) -> Refusal | None:
    """A direct request must be addressed to this node (``here``), and its recipient must be
    one of this node's agents (``local``: their registered roles) that may receive."""
    if msg.node != here:
        return Refusal("wrong_node", f"addressed to node {msg.node}, not {here}", 400)
    roles = local.get(msg.to)
    if roles is None:
        return Refusal("unknown_agent", f"no agent {msg.to!r} on node {msg.node}", 404)
    if not may(roles, node_roles, RECEIVE_PERMISSION):
        return Refusal(
            "recipient_forbidden", f"agent {msg.to} lacks permission {RECEIVE_PERMISSION}", 403
        )
    return None


def reply_refusal(request: Message, reply: Message) -> Refusal | None:
    """A reply must answer this request, from its recipient, to its sender."""
    if reply.mode != REPLY or reply.reply_to != request.id:
        return Refusal("malformed", "not a reply to this request", 502)
    if (reply.origin, reply.sender) != (request.node, request.to):
        return Refusal("malformed", "the reply comes from another agent than the recipient", 502)
    if (reply.node, reply.to) != (request.origin, request.sender):
        return Refusal("malformed", "the reply is addressed to someone else", 502)
    return None


def recipients(
    msg: Message,
    *,
    here: str,
    local: Mapping[str, frozenset[str]],
    node_roles: Iterable[str],
    subscribers: Mapping[str, Iterable[str]],
) -> list[str]:
    """The local agents (of node ``here``) a topic or broadcast message goes to: those that may
    receive and are subscribed (topic) or hold the role (broadcast), never the sender itself."""
    if msg.mode not in (TOPIC, BROADCAST):
        return []
    held = frozenset(node_roles)
    out = []
    for name, roles in sorted(local.items()):
        if msg.origin == here and name == msg.sender:
            continue
        if not may(roles, held, RECEIVE_PERMISSION):
            continue
        if msg.mode == TOPIC and msg.topic not in set(subscribers.get(name, ())):
            continue
        if msg.mode == BROADCAST and msg.role not in effective_roles(roles, held):
            continue
        out.append(name)
    return out


class Dedup:
    """Message ids seen lately, bounded (oldest forgotten first). Together with the envelope's
    clock-skew bound this keeps a message from reaching an inbox twice."""

    def __init__(self, capacity: int = DEDUP_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, key: str) -> bool:
        """True the first time ``key`` is offered (and remembers it), False after."""
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._seen


@dataclass(frozen=True, slots=True)
class Delivery:
    seq: int
    message: Message
    received_at: int

    def view(self) -> dict[str, Any]:
        return {"seq": self.seq, **self.message.view(), "received_at": self.received_at}


@dataclass
class Inbox:
    """One agent's inbox: a bounded queue (oldest dropped and counted) read with a cursor.

    Reading with ``after=N`` acknowledges everything up to N: acknowledged deliveries leave,
    others stay until read again, so a reader that dies mid-read loses nothing.
    """

    capacity: int = INBOX_CAPACITY
    dropped: int = 0
    last_seq: int = 0
    items: deque[Delivery] = field(default_factory=deque)

    def push(self, message: Message, received_at: int) -> Delivery:
        self.last_seq += 1
        d = Delivery(self.last_seq, message, received_at)
        self.items.append(d)
        while len(self.items) > self.capacity:
            self.items.popleft()
            self.dropped += 1
        return d

    def ack(self, upto: int) -> None:
        while self.items and self.items[0].seq <= upto:
            self.items.popleft()

    def read(self, after: int, limit: int) -> list[Delivery]:
        """Acknowledge up to ``after`` and return at most ``limit`` deliveries after it. A
        cursor beyond the last delivery is from an earlier inbox (the daemon restarted): read
        from the start."""
        if after > self.last_seq:
            after = 0
        self.ack(after)
        return [d for d in self.items if d.seq > after][:limit]
