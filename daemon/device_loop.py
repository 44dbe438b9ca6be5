"""One loop per configured device: build its driver, connect, identify, poll, back off.

The composition root (daemon/app.py) runs one :class:`DeviceLoop` per device of the config,
each as its own task of the daemon's TaskGroup, so that a slow or silent device never
delays another. A loop knows nothing of the tracker, the audit log or the sinks: it hands
what it observes to a :class:`DeviceHub` (the running service, daemon/service.py), which
decides where it goes by the device's role.

The cycle, for ever until ``stop``:

1. **Build** a fresh driver from the device's factory (every connection starts clean).
2. **Connect** (the driver's ``__aenter__``) and **identify**; the identity goes to the hub
   (recorded before any other sink hears of it).
3. **Poll** at the device's own period, never catching up in a burst after a slow reply.
   One bad frame or one error reply (``ProtocolViolation``, ``DeviceFault``) is a skipped
   poll; ``bad_reads_limit`` of them in a row is a lost link.
4. On a lost link (a driver error, a timeout, an OS error): **report** it to the hub, close
   the driver, and **back off** (one capped, jittered :class:`~iortd.kernel.backoff.Backoff`
   per device) before building again. The backoff is reset by the first good reading of a
   connection, not by the connection itself: a device that connects and identifies but
   fails every read backs off like one that cannot connect.

Before every await that may take a while, the loop tells its
:class:`~iortd.daemon.progress.DeviceProgress` by when it will be back (the call's bound,
the wait's length), and counts polls and errors there: the watchdog, the health endpoint
and the metrics read it (daemon/health.py). An offline device's loop still iterates.

Every driver call is bounded by ``DRIVER_CALL_TIMEOUTS`` times the device's ``timeout_s``:
a safety net for a driver that does not keep its own bound (a driver bounds each exchange
by ``timeout_s`` and one call may make a few). A device on a shared serial line may wait
for the other devices' exchanges before each of its own (drivers/transport/shared.py):
its bound adds their timeouts (``line_wait_s``). The waits between polls and during the
backoff end at once when ``stop`` is set.

What a device reads depends on its role: a ``source`` is read with ``read()``, an
``applicator`` with ``read_applicator()`` (drivers/interface.py). The loop is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

from iortd.daemon.config import DeviceConfig
from iortd.daemon.progress import DeviceProgress
from iortd.drivers.errors import DeviceFault, DriverError, ProtocolViolation
from iortd.drivers.interface import (
    ApplicatorDriver,
    DeviceDriver,
    DriverContext,
    DriverFactory,
    DriverSpec,
    SourceDriver,
)
from iortd.kernel.backoff import Backoff
from iortd.kernel.types import ApplicatorReading, DeviceIdentity, SourceReading

__all__ = ["DRIVER_CALL_TIMEOUTS", "DeviceHub", "DeviceLoop", "Reading"]

log = structlog.get_logger("iortd")

# Reconnect backoff, in real seconds: capped and jittered so that several daemons (or
# devices) do not hammer a recovering bus in lockstep.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0

# A driver bounds each I/O by the device's timeout_s, and one call (a read) may make a few
# exchanges (status, applicator, and after a timeout the wait for a late reply). The daemon
# bounds the whole call by a multiple of it: a safety net for a driver that does not keep
# its own bound, not the bound a well-behaved driver reports its timeouts by.
DRIVER_CALL_TIMEOUTS = 4

Reading = SourceReading | ApplicatorReading


class DeviceHub(Protocol):
    """Where a device loop reports what it observes (the running service)."""

    def identified(self, device: str, identity: DeviceIdentity) -> None: ...

    def reading(self, device: DeviceConfig, reading: Reading) -> bool:
        """Take one good reading; True when the run is to end (``stop`` is then set by
        the loop)."""
        ...

    def link_lost(self, device: DeviceConfig, reason: str) -> None: ...


class DeviceLoop:
    """One device's driver lifecycle. The composition root lends the factory (from the
    driver registry) and the context (the clock, the seed, whom to tell of each reply)."""

    def __init__(
        self,
        device: DeviceConfig,
        factory: DriverFactory,
        context: DriverContext,
        hub: DeviceHub,
        *,
        bad_reads_limit: int,
        line_wait_s: float = 0.0,
        progress: DeviceProgress | None = None,
    ) -> None:
        self.device = device
        self._factory = factory
        self._context = context
        self._hub = hub
        self._bad_reads_limit = bad_reads_limit
        self.backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        self._bound = (device.timeout_s + line_wait_s) * DRIVER_CALL_TIMEOUTS
        self.progress = progress or DeviceProgress(device.name)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            self.progress.ended()

    async def _run(self, stop: asyncio.Event) -> None:
        dev = self.device
        while not stop.is_set():
            driver = self._build()
            try:
                self.progress.expect(self._bound)
                async with asyncio.timeout(self._bound):
                    await driver.__aenter__()
            except (DriverError, TimeoutError, OSError) as exc:
                self._link_lost(exc)
                await self._back_off(stop)
                continue
            try:
                self.progress.expect(self._bound)
                async with asyncio.timeout(self._bound):
                    identity = await driver.identify()
                self._hub.identified(dev.name, identity)
                self.progress.connected = True
                log.info("device_connected", device=dev.name, driver=dev.driver)
                await self._poll(driver, stop)
            except (DriverError, TimeoutError, OSError) as exc:
                self._link_lost(exc)
                await self._back_off(stop)
            finally:
                with contextlib.suppress(DriverError, TimeoutError, OSError):
                    self.progress.expect(self._bound)
                    async with asyncio.timeout(self._bound):
                        await driver.__aexit__(None, None, None)

    def _build(self) -> DeviceDriver:
        dev = self.device
        spec = DriverSpec(
            name=dev.name,
            role=dev.role,
            poll_interval_s=dev.poll_interval_s,
            timeout_s=dev.timeout_s,
            transport=dev.transport,
            options=dev.options,
        )
        return self._factory.create(spec, self._context)

    async def _read(self, driver: DeviceDriver) -> Reading:
        # A driver without the role's read is a plug-in's mistake, found at the first poll:
        # a lost link, said in its reason.
        if self.device.role == "source":
            if not isinstance(driver, SourceDriver):
                raise DriverError(f"driver {self.device.driver!r} has no read() for role 'source'")
            return await driver.read()
        if not isinstance(driver, ApplicatorDriver):
            raise DriverError(
                f"driver {self.device.driver!r} has no read_applicator() for role "
                f"{self.device.role!r}"
            )
        return await driver.read_applicator()

    async def _poll(self, driver: DeviceDriver, stop: asyncio.Event) -> None:
        dev = self.device
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        bad = 0
        while not stop.is_set():
            try:
                self.progress.expect(self._bound)
                async with asyncio.timeout(self._bound):
                    reading = await self._read(driver)
            except (ProtocolViolation, DeviceFault) as exc:
                # One bad frame, or one error reply (a Modbus "busy", say), is counted and
                # the poll skipped; a run of them is a lost link.
                bad += 1
                kind = (
                    "protocol_violation" if isinstance(exc, ProtocolViolation) else "device_fault"
                )
                self.progress.polled(kind)
                log.warning(kind, device=dev.name, error=str(exc), count=bad)
                if bad >= self._bad_reads_limit:
                    raise
            else:
                bad = 0
                self.progress.polled()
                self.backoff.reset()
                if self._hub.reading(dev, reading):
                    stop.set()
                    return
            next_at += dev.poll_interval_s
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (slow device): do not try to catch up in a burst
                next_at = loop.time()
                delay = 0
            self.progress.expect(delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    def _link_lost(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.error("device_link_lost", device=self.device.name, reason=reason)
        self.progress.lost()
        self._hub.link_lost(self.device, reason)

    async def _back_off(self, stop: asyncio.Event) -> None:
        delay = self.backoff.next_delay()
        log.info("device_reconnect_wait", device=self.device.name, delay_s=round(delay, 3))
        self.progress.expect(delay)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
