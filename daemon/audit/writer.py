"""The audit-log writer: append, group commit, rotation, crash recovery, checkpoints.

Layout of a log directory (docs/audit-log.md):

    log-<first seq, 16 digits>-<UTC date YYYYMMDD>.jsonl   segments, in chain order
    checkpoint                                            the latest signed checkpoint
    quarantine/                                           bytes set aside by recovery

Durability: ``append(..., durable=True)`` (events) resolves ``entry.committed`` only after
the bytes are fsync'd; samples (``durable=False``) are written and fsync'd together within
the group-commit window. Writes and fsyncs run in a worker thread, never on the event loop.
A failing disk never drops an entry: the batch stays pending, the file is cut back to its
last committed size (no torn line in the middle), an alarm callback fires, and the writer
retries with capped backoff until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
import structlog
from orjson import dumps

from daemon.audit.canonical import (
    ZERO_HASH,
    CanonicalError,
    canonical,
    check_json_value,
    open_line,
    seal_parts,
)
from daemon.audit.note import Checkpoint, Signer
from daemon.durable import fsync_dir, write_all, write_atomic

__all__ = [
    "FORMAT",
    "AuditLog",
    "AuditLogClosed",
    "Entry",
    "LogDamaged",
    "LogInUse",
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


class LogInUse(RuntimeError):
    """Another process holds the log directory."""


class _PartialWrite(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(str(error))
        self.written = written
        self.error = error


def segment_paths(directory: Path) -> list[Path]:
    """Segments in chain order (their names start with the first entry's seq)."""
    found = [p for p in directory.iterdir() if SEGMENT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def _ns(dt: datetime) -> int:
    """An aware datetime as integer nanoseconds since the epoch (exact to the microsecond)."""
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_ts(dt: datetime) -> str:
    """RFC 3339 UTC with microseconds and Z (the log's only time format)."""
    if dt.utcoffset():
        dt = dt.astimezone(UTC)
    return dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


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
    open_delivery_started: Mapping[str, Any] | None = None  # its delivery_started data


class _Pending(NamedTuple):
    seq: int
    date: str  # YYYYMMDD of the entry's ts: which day's segment it belongs to
    line: bytes
    future: asyncio.Future[None]
    durable: bool


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
    ) -> tuple[AuditLog, RecoveryReport]:
        """Open (or create) the log in ``directory`` and recover it after a crash.

        ``origin`` is used only when the log is created; an existing log keeps its own.
        """
        mono = mono or time.monotonic_ns
        wall_ns = time.time_ns if wall is None else (lambda: _ns(wall()))
        lock_fd = await asyncio.to_thread(_lock, directory)
        try:
            segment, report = await asyncio.to_thread(_recover, directory, origin)
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
        self._pending.append(_Pending(self._seq, date, line, fut, durable))
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
        await asyncio.to_thread(self._write_checkpoint_file, note)
        return note

    def _write_checkpoint_file(self, note: str) -> None:
        target = self.directory / "checkpoint"
        write_atomic(target, note.encode("utf-8"), tmp=self.directory / "checkpoint.tmp")

    # ---- the writer task -------------------------------------------------------------

    async def run(self) -> None:
        """Write pending entries until closed; run this in the daemon's TaskGroup."""
        backoff = BACKOFF_INITIAL_S
        self._running = True
        try:
            while True:
                if not self._pending:
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
                    self._pending = batch[failed.written :] + self._pending
                    self._urgent = any(p.durable for p in self._pending)
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    log.critical(
                        "audit_log_write_failed", error=str(exc), pending=len(self._pending)
                    )
                    if self.on_failure:
                        self.on_failure(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                backoff = BACKOFF_INITIAL_S
                self.committed_seq = batch[-1].seq
                for fut in {id(p.future): p.future for p in batch}.values():
                    if not fut.done():
                        fut.set_result(None)
                if self.failing_since is not None:
                    outage = time.monotonic() - self.failing_since
                    self.failing_since = None
                    log.warning("audit_log_write_recovered", outage_s=round(outage, 3))
                    if not self._closing:
                        self.append("write_recovered", {"outage_s": round(outage, 6)}, durable=True)
                    if self.on_recovered:
                        self.on_recovered(outage)
        finally:
            self._done.set()

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
        old = self._segment
        if old is not None:
            os.fsync(old.fd)
            os.close(old.fd)
            self._segment = None
        path = self.directory / f"log-{first_seq:016d}-{date}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
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
        if self._pending:
            # The writer task never ran, or was cancelled with entries still pending (a
            # start-up that failed, a shutdown cut short): write them now, once.
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except _PartialWrite as failed:
                log.critical(
                    "audit_log_entries_not_written",
                    count=len(batch) - failed.written,
                    first_seq=batch[failed.written].seq,
                    error=str(failed.error),
                )
                raise failed.error from None
            for fut in {id(p.future): p.future for p in batch}.values():
                if not fut.done():
                    fut.set_result(None)
        seg, self._segment = self._segment, None
        if seg is not None:
            await asyncio.to_thread(os.fsync, seg.fd)
            os.close(seg.fd)
        self._closed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the directory lock
            self._lock_fd = None


# ---- recovery (runs in a worker thread before the writer starts) -------------------------


def _read_origin(first: Path) -> str | None:
    with open(first, "rb") as f:
        line = f.readline()
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(entry, dict) and entry.get("type") == "log_created":
        origin = entry.get("data", {}).get("origin")
        return origin if isinstance(origin, str) else None
    return None


def _quarantine(directory: Path) -> Path:
    q = directory / "quarantine"
    q.mkdir(exist_ok=True)
    return q


def _lock(directory: Path) -> int:
    """One writer per log directory: an exclusive flock on LOCK, held until close (the
    kernel drops it if the process dies, so a crash never leaves it stale)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
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


def _recover(directory: Path, origin: str) -> tuple[_Segment | None, RecoveryReport]:
    """Find the head of the chain after any stop. Everything is checked before anything
    is touched: a crash can only tear the end of the newest segment (or leave it with no
    whole entry); anything else is damage, and the log is refused as it is."""
    directory.mkdir(parents=True, exist_ok=True)
    segments = segment_paths(directory)
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
        return None, new_log

    # The segment before the newest must be whole: only the newest is ever written to
    # when a crash can happen.
    prev_scan: _Scan | None = None
    if len(segments) > 1:
        prev_data = segments[-2].read_bytes()
        prev_scan = _scan(prev_data, None, None)
        if prev_scan.error is not None or prev_scan.intact != len(prev_data):
            line = prev_data[: prev_scan.intact].count(b"\n") + 1
            raise _damaged(f"{segments[-2]}:{line}", prev_scan.error or "incomplete entry")

    last = segments[-1]
    data = last.read_bytes()
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
    tail_bytes = len(data) - scan.intact
    kept_at = None
    if tail_bytes:
        target = _quarantine(directory) / f"{last.name}.tail-at-{scan.intact}.{stamp}.bin"
        with open(target, "wb") as f:
            f.write(data[scan.intact :])
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(target.parent)
        kept_at = str(target.relative_to(directory))
        with open(last, "r+b") as f:
            f.truncate(scan.intact)
            f.flush()
            os.fsync(f.fileno())
        log.warning("audit_log_tail_set_aside", bytes=tail_bytes, kept_at=kept_at, why=scan.error)

    fd = os.open(last, os.O_WRONLY | os.O_APPEND)
    date = last.name.split("-")[2].removesuffix(".jsonl")  # segment_paths matched the name
    segment = _Segment(last, fd, scan.intact, date)
    open_id, open_sample, open_started = _open_delivery(segments)
    report = RecoveryReport(
        created=False,
        origin=_read_origin(segments[0]) or origin,
        previous_stop="clean" if scan.last_type == "daemon_stop" else "crash",
        last_seq=scan.last_seq,
        last_hash=scan.last_hash,
        last_ts=scan.last_ts,
        tail_bytes=tail_bytes,
        tail_kept_at=kept_at,
        segments_set_aside=tuple(set_aside),
        open_delivery_id=open_id,
        open_delivery_last_sample=open_sample,
        open_delivery_started=open_started,
    )
    return segment, report


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


_Open = tuple[str | None, Mapping[str, Any] | None, Mapping[str, Any] | None]


def _open_delivery(segments: list[Path]) -> _Open:
    """The delivery left open by the previous run, if any, with its last sample and its
    delivery_started data.

    Scans backwards to the newest delivery_started or delivery_terminated entry. A
    daemon_start either closed what was open before it (it then names no open delivery:
    nothing older can still be open, so the scan stops there) or took it over (it names
    it in ``open_delivery``: the scan goes on to that delivery's start, through runs that
    each carried it). This bounds the work at start-up to the open delivery's own runs.
    """
    last_sample: dict[str, Mapping[str, Any]] = {}
    carried: str | None = None
    for path in reversed(segments):
        for raw in reversed(path.read_bytes().splitlines()):
            # "type" sorts last, so the kind is the end of the line: no parse needed.
            if raw.endswith(b'"type":"daemon_start"}'):
                try:
                    data = orjson.loads(raw).get("data")
                except orjson.JSONDecodeError:
                    data = None
                opened = data.get("open_delivery") if isinstance(data, dict) else None
                if not isinstance(opened, str) or carried not in (None, opened):
                    return None, None, None
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
            elif kind == "delivery_terminated":
                return None, None, None
            elif kind == "delivery_started":
                if carried not in (None, did):
                    return None, None, None
                return did, last_sample.get(did), entry.get("data", {})
    return None, None, None


def new_origin(site: str, room: str) -> str:
    """A log origin: where it comes from plus a random id, never patient data."""
    return f"iortd/{site}/{room}/{secrets.token_hex(8)}"
