"""The swarm's genesis and known peer addresses, in the state dir (``swarm.cbor``).

The decided log itself lives in the store's ``decided`` table, written by the consensus service
in the same transaction as its PBFT records; every entry carries a quorum certificate that is
verified again at start-up (:func:`mossnode.node.consensus.load_membership`). This file only
says which swarm the node belongs to (the founder-signed genesis record) and where its members
were last heard, so that a restarted node can dial them.

The file is small and rewritten atomically (temp file, fsync, rename, fsync dir): a crash leaves
either the old or the new version, never a torn one.

Ledgers written before the log was consensus-backed also hold ``entries`` certified by the
founder alone. They are not read any more (that authority is gone); :attr:`Ledger.legacy_entries`
counts them so the daemon can refuse a store that has no consensus-backed log to replace them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from ..crypto.envelope import canonical
from ..protocols.membership import Genesis, MembershipError, parse_genesis

LEDGER_FILE = "swarm.cbor"
FOUNDED_BEFORE_CONSENSUS = (
    "this swarm was founded before consensus: its decided log ({n} entries, certified by the "
    "founder alone) is no longer accepted; re-found the swarm (`mossnode init --new-swarm` in a "
    "fresh state dir) and invite the members again"
)


class LedgerError(Exception):
    """The ledger file is unreadable or fails verification; it is left untouched."""


@dataclass
class Ledger:
    genesis: Genesis
    extra: dict[str, Any] = field(default_factory=dict)
    # entries of a pre-consensus (founder-authority) ledger: ignored, only counted
    legacy_entries: int = 0

    @property
    def swarm_id(self) -> bytes:
        return self.genesis.swarm_id


def save_ledger(state_dir: Path, genesis: Genesis, extra: dict[str, Any]) -> None:
    path = state_dir / LEDGER_FILE
    tmp = path.with_suffix(".tmp")
    data = canonical({"genesis": genesis.raw, "extra": extra})
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


def load_ledger(state_dir: Path) -> Ledger | None:
    path = state_dir / LEDGER_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = cbor2.loads(raw)
        genesis = parse_genesis(doc["genesis"])
        extra = doc.get("extra", {})
        legacy = doc.get("entries", [])
        if not isinstance(extra, dict) or not isinstance(legacy, list):
            raise TypeError
    except MembershipError as exc:
        raise LedgerError(f"{path}: {exc}") from None
    except Exception as exc:
        raise LedgerError(
            f"{path} is corrupted ({type(exc).__name__}); move it away to rejoin"
        ) from None
    return Ledger(genesis, extra, len(legacy))
