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

An applicator reader's scenario (``kind = "applicator"`` at the top of the file, loaded
for a device of that kind) takes the reader's actions instead, with their arguments as keys
of the step (simulators/apl_actions.py, docs/simulators.md), e.g. ``action = "drift"``,
``rate = 0.6``, ``direction = "-z"``.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.simulators.apl_actions import APL_ACTIONS, parse_apl_step
from iortd.simulators.durations import parse_duration

__all__ = ["Scenario", "ScenarioError", "Step", "load_scenario", "parse_duration"]

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
KINDS = ("source", "applicator")  # what a scenario (and a served device) can be


class ScenarioError(Exception):
    """A scenario file that cannot be used; the message names the file, step and key."""


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
    kind: str = "source"  # the kind of device it is for (KINDS)
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


def load_scenario(path: Path, kind: str | None = None) -> Scenario:
    """The scenario at ``path``: for a source console (a console's actions), or for an
    applicator reader when the file says ``kind = "applicator"`` (a reader's actions,
    apl_actions.py). With ``kind``, a file for another kind is refused."""
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
    unknown = set(data) - {"description", "step", "kind"}
    if unknown:
        raise ScenarioError(f"{path}: unknown key(s) {sorted(unknown)}")
    declared = data.get("kind", "source")
    if declared not in KINDS:
        raise ScenarioError(f"{path}: kind: expected one of {', '.join(KINDS)}, got {declared!r}")
    if kind is not None and declared != kind:
        raise ScenarioError(
            f"{path}: kind: this scenario is for a device of kind {declared!r}, not {kind!r}"
        )
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
        if declared == "applicator":
            if not isinstance(action, str) or action not in APL_ACTIONS:
                known = ", ".join(sorted(APL_ACTIONS))
                raise ScenarioError(
                    f"{where}.action: unknown action {action!r} for an applicator reader "
                    f"(known: {known})"
                )
            try:
                given = {k: v for k, v in raw.items() if k not in ("at", "action")}
                steps.append(Step(at, action, parse_apl_step(action, given)))
            except ValueError as exc:
                raise ScenarioError(f"{where}: {exc}") from None
            continue
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
        kind=declared,
    )
