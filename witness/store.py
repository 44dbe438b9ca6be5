"""The witness's durable state: SQLite (stdlib ``sqlite3``), one file.

Tables (schema version 1, ``PRAGMA user_version``):

* ``latest``: per origin the last checkpoint cosigned: its size (decimal TEXT: a tree size
  is an unsigned 64-bit integer, SQLite's INTEGER a signed one), its root, the checkpoint
  as the witness would serve it (the log's note text, the log signatures that verified,
  the witness's cosignature) and the cosignature's time. What the next request is checked
  against.
* ``history``: every checkpoint cosigned (origin, size, root, time of the first
  cosignature), append-only: what ``iort-witness status`` counts, and what shows that no
  size was cosigned with two roots. The same checkpoint cosigned again (tlog-witness
  allows it, and anyone can replay a public checkpoint) moves only ``latest``'s time, so
  replays do not grow the file.
* ``evidence``: signed checkpoints refused as a fork or with a proof that does not verify
  (tlog-witness: the witness MAY log them, "as it might be proof of log misbehavior"): the
  checkpoint's text with the log's verified signature(s) (not what else was appended),
  its size and root, the reason, the time; each once, at most :data:`EVIDENCE_CAP` per
  origin and reason, the first ones kept. A ``fork`` (another
  root for the size cosigned) needs the log's key; a ``bad_proof`` does not (anyone can
  send a public checkpoint with a wrong proof), so the two are capped apart and only
  core.proven_forks decides what proves misbehaviour.

**One transaction per decision** (:meth:`Store.decide`): ``BEGIN IMMEDIATE`` takes the
database's write lock before the stored state is read, the caller decides on that state,
and the new state is written compare-and-swap on the old size and root (``UPDATE ...
WHERE origin = ? AND size = ? AND root = ?``, one row or the transaction is rolled back)
before ``COMMIT``. Two requests from the same old size, in one process or two, are thus
decided one after the other: the second sees the first's size and gets 409 (tlog-witness
spells out the race this prevents). The cosignature is made inside the transaction and
returned only after the commit, so a cosignature never leaves for a state that was not
stored.

**Durability**: WAL journal, ``synchronous=FULL`` (the WAL is fsync'd at each commit), so
an accepted checkpoint survives SIGKILL and power loss once its response is sent. A
witness restored from an older copy of this file would take a fork of what it cosigned
since: docs/witness.md says how to back it up and how not to restore it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

__all__ = ["EVIDENCE_CAP", "Decision", "Evidence", "History", "Latest", "Store", "StoreError"]

SCHEMA_VERSION: Final = 1
EVIDENCE_CAP: Final = 1000
BUSY_TIMEOUT_S: Final = 5.0

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS latest (
        origin TEXT PRIMARY KEY, size TEXT NOT NULL, root BLOB NOT NULL,
        checkpoint TEXT NOT NULL, cosigned_at INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS history (
        origin TEXT NOT NULL, size TEXT NOT NULL, root BLOB NOT NULL,
        cosigned_at INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS history_origin ON history (origin)",
    """CREATE TABLE IF NOT EXISTS evidence (
        origin TEXT NOT NULL, size TEXT NOT NULL, root BLOB NOT NULL, reason TEXT NOT NULL,
        note TEXT NOT NULL, received_at INTEGER NOT NULL)""",
)

T = TypeVar("T")


class StoreError(Exception):
    """The state file cannot be used (not a database, another schema, a lost CAS)."""


@dataclass(frozen=True, slots=True)
class Latest:
    origin: str
    size: int
    root: bytes
    checkpoint: str
    cosigned_at: int


@dataclass(frozen=True, slots=True)
class History:
    size: int
    root: bytes
    cosigned_at: int


@dataclass(frozen=True, slots=True)
class Evidence:
    size: int
    root: bytes
    reason: str
    note: str
    received_at: int


@dataclass(frozen=True, slots=True)
class Decision(Generic[T]):
    """What :meth:`Store.decide`'s callback returns: the answer, and the new state to
    write (with the old one as the CAS guard) or evidence to keep, or neither."""

    answer: T
    write: Latest | None = None
    evidence: Evidence | None = None


def _prepare(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
    """WAL, synchronous=FULL and the schema on a fresh file; the schema version checked."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: SQLite would not use a WAL journal ({mode})")
        conn.execute("PRAGMA synchronous=FULL")
        if version == 0:
            conn.execute("BEGIN IMMEDIATE")
            for ddl in _SCHEMA:
                conn.execute(ddl)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
            version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: witness state of schema version {version}, this iort-witness "
            f"reads version {SCHEMA_VERSION}"
        )


