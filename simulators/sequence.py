"""An automatic operator that walks a simulated source through a clinical start-up.

A demo or a scenario needs a delivery without anyone clicking through the console, so
:class:`ClinicalSequence` powers the source on, waits for the self-test, attaches the
applicator, loads the plan, arms, and starts the beam ``start_delay_s`` later.

The sequence owns the model's clock: callers drive only ``sequence.process(dt)``, and the
sequence splits each ``dt`` so that the model is advanced exactly to the moment of each
action. The order of events therefore depends only on simulated time, never on how coarse
the caller's steps are.
"""

from __future__ import annotations

import enum
import math

from iortd.kernel.types import DeviceState
from iortd.simulators.model import IllegalTransition, SourceModel

__all__ = ["ClinicalSequence", "SequenceStage"]


class SequenceStage(enum.StrEnum):
    """What the automatic operator will do next."""

    POWER_ON = "power_on"
    SELECT = "select"  # attach the applicator and load the plan
    ARM = "arm"
    START = "start"
    DONE = "done"  # the beam has been started; the model runs on by itself


class ClinicalSequence:
    """Drive ``model`` through power-on, selection, arming and beam start."""

    def __init__(
        self,
        model: SourceModel,
        *,
        preset_gy: float,
        applicator_code: str,
        start_delay_s: float = 5.0,
    ) -> None:
        if not (math.isfinite(preset_gy) and preset_gy > 0.0):
            raise ValueError(f"preset_gy must be positive, got {preset_gy!r}")
        if not (math.isfinite(start_delay_s) and start_delay_s >= 0.0):
            raise ValueError(f"start_delay_s must be >= 0, got {start_delay_s!r}")
        if applicator_code not in model.profile.applicators:
            known = ", ".join(model.profile.applicators)
            raise ValueError(f"applicator {applicator_code!r} is not in the profile ({known})")
        self._model = model
        self._preset_gy = float(preset_gy)
        self._applicator_code = applicator_code
        self._start_delay_s = float(start_delay_s)
        self._stage = SequenceStage.POWER_ON
        self._time_s = 0.0
        self._due_s = 0.0

    @property
    def model(self) -> SourceModel:
        return self._model

    @property
    def stage(self) -> SequenceStage:
        return self._stage

    @property
    def done(self) -> bool:
        return self._stage is SequenceStage.DONE

    @property
    def time_s(self) -> float:
        """Simulated seconds since the sequence was created."""
        return self._time_s

    def process(self, dt: float) -> None:
        """Advance the sequence and its model by ``dt`` simulated seconds."""
        if not (math.isfinite(dt) and dt >= 0.0):
            raise ValueError(f"dt must be a finite number >= 0, got {dt!r}")
        remaining = dt
        while True:
            self._act()
            if remaining <= 0.0:
                return
            if self._stage is not SequenceStage.DONE and self._time_s < self._due_s <= (
                self._time_s + remaining
            ):
                step = self._due_s - self._time_s
                self._model.process(step)
                # Land exactly on the due time, whatever the float sum says.
                self._time_s = self._due_s
                remaining -= step
            else:
                self._model.process(remaining)
                self._time_s += remaining
                remaining = 0.0

    def _act(self) -> None:
        # Several actions may fall due at the same instant (select, then arm).
        while self._stage is not SequenceStage.DONE and self._time_s >= self._due_s:
            if not self._step():
                return

    def _step(self) -> bool:
        """Perform the current stage if the model allows it; False means wait."""
        model = self._model
        state = model.state
        if self._stage is SequenceStage.POWER_ON:
            if state is DeviceState.OFF:
                model.power_on()
                # A zero-length self-test ends now, not at the end of the caller's step.
                model.process(0.0)
                self._due_s = self._time_s + model.profile.self_test_s
            self._stage = SequenceStage.SELECT
            return True
        if self._stage is SequenceStage.SELECT:
            if state not in (DeviceState.STANDBY, DeviceState.TERMINATED):
                return False  # still in self-test, or a fault/e-stop a scenario must clear
            model.attach_applicator(self._applicator_code)
            model.load_plan(self._preset_gy, self._applicator_code)
            self._stage = SequenceStage.ARM
            return True
        if self._stage is SequenceStage.ARM:
            if state is DeviceState.PREPARATORY:
                try:
                    model.arm()
                except IllegalTransition:
                    return False  # e.g. the door is open: arm once it is closed
            elif state is not DeviceState.READY:
                return False
            self._stage = SequenceStage.START
            self._due_s = self._time_s + self._start_delay_s
            return True
        # START
        if state is DeviceState.READY:
            model.start_beam()
            self._stage = SequenceStage.DONE
            return True
        if state is DeviceState.PREPARATORY:
            self._stage = SequenceStage.ARM  # disarmed while waiting: arm again
            return True
        return False
