"""One simulated applicator reader and stand (APL-MB/1), served like a console.

:class:`ApplicatorDevice` is to the applicator model (simulators/applicator.py) what
:class:`~iortd.simulators.device.SimDevice` is to a source console: the model advanced by
the time that passed on the simulator's clock, the timed scenario, the link (dropped,
garbled, slow: the same :func:`~iortd.simulators.device.link_action`), and one entry point
for actions, :meth:`ApplicatorDevice.apply`, used by the control channel and by scenario
steps alike. The model is advanced in steps of at most :data:`REFRESH_S` (100 ms) of
simulated time, one measurement each, so the heartbeat counts what APL-MB/1 promises
(a refresh at least every 100 ms) whatever the poll rate.

:func:`parse_apl_step` checks an action's arguments, from a control request or a scenario
step, and names the action and the key in what it refuses. :class:`ApplicatorConsole` is
the device's Modbus face: a :class:`~iortd.simulators.modbus_xrs.console.ModbusSlave`
with APL-MB/1's windows and register image, so the TCP and RTU servers of
``simulators/modbus_xrs`` serve it unchanged.

The reader's applicator and the source console's are separate: ``swap`` here changes
what the reader reports, ``swap_applicator`` on the console what the console reports, so a
scenario can show a swap both see or only one of them does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from iortd.kernel.clock import Clock
from iortd.kernel.types import ApplicatorIdentity, DeviceIdentity
from iortd.simulators.applicator import (
    FAULT_CODES,
    HOLDING_WINDOW,
    INPUT_WINDOW,
    RANGE_MM,
    TILT_RANGE_DEG,
    ApplicatorModel,
    ApplicatorSnapshot,
    IllegalAction,
    SimMap,
    build_image,
)
from iortd.simulators.device import ActionError, LinkState, link_action
from iortd.simulators.modbus_xrs.console import ModbusSlave
from iortd.simulators.profiles import Profile
from iortd.simulators.scenario import Scenario, Step, parse_duration

__all__ = [
    "APL_ACTIONS",
    "REFRESH_S",
    "ApplicatorConsole",
    "ApplicatorDevice",
    "identity_of",
    "parse_apl_step",
]

REFRESH_S: Final = 0.1  # the longest step between two measurements (APL-MB/1)
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
_LINK: Final = frozenset({"drop_link", "garble", "delay_replies", "restore_link"})
_AXES: Final = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def _direction(action: str, raw: object, n: int) -> tuple[float, ...]:
    """``"x"``, ``"-z"`` (an axis), ``"1,0,-1"`` or a list of ``n`` numbers, not all 0."""
    bad = ValueError(
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
        raise ValueError(f"{action}: {key!r} must be {what}, got {raw!r}")
    return float(raw)


def _seconds(action: str, key: str, raw: object, limit_s: float) -> float:
    if isinstance(raw, bool):
        raise ValueError(f'{action}: {key!r} must be a duration like "5s", got {raw!r}')
    if isinstance(raw, int | float):
        seconds = float(raw)
    else:
        try:
            seconds = parse_duration(raw)  # type: ignore[arg-type]  # checked inside
        except ValueError as exc:
            raise ValueError(f"{action}: {key!r}: {exc}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= limit_s):
        raise ValueError(f"{action}: {key!r} must be > 0 and at most {limit_s:g} s, got {raw!r}")
    return seconds


def parse_apl_step(action: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The checked arguments of one applicator action (``raw``: its keys besides
    ``action``, as a control request or a scenario step gives them). Raises ValueError
    naming the action and the key."""
    spec = APL_ACTIONS.get(action)
    if spec is None:
        known = ", ".join(sorted(APL_ACTIONS))
        raise ValueError(f"unknown action {action!r} for an applicator reader (known: {known})")
    if unknown := set(raw) - set(spec):
        takes = ", ".join(sorted(spec)) or "no arguments"
        raise ValueError(f"{action}: unknown argument(s) {sorted(unknown)} (takes: {takes})")
    for key, required in spec.items():
        if required and key not in raw:
            raise ValueError(f"{action}: missing {key!r}")
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
            raise ValueError(f"{action}: 'code' must be an applicator code, got {code!r}")
        args["code"] = code
    elif action == "fault":
        code = raw.get("code", "READER")
        if code not in FAULT_CODES:
            raise ValueError(f"{action}: 'code' must be one of {', '.join(FAULT_CODES)}")
        args["code"] = code
    if "duration" in raw:
        args["duration_s"] = _seconds(action, "duration", raw["duration"], MAX_DURATION_S)
    if "delay" in raw:
        args["delay_s"] = _seconds(action, "delay", raw["delay"], MAX_DELAY_S)
    return args


def identity_of(profile: Profile, code: str) -> ApplicatorIdentity:
    """The identity the reader reads from applicator ``code`` of ``profile``: the same as
    the source model reports for it (type, diameter, serial ``SIM-<code>``), so that a
    clean run has both devices agree."""
    spec = profile.applicators[code]
    return ApplicatorIdentity(type=spec.type, diameter_mm=spec.diameter_mm, serial=f"SIM-{code}")


