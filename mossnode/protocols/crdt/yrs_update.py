"""Structural decoding of Yrs v1 updates.

pycrdt only shows what an update *visibly* changed, and that depends on what else the replica
already holds: a map write that loses to a concurrent write emits no event at all. Authorization
must not depend on arrival order, so it reads the update itself: which client wrote which clock
range, where each new item is anchored (origin, right origin, or explicit parent and key), and
which ranges it deletes. Content is only measured and classified, never interpreted.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from mossnode.record import Record

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


class Item(NamedTuple):
    """One struct of an update. A tuple: the fast decoder builds plain tuples of this layout
    (see :data:`RawItem`), and every reader indexes them in this order."""

    client: int
    clock: int
    length: int
    content: Content
    origin: ID | None = None
    right_origin: ID | None = None
    parent: str | ID | None = None  # root name, parent item id; None when inherited
    parent_sub: str | None = None  # map key, only when the parent is explicit


# (client, clock, length, content, origin, right_origin, parent, parent_sub): Item's layout
RawItem = tuple[int, int, int, Content, ID | None, ID | None, str | ID | None, str | None]
Delete = tuple[int, int, int]  # (client, clock, length)


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


# -- the fast path ------------------------------------------------------------------------------
#
# :func:`decode_update` above is the reference: a plain reading of the format, one method call
# per field. Authorization decodes every received update, so :func:`decode_raw` reads the same
# grammar in one function with the one-byte varint case inlined, the author's own client id
# matched as a byte string, and ``Any`` values skipped instead of built. It may only ever accept
# what the reference accepts, with the same result; whenever it meets anything it does not
# handle, or any error, it hands the bytes to the reference, which then decides (and words the
# error). tests/test_crdt_fastpath.py checks the two against each other on mutated updates.


class RawUpdate(Record):
    """A decoded update whose items are plain tuples in :class:`Item`'s layout.

    ``runs`` (client, first clock, end clock) of each non-empty struct group and ``refs``, every
    item id an item refers to (origins, right origins, parent ids; a parent shared by
    consecutive siblings once), in item order, are what :func:`authorize.references` needs.
    """

    __slots__ = ("deletes", "items", "refs", "runs")

    def __init__(
        self,
        items: list[RawItem],
        deletes: list[Delete],
        runs: list[tuple[int, int, int]],
        refs: list[ID],
    ) -> None:
        self.items = items
        self.deletes = deletes
        self.runs = runs
        self.refs = refs

    def as_update(self) -> Update:
        return Update(tuple(Item._make(i) for i in self.items), tuple(self.deletes))


class _Unhandled(Exception):
    """Valid or not, the reference decoder will tell."""


_MAX_ANY_DEPTH = 32
_U64 = 1 << 64
_VALUE = Content.VALUE
_GC_KIND = Content.GC
_OTHER = Content.OTHER
_DELETED_KIND = Content.DELETED
_MAP = Content.MAP
_ARRAY = Content.ARRAY


def _uint(buf: bytes, pos: int) -> tuple[int, int]:
    """A varuint at ``pos`` (any length); ``(value, next position)``. Two bytes (clocks up to
    16,383, the commonest multi-byte value) without the loop."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    c = buf[pos + 1]
    if c < 0x80:
        return (b & 0x7F) | c << 7, pos + 2
    value = 0
    shift = 0
    for _ in range(10):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value >= _U64:
                raise _Unhandled
            return value, pos
        shift += 7
    raise _Unhandled


# Simple ``Any`` values as one regular expression, so the common ones are skipped by the
# regex engine (in C) instead of a byte at a time here: a scalar (null, undefined, booleans,
# floats, int64, a varint of at most 10 bytes), an ASCII string shorter than 128 bytes (its
# length is one byte; ASCII is valid UTF-8), an empty array or object. A length byte cannot be
# read by a regex, so each string length is a branch of its own (the engine tests a branch's
# first byte before entering it). Lib0 gives every value exactly one reading, so a match is
# the reading the walk below would make; the walk takes whatever does not match. A run of n
# values (an object's n pairs) is tried as one match first. Compiled on first use, not at
# import.
_RX_SCALAR = (
    rb"[\x78\x79\x7e\x7f]|[\x7a\x7b][\x00-\xff]{8}|\x7c[\x00-\xff]{4}"
    rb"|\x7d[\x80-\xff]{0,9}[\x00-\x7f]"
)
Match = Callable[[bytes, int, int], "re.Match[bytes] | None"]
_SIMPLE: list[bytes] = []  # [value, pair] patterns, once built
_RUNS: dict[tuple[int, bool], Match] = {}  # (n, keyed) -> matcher of n simple values (pairs)
_MAX_RUN = 16  # longer runs are matched a value (pair) at a time


