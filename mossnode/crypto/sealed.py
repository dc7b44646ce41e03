"""Sealed payloads: bytes that only a chosen set of member nodes can read.

A fresh symmetric key encrypts the payload (XSalsa20-Poly1305, NaCl's secretbox). That key is
wrapped for each recipient with an X25519 box between a one-time ephemeral key and the
recipient's X25519 key, which is derived from its Ed25519 identity key (the key behind its peer
id): no second key needs distributing, the decided log already lists every member's key.

Sans-IO and deterministic: the content key, the ephemeral key and both nonces come in as
:class:`Randomness` (the node passes ``os.urandom`` bytes), so the same inputs give the same
sealed bytes. Nonces never repeat under one key: the content key and the ephemeral key are
fresh for every seal, and each recipient's box key differs.

The encrypted plaintext starts with a context label (for example ``task/<id>/input``) that
:func:`open_sealed` checks, so a sealed value copied to another place does not open there.
Sealing gives confidentiality only; who wrote a sealed value is proven by the signed entry
that carries it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing

ALG = "x25519-xsalsa20poly1305/v1"
KEY_LEN = 32
NONCE_LEN = 24
MAC_LEN = 16
WRAPPED_LEN = NONCE_LEN + MAC_LEN + KEY_LEN
MAX_RECIPIENTS = 256
MAX_CONTEXT = 1024
MAX_PEER_ID = 128


class SealedError(Exception):
    """A value cannot be sealed or opened; the message says why (never what it holds)."""


@dataclass(frozen=True, slots=True)
class Randomness:
    """Everything random a seal needs: content key, ephemeral X25519 secret, two nonces."""

    key: bytes
    ephemeral: bytes
    nonce: bytes
    wrap_nonce: bytes

    SIZE = KEY_LEN + KEY_LEN + NONCE_LEN + NONCE_LEN

    def __post_init__(self) -> None:
        sizes = (len(self.key), len(self.ephemeral), len(self.nonce), len(self.wrap_nonce))
        if sizes != (KEY_LEN, KEY_LEN, NONCE_LEN, NONCE_LEN):
            raise SealedError(f"randomness needs 32+32+24+24 bytes, got {sizes}")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Randomness:
        """Split ``SIZE`` random bytes (e.g. ``os.urandom(Randomness.SIZE)``)."""
        if len(raw) != cls.SIZE:
            raise SealedError(f"randomness is {cls.SIZE} bytes, got {len(raw)}")
        a, b, c = KEY_LEN, 2 * KEY_LEN, 2 * KEY_LEN + NONCE_LEN
        return cls(raw[:a], raw[a:b], raw[b:c], raw[c:])


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed payload: ``ciphertext`` (nonce || box), the ephemeral public key, and the
    wrapped content key per recipient peer id (nonce || box of the key)."""

    ciphertext: bytes
    ephemeral_public: bytes
    keys: Mapping[str, bytes]

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def to_raw(self) -> dict[str, Any]:
        """JSON-ready form (base64 strings), as stored in the shared document."""
        return {
            "alg": ALG,
            "epk": _b64(self.ephemeral_public),
            "ct": _b64(self.ciphertext),
            "keys": {p: _b64(k) for p, k in sorted(self.keys.items())},
        }

    @classmethod
    def from_raw(cls, raw: Any) -> Sealed:
        """Parse :meth:`to_raw` output; anything else (hostile input too) is a SealedError."""
        if not isinstance(raw, Mapping) or raw.get("alg") != ALG:
            raise SealedError("not a sealed value")
        if set(raw) != {"alg", "epk", "ct", "keys"}:
            raise SealedError("a sealed value has exactly alg, epk, ct and keys")
        epk = _unb64(raw.get("epk"), "epk")
        ct = _unb64(raw.get("ct"), "ct")
        keys = raw.get("keys")
        if len(epk) != KEY_LEN:
            raise SealedError("epk must be 32 bytes")
        if len(ct) < NONCE_LEN + MAC_LEN:
            raise SealedError("ciphertext too short")
        if not isinstance(keys, Mapping) or not 0 < len(keys) <= MAX_RECIPIENTS:
            raise SealedError(f"keys must map 1-{MAX_RECIPIENTS} peer ids to wrapped keys")
        wrapped: dict[str, bytes] = {}
        for peer, value in keys.items():
            if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID:
                raise SealedError("a recipient must be a peer id")
            w = _unb64(value, "wrapped key")
            if len(w) != WRAPPED_LEN:
                raise SealedError("a wrapped key must be 72 bytes")
            wrapped[peer] = w
        return cls(ct, epk, wrapped)


