"""The decided log as a sequence of PBFT decisions, sans-IO: mapping, rules, verifier, votes.

The PBFT instance that orders the log batches many requests per sequence number, with a
checkpoint every ``CHECKPOINT_INTERVAL`` (K = 4) seqs and a window of ``WINDOW`` (8) above the
stable one (:func:`pbft_config`, ``max_batch`` requests). The log
has one entry per request slot of every decided batch, in (PBFT seq, index) order; ``entry.seq``
is the flat position in that order (see :mod:`.entry_proof`). That makes three things simple and
checkable by anyone:

- the log is dense: null batches (view-change gap fill), duplicate requests, requests that are
  not validly signed and invalid operations are decided too, as ``noop`` entries, and each
  entry's proof names its batch's size, so a peer doing state transfer cannot hide a decision
  in the middle of a batch or skip a batch;
- a validator-set change decided in the batch at seq ``s`` governs the batches from
  :func:`~.pbft.config.takes_over` (``s``) on: the one after the first checkpoint at or after
  ``s + WINDOW - 1``, since every batch up to the watermark may already be prepared under the
  old set. ``state.schedule`` records it as the replicas do, every batch is certified by
  ``state.batch_validators(n)``, and a primary with no requests orders null batches up to the
  boundary, so the change takes over without waiting for traffic. Checkpoints every K seqs
  keep their messages (three quarters of which a checkpoint at every seq cost) and their round
  off a decision's critical path;
- an entry is a pure function of (state before it, its request): validators compute it when
  they execute, any other node recomputes it from the certificate to verify it.

Entry certificate: ``[proof, commit envelope, ...]``: the :class:`~.entry_proof.EntryProof`
(batch seq, index, size, the signed request, Merkle path) and quorum(n) ``pbft.commit``
envelopes for (view, seq, batch digest). The digest is the batch's Merkle root, recomputed from
the proof, so an entry is verified without the rest of its batch.

Operation (the request's ``op`` bytes): canonical CBOR ``{"kind": str, "payload": {...}}``.
Its proposer is the request's signer (the PBFT client key). The entry is:

- ``(kind, payload)`` of the operation when the proposer may propose it (:meth:`permit`) and
  the state accepts it (:meth:`ConsensusMembership.check`);
- ``noop {"reason": "invalid", "kind", "error"}`` otherwise (the error text is part of the
  rules: every node computes the same one);
- ``noop {"reason": "null"}`` for a null batch, ``noop {"reason": "duplicate"}`` for a request
  PBFT skipped (timestamp not above the client's last executed one), ``noop {"reason":
  "invalid", "error": "not a signed request"}`` for a batch item that is no signed request.

:class:`ConsensusMembership` is :class:`~mossnode.protocols.membership.Membership` plus what
this needs: the ``noop`` and vote kinds, pluggable extension kinds, the per-client timestamp
index that mirrors PBFT's de-duplication, the open polls and where the log stands in the PBFT
sequence. :class:`DecisionMachine` is the PBFT application; :class:`ConsensusCore` ties a
replica, a client and the state together so the I/O layer only moves bytes, persists and keeps
timers.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..crypto.envelope import Rejection, canonical, open_envelope, seal
from ..crypto.identity import Identity
from ..crypto.peerid import peer_id_from_public_key
from .entry_proof import GENESIS_POSITION, EntryProof, Position, proofs_for
from .membership import (
    KINDS as MEMBERSHIP_KINDS,
)
from .membership import (
    NO_SKEW,
    CertificateVerifier,
    Entry,
    Membership,
    MembershipError,
)
from .pbft import (
    Client,
    Completed,
    Decided,
    Effect,
    EnvelopeCache,
    Execution,
    Invalid,
    Outcome,
    PbftConfig,
    Persist,
    Reconfigured,
    Replica,
    Send,
    SendAll,
    SetTimer,
    batch_payload,
    requests_of,
    verify_commits,
)
from .pbft import Entry as PbftEntry
from .pbft.config import rescheduled, takes_over
from .pbft.messages import REPLIES, REPLY, REQUEST, Reply, Request, open_embedded
from .tasks.model import Assignment

NOOP = "noop"
VOTE_OPEN = "vote.open"
VOTE_CAST = "vote.cast"
VOTE_OUTCOME = "vote.outcome"
VOTE_KINDS = frozenset({VOTE_OPEN, VOTE_CAST, VOTE_OUTCOME})
NOOP_REASONS = frozenset({"null", "duplicate", "invalid"})
NOT_A_REQUEST = "not a signed request"

# Who may propose what: the permission the proposer (request signer) must hold.
PERMISSION: dict[str, str | None] = {
    "admit": "member.invite",
    "remove": "member.remove",
    "grant": "role.grant",
    "revoke": "role.revoke",
    "pause": "swarm.pause",
    "resume": "swarm.pause",
    VOTE_OPEN: "decision.propose",
    VOTE_CAST: "decision.vote",
    VOTE_OUTCOME: None,  # anyone who is a member; check() decides whether it may close
}
# Payload field that must hold the proposer's own key.
ACTOR: dict[str, str] = {VOTE_OPEN: "proposer", VOTE_CAST: "voter", VOTE_OUTCOME: "closed_by"}

MAX_KIND_LEN = 64
MAX_OP_BYTES = 64 * 1024
RULES = ("majority", "reputation")
NEUTRAL_WEIGHT = 500  # reputation 0.5 in thousandths: a newcomer's score
MAX_WEIGHT = 1_000_000


DEFAULT_MAX_BATCH = 128
# The log's checkpoint interval and window: part of its format, since they fix where a
# validator-set change takes over (see the module doc).
CHECKPOINT_INTERVAL = 4
WINDOW = 8


def pbft_config(
    swarm_id: bytes,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    view_timeout_ms: int = 2_000,
    retransmit_ms: int = 500,
    max_backoff: int = 6,
    max_skew_ms: int = 30_000,
) -> PbftConfig:
    """The PBFT parameters of the decided log. Batch size and timing are tunable; the checkpoint
    interval and window are part of the log's format: they fix where a validator-set change
    takes over (see the module doc)."""
    return PbftConfig(
        swarm_id=swarm_id,
        checkpoint_interval=CHECKPOINT_INTERVAL,
        window=WINDOW,
        max_batch=max_batch,
        max_inflight=1,
        reply_batches=True,
        view_timeout_ms=view_timeout_ms,
        retransmit_ms=retransmit_ms,
        max_backoff=max_backoff,
        max_skew_ms=max_skew_ms,
    )


class DecisionError(Exception):
    """The local state and the replica disagree: a bug or a corrupted store, never input."""


# --------------------------------------------------------------------------- operations


def _plain(value: Any, depth: int = 0) -> bool:
    if depth > 16:
        return False
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def encode_op(kind: str, payload: Mapping[str, Any]) -> bytes:
    """The request ``op`` for a proposed decision."""
    return canonical({"kind": kind, "payload": dict(payload)})


def decode_op(op: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(kind, payload)`` of a request op, or None if it is not a well-formed operation."""
    if len(op) > MAX_OP_BYTES:
        return None
    try:
        value = cbor2.loads(op)
    except Exception:  # hostile bytes: cbor2 raises many types
        return None
    if not (isinstance(value, dict) and set(value) == {"kind", "payload"}):
        return None
    kind, payload = value["kind"], value["payload"]
    if not (isinstance(kind, str) and 0 < len(kind) <= MAX_KIND_LEN):
        return None
    if not (isinstance(payload, dict) and _plain(payload)):
        return None
    return kind, payload


