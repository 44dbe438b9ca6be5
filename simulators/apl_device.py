"""One simulated applicator reader and stand (APL-MB/1), served like a console.

:class:`ApplicatorDevice` is to the applicator model (simulators/applicator.py) what
:class:`~iortd.simulators.device.SimDevice` is to a source console: the model advanced by
the time that passed on the simulator's clock, the timed scenario, the link (dropped,
garbled, slow: the same :func:`~iortd.simulators.device.link_action`), and one entry point
for actions, :meth:`ApplicatorDevice.apply`, used by the control channel and by scenario
steps alike. The model is advanced in steps of at most :data:`REFRESH_S` (100 ms) of
simulated time, one measurement each, so the heartbeat counts what APL-MB/1 promises
(a refresh at least every 100 ms) whatever the poll rate; a gap nobody polled longer than
:data:`CATCH_UP_REFRESHES` periods is caught up in one step and then that many periods.

The actions and their arguments are apl_actions.py's. :class:`ApplicatorConsole` is
the device's Modbus face: a :class:`~iortd.simulators.modbus_xrs.console.ModbusSlave`
with APL-MB/1's windows and register image, so the TCP and RTU servers of
``simulators/modbus_xrs`` serve it unchanged.

The reader's applicator and the source console's are separate: ``swap`` here changes
what the reader reports, ``swap_applicator`` on the console what the console reports, so a
scenario can show a swap both see or only one of them does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from iortd.kernel.clock import Clock
from iortd.kernel.types import ApplicatorIdentity, DeviceIdentity
from iortd.simulators.apl_actions import APL_ACTIONS, LINK_ACTIONS
from iortd.simulators.applicator import (
    HOLDING_WINDOW,
    INPUT_WINDOW,
    ApplicatorModel,
    ApplicatorSnapshot,
    IllegalAction,
    SimMap,
    build_image,
)
from iortd.simulators.device import ActionError, LinkState, link_action
from iortd.simulators.modbus_xrs.console import ImageError, ModbusSlave
from iortd.simulators.profiles import Profile
from iortd.simulators.scenario import Scenario, Step

__all__ = [
    "CATCH_UP_REFRESHES",
    "REFRESH_S",
    "ApplicatorConsole",
    "ApplicatorDevice",
    "identity_of",
]

REFRESH_S: Final = 0.1  # the longest step between two measurements (APL-MB/1)
# A gap nobody polled (hours under a speed factor) is caught up in bounded work: the time
# before the last CATCH_UP_REFRESHES periods in one step (drift is linear: the position is
# the same), then those periods one measurement each.
CATCH_UP_REFRESHES: Final = 600


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
        return cls(name, model, profile, clock, scenario, hold=hold, reply_delay_s=reply_delay_s)

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
        skip = target - self._time_s - CATCH_UP_REFRESHES * REFRESH_S
        if skip > 0:
            self.model.process(skip)
            self._time_s += skip
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
        if action in LINK_ACTIONS:
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
        self.device: ApplicatorDevice = device
        self.regmap = regmap
        self._snap: ApplicatorSnapshot | None = None

    def _tick(self) -> None:
        self.device.requests += 1
        self._snap = self.device.advance()

    def _registers(self, table: str) -> Mapping[int, int]:
        snap = self._snap if self._snap is not None else self.device.advance()
        try:
            image = build_image(
                snap, self.device.identity(), self.regmap, self.device.scenario_note()
            )
        except ValueError as exc:  # e.g. an applicator type the map's table does not list
            raise ImageError(str(exc)) from None
        if table == "input":
            return dict(zip(INPUT_WINDOW, image.input, strict=True))
        return dict(zip(HOLDING_WINDOW, image.holding, strict=True))
