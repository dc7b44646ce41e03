"""Agent messaging on the daemon: the ``/moss/msg/1`` stream, the ``msg`` gossip topic, inboxes.

Decisions (validation, RBAC at the receiving end, dedup, inbox bounds) are made by
``protocols/messages.py``; this module moves envelopes and keeps the waits.

A direct request runs on one stream: the origin writes the signed request, the recipient's node
answers with a signed ack (accepted, or refused with a code the origin's API turns into 403/404),
then, once the recipient agent replies through its API, with the signed reply. A request to an
agent of the same node takes the same checks without the stream. Topic messages and broadcasts
are published on the swarm's ``msg`` gossip topic and delivered by every node to its own agents.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..crypto.envelope import Envelope, Rejection
from ..protocols import messages as M
from .agents import Agent
from .host import read_frame, write_frame

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("mossnode.msg")

MSG_PROTO = TProtocol("/moss/msg/1")
TOPIC_NAME = "msg"  # the gossip topic /moss/<swarm>/msg
REQUEST, ACK, REPLY, PUBLISH = "msg.request", "msg.ack", "msg.reply", "msg.publish"
MAX_PENDING = 1024  # direct requests waiting for a reply on this node
MAX_TOPICS = 64  # subscriptions per agent
FIRST_FRAME_S = 10.0  # a peer that opens a stream must send its request within this
REPLY_HANDOFF_S = 10.0  # how long a reply call waits for its write to the requester
CODE_RE = re.compile(r"^[a-z_]{1,40}\Z")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class MessagingError(Exception):
    """A messaging call cannot be carried out; the API turns it into ``status`` and ``code``."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    @classmethod
    def of(cls, refusal: M.Refusal) -> MessagingError:
        return cls(refusal.message, refusal.code, refusal.status)


@dataclass
class Pending:
    """A direct request delivered here, waiting for its recipient's reply."""

    request: M.Message
    answered: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    reply: M.Message | None = None
    delivered: bool = False


