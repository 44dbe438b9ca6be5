"""One capped exponential backoff, used by every reconnect and retry loop in iortd.

Each delay is the current step, which doubles after every use up to a cap, and resets on
success. With jitter (the default, for reconnects to a shared broker or device) the delay
drawn is uniform in [step/2, step] ("equal jitter": many clients that lost the same peer at
the same moment do not return in lock-step, and none waits less than half its step; AWS
Architecture Blog, "Exponential Backoff And Jitter", 2015). Without jitter (local retries,
such as a failing disk write) the delay is the step itself.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial ({initial_s}) <= max ({max_s})")
        self.initial_s = initial_s
        self.max_s = max_s
        self._jitter = jitter
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.step_s = initial_s

    def next_delay(self) -> float:
        """The delay to wait now; the step then doubles (up to the cap)."""
        step = self.step_s
        self.step_s = min(step * 2, self.max_s)
        return self._rng.uniform(step / 2, step) if self._jitter else step

    def reset(self) -> None:
        """After a success: the next failure waits the initial step again."""
        self.step_s = self.initial_s

    def hold(self, step_s: float) -> None:
        """Make the next step at least ``step_s`` (a longer wait imposed by another rule)."""
        self.step_s = min(max(self.step_s, step_s), max(self.max_s, step_s))