def _run_matcher(n: int, keyed: bool) -> Match:
    """The matcher of ``n`` simple values (``keyed``: pairs) in a row. ``{n}`` repeats one
    copy of the pattern, so each count costs one compilation (about 30 ms), on first use."""
    if not _SIMPLE:
        # a one-byte length n < 128, then n ASCII bytes: a key, or the body of a string
        text = (
            b"(?:"
            + b"|".join(re.escape(bytes([n])) + b"[\\x00-\\x7f]{%d}" % n for n in range(128))
            + b")"
        )
        value = rb"(?:" + _RX_SCALAR + rb"|\x77" + text + rb"|\x75\x00|\x76\x00)"
        _SIMPLE.extend([value, text + value])
    match = _RUNS[(n, keyed)] = re.compile(b"(?:%s){%d}" % (_SIMPLE[keyed], n), re.DOTALL).match
    return match


def _skip_values(buf: bytes, pos: int, end: int, n: int, depth: int, keyed: bool) -> int:
    """Skip ``n`` lib0 ``Any`` values at nesting ``depth`` (each after a string key if
    ``keyed``: an object's pairs), validating them as :meth:`Reader.any` does; the next
    position. Simple values (and pairs) are matched by a regex (they hold no container, so
    their depth is this one), the others read here: short strings, null, booleans, numbers,
    empty arrays inline; only containers take a call."""
    if n and depth > _MAX_ANY_DEPTH:
        raise _Unhandled
    if 1 < n <= _MAX_RUN:  # all of them simple: one match
        found = (_RUNS.get((n, keyed)) or _run_matcher(n, keyed))(buf, pos, end)
        if found is not None:
            return found.end()
    simple = _RUNS.get((1, keyed)) or _run_matcher(1, keyed)
    for _ in range(n):
        found = simple(buf, pos, end)
        if found is not None:
            pos = found.end()
            continue
        if keyed:
            k = buf[pos]
            if k < 0x80:
                pos += 1
            else:
                k, pos = _uint(buf, pos)
            if k > end - pos:
                raise _Unhandled
            buf[pos : pos + k].decode("utf-8")
            pos += k
        tag = buf[pos]
        if tag == 119:
            m = buf[pos + 1]
            if m < 0x80:
                pos += 2
                if m > end - pos:
                    raise _Unhandled
                buf[pos : pos + m].decode("utf-8")
                pos += m
                continue
        elif tag == 126 or tag == 127 or tag == 120 or tag == 121:
            pos += 1
            continue
        elif tag == 123 or tag == 124:
            pos += 9 if tag == 123 else 5
            if pos > end:
                raise _Unhandled
            continue
        elif (tag == 125 and buf[pos + 1] < 0x80) or (tag == 117 and buf[pos + 1] == 0):
            pos += 2  # a one-byte integer, an empty array
            continue
        pos = _skip_any(buf, pos, end, depth)
    return pos


def _skip_any(buf: bytes, pos: int, end: int, depth: int) -> int:
    """Skip one lib0 ``Any`` (validating it as :meth:`Reader.any` does); the next position."""
    if depth > _MAX_ANY_DEPTH:
        raise _Unhandled
    tag = buf[pos]
    pos += 1
    if tag == 119:  # string
        n = buf[pos]
        if n < 0x80:
            pos += 1
        else:
            n, pos = _uint(buf, pos)
        if n > end - pos:
            raise _Unhandled
        buf[pos : pos + n].decode("utf-8")
        return pos + n
    if tag == 126 or tag == 127 or tag == 120 or tag == 121:
        return pos
    if tag == 125:  # signed varint, at most 10 bytes
        b = buf[pos]
        pos += 1
        count = 1
        while b & 0x80:
            count += 1
            if count > 10:
                raise _Unhandled
            b = buf[pos]
            pos += 1
        return pos
    if tag == 123 or tag == 122 or tag == 124:
        size = 4 if tag == 124 else 8
        if pos + size > end:
            raise _Unhandled
        return pos + size
    if tag == 118 or tag == 117:  # object: count(2), then (key, value) pairs; array: values
        n = buf[pos]
        if n < 0x80:
            pos += 1
        else:
            n, pos = _uint(buf, pos)
        if n * (2 if tag == 118 else 1) > end - pos:
            raise _Unhandled
        return _skip_values(buf, pos, end, n, depth + 1, tag == 118)
    if tag == 116:  # bytes
        n = buf[pos]
        if n < 0x80:
            pos += 1
        else:
            n, pos = _uint(buf, pos)
        if n > end - pos:
            raise _Unhandled
        return pos + n
    raise _Unhandled