class MessagingService:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.inboxes: dict[str, M.Inbox] = {}
        self.subscriptions: dict[str, set[str]] = {}
        self.pending: dict[str, Pending] = {}
        self.dedup = M.Dedup()
        self._arrived: dict[str, trio.Event] = {}

    # --- local agents ---------------------------------------------------------------------

    def _local(self) -> dict[str, frozenset[str]]:
        return {a.name: frozenset(a.roles) for a in self.d.agents.agents.values()}

    def _node_roles(self) -> frozenset[str]:
        return frozenset(self.d.node_roles())

    def _count(self, kind: str) -> None:
        self.d.counters[f"msg_{kind}"] += 1

    def _refused(self, refusal: M.Refusal | str, msg: M.Message | None) -> None:
        """Count a refusal of an incoming message (metric label msg_<code>) and log it."""
        code = refusal.code if isinstance(refusal, M.Refusal) else refusal
        self.d.rejected[f"msg_{code}"] += 1
        log.info("refused message %s: %s", msg.id if msg else "-", refusal)

    def forget_missing(self) -> None:
        """Drop the inboxes and subscriptions of agents no longer registered here."""
        known = self.d.agents.agents
        for table in (self.inboxes, self.subscriptions):
            for gone in [n for n in table if n not in known]:
                del table[gone]

    def _deliver(self, name: str, msg: M.Message) -> None:
        self.forget_missing()
        inbox = self.inboxes.setdefault(name, M.Inbox())
        before = inbox.dropped
        inbox.push(msg, now_ms())
        if inbox.dropped > before:
            self.d.counters["msg_inbox_dropped"] += inbox.dropped - before
        self._count("delivered")
        event = self._arrived.pop(name, None)
        if event is not None:
            event.set()

    def _sender_check(self, msg: M.Message) -> M.Refusal | None:
        """The receiving end's check of the sending agent, from what this node knows."""
        if msg.origin == self.d.peer_id:
            agent = self.d.agents.agents.get(msg.sender)
            advertised = frozenset(agent.roles) if agent else None
            return M.sender_refusal(msg, origin_roles=self._node_roles(), advertised=advertised)
        state = self.d._swarm()
        member = state.by_peer_id(msg.origin)
        record = self.d.detector.peers.get(msg.origin)
        return M.sender_refusal(
            msg,
            origin_roles=member.roles if member else None,
            advertised=M.advertised_roles(record.info if record else None, msg.sender),
        )

    # --- direct requests ------------------------------------------------------------------

    def resolve(self, name: str, node: str | None) -> tuple[str, str]:
        """Find the node of a bare agent name among this node's agents and the agents that live
        members advertise in presence."""
        if node is not None:
            return name, node
        found = [self.d.peer_id] if name in self.d.agents.agents else []
        state = self.d._swarm()
        t = now_ms()
        for peer, rec in self.d.detector.peers.items():
            if state.by_peer_id(peer) is None or self.d.detector.health(peer, t) == "dead":
                continue
            if M.advertised_roles(rec.info, name) is not None:
                found.append(peer)
        if not found:
            raise MessagingError(f"no agent {name!r} is known in the swarm", "unknown_agent", 404)
        if len(found) > 1:
            raise MessagingError(
                f"agent name {name!r} is ambiguous: use {name}@<peer id> "
                f"({', '.join(sorted(found))})",
                "ambiguous",
                409,
            )
        return name, found[0]

    def _admit_request(self, msg: M.Message) -> M.Refusal | None:
        refused = self._sender_check(msg) or M.recipient_refusal(
            msg, here=self.d.peer_id, local=self._local(), node_roles=self._node_roles()
        )
        if refused:
            return refused
        if len(self.pending) >= MAX_PENDING:
            return M.Refusal("busy", "too many requests wait for replies on that node", 503)
        if not self.dedup.first(msg.id):
            return M.Refusal("duplicate", f"message {msg.id} was already delivered", 409)
        return None

    def _hold(self, msg: M.Message) -> Pending:
        pending = Pending(msg)
        self.pending[msg.id] = pending
        self._deliver(msg.to, msg)
        self._count("in_direct")
        return pending

    async def request(
        self, agent: Agent, to: str, node: str | None, body: Any, timeout_s: float
    ) -> dict[str, Any]:
        """Send a direct request as ``agent`` and wait for the reply (MessagingError if none)."""
        self.d._swarm()
        addr = M.parse_address(to, node)
        if isinstance(addr, M.Refusal):
            raise MessagingError.of(addr)
        name, where = self.resolve(*addr)
        msg = M.new_message(
            suffix=secrets.token_hex(8),
            mode=M.DIRECT,
            origin=self.d.peer_id,
            sender=agent.name,
            roles=agent.roles,
            body=body,
            sent_at=now_ms(),
            to=name,
            node=where,
            timeout_ms=int(timeout_s * 1000),
        )
        if isinstance(msg, M.Refusal):
            raise MessagingError.of(msg)
        self._count("out_direct")
        if where == self.d.peer_id:
            reply = await self._request_here(msg, timeout_s)
        else:
            reply = await self._request_there(msg, timeout_s)
        return {"id": msg.id, "to": f"{name}@{where}", "reply": reply.view()}

    async def _request_here(self, msg: M.Message, timeout_s: float) -> M.Message:
        refused = self._admit_request(msg)
        if refused:
            raise MessagingError.of(refused)
        pending = self._hold(msg)
        try:
            with trio.move_on_after(timeout_s):
                await pending.answered.wait()
            if pending.reply is None:
                raise self._timeout(msg, timeout_s)
            pending.delivered = True
            return pending.reply
        finally:
            self.pending.pop(msg.id, None)
            pending.finished.set()

    def _timeout(self, msg: M.Message, timeout_s: float) -> MessagingError:
        return MessagingError(
            f"no reply from {msg.to}@{msg.node} within {timeout_s:g} s", "timeout", 504
        )

    async def _request_there(self, msg: M.Message, timeout_s: float) -> M.Message:
        if self.d._swarm().by_peer_id(msg.node) is None:
            raise MessagingError(f"{msg.node} is not a member of this swarm", "unknown_node", 404)
        data = self.d.seal(REQUEST, msg.wire())
        with trio.move_on_after(timeout_s):
            try:
                stream = await self.d.host.new_stream(ID.from_base58(msg.node), [MSG_PROTO])
            except Exception as exc:
                raise MessagingError(
                    f"cannot reach {msg.node}: {exc}", "unreachable", 502
                ) from None
            try:
                await write_frame(stream, data)
                ack = self._expect(await self._frame(stream), ACK, msg.node)
                if ack.body.get("id") != msg.id:
                    raise MessagingError(
                        "the recipient acknowledged another message", "bad_reply", 502
                    )
                if not ack.body.get("ok"):
                    raise _refused_by_peer(ack.body)
                env = self._expect(await self._frame(stream), REPLY, msg.node)
            finally:
                await _close(stream)
            reply = M.from_wire(env.body, env.sender_id, env.timestamp)
            if isinstance(reply, M.Refusal):
                self._refused(reply, None)
                raise MessagingError(f"the reply was malformed: {reply.message}", "bad_reply", 502)
            refused = M.reply_refusal(msg, reply) or self._sender_check(reply)
            if refused:
                self._refused(refused, reply)
                raise MessagingError(f"the reply was refused: {refused}", "bad_reply", 502)
            self._count("in_reply")
            return reply
        raise self._timeout(msg, timeout_s)

    async def _frame(self, stream: INetStream) -> bytes:
        """The next frame; a stream the recipient closed means it stopped waiting."""
        try:
            return await read_frame(stream, self.d.cfg.max_envelope_bytes)
        except Exception as exc:  # FrameError, StreamEOF, a reset connection
            raise MessagingError(
                f"the recipient's node closed the request without a reply ({exc})", "timeout", 504
            ) from None

    def _expect(self, data: bytes, type_: str, peer: str) -> Envelope:
        env = self.d._open(data)
        if isinstance(env, Rejection):
            raise MessagingError(f"the recipient's answer was refused: {env}", "bad_reply", 502)
        if env.type != type_ or env.sender_id != peer or not isinstance(env.body, dict):
            self._refused("malformed", None)
            raise MessagingError("the recipient's node answered out of protocol", "bad_reply", 502)
        return env

    async def on_stream(self, stream: INetStream) -> None:
        """A member's direct request: check, deliver, acknowledge, then relay the reply."""
        pending: Pending | None = None
        try:
            remote = str(stream.muxed_conn.peer_id)
            data = None
            with trio.move_on_after(FIRST_FRAME_S):
                data = await read_frame(stream, self.d.cfg.max_envelope_bytes)
            if self.d.state is None or data is None:
                return
            env = self.d._open(data)
            if isinstance(env, Rejection):
                return  # counted by the daemon; non-members and replays get no answer
            if env.type != REQUEST or env.sender_id != remote:
                self._refused("malformed", None)
                return
            msg = M.from_wire(env.body, env.sender_id, env.timestamp)
            if isinstance(msg, M.Refusal):
                self._refused(msg, None)
                await self._ack(
                    stream, env.body.get("id") if isinstance(env.body, dict) else "", msg
                )
                return
            if msg.mode != M.DIRECT:
                refusal = M.Refusal("malformed", "only direct requests come on this stream")
                self._refused(refusal, msg)
                await self._ack(stream, msg.id, refusal)
                return
            refused = self._admit_request(msg)
            if refused:
                self._refused(refused, msg)
                await self._ack(stream, msg.id, refused)
                return
            pending = self._hold(msg)
            await self._ack(stream, msg.id, None)
            async with trio.open_nursery() as nursery:
                # The requester closing the stream means it stopped waiting: stop too.
                nursery.start_soon(_until_closed, stream, nursery.cancel_scope)
                with trio.move_on_after(msg.timeout_ms / 1000):
                    await pending.answered.wait()
                nursery.cancel_scope.cancel()
            if pending.reply is not None:
                await write_frame(stream, self.d.seal(REPLY, pending.reply.wire()))
                pending.delivered = True
                self._count("out_reply")
        except Exception as exc:  # a peer's stream must never take the daemon down
            log.debug("message stream: %s", exc)
        finally:
            if pending is not None:
                self.pending.pop(pending.request.id, None)
                pending.finished.set()
            await _close(stream)

    async def _ack(self, stream: INetStream, mid: Any, refused: M.Refusal | None) -> None:
        body: dict[str, Any] = {"id": mid if isinstance(mid, str) else "", "ok": refused is None}
        if refused is not None:
            body.update(code=refused.code, message=refused.message, status=refused.status)
        await write_frame(stream, self.d.seal(ACK, body))

    async def reply(self, agent: Agent, mid: str, body: Any) -> dict[str, Any]:
        """The recipient agent answers a request it holds; returns once the answer is sent."""
        pending = self.pending.get(mid)
        if pending is None or pending.request.to != agent.name:
            raise MessagingError(
                f"no request {mid!r} waits for a reply from {agent.name} "
                "(unknown, answered or timed out)",
                "not_found",
                404,
            )
        if pending.reply is not None:
            raise MessagingError(f"request {mid} is already answered", "conflict", 409)
        req = pending.request
        reply = M.new_message(
            suffix=secrets.token_hex(8),
            mode=M.REPLY,
            origin=self.d.peer_id,
            sender=agent.name,
            roles=agent.roles,
            body=body,
            sent_at=now_ms(),
            to=req.sender,
            node=req.origin,
            reply_to=req.id,
        )
        if isinstance(reply, M.Refusal):
            raise MessagingError.of(reply)
        pending.reply = reply
        pending.answered.set()
        with trio.move_on_after(REPLY_HANDOFF_S):
            await pending.finished.wait()
        if not pending.delivered:
            raise MessagingError(
                f"the requester {req.sender}@{req.origin} stopped waiting", "requester_gone", 409
            )
        return {"id": reply.id, "reply_to": mid, "delivered": True}

    # --- topics and broadcasts ------------------------------------------------------------

    def subscribe(self, agent: Agent, topic: str) -> dict[str, Any]:
        refused = M.name_refusal("topic", topic)
        if refused:
            raise MessagingError.of(refused)
        subs = self.subscriptions.setdefault(agent.name, set())
        if topic not in subs and len(subs) >= MAX_TOPICS:
            raise MessagingError(f"an agent may follow at most {MAX_TOPICS} topics", "too_many")
        subs.add(topic)
        return {"topic": topic, "subscribed": True, "topics": sorted(subs)}

    def unsubscribe(self, agent: Agent, topic: str) -> dict[str, Any]:
        subs = self.subscriptions.get(agent.name, set())
        subs.discard(topic)
        return {"topic": topic, "subscribed": False, "topics": sorted(subs)}

    def topics(self, agent: Agent) -> dict[str, Any]:
        return {"topics": sorted(self.subscriptions.get(agent.name, set()))}

    async def publish(self, agent: Agent, topic: str, body: Any) -> dict[str, Any]:
        return await self._fan_out(agent, body, topic=topic)

    async def broadcast(self, agent: Agent, role: str, body: Any) -> dict[str, Any]:
        return await self._fan_out(agent, body, role=role)

    async def _fan_out(
        self, agent: Agent, body: Any, topic: str = "", role: str = ""
    ) -> dict[str, Any]:
        self.d._swarm()
        msg = M.new_message(
            suffix=secrets.token_hex(8),
            mode=M.TOPIC if topic else M.BROADCAST,
            origin=self.d.peer_id,
            sender=agent.name,
            roles=agent.roles,
            body=body,
            sent_at=now_ms(),
            topic=topic,
            role=role,
        )
        if isinstance(msg, M.Refusal):
            raise MessagingError.of(msg)
        self.dedup.first(msg.id)
        local = self._deliver_fan_out(msg)
        await self.d.publish(TOPIC_NAME, PUBLISH, msg.wire())
        self._count(f"out_{msg.mode}")
        out = {"id": msg.id, "delivered_local": local}
        return {**out, "topic": topic} if topic else {**out, "role": role}

    def _deliver_fan_out(self, msg: M.Message) -> int:
        names = M.recipients(
            msg,
            here=self.d.peer_id,
            local=self._local(),
            node_roles=self._node_roles(),
            subscribers=self.subscriptions,
        )
        for name in names:
            self._deliver(name, msg)
        return len(names)

    async def on_gossip(self, env: Envelope) -> None:
        """A topic message or broadcast from another member (the envelope is already checked)."""
        if env.type != PUBLISH:
            self._refused("malformed", None)
            return
        msg = M.from_wire(env.body, env.sender_id, env.timestamp)
        if isinstance(msg, M.Refusal):
            self._refused(msg, None)
            return
        if msg.mode not in (M.TOPIC, M.BROADCAST):
            self._refused(M.Refusal("malformed", "a direct message on the gossip topic"), msg)
            return
        if msg.id in self.dedup:
            self._count("duplicate")
            return
        refused = self._sender_check(msg)
        if refused:
            self._refused(refused, msg)
            return
        self.dedup.first(msg.id)
        self._count(f"in_{msg.mode}")
        self._deliver_fan_out(msg)

    # --- inbox ----------------------------------------------------------------------------

    async def read(self, agent: Agent, after: int, wait_s: float, limit: int) -> dict[str, Any]:
        """The agent's deliveries after its cursor, waiting up to ``wait_s`` for a first one."""
        inbox = self.inboxes.setdefault(agent.name, M.Inbox())
        items = inbox.read(after, limit)
        if not items and wait_s > 0:
            event = self._arrived.setdefault(agent.name, trio.Event())
            with trio.move_on_after(wait_s):
                await event.wait()
            items = inbox.read(after, limit)
        return {
            "messages": [d.view() for d in items],
            "next": items[-1].seq if items else min(after, inbox.last_seq),
            "dropped": inbox.dropped,
        }

    def status(self) -> Mapping[str, Any]:
        return {
            "inboxes": {n: len(i.items) for n, i in self.inboxes.items()},
            "pending_requests": len(self.pending),
            "subscriptions": {n: sorted(s) for n, s in self.subscriptions.items() if s},
        }


def _refused_by_peer(ack: dict[str, Any]) -> MessagingError:
    """The recipient's node refused the request: pass its reason on, within bounds."""
    code, status = ack.get("code"), ack.get("status")
    if not isinstance(code, str) or not CODE_RE.match(code):
        code = "refused"
    return MessagingError(
        f"the recipient's node refused the message: {str(ack.get('message', ''))[:300]}",
        code,
        status if status in (400, 403, 404, 409, 413, 503) else 403,
    )


async def _until_closed(stream: INetStream, scope: trio.CancelScope) -> None:
    """Read until the peer closes (it sends nothing more on a request stream), then cancel."""
    try:
        while await stream.read(1024):
            pass
    except Exception as exc:
        log.debug("request stream closed: %s", exc)
    scope.cancel()


async def _close(stream: INetStream) -> None:
    """Close a stream even while the caller is being cancelled (else it stays open)."""
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await stream.close()
        except Exception as exc:
            log.debug("closing a message stream: %s", exc)
