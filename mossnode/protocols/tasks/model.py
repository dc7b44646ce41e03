"""The task record: a plain-data view of one task of the replicated document, and its states.

Replicas never store a task's state. They store facts, each written by the one node that owns
the path (the creator's core fields; each node's own bid, claim, lease, progress, result and
review entry; each node's append-only log), and every replica derives the state from those
facts (:mod:`.lifecycle`). Parsing is tolerant: a malformed entry may come from a faulty peer,
so it is dropped rather than raised, and the rest of the view stays usable.

Field names follow the CRDT layout (``mossnode/protocols/crdt/schema.py``): core fields
``title, spec, parent, deps, capabilities, role, priority, creator, created_at, contract``
(plus ``input``), and per-node maps ``bids, claims, leases, progress, results, reviews, log``.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from typing import Any

from mossnode.record import value

from .contract import check_schema

Json = Any
Schema = Mapping[str, Any]
# Every replica walks a task's attempts one by one, up to max_attempts (+ extra_attempts), so
# the creator's choice bounds everyone's derivation work: larger is refused at creation and
# read as this when stored.
MAX_ATTEMPTS = 100
# Review rounds per attempt: the same bound, for the same reason (reviews name their round).
MAX_ROUNDS = 100


class State(enum.StrEnum):
    PENDING = "pending"  # waiting for dependencies, for bids, or for backoff to pass
    ASSIGNED = "assigned"  # a winner is decided; it has not claimed yet
    IN_PROGRESS = "in_progress"  # claimed under a live lease; the agent works
    REVIEW = "review"  # a valid submission waits for a reviewer
    REWORK = "rework"  # a reviewer asked for rework; the assignee has not resumed yet
    BLOCKED = "blocked"  # a dependency failed or was cancelled, or deps form a cycle
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"  # attempts exhausted; reasons recorded


TERMINAL = frozenset({State.DONE, State.CANCELLED, State.FAILED})
HELD = frozenset({State.ASSIGNED, State.IN_PROGRESS, State.REVIEW, State.REWORK})
VERDICTS = ("done", "rework")


def as_int(value: Any) -> int | None:
    """Yrs hands numbers back as floats; bools are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        return ()
    return tuple(v for v in value if isinstance(v, str))


@value
class Contract:
    """What the creator asks for and what a breach costs.

    ``deadline_ms`` bounds each round of work (claim or rework request to submission);
    missing it, like an output that violates ``output_schema``, closes the attempt as a
    fault (reputation penalty, task re-offered). ``max_attempts`` bounds faulty attempts
    (at most :data:`MAX_ATTEMPTS`).
    ``max_rounds`` bounds review rounds within one attempt (at most :data:`MAX_ROUNDS`).
    ``exclusive`` tasks are
    assigned by consensus and run at most once. ``cost`` is charged to the task tree's
    ``budget`` (set on the root; see :mod:`.supervision`). ``confidential`` names the roles
    that may read the task's input and outputs, which are then stored sealed (see
    :mod:`.confidential`); empty for an ordinary task.

    A stored schema outside the supported subset (see :func:`_stored_schema`) reads as
    ``False``, the schema no value satisfies.
    """

    input_schema: Schema | bool | None = None
    output_schema: Schema | bool | None = None
    deadline_ms: int | None = None
    max_attempts: int = 3
    review_required: bool = False
    exclusive: bool = False
    max_rounds: int = 3
    cost: float = 1.0
    budget: float | None = None
    confidential: tuple[str, ...] = ()

    @classmethod
    def from_raw(cls, raw: Any) -> Contract:
        if not isinstance(raw, Mapping):
            return cls()
        deadline = as_int(raw.get("deadline_ms"))
        attempts = as_int(raw.get("max_attempts"))
        rounds = as_int(raw.get("max_rounds"))
        cost = as_float(raw.get("cost"))
        budget = as_float(raw.get("budget"))
        return cls(
            input_schema=_stored_schema(raw.get("input_schema")),
            output_schema=_stored_schema(raw.get("output_schema")),
            deadline_ms=deadline if deadline is not None and deadline > 0 else None,
            max_attempts=min(max(1, attempts), MAX_ATTEMPTS) if attempts is not None else 3,
            review_required=raw.get("review_required") is True,
            exclusive=raw.get("exclusive") is True,
            max_rounds=min(max(1, rounds), MAX_ROUNDS) if rounds is not None else 3,
            cost=max(0.0, cost) if cost is not None else 1.0,
            budget=budget if budget is not None and budget >= 0 else None,
            confidential=tuple(sorted(set(_strs(raw.get("confidential"))))),
        )

    def to_raw(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "input_schema": _schema_raw(self.input_schema),
            "output_schema": _schema_raw(self.output_schema),
            "deadline_ms": self.deadline_ms,
            "max_attempts": self.max_attempts,
            "review_required": self.review_required,
            "exclusive": self.exclusive,
            "max_rounds": self.max_rounds,
            "cost": self.cost,
            "budget": self.budget,
        }
        if self.confidential:  # only then: ordinary tasks keep their stored form
            raw["confidential"] = list(self.confidential)
        return raw