def _decode_fast(buf: bytes, max_items: int, hint: bytes, hint_value: int) -> RawUpdate:
    """See the section comment. ``hint`` is the varuint encoding of ``hint_value`` (the
    author's client id): where it starts a client field, that field is ``hint_value``."""
    end = len(buf)
    hlen = len(hint)
    uint = _uint
    skip_values = _skip_values
    unhandled = _Unhandled
    value_kind, map_kind, array_kind, deleted_kind = _VALUE, _MAP, _ARRAY, _DELETED_KIND
    items: list[RawItem] = []
    append = items.append
    runs: list[tuple[int, int, int]] = []
    refs: list[ID] = []
    refer = refs.append
    last_parent = b""
    last_parent_id: ID = (0, 0)
    pos = 0
    n_groups = buf[pos]
    if n_groups < 0x80:
        pos += 1
    else:
        n_groups, pos = uint(buf, pos)
    if n_groups * 3 > end - pos:
        raise unhandled
    for _ in range(n_groups):
        n_structs = buf[pos]
        if n_structs < 0x80:
            pos += 1
        else:
            n_structs, pos = uint(buf, pos)
        if n_structs > end - pos:
            raise unhandled
        if hlen and buf.startswith(hint, pos):
            client = hint_value
            pos += hlen
        else:
            client, pos = uint(buf, pos)
        clock = buf[pos]
        if clock < 0x80:
            pos += 1
        elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
            clock = (clock & 0x7F) | buf[pos + 1] << 7
            pos += 2
        else:
            clock, pos = uint(buf, pos)
        first = clock
        if len(items) + n_structs > max_items:
            raise unhandled
        for _ in range(n_structs):
            info = buf[pos]
            pos += 1
            ref = info & 0x1F
            if ref == 0 or ref == 10:  # GC, skip
                length = buf[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = uint(buf, pos)
                append((client, clock, length, _GC_KIND if ref == 0 else _OTHER, *_NONE4))
            else:
                origin: ID | None = None
                right: ID | None = None
                parent: str | ID | None = None
                sub: str | None = None
                if info & 0x80:
                    if hlen and buf.startswith(hint, pos):
                        c = hint_value
                        pos += hlen
                    else:
                        c, pos = uint(buf, pos)
                    k = buf[pos]
                    if k < 0x80:
                        pos += 1
                    elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
                        k = (k & 0x7F) | buf[pos + 1] << 7
                        pos += 2
                    else:
                        k, pos = uint(buf, pos)
                    origin = (c, k)
                    refer(origin)
                if info & 0x40:
                    if hlen and buf.startswith(hint, pos):
                        c = hint_value
                        pos += hlen
                    else:
                        c, pos = uint(buf, pos)
                    k = buf[pos]
                    if k < 0x80:
                        pos += 1
                    elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
                        k = (k & 0x7F) | buf[pos + 1] << 7
                        pos += 2
                    else:
                        k, pos = uint(buf, pos)
                    right = (c, k)
                    refer(right)
                if not info & 0xC0:
                    flag = buf[pos]
                    if flag < 0x80:
                        pos += 1
                    else:
                        flag, pos = uint(buf, pos)
                    if flag == 1:
                        n = buf[pos]
                        if n < 0x80:
                            pos += 1
                        else:
                            n, pos = uint(buf, pos)
                        if n > end - pos:
                            raise unhandled
                        parent = buf[pos : pos + n].decode("utf-8")
                        pos += n
                    elif last_parent and buf.startswith(last_parent, pos):
                        parent = last_parent_id  # siblings repeat their parent's id
                        pos += len(last_parent)
                    else:
                        at = pos
                        if hlen and buf.startswith(hint, pos):
                            c = hint_value
                            pos += hlen
                        else:
                            c, pos = uint(buf, pos)
                        k = buf[pos]
                        if k < 0x80:
                            pos += 1
                        elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
                            k = (k & 0x7F) | buf[pos + 1] << 7
                            pos += 2
                        else:
                            k, pos = uint(buf, pos)
                        parent = last_parent_id = (c, k)
                        last_parent = buf[at:pos]
                        refer(parent)
                    if info & 0x20:
                        n = buf[pos]
                        if n < 0x80:
                            pos += 1
                        else:
                            n, pos = uint(buf, pos)
                        if n > end - pos:
                            raise unhandled
                        sub = buf[pos : pos + n].decode("utf-8")
                        pos += n
                if ref == 8:  # ContentAny
                    length = buf[pos]
                    if length < 0x80:
                        pos += 1
                    else:
                        length, pos = uint(buf, pos)
                    if length > end - pos:
                        raise unhandled
                    n = buf[pos + 1] if length == 1 and buf[pos] == 118 else 0
                    if 0 < n <= _MAX_RUN:
                        # one object of up to _MAX_RUN simple pairs (a task's core, a lease):
                        # what _skip_values -> _skip_any -> _skip_values would match, at once
                        found = (_RUNS.get((n, True)) or _run_matcher(n, True))(buf, pos + 2, end)
                        pos = (
                            found.end()
                            if found is not None
                            else skip_values(buf, pos, end, 1, 0, False)
                        )
                    else:
                        pos = skip_values(buf, pos, end, length, 0, False)
                    kind = value_kind
                elif ref == 7:  # ContentType
                    type_ref = buf[pos]
                    if type_ref < 0x80:
                        pos += 1
                    else:
                        type_ref, pos = uint(buf, pos)
                    if type_ref == TYPE_MAP:
                        kind = map_kind
                    elif type_ref == TYPE_ARRAY:
                        kind = array_kind
                    else:
                        raise unhandled  # text, XML: decoded (and refused) by the reference
                    length = 1
                elif ref == 1:  # ContentDeleted
                    length = buf[pos]
                    if length < 0x80:
                        pos += 1
                    else:
                        length, pos = uint(buf, pos)
                    kind = deleted_kind
                else:
                    raise unhandled  # JSON, binary, string, embed, format, doc, unknown
                append((client, clock, length, kind, origin, right, parent, sub))
            if length < 1:
                raise unhandled
            clock += length
        if n_structs:
            runs.append((client, first, clock))
    deletes: list[Delete] = []
    n_clients = buf[pos]
    if n_clients < 0x80:
        pos += 1
    else:
        n_clients, pos = uint(buf, pos)
    if n_clients * 2 > end - pos:
        raise unhandled
    for _ in range(n_clients):
        if hlen and buf.startswith(hint, pos):
            client = hint_value
            pos += hlen
        else:
            client, pos = uint(buf, pos)
        n_ranges = buf[pos]
        if n_ranges < 0x80:
            pos += 1
        else:
            n_ranges, pos = uint(buf, pos)
        if n_ranges * 2 > end - pos:
            raise unhandled
        for _ in range(n_ranges):
            clock = buf[pos]
            if clock < 0x80:
                pos += 1
            elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
                clock = (clock & 0x7F) | buf[pos + 1] << 7
                pos += 2
            else:
                clock, pos = uint(buf, pos)
            length = buf[pos]
            if length < 0x80:
                pos += 1
            elif buf[pos + 1] < 0x80:  # two bytes (_uint's second case)
                length = (length & 0x7F) | buf[pos + 1] << 7
                pos += 2
            else:
                length, pos = uint(buf, pos)
            if length < 1:
                raise unhandled
            deletes.append((client, clock, length))
    if pos != end:
        raise unhandled
    return RawUpdate(items, deletes, runs, refs)


_NONE4 = (None, None, None, None)
_HINTS: dict[int, bytes] = {}


def _hint(client: int) -> bytes:
    hint = _HINTS.get(client)
    if hint is None:
        if len(_HINTS) > 4096:
            _HINTS.clear()
        hint = _HINTS[client] = var_uint(client)
    return hint


def decode_raw(data: bytes, *, client: int = 0, max_items: int = 100_000) -> RawUpdate:
    """:func:`decode_update`'s result with plain-tuple items, fast; raises the reference's
    :class:`DecodeError` for anything the reference refuses. ``client`` (the author's client
    id, if known) only speeds up reading it."""
    hint = (_HINTS.get(client) or _hint(client)) if client else b""
    try:
        return _decode_fast(data, max_items, hint, client)
    except Exception:  # anything at all: the reference decides
        pass
    ref = decode_update(data, max_items=max_items)
    return raw_of(ref)


def raw_of(update: Update) -> RawUpdate:
    """An :class:`Update` (from the reference decoder) as a :class:`RawUpdate`."""
    runs: list[tuple[int, int, int]] = []
    refs: list[ID] = []
    for item in update.items:
        if runs and runs[-1][0] == item.client and runs[-1][2] == item.clock:
            runs[-1] = (item.client, runs[-1][1], item.clock + item.length)
        else:
            runs.append((item.client, item.clock, item.clock + item.length))
        for r in (item.origin, item.right_origin, item.parent):
            if isinstance(r, tuple):
                refs.append(r)
    return RawUpdate(list(update.items), list(update.deletes), runs, refs)
