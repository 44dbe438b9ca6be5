"""The composition root: builds drivers, tracker and sinks, runs them in one TaskGroup.

Start-up: config already validated (nothing here re-checks it) -> drivers built from the
registry -> sinks -> one task per device plus a watchdog. A signal only sets ``stop``;
shutdown is ordered and bounded: device tasks end, drivers close, then sinks close in
reverse order so that the record (the first sink) is closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from daemon.config import Config, DeviceConfig, LoadedConfig
from daemon.sinks import Sample, Sink
from daemon.tracker import (
    DeliverySnapshot,
    DeliveryTracker,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from drivers.clock import Clock
from drivers.errors import DriverError, ProtocolViolation
from drivers.interface import DriverContext, DriverSpec, SourceDriver
from drivers.registry import DriverRegistry

__all__ = ["Daemon", "RunResult", "tracker_settings"]

log = structlog.get_logger("iortd")

# Reconnect backoff, in real seconds: capped and jittered so that several daemons (or
# devices) do not hammer a recovering bus in lockstep.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0


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
    last_snapshot: DeliverySnapshot | None = None
    link_losses: int = 0


class Daemon:
    def __init__(
        self,
        loaded: LoadedConfig,
        registry: DriverRegistry,
        clock: Clock,
        sinks: Sequence[Sink],
        *,
        stop_after_delivery: bool = False,
    ) -> None:
        self.config = loaded.config
        self._loaded = loaded
        self._registry = registry
        self._clock = clock
        self._sinks = list(sinks)
        self._stop_after_delivery = stop_after_delivery
        self.tracker = DeliveryTracker(tracker_settings(self.config, clock.speed))
        self.result = RunResult()
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self.ready = asyncio.Event()

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
            async with asyncio.TaskGroup() as tg:
                src = self.config.source
                tg.create_task(self._poll_source(src, stop), name=f"device:{src.name}")
                tg.create_task(self._watchdog(stop), name="watchdog")
                await stop.wait()
        finally:
            await self._close_sinks()
        log.info("daemon_stopped", deliveries=len(self.result.terminated))
        return self.result

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
        return factory.create(
            spec, DriverContext(clock=self._clock, seed=self.config.simulation.seed)
        )

    async def _poll_source(self, dev: DeviceConfig, stop: asyncio.Event) -> None:
        backoff = BACKOFF_INITIAL_S
        while not stop.is_set():
            driver = self._build(dev)
            try:
                async with asyncio.timeout(dev.timeout_s):
                    await driver.__aenter__()
            except (DriverError, TimeoutError, OSError) as exc:
                await self._link_lost(dev, exc)
                backoff = await self._backoff(backoff, stop)
                continue
            try:
                async with asyncio.timeout(dev.timeout_s):
                    identity = await driver.identify()
                for sink in self._sinks:
                    await sink.started(dev.name, identity)
                log.info("device_connected", device=dev.name, driver=dev.driver)
                backoff = BACKOFF_INITIAL_S
                await self._poll_loop(dev, driver, stop)
            except (DriverError, TimeoutError, OSError) as exc:
                await self._link_lost(dev, exc)
                backoff = await self._backoff(backoff, stop)
            finally:
                with contextlib.suppress(DriverError, TimeoutError, OSError):
                    async with asyncio.timeout(dev.timeout_s):
                        await driver.__aexit__(None, None, None)

    async def _poll_loop(
        self, dev: DeviceConfig, driver: SourceDriver, stop: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        garbled = 0
        while not stop.is_set():
            try:
                async with asyncio.timeout(dev.timeout_s):
                    reading = await driver.read()
            except ProtocolViolation as exc:
                # One bad frame is counted and dropped; a run of them is a lost link.
                garbled += 1
                log.warning("protocol_violation", device=dev.name, error=str(exc), count=garbled)
                if garbled >= self.config.tolerances.stale_after_polls:
                    raise
            else:
                garbled = 0
                events = self.tracker.on_reading(reading)
                sample = Sample(
                    device=dev.name,
                    reading=reading,
                    delivery=self.tracker.snapshot(reading.mono_ns),
                    interlocks=dict(self.tracker.interlocks),
                    all_clear=self.tracker.all_clear,
                )
                await self._emit(sample, events)
                self.ready.set()
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
        """Notices readings that stopped even while a driver call is still pending."""
        period = self.config.source.poll_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await stop.wait()
            events = self.tracker.on_tick(self._clock.monotonic_ns(), self._clock.utc())
            if events:
                await self._emit(None, events)

    async def _link_lost(self, dev: DeviceConfig, exc: BaseException) -> None:
        self.result.link_losses += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.error("device_link_lost", device=dev.name, reason=reason)
        events = self.tracker.on_link_lost(self._clock.monotonic_ns(), self._clock.utc(), reason)
        if events:
            await self._emit(None, events)

    async def _backoff(self, current: float, stop: asyncio.Event) -> float:
        delay = self._rng.uniform(current / 2, current)
        log.info("device_reconnect_wait", delay_s=round(delay, 3))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        return min(current * 2, BACKOFF_MAX_S)

    # ---- sinks ------------------------------------------------------------------------

    async def _emit(self, sample: Sample | None, events: Sequence[TrackerEvent]) -> None:
        for ev in events:
            if isinstance(ev, Terminated):
                self.result.terminated.append(ev)
        if sample is not None:
            self.result.last_snapshot = sample.delivery
        # In order: the first sink is the record and is awaited before the others hear.
        # An error in the record stops the daemon (nothing may be shown unrecorded); an
        # error in any later sink is logged and that sink misses this item, nothing more.
        for i, sink in enumerate(self._sinks):
            try:
                if events:
                    await sink.events(events)
                if sample is not None:
                    await sink.sample(sample)
            except Exception:
                if i == 0:
                    raise
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
