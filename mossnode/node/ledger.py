"""Durable copy of the swarm's genesis and decided log in the state dir.

Membership decisions are rare and small, so the whole log is rewritten atomically (temp file,
fsync, rename, fsync dir) on each append: a crash leaves either the old or the new log, never a
torn one. On load every entry is re-verified by replaying it into a fresh :class:`Membership`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cbor2

from ..crypto.envelope import canonical
from ..protocols.membership import Entry, Membership, MembershipError, parse_genesis

LEDGER_FILE = "swarm.cbor"


class LedgerError(Exception):
    """The ledger file is unreadable or fails verification; it is left untouched."""


def save_ledger(state_dir: Path, state: Membership, extra: dict[str, Any]) -> None:
    path = state_dir / LEDGER_FILE
    tmp = path.with_suffix(".tmp")
    data = canonical(
        {
            "genesis": state.genesis.raw,
            "entries": [e.to_wire() for e in state.entries],
            "extra": extra,
        }
    )
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_ledger(state_dir: Path) -> tuple[Membership, dict[str, Any]] | None:
    path = state_dir / LEDGER_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = cbor2.loads(raw)
        state = Membership(parse_genesis(doc["genesis"]))
        state.replay(Entry.from_wire(e) for e in doc["entries"])
        extra = doc.get("extra", {})
    except MembershipError as exc:
        raise LedgerError(f"{path}: {exc}") from None
    except Exception as exc:
        raise LedgerError(
            f"{path} is corrupted ({type(exc).__name__}); move it away to rejoin"
        ) from None
    return state, extra
