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
to the document. It can only see less (a write that loses a concurrent conflict emits no
event), never more, so it cannot refuse what the structural pass admitted; it is a second line
that catches a decoder gap (the replica then puts the document back as it was).

:func:`admit` (below) is the fast form of :func:`check_update` that the replica runs first.
"""

from __future__ import annotations

import bisect
from collections.abc import Container as Has
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pycrdt import _pycrdt

from mossnode.crypto.envelope import Reason, Rejection
from mossnode.record import Record

from .locations import GONE, Container, Loc, LocationIndex, Place, WrittenSet
from .rules import (
    _PREFIXES,
    _SPECIAL,
    MEMBER,
    Op,
    Policy,
    Resolved,
    Rule,
    granted,
    judge,
    permits,
    resolve,
    shape,
)
from .schema import ELEMENT, KEY_SEP, ROOTS, Path, render, task_creator
from .yrs_update import ID, Content, Item, RawUpdate, Update, raw_of

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
        written: Has[Path],
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
    written: Has[Path],
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


def references(update: Update | RawUpdate, client: int) -> dict[int, int]:
    """What the document must hold before ``update`` by ``client`` can be checked and
    integrated: per client, one past the highest clock it refers to (origins, parents,
    deleted ranges), not counting the author's own new items. Exactly what
    :func:`check_update` will look up, so a replica never judges with part of it missing."""
    raw = update if isinstance(update, RawUpdate) else raw_of(update)
    lo = hi = -1  # the author's own clocks in this update, [lo, hi); none while lo < 0
    for c, first, end in raw.runs:
        if c == client:
            if lo < 0 or first < lo:
                lo = first
            if end > hi:
                hi = end
    needs: dict[int, int] = {}
    for c, k in raw.refs:
        if c == client and lo <= k < hi:
            continue
        if k + 1 > needs.get(c, 0):
            needs[c] = k + 1
    for c, k, n in raw.deletes:
        if c == client and lo >= 0:
            if k < lo:
                end = min(k + n, lo)
                if end > needs.get(c, 0):
                    needs[c] = end
        elif k + n > needs.get(c, 0):
            needs[c] = k + n
    return needs


# pycrdt's Rust event classes (None if its internals moved: every event takes the generic way)
_MapEvent: Any = getattr(_pycrdt, "MapEvent", None)
_ArrayEvent: Any = getattr(_pycrdt, "ArrayEvent", None)


def event_changes(root: str, events: Iterable[Any]) -> list[tuple[Path, Op]]:
    """Flatten pycrdt deep events of one root into (path, op) pairs."""
    out: list[tuple[Path, Op]] = []
    write, delete = Op.WRITE, Op.DELETE
    for event in events:
        kind = type(event)
        path = event.path
        if not path:
            base: Path = (root,)
        elif len(path) == 1 and type(path[0]) is str:  # a task's map: no comprehension
            base = (root, path[0])
        else:
            base = (root, *[seg if isinstance(seg, str) else ELEMENT for seg in path])
        # a map event has keys and no delta, an array event a delta and no keys
        keys = None if kind is _ArrayEvent else getattr(event, "keys", None)
        if isinstance(keys, dict):
            for key, change in keys.items():
                op = delete if change.get("action") == "delete" else write
                out.append(((*base, str(key)), op))
        if kind is _MapEvent:
            continue
        for part in getattr(event, "delta", None) or ():
            if "insert" in part:
                out.append(((*base, ELEMENT), write))
            if "delete" in part:
                out.append(((*base, ELEMENT), delete))
    return out


def check_events(
    author: str,
    changes: Iterable[tuple[Path, Op]],
    policy: Policy,
    policy_seq: int,
    may: dict[str, bool] | None = None,
    written: Has[Path] = (),
) -> Rejection | None:
    """The owner rules applied to the changes pycrdt observed applying the update. ``may``
    memoizes ``policy.may`` for this author and policy seq (see :func:`admit`). ``written``:
    paths the structural pass let this author write in this update (``Accepted.paths``); a
    write observed at one of them is allowed by the same rows without asking them again
    (the structural pass checked more: the content kind too)."""
    if may is None:
        may = {}
    write = Op.WRITE
    for path, op in changes:
        if op is write and path in written:
            continue
        if permits(author, path, op, None, policy, policy_seq, may):
            continue
        _, refused = judge(author, path, op, None, policy, policy_seq)
        if refused is not None:
            return Rejection(Reason.FORBIDDEN, f"observed: {refused}")
    return None


# -- the fast path ------------------------------------------------------------------------------
#
# :func:`check_update` above is the reference. :func:`admit` proves the same acceptance with
# less work per item: plain-tuple items (``yrs_update.decode_raw``), places that share one
# :class:`Container` per map or array instead of a path per item, owner rows looked up once per
# path *shape* (``rules.resolve``), one ``policy.may`` per permission per update, and the task
# creator parsed once per task id. It never refuses: at the first thing that is not a plain
# success it returns None, and the caller runs the reference, which then decides and words the
# refusal. So it can only ever accept what the reference accepts, with the same result;
# tests/test_crdt_fastpath.py checks that on generated and mutated updates.

Span = tuple[int, int, Place]  # (start, end, place) of the author's new items


class Accepted(Record):
    __slots__ = ("end_clock", "once", "spans")

    def __init__(
        self, spans: list[Span], once: list[tuple[Path, str | None]], end_clock: int
    ) -> None:
        self.spans = spans  # new location runs of the author's client, in clock order
        self.once = once  # write-once paths written, as (container, key)
        self.end_clock = end_clock

    def paths(self) -> set[Path]:
        """The paths of the new items (each one the owner rules let the author write)."""
        return {(*cont.path, key) for _, _, (cont, key, kind) in self.spans if kind is not _GC}

    def covers(self, changes: Iterable[tuple[Path, Op]]) -> bool:
        """Is every change a write at one of :meth:`paths`? Then :func:`check_events` has
        nothing to ask of the rules; tested without building the set (an update has few)."""
        spans = self.spans
        for path, op in changes:
            if op is not Op.WRITE:
                return False
            key = path[-1]
            for _, _, (cont, k, kind) in spans:
                if k == key and kind is not _GC and cont.path == path[:-1]:
                    break
            else:
                return False
        return True


_MISSING: Any = object()
_MAP = Content.MAP
_ARRAY = Content.ARRAY
_GC = Content.GC
_OTHER = Content.OTHER
_TABLES: dict[Path, dict[str | None, Resolved | None]] = {}


def _table(cont: Container) -> dict[str | None, Resolved | None]:
    """Owner rows for the children of ``cont``, by child key shape (shared per path shape)."""
    table = cont.rules
    if table is None:
        if len(_TABLES) > 4096:
            _TABLES.clear()
        path_shape = shape(cont.path)
        table = _TABLES.get(path_shape)
        if table is None:
            table = _TABLES[path_shape] = {}
        cont.rules = table
    return table


def _allowed(
    author: str,
    policy: Policy,
    policy_seq: int,
    may: dict[str, bool],
    cont: Container,
    key: str | None,
    op: Op,
    kind: Content | None,
) -> Rule | None:
    """The row that lets ``author`` ``op`` (writing ``kind``) at ``cont.path + (key,)``, or
    None if :func:`rules.judge` would refuse; ``may`` memoizes the policy's answers."""
    table = cont.rules
    if table is None:
        table = _table(cont)
    # rules.shape_seg and rules.owner_seg, inlined (two calls an item)
    if key is None or key in _SPECIAL:
        kshape = key
    else:
        i = key.find(KEY_SEP)
        kshape = key[: i + 1] if i > 0 and key[: i + 1] in _PREFIXES else ""
    res: Resolved | None = table.get(kshape, _MISSING)
    if res is _MISSING:
        res = table[kshape] = resolve((*shape(cont.path), kshape))
    if res is None:
        return None
    path = cont.path
    at = res.owner_at
    seg = key if at == len(path) else path[at]
    if seg is None:
        return None
    if res.creator:
        if task_creator(seg) != author:
            return None
    elif (seg[res.strip :] if res.strip else seg) != author:
        return None
    rule = res.rule
    if op is Op.WRITE:
        if kind not in res.kinds:
            return None
        permission = rule.write
    else:
        permission = rule.delete
    if permission is None:
        return None
    if permission != MEMBER and not granted(author, permission, policy, policy_seq, may):
        return None
    return rule


