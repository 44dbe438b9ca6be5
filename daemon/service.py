"""The composition root: builds drivers, tracker, audit log and sinks; runs one TaskGroup.

Start-up: config already validated (nothing here re-checks it) -> audit log opened and
recovered by the caller -> what recovery found recorded first (a crash, unvouched
entries, spilled entries, an accepted rollback, a wall clock behind the log, and the
closure of any delivery started in the unvouched tail, which cannot be taken over), before
the run's first seal -> the newest of those closed is handed to the tracker, so that a
record the first reading starts with the console in a delivery names it (``continues``)
-> a delivery the log shows open (from vouched entries only) is handed
to the tracker (named in ``daemon_start``; the first reading decides whether it continues;
its gap starts at the last vouched entry, or at an earlier run's still-open gap) ->
drivers built from the registry -> one poll task per device, a stale-data watchdog (fed by
every device reply through ``DriverContext.heard``), the checkpoint task (one signed at
once, then at delivery ends and every interval) and the sink dispatcher. The MQTT sink asks
the daemon whether the log contains the broker's retained checkpoint before it overwrites
it.

The record comes first: every event is appended to the audit log and fsync'd before any
other sink hears of it; samples are appended (and group-committed within the window)
before other sinks hear of them. The device loop never waits for the disk: a dispatcher
task waits for durability and then tells the other sinks, in order.

A signal only sets ``stop``. Shutdown is ordered and bounded: device tasks end, drivers
close, ``daemon_stop`` and a final checkpoint are written, the dispatcher drains, other
sinks close, and the audit log is flushed and closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import structlog

from iortd.auditlog.note import Checkpoint
from iortd.auditlog.writer import AuditLog, AuditLogClosed, RecoveryReport
from iortd.daemon import __version__
from iortd.daemon.config import Config, DeviceConfig, LoadedConfig
from iortd.daemon.entries import event_entry, plain, sample_entry
from iortd.daemon.sinks import Sample, Sink
from iortd.daemon.tracker import (
    DeliverySnapshot,
    DeliveryTracker,
    Phase,
    ResumedDelivery,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from iortd.drivers.errors import DeviceFault, DriverError, ProtocolViolation
from iortd.drivers.interface import DriverContext, DriverSpec, SourceDriver
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.backoff import Backoff
from iortd.kernel.clock import Clock
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import DeviceIdentity

__all__ = ["Daemon", "RunResult", "resumable", "tracker_settings"]

log = structlog.get_logger("iortd")

# Reconnect backoff, in real seconds: capped and jittered so that several daemons (or
# devices) do not hammer a recovering bus in lockstep.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0


# A driver bounds each I/O by the device's timeout_s, and one call (a read) may make a few
# exchanges (status, applicator, and after a timeout the wait for a late reply). The daemon
# bounds the whole call by a multiple of it: a safety net for a driver that does not keep
# its own bound, not the bound a well-behaved driver reports its timeouts by.
DRIVER_CALL_TIMEOUTS = 4


def _ignore_heard(mono_ns: int) -> None:
    """Replies of a device the tracker does not watch for staleness."""


def _call_bound(dev: DeviceConfig) -> float:
    return dev.timeout_s * DRIVER_CALL_TIMEOUTS


_RESUMABLE = {
    p.value: p for p in (Phase.PREPARATORY, Phase.READY, Phase.IRRADIATING, Phase.INTERRUPTED)
}


def resumable(rec: RecoveryReport) -> ResumedDelivery | None:
    """The delivery the log shows open, as the tracker takes it over after a restart; None
    when there is none, or when its record is too thin to continue (no sample of it, or a
    sample this version cannot read): that one is closed UNKNOWN at start-up instead."""
    did, s, started = rec.open_delivery_id, rec.open_delivery_last_sample, rec.open_delivery_started
    if did is None or s is None or rec.last_ts is None:
        return None
    phase = _RESUMABLE.get(str(s.get("phase")))
    numbers = [s.get(k) for k in ("preset_gy", "delivered_primary_gy", "delivered_secondary_gy")]
    numbers += [s.get("beam_on_s"), s.get("elapsed_s")]
    if phase is None or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        for x in numbers
    ):
        return None
    selection = s.get("selection")
    preset, primary, secondary, beam_on, elapsed = (float(x) for x in numbers)  # type: ignore[arg-type]
    try:
        # Unvouched entries (written after the last seal before a crash) are not what the
        # daemon saw for certain: the gap starts at the last vouched entry.
        since = datetime.fromisoformat((rec.last_vouched_ts or rec.last_ts).replace("Z", "+00:00"))
        if rec.open_delivery_unwatched_since is not None:
            # A run in between took it over and never heard the console: the gap it
            # recorded is still open, and nobody has watched the delivery since its start.
            earlier = datetime.fromisoformat(
                rec.open_delivery_unwatched_since.replace("Z", "+00:00")
            )
            since = min(since, earlier)
        at = (started or {}).get("at") or s.get("at")
        started_utc = datetime.fromisoformat(str(at).replace("Z", "+00:00"))
    except ValueError:
        return None
    return ResumedDelivery(
        delivery_id=did,
        started_utc=started_utc,
        phase=phase,
        preset_gy=preset,
        primary_gy=primary,
        secondary_gy=secondary,
        beam_on_s=beam_on,
        elapsed_s=elapsed,
        selection=selection
        if isinstance(selection, int) and not isinstance(selection, bool)
        else None,
        simulated=bool(s.get("simulated")),
        unwatched_since_utc=since,
        cause=f"daemon not running ({rec.previous_stop} stop)"
        + (
            ""
            if rec.unvouched is None
            else f"; entries seq {rec.unvouched[0]}..{rec.unvouched[1]} after the last seal "
            "are unvouched"
        ),
    )


def tracker_settings(config: Config, clock_speed: float) -> TrackerSettings:
    """Tolerances in clock seconds. Poll periods are real seconds; under a speed factor the
    tracker's time runs faster, so the stale bound is scaled to match."""
    src = config.source
    t = config.tolerances
    return TrackerSettings(
        stale_after_s=t.stale_after_polls * src.poll_interval_s * clock_speed,
        expected_rate_gy_min=config.plan.expected_dose_rate_gy_min,
        dose_channel_rel=t.dose_channel_rel,
        dose_channel_abs_gy=t.dose_channel_abs_gy,
        dose_rate_rel=t.dose_rate_rel,
        rate_settle_s=t.rate_settle_s,
        overdose_rel=t.overdose_rel,
        stop_accuracy_rel=t.stop_accuracy_rel,
        backup_timer_margin_rel=t.backup_timer_margin_rel,
        delivery_id_prefix=f"{config.site.room}",
    )


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
    events: Sequence[TrackerEvent] = ()
    delivery: DeliverySnapshot | None = None  # the tracker's view after ``events``
    identified: tuple[str, DeviceIdentity] | None = None
    checkpoint: str | None = None


