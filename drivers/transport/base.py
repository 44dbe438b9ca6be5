"""The transport seam: the :class:`Transport` protocol every driver talks through.

A driver talks to its device only through this protocol: write a request, read a reply up to
a terminator (or an exact byte count), drop pending input to resynchronise. Every I/O is
bounded by the ``timeout_s`` the transport was built with, and every failure is one of
drivers.errors (TransportTimeout, TransportClosed, ProtocolViolation); the methods' docstrings
are the contract each implementation in this package keeps (framing.py, link.py,
serial_port.py, tcp.py, scripted.py).
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = ["Transport"]


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
