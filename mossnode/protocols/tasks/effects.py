"""Effects: what the task core asks the daemon to do, as values.

Two kinds. Shared-state effects become writes to this node's own entries of the CRDT document
(:func:`writes` spells them out: ``(task id, kind, value)``, where ``kind`` is one of the
per-node maps ``bids, claims, leases, progress, results, reviews``, ``log`` for an append to
this node's log, or ``create`` for a new task's core fields). Local effects (:class:`Dispatch`,
:class:`DispatchReview`, :class:`Cancel`) start or stop work on this host, and
:class:`ProposeExclusive` asks consensus for a decision.

Order matters and is part of the contract: apply an effect's writes (and persist them) before
acting on the next effect; in particular :class:`Dispatch` writes its "started" progress
before the agent starts, which is what keeps an exclusive task from running twice across a
restart.
"""

from __future__ import annotations

from typing import Any

from mossnode.record import value

from .model import Json


@value
class Write:
    task_id: str
    kind: str  # bids | claims | leases | progress | results | reviews | log | create
    value: Any


@value
class Bid:
    task_id: str
    attempt: int
    agent: str
    score: float


@value
class Claim:
    """Take the attempt this node won; ``score`` repeats its bid (0 for exclusive tasks).

    Every claim implies a lease of ``Params.lease_ms`` from its ``at`` (see
    :func:`.lifecycle._one`): with ``expires_at`` None (what the scheduler claims with) no
    lease is written, one map write less per task for every node to apply; a number writes
    that lease. ``at``: the claim's time; None (the usual) is the time it is written. The
    scheduler gives an exclusive task's claim the time of the tick that found it before its
    claim deadline, so that the claim counts wherever that tick's derivation let it run."""

    task_id: str
    attempt: int
    agent: str
    expires_at: int | None = None
    score: float = 0.0
    at: int | None = None


@value
class RenewLease:
    task_id: str
    attempt: int
    expires_at: int


@value
class Release:
    """Give up an attempt this node holds (over its concurrency limit, agent gone)."""

    task_id: str
    attempt: int
    reason: str


@value
class Dispatch:
    """Start ``agent`` on the task. ``payload`` is the exec backend's stdin object."""

    task_id: str
    attempt: int
    round: int
    agent: str
    payload: dict[str, Any]


@value
class Cancel:
    """Stop local work (lease lost, task cancelled or done elsewhere); kill its process tree."""

    task_id: str
    reason: str
    review: bool = False  # a review in progress rather than the task's work


@value
class Progress:
    task_id: str
    attempt: int
    round: int
    message: str | None = None
    fraction: float | None = None


@value
class Submit:
    """The current assignee's submission for (attempt, round)."""

    task_id: str
    attempt: int
    round: int
    agent: str
    ok: bool
    output: Json
    error: str | None = None
    violation: str | None = None


@value
class LateResult:
    """A result of an attempt this node no longer holds: kept in the log only."""

    task_id: str
    attempt: int
    round: int
    agent: str
    ok: bool
    output: Json
    error: str | None = None


@value
class ProposeExclusive:
    """Ask consensus to assign an exclusive task to ``node``, this node itself (the first
    decision wins). ``at``: the time of the proposal; ``node`` must claim the task within
    ``Params.exclusive_claim_ms`` of it."""

    task_id: str
    node: str
    at: int


@value
class DispatchReview:
    task_id: str
    attempt: int
    round: int
    agent: str
    payload: dict[str, Any]


@value
class SubmitReview:
    task_id: str
    attempt: int
    round: int
    agent: str
    score: int
    verdict: str
    comments: str = ""


@value
class Create:
    """A new task: ``fields`` are its core fields (``Writer.create_task(suffix, **fields)``)."""

    task_id: str
    suffix: str
    fields: dict[str, Any]


@value
class Control:
    """A control record (cancel, pause, resume, reassign) for this node's log of the task."""

    task_id: str
    record: dict[str, Any]


Effect = (
    Bid
    | Claim
    | RenewLease
    | Release
    | Dispatch
    | Cancel
    | Progress
    | Submit
    | LateResult
    | ProposeExclusive
    | DispatchReview
    | SubmitReview
    | Create
    | Control
)


@value
class Plan:
    """A scheduler step's effects, in order, and when to call it again at the latest."""

    effects: tuple[Effect, ...] = ()
    wake_at: int | None = None


def writes(effect: Effect, now_ms: int) -> tuple[Write, ...]:
    """The document writes an effect stands for (none for purely local effects)."""
    t = effect.task_id
    if isinstance(effect, Bid):
        entry = {
            "attempt": effect.attempt,
            "agent": effect.agent,
            "score": effect.score,
            "at": now_ms,
        }
        return (Write(t, "bids", entry),)
    if isinstance(effect, Claim):
        claim = {
            "attempt": effect.attempt,
            "agent": effect.agent,
            "at": now_ms if effect.at is None else effect.at,
            "score": effect.score,
        }
        lease: tuple[Write, ...] = ()
        if effect.expires_at is not None:
            lease = (
                Write(t, "leases", {"attempt": effect.attempt, "expires_at": effect.expires_at}),
            )
        return (Write(t, "claims", claim), *lease, Write(t, "log", {"kind": "claim", **claim}))
    if isinstance(effect, RenewLease):
        return (Write(t, "leases", {"attempt": effect.attempt, "expires_at": effect.expires_at}),)
    if isinstance(effect, Release):
        return (
            Write(t, "leases", {"attempt": effect.attempt, "expires_at": now_ms, "released": True}),
            Write(
                t,
                "log",
                {
                    "kind": "release",
                    "at": now_ms,
                    "attempt": effect.attempt,
                    "reason": effect.reason,
                },
            ),
        )
    if isinstance(effect, Dispatch):
        prog = {
            "attempt": effect.attempt,
            "round": effect.round,
            "at": now_ms,
            "message": "started",
            "fraction": 0.0,
        }
        return (Write(t, "progress", prog),)
    if isinstance(effect, Progress):
        prog = {"attempt": effect.attempt, "round": effect.round, "at": now_ms}
        if effect.message is not None:
            prog["message"] = effect.message
        if effect.fraction is not None:
            prog["fraction"] = effect.fraction
        return (Write(t, "progress", prog),)
    if isinstance(effect, Submit):
        res = {
            "attempt": effect.attempt,
            "round": effect.round,
            "agent": effect.agent,
            "ok": effect.ok,
            "output": effect.output,
            "error": effect.error,
            "violation": effect.violation,
            "at": now_ms,
        }
        log = {"kind": "result", **res}
        return (Write(t, "results", res), Write(t, "log", log))
    if isinstance(effect, LateResult):
        log = {
            "kind": "late_result",
            "attempt": effect.attempt,
            "round": effect.round,
            "agent": effect.agent,
            "ok": effect.ok,
            "output": effect.output,
            "error": effect.error,
            "at": now_ms,
        }
        return (Write(t, "log", log),)
    if isinstance(effect, SubmitReview):
        rev = {
            "attempt": effect.attempt,
            "round": effect.round,
            "agent": effect.agent,
            "score": effect.score,
            "verdict": effect.verdict,
            "comments": effect.comments,
            "at": now_ms,
        }
        return (Write(t, "reviews", rev), Write(t, "log", {"kind": "review", **rev}))
    if isinstance(effect, Create):
        return (Write(t, "create", {"suffix": effect.suffix, **effect.fields}),)
    if isinstance(effect, Control):
        return (Write(t, "log", dict(effect.record)),)
    return ()
