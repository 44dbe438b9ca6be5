"""The driver interface: what the daemon needs from any device, real or simulated.

A driver turns bytes into typed readings and typed errors (drivers.errors). It never
publishes or writes records; the daemon does. Drivers are found through the entry-point
group ``iort.drivers`` (see drivers.registry), so a third-party package adds one without
touching this repository (examples/iortd-driver-example is one). This module, with
``iortd.kernel.types``, ``.errors``, ``.transport`` and ``.clock``, is the public API such
a package may import (docs/engineers.md, "Writing a driver"); the other driver modules are private.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

from iortd.drivers.transport.base import Transport
from iortd.kernel.clock import Clock
from iortd.kernel.types import ApplicatorReading, Capability, DeviceIdentity, SourceReading

__all__ = [
    "ApplicatorDriver",
    "DeviceDriver",
    "DriverContext",
    "DriverFactory",
    "DriverSpec",
    "Role",
    "SourceDriver",
]

Role = Literal["source", "applicator"]


@runtime_checkable
class DeviceDriver(Protocol):
    """Common part: an async context manager that connects on enter and closes on exit.

    Every I/O a driver does is bounded by the ``timeout_s`` of its DriverSpec; a driver
    raises drivers.errors.TransportTimeout rather than waiting longer.
    """

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def identify(self) -> DeviceIdentity: ...


@runtime_checkable
class SourceDriver(DeviceDriver, Protocol):
    """An X-ray source console: dose, timer, tube readings, state and interlocks."""

    async def read(self) -> SourceReading: ...


@runtime_checkable
class ApplicatorDriver(DeviceDriver, Protocol):
    """An applicator reader (some consoles report it with the source, some apart)."""

    async def read_applicator(self) -> ApplicatorReading: ...


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """What the daemon's config says about one device, handed to its driver's factory."""

    name: str
    role: Role
    poll_interval_s: float
    timeout_s: float
    transport: Mapping[str, Any]
    options: Mapping[str, Any]


def _nobody_listens(mono_ns: int) -> None:
    """The default ``heard``: nobody is watching the replies."""


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What the composition root lends a driver: the shared clock, the run's seed, and
    ``heard``: a driver that makes several exchanges per reading calls it with the clock's
    monotonic time of each good reply, so that staleness is measured from the device's last
    reply and not from the driver's last finished reading (optional for a driver: one that
    never calls it is judged by its readings alone)."""

    clock: Clock
    seed: int
    heard: Callable[[int], None] = _nobody_listens
    # A view of a serial line this device shares with others (drivers/transport/shared.py),
    # lent by the composition root when the config puts several devices on one port; a
    # driver that can share a line (its factory has ``shared_line_unit``) talks through it
    # instead of building a transport from ``spec.transport``. None: a line of its own.
    shared_line: Transport | None = None


class DriverFactory(Protocol):
    """The object an ``iort.drivers`` entry point resolves to (a class or an instance with
    these members).

    A factory may also have ``path_options: frozenset[str]``: the option keys whose value,
    when it names a file (it contains a ``/`` or ends in ``.toml``) rather than something
    bundled, is a path. The config loader makes such a relative path absolute against the
    config file's directory, like every other path in the config, before ``validate``.
    """

    name: str
    roles: frozenset[Role]
    simulated: bool  # True only for drivers whose data never come from real equipment

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        """Check options and transport without touching any device; raise
        drivers.errors.DriverOptionError naming the key."""
        ...

    def create(self, spec: DriverSpec, context: DriverContext) -> DeviceDriver:
        """Build a driver; it connects when entered as an async context manager. For the
        role ``source`` it is a SourceDriver, for ``applicator`` an ApplicatorDriver."""
        ...
