"""SQLite store: durability across close and kill -9, refusal of corrupted files, restore."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from pycrdt import Array
from test_crdt_support import NOW, SWARM, Sim, forge, ident, policy_for

from mossnode.node.store import (
    KEEP_SNAPSHOTS,
    Decided,
    Store,
    StoreError,
    load_replica,
)
from mossnode.protocols.crdt import Outcome, Replica


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store(db) as store:
        store.commit(
            entries=[("a", 1, b"x1"), ("a", 2, b"x2"), ("b", 1, b"y1")],
            decided=[Decided(1, "member.add", b"p", b"c")],
            meta={"self": b"me"},
            snapshot=(b"snap", {"a": 2, "b": 1}, NOW),
        )
        store.commit(entries=[("a", 2, b"x2")])  # storing again is a no-op
    with Store(db, create=False) as store:
        assert list(store.entries()) == [("a", 1, b"x1"), ("a", 2, b"x2"), ("b", 1, b"y1")]
        assert store.vector() == {"a": 2, "b": 1}
        assert list(store.decided()) == [Decided(1, "member.add", b"p", b"c")]
        assert store.last_decided_seq() == 1
        assert store.get_meta("self") == b"me" and store.get_meta("nope") is None
        snap = store.latest_snapshot()
        assert snap is not None and snap.data == b"snap" and snap.vector == {"a": 2, "b": 1}


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 200])
def test_entries_keep_their_order_and_repeats_are_ignored(tmp_path: Path, count: int) -> None:
    """Entries go in by statements of many rows and a tail of single rows: stored in the
    order given, a repeat (within one commit or of an earlier one) ignored, bytes-like data
    stored as bytes."""
    rows = [(f"a{i % 3}", i // 3 + 1, b"x%d" % i) for i in range(count)]
    with Store(tmp_path / "state.db") as store:
        store.commit(entries=rows[: count // 2])
        again = [(a, s, bytearray(b"other")) for a, s, _ in rows[: count // 3]]
        store.commit(entries=iter([*again, *rows[count // 2 :], *rows[count // 4 :]]))
        assert list(store.entries(batch=7)) == rows
        assert store.entry_count() == count


def test_a_failed_commit_stores_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.append_decided(1, "k", b"p", b"c")
        with pytest.raises(StoreError, match="nothing stored"):
            store.commit(entries=[("a", 1, b"x")], decided=[Decided(1, "k", b"q", b"c")])
        assert list(store.entries()) == []


def test_a_write_in_place_is_declined_while_another_thread_writes(tmp_path: Path) -> None:
    """``wait=False`` (the event loop's in-place write) never blocks on a worker thread's
    write: it declines and stores nothing, and the caller hands the write to a thread."""
    with Store(tmp_path / "s.db") as store:
        inside, release = threading.Event(), threading.Event()

        class Slow(dict[str, bytes]):
            def items(self):  # type: ignore[override]
                inside.set()
                release.wait(10)
                return super().items()

        writer = threading.Thread(target=lambda: store.commit(meta=Slow(k=b"thread")))
        writer.start()
        assert inside.wait(10)
        assert store.commit(meta={"k": b"loop"}, wait=False) is False
        release.set()
        writer.join(10)
        assert store.get_meta("k") == b"thread"
        assert store.commit(meta={"k": b"loop"}, wait=False) is True
        assert store.get_meta("k") == b"loop"


def test_old_snapshots_are_pruned_and_entries_retracted(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        for i in range(KEEP_SNAPSHOTS + 3):
            store.commit(snapshot=(bytes([i]), {}, NOW + i))
        snap = store.latest_snapshot()
        assert snap is not None and snap.data == bytes([KEEP_SNAPSHOTS + 2])
        store.commit(entries=[("a", s, b"e") for s in (1, 2, 3)])
        store.commit(retract={"a": 2})
        assert store.vector() == {"a": 1}


def test_missing_store_is_not_created_when_told(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store here"):
        Store(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    child = textwrap.dedent(
        f"""
        import sys, time
        from mossnode.node.store import Store
        store = Store({str(db)!r})
        store.commit(entries=[("author", s, b"entry-%d" % s) for s in range(1, 51)])
        print("acked", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "acked"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with Store(db) as store:
        assert store.vector() == {"author": 50}
        assert [d for _, _, d in store.entries()][-1] == b"entry-50"


def _filled(tmp_path: Path) -> Path:
    db = tmp_path / "state.db"
    with Store(db) as store:
        store.commit(entries=[("a", s, os.urandom(3000)) for s in range(1, 40)])
    return db


def test_garbage_header_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = _filled(tmp_path)
    data = bytearray(db.read_bytes())
    data[0:16] = b"definitely nope!"
    db.write_bytes(bytes(data))
    before = sha(db)
    with pytest.raises(StoreError, match=str(db)) as err:
        Store(db)
    assert "not an SQLite database" in str(err.value)
    assert sha(db) == before


def test_corrupted_pages_are_refused_and_left_alone(tmp_path: Path) -> None:
    db = _filled(tmp_path)
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[page : 3 * page] = bytes(range(256)) * (2 * page // 256)  # wreck b-tree pages
    db.write_bytes(bytes(data))
    before = sha(db)
    with pytest.raises(StoreError, match=str(db)):
        Store(db)
    assert sha(db) == before


def _refused_after_sql(db: Path, sql: str, match: str) -> None:
    """Run ``sql`` on ``db`` with plain sqlite3; the store must then refuse the file with
    ``match`` in its message and leave it byte for byte as it was."""
    con = sqlite3.connect(db)
    con.execute(sql)
    con.commit()
    con.close()
    before = sha(db)
    with pytest.raises(StoreError, match=match):
        Store(db)
    assert sha(db) == before


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    _refused_after_sql(tmp_path / "other.db", "CREATE TABLE t (x)", "not a mossnode store")


def test_store_of_an_older_document_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Store(db).close()
    _refused_after_sql(db, "PRAGMA user_version=1", "older task document layout")


def test_snapshot_plus_tail_rebuilds_the_same_document(tmp_path: Path) -> None:
    sim = Sim(3, seed=42, drop=0.0, dup=0.0)
    sim.run(80)
    node = sim.reps[0]
    with Store(tmp_path / "s.db") as store:
        store.commit(entries=[(e.author, e.seq, e.data) for e in node.entries()])
        store.commit(snapshot=(node.snapshot(), node.vector(), NOW))
        applied_before = node.entry_count()
        sim.run(60)  # the tail, after the snapshot
        store.commit(entries=[(e.author, e.seq, e.data) for e in node.entries(applied_before)])
        restored = load_replica(store, ident(0), SWARM, sim.policy, NOW)
        assert restored.snapshot_id is not None and restored.snapshot_problem is None
        assert len(restored.outcome.applied) == node.entry_count() - applied_before
        assert restored.replica.digest() == node.digest()
        assert restored.replica.vector() == node.vector()
        # the restored replica goes on writing its own chain where it left off
        _, entry = restored.replica.write(lambda w: w.append_history("after restart"), NOW)
        assert entry is not None and entry.seq == node.vector()[node.me] + 1
        # and can serve anti-entropy for everything, including the fast-path part
        fresh = Replica(ident(9), SWARM, sim.policy)
        for batch in restored.replica.missing_for({}):
            fresh.receive_batch(batch, NOW)
        assert fresh.digest() == restored.replica.digest()


def test_logs_alone_rebuild_and_a_bad_snapshot_falls_back(tmp_path: Path) -> None:
    sim = Sim(2, seed=8, drop=0.0, dup=0.0)
    sim.run(40)
    node = sim.reps[1]
    with Store(tmp_path / "s.db") as store:
        store.commit(entries=[(e.author, e.seq, e.data) for e in node.entries()])
        plain = load_replica(store, ident(1), SWARM, sim.policy, NOW)
        assert plain.snapshot_id is None and plain.replica.digest() == node.digest()
        stale = Sim(2, seed=99, drop=0.0, dup=0.0)  # a snapshot of some other history
        stale.run(5)
        store.commit(snapshot=(stale.reps[1].snapshot(), stale.reps[1].vector(), NOW))
        restored = load_replica(store, ident(1), SWARM, sim.policy, NOW)
        assert restored.snapshot_id is None and restored.snapshot_problem
        assert restored.replica.digest() == node.digest()


def test_exclusions_survive_restore_and_retractions_leave_the_store(tmp_path: Path) -> None:
    ids = [ident(i) for i in range(3)]
    policy = policy_for(ids)
    node = Replica(ids[0], SWARM, policy)
    d = ids[2]
    fork1 = forge(node, d, lambda doc: doc["history"].__setitem__(d.peer_id, Array(["a"])))
    fork2 = forge(node, d, lambda doc: doc["history"].__setitem__(d.peer_id, Array(["b"])))
    with Store(tmp_path / "s.db") as store:

        def persist(out: Outcome) -> None:  # what the daemon does with every Outcome
            store.commit(
                entries=[(e.author, e.seq, e.data) for e in out.applied],
                retract=out.retract_from(),
            )

        persist(node.receive(fork1, NOW))
        assert store.vector() == {d.peer_id: 1}
        out = node.receive(fork2, NOW)
        assert out.equivocations and [e.seq for e in out.retracted] == [1]
        persist(out)
        assert store.vector() == {}
        _, own = node.write(lambda w: w.append_history("mine"), NOW)
        assert own is not None
        store.commit(entries=[(own.author, own.seq, own.data)])
        store.commit(snapshot=(node.snapshot(), node.vector(), NOW))
        restored = load_replica(store, ids[0], SWARM, policy, NOW)
    again = restored.replica
    assert again.digest() == node.digest()
    assert again.blocked_seqs() == {d.peer_id: 1} and d.peer_id in again.evidence
    assert not again.receive(fork1, NOW).applied
    _, nxt = again.write(lambda w: w.append_history("after"), NOW)
    assert nxt is not None and nxt.seq == 2


def test_a_damaged_entry_the_snapshot_covers_is_reported(tmp_path: Path) -> None:
    """Bit rot inside a stored BLOB passes quick_check: each covered entry must chain to the
    one before it, not only the last to the snapshot's head. The snapshot is then not used,
    and the full verification refuses the damaged entry instead of serving it to peers."""
    a, b = ident(0), ident(1)
    rep = Replica(a, SWARM, policy_for([a, b]))
    entries = [rep.create_task(f"t{i}", NOW, title=f"task {i}")[1] for i in range(3)]
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.commit(
            entries=[(e.author, e.seq, e.data) for e in entries if e is not None],
            snapshot=(rep.snapshot(), rep.vector(), NOW),
        )
    db = sqlite3.connect(path)
    data = bytearray(db.execute("SELECT data FROM entries WHERE seq=2").fetchone()[0])
    data[-5] ^= 0x01
    db.execute("UPDATE entries SET data=? WHERE seq=2", (bytes(data),))
    db.commit()
    db.close()
    with Store(path) as store:
        restored = load_replica(store, a, SWARM, policy_for([a, b]), NOW)
    assert restored.snapshot_id is None
    assert restored.snapshot_problem is not None
    assert f"{a.peer_id} seq 2" in restored.snapshot_problem
    assert restored.replica.vector() == {a.peer_id: 1}  # nothing damaged is served
