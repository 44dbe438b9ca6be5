"""One simulated console, whatever protocol it is served over.

:class:`SimDevice` is the part every protocol adapter shares (XRS-ASCII/1 on a pty,
Modbus TCP, Modbus RTU on a pty): the device model and its clinical sequence, advanced by
the time that passed on the simulator's clock at each request; the timed fault scenario;
and the state of the link (dropped, garbled, slow). Faults reach it from two places, the
scenario (at their scheduled time) and the control channel (at once, ``iort-sim ctl``),
both through :meth:`SimDevice.apply`, so that a fault does the same whichever way it came.

The adapters only translate bytes to calls on this object; none of them reaches into the
model's private state (``snapshot()`` and ``identity()`` are its whole read side).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from iortd.kernel.clock import Clock
from iortd.kernel.types import DeviceIdentity
from iortd.simulators.model import IllegalTransition, ModelSnapshot, SourceModel
from iortd.simulators.scenario import DEVICE_ACTIONS, LINK_ACTIONS, Scenario, Step
from iortd.simulators.sequence import ClinicalSequence

__all__ = ["ActionError", "LinkState", "SimDevice", "link_action"]


class ActionError(ValueError):
    """A fault action that cannot be applied; the message says why."""


@dataclass
class LinkState:
    """What the link does now, in simulated seconds: until when it is dropped, garbled
    or slow, and by how much replies are delayed (real seconds) while it is slow."""

    down_until: float = -1.0
    garbled_until: float = -1.0
    delayed_until: float = -1.0
    delay_s: float = 0.0


def link_action(link: LinkState, action: str, args: Mapping[str, Any], at_s: float) -> LinkState:
    """The link after a link action (``drop_link``, ``garble``, ``delay_replies``,
    ``restore_link``) at ``at_s``; any other action leaves it as it is. Every simulated
    device (a console, an applicator reader) takes its link faults from here."""
    if action == "drop_link":
        link.down_until = at_s + float(args["duration_s"])
    elif action == "garble":
        link.garbled_until = at_s + float(args["duration_s"])
    elif action == "delay_replies":
        link.delayed_until = at_s + float(args["duration_s"])
        link.delay_s = float(args["delay_s"])
    elif action == "restore_link":
        return LinkState()
    return link


class SimDevice:
    """A simulated console: model, sequence, scenario and link, behind one lock-free API
    (everything runs on the simulator's event loop)."""

    def __init__(
        self,
        name: str,
        sequence: ClinicalSequence,
        clock: Clock,
        scenario: Scenario | None = None,
        *,
        hold: bool = False,
    ) -> None:
        self.name = name
        self.sequence = sequence
        self.model: SourceModel = sequence.model
        self.scenario = scenario
        self.link = LinkState()
        self.requests = 0
        # A turnaround the console always takes (real seconds, ``reply_delay_ms`` of a
        # devices file), on top of a ``delay_replies`` fault.
        self.reply_delay_base_s = 0.0
        self.on_step: Callable[[Step, str], None] | None = None
        self.on_snapshot: Callable[[ModelSnapshot], None] | None = None
        self._clock = clock
        # With ``hold``, the console's time stands still until the first request or control
        # command: its sequence and scenario start when someone first talks to it.
        self._last_ns: int | None = None if hold else clock.monotonic_ns()

    @property
    def time_s(self) -> float:
        """Simulated seconds since the simulator started."""
        return self.sequence.time_s

    def identity(self) -> DeviceIdentity:
        return self.model.identity()

    def scenario_note(self) -> str:
        """What the console says about the scenario it plays (``""``: none): its name and
        the first 12 hex digits of the file's SHA-256, so the audit log can name it."""
        s = self.scenario
        return f"{s.name} {s.sha256[:12]}" if s is not None else ""

    # ---- time ------------------------------------------------------------------------

    def advance(self) -> ModelSnapshot:
        """Bring the model up to now on the simulator's clock and return its snapshot.

        Scenario steps act at their own time, not at the next request's: the model is
        advanced to each step, the step applied, and so on (requests may be seconds apart
        while a driver reconnects)."""
        now = self._clock.monotonic_ns()
        dt = 0.0 if self._last_ns is None else (now - self._last_ns) / 1e9
        self._last_ns = now
        target = self.sequence.time_s + max(dt, 0.0)
        if self.scenario is not None:
            while (at := self.scenario.next_at()) is not None and at <= target:
                if at > self.sequence.time_s:
                    self.sequence.process(at - self.sequence.time_s)
                for step in self.scenario.due(at):
                    self._apply(step.action, step.args, at)
                    if self.on_step is not None:
                        self.on_step(step, "scenario")
        if target > self.sequence.time_s:
            self.sequence.process(target - self.sequence.time_s)
        snap = self.model.snapshot()
        if self.on_snapshot is not None:
            self.on_snapshot(snap)
        return snap

    # ---- faults ----------------------------------------------------------------------

    def apply(self, action: str, args: Mapping[str, Any]) -> ModelSnapshot:
        """Apply a fault now (the control channel). Raises ActionError if the action is
        unknown or the console refuses it in its present state."""
        if action not in DEVICE_ACTIONS | LINK_ACTIONS | {"restore_link"}:
            known = ", ".join(sorted(DEVICE_ACTIONS | LINK_ACTIONS | {"restore_link"}))
            raise ActionError(f"unknown action {action!r} (known: {known})")
        self.advance()
        self._apply(action, args, self.sequence.time_s, strict=True)
        if self.on_step is not None:
            self.on_step(Step(self.sequence.time_s, action, dict(args)), "control")
        return self.model.snapshot()

    def _apply(
        self, action: str, args: Mapping[str, Any], at_s: float, *, strict: bool = False
    ) -> None:
        if action in LINK_ACTIONS or action == "restore_link":
            self.link = link_action(self.link, action, args, at_s)
        elif action == "swap_applicator":
            code = args.get("code")
            if strict and code is not None and code not in self.model.profile.applicators:
                known = ", ".join(sorted(self.model.profile.applicators))
                raise ActionError(f"unknown applicator {code!r} (known: {known})")
            self.model.attach_applicator(code)
        elif action == "set_output_factor":
            self.model.set_output_factor(float(args["factor"]))
        elif strict:
            try:
                getattr(self.model, action)()
            except IllegalTransition as exc:
                raise ActionError(f"{action}: refused in state {self.model.state}: {exc}") from None
        else:
            # A scripted step the console refuses (e.g. resume while not interrupted) is
            # refused as the real console would, and the script goes on.
            with contextlib.suppress(IllegalTransition):
                getattr(self.model, action)()

    def link_down(self) -> bool:
        return self.sequence.time_s < self.link.down_until

    def garbled(self) -> bool:
        return self.sequence.time_s < self.link.garbled_until

    def reply_delay_s(self) -> float:
        """Real seconds to hold back the next reply (0: answer at once)."""
        slow = self.sequence.time_s < self.link.delayed_until
        return self.reply_delay_base_s + (self.link.delay_s if slow else 0.0)
