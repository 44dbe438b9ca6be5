"""Time formatting: the one wall-clock format of the log, the topics and the reports."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["epoch_ns", "utc_ts"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ns(dt: datetime) -> int:
    """An aware datetime as integer nanoseconds since the epoch (exact to the microsecond)."""
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def utc_ts(dt: datetime) -> str:
    """RFC 3339 UTC with microseconds and Z (the log's only time format)."""
    if dt.utcoffset():
        dt = dt.astimezone(UTC)
    return dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
