"""Where every item ever accepted lives: (client, clock range) -> container path and key.

An item's place is fixed when it is created (Yrs never moves map or array items), but Yrs only
spells it out for items without neighbours; the others inherit it from their origin. Resolving
that needs the place of items written long ago, possibly since collected by Yrs' GC. This index
keeps it, built only from accepted updates in their per-author order, so it is identical on every
honest replica whatever order updates arrived in.

It holds one row per accepted struct, so it is stored compactly: per client, parallel arrays of
clock range, container number, key number and content kind. A :class:`Container` (path and
parent item id) is shared by every child of one map or array, and keys are interned, so a row
costs about 25 bytes instead of a handful of Python objects.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .schema import TASKS, Path
from .yrs_update import ID, Content


@dataclass(frozen=True, slots=True)
class Loc:
    container: Path  # keys from the root down to the containing type
    key: str | None  # map key; None for an array element
    content: Content
    parent: ID | None  # item id of the containing type; None for a root

    @property
    def path(self) -> Path:
        return (*self.container, self.key)

    @property
    def gone(self) -> bool:
        return self.content is Content.GC


GONE = Loc((), None, Content.GC, None)


class Container:
    """A map or array that holds items: its path and item id (None for a root), shared by all
    its children. ``rules`` is the owner table's answer per child key shape, filled by
    :mod:`.authorize` (shared by every container of the same path shape)."""

    __slots__ = ("number", "parent", "path", "rules")

    def __init__(self, path: Path, parent: ID | None) -> None:
        self.path = path
        self.parent = parent
        self.number = -1  # position in its index, once registered
        self.rules: dict[str | None, Any] | None = None


# A row as the fast path sees it: (container, key, content).
Place = tuple[Container, str | None, Content]

KINDS: tuple[Content, ...] = tuple(Content)  # content kind codes in the index
# a kind's code is its position in KINDS, found by ``KINDS.index`` (identity tests in C):
# a dict keyed by the kinds would hash them, and Enum hashing is a Python-level call


class _Runs:
    """One client's rows: clock ranges, and (container, key, kind) packed in one integer."""

    __slots__ = ("ends", "packed", "starts")

    def __init__(self) -> None:
        self.starts = array("Q")
        self.ends = array("Q")
        self.packed = array("Q")  # container | key << 32 | kind << 60


_KEY_SHIFT = 32
_KIND_SHIFT = 60
_LOW32 = (1 << 32) - 1
_LOW28 = (1 << 28) - 1


