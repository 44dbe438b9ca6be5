"""The ingest's store: SQLite in WAL mode, one file, one writer (this process).

Why SQLite and its limit: a central ingest of a hospital group writes from one process
and is read by reports and by people with ``sqlite3``; SQLite needs no server to run,
back up (``.backup``) or hand to an auditor. WAL lets ``iort-ingest report`` read while
the service writes; rows go in batches (one transaction per flush, ``flush_s``): about
10 µs a row on the project's VM (a batch of 20,000 telemetry rows, machine loaded), some
100,000 rows a second against the ~2,000 of 100 rooms at 10 Hz; the ingest's MQTT side
and checks cost more (docs/development.md, "Fabric load"). The limits are one writer per
file (a second ``iort-ingest run`` on it is refused by the lock), one host (no network
filesystem: SQLite's locking is not safe there) and the disk: about 600 B a message, so
100 rooms at 10 Hz fill ~100 GB a day; keep a retention (export, then delete old rows)
or move to PostgreSQL when several consumers or hosts must write, which the schema
below carries over as it is. ``synchronous=NORMAL``: a power cut can lose the last
transactions (never corrupt the file); what is lost is then a gap like any other, which
the service asks the rooms to repair (their outboxes hold it for
``[mqtt] replay_retention_s``).

``seq`` is a 64-bit unsigned counter and SQLite's INTEGER is signed: every seq is stored
as ``seq - 2**63`` (order kept), read back with :func:`unq`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Message", "Skip", "Store", "StoreError", "q", "unq"]

OFFSET = 2**63
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    site TEXT NOT NULL, room TEXT NOT NULL, topic TEXT NOT NULL,
    session INTEGER NOT NULL, seq INTEGER NOT NULL,
    ts TEXT NOT NULL, historical INTEGER NOT NULL, repaired INTEGER NOT NULL,
    received_at REAL NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (site, room, topic, session, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS skips (
    site TEXT NOT NULL, room TEXT NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL,
    topic TEXT NOT NULL, of_session INTEGER NOT NULL, first INTEGER NOT NULL,
    last INTEGER NOT NULL, reason TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (site, room, session, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    site TEXT NOT NULL, room TEXT NOT NULL, topic TEXT NOT NULL, session INTEGER NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, nonce TEXT NOT NULL, asked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS repairs (
    site TEXT NOT NULL, room TEXT NOT NULL, topic TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, noticed_at REAL NOT NULL,
    closed_at REAL NOT NULL, attempts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    site TEXT NOT NULL, room TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (site, room, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status (
    site TEXT NOT NULL, room TEXT NOT NULL, session INTEGER NOT NULL, online INTEGER NOT NULL,
    payload BLOB NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (site, room)
) WITHOUT ROWID;
"""


def q(seq: int) -> int:
    return seq - OFFSET


def unq(stored: int) -> int:
    return stored + OFFSET


class StoreError(Exception):
    """The database cannot be used (names the file and what to do)."""


@dataclass(frozen=True, slots=True)
class Message:
    site: str
    room: str
    topic: str
    session: int
    seq: int
    ts: str
    historical: bool
    repaired: bool
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class Skip:
    site: str
    room: str
    session: int  # the skip message's own
    seq: int
    topic: str
    of_session: int
    first: int
    last: int
    reason: str
    received_at: float


class Store:
    """Open with :meth:`open`; every method blocks (call it from a worker thread)."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int) -> None:
        self.path, self._db, self._lock_fd = path, db, lock_fd

    @classmethod
    def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise StoreError(
                f"{path}: another iort-ingest is writing to it (lock {path}.lock held); "
                "stop it or use another database"
            ) from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise StoreError(f"{path}: not a usable SQLite database: {exc}") from None
        os.chmod(path, 0o600)
        return cls(path, db, lock_fd)

    @classmethod
    def read_only(cls, path: Path) -> sqlite3.Connection:
        """For reports: no lock, the service may be writing (WAL)."""
        if not path.is_file():
            raise StoreError(f"{path}: no such database; give the file iort-ingest run writes")
        try:
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock_fd)

    def write(
        self,
        messages: Iterable[Message],
        skips: Iterable[Skip],
        counters: dict[tuple[str, str, str], int],
        requests: Iterable[tuple[str, str, str, int, int, int, str, float]],
        repairs: Iterable[tuple[str, str, str, int, int, float, float, int]],
        status: Iterable[tuple[str, str, int, bool, bytes, float]],
    ) -> None:
        """One transaction: rows added (a repeated message or skip is ignored), counters
        increased by ``counters``, status replaced."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    (m.site, m.room, m.topic, m.session, q(m.seq), m.ts, int(m.historical),
                     int(m.repaired), m.received_at, m.payload)
                    for m in messages
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT OR IGNORE INTO skips VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    (s.site, s.room, s.session, q(s.seq), s.topic, s.of_session, q(s.first),
                     q(s.last), s.reason, s.received_at)
                    for s in skips
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO counters VALUES (?,?,?,?) ON CONFLICT (site, room, name) "
                "DO UPDATE SET value = value + excluded.value",
                ((site, room, name, n) for (site, room, name), n in counters.items()),
            )
            db.executemany(
                "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?)",
                ((a, b, c, d, q(e), q(f), g, h) for a, b, c, d, e, f, g, h in requests),
            )
            db.executemany(
                "INSERT INTO repairs VALUES (?,?,?,?,?,?,?,?)",
                ((a, b, c, q(d), q(e), f, g, h) for a, b, c, d, e, f, g, h in repairs),
            )
            db.executemany(
                "INSERT INTO status VALUES (?,?,?,?,?,?) ON CONFLICT (site, room) DO UPDATE "
                "SET session = excluded.session, online = excluded.online, "
                "payload = excluded.payload, received_at = excluded.received_at "
                "WHERE excluded.session >= status.session",
                ((a, b, c, int(d), e, f) for a, b, c, d, e, f in status),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def seqs(self) -> Iterator[tuple[str, str, str, int, int]]:
        """(site, room, topic, session, seq) of every message stored, by seq per stream."""
        for site, room, topic, session, seq in self._db.execute(
            "SELECT site, room, topic, session, seq FROM messages ORDER BY site, room, topic, seq"
        ):
            yield site, room, topic, session, unq(seq)

    def declared(self) -> Iterator[tuple[str, str, str, int, int]]:
        """(site, room, topic, first, last) of every skip declaration stored."""
        for site, room, topic, first, last in self._db.execute(
            "SELECT site, room, topic, first, last FROM skips"
        ):
            yield site, room, topic, unq(first), unq(last)
