"""The pycrdt documents a replica keeps, and the canonical digest of their content.

The digest hashes canonical CBOR of the plain content (maps with sorted keys, arrays in Yrs
order), never Yrs bytes: two replicas holding the same content in different internal shapes
(different GC, different struct splits) have equal digests.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from typing import Any

from pycrdt import Array, Doc, Map, _pycrdt

from mossnode.crypto.envelope import canonical

from .schema import ROOTS, nest_task


def new_doc(client_id: int, update: bytes | None = None) -> Doc[Map[Any]]:
    doc: Doc[Map[Any]] = Doc(client_id=client_id)
    for name in ROOTS:
        doc.get(name, type=Map)
    if update is not None:
        doc.apply_update(update)
    return doc


def apply_update(doc: Doc[Map[Any]], update: bytes) -> None:
    """``doc.apply_update(update)`` in a transaction of pycrdt's Rust document directly: the
    same apply and commit (observers fire at the commit), without the Python transaction
    wrapper around it. Only where no transaction is open and nothing pycrdt-side watches the
    document (replicas observe the Rust objects themselves); otherwise the public way."""
    try:
        raw = doc._doc
        direct = doc._txn is None and doc._Model is None and not doc._allow_multithreading
    except AttributeError:  # pycrdt internals moved: the public way
        direct = False
    if not direct:
        doc.apply_update(update)
        return
    txn = raw.create_transaction()
    try:
        raw.apply_update(txn, update)
        txn.commit()
    finally:
        txn.drop()
    failed = getattr(doc, "_exceptions", None)
    if failed:  # what pycrdt's own transaction would raise for its observers
        exceptions = tuple(failed)
        failed.clear()
        raise ExceptionGroup("Observer callback error", exceptions)


def root(doc: Doc[Map[Any]], name: str) -> Map[Any]:
    return doc[name]  # created by new_doc; reading does not open a write transaction


def plain(value: Any) -> Any:
    """pycrdt's ``to_py`` output with bytearrays as bytes (and so hashable, comparable)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, bytearray):
        return bytes(value)
    return value


def content(doc: Doc[Map[Any]]) -> dict[str, Any]:
    """Plain Python content of every root (ints come back as floats, as Yrs stores them)."""
    return {name: plain(root(doc, name).to_py() or {}) for name in ROOTS}


def state_digest(doc: Doc[Map[Any]]) -> bytes:
    """The digest, computed from scratch through pycrdt's public API (the reference for
    :class:`ContentDigest`, which replicas use)."""
    return hashlib.sha256(b"mossnode/v1/state\0" + canonical(content(doc))).digest()


def _head(major: int, n: int) -> bytes:
    """The canonical CBOR head of major type ``major`` (in its top three bits) and length ``n``."""
    if n < 24:
        return bytes([major + n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major + extra]) + n.to_bytes(size, "big")
    raise ValueError("too large")


def _map_header(n: int) -> bytes:
    """The canonical CBOR head of a map of ``n`` pairs."""
    return _head(0xA0, n)


def _text(key: str) -> bytes:
    """``canonical(key)`` for a string, without a trip through cbor2 (one per digest key)."""
    data = key.encode()
    return _head(0x60, len(data)) + data


def _order(encoded_key: bytes) -> tuple[int, bytes]:
    """cbor2's canonical map order: shorter encoded keys first, then bytewise."""
    return (len(encoded_key), encoded_key)


RAW_MAP: type = _pycrdt.Map  # what Map.integrated is
_RawArray: type = _pycrdt.Array
_RAW_OTHER = frozenset(
    getattr(_pycrdt, name)
    for name in ("Text", "XmlElement", "XmlFragment", "XmlText", "Doc")
    if hasattr(_pycrdt, name)
)


_LEAVES = frozenset({str, float, int, bool, type(None), bytes})  # plain() keeps them as they are


def _raw_py(value: Any, txn: Any) -> Any:
    """``plain(to_py())`` on pycrdt's Rust objects inside one transaction: what the public
    API returns, without a Python wrapper and a transaction per value. Leaves are tested
    first: they are most of the calls (every task read and every digest goes through here)."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is RAW_MAP:
        get = value.get
        return {str(k): _raw_py(get(txn, k), txn) for k in value.keys(txn)}
    if kind is dict:
        return {str(k): v if type(v) in _LEAVES else _raw_py(v, txn) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _LEAVES else _raw_py(v, txn) for v in value]
    if kind is _RawArray:
        return [_raw_py(value.get(txn, i), txn) for i in range(value.len(txn))]
    if kind is bytearray:
        return bytes(value)
    if kind in _RAW_OTHER:  # text, XML, sub-documents: never stored here
        raise TypeError(f"unexpected {kind.__name__} in the document")
    return plain(value)


def _value(top: Map[Any], key: str, txn: Any) -> Any:
    """``plain(top.to_py()[key])``."""
    try:
        return _raw_py(top.integrated.get(txn._txn, key), txn._txn)
    except Exception:  # pycrdt internals moved: the public, slower way
        value = top[key]
        return plain(value.to_py() if isinstance(value, (Map, Array)) else value)


def _has(top: Map[Any], txn: Any) -> Callable[[str], bool]:
    """``key in top`` inside the open transaction ``txn``, without pycrdt's wrapper."""
    try:
        raw, t = top.integrated, txn._txn
        raw.has(t, "")
        return lambda key: bool(raw.has(t, key))
    except Exception:  # pycrdt internals moved: the public way
        return top.__contains__