class Store:
    """One connection, used from worker threads one at a time (a lock), every write in
    its own immediate transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Store:
        """Open (or, unless ``readonly``, create) the state file. sqlite3.DatabaseError
        for a file that is not a database; StoreError for another schema version."""
        if readonly:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        try:
            _prepare(conn, path, readonly=readonly)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def pragma(self, name: str) -> object:
        with self._lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    def _latest(self, origin: str) -> Latest | None:
        row = self._conn.execute(
            "SELECT size, root, checkpoint, cosigned_at FROM latest WHERE origin = ?", (origin,)
        ).fetchone()
        return None if row is None else Latest(origin, int(row[0]), row[1], row[2], row[3])

    def latest(self, origin: str) -> Latest | None:
        with self._lock:
            return self._latest(origin)

    def all_latest(self) -> list[Latest]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT origin, size, root, checkpoint, cosigned_at FROM latest ORDER BY origin"
            ).fetchall()
        return [Latest(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]

    def history(self, origin: str) -> list[History]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT size, root, cosigned_at FROM history WHERE origin = ? ORDER BY rowid",
                (origin,),
            ).fetchall()
        return [History(int(r[0]), r[1], r[2]) for r in rows]

    def evidence(self, origin: str) -> list[Evidence]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT size, root, reason, note, received_at FROM evidence WHERE origin = ? "
                "ORDER BY rowid",
                (origin,),
            ).fetchall()
        return [Evidence(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def decide(self, origin: str, decide: Callable[[Latest | None], Decision[T]]) -> T:
        """Read the origin's state, let ``decide`` judge the request on it, and write what
        it decided, all in one immediate transaction (blocking: call from a thread)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = self._latest(origin)
                decision = decide(current)
                if decision.write is not None:
                    self._write(current, decision.write)
                if decision.evidence is not None:
                    self._keep(origin, decision.evidence)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return decision.answer

    def _write(self, current: Latest | None, new: Latest) -> None:
        conn = self._conn
        values = (str(new.size), new.root, new.checkpoint, new.cosigned_at)
        if current is None:
            conn.execute(
                "INSERT INTO latest (origin, size, root, checkpoint, cosigned_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (new.origin, *values),
            )
        else:
            cur = conn.execute(
                "UPDATE latest SET size = ?, root = ?, checkpoint = ?, cosigned_at = ? "
                "WHERE origin = ? AND size = ? AND root = ?",
                (*values, new.origin, str(current.size), current.root),
            )
            if cur.rowcount != 1:
                raise StoreError(f"{new.origin}: the stored state changed under the update")
        if current is None or current.size != new.size:
            # The same checkpoint cosigned again (anyone can replay a public one) only
            # moves ``latest``'s time: the history does not grow with replays.
            conn.execute(
                "INSERT INTO history (origin, size, root, cosigned_at) VALUES (?, ?, ?, ?)",
                (new.origin, str(new.size), new.root, new.cosigned_at),
            )

    def _keep(self, origin: str, ev: Evidence) -> None:
        (count,) = self._conn.execute(
            "SELECT count(*) FROM evidence WHERE origin = ? AND reason = ?", (origin, ev.reason)
        ).fetchone()
        seen = self._conn.execute(
            "SELECT 1 FROM evidence WHERE origin = ? AND note = ?", (origin, ev.note)
        ).fetchone()
        if count < EVIDENCE_CAP and seen is None:
            self._conn.execute(
                "INSERT INTO evidence (origin, size, root, reason, note, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (origin, str(ev.size), ev.root, ev.reason, ev.note, ev.received_at),
            )
