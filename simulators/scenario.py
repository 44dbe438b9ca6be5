"""Timed fault scenarios for the simulators: TOML scripts of what happens when.

    # config/scenarios/door-mid-delivery.toml
    description = "The door is opened mid-delivery, closed, and the beam resumed"
    [[step]]
    at = "20s"            # simulated time since the simulator started (e.g. "2m30s")
    action = "open_door"

Actions on the device: ``open_door``, ``close_door``, ``press_estop``, ``release_estop``,
``resume``, ``swap_applicator`` (``code = "BAL45"``, or no code to remove it),
``set_output_factor`` (``factor = 0.8``). Actions on the link: ``drop_link`` and
``garble`` with ``duration = "5s"``: no reply at all, or noise instead of replies, for that
long. Steps run in time order; the same scenario gives the same run.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.model import IllegalTransition, SourceModel

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
LINK_ACTIONS = frozenset({"drop_link", "garble"})


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
    name: str
    description: str
    steps: list[Step]
    _next: int = 0
    link_down_until: float = -1.0
    garbled_until: float = -1.0
    applied: list[tuple[float, str]] = field(default_factory=list)

    def next_at(self) -> float | None:
        """When the next step is due (simulated seconds), or None when all are done."""
        return self.steps[self._next].at_s if self._next < len(self.steps) else None

    def due(self, time_s: float, model: SourceModel) -> list[Step]:
        """Apply every step due by ``time_s`` to the model or the link, in order."""
        done = []
        while self._next < len(self.steps) and self.steps[self._next].at_s <= time_s:
            step = self.steps[self._next]
            self._next += 1
            self._apply(step, model)
            self.applied.append((time_s, step.action))
            done.append(step)
        return done

    def _apply(self, step: Step, model: SourceModel) -> None:
        a = step.action
        if a == "drop_link":
            self.link_down_until = step.at_s + float(step.args["duration_s"])
        elif a == "garble":
            self.garbled_until = step.at_s + float(step.args["duration_s"])
        elif a == "swap_applicator":
            model.attach_applicator(step.args.get("code"))
        elif a == "set_output_factor":
            model.set_output_factor(float(step.args["factor"]))
        else:
            # e.g. resume while not interrupted: the console would refuse it too
            with contextlib.suppress(IllegalTransition):
                getattr(model, a)()

    def link_down(self, time_s: float) -> bool:
        return time_s < self.link_down_until

    def garbled(self, time_s: float) -> bool:
        return time_s < self.garbled_until


def load_scenario(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
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
        extra = set(raw) - {"at", "action", "duration", "code", "factor"}
        if extra:
            raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}")
        if action in LINK_ACTIONS:
            try:
                args["duration_s"] = parse_duration(raw.get("duration", ""))
            except ValueError as exc:
                raise ScenarioError(f"{where}.duration: {exc}") from None
        if action == "swap_applicator" and "code" in raw:
            args["code"] = str(raw["code"])
        if action == "set_output_factor":
            factor = raw.get("factor")
            if not isinstance(factor, int | float) or not 0 < factor <= 2:
                raise ScenarioError(f"{where}.factor: expected a number in (0, 2]; got {factor!r}")
            args["factor"] = float(factor)
        steps.append(Step(at, action, args))
    steps.sort(key=lambda s: s.at_s)
    return Scenario(path.stem, str(data.get("description", "")), steps)
