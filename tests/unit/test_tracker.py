"""The delivery tracker, fed by hand: every transition, every alarm, the tiling rule."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from iortd.daemon.tracker import (
    TRANSITIONS,
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeliveryTracker,
    IllegalTransition,
    InterlockChanged,
    MonitoringGapEnded,
    MonitoringGapStarted,
    Phase,
    PhaseChanged,
    Severity,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from iortd.kernel.types import (
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)

S = DeviceState
NS = 1_000_000_000
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
PRESET = 20.0
RATE = 0.8  # Gy/min
PLANNED_S = PRESET / RATE * 60  # 1500 s
ALL_OK: Mapping[Interlock, InterlockState] = dict.fromkeys(Interlock, InterlockState.OK)


def settings(**kw: object) -> TrackerSettings:
    base: dict[str, object] = {"stale_after_s": 3.0, "rate_settle_s": 5.0}
    base.update(kw)
    return TrackerSettings(**base)  # type: ignore[arg-type]


@dataclass
class Feed:
    """Drives a tracker with a console that advances one second per reading by default."""

    tracker: DeliveryTracker = field(default_factory=lambda: DeliveryTracker(settings()))
    t_s: float = 0.0
    primary: float = 0.0
    secondary: float = 0.0
    beam_on: float = 0.0
    events: list[TrackerEvent] = field(default_factory=list)

    @property
    def mono(self) -> int:
        return round(self.t_s * NS)

    @property
    def utc(self) -> datetime:
        return T0 + timedelta(seconds=self.t_s)

    def read(
        self,
        state: DeviceState,
        *,
        dt: float = 1.0,
        dose: float = 0.0,
        secondary: float | None = None,
        rate: float | None = None,
        interlocks: Mapping[Interlock, InterlockState] | None = None,
        termination: TerminationStatus | None = None,
        reason: str | None = None,
        preset: float = PRESET,
        planned: float | None = PLANNED_S,
        beam_on: float | None = None,
    ) -> list[TrackerEvent]:
        """Advance ``dt`` seconds; ``dose`` is added to both channels."""
        self.t_s += dt
        if state is S.IRRADIATING:
            self.beam_on += dt
        self.primary += dose
        self.secondary += dose if secondary is None else secondary
        r = SourceReading(
            mono_ns=self.mono,
            utc=self.utc,
            state=state,
            dose_rate_gy_min=(RATE if state is S.IRRADIATING else 0.0) if rate is None else rate,
            dose_primary_gy=self.primary,
            dose_secondary_gy=self.secondary,
            preset_gy=preset,
            beam_on_s=self.beam_on if beam_on is None else beam_on,
            kv=50.0 if state is S.IRRADIATING else 0.0,
            ua=40.0 if state is S.IRRADIATING else 0.0,
            interlocks=ALL_OK if interlocks is None else interlocks,
            planned_time_s=planned,
            termination=termination,
            termination_reason=reason,
            simulated=True,
        )
        ev = self.tracker.on_reading(r)
        self.events.extend(ev)
        return ev

    def tick(self, dt: float) -> list[TrackerEvent]:
        self.t_s += dt
        ev = self.tracker.on_tick(self.mono, self.utc)
        self.events.extend(ev)
        return ev

    def irradiate(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(round(seconds / step)):
            self.read(S.IRRADIATING, dt=step, dose=RATE / 60 * step)

    def snap(self) -> DeliverySnapshot:
        s = self.tracker.snapshot(self.mono)
        assert s is not None
        return s


def of(events: list[TrackerEvent], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind)]


def phases(events: list[TrackerEvent]) -> list[tuple[Phase, Phase]]:
    return [(e.src, e.dst) for e in of(events, PhaseChanged)]


def raised(events: list[TrackerEvent]) -> set[str]:
    return {e.alarm.key for e in of(events, AlarmRaised)}


def assert_tiles(s: DeliverySnapshot) -> None:
    """Segments start at 0, touch end to start, and end at the delivered dose."""
    segs = s.segments
    assert segs, "a delivery with dose must have segments"
    assert segs[0].start_gy == 0.0
    for a, b in itertools.pairwise(segs):
        assert b.start_gy == a.end_gy, f"gap or overlap between {a} and {b}"
    assert segs[-1].end_gy == s.delivered_primary_gy
    total = sum(seg.end_gy - seg.start_gy for seg in segs)
    assert math.isclose(total, s.delivered_primary_gy, rel_tol=1e-12, abs_tol=1e-12)


def start_delivery(f: Feed) -> None:
    f.read(S.STANDBY)
    f.read(S.PREPARATORY)
    f.read(S.READY)


# ---- a whole normal delivery ---------------------------------------------------------


def test_normal_delivery_from_selection_to_normal_termination() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S, step=10.0)
    f.read(S.TERMINATED, dt=0.5, termination=TerminationStatus.NORMAL, reason="preset reached")

    assert phases(f.events) == [
        (Phase.IDLE, Phase.PREPARATORY),
        (Phase.PREPARATORY, Phase.READY),
        (Phase.READY, Phase.IRRADIATING),
        (Phase.IRRADIATING, Phase.TERMINATED),
    ]
    (started,) = of(f.events, DeliveryStarted)
    (end,) = of(f.events, Terminated)
    assert end.delivery_id == started.delivery_id
    assert not started.joined_in_progress
    assert end.status is TerminationStatus.NORMAL
    s = end.summary
    assert math.isclose(s.delivered_primary_gy, PRESET, rel_tol=1e-9)
    assert s.remaining_gy == pytest.approx(0.0, abs=1e-9)
    assert s.beam_on_s == pytest.approx(PLANNED_S)
    # The beam came on between two polls: the console's timer (10 s at the first reading)
    # places its start, so elapsed runs from the real beam-on and is never the shorter.
    assert s.elapsed_s == pytest.approx(PLANNED_S + 0.5, abs=1e-6)
    assert s.estimated_remaining_s == 0.0
    assert s.expected_rate_gy_min == pytest.approx(RATE)
    assert s.backup_timer_limit_s == pytest.approx(PLANNED_S * 1.1)
    assert [seg.kind for seg in s.segments] == ["beam"]
    assert_tiles(s)
    assert not of(f.events, AlarmRaised)
    assert f.tracker.all_clear


def test_remaining_dose_and_time_during_irradiation() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(600, step=10.0)  # 8 Gy at 0.8 Gy/min
    s = f.snap()
    assert s.delivered_primary_gy == pytest.approx(8.0)
    assert s.remaining_gy == pytest.approx(12.0)
    assert s.estimated_remaining_s == pytest.approx(12.0 / RATE * 60)
    assert s.phase is Phase.IRRADIATING
    assert s.termination is None


# ---- every transition of the table ---------------------------------------------------


def drive_to(f: Feed, phase: Phase) -> None:
    f.read(S.STANDBY)
    if phase is Phase.IDLE:
        return
    f.read(S.PREPARATORY)
    if phase is Phase.PREPARATORY:
        return
    f.read(S.READY)
    if phase is Phase.READY:
        return
    f.irradiate(10)
    if phase is Phase.IRRADIATING:
        return
    if phase is Phase.INTERRUPTED:
        f.read(S.INTERRUPTED)
        return
    if phase is Phase.TERMINATED:
        f.read(S.TERMINATED, termination=TerminationStatus.OPERATOR, reason="operator end")
        return
    assert phase is Phase.FAULT
    f.read(S.FAULT, reason="cooling")


def cause(f: Feed, dst: Phase) -> list[TrackerEvent]:
    match dst:
        case Phase.IDLE:
            return f.read(S.STANDBY)
        case Phase.PREPARATORY:
            if f.tracker.phase in (Phase.TERMINATED, Phase.FAULT):
                f.primary = f.secondary = f.beam_on = 0.0  # a new selection clears counts
            return f.read(S.PREPARATORY)
        case Phase.READY:
            return f.read(S.READY)
        case Phase.IRRADIATING:
            return f.read(S.IRRADIATING, dose=0.01)
        case Phase.INTERRUPTED:
            return f.read(S.INTERRUPTED)
        case Phase.TERMINATED:
            return f.read(S.TERMINATED, termination=TerminationStatus.OPERATOR, reason="stop")
        case Phase.FAULT:
            return f.read(S.FAULT, reason="cooling")
    raise AssertionError(dst)


@pytest.mark.parametrize(("src", "dst"), sorted(TRANSITIONS))
def test_every_transition_of_the_table(src: Phase, dst: Phase) -> None:
    f = Feed()
    drive_to(f, src)
    assert f.tracker.phase is src
    ev = cause(f, dst)
    assert f.tracker.phase is dst
    assert (src, dst) in phases(ev)


def test_transition_table_has_no_way_out_of_fault_but_idle_or_new_selection() -> None:
    assert {d for s, d in TRANSITIONS if s is Phase.FAULT} == {Phase.IDLE, Phase.PREPARATORY}
    assert all((p, Phase.FAULT) in TRANSITIONS for p in Phase if p is not Phase.FAULT)


def test_illegal_internal_move_raises() -> None:
    t = DeliveryTracker(settings())
    with pytest.raises(IllegalTransition, match="IDLE -> TERMINATED"):
        t._machine.move(Phase.TERMINATED, "test", 0, T0, [])


def test_console_moving_outside_the_table_is_contradictory() -> None:
    f = Feed()
    drive_to(f, Phase.IRRADIATING)
    ev = f.read(S.READY)  # READY after beam-on: not a move a console makes
    assert f.tracker.phase is Phase.FAULT
    assert f"{AlarmCode.CONTRADICTORY_INPUT}" in raised(ev)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN


def test_selection_cancelled_before_beam_is_closed_as_operator() -> None:
    f = Feed()
    drive_to(f, Phase.READY)
    ev = f.read(S.STANDBY)
    assert phases(ev) == [(Phase.READY, Phase.TERMINATED), (Phase.TERMINATED, Phase.IDLE)]
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.OPERATOR
    assert end.summary.delivered_primary_gy == 0.0


def test_a_selection_first_seen_at_ready_is_not_a_joined_delivery() -> None:
    f = Feed()
    f.read(S.STANDBY)
    ev = f.read(S.READY)
    (started,) = of(ev, DeliveryStarted)
    assert not started.joined_in_progress
    assert phases(ev) == [(Phase.IDLE, Phase.READY)]


def test_joining_a_delivery_in_progress_records_the_unmonitored_dose() -> None:
    f = Feed()
    f.primary = f.secondary = 5.0
    f.beam_on = 375.0
    ev = f.read(S.IRRADIATING, dose=RATE / 60)
    (started,) = of(ev, DeliveryStarted)
    assert started.joined_in_progress
    s = f.snap()
    assert [seg.kind for seg in s.segments] == ["unmonitored", "beam"]
    assert s.segments[0].end_gy == pytest.approx(5.0 + RATE / 60)
    assert_tiles(s)


# ---- interruption and resume: the tiling rule -----------------------------------------


def test_interrupted_and_resumed_delivery_tiles_the_preset() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(600, step=10.0)  # 8 Gy
    door_open = {**ALL_OK, Interlock.DOOR: InterlockState.TRIPPED}
    ev = f.read(S.INTERRUPTED, dt=2, dose=0.02, interlocks=door_open)
    assert (Phase.IRRADIATING, Phase.INTERRUPTED) in phases(ev)
    assert f"{AlarmCode.INTERLOCK_TRIPPED}:door" in raised(ev)
    dose_at_interrupt = f.snap().delivered_primary_gy
    f.read(S.INTERRUPTED, dt=120, interlocks=door_open)  # door open for two minutes
    ev = f.read(S.INTERRUPTED, dt=30)  # door closed, waiting for the operator
    assert any(isinstance(e, AlarmCleared) and e.alarm.key.endswith(":door") for e in ev)
    assert f.snap().delivered_primary_gy == dose_at_interrupt  # kept through the pause
    ev = f.read(S.IRRADIATING, dt=1, dose=RATE / 60)
    assert (Phase.INTERRUPTED, Phase.IRRADIATING) in phases(ev)
    # 20 - 8.02 - 0.8/60 Gy left at 0.8 Gy/min
    remaining = PRESET - f.primary
    f.irradiate(remaining / RATE * 60, step=0.5)
    f.primary = PRESET  # the monitor stops exactly at the preset
    ev = f.read(S.TERMINATED, dt=0.1, termination=TerminationStatus.NORMAL)
    (end,) = of(ev, Terminated)
    s = end.summary
    assert end.status is TerminationStatus.NORMAL
    assert [seg.kind for seg in s.segments] == ["beam", "beam"]
    assert s.segments[0].end_gy == dose_at_interrupt == s.segments[1].start_gy
    assert_tiles(s)
    assert s.delivered_primary_gy == PRESET
    (intr,) = s.interruptions
    assert intr.cause == "interlock door"
    assert intr.dose_at_start_gy == dose_at_interrupt
    assert intr.duration_s == pytest.approx(151.0)
    # Beam-on time excludes the interruption (150 s paused); elapsed time includes it.
    assert s.beam_on_s == pytest.approx(f.beam_on)
    assert s.elapsed_s > s.beam_on_s + 140


def test_operator_pause_is_recorded_as_operator_cause() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(20)
    f.read(S.INTERRUPTED)
    assert f.snap().interruptions[-1].cause == "operator"


def test_dose_that_rises_while_the_beam_is_off_is_kept_flagged_and_alarmed() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(60)
    f.read(S.INTERRUPTED)
    before = f.snap().delivered_primary_gy
    ev = f.read(S.INTERRUPTED, dose=0.05)
    assert f"{AlarmCode.DOSE_WHILE_BEAM_OFF}" in raised(ev)
    s = f.snap()
    assert s.delivered_primary_gy == pytest.approx(before + 0.05)
    assert s.segments[-1].kind == "beam_off"
    assert_tiles(s)


# ---- terminations ----------------------------------------------------------------------


def test_backup_timer_alarm_then_machine_termination() -> None:
    f = Feed()
    start_delivery(f)
    # Output at 80 % of expected: the primary monitor never reaches the preset in time.
    for _ in range(int(PLANNED_S * 1.1 / 10) + 1):
        f.read(S.IRRADIATING, dt=10, dose=RATE * 0.8 / 6, rate=RATE * 0.8)
    assert f.tracker.snapshot() is not None
    keys = raised(f.events)
    assert f"{AlarmCode.BACKUP_TIMER_EXCEEDED}" in keys
    assert f"{AlarmCode.DOSE_RATE_DEVIATION}" in keys
    timer = next(
        e for e in of(f.events, AlarmRaised) if e.alarm.code is AlarmCode.BACKUP_TIMER_EXCEEDED
    )
    assert timer.alarm.severity is Severity.HIGH
    assert timer.alarm.raised_mono_ns / NS > PLANNED_S * 1.1
    backup = {**ALL_OK, Interlock.BACKUP_TIMER: InterlockState.TRIPPED}
    ev = f.read(
        S.TERMINATED,
        termination=TerminationStatus.MACHINE,
        reason="backup_timer",
        interlocks=backup,
    )
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.MACHINE
    assert end.reason == "backup_timer"
    assert end.summary.delivered_primary_gy < PRESET
    assert end.summary.remaining_gy > 0
    # The alarm judged this delivery: it stands after the end, until the next selection.
    assert not any(
        isinstance(e, AlarmCleared) and e.alarm.code is AlarmCode.BACKUP_TIMER_EXCEEDED for e in ev
    )
    assert f"{AlarmCode.BACKUP_TIMER_EXCEEDED}" in {a.key for a in f.tracker.alarms}
    f.primary = f.secondary = f.beam_on = 0.0
    ev = f.read(S.PREPARATORY)
    cleared = [e for e in ev if isinstance(e, AlarmCleared)]
    assert any(e.alarm.code is AlarmCode.BACKUP_TIMER_EXCEEDED for e in cleared)
    (started,) = of(ev, DeliveryStarted)
    # After its end entry nothing names the ended delivery: the clearing is the room's.
    assert all(e.delivery_id is None for e in cleared), "cleared as the room's, not its"
    assert started.delivery_id != end.delivery_id


def test_normal_end_reported_below_the_preset_is_not_accepted_as_normal() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(600, step=10)  # 8 of 20 Gy
    ev = f.read(S.TERMINATED, termination=TerminationStatus.NORMAL)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert f.tracker.phase is Phase.FAULT
    assert f"{AlarmCode.CONTRADICTORY_INPUT}" in raised(ev)


def test_termination_without_status_is_unknown() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    (end,) = of(f.read(S.TERMINATED), Terminated)
    assert end.status is TerminationStatus.UNKNOWN


@pytest.mark.parametrize(
    ("state", "reason"),
    [(S.FAULT, "cooling"), (S.EMERGENCY_STOP, "emergency_stop")],
)
def test_device_fault_or_estop_terminates_as_machine(state: DeviceState, reason: str) -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    ev = f.read(state, reason=reason)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.MACHINE
    assert reason in end.reason
    assert f.tracker.phase is Phase.FAULT
    assert f"{AlarmCode.DEVICE_FAULT}" in raised(ev)
    # Latched: a reading of the console still faulted changes nothing; the reset to
    # STANDBY returns to idle; a new selection starts a new delivery.
    assert not phases(f.read(state, reason=reason))
    assert phases(f.read(S.STANDBY)) == [(Phase.FAULT, Phase.IDLE)]
    f.primary = f.secondary = f.beam_on = 0.0
    ev = f.read(S.PREPARATORY)
    (again,) = of(ev, DeliveryStarted)
    assert again.delivery_id != end.delivery_id


def test_after_termination_a_new_selection_is_required() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    f.read(S.TERMINATED, termination=TerminationStatus.OPERATOR)
    ev = f.read(S.READY)  # no new selection: ignored, still terminated
    assert f.tracker.phase is Phase.TERMINATED
    assert not of(ev, DeliveryStarted)


def test_dose_after_termination_is_alarmed_and_kept() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    f.read(S.TERMINATED, termination=TerminationStatus.OPERATOR)
    ev = f.read(S.TERMINATED, dose=0.1)
    assert f"{AlarmCode.DOSE_WHILE_BEAM_OFF}" in raised(ev)
    assert_tiles(f.snap())


# ---- contradictory and unknown input --------------------------------------------------


def test_decreasing_dose_is_contradictory_and_never_lowers_the_delivered_dose() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(60)
    best = f.snap().delivered_primary_gy
    ev = f.read(S.IRRADIATING, dose=-0.3)
    assert f.tracker.phase is Phase.FAULT
    assert f"{AlarmCode.CONTRADICTORY_INPUT}" in raised(ev)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert end.summary.delivered_primary_gy == best


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_values_drive_fault(bad: float) -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    ev = f.read(S.IRRADIATING, rate=bad)
    assert f.tracker.phase is Phase.FAULT
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN


def test_unknown_console_state_drives_fault_never_normal() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S, step=10)
    ev = f.read(S.UNKNOWN, termination=TerminationStatus.NORMAL)
    assert f.tracker.phase is Phase.FAULT
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN


def test_preset_changed_during_delivery_is_contradictory() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    f.read(S.IRRADIATING, dose=0.01, preset=25.0)
    assert f.tracker.phase is Phase.FAULT


def test_time_going_backwards_is_contradictory() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    ev = f.read(S.IRRADIATING, dt=-5.0)
    assert f.tracker.phase is Phase.FAULT
    assert f"{AlarmCode.CONTRADICTORY_INPUT}" in raised(ev)
    # Nothing in a reading that cannot be placed is believed, interlocks included.
    assert not f.tracker.all_clear
    assert all(s is InterlockState.UNKNOWN for s in f.tracker.interlocks.values())


# ---- alarms ----------------------------------------------------------------------------


def test_dose_channel_disagreement_alarm_raised_and_cleared() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(300, step=10)  # 4 Gy
    ev = f.read(S.IRRADIATING, dose=0.5, secondary=0.0)  # secondary lags by 11 %
    assert f"{AlarmCode.DOSE_CHANNEL_DISAGREEMENT}" in raised(ev)
    ev = f.read(S.IRRADIATING, dose=0.01, secondary=0.51)  # it catches up: they agree
    assert any(
        isinstance(e, AlarmCleared) and e.alarm.code is AlarmCode.DOSE_CHANNEL_DISAGREEMENT
        for e in ev
    )


def test_small_channel_difference_within_tolerance_is_not_an_alarm() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(300, step=10)
    ev = f.read(S.IRRADIATING, dose=0.01, secondary=0.04)  # 1 % of 4 Gy
    assert f"{AlarmCode.DOSE_CHANNEL_DISAGREEMENT}" not in raised(ev)


def test_dose_rate_deviation_only_after_settling() -> None:
    f = Feed()
    start_delivery(f)
    ev = f.read(S.IRRADIATING, dose=0.001, rate=RATE * 0.5)  # ramp-up at beam-on
    assert f"{AlarmCode.DOSE_RATE_DEVIATION}" not in raised(ev)
    f.read(S.IRRADIATING, dt=4, dose=0.02, rate=RATE * 0.5)
    assert f"{AlarmCode.DOSE_RATE_DEVIATION}" not in raised(f.events)
    ev = f.read(S.IRRADIATING, dt=2, dose=0.01, rate=RATE * 0.5)
    assert f"{AlarmCode.DOSE_RATE_DEVIATION}" in raised(ev)
    ev = f.read(S.IRRADIATING, dose=0.01, rate=RATE * 1.02)
    assert any(
        isinstance(e, AlarmCleared) and e.alarm.code is AlarmCode.DOSE_RATE_DEVIATION for e in ev
    )


def test_configured_expected_rate_takes_precedence_over_the_console() -> None:
    f = Feed(tracker=DeliveryTracker(settings(expected_rate_gy_min=1.6)))
    start_delivery(f)
    f.irradiate(10)
    assert f"{AlarmCode.DOSE_RATE_DEVIATION}" in raised(f.events)
    assert f.snap().planned_time_s == pytest.approx(PRESET / 1.6 * 60)


def test_no_expected_rate_is_an_advisory() -> None:
    f = Feed()
    f.read(S.STANDBY)
    ev = f.read(S.PREPARATORY, planned=None)
    (alarm,) = [e.alarm for e in of(ev, AlarmRaised) if e.alarm.code is AlarmCode.NO_EXPECTED_RATE]
    assert alarm.severity is Severity.LOW


def test_overdose_alarm() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S, step=10)
    ev = f.read(S.IRRADIATING, dose=PRESET * 0.03)
    assert f"{AlarmCode.OVERDOSE}" in raised(ev)


@pytest.mark.parametrize("state", [InterlockState.TRIPPED, InterlockState.UNKNOWN])
def test_interlock_not_ok_is_an_alarm_and_not_clear(state: InterlockState) -> None:
    f = Feed()
    f.read(S.STANDBY)
    assert f.tracker.all_clear
    ev = f.read(S.STANDBY, interlocks={**ALL_OK, Interlock.COOLING: state})
    code = (
        AlarmCode.INTERLOCK_TRIPPED
        if state is InterlockState.TRIPPED
        else AlarmCode.INTERLOCK_UNKNOWN
    )
    assert f"{code}:cooling" in raised(ev)
    (change,) = of(ev, InterlockChanged)
    assert change.interlock is Interlock.COOLING
    assert change.new is state
    assert not f.tracker.all_clear


def test_interlock_missing_from_a_reading_counts_as_unknown() -> None:
    f = Feed()
    partial: dict[Interlock, InterlockState] = {
        k: v for k, v in ALL_OK.items() if k is not Interlock.DOOR
    }
    ev = f.read(S.STANDBY, interlocks=partial)
    assert f.tracker.interlocks[Interlock.DOOR] is InterlockState.UNKNOWN
    assert f"{AlarmCode.INTERLOCK_UNKNOWN}:door" in raised(ev)
    assert not f.tracker.all_clear


def test_interlock_alarm_is_high_with_beam_on() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(10)
    ev = f.read(
        S.IRRADIATING,
        dose=0.01,
        interlocks={**ALL_OK, Interlock.TUBE_VOLTAGE: InterlockState.TRIPPED},
    )
    (alarm,) = [e.alarm for e in of(ev, AlarmRaised) if e.alarm.key.endswith(":kv")]
    assert alarm.severity is Severity.HIGH
    assert "beam on" in alarm.message


# ---- monitoring gaps -------------------------------------------------------------------


def test_stale_readings_open_a_gap_make_interlocks_unknown_and_close_on_the_next_reading() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(60)
    assert not f.tick(2.0), "within the bound: nothing happens"
    ev = f.tick(2.0)  # 4 s since the last reading > 3 s bound
    (gap_start,) = of(ev, MonitoringGapStarted)
    assert f"{AlarmCode.STALE_DATA}" in raised(ev)
    assert f.tracker.in_gap
    assert not f.tracker.all_clear
    assert f.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.TRIPPED
    assert all(
        s is InterlockState.UNKNOWN
        for k, s in f.tracker.interlocks.items()
        if k is not Interlock.COMMUNICATION
    )
    assert gap_start.gap.start_mono_ns == 63 * NS  # the last good reading (3 + 60 s)
    assert not f.tick(5.0), "one gap, not one per tick"
    ev = f.read(S.IRRADIATING, dt=1, dose=0.2)
    (gap_end,) = of(ev, MonitoringGapEnded)
    assert gap_end.gap.end_mono_ns == f.mono
    assert any(isinstance(e, AlarmCleared) and e.alarm.code is AlarmCode.STALE_DATA for e in ev)
    assert f.tracker.all_clear
    s = f.snap()
    (gap,) = s.gaps
    assert gap.end_mono_ns is not None
    assert (gap.end_mono_ns - gap.start_mono_ns) / NS == pytest.approx(10.0)
    assert s.phase is Phase.IRRADIATING  # the delivery resumes with the gap recorded
    assert_tiles(s)


def test_link_lost_is_fail_safe_at_once() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(10)
    ev = f.tracker.on_link_lost(f.mono + NS, f.utc, "TransportTimeout")
    (gap,) = of(ev, MonitoringGapStarted)
    assert "TransportTimeout" in gap.gap.cause
    assert not f.tracker.all_clear
    assert {
        f"{AlarmCode.INTERLOCK_UNKNOWN}:door",
        f"{AlarmCode.INTERLOCK_TRIPPED}:communication",
    } <= raised(ev)


def test_delivery_terminated_normally_after_a_gap_keeps_the_gap() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(60)
    f.tick(5)
    f.primary = f.secondary = PRESET  # the dose given during the gap, on both channels
    (end,) = of(f.read(S.TERMINATED, termination=TerminationStatus.NORMAL), Terminated)
    assert end.status is TerminationStatus.NORMAL
    assert len(end.summary.gaps) == 1
    assert end.summary.gaps[0].end_mono_ns is not None


def test_a_normal_end_with_the_channels_apart_is_not_normal() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S * 0.75, step=10)  # 15 Gy on both
    f.primary, f.secondary = PRESET, 15.0  # the last reading: primary 20, secondary 15
    ev = f.read(S.TERMINATED, dt=1, termination=TerminationStatus.NORMAL)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert "dose channels disagree" in end.reason
    assert f"{AlarmCode.DOSE_CHANNEL_DISAGREEMENT}" in raised(ev)


def test_a_normal_end_past_the_backup_timer_is_not_normal() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(600, step=10)
    f.primary = f.secondary = PRESET
    ev = f.read(S.TERMINATED, termination=TerminationStatus.NORMAL, beam_on=PLANNED_S * 1.3)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert "backup-timer" in end.reason
    assert f"{AlarmCode.BACKUP_TIMER_EXCEEDED}" in {a.key for a in f.tracker.alarms}


@pytest.mark.parametrize("bad", [{"rate": math.nan}, {"state": S.UNKNOWN}])
def test_a_rejected_reading_makes_every_interlock_unknown(bad: dict[str, object]) -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(30)
    assert f.tracker.all_clear
    state = bad.get("state", S.IRRADIATING)
    f.read(state, rate=bad.get("rate"))  # type: ignore[arg-type]
    assert not f.tracker.all_clear
    assert all(s is InterlockState.UNKNOWN for s in f.tracker.interlocks.values())


@pytest.mark.parametrize("first_seen", [S.READY, S.IRRADIATING])
def test_a_new_selection_missed_between_two_readings_is_still_followed(
    first_seen: DeviceState,
) -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S, step=10)
    f.primary = f.secondary = PRESET
    (first,) = of(f.read(S.TERMINATED, termination=TerminationStatus.NORMAL), Terminated)
    f.primary = f.secondary = f.beam_on = 0.0  # the console's counters start again
    ev = f.read(first_seen, dose=0.0 if first_seen is S.READY else 0.1)
    (started,) = of(ev, DeliveryStarted)
    assert started.delivery_id != first.delivery_id
    f.irradiate(60)
    s = f.snap()
    assert s.delivery_id == started.delivery_id
    assert s.phase is Phase.IRRADIATING
    assert f"{AlarmCode.DOSE_WHILE_BEAM_OFF}" not in raised(f.events)


def test_dose_after_a_fault_closure_is_amended_when_the_console_ends() -> None:
    """One unreadable reading closes the delivery (UNKNOWN); the console carries on and
    ends later. The record gets a correction with the final figures, still not NORMAL."""
    f = Feed()
    start_delivery(f)
    f.irradiate(375, step=15)  # 5 Gy
    ev = f.read(S.IRRADIATING, rate=math.nan)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert end.summary.delivered_primary_gy == pytest.approx(5.0)
    f.irradiate(1125, step=15)  # the console goes on to 20 Gy
    assert not of(f.events, DeliveryAmended), "no correction until the console ends"
    ev = f.read(S.TERMINATED, termination=TerminationStatus.NORMAL)
    (amended,) = of(ev, DeliveryAmended)
    assert amended.delivery_id == end.delivery_id
    assert amended.summary.delivered_primary_gy == pytest.approx(PRESET)
    assert amended.summary.termination is TerminationStatus.UNKNOWN
    assert "15.0000 Gy more" in amended.reason
    assert_tiles(amended.summary)
    assert not of(f.read(S.TERMINATED, termination=TerminationStatus.NORMAL), DeliveryAmended)


def test_communication_is_the_hosts_own_interlock() -> None:
    """Wire drivers report the console's nine interlocks, not the host link: a believed
    reading is communication ok (no false 'communication unknown' alarm in every
    delivery), a gap trips it, and a reading that is not believed leaves it unknown."""
    f = Feed()
    nine: dict[Interlock, InterlockState] = {
        il: st for il, st in ALL_OK.items() if il is not Interlock.COMMUNICATION
    }
    f.read(S.STANDBY, interlocks=nine)
    assert f.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.OK
    assert f.tracker.all_clear
    assert not any("communication" in key for key in raised(f.events))
    f.tick(60.0)  # readings stop: a gap
    assert f.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.TRIPPED
    f.read(S.STANDBY, interlocks=nine, rate=float("nan"))  # arrives, but not believed
    assert f.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.UNKNOWN
    f.read(S.STANDBY, interlocks=nine)
    assert f.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.OK
