"""A clock the test moves by hand, for the simulator's request-driven model."""

from __future__ import annotations

from datetime import UTC, datetime


class ManualClock:
    speed = 1.0

    def __init__(self) -> None:
        self.ns = 0

    def monotonic_ns(self) -> int:
        return self.ns

    def utc(self) -> datetime:
        return datetime(2026, 11, 26, tzinfo=UTC)

    def at(self, seconds: float) -> None:
        """Move to ``seconds`` since the start."""
        self.ns = round(seconds * 1e9)