class LocationIndex:
    """Append-only per client; runs arrive in clock order because authors' chains do."""

    def __init__(self) -> None:
        self._clients: dict[int, _Runs] = {}
        self._conts: list[Container] = []
        # containers only ever get appended, and never change: their dumped form is kept and
        # extended, so a snapshot encodes only the containers new since the last one
        self._conts_dumped: list[list[Any]] = []
        self._by_parent: dict[ID, Container] = {}  # containers that are items
        self._by_root: dict[Path, Container] = {}  # roots (and GONE's empty path)
        # a row's key: one for all its clocks, or a tuple with one per clock
        self._keys: list[str | tuple[str | None, ...] | None] = [None]
        self._key_ids: dict[str | tuple[str | None, ...] | None, int] = {None: 0}
        self.gone = self._root(())

    # -- containers and keys ---------------------------------------------------------------

    def _register(self, cont: Container) -> int:
        if cont.number < 0:
            cont.number = len(self._conts)
            self._conts.append(cont)
            if cont.parent is None:
                self._by_root[cont.path] = cont
            else:
                self._by_parent[cont.parent] = cont
        return cont.number

    def _root(self, path: Path) -> Container:
        cont = self._by_root.get(path)
        if cont is None:
            cont = Container(path, None)
            self._register(cont)
        return cont

    def root(self, name: str) -> Container:
        return self._root((name,))

    def container(self, parent: ID, path: Path) -> Container:
        """The container made by item ``parent`` (at ``path``); unregistered until a row that
        lives in it is added, so a refused update leaves nothing behind."""
        cont = self._by_parent.get(parent)
        return cont if cont is not None else Container(path, parent)

    def _key(self, key: str | tuple[str | None, ...] | None) -> int:
        kid = self._key_ids.get(key)
        if kid is None:
            kid = len(self._keys)
            if kid > _LOW28:
                raise ValueError("location index: too many distinct keys")
            self._key_ids[key] = kid
            self._keys.append(key)
        return kid

    # -- writing ---------------------------------------------------------------------------

    def place_of(self, loc: Loc) -> Place:
        """``loc`` in this index's terms (its container found or made)."""
        if loc.gone:
            return (self.gone, None, Content.GC)
        if loc.parent is None:
            cont = self._root(loc.container)
        else:
            cont = self._by_parent.get(loc.parent) or Container(loc.container, loc.parent)
        return (cont, loc.key, loc.content)

    def add(self, client: int, start: int, end: int, loc: Loc) -> None:
        self.add_spans(client, [(start, end, self.place_of(loc))])

    def add_place(self, client: int, start: int, end: int, place: Place) -> None:
        self.add_spans(client, [(start, end, place)])

    def add_spans(self, client: int, spans: list[tuple[int, int, Place]]) -> None:
        """Rows ``(start, end, place)`` of ``client``, in clock order after its last row.

        Contiguous rows in one container with one content kind share a row: with one key
        (array elements, collected ranges), or one clock each under a sequence of keys (a
        map's fields written together).
        """
        if not spans:
            return
        runs = self._clients.get(client)
        if runs is None:
            runs = self._clients[client] = _Runs()
        starts, ends, packed = runs.starts, runs.ends, runs.packed
        last = ends[-1] if ends else 0
        # The common case first: no span shares a row with the one before it (nor the first
        # with the index's last row), as when an update writes into different containers.
        # Each span is then a row of its own, exactly as below.
        if ends:
            word = packed[-1]
            prev: Container | None = self._conts[word & _LOW32]
            prev_kind: Content | None = KINDS[word >> _KIND_SHIFT]
        else:
            prev = prev_kind = None
        for start, end, (cont, _, kind) in spans:
            if (cont is prev and kind is prev_kind) or start < last or end <= start:
                self._add_merging(runs, spans)
                return
            prev, prev_kind, last = cont, kind, end
        key_ids = self._key_ids
        for start, end, (cont, key, kind) in spans:
            number = cont.number if cont.number >= 0 else self._register(cont)
            kid = key_ids.get(key)
            if kid is None:
                kid = self._key(key)
            starts.append(start)
            ends.append(end)
            packed.append(number | kid << _KEY_SHIFT | KINDS.index(kind) << _KIND_SHIFT)

    def _add_merging(self, runs: _Runs, spans: list[tuple[int, int, Place]]) -> None:
        """:meth:`add_spans` in general: rows merged where they can be."""
        starts, ends, packed = runs.starts, runs.ends, runs.packed
        last = ends[-1] if ends else 0
        # the row being built: [start, end) in cont, of kind, under keys (one per clock, or
        # a single key for all); `extends` when it is the index's last row, grown
        p_start = p_end = -1
        p_cont: Container | None = None
        p_kind: Content | None = None
        p_keys: list[str | None] = []
        p_single = True
        extends = False
        # only a first span in the last row's container, right after it, can grow that row
        if ends and spans[0][0] == last and self._conts[packed[-1] & _LOW32] is spans[0][2][0]:
            cont, key, kind = self._unpack(packed[-1])
            if not isinstance(self._keys[(packed[-1] >> _KEY_SHIFT) & _LOW28], tuple):
                p_start, p_end, p_cont, p_kind, p_keys = starts[-1], last, cont, kind, [key]
                extends = True
        held = p_end  # the index's last row ends here: rewritten only if it grows
        for start, end, (cont, key, kind) in spans:
            if start < last or end <= start:
                raise ValueError("runs must be added in clock order")
            last = end
            if cont is p_cont and kind is p_kind and start == p_end:
                if p_single:
                    if key == p_keys[0]:
                        p_end = end
                        continue
                    if p_end - p_start == 1 and end - start == 1:
                        p_keys.append(key)
                        p_single = False
                        p_end = end
                        continue
                elif end - start == 1:
                    p_keys.append(key)
                    p_end = end
                    continue
            if p_cont is not None and not (extends and p_end == held):
                self._row(runs, p_start, p_end, p_cont, p_keys, p_single, p_kind, extends)
            extends = False
            p_start, p_end, p_cont, p_kind, p_keys, p_single = start, end, cont, kind, [key], True
        self._row(runs, p_start, p_end, p_cont, p_keys, p_single, p_kind, extends)

    def _row(
        self,
        runs: _Runs,
        start: int,
        end: int,
        cont: Container | None,
        keys: list[str | None],
        single: bool,
        kind: Content | None,
        extends: bool,
    ) -> None:
        assert cont is not None and kind is not None
        number = cont.number if cont.number >= 0 else self._register(cont)
        kid = self._key(keys[0] if single else tuple(keys))
        word = number | kid << _KEY_SHIFT | KINDS.index(kind) << _KIND_SHIFT
        if extends:
            runs.ends[-1] = end
            runs.packed[-1] = word
        else:
            runs.starts.append(start)
            runs.ends.append(end)
            runs.packed.append(word)

    def add_gone(self, client: int, start: int, end: int) -> None:
        self.add_spans(client, [(start, end, (self.gone, None, Content.GC))])

    # -- reading ---------------------------------------------------------------------------

    def end(self, client: int) -> int:
        runs = self._clients.get(client)
        return runs.ends[-1] if runs and runs.ends else 0

    def _unpack(self, packed: int, offset: int = 0) -> Place:
        key = self._keys[(packed >> _KEY_SHIFT) & _LOW28]
        return (
            self._conts[packed & _LOW32],
            key[offset] if isinstance(key, tuple) else key,
            KINDS[packed >> _KIND_SHIFT],
        )

    def place(self, client: int, clock: int) -> Place | None:
        """Where item ``(client, clock)`` lives, or None if no accepted item has that id."""
        runs = self._clients.get(client)
        if runs is None:
            return None
        starts = runs.starts
        i = bisect.bisect_right(starts, clock) - 1
        if i < 0 or clock >= runs.ends[i]:
            return None
        word = runs.packed[i]  # _unpack, inlined: the fast path asks this for every reference
        key = self._keys[(word >> _KEY_SHIFT) & _LOW28]
        return (
            self._conts[word & _LOW32],
            key[clock - starts[i]] if isinstance(key, tuple) else key,
            KINDS[word >> _KIND_SHIFT],
        )

    def places(self, client: int, start: int, end: int) -> Iterator[Place]:
        """Places of ``client``'s items overlapping clocks ``[start, end)``, in clock order
        (one per row where a row has one key: they are all alike)."""
        runs = self._clients.get(client)
        if runs is None or end <= start:
            return
        starts, ends, packed = runs.starts, runs.ends, runs.packed
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        n = len(starts)
        while i < n and starts[i] < end:
            if ends[i] > start:
                row_start = starts[i]
                if isinstance(self._keys[(packed[i] >> _KEY_SHIFT) & _LOW28], tuple):
                    for clock in range(max(start, row_start), min(end, ends[i])):
                        yield self._unpack(packed[i], clock - row_start)
                else:
                    yield self._unpack(packed[i])
            i += 1

    @staticmethod
    def loc(place: Place) -> Loc:
        cont, key, kind = place
        if kind is Content.GC:
            return GONE
        return Loc(cont.path, key, kind, cont.parent)

    def lookup(self, item: ID) -> Loc | None:
        found = self.place(*item)
        return None if found is None else self.loc(found)

    def overlapping(self, client: int, start: int, end: int) -> Iterator[Loc]:
        for place in self.places(client, start, end):
            yield self.loc(place)

    def __len__(self) -> int:
        return sum(len(r.starts) for r in self._clients.values())

    # -- snapshots -------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Plain, CBOR-ready form for snapshots: the tables, and each client's columns as
        little-endian bytes."""
        conts = self._conts_dumped
        if len(conts) != len(self._conts):
            conts.extend(
                [list(c.path), list(c.parent) if c.parent is not None else None]
                for c in self._conts[len(conts) :]
            )
        clients = [
            [client, _le(runs.starts), _le(runs.ends), _le(runs.packed)]
            for client, runs in sorted(self._clients.items())
        ]
        return {"v": 3, "containers": list(conts), "keys": self._keys, "clients": clients}

    @classmethod
    def load(cls, data: Any) -> LocationIndex:
        if isinstance(data, dict) and data.get("v") == 3:
            return cls._load_v3(data)
        return cls._load_v1(data)

    @classmethod
    def _load_v3(cls, data: Any) -> LocationIndex:
        index = cls()
        index._conts = []
        index._conts_dumped = []
        index._by_root = {}
        for path, parent in data["containers"]:
            par = (int(parent[0]), int(parent[1])) if parent is not None else None
            index._register(Container(tuple(path), par))
        index.gone = index._by_root[()]
        index._keys = [tuple(k) if isinstance(k, list) else k for k in data["keys"]]
        index._key_ids = {k: i for i, k in enumerate(index._keys)}
        n_conts, n_keys, n_kinds = len(index._conts), len(index._keys), len(KINDS)
        for client, starts, ends, packed in data["clients"]:
            runs = _Runs()
            runs.starts = _from_le(starts)
            runs.ends = _from_le(ends)
            runs.packed = _from_le(packed)
            if not len(runs.starts) == len(runs.ends) == len(runs.packed):
                raise ValueError("index columns differ in length")
            # a snapshot is checksummed and written by this code from verified entries: check
            # only what is cheap (a full scan costs about a second per million rows)
            if runs.packed and (
                max(runs.packed) >> _KIND_SHIFT >= n_kinds
                or runs.packed[-1] & _LOW32 >= n_conts
                or (runs.packed[-1] >> _KEY_SHIFT) & _LOW28 >= n_keys
            ):
                raise ValueError("index refers outside its tables")
            index._clients[int(client)] = runs
        return index

    @classmethod
    def _load_v1(cls, data: Any) -> LocationIndex:
        """Snapshots written before the compact form: one row per run, paths interned."""
        index = cls()
        paths = [tuple(p) for p in data["paths"]]
        for client, rows in data["clients"]:
            for s, e, pid, key, content, parent in rows:
                par = (parent[0], parent[1]) if parent else None
                index.add(client, s, e, Loc(paths[pid], key, Content(content), par))
        return index


def _le(column: array[int]) -> bytes:
    """A column of unsigned 64-bit integers as little-endian bytes, on any platform."""
    if column.itemsize != 8:
        raise ValueError("no 8-byte unsigned array type on this platform")
    if sys.byteorder == "big":
        column = array("Q", column)
        column.byteswap()
    return column.tobytes()


def _from_le(data: bytes) -> array[int]:
    column = array("Q")
    if column.itemsize != 8 or len(data) % 8:
        raise ValueError("index column does not fit its type")
    column.frombytes(data)
    if sys.byteorder == "big":
        column.byteswap()
    return column


class WrittenSet:
    """The write-once paths already written: a set of paths, stored compactly.

    Task ids (``tasks/<id>``, one per task) are kept apart as a set of ids; any other path is
    kept as it is. (Snapshots of an earlier layout stored a bitmask per task; bit 1 is the task.)
    """

    __slots__ = ("_other", "_tasks")

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._tasks: set[str] = set()
        self._other: set[Path] = set()
        for path in paths:
            self.add(path)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, tuple):
            return False
        if len(path) == 2 and path[0] == TASKS and path[1] is not None:
            return path[1] in self._tasks
        return path in self._other

    def add(self, path: Path) -> None:
        if len(path) == 2 and path[0] == TASKS and path[1] is not None:
            self._tasks.add(path[1])
        else:
            self._other.add(path)

    def has_child(self, container: Path, key: str | None) -> bool:
        """``(*container, key) in self``, without building the path."""
        if container == _TASKS_ROOT and key is not None:
            return key in self._tasks
        return (*container, key) in self._other

    def add_child(self, container: Path, key: str | None) -> None:
        """``self.add((*container, key))``, without building the path where it can."""
        if container == _TASKS_ROOT and key is not None:
            self._tasks.add(key)
        else:
            self._other.add((*container, key))

    def add_children(self, children: Iterable[tuple[Path, str | None]]) -> None:
        """:meth:`add_child` for each ``(container, key)``."""
        for container, key in children:
            self.add_child(container, key)

    def update(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self.add(path)

    def __iter__(self) -> Iterator[Path]:
        for tid in self._tasks:
            yield (TASKS, tid)
        yield from self._other

    def __len__(self) -> int:
        return len(self._tasks) + len(self._other)

    def dump(self) -> dict[str, Any]:
        return {"tasks": [[tid, 1] for tid in self._tasks], "other": [list(p) for p in self._other]}

    @classmethod
    def load(cls, data: Any) -> WrittenSet:
        out = cls()
        if isinstance(data, dict):
            for tid, mask in data["tasks"]:
                if not isinstance(tid, str) or type(mask) is not int or mask < 0:
                    raise ValueError("bad write-once entry")
                if mask & 1:
                    out._tasks.add(tid)
            out._other = {tuple(p) for p in data["other"]}
        else:  # the older form: a list of paths
            out.update(tuple(p) for p in data)
        return out


_TASKS_ROOT: Path = (TASKS,)
