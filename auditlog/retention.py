"""Segment retention: a disk budget for the log directory, an archive, and alarms.

:class:`RetentionManager` runs as a task of the daemon (daemon/app.py), off the delivery
loop: a round at most every ``interval_s`` and after each segment roll (the writer's
``on_rotate``), its blocking work (reading, checking, hashing, copying, deleting) in a
worker thread, one round at a time and bounded by :data:`ROUND_TIMEOUT_S`. A round that
fails is logged and tried again at the next one. It never blocks the poll loops or the
writer, and it never stops the record: a full budget with no archive only raises alarms.

Each round:

1. **archives** every closed segment (every segment but the newest, which the writer
   appends to, also after a restart) that is not in the archive yet, oldest first, through
   the steps of archive.py (checked, copied to a temporary name, fsync'd, renamed, read
   back and compared);
2. when the directory has reached ``warn_fraction`` of the budget, **deletes** the oldest
   local segments until it is under ``keep_fraction`` of it (so that a working archive
   keeps it below the warning), each only if ALL of: it verified (its chain, and its links
   to the segments on both sides), it is in the archive with the same bytes (both read
   again just before), the ``checkpoint`` file signed by this daemon's key covers it and
   the entry that checkpoint names is in a later local segment (recovery checks it there
   at the next start), and no open delivery has entries in it (the delivery the log shows
   open, found as recovery finds it: carryover.py, across restarts). Only the oldest
   segments go, with no hole: the local log is always a contiguous tail of the whole;
3. **records and alarms** (entries in the log, an operational log line, a notice to every
   sink: the MQTT ``events`` topic and the dashboard's banner): a change of level (``ok``,
   ``warning`` at ``warn_fraction``, ``budget_reached`` at the budget), the archive failing
   and working again, and what it archived and deleted (names, seqs, SHA-256). No path of
   a segment is recorded: segment names hold seqs and dates only.

Without an archive directory nothing is ever deleted, and without a signing key neither
(a deletion needs a signed checkpoint). :meth:`RetentionManager.status` gives a
:class:`RetentionStatus` for health and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.auditlog.archive import (
    ArchiveError,
    SegInfo,
    archive_dir_for,
    archive_segment,
    check_segment,
    crash_point,
    delete_segment,
    errno_text,
    last_entry,
)
from iortd.auditlog.carryover import open_delivery
from iortd.auditlog.logdir import (
    CHECKPOINT_FILE,
    entry_seq,
    hash_at,
    read_anchor,
    read_segment,
    segment_paths,
)
from iortd.auditlog.marker import write_marker
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.writer import AuditLog, AuditLogClosed

__all__ = ["ROUND_TIMEOUT_S", "RetentionManager", "RetentionSettings", "RetentionStatus"]

ROUND_TIMEOUT_S = 600.0  # a round copies at most a few segments; a hung share must not stall
STOP_WAIT_S = 2.0  # how long a stop waits for a round in its thread to notice it

log = structlog.get_logger("iortd.retention")


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    budget_bytes: int
    warn_fraction: float = 0.8
    keep_fraction: float = 0.7
    archive_dir: Path | None = None  # None: nothing is ever deleted
    archive_mount_required: bool = True  # an unmounted share is an unreachable archive
    interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RetentionStatus:
    """What health and metrics publish (a copy: read it any time from the loop)."""

    used_bytes: int = 0
    budget_bytes: int = 0
    warn_bytes: int = 0
    level: str = "ok"  # "ok", "warning" (at warn_fraction), "budget_reached"
    local_segments: int = 0
    oldest_local_segment: str | None = None
    unarchived_segments: int = 0  # closed segments not yet in the archive
    archive_configured: bool = False
    last_archive_error: str | None = None  # None once the archive works again
    last_round_error: str | None = None  # a segment that does not verify, a round too long
    last_round_at: float | None = None  # time.time() of the last finished round
    archived_total: int = 0  # by this run
    deleted_total: int = 0  # by this run


@dataclass(slots=True)
class RoundResult:
    used_bytes: int = 0
    local_segments: int = 0
    oldest_local: str | None = None
    unarchived: int = 0
    archived: list[SegInfo] = field(default_factory=list)
    deleted: list[SegInfo] = field(default_factory=list)
    archive_error: str | None = None
    problem: str | None = None  # a segment that does not verify: nothing past it is touched
    dest: Path | None = None  # the log's archive directory, when usable
    # (segment, what was checked, the first seq of the segment after it): may be deleted
    deletable: list[tuple[Path, SegInfo, int]] = field(default_factory=list)


def dir_bytes(log_dir: Path) -> int:
    """Bytes of the regular files in the log directory and its quarantine/ (never
    following a link)."""
    total = 0
    for d in (log_dir, log_dir / "quarantine"):
        try:
            names = list(os.scandir(d))
        except OSError:
            continue
        for e in names:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


class _Work:
    """The blocking side: one round at a time, in a worker thread. Caches what it checked
    (by name, size and inode: a closed segment never changes) between rounds."""

    def __init__(self, log_dir: Path, origin: str, verifier: Verifier | None) -> None:
        self.log_dir = log_dir
        self.origin = origin
        self.verifier = verifier
        self.stop = threading.Event()
        self._checked: dict[str, tuple[tuple[int, int], SegInfo, str]] = {}
        self._archived: set[str] = set()  # names whose copy was compared equal

    def round(self, s: RetentionSettings) -> RoundResult:
        res = RoundResult()
        segs = segment_paths(self.log_dir)
        res.used_bytes = dir_bytes(self.log_dir)
        res.local_segments = len(segs)
        res.oldest_local = segs[0].name if segs else None
        closed = segs[:-1]
        dest: Path | None = None
        if s.archive_dir is not None:
            try:
                dest = self._archive_ready(s)
            except OSError as exc:
                res.archive_error = errno_text(exc)
            except ArchiveError as exc:
                res.archive_error = str(exc)
        checked: list[tuple[Path, SegInfo]] = []
        prev: tuple[int, str] | None = None
        for i, path in enumerate(closed):
            if self.stop.is_set():
                break
            copy = dest is not None and res.archive_error is None
            try:
                if prev is None and int(path.name[4:20]) != 0:
                    prev = self._archived_before(path.name, dest)
                info, data = self._check(path, prev, segs[i + 1], copy)
                if dest is not None and copy and path.name not in self._archived:
                    try:
                        if archive_segment(info, data, dest):
                            res.archived.append(info)
                        self._archived.add(path.name)
                    except OSError as exc:
                        res.archive_error = errno_text(exc)
            except (ArchiveError, OSError) as exc:
                res.problem = str(exc)
                break
            prev = (info.last_seq, info.last_hash)
            checked.append((path, info))
        res.unarchived = sum(1 for p in closed if p.name not in self._archived)
        res.dest = dest
        if (
            dest is not None
            and res.archive_error is None
            and res.used_bytes >= s.warn_fraction * s.budget_bytes
        ):
            self._plan_deletion(s, res, checked, segs)
        return res

    def _archive_ready(self, s: RetentionSettings) -> Path | None:
        root = s.archive_dir
        if root is None:
            return None
        if s.archive_mount_required and not os.path.ismount(root):
            raise ArchiveError(
                "the archive directory is not a mount point (the share is not mounted)"
            )
        dest = archive_dir_for(root, self.origin)
        dest.mkdir(parents=True, exist_ok=True)
        if not os.access(dest, os.W_OK | os.X_OK):
            raise ArchiveError("the archive directory is not writable by the daemon")
        return dest

    def _check(
        self, path: Path, prev: tuple[int, str] | None, nxt: Path, copy: bool
    ) -> tuple[SegInfo, bytes]:
        """Checked once (a closed segment never changes: by name, inode and size); read
        again when its bytes are needed for a copy."""
        st = os.lstat(path)
        key = (st.st_ino, st.st_size)
        hit = self._checked.get(path.name)
        if (
            hit is not None
            and hit[0] == key
            and (prev is None or prev[1] == hit[2])
            and not (copy and path.name not in self._archived)
        ):
            return hit[1], b""
        info, data = check_segment(path, prev, nxt)
        self._checked[path.name] = (key, info, "" if prev is None else prev[1])
        return info, data

    def _archived_before(self, name: str, dest: Path | None) -> tuple[int, str]:
        """The last entry of the archived segment before the first local one ``name``."""
        if dest is None:
            raise ArchiveError(f"{name}: the segments before it are gone and no archive is set")
        before = [p for p in segment_paths(dest) if p.name < name] if dest.is_dir() else []
        if not before:
            raise ArchiveError(f"{name}: the segment before it is in neither place")
        return last_entry(before[-1])

    def _covered_count(self, segs: list[Path]) -> int:
        """Entries the checkpoint file covers, when it is signed by this daemon's key, for
        this log, and its head is the log's entry there (0 otherwise)."""
        if self.verifier is None:
            return 0
        try:
            text = read_anchor(self.log_dir / CHECKPOINT_FILE)
            if text is None:
                return 0
            cp, signed = Checkpoint.parse_verified(text, self.verifier)
        except NoteError:
            return 0
        if not signed or cp.origin != self.origin or cp.count < 1:
            return 0
        return cp.count if hash_at(segs, cp.count - 1) == cp.head_hash else 0

    def _plan_deletion(
        self,
        s: RetentionSettings,
        res: RoundResult,
        checked: list[tuple[Path, SegInfo]],
        segs: list[Path],
    ) -> None:
        """The oldest segments that may go (see the module doc), as many as bring the
        directory under keep_fraction of the budget; none is deleted here."""
        covered = self._covered_count(segs)
        floor = open_delivery_floor(segs)
        used = res.used_bytes
        for i, (path, info) in enumerate(checked):
            if used <= s.keep_fraction * s.budget_bytes:
                return
            if path.name not in self._archived or info.last_seq >= covered - 1:
                return  # not archived, or not covered with its checkpoint's entry kept
            if floor is not None and info.last_seq >= floor:
                return  # an open delivery has entries here
            res.deletable.append((path, info, int(segs[i + 1].name[4:20])))
            used -= info.size

    def delete(self, res: RoundResult, dest: Path) -> RoundResult:
        """Delete what the round planned (recorded in the log first, by the manager), each
        checked again against its archived copy; stops at the first that cannot go."""
        crash_point("renamed-before-delete")
        for path, info, next_first in res.deletable:
            if self.stop.is_set():
                break
            try:
                write_marker(self.log_dir, self.origin, dest, next_first)
                delete_segment(path, info, dest / path.name)
            except OSError as exc:
                res.archive_error = errno_text(exc)
                break
            except ArchiveError as exc:
                res.problem = str(exc)
                self._archived.discard(path.name)
                break
            self._checked.pop(path.name, None)
            res.deleted.append(info)
            res.used_bytes -= info.size
            res.local_segments -= 1
        res.oldest_local = next((p.name for p in segment_paths(self.log_dir)), None)
        return res