def _stored_schema(raw: Any) -> Schema | bool | None:
    """A schema as stored by the creator. Only the honest writer runs ``check_schema`` before
    writing, and ``validate`` assumes a checked schema (it may raise on others), so a schema
    that fails the check becomes ``False``: every output is then a schema fault, the same on
    every replica, instead of an exception in every derivation."""
    if raw is None:
        return None
    return raw if check_schema(raw) is None else False


def _schema_raw(schema: Schema | bool | None) -> Any:
    return dict(schema) if isinstance(schema, Mapping) else schema


# -- per-node entries: each is the value at tasks/<id>/<kind>/<node>, written only by <node> ----


@value
class BidEntry:
    attempt: int
    agent: str
    score: float
    at: int

    @classmethod
    def from_raw(cls, raw: Any) -> BidEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, at = as_int(raw.get("attempt")), as_int(raw.get("at"))
        agent, score = _str(raw.get("agent")), as_float(raw.get("score"))
        if attempt is None or attempt < 1 or at is None or agent is None or score is None:
            return None
        return cls(attempt, agent, score, at)


@value
class ClaimEntry:
    """``score`` repeats the claimant's bid, so claimants rank even after the bid entry was
    overwritten by the same node's bid for a later attempt."""

    attempt: int
    agent: str
    at: int
    score: float | None = None

    @classmethod
    def from_raw(cls, raw: Any) -> ClaimEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, at, agent = (
            as_int(raw.get("attempt")),
            as_int(raw.get("at")),
            _str(raw.get("agent")),
        )
        if attempt is None or attempt < 1 or at is None or agent is None:
            return None
        return cls(attempt, agent, at, as_float(raw.get("score")))


@value
class Assignment:
    """An exclusive task's assignment, decided by consensus (``task.assign``): the node that
    proposed itself and its clock when it proposed (ms). The node must claim the task within
    ``Params.exclusive_claim_ms`` of ``at`` (see :mod:`.lifecycle`); ``at`` None: a decision
    from before deadlines existed, which sets none."""

    node: str
    at: int | None


@value
class LeaseEntry:
    attempt: int
    expires_at: int
    released: bool = False  # the assignee gave the attempt up at ``expires_at``

    @classmethod
    def from_raw(cls, raw: Any) -> LeaseEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, expires = as_int(raw.get("attempt")), as_int(raw.get("expires_at"))
        if attempt is None or attempt < 1 or expires is None:
            return None
        return cls(attempt, expires, raw.get("released") is True)


@value
class ProgressEntry:
    attempt: int
    round: int
    at: int
    fraction: float | None = None
    message: str | None = None

    @classmethod
    def from_raw(cls, raw: Any) -> ProgressEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, rnd, at = (
            as_int(raw.get("attempt")),
            as_int(raw.get("round", 1)),
            as_int(raw.get("at")),
        )
        if attempt is None or attempt < 1 or rnd is None or rnd < 1 or at is None:
            return None
        return cls(attempt, rnd, at, as_float(raw.get("fraction")), _str(raw.get("message")))


