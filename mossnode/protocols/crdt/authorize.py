"""Authorization of one author's update, by structure first and by observed effect second.

:func:`check_update` is the authoritative pass. It reads the decoded update and the location
index, never the current document, so its verdict depends only on the update, its declared
dependencies and the policy it cites: the same on every honest replica in any arrival order.
It checks that every struct carries the author's client id and continues the author's clock
exactly, that every id the update refers to lies inside its declared dependencies (so Yrs can
never park it and later integrate it mixed with someone else's update), that every new item and
every deleted item sits at a path the owner rules let the author write or delete, and that
write-once paths are written once.

:func:`check_events` applies the same rules to what pycrdt reports when the update is applied
to the shadow document. It can only see less (a write that loses a concurrent conflict emits no
event), never more, so it cannot refuse what the structural pass admitted; it is a second line
that catches a decoder gap.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from mossnode.crypto.envelope import Reason, Rejection

from .locations import GONE, Loc, LocationIndex
from .rules import Op, Policy, judge
from .schema import ELEMENT, ROOTS, Path, render
from .yrs_update import ID, Content, Item, Update

Run = tuple[int, int, Loc]


@dataclass(frozen=True, slots=True)
class Admitted:
    runs: tuple[Run, ...]  # new location runs of the author's client, in clock order
    once_paths: frozenset[Path]  # write-once paths this update writes
    end_clock: int
    changes: int


_INF = 1 << 64


def _coalesce(deletes: Iterable[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Delete ranges per client, sorted and merged, so hostile repetition costs nothing."""
    raw: dict[int, list[tuple[int, int]]] = {}
    for c, k, n in deletes:
        raw.setdefault(c, []).append((k, k + n))
    out: dict[int, list[tuple[int, int]]] = {}
    for c, ranges in raw.items():
        ranges.sort()
        merged = [ranges[0]]
        for lo, hi in ranges[1:]:
            if lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        out[c] = merged
    return out


