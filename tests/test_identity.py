import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.peer.id import ID

from mossnode.crypto.identity import Identity, IdentityError, load_identity, save_identity
from mossnode.crypto.peerid import public_key_from_peer_id


def test_peer_id_matches_libp2p() -> None:
    for _ in range(20):
        ident = Identity.generate()
        expected = ID.from_pubkey(Ed25519PublicKey.from_bytes(ident.public_key)).to_base58()
        assert ident.peer_id == expected
        assert ident.peer_id.startswith("12D3KooW")
        assert public_key_from_peer_id(ident.peer_id) == ident.public_key


def test_save_load_roundtrip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "identity.key"
    save_identity(ident, path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_identity(path).seed == ident.seed


def test_passphrase(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "k"
    save_identity(ident, path, b"s3cret")
    assert b"ENCRYPTED" in path.read_bytes()
    assert load_identity(path, b"s3cret").public_key == ident.public_key
    with pytest.raises(IdentityError, match="passphrase"):
        load_identity(path, b"wrong")
    with pytest.raises(IdentityError, match="passphrase"):
        load_identity(path)


def test_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_identity(Identity.generate(), path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        save_identity(Identity.generate(), path)
    assert path.read_bytes() == before


def test_refuses_group_readable(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_identity(Identity.generate(), path)
    os.chmod(path, 0o640)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(path)
    assert path.read_bytes() == before


def test_refuses_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_identity(Identity.generate(), path)
    data = bytearray(path.read_bytes())
    data[40] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(IdentityError, match="corrupted"):
        load_identity(path)
    path.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="corrupted"):
        load_identity(path)


def test_refuses_wrong_key_type(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_identity(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="mossnode init"):
        load_identity(tmp_path / "none")


def test_signatures_verify() -> None:
    import nacl.signing

    ident = Identity.generate()
    sig = ident.sign(b"hello")
    nacl.signing.VerifyKey(ident.public_key).verify(b"hello", sig)