def open_delivery_floor(segs: list[Path]) -> int | None:
    """The seq of the ``delivery_started`` of the delivery the log shows open (as recovery
    would take it over), or None when none is open."""
    did = open_delivery(segs)[0]
    if did is None:
        return None
    needle = b'"delivery_id":' + orjson.dumps(did)
    for path in reversed(segs):
        for raw in reversed(read_segment(path).splitlines()):
            if raw.endswith(b'"type":"delivery_started"}') and needle in raw:
                return entry_seq(raw)
    return 0  # open, its start not found locally: keep everything


class RetentionManager:
    """The daemon's retention task (see the module doc). ``notice(severity, message)``
    reaches every sink (the daemon's notices: MQTT ``events``, the dashboard)."""

    def __init__(
        self,
        audit: AuditLog,
        settings: RetentionSettings,
        *,
        notice: Callable[[str, str], None] | None = None,
    ) -> None:
        self._audit = audit
        self.settings = settings
        self._notice = notice
        verifier = None if audit.signer is None else audit.signer.verifier
        self._work = _Work(audit.directory, audit.origin, verifier)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._round: asyncio.Task[RoundResult] | None = None
        self._status = RetentionStatus(
            budget_bytes=settings.budget_bytes,
            warn_bytes=int(settings.warn_fraction * settings.budget_bytes),
            archive_configured=settings.archive_dir is not None,
        )
        self._archive_failing_since: float | None = None

    def status(self) -> RetentionStatus:
        return self._status

    def wake(self) -> None:
        """Run a round now (a segment rolled)."""
        self._wake.set()

    def wake_threadsafe(self) -> None:
        """:meth:`wake` from another thread (the writer's, at a roll)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop``: at once, then every ``interval_s`` and at each wake."""
        self._loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._one_round(stopping)
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.interval_s):
                        waker = asyncio.create_task(self._wake.wait())
                        try:
                            await asyncio.wait({waker, stopping}, return_when=FIRST_COMPLETED)
                        finally:
                            waker.cancel()
        finally:
            stopping.cancel()
            self._work.stop.set()  # a round still in its thread ends at its next step
            if self._round is not None and not self._round.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._round), STOP_WAIT_S)

    async def run_once(self) -> RoundResult | None:
        """One round and what it found (for tests and for the first round)."""
        return await self._one_round(None)

    async def _one_round(self, stopping: asyncio.Task[Any] | None) -> RoundResult | None:
        res = await self._in_thread(self._work.round, stopping, self.settings)
        if res is not None and res.archived:
            self._append("segments_archived", {"segments": [_seg(i) for i in res.archived]})
            log.info("segments_archived", count=len(res.archived))
        if res is not None and res.deletable and res.dest is not None:
            # The record first: what is about to leave the directory, and its SHA-256.
            names = [_seg(info) for _, info, _ in res.deletable]
            try:
                entry = self._audit.append("segments_deleted", {"segments": names}, durable=True)
                async with asyncio.timeout(ROUND_TIMEOUT_S):
                    await entry.committed
            except (AuditLogClosed, TimeoutError):
                res.deletable.clear()  # not recorded: not deleted
            if res.deletable:
                res = await self._in_thread(self._work.delete, stopping, res, res.dest)
        if res is not None:
            self._report(res)
        return res

    async def _in_thread(
        self, fn: Callable[..., RoundResult], stopping: asyncio.Task[Any] | None, *args: Any
    ) -> RoundResult | None:
        """``fn`` in a worker thread, one at a time, bounded by ROUND_TIMEOUT_S; None if
        it failed, is still running (a hung share: never a second one beside it) or the
        daemon is stopping."""
        if (self._round is not None and not self._round.done()) or (
            stopping is not None and stopping.done()
        ):
            return None
        self._round = asyncio.create_task(asyncio.to_thread(fn, *args))
        waits: set[asyncio.Future[Any]] = {self._round}
        if stopping is not None:
            waits.add(stopping)
        done, _ = await asyncio.wait(waits, timeout=ROUND_TIMEOUT_S, return_when=FIRST_COMPLETED)
        if self._round not in done:
            if stopping is None or stopping not in done:
                self._status = replace(
                    self._status,
                    last_round_error=f"a round took over {ROUND_TIMEOUT_S:g} s (a hung share?)",
                )
                log.error("retention_round_timeout", timeout_s=ROUND_TIMEOUT_S)
            return None
        try:
            return self._round.result()
        except Exception as exc:
            log.exception("retention_round_failed")
            self._status = replace(self._status, last_round_error=f"{type(exc).__name__}: {exc}")
            return None

    def _report(self, res: RoundResult) -> None:
        s, old = self.settings, self._status
        level = (
            "budget_reached"
            if res.used_bytes >= s.budget_bytes
            else "warning"
            if res.used_bytes >= s.warn_fraction * s.budget_bytes
            else "ok"
        )
        self._status = replace(
            old,
            used_bytes=res.used_bytes,
            level=level,
            local_segments=res.local_segments,
            oldest_local_segment=res.oldest_local,
            unarchived_segments=res.unarchived,
            last_archive_error=res.archive_error,
            last_round_error=res.problem,
            last_round_at=time.time(),
            archived_total=old.archived_total + len(res.archived),
            deleted_total=old.deleted_total + len(res.deleted),
        )
        figures = {
            "used_bytes": res.used_bytes,
            "budget_bytes": s.budget_bytes,
            "warn_bytes": self._status.warn_bytes,
            "local_segments": res.local_segments,
            "unarchived_segments": res.unarchived,
            "archive": "not configured"
            if s.archive_dir is None
            else ("unreachable" if res.archive_error else "ok"),
            "archive_error": res.archive_error,
        }
        if res.deleted:
            log.info("segments_deleted", count=len(res.deleted), used_bytes=res.used_bytes)
        if res.problem and res.problem != old.last_round_error:
            log.critical("retention_segment_not_verified", why=res.problem)
            self._append("retention_blocked", {"why": res.problem})
            self._say("critical", f"audit log retention stopped: {res.problem}")
        self._archive_change(res, old, figures)
        if level != old.level:
            self._level_change(level, old.level, figures)

    def _archive_change(
        self, res: RoundResult, old: RetentionStatus, figures: dict[str, Any]
    ) -> None:
        if res.archive_error and res.archive_error != old.last_archive_error:
            if self._archive_failing_since is None:
                self._archive_failing_since = time.monotonic()
            log.error("archive_failed", error=res.archive_error, unarchived=res.unarchived)
            self._append("archive_failed", figures)
            self._say(
                "critical",
                f"audit log archive unreachable ({res.archive_error}): {res.unarchived} "
                "closed segment(s) not archived; nothing unarchived is deleted",
            )
        elif res.archive_error is None and self._archive_failing_since is not None:
            outage = time.monotonic() - self._archive_failing_since
            self._archive_failing_since = None
            log.warning("archive_recovered", outage_s=round(outage, 3))
            self._append("archive_recovered", {**figures, "outage_s": round(outage, 3)})
            self._say("info", f"audit log archive reachable again after {outage:.0f} s")

    def _level_change(self, level: str, before: str, figures: dict[str, Any]) -> None:
        mb = figures["used_bytes"] / 1e6
        budget_mb = self.settings.budget_bytes / 1e6
        if level == "ok":
            log.warning("storage_ok", **figures)
            self._append("storage_ok", {**figures, "was": before})
            self._say("info", f"audit log disk use back to {mb:.0f} MB of {budget_mb:.0f} MB")
            return
        kind = "storage_budget_reached" if level == "budget_reached" else "storage_warning"
        log.critical(kind, **figures)
        self._append(kind, figures)
        what = "has reached its budget" if level == "budget_reached" else "is nearing its budget"
        self._say(
            "critical",
            f"audit log disk use {what}: {mb:.0f} MB of {budget_mb:.0f} MB; "
            f"{figures['unarchived_segments']} segment(s) not archived (archive: "
            f"{figures['archive']}). Recording goes on; free space or fix the archive",
        )

    def _append(self, kind: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(AuditLogClosed):
            self._audit.append(kind, data, durable=True)

    def _say(self, severity: str, message: str) -> None:
        if self._notice is not None:
            self._notice(severity, message)


def _seg(info: SegInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "first_seq": info.first_seq,
        "last_seq": info.last_seq,
        "bytes": info.size,
        "sha256": info.sha256,
    }
