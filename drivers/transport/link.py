"""What the real links (serial and TCP) share: one asyncio protocol, and the link's
lifecycle with its timeouts and error mapping.

:class:`Link` receives into the transport's buffer and tracks EOF, the loss of the link and
write flow control; :class:`LinkTransport` opens it (through its subclass's ``_connect``),
writes with nothing left in a hidden send queue, waits for input until a deadline, and maps
what the OS reports to drivers.errors: a lost, refused or closed link is TransportClosed,
a write or read past the timeout TransportTimeout. Nothing reconnects behind the caller's
back: after TransportClosed the owner closes the transport and opens it again (with its own
backoff). Closing aborts the OS link (never waits for a stuck peer or port) and is bounded
by the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from iortd.drivers.errors import TransportClosed, TransportTimeout
from iortd.drivers.transport.framing import BufferedTransport

__all__ = ["Link", "LinkTransport"]

# Input buffered beyond this while nobody reads pauses reading (TCP pushes back on the
# peer; a serial port's kernel buffer fills and drops), so a chatty device cannot grow
# the daemon's memory. A read that needs more bytes resumes it.
_HIGH_WATER: Final = 64 * 1024


class Link(asyncio.Protocol):
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


class LinkTransport(BufferedTransport):
    """What serial and TCP share: the link's lifecycle, timeouts and error mapping."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self._link: Link | None = None

    async def _connect(self, link: Link) -> asyncio.Transport:
        """Open the OS link bound to ``link``, within the timeout; map its errors."""
        raise NotImplementedError

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _closed_error(self, link: Link | None) -> TransportClosed:
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
        link = Link(self._rx)
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