_END = _Item()


def _record_recovery(audit: AuditLog, rec: RecoveryReport, now: str) -> None:
    """What opening the log found, as entries, before anything else of this run: a crash,
    entries no signature vouches for, an accepted rollback, a wall clock behind the log.

    The unvouched range is recorded before the first seal of this run: later seals and
    checkpoints cover the whole chain, and this entry is what says that part of it is
    not vouched for (docs/audit-log.md)."""
    if rec.last_ts is not None and now < rec.last_ts:
        # The wall clock is behind the log's last entry: a step backwards across runs
        # (how far is unknown: at least this much). Written first, so that the first
        # entry whose ts goes back is the one that says why.
        behind = (_parse_utc(rec.last_ts) - _parse_utc(now)).total_seconds()
        audit.append(
            "clock_step",
            {
                "step_s": -round(behind, 6),
                "expected_wall": rec.last_ts,
                "actual_wall": now,
                "across_restart": True,
            },
            durable=True,
        )
        log.warning("clock_behind_the_log", last_entry=rec.last_ts, now=now, behind_s=behind)

    unvouched = rec.unvouched
    if (
        rec.previous_stop == "crash"
        or unvouched is not None
        or rec.rollback is not None
        or rec.spilled is not None
    ):
        audit.append(
            "recovery",
            {
                "previous_stop": rec.previous_stop,
                "last_seq": rec.last_seq,
                "last_hash": rec.last_hash,
                "last_ts": rec.last_ts,
                "tail_bytes": rec.tail_bytes,
                "tail_kept_at": rec.tail_kept_at,
                "segments_set_aside": list(rec.segments_set_aside),
                "vouched_by": rec.vouched_by,
                # Entries the previous stop could not write (a full or read-only disk),
                # from its spill file: restored (unvouched) or kept in quarantine.
                "spilled": None if rec.spilled is None else dict(rec.spilled),
                "anchor_problems": list(rec.anchor_problems),
                "unvouched": None
                if unvouched is None
                else {
                    "count": rec.unvouched_count,
                    "first_seq": unvouched[0],
                    "last_seq": unvouched[1],
                    "why": "written after the last seal (or signed checkpoint) before the "
                    "previous run ended; not covered by any signature as genuine",
                },
            },
            durable=True,
        )
        if unvouched is not None:
            log.warning(
                "audit_log_unvouched_entries_recorded",
                first_seq=unvouched[0],
                last_seq=unvouched[1],
                count=rec.unvouched_count,
            )
    for did in rec.unvouched_open_deliveries:
        # Started after the last seal before a crash and not ended: nothing vouched names
        # it, so it is not taken over (its samples may be forged) and not left open for
        # ever either. Closed UNKNOWN, with no dose taken from it; the gap starts at the
        # last vouched entry. Its entries stay marked unvouched by every command.
        gap = {
            "cause": f"daemon not running ({rec.previous_stop} stop)",
            "start": rec.last_vouched_ts or rec.last_ts,
            "end": now,
        }
        audit.append("monitoring_gap", gap, delivery_id=did, durable=True)
        audit.append(
            "delivery_terminated",
            {
                "status": "UNKNOWN",
                "reason": "not followed to its end: its record was written after the last "
                "seal before a crash (unvouched), so it cannot be taken over",
                "gap": gap,
                "last_sample": {},
            },
            delivery_id=did,
            durable=True,
        )
        log.warning("unvouched_delivery_closed", delivery_id=did)
    if rec.rollback is not None:
        audit.append("log_rollback_accepted", dict(rec.rollback), durable=True)
        log.warning("audit_log_rollback_accepted", **dict(rec.rollback))


