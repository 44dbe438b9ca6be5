"""The applicator's rules in the tracker (issue 16): readings of the reader and stand
beside the source's, the monitor's own applicator interlock, the movement alarms, a
re-lock, a frozen heartbeat and a lost reader (a gap of that device only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from iortd.daemon.entries import applicator_sample_entry
from iortd.daemon.sinks import ApplicatorSample
from iortd.daemon.tracker import (
    NS,
    Alarm,
    AlarmCleared,
    AlarmRaised,
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeliveryTracker,
    DeviceGapEnded,
    DeviceGapStarted,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    Phase,
    ResumedDelivery,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from iortd.kernel.types import (
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    Tristate,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = DeviceState
OK = dict.fromkeys(Interlock, InterlockState.OK)
SPH30 = ApplicatorIdentity("spherical", 30.0, "SIM-SPH30")
RATE = 0.8  # Gy/min
READER = "reader-1"


@dataclass
class Room:
    """A console and a reader, one second apart per step (the reader just after)."""

    tracker: DeliveryTracker = field(
        default_factory=lambda: DeliveryTracker(
            TrackerSettings(
                stale_after_s=3.0,
                rate_settle_s=5.0,
                applicator_displacement_mm=2.0,
                applicator_tilt_deg=2.0,
            ),
            applicators=(READER,),
        )
    )
    t_s: float = 0.0
    dose: float = 0.0
    beam_on: float = 0.0
    heartbeat: int = 0
    lock: int = 1
    events: list[TrackerEvent] = field(default_factory=list)

    def utc(self) -> datetime:
        return T0 + timedelta(seconds=self.t_s)

    def source(
        self, state: DeviceState, applicator: ApplicatorIdentity | None = SPH30
    ) -> list[TrackerEvent]:
        self.t_s += 1.0
        if state is S.IRRADIATING:
            self.beam_on += 1.0
            self.dose += RATE / 60
        r = SourceReading(
            mono_ns=round(self.t_s * NS),
            utc=self.utc(),
            state=state,
            dose_rate_gy_min=RATE if state is S.IRRADIATING else 0.0,
            dose_primary_gy=self.dose,
            dose_secondary_gy=self.dose,
            preset_gy=1.0,
            beam_on_s=self.beam_on,
            kv=50.0 if state is S.IRRADIATING else 0.0,
            ua=40.0 if state is S.IRRADIATING else 0.0,
            interlocks=OK,
            planned_time_s=75.0,
            applicator=applicator,
            simulated=True,
        )
        ev = self.tracker.on_reading(r)
        self.events += ev
        return ev

    def reader(
        self,
        d: tuple[float, float, float] = (0.0, 0.0, 0.0),
        *,
        tilt: float = 0.0,
        applicator: ApplicatorIdentity | None = SPH30,
        brakes: Tristate = Tristate.YES,
        seated: Tristate = Tristate.YES,
        frozen: bool = False,
    ) -> list[TrackerEvent]:
        self.t_s += 0.01
        if not frozen:
            self.heartbeat += 1
        r = ApplicatorReading(
            mono_ns=round(self.t_s * NS),
            utc=self.utc(),
            applicator=applicator,
            simulated=True,
            state=ApplicatorState.READY,
            seated=seated,
            source_locked=Tristate.YES,
            brakes_engaged=brakes,
            uses_left=10,
            seat_counter=1,
            lock_counter=self.lock,
            heartbeat=self.heartbeat,
            displacement_mm=d,
            displacement_magnitude_mm=sum(c * c for c in d) ** 0.5,
            tilt_deg=tilt,
        )
        ev = self.tracker.on_applicator(READER, r)
        self.events += ev
        return ev

    def to_beam(self) -> None:
        for st in (S.STANDBY, S.PREPARATORY, S.READY):
            self.source(st)
            self.reader()
        self.source(S.IRRADIATING)
        self.reader()


def raised(events: list[TrackerEvent]) -> dict[str, AlarmRaised]:
    return {e.alarm.key: e for e in events if isinstance(e, AlarmRaised)}


def cleared(events: list[TrackerEvent]) -> set[str]:
    return {e.alarm.key for e in events if isinstance(e, AlarmCleared)}


def monitor(events: list[TrackerEvent]) -> list[InterlockState]:
    return [e.new for e in events if isinstance(e, MonitorInterlockChanged)]


def test_a_clean_delivery_raises_nothing_and_the_monitor_interlock_is_ok() -> None:
    room = Room()
    room.reader()
    room.to_beam()
    for _ in range(5):
        room.source(S.IRRADIATING)
        room.reader((0.1, 0.0, 0.0))
    assert not raised(room.events)
    assert room.tracker.monitor_interlocks == {Interlock.APPLICATOR: InterlockState.OK}
    # The console's own applicator interlock is the console's: untouched by the monitor.
    assert room.tracker.interlocks[Interlock.APPLICATOR] is InterlockState.OK


def test_displacement_beyond_tolerance_with_the_beam_on_is_high_with_magnitude_and_start() -> None:
    room = Room()
    room.to_beam()
    room.source(S.IRRADIATING)
    assert not raised(room.reader((1.0, 0.0, 0.0)))
    ev = room.reader((2.5, 0.0, 0.0))
    alarm = raised(ev)["applicator_displaced"].alarm
    assert alarm.severity.value == "high"
    assert "2.50 mm" in alarm.message
    assert alarm.raised_utc == room.utc()
    # Back within tolerance: cleared.
    assert "applicator_displaced" in cleared(room.reader((1.0, 0.0, 0.0)))


def test_displacement_with_the_beam_off_is_not_an_alarm() -> None:
    room = Room()
    room.reader()
    room.source(S.STANDBY)
    room.source(S.PREPARATORY)
    room.source(S.READY)
    assert not raised(room.reader((5.0, 0.0, 0.0), tilt=5.0))


def test_tilt_beyond_tolerance_with_the_beam_on_is_high() -> None:
    room = Room()
    room.to_beam()
    assert "applicator_tilted" in raised(room.reader(tilt=2.5))


def test_displacement_from_beam_on_and_a_relock_never_resets_the_peak() -> None:
    room = Room()
    room.reader((0.5, 0.0, 0.0))
    for st in (S.STANDBY, S.PREPARATORY, S.READY):
        room.source(st)
    room.source(S.IRRADIATING)
    room.reader((0.5, 0.0, 0.0))  # the position at beam-on
    room.reader((1.5, 0.0, 0.0))
    view = room.tracker.applicator_view
    assert view is not None
    assert view.displacement_from_beam_on_mm == 1.0
    assert view.peak_displacement_mm == 1.5
    room.lock += 1  # the stand re-locked where it is: its displacement starts at 0 again
    ev = room.reader((0.0, 0.0, 0.0))
    assert [e.device for e in ev if isinstance(e, ApplicatorRelocked)] == [READER]
    room.reader((0.2, 0.0, 0.0))
    view = room.tracker.applicator_view
    assert view is not None
    assert view.peak_displacement_mm == 1.5
    # From beam-on, the re-lock's reference is carried over: 1.5 + 0.2 - 0.5.
    assert abs((view.displacement_from_beam_on_mm or 0) - 1.2) < 1e-9


def test_identity_mismatch_trips_the_monitor_interlock_and_is_high() -> None:
    room = Room()
    room.to_beam()
    other = ApplicatorIdentity("spherical", 40.0, "SIM-SPH40")
    ev = room.reader(applicator=other)
    assert "applicator_mismatch" in raised(ev)
    assert raised(ev)["applicator_mismatch"].alarm.severity.value == "high"
    assert monitor(ev) == [InterlockState.TRIPPED]
    assert room.tracker.interlocks[Interlock.APPLICATOR] is InterlockState.OK
    ev = room.reader()
    assert "applicator_mismatch" in cleared(ev)
    assert monitor(ev) == [InterlockState.OK]


def test_brakes_released_or_unseated_with_the_beam_on_trip_the_monitor_interlock() -> None:
    for kw in ({"brakes": Tristate.NO}, {"seated": Tristate.NO}, {"brakes": Tristate.UNKNOWN}):
        room = Room()
        room.to_beam()
        ev = room.reader(**kw)  # type: ignore[arg-type]
        assert monitor(ev) == [InterlockState.TRIPPED], kw
        alarm = raised(ev)["monitor_interlock:applicator"].alarm
        assert alarm.severity.value == "high"


def test_brakes_released_with_the_beam_off_is_no_trip() -> None:
    room = Room()
    room.reader()
    room.source(S.STANDBY)
    assert monitor(room.reader(brakes=Tristate.NO)) == []


def test_a_frozen_heartbeat_is_a_stale_reader() -> None:
    room = Room()
    room.to_beam()
    for _ in range(5):
        assert monitor(room.reader(frozen=True)) == []
    ev = room.reader(frozen=True)
    assert monitor(ev) == [InterlockState.UNKNOWN]
    assert "monitor_interlock:applicator" in raised(ev)
    assert monitor(room.reader()) == [InterlockState.OK]


def test_reader_link_lost_is_a_gap_of_that_device_only_and_dose_goes_on() -> None:
    room = Room()
    room.to_beam()
    room.source(S.IRRADIATING)
    ev = room.tracker.on_applicator_lost(READER, round(room.t_s * NS), room.utc(), "timeout")
    room.events += ev
    assert [e.device for e in ev if isinstance(e, DeviceGapStarted)] == [READER]
    assert not [e for e in ev if isinstance(e, MonitoringGapStarted)]
    assert monitor(ev) == [InterlockState.UNKNOWN]
    assert raised(ev)["monitor_interlock:applicator"].alarm.severity.value == "high"
    before = room.dose
    for _ in range(10):
        room.source(S.IRRADIATING)
    snap = room.tracker.snapshot()
    assert snap is not None
    assert not snap.gaps
    assert abs(snap.delivered_primary_gy - room.dose) < 1e-12
    assert room.dose > before
    assert room.tracker.interlocks[Interlock.COMMUNICATION] is InterlockState.OK
    view = room.tracker.applicator_view
    assert view is not None
    assert view.reading is None
    ev = room.reader()
    assert [e.device for e in ev if isinstance(e, DeviceGapEnded)] == [READER]
    assert monitor(ev) == [InterlockState.OK]


def test_a_delivery_taken_over_after_a_restart_has_no_new_beam_on_reference() -> None:
    """After a restart mid-beam, where the applicator was at beam-on is in the earlier
    run's record, not in this one: displacement since beam-on stays unknown (no second
    applicator_at_beam_on for the same delivery); the displacement from the lock goes on."""
    room = Room()
    rd = ResumedDelivery(
        delivery_id="D-20260101T000000000000Z",
        started_utc=T0,
        phase=Phase.IRRADIATING,
        preset_gy=1.0,
        primary_gy=0.2,
        secondary_gy=0.2,
        beam_on_s=15.0,
        elapsed_s=16.0,
        selection=None,
        simulated=True,
        unwatched_since_utc=T0,
        cause="daemon not running (crash stop)",
    )
    room.t_s = 20.0
    room.beam_on, room.dose = 15.0, 0.2
    room.events += room.tracker.resume(rd, round(room.t_s * NS), room.utc())
    room.reader((0.5, 0.0, 0.0))
    room.source(S.IRRADIATING)
    room.reader((0.6, 0.0, 0.0))
    assert not [e for e in room.events if isinstance(e, ApplicatorAtBeamOn)]
    view = room.tracker.applicator_view
    assert view is not None
    assert view.displacement_from_beam_on_mm is None
    assert view.displacement_mm == 0.6


def test_a_reading_that_cannot_be_believed_makes_the_reader_unknown() -> None:
    """A non-finite displacement, or a reading stamped before the last one: its values are
    not believed (never read as in place), the monitor's interlock is unknown."""
    room = Room()
    room.to_beam()
    ev = room.reader((math.nan, 0.0, 0.0))
    assert monitor(ev) == [InterlockState.UNKNOWN]
    assert "applicator_displaced" not in raised(ev)
    assert monitor(room.reader()) == [InterlockState.OK]
    room.t_s -= 1.0  # the next reading is stamped before the last
    assert monitor(room.reader()) == [InterlockState.UNKNOWN]


