"""libp2p PeerIDs for Ed25519 keys, computed without libp2p so the pure core stays import-light.

A PeerID for an Ed25519 key is the base58btc of an identity multihash over the protobuf-encoded
libp2p PublicKey message ``{Type: Ed25519 (1), Data: <32 bytes>}``.
"""

from __future__ import annotations

import functools

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
# protobuf: field 1 (varint) = 1 (Ed25519), field 2 (bytes, len 32)
_PB_PREFIX = b"\x08\x01\x12\x20"
# multihash: code 0x00 (identity), length 0x24 (36 = 4 + 32)
_MH_PREFIX = b"\x00\x24"


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _INDEX[c]
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p PeerID string (``12D3KooW...``) of a raw 32-byte Ed25519 public key.

    Memoized (with the inverse below): status views and authorization ask for the same few
    members' ids constantly, and base58 is quadratic big-integer work."""
    return _peer_id(bytes(public_key))


@functools.lru_cache(maxsize=65536)
def _peer_id(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return b58encode(_MH_PREFIX + _PB_PREFIX + public_key)


@functools.lru_cache(maxsize=65536)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; raises ValueError for non-Ed25519 ids."""
    raw = b58decode(peer_id)
    if len(raw) != 38 or not raw.startswith(_MH_PREFIX + _PB_PREFIX):
        raise ValueError(f"not an Ed25519 libp2p peer id: {peer_id!r}")
    return raw[6:]
