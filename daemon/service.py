"""The running service: the tracker, the record and the sinks' queue, between the devices
and everything they are reported to.

Built by the composition root (daemon/app.py) once the audit log is open (and recovered)
and the sinks are built; the root runs its tasks in the daemon's one TaskGroup and its
device loops (daemon/device_loop.py) report to it as their :class:`DeviceHub`.

Start-up (:meth:`Service.record_start`): what recovery found is recorded first
(daemon/recovery.py: a crash, unvouched entries, spilled entries, an accepted rollback, a
wall clock behind the log, and the closure of any delivery started in the unvouched tail,
which cannot be taken over), before the run's first seal -> the newest of those closed is
handed to the tracker, so that a record the first reading starts with the console in a
delivery names it (``continues``) -> a delivery the log shows open (from vouched entries
only) is handed to the tracker (named in ``daemon_start``; the first reading decides whether
it continues; its gap starts at the last vouched entry, or at an earlier run's still-open
gap). Then the tasks: a stale-data watchdog (fed by every reply of the source through
``DriverContext.heard``), the checkpoint task (one signed at once, then at delivery ends
and every interval), the dispatcher and the notices. The MQTT sink asks the service whether
the log contains the broker's retained checkpoint before it overwrites it.

The record comes first: every event is appended to the audit log and fsync'd before any
other sink hears of it; samples are appended (and group-committed within the window)
before other sinks hear of them. Which readings become samples is the thinner's call
(:mod:`iortd.daemon.thinning`): every one around a delivery, a heartbeat and every change
while the room is idle, the reading held back before a change written first (also before
any event and at a stop); the other sinks still hear of every reading. A device loop
never waits for the disk: the dispatcher waits for durability and then tells the other
sinks, in order, each through a bounded queue and task of its own
(:mod:`iortd.daemon.sink_queue`), so that a slow sink delays only itself; what a sink's
queue drops is recorded (``sink_overflow``).

Readings go where the device's role says: the source's to the tracker (and its replies
keep the stale alarm off); its lost link makes the interlocks unknown. The applicator
reader's go to the tracker too (``on_applicator``: the applicator rules and the monitor's
own applicator interlock), are recorded as ``applicator_sample`` entries (log-first, like
the source's samples, with the displacement since beam-on, the delivery's peak and the
monitor's interlocks) and reach the sinks through ``Sink.applicator``; its lost link is a
gap of the reader only, and the source's record goes on.

With verification on (daemon/verifier.py), each source reading's events are shown to the
verifier: the checks it makes are recorded as events (log first), then ``prescription_used``.

At a stop (:meth:`record_stop`, :meth:`drain`): ``daemon_stop`` and a final checkpoint are
written within a bound, and the dispatcher drains within a bound; the root then closes the
sinks and the audit log, last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog

from iortd.auditlog.writer import AuditLog, AuditLogClosed, RecoveryReport
from iortd.daemon import __version__
from iortd.daemon.checkpoint_guard import guard_checkpoint
from iortd.daemon.config import DeviceConfig, LoadedConfig, tracker_settings
from iortd.daemon.device_loop import Reading
from iortd.daemon.entries import applicator_sample_entry, event_entry, plain, sample_entry
from iortd.daemon.recovery import close_unresumable, record_recovery, resumable
from iortd.daemon.sink_queue import QueuedSink, SinkLike, queued
from iortd.daemon.sinks import ApplicatorSample, Sample
from iortd.daemon.thinning import Thinner, policy_of, room_active
from iortd.daemon.tracker import (
    DeliverySnapshot,
    DeliveryTracker,
    Terminated,
    TrackerEvent,
)
from iortd.daemon.verification import public_object as public
from iortd.daemon.verifier import Verifier
from iortd.kernel.clock import Clock
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import ApplicatorReading, DeviceIdentity, DeviceState, SourceReading

__all__ = ["RunResult", "Service"]

log = structlog.get_logger("iortd")


def _ignore_heard(mono_ns: int) -> None:
    """Replies of a device the tracker does not watch for staleness."""


@dataclass
class RunResult:
    terminated: list[Terminated] = field(default_factory=list)
    link_losses: int = 0
    checkpoints: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Item:
    """One thing for the other sinks, released once ``durable`` is done."""

    durable: asyncio.Future[None] | None = None
    sample: Sample | None = None
    applicator: ApplicatorSample | None = None
    events: Sequence[TrackerEvent] = ()
    delivery: DeliverySnapshot | None = None  # the tracker's view after ``events``
    identified: tuple[str, DeviceIdentity] | None = None
    checkpoint: str | None = None


_END = _Item()


class Service:
    def __init__(
        self,
        loaded: LoadedConfig,
        clock: Clock,
        sinks: Sequence[SinkLike | QueuedSink],
        audit: AuditLog,
        recovery: RecoveryReport,
        *,
        stop_after_delivery: bool = False,
    ) -> None:
        self.config = loaded.config
        self._loaded = loaded
        self._clock = clock
        self._audit = audit
        self._recovery = recovery
        audit.on_failure = self._on_audit_failure
        audit.on_recovered = self._on_audit_recovered
        for sink in sinks:
            inner = sink.inner if isinstance(sink, QueuedSink) else sink
            if hasattr(inner, "checkpoint_guard"):  # the MQTT sink: the off-host copy
                inner.checkpoint_guard = partial(guard_checkpoint, audit, notice=self.notice)
            if hasattr(inner, "on_takeover"):  # the MQTT sink: its broker session lost
                inner.on_takeover = self.mqtt_session_taken_over
        # Each sink at its own pace, behind its own queue (daemon/sink_queue.py).
        self._sinks = [queued(s) for s in sinks]
        for q in self._sinks:
            q.on_overflow = self._sink_overflow
        self._stopped = False  # daemon_stop is written: nothing may follow it in the log
        self._stop_after_delivery = stop_after_delivery
        readers = tuple(d.name for d in self.config.devices if d.role == "applicator")
        self.tracker = DeliveryTracker(tracker_settings(self.config, clock.speed), readers)
        # Which readings become samples in the record (daemon/thinning.py).
        self.thinner = Thinner(policy_of(self.config.log))
        self.result = RunResult()
        # The verifier (daemon/verifier.py), set by the composition root when it is on.
        self.verifier: Verifier | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._checkpoint_due = asyncio.Event()
        self._delivery_ended = False
        self._notices: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._audit_failing = asyncio.Event()
        # The source on a line shared with other devices: how long it has waited for the
        # line (a running total, drivers/transport/shared.py), and that total when it was
        # last heard; its staleness pauses by the difference (its own missed turns count).
        self._line_waited: Callable[[int], int] | None = None
        self._waited_at_heard = 0

    # ---- the record ------------------------------------------------------------------

    def record_start(self) -> None:
        audit, rec = self._audit, self._recovery
        now = utc_ts(datetime.now(UTC))
        record_recovery(audit, rec, now)
        # Closed just now, whole record unvouched: the next record may continue the newest
        # of them in this daemon's own id form (the tracker decides on the first reading,
        # and says why). Others are never named: a forger may have written them.
        linked = next(
            (d for d in reversed(rec.unvouched_open_deliveries) if self.tracker.link_unvouched(d)),
            None,
        )
        if len(rec.unvouched_open_deliveries) > (linked is not None):
            log.warning(
                "unvouched_deliveries_not_linked",
                count=len(rec.unvouched_open_deliveries) - (linked is not None),
                why="not the newest in this daemon's delivery id form for this room",
            )
        resumed = resumable(rec)
        if resumed is None:
            close_unresumable(audit, rec, now)
        signer = audit.signer
        audit.append(
            "daemon_start",
            {
                "software_version": __version__,
                "pid": os.getpid(),
                "previous_stop": rec.previous_stop,
                "clock_speed": self._clock.speed,
                "verifier_key": None if signer is None else signer.verifier.text,
                # Taken over, not closed: the first reading decides (docs/audit-log.md).
                "open_delivery": None if resumed is None else resumed.delivery_id,
            },
            durable=True,
        )
        audit.append(
            "config_loaded",
            {
                "file": str(self._loaded.path),
                "sha256": self._loaded.sha256,
                "config": plain(self.config.model_dump(mode="json")),
            },
            durable=True,
        )
        if resumed is not None:
            now_ns, utc = self._clock.monotonic_ns(), self._clock.utc()
            events = self.tracker.resume(resumed, now_ns, utc)
            v, did = self.verifier, resumed.delivery_id
            check = None if v is None else v.latest(did)
            if v is not None and check is not None:  # its latest check (from the log) again
                pub = public(check, v.checked_at(did) or utc)
                events += self.tracker.on_verification(check, pub, now_ns, utc, True)
            self._emit(None, events)
            used = None if v is None else v.taken_over(did, resumed.beam_on_s)
            if used is not None:  # killed between its beam-on and this entry
                audit.append("prescription_used", used, delivery_id=did, durable=True)

    async def record_stop(self, timeout_s: float) -> None:
        """``daemon_stop`` and the last checkpoint, waited for up to ``timeout_s``: a
        failing disk must not hold the shutdown for ever. What is still pending is tried
        once more when the log is closed."""
        for sink in self._sinks:
            sink.report_overflow()  # every drop of this run is in the record before its end
        snap = self.tracker.snapshot()
        open_delivery = snap.delivery_id if snap is not None and snap.termination is None else None
        # The last reading of each device before the stop, if it was held back.
        for kind, data, did in self.thinner.flush("stop"):
            self._audit.append(kind, data, delivery_id=did)
        log.info("samples", recorded=self.thinner.recorded, not_recorded=self.thinner.thinned)
        self._stopped = True
        entry = self._audit.append(
            "daemon_stop",
            {"clean": True, "open_delivery": open_delivery},
            durable=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                note = await self._audit.checkpoint("shutdown")
                await asyncio.shield(entry.committed)
        except TimeoutError:
            log.critical("audit_log_not_flushed_at_shutdown", timeout_s=timeout_s)
            return
        if note is not None:
            self.result.checkpoints.append(note)
            self._queue.put_nowait(_Item(checkpoint=note))

    def _on_audit_failure(self, exc: OSError) -> None:
        """Called by the writer: the log cannot be written. Tell every other channel now,
        bypassing the queue (which waits for the very disk that is failing)."""
        self._audit_failing.set()
        self._notices.put_nowait(
            (
                "critical",
                f"audit log cannot be written: {exc}; retrying. Until it recovers, what is "
                "shown is NOT yet recorded",
            )
        )

    def mqtt_session_taken_over(self, data: Mapping[str, Any]) -> None:
        """Called by the MQTT sink: another client took over its broker session (the same
        client id). Recorded, and said on every channel: this room's live stream is
        interrupted, and someone is publishing with this daemon's identity or fighting it."""
        try:
            self._audit.append("mqtt_session_taken_over", dict(data))
        except AuditLogClosed:
            log.warning("mqtt_session_taken_over_not_recorded", reason="audit log closed")
        self._notices.put_nowait(
            (
                "critical",
                f"MQTT session taken over: {data.get('reason')} (client id "
                f"{data.get('client_id')}); this room's live stream is interrupted; next "
                f"attempt in {data.get('retry_in_s')} s",
            )
        )

    def _sink_overflow(self, data: Mapping[str, Any]) -> None:
        """Called by a sink's queue when it dropped calls: recorded, so that the record
        says which sink missed what (after ``daemon_stop``, only the operational log)."""
        if self._stopped:
            return
        try:
            self._audit.append("sink_overflow", dict(data))
        except AuditLogClosed:
            log.warning("sink_overflow_not_recorded", reason="audit log closed")

    def notice(self, severity: str, message: str) -> None:
        """Tell every sink now, out of band (``critical`` or ``info``): the retention task's
        alarms (auditlog/retention.py) reach MQTT ``events`` and the dashboard this way."""
        self._notices.put_nowait((severity, message))

    def _on_audit_recovered(self, outage_s: float) -> None:
        self._audit_failing.clear()
        self._notices.put_nowait(("info", f"audit log writable again after {outage_s:.1f} s"))

    # ---- the tasks the composition root runs -----------------------------------------

    async def notify(self) -> None:
        """Out-of-band notices to every sink, as they come (not through the queue)."""
        while True:
            severity, message = await self._notices.get()
            for sink in self._sinks:
                try:
                    await sink.notice(severity, message)
                except Exception:
                    log.exception("sink_failed", sink=sink.name)

    async def checkpoints(self, stop: asyncio.Event) -> None:
        """A signed checkpoint at every delivery end and every checkpoint interval; ends
        at ``stop`` once woken by :meth:`wake_checkpoints` (the shutdown writes the last)."""
        if self._audit.signer is None:
            return
        # Signed at once: a young log verifies with --pubkey from its first seconds.
        note = await self._audit.checkpoint("start")
        if note is not None:
            self.result.checkpoints.append(note)
            self._queue.put_nowait(_Item(checkpoint=note))
        interval = self.config.log.checkpoint_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._checkpoint_due.wait()
            self._checkpoint_due.clear()
            if self._delivery_ended:
                self._delivery_ended = False
                reason: str | None = "delivery_end"
            else:
                reason = None if stop.is_set() else "interval"
            if reason is not None:
                note = await self._audit.checkpoint(reason)
                if note is not None:
                    self.result.checkpoints.append(note)
                    self._queue.put_nowait(_Item(checkpoint=note))
            if stop.is_set():
                return  # the shutdown writes the last checkpoint

    def wake_checkpoints(self) -> None:
        self._checkpoint_due.set()

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Notices readings that stopped even while a driver call is still pending. It
        wakes when the data would become stale (``stale_after_polls`` poll periods after
        the last reading, not at the next tick after that), so the alarm comes on time."""
        period = self.config.source.poll_interval_s
        while not stop.is_set():
            wait = period
            stale_at = self.tracker.stale_at_ns(self._line_pause(self._clock.monotonic_ns()))
            if stale_at is not None:
                ahead_s = (stale_at - self._clock.monotonic_ns()) / 1e9 / self._clock.speed
                wait = min(period, max(ahead_s, 0.0) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            now = self._clock.monotonic_ns()
            events = self.tracker.on_tick(now, self._clock.utc(), self._line_pause(now))
            if events:
                self._emit(None, events)

    def source_shares_a_line(self, waited_ns: Callable[[int], int]) -> None:
        """The source is on a line shared with other devices; ``waited_ns(now)`` is the
        running total of its waits for the line (``LineView.waited_ns``)."""
        self._line_waited = waited_ns
        self._waited_at_heard = waited_ns(self._clock.monotonic_ns())

    def _line_pause(self, now_ns: int) -> int:
        """How long the source has waited for its shared line since it was last heard."""
        if self._line_waited is None:
            return 0
        return max(0, self._line_waited(now_ns) - self._waited_at_heard)

    # ---- what the device loops report (their DeviceHub) ------------------------------

    def heard(self, device: DeviceConfig) -> Callable[[int], None]:
        """What the device's driver calls at each good reply (``DriverContext.heard``)."""
        return self._source_heard if device.role == "source" else _ignore_heard

    def _source_heard(self, mono_ns: int) -> None:
        """A reply from the source, reported by its driver. A time in the future (a
        plug-in's bug) must not hold the stale alarm off: it counts as now at most."""
        now = self._clock.monotonic_ns()
        if self._line_waited is not None:
            self._waited_at_heard = self._line_waited(now)
        self.tracker.on_device_heard(min(mono_ns, now))

    def reading(self, device: DeviceConfig, reading: Reading) -> bool:
        if device.role == "applicator":
            self._applicator_reading(device, reading)
            return False
        if not isinstance(reading, SourceReading):
            # A plug-in's bug, as an unexpected error: it stops the daemon (as before).
            msg = f"device {device.name}: read() returned {type(reading).__name__}"
            raise TypeError(msg)
        if self._line_waited is not None:  # a reading is the device heard, too
            self._waited_at_heard = self._line_waited(self._clock.monotonic_ns())
        events = self.tracker.on_reading(reading)
        sample = Sample(
            device=device.name,
            reading=reading,
            delivery=self.tracker.snapshot(reading.mono_ns),
            interlocks=dict(self.tracker.interlocks),
            all_clear=self.tracker.all_clear,
        )
        self._emit(sample, events, active=self._room_active(reading.state))
        self._verify(events, reading)
        return self._stop_after_delivery and any(isinstance(e, Terminated) for e in events)

    def _applicator_reading(self, device: DeviceConfig, reading: Reading) -> None:
        if not isinstance(reading, ApplicatorReading):
            # A plug-in's bug, as an unexpected error: it stops the daemon (as for a source).
            msg = f"device {device.name}: read() returned {type(reading).__name__}"
            raise TypeError(msg)
        events = self.tracker.on_applicator(device.name, reading)
        view = self.tracker.applicator_view
        snap = self.tracker.snapshot(reading.mono_ns)
        open_id = snap.delivery_id if snap is not None and snap.termination is None else None
        sample = ApplicatorSample(
            device=device.name,
            reading=reading,
            delivery_id=open_id,
            displacement_from_beam_on_mm=None
            if view is None
            else view.displacement_from_beam_on_mm,
            peak_displacement_mm=None if view is None else view.peak_displacement_mm,
        )
        # Log-first, as a source's sample: its events (durable), then the sample itself,
        # when the thinner keeps it (daemon/thinning.py; the live sinks get every one).
        self._emit(None, events, quiet=True)
        spec = applicator_sample_entry(sample, self.tracker.monitor_interlocks)
        durable = None
        for kind, data, did in self.thinner.offer(
            spec, reading.mono_ns, active=self._room_active(None), events=bool(events)
        ):
            durable = self._audit.append(kind, data, delivery_id=did).committed
        self._queue.put_nowait(_Item(durable=durable, applicator=sample))

    def _room_active(self, console: DeviceState | None) -> bool:
        return room_active(self.tracker.snapshot(), self.tracker.phase, console)

    def link_lost(self, device: DeviceConfig, reason: str) -> None:
        self.result.link_losses += 1
        now, utc = self._clock.monotonic_ns(), self._clock.utc()
        if device.role == "applicator":
            # A gap of the reader only: the monitor's applicator interlock unknown.
            events = self.tracker.on_applicator_lost(device.name, now, utc, reason)
        else:
            events = self.tracker.on_link_lost(now, utc, reason)
        if events:
            self._emit(None, events)

    # ---- the record first, then the other sinks --------------------------------------

    def identified(self, device: str, identity: DeviceIdentity) -> None:
        data: dict[str, object] = {
            "device": device,
            "manufacturer": identity.manufacturer,
            "model": identity.model,
            "serial": identity.serial,
            "firmware": identity.firmware,
            "simulated": identity.simulated,
        }
        if identity.scenario:
            # A simulator playing a fault scenario: the record names the script.
            data["scenario"] = identity.scenario
        entry = self._audit.append("device_identified", data, durable=True)
        self._queue.put_nowait(_Item(durable=entry.committed, identified=(device, identity)))

    def _emit(
        self,
        sample: Sample | None,
        events: Sequence[TrackerEvent],
        *,
        quiet: bool = False,
        active: bool = True,
    ) -> asyncio.Future[None] | None:
        """Record first, then queue for the other sinks. Never waits for the disk.
        ``quiet``: nothing to queue when there are no events (the caller queues its own).
        ``active``: the room is active at this sample (the thinner records every one)."""
        ended = False
        for ev in events:
            if isinstance(ev, Terminated):
                self.result.terminated.append(ev)
                ended = True
        durable = None
        if events:
            # The readings held back before a change go before it (daemon/thinning.py).
            for kind, data, did in self.thinner.flush():
                self._audit.append(kind, data, delivery_id=did)
        pending = (
            []
            if sample is None
            else self.thinner.offer(
                sample_entry(sample, ended_now=ended),
                sample.reading.mono_ns,
                active=active or ended,
                events=bool(events),
            )
        )
        for ev in events:
            if pending and isinstance(ev, Terminated):
                # The sample that ends a delivery belongs to it: it goes before the end
                # entry, after which nothing names that delivery.
                for kind, data, did in pending:
                    self._audit.append(kind, data, delivery_id=did)
                pending = []
            # Every event names its delivery itself (None: the room's).
            kind, data, did = event_entry(ev, None)
            durable = self._audit.append(kind, data, delivery_id=did, durable=True).committed
        for kind, data, did in pending:
            self._audit.append(kind, data, delivery_id=did)
        if quiet and not events:
            return durable
        delivery = self.tracker.snapshot() if sample is None else sample.delivery
        self._queue.put_nowait(
            _Item(durable=durable, sample=sample, events=tuple(events), delivery=delivery)
        )
        if ended:
            self._delivery_ended = True
            self._checkpoint_due.set()
        return durable

    # ---- verification before beam-on (daemon/verifier.py) ----------------------------

    def record_check(self, entry: Mapping[str, Any]) -> asyncio.Future[None] | None:
        """One check as a ``verification`` entry (durable), its alarm and publication."""
        now, utc = self._clock.monotonic_ns(), self._clock.utc()
        return self._emit(None, self.tracker.on_verification(entry, public(entry, utc), now, utc))

    def _verify(self, events: Sequence[TrackerEvent], r: SourceReading) -> None:
        """After a source reading: the checks it calls for, the no-prescription alarm, and
        ``prescription_used`` at the first beam-on (durable), in that order."""
        if self.verifier is None:
            return
        try:
            checks, no_rx, used = self.verifier.follow(events, self.tracker)
        except Exception:  # a verifier's bug must never stop the monitoring
            log.exception("verification_failed")
            self.notice("critical", "verification failed on this reading (see the journal)")
            return
        for entry in checks:
            self.record_check(entry)
        if no_rx:
            self._emit(None, self.tracker.on_no_prescription(r.mono_ns, r.utc))
        if used is not None:
            self._audit.append(
                "prescription_used", used, delivery_id=used["delivery_id"], durable=True
            )

    async def _until_recorded(self, durable: asyncio.Future[None]) -> None:
        """Wait until the item is on disk, but not while the disk is failing: a display
        frozen with the door open is worse than one that shows what is not yet recorded
        (the critical notice has said so on every channel)."""
        if self._audit_failing.is_set():
            return
        failing: asyncio.Future[None] = asyncio.ensure_future(self._wait_failing())
        try:
            await asyncio.wait({durable, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failing.cancel()

    async def _wait_failing(self) -> None:
        await self._audit_failing.wait()

    async def dispatch(self) -> None:
        """Tell the other sinks, in order, once what they are told is in the record. A
        failing sink is logged and misses that item; it cannot stop the daemon."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if item.durable is not None and not item.durable.done():
                await self._until_recorded(item.durable)
            for sink in self._sinks:
                try:
                    if item.identified is not None:
                        await sink.started(*item.identified)
                    if item.events:
                        await sink.events(item.events, item.delivery)
                    if item.sample is not None:
                        await sink.sample(item.sample)
                    if item.applicator is not None:
                        await sink.applicator(item.applicator)
                    if item.checkpoint is not None:
                        await sink.checkpoint(item.checkpoint)
                except Exception:
                    log.exception("sink_failed", sink=sink.name)

    async def drain(self, dispatcher: asyncio.Task[None], timeout_s: float) -> None:
        """At a stop: let the dispatcher tell the sinks what is queued, within a bound."""
        self._queue.put_nowait(_END)
        try:
            async with asyncio.timeout(timeout_s):
                await dispatcher
        except TimeoutError:
            log.error("dispatcher_drain_timeout", pending=self._queue.qsize())  # noqa: TRY400
            dispatcher.cancel(msg="shutdown: dispatcher did not drain in time")