def test_the_record_of_a_reader_sample_carries_what_the_daemon_derived() -> None:
    r = ApplicatorReading(
        mono_ns=NS,
        utc=T0,
        applicator=SPH30,
        simulated=True,
        state=ApplicatorState.READY,
        seated=Tristate.YES,
        displacement_mm=(math.inf, 0.0, 0.0),
        tilt_deg=0.1,
    )
    sample = ApplicatorSample(READER, r, "D-1", 0.4, 1.2)
    kind, data, did = applicator_sample_entry(
        sample, {Interlock.APPLICATOR: InterlockState.UNKNOWN}
    )
    assert (kind, did) == ("applicator_sample", "D-1")
    assert data["displacement_mm"] == ["inf", 0.0, 0.0]  # kept as the device said it
    assert data["displacement_from_beam_on_mm"] == 0.4
    assert data["peak_displacement_mm"] == 1.2
    assert data["monitor_interlocks"] == {"applicator": "unknown"}
    assert data["applicator"] == {"type": "spherical", "diameter_mm": 30.0, "serial": "SIM-SPH30"}
    assert (data["seated"], data["brakes_engaged"]) == ("yes", "unknown")


def _first_reading_room(grace_s: float | None) -> Room:
    settings = TrackerSettings(
        stale_after_s=3.0,
        rate_settle_s=5.0,
        applicator_displacement_mm=2.0,
        applicator_tilt_deg=2.0,
        applicator_first_reading_s=grace_s,
    )
    return Room(tracker=DeliveryTracker(settings, applicators=(READER,)))


