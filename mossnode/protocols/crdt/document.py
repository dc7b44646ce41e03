"""The pycrdt documents a replica keeps, and the canonical digest of their content.

The digest hashes canonical CBOR of the plain content (maps with sorted keys, arrays in Yrs
order), never Yrs bytes: two replicas holding the same content in different internal shapes
(different GC, different struct splits) have equal digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pycrdt import Doc, Map

from mossnode.crypto.envelope import canonical

from .schema import ROOTS


def new_doc(client_id: int, update: bytes | None = None) -> Doc[Map[Any]]:
    doc: Doc[Map[Any]] = Doc(client_id=client_id)
    for name in ROOTS:
        doc.get(name, type=Map)
    if update is not None:
        doc.apply_update(update)
    return doc


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
    return hashlib.sha256(b"mossnode/v1/state\0" + canonical(content(doc))).digest()
