"""The applicator reader's actions (APL-MB/1 simulator), from a control request or a
scenario step: :data:`APL_ACTIONS` (each action's arguments) and :func:`parse_apl_step`,
which checks them and names the action and the key in what it refuses.

Actions on the stand: ``drift`` (``rate`` in mm/min, ``direction``: 0 stops), ``bump``
(``mm``, ``direction``), ``tilt`` (``deg``, ``direction`` of two numbers), ``release_brakes``,
``engage_brakes``, ``lock`` (a re-lock: brakes on and a new reference). On the reader:
``unseat``, ``seat`` [``code``], ``swap`` ``code``, ``unlatch_source``, ``latch_source``,
``fault`` [``code``: READER (default), POSITION, TILT, BRAKE, INTERNAL], ``clear_fault``.
On the link, as for a console: ``drop_link`` ``duration`` (reader link loss),
``garble`` ``duration``, ``delay_replies`` ``duration`` ``delay``, ``restore_link``. A
``direction`` is an axis (``x``, ``-z``) or numbers (``"1,0,-1"``, or a list), not all 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from iortd.simulators.applicator import FAULT_CODES, RANGE_MM, TILT_RANGE_DEG
from iortd.simulators.durations import checked_duration

__all__ = ["APL_ACTIONS", "LINK_ACTIONS", "StepError", "parse_apl_step"]


class StepError(ValueError):
    """An action or its arguments refused; the message names the action and the key."""


MAX_RATE_MM_MIN: Final = 1000.0
MAX_DURATION_S: Final = 24 * 3600.0
MAX_DELAY_S: Final = 60.0

# The arguments each action takes (required ones marked True).
APL_ACTIONS: Final[Mapping[str, Mapping[str, bool]]] = MappingProxyType(
    {
        "drift": {"rate": True, "direction": False},
        "bump": {"mm": True, "direction": False},
        "tilt": {"deg": True, "direction": False},
        "release_brakes": {},
        "engage_brakes": {},
        "lock": {},
        "unseat": {},
        "seat": {"code": False},
        "swap": {"code": True},
        "unlatch_source": {},
        "latch_source": {},
        "fault": {"code": False},
        "clear_fault": {},
        "drop_link": {"duration": True},
        "garble": {"duration": True},
        "delay_replies": {"duration": True, "delay": True},
        "restore_link": {},
    }
)
LINK_ACTIONS: Final = frozenset({"drop_link", "garble", "delay_replies", "restore_link"})
_AXES: Final = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def _direction(action: str, raw: object, n: int) -> tuple[float, ...]:
    """``"x"``, ``"-z"`` (an axis), ``"1,0,-1"`` or a list of ``n`` numbers, not all 0."""
    bad = StepError(
        f"{action}: 'direction' must be an axis (x, -x, y, -y"
        + (", z, -z" if n == 3 else "")
        + f") or {n} numbers like {'1,0,0' if n == 3 else '1,0'} (not all 0), got {raw!r}"
    )
    if isinstance(raw, str):
        text = raw.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        axis = _AXES.get(text.lstrip("+-"))
        if axis is not None and (n == 3 or axis[2] == 0):
            return tuple(sign * c for c in axis[:n])
        try:
            raw = [float(part) for part in text.split(",")]
        except ValueError:
            raise bad from None
    if not isinstance(raw, list | tuple) or len(raw) != n:
        raise bad
    if any(isinstance(c, bool) or not isinstance(c, int | float) for c in raw):
        raise bad
    vec = tuple(float(c) for c in raw)
    if not all(math.isfinite(c) for c in vec) or not any(vec):
        raise bad
    return vec


def _number(action: str, key: str, raw: object, lo: float, hi: float, what: str) -> float:
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or not lo <= raw <= hi
    ):
        raise StepError(f"{action}: {key!r} must be {what}, got {raw!r}")
    return float(raw)


def parse_apl_step(action: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The checked arguments of one applicator action (``raw``: its keys besides
    ``action``, as a control request or a scenario step gives them). Raises ValueError
    naming the action and the key."""
    spec = APL_ACTIONS.get(action)
    if spec is None:
        known = ", ".join(sorted(APL_ACTIONS))
        raise StepError(f"unknown action {action!r} for an applicator reader (known: {known})")
    if unknown := set(raw) - set(spec):
        takes = ", ".join(sorted(spec)) or "no arguments"
        raise StepError(f"{action}: unknown argument(s) {sorted(unknown)} (takes: {takes})")
    for key, required in spec.items():
        if required and key not in raw:
            raise StepError(f"{action}: missing {key!r}")
    args: dict[str, Any] = {}
    if action == "drift":
        args["rate_mm_min"] = _number(
            action, "rate", raw["rate"], 0, MAX_RATE_MM_MIN, "a number of mm/min in 0..1000"
        )
        args["direction"] = _direction(action, raw.get("direction", "x"), 3)
    elif action == "bump":
        args["mm"] = _number(
            action, "mm", raw["mm"], -RANGE_MM, RANGE_MM, f"a number of mm within ±{RANGE_MM}"
        )
        args["direction"] = _direction(action, raw.get("direction", "x"), 3)
    elif action == "tilt":
        limit = TILT_RANGE_DEG
        args["deg"] = _number(
            action, "deg", raw["deg"], -limit, limit, f"a number of degrees within ±{limit:g}"
        )
        args["direction"] = _direction(action, raw.get("direction", "x"), 2)
    elif action in ("seat", "swap") and "code" in raw:
        code = raw["code"]
        if not isinstance(code, str) or not code:
            raise StepError(f"{action}: 'code' must be an applicator code, got {code!r}")
        args["code"] = code
    elif action == "fault":
        code = raw.get("code", "READER")
        if code not in FAULT_CODES:
            raise StepError(f"{action}: 'code' must be one of {', '.join(FAULT_CODES)}")
        args["code"] = code
    if "duration" in raw:
        args["duration_s"] = checked_duration(
            action, "duration", raw["duration"], MAX_DURATION_S, StepError
        )
    if "delay" in raw:
        args["delay_s"] = checked_duration(action, "delay", raw["delay"], MAX_DELAY_S, StepError)
    return args