def fast_content(doc: Doc[Map[Any]]) -> dict[str, Any]:
    """:func:`content`, read in one transaction without pycrdt's wrappers."""
    with doc.transaction() as txn:
        try:
            return {name: _raw_py(root(doc, name).integrated, txn._txn) for name in ROOTS}
        except Exception:  # pycrdt internals moved: the public, slower way
            return content(doc)


def task_of(doc: Doc[Map[Any]], tasks: Map[Any], tid: str) -> dict[str, Any] | None:
    """``tasks/<tid>`` as plain Python, nested as readers see it (:func:`.schema.nest_task`;
    None if it is not a map), read in one transaction.
    ``tasks`` is ``doc["tasks"]`` (which pycrdt rebuilds, with every root, at each access)."""
    with doc.transaction() as txn:
        try:
            top, t = tasks.integrated, txn._txn
            raw = top.get(t, tid) if top.has(t, tid) else None
            return nest_task(_raw_py(raw, t)) if type(raw) is RAW_MAP else None
        except Exception:  # pycrdt internals moved: the public, slower way
            task = tasks.get(tid)
            return nest_task(plain(task.to_py())) if isinstance(task, Map) else None


def task_entries(
    doc: Doc[Map[Any]], tasks: Map[Any], tid: str, keys: list[str]
) -> dict[str, Any] | None:
    """``{key: value}`` of some keys of the task map ``tasks/<tid>`` as plain Python (a key
    the map lacks is left out), or None if there is no such task: a reader that knows which
    keys changed re-reads those, not the whole task."""
    with doc.transaction() as txn:
        try:
            top, t = tasks.integrated, txn._txn
            raw: Any = top.get(t, tid) if top.has(t, tid) else None
            if type(raw) is not RAW_MAP:
                return None
            m: Any = raw  # (mypy narrows ``raw`` to object above)
            return {k: _raw_py(m.get(t, k), t) for k in keys if m.has(t, k)}
        except Exception:  # pycrdt internals moved: the public, slower way
            task = tasks.get(tid)
            if not isinstance(task, Map):
                return None
            return {
                k: plain(task[k].to_py() if isinstance(task[k], (Map, Array)) else task[k])
                for k in keys
                if k in task
            }


class _Pairs:
    """Encoded ``key: value`` pairs of one map, and its keys in canonical order."""

    __slots__ = ("order", "pairs")

    def __init__(self) -> None:
        self.pairs: dict[str, bytes] = {}  # key -> encoded key + encoded value
        self.order: list[tuple[int, bytes, str]] = []  # (len, encoded key, key), sorted

    def put(self, key: str, encoded_value: bytes) -> None:
        enc_key = _text(key)
        if key not in self.pairs:
            bisect.insort(self.order, (len(enc_key), enc_key, key))
        self.pairs[key] = enc_key + encoded_value

    def drop(self, key: str) -> None:
        if self.pairs.pop(key, None) is not None:
            enc_key = _text(key)
            del self.order[bisect.bisect_left(self.order, (len(enc_key), enc_key, key))]

    def fill(self, items: list[tuple[str, bytes]]) -> None:
        """Put many pairs: one sort instead of an insertion each."""
        for key, encoded_value in items:
            enc_key = _text(key)
            if key not in self.pairs:
                self.order.append((len(enc_key), enc_key, key))
            self.pairs[key] = enc_key + encoded_value
        self.order.sort()

    def encoded(self) -> bytes:
        """The canonical CBOR of the map."""
        pairs = self.pairs
        return _map_header(len(pairs)) + b"".join([pairs[k] for _, _, k in self.order])


