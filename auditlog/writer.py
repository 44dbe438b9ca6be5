"""The audit-log writer: append, group commit, rotation, the seal, checkpoints, spill.

One :class:`AuditLog` per log directory, built with :meth:`AuditLog.open` (which locks the
directory and runs start-up recovery: recovery.py) and written by :meth:`AuditLog.run`, a
task in the daemon's TaskGroup. How an entry becomes its line: chainhead.py. The
directory's files and the rules for touching them: logdir.py.

Durability: ``append(..., durable=True)`` (events) resolves ``entry.committed`` only after
the bytes are fsync'd; samples (``durable=False``) are written and fsync'd together within
the group-commit window. Writes and fsyncs run in a worker thread, never on the event loop.
A failing disk never drops an entry: the batch stays pending, the file is cut back to its
last committed size (no torn line in the middle), an alarm callback fires, and the writer
retries with capped backoff until it succeeds. A failing seal or checkpoint-file write is
a failing log write too: an alarm and a retry; it never ends the writer.

The Merkle tree (issue 20): beside the chain's head the writer keeps the frontier of the
RFC 6962 tree over every entry (merkle.py; leaf = the entry's line without its newline),
appending each entry's leaf as its line is made (one SHA-256 and, on average, one node
hash). A group commit takes a copy of it (at most 64 hashes) with its batch, so the seal
signs the root at the committed size. At open the frontier comes from the seal, or is
rebuilt from the log (tree_state.py). Without a signing key, or when it cannot be
rebuilt, there is none, and the notes are chain-head checkpoints (note.py).

The seal: after every group commit (after its fsync) the writer signs (size, root, head
hash; and the frontier, tree_state.py) in the checkpoint note format and replaces ``seal``
with it atomically. It is never published
nor recorded as an entry: it only says how far this daemon vouches for the log on disk
(vouch.py). Never at open: the recovered head may hold unvouched entries, and the first
seal comes after the owner has recorded them. A checkpoint is signed into the log as an
entry and into the ``checkpoint`` file.

A stop while the disk is full or read-only tries once more, then writes what is still
pending to a spill file outside the log directory (spill.py); the next open restores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from iortd.auditlog.chainhead import ChainHead
from iortd.auditlog.logdir import (
    CHECKPOINT_FILE,
    SEAL_FILE,
    SEGMENT_RE,
    LogDamaged,
    LogInUse,
    LogUnusable,
    OpenSegment,
    lock_directory,
    new_origin,
    read_anchor,
    segment_paths,
    write_anchor,
)
from iortd.auditlog.marker import find_hash
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.note import Checkpoint, Signer
from iortd.auditlog.recovery import RecoveryReport, recover
from iortd.auditlog.segment_writer import PartialWrite as _PartialWrite
from iortd.auditlog.segment_writer import Pending as _Pending
from iortd.auditlog.segment_writer import SegmentWriting
from iortd.auditlog.spill import DEFAULT_SPILL_DIR, spill_entries, spill_path
from iortd.auditlog.tree_state import frontier_line, load_frontier
from iortd.auditlog.vouch import LogRolledBack
from iortd.kernel.backoff import Backoff
from iortd.kernel.timefmt import epoch_ns, utc_ts

# The writing side's public names, importable from here (as before the cut, issue 15).
__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_SPILL_DIR",
    "FORMAT",
    "SEAL_FILE",
    "SEGMENT_RE",
    "AuditLog",
    "AuditLogClosed",
    "Entry",
    "LogDamaged",
    "LogInUse",
    "LogRolledBack",
    "LogUnusable",
    "RecoveryReport",
    "new_origin",
    "read_anchor",
    "segment_paths",
    "spill_path",
]

FORMAT = "iortd-audit-log/1"
TREE = "rfc6962"  # a checkpoint entry's data.tree: its note is a tree checkpoint
CLOCK_STEP_LIMIT_NS = 1_000_000_000
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0

log = structlog.get_logger("iortd.audit")


class AuditLogClosed(RuntimeError):
    pass


class Entry(NamedTuple):
    """An appended entry; ``committed`` resolves once it is fsync'd."""

    seq: int
    hash: str
    type: str
    ts: str
    committed: asyncio.Future[None]


