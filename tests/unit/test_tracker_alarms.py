"""The alarm table: the hold-time primitive, and the alarm "kV out of range for 2 s".

The tracker's other alarms are tested through the tracker in test_tracker.py and
test_tracker_fidelity.py; here are the rules' own mechanics (a hold, a clear after a
while, a gap restarting a hold) on a table of made-up rules, and the one rule that needs
them, fed by hand and by the simulator's own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iortd.daemon.tracker import (
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    DeliveryTracker,
    Phase,
    Severity,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from iortd.daemon.tracker.alarms import AlarmBook, Clears, Finding, Rule, Situation, When
from iortd.kernel.types import DeviceState, Interlock, InterlockState, SourceReading
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import load_profile

S = DeviceState
NS = 1_000_000_000
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
ALL_OK: Mapping[Interlock, InterlockState] = dict.fromkeys(Interlock, InterlockState.OK)
KV = f"{AlarmCode.KV_OUT_OF_RANGE}"


# ---- the primitive, on a made-up table --------------------------------------------------


@dataclass
class Cond:
    """A condition the test sets by hand."""

    on: bool = False

    def __call__(self, s: Situation, _: Interlock | None) -> Finding:
        return Finding(self.on, "made-up condition")


def book_with(cond: Cond, *, hold_s: float = 0.0, clear_after_s: float = 0.0) -> AlarmBook:
    rule = Rule(
        AlarmCode.OVERDOSE,
        (Severity.HIGH,),
        When.READING,
        cond,
        Clears.WHEN_FALSE,
        hold_s=hold_s,
        clear_after_s=clear_after_s,
    )
    return AlarmBook([rule])


def judge(book: AlarmBook, t_s: float) -> list[TrackerEvent]:
    s = Situation(
        Phase.IRRADIATING,
        ALL_OK,
        None,
        None,
        TrackerSettings(stale_after_s=3.0),
        round(t_s * NS),
        T0 + timedelta(seconds=t_s),
        judging=True,
    )
    out: list[TrackerEvent] = []
    book.evaluate(s, When.READING, None, out)
    return out


def test_a_held_condition_is_raised_only_once_it_held_for_the_hold_time() -> None:
    cond = Cond(on=True)
    book = book_with(cond, hold_s=2.0)
    assert judge(book, 10.0) == []
    assert judge(book, 11.0) == []
    assert judge(book, 11.99) == []
    (ev,) = judge(book, 12.0)
    assert isinstance(ev, AlarmRaised)
    assert ev.alarm.raised_mono_ns == 12 * NS
    assert ev.alarm.message == "made-up condition (for 2.0 s)"
    assert judge(book, 13.0) == []  # standing: not raised again


def test_a_false_reading_restarts_the_hold_and_so_does_a_gap() -> None:
    cond = Cond(on=True)
    book = book_with(cond, hold_s=2.0)
    judge(book, 0.0)
    judge(book, 1.5)
    cond.on = False
    judge(book, 1.6)
    cond.on = True
    assert judge(book, 2.0) == []
    assert judge(book, 3.5) == []  # held 1.5 s since 2.0, not 3.5 s since 0.0
    book.restart_holds()  # a monitoring gap: whether it held meanwhile is unknown
    assert judge(book, 4.5) == []
    assert judge(book, 6.0) == []
    assert [type(e) for e in judge(book, 6.5)] == [AlarmRaised]


def test_a_clear_after_time_keeps_the_alarm_until_the_condition_was_false_that_long() -> None:
    cond = Cond(on=True)
    book = book_with(cond, clear_after_s=1.0)
    assert [type(e) for e in judge(book, 0.0)] == [AlarmRaised]
    cond.on = False
    assert judge(book, 0.5) == []
    cond.on = True
    assert judge(book, 0.8) == []  # true again: the clear timer starts over
    cond.on = False
    assert judge(book, 1.0) == []
    assert judge(book, 1.9) == []
    assert [type(e) for e in judge(book, 2.0)] == [AlarmCleared]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=1.5, allow_nan=False), st.booleans()),
        max_size=40,
    ),
    st.sampled_from([0.0, 0.5, 2.0]),
)
def test_the_alarm_stands_exactly_while_the_condition_has_held_for_the_hold(
    readings: list[tuple[float, bool]], hold_s: float
) -> None:
    """Against a model: after each reading the alarm stands iff the condition is true on
    this reading and on every reading back to one at least ``hold_s`` earlier, with no
    false reading between; one raise per such run, one clear when a run ends."""
    cond = Cond()
    book = book_with(cond, hold_s=hold_s)
    t, run_start = 0.0, None
    raised = cleared = 0
    for dt, on in readings:
        t += dt
        cond.on = on
        events = judge(book, t)
        raised += sum(isinstance(e, AlarmRaised) for e in events)
        cleared += sum(isinstance(e, AlarmCleared) for e in events)
        was = bool(book.standing)
        run_start = (t if run_start is None else run_start) if on else None
        # (held time in the tracker's own unit, whole nanoseconds, as judge() stamps them)
        held_s = None if run_start is None else (round(t * NS) - round(run_start * NS)) / NS
        expect = held_s is not None and held_s >= hold_s
        assert was == expect, (t, run_start)
    assert raised - cleared == int(bool(book.standing))


# ---- kV out of range for 2 s --------------------------------------------------------------


@dataclass
class Console:
    """A console at 0.5 s per reading by default, beam on from the start."""

    tracker: DeliveryTracker = field(
        default_factory=lambda: DeliveryTracker(TrackerSettings(stale_after_s=3.0))
    )
    t_s: float = 0.0
    dose: float = 0.0
    beam_on: float = 0.0
    events: list[TrackerEvent] = field(default_factory=list)

    def read(self, state: DeviceState, kv: float, dt: float = 0.5) -> list[TrackerEvent]:
        self.t_s += dt
        beam = state is S.IRRADIATING
        if beam:
            self.beam_on += dt
            self.dose += 0.8 / 60 * dt
        r = SourceReading(
            mono_ns=round(self.t_s * NS),
            utc=T0 + timedelta(seconds=self.t_s),
            state=state,
            dose_rate_gy_min=0.8 if beam else 0.0,
            dose_primary_gy=self.dose,
            dose_secondary_gy=self.dose,
            preset_gy=20.0,
            beam_on_s=self.beam_on,
            kv=kv,
            ua=40.0 if beam else 0.0,
            interlocks=ALL_OK,
            planned_time_s=1500.0,
        )
        ev = self.tracker.on_reading(r)
        self.events.extend(ev)
        return ev

    def beam_on_at(self, kv: float = 50.0) -> None:
        self.read(S.PREPARATORY, 0.0)
        self.read(S.READY, 0.0)
        self.read(S.IRRADIATING, kv)


def kv_events(events: list[TrackerEvent]) -> list[TrackerEvent]:
    return [e for e in events if isinstance(e, AlarmRaised | AlarmCleared) and e.alarm.key == KV]


def test_kv_out_of_range_for_2_s_raises_a_high_alarm_and_clears_when_kv_returns() -> None:
    c = Console()
    c.beam_on_at()
    c.read(S.IRRADIATING, 56.0)  # first reading outside 50 ± 5 kV
    for _ in range(3):
        assert kv_events(c.read(S.IRRADIATING, 56.0)) == []  # held 0.5, 1.0, 1.5 s
    (raised,) = kv_events(c.read(S.IRRADIATING, 56.0))  # held 2.0 s
    assert isinstance(raised, AlarmRaised)
    assert raised.alarm.code is AlarmCode.KV_OUT_OF_RANGE
    assert raised.alarm.severity is Severity.HIGH
    assert raised.delivery_id is not None
    assert "56.0 kV outside 50 ± 5 kV" in raised.alarm.message
    assert kv_events(c.read(S.IRRADIATING, 44.0)) == []  # still out (below): standing
    (cleared,) = kv_events(c.read(S.IRRADIATING, 50.2))
    assert isinstance(cleared, AlarmCleared)
    assert cleared.alarm == raised.alarm
    assert [a.code for a in c.tracker.alarms] == []


def test_kv_out_of_range_below_the_hold_time_never_raises() -> None:
    c = Console()
    c.beam_on_at()
    for _ in range(5):  # out 1.5 s, back for one reading, again: each return restarts it
        for _ in range(4):
            c.read(S.IRRADIATING, 58.0)
        c.read(S.IRRADIATING, 50.0)
    assert kv_events(c.events) == []


def test_a_kv_ramp_at_beam_on_and_a_beam_off_reading_of_0_kv_do_not_raise() -> None:
    c = Console()
    c.read(S.PREPARATORY, 0.0)
    for _ in range(20):  # 10 s armed with the tube off: 0 kV is not out of range
        c.read(S.READY, 0.0)
    for kv in (0.0, 8.0, 20.0, 33.0, 44.0, 49.0, 50.0):  # a 1.4 s ramp at beam on
        c.read(S.IRRADIATING, kv, dt=0.2)
    for _ in range(10):
        c.read(S.IRRADIATING, 50.1)
    for _ in range(10):  # interrupted: the tube is off
        c.read(S.INTERRUPTED, 0.0)
    assert kv_events(c.events) == []


def test_the_kv_alarm_clears_when_the_beam_goes_off_and_a_gap_restarts_its_hold() -> None:
    c = Console()
    c.beam_on_at()
    for _ in range(5):
        c.read(S.IRRADIATING, 60.0)
    assert [type(e) for e in kv_events(c.events)] == [AlarmRaised]
    (cleared,) = kv_events(c.read(S.INTERRUPTED, 0.0))
    assert isinstance(cleared, AlarmCleared)
    c.read(S.IRRADIATING, 60.0)
    c.read(S.IRRADIATING, 60.0)
    c.read(S.IRRADIATING, 60.0)  # held 1.0 s
    c.t_s += 4.0
    c.tracker.on_tick(round(c.t_s * NS), T0 + timedelta(seconds=c.t_s))  # stale: a gap
    assert c.tracker.in_gap
    for _ in range(4):  # 1.5 s after the gap: the 1.0 s before it does not count
        assert kv_events(c.read(S.IRRADIATING, 60.0)) == []
    assert [type(e) for e in kv_events(c.read(S.IRRADIATING, 60.0))] == [AlarmRaised]


def test_the_kv_band_and_nominal_are_settings() -> None:
    c = Console(
        tracker=DeliveryTracker(
            TrackerSettings(stale_after_s=3.0, nominal_kv=40.0, kv_tolerance_kv=1.0)
        )
    )
    c.beam_on_at(kv=40.0)
    for _ in range(5):
        c.read(S.IRRADIATING, 41.5)
    (raised,) = kv_events(c.events)
    assert "41.5 kV outside 40 ± 1 kV" in raised.alarm.message  # type: ignore[union-attr]


@pytest.mark.parametrize(("profile", "applicator"), [("intrabeam", "SPH15"), ("axxent", "BAL34")])
def test_the_simulators_normal_runs_never_trip_the_kv_alarm(profile: str, applicator: str) -> None:
    """The model's kV at beam on and through a whole delivery (with a pause) stays inside
    the default band: its own read-back noise is 0.2 % of nominal, and its own kV
    interlock trips at 5 %, before the monitor's 10 % band."""
    model = SourceModel(load_profile(profile), seed=7)
    tracker = DeliveryTracker(TrackerSettings(stale_after_s=3.0))
    events: list[TrackerEvent] = []
    t = 0.0

    def step(dt: float) -> None:
        nonlocal t
        model.process(dt)
        t += dt
        snap = model.snapshot()
        r = SourceReading(
            mono_ns=round(t * NS),
            utc=T0 + timedelta(seconds=t),
            state=snap.state,
            dose_rate_gy_min=snap.dose_rate_gy_min,
            dose_primary_gy=snap.dose_primary_gy,
            dose_secondary_gy=snap.dose_secondary_gy,
            preset_gy=snap.preset_gy,
            beam_on_s=snap.beam_on_s,
            kv=snap.kv,
            ua=snap.ua,
            interlocks=snap.interlocks,
            termination=snap.termination,
            simulated=True,
        )
        events.extend(tracker.on_reading(r))

    model.power_on()
    step(model.profile.self_test_s)
    model.attach_applicator(applicator)
    model.load_plan(20.0, applicator)
    step(0.1)
    model.arm()
    step(0.1)
    model.start_beam()
    for _ in range(100):  # the first 10 s at 10 Hz
        step(0.1)
    model.pause()
    step(1.0)
    model.resume()
    while model.state is S.IRRADIATING:
        step(0.1 if model.snapshot().beam_on_s < 20 else 2.0)
    step(0.1)
    assert model.state is S.TERMINATED
    assert kv_events(events) == []
    assert not any(isinstance(e, AlarmRaised) and e.alarm.severity is Severity.HIGH for e in events)


