"""What a device loop tells about its own progress: the watchdog's, the health endpoint's
and the metrics' one source for a device.

A :class:`~iortd.daemon.device_loop.DeviceLoop` holds one :class:`DeviceProgress` and,
before every await that may take a while (a driver call, the wait for the next poll, the
reconnect backoff), says by when it will be back (:meth:`DeviceProgress.expect`): the
call's own bound, or the wait's length. The loop is *wedged* when that moment has passed
by more than a grace: a driver call that ignores its cancellation, a loop that never got
the event loop back. A device that is offline is not wedged: its loop still iterates
(connect attempts and backoff waits each say by when they end), which is exactly what
must never stop the systemd watchdog (docs/operations.md).

Figures for the metrics are counted here too (polls, errors by kind, the last good
reading), on the event loop only: no locks.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["WEDGE_GRACE_S", "DeviceProgress"]

# How late a loop may be back beyond the bound it announced before it counts as wedged:
# room for a loaded machine's scheduling, far below any watchdog period worth setting.
WEDGE_GRACE_S = 2.0


class DeviceProgress:
    """One device loop's progress and counters (real monotonic seconds)."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.back_by = clock()  # when the loop must have reported again
        self.polls = 0  # read attempts (good or not)
        # by kind: protocol_violation, device_fault, link_lost
        self.errors: Counter[str] = Counter()
        self.last_reading: float | None = None  # monotonic time of the last good reading
        self.connected = False  # identified, polling

    def expect(self, within_s: float) -> None:
        """The loop is about to await something bounded by ``within_s`` seconds."""
        self.back_by = self._clock() + within_s

    def ended(self) -> None:
        """The loop has returned (the stop): nothing more to wait for."""
        self.back_by = math.inf
        self.connected = False

    def polled(self, error: str | None = None) -> None:
        self.polls += 1
        if error is None:
            self.last_reading = self._clock()
        else:
            self.errors[error] += 1

    def lost(self) -> None:
        self.connected = False
        self.errors["link_lost"] += 1

    def overdue_s(self, now: float | None = None) -> float:
        """How far past its announced bound the loop is (0 when on time)."""
        late = (self._clock() if now is None else now) - self.back_by
        return max(0.0, late)

    def wedged(self, now: float | None = None) -> bool:
        return self.overdue_s(now) > WEDGE_GRACE_S

    def age_s(self, now: float | None = None) -> float | None:
        """Seconds since the last good reading (None: none yet in this run)."""
        if self.last_reading is None:
            return None
        return (self._clock() if now is None else now) - self.last_reading
