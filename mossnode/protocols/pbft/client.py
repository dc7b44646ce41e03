"""The client side of PBFT, sans-IO: send a request, wait for f+1 matching replies.

f+1 replies that agree come from at least one honest replica, so the result is the decided one.
One request is outstanding at a time (PBFT's per-client timestamp rule: a replica executes a
client's request only if its timestamp is above the last one executed); later submissions queue.
The request goes to the primary first; on each retransmit timeout it is re-sealed (fresh envelope
seq, so replay windows accept it) and broadcast to every validator, which relays it to the primary
or answers from its reply cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from ...crypto.envelope import Envelope, Rejection, ReplayWindow, open_envelope, seal
from ...crypto.identity import Identity
from ...crypto.peerid import peer_id_from_public_key
from .config import max_faulty
from .effects import Completed, Effect, Persist, Send, SetTimer
from .messages import REPLIES, REPLY, REQUEST, Reply, Request, reply_in

TIMER_CLIENT = "pbft.client"


class Client:
    def __init__(
        self,
        identity: Identity,
        validators: Iterable[bytes],
        swarm_id: bytes,
        *,
        retransmit_ms: int = 1_000,
        max_retransmit_ms: int = 16_000,
        max_skew_ms: int = 30_000,
        seq_block: int = 1024,
    ) -> None:
        self.identity = identity
        self._hex = identity.public_key.hex()  # our key in pbft.replies bodies
        self.swarm_id = swarm_id
        self.retransmit_ms = retransmit_ms
        self.max_retransmit_ms = max_retransmit_ms
        self.max_skew_ms = max_skew_ms
        self.seq_block = seq_block
        self.validators: tuple[bytes, ...] = ()
        self.set_validators(validators)
        self.view = 0
        self._views: dict[bytes, int] = {}
        self.rejections: dict[str, int] = {}
        self._last_t = 0
        self._queue: deque[tuple[int, bytes]] = deque()
        self._current: tuple[int, bytes] | None = None
        self._replies: dict[bytes, bytes] = {}
        self._attempt = 0
        self._env_seq = 0
        self._seq_reserved = 0
        self._replay = ReplayWindow()
        self._deadline: int | None = None
        self._now = 0
        self._out: list[Effect] = []

    @classmethod
    def restore(
        cls,
        records: Iterable[Mapping[str, Any]],
        identity: Identity,
        validators: Iterable[bytes],
        swarm_id: bytes,
        **kwargs: Any,
    ) -> Client:
        """Rebuild from persisted records so timestamps and envelope seqs never go backwards."""
        c = cls(identity, validators, swarm_id, **kwargs)
        for rec in records:
            if rec.get("k") == "seq":
                c._seq_reserved = max(c._seq_reserved, int(rec["upto"]))
                c._env_seq = c._seq_reserved
            elif rec.get("k") == "t":
                c._last_t = max(c._last_t, int(rec["t"]))
        return c

    def set_validators(self, validators: Iterable[bytes]) -> None:
        """Follow a reconfiguration (the caller learns it from the decided log)."""
        self.validators = tuple(validators)
        self._members = frozenset(self.validators)

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue)

    def submit(self, op: bytes, now_ms: int) -> tuple[int, list[Effect]]:
        """Queue ``op``; returns its request timestamp (the handle Completed will carry)."""
        self._begin(now_ms)
        t = max(now_ms, self._last_t + 1)
        self._last_t = t
        self._out.append(Persist({"k": "t", "t": t}))
        self._queue.append((t, op))
        if self._current is None:
            self._next()
        return t, self._end()

    def receive(self, data: bytes, now_ms: int) -> list[Effect]:
        self._begin(now_ms)
        if not self._wanted(data):  # a late or foreign reply: not worth a signature check
            self._count("stale_reply")
            return self._end()
        env = open_envelope(
            data, swarm_id=self.swarm_id, now_ms=now_ms, max_skew_ms=self.max_skew_ms
        )
        if isinstance(env, Rejection):
            self._count(env.reason.value)
        else:
            self._opened(env)
        return self._end()

    def receive_opened(self, env: Envelope, now_ms: int) -> list[Effect]:
        """A reply envelope the caller opened itself with this client's checks (signature,
        swarm id, size, clock skew: ``open_envelope`` without a replay window): a gateway
        serving many clients opens a ``pbft.replies`` envelope once for all of them. The
        sender's membership and this client's replay window are checked here."""
        self._begin(now_ms)
        if self._current is None:
            self._count("stale_reply")
        else:
            self._opened(env)
        return self._end()

    @property
    def outstanding(self) -> int | None:
        """The timestamp of the request waiting for replies, if any."""
        return self._current[0] if self._current is not None else None

    def wants(self, env: Envelope) -> bool:
        """Whether an opened reply envelope may still matter: it answers the outstanding
        request (a gateway need not hand a batch's later replies to clients already done)."""
        if self._current is None:
            return False
        rep = self._reply_of(env)
        return rep is None or rep.timestamp == self._current[0]

    def _opened(self, env: Envelope) -> None:
        if env.type != REPLY and env.type != REPLIES:
            self._count("forbidden")
        elif env.sender not in self._members:
            self._count("not_member")
        elif not self._replay.is_fresh(env.sender, env.seq):
            self._count("replay")
        else:
            self._replay.accept(env.sender, env.seq)
            rep = self._reply_of(env)
            if rep is None or rep.client != self.identity.public_key:
                self._count("malformed_body")
            else:
                self._on_reply(env.sender, rep)

    def _reply_of(self, env: Envelope) -> Reply | None:
        if env.type == REPLIES:
            return reply_in(env.body, self.identity.public_key, self._hex)
        return Reply.parse(env.body)

    def _wanted(self, data: bytes) -> bool:
        """Whether ``data`` may be a reply to the outstanding request (decoded, not verified:
        once f+1 matching replies completed a request, the rest need no checking)."""
        if self._current is None:
            return False
        try:
            body = cbor2.loads(data[64:])[6]
            if "rs" in body:  # pbft.replies: our item, if any
                return bool(body["rs"][self._hex][0] == self._current[0])
            return bool(body["t"] == self._current[0] and body["c"] == self.identity.public_key)
        except Exception:
            return True  # let the full check count it

    def on_timer(self, name: str, now_ms: int) -> list[Effect]:
        self._begin(now_ms)
        if name == TIMER_CLIENT and self._deadline is not None and now_ms >= self._deadline:
            self._deadline = None
            if self._current is not None:
                self._attempt += 1
                self._send(broadcast=True)
        return self._end()

    # ------------------------------------------------------------------

    def _begin(self, now_ms: int) -> None:
        self._now = now_ms
        self._out = []

    def _end(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    def _count(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _next(self) -> None:
        self._current = self._queue.popleft() if self._queue else None
        self._replies = {}
        self._attempt = 0
        if self._current is not None:
            self._send(broadcast=False)

    def _send(self, broadcast: bool) -> None:
        assert self._current is not None
        t, op = self._current
        if self._env_seq >= self._seq_reserved:
            self._seq_reserved = self._env_seq + self.seq_block
            self._out.append(Persist({"k": "seq", "upto": self._seq_reserved}))
        self._env_seq += 1
        raw = seal(
            self.identity,
            swarm_id=self.swarm_id,
            type=REQUEST,
            seq=self._env_seq,
            timestamp=self._now,
            body=Request(op, t).body(),
        )
        if broadcast:
            self._out.append(Send(None, raw))
        else:
            primary = self.validators[self.view % len(self.validators)]
            self._out.append(Send(peer_id_from_public_key(primary), raw))
        wait = min(self.retransmit_ms << min(self._attempt, 16), self.max_retransmit_ms)
        self._deadline = self._now + wait
        self._out.append(SetTimer(TIMER_CLIENT, self._deadline))

    def _on_reply(self, sender: bytes, rep: Reply) -> None:
        # Believe a view once f+1 validators report it or later: one liar cannot misdirect us.
        self._views[sender] = max(self._views.get(sender, 0), rep.view)
        ranked = sorted(self._views.values(), reverse=True)
        f = max_faulty(len(self.validators))
        if len(ranked) > f:
            self.view = max(self.view, ranked[f])
        if self._current is None or rep.timestamp != self._current[0]:
            return
        self._replies[sender] = rep.result
        agree = sum(1 for r in self._replies.values() if r == rep.result)
        if agree >= max_faulty(len(self.validators)) + 1:
            t, op = self._current
            self._out.append(Completed(t, op, rep.result))
            self._deadline = None
            self._next()
