"""Structural decoding of Yrs v1 updates.

pycrdt only shows what an update *visibly* changed, and that depends on what else the replica
already holds: a map write that loses to a concurrent write emits no event at all. Authorization
must not depend on arrival order, so it reads the update itself: which client wrote which clock
range, where each new item is anchored (origin, right origin, or explicit parent and key), and
which ranges it deletes. Content is only measured and classified, never interpreted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .lib0 import DecodeError, Reader, var_uint

ID = tuple[int, int]  # (client, clock)

_GC = 0
_DELETED = 1
_JSON = 2
_BINARY = 3
_STRING = 4
_EMBED = 5
_FORMAT = 6
_TYPE = 7
_ANY = 8
_DOC = 9
_SKIP = 10

TYPE_ARRAY = 0
TYPE_MAP = 1
_XML_ELEMENT = 3
_XML_HOOK = 5


class Content(enum.Enum):
    """What an item holds, as far as authorization cares."""

    GC = "gc"  # collected: no parent, no content; a pure clock filler
    DELETED = "deleted"  # tombstone written by its own transaction
    VALUE = "value"  # primitive (lib0 Any, JSON or binary)
    MAP = "map"
    ARRAY = "array"
    OTHER = "other"  # text, XML, embeds, formats, sub-documents, skips: never allowed


@dataclass(frozen=True, slots=True)
class Item:
    client: int
    clock: int
    length: int
    content: Content
    origin: ID | None = None
    right_origin: ID | None = None
    parent: str | ID | None = None  # root name, parent item id; None when inherited
    parent_sub: str | None = None  # map key, only when the parent is explicit


@dataclass(frozen=True, slots=True)
class Update:
    items: tuple[Item, ...]
    deletes: tuple[tuple[int, int, int], ...]  # (client, clock, length)


def _id(r: Reader) -> ID:
    return (r.var_uint(), r.var_uint())


def _content(r: Reader, ref: int) -> tuple[Content, int]:
    """Read one item's content; returns its kind and its clock length."""
    if ref == _DELETED:
        return Content.DELETED, r.var_uint()
    if ref == _JSON:
        n = r.count()
        for _ in range(n):
            r.string()
        return Content.VALUE, n
    if ref == _BINARY:
        r.bytes_()
        return Content.VALUE, 1
    if ref == _STRING:
        s = r.string()
        return Content.OTHER, len(s.encode("utf-16-le")) // 2
    if ref == _EMBED:
        r.string()
        return Content.OTHER, 1
    if ref == _FORMAT:
        r.string()
        r.string()
        return Content.OTHER, 1
    if ref == _TYPE:
        type_ref = r.var_uint()
        if type_ref in (_XML_ELEMENT, _XML_HOOK):
            r.string()
        if type_ref == TYPE_ARRAY:
            return Content.ARRAY, 1
        if type_ref == TYPE_MAP:
            return Content.MAP, 1
        return Content.OTHER, 1
    if ref == _ANY:
        n = r.count()
        for _ in range(n):
            r.any()
        return Content.VALUE, n
    if ref == _DOC:
        r.string()
        r.any()
        return Content.OTHER, 1
    raise DecodeError(f"unknown content ref {ref}")


def decode_update(data: bytes, *, max_items: int = 100_000) -> Update:
    """Decode a whole v1 update; trailing bytes are an error (Yrs would ignore them)."""
    r = Reader(data)
    items: list[Item] = []
    for _ in range(r.count(3)):
        n_structs = r.count()
        client = r.var_uint()
        clock = r.var_uint()
        for _ in range(n_structs):
            if len(items) >= max_items:
                raise DecodeError("too many structs")
            info = r.u8()
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                length = r.var_uint()
                kind = Content.GC if ref == _GC else Content.OTHER
                items.append(Item(client, clock, length, kind))
            else:
                origin = _id(r) if info & 0x80 else None
                right = _id(r) if info & 0x40 else None
                parent: str | ID | None = None
                sub: str | None = None
                if not info & 0xC0:
                    parent = r.string() if r.var_uint() == 1 else _id(r)
                    if info & 0x20:
                        sub = r.string()
                kind, length = _content(r, ref)
                items.append(Item(client, clock, length, kind, origin, right, parent, sub))
            if length < 1:
                raise DecodeError("zero-length struct")
            clock += length
    deletes: list[tuple[int, int, int]] = []
    for _ in range(r.count(2)):
        client = r.var_uint()
        for _ in range(r.count(2)):
            clock = r.var_uint()
            length = r.var_uint()
            if length < 1:
                raise DecodeError("empty delete range")
            deletes.append((client, clock, length))
    if not r.done:
        raise DecodeError(f"{len(data) - r.pos} trailing bytes")
    return Update(tuple(items), tuple(deletes))


def decode_state_vector(data: bytes) -> dict[int, int]:
    """Decode a Yrs-encoded state vector (``Doc.get_state()``)."""
    r = Reader(data)
    out: dict[int, int] = {}
    for _ in range(r.count(2)):
        client = r.var_uint()
        out[client] = r.var_uint()
    if not r.done:
        raise DecodeError("trailing bytes after state vector")
    return out


def gc_update(client: int, start: int, end: int) -> bytes:
    """An update holding only a collected range ``[start, end)`` of ``client``: Yrs treats
    anything anchored in it as deleted, and the client's clock moves past it."""
    return (
        b"\x01\x01"
        + var_uint(client)
        + var_uint(start)
        + bytes([_GC])
        + var_uint(end - start)
        + b"\x00"
    )