def test_a_band_wider_than_nominal_is_how_a_site_does_without_kv() -> None:
    """docs/alarms.md: a console that does not report kV reads 0 kV; the site that accepts
    that sets the band above nominal, explicitly and on the record."""
    c = Console(tracker=DeliveryTracker(TrackerSettings(stale_after_s=3.0, kv_tolerance_kv=60.0)))
    c.beam_on_at(kv=0.0)
    for _ in range(10):
        c.read(S.IRRADIATING, 0.0)
    assert kv_events(c.events) == []


# ---- verification before beam-on (issue 18): raised by the service's checks -------------


def _entry(c: Console, outcome: str) -> dict[str, object]:
    snap = c.tracker.snapshot()
    assert snap is not None
    reasons = [] if outcome != "NOT_VERIFIED" else ["dose"]
    return {"delivery_id": snap.delivery_id, "outcome": outcome, "reasons": reasons,
            "trigger": "ready"}  # fmt: skip


def _rx_alarms(events: list[TrackerEvent]) -> list[AlarmRaised | AlarmCleared]:
    codes = (AlarmCode.PRESCRIPTION_NOT_VERIFIED, AlarmCode.NO_PRESCRIPTION)
    return [
        e for e in events if isinstance(e, AlarmRaised | AlarmCleared) and e.alarm.code in codes
    ]


