"""Liveness, readiness and status of the running daemon, and the systemd supervisor task.

One notion of progress serves the systemd watchdog, ``GET /healthz`` and the metrics
(docs/operations.md, "systemd notify and watchdog"):

* every **device loop** is back within the bound it announced before its last await
  (daemon/progress.py). An offline device is not a lack of progress: its loop iterates
  (connect attempts, backoff waits). A driver call that ignores its cancellation, or a
  loop that never gets the event loop back, is.
* the **audit writer** makes progress: entries are pending (appended, not yet committed)
  for at most ``WRITER_STALL_S`` without the committed head moving, unless the writer
  reported a failed attempt within that time. A failing disk is a writer that iterates
  (it retries with capped backoff, like an offline device): it makes the daemon *not
  ready*, never *not alive*; a kill by the watchdog would lose what the writer still holds
  in memory, which its own stop spills to disk (auditlog/spill.py). A write or fsync
  that never returns is a lack of progress. An idle writer is fine.
* the event loop itself: the pings come from a task on it, so a blocked loop sends none.

**Ready** (``/readyz``; ``READY=1`` is sent the first time it holds): the audit log is
open, the loops are started, this run's start (``daemon_start``) is on disk, the writer's
last attempt succeeded, it makes progress, and the daemon is not stopping. The broker is
not part of it: MQTT down is a sink behind, which its outbox catches up.

:func:`supervise` is the task that talks to systemd while the daemon runs: ``READY=1``
(with the first status) once ready, ``STATUS=`` when the one-line status changes,
``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` while the daemon is alive and nothing while it
is not (systemd then kills and restarts it); ``daemon_not_alive`` (critical, with the
reasons) and ``daemon_alive_again`` in the operational log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from iortd.auditlog.writer import AuditLog
from iortd.daemon.config import Config
from iortd.daemon.progress import DeviceProgress
from iortd.daemon.tracker import DeliveryTracker
from iortd.kernel.sdnotify import Notifier
from iortd.kernel.version import __version__

__all__ = ["STATUS_EVERY_S", "WRITER_STALL_S", "Health", "WriterWatch", "supervise"]

log = structlog.get_logger("iortd")

# How long entries may wait for a commit, with the head not moving and no failed attempt
# reported, before the writer counts as stuck: a group commit takes milliseconds (50 ms
# window + fsync); a slow card a second or two.
WRITER_STALL_S = 10.0
# How often the supervisor looks (and sends STATUS= when it changed) without a watchdog.
STATUS_EVERY_S = 1.0
# Until ready, look more often: READY=1 follows the first commit of the run's start closely.
READY_POLL_S = 0.05


class WriterWatch:
    """Whether the audit writer makes progress, from what it shows in public: its head,
    its committed head, and the failed attempts it reports (:meth:`failed`)."""

    def __init__(
        self, audit: AuditLog, *, stall_s: float = WRITER_STALL_S, clock: Callable[[], float]
    ) -> None:
        self._audit = audit
        self._stall_s = stall_s
        self._clock = clock
        self._committed = audit.committed_seq
        self._moved = clock()  # the last time the writer was seen to make progress

    def failed(self) -> None:
        """The writer reports a failed attempt: it is iterating (retrying with backoff)."""
        self._moved = self._clock()

    def stalled_s(self, now: float | None = None) -> float:
        """How long entries have waited with no progress (0 when idle or moving)."""
        now = self._clock() if now is None else now
        audit = self._audit
        committed = audit.committed_seq
        if committed != self._committed or audit.head[0] == committed:
            self._committed = committed
            self._moved = now
        return max(0.0, now - self._moved)

    def stuck(self, now: float | None = None) -> str | None:
        stalled = self.stalled_s(now)
        if stalled <= self._stall_s:
            return None
        waiting = self._audit.head[0] - self._audit.committed_seq
        return f"audit writer: {waiting} entries waiting {stalled:.0f} s for a commit"


class Health:
    """The daemon's health as the endpoints and systemd see it; reads, never changes,
    the service's state. ``started``/``stopping`` are set by the composition root."""

    def __init__(
        self,
        config: Config,
        audit: AuditLog,
        tracker: DeliveryTracker,
        devices: Sequence[DeviceProgress],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.audit = audit
        self.tracker = tracker
        self.devices = list(devices)
        self.writer = WriterWatch(audit, clock=clock)
        self._clock = clock
        self._stale_s = {
            d.name: d.poll_interval_s * config.tolerances.stale_after_polls for d in config.devices
        }
        self.started = False  # the log is open and the device loops run (mark_started)
        self.stopping = False
        self._start_seq = 0  # the last entry of this run's start
        # Each failed attempt the writer reports says it iterates (retries), not that it is
        # stuck; the owner's on_failure (the service's alarm) is told as before.
        audit.failure_watchers.append(lambda exc: self.writer.failed())

    def mark_started(self) -> None:
        """The loops are started; the run's start entries are appended."""
        self._start_seq = self.audit.head[0]
        self.started = True

    def online(self, dev: DeviceProgress, now: float | None = None) -> bool:
        """Identified and read within ``stale_after_polls`` poll periods."""
        age = dev.age_s(now)
        return dev.connected and age is not None and age <= self._stale_s[dev.name]

    def liveness(self) -> list[str]:
        """Why the daemon is not making progress (empty: it is)."""
        now = self._clock()
        why = [
            f"device {d.name}: its loop is {d.overdue_s(now):.1f} s past its bound"
            for d in self.devices
            if d.wedged(now)
        ]
        stuck = self.writer.stuck(now)
        if stuck is not None:
            why.append(stuck)
        return why

    def readiness(self) -> list[str]:
        """Why the daemon is not ready (empty: it is). MQTT is never a reason."""
        if self.stopping:
            return ["stopping"]
        if not self.started:
            return ["starting"]
        why = []
        if self.audit.committed_seq < self._start_seq:
            why.append("starting: the start of this run is not on disk yet")
        since = self.audit.failing_since
        if since is not None:
            why.append(
                f"audit log: writes failing for {time.monotonic() - since:.0f} s (retrying; "
                "see the operational log's audit_log_write_failed)"
            )
        stuck = self.writer.stuck()
        if stuck is not None:
            why.append(stuck)
        return why

    def delivery(self) -> tuple[bool, str | None]:
        """(active, id): a delivery is active from its selection to its termination."""
        snap = self.tracker.snapshot()
        if snap is None:
            return False, None
        return snap.termination is None, snap.delivery_id

    def status(self) -> dict[str, Any]:
        now = self._clock()
        active, delivery_id = self.delivery()
        return {
            "ready": not self.readiness(),
            "phase": str(self.tracker.phase),
            "delivery_active": active,
            "delivery_id": delivery_id,
            "devices": {
                d.name: "online" if self.online(d, now) else "offline" for d in self.devices
            },
            "version": __version__,
        }

    def status_line(self) -> str:
        """One short line for ``systemctl status`` (no patient data: ids are the room's
        and the time's)."""
        active, delivery_id = self.delivery()
        online = sum(self.online(d) for d in self.devices)
        parts = [str(self.tracker.phase)]
        parts.append(f"delivery {delivery_id}" if active else "no delivery")
        parts.append(f"devices {online}/{len(self.devices)} online")
        if self.audit.failing_since is not None:
            parts.append("AUDIT LOG FAILING")
        return ", ".join(parts)


async def supervise(notifier: Notifier, health: Health, stop: asyncio.Event) -> None:
    """Until ``stop``: ``STATUS=`` on change; ``WATCHDOG=1`` at half the period while
    alive. Logs (once per change) why pings are withheld."""
    half = None if notifier.watchdog_s is None else notifier.watchdog_s / 2
    period = STATUS_EVERY_S if half is None else min(STATUS_EVERY_S, half)
    shown = ""
    alive = True
    ready = False
    next_ping = 0.0
    while not stop.is_set():
        line = health.status_line()
        if not ready and not health.readiness():
            notifier.ready(line)
            log.info("daemon_ready", status=line)
            ready = True
            shown = line
        elif line != shown:
            notifier.status(line)
            shown = line
        why = health.liveness()
        if alive and why:
            log.critical("daemon_not_alive", reasons=why, watchdog=notifier.watchdog_s is not None)
        elif not alive and not why:
            log.warning("daemon_alive_again")
        alive = not why
        now = time.monotonic()
        if alive and half is not None and now >= next_ping:
            notifier.watchdog()
            next_ping = now + half - period / 2  # a tick late is still within the period
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period if ready else READY_POLL_S):
                await stop.wait()
