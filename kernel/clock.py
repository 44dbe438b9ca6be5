"""The two clocks of the daemon: monotonic for durations, UTC wall time for timestamps.

Everything that reads time takes a :class:`Clock`, so that a simulator run under a speed
factor shares one consistent, compressed time base with the daemon that watches it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ScaledClock", "SystemClock"]


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def utc(self) -> datetime: ...

    @property
    def speed(self) -> float:
        """How many clock seconds pass per real second (1 for real equipment)."""
        ...


class SystemClock:
    speed = 1.0

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def utc(self) -> datetime:
        return datetime.now(UTC)


class ScaledClock:
    """Simulated time running ``speed`` times faster than real time, from the moment of
    construction. UTC is derived from the same monotonic base, so a wall-clock step on the
    host does not make simulated time jump."""

    def __init__(self, speed: float, base: Clock | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self._base = base or SystemClock()
        self._speed = speed
        self._mono0 = self._base.monotonic_ns()
        self._utc0 = self._base.utc()

    @property
    def speed(self) -> float:
        return self._speed

    def monotonic_ns(self) -> int:
        real = self._base.monotonic_ns() - self._mono0
        return self._mono0 + round(real * self._speed)

    def utc(self) -> datetime:
        elapsed_ns = self.monotonic_ns() - self._mono0
        return self._utc0 + timedelta(microseconds=elapsed_ns / 1000)
