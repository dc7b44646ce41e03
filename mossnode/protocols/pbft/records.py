"""Persisted records of a replica: what a restore still needs after a stable checkpoint.

Record kinds (``"k"``): ``seq`` (envelope seq reservation), ``view``, ``sent`` (the replica's own
message bytes), ``prepared`` (a prepared certificate), ``exec`` (a decided entry with results and
state digest) and ``stable`` (a stable checkpoint with its proof, the validator-set history and
the client reply table: whole in ``clients``, or in ``clients+`` only the rows changed since the
stable record before it). :meth:`Replica.restore` replays them in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from .messages import COMMIT, NEWVIEW, PREPARE, PREPREPARE, VIEWCHANGE

_SLOT_TYPES = frozenset({PREPREPARE, PREPARE, COMMIT})


def compact_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records a restore still needs, in an order :meth:`Replica.restore` accepts.

    Everything at or below the latest stable checkpoint is covered by its ``stable`` record (the
    decided entries themselves live in the I/O layer's decided log, from Decided effects), and
    only the latest seq reservation and view record matter. The I/O layer may call this whenever
    it likes, e.g. after persisting a ``stable`` record.
    """
    recs = [dict(r) for r in records]
    stable = max(
        (r for r in recs if r.get("k") == "stable"), key=lambda r: int(r["n"]), default=None
    )
    h = int(stable["n"]) if stable is not None else 0
    seq = max((int(r["upto"]) for r in recs if r.get("k") == "seq"), default=0)
    views = [r for r in recs if r.get("k") == "view"]
    view = views[-1] if views else None
    current = int(view["v"]) if view is not None else 0
    head: list[dict[str, Any]] = [{"k": "seq", "upto": seq}] if seq else []
    if stable is not None:
        head.append(_whole_table(recs, stable))
    if view is not None:
        head.append(view)
    kept = [r for r in recs if _still_needed(r, h, current)]
    return head + kept


def _whole_table(recs: list[dict[str, Any]], latest: dict[str, Any]) -> dict[str, Any]:
    """``latest`` with the reply table its predecessors and it describe, in whole: the kept
    record replaces all the stable records before it."""
    table: dict[bytes, list[Any]] = {}
    for r in recs:
        if r.get("k") != "stable":
            continue
        if "clients" in r:
            table = {row[0]: row for row in r["clients"]}
        table.update((row[0], row) for row in r.get("clients+", ()))
        if r is latest:
            break
    out = {k: v for k, v in latest.items() if k != "clients+"}
    out["clients"] = [table[c] for c in sorted(table)]
    return out


def _still_needed(r: Mapping[str, Any], h: int, view: int) -> bool:
    kind = r.get("k")
    if kind == "exec":
        return int(r["n"]) > h
    if kind == "prepared":
        return _record_seq(r["pp"]) > h
    if kind == "sent":
        type_, body = _peek(r["m"])
        if type_ in _SLOT_TYPES:
            return _body_int(body, "n") > h
        return type_ in (VIEWCHANGE, NEWVIEW) and _body_int(body, "v") >= view
    return False


def _peek(raw: bytes) -> tuple[str, Any]:
    """Type and body of one of our own persisted envelopes, without re-verifying it."""
    fields = cbor2.loads(raw[64:])
    return str(fields[2]), fields[6]


def _body_int(body: Any, key: str) -> int:
    value = body.get(key) if isinstance(body, dict) else None
    return value if type(value) is int else -1


def _record_seq(raw: bytes) -> int:
    return _body_int(_peek(raw)[1], "n")
