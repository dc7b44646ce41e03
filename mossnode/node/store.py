"""The node's durable state: one SQLite database (WAL) in the state directory.

Holds every author's log of signed ``state.update`` entries (in the order this node applied
them, which is a causal order), snapshots of the replica, the decided log of the consensus layer,
and a key/value table. All writes go through :meth:`Store.commit`, one transaction per call: the
daemon gathers what it must persist (group commit) and acknowledges nothing before the call
returns.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` makes SQLite fsync the WAL on every
commit, so a committed transaction survives kill -9 and also an OS crash or power loss. (NORMAL
would survive kill -9 alone, since the WAL is written before commit returns, but could lose the
last transactions on power loss; the group commit makes FULL's one fsync per batch affordable.)

Integrity: an existing file must look like SQLite and pass ``PRAGMA quick_check`` before
anything writes to it; otherwise :class:`StoreError` names the file and it is left untouched for
the operator. Nothing here deletes or recreates a database.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import trio

from mossnode.crypto.envelope import canonical
from mossnode.crypto.identity import Identity
from mossnode.protocols.crdt.outcome import Limits, Outcome, StateError
from mossnode.protocols.crdt.replica import Replica
from mossnode.protocols.crdt.rules import Policy

APPLICATION_ID = 0x6D6F5353  # "moSS" in the SQLite header: this file is a mossnode store
# 2: the task document layout of protocols/crdt/schema.py (core value, <kind>/<node> keys).
# Entries of layout 1 (core fields and per-node sub-maps) would fail today's owner rules and
# block their authors, so such a store is refused by name instead of replayed.
SCHEMA_VERSION = 2
KEEP_SNAPSHOTS = 2
_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id     INTEGER PRIMARY KEY,          -- apply order
    author TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    data   BLOB    NOT NULL,
    UNIQUE (author, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    vector     BLOB    NOT NULL,         -- canonical CBOR {author: seq}
    data       BLOB    NOT NULL,         -- Replica.snapshot()
    sha256     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS decided (
    seq     INTEGER PRIMARY KEY,
    kind    TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    cert    BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


_INSERT_ENTRY = "INSERT OR IGNORE INTO entries(author, seq, data) VALUES (?, ?, ?)"
_ROWS_PER_INSERT = 64
_INSERT_ENTRIES = "INSERT OR IGNORE INTO entries(author, seq, data) VALUES " + ",".join(
    ["(?, ?, ?)"] * _ROWS_PER_INSERT
)


def _insert_entries(db: sqlite3.Connection, entries: Iterable[tuple[str, int, bytes]]) -> None:
    """Entries in order, each ignored if stored already: by whole statements of
    ``_ROWS_PER_INSERT`` rows (one cached statement), the rest one row at a time. A statement
    of many rows costs SQLite and the binding about a quarter less per row than one per row."""
    rows = [(a, s, bytes(d)) for a, s, d in entries]
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    for i in range(0, whole, _ROWS_PER_INSERT):
        db.execute(_INSERT_ENTRIES, [v for row in rows[i : i + _ROWS_PER_INSERT] for v in row])
    if whole < len(rows):
        db.executemany(_INSERT_ENTRY, rows[whole:])


class StoreError(Exception):
    """The database cannot be used as it is; the message names the file and the cause."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    created_ms: int
    vector: dict[str, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class Decided:
    seq: int
    kind: str
    payload: bytes
    cert: bytes


class Store:
    """One node's SQLite store. Thread-safe by a lock; meant for one daemon process."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._check_file(create)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as exc:
            raise StoreError(self.path, f"cannot open: {exc}") from None
        try:
            self._open()
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(self.path, f"database is corrupted or unreadable: {exc}") from None

    def _check_file(self, create: bool) -> None:
        try:
            with self.path.open("rb") as f:
                head = f.read(len(_HEADER))
        except FileNotFoundError:
            if not create:
                raise StoreError(self.path, "no store here") from None
            return
        except OSError as exc:
            raise StoreError(self.path, f"cannot read: {exc}") from None
        if head and head != _HEADER:
            raise StoreError(self.path, "not an SQLite database (bad header); left untouched")

    def _open(self) -> None:
        db = self._db
        rows = db.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            detail = "; ".join(str(r[0]) for r in rows[:3])
            raise StoreError(self.path, f"integrity check failed ({detail}); left untouched")
        app = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app not in (0, APPLICATION_ID) or (app == 0 and tables):
            raise StoreError(self.path, "an SQLite database, but not a mossnode store")
        if version > SCHEMA_VERSION:
            raise StoreError(self.path, f"schema version {version} is newer than this mossnode")
        if app == APPLICATION_ID and version < SCHEMA_VERSION:
            raise StoreError(
                self.path,
                f"schema version {version} holds an older task document layout, which this "
                f"mossnode (version {SCHEMA_VERSION}) cannot replay; left untouched (move it "
                "away and join the swarm again)",
            )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(self.path, f"cannot enable WAL (journal mode {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        if app == 0:
            db.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"read failed: {exc}") from None

    # -- the one write path ----------------------------------------------------------------

    def commit(
        self,
        *,
        entries: Iterable[tuple[str, int, bytes]] = (),
        decided: Iterable[Decided] = (),
        meta: Mapping[str, bytes] | None = None,
        snapshot: tuple[bytes, Mapping[str, int], int] | None = None,
        retract: Mapping[str, int] | None = None,
        wait: bool = True,
    ) -> bool:
        """Persist everything given in one transaction (one fsync). When it returns, it is on
        disk: only then acknowledge or relay.

        ``entries``: (author, seq, signed bytes), in apply order; re-storing one is a no-op.
        ``snapshot``: (Replica.snapshot(), its vector, created_ms); the oldest beyond
        ``KEEP_SNAPSHOTS`` are pruned. ``retract``: {author: first seq to drop} after a rebuild.

        With ``wait=False`` it writes only if no other thread is writing, and returns whether
        it did: an event loop writes small batches in place, since handing one to a worker
        thread costs more CPU (about 0.4 ms, measured) than the fsync itself.
        """
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                for author, first in (retract or {}).items():
                    db.execute("DELETE FROM entries WHERE author=? AND seq>=?", (author, first))
                _insert_entries(db, entries)
                db.executemany(
                    "INSERT INTO decided(seq, kind, payload, cert) VALUES (?, ?, ?, ?)",
                    ((d.seq, d.kind, d.payload, d.cert) for d in decided),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (meta or {}).items(),
                )
                if snapshot is not None:
                    data, vector, created_ms = snapshot
                    db.execute(
                        "INSERT INTO snapshots(created_ms, vector, data, sha256) VALUES (?,?,?,?)",
                        (created_ms, canonical(dict(vector)), data, hashlib.sha256(data).digest()),
                    )
                    db.execute(
                        "DELETE FROM snapshots WHERE id NOT IN "
                        "(SELECT id FROM snapshots ORDER BY id DESC LIMIT ?)",
                        (KEEP_SNAPSHOTS,),
                    )
                db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                db.execute("ROLLBACK")
                raise StoreError(self.path, f"write refused, nothing stored: {exc}") from None
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(self.path, f"write failed, nothing stored: {exc}") from None
        finally:
            self._lock.release()
        return True

    def append_entries(self, entries: Iterable[tuple[str, int, bytes]]) -> None:
        self.commit(entries=entries)

    # -- author logs -----------------------------------------------------------------------

    def entries(self, batch: int = 1000) -> Iterator[tuple[str, int, bytes]]:
        """Every stored entry, in the order it was applied."""
        last = 0
        while True:
            rows = self._query(
                "SELECT id, author, seq, data FROM entries WHERE id>? ORDER BY id LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            for row_id, author, seq, data in rows:
                last = row_id
                yield author, seq, bytes(data)

    def vector(self) -> dict[str, int]:
        rows = self._query("SELECT author, max(seq) FROM entries GROUP BY author")
        return {a: s for a, s in rows}

    def entry_count(self) -> int:
        return int(self._query("SELECT count(*) FROM entries")[0][0])

    # -- snapshots -------------------------------------------------------------------------

    def latest_snapshot(self) -> Snapshot | None:
        rows = self._query(
            "SELECT id, created_ms, vector, data, sha256 FROM snapshots ORDER BY id DESC LIMIT 1"
        )
        if not rows:
            return None
        sid, created_ms, vector, data, digest = rows[0]
        if hashlib.sha256(data).digest() != digest:
            raise StoreError(self.path, f"snapshot {sid} does not match its checksum")
        return Snapshot(sid, created_ms, dict(cbor2.loads(vector)), bytes(data))

    # -- decided log and metadata (for the consensus layer) --------------------------------

    def append_decided(self, seq: int, kind: str, payload: bytes, cert: bytes) -> None:
        self.commit(decided=[Decided(seq, kind, payload, cert)])

    def decided(self, from_seq: int = 1) -> Iterator[Decided]:
        for seq, kind, payload, cert in self._query(
            "SELECT seq, kind, payload, cert FROM decided WHERE seq>=? ORDER BY seq", (from_seq,)
        ):
            yield Decided(seq, kind, bytes(payload), bytes(cert))

    def last_decided_seq(self) -> int:
        return int(self._query("SELECT coalesce(max(seq), 0) FROM decided")[0][0])

    def get_meta(self, key: str) -> bytes | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: bytes) -> None:
        self.commit(meta={key: value})


@dataclass(frozen=True, slots=True)
class Restored:
    replica: Replica
    outcome: Outcome  # from verifying the log tail; refusals here mean a policy changed
    snapshot_id: int | None  # None: rebuilt from the logs alone
    snapshot_problem: str | None  # why the latest snapshot was not used, if it was not


def load_replica(
    store: Store,
    identity: Identity,
    swarm_id: bytes,
    policy: Policy,
    now_ms: int,
    *,
    limits: Limits | None = None,
) -> Restored:
    """Start-up: the latest snapshot plus the log tail (fully verified); or, if the snapshot
    does not fit the logs, the whole log verified from scratch (the logs are authoritative)."""
    snap = store.latest_snapshot()
    problem: str | None = None
    if snap is not None:
        try:
            replica, out = Replica.restore(
                identity,
                swarm_id,
                policy,
                snapshot=snap.data,
                entries=store.entries(),
                now_ms=now_ms,
                limits=limits,
            )
            return Restored(replica, out, snap.id, None)
        except StateError as exc:
            problem = str(exc)
    replica, out = Replica.restore(
        identity,
        swarm_id,
        policy,
        snapshot=None,
        entries=store.entries(),
        now_ms=now_ms,
        limits=limits,
    )
    return Restored(replica, out, None, problem)


async def commit_from_loop(store: Store, *, in_place: bool = True, **parts: Any) -> None:
    """:meth:`Store.commit` called from the event loop: in place (``wait=False``) when
    ``in_place`` and no thread is writing, since handing a small write to a worker thread
    costs more than its fsync; otherwise in a worker thread, so the loop runs meanwhile."""
    if not (in_place and store.commit(wait=False, **parts)):
        await trio.to_thread.run_sync(partial(store.commit, **parts))
