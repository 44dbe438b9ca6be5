"""Byte transports under the drivers: serial, TCP and a scripted fake for unit tests.

A driver talks to its device only through :class:`Transport`: write a request, read a reply
up to a terminator (or an exact byte count), drop pending input to resynchronise. Every
I/O is bounded by the ``timeout_s`` the transport was built with (the device's
``timeout_s`` in the config), and every failure is one of drivers.errors:

- :class:`~iortd.drivers.errors.TransportTimeout`: nothing (or not enough) arrived in time;
- :class:`~iortd.drivers.errors.TransportClosed`: the link is gone (EOF, cable pulled, port
  vanished, connection refused) or was never opened;
- :class:`~iortd.drivers.errors.ProtocolViolation`: bytes arrived but no terminator within
  ``max_bytes``.

Nothing reconnects behind the caller's back: after TransportClosed the owner closes the
transport and opens it again (with its own backoff).

Drivers never import pyserial or sockets; the composition root builds transports with
:func:`transport_from_config` from a device's ``[transport]`` table, checked beforehand
by :func:`validate_transport`.

This package is public (docs/engineers.md, "Writing a driver"): import the names below from
``iortd.drivers.transport`` itself. Its modules are its layout, one concern each, and may
move:

- ``base``: the :class:`Transport` protocol, the contract;
- ``framing``: reading to a terminator or a byte count, resynchronising, draining; shared
  by every implementation, the fake included;
- ``link``: the asyncio protocol and lifecycle the real links share (open, write, wait
  for input, close; timeouts and error mapping);
- ``serial_port`` and ``tcp``: the two real links;
- ``shared``: one serial line shared by several devices (``SharedLine``, a ``LineView``
  per device: one exchange at a time, turns round-robin); built by the composition root,
  not part of the public surface above (import it from ``iortd.drivers.transport.shared``);
- ``scripted``: the scripted fake (:class:`ScriptedTransport`, :class:`Expect`,
  :class:`Reply`, :class:`Eof`);
- ``config``: the ``[transport]`` table, checked and built.
"""

from iortd.drivers.transport.base import Transport
from iortd.drivers.transport.config import transport_from_config, validate_transport
from iortd.drivers.transport.scripted import (
    Eof,
    Expect,
    Reply,
    ScriptedTransport,
    ScriptError,
    ScriptStep,
)
from iortd.drivers.transport.serial_port import SerialTransport
from iortd.drivers.transport.tcp import TcpTransport

__all__ = [
    "Eof",
    "Expect",
    "Reply",
    "ScriptError",
    "ScriptStep",
    "ScriptedTransport",
    "SerialTransport",
    "TcpTransport",
    "Transport",
    "transport_from_config",
    "validate_transport",
]