class ApplicatorDevice:
    """A simulated reader and stand: model, scenario and link, on the simulator's clock."""

    kind = "applicator"

    def __init__(
        self,
        name: str,
        model: ApplicatorModel,
        profile: Profile,
        clock: Clock,
        scenario: Scenario | None = None,
        *,
        hold: bool = False,
        reply_delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.model = model
        self.profile = profile
        self.scenario = scenario
        self.link = LinkState()
        self.requests = 0
        self.reply_delay_base_s = reply_delay_s
        self.on_step: Callable[[Step, str], None] | None = None
        self.on_snapshot: Callable[[ApplicatorSnapshot], None] | None = None
        self._clock = clock
        self._time_s = 0.0
        self._last_ns: int | None = None if hold else clock.monotonic_ns()

    @classmethod
    def build(
        cls,
        name: str,
        profile: Profile,
        code: str | None,
        clock: Clock,
        *,
        seed: int = 0,
        serial: str = "APL-SIM-0001",
        uses_left: int | None = None,
        scenario: Scenario | None = None,
        hold: bool = False,
        reply_delay_s: float = 0.0,
    ) -> ApplicatorDevice:
        """A reader with applicator ``code`` of ``profile`` seated (None: none)."""
        applicator = identity_of(profile, code) if code is not None else None
        model = ApplicatorModel(
            seed=seed, applicator=applicator, uses_left=uses_left, serial=serial
        )
        return cls(
            name, model, profile, clock, scenario, hold=hold, reply_delay_s=reply_delay_s
        )

    @property
    def time_s(self) -> float:
        """Simulated seconds since the simulator started."""
        return self._time_s

    def identity(self) -> DeviceIdentity:
        return self.model.identity

    def scenario_note(self) -> str:
        s = self.scenario
        return f"{s.name} {s.sha256[:12]}" if s is not None else ""

    # ---- time ------------------------------------------------------------------------

    def _process_to(self, target: float) -> None:
        while self._time_s < target:
            step = min(REFRESH_S, target - self._time_s)
            self.model.process(step)
            self._time_s += step
            if target - self._time_s < 1e-9:
                self._time_s = target

    def advance(self) -> ApplicatorSnapshot:
        """Bring the model up to now on the simulator's clock (scenario steps at their
        own time) and return its snapshot."""
        now = self._clock.monotonic_ns()
        dt = 0.0 if self._last_ns is None else (now - self._last_ns) / 1e9
        self._last_ns = now
        target = self._time_s + max(dt, 0.0)
        if self.scenario is not None:
            while (at := self.scenario.next_at()) is not None and at <= target:
                self._process_to(at)
                for step in self.scenario.due(at):
                    self._apply(step.action, step.args, at)
                    if self.on_step is not None:
                        self.on_step(step, "scenario")
        self._process_to(target)
        snap = self.model.snapshot()
        if self.on_snapshot is not None:
            self.on_snapshot(snap)
        return snap

    # ---- actions -----------------------------------------------------------------------

    def apply(self, action: str, args: Mapping[str, Any]) -> ApplicatorSnapshot:
        """Apply an action now (the control channel; ``args`` as parse_apl_step gives
        them). Raises ActionError if it is unknown or the device refuses it."""
        if action not in APL_ACTIONS:
            known = ", ".join(sorted(APL_ACTIONS))
            raise ActionError(f"unknown action {action!r} (known: {known})")
        self.advance()
        self._apply(action, args, self._time_s, strict=True)
        if self.on_step is not None:
            self.on_step(Step(self._time_s, action, dict(args)), "control")
        return self.model.snapshot()

    def _apply(
        self, action: str, args: Mapping[str, Any], at_s: float, *, strict: bool = False
    ) -> None:
        if action in _LINK:
            self.link = link_action(self.link, action, args, at_s)
            return
        try:
            self._act(action, args)
        except (IllegalAction, ValueError) as exc:
            # A scripted step the device refuses is refused as the real one would, and
            # the script goes on; the control channel says why.
            if strict:
                raise ActionError(str(exc)) from None

    def _identity(self, action: str, code: str) -> ApplicatorIdentity:
        if code not in self.profile.applicators:
            known = ", ".join(sorted(self.profile.applicators))
            raise ValueError(f"{action}: unknown applicator {code!r} (known: {known})")
        return identity_of(self.profile, code)

    def _act(self, action: str, args: Mapping[str, Any]) -> None:
        m = self.model
        if action == "drift":
            m.drift(args["rate_mm_min"], args["direction"])
        elif action == "bump":
            m.bump(args["mm"], args["direction"])
        elif action == "tilt":
            m.tilt(args["deg"], args["direction"])
        elif action == "seat":
            code = args.get("code")
            m.seat(self._identity(action, code) if code is not None else None)
        elif action == "swap":
            m.swap(self._identity(action, args["code"]))
        elif action == "fault":
            m.fault(args.get("code", "READER"))
        else:  # the actions without arguments are the model's methods of the same name
            getattr(m, action)()

    # ---- the link ---------------------------------------------------------------------

    def link_down(self) -> bool:
        return self._time_s < self.link.down_until

    def garbled(self) -> bool:
        return self._time_s < self.link.garbled_until

    def reply_delay_s(self) -> float:
        """Real seconds to hold back the next reply: the configured turnaround, plus a
        ``delay_replies`` fault's delay while it lasts."""
        slow = self._time_s < self.link.delayed_until
        return self.reply_delay_base_s + (self.link.delay_s if slow else 0.0)


class ApplicatorConsole(ModbusSlave):
    """The reader's Modbus face (APL-MB/1): its windows and its register image."""

    input_window = INPUT_WINDOW
    holding_window = HOLDING_WINDOW

    def __init__(self, device: ApplicatorDevice, regmap: SimMap, unit_id: int = 2) -> None:
        super().__init__(device, unit_id)
        self.device = device
        self.regmap = regmap
        self._snap: ApplicatorSnapshot | None = None

    def _tick(self) -> None:
        self.device.requests += 1
        self._snap = self.device.advance()

    def _registers(self, table: str) -> Mapping[int, int]:
        snap = self._snap if self._snap is not None else self.device.advance()
        image = build_image(snap, self.device.identity(), self.regmap, self.device.scenario_note())
        if table == "input":
            return dict(zip(INPUT_WINDOW, image.input, strict=True))
        return dict(zip(HOLDING_WINDOW, image.holding, strict=True))
