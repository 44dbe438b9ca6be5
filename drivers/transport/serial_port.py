"""The serial transport: a port (a USB adapter, a UART, or a pty slave in tests) through
pyserial and pyserial-asyncio-fast, the only module of the package that imports them.

The port is opened exclusively (flock) in raw 8-bit mode, in a worker thread that we own:
if the caller stops waiting (timeout, cancellation), the port the thread still opens is
closed again, never leaked and left locked. A setting the port refuses (a pty and parity,
an unsupported baud rate) is a TransportError, and the port is closed again. Writes never
spin on a full kernel buffer (:class:`_Serial`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from typing import Any, Final

import serial
import serial_asyncio_fast

from iortd.drivers.errors import TransportClosed, TransportError, TransportTimeout
from iortd.drivers.transport.link import Link, LinkTransport

__all__ = [
    "BYTESIZES",
    "MAX_BAUDRATE",
    "MIN_BAUDRATE",
    "PARITIES",
    "STOPBITS",
    "SerialTransport",
]

BYTESIZES: Final = frozenset({5, 6, 7, 8})
PARITIES: Final = frozenset({"N", "E", "O", "M", "S"})
STOPBITS: Final = frozenset({1, 1.5, 2})
MIN_BAUDRATE: Final = 50
MAX_BAUDRATE: Final = 4_000_000


class _Serial(serial.Serial):  # type: ignore[misc]  # pyserial ships no type information
    """pyserial's port with a write that never spins.

    With ``write_timeout=0`` pyserial's posix ``write`` retries ``os.write`` in a busy
    loop while the kernel buffer is full (it ignores EAGAIN), which would freeze the event
    loop until the device drains it. Raising BlockingIOError instead lets
    pyserial-asyncio-fast queue the rest and wait for the fd to become writable.
    """

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.is_open:
            raise serial.PortNotOpenError()
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            raise serial.SerialException(f"write failed: {exc}") from exc


def _close_if_opened(fut: asyncio.Future[Any]) -> None:
    """Close a port whose open finished after the caller stopped waiting for it."""
    if fut.cancelled() or fut.exception() is not None:
        return
    with contextlib.suppress(Exception):
        fut.result().close()


class SerialTransport(LinkTransport):
    """A serial port (a USB adapter, a UART, or a pty slave in tests), opened exclusively
    (flock) in raw 8-bit mode through pyserial and pyserial-asyncio-fast."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 19200,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        timeout_s: float,
    ) -> None:
        super().__init__(timeout_s)
        if not port:
            raise ValueError("port must not be empty")
        if isinstance(baudrate, bool) or not MIN_BAUDRATE <= baudrate <= MAX_BAUDRATE:
            raise ValueError(f"baudrate must be {MIN_BAUDRATE}..{MAX_BAUDRATE}, got {baudrate!r}")
        if bytesize not in BYTESIZES:
            raise ValueError(f"bytesize must be one of 5, 6, 7, 8, got {bytesize!r}")
        if parity not in PARITIES:
            raise ValueError(f"parity must be one of N, E, O, M, S, got {parity!r}")
        if stopbits not in STOPBITS:
            raise ValueError(f"stopbits must be 1, 1.5 or 2, got {stopbits!r}")
        self.port = port
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits

    def describe(self) -> str:
        return f"serial {self.port} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits:g}"

    def _make_serial(self) -> Any:
        return _Serial(
            port=self.port,
            baudrate=self.baudrate,
            bytesize=self.bytesize,
            parity=self.parity,
            stopbits=self.stopbits,
            timeout=0,
            write_timeout=0,
            exclusive=True,
        )

    async def _connect(self, link: Link) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        # Open in a thread ourselves instead of create_serial_connection(): if we stop
        # waiting (timeout, cancellation) the thread still finishes the open, and the port
        # it returns must be closed, not leaked and left locked.
        opening = loop.run_in_executor(None, self._make_serial)
        try:
            async with asyncio.timeout(self._timeout_s):
                port = await asyncio.shield(opening)
        except TimeoutError:
            opening.add_done_callback(_close_if_opened)
            raise TransportTimeout(
                f"{self.describe()}: open did not finish within {self._timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            opening.add_done_callback(_close_if_opened)
            raise
        except (serial.SerialException, OSError) as exc:
            raise TransportClosed(f"{self.describe()}: cannot open: {exc}") from exc
        except (ValueError, termios.error) as exc:  # a setting the port itself rejects
            raise TransportError(f"{self.describe()}: cannot configure: {exc}") from exc
        try:
            transport, _ = await serial_asyncio_fast.connection_for_serial(loop, lambda: link, port)
        except (termios.error, serial.SerialException, OSError, ValueError) as exc:
            # e.g. a pseudo-terminal refuses parity: EINVAL from tcsetattr, which is not
            # an OSError. The port is closed again, never left open and locked.
            with contextlib.suppress(Exception):
                port.close()
            raise TransportError(
                f"{self.describe()}: cannot configure the port: {exc} "
                "(check baudrate, bytesize, parity and stopbits)"
            ) from exc
        return transport
