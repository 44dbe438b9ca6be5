"""One serial line shared by several devices (an RS-485 bus, Modbus RTU at several unit ids).

A :class:`SharedLine` owns the one transport of the line; each device's driver gets a
:class:`LineView` of it (a :class:`~iortd.drivers.transport.base.Transport` itself), so a
driver written for a line of its own works unchanged. What the line adds:

- **one exchange at a time, in turn**: a driver wraps each request/reply exchange in
  ``async with view.turn():``. Turns are handed over first come, first served (the line
  passes straight to the longest waiter, nobody barges in on release), so between devices
  that each want one exchange at a time the order is round-robin: a device polling at
  10 Hz beside another at 10 Hz gets every other turn, and a slow (or silent) device delays
  the others by one exchange, bounded by its own ``timeout_s``, never more;
- **one owner of the port**: the first view to open opens the transport, the last to close
  closes it; closing one device's view never closes the line under another. A view that
  meets a lost link marks the line broken, and the next open (by any view) reopens it;
- **the time a device waits for the line**: :meth:`LineView.waited_ns` is the line time a
  device has spent waiting for its own exchange to go on the wire (the other devices'
  turns, and the settling after another's timeout that its turn begins with), each wait
  counted up to the view's ``wait_cap_ns`` (one round of the other devices' turns: what
  round-robin promises; 0, the default, counts nothing). The daemon pauses the device's
  staleness by it, so staleness counts the device's own missed turns, not the line's
  (daemon/service.py);
- **a line-wide "late reply possible"**: after a timeout or an unreadable frame on one
  device's turn, the reply may still be on the wire when the next device's turn begins.
  :attr:`LineView.unsettled` tells the next turn's holder to wait for the line to go quiet
  first (drivers/modbus_exchange.py); were a late frame still read, the codec would reject
  it by its unit id and CRC.

All of it runs on one event loop (the daemon's); nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self

from iortd.drivers.errors import TransportClosed
from iortd.drivers.transport.base import Transport

__all__ = ["LineView", "SharedLine"]


class SharedLine:
    """The owner of one shared line's transport; hands out :class:`LineView` s."""

    def __init__(self, transport: Transport, *, now_ns: Callable[[], int] | None = None) -> None:
        self._transport = transport
        self._now_ns = now_ns or time.monotonic_ns  # the clock waits are measured on
        self._holder: LineView | None = None
        self._waiters: deque[tuple[LineView, asyncio.Future[None]]] = deque()
        self._open_views: set[LineView] = set()
        self._opened = False
        self._broken = False
        self.unsettled = False

    def view(self, name: str, *, wait_cap_ns: int = 0) -> LineView:
        """A view of the line for one device (``name`` is for messages); each of its
        waits for the line counts up to ``wait_cap_ns`` in :meth:`LineView.waited_ns`."""
        return LineView(self, name, wait_cap_ns=wait_cap_ns)

    def describe(self) -> str:
        return self._transport.describe()

    @property
    def holder(self) -> str | None:
        """Whose turn it is (a device's name), if anyone's."""
        return None if self._holder is None else self._holder.name

    async def _acquire(self, view: LineView) -> None:
        if self._holder is None and not self._waiters:
            self._holder = view
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((view, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and self._holder is view:
                self._release(view)  # handed the turn as we were cancelled: pass it on
            else:
                self._waiters.remove((view, waiter))
            raise

    def _release(self, view: LineView) -> None:
        if self._holder is not view:
            return
        self._holder = None
        while self._waiters:
            nxt, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._holder = nxt
            waiter.set_result(None)
            return

    async def _open(self, view: LineView) -> None:
        async with view.turn():
            if self._opened and self._broken:
                await self._transport.close()
                self._opened = False
            if not self._opened:
                await self._transport.open()
                self._opened = True
                self._broken = False
                self.unsettled = True  # a line just (re)opened may carry an old reply
            self._open_views.add(view)

    async def _close(self, view: LineView) -> None:
        self._open_views.discard(view)
        if not self._open_views and self._opened:
            self._opened = False
            await self._transport.close()

    def _mark_broken(self) -> None:
        self._broken = True


class LineView:
    """One device's view of a :class:`SharedLine`: a Transport whose I/O goes to the line's
    transport, plus :meth:`turn`. I/O outside a turn of this view is a programming error
    (RuntimeError): two requests must never be on the wire at once."""

    def __init__(self, line: SharedLine, name: str, *, wait_cap_ns: int = 0) -> None:
        self._line = line
        self.name = name
        self._open = False
        self.wait_cap_ns = max(0, wait_cap_ns)
        self._want_since: int | None = None  # wanting the line for an exchange since
        self._waited_ns = 0  # the waits of exchanges already on the wire, each capped

    @property
    def line(self) -> SharedLine:
        return self._line

    @property
    def unsettled(self) -> bool:
        """True when a reply may still be on its way from an earlier turn (anyone's)."""
        return self._line.unsettled

    @unsettled.setter
    def unsettled(self, value: bool) -> None:
        self._line.unsettled = value

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the line for one exchange; the next waiter gets it on exit (also on an
        error or a cancellation). The wait from here until this turn's first write is
        the device's wait for the line (:meth:`waited_ns`); a turn that writes nothing
        (the open) counts none."""
        self._want_since = self._line._now_ns()
        try:
            await self._line._acquire(self)
            try:
                yield
            finally:
                self._line._release(self)
        finally:
            self._want_since = None

    def waited_ns(self, now_ns: int) -> int:
        """A running total (ns of the line's clock): how long this device has waited for
        its exchanges to go on the wire, each wait counted up to ``wait_cap_ns``; the
        wait going on at ``now_ns`` included."""
        ongoing = 0 if self._want_since is None else self._capped(now_ns - self._want_since)
        return self._waited_ns + ongoing

    def _capped(self, ns: int) -> int:
        return min(max(0, ns), self.wait_cap_ns)

    def _on_wire(self) -> None:
        if self._want_since is not None:
            self._waited_ns += self._capped(self._line._now_ns() - self._want_since)
            self._want_since = None

    def _check(self) -> Transport:
        if not self._open:
            raise TransportClosed(f"{self.describe()}: not open")
        if self._line._holder is not self:
            raise RuntimeError(f"{self.describe()}: I/O outside this device's turn")
        return self._line._transport

    async def open(self) -> None:
        if self._open:
            raise RuntimeError(f"{self.describe()}: already open")
        await self._line._open(self)
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        await self._line._close(self)

    async def write(self, data: bytes) -> None:
        try:
            transport = self._check()
            self._on_wire()
            await transport.write(data)
        except TransportClosed:
            self._line._mark_broken()
            raise

    async def read_until(self, terminator: bytes, max_bytes: int) -> bytes:
        try:
            return await self._check().read_until(terminator, max_bytes)
        except TransportClosed:
            self._line._mark_broken()
            raise

    async def read_exactly(self, n: int, *, timeout_s: float | None = None) -> bytes:
        try:
            return await self._check().read_exactly(n, timeout_s=timeout_s)
        except TransportClosed:
            self._line._mark_broken()
            raise

    async def drain_input(self) -> int:
        if not self._open or self._line._holder is not self:
            return 0
        return await self._line._transport.drain_input()

    def describe(self) -> str:
        return f"{self._line.describe()} (shared, {self.name})"

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
