"""A simulated low-kV IORT X-ray source: a pure state machine advanced by ``process(dt)``.

The architecture is lewis's: the model knows nothing about time except the ``dt`` it is
given, does no I/O and never awaits, so a control channel, a timed scenario or a test can
drive it at any speed and get the same result for the same seed. Its only randomness is
one seeded :class:`random.Random`, drawn from in a fixed order.

Operator actions (``power_on``, ``load_plan``, ``arm``, ...) are checked against
:data:`ACTIONS` and :data:`TRANSITIONS` (the state table, in simulators/states.py,
re-exported here) and raise :class:`IllegalTransition` when the console would refuse them.
Environment actions (door, emergency stop, applicator, cooling, output and channel faults)
are physical events: they are always accepted and the model reacts to them as a source's
interlock chain would.

Interlock behaviour, in the terms of docs/domain.md:

* door, emergency stop, applicator and cooling reflect their physical condition; the
  applicator interlock also latches when the applicator is removed or swapped during a
  delivery;
* kV, µA, dose channels, dose rate and backup timer are measured during beam-on and latch
  when they trip (:data:`~iortd.simulators.states.LATCHING`), until a console reset (or,
  for a terminated delivery, a new selection);
* communication is always OK here: only a driver can tell whether it hears the device.

The dose-rate interlock trips on a rate *above* plan. A rate below plan only lengthens the
delivery, and the backup timer is the guard the regulations name for that (25 Pa. Code
§228.66, OAR 333-123-0075); a low-rate trip would always pre-empt it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    TerminationStatus,
)
from iortd.simulators.profiles import ApplicatorSpec, Profile
from iortd.simulators.states import (
    ACTIONS,
    DELIVERING,
    LATCHING,
    POWERED,
    SELECTION_ACTIVE,
    TRANSITIONS,
    IllegalTransition,
    InterlocksNotClear,
)

__all__ = [
    "ACTIONS",
    "RATE_SETTLING_S",
    "TRANSITIONS",
    "IllegalTransition",
    "InterlocksNotClear",
    "ModelSnapshot",
    "SourceModel",
]

# Illustrative per-device settings that are not worth a profile key.
RATE_SETTLING_S = 3.0  # beam-on seconds after a start/resume before the rate is judged
_TUBE_READING_NOISE_REL_SD = 0.002  # kV/µA read-back noise
# Simulated time accumulates in floats; a self-test that ends 1e-15 s "late" has ended.
_TIME_EPS_S = 1e-9


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """Everything the simulated console shows at one simulated instant.

    Doses and ``beam_on_s`` belong to the current selection and survive interruptions and
    power cycles; a new ``load_plan`` zeroes them. ``interruption_reason`` names why the
    delivery is (or last was) interrupted within this selection.
    """

    time_s: float
    state: DeviceState
    termination: TerminationStatus | None
    termination_reason: str | None
    dose_rate_gy_min: float
    dose_primary_gy: float
    dose_secondary_gy: float
    preset_gy: float
    beam_on_s: float
    backup_timer_limit_s: float | None
    kv: float
    ua: float
    interlocks: Mapping[Interlock, InterlockState] = field(hash=False)
    applicator: ApplicatorIdentity | None
    plan_applicator_code: str | None
    expected_rate_gy_min: float | None
    interruption_reason: str | None = None
    simulated: bool = True
    # The selection counter: one more at every plan loaded (a new selection), so that a
    # host can tell the same selection from a new one with the same preset.
    selection: int = 0


def _finite(name: str, value: float, *, minimum: float | None = None) -> float:
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


class SourceModel:
    """A simulated IORT X-ray source console; see the module docstring."""

    def __init__(self, profile: Profile, *, seed: int, serial: str = "SIM-0001") -> None:
        self._profile = profile
        self._serial = serial
        self._rng = random.Random(seed)  # noqa: S311 - simulation noise, reproducible by seed
        # The IRM's calibration error is a property of this unit, so it is drawn once.
        self._irm_calibration = self._rng.uniform(-1.0, 1.0) * profile.monitor_stop_accuracy_rel

        self._time_s = 0.0
        self._state = DeviceState.OFF
        self._self_test_left_s = 0.0

        # The physical world around the console.
        self._door_open = False
        self._estop_pressed = False
        self._cooling_ok = True
        self._applicator_code: str | None = None
        self._output_factor = 1.0
        self._secondary_gain = profile.secondary_gain
        self._kv_offset = 0.0
        self._ua_offset = 0.0

        # Latches survive power cycles; only the console reset (or a new selection, for
        # the selection-scoped ones) clears them.
        self._latched: set[Interlock] = set()
        self._fault_latched = False
        self._estop_latched = False
        self._reset_requested = False

        # The current selection and its delivery.
        self._plan_code: str | None = None
        self._preset_gy = 0.0
        self._selection = 0  # one more at every plan loaded (ModelSnapshot.selection)
        self._dose_primary_gy = 0.0
        self._dose_secondary_gy = 0.0
        self._beam_on_s = 0.0
        self._since_beam_start_s = 0.0
        self._termination: TerminationStatus | None = None
        self._termination_reason: str | None = None
        self._interruption_reason: str | None = None

        # Last read-backs while irradiating.
        self._rate_gy_min = 0.0
        self._kv = 0.0
        self._ua = 0.0

    # --- read side ----------------------------------------------------------------------

    @property
    def profile(self) -> Profile:
        return self._profile

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def time_s(self) -> float:
        return self._time_s

    def identity(self) -> DeviceIdentity:
        p = self._profile
        return DeviceIdentity(
            manufacturer=p.manufacturer,
            model=p.model,
            serial=self._serial,
            firmware=p.firmware,
            simulated=True,
        )

    def interlocks(self) -> Mapping[Interlock, InterlockState]:
        tripped = self._tripped()
        return MappingProxyType(
            {i: InterlockState.TRIPPED if i in tripped else InterlockState.OK for i in Interlock}
        )

    def snapshot(self) -> ModelSnapshot:
        beam = self._state is DeviceState.IRRADIATING
        plan = self._plan_spec()
        return ModelSnapshot(
            time_s=self._time_s,
            state=self._state,
            termination=self._termination,
            termination_reason=self._termination_reason,
            dose_rate_gy_min=self._rate_gy_min if beam else 0.0,
            dose_primary_gy=self._dose_primary_gy,
            dose_secondary_gy=self._dose_secondary_gy,
            preset_gy=self._preset_gy,
            beam_on_s=self._beam_on_s,
            backup_timer_limit_s=self._backup_limit_s() if plan is not None else None,
            kv=self._kv if beam else 0.0,
            ua=self._ua if beam else 0.0,
            interlocks=self.interlocks(),
            applicator=self._attached_identity(),
            plan_applicator_code=self._plan_code,
            expected_rate_gy_min=plan.surface_dose_rate_gy_min if plan is not None else None,
            interruption_reason=self._interruption_reason,
            simulated=True,
            selection=self._selection,
        )

    # --- operator actions -----------------------------------------------------------------

    def power_on(self) -> None:
        self._check("power_on")
        self._self_test_left_s = self._profile.self_test_s
        self._enter(DeviceState.SELF_TEST, "power_on")

    def power_off(self) -> None:
        self._check("power_off")
        if self._state in DELIVERING:
            self._record_termination(TerminationStatus.OPERATOR, "power_off")
        self._enter(DeviceState.OFF, "power_off")

    def load_plan(self, preset_gy: float, applicator_code: str) -> None:
        """Make a new selection: zero the doses and the timer, and check the applicator."""
        self._check("load_plan")
        preset = _finite("preset_gy", preset_gy, minimum=0.0)
        if preset <= 0.0:
            raise ValueError(f"preset_gy must be positive, got {preset_gy!r}")
        if applicator_code not in self._profile.applicators:
            known = ", ".join(self._profile.applicators)
            raise ValueError(
                f"applicator {applicator_code!r} is not in profile "
                f"{self._profile.name!r} (known: {known})"
            )
        self._plan_code = applicator_code
        self._selection = (self._selection + 1) % 0x1_0000_0000
        self._preset_gy = preset
        self._dose_primary_gy = 0.0
        self._dose_secondary_gy = 0.0
        self._beam_on_s = 0.0
        self._since_beam_start_s = 0.0
        self._termination = None
        self._termination_reason = None
        self._interruption_reason = None
        # Only selection-scoped latches (backup timer, applicator) can be set in STANDBY or
        # TERMINATED; the fault latches were cleared by the reset that led here.
        self._latched.clear()
        self._enter(DeviceState.PREPARATORY, "load_plan")

    def arm(self) -> None:
        self._check("arm")
        self._require_clear("arm")
        self._enter(DeviceState.READY, "arm")

    def start_beam(self) -> None:
        self._check("start_beam")
        self._require_clear("start_beam")
        self._begin_beam()
        self._enter(DeviceState.IRRADIATING, "start_beam")

    def pause(self) -> None:
        self._check("pause")
        self._interruption_reason = "operator_pause"
        self._enter(DeviceState.INTERRUPTED, "pause")

    def resume(self) -> None:
        self._check("resume")
        self._require_clear("resume")
        self._begin_beam()
        self._enter(DeviceState.IRRADIATING, "resume")

    def end_delivery(self) -> None:
        self._check("end_delivery")
        self._terminate(TerminationStatus.OPERATOR, "operator_end")

    def reset_request(self) -> None:
        """First step of the console reset of a FAULT or EMERGENCY_STOP."""
        self._check("reset_request")
        self._require_reset_possible("reset_request")
        self._reset_requested = True

    def reset_confirm(self) -> None:
        """Second step: clears every latch and returns to STANDBY."""
        self._check("reset_confirm")
        if not self._reset_requested:
            raise IllegalTransition(
                "reset_confirm", self._state, DeviceState.STANDBY, "no reset_request pending"
            )
        self._require_reset_possible("reset_confirm")
        self._latched.clear()
        self._fault_latched = False
        self._estop_latched = False
        self._enter(DeviceState.STANDBY, "reset_confirm")

    # --- environment ----------------------------------------------------------------------

    def open_door(self) -> None:
        self._door_open = True
        if self._state is DeviceState.IRRADIATING:
            self._interruption_reason = "door_open"
            self._enter(DeviceState.INTERRUPTED, "open_door")
        self._disarm_if_not_clear()

    def close_door(self) -> None:
        # Closing the door never restarts the beam: resuming is the operator's decision.
        self._door_open = False

    def press_estop(self) -> None:
        self._estop_pressed = True
        self._reset_requested = False
        if self._state in (*POWERED, DeviceState.FAULT):
            self._estop_latched = True
            if self._state in DELIVERING:
                self._record_termination(TerminationStatus.MACHINE, "emergency_stop")
            self._enter(DeviceState.EMERGENCY_STOP, "press_estop")

    def release_estop(self) -> None:
        # Reset at the interlock first; the console reset is still needed afterwards.
        self._estop_pressed = False

    def attach_applicator(self, code: str | None) -> None:
        """Attach an applicator by code, or remove it with ``None``.

        A code the profile does not know is attached but unrecognised: the console shows no
        applicator and the applicator interlock trips.
        """
        previous = self._applicator_code
        self._applicator_code = code
        if code == previous:
            return
        if self._state in DELIVERING:
            self._latched.add(Interlock.APPLICATOR)
            reason = "applicator_removed" if code is None else "applicator_changed"
            self._terminate(TerminationStatus.MACHINE, reason)
        self._disarm_if_not_clear()

    def set_output_factor(self, factor: float) -> None:
        """Scale the true output (1.0 = as calibrated), e.g. to provoke the backup timer."""
        self._output_factor = _finite("output factor", factor, minimum=0.0)

    def set_secondary_gain(self, gain: float) -> None:
        """Scale the secondary dose channel, e.g. to provoke channel disagreement."""
        self._secondary_gain = _finite("secondary gain", gain, minimum=0.0)

    def set_kv_offset(self, kv: float) -> None:
        self._kv_offset = _finite("kV offset", kv)

    def set_ua_offset(self, ua: float) -> None:
        self._ua_offset = _finite("µA offset", ua)

    def set_cooling(self, ok: bool) -> None:
        self._cooling_ok = ok
        if not ok:
            self._reset_requested = False
            if self._state in POWERED:
                self._fault(None, "cooling_failure")

    # --- time ---------------------------------------------------------------------------

    def process(self, dt: float) -> None:
        """Advance the simulation by ``dt`` simulated seconds."""
        _finite("dt", dt, minimum=0.0)
        if self._state is DeviceState.SELF_TEST:
            self._self_test(dt)
        elif self._state is DeviceState.IRRADIATING and dt > 0.0:
            self._irradiate(dt)
        self._time_s += dt

    def _self_test(self, dt: float) -> None:
        self._self_test_left_s -= dt
        if self._self_test_left_s > _TIME_EPS_S:
            return
        # Latches outlive a power cycle: a unit that was in FAULT comes back in FAULT.
        if self._estop_pressed or self._estop_latched:
            self._estop_latched = True
            self._enter(DeviceState.EMERGENCY_STOP, "self_test")
        elif self._fault_latched or not self._cooling_ok:
            self._fault_latched = True
            self._enter(DeviceState.FAULT, "self_test")
        else:
            self._enter(DeviceState.STANDBY, "self_test")

    def _irradiate(self, dt: float) -> None:
        p = self._profile
        plan = self._plan_spec()
        if plan is None:  # pragma: no cover - IRRADIATING implies a plan
            raise RuntimeError("model bug: IRRADIATING without a plan")

        # The tube read-backs are judged first: a generator out of tolerance gives no beam.
        self._kv = p.nominal_kv + self._kv_offset + self._gauss(p.nominal_kv)
        self._ua = p.nominal_ua + self._ua_offset + self._gauss(p.nominal_ua)
        if abs(self._kv - p.nominal_kv) > p.kv_tolerance_rel * p.nominal_kv:
            self._fault(Interlock.TUBE_VOLTAGE, "kv_out_of_tolerance")
            return
        if abs(self._ua - p.nominal_ua) > p.ua_tolerance_rel * p.nominal_ua:
            self._fault(Interlock.TUBE_CURRENT, "ua_out_of_tolerance")
            return

        nominal_gy_s = plan.surface_dose_rate_gy_min / 60.0
        # Drift follows the tube's own beam-on time (it heats while on), linear as in the
        # 30-minute figure it comes from; held constant within one step.
        drift = max(0.0, 1.0 + p.output_drift_rel_per_30min * self._beam_on_s / 1800.0)
        noise = self._rng.gauss(0.0, p.output_noise_rel_sd)
        true_gy_s = max(0.0, nominal_gy_s * self._output_factor * drift * (1.0 + noise))
        primary_gy_s = true_gy_s * (1.0 + self._irm_calibration)
        secondary_noise = self._rng.gauss(0.0, p.secondary_noise_rel_sd)
        secondary_gy_s = max(0.0, true_gy_s * self._secondary_gain * (1.0 + secondary_noise))

        # Stop inside the step where the monitor reaches the preset or the backup timer
        # expires, so a coarse dt (speed 60 => 6 s) neither overdoses nor overruns.
        to_preset = (
            (self._preset_gy - self._dose_primary_gy) / primary_gy_s
            if primary_gy_s > 0.0
            else math.inf
        )
        to_backup = self._backup_limit_s() - self._beam_on_s
        preset_reached = to_preset <= dt and to_preset <= to_backup
        backup_expired = not preset_reached and to_backup <= dt
        tau = max(0.0, min(dt, to_preset, to_backup))

        self._beam_on_s += tau
        self._since_beam_start_s += tau
        self._dose_secondary_gy += secondary_gy_s * tau
        if preset_reached:
            self._dose_primary_gy = self._preset_gy
        else:
            # Rounding must not carry the count past the preset without the stop.
            self._dose_primary_gy = min(self._preset_gy, self._dose_primary_gy + primary_gy_s * tau)
        self._rate_gy_min = primary_gy_s * 60.0

        # A fault found in the step outranks a normal end in it: the conservative record.
        primary = self._dose_primary_gy
        if primary > 0.0 and (
            abs(self._dose_secondary_gy - primary) > p.dose_channel_tolerance_rel * primary
        ):
            self._fault(Interlock.DOSE_CHANNELS, "dose_channels_disagree")
        elif self._since_beam_start_s >= RATE_SETTLING_S and (
            self._rate_gy_min > plan.surface_dose_rate_gy_min * (1.0 + p.dose_rate_tolerance_rel)
        ):
            self._fault(Interlock.DOSE_RATE, "dose_rate_deviation")
        elif preset_reached:
            self._terminate(TerminationStatus.NORMAL, "preset_reached")
        elif backup_expired:
            self._latched.add(Interlock.BACKUP_TIMER)
            self._terminate(TerminationStatus.MACHINE, "backup_timer_expired")

    # --- internals ----------------------------------------------------------------------

    def _gauss(self, nominal: float) -> float:
        return self._rng.gauss(0.0, _TUBE_READING_NOISE_REL_SD * nominal)

    def _check(self, action: str) -> None:
        allowed, target = ACTIONS[action]
        if self._state not in allowed:
            raise IllegalTransition(action, self._state, target)

    def _enter(self, target: DeviceState, cause: str) -> None:
        if (self._state, target) not in TRANSITIONS:
            # Operator actions are refused by _check before they get here, so this is a bug
            # in the model and must not look like a refused action.
            raise RuntimeError(f"model bug: {cause}: {self._state} -> {target} not in TRANSITIONS")
        self._state = target
        self._reset_requested = False

    def _begin_beam(self) -> None:
        self._since_beam_start_s = 0.0
        self._rate_gy_min = 0.0
        self._kv = self._profile.nominal_kv + self._kv_offset
        self._ua = self._profile.nominal_ua + self._ua_offset

    def _record_termination(self, status: TerminationStatus, reason: str) -> None:
        self._termination = status
        self._termination_reason = reason

    def _terminate(self, status: TerminationStatus, reason: str) -> None:
        self._record_termination(status, reason)
        self._enter(DeviceState.TERMINATED, reason)

    def _fault(self, interlock: Interlock | None, reason: str) -> None:
        if interlock is not None and interlock in LATCHING:
            self._latched.add(interlock)
        self._fault_latched = True
        if self._state in DELIVERING:
            self._record_termination(TerminationStatus.MACHINE, reason)
        self._enter(DeviceState.FAULT, reason)

    def _disarm_if_not_clear(self) -> None:
        if self._state is DeviceState.READY and self._tripped():
            self._enter(DeviceState.PREPARATORY, "interlock")

    def _require_clear(self, action: str) -> None:
        tripped = self._tripped()
        if tripped:
            raise InterlocksNotClear(action, self._state, ACTIONS[action][1], tripped)

    def _require_reset_possible(self, action: str) -> None:
        # Reset at the interlock first, at the console last (docs/domain.md).
        live: set[Interlock] = set()
        if self._estop_pressed:
            live.add(Interlock.EMERGENCY_STOP)
        if not self._cooling_ok:
            live.add(Interlock.COOLING)
        if live:
            raise InterlocksNotClear(action, self._state, DeviceState.STANDBY, frozenset(live))

    def _tripped(self) -> frozenset[Interlock]:
        tripped = set(self._latched)
        if self._door_open:
            tripped.add(Interlock.DOOR)
        if self._estop_pressed:
            tripped.add(Interlock.EMERGENCY_STOP)
        if not self._cooling_ok:
            tripped.add(Interlock.COOLING)
        code = self._applicator_code
        if (code is not None and code not in self._profile.applicators) or (
            self._state in SELECTION_ACTIVE and code != self._plan_code
        ):
            tripped.add(Interlock.APPLICATOR)
        return frozenset(tripped)

    def _plan_spec(self) -> ApplicatorSpec | None:
        if self._plan_code is None:
            return None
        return self._profile.applicators[self._plan_code]

    def _backup_limit_s(self) -> float:
        plan = self._plan_spec()
        if plan is None:
            return math.inf
        nominal_s = self._preset_gy / plan.surface_dose_rate_gy_min * 60.0
        return nominal_s * (1.0 + self._profile.backup_timer_margin_rel)

    def _attached_identity(self) -> ApplicatorIdentity | None:
        code = self._applicator_code
        spec = self._profile.applicators.get(code) if code is not None else None
        if spec is None:
            return None
        return ApplicatorIdentity(
            type=spec.type, diameter_mm=spec.diameter_mm, serial=f"SIM-{code}"
        )
