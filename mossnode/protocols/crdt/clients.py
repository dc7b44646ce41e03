"""Yrs client ids bound to node identities.

Yrs stamps every item with the client id of the document that wrote it. Deriving that id from
the author's public key lets a receiver check that an update signed by A carries only A's items,
and gives every replica the same id for A without any registry. pycrdt caps ids at 53 bits.
"""

from __future__ import annotations

import hashlib

CLIENT_ID_BITS = 53
_DOMAIN = b"mossnode/v1/yrs-client-id\0"


def client_id_for(public_key: bytes) -> int:
    """The Yrs client id of the node with this Ed25519 public key (never 0)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    h = hashlib.sha256(_DOMAIN + public_key).digest()
    return (int.from_bytes(h[:8], "big") & ((1 << CLIENT_ID_BITS) - 1)) or 1
