"""A device's ``[transport]`` table: checked without opening anything, then built.

The composition root checks the table with :func:`validate_transport` when the config is
loaded (``iortd check-config``) and builds the unopened transport with
:func:`transport_from_config`. Every error is a DriverOptionError whose key names the entry
(``transport.baudrate``) and says what is expected; unknown keys are errors, so a typo is
never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from iortd.drivers.errors import DriverOptionError
from iortd.drivers.transport.base import Transport
from iortd.drivers.transport.serial_port import (
    BYTESIZES,
    MAX_BAUDRATE,
    MIN_BAUDRATE,
    PARITIES,
    STOPBITS,
    SerialTransport,
)
from iortd.drivers.transport.tcp import TcpTransport

__all__ = ["SERIAL_SETTINGS", "serial_line", "transport_from_config", "validate_transport"]

# The settings every device on one shared serial line must agree on, in this order.
SERIAL_SETTINGS: Final = ("baudrate", "bytesize", "parity", "stopbits")


@dataclass(frozen=True, slots=True)
class _SerialSettings:
    port: str
    baudrate: int
    bytesize: int
    parity: str
    stopbits: float


@dataclass(frozen=True, slots=True)
class _TcpSettings:
    host: str
    port: int


_SERIAL_KEYS: Final = ("type", "port", "baudrate", "bytesize", "parity", "stopbits")
_TCP_KEYS: Final = ("type", "host", "port")


def _key(name: str) -> str:
    return f"transport.{name}"


def _reject_unknown(transport: Mapping[str, Any], allowed: tuple[str, ...], kind: str) -> None:
    for key in sorted(map(str, transport)):
        if key not in allowed:
            raise DriverOptionError(
                _key(key),
                f"unknown key for a {kind} transport (allowed: {', '.join(allowed)})",
            )


def _get_int(
    transport: Mapping[str, Any],
    key: str,
    default: int | None,
    valid: Callable[[int], bool],
    expected: str,
) -> int:
    if key not in transport:
        if default is None:
            raise DriverOptionError(_key(key), f"missing; expected {expected}")
        return default
    value = transport[key]
    if isinstance(value, bool) or not isinstance(value, int) or not valid(value):
        raise DriverOptionError(_key(key), f"expected {expected}, got {value!r}")
    return value


def _get_str(transport: Mapping[str, Any], key: str, expected: str) -> str:
    if key not in transport:
        raise DriverOptionError(_key(key), f"missing; expected {expected}")
    value = transport[key]
    if not isinstance(value, str) or not value.strip():
        raise DriverOptionError(_key(key), f"expected {expected}, got {value!r}")
    return value


def _parse_serial(transport: Mapping[str, Any]) -> _SerialSettings:
    _reject_unknown(transport, _SERIAL_KEYS, "serial")
    port = _get_str(transport, "port", "a device path such as '/dev/ttyUSB0'")
    if "://" in port:
        raise DriverOptionError(
            _key("port"), f"{port!r} is a URL; use type = 'tcp' for a network serial server"
        )
    baudrate = _get_int(
        transport,
        "baudrate",
        19200,
        lambda v: MIN_BAUDRATE <= v <= MAX_BAUDRATE,
        f"an integer {MIN_BAUDRATE}..{MAX_BAUDRATE}",
    )
    bytesize = _get_int(transport, "bytesize", 8, BYTESIZES.__contains__, "5, 6, 7 or 8")
    parity = transport.get("parity", "N")
    if parity not in PARITIES:
        raise DriverOptionError(
            _key("parity"), f"expected one of 'N', 'E', 'O', 'M', 'S', got {parity!r}"
        )
    stopbits = transport.get("stopbits", 1)
    if (
        isinstance(stopbits, bool)
        or not isinstance(stopbits, int | float)
        or (stopbits not in STOPBITS)
    ):
        raise DriverOptionError(_key("stopbits"), f"expected 1, 1.5 or 2, got {stopbits!r}")
    return _SerialSettings(port, baudrate, bytesize, parity, stopbits)


def _parse_tcp(transport: Mapping[str, Any]) -> _TcpSettings:
    _reject_unknown(transport, _TCP_KEYS, "tcp")
    host = _get_str(transport, "host", "a host name or IP address")
    port = _get_int(transport, "port", None, lambda v: 1 <= v <= 65535, "an integer 1..65535")
    return _TcpSettings(host, port)


def _parse(transport: Mapping[str, Any]) -> _SerialSettings | _TcpSettings:
    kind = transport.get("type")
    if kind == "serial":
        return _parse_serial(transport)
    if kind == "tcp":
        return _parse_tcp(transport)
    if kind is None:
        raise DriverOptionError(_key("type"), "missing; expected 'serial' or 'tcp'")
    raise DriverOptionError(_key("type"), f"expected 'serial' or 'tcp', got {kind!r}")


def validate_transport(transport: Mapping[str, Any]) -> None:
    """Check a device's ``[transport]`` table without opening anything; raise
    DriverOptionError whose key names the offending entry (``transport.baudrate``).

    ``{type = "serial", port = "/dev/ttyUSB0", baudrate = 19200, bytesize = 8,
    parity = "N", stopbits = 1}`` (all but type and port optional, defaults shown) or
    ``{type = "tcp", host = "192.0.2.10", port = 502}``. Unknown keys are errors.
    """
    _parse(transport)


def serial_line(transport: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
    """The serial port a (valid) ``[transport]`` table names, normalised, and its
    :data:`SERIAL_SETTINGS` with the defaults filled in; None for a TCP transport. Two
    devices with the same port are on one line (docs/engineers.md, "Two devices on one
    RS-485 line"). The path is compared as written (normalised, not resolved): two
    names for one port (a symlink in /dev/serial/by-id) are not recognised here, and
    the second device then finds the port locked at run time (its link is lost, said)."""
    settings = _parse(transport)
    if isinstance(settings, _TcpSettings):
        return None
    return os.path.normpath(settings.port), (
        settings.baudrate,
        settings.bytesize,
        settings.parity,
        settings.stopbits,
    )


def transport_from_config(transport: Mapping[str, Any], *, timeout_s: float) -> Transport:
    """Build the (unopened) transport a ``[transport]`` table describes; every I/O on it
    is bounded by ``timeout_s`` (the device's timeout). Raises DriverOptionError like
    :func:`validate_transport`."""
    settings = _parse(transport)
    if isinstance(settings, _TcpSettings):
        return TcpTransport(settings.host, settings.port, timeout_s=timeout_s)
    return SerialTransport(
        settings.port,
        baudrate=settings.baudrate,
        bytesize=settings.bytesize,
        parity=settings.parity,
        stopbits=settings.stopbits,
        timeout_s=timeout_s,
    )