class ContentDigest:
    """:func:`state_digest`, kept up to date per top-level key, and per key of the maps below
    them (a task's ``core``, ``bids/<node>``, ``log/<node>``...).

    The canonical CBOR of the content is a map of roots, each a map of keys; this keeps every
    ``key: value`` pair encoded, with the keys of each root in canonical order, re-encodes only
    what the replica saw change (deep observer events, :meth:`touch`), and hashes the pairs in
    order. A change inside a map-valued key (a bid written into a task) re-encodes that entry
    of the map, not the whole task: the encoded entries of the ``MAX_SPLIT`` most recently
    changed such maps are kept (the tasks in flight; finished ones keep only their encoded
    pair). Equal to :func:`state_digest` by construction (tests compare the two on random
    histories); a digest of a large document costs a hash pass instead of converting it all to
    Python and sorting it.
    """

    MAX_SPLIT = 4096

    def __init__(self) -> None:
        self._roots: dict[str, _Pairs] | None = None
        # root -> key -> the entries of its map value that changed (None: the whole value)
        self._dirty: dict[str, dict[str, set[str] | None]] = {name: {} for name in ROOTS}
        self._split: dict[tuple[str, str], _Pairs] = {}  # (root, key) -> its map's entries (LRU)
        self._digest: bytes | None = None

    def reset(self) -> None:
        """Forget everything (the document was replaced)."""
        self._roots = None
        self._split = {}
        self._digest = None
        for keys in self._dirty.values():
            keys.clear()

    def touch(self, name: str, key: str, sub: str | None = None) -> None:
        """``name/key`` changed; only its entry ``sub`` if given (a key of its map value)."""
        self._digest = None
        if self._roots is None:
            return
        dirty = self._dirty[name]
        if sub is None:
            dirty[key] = None
        elif key not in dirty:
            dirty[key] = {sub}
        else:
            subs = dirty[key]
            if subs is not None:
                subs.add(sub)

    def digest(self, doc: Doc[Map[Any]]) -> bytes:
        if self._digest is not None:
            return self._digest
        if self._roots is None:
            self._roots = {name: _Pairs() for name in ROOTS}
            for name in ROOTS:
                self._dirty[name] = dict.fromkeys(root(doc, name).keys())
        with doc.transaction() as txn:
            for name in ROOTS:
                dirty = self._dirty[name]
                if dirty:
                    self._refresh(name, root(doc, name), txn, dirty)
                    dirty.clear()
        h = hashlib.sha256(b"mossnode/v1/state\0")
        h.update(_map_header(len(ROOTS)))
        for enc_name, name in sorted(
            ((canonical(n), n) for n in ROOTS), key=lambda p: _order(p[0])
        ):
            h.update(enc_name)
            h.update(self._roots[name].encoded())
        self._digest = h.digest()
        return self._digest

    def _refresh(
        self, name: str, top: Map[Any], txn: Any, dirty: dict[str, set[str] | None]
    ) -> None:
        assert self._roots is not None
        pairs, split = self._roots[name], self._split
        has = _has(top, txn)
        fresh: list[tuple[str, bytes]] = []
        for key, subs in dirty.items():
            if not has(key):
                pairs.drop(key)
                split.pop((name, key), None)
                continue
            entries = split.pop((name, key), None)
            encoded = None if entries is None else self._update(top, key, txn, entries, subs)
            if encoded is None:
                entries, encoded = self._encode(top, key, txn)
            if entries is not None:
                split[(name, key)] = entries  # the most recently changed last
            if key in pairs.pairs:
                pairs.put(key, encoded)
            else:
                fresh.append((key, encoded))
        if len(fresh) > len(pairs.order) // 8:  # many new keys: one sort beats insertions
            pairs.fill(fresh)
        else:
            for key, encoded in fresh:
                pairs.put(key, encoded)
        while len(split) > self.MAX_SPLIT:
            del split[next(iter(split))]

    @staticmethod
    def _update(
        top: Map[Any], key: str, txn: Any, entries: _Pairs, subs: set[str] | None
    ) -> bytes | None:
        """Re-encode the entries ``subs`` of the map at ``key``, or None if the value must be
        encoded whole (all of it changed, or it is no longer a map)."""
        if subs is None:
            return None
        try:
            t = txn._txn
            raw = top.integrated.get(t, key)
            if type(raw) is not RAW_MAP:
                return None
            m: Any = raw
            for sub in subs:
                if m.has(t, sub):
                    entries.put(sub, canonical(_raw_py(m.get(t, sub), t)))
                else:
                    entries.drop(sub)
        except Exception:  # pycrdt internals moved: the public, slower way
            return None
        return entries.encoded()

    @staticmethod
    def _encode(top: Map[Any], key: str, txn: Any) -> tuple[_Pairs | None, bytes]:
        """The value at ``key`` encoded, and its entries if it is a map."""
        try:
            t = txn._txn
            raw = top.integrated.get(t, key)
            if type(raw) is RAW_MAP:
                m: Any = raw
                entries = _Pairs()
                entries.fill([(str(k), canonical(_raw_py(m.get(t, k), t))) for k in m.keys(t)])
                return entries, entries.encoded()
        except Exception:  # pycrdt internals moved: the public, slower way
            pass
        return None, canonical(_value(top, key, txn))
