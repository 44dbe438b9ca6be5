"""Timed fault scenarios for the simulators: TOML scripts of what happens when.

    # config/scenarios/door-mid-delivery.toml
    description = "The door is opened mid-delivery, closed, and the beam resumed"
    [[step]]
    at = "20s"            # simulated time since the simulator started (e.g. "2m30s")
    action = "open_door"

Actions on the device: ``open_door``, ``close_door``, ``press_estop``, ``release_estop``,
``resume``, ``swap_applicator`` (``code = "BAL45"``, or no code to remove it),
``set_output_factor`` (``factor = 0.8``). Actions on the link, each with ``duration =
"5s"``: ``drop_link`` (no reply at all), ``garble`` (noise instead of replies) and
``delay_replies`` (``delay = "0.8s"`` real time before each reply). Steps run in time
order; the same scenario gives the same run.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iortd.kernel.files import FileReadError, read_small_file, toml_error

__all__ = ["Scenario", "ScenarioError", "Step", "load_scenario", "parse_duration"]

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")
DEVICE_ACTIONS = frozenset(
    {
        "open_door",
        "close_door",
        "press_estop",
        "release_estop",
        "resume",
        "swap_applicator",
        "set_output_factor",
    }
)
LINK_ACTIONS = frozenset({"drop_link", "garble", "delay_replies"})


class ScenarioError(Exception):
    """A scenario file that cannot be used; the message names the file, step and key."""


def parse_duration(text: str) -> float:
    """``"2m30s"`` -> 150.0; ``"1h"``, ``"45s"``, ``"0.5s"``."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or not any(m.groups()):
        raise ValueError(f"expected a duration like '45s', '2m30s' or '1h'; got {text!r}")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


@dataclass(frozen=True, slots=True)
class Step:
    at_s: float
    action: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    """The steps of one scenario and how far it has got; the device applies them
    (simulators.device.SimDevice), so a step does what the same control command does."""

    name: str
    description: str
    steps: list[Step]
    sha256: str = ""
    _next: int = 0

    def next_at(self) -> float | None:
        """When the next step is due (simulated seconds), or None when all are done."""
        return self.steps[self._next].at_s if self._next < len(self.steps) else None

    def due(self, time_s: float) -> list[Step]:
        """The steps due by ``time_s``, in order; each is returned once."""
        done = []
        while self._next < len(self.steps) and self.steps[self._next].at_s <= time_s:
            done.append(self.steps[self._next])
            self._next += 1
        return done


def load_scenario(path: Path) -> Scenario:
    raw_bytes = b""
    try:
        raw_bytes = read_small_file(path)
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except FileReadError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.reason}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {toml_error(exc, raw_bytes)}") from None
    unknown = set(data) - {"description", "step"}
    if unknown:
        raise ScenarioError(f"{path}: unknown key(s) {sorted(unknown)}")
    steps = []
    for i, raw in enumerate(data.get("step", [])):
        where = f"{path}: step[{i}]"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: expected a table")
        try:
            at = parse_duration(raw.get("at", ""))
        except ValueError as exc:
            raise ScenarioError(f"{where}.at: {exc}") from None
        action = raw.get("action")
        if action not in DEVICE_ACTIONS | LINK_ACTIONS:
            known = ", ".join(sorted(DEVICE_ACTIONS | LINK_ACTIONS))
            raise ScenarioError(f"{where}.action: unknown action {action!r} (known: {known})")
        args: dict[str, Any] = {}
        extra = set(raw) - {"at", "action", "duration", "code", "factor", "delay"}
        if extra:
            raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}")
        if action in LINK_ACTIONS:
            try:
                args["duration_s"] = parse_duration(raw.get("duration", ""))
            except ValueError as exc:
                raise ScenarioError(f"{where}.duration: {exc}") from None
        if action == "delay_replies":
            try:
                args["delay_s"] = parse_duration(raw.get("delay", ""))
            except ValueError as exc:
                raise ScenarioError(f"{where}.delay: {exc}") from None
            if args["delay_s"] > 60:
                raise ScenarioError(f"{where}.delay: at most 60s; got {raw['delay']!r}")
        if action == "swap_applicator" and "code" in raw:
            args["code"] = str(raw["code"])
        if action == "set_output_factor":
            factor = raw.get("factor")
            if not isinstance(factor, int | float) or not 0 < factor <= 2:
                raise ScenarioError(f"{where}.factor: expected a number in (0, 2]; got {factor!r}")
            args["factor"] = float(factor)
        steps.append(Step(at, action, args))
    steps.sort(key=lambda s: s.at_s)
    return Scenario(
        path.stem,
        str(data.get("description", "")),
        steps,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )
