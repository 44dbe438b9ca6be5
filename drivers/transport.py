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
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import termios
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

import serial
import serial_asyncio_fast

from iortd.drivers.errors import (
    DriverOptionError,
    ProtocolViolation,
    TransportClosed,
    TransportError,
    TransportTimeout,
)

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

BYTESIZES: Final = frozenset({5, 6, 7, 8})
PARITIES: Final = frozenset({"N", "E", "O", "M", "S"})
STOPBITS: Final = frozenset({1, 1.5, 2})
MIN_BAUDRATE: Final = 50
MAX_BAUDRATE: Final = 4_000_000

# Input buffered beyond this while nobody reads pauses reading (TCP pushes back on the
# peer; a serial port's kernel buffer fills and drops), so a chatty device cannot grow
# the daemon's memory. A read that needs more bytes resumes it.
_HIGH_WATER: Final = 64 * 1024


@runtime_checkable
class Transport(Protocol):
    """A bidirectional byte link to one device; every I/O is bounded by its timeout.

    Also an async context manager: ``async with transport:`` opens and closes it.
    """

    async def open(self) -> None:
        """Connect. Raises TransportTimeout or TransportClosed (port missing, busy,
        refused). Opening a transport whose link was lost reopens it; opening a live one
        is a programming error (RuntimeError)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data``; returns once all of it was handed to the OS. Raises
        TransportTimeout if that takes longer than the timeout (the link's state is then
        unknown: close and reopen) and TransportClosed if the link is gone."""
        ...

    async def read_until(self, terminator: bytes, max_bytes: int) -> bytes:
        """Return the next frame, up to and including ``terminator``, at most
        ``max_bytes`` long (terminator included); one timeout covers the whole frame.

        Raises TransportTimeout if the frame is not complete in time (the partial frame
        stays buffered: call drain_input to resynchronise), TransportClosed on EOF or a
        lost link once the buffered bytes are used up, and ProtocolViolation if
        ``max_bytes`` arrive without a terminator. In that last case the overlong line is
        discarded up to and including its terminator before the error is raised, so the
        next read starts on a frame boundary; if the terminator does not come within the
        timeout, the error is raised at the deadline and the next read_until silently
        discards the rest of the line first (drain_input does not disarm that skip).
        """
        ...

    async def read_exactly(self, n: int, *, timeout_s: float | None = None) -> bytes:
        """Return exactly ``n`` bytes (binary protocols such as Modbus RTU). Raises
        TransportTimeout if they do not all arrive in time (what did arrive stays
        buffered) and TransportClosed on EOF or a lost link. ``timeout_s`` shortens the
        wait for this call (e.g. to tell a quiet line), never beyond the transport's own."""
        ...

    async def drain_input(self) -> int:
        """Discard input that has already arrived and return how many bytes were dropped.
        Used after a timeout or a bad frame, before the next request. Never raises."""
        ...

    async def close(self) -> None:
        """Release the link. Idempotent, never raises, and bounded by the timeout (if
        the OS close is slower, it finishes in a worker thread)."""
        ...

    def describe(self) -> str:
        """A short description for logs, e.g. ``serial /dev/ttyUSB0 19200 8N1``."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    return float(timeout_s)


def _check_frame_args(terminator: bytes, max_bytes: int) -> None:
    if not terminator:
        raise ValueError("terminator must not be empty")
    if max_bytes < len(terminator):
        raise ValueError(f"max_bytes ({max_bytes}) is shorter than the terminator")


class _BufferedTransport:
    """Framing shared by every transport, over an input buffer ``_rx`` that subclasses
    fill through ``_receive``. The fake runs the same code as the real links."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = _check_timeout(timeout_s)
        self._rx = bytearray()
        self._skip_to: bytes | None = None  # armed: discard through this terminator first

    # -- what a subclass provides ------------------------------------------------------

    def describe(self) -> str:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    async def _receive(self, deadline: float) -> bool:
        """Append at least one byte to ``_rx`` and return True, or return False once the
        deadline has passed; raise TransportClosed if the link is gone or not open."""
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    # -- framing ------------------------------------------------------------------------

    def _discard_through(self, terminator: bytes) -> tuple[int, bool]:
        idx = self._rx.find(terminator)
        if idx >= 0:
            n = idx + len(terminator)
            del self._rx[:n]
            return n, True
        # Keep a tail that may be the start of a terminator split across chunks.
        n = max(0, len(self._rx) - (len(terminator) - 1))
        del self._rx[:n]
        return n, False

    async def read_until(self, terminator: bytes, max_bytes: int) -> bytes:
        _check_frame_args(terminator, max_bytes)
        deadline = self._now() + self._timeout_s
        overlong = False  # this call met a line longer than max_bytes
        dropped = 0
        while True:
            if self._skip_to is not None:
                n, found = self._discard_through(self._skip_to)
                dropped += n
                if found:
                    self._skip_to = None
                    if overlong:
                        raise ProtocolViolation(
                            f"{self.describe()}: more than {max_bytes} bytes without "
                            f"{terminator!r}; discarded {dropped} bytes up to and including "
                            "the next terminator"
                        )
                    continue  # a skip armed by an earlier call is done: read a frame
            else:
                idx = self._rx.find(terminator, 0, max_bytes)
                if idx >= 0:
                    end = idx + len(terminator)
                    frame = bytes(self._rx[:end])
                    del self._rx[:end]
                    return frame
                if len(self._rx) >= max_bytes:
                    self._skip_to = terminator
                    overlong, dropped = True, 0
                    continue
            if not await self._receive(deadline):
                if overlong:
                    raise ProtocolViolation(
                        f"{self.describe()}: more than {max_bytes} bytes without "
                        f"{terminator!r}; discarded {dropped} bytes, no terminator within "
                        f"{self._timeout_s:g} s (the next read discards through it)"
                    )
                raise TransportTimeout(
                    f"{self.describe()}: no complete reply within {self._timeout_s:g} s "
                    f"({len(self._rx)} bytes buffered without {terminator!r})"
                )

    async def read_exactly(self, n: int, *, timeout_s: float | None = None) -> bytes:
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        limit = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        if not limit > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        deadline = self._now() + limit
        while len(self._rx) < n:
            if not await self._receive(deadline):
                raise TransportTimeout(
                    f"{self.describe()}: {len(self._rx)} of {n} bytes within {limit:g} s"
                )
        data = bytes(self._rx[:n])
        del self._rx[:n]
        return data

    async def drain_input(self) -> int:
        n = len(self._rx)
        self._rx.clear()
        return n

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---- real links: one asyncio protocol for serial and TCP ---------------------------------


class _Link(asyncio.Protocol):
    """Receives into the transport's buffer and tracks EOF, loss and write flow control."""

    def __init__(self, rx: bytearray) -> None:
        self.rx = rx
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None  # what connection_lost reported
        self.closed = asyncio.Event()
        self._read_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - asyncio's contract
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.rx += data
        self._wake(self._read_waiter)
        if len(self.rx) > _HIGH_WATER and not self._read_paused and self.transport:
            self.transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake(self._read_waiter)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)
        self.closed.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._drain_waiter)

    async def wait_readable(self) -> None:
        """Return when more bytes, EOF or the loss of the link arrive."""
        if self.eof or self.lost:
            return
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self._read_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def wait_drained(self) -> None:
        """Return when everything written was handed to the OS, or the link is lost."""
        while self._write_paused and not self.lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class _LinkTransport(_BufferedTransport):
    """What serial and TCP share: the link's lifecycle, timeouts and error mapping."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self._link: _Link | None = None

    async def _connect(self, link: _Link) -> asyncio.Transport:
        """Open the OS link bound to ``link``, within the timeout; map its errors."""
        raise NotImplementedError

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _closed_error(self, link: _Link | None) -> TransportClosed:
        if link is None:
            return TransportClosed(f"{self.describe()}: not open")
        if link.error is not None:
            return TransportClosed(f"{self.describe()}: link lost: {link.error}")
        if link.eof:
            return TransportClosed(f"{self.describe()}: the peer closed the link")
        return TransportClosed(f"{self.describe()}: link closed")

    async def open(self) -> None:
        if self._link is not None:
            if not (self._link.lost or self._link.eof):
                raise RuntimeError(f"{self.describe()}: already open")
            await self.close()
        self._rx = bytearray()
        self._skip_to = None
        link = _Link(self._rx)
        transport = await self._connect(link)
        link.transport = transport
        # Pause as soon as anything is left unsent, so write() waits for the OS to take
        # every byte: a request/response link wants no hidden send queue.
        transport.set_write_buffer_limits(high=0)
        self._link = link

    async def write(self, data: bytes) -> None:
        link = self._link
        if link is None or link.lost or link.eof or link.transport is None:
            raise self._closed_error(link)
        link.transport.write(data)
        try:
            async with asyncio.timeout(self._timeout_s):
                await link.wait_drained()
        except TimeoutError:
            raise TransportTimeout(
                f"{self.describe()}: {len(data)} bytes not sent within {self._timeout_s:g} s"
            ) from None
        if link.lost:
            raise self._closed_error(link) from link.error

    async def _receive(self, deadline: float) -> bool:
        link = self._link
        if link is None or link.lost or link.eof:
            raise self._closed_error(link) from (link.error if link else None)
        before = len(self._rx)
        try:
            async with asyncio.timeout_at(deadline):
                while len(self._rx) == before and not (link.lost or link.eof):
                    await link.wait_readable()
        except TimeoutError:
            return False
        if len(self._rx) > before:
            return True
        raise self._closed_error(link) from link.error

    async def close(self) -> None:
        link, self._link = self._link, None
        self._rx.clear()
        self._skip_to = None
        if link is None:
            return
        if not link.lost and link.transport is not None:
            # abort, not close: close() waits for the write buffer to empty (forever if
            # the peer stopped reading), and pyserial-asyncio-fast's close() also tcdrains
            # in a thread, which a stuck port never finishes. write() left no buffer.
            link.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await link.closed.wait()


# ---- serial --------------------------------------------------------------------------------


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


class SerialTransport(_LinkTransport):
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

    async def _connect(self, link: _Link) -> asyncio.Transport:
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


# ---- TCP -----------------------------------------------------------------------------------


class TcpTransport(_LinkTransport):
    """A TCP connection (a serial device server, a Modbus TCP device), with TCP_NODELAY."""

    def __init__(self, host: str, port: int, *, timeout_s: float) -> None:
        super().__init__(timeout_s)
        if not host:
            raise ValueError("host must not be empty")
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"port must be 1..65535, got {port!r}")
        self.host = host
        self.port = port

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp {host}:{self.port}"

    async def _connect(self, link: _Link) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                transport, _ = await loop.create_connection(lambda: link, self.host, self.port)
        except TimeoutError:
            raise TransportTimeout(
                f"{self.describe()}: no connection within {self._timeout_s:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, unknown host
            raise TransportClosed(f"{self.describe()}: cannot connect: {exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small request/response frames: never let Nagle hold a request back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport


# ---- the scripted fake ------------------------------------------------------------------


class ScriptError(AssertionError):
    """The code under test did something its ScriptedTransport's script did not expect."""


@dataclass(frozen=True, slots=True)
class Expect:
    """The driver must write exactly these bytes next (in one or several writes)."""

    data: bytes

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("Expect needs at least one byte")


@dataclass(frozen=True, slots=True)
class Reply:
    """The device sends these bytes ``delay_s`` (virtual seconds) after the previous
    event: the driver's last expected write, or the previous Reply. Several Replies in a
    row make a reply split into chunks."""

    data: bytes
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("Reply needs at least one byte")
        if not self.delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s!r}")


@dataclass(frozen=True, slots=True)
class Eof:
    """The device closes the link ``delay_s`` after the previous event. Reads raise
    TransportClosed once the bytes before it are consumed; the script continues after
    the transport is reopened."""

    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s!r}")


ScriptStep = Expect | Reply | Eof


class ScriptedTransport(_BufferedTransport):
    """A fake device playing a script, for unit tests of drivers and codecs.

    Time is virtual: a read whose reply is due later than the timeout raises
    TransportTimeout at once and advances :attr:`elapsed_s` to the deadline; the late
    reply arrives afterwards (drain_input drops it once it is due). No test waits in
    real time. A write that does not match the next Expect raises ScriptError (an
    AssertionError), and :meth:`assert_done` fails if the script was not played out.
    Framing (read_until, read_exactly) is the same code the real transports run.
    """

    def __init__(
        self, script: Iterable[ScriptStep], *, timeout_s: float = 1.0, name: str = "device"
    ) -> None:
        super().__init__(timeout_s)
        self.name = name
        self.writes: list[bytes] = []
        self._steps: deque[ScriptStep] = deque(script)
        self._index = 0  # number of steps taken off the script, for messages
        self._expect: bytes = b""  # what is left of the current Expect
        self._expect_step: Expect | None = None
        self._arrivals: deque[tuple[float, bytes | None]] = deque()  # (due, bytes or EOF)
        self._last_event_s = 0.0
        self._clock_s = 0.0
        self._open = False
        self._eof = False
        self._failure: ScriptError | None = None
        for step in self._steps:
            if not isinstance(step, Expect | Reply | Eof):
                raise TypeError(f"not a script step: {step!r}")

    @property
    def elapsed_s(self) -> float:
        """Virtual seconds since the transport was built."""
        return self._clock_s

    def describe(self) -> str:
        return f"scripted {self.name}"

    def _now(self) -> float:
        return self._clock_s

    def _fail(self, message: str) -> ScriptError:
        self._failure = ScriptError(f"{self.describe()}: {message}")
        return self._failure

    def _advance_script(self) -> None:
        """Schedule the device's sends up to the next Expect (or an Eof)."""
        while self._steps and not self._expect:
            step = self._steps.popleft()
            self._index += 1
            if isinstance(step, Expect):
                self._expect, self._expect_step = step.data, step
                return
            due = max(self._last_event_s, self._clock_s) + step.delay_s
            self._last_event_s = due
            self._arrivals.append((due, step.data if isinstance(step, Reply) else None))
            if isinstance(step, Eof):
                return

    async def open(self) -> None:
        await asyncio.sleep(0)
        if self._open:
            raise RuntimeError(f"{self.describe()}: already open")
        self._open, self._eof = True, False
        self._last_event_s = self._clock_s
        self._advance_script()

    async def close(self) -> None:
        await asyncio.sleep(0)
        self._open = False
        self._rx.clear()
        self._skip_to = None
        self._arrivals.clear()  # whatever was still on the wire is lost

    def _eof_arrived(self) -> bool:
        return self._eof or bool(
            self._arrivals
            and self._arrivals[0][1] is None
            and self._arrivals[0][0] <= self._clock_s
        )

    async def write(self, data: bytes) -> None:
        await asyncio.sleep(0)
        if not self._open or self._eof_arrived():
            raise TransportClosed(f"{self.describe()}: link closed")
        self.writes.append(bytes(data))
        rest = bytes(data)
        while rest:
            if not self._expect:
                raise self._fail(
                    f"unexpected write {bytes(data)!r}: the script expects no write here "
                    f"(after step {self._index})"
                )
            n = min(len(rest), len(self._expect))
            if rest[:n] != self._expect[:n]:
                raise self._fail(
                    f"step {self._index}: expected a write of {self._expect_step!r} "
                    f"(still expecting {self._expect!r}), got {bytes(data)!r}"
                )
            rest, self._expect = rest[n:], self._expect[n:]
            if not self._expect:
                self._last_event_s = self._clock_s
                self._advance_script()

    async def _receive(self, deadline: float) -> bool:
        await asyncio.sleep(0)
        if not self._open:
            raise TransportClosed(f"{self.describe()}: not open")
        if self._eof:
            raise TransportClosed(f"{self.describe()}: the peer closed the link")
        if self._arrivals and self._arrivals[0][0] <= deadline:
            due, data = self._arrivals.popleft()
            self._clock_s = max(self._clock_s, due)
            if data is None:
                self._eof = True
                raise TransportClosed(f"{self.describe()}: the peer closed the link")
            self._rx += data
            return True
        self._clock_s = max(self._clock_s, deadline)
        return False

    async def drain_input(self) -> int:
        await asyncio.sleep(0)
        while self._arrivals and self._arrivals[0][0] <= self._clock_s:
            data = self._arrivals[0][1]
            if data is None:
                break
            self._arrivals.popleft()
            self._rx += data
        return await super().drain_input()

    def assert_done(self) -> None:
        """Fail unless every step was played and every byte sent was read or drained."""
        if self._failure is not None:
            raise self._failure
        left: list[str] = []
        if self._expect:
            left.append(f"an unwritten {self._expect!r}")
        if self._steps:
            left.append(f"{len(self._steps)} step(s) never reached: {list(self._steps)!r}")
        unread = sum(len(d) for _, d in self._arrivals if d is not None) + len(self._rx)
        if unread:
            left.append(f"{unread} byte(s) sent by the device never read")
        if left:
            raise ScriptError(f"{self.describe()}: script not finished: " + "; ".join(left))


# ---- config -------------------------------------------------------------------------------


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