def _monitor_alarms(room: Room) -> list[Alarm]:
    return [
        e.alarm
        for e in room.events
        if isinstance(e, AlarmRaised) and e.alarm.code == "monitor_interlock"
    ]


def test_a_reader_not_yet_read_at_start_has_a_bounded_grace_with_the_beam_off() -> None:
    # The daemon starts with a delivery already selected on the console: the source's
    # first reading comes before the reader's. Within the grace that is no alarm (the
    # interlock is still recorded unknown); its first reading then makes it ok.
    room = _first_reading_room(grace_s=2.5)
    room.source(S.PREPARATORY)
    room.source(S.READY)
    assert room.tracker.monitor_interlocks[Interlock.APPLICATOR] is InterlockState.UNKNOWN
    room.reader()
    assert _monitor_alarms(room) == []
    assert room.tracker.monitor_interlocks[Interlock.APPLICATOR] is InterlockState.OK


def test_the_first_reading_grace_is_bounded() -> None:
    room = _first_reading_room(grace_s=2.5)
    room.source(S.PREPARATORY)
    room.source(S.READY)
    assert _monitor_alarms(room) == []
    room.source(S.READY)  # 2 s after the first input: still within
    assert _monitor_alarms(room) == []
    room.source(S.READY)  # 3 s: past the grace, the reader still never read
    [alarm] = _monitor_alarms(room)
    assert alarm.message.endswith("no reading from the reader yet")


