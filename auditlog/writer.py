"""The audit-log writer: append, group commit, rotation, crash recovery, checkpoints.

Layout of a log directory (docs/audit-log.md):

    log-<first seq, 16 digits>-<UTC date YYYYMMDD>.jsonl   segments, in chain order
    checkpoint                                            the latest signed checkpoint
    seal                                                  the latest seal (see below)
    quarantine/                                           bytes set aside by recovery

Durability: ``append(..., durable=True)`` (events) resolves ``entry.committed`` only after
the bytes are fsync'd; samples (``durable=False``) are written and fsync'd together within
the group-commit window. Writes and fsyncs run in a worker thread, never on the event loop.
A failing disk never drops an entry: the batch stays pending, the file is cut back to its
last committed size (no torn line in the middle), an alarm callback fires, and the writer
retries with capped backoff until it succeeds.

The seal: after every group commit (after its fsync) the writer signs (size, head hash) in
the checkpoint note format and replaces ``seal`` with it atomically. It is never published
nor recorded as an entry: it only says how far this daemon vouches for the log on disk.
After a crash, entries beyond the last seal (or, if the seal is missing or does not verify
with this daemon's key, beyond the last valid checkpoint) were not vouched for by any
signature: anyone with write access could have written them. Recovery reports them as
*unvouched* (count and seq range), takes the delivery left open and its last sample from
vouched entries only, and refuses to start on a log that is behind its own seal or
checkpoint file (a restored backup, a truncation) unless told to accept the rollback.

A stop while the disk is full or read-only does not drop what is pending: after one more
try, the entries are written to a spill file outside the log directory (``spill_dir``,
named by a hash of the origin). The next open appends them to the log if they continue
its chain exactly (they are then unvouched: never sealed), or keeps the file in
quarantine; either way the recovery report says how many, which seqs, and where.

A failing seal or checkpoint-file write is a failing log write: an alarm, and a retry with
the same backoff; it never ends the writer. Before each write the segment's open file is
compared with the path (device, inode, link count): a deleted or replaced segment or log
directory is a failing write, alarmed at once, not entries written to an unlinked file.

Whoever can write the log directory can plant files in it. The writer reads and writes
only regular files there and never follows a link: a segment or ``LOCK`` that is a FIFO, a
device or a link refuses the start (LogUnusable, naming the file); ``quarantine/`` must be
a real directory and its files are always created anew (O_EXCL|O_NOFOLLOW); a new segment
that cannot be opened that way is a failing write; seal.tmp / checkpoint.tmp are removed
and created anew (kernel/durable.py). A spill file is removed only after its entries are
in the log, so a crash during the restore loses none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
import structlog
from orjson import dumps

from iortd.auditlog.canonical import (
    ZERO_HASH,
    CanonicalError,
    Envelope,
    canonical,
    check_json_value,
    open_line,
    seal_parts,
)
from iortd.auditlog.note import Checkpoint, NoteError, Signer, Verifier
from iortd.auditlog.segments import SegmentError, open_segment
from iortd.kernel.backoff import Backoff
from iortd.kernel.durable import fsync_dir, write_all, write_atomic
from iortd.kernel.timefmt import epoch_ns, utc_ts

__all__ = [
    "FORMAT",
    "AuditLog",
    "AuditLogClosed",
    "Entry",
    "LogDamaged",
    "LogInUse",
    "LogRolledBack",
    "RecoveryReport",
    "segment_paths",
]

FORMAT = "iortd-audit-log/1"
SEGMENT_RE = re.compile(r"^log-(\d{16})-(\d{8})\.jsonl$")
CLOCK_STEP_LIMIT_NS = 1_000_000_000
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0

log = structlog.get_logger("iortd.audit")


class AuditLogClosed(RuntimeError):
    pass


class LogDamaged(RuntimeError):
    """The log is damaged in a way a crash cannot explain; the daemon will not write to it."""


class LogUnusable(LogDamaged):
    """A file in the log directory that the daemon must not read or follow: not a regular
    file (a FIFO, a device, a directory) or a symbolic link, under a segment's name or as
    ``LOCK``. Someone else changed the directory; the daemon does not start on it."""


class LogInUse(RuntimeError):
    """Another process holds the log directory."""


class LogRolledBack(RuntimeError):
    """The log is behind this daemon's own seal or checkpoint file: a restored backup, a
    truncation, or a replaced log. Starting on it would sign a fork."""


SEAL_FILE = "seal"
CHECKPOINT_FILE = "checkpoint"
ANCHOR_MAX_BYTES = 64 * 1024  # a seal or checkpoint note is a few hundred bytes
# Deliveries started in an unvouched tail that a start closes: a crash leaves at most one
# or two (one commit window); a forger's thousands must not make the start write for
# minutes (the newest are closed; the rest stay open, marked unvouched by every command).
UNVOUCHED_CLOSED_MAX = 16
DEFAULT_SPILL_DIR = Path(tempfile.gettempdir()) / "iortd-spill"


def spill_path(spill_dir: Path, origin: str) -> Path:
    """Where a stop that could not write its last entries leaves them for this log."""
    return spill_dir / f"spill-{hashlib.sha256(origin.encode()).hexdigest()[:16]}.jsonl"


def _private_dir(path: Path) -> None:
    """The spill directory lives in a shared place (the temporary directory): it must be
    a real directory of ours that nobody else can write, or a planted symlink could make
    the daemon write elsewhere, and a planted file be taken for a spill."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(
            errno.EPERM, f"{path}: not a private directory of this user (mode 0700): not used"
        )


