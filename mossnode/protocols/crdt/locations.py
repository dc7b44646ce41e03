"""Where every item ever accepted lives: (client, clock range) -> container path and key.

An item's place is fixed when it is created (Yrs never moves map or array items), but Yrs only
spells it out for items without neighbours; the others inherit it from their origin. Resolving
that needs the place of items written long ago, possibly since collected by Yrs' GC. This index
keeps it, built only from accepted updates in their per-author order, so it is identical on every
honest replica whatever order updates arrived in.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .schema import Path
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


class _Runs:
    __slots__ = ("ends", "locs", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.locs: list[Loc] = []


class LocationIndex:
    """Append-only per client; runs arrive in clock order because authors' chains do."""

    def __init__(self) -> None:
        self._clients: dict[int, _Runs] = {}

    def add(self, client: int, start: int, end: int, loc: Loc) -> None:
        runs = self._clients.setdefault(client, _Runs())
        if runs.ends and start < runs.ends[-1]:
            raise ValueError("runs must be added in clock order")
        runs.starts.append(start)
        runs.ends.append(end)
        runs.locs.append(loc)

    def end(self, client: int) -> int:
        runs = self._clients.get(client)
        return runs.ends[-1] if runs and runs.ends else 0

    def lookup(self, item: ID) -> Loc | None:
        client, clock = item
        runs = self._clients.get(client)
        if runs is None:
            return None
        i = bisect.bisect_right(runs.starts, clock) - 1
        if i < 0 or clock >= runs.ends[i]:
            return None
        return runs.locs[i]

    def overlapping(self, client: int, start: int, end: int) -> Iterator[Loc]:
        runs = self._clients.get(client)
        if runs is None or end <= start:
            return
        i = max(bisect.bisect_right(runs.starts, start) - 1, 0)
        while i < len(runs.starts) and runs.starts[i] < end:
            if runs.ends[i] > start:
                yield runs.locs[i]
            i += 1

    def dump(self) -> dict[str, Any]:
        """Plain, CBOR-ready form for snapshots; paths are interned."""
        paths: dict[Path, int] = {}
        clients = []
        for client in sorted(self._clients):
            runs = self._clients[client]
            rows = []
            for s, e, loc in zip(runs.starts, runs.ends, runs.locs, strict=True):
                pid = paths.setdefault(loc.container, len(paths))
                parent = list(loc.parent) if loc.parent else None
                rows.append([s, e, pid, loc.key, loc.content.value, parent])
            clients.append([client, rows])
        return {"paths": [list(p) for p in paths], "clients": clients}

    @classmethod
    def load(cls, data: Any) -> LocationIndex:
        index = cls()
        paths = [tuple(p) for p in data["paths"]]
        for client, rows in data["clients"]:
            for s, e, pid, key, content, parent in rows:
                par = (parent[0], parent[1]) if parent else None
                index.add(client, s, e, Loc(paths[pid], key, Content(content), par))
        return index
