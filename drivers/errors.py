"""Driver errors, grouped by what the caller can do about them.

DriverError
├── TransportError          the link: reconnect with backoff
│   ├── TransportTimeout    no answer in time
│   └── TransportClosed     the link is gone (cable pulled, socket closed)
├── ProtocolViolation       bytes arrived but made no sense: count, drop the frame, retry
├── DeviceFault             the device answered with an error of its own: report it
└── DriverConfigError       the driver cannot be built from its config: fix the config
"""

from __future__ import annotations

__all__ = [
    "DeviceFault",
    "DriverConfigError",
    "DriverError",
    "DriverOptionError",
    "ProtocolViolation",
    "TransportClosed",
    "TransportError",
    "TransportTimeout",
    "UnknownDriverError",
]


class DriverError(Exception):
    """Root of every error a driver raises."""


class TransportError(DriverError):
    """The link to the device failed; reconnecting may help."""


class TransportTimeout(TransportError):
    """The device did not answer within the configured timeout."""


class TransportClosed(TransportError):
    """The link is closed or was lost."""


class ProtocolViolation(DriverError):
    """Bytes arrived that do not form a valid frame or reply."""


class DeviceFault(DriverError):
    """The device answered with an error (e.g. a Modbus exception response)."""


class DriverConfigError(DriverError):
    """A driver's configuration is invalid for that driver."""


class UnknownDriverError(DriverConfigError):
    """A config names a driver that is not installed."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        super().__init__(f"driver {name!r} is not installed (installed drivers: {listed})")


class DriverOptionError(DriverConfigError):
    """One option or transport key of a driver is wrong; ``key`` is its path below the
    device table (e.g. ``options.profile``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