def _parse_utc(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


class Daemon:
    def __init__(
        self,
        loaded: LoadedConfig,
        registry: DriverRegistry,
        clock: Clock,
        sinks: Sequence[Sink],
        *,
        audit: tuple[AuditLog, RecoveryReport] | None = None,
        stop_after_delivery: bool = False,
    ) -> None:
        self.config = loaded.config
        self._loaded = loaded
        self._registry = registry
        self._clock = clock
        self._sinks = list(sinks)
        self._audit: AuditLog | None = audit[0] if audit is not None else None
        self._recovery: RecoveryReport | None = audit[1] if audit is not None else None
        if self._audit is not None:
            self._audit.on_failure = self._on_audit_failure
            self._audit.on_recovered = self._on_audit_recovered
        for sink in self._sinks:
            if hasattr(sink, "checkpoint_guard"):  # the MQTT sink: the off-host copy
                sink.checkpoint_guard = self._guard_checkpoint
        self._stop_after_delivery = stop_after_delivery
        self.tracker = DeliveryTracker(tracker_settings(self.config, clock.speed))
        self.result = RunResult()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._checkpoint_due = asyncio.Event()
        self._delivery_ended = False
        self._notices: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._audit_failing = asyncio.Event()
        self._backoffs: dict[str, Backoff] = {}  # per device: reconnect backoff

    async def run(self, stop: asyncio.Event) -> RunResult:
        log.info(
            "daemon_starting",
            config=str(self._loaded.path),
            config_sha256=self._loaded.sha256,
            site=self.config.site.id,
            room=self.config.site.room,
            speed=self._clock.speed,
        )
        try:
            async with asyncio.TaskGroup() as outer:
                if self._audit is not None:
                    outer.create_task(self._audit.run(), name="audit-writer")
                for sink in self._sinks:
                    outer.create_task(sink.run(), name=f"sink:{sink.name}")
                dispatcher = outer.create_task(self._dispatch(), name="dispatcher")
                notices = outer.create_task(self._notify(), name="notices")
                self._record_start()
                async with asyncio.TaskGroup() as tg:
                    src = self.config.source
                    tg.create_task(self._poll_source(src, stop), name=f"device:{src.name}")
                    tg.create_task(self._watchdog(stop), name="watchdog")
                    tg.create_task(self._checkpoints(stop), name="checkpoints")
                    await stop.wait()
                    self._checkpoint_due.set()  # wakes the checkpoint task to see stop
                await self._record_stop()
                self._queue.put_nowait(_END)
                try:
                    async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                        await dispatcher
                except TimeoutError:
                    log.error("dispatcher_drain_timeout", pending=self._queue.qsize())  # noqa: TRY400
                    dispatcher.cancel(msg="shutdown: dispatcher did not drain in time")
                notices.cancel(msg="shutdown")
                await self._close_sinks()
                if self._audit is not None:
                    # Last of all: everything pending is written and fsync'd.
                    await self._audit.close()
        finally:
            if self._audit is not None:
                await self._audit.close()
        log.info("daemon_stopped", deliveries=len(self.result.terminated))
        return self.result

    # ---- the record ------------------------------------------------------------------

    def _record_start(self) -> None:
        audit, rec = self._audit, self._recovery
        if audit is None or rec is None:
            return
        now = utc_ts(datetime.now(UTC))
        _record_recovery(audit, rec, now)
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
        if rec.open_delivery_id is not None and resumed is None:
            # The previous run ended during a delivery that cannot be taken over (no sample
            # of it was recorded): nobody watched from its last entry until now. Close that
            # delivery as interrupted by a monitoring gap.
            gap = {
                "cause": f"daemon not running ({rec.previous_stop} stop)",
                "start": min(
                    filter(
                        None,
                        (rec.last_vouched_ts or rec.last_ts, rec.open_delivery_unwatched_since),
                    )
                ),
                "end": now,
            }
            audit.append("monitoring_gap", gap, delivery_id=rec.open_delivery_id, durable=True)
            audit.append(
                "delivery_terminated",
                {
                    "status": "UNKNOWN",
                    "reason": "interrupted by a monitoring gap",
                    "gap": gap,
                    "last_sample": dict(rec.open_delivery_last_sample or {}),
                },
                delivery_id=rec.open_delivery_id,
                durable=True,
            )
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
            self._emit(
                None,
                self.tracker.resume(resumed, self._clock.monotonic_ns(), self._clock.utc()),
            )

    async def _record_stop(self) -> None:
        if self._audit is None:
            return
        snap = self.tracker.snapshot()
        open_delivery = snap.delivery_id if snap is not None and snap.termination is None else None
        entry = self._audit.append(
            "daemon_stop",
            {"clean": True, "open_delivery": open_delivery},
            durable=True,
        )
        try:
            # Bounded: a failing disk must not hold the shutdown forever. What is still
            # pending is tried once more when the log is closed.
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                note = await self._audit.checkpoint("shutdown")
                await entry.committed
        except TimeoutError:
            log.critical("audit_log_not_flushed_at_shutdown", timeout_s=SHUTDOWN_TIMEOUT_S)
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
        if self._audit is not None:
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

    async def _guard_checkpoint(self, cp: Checkpoint) -> str | None:
        """Why this log does not contain ``cp`` (the broker's retained checkpoint, signed
        by our key), or None. A conflict is recorded and alarmed: the sink will not
        overwrite the off-host copy with this log's checkpoints."""
        audit = self._audit
        if audit is None or cp.origin != audit.origin or cp.count == 0:
            return None
        have = audit.committed_seq + 1
        if cp.count > have:
            why = (
                f"the broker's retained checkpoint covers {cp.count} entries, this log has "
                f"{have}: this log is behind it (a restored backup or a replaced log)"
            )
        elif await audit.hash_at(cp.count - 1) != cp.head_hash:
            why = (
                f"the broker's retained checkpoint differs from this log at seq "
                f"{cp.count - 1}: the log was replaced or rewritten (a fork)"
            )
        else:
            return None
        found = {
            "why": why,
            "broker_count": cp.count,
            "broker_head": cp.head_hash,
            "log_count": have,
        }
        with contextlib.suppress(AuditLogClosed):
            audit.append("checkpoint_publish_refused", found, durable=True)
        self._notices.put_nowait(
            (
                "critical",
                f"audit checkpoint NOT published: {why}. The off-host copy is kept; check "
                "this log with iort-audit verify --checkpoint",
            )
        )
        return why

    def _on_audit_recovered(self, outage_s: float) -> None:
        self._audit_failing.clear()
        self._notices.put_nowait(("info", f"audit log writable again after {outage_s:.1f} s"))

    async def _notify(self) -> None:
        while True:
            severity, message = await self._notices.get()
            for sink in self._sinks:
                try:
                    await sink.notice(severity, message)
                except Exception:
                    log.exception("sink_failed", sink=sink.name)

    async def _checkpoints(self, stop: asyncio.Event) -> None:
        """A signed checkpoint at every delivery end and every checkpoint interval."""
        if self._audit is None or self._audit.signer is None:
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

    # ---- devices ----------------------------------------------------------------------

    def _build(self, dev: DeviceConfig) -> SourceDriver:
        factory = self._registry.get(dev.driver)
        spec = DriverSpec(
            name=dev.name,
            role=dev.role,
            poll_interval_s=dev.poll_interval_s,
            timeout_s=dev.timeout_s,
            transport=dev.transport,
            options=dev.options,
        )
        heard = self._source_heard if dev.role == "source" else _ignore_heard
        # The config accepts a device only in a role its factory serves (a source here).
        return cast(
            SourceDriver,
            factory.create(
                spec,
                DriverContext(clock=self._clock, seed=self.config.simulation.seed, heard=heard),
            ),
        )

    def _source_heard(self, mono_ns: int) -> None:
        """A reply from the source, reported by its driver. A time in the future (a
        plug-in's bug) must not hold the stale alarm off: it counts as now at most."""
        self.tracker.on_device_heard(min(mono_ns, self._clock.monotonic_ns()))

    async def _poll_source(self, dev: DeviceConfig, stop: asyncio.Event) -> None:
        # The backoff is reset by the first good reading of a connection, not by the
        # connection itself: a device that connects and identifies but fails every read
        # (a Modbus exception on each poll, say) backs off like one that cannot connect.
        self._backoffs[dev.name] = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        while not stop.is_set():
            driver = self._build(dev)
            try:
                async with asyncio.timeout(_call_bound(dev)):
                    await driver.__aenter__()
            except (DriverError, TimeoutError, OSError) as exc:
                await self._link_lost(dev, exc)
                await self._backoff(dev, stop)
                continue
            try:
                async with asyncio.timeout(_call_bound(dev)):
                    identity = await driver.identify()
                self._identified(dev.name, identity)
                log.info("device_connected", device=dev.name, driver=dev.driver)
                await self._poll_loop(dev, driver, stop)
            except (DriverError, TimeoutError, OSError) as exc:
                await self._link_lost(dev, exc)
                await self._backoff(dev, stop)
            finally:
                with contextlib.suppress(DriverError, TimeoutError, OSError):
                    async with asyncio.timeout(_call_bound(dev)):
                        await driver.__aexit__(None, None, None)

    async def _poll_loop(
        self, dev: DeviceConfig, driver: SourceDriver, stop: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        bad = 0
        while not stop.is_set():
            try:
                async with asyncio.timeout(_call_bound(dev)):
                    reading = await driver.read()
            except (ProtocolViolation, DeviceFault) as exc:
                # One bad frame, or one error reply (a Modbus "busy", say), is counted and
                # the poll skipped; a run of them is a lost link.
                bad += 1
                kind = (
                    "protocol_violation" if isinstance(exc, ProtocolViolation) else "device_fault"
                )
                log.warning(kind, device=dev.name, error=str(exc), count=bad)
                if bad >= self.config.tolerances.stale_after_polls:
                    raise
            else:
                bad = 0
                self._backoffs[dev.name].reset()
                events = self.tracker.on_reading(reading)
                sample = Sample(
                    device=dev.name,
                    reading=reading,
                    delivery=self.tracker.snapshot(reading.mono_ns),
                    interlocks=dict(self.tracker.interlocks),
                    all_clear=self.tracker.all_clear,
                )
                self._emit(sample, events)
                if self._stop_after_delivery and any(isinstance(e, Terminated) for e in events):
                    stop.set()
                    return
            next_at += dev.poll_interval_s
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (slow device): do not try to catch up in a burst
                next_at = loop.time()
                delay = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _watchdog(self, stop: asyncio.Event) -> None:
        """Notices readings that stopped even while a driver call is still pending. It
        wakes when the data would become stale (``stale_after_polls`` poll periods after
        the last reading, not at the next tick after that), so the alarm comes on time."""
        period = self.config.source.poll_interval_s
        while not stop.is_set():
            wait = period
            stale_at = self.tracker.stale_at_ns()
            if stale_at is not None:
                ahead_s = (stale_at - self._clock.monotonic_ns()) / 1e9 / self._clock.speed
                wait = min(period, max(ahead_s, 0.0) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            events = self.tracker.on_tick(self._clock.monotonic_ns(), self._clock.utc())
            if events:
                self._emit(None, events)

    async def _link_lost(self, dev: DeviceConfig, exc: BaseException) -> None:
        self.result.link_losses += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.error("device_link_lost", device=dev.name, reason=reason)
        events = self.tracker.on_link_lost(self._clock.monotonic_ns(), self._clock.utc(), reason)
        if events:
            self._emit(None, events)

    async def _backoff(self, dev: DeviceConfig, stop: asyncio.Event) -> None:
        delay = self._backoffs[dev.name].next_delay()
        log.info("device_reconnect_wait", device=dev.name, delay_s=round(delay, 3))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()

    # ---- sinks ------------------------------------------------------------------------

    def _identified(self, device: str, identity: DeviceIdentity) -> None:
        durable = None
        if self._audit is not None:
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
            durable = entry.committed
        self._queue.put_nowait(_Item(durable=durable, identified=(device, identity)))

    def _emit(self, sample: Sample | None, events: Sequence[TrackerEvent]) -> None:
        """Record first, then queue for the other sinks. Never waits for the disk."""
        ended = False
        for ev in events:
            if isinstance(ev, Terminated):
                self.result.terminated.append(ev)
                ended = True
        durable = None
        if self._audit is not None:
            pending = None if sample is None else sample_entry(sample, ended_now=ended)
            for ev in events:
                if pending is not None and isinstance(ev, Terminated):
                    # The sample that ends a delivery belongs to it: it goes before the
                    # end entry, after which nothing names that delivery.
                    self._audit.append(pending[0], pending[1], delivery_id=pending[2])
                    pending = None
                # Every event names its delivery itself (None: the room's).
                kind, data, did = event_entry(ev, None)
                durable = self._audit.append(kind, data, delivery_id=did, durable=True).committed
            if pending is not None:
                self._audit.append(pending[0], pending[1], delivery_id=pending[2])
        delivery = self.tracker.snapshot() if sample is None else sample.delivery
        self._queue.put_nowait(
            _Item(durable=durable, sample=sample, events=tuple(events), delivery=delivery)
        )
        if ended:
            self._delivery_ended = True
            self._checkpoint_due.set()

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

    async def _dispatch(self) -> None:
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
                    if item.checkpoint is not None:
                        await sink.checkpoint(item.checkpoint)
                except Exception:
                    log.exception("sink_failed", sink=sink.name)

    async def _close_sinks(self) -> None:
        for sink in reversed(self._sinks):
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await sink.aclose()
            except TimeoutError:
                # Expected, not a crash: no traceback, just which sink overran its bound.
                log.error(  # noqa: TRY400
                    "sink_close_timeout", sink=sink.name, timeout_s=SHUTDOWN_TIMEOUT_S
                )
