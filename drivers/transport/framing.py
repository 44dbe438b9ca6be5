"""Framing shared by every transport: reading a frame to its terminator or an exact byte
count, resynchronising after an overlong line, and dropping pending input.

:class:`BufferedTransport` works on an input buffer that each implementation fills through
``_receive(deadline)`` and on a clock of its own (``_now``): the real links use the event
loop's clock (link.py), the scripted fake a virtual one (scripted.py). So the fake runs the
very framing code the serial and TCP links run, and a framing bug cannot hide behind it.

Resynchronisation: a line longer than ``max_bytes`` is discarded up to and including its
terminator before ProtocolViolation is raised, so the next read starts on a frame boundary;
if the terminator does not come within the timeout, the skip stays armed and the next
read_until finishes it first. A timeout leaves a partial frame buffered: the owner calls
drain_input before the next request.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Self

from iortd.drivers.errors import ProtocolViolation, TransportTimeout

__all__ = ["BufferedTransport"]


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    return float(timeout_s)


def _check_frame_args(terminator: bytes, max_bytes: int) -> None:
    if not terminator:
        raise ValueError("terminator must not be empty")
    if max_bytes < len(terminator):
        raise ValueError(f"max_bytes ({max_bytes}) is shorter than the terminator")


class BufferedTransport:
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
