"""A driver plug-in for the tests that can go offline or wedge on demand, found the way a
third-party one is: through the ``iort.drivers`` entry-point group of an installed
distribution (the tests make a ``*.dist-info`` directory for it on ``PYTHONPATH``; see
tests/integration/test_health_e2e.py).

It is the built-in ``sim`` driver (the source role) with two more options, both paths of
files the test creates and removes while the daemon runs:

* ``offline_file``: while it exists, every read fails with ``TransportClosed`` and every
  connect too: a cable pulled. The daemon's loop reports a lost link and backs off: it
  still iterates.
* ``wedge_file``: once it exists, the next read never returns, whatever its bound: it
  swallows the cancellation ``asyncio.timeout`` sends it. A driver bug the daemon's own
  bound cannot break; only the systemd watchdog can (it must stop getting pings).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from iortd.drivers.errors import DriverOptionError, TransportClosed
from iortd.drivers.interface import DriverContext, DriverSpec, Role, SourceDriver
from iortd.kernel.types import Capability, DeviceIdentity, SourceReading
from iortd.simulators.driver import SimDriverFactory

OWN = ("offline_file", "wedge_file")


def _split(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    rest = dict(options)
    own = {}
    for key in OWN:
        value = rest.pop(key, None)
        if not isinstance(value, str) or not value.startswith("/"):
            raise DriverOptionError(f"options.{key}", "expected an absolute path")
        own[key] = Path(value)
    return rest, own


async def _never_returns() -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # the wedge: its cancellation swallowed
            continue


class WedgeDriver:
    def __init__(self, inner: SourceDriver, offline: Path, wedge: Path) -> None:
        self._inner = inner
        self._offline = offline
        self._wedge = wedge

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self._inner.capabilities

    async def __aenter__(self) -> Self:
        if self._offline.exists():
            raise TransportClosed("test: offline")
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)

    async def identify(self) -> DeviceIdentity:
        return await self._inner.identify()

    async def read(self) -> SourceReading:
        if self._wedge.exists():
            await _never_returns()
        if self._offline.exists():
            raise TransportClosed("test: offline")
        return await self._inner.read()


class WedgeDriverFactory:
    name = "wedge"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = True

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        rest, _ = _split(options)
        SimDriverFactory().validate(rest, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> WedgeDriver:
        rest, own = _split(spec.options)
        inner = SimDriverFactory().create(dataclasses.replace(spec, options=rest), context)
        if not isinstance(inner, SourceDriver):
            raise DriverOptionError("role", "the wedge driver is a source")
        return WedgeDriver(inner, own["offline_file"], own["wedge_file"])
