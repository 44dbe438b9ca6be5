"""The simulated source model, driven by hand in simulated time (no clock, no asyncio)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    TerminationStatus,
)
from iortd.simulators.model import (
    ACTIONS,
    RATE_SETTLING_S,
    TRANSITIONS,
    IllegalTransition,
    InterlocksNotClear,
    ModelSnapshot,
    SourceModel,
)
from iortd.simulators.profiles import Profile, available_profiles, load_profile
from iortd.simulators.sequence import ClinicalSequence, SequenceStage

PROFILES: dict[str, Profile] = {name: load_profile(name) for name in available_profiles()}
EVERY_APPLICATOR = [(name, code) for name, p in PROFILES.items() for code in sorted(p.applicators)]
INTRABEAM = PROFILES["intrabeam"]
PRESET = 20.0


# --- helpers --------------------------------------------------------------------------------


def check_snapshot(snap: ModelSnapshot) -> None:
    """What must hold for every snapshot, whatever happened before."""
    assert snap.simulated is True
    assert set(snap.interlocks) == set(Interlock)
    assert snap.interlocks[Interlock.COMMUNICATION] is InterlockState.OK
    if snap.state is DeviceState.IRRADIATING:
        assert all(s is InterlockState.OK for s in snap.interlocks.values()), snap.interlocks
    else:
        assert snap.dose_rate_gy_min == 0.0
        assert snap.kv == 0.0
        assert snap.ua == 0.0


def standby(profile: Profile = INTRABEAM, *, seed: int = 7) -> SourceModel:
    model = SourceModel(profile, seed=seed)
    model.power_on()
    model.process(profile.self_test_s)
    assert model.state is DeviceState.STANDBY
    return model


def ready(
    code: str = "SPH30", *, profile: Profile = INTRABEAM, preset: float = PRESET, seed: int = 7
) -> SourceModel:
    model = standby(profile, seed=seed)
    model.attach_applicator(code)
    model.load_plan(preset, code)
    model.arm()
    assert model.state is DeviceState.READY
    return model


def irradiating(
    code: str = "SPH30", *, profile: Profile = INTRABEAM, preset: float = PRESET, seed: int = 7
) -> SourceModel:
    model = ready(code, profile=profile, preset=preset, seed=seed)
    model.start_beam()
    assert model.state is DeviceState.IRRADIATING
    return model


def run_while_irradiating(model: SourceModel, dt: float, *, limit_s: float) -> ModelSnapshot:
    """Step until the beam stops, checking monotonic doses and the invariants each step."""
    previous = model.snapshot()
    stop_at = model.time_s + limit_s
    while model.state is DeviceState.IRRADIATING:
        assert model.time_s < stop_at, "the beam never stopped"
        model.process(dt)
        snap = model.snapshot()
        check_snapshot(snap)
        assert snap.dose_primary_gy >= previous.dose_primary_gy
        assert snap.dose_secondary_gy >= previous.dose_secondary_gy
        assert snap.beam_on_s >= previous.beam_on_s
        assert snap.dose_primary_gy <= snap.preset_gy
        previous = snap
    return previous


def nominal_s(model: SourceModel, preset: float = PRESET) -> float:
    snap = model.snapshot()
    assert snap.expected_rate_gy_min is not None
    return preset / snap.expected_rate_gy_min * 60.0


# --- the transition table -----------------------------------------------------------------


def test_every_action_leads_along_the_table() -> None:
    for action, (sources, target) in ACTIONS.items():
        assert sources, action
        for source in sources:
            assert (source, target) in TRANSITIONS, (action, source, target)


def test_table_never_uses_unknown_and_latched_states_leave_only_by_reset_or_power() -> None:
    assert all(DeviceState.UNKNOWN not in pair for pair in TRANSITIONS)
    for latched in (DeviceState.FAULT, DeviceState.EMERGENCY_STOP):
        exits = {to for (frm, to) in TRANSITIONS if frm is latched}
        assert exits <= {DeviceState.STANDBY, DeviceState.OFF, DeviceState.EMERGENCY_STOP}
    assert {to for (frm, to) in TRANSITIONS if frm is DeviceState.TERMINATED} == {
        DeviceState.PREPARATORY,  # a new selection is required before irradiating again
        DeviceState.FAULT,
        DeviceState.EMERGENCY_STOP,
        DeviceState.OFF,
    }


# --- start-up ---------------------------------------------------------------------------


def test_self_test_lasts_its_profile_time() -> None:
    model = SourceModel(INTRABEAM, seed=1, serial="SN-42")
    snap = model.snapshot()
    check_snapshot(snap)
    assert snap.state is DeviceState.OFF
    assert snap.termination is None
    assert snap.backup_timer_limit_s is None
    assert snap.expected_rate_gy_min is None
    model.power_on()
    model.process(INTRABEAM.self_test_s - 0.5)
    assert model.state is DeviceState.SELF_TEST
    model.process(0.5)
    assert model.state is DeviceState.STANDBY
    assert model.time_s == pytest.approx(INTRABEAM.self_test_s)
    identity = model.identity()
    assert identity.simulated is True
    assert identity.serial == "SN-42"
    assert identity.model == INTRABEAM.model


# --- normal deliveries --------------------------------------------------------------------


@pytest.mark.parametrize(("profile_name", "code"), EVERY_APPLICATOR)
def test_20_gy_delivery_terminates_normally(profile_name: str, code: str) -> None:
    profile = PROFILES[profile_name]
    model = irradiating(code, profile=profile)
    expected_s = nominal_s(model)
    end = run_while_irradiating(model, 0.1, limit_s=2 * expected_s)
    assert end.state is DeviceState.TERMINATED
    assert end.termination is TerminationStatus.NORMAL
    assert end.termination_reason == "preset_reached"
    assert end.dose_primary_gy == pytest.approx(PRESET, rel=0.005)
    assert end.beam_on_s == pytest.approx(expected_s, rel=0.02)
    assert end.dose_secondary_gy == pytest.approx(PRESET, rel=profile.dose_channel_tolerance_rel)
    assert all(s is InterlockState.OK for s in end.interlocks.values())
    spec = profile.applicators[code]
    assert end.applicator == ApplicatorIdentity(spec.type, spec.diameter_mm, f"SIM-{code}")
    assert end.plan_applicator_code == code
    assert end.expected_rate_gy_min == spec.surface_dose_rate_gy_min


@pytest.mark.parametrize(
    ("profile_name", "code"), [("intrabeam", "SPH15"), ("intrabeam", "SPH50"), ("axxent", "BAL34")]
)
def test_large_steps_stop_at_the_preset_crossing(profile_name: str, code: str) -> None:
    fine = irradiating(code, profile=PROFILES[profile_name], seed=3)
    fine_end = run_while_irradiating(fine, 0.1, limit_s=4000)
    coarse = irradiating(code, profile=PROFILES[profile_name], seed=3)
    coarse_end = run_while_irradiating(coarse, 6.0, limit_s=4000)
    assert coarse_end.termination is TerminationStatus.NORMAL
    assert coarse_end.dose_primary_gy == pytest.approx(PRESET, rel=0.005)
    assert coarse_end.beam_on_s == pytest.approx(nominal_s(coarse), rel=0.02)
    # The timer stops at the crossing, not at the end of the 6 s step.
    assert coarse_end.beam_on_s == pytest.approx(fine_end.beam_on_s, rel=0.005)
    steps = coarse_end.beam_on_s / 6.0
    assert abs(steps - round(steps)) > 1e-6


def test_backup_timer_limit_is_nominal_time_plus_margin() -> None:
    model = ready("SPH40")
    snap = model.snapshot()
    assert snap.preset_gy == PRESET
    assert snap.backup_timer_limit_s == pytest.approx(25 * 60 * 1.10)


def test_readings_while_irradiating() -> None:
    model = irradiating("SPH30")
    model.process(5.0)
    snap = model.snapshot()
    assert snap.kv == pytest.approx(INTRABEAM.nominal_kv, rel=0.02)
    assert snap.ua == pytest.approx(INTRABEAM.nominal_ua, rel=0.02)
    assert snap.dose_rate_gy_min == pytest.approx(20 / 23, rel=0.05)
    assert snap.beam_on_s == pytest.approx(5.0)


# --- determinism ----------------------------------------------------------------------------


def sequence_trace(seed: int) -> list[ModelSnapshot]:
    model = SourceModel(INTRABEAM, seed=seed)
    sequence = ClinicalSequence(model, preset_gy=1.0, applicator_code="SPH30")
    trace = []
    for _ in range(120):
        sequence.process(1.0)
        trace.append(model.snapshot())
    return trace


def test_same_seed_same_trace_different_seed_different_trace() -> None:
    first = sequence_trace(11)
    assert first == sequence_trace(11)
    assert first != sequence_trace(12)
    assert first[-1].termination is TerminationStatus.NORMAL


# --- interruptions ------------------------------------------------------------------------


def test_door_interrupts_and_resume_tiles_the_preset() -> None:
    model = irradiating("SPH30")
    run_for = 600.0
    while model.time_s < INTRABEAM.self_test_s + run_for:
        model.process(0.1)
    before = model.snapshot()
    model.open_door()
    interrupted = model.snapshot()
    check_snapshot(interrupted)
    assert interrupted.state is DeviceState.INTERRUPTED
    assert interrupted.interruption_reason == "door_open"
    assert interrupted.termination is None
    assert interrupted.interlocks[Interlock.DOOR] is InterlockState.TRIPPED
    assert interrupted.dose_primary_gy == before.dose_primary_gy > 0
    assert interrupted.beam_on_s == before.beam_on_s

    model.process(120.0)
    held = model.snapshot()
    assert held.dose_primary_gy == before.dose_primary_gy
    assert held.dose_secondary_gy == before.dose_secondary_gy
    assert held.beam_on_s == before.beam_on_s
    with pytest.raises(InterlocksNotClear) as refused:
        model.resume()
    assert Interlock.DOOR in refused.value.tripped
    model.close_door()
    assert model.state is DeviceState.INTERRUPTED  # closing the door does not restart

    model.resume()
    end = run_while_irradiating(model, 0.1, limit_s=3000)
    assert end.termination is TerminationStatus.NORMAL
    # The second part delivers exactly what was left: preset - delivered, no double count.
    assert end.dose_primary_gy == PRESET
    assert end.dose_primary_gy - before.dose_primary_gy == pytest.approx(
        PRESET - before.dose_primary_gy
    )
    assert end.beam_on_s == pytest.approx(nominal_s(model), rel=0.02)
    assert end.time_s - end.beam_on_s >= 120.0 + INTRABEAM.self_test_s - 1e-6


def test_operator_pause_and_end() -> None:
    model = irradiating("SPH15")
    model.process(10.0)
    model.pause()
    snap = model.snapshot()
    assert snap.state is DeviceState.INTERRUPTED
    assert snap.interruption_reason == "operator_pause"
    model.resume()
    model.process(10.0)
    assert model.snapshot().beam_on_s == pytest.approx(20.0)
    model.end_delivery()
    end = model.snapshot()
    assert end.state is DeviceState.TERMINATED
    assert end.termination is TerminationStatus.OPERATOR
    assert end.termination_reason == "operator_end"
    assert 0 < end.dose_primary_gy < PRESET


def test_door_opened_while_armed_disarms() -> None:
    model = ready()
    model.open_door()
    assert model.state is DeviceState.PREPARATORY
    with pytest.raises(InterlocksNotClear):
        model.arm()
    model.close_door()
    model.arm()
    assert model.state is DeviceState.READY


# --- machine terminations and faults --------------------------------------------------------


@pytest.mark.parametrize("dt", [0.1, 6.0])
def test_low_output_is_stopped_by_the_backup_timer(dt: float) -> None:
    model = irradiating("SPH30")
    model.set_output_factor(0.5)
    end = run_while_irradiating(model, dt, limit_s=4000)
    assert end.state is DeviceState.TERMINATED
    assert end.termination is TerminationStatus.MACHINE
    assert end.termination_reason == "backup_timer_expired"
    assert end.interlocks[Interlock.BACKUP_TIMER] is InterlockState.TRIPPED
    assert end.backup_timer_limit_s is not None
    assert end.beam_on_s == pytest.approx(end.backup_timer_limit_s, abs=1e-6)
    assert end.dose_primary_gy == pytest.approx(0.5 * 1.10 * PRESET, rel=0.02)
    # A termination needs a new selection, which clears the selection's latches.
    with pytest.raises(IllegalTransition):
        model.start_beam()
    model.set_output_factor(1.0)
    model.load_plan(PRESET, "SPH30")
    snap = model.snapshot()
    assert snap.interlocks[Interlock.BACKUP_TIMER] is InterlockState.OK
    assert snap.dose_primary_gy == snap.beam_on_s == 0.0
    assert snap.termination is None


def test_secondary_channel_disagreement_faults_and_needs_a_two_step_reset() -> None:
    model = irradiating("SPH30")
    model.process(1.0)
    model.set_secondary_gain(1.2)
    model.process(1.0)
    snap = model.snapshot()
    check_snapshot(snap)
    assert snap.state is DeviceState.FAULT
    assert snap.termination is TerminationStatus.MACHINE
    assert snap.termination_reason == "dose_channels_disagree"
    assert snap.interlocks[Interlock.DOSE_CHANNELS] is InterlockState.TRIPPED

    model.set_secondary_gain(1.0)
    model.process(60.0)
    assert model.state is DeviceState.FAULT  # latched
    with pytest.raises(IllegalTransition, match="no reset_request pending"):
        model.reset_confirm()
    with pytest.raises(IllegalTransition):
        model.load_plan(PRESET, "SPH30")
    model.reset_request()
    assert model.state is DeviceState.FAULT
    model.reset_confirm()
    snap = model.snapshot()
    assert snap.state is DeviceState.STANDBY
    assert all(s is InterlockState.OK for s in snap.interlocks.values())


def test_fault_survives_a_power_cycle() -> None:
    model = irradiating("SPH30")
    model.set_secondary_gain(1.2)
    model.process(1.0)
    assert model.state is DeviceState.FAULT
    model.power_off()
    model.power_on()
    model.process(INTRABEAM.self_test_s)
    assert model.state is DeviceState.FAULT
    assert model.snapshot().interlocks[Interlock.DOSE_CHANNELS] is InterlockState.TRIPPED


def test_high_output_trips_the_dose_rate_interlock_after_settling() -> None:
    model = irradiating("SPH30")
    model.set_output_factor(1.3)
    model.process(RATE_SETTLING_S / 2)
    assert model.state is DeviceState.IRRADIATING
    run_while_irradiating(model, 0.5, limit_s=60)
    snap = model.snapshot()
    assert snap.state is DeviceState.FAULT
    assert snap.termination is TerminationStatus.MACHINE
    assert snap.termination_reason == "dose_rate_deviation"
    assert snap.interlocks[Interlock.DOSE_RATE] is InterlockState.TRIPPED
    assert snap.beam_on_s == pytest.approx(RATE_SETTLING_S)


@pytest.mark.parametrize(
    ("setter", "interlock", "reason"),
    [
        (lambda m: m.set_kv_offset(5.0), Interlock.TUBE_VOLTAGE, "kv_out_of_tolerance"),
        (lambda m: m.set_ua_offset(-10.0), Interlock.TUBE_CURRENT, "ua_out_of_tolerance"),
        (lambda m: m.set_cooling(False), Interlock.COOLING, "cooling_failure"),
    ],
)
def test_generator_faults(
    setter: Callable[[SourceModel], None], interlock: Interlock, reason: str
) -> None:
    model = irradiating("SPH30")
    model.process(1.0)
    setter(model)
    model.process(1.0)
    snap = model.snapshot()
    check_snapshot(snap)
    assert snap.state is DeviceState.FAULT
    assert snap.termination is TerminationStatus.MACHINE
    assert snap.termination_reason == reason
    assert snap.interlocks[interlock] is InterlockState.TRIPPED


def test_reset_is_refused_while_cooling_has_failed() -> None:
    model = standby()
    model.set_cooling(False)
    assert model.state is DeviceState.FAULT
    assert model.snapshot().termination is None  # nothing was being delivered
    with pytest.raises(InterlocksNotClear):
        model.reset_request()
    model.set_cooling(True)
    model.reset_request()
    model.reset_confirm()
    assert model.state is DeviceState.STANDBY


def test_emergency_stop_terminates_and_needs_release_then_reset() -> None:
    model = irradiating("SPH30")
    model.process(30.0)
    model.press_estop()
    snap = model.snapshot()
    check_snapshot(snap)
    assert snap.state is DeviceState.EMERGENCY_STOP
    assert snap.termination is TerminationStatus.MACHINE
    assert snap.termination_reason == "emergency_stop"
    assert snap.interlocks[Interlock.EMERGENCY_STOP] is InterlockState.TRIPPED
    dose = snap.dose_primary_gy
    assert dose > 0
    with pytest.raises(InterlocksNotClear):
        model.reset_request()
    model.release_estop()
    assert model.state is DeviceState.EMERGENCY_STOP
    assert model.snapshot().interlocks[Interlock.EMERGENCY_STOP] is InterlockState.OK
    with pytest.raises(IllegalTransition):
        model.reset_confirm()
    model.reset_request()
    model.reset_confirm()
    snap = model.snapshot()
    assert snap.state is DeviceState.STANDBY
    assert snap.dose_primary_gy == dose  # the reading survives until a new selection


def test_emergency_stop_outside_a_delivery_records_no_termination() -> None:
    model = standby()
    model.press_estop()
    assert model.state is DeviceState.EMERGENCY_STOP
    assert model.snapshot().termination is None


@pytest.mark.parametrize(
    ("new_code", "reason"), [(None, "applicator_removed"), ("SPH35", "applicator_changed")]
)
def test_applicator_removed_or_swapped_while_irradiating(new_code: str | None, reason: str) -> None:
    model = irradiating("SPH30")
    model.process(30.0)
    model.attach_applicator(new_code)
    snap = model.snapshot()
    check_snapshot(snap)
    assert snap.state is DeviceState.TERMINATED
    assert snap.termination is TerminationStatus.MACHINE
    assert snap.termination_reason == reason
    assert snap.interlocks[Interlock.APPLICATOR] is InterlockState.TRIPPED
    model.attach_applicator("SPH30")
    assert model.snapshot().interlocks[Interlock.APPLICATOR] is InterlockState.TRIPPED  # latched


def test_applicator_must_match_the_plan() -> None:
    model = standby()
    model.attach_applicator("SPH35")
    model.load_plan(PRESET, "SPH30")
    assert model.snapshot().interlocks[Interlock.APPLICATOR] is InterlockState.TRIPPED
    with pytest.raises(InterlocksNotClear):
        model.arm()
    model.attach_applicator("NOT-A-CODE")
    snap = model.snapshot()
    assert snap.applicator is None  # attached but not recognised
    assert snap.interlocks[Interlock.APPLICATOR] is InterlockState.TRIPPED
    model.attach_applicator("SPH30")
    model.arm()
    model.attach_applicator("SPH35")
    assert model.state is DeviceState.PREPARATORY


def test_power_off_during_delivery_keeps_the_reading() -> None:
    model = irradiating("SPH30")
    model.process(60.0)
    dose = model.snapshot().dose_primary_gy
    model.power_off()
    snap = model.snapshot()
    assert snap.state is DeviceState.OFF
    assert snap.termination is TerminationStatus.OPERATOR
    assert snap.termination_reason == "power_off"
    assert snap.dose_primary_gy == dose
    model.power_on()
    model.process(INTRABEAM.self_test_s)
    assert model.state is DeviceState.STANDBY
    assert model.snapshot().dose_primary_gy == dose


def test_invalid_arguments_are_value_errors() -> None:
    model = standby()
    with pytest.raises(ValueError, match="NOPE"):
        model.load_plan(PRESET, "NOPE")
    with pytest.raises(ValueError, match="preset"):
        model.load_plan(0.0, "SPH30")
    with pytest.raises(ValueError, match="dt"):
        model.process(-1.0)
    with pytest.raises(ValueError, match="output"):
        model.set_output_factor(float("nan"))
    assert model.state is DeviceState.STANDBY


# --- illegal operator actions -------------------------------------------------------------


def terminated() -> SourceModel:
    model = irradiating("SPH15", preset=0.5)
    run_while_irradiating(model, 1.0, limit_s=60)
    return model


SETUPS: dict[str, Callable[[], SourceModel]] = {
    "off": lambda: SourceModel(INTRABEAM, seed=1),
    "standby": standby,
    "ready": ready,
    "irradiating": irradiating,
    "terminated": terminated,
}
ILLEGAL: list[tuple[str, Callable[[SourceModel], None]]] = [
    ("off", lambda m: m.arm()),
    ("off", lambda m: m.load_plan(PRESET, "SPH30")),
    ("off", lambda m: m.power_off()),
    ("off", lambda m: m.reset_request()),
    ("standby", lambda m: m.power_on()),
    ("standby", lambda m: m.arm()),
    ("standby", lambda m: m.start_beam()),
    ("standby", lambda m: m.end_delivery()),
    ("ready", lambda m: m.load_plan(PRESET, "SPH30")),
    ("ready", lambda m: m.resume()),
    ("ready", lambda m: m.pause()),
    ("irradiating", lambda m: m.start_beam()),
    ("irradiating", lambda m: m.load_plan(PRESET, "SPH30")),
    ("irradiating", lambda m: m.arm()),
    ("irradiating", lambda m: m.resume()),
    ("irradiating", lambda m: m.reset_request()),
    ("terminated", lambda m: m.start_beam()),
    ("terminated", lambda m: m.resume()),
    ("terminated", lambda m: m.arm()),
    ("terminated", lambda m: m.end_delivery()),
]


@pytest.mark.parametrize(("setup", "action"), ILLEGAL)
def test_illegal_actions_raise_and_change_nothing(
    setup: str, action: Callable[[SourceModel], None]
) -> None:
    model = SETUPS[setup]()
    before = model.snapshot()
    with pytest.raises(IllegalTransition):
        action(model)
    assert model.snapshot() == before


# --- the automatic operator ---------------------------------------------------------------


@pytest.mark.parametrize("dt", [0.1, 1.0, 7.0, 60.0])
def test_sequence_acts_at_exact_moments_whatever_the_step(dt: float) -> None:
    model = SourceModel(INTRABEAM, seed=5)
    sequence = ClinicalSequence(model, preset_gy=PRESET, applicator_code="SPH30", start_delay_s=5)
    start_at = INTRABEAM.self_test_s + 5.0
    steps = round(120.0 / dt)
    for _ in range(steps):
        sequence.process(dt)
    total = steps * dt
    assert sequence.done
    assert sequence.stage is SequenceStage.DONE
    snap = model.snapshot()
    assert snap.state is DeviceState.IRRADIATING
    assert snap.plan_applicator_code == "SPH30"
    assert snap.time_s == pytest.approx(total)
    assert snap.beam_on_s == pytest.approx(total - start_at)


def test_sequence_waits_for_the_door_before_arming() -> None:
    model = SourceModel(INTRABEAM, seed=5)
    model.open_door()
    sequence = ClinicalSequence(model, preset_gy=PRESET, applicator_code="SPH30")
    sequence.process(30.0)
    assert sequence.stage is SequenceStage.ARM
    assert model.state is DeviceState.PREPARATORY
    model.close_door()
    sequence.process(0.0)  # arms now
    sequence.process(5.0)  # and starts the delay later
    assert model.state is DeviceState.IRRADIATING


def test_sequence_rejects_an_unknown_applicator() -> None:
    with pytest.raises(ValueError, match="BAL34"):
        ClinicalSequence(SourceModel(INTRABEAM, seed=1), preset_gy=1.0, applicator_code="BAL34")


# --- property: arbitrary action sequences -------------------------------------------------

OPERATOR_ACTIONS = frozenset(ACTIONS)
# Every other action name is equally likely, so the rare-but-interesting ones (door, e-stop,
# applicator swap) happen during a beam often enough to matter.
ARGUMENTS: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    **{name: st.just(()) for name in sorted(OPERATOR_ACTIONS - {"load_plan"})},
    **{name: st.just(()) for name in ["open_door", "close_door", "press_estop", "release_estop"]},
    "process": st.tuples(
        st.one_of(st.sampled_from([0.1, 1.0, 6.0]), st.floats(min_value=0.0, max_value=60.0))
    ),
    "load_plan": st.tuples(st.sampled_from([0.5, 2.0]), st.sampled_from(["SPH15", "SPH30"])),
    "attach_applicator": st.tuples(st.sampled_from([None, "SPH15", "SPH30", "BOGUS"])),
    "set_output_factor": st.tuples(st.sampled_from([0.0, 0.5, 1.0, 1.3])),
    "set_secondary_gain": st.tuples(st.sampled_from([0.8, 1.0, 1.2])),
    "set_kv_offset": st.tuples(st.sampled_from([0.0, 5.0])),
    "set_ua_offset": st.tuples(st.sampled_from([0.0, -5.0])),
    "set_cooling": st.tuples(st.booleans()),
}
# Time passing is what moves a delivery along, so it is drawn as often as all else together.
ACTION = st.sampled_from(sorted(ARGUMENTS) + ["process"] * (len(ARGUMENTS) - 1)).flatmap(
    lambda name: ARGUMENTS[name].map(lambda args: (name, *args))
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    start=st.sampled_from(["off", "ready", "irradiating"]),
    actions=st.lists(ACTION, min_size=1, max_size=50),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_arbitrary_actions_keep_the_invariants(
    start: str, actions: list[tuple[object, ...]], seed: int
) -> None:
    if start == "off":
        model = SourceModel(INTRABEAM, seed=seed)
    elif start == "ready":
        model = ready("SPH30", preset=2.0, seed=seed)
    else:
        model = irradiating("SPH30", preset=2.0, seed=seed)
    previous = model.snapshot()
    check_snapshot(previous)
    for name, *args in actions:
        assert isinstance(name, str)
        try:
            getattr(model, name)(*args)
        except IllegalTransition:
            # Only the console refuses things; physical events are always accepted.
            assert name in OPERATOR_ACTIONS
            assert model.snapshot() == previous
            continue
        snap = model.snapshot()
        check_snapshot(snap)
        assert snap.time_s >= previous.time_s
        if snap.preset_gy > 0:
            assert snap.dose_primary_gy <= snap.preset_gy
        if name != "load_plan":  # a new selection zeroes the readings; nothing else may
            assert snap.dose_primary_gy >= previous.dose_primary_gy
            assert snap.dose_secondary_gy >= previous.dose_secondary_gy
            assert snap.beam_on_s >= previous.beam_on_s
        if snap.termination is TerminationStatus.NORMAL:
            assert snap.dose_primary_gy == snap.preset_gy
        previous = snap