@value
class ResultEntry:
    """A submission: the deliverable of one round of one attempt.

    ``violation`` is set (with ``ok`` false) when the submitting node found the output
    invalid against the contract; it is scored as a schema breach, not a plain error.
    """

    attempt: int
    round: int
    agent: str
    ok: bool
    output: Json
    at: int
    error: str | None = None
    violation: str | None = None

    @classmethod
    def from_raw(cls, raw: Any) -> ResultEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, rnd, at = (
            as_int(raw.get("attempt")),
            as_int(raw.get("round", 1)),
            as_int(raw.get("at")),
        )
        agent, ok = _str(raw.get("agent")), raw.get("ok")
        if attempt is None or attempt < 1 or rnd is None or rnd < 1 or at is None:
            return None
        if agent is None or not isinstance(ok, bool):
            return None
        return cls(
            attempt,
            rnd,
            agent,
            ok,
            raw.get("output"),
            at,
            _str(raw.get("error")),
            _str(raw.get("violation")),
        )


@value
class ReviewEntry:
    attempt: int
    round: int
    agent: str
    score: int
    verdict: str
    at: int
    comments: str = ""

    @classmethod
    def from_raw(cls, raw: Any) -> ReviewEntry | None:
        if not isinstance(raw, Mapping):
            return None
        attempt, rnd, at = (
            as_int(raw.get("attempt")),
            as_int(raw.get("round", 1)),
            as_int(raw.get("at")),
        )
        agent, verdict = _str(raw.get("agent")), raw.get("verdict")
        score = raw.get("score")
        if attempt is None or attempt < 1 or rnd is None or rnd < 1 or at is None or agent is None:
            return None
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            return None
        if verdict not in VERDICTS:
            return None
        return cls(attempt, rnd, agent, score, str(verdict), at, _str(raw.get("comments")) or "")


LogRecord = Mapping[str, Any]


def _logs(raw: Any) -> dict[str, tuple[LogRecord, ...]]:
    out: dict[str, tuple[LogRecord, ...]] = {}
    if raw and isinstance(raw, Mapping):  # empty, as in every new task: nothing to sort
        for node in sorted(k for k in raw if isinstance(k, str)):
            recs = raw[node]
            if isinstance(recs, list | tuple):
                out[node] = tuple(r for r in recs if isinstance(r, Mapping))
    return out