class AuditLog(SegmentWriting):
    """One writer per log directory. Build with :meth:`open`; run :meth:`run` as a task."""

    def __init__(
        self,
        directory: Path,
        *,
        origin: str,
        head_seq: int,
        head_hash: str,
        segment: OpenSegment | None,
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
        self._chain = ChainHead(head_seq, head_hash)  # the head and the next line
        self._segment = segment
        self._window = group_commit_s
        self._max = rotate_max_bytes
        self.signer = signer
        # Set by the owner (the daemon): the alarm on every channel it has; retention's wake
        # at a roll (in the writer's thread); metrics at a commit (entries, bytes, start).
        self.on_failure = on_failure
        self.on_recovered = on_recovered
        # Told of each failed attempt too, after on_failure (health: the writer iterates).
        self.failure_watchers: list[Callable[[OSError], None]] = []
        self.on_rotate: Callable[[], None] = lambda: None
        self.archive_root: Path | None = None  # the configured archive (retention sets it)
        self.on_commit: Callable[[int, int, float], None] = lambda n, size, t0: None
        self._wall_ns = wall_ns
        self._mono = mono
        self._pending: list[_Pending] = []
        self._batch_future: asyncio.Future[None] | None = None
        self._lock_fd: int | None = None
        self._checkpointing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._urgent = self._closing = self._closed = self._running = False
        self._done = asyncio.Event()
        self._oldest_pending = 0.0
        self._clock_base = (mono(), wall_ns())
        self.committed_seq = head_seq
        self._committed_hash = head_hash
        self.spill_dir: Path | None = None  # where close() keeps what it cannot write
        self._seal_due = False  # never at open (see the module doc)
        self._cp_note: str | None = None  # a checkpoint note still to write to its file
        self._cp_file_lock = threading.Lock()
        self.failing_since: float | None = None
        # The Merkle frontier after every appended entry, and after the committed ones
        # (what the seal signs); None: chain-head checkpoints (module doc).
        self.frontier: Frontier | None = None
        self._committed_frontier: Frontier | None = None

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
        lock_fd = await asyncio.to_thread(lock_directory, directory)
        verifier = None if signer is None else signer.verifier
        try:
            segment, report = await asyncio.to_thread(
                recover, directory, origin, verifier, accept_rollback, spill_dir
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
        if verifier is not None:
            frontier, how = await load_frontier(
                directory,
                verifier=verifier,
                vouched_by=report.vouched_by,
                vouched=report.vouched_count,
                size=report.last_seq + 1,
                head=report.last_hash,
            )
            if frontier is None:
                log.warning("audit_merkle_frontier_unavailable", why=how)
            else:
                self.frontier, self._committed_frontier = frontier, frontier.copy()
                if how != "seal" and frontier.size:  # a whole log read: say so, once
                    log.info("audit_merkle_frontier", size=frontier.size, source=how)
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
        return self._chain.seq, self._chain.hash

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
        line, digest, ts, date = self._chain.next_line(type, data, delivery_id, now_mono, now_wall)
        seq = self._chain.seq
        if self.frontier is not None:
            leaf = hashlib.sha256(b"\x00")
            leaf.update(memoryview(line)[:-1])  # the line without its newline
            self.frontier.append(leaf.digest())
        # One future per group commit, shared by every entry in it: entries are durable
        # together, and a future per sample would be most of the cost of appending one.
        fut = self._batch_future
        if fut is None:
            fut = self._batch_future = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(_Pending(seq, date, line, fut, durable, digest))
        if durable:
            self._urgent = True
        self._wake.set()
        return Entry(seq, digest, type, ts, fut)

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
                    "expected_wall": self._chain.ts(wall0 + (now_mono - mono0))[0],
                    "actual_wall": self._chain.ts(now_wall)[0],
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
        ext = (f"time {self._chain.ts(now_wall)[0]}", f"reason {reason}")
        data: dict[str, Any] = {"count": seq + 1, "head": head}
        root = None
        if self.frontier is not None:
            root = self.frontier.root().hex()
            data |= {"root": root, "tree": TREE}
        note = Checkpoint(self.origin, seq + 1, head, ext, root).signed(self.signer)
        entry = self._append(
            "checkpoint",
            {"note": note, **data},
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
        args = (self.directory, seq, self.origin, self.archive_root)
        return await find_hash(*args)

    async def _spill(self, lost: list[_Pending]) -> None:
        """Keep entries that could not be written outside the log directory (spill.py)."""
        if self.spill_dir is not None:
            await spill_entries(self.spill_dir, self.origin, [(p.seq, p.line) for p in lost])

    def _side_due(self) -> bool:
        return self._cp_note is not None or (self._seal_due and self.signer is not None)

    def _write_side_files(self, count: int, head: str, ts: str, frontier: Frontier | None) -> None:
        """Runs in a worker thread: the seal over (count, head; the root and frontier at
        count when there is one), dated ``ts`` (the log's own wall clock, read on the
        loop), then the checkpoint file if one is due. Each is replaced atomically (temp
        file, fsync, rename, fsync dir)."""
        signer = self.signer
        if self._seal_due and signer is not None:
            ext: tuple[str, ...] = (f"time {ts}", "reason seal")
            root = None
            if frontier is not None and frontier.size == count:
                root = frontier.root().hex()
                ext += (frontier_line(frontier),)
            note = Checkpoint(self.origin, count, head, ext, root).signed(signer)
            write_anchor(self.directory, SEAL_FILE, note)
            self._seal_due = False
        self._write_checkpoint_file()

    def _write_checkpoint_file(self) -> None:
        """Runs in a worker thread: the checkpoint file, if one is due (one writer at a
        time: the checkpoint call and the writer's retry share checkpoint.tmp)."""
        with self._cp_file_lock:
            cp = self._cp_note
            if cp is not None:
                write_anchor(self.directory, CHECKPOINT_FILE, cp)
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
                tree = self._tree_at(batch)
                self._batch_future = None  # later appends belong to the next commit
                self._urgent = False
                t0 = time.monotonic()  # an observer (on_commit) gets entries, bytes and t0
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except _PartialWrite as failed:
                    exc = failed.error
                    # Nothing is dropped and nothing written twice: what did not reach
                    # the disk goes back in front of newer entries.
                    if failed.written:
                        self.committed_seq = batch[failed.written - 1].seq
                        self._committed_hash = batch[failed.written - 1].hash
                        self._commit_tree(batch[: failed.written], None)
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
                self._commit_tree(batch, tree)
                self._seal_due = True
                self.on_commit(len(batch), sum(len(p.line) for p in batch), t0)
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
                    None if self._committed_frontier is None else self._committed_frontier.copy(),
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

    def _tree_at(self, batch: list[_Pending]) -> Frontier | None:
        """The frontier after ``batch`` (every pending entry): a copy, taken as the batch
        is, since appends go on while it is written."""
        f = self.frontier
        return None if f is None or f.size != batch[-1].seq + 1 else f.copy()

    def _commit_tree(self, written: list[_Pending], tree: Frontier | None) -> None:
        """The committed frontier after ``written`` reached the disk: ``tree`` when the
        whole batch did, else the written entries' leaves added one by one (a failed
        write: rare, and at most one batch)."""
        if tree is not None:
            self._committed_frontier = tree
        elif self._committed_frontier is not None:
            for p in written:
                self._committed_frontier.append(hashlib.sha256(b"\x00" + p.line[:-1]).digest())

    def _failed(self, exc: OSError, what: str) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        log.critical(
            "audit_log_write_failed", error=str(exc), what=what, pending=len(self._pending)
        )
        for told in (self.on_failure, *self.failure_watchers):
            if told is not None:
                told(exc)

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
            tree = self._tree_at(batch)
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except _PartialWrite as failed:
                self._commit_tree(batch[: failed.written], None)
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
            self._commit_tree(batch, tree)
            self._seal_due = True
        if self._side_due():
            await self._side_files()  # once: a failure is logged and alarmed, not raised
