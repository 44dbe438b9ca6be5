"""Segment retention: a disk budget for the log directory, an archive, and alarms.

:class:`RetentionManager` runs as a task of the daemon (daemon/app.py), off the delivery
loop: a round at once, then at most ``interval_s`` apart and after each segment roll (the
writer's ``on_rotate``). Its blocking work (reading, checking, hashing, copying, deleting:
retention_round.py, with the steps in archive.py) runs in a worker thread, one at a time,
each bounded by :data:`ROUND_TIMEOUT_S` (a hung share: an error, and no second round
beside it). The thread is a daemon thread of its own (kernel/threads.py), not asyncio's
default executor, which the end of ``asyncio.run`` and the interpreter's exit wait for: a
stop waits :data:`STOP_WAIT_S` for a round to notice it, then abandons it
(``retention_round_abandoned`` in the log) and the process exits in its bounded time. A
round that fails is logged and tried again at the next one. It never blocks the poll
loops or the writer, and never stops the record: a full budget with no archive only
raises alarms.

Each round:

1. **archives** every closed segment (every segment but the newest, which the writer
   appends to, also after a restart) not in the archive yet, oldest first: checked,
   copied to a temporary name, fsync'd, renamed, read back and compared (archive.py);
2. when the directory has reached ``warn_fraction`` of the budget, **plans** to delete the
   oldest local segments until it is under ``keep_fraction`` of it (so that a working
   archive keeps it below the warning), each only if ALL of: it verified (its chain, and
   its links to the segments on both sides), it is in the archive, the ``checkpoint``
   file signed by this daemon's key covers it and the entry that checkpoint names is in a
   later local segment (recovery checks it there at the next start), and no open delivery
   has entries in it (the delivery the log shows open, found as recovery finds it:
   carryover.py, across restarts). Only the oldest go, with no hole: the local log is
   always an unbroken run of the newest segments;
3. **records** the plan (``segments_deleted``, durable) and only then **deletes**, each
   segment and its archived copy read again first. On a disk that cannot be written (a
   full one) the entry cannot become durable; the deletion then goes ahead after
   :data:`FAILING_WAIT_S`, since it is what frees the space, and the entry, pending in the
   writer in its place, is written once it can be;
4. **alarms** (an entry, an operational log line and a notice to every sink: the MQTT
   ``events`` topic and the dashboard's banner) at a change of level (``ok``, ``warning``
   at ``warn_fraction``, ``budget_reached`` at the budget), when the archive fails and
   works again, and when a segment does not verify (``retention_blocked``). No path of a
   segment is recorded: segment names hold seqs and dates only.

Without an archive directory nothing is ever deleted, and without a signing key neither
(a deletion needs a signed checkpoint). :meth:`RetentionManager.status` gives a
:class:`RetentionStatus` for health and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from iortd.auditlog.archive import SegInfo
from iortd.auditlog.retention_round import RetentionSettings, RoundResult, Rounds
from iortd.auditlog.writer import AuditLog, AuditLogClosed
from iortd.kernel.threads import in_daemon_thread

__all__ = [
    "ROUND_TIMEOUT_S",
    "RetentionManager",
    "RetentionSettings",
    "RetentionStatus",
    "RoundResult",
]

ROUND_TIMEOUT_S = 600.0  # a round reads at most ROUND_BYTES; a hung share must not stall us
FAILING_WAIT_S = 5.0  # how long a deletion waits for its entry on a failing disk
SOON_S, SOON_TIMES = 1.0, 3  # after a round that found a roll in progress
STOP_WAIT_S = 2.0  # how long a stop waits for a round in its thread to notice it

log = structlog.get_logger("iortd.retention")


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
        audit.archive_root = settings.archive_dir  # hash_at reads archived entries there
        self._notice = notice
        verifier = None if audit.signer is None else audit.signer.verifier
        self._work = Rounds(audit.directory, audit.origin, verifier)
        self._wake = asyncio.Event()
        self.round_finished = asyncio.Event()  # set after each round (a reader clears it)
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
            # Never an error in the writer's thread: a loop already closed has no rounds.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop``: at once, then every ``interval_s`` and at each wake."""
        self._loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        soon = 0  # rounds in a row that found a roll in progress
        try:
            while not stop.is_set():
                self._wake.clear()
                res = await self._one_round(stopping)
                if res is not None and res.more:
                    continue  # more to do: the next round at once
                if stop.is_set():
                    return
                # Woken by a roll before the writer's first write to the new segment:
                # the segment it closed is archived by a round soon after (a few times;
                # on a disk that cannot be written the new one stays empty).
                soon = soon + 1 if res is not None and res.newest_empty else 0
                wait = SOON_S if 0 < soon <= SOON_TIMES else self.settings.interval_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        waker = asyncio.create_task(self._wake.wait())
                        try:
                            await asyncio.wait({waker, stopping}, return_when=FIRST_COMPLETED)
                        finally:
                            waker.cancel()
        finally:
            stopping.cancel()
            self._work.stop.set()  # a round still in its thread ends at its next step
            if self._round is not None and not self._round.done():
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await asyncio.wait_for(asyncio.shield(self._round), STOP_WAIT_S)
                    except TimeoutError:
                        # Hung in a step (a stalled share): abandoned. Its thread does not
                        # hold up the exit, and every step is safe to cut (archive.py).
                        log.error("retention_round_abandoned", waited_s=STOP_WAIT_S)  # noqa: TRY400 - no traceback to give

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
            except AuditLogClosed:
                res.deletable.clear()  # not recorded: not deleted
            else:
                if not await self._recorded(entry.committed):
                    res.deletable.clear()
            if res.deletable:
                # None: the deletion failed, is still running past the bound, or the
                # daemon is stopping; what it did is said by the next round.
                res = await self._in_thread(self._work.delete, stopping, res, res.dest)
        if res is not None:
            self._report(res)
            self.round_finished.set()
        return res

    async def _recorded(self, committed: asyncio.Future[None]) -> bool:
        """Whether the deletion may go ahead: its entry is on disk, or the log cannot be
        written at all (a full disk: then the entry waits in the writer, in its place
        before anything later, and the deletion is what lets it be written)."""
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while not committed.done():
            await asyncio.wait({committed}, timeout=FAILING_WAIT_S)
            if committed.done():
                break
            if self._audit.failing_since is not None:
                log.warning(
                    "retention_deleting_before_recorded",
                    why="the audit log cannot be written (a full disk?): its segments_deleted "
                    "entry is pending and is written once the space is freed",
                )
                return True
            if time.monotonic() > deadline:
                return False
        return True

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
        self._round = asyncio.create_task(in_daemon_thread(fn, *args, name="iortd-retention"))
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
        mb = figures["used_bytes"] / 2**20
        budget_mb = self.settings.budget_bytes / 2**20
        if level == "ok":
            log.warning("storage_ok", **figures)
            self._append("storage_ok", {**figures, "was": before})
            self._say("info", f"audit log disk use back to {mb:.1f} MiB of {budget_mb:.0f} MiB")
            return
        kind = "storage_budget_reached" if level == "budget_reached" else "storage_warning"
        log.critical(kind, **figures)
        self._append(kind, figures)
        what = "has reached its budget" if level == "budget_reached" else "is nearing its budget"
        self._say(
            "critical",
            f"audit log disk use {what}: {mb:.1f} MiB of {budget_mb:.0f} MiB; "
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