def admit(
    update: RawUpdate,
    *,
    author: str,
    client: int,
    start: int,
    deps: Mapping[int, int],
    index: LocationIndex,
    written: WrittenSet,
    policy: Policy,
    policy_seq: int,
    max_span: int,
    may: dict[str, bool] | None = None,
) -> Accepted | None:
    """:func:`check_update`'s acceptance, fast; None means "ask the reference". ``may``
    memoizes ``policy.may`` for this author and policy seq: a caller judging many updates
    under one policy shares it between them (the policy is a pure function of its arguments)."""
    items = update.items
    if items and deps.get(client, 0) != start:
        return None
    if may is None:
        may = {}
    own_starts: list[int] = []
    own_places: list[Place] = []
    find = index.place
    spans: list[Span] = []
    once: list[tuple[Path, str | None]] = []
    once_seen: set[tuple[Path, str | None]] = set()
    gone: Place = (index.gone, None, _GC)
    last_parent: object = None
    last_cont: Container | None = None
    last_kind = _MAP
    new_conts: dict[ID, Container] = {}
    clock = start
    limit = start + max_span
    write, delete = Op.WRITE, Op.DELETE
    seen_id: ID | None = None  # the latest origin looked up, and its place
    seen_place: Place | None = None

    def lookup(ref: ID) -> Place | None:  # _Check.lookup, or None where that refuses
        c, k = ref
        if c == client:
            if start <= k < clock:
                i = len(own_starts) - 1
                if own_starts[i] > k:
                    i = bisect.bisect_right(own_starts, k) - 1
                return own_places[i]
            return find(c, k) if k < start else None
        return find(c, k) if k < deps.get(c, 0) else None

    for c, k, length, kind, origin, right, parent, sub in items:
        if c != client or k != clock or k + length > limit or kind is _OTHER:
            return None
        if kind is _GC:
            place = gone
        elif origin is not None or right is not None:
            left = lookup(origin) if origin is not None else None
            if origin is not None and left is None:
                return None
            seen_id, seen_place = origin, left
            rite = lookup(right) if right is not None else None
            if right is not None and rite is None:
                return None
            if left is not None and left[2] is _GC:
                left = None
            if rite is not None and rite[2] is _GC:
                rite = None
            base = left or rite
            if base is None:
                place = gone
            else:
                if left is not None and rite is not None:
                    a, b = left[0], rite[0]
                    if left[1] != rite[1] or (
                        a is not b and (a.parent != b.parent or a.path != b.path)
                    ):
                        return None
                place = (base[0], base[1], kind)
        elif parent is None:
            return None
        else:
            if parent is not last_parent:  # siblings share their parent: resolve it once
                if isinstance(parent, str):
                    if parent not in ROOTS:
                        return None
                    last_cont = index.root(parent)
                    last_kind = _MAP
                else:
                    ploc = lookup(parent)
                    if ploc is None:
                        return None
                    pcont, pkey, last_kind = ploc
                    if last_kind is _GC:
                        last_cont = None
                    elif last_kind is not _MAP and last_kind is not _ARRAY:
                        return None
                    else:
                        last_cont = new_conts.get(parent)
                        if last_cont is None:
                            last_cont = index.container(parent, (*pcont.path, pkey))
                            new_conts[parent] = last_cont
                last_parent = parent
            if last_cont is None:
                place = gone
            elif (last_kind is _MAP) != (sub is not None):
                return None
            else:
                place = (last_cont, sub, kind)
        if place[2] is not _GC:
            cont, key, _ = place
            rule = _allowed(author, policy, policy_seq, may, cont, key, write, kind)
            if rule is None:
                return None
            if rule.once:
                where = (cont.path, key)
                if where in once_seen or written.has_child(cont.path, key):
                    return None
                once_seen.add(where)
                once.append(where)
        clock = k + length
        spans.append((k, clock, place))
        own_starts.append(k)
        own_places.append(place)
    dels = update.deletes
    if dels:
        if len(dels) == 1:  # the common case (a value replaced): nothing to merge
            c, k, n = dels[0]
            deleted = {c: [(k, k + n)]}
        else:
            deleted = _coalesce(dels)
        for c, ranges in deleted.items():
            if ranges[-1][1] > (clock if c == client else deps.get(c, 0)):
                return None
            for lo, hi in ranges:
                if c == client and hi <= start:  # only earlier items: none of this update's
                    if hi - lo == 1:  # one item: its place, as index.places would yield it
                        # a replaced value is usually the new one's origin, just looked up
                        # (an earlier item of the author's, so by find as well)
                        one = seen_place if seen_id == (c, lo) else find(c, lo)
                        found = [] if one is None else [one]
                    else:
                        found = list(index.places(c, lo, hi))
                elif c == client:
                    found = list(index.places(c, lo, min(hi, start)))
                    i = max(bisect.bisect_right(own_starts, lo) - 1, 0)
                    while i < len(spans) and spans[i][0] < hi:
                        if spans[i][1] > lo:
                            found.append(own_places[i])
                        i += 1
                else:
                    found = list(index.places(c, lo, hi))
                for cont, key, kind in found:
                    if kind is _GC:
                        continue
                    # _Check._under_deleted for this place (lookup at the final clock); a
                    # chain that does not end, or a lookup that fails, refuses
                    up = cont.parent
                    for _ in range(64):
                        if up is None:
                            break
                        ranges_up = deleted.get(up[0])
                        if ranges_up:
                            i = bisect.bisect_right(ranges_up, (up[1], _INF)) - 1
                            if i >= 0 and up[1] < ranges_up[i][1]:
                                break  # under a deleted container: nothing to ask
                        above = lookup(up)
                        if above is None:
                            return None
                        up = above[0].parent
                    else:
                        return None
                    if (
                        up is None
                        and _allowed(author, policy, policy_seq, may, cont, key, delete, None)
                        is None
                    ):
                        return None
    return Accepted(spans, once, clock)