class _Refused(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


def _forbid(detail: str) -> _Refused:
    return _Refused(Reason.FORBIDDEN, detail)


def _malformed(detail: str) -> _Refused:
    return _Refused(Reason.MALFORMED, detail)


class _Check:
    def __init__(
        self,
        update: Update,
        author: str,
        client: int,
        start: int,
        deps: Mapping[int, int],
        index: LocationIndex,
        written: Set[Path],
        policy: Policy,
        policy_seq: int,
        max_span: int,
    ) -> None:
        self.update = update
        self.author = author
        self.client = client
        self.start = start
        self.deps = deps
        self.index = index
        self.written = written
        self.policy = policy
        self.policy_seq = policy_seq
        self.max_span = max_span
        self.clock = start  # next clock of the author within this update
        self.runs: list[Run] = []
        self.starts: list[int] = []
        self.once: set[Path] = set()
        self.changes = 0
        self.deleted = _coalesce(update.deletes)

    # -- lookups ---------------------------------------------------------------------------

    def _own(self, clock: int) -> Loc | None:
        i = bisect.bisect_right(self.starts, clock) - 1
        return self.runs[i][2] if i >= 0 and clock < self.runs[i][1] else None

    def lookup(self, ref: ID) -> Loc:
        """Place of an item the update may refer to: the author's own earlier items, or items
        of others inside the declared dependencies (which the replica holds before applying)."""
        c, k = ref
        if c == self.client and self.start <= k < self.clock:
            loc = self._own(k)
        elif k < (self.start if c == self.client else self.deps.get(c, 0)):
            loc = self.index.lookup(ref)
        else:
            raise _malformed(f"refers to {c}:{k} outside its declared dependencies")
        if loc is None:
            raise _malformed(f"refers to unknown item {c}:{k}")
        return loc

    def _ranges(self, client: int, lo: int, hi: int) -> Iterable[Loc]:
        if client == self.client:
            yield from self.index.overlapping(client, lo, min(hi, self.start))
            i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
            while i < len(self.runs) and self.runs[i][0] < hi:
                if self.runs[i][1] > lo:
                    yield self.runs[i][2]
                i += 1
        else:
            yield from self.index.overlapping(client, lo, hi)

    def _is_deleted_here(self, ref: ID) -> bool:
        c, k = ref
        ranges = self.deleted.get(c)
        if not ranges:
            return False
        i = bisect.bisect_right(ranges, (k, _INF)) - 1
        return i >= 0 and k < ranges[i][1]

    # -- items -----------------------------------------------------------------------------

    def place(self, item: Item) -> Loc:
        if item.origin is not None or item.right_origin is not None:
            left = self.lookup(item.origin) if item.origin is not None else None
            right = self.lookup(item.right_origin) if item.right_origin is not None else None
            known = [loc for loc in (left, right) if loc is not None and not loc.gone]
            if not known:
                return GONE
            if len(known) == 2 and (known[0].parent, known[0].container, known[0].key) != (
                known[1].parent,
                known[1].container,
                known[1].key,
            ):
                raise _malformed(f"item {item.client}:{item.clock} has origins in two places")
            base = known[0]
            return Loc(base.container, base.key, item.content, base.parent)
        if isinstance(item.parent, str):
            if item.parent not in ROOTS:
                raise _forbid(f"unknown root {item.parent!r}")
            container: Path = (item.parent,)
            parent_kind = Content.MAP
            parent_id: ID | None = None
        elif item.parent is not None:
            ploc = self.lookup(item.parent)
            if ploc.gone:
                return GONE
            if ploc.content not in (Content.MAP, Content.ARRAY):
                raise _malformed(f"parent of {item.client}:{item.clock} is not a map or array")
            container = ploc.path
            parent_kind = ploc.content
            parent_id = item.parent
        else:
            raise _malformed(f"item {item.client}:{item.clock} has no parent")
        if (parent_kind is Content.MAP) != (item.parent_sub is not None):
            raise _malformed(f"item {item.client}:{item.clock}: key does not fit its parent")
        return Loc(container, item.parent_sub, item.content, parent_id)

    def items(self) -> None:
        for item in self.update.items:
            if item.client != self.client:
                raise _forbid(f"carries items of client {item.client}, not the author's")
            if item.clock != self.clock:
                raise _malformed(f"clock {item.clock} does not continue the author at {self.clock}")
            if item.clock + item.length - self.start > self.max_span:
                raise _Refused(Reason.TOO_LARGE, f"spans more than {self.max_span} clocks")
            if item.content is Content.OTHER:
                raise _forbid("content kind not allowed in the task document")
            loc = GONE if item.content is Content.GC else self.place(item)
            if not loc.gone:
                rule, refused = judge(
                    self.author, loc.path, Op.WRITE, item.content, self.policy, self.policy_seq
                )
                if refused is not None:
                    raise _forbid(refused)
                if rule is not None and rule.once:
                    if loc.path in self.written or loc.path in self.once:
                        raise _forbid(f"{render(loc.path)} may be written only once")
                    self.once.add(loc.path)
                self.changes += 1
            self.clock = item.clock + item.length
            self.runs.append((item.clock, self.clock, loc))
            self.starts.append(item.clock)

    # -- deletions -------------------------------------------------------------------------

    def _under_deleted(self, loc: Loc) -> bool:
        parent = loc.parent
        for _ in range(64):
            if parent is None:
                return False
            if self._is_deleted_here(parent):
                return True
            parent = self.lookup(parent).parent
        raise _malformed("containers nest too deep")

    def deletions(self) -> None:
        for c, ranges in self.deleted.items():
            limit = self.clock if c == self.client else self.deps.get(c, 0)
            if ranges[-1][1] > limit:
                raise _malformed(f"deletes items of {c} outside its declared dependencies")
            for lo, hi in ranges:
                self._delete_range(c, lo, hi)

    def _delete_range(self, c: int, lo: int, hi: int) -> None:
        for loc in self._ranges(c, lo, hi):
            if loc.gone or self._under_deleted(loc):
                continue
            _, refused = judge(
                self.author, loc.path, Op.DELETE, loc.content, self.policy, self.policy_seq
            )
            if refused is not None:
                raise _forbid(refused)
            self.changes += 1


def check_update(
    update: Update,
    *,
    author: str,
    client: int,
    start: int,
    deps: Mapping[int, int],
    index: LocationIndex,
    written: Set[Path],
    policy: Policy,
    policy_seq: int,
    max_span: int,
) -> Admitted | Rejection:
    """Structural authorization of ``update`` by ``author`` (see module docstring)."""
    if update.items and deps.get(client, 0) != start:
        return Rejection(Reason.MALFORMED, "dependencies do not match the author's own clock")
    check = _Check(
        update, author, client, start, deps, index, written, policy, policy_seq, max_span
    )
    try:
        check.items()
        check.deletions()
    except _Refused as refused:
        return refused.rejection
    return Admitted(tuple(check.runs), frozenset(check.once), check.clock, check.changes)


def references(update: Update, client: int) -> dict[int, int]:
    """What the document must hold before ``update`` by ``client`` can be checked and
    integrated: per client, one past the highest clock it refers to (origins, parents,
    deleted ranges), not counting the author's own new items. Exactly what
    :func:`check_update` will look up, so a replica never judges with part of it missing."""
    mine = [(i.clock, i.clock + i.length) for i in update.items if i.client == client]
    lo = min((a for a, _ in mine), default=None)
    hi = max((b for _, b in mine), default=None)
    needs: dict[int, int] = {}

    def need(c: int, end: int) -> None:
        if end > needs.get(c, 0):
            needs[c] = end

    for item in update.items:
        for ref in (item.origin, item.right_origin, item.parent):
            if isinstance(ref, tuple):
                c, k = ref
                if not (c == client and lo is not None and hi is not None and lo <= k < hi):
                    need(c, k + 1)
    for c, k, n in update.deletes:
        if c == client and lo is not None:
            if k < lo:
                need(c, min(k + n, lo))
        else:
            need(c, k + n)
    return needs


def event_changes(root: str, events: Iterable[Any]) -> list[tuple[Path, Op]]:
    """Flatten pycrdt deep events of one root into (path, op) pairs."""
    out: list[tuple[Path, Op]] = []
    for event in events:
        base: Path = (root, *(seg if isinstance(seg, str) else ELEMENT for seg in event.path))
        keys = getattr(event, "keys", None)
        if isinstance(keys, dict):
            for key, change in keys.items():
                op = Op.DELETE if change.get("action") == "delete" else Op.WRITE
                out.append(((*base, str(key)), op))
        for part in getattr(event, "delta", None) or ():
            if "insert" in part:
                out.append(((*base, ELEMENT), Op.WRITE))
            if "delete" in part:
                out.append(((*base, ELEMENT), Op.DELETE))
    return out


def check_events(
    author: str, changes: Iterable[tuple[Path, Op]], policy: Policy, policy_seq: int
) -> Rejection | None:
    """The owner rules applied to the changes pycrdt observed on the shadow document."""
    for path, op in changes:
        _, refused = judge(author, path, op, None, policy, policy_seq)
        if refused is not None:
            return Rejection(Reason.FORBIDDEN, f"observed: {refused}")
    return None