class _PartialWrite(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(str(error))
        self.written = written
        self.error = error


def segment_paths(directory: Path) -> list[Path]:
    """Segments in chain order (their names start with the first entry's seq)."""
    found = [p for p in directory.iterdir() if SEGMENT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


class Entry(NamedTuple):
    """An appended entry; ``committed`` resolves once it is fsync'd."""

    seq: int
    hash: str
    type: str
    ts: str
    committed: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening the log found."""

    created: bool
    origin: str
    previous_stop: Literal["none", "clean", "crash"]
    last_seq: int
    last_hash: str
    last_ts: str | None
    tail_bytes: int = 0
    tail_kept_at: str | None = None
    segments_set_aside: tuple[str, ...] = ()
    open_delivery_id: str | None = None
    open_delivery_last_sample: Mapping[str, Any] | None = None
    # Entries 0 .. vouched_count-1 are covered by a seal or checkpoint that verifies with
    # this daemon's key; None without a key (an unsigned log vouches for nothing).
    vouched_count: int | None = None
    vouched_by: str = "none"  # "seal", "checkpoint file", "checkpoint entry", "none"
    anchor_problems: tuple[str, ...] = ()  # seal/checkpoint files that were not usable
    rollback: Mapping[str, Any] | None = None  # set when a rollback was accepted
    # Entries a stop could not write, found in the spill file: count, first_seq,
    # last_seq, restored (appended to the log, unvouched) and kept_at (quarantine copy).
    spilled: Mapping[str, Any] | None = None

    @property
    def unvouched(self) -> tuple[int, int] | None:
        """(first seq, last seq) of the entries no signature vouches for, if any."""
        if self.vouched_count is None or self.vouched_count > self.last_seq:
            return None
        return self.vouched_count, self.last_seq

    @property
    def unvouched_count(self) -> int:
        u = self.unvouched
        return 0 if u is None else u[1] - u[0] + 1

    open_delivery_started: Mapping[str, Any] | None = None  # its delivery_started data
    # The ts of the last vouched entry when some are unvouched: what the daemon saw for
    # certain ends there, so a monitoring gap after a crash starts there.
    last_vouched_ts: str | None = None
    # When a later run took the open delivery over and never heard the console: the start
    # of the gap it recorded (from vouched entries), earlier than any of its own entries.
    open_delivery_unwatched_since: str | None = None
    # Deliveries started in the unvouched range and not ended there: nothing vouched names
    # them, so they cannot be taken over; the start closes them (UNKNOWN, no dose taken).
    unvouched_open_deliveries: tuple[str, ...] = ()


class _Pending(NamedTuple):
    seq: int
    date: str  # YYYYMMDD of the entry's ts: which day's segment it belongs to
    line: bytes
    future: asyncio.Future[None]
    durable: bool
    hash: str


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int
    size: int
    date: str


@dataclass(slots=True)
class _Scan:
    intact: int  # bytes of whole, valid entries from the start
    entries: int
    last_hash: str
    last_seq: int
    last_ts: str | None
    last_type: str | None
    error: str | None = None


def _scan(data: bytes, prev_hash: str | None, prev_seq: int | None) -> _Scan:
    """Longest prefix of whole, valid, chained entries."""
    pos = 0
    scan = _Scan(0, 0, prev_hash or ZERO_HASH, -1 if prev_seq is None else prev_seq, None, None)
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            scan.error = "incomplete last line"
            break
        try:
            env = open_line(data[pos:nl])
        except ValueError as exc:
            scan.error = f"unreadable entry: {exc}"
            break
        if env.hash != env.computed:
            scan.error = "hash mismatch"
            break
        first = scan.entries == 0
        if not (first and prev_hash is None) and env.prev != scan.last_hash:
            scan.error = "prev does not link to the previous entry"
            break
        if not (first and prev_seq is None) and env.seq != scan.last_seq + 1:
            scan.error = f"seq {env.seq} does not follow {scan.last_seq}"
            break
        scan.entries += 1
        scan.last_hash, scan.last_seq = env.hash, env.seq
        scan.last_ts = env.ts
        if env.type != "checkpoint":  # a shutdown signs after daemon_stop
            scan.last_type = env.type
        pos = nl + 1
        scan.intact = pos
    return scan


class AuditLog:
    """One writer per log directory. Build with :meth:`open`; run :meth:`run` as a task."""

    def __init__(
        self,
        directory: Path,
        *,
        origin: str,
        head_seq: int,
        head_hash: str,
        segment: _Segment | None,
        group_commit_s: float,
        rotate_max_bytes: int,
        signer: Signer | None,
        on_failure: Callable[[OSError], None] | None,
        on_recovered: Callable[[float], None] | None,
        wall_ns: Callable[[], int],
        mono: Callable[[], int],
    ) -> None:
        self.directory = directory
        self.origin = origin
        self._seq = head_seq
        self._hash = head_hash
        self._hash_b = head_hash.encode()
        self._segment = segment
        self._window = group_commit_s
        self._max = rotate_max_bytes
        self.signer = signer
        # Set by the owner (the daemon) to raise the alarm on every channel it has.
        self.on_failure = on_failure
        self.on_recovered = on_recovered
        self._wall_ns = wall_ns
        self._ts_second = -1  # the formatted second is cached: most appends share it
        self._ts_prefix = ""
        self._ts_date = ""
        self._json_cache: dict[tuple[str, bytes], bytes] = {}
        self._mono = mono
        self._pending: list[_Pending] = []
        self._batch_future: asyncio.Future[None] | None = None
        self._lock_fd: int | None = None
        self._checkpointing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._urgent = False
        self._closing = False
        self._closed = False
        self._done = asyncio.Event()
        self._running = False
        self._oldest_pending = 0.0
        self._clock_base = (mono(), wall_ns())
        self.committed_seq = head_seq
        self._committed_hash = head_hash
        self.spill_dir: Path | None = None  # where close() keeps what it cannot write
        # Never at open: the recovered head may hold unvouched entries, and the first
        # seal must come after the owner has recorded them (the first commit).
        self._seal_due = False
        self._cp_note: str | None = None  # a checkpoint note still to write to its file
        self._cp_file_lock = threading.Lock()
        self.failing_since: float | None = None

    # ---- opening and recovery --------------------------------------------------------

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        origin: str,
        group_commit_s: float = 0.05,
        rotate_max_bytes: int = 64 * 1024 * 1024,
        signer: Signer | None = None,
        on_failure: Callable[[OSError], None] | None = None,
        on_recovered: Callable[[float], None] | None = None,
        wall: Callable[[], datetime] | None = None,
        mono: Callable[[], int] | None = None,
        accept_rollback: bool = False,
        spill_dir: Path | None = None,
    ) -> tuple[AuditLog, RecoveryReport]:
        """Open (or create) the log in ``directory`` and recover it after a crash.

        ``origin`` is used only when the log is created; an existing log keeps its own.
        Raises LogRolledBack when the log is behind the directory's own seal or checkpoint
        file, unless ``accept_rollback`` (the report then says what was accepted).
        """
        mono = mono or time.monotonic_ns
        wall_ns = time.time_ns if wall is None else (lambda: epoch_ns(wall()))
        lock_fd = await asyncio.to_thread(_lock, directory)
        verifier = None if signer is None else signer.verifier
        try:
            segment, report = await asyncio.to_thread(
                _recover, directory, origin, verifier, accept_rollback, spill_dir
            )
        except BaseException:
            os.close(lock_fd)
            raise
        self = cls(
            directory,
            origin=report.origin,
            head_seq=report.last_seq,
            head_hash=report.last_hash,
            segment=segment,
            group_commit_s=group_commit_s,
            rotate_max_bytes=rotate_max_bytes,
            signer=signer,
            on_failure=on_failure,
            on_recovered=on_recovered,
            wall_ns=wall_ns,
            mono=mono,
        )
        self._lock_fd = lock_fd
        self.spill_dir = spill_dir
        if report.created:
            self.append(
                "log_created",
                {"origin": report.origin, "format": FORMAT},
                durable=True,
            )
        return self, report

    # ---- appending -------------------------------------------------------------------

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last appended entry (durable or about to be)."""
        return self._seq, self._hash

    def append(
        self,
        type: str,
        data: Mapping[str, Any],
        *,
        delivery_id: str | None = None,
        durable: bool = False,
    ) -> Entry:
        """Add an entry to the chain now; ``entry.committed`` resolves once it is on disk.

        Raises CanonicalError for data that cannot be written faithfully (nothing is
        appended then) and AuditLogClosed after close.
        """
        if self._closing:
            raise AuditLogClosed("audit log is closing")
        now_mono, now_wall = self._mono(), self._wall_ns()
        mono0, wall0 = self._clock_base  # inline fast path of _check_clock
        if abs((now_wall - wall0) - (now_mono - mono0)) > CLOCK_STEP_LIMIT_NS:
            self._check_clock(now_mono, now_wall)
        return self._append(type, data, delivery_id, durable, now_mono, now_wall)

    def _append(
        self,
        type: str,
        data: Mapping[str, Any],
        delivery_id: str | None,
        durable: bool,
        now_mono: int,
        now_wall: int,
    ) -> Entry:
        second, micro = divmod(now_wall // 1000, 1_000_000)
        if second != self._ts_second:
            self._ts(now_wall)  # a new second: refresh the cached prefix and date
        ts = f"{self._ts_prefix}.{micro:06d}Z"
        date = self._ts_date
        try:
            data_json = canonical(data)  # refuses non-JSON types (CanonicalError)
            did = b"" if delivery_id is None else self._json_key(delivery_id, b',"delivery_id":')
            # The envelope is laid out by hand in sorted-key order; the result is exactly
            # canonical(entry) (a test holds it to that), without a second serialisation.
            tail = b',"mono_ns":%d,"prev":"%s","seq":%d,"ts":"%s","type":%s}' % (
                now_mono,
                self._hash_b,
                self._seq + 1,
                ts.encode(),
                self._json_key(type, b""),
            )
        except (CanonicalError, TypeError):
            check_json_value(data)  # says where, when it can
            raise
        if b"null" in data_json:
            # orjson writes NaN and infinities as null: only then walk the data to refuse
            # them (a walk on every entry would be most of the cost of appending).
            check_json_value(data)
        line, digest = seal_parts(b"".join((b'{"data":', data_json, did)), tail)
        self._seq += 1
        self._hash, self._hash_b = digest, digest.encode()
        # One future per group commit, shared by every entry in it: entries are durable
        # together, and a future per sample would be most of the cost of appending one.
        fut = self._batch_future
        if fut is None:
            fut = self._batch_future = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(_Pending(self._seq, date, line, fut, durable, digest))
        if durable:
            self._urgent = True
        self._wake.set()
        return Entry(self._seq, digest, type, ts, fut)

    def _json_key(self, text: str, prefix: bytes) -> bytes:
        """``prefix`` + the JSON string of ``text``, cached: entry types are few, and one
        delivery id repeats for a whole delivery."""
        key = (text, prefix)
        out = self._json_cache.get(key)
        if out is None:
            if len(self._json_cache) > 256:
                self._json_cache.clear()
            out = self._json_cache[key] = prefix + dumps(text)
        return out

    def _ts(self, wall_ns: int) -> tuple[str, str]:
        """The entry's ts and its UTC date (YYYYMMDD, which segment it belongs to)."""
        second, micro = divmod(wall_ns // 1000, 1_000_000)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._ts_date = self._ts_prefix[0:4] + self._ts_prefix[5:7] + self._ts_prefix[8:10]
        return f"{self._ts_prefix}.{micro:06d}Z", self._ts_date

    def _check_clock(self, now_mono: int, now_wall: int) -> None:
        """A step of the wall clock (NTP, an operator) is an event in the log."""
        mono0, wall0 = self._clock_base
        step_ns = (now_wall - wall0) - (now_mono - mono0)
        if abs(step_ns) > CLOCK_STEP_LIMIT_NS:
            step = step_ns / 1e9
            self._clock_base = (now_mono, now_wall)
            self._append(
                "clock_step",
                {
                    "step_s": round(step, 6),
                    "expected_wall": self._ts(wall0 + (now_mono - mono0))[0],
                    "actual_wall": self._ts(now_wall)[0],
                },
                None,
                True,
                now_mono,
                now_wall,
            )

    async def checkpoint(self, reason: str) -> str | None:
        """Sign the head, record the checkpoint in the log and in ``checkpoint``; return
        the signed note (None without a signing key)."""
        async with self._checkpointing:  # one at a time: they share checkpoint.tmp
            return await self._checkpoint(reason)

    async def _checkpoint(self, reason: str) -> str | None:
        if self.signer is None:
            return None
        if self._closing:
            raise AuditLogClosed("audit log is closing")
        now_mono, now_wall = self._mono(), self._wall_ns()
        # A clock_step entry, if one is due, goes in before the head is read, so that the
        # checkpoint covers exactly the entries before it.
        self._check_clock(now_mono, now_wall)
        seq, head = self.head
        cp = Checkpoint(
            self.origin,
            seq + 1,
            head,
            (f"time {self._ts(now_wall)[0]}", f"reason {reason}"),
        )
        note = cp.signed(self.signer)
        entry = self._append(
            "checkpoint",
            {"note": note, "count": seq + 1, "head": head},
            None,
            True,
            now_mono,
            now_wall,
        )
        await entry.committed
        # A failing file write (a full disk, a deleted directory) must not end the daemon:
        # it is an alarm, and the writer task retries it like any other log write.
        self._cp_note = note
        try:
            await asyncio.to_thread(self._write_checkpoint_file)
        except OSError as exc:
            self._failed(exc, "checkpoint file")
            self._wake.set()
        return note

    async def hash_at(self, seq: int) -> str | None:
        """The hash of the committed entry ``seq`` as on disk (None if there is none)."""
        if seq > self.committed_seq or seq < 0:
            return None
        if seq == self.committed_seq:
            return self._committed_hash
        return await asyncio.to_thread(lambda: _hash_at(segment_paths(self.directory), seq))

    async def _spill(self, lost: list[_Pending]) -> None:
        """Keep entries that could not be written outside the log directory, for the next
        start (see the module doc). A failure here is logged: nothing else is left."""
        spill_dir = self.spill_dir
        if spill_dir is None:
            return
        target = spill_path(spill_dir, self.origin)
        data = b"".join(p.line for p in lost)

        def write() -> None:
            _private_dir(spill_dir)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            fd = os.open(target, flags, 0o600)  # after an earlier spill, if any: seq order
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.critical("audit_log_spill_failed", path=str(target), error=str(exc))
            return
        log.critical(
            "audit_log_entries_spilled",
            path=str(target),
            count=len(lost),
            first_seq=lost[0].seq,
            last_seq=lost[-1].seq,
        )

    def _side_due(self) -> bool:
        return self._cp_note is not None or (self._seal_due and self.signer is not None)

    def _write_side_files(self, count: int, head: str, ts: str) -> None:
        """Runs in a worker thread: the seal over (count, head), dated ``ts`` (the log's
        own wall clock, read on the loop), then the checkpoint file if one is due. Each is
        replaced atomically (temp file, fsync, rename, fsync dir)."""
        signer = self.signer
        if self._seal_due and signer is not None:
            note = Checkpoint(self.origin, count, head, (f"time {ts}", "reason seal")).signed(
                signer
            )
            write_atomic(self.directory / SEAL_FILE, note.encode(), tmp=self.directory / "seal.tmp")
            self._seal_due = False
        self._write_checkpoint_file()

    def _write_checkpoint_file(self) -> None:
        """Runs in a worker thread: the checkpoint file, if one is due (one writer at a
        time: the checkpoint call and the writer's retry share checkpoint.tmp)."""
        with self._cp_file_lock:
            cp = self._cp_note
            if cp is not None:
                write_atomic(
                    self.directory / CHECKPOINT_FILE,
                    cp.encode("utf-8"),
                    tmp=self.directory / "checkpoint.tmp",
                )
                if self._cp_note is cp:
                    self._cp_note = None

    # ---- the writer task -------------------------------------------------------------

    async def run(self) -> None:
        """Write pending entries until closed; run this in the daemon's TaskGroup."""
        backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S, jitter=False)
        self._running = True
        try:
            while True:
                if not self._pending:
                    if self._side_due():
                        # A seal or checkpoint file that failed before: retry it alone.
                        if await self._side_files():
                            backoff.reset()
                            continue
                        if self._closing:
                            return  # tried once more at shutdown; the alarm is up
                        await asyncio.sleep(backoff.next_delay())
                        continue
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not (self._urgent or self._closing):
                    # Group commit: let samples gather for up to one window.
                    delay = self._oldest_pending + self._window - time.monotonic()
                    if delay > 0:
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                while not (self._urgent or self._closing):
                                    await self._wake.wait()
                                    self._wake.clear()
                batch, self._pending = self._pending, []
                self._batch_future = None  # later appends belong to the next commit
                self._urgent = False
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except _PartialWrite as failed:
                    exc = failed.error
                    # Nothing is dropped and nothing written twice: what did not reach
                    # the disk goes back in front of newer entries.
                    if failed.written:
                        self.committed_seq = batch[failed.written - 1].seq
                        self._committed_hash = batch[failed.written - 1].hash
                        self._seal_due = True
                    self._pending = batch[failed.written :] + self._pending
                    self._urgent = any(p.durable for p in self._pending)
                    self._failed(exc, "entries")
                    # Also while closing: the owner bounds the wait (the daemon cancels
                    # this task at its shutdown deadline); close() then tries once more
                    # and spills what is left.
                    await asyncio.sleep(backoff.next_delay())
                    continue
                self.committed_seq = batch[-1].seq
                self._committed_hash = batch[-1].hash
                self._seal_due = True
                for fut in {id(p.future): p.future for p in batch}.values():
                    if not fut.done():
                        fut.set_result(None)
                if not await self._side_files():
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
        finally:
            self._done.set()

    async def _side_files(self) -> bool:
        """Write the seal and any due checkpoint file; on failure raise the alarm (as for
        any failing log write) and return False: the caller retries with backoff."""
        if self._side_due():
            try:
                await asyncio.to_thread(
                    self._write_side_files,
                    self.committed_seq + 1,
                    self._committed_hash,
                    utc_ts(datetime.fromtimestamp(self._wall_ns() / 1e9, UTC)),
                )
            except OSError as exc:
                self._failed(exc, "seal or checkpoint file")
                return False
        if self.failing_since is not None:
            outage = time.monotonic() - self.failing_since
            self.failing_since = None
            log.warning("audit_log_write_recovered", outage_s=round(outage, 3))
            if not self._closing:
                self.append("write_recovered", {"outage_s": round(outage, 6)}, durable=True)
            if self.on_recovered:
                self.on_recovered(outage)
        return True

    def _failed(self, exc: OSError, what: str) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        log.critical(
            "audit_log_write_failed", error=str(exc), what=what, pending=len(self._pending)
        )
        if self.on_failure:
            self.on_failure(exc)

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Runs in a worker thread: write, rotate and fsync; all or nothing per segment.

        Raises _PartialWrite saying how many entries (from the start) are on disk."""
        i = 0
        while i < len(batch):
            try:
                i = self._write_chunk(batch, i)
            except OSError as exc:
                raise _PartialWrite(i, exc) from exc

    def _write_chunk(self, batch: list[_Pending], i: int) -> int:
        """Write the entries from ``i`` that go into one segment; return where it stopped."""
        seg = self._segment
        first = batch[i]
        if (
            seg is None
            or seg.date != first.date
            or (seg.size > 0 and seg.size + len(first.line) > self._max)
        ):
            seg = self._rotate(first.seq, first.date)
        chunk: list[bytes] = []
        size = seg.size
        while i < len(batch) and batch[i].date == seg.date:
            line = batch[i].line
            if chunk and size + len(line) > self._max:
                break
            chunk.append(line)
            size += len(line)
            i += 1
        _check_same_file(seg)
        try:
            write_all(seg.fd, b"".join(chunk))
            os.fsync(seg.fd)
        except OSError:
            # Cut back to the last committed size so that a torn write never sits
            # in the middle of the file when the retry appends after it.
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)
            raise
        seg.size = size
        return i

    def _rotate(self, first_seq: int, date: str) -> _Segment:
        if not self.directory.is_dir():
            # Never recreate a deleted log directory: a new chain in an empty directory
            # would hide the deletion. The alarm stays up until an operator acts.
            raise OSError(errno.ENOENT, f"{self.directory}: the log directory is gone")
        old = self._segment
        if old is not None:
            os.fsync(old.fd)
            os.close(old.fd)
            self._segment = None
        path = self.directory / f"log-{first_seq:016d}-{date}.jsonl"
        fd = _open_for_append(path, os.O_CREAT)
        size = os.fstat(fd).st_size
        fsync_dir(self.directory)
        self._segment = _Segment(path, fd, size, date)
        return self._segment

    async def close(self) -> None:
        """Flush and fsync everything pending, then close the file."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._running:
            await self._done.wait()
        try:
            await self._flush_at_close()
        finally:
            seg, self._segment = self._segment, None
            if seg is not None:
                with contextlib.suppress(OSError):  # a failing disk: said already
                    await asyncio.to_thread(os.fsync, seg.fd)
                os.close(seg.fd)
            self._closed = True
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the directory lock
                self._lock_fd = None

    async def _flush_at_close(self) -> None:
        if self._pending:
            # The writer task never ran, or was cancelled with entries still pending (a
            # start-up that failed, a shutdown cut short): write them now, once.
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except _PartialWrite as failed:
                lost = batch[failed.written :]
                log.critical(
                    "audit_log_entries_not_written",
                    count=len(lost),
                    first_seq=lost[0].seq,
                    last_seq=lost[-1].seq,
                    error=str(failed.error),
                )
                await self._spill(lost)
                raise failed.error from None
            for fut in {id(p.future): p.future for p in batch}.values():
                if not fut.done():
                    fut.set_result(None)
            self.committed_seq, self._committed_hash = batch[-1].seq, batch[-1].hash
            self._seal_due = True
        if self._side_due():
            await self._side_files()  # once: a failure is logged and alarmed, not raised


def _open_for_append(path: Path, extra: int = 0) -> int:
    """A segment opened for appending: never through a link (the next segment's name is
    predictable; a link planted there would have the log appended to another file) and
    only a regular file (O_NONBLOCK: a FIFO planted there fails at once instead of
    waiting for a reader). Otherwise an OSError: a failing write, alarmed and retried."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | extra
    fd = os.open(path, flags, 0o640)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(
            errno.EINVAL, f"{path}: not a regular file: someone changed the log directory"
        )
    return fd


def _check_same_file(seg: _Segment) -> None:
    """The open segment is still the file at its path: not deleted, not replaced, its
    directory not moved or deleted. Otherwise writing on would go to a file nobody sees."""
    st = os.fstat(seg.fd)
    if st.st_nlink == 0:
        raise OSError(errno.ENOENT, f"{seg.path}: the open segment was deleted")
    try:
        at_path = os.stat(seg.path)
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, f"{seg.path}: the segment or the log directory was moved or deleted"
        ) from None
    if (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino):
        raise OSError(errno.ESTALE, f"{seg.path}: the segment was replaced by another file")


# ---- recovery (runs in a worker thread before the writer starts) -------------------------


def _unusable(path: Path, what: str) -> LogUnusable:
    return LogUnusable(
        f"{path} {what}. Not reading it, and nothing was moved. Keep the directory as "
        "evidence and check it with `iort-audit verify`; then remove that file if it is "
        "not the log's, or point log.directory at a new directory to start a new log."
    )


def _read_segment(path: Path) -> bytes:
    """A segment's bytes: only a regular file, never through a symbolic link (a FIFO
    would hang the start, a link to /dev/zero exhaust memory, a link elsewhere make the
    daemon read, truncate and append to a file of someone else's choosing)."""
    try:
        with open_segment(path) as seg:
            return seg.read_all()
    except SegmentError as exc:
        raise _unusable(path, exc.what) from None


def _check_segments(segments: list[Path]) -> None:
    """Every segment a regular file, checked before anything is read or touched."""
    for path in segments:
        try:
            open_segment(path).close()
        except SegmentError as exc:
            raise _unusable(path, exc.what) from None


def _read_origin(first: Path) -> str | None:
    try:
        with open_segment(first) as seg:
            line = seg.first_line()
    except SegmentError as exc:
        raise _unusable(first, exc.what) from None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(entry, dict) and entry.get("type") == "log_created":
        origin = entry.get("data", {}).get("origin")
        return origin if isinstance(origin, str) else None
    return None


def _quarantine(directory: Path) -> Path:
    """The log directory's own quarantine/: a real directory, never a link (whoever can
    write the log directory could point it anywhere)."""
    q = directory / "quarantine"
    with contextlib.suppress(FileExistsError):
        q.mkdir()
    if not stat.S_ISDIR(os.lstat(q).st_mode):
        raise _unusable(q, "is not a directory (a symbolic link, or a file)")
    return q


def _write_new(path: Path, data: bytes) -> Path:
    """A new file in quarantine/, fsync'd; returns its path. Never through a link, never
    over a file that is there already (its name is predictable: a planted link there would
    make the daemon write into a file of someone else's choosing): a name taken gets a
    suffix (.1, .2, ...; a start that crashed in the same second left its copy)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = path.name
    for n in range(100):
        path = path.with_name(name if n == 0 else f"{name}.{n}")
        try:
            fd = os.open(path, flags, 0o640)
            break
        except FileExistsError:
            continue
    else:
        raise _unusable(path, "and 99 names before it exist already in quarantine/")
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def _lock(directory: Path) -> int:
    """One writer per log directory: an exclusive flock on LOCK, held until close (the
    kernel drops it if the process dies, so a crash never leaves it stale)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "LOCK"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError:
        if os.path.islink(path):
            raise _unusable(path, "is a symbolic link, not the daemon's lock file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _unusable(path, "is not a regular file, not the daemon's lock file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LogInUse(
            f"{directory} is in use by another iortd (pid {holder}); one writer per log"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _damaged(where: str, why: str) -> LogDamaged:
    return LogDamaged(
        f"{where}: {why}: the log is damaged or was altered, not torn by a crash. Not "
        "writing to it, and nothing was moved. Check it with `iort-audit verify`, keep it "
        "as evidence, and point log.directory at a new directory to start a new log."
    )


def _recover(
    directory: Path,
    origin: str,
    verifier: Verifier | None = None,
    accept_rollback: bool = False,
    spill_dir: Path | None = None,
) -> tuple[_Segment | None, RecoveryReport]:
    """Find the head of the chain after any stop. Everything is checked before anything
    is touched: a crash can only tear the end of the newest segment (or leave it with no
    whole entry); anything else is damage, and the log is refused as it is."""
    directory.mkdir(parents=True, exist_ok=True)
    segments = segment_paths(directory)
    _check_segments(segments)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    new_log = RecoveryReport(
        created=True,
        origin=origin,
        previous_stop="none",
        last_seq=-1,
        last_hash=ZERO_HASH,
        last_ts=None,
    )
    if not segments:
        _check_anchors_without_log(directory, verifier, accept_rollback)
        return None, new_log

    # The segment before the newest must be whole: only the newest is ever written to
    # when a crash can happen.
    prev_scan: _Scan | None = None
    if len(segments) > 1:
        prev_data = _read_segment(segments[-2])
        prev_scan = _scan(prev_data, None, None)
        if prev_scan.error is not None or prev_scan.intact != len(prev_data):
            line = prev_data[: prev_scan.intact].count(b"\n") + 1
            raise _damaged(f"{segments[-2]}:{line}", prev_scan.error or "incomplete entry")

    last = segments[-1]
    data = _read_segment(last)
    scan = _scan(
        data,
        None if prev_scan is None else prev_scan.last_hash,
        None if prev_scan is None else prev_scan.last_seq,
    )
    set_aside: list[str] = []
    if scan.entries == 0:
        if _later_entry(data, -1):
            line = 1
            raise _damaged(f"{last}:{line}", scan.error or "first entry does not link")
        # No whole entry at all (a power cut right after the segment was created, or
        # during its first write): set the file aside whole, never delete it.
        target = _quarantine(directory) / f"{last.name}.{stamp}.set-aside"
        last.replace(target)
        fsync_dir(directory)
        set_aside.append(str(target.relative_to(directory)))
        segments.pop()
        if prev_scan is None:
            _check_anchors_without_log(directory, verifier, accept_rollback)
            return None, new_log
        last, data, scan = segments[-1], prev_data, prev_scan
    elif prev_scan is not None and scan.last_type is None:
        # The newest segment holds only checkpoints (the shutdown one rotated into it):
        # what kind of stop it was is said by the entry before them.
        scan.last_type = prev_scan.last_type

    if scan.error is not None and _later_entry(data, scan.intact):
        # Whole, valid entries after a bad one are not what a crash leaves behind.
        line = data[: scan.intact].count(b"\n") + 1
        raise _damaged(f"{last}:{line}", f"{scan.error}, but valid entries follow it")
    log_origin = _read_origin(segments[0]) or origin
    # Checked before anything is touched: a log behind its own seal is refused as it is.
    vouch = _vouch(directory, segments, log_origin, scan, verifier, accept_rollback)
    tail_bytes = len(data) - scan.intact
    kept_at = None
    if tail_bytes:
        target = _quarantine(directory) / f"{last.name}.tail-at-{scan.intact}.{stamp}.bin"
        target = _write_new(target, data[scan.intact :])
        kept_at = str(target.relative_to(directory))
        with open(last, "r+b") as f:
            f.truncate(scan.intact)
            f.flush()
            os.fsync(f.fileno())
        log.warning("audit_log_tail_set_aside", bytes=tail_bytes, kept_at=kept_at, why=scan.error)

    previous_stop: Literal["clean", "crash"] = (
        "clean" if scan.last_type == "daemon_stop" else "crash"
    )
    spilled = None
    size = scan.intact
    if spill_dir is not None:
        spilled, size = _restore_spill(directory, spill_dir, log_origin, last, scan, stamp)
    fd = _open_for_append(last)
    date = last.name.split("-")[2].removesuffix(".jsonl")  # segment_paths matched the name
    segment = _Segment(last, fd, size, date)
    open_id, open_sample, open_started, open_gap = _open_delivery(segments, vouch.count)
    report = RecoveryReport(
        created=False,
        origin=log_origin,
        previous_stop=previous_stop,
        last_seq=scan.last_seq,
        last_hash=scan.last_hash,
        last_ts=scan.last_ts,
        tail_bytes=tail_bytes,
        tail_kept_at=kept_at,
        segments_set_aside=tuple(set_aside),
        open_delivery_id=open_id,
        open_delivery_last_sample=open_sample,
        vouched_count=vouch.count,
        vouched_by=vouch.by,
        anchor_problems=tuple(vouch.problems),
        rollback=vouch.rollback,
        spilled=spilled,
        open_delivery_started=open_started,
        open_delivery_unwatched_since=open_gap,
        unvouched_open_deliveries=()
        if vouch.count is None
        else tuple(d for d in _started_unvouched(segments, vouch.count) if d != open_id)[
            -UNVOUCHED_CLOSED_MAX:
        ],
    )
    if report.unvouched is not None and report.unvouched[0] > 0:
        env = _envelope_at(segments, report.unvouched[0] - 1)
        report = replace(report, last_vouched_ts=None if env is None else env.ts)
    if report.unvouched is not None:
        first, last_u = report.unvouched
        log.warning(
            "audit_log_unvouched_entries",
            first_seq=first,
            last_seq=last_u,
            count=report.unvouched_count,
            vouched_by=vouch.by,
        )
    return segment, report


def _restore_spill(
    directory: Path, spill_dir: Path, origin: str, last: Path, scan: _Scan, stamp: str
) -> tuple[dict[str, Any] | None, int]:
    """Entries a stop could not write: appended to the newest segment when they continue
    the chain exactly (``scan`` is updated to the new head), and the spill file moved to
    quarantine either way. Returns (what was found, the segment's size)."""
    source = spill_path(spill_dir, origin)
    size = scan.intact
    if not source.exists():
        return None, size
    try:
        _private_dir(spill_dir)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{source}: not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
    except OSError as exc:
        log.critical("audit_log_spill_unusable", path=str(source), error=str(exc))
        return {"unusable": str(exc)}, size
    # Order matters for a crash during this restore: kept in quarantine, then appended
    # to the log, and only then removed. A crash before the removal finds the spill
    # again, its entries already in the log (said so, never appended twice); a crash
    # after it finds them in the log.
    target = _quarantine(directory) / f"{source.name}.{stamp}.spilled"
    target = _write_new(target, data)
    seqs = [s for s in (_entry_seq(raw) for raw in data.splitlines()) if s is not None]
    found: dict[str, Any] = {
        "count": len(seqs),
        "first_seq": min(seqs, default=None),
        "last_seq": max(seqs, default=None),
        "kept_at": str(target.relative_to(directory)),
        "restored": 0,
    }
    cont = _scan(data, scan.last_hash, scan.last_seq)
    if cont.entries:
        with open(last, "ab") as f:
            f.write(data[: cont.intact])
            f.flush()
            os.fsync(f.fileno())
        size += cont.intact
        found["restored"] = cont.entries
        scan.last_seq, scan.last_hash, scan.last_ts = cont.last_seq, cont.last_hash, cont.last_ts
    elif _already_restored(data, last):
        found["restored"] = found["count"]
        found["already_in_log"] = True  # by a start that crashed before removing the spill
    source.unlink()
    log.warning("audit_log_spill_found", **found)
    return found, size


def _already_restored(data: bytes, last: Path) -> bool:
    """Whether the spill's whole chain is already in the newest segment, unchanged."""
    whole = _scan(data, None, None)
    if whole.entries == 0 or whole.error is not None:
        return False
    env = _envelope_at([last], whole.last_seq)
    return env is not None and env.hash == whole.last_hash


# ---- seal, checkpoint file and the entries they vouch for --------------------------------


@dataclass(slots=True)
class _Vouch:
    count: int | None  # entries vouched for (0 .. count-1); None without a key
    by: str = "none"
    problems: list[str] = field(default_factory=list)
    rollback: dict[str, Any] | None = None


def read_anchor(path: Path) -> str | None:
    """A seal or checkpoint file's text; None when there is none. Only a small regular
    file is read (a FIFO or a device put there must not hang or flood recovery)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NoteError(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NoteError("not a regular file")
        if st.st_size > ANCHOR_MAX_BYTES:
            raise NoteError(f"{st.st_size} bytes: too large for a note")
        data = os.read(fd, ANCHOR_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("not UTF-8 text") from None


def _anchors(
    directory: Path, verifier: Verifier, origin: str | None, problems: list[str]
) -> list[tuple[str, Checkpoint]]:
    """The seal and the checkpoint file, when present and signed by ``verifier`` for this
    log; anything else there is listed in ``problems`` (and vouches for nothing)."""
    out: list[tuple[str, Checkpoint]] = []
    for name, what in ((SEAL_FILE, "seal"), (CHECKPOINT_FILE, "checkpoint file")):
        try:
            text = read_anchor(directory / name)
            if text is None:
                problems.append(f"{what}: missing")
                continue
            cp, signed = Checkpoint.parse_verified(text, verifier)
        except NoteError as exc:
            problems.append(f"{what}: {exc}")
            continue
        if not signed:
            problems.append(f"{what}: not signed by this daemon's key ({verifier.name})")
            continue
        out.append((what, cp))  # another origin, signed by our key: the log was replaced
    return out


def _check_anchors_without_log(
    directory: Path, verifier: Verifier | None, accept_rollback: bool
) -> None:
    """No log at all, but a seal or checkpoint file of ours: the log was deleted."""
    if verifier is None:
        return
    found = _anchors(directory, verifier, None, [])
    if found and not accept_rollback:
        what, cp = found[0]
        raise _rolled_back(
            directory, f"the directory has no log, but its {what} covers {cp.count} entries"
        )


def _rolled_back(directory: Path, why: str) -> LogRolledBack:
    return LogRolledBack(
        f"{directory}: {why}: the log is behind what this daemon signed (a restored "
        "backup, a truncation, or a replaced log). Not starting: signing it would make a "
        "fork. Keep the directory as evidence and check it with `iort-audit verify`; to "
        "continue on this log deliberately, start once with --accept-log-rollback (it is "
        "recorded in the log)."
    )


def _vouch(
    directory: Path,
    segments: list[Path],
    origin: str,
    scan: _Scan,
    verifier: Verifier | None,
    accept_rollback: bool,
) -> _Vouch:
    """How far this daemon's signatures vouch for the log, and whether the log is behind
    them. Raises LogRolledBack (unless ``accept_rollback``)."""
    if verifier is None:
        return _Vouch(None)
    out = _Vouch(0)
    entries = scan.last_seq + 1
    for what, cp in _anchors(directory, verifier, origin, out.problems):
        why = None
        if cp.origin != origin:
            why = f"its {what} is for log {cp.origin!r}, this log is {origin!r}"
        elif cp.count > entries:
            why = f"the log has {entries} entries, its {what} covers {cp.count}"
        elif cp.count > 0 and _hash_at(segments, cp.count - 1) != cp.head_hash:
            why = f"seq {cp.count - 1} differs from its {what}"
        if why is None:
            if cp.count > (out.count or 0):
                out.count, out.by = cp.count, what
            continue
        if not accept_rollback:
            raise _rolled_back(directory, why)
        out.problems.append(f"{what}: {why} (rollback accepted)")
        if out.rollback is None:
            out.rollback = {
                "why": why,
                f"{what.replace(' ', '_')}_count": cp.count,
                f"{what.replace(' ', '_')}_head": cp.head_hash,
                "log_count": entries,
                "log_head": scan.last_hash,
            }
    if (out.count or 0) < entries:
        found = _last_checkpoint_entry(segments, verifier, out.count or 0)
        if found is not None:
            out.count, out.by = found, "checkpoint entry"
    return out


def _entry_seq(raw: bytes) -> int | None:
    """The seq of a line, from its envelope tail (no parse of the data)."""
    at = raw.rfind(b',"seq":')
    if at < 0:
        return None
    end = raw.find(b",", at + 7)
    try:
        return int(raw[at + 7 : end])
    except ValueError:
        return None


def _envelope_at(segments: list[Path], seq: int) -> Envelope | None:
    """The envelope of the entry with ``seq`` (its claimed hash and ts; recovery has
    checked the chain of the newest segments, and verify checks all of it)."""
    for path in reversed(segments):
        first = int(path.name[4:20])
        if first > seq:
            continue
        for raw in _read_segment(path).splitlines():
            if _entry_seq(raw) == seq:
                try:
                    return open_line(raw)
                except ValueError:
                    return None
        return None
    return None


def _hash_at(segments: list[Path], seq: int) -> str | None:
    env = _envelope_at(segments, seq)
    return None if env is None else env.hash


def _last_checkpoint_entry(segments: list[Path], verifier: Verifier, floor: int) -> int | None:
    """The count vouched for by the newest checkpoint entry signed by ``verifier`` that
    covers exactly the chain before it (its own seq + 1), if above ``floor``."""
    for path in reversed(segments):
        lines = _read_segment(path).splitlines()
        for raw in reversed(lines):
            seq = _entry_seq(raw)
            if seq is None or seq < floor:
                return None
            if not raw.endswith(b'"type":"checkpoint"}'):
                continue
            try:
                env = open_line(raw)
                note = orjson.loads(raw).get("data", {}).get("note")
                cp, signed = Checkpoint.parse_verified(str(note), verifier)
            except (ValueError, AttributeError):
                continue
            if signed and env.hash == env.computed and cp.count == seq and cp.head_hash == env.prev:
                return seq + 1
        if int(path.name[4:20]) <= floor:
            return None
    return None


def _later_entry(data: bytes, start: int) -> bool:
    """Whether a whole, self-consistent entry follows the line at ``start`` (with -1:
    anywhere in ``data``)."""
    if start >= 0:
        first_nl = data.find(b"\n", start)
        if first_nl < 0:
            return False
        rest = data[first_nl + 1 :]
    else:
        rest = data
    for raw in rest.split(b"\n"):
        try:
            env = open_line(raw)
        except ValueError:
            continue
        if env.hash == env.computed:
            return True
    return False


_Open = tuple[str | None, Mapping[str, Any] | None, Mapping[str, Any] | None, str | None]
_NO_OPEN: _Open = (None, None, None, None)


def _open_delivery(segments: list[Path], vouched_count: int | None = None) -> _Open:
    """The delivery left open by the previous run, if any, with its last sample and its
    delivery_started data, from vouched entries only (seq < ``vouched_count``, when
    given): a forged delivery_terminated in an unvouched tail must not close the delivery,
    nor a forged sample stand as its last. The fourth item is the start of the oldest
    monitoring gap of that delivery recorded after its last sample (a run that took it over
    and never heard the console): nobody has watched it since then.

    Scans backwards to the newest delivery_started or delivery_terminated entry. A
    daemon_start either closed what was open before it (it then names no open delivery:
    nothing older can still be open, so the scan stops there) or took it over (it names
    it in ``open_delivery``: the scan goes on to that delivery's start, through runs that
    each carried it). This bounds the work at start-up to the open delivery's own runs.
    """
    last_sample: dict[str, Mapping[str, Any]] = {}
    gap_since: dict[str, str] = {}
    carried: str | None = None
    for path in reversed(segments):
        for raw in reversed(_read_segment(path).splitlines()):
            if vouched_count is not None:
                seq = _entry_seq(raw)
                if seq is None or seq >= vouched_count:
                    continue
            # "type" sorts last, so the kind is the end of the line: no parse needed.
            if raw.endswith(b'"type":"daemon_start"}'):
                try:
                    data = orjson.loads(raw).get("data")
                except orjson.JSONDecodeError:
                    data = None
                opened = data.get("open_delivery") if isinstance(data, dict) else None
                if not isinstance(opened, str) or carried not in (None, opened):
                    return _NO_OPEN
                carried = opened
                continue
            if b'"delivery_id":' not in raw:
                continue
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            kind, did = entry.get("type"), entry.get("delivery_id")
            if not isinstance(did, str):
                continue
            if kind == "sample" and did not in last_sample:
                last_sample[did] = entry.get("data", {})
            elif kind == "monitoring_gap_started" and did not in last_sample:
                start = (entry.get("data") or {}).get("start")
                if isinstance(start, str):
                    gap_since[did] = start  # older ones overwrite: the oldest is kept
            elif kind == "delivery_terminated":
                return _NO_OPEN
            elif kind == "delivery_started":
                if carried not in (None, did):
                    return _NO_OPEN
                return did, last_sample.get(did), entry.get("data", {}), gap_since.get(did)
    return _NO_OPEN


def _started_unvouched(segments: list[Path], vouched_count: int) -> list[str]:
    """Deliveries whose delivery_started is at or after ``vouched_count`` and that no
    delivery_terminated after it ends, oldest first (a scan of the unvouched tail only)."""
    started: list[str] = []
    ended: set[str] = set()
    for path in reversed(segments):
        for raw in reversed(_read_segment(path).splitlines()):
            seq = _entry_seq(raw)
            if seq is None:
                continue
            if seq < vouched_count:
                return started[::-1]
            is_end = raw.endswith(b'"type":"delivery_terminated"}')
            if not (is_end or raw.endswith(b'"type":"delivery_started"}')):
                continue
            try:
                did = orjson.loads(raw).get("delivery_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if not isinstance(did, str):
                continue
            if is_end:
                ended.add(did)
            elif did not in ended and did not in started:
                started.append(did)
        if int(path.name[4:20]) <= vouched_count:
            break
    return started[::-1]


def new_origin(site: str, room: str) -> str:
    """A log origin: where it comes from plus a random id, never patient data."""
    return f"iortd/{site}/{room}/{secrets.token_hex(8)}"
