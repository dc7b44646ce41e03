"""A node's Ed25519 identity: generation, signing, and its key file.

The key file is PKCS8 PEM (optionally passphrase-encrypted by ``cryptography``), mode 0600. A file
that others can read, that does not parse, or that holds another key type is refused, never
rewritten: the operator must look at it. The same key signs envelopes and is the libp2p host key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.bindings
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .peerid import peer_id_from_public_key


class IdentityError(Exception):
    """A key file could not be used; the message says why and what to do."""


class Identity:
    """An Ed25519 signing identity built from its 32-byte private seed."""

    __slots__ = ("_sk", "public_key", "seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        pk, sk = nacl.bindings.crypto_sign_seed_keypair(seed)
        self.seed: bytes = seed
        self.public_key: bytes = pk
        self._sk: bytes = sk

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature."""
        return nacl.bindings.crypto_sign(message, self._sk)[:64]

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(self.seed)
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=passphrase or None)
        except TypeError as exc:  # encrypted without passphrase, or passphrase for plain key
            raise IdentityError(f"key file passphrase problem: {exc}") from None
        except ValueError as exc:
            if passphrase and "decrypt" in str(exc).lower():
                raise IdentityError("wrong passphrase for the key file") from None
            raise IdentityError(f"key file is corrupted or not a PEM private key ({exc})") from None
        except Exception as exc:  # cryptography raises several types for junk input
            raise IdentityError(f"key file is corrupted ({type(exc).__name__})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise IdentityError(
                f"key file holds a {type(key).__name__.lstrip('_')}, not an Ed25519 key"
            )
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls(seed)


def save_identity(identity: Identity, path: Path, passphrase: bytes | None = None) -> None:
    """Write a new key file with mode 0600; refuses to replace an existing one."""
    data = identity.to_pem(passphrase)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to overwrite an identity") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)


def load_identity(path: Path, passphrase: bytes | None = None) -> Identity:
    """Read a key file, refusing one that group or others can access."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no identity at {path}; run `mossnode init` first") from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    return Identity.from_pem(path.read_bytes(), passphrase)