def _validators_in(roles: Mapping[bytes, frozenset[str]]) -> list[bytes]:
    return sorted(k for k, r in roles.items() if "validator" in r)


def _peek(raw: bytes) -> tuple[str, bytes, Any] | None:
    """(type, sender, body) of an envelope whose signature was already checked."""
    try:
        fields = cbor2.loads(raw[64:])
        return str(fields[2]), bytes(fields[3]), fields[6]
    except Exception:
        return None


def result_seq(result: bytes) -> int:
    """The seq a PBFT reply names (results are ``{"seq": n}``); 0 if malformed."""
    try:
        value = cbor2.loads(result)
    except Exception:
        return 0
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if type(seq) is int and seq > 0 else 0


def proof_of(entry: Entry) -> EntryProof | None:
    """The batch proof of a consensus-backed entry (first item of its certificate)."""
    return EntryProof.parse(entry.certificate[0]) if entry.certificate else None


def origin_of(entry: Entry, swarm_id: bytes) -> list[tuple[bytes, int]]:
    """(client, timestamp) of the signed request an entry holds, if any."""
    proof = proof_of(entry)
    env = open_embedded(proof.request, swarm_id) if proof is not None and proof.count else None
    req = Request.parse(env.body) if env is not None and env.type == REQUEST else None
    return [(env.sender, req.timestamp)] if env is not None and req is not None else []


# --------------------------------------------------------------------------- votes


@dataclass
class Poll:
    """An open or closed vote; its id is the seq of its ``vote.open`` entry."""

    id: int
    proposer: bytes
    title: str
    rule: str
    weights: dict[bytes, int]  # the electorate (members holding decision.vote at open) -> weight
    ballots: dict[bytes, bool] = field(default_factory=dict)
    result: str | None = None
    closed_at: int | None = None


@dataclass(frozen=True, slots=True)
class Tally:
    yes: int
    no: int
    total: int

    @property
    def decisive(self) -> str | None:
        """The result once the votes still missing cannot change it, else None."""
        if 2 * self.yes > self.total:
            return "passed"
        if 2 * self.no >= self.total:
            return "rejected"
        return None

    @property
    def early(self) -> str:
        """The result if the proposer closes the vote now (a majority of the electorate's
        weight is needed to pass)."""
        return "passed" if 2 * self.yes > self.total else "rejected"


def tally(poll: Poll) -> Tally:
    yes = sum(w for k, w in poll.weights.items() if poll.ballots.get(k) is True)
    no = sum(w for k, w in poll.weights.items() if poll.ballots.get(k) is False)
    return Tally(yes, no, sum(poll.weights.values()))


