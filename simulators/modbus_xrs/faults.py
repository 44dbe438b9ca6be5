"""Link faults and reply timing, shared by the TCP and RTU servers.

A reply passes :func:`through_link` on its way out: with the device's link dropped
(:meth:`Link.link_down`) nothing arrives, with garbling on (:meth:`Link.garbled`) the
server's :class:`Noise` replaces
it. The noise is seeded, so a garbled run can be reproduced. :class:`Sender` then writes
replies in order, each held back for its delay (a slow console, the RTU line time), and
cancels what is pending when the connection closes.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["Link", "Noise", "Sender", "ServedDevice", "through_link"]


class Link(Protocol):
    """What the servers ask a served device: its link faults, its reply delay, and its
    request count (a source console's SimDevice, an applicator's ApplicatorDevice)."""

    requests: int

    def link_down(self) -> bool: ...

    def garbled(self) -> bool: ...

    def reply_delay_s(self) -> float: ...


class ServedDevice(Link, Protocol):
    """A device behind a Modbus slave: its link, its time and its actions."""

    @property
    def time_s(self) -> float: ...

    def apply(self, action: str, args: Mapping[str, Any]) -> object: ...


class Noise:
    """Seeded line noise, so that a garbled run can be reproduced."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - seeded noise, reproducible

    def random_bytes(self, lo: int, hi: int) -> bytes:
        n = self.rng.randint(lo, hi)
        return bytes(self.rng.randrange(256) for _ in range(n))

    def tcp(self, reply: bytes) -> bytes:
        """Garbage for a TCP reply: half the time a plausible MBAP header (the request's
        transaction id, length matching) around random PDU bytes; else a broken header
        (wrong protocol id or length) or bytes without any header."""
        roll = self.rng.random()
        body = self.random_bytes(1, 60)
        if roll < 0.5:
            return reply[:4] + struct.pack(">HB", len(body) + 1, reply[6]) + body
        if roll < 0.8:
            bad = struct.pack(">HHHB", self.rng.randrange(0x10000), 0x1234, 0xFFF0, reply[6])
            return bad + body
        return body


class Sender:
    """Writes replies in order, each held back for its delay (slow console, line time)
    but never before the previous one has gone; pending writes are cancelled on close,
    so nothing is written into a closed (or reused) descriptor."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._loop = asyncio.get_running_loop()
        self._free_at = 0.0
        self._pending: set[asyncio.TimerHandle] = set()

    def send(self, data: bytes, hold_s: float) -> None:
        now = self._loop.time()
        at = max(now + hold_s, self._free_at)
        self._free_at = at
        if at <= now:
            self._write(data)
            return

        def fire() -> None:
            self._pending.discard(handle)
            self._write(data)

        handle = self._loop.call_at(at, fire)
        self._pending.add(handle)

    def cancel(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()


def through_link(device: Link, reply: bytes, garble: Callable[[bytes], bytes]) -> bytes | None:
    """The reply as the link delivers it now (``None``: nothing arrives)."""
    if device.link_down():
        return None  # the cable is pulled: the request goes nowhere
    if device.garbled():
        return garble(reply)
    return reply
