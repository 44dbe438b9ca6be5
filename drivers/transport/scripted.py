"""The scripted fake transport: a device playing a script, for unit tests of drivers and
codecs (ours and third-party ones).

A script is a list of steps: :class:`Expect` (the bytes the driver must write next),
:class:`Reply` (bytes the device sends, after a delay) and :class:`Eof` (the device closes
the link). Time is virtual, so no test waits in real time, and the framing is
:class:`~iortd.drivers.transport.framing.BufferedTransport`'s, the same code the serial and
TCP links run: a driver tested on the fake meets the same timeouts, resynchronisation and
errors it meets on a wire. A write the script does not expect raises :class:`ScriptError`
(an AssertionError), and :meth:`ScriptedTransport.assert_done` fails if the script was not
played out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from iortd.drivers.errors import TransportClosed
from iortd.drivers.transport.framing import BufferedTransport

__all__ = ["Eof", "Expect", "Reply", "ScriptError", "ScriptStep", "ScriptedTransport"]


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


class ScriptedTransport(BufferedTransport):
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