def open_payload(
    proposer: bytes,
    title: str,
    *,
    text: str = "",
    rule: str = "majority",
    weights: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Payload of a ``vote.open`` op. ``weights``: peer id -> weight in thousandths (the
    proposer's reputation figures, fixed here so every node tallies the same)."""
    body: dict[str, Any] = {"proposer": proposer, "title": title, "text": text, "rule": rule}
    if weights:
        body["weights"] = dict(weights)
    return body


def cast_payload(voter: bytes, vote_id: int, choice: str) -> dict[str, Any]:
    return {"voter": voter, "vote": vote_id, "choice": choice}


def outcome_payload(state: ConsensusMembership, vote_id: int, closer: bytes) -> dict[str, Any]:
    """Payload of the ``vote.outcome`` op that closes ``vote_id`` now (raises if unknown)."""
    poll = state.polls.get(vote_id)
    if poll is None:
        raise MembershipError(f"no vote {vote_id}")
    t = tally(poll)
    return {
        "vote": vote_id,
        "closed_by": closer,
        "yes": t.yes,
        "no": t.no,
        "total": t.total,
        "result": t.decisive or t.early,
    }


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class Extension:
    """A decision kind beyond the built-in ones (e.g. exclusive task assignment).

    ``check(state, payload)`` must be deterministic and return why the payload is invalid now,
    or None; ``apply(state, entry)`` updates whatever state the extension keeps (it may keep it
    in a closure or on the state object). ``permission``: what the proposer must hold;
    ``actor``: a payload field that must equal the proposer's key, or ``actor_as(key)`` when
    the field names the proposer another way (e.g. :func:`peer_id_from_public_key`).
    """

    permission: str | None
    check: Callable[[ConsensusMembership, dict[str, Any]], str | None]
    apply: Callable[[ConsensusMembership, Entry], None] | None = None
    actor: str | None = None
    actor_as: Callable[[bytes], Any] | None = None


TASK_ASSIGN = "task.assign"
MAX_ASSIGN_AT = 2**63 - 1  # a task.assign's ``at`` (ms) fits a signed 64-bit integer


def exclusive_assignment(assignments: dict[str, Assignment]) -> Extension:
    """The ``task.assign`` kind: ``{"task": id, "node": peer id, "at": ms}`` assigns an
    exclusive task to ``node``, the proposer itself (any member may propose itself for a task
    its agents can run; consensus only makes the choice unique), ``at`` being its clock when
    it proposed (a decision from before ``at`` existed sets no deadline). The first decision
    for a task wins; later ones decide as no-ops, but for the assignee's own with a later
    ``at``, which moves its deadline (its first proposal may be decided only after the
    deadline passed, with a newer one queued behind it). Decided
    assignments are recorded in ``assignments`` (task id -> :class:`~.tasks.model.Assignment`),
    the map the task lifecycle reads: the node must claim the task within
    ``Params.exclusive_claim_ms`` of ``at``, or the task fails. Only the node itself sets that
    deadline, so no member can make a task fail on another node's behalf; an assignee that
    lies about its own ``at`` only harms the task it was trusted with anyway."""

    def check(state: ConsensusMembership, p: dict[str, Any]) -> str | None:
        task, node, at = p.get("task"), p.get("node"), p.get("at")
        if not set(p) <= {"task", "node", "at"}:
            return "payload fields are task, node and at"
        if not (isinstance(task, str) and 0 < len(task) <= 128):
            return "payload.task must be a task id"
        if not isinstance(node, str) or state.by_peer_id(node) is None:
            return "payload.node must be a member's peer id"
        if "at" in p and (type(at) is not int or not 0 <= at <= MAX_ASSIGN_AT):
            return "payload.at must be a time in ms (an integer >= 0)"
        old = assignments.get(task)
        # the assignee itself may move its own deadline later (a decision that took longer
        # than the deadline, with a newer proposal queued behind it); nobody else may
        if old is not None and (
            old.node != node or type(at) is not int or (old.at is not None and at <= old.at)
        ):
            return f"task {task} is already assigned"
        return None

    def apply(state: ConsensusMembership, entry: Entry) -> None:
        p = entry.payload
        assignments[p["task"]] = Assignment(p["node"], p.get("at"))

    return Extension(
        permission=None,
        check=check,
        apply=apply,
        actor="node",
        actor_as=peer_id_from_public_key,
    )


@dataclass(frozen=True, slots=True)
class Analysis:
    """What one decided request slot means: its entry, and whose request PBFT executed."""

    kind: str
    payload: dict[str, Any]
    origin: tuple[bytes, int] | None  # (client, timestamp) the entry stands for, if executed
    executed: dict[bytes, int]  # client -> timestamp, for the request PBFT executed (if any)


def _trusted(state: Membership, entry: Entry) -> str | None:
    return None


def verify_consensus_certificate(state: Membership, entry: Entry) -> str | None:
    """:data:`CertificateVerifier` of a consensus-backed log: None if ``entry`` is the one
    decided at its position, else why not. Pure but for a memo; needs only the state before
    the entry: the proof must continue the log's position, its Merkle path must give the
    digest the quorum commits sign (validators in force at the batch's start), and the
    request must yield exactly the entry."""
    if not isinstance(state, ConsensusMembership):
        return "a consensus-backed log is replayed into a ConsensusMembership"
    cert = entry.certificate
    if len(cert) < 2:
        return "a consensus certificate holds the entry's batch proof and quorum commits"
    proof = EntryProof.parse(cert[0])
    if proof is None:
        return "the batch proof is malformed"
    root = proof.root()
    if root is None:
        return "the batch proof's Merkle path does not fit its position"
    gap = state.position.follows(proof, root)
    if gap is not None:
        return f"the entry does not continue the log: {gap}"
    commits = tuple(cert[1:])
    memo = (proof.n, root, commits)
    if memo != state._commits_checked:
        vals = state.batch_validators(proof.n)
        ok = verify_commits(commits, vals, state.swarm_id, seq=proof.n, batch_digest=root)
        if isinstance(ok, Invalid):
            return f"certificate refused: {ok.reason}"
        state._commits_checked = memo  # the same quorum certifies the batch's other entries
    got = state.analyze(cert[0])
    if isinstance(got, str):
        return got
    if entry.kind != got.kind or canonical(entry.payload) != canonical(got.payload):
        return f"entry says {entry.kind!r} but the decided request yields {got.kind!r}"
    return None


@dataclass
class ConsensusMembership(Membership):
    """The decided log's state when the log is consensus-backed (see the module doc)."""

    verifier: CertificateVerifier = verify_consensus_certificate
    extensions: dict[str, Extension] = field(default_factory=dict)
    # client key -> timestamp of its last request PBFT executed (mirrors the replicas' table)
    clients: dict[bytes, int] = field(default_factory=dict)
    # seq -> (client, timestamp) of the request the entry stands for (not for null/duplicate)
    origin: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    polls: dict[int, Poll] = field(default_factory=dict)
    # where the last entry sits in the PBFT sequence, and what certifies its batch
    position: Position = GENESIS_POSITION
    batch_first: dict[int, int] = field(default_factory=dict)  # PBFT seq -> its first entry
    # (first batch, validators) in order: which set certifies which batches (see the module
    # doc); the replicas keep the same schedule
    schedule: list[tuple[int, list[bytes]]] = field(default_factory=list)
    # opened request envelopes, shared with the local replica so each is verified once
    envelopes: EnvelopeCache | None = field(default=None, compare=False, repr=False)
    _commits_checked: tuple[int, bytes, tuple[bytes, ...]] | None = field(
        default=None, compare=False, repr=False
    )
    _analyzed: tuple[int, bytes, Analysis | str] | None = field(
        default=None, compare=False, repr=False
    )
    _validators_memo: tuple[dict[bytes, frozenset[str]], list[bytes]] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.envelopes is None:
            self.envelopes = EnvelopeCache(self.swarm_id)
        if not self.schedule:
            self.schedule = [(1, self.validators())]

    # -- views ------------------------------------------------------------------------------

    def genesis_validators(self) -> list[bytes]:
        return _validators_in(self.history[0])

    def validators(self) -> list[bytes]:
        """The validator set now (memoized per roles snapshot: hot on every broadcast)."""
        roles = self.history[-1]
        memo = self._validators_memo
        if memo is None or memo[0] is not roles:
            memo = self._validators_memo = (roles, _validators_in(roles))
        return list(memo[1])

    @property
    def pbft_height(self) -> int:
        """The PBFT seq of the last batch the log holds entries of (maybe not all of them)."""
        return self.position.n

    def batch_complete(self, n: int) -> bool:
        return n < self.position.n or (n == self.position.n and self.position.closes_batch)

    def batch_validators(self, n: int) -> list[bytes]:
        """The set that certifies PBFT batch ``n``: the one scheduled last for a batch <= n."""
        for first, vals in reversed(self.schedule):
            if first <= n:
                return list(vals)
        return list(self.schedule[0][1])

    @property
    def next_batch(self) -> int:
        """The PBFT batch the next entry belongs to."""
        return self.position.n + 1 if self.position.closes_batch else self.position.n

    def validators_at(self, seq: int) -> list[bytes]:
        """The set that certifies entry ``seq`` (the next entry's for ``seq`` > height)."""
        if seq > self.height:
            return self.batch_validators(self.next_batch)
        proof = proof_of(self.entries[seq - 1])
        if proof is None:  # not a consensus entry: cannot happen in a replayed log
            return _validators_in(self.history[seq - 1])
        return self.batch_validators(proof.n)

    def pbft_batch(self, n: int) -> PbftEntry | None:
        """Batch ``n`` as a PBFT decided entry (for :meth:`Replica.deliver`), rebuilt from its
        log entries; None unless the log holds all of them."""
        first = self.batch_first.get(n)
        if first is None or not self.batch_complete(n):
            return None
        head = proof_of(self.entries[first - 1])
        if head is None:
            return None
        group = self.entries[first - 1 : first - 1 + head.slots]
        requests = [p.request for p in map(proof_of, group) if p is not None]
        if len(requests) != head.slots:
            return None
        view = 0
        peeked = _peek(head_cert[1]) if len(head_cert := group[0].certificate) > 1 else None
        if peeked is not None and isinstance(peeked[2], dict) and type(peeked[2].get("v")) is int:
            view = peeked[2]["v"]
        payload = batch_payload(requests if head.count else [])
        return PbftEntry(n, view, payload, tuple(head_cert[1:]))

    # -- rules ------------------------------------------------------------------------------

    def check(self, kind: str, payload: dict[str, Any]) -> str | None:
        if kind in MEMBERSHIP_KINDS:
            return super().check(kind, payload) or self._keeps_validators(kind, payload)
        if kind == NOOP:
            reason = payload.get("reason")
            return None if reason in NOOP_REASONS else "unknown noop"
        if kind == VOTE_OPEN:
            return self._check_open(payload)
        if kind == VOTE_CAST:
            return self._check_cast(payload)
        if kind == VOTE_OUTCOME:
            return self._check_outcome(payload)
        ext = self.extensions.get(kind)
        if ext is not None:
            return ext.check(self, payload)
        return f"unknown decision kind {kind!r}"

    def permit(self, client: bytes, t: int, kind: str, payload: dict[str, Any]) -> str | None:
        """Why ``client`` may not propose this operation (request timestamp ``t``), or None."""
        if kind == NOOP:
            return "noop entries cannot be proposed"
        ext = self.extensions.get(kind)
        if kind not in PERMISSION and ext is None:
            return f"unknown decision kind {kind!r}"
        actor = ACTOR.get(kind) or (ext.actor if ext is not None else None)
        spelt = ext.actor_as if ext is not None and kind not in ACTOR else None
        if actor is not None and spelt is not None:
            if payload.get(actor) != spelt(client):
                return f"payload.{actor} must name the proposer itself"
        elif actor is not None and payload.get(actor) != client:
            return f"payload.{actor} must be the proposer's own key"
        if kind == "admit":
            if self.may(client, "member.invite"):
                return None
            return self._invitation(client, t, payload)
        if not self.is_member(client):
            return "the proposer is not a member"
        if kind == "remove" and payload.get("public_key") == client:
            return None  # leaving needs no permission
        perm = PERMISSION.get(kind, ext.permission if ext else None)
        if perm is not None and not self.may(client, perm):
            return f"the proposer does not hold {perm}"
        return None

    def judge(self, client: bytes, t: int, op: bytes) -> tuple[str, dict[str, Any]]:
        """The entry an executed request yields in the current state."""
        parsed = decode_op(op)
        if parsed is None:
            return NOOP, {"reason": "invalid", "error": "malformed operation"}
        kind, payload = parsed
        try:
            err = self.permit(client, t, kind, payload) or self.check(kind, payload)
        except Exception as exc:  # an extension's check must not split the replicas either
            err = f"check failed: {type(exc).__name__}"
        if err is not None:
            return NOOP, {"reason": "invalid", "kind": kind, "error": err}
        return kind, payload

    def analyze(self, proof: EntryProof | bytes, raw: bytes | None = None) -> Analysis | str:
        """The entry a decided request slot yields now, mirroring the replica's execution
        rules: an item that is no validly signed request, or whose timestamp is not above the
        client's last executed one, is skipped (a ``noop``); otherwise the operation is judged.
        ``raw`` is the proof's encoding, when the caller has it.
        """
        if raw is None:
            raw = proof if isinstance(proof, bytes) else proof.encode()
        memo = self._analyzed
        if memo is not None and memo[0] == self.height and memo[1] == raw:
            return memo[2]
        got = self._analyze(EntryProof.parse(raw) if isinstance(proof, bytes) else proof)
        self._analyzed = (self.height, raw, got)
        return got

    def _analyze(self, proof: EntryProof | None) -> Analysis | str:
        if proof is None:
            return "the batch proof is malformed"
        if proof.count == 0:
            return Analysis(NOOP, {"reason": "null"}, None, {})
        assert self.envelopes is not None
        got = self.envelopes.request(proof.request)
        if got is None:
            return Analysis(NOOP, {"reason": "invalid", "error": NOT_A_REQUEST}, None, {})
        env, req = got
        done = self.clients.get(env.sender)
        if done is not None and req.timestamp <= done:
            return Analysis(NOOP, {"reason": "duplicate"}, None, {})
        kind, body = self.judge(env.sender, req.timestamp, req.op)
        return Analysis(kind, body, (env.sender, req.timestamp), {env.sender: req.timestamp})

    # -- applying ---------------------------------------------------------------------------

    def apply(self, entry: Entry) -> None:
        """Verify and apply the next entry (raises MembershipError and changes nothing if bad).
        Entries of this node's own replica come through :meth:`apply_trusted`."""
        self._apply(entry, proof_of(entry) if entry.seq == self.height + 1 else None, None)

    def _apply(self, entry: Entry, proof: EntryProof | None, root: bytes | None) -> None:
        analysis = self.analyze(proof, entry.certificate[0]) if proof is not None else None
        roles = self.history[-1]  # snapshots are never mutated: the same one, the same set
        super().apply(entry)
        if isinstance(analysis, Analysis):
            for client, t in analysis.executed.items():
                self.clients[client] = max(t, self.clients.get(client, t))
            if analysis.origin is not None:
                self.origin[entry.seq] = analysis.origin
        if proof is not None:
            root = root or proof.root()
            assert root is not None  # the verifier (or the trusted caller) checked it
            if proof.index == 0:
                self.batch_first[proof.n] = entry.seq
            self.position = Position(proof.n, proof.index, proof.count, root)
            after = self.validators() if self.history[-1] is not roles else None
            if after is not None and after != _validators_in(roles):
                # as the replicas schedule it when they execute the request
                first = takes_over(proof.n, CHECKPOINT_INTERVAL, WINDOW)
                self.schedule = rescheduled(self.schedule, first, after)
        self._apply_extras(entry)

    def apply_trusted(self, entry: Entry, proof: EntryProof, root: bytes) -> None:
        """Apply without checking the commits: for entries this node's own replica decided (it
        verified every commit), whose certificate holds only the batch proof (``proof``,
        encoded, of the batch with digest ``root``) until the decision is final."""
        saved = self.verifier
        self.verifier = _trusted
        try:
            self._apply(entry, proof, root)
        finally:
            self.verifier = saved

    def _apply_extras(self, entry: Entry) -> None:
        p = entry.payload
        if entry.kind == VOTE_OPEN:
            raw = p.get("weights") or {}
            weights: dict[bytes, int] = {}
            for key in sorted(self.members):
                if not self.may(key, "decision.vote"):
                    continue
                if p["rule"] == "majority":
                    weights[key] = 1
                else:
                    weights[key] = int(raw.get(peer_id_from_public_key(key), NEUTRAL_WEIGHT))
            self.polls[entry.seq] = Poll(entry.seq, p["proposer"], p["title"], p["rule"], weights)
        elif entry.kind == VOTE_CAST:
            self.polls[p["vote"]].ballots[p["voter"]] = p["choice"] == "yes"
        elif entry.kind == VOTE_OUTCOME:
            poll = self.polls[p["vote"]]
            poll.result = p["result"]
            poll.closed_at = entry.seq
        else:
            ext = self.extensions.get(entry.kind)
            if ext is not None and ext.apply is not None:
                ext.apply(self, entry)

    # -- rule details -----------------------------------------------------------------------

    def _keeps_validators(self, kind: str, payload: dict[str, Any]) -> str | None:
        if kind != "remove" and not (kind == "revoke" and payload.get("role") == "validator"):
            return None
        left = [v for v in self.validators() if v != payload.get("public_key")]
        return None if left else "the swarm would be left without validators"

    def _invitation(self, client: bytes, t: int, payload: dict[str, Any]) -> str | None:
        """An admission proposed by someone without member.invite must carry the invite
        (``payload.invitation``: the signed ``member.invite`` envelope) of a member who has it;
        the request timestamp must not be past the invite's expiry."""
        raw = payload.get("invitation")
        if not isinstance(raw, bytes):
            return "the proposer does not hold member.invite and no invitation is attached"
        env = open_envelope(raw, swarm_id=self.swarm_id, now_ms=0, max_skew_ms=NO_SKEW)
        if isinstance(env, Rejection) or env.type != "member.invite":
            return "the attached invitation is not a valid invite of this swarm"
        body = env.body if isinstance(env.body, dict) else {}
        if not self.may(env.sender, "member.invite"):
            return "the invitation was not issued by a member holding member.invite"
        if body.get("nonce") != payload.get("invite"):
            return "payload.invite is not the invitation's nonce"
        roles = body.get("roles")
        wanted = payload.get("roles")
        if not (isinstance(roles, list) and isinstance(wanted, list)) or set(roles) != set(wanted):
            return "payload.roles differ from the roles the invitation grants"
        expires = body.get("expires_at")
        if type(expires) is not int or t > expires:
            return "the invitation had expired when the admission was proposed"
        if payload.get("invited_by") not in (None, env.sender):
            return "payload.invited_by is not the invitation's issuer"
        if not self.is_member(client) and payload.get("public_key") != client:
            return "a non-member may only propose its own admission"
        return None

    def _check_open(self, p: dict[str, Any]) -> str | None:
        title, text, rule = p.get("title"), p.get("text", ""), p.get("rule")
        if not isinstance(p.get("proposer"), bytes):
            return "payload.proposer must be a key"
        if not (isinstance(title, str) and 0 < len(title) <= 200):
            return "payload.title must be 1-200 characters"
        if not (isinstance(text, str) and len(text) <= 4000):
            return "payload.text must be at most 4000 characters"
        if rule not in RULES:
            return f"payload.rule must be one of {', '.join(RULES)}"
        weights = p.get("weights", {})
        if not isinstance(weights, dict) or not all(
            isinstance(k, str) and type(w) is int and 0 <= w <= MAX_WEIGHT
            for k, w in weights.items()
        ):
            return f"payload.weights must map peer ids to integers 0-{MAX_WEIGHT}"
        if weights and rule != "reputation":
            return "payload.weights only go with rule reputation"
        return None

    def _poll(self, p: dict[str, Any]) -> Poll | str:
        vote = p.get("vote")
        poll = self.polls.get(vote) if type(vote) is int else None
        if poll is None:
            return "payload.vote names no vote"
        if poll.result is not None:
            return f"vote {poll.id} is closed"
        return poll

    def _check_cast(self, p: dict[str, Any]) -> str | None:
        poll = self._poll(p)
        if isinstance(poll, str):
            return poll
        if p.get("choice") not in ("yes", "no"):
            return "payload.choice must be yes or no"
        voter = p.get("voter")
        if not isinstance(voter, bytes) or voter not in poll.weights:
            return "the voter is not in this vote's electorate"
        if voter in poll.ballots:
            return "the voter has already voted"
        return None

    def _check_outcome(self, p: dict[str, Any]) -> str | None:
        poll = self._poll(p)
        if isinstance(poll, str):
            return poll
        t = tally(poll)
        if (p.get("yes"), p.get("no"), p.get("total")) != (t.yes, t.no, t.total):
            return "payload tally differs from the votes cast"
        if t.decisive is not None:
            return None if p.get("result") == t.decisive else "payload.result is wrong"
        if p.get("closed_by") != poll.proposer:
            return "only the proposer may close a vote before its result is certain"
        return None if p.get("result") == t.early else "payload.result is wrong"


# --------------------------------------------------------------------------- the application


@dataclass
class _Batch:
    """A batch the replica is executing: its proofs, how many of its entries the log held
    before (state transfer got there first) and the next slot to fill."""

    n: int
    root: bytes
    proofs: list[EntryProof]
    present: int
    filled: int
    problem: str | None = None  # why this batch and the log disagree (a bug or bad store)
    detached: bool = False  # the log is not where this batch goes: leave the state alone


class DecisionMachine:
    """The PBFT application of the decided log.

    The replica announces each decided batch (:meth:`begin`) and then hands over the requests
    it executes (:meth:`execute`), all inside one replica call and before the Decided effect
    carrying the commits is out. Every slot of the batch is appended to the log at once as a
    provisional entry (its certificate holds only the batch proof), so the next request is
    judged against the state after it; skipped slots become their ``noop``. :meth:`finalize`,
    called for every Decided effect in order right after the replica call, adds the commits.
    The result of every request is ``{"seq": flat position}``: the same whether a replica
    executes live or re-executes a batch it already got by state transfer.
    """

    def __init__(self, state: ConsensusMembership) -> None:
        self.state = state
        self._open: dict[int, _Batch] = {}

    def begin(self, n: int, batch: tuple[bytes, ...]) -> None:
        st = self.state
        for b in self._open.values():  # trailing skipped slots of the batches before
            self._fill(b, len(b.proofs))
        root, proofs = proofs_for(n, batch)
        present = 0
        problem = None
        if n in st.batch_first:
            head = proof_of(st.entries[st.batch_first[n] - 1])
            if head is None or head.root() != root:
                problem = f"batch {n}: the replica executes another batch than the log"
            present = min(len(proofs), st.height - st.batch_first[n] + 1)
        elif n != st.pbft_height + 1 or not st.position.closes_batch:
            problem = f"batch {n} executes but the log is at batch {st.pbft_height}"
        detached = problem is not None
        self._open[n] = _Batch(n, root, proofs, present, present, problem, detached)

    def execute(self, ex: Execution) -> bytes | Outcome:
        st = self.state
        b = self._open.get(ex.seq)
        if b is None or b.detached or not 0 <= ex.index < len(b.proofs):
            if b is not None:
                b.problem = b.problem or f"request {ex.index} of batch {ex.seq} has no slot"
            return canonical({"seq": 0})
        if ex.index < b.present:  # known by state transfer: re-execution
            flat = st.batch_first[ex.seq] + ex.index
            before = _validators_in(st.history[flat - 1])
            after = _validators_in(st.history[flat])
        else:
            self._fill(b, ex.index)
            roles = st.history[-1]
            entry = self._append(b, ex.index)
            if st.origin.get(entry.seq) != (ex.client, ex.timestamp):
                b.problem = f"seq {entry.seq}: the replica executed what the log skips"
            flat = entry.seq
            if st.history[-1] is roles:  # no role changed (snapshots are shared till one does)
                return canonical({"seq": flat})
            before, after = _validators_in(roles), st.validators()
        result = canonical({"seq": flat})
        return Outcome(result, tuple(after)) if after != before else result

    def finalize(self, d: Decided) -> list[Entry]:
        """The certified entries of ``d`` the log did not hold yet, in order."""
        st = self.state
        b = self._open.pop(d.seq, None)
        if b is None:
            raise DecisionError(f"the replica decided batch {d.seq} without announcing it")
        if b.problem is not None:
            raise DecisionError(b.problem)
        self._fill(b, len(b.proofs))
        first = st.batch_first[d.seq]
        out: list[Entry] = []
        for i in range(b.present, len(b.proofs)):
            old = st.entries[first - 1 + i]
            executed = st.origin.get(old.seq) is not None
            if d.results and executed != (d.results[i] is not None):
                raise DecisionError(f"seq {old.seq}: the replica and the log disagree on a skip")
            final = Entry(old.seq, old.kind, old.payload, [old.certificate[0], *d.certificate])
            st.entries[first - 1 + i] = final
            out.append(final)
        return out

    def _fill(self, b: _Batch, upto: int) -> None:
        """Append the slots before ``upto`` that are not in the log yet (skipped requests)."""
        while b.filled < upto and not b.detached:
            entry = self._append(b, b.filled)
            if entry.seq in self.state.origin:
                b.problem = f"seq {entry.seq}: the log executes what the replica skipped"

    def _append(self, b: _Batch, index: int) -> Entry:
        st = self.state
        proof = b.proofs[index]
        raw = proof.encode()
        got = st.analyze(proof, raw)
        if isinstance(got, str):  # cannot happen for a proof built here; be defensive
            b.problem = got
            got = Analysis(NOOP, {"reason": "invalid", "error": got}, None, {})
        entry = Entry(st.height + 1, got.kind, got.payload, [raw])
        st.apply_trusted(entry, proof, b.root)
        b.filled = index + 1
        return entry


# --------------------------------------------------------------------------- the node core

REPLICA = "replica"
CLIENT = "client"


@dataclass
class Output:
    """What the I/O layer must do after one call, in this order: persist ``records`` (replica
    records, appended), ``client_state`` (replace) and ``entries`` (append to the decided log)
    in one durable write; then send ``sends`` and arm ``timers``; then hand ``entries`` to the
    application and resolve proposals from ``completed`` ((timestamp, seq) pairs).

    Exception: the first ``free_sends`` sends were emitted before any record or client state of
    this output, so they depend only on what earlier outputs persisted. Once those are durable
    they may go out without waiting for this output's write (a replica's replies and checkpoint
    after it executes a batch: see ``Replica._execute``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    client_state: dict[str, int] | None = None
    entries: list[Entry] = field(default_factory=list)
    sends: list[tuple[str, bytes]] = field(default_factory=list)
    timers: list[tuple[str, str, int]] = field(default_factory=list)
    completed: list[tuple[int, int]] = field(default_factory=list)
    reconfigured: list[Reconfigured] = field(default_factory=list)
    free_sends: int = 0


class ConsensusCore:
    """One node's consensus, sans-IO: its replica (while it is, or was, a validator), its PBFT
    client (to propose) and the decided-log state they drive.

    Every call returns an :class:`Output`. Messages for this node itself (its client's request
    to its own replica, its replica's reply to its own client) are delivered inside the call.
    """

    def __init__(
        self,
        identity: Identity,
        state: ConsensusMembership,
        config: PbftConfig,
        *,
        records: Sequence[Mapping[str, Any]] = (),
        client_state: Mapping[str, int] | None = None,
        client_retransmit_ms: int = 1_000,
        max_client_retransmit_ms: int = 16_000,
    ) -> None:
        if (config.checkpoint_interval, config.window) != (CHECKPOINT_INTERVAL, WINDOW):
            raise ValueError("the decided log needs pbft_config()'s checkpoint interval and window")
        self.identity = identity
        self.me = identity.public_key
        self.my_pid = identity.peer_id
        self.state = state
        self.cfg = config
        self.machine = DecisionMachine(state)
        self.envelopes = state.envelopes or EnvelopeCache(state.swarm_id)
        self.replica: Replica | None = None
        self._records = [dict(r) for r in records]
        cs = dict(client_state or {})
        self._client_state = {"t": int(cs.get("t", 0)), "upto": int(cs.get("upto", 0))}
        self.client = Client.restore(
            [
                {"k": "t", "t": self._client_state["t"]},
                {"k": "seq", "upto": self._client_state["upto"]},
            ],
            identity,
            state.batch_validators(state.next_batch),
            state.swarm_id,
            retransmit_ms=client_retransmit_ms,
            max_retransmit_ms=max_client_retransmit_ms,
            max_skew_ms=config.max_skew_ms,
        )
        self.counters: Counter[str] = Counter()
        self.last_refusal: str | None = None
        self._reply_seq = 0
        self._pids: dict[bytes, str] = {}
        self._local: deque[bytes] = deque()
        self._out = Output()
        self._now = 0

    # -- public API -------------------------------------------------------------------------

    @property
    def is_validator(self) -> bool:
        return self.me in self.state.validators()

    def start(self, now_ms: int) -> Output:
        """Restore or create the replica if this node is (or was) a validator; call once."""
        self._begin(now_ms)
        self._ensure_replica()
        return self._end()

    def receive(self, data: bytes, now_ms: int) -> Output:
        self._begin(now_ms)
        self._dispatch(data)
        return self._end()

    def on_timer(self, target: str, name: str, now_ms: int) -> Output:
        self._begin(now_ms)
        if target == REPLICA and self.replica is not None:
            self._run(REPLICA, self.replica.on_timer(name, now_ms))
        elif target == CLIENT:
            self._run(CLIENT, self.client.on_timer(name, now_ms))
        return self._end()

    def submit(self, op: bytes, now_ms: int) -> tuple[int, Output]:
        """Propose ``op`` (see :func:`encode_op`); returns the request timestamp."""
        self._begin(now_ms)
        t, effects = self.client.submit(op, now_ms)
        self._run(CLIENT, effects)
        return t, self._end()

    def ingest(self, entries: Iterable[Entry], now_ms: int) -> tuple[int, Output]:
        """State transfer: verify and apply entries that continue the log, in order. Stops at
        the first gap or refusal (``last_refusal`` says why). Returns how many applied."""
        self._begin(now_ms)
        applied = 0
        for e in sorted(entries, key=lambda e: e.seq):
            if e.seq <= self.state.height:
                continue
            if e.seq != self.state.height + 1:
                break
            try:
                self.state.apply(e)
            except MembershipError as exc:
                self.counters["ingest_refused"] += 1
                self.last_refusal = str(exc)
                break
            applied += 1
            self._out.entries.append(e)
            self._after_entry()
        if applied and self.replica is not None:
            self._catch_up_replica()
        return applied, self._end()

    def status(self) -> dict[str, Any]:
        r = self.replica
        vals = self.state.validators()
        return {
            "validator": self.me in vals,
            "validators": len(vals),
            # the set the replicas count now: it differs from "validators" between a decided
            # change and the batch it takes over at (the primary orders null batches till then)
            "in_force": len(r.validators)
            if r
            else len(self.state.validators_at(self.state.height + 1)),
            "height": self.state.height,
            "view": r.view if r else None,
            "primary": peer_id_from_public_key(r.primary) if r and r.validators else None,
            "last_executed": r.last_executed if r else None,
            "stable": r.stable_seq if r else None,
            "pending_proposals": self.client.busy,
            "rejections": dict(r.rejections) if r else {},
            "counters": dict(self.counters),
        }

    # -- plumbing ---------------------------------------------------------------------------

    def _begin(self, now_ms: int) -> None:
        self._now = now_ms
        self._out = Output()

    def _end(self) -> Output:
        while self._local:
            self._dispatch(self._local.popleft())
        out, self._out = self._out, Output()
        return out

    def _pid(self, key: bytes) -> str:
        pid = self._pids.get(key)
        if pid is None:
            pid = self._pids[key] = peer_id_from_public_key(key)
        return pid

    def _dispatch(self, data: bytes) -> None:
        peeked = _peek(data) if isinstance(data, bytes) and len(data) > 64 else None
        if peeked is not None and (peeked[0] == REPLY or peeked[0] == REPLIES):
            self._run(CLIENT, self.client.receive(data, self._now))
        elif self.replica is not None:
            self._run(REPLICA, self.replica.receive(data, self._now))
        else:
            self.counters["not_a_replica"] += 1

    def _targets(self, source: str) -> set[bytes]:
        if source == CLIENT:
            return set(self.client.validators)
        out = set(self.state.validators())
        r = self.replica
        if r is not None:
            out.update(r.validators)
            for first, vals in r.config_history:
                if first > r.stable_seq:
                    out.update(vals)
        out.discard(self.me)
        return out

    def _route(self, out: Output, pids: Iterable[str], data: bytes) -> None:
        """One message to ``pids``: to itself through the local queue, to others as sends
        (free while nothing of this output waits to be persisted)."""
        free = not out.records and out.client_state is None
        for pid in pids:
            if pid == self.my_pid:
                self._local.append(data)
            else:
                out.sends.append((pid, data))
                if free:
                    out.free_sends += 1

    def _run(self, source: str, effects: list[Effect]) -> None:
        out = self._out
        for eff in effects:
            if isinstance(eff, Persist):
                if source == REPLICA:
                    out.records.append(eff.record)
                else:
                    self._client_record(eff.record)
            elif isinstance(eff, Send):
                pids = (
                    [self._pid(k) for k in sorted(self._targets(source))]
                    if eff.to is None
                    else [eff.to]
                )
                self._route(out, pids, eff.data)
            elif isinstance(eff, SendAll):
                self._route(out, eff.to, eff.data)
            elif isinstance(eff, SetTimer):
                out.timers.append((source, eff.name, eff.at_ms))
            elif isinstance(eff, Decided):
                self._decided(eff)
            elif isinstance(eff, Reconfigured):
                out.reconfigured.append(eff)
                self.counters["reconfigured"] += 1
            elif isinstance(eff, Completed):
                out.completed.append((eff.timestamp, result_seq(eff.result)))

    def _client_record(self, rec: Mapping[str, Any]) -> None:
        if rec.get("k") == "t":
            self._client_state["t"] = max(self._client_state["t"], int(rec["t"]))
        elif rec.get("k") == "seq":
            self._client_state["upto"] = max(self._client_state["upto"], int(rec["upto"]))
        self._out.client_state = dict(self._client_state)

    def _decided(self, d: Decided) -> None:
        try:
            entries = self.machine.finalize(d)
        except DecisionError as exc:
            self.counters["divergence"] += 1
            self.last_refusal = str(exc)
            return
        if entries:
            self._out.entries.extend(entries)
            self._after_entry()
        # The replica does not send itself a reply; our client needs it (with n = 1 it is the
        # only one), and it is genuinely this validator's reply.
        if not self.client.busy:
            return
        for raw, result in zip(requests_of(d.payload) or (), d.results, strict=False):
            env = self.envelopes.open(raw) if result is not None else None
            req = Request.parse(env.body) if env is not None and env.sender == self.me else None
            if result is None or req is None:
                continue
            self._reply_seq += 1
            reply = seal(
                self.identity,
                swarm_id=self.cfg.swarm_id,
                type=REPLY,
                seq=self._reply_seq,
                timestamp=self._now,
                body=Reply(d.view, req.timestamp, self.me, result).body(),
            )
            self._local.append(reply)

    def _after_entry(self) -> None:
        st = self.state
        vals = tuple(st.batch_validators(st.next_batch))
        if vals != self.client.validators:
            self.client.set_validators(vals)
        if self.replica is None and self.me in st.validators():
            self._ensure_replica()

    def _ensure_replica(self) -> None:
        if self.replica is not None:
            return
        if self.me not in self.state.validators() and not self._records:
            return
        genesis = self.state.genesis_validators()
        kwargs: dict[str, Any] = {"on_batch": self.machine.begin, "envelopes": self.envelopes}
        execute = self.machine.execute
        if self._records:
            r = Replica.restore(self._records, self.identity, genesis, self.cfg, execute, **kwargs)
        else:
            r = Replica(self.identity, genesis, self.cfg, execute, **kwargs)
        self._records = []
        self.replica = r
        if r.last_executed > self._batches_done():
            # The records are ahead of the stored log (lost entries): state transfer refills it.
            self.counters["replica_ahead_of_log"] += 1
        self._catch_up_replica()
        self._run(REPLICA, r.start(self._now))

    def _batches_done(self) -> int:
        pos = self.state.position
        return pos.n if pos.closes_batch else pos.n - 1

    def _catch_up_replica(self) -> None:
        """Feed the replica the certified batches the log holds beyond its last executed one."""
        r = self.replica
        assert r is not None
        while r.last_executed < self._batches_done():
            start = r.last_executed
            top = min(self._batches_done(), start + 64)
            chunk = [self.state.pbft_batch(n) for n in range(start + 1, top + 1)]
            self._run(REPLICA, r.deliver([c for c in chunk if c is not None], self._now))
            if r.last_executed == start:
                self.counters["deliver_refused"] += 1
                break