def test_the_first_reading_grace_never_holds_an_alarm_with_the_beam_on() -> None:
    room = _first_reading_room(grace_s=60.0)
    room.source(S.READY)
    room.source(S.IRRADIATING)
    [alarm] = _monitor_alarms(room)
    assert alarm.severity == "high"


def test_the_first_reading_grace_is_only_for_the_first_reading() -> None:
    # A lost link before any reading is a fault now, not a late start.
    room = _first_reading_room(grace_s=60.0)
    room.source(S.READY)
    room.events += room.tracker.on_applicator_lost(
        READER, round((room.t_s + 0.01) * NS), room.utc(), "connection refused"
    )
    assert [a.message for a in _monitor_alarms(room)] != []
    # And a reader that has been read and then goes unknown alarms at once.
    room = _first_reading_room(grace_s=60.0)
    room.source(S.READY)
    room.reader()
    room.reader(frozen=True)
    for _ in range(7):
        room.reader(frozen=True)
    room.source(S.READY)
    assert any("values frozen" in a.message for a in _monitor_alarms(room))


def test_without_a_grace_the_not_yet_read_reader_alarms_at_once() -> None:
    room = _first_reading_room(grace_s=None)
    room.source(S.READY)
    assert len(_monitor_alarms(room)) == 1


def test_a_reader_input_after_a_delivery_ended_names_no_delivery() -> None:
    # Nothing names a delivery after its end entry: the reader's next input (a reading, or
    # its link lost) belongs to no delivery, and the rules judge no closed one.
    room = Room()
    room.to_beam()
    room.source(S.TERMINATED)
    [end] = [e for e in room.events if isinstance(e, Terminated)]
    before = len(room.events)
    room.reader(applicator=ApplicatorIdentity("flat", 40.0, "OTHER"))
    room.events += room.tracker.on_applicator_lost(
        READER, round((room.t_s + 0.01) * NS), room.utc(), "cable pulled"
    )
    after = room.events[before:]
    assert after, "the swap and the loss are still events"
    named = [e for e in after if getattr(e, "delivery_id", None) == end.delivery_id]
    assert named == [], named