def recipients_of(raw: Any) -> tuple[str, ...]:
    """The recipients a stored sealed value names, without decoding it (cheap enough to ask
    on every scheduling step); () for anything that is not shaped like one. Opening still
    checks everything."""
    if not isinstance(raw, Mapping) or raw.get("alg") != ALG:
        return ()
    keys = raw.get("keys")
    if not isinstance(keys, Mapping) or not 0 < len(keys) <= MAX_RECIPIENTS:
        return ()
    return tuple(sorted(k for k in keys if isinstance(k, str)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise SealedError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SealedError(f"{name} is not valid base64") from None


def x25519_public(ed25519_public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key (a member's identity key)."""
    try:
        return bytes(nacl.signing.VerifyKey(ed25519_public).to_curve25519_public_key())
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError):
        raise SealedError("not a valid Ed25519 public key") from None


def x25519_private(ed25519_seed: bytes) -> bytes:
    """The X25519 private key of an Ed25519 identity, from its 32-byte seed."""
    if len(ed25519_seed) != KEY_LEN:
        raise SealedError("an Ed25519 seed is 32 bytes")
    return bytes(nacl.signing.SigningKey(ed25519_seed).to_curve25519_private_key())


def _framed(context: str, plaintext: bytes) -> bytes:
    label = context.encode()
    if len(label) > MAX_CONTEXT:
        raise SealedError("context label too long")
    return len(label).to_bytes(2, "big") + label + plaintext


def seal(
    plaintext: bytes, *, context: str, recipients: Mapping[str, bytes], rand: Randomness
) -> Sealed:
    """Seal ``plaintext`` for ``recipients`` (peer id -> Ed25519 public key) under ``context``."""
    if not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise SealedError(f"a sealed value needs 1-{MAX_RECIPIENTS} recipients")
    box = nacl.secret.SecretBox(rand.key)
    ciphertext = bytes(box.encrypt(_framed(context, plaintext), rand.nonce))
    eph = nacl.public.PrivateKey(rand.ephemeral)
    keys: dict[str, bytes] = {}
    for peer in sorted(recipients):
        their = nacl.public.PublicKey(x25519_public(recipients[peer]))
        keys[peer] = bytes(nacl.public.Box(eph, their).encrypt(rand.key, rand.wrap_nonce))
    return Sealed(ciphertext, bytes(eph.public_key), keys)


def open_sealed(sealed: Sealed, *, context: str, peer_id: str, seed: bytes) -> bytes:
    """The plaintext, for recipient ``peer_id`` holding the Ed25519 ``seed``; SealedError if
    this node is no recipient, the value was tampered with, or it was sealed elsewhere."""
    wrapped = sealed.keys.get(peer_id)
    if wrapped is None:
        raise SealedError(f"{peer_id} is not a recipient of this sealed value")
    mine = nacl.public.PrivateKey(x25519_private(seed))
    try:
        box = nacl.public.Box(mine, nacl.public.PublicKey(sealed.ephemeral_public))
        key = bytes(box.decrypt(wrapped))
        framed = bytes(nacl.secret.SecretBox(key).decrypt(sealed.ciphertext))
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError):
        raise SealedError("the sealed value does not open with this node's key") from None
    n = int.from_bytes(framed[:2], "big")
    if len(framed) < 2 + n or framed[2 : 2 + n] != context.encode():
        raise SealedError(f"the sealed value was not sealed for {context}")
    return framed[2 + n :]
