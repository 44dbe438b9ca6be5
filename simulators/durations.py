"""Durations as people write them in scenarios and control requests: ``"2m30s"``."""

from __future__ import annotations

import math
import re

__all__ = ["checked_duration", "parse_duration"]

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """``"2m30s"`` -> 150.0; ``"1h"``, ``"45s"``, ``"0.5s"``."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or not any(m.groups()):
        raise ValueError(f"expected a duration like '45s', '2m30s' or '1h'; got {text!r}")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def checked_duration(
    action: str, key: str, raw: object, limit_s: float, error: type[Exception]
) -> float:
    """``raw`` (seconds as a number, or a duration string) as seconds in (0, ``limit_s``];
    otherwise ``error`` naming the action and the key (a control request's or a scenario
    step's own error type)."""
    if isinstance(raw, bool):
        raise error(f'{action}: {key!r} must be a duration like "5s", got {raw!r}')
    if isinstance(raw, int | float):
        seconds = float(raw)
    else:
        try:
            seconds = parse_duration(raw)  # type: ignore[arg-type]  # checked inside
        except ValueError as exc:
            raise error(f"{action}: {key!r}: {exc}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= limit_s):
        raise error(f"{action}: {key!r} must be > 0 and at most {limit_s:g} s, got {raw!r}")
    return seconds
