"""One device's loop (daemon/device_loop.py) against a hub that only listens: what it
reports for a device whose driver cannot serve the device's role."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from iortd.daemon.config import DeviceConfig
from iortd.daemon.device_loop import DeviceLoop, Reading
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import Capability, DeviceIdentity, SourceReading


class SourceOnly:
    """A source driver (no read_applicator), configured by mistake as an applicator."""

    capabilities = frozenset({Capability.READ_TELEMETRY})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def identify(self) -> DeviceIdentity:
        return DeviceIdentity("test", "source-only", "S-1", "0", simulated=True)

    async def read(self) -> SourceReading:
        raise AssertionError("a source's read() called for an applicator")


class Factory:
    name = "source-only"
    roles: frozenset[Role] = frozenset({"source", "applicator"})
    simulated = True

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        return None

    def create(self, spec: DriverSpec, context: DriverContext) -> SourceOnly:
        return SourceOnly()


class Hub:
    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.devices: list[str] = []  # identified
        self.lost: list[str] = []

    def identified(self, device: str, identity: DeviceIdentity) -> None:
        self.devices.append(device)

    def reading(self, device: DeviceConfig, reading: Reading) -> bool:
        raise AssertionError("no reading was expected")

    def link_lost(self, device: DeviceConfig, reason: str) -> None:
        self.lost.append(reason)
        self.stop.set()


async def test_an_applicator_whose_driver_has_no_read_applicator_is_a_lost_link_naming_it() -> None:
    """Found at the first poll, never a source's read() taken for the applicator's: the
    lost link's reason (in the operational log) names the driver and what it lacks."""
    stop = asyncio.Event()
    hub = Hub(stop)
    dev = DeviceConfig(name="reader-1", role="applicator", driver="source-only")
    context = DriverContext(clock=SystemClock(), seed=0)
    loop = DeviceLoop(dev, Factory(), context, hub, bad_reads_limit=3)
    async with asyncio.timeout(5):
        await loop.run(stop)
    assert hub.devices == ["reader-1"]
    [reason] = hub.lost
    assert "read_applicator()" in reason, reason
    assert "'source-only'" in reason, reason