def _entries(raw: Any, parse: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if raw and isinstance(raw, Mapping):  # empty, as in every new task: nothing to sort
        for node in sorted(k for k in raw if isinstance(k, str)):
            entry = parse(raw[node])
            if entry is not None:
                out[node] = entry
    return out


@value
class Task:
    """One task as every replica reads it. Immutable: a changed task is a new object."""

    id: str
    title: str
    creator: str
    created_at: int
    spec: Json = None
    input: Json = None
    parent: str | None = None
    deps: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    role: str | None = None
    priority: float = 0.0
    contract: Contract = field(default_factory=Contract)
    bids: Mapping[str, BidEntry] = field(default_factory=dict)
    claims: Mapping[str, ClaimEntry] = field(default_factory=dict)
    leases: Mapping[str, LeaseEntry] = field(default_factory=dict)
    progress: Mapping[str, ProgressEntry] = field(default_factory=dict)
    results: Mapping[str, ResultEntry] = field(default_factory=dict)
    reviews: Mapping[str, ReviewEntry] = field(default_factory=dict)
    log: Mapping[str, tuple[LogRecord, ...]] = field(default_factory=dict)
    # the log's records by kind (None: not a string), in log order: built by records()
    _records: dict[str | None, list[tuple[str, LogRecord]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # records() answers per tuple of kinds (a derivation asks the same three every time)
    _picked: dict[tuple[str, ...], list[tuple[str, LogRecord]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # what derivations computed from ``bids`` alone (bid windows), shared with the next task
    # object while its bids are the same object: see :func:`.lifecycle._window`
    _by_bids: dict[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_raw(cls, tid: str, raw: Any) -> Task | None:
        """Parse ``tasks/<tid>`` as plain data (``Replica.task(tid)`` or ``content()``)."""
        if not isinstance(raw, Mapping):
            return None
        title, creator = _str(raw.get("title")), _str(raw.get("creator"))
        created = as_int(raw.get("created_at"))
        if title is None or creator is None or created is None:
            return None
        deps = tuple(dict.fromkeys(_strs(raw.get("deps"))))
        return cls(
            id=tid,
            title=title,
            creator=creator,
            created_at=created,
            spec=raw.get("spec"),
            input=raw.get("input"),
            parent=_str(raw.get("parent")),
            deps=deps,
            capabilities=tuple(sorted(set(_strs(raw.get("capabilities"))))),
            role=_str(raw.get("role")),
            priority=as_float(raw.get("priority")) or 0.0,
            contract=Contract.from_raw(raw.get("contract")),
            **{kind: parse(raw.get(kind)) for kind, parse in _SUB_PARSERS.items()},
        )

    def with_entries(
        self,
        raw: Mapping[str, Any],
        kinds: Iterable[str],
        nodes: Mapping[str, Iterable[str]] | None = None,
    ) -> Task:
        """This task with the per-node maps ``kinds`` (``bids``, ..., ``log``) parsed again
        from ``raw``: ``from_raw(self.id, raw)`` when only those changed since this task was
        parsed. A reader that knows which entries changed re-parses those, not the task.
        ``nodes`` (kind -> the nodes whose entries changed) narrows it further: a kind found
        there re-parses those nodes' entries and keeps the others' (a peer's bid is then one
        entry parsed, not every bid of the task again)."""
        parts: dict[str, Mapping[str, Any]] = {
            "bids": self.bids,
            "claims": self.claims,
            "leases": self.leases,
            "progress": self.progress,
            "results": self.results,
            "reviews": self.reviews,
            "log": self.log,
        }
        for kind in kinds:
            some = nodes.get(kind) if nodes is not None else None
            if some is None:
                parts[kind] = _SUB_PARSERS[kind](raw.get(kind))
            else:
                parts[kind] = _entries_of(parts[kind], raw.get(kind), some, _NODE_PARSERS[kind])
        # not dataclasses.replace: it costs several times this plain call, once per change
        task = Task(
            self.id,
            self.title,
            self.creator,
            self.created_at,
            self.spec,
            self.input,
            self.parent,
            self.deps,
            self.capabilities,
            self.role,
            self.priority,
            self.contract,
            parts["bids"],
            parts["claims"],
            parts["leases"],
            parts["progress"],
            parts["results"],
            parts["reviews"],
            parts["log"],
        )
        if task.log is self.log:  # the same log: its index holds (most changes are entries)
            task._records, task._picked = self._records, self._picked
        if task.bids is self.bids:
            task._by_bids = self._by_bids
        return task

    def records(self, kinds: Iterable[str] | None = None) -> list[tuple[str, LogRecord]]:
        """Log records as (author node, record), optionally of some kinds, in a fixed order
        (by node, then as the node appended them). Records whose kind is not a string match
        no kind. The list may be shared: do not change it."""
        if type(kinds) is tuple:
            picked = self._picked
            if picked is None:
                picked = self._picked = {}
            got = picked.get(kinds)
            if got is None:
                got = picked[kinds] = self._pick(kinds)
            return got
        return self._pick(kinds)

    def _pick(self, kinds: Iterable[str] | None) -> list[tuple[str, LogRecord]]:
        index = self._records
        if index is None:
            # one pass over the log per task object, not one per call: a derivation asks
            # three times, for different kinds
            index = {}
            for node in sorted(self.log):
                for rec in self.log[node]:
                    kind = rec.get("kind")
                    index.setdefault(kind if isinstance(kind, str) else None, []).append(
                        (node, rec)
                    )
            self._records = index
        if kinds is None:
            found = list(index)
        else:
            found = []
            for k in kinds:  # a loop, not a comprehension: asked three times a derivation
                if k in index:
                    found.append(k)
        if len(found) <= 1:
            return index[found[0]] if found else []
        wanted = set(found)
        # several kinds present (control records): a pass over the log keeps its order
        return [
            (node, rec)
            for node in sorted(self.log)
            for rec in self.log[node]
            if _kind(rec) in wanted
        ]


def _kind(rec: LogRecord) -> str | None:
    kind = rec.get("kind")
    return kind if isinstance(kind, str) else None


_SUB_PARSERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "bids": lambda raw: _entries(raw, BidEntry.from_raw),
    "claims": lambda raw: _entries(raw, ClaimEntry.from_raw),
    "leases": lambda raw: _entries(raw, LeaseEntry.from_raw),
    "progress": lambda raw: _entries(raw, ProgressEntry.from_raw),
    "results": lambda raw: _entries(raw, ResultEntry.from_raw),
    "reviews": lambda raw: _entries(raw, ReviewEntry.from_raw),
    "log": _logs,
}
SUB_KINDS = frozenset(_SUB_PARSERS)


def _log_of(raw: Any) -> tuple[LogRecord, ...] | None:
    """One node's log as :func:`_logs` keeps it (None: not a list, left out)."""
    if not isinstance(raw, list | tuple):
        return None
    return tuple(r for r in raw if isinstance(r, Mapping))


# one node's entry of each per-node map (None: malformed or absent, left out)
_NODE_PARSERS: dict[str, Callable[[Any], Any]] = {
    "bids": BidEntry.from_raw,
    "claims": ClaimEntry.from_raw,
    "leases": LeaseEntry.from_raw,
    "progress": ProgressEntry.from_raw,
    "results": ResultEntry.from_raw,
    "reviews": ReviewEntry.from_raw,
    "log": _log_of,
}


def _entries_of(
    old: Mapping[str, Any], raw: Any, nodes: Iterable[str], parse: Callable[[Any], Any]
) -> Mapping[str, Any]:
    """``old`` (one per-node map as parsed from an earlier ``raw``) with the entries of
    ``nodes`` parsed again from ``raw``: what a full parse gives, nodes in sorted order
    included, when only those entries changed."""
    if not isinstance(raw, Mapping):
        return {}
    out = dict(old)
    added = False
    for node in nodes:
        entry = parse(raw[node]) if node in raw else None
        if entry is None:
            out.pop(node, None)
        else:
            added = added or node not in out
            out[node] = entry
    if added:
        keys = list(out)
        if any(a > b for a, b in itertools.pairwise(keys)):
            out = {k: out[k] for k in sorted(keys)}
    return out  # the per-node maps of a task


TaskView = Mapping[str, Task]

_serials = itertools.count(1)


class View(dict[str, Task]):
    """A task view that knows which tasks may differ from the view it was built from
    (``base``, that view's ``serial``) and from a few views before that (``since``): a
    derivation that last saw one of them visits those instead of comparing every task of a
    long history. Treat it as immutable: the next view is a new object."""

    __slots__ = ("base", "serial", "since", "touched")

    def __init__(
        self,
        tasks: Mapping[str, Task],
        base: int = 0,
        touched: Iterable[str] = (),
        since: Mapping[int, frozenset[str]] | None = None,
    ):
        super().__init__(tasks)
        self.serial = next(_serials)
        self.base = base  # 0: unknown
        self.touched = frozenset(touched)
        # earlier views (serial -> the tasks that may differ from it), newest first. A view
        # built between two derivations (the API refreshes it to answer a call) used to break
        # the link, and the next derivation compared every task of the history.
        self.since: dict[int, frozenset[str]] = {base: self.touched} if base else {}
        if base and since:
            most = max(64, len(tasks) // 8)  # past that, a pass over the view is as cheap
            for serial, older in since.items():
                if len(self.since) >= _CHAIN:
                    break
                both = older | self.touched
                if len(both) > most:
                    break
                self.since[serial] = both


_CHAIN = 8  # earlier views a view knows its differences from


def changed_since(view: TaskView, serial: int) -> frozenset[str] | None:
    """The tasks of ``view`` that may differ from the view numbered ``serial`` (those removed
    included), or None if ``view`` cannot tell."""
    if isinstance(view, View) and serial:
        return view.since.get(serial)
    return None


def build_view(
    tasks_root: Any,
    previous: TaskView | None = None,
    changed: Iterable[str] | None = None,
    parsed: Mapping[str, Task] | None = None,
) -> View:
    """The task view from the document's ``tasks`` root as plain data.

    With ``previous`` and ``changed`` (task ids touched since), unchanged tasks keep their
    objects, which lets derivations reuse cached terminal states. ``parsed``: changed tasks
    the caller already parsed from ``tasks_root`` (see :meth:`Task.with_entries`).
    """
    if not isinstance(tasks_root, Mapping):
        return View({})
    if previous is None or changed is None:
        out: dict[str, Task] = {}
        for tid in sorted(k for k in tasks_root if isinstance(k, str)):
            task = Task.from_raw(tid, tasks_root[tid])
            if task is not None:
                out[tid] = task
        return View(out)
    touched = set(changed)
    if isinstance(previous, View):
        view = View(previous, previous.serial, touched, previous.since)
    else:
        view = View(previous, 0, touched)
    for tid in touched:
        task = parsed.get(tid) if parsed else None
        if task is None:
            task = Task.from_raw(tid, tasks_root.get(tid))
        if task is None:
            view.pop(tid, None)
        else:
            view[tid] = task
    return view