def test_not_verified_raises_high_a_later_verified_check_clears_it_and_snapshot_has_it() -> None:
    c = Console()
    c.read(S.PREPARATORY, 0.0)
    c.read(S.READY, 0.0)
    public = {"outcome": "NOT_VERIFIED"}
    ev = c.tracker.on_verification(_entry(c, "NOT_VERIFIED"), public, 1, T0)
    (raised,) = _rx_alarms(ev)
    assert isinstance(raised, AlarmRaised)
    assert raised.alarm.severity is Severity.HIGH
    assert "dose" in raised.alarm.message
    snap = c.tracker.snapshot()
    assert snap is not None
    assert snap.verification == public
    (cleared,) = _rx_alarms(c.tracker.on_verification(_entry(c, "VERIFIED_OVR"), {}, 2, T0))
    assert isinstance(cleared, AlarmCleared)


def test_the_two_verification_alarms_stand_until_the_delivery_ends() -> None:
    c = Console()
    c.beam_on_at()
    c.tracker.on_verification(_entry(c, "NOT_VERIFIED"), {}, 1, T0)
    (raised,) = _rx_alarms(c.tracker.on_no_prescription(2, T0))
    assert raised.alarm.code is AlarmCode.NO_PRESCRIPTION
    c.read(S.IRRADIATING, 50.0)
    assert len(_rx_alarms(c.tracker.on_no_prescription(3, T0))) == 0  # already standing
    ended = c.read(S.TERMINATED, 0.0)
    cleared = _rx_alarms(ended)
    assert {e.alarm.code for e in cleared} == {
        AlarmCode.PRESCRIPTION_NOT_VERIFIED,
        AlarmCode.NO_PRESCRIPTION,
    }
    # Cleared before the end entry: they belong to the delivery.
    end = next(i for i, e in enumerate(ended) if isinstance(e, Terminated))
    assert all(ended.index(e) < end for e in cleared)
