"""The tracker against the console across gaps, ends, restarts and slow replies (issue 14),
fed by hand; and the property that ties them together (hypothesis)."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tracker import ALL_OK, PLANNED_S, PRESET, RATE, T0, Feed, of, raised, start_delivery

from iortd.daemon.console import ConsoleView
from iortd.daemon.mqtt.payloads import Envelope, telemetry_payload
from iortd.daemon.sinks import Sample
from iortd.daemon.tracker import (
    AlarmCode,
    AlarmRaised,
    DeliveryStarted,
    DeliveryTracker,
    Phase,
    ResumedDelivery,
    Terminated,
    TrackerEvent,
    TrackerSettings,
)
from iortd.kernel.types import DeviceState, SourceReading, TerminationStatus

S = DeviceState
NS = 1_000_000_000


def test_a_pause_inside_a_gap_is_not_beam_on_and_a_normal_end_stays_normal() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(1400, step=10.0)
    f.tick(5.0)  # stale: a gap opens
    assert f.tracker.in_gap
    # 400 s unseen, of which the beam ran 50 s (a 350 s pause inside the gap).
    f.t_s += 395.0
    f.beam_on += 50.0
    f.read(S.IRRADIATING, dt=0.0, dose=RATE / 60 * 50)
    f.irradiate(50, step=10.0)
    ev = f.read(S.TERMINATED, termination=TerminationStatus.NORMAL, reason="preset reached")
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.NORMAL, end.reason
    assert f"{AlarmCode.BACKUP_TIMER_EXCEEDED}" not in raised(f.events)
    assert f"{AlarmCode.CONTRADICTORY_INPUT}" not in raised(f.events)
    assert end.summary.beam_on_s == pytest.approx(PLANNED_S)
    assert f.tracker.phase is Phase.TERMINATED


def test_an_end_inside_a_gap_is_bounded_by_it_and_says_so() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(1480, step=10.0)
    gap_start_s = f.t_s
    f.tick(5.0)
    # The console ran 20 s more and ended; seen 300 s after the gap began.
    f.t_s = gap_start_s + 299.0
    f.beam_on += 20.0
    ev = f.read(
        S.TERMINATED, dose=RATE / 60 * 20, termination=TerminationStatus.NORMAL, reason="normal"
    )
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.NORMAL
    assert "inside a monitoring gap" in end.reason
    s = end.summary
    # first beam came 10 s (the console's timer at the first reading) before it was seen
    assert s.elapsed_s == pytest.approx(PLANNED_S, abs=1e-6)
    assert s.elapsed_s < gap_start_s + 300.0
    assert s.elapsed_s >= s.beam_on_s


def test_nothing_after_the_end_is_filed_under_the_delivery() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(PLANNED_S, step=10.0)
    f.read(S.TERMINATED, termination=TerminationStatus.NORMAL, reason="preset reached")
    end_at = next(i for i, e in enumerate(f.events) if isinstance(e, Terminated))
    f.read(S.TERMINATED, termination=TerminationStatus.NORMAL)
    f.tick(5.0)  # a gap after the end
    f.read(S.STANDBY)
    after = f.events[end_at + 1 :]
    assert after, "events happened after the end"
    named = [e for e in after if getattr(e, "delivery_id", None) is not None]
    assert named == []
    snap = f.tracker.snapshot()
    assert snap is not None
    assert snap.gaps == ()


def test_the_alarms_judged_on_the_ending_reading_come_before_the_end() -> None:
    f = Feed(tracker=DeliveryTracker(TrackerSettings(stale_after_s=3.0, rate_settle_s=5.0)))
    start_delivery(f)
    f.irradiate(100, step=10.0)
    ev = f.read(
        S.TERMINATED,
        dose=0.0,
        secondary=0.5,
        termination=TerminationStatus.MACHINE,
        reason="dose_channels",
    )
    (end,) = of(ev, Terminated)
    i = ev.index(end)
    assert ev[i:] == [end], "the end entry is the last of its reading"
    judged = [e for e in ev[:i] if isinstance(e, AlarmRaised)]
    assert any(e.alarm.code is AlarmCode.DOSE_CHANNEL_DISAGREEMENT for e in judged)
    assert all(e.delivery_id == end.delivery_id for e in judged)


def test_staleness_counts_from_the_devices_last_reply() -> None:
    f = Feed()
    start_delivery(f)
    last = f.mono
    # The driver is still assembling the next reading: the device replied 2.5 s later.
    f.tracker.on_device_heard(last + round(2.5 * NS))
    assert f.tick(3.5) == [], "heard 1 s ago: not stale"
    stale_at = f.tracker.stale_at_ns()
    assert stale_at == last + round(5.5 * NS)
    ev = f.tick(2.1)
    assert any(isinstance(e, AlarmRaised) and e.alarm.code is AlarmCode.STALE_DATA for e in ev), (
        "stale once nothing was heard for the bound"
    )


def test_elapsed_is_never_shorter_than_beam_on_on_any_display() -> None:
    """The console's timer runs 1 % fast and the beam came on between two polls; every
    sample, MQTT telemetry message and console line shows elapsed >= beam-on."""
    f = Feed()
    start_delivery(f)
    out = io.StringIO()
    view = ConsoleView(out, live=False)
    seq = itertools.count()
    checked = 0

    def show(r: SourceReading) -> None:
        nonlocal checked
        snap = f.tracker.snapshot(r.mono_ns)
        assert snap is not None
        assert snap.elapsed_s >= snap.beam_on_s
        sample = Sample("console", r, snap, dict(f.tracker.interlocks), f.tracker.all_clear)
        env = Envelope(next(seq), 1, "2026-11-26T10:00:00.000000Z")
        p = telemetry_payload(env, sample)
        assert p["elapsed_s"] >= p["beam_on_s"], p
        asyncio.run(view.sample(sample))
        checked += 1

    beam = 0.4  # on for 0.4 s before the first poll saw it
    for n in range(200):
        beam += 1.0 * 1.01 if n else 0.0
        r = reading(f, S.IRRADIATING, beam_on=beam, dose=beam * RATE / 60)
        f.tracker.on_reading(r)
        show(r)
    assert checked == 200
    for line in out.getvalue().splitlines():
        m = re.search(r"beam-on (\d+):(\d+)\s+elapsed (\d+):(\d+)", line)
        assert m, line
        b = int(m[1]) * 60 + int(m[2])
        e = int(m[3]) * 60 + int(m[4])
        assert e >= b, line


def reading(
    f: Feed,
    state: DeviceState,
    *,
    beam_on: float,
    dose: float,
    dt: float = 1.0,
    selection: int | None = None,
    preset: float = PRESET,
    termination: TerminationStatus | None = None,
) -> SourceReading:
    f.t_s += dt
    return SourceReading(
        mono_ns=f.mono,
        utc=f.utc,
        state=state,
        dose_rate_gy_min=RATE if state is S.IRRADIATING else 0.0,
        dose_primary_gy=dose,
        dose_secondary_gy=dose,
        preset_gy=preset,
        beam_on_s=beam_on,
        kv=50.0,
        ua=40.0,
        interlocks=ALL_OK,
        planned_time_s=PLANNED_S,
        termination=termination,
        simulated=True,
        selection=selection,
    )


# ---- restarts ----------------------------------------------------------------------------


def resumed(
    *, selection: int | None = 3, dose: float = 5.0, phase: Phase = Phase.IRRADIATING
) -> ResumedDelivery:
    return ResumedDelivery(
        delivery_id="or-1-20261126T095000000000Z",
        started_utc=T0 - timedelta(minutes=10),
        phase=phase,
        preset_gy=PRESET,
        primary_gy=dose,
        secondary_gy=dose,
        beam_on_s=dose / RATE * 60,
        elapsed_s=dose / RATE * 60 + 5,
        selection=selection,
        simulated=True,
        unwatched_since_utc=T0 - timedelta(seconds=30),
        cause="daemon not running (crash stop)",
    )


def restarted(rd: ResumedDelivery) -> tuple[Feed, list[TrackerEvent]]:
    f = Feed()
    ev = f.tracker.resume(rd, f.mono + 100 * NS, T0)
    f.t_s = 100.0
    f.events.extend(ev)
    return f, ev


def test_a_restart_continues_the_same_selection_as_one_record() -> None:
    rd = resumed()
    f, _ev = restarted(rd)
    assert f.tracker.in_gap
    snap = f.tracker.snapshot()
    assert snap is not None
    assert snap.delivery_id == rd.delivery_id
    assert snap.termination is None
    beam = rd.beam_on_s + 30  # the console went on for 30 s meanwhile
    dose = rd.primary_gy + RATE / 60 * 30
    f.events += f.tracker.on_reading(
        reading(f, S.IRRADIATING, beam_on=beam, dose=dose, selection=3)
    )
    while dose < PRESET:
        beam, dose = beam + 10, min(dose + RATE / 6, PRESET)
        f.events += f.tracker.on_reading(
            reading(f, S.IRRADIATING, beam_on=beam, dose=dose, dt=10, selection=3)
        )
    f.events += f.tracker.on_reading(
        reading(
            f,
            S.TERMINATED,
            beam_on=beam,
            dose=dose,
            termination=TerminationStatus.NORMAL,
            selection=3,
        )
    )
    assert of(f.events, DeliveryStarted) == []
    (end,) = of(f.events, Terminated)
    assert end.delivery_id == rd.delivery_id
    assert end.status is TerminationStatus.NORMAL, end.reason
    kinds = [s.kind for s in end.summary.segments]
    assert kinds[:3] == ["before_restart", "unmonitored", "beam"]
    assert sum(s.end_gy - s.start_gy for s in end.summary.segments) == pytest.approx(PRESET)
    assert [g.cause for g in end.summary.gaps] == [rd.cause]


@pytest.mark.parametrize(
    ("rd_sel", "r_sel", "r_state", "r_dose", "verdict"),
    [
        (3, 4, S.IRRADIATING, 6.0, "new"),  # the counter changed
        (3, None, S.IRRADIATING, 6.0, "unsure"),  # known on one side only
        (None, 3, S.IRRADIATING, 6.0, "unsure"),
        (None, None, S.IRRADIATING, 6.0, "same"),  # fallback: counts not reset
        (None, None, S.IRRADIATING, 1.0, "new"),  # counts reset
        (3, 3, S.STANDBY, 6.0, "new"),  # the console left the selection
    ],
)
def test_a_restart_decides_by_the_first_reading(
    rd_sel: int | None, r_sel: int | None, r_state: DeviceState, r_dose: float, verdict: str
) -> None:
    rd = resumed(selection=rd_sel)
    f, _ = restarted(rd)
    beam = r_dose / RATE * 60
    f.events += f.tracker.on_reading(
        reading(f, r_state, beam_on=beam, dose=r_dose, selection=r_sel)
    )
    ends = of(f.events, Terminated)
    starts = of(f.events, DeliveryStarted)
    if verdict == "same":
        assert ends == []
        assert starts == []
        return
    (end,) = ends
    assert end.delivery_id == rd.delivery_id
    assert end.status is TerminationStatus.UNKNOWN
    assert "daemon was not running" in end.reason
    if r_state is S.STANDBY:
        assert starts == []
        return
    (start,) = starts
    if verdict == "unsure":
        assert start.continues == rd.delivery_id
        assert start.continues_reason
        seg = f.tracker.snapshot()
        assert seg is not None
        # the dose the earlier record holds is not counted again in the new one
        assert seg.segments[0].kind == "in_previous_record"
        assert seg.segments[0].end_gy == rd.primary_gy
    else:
        assert start.continues is None


def test_a_console_that_never_comes_back_leaves_the_delivery_open_in_a_gap() -> None:
    rd = resumed()
    f, _ = restarted(rd)
    f.events += f.tracker.on_tick(f.mono + 3600 * NS, T0 + timedelta(hours=1))
    snap = f.tracker.snapshot()
    assert snap is not None
    assert snap.termination is None
    assert f.tracker.in_gap
    assert snap.gaps[-1].end_mono_ns is None


# ---- the property --------------------------------------------------------------------------

_ORDER = {
    TerminationStatus.NORMAL: 0,
    TerminationStatus.OPERATOR: 1,
    TerminationStatus.MACHINE: 2,
    TerminationStatus.UNKNOWN: 3,
}


@dataclass
class Console:
    """A console delivering one selection (counter 7): beam on, pauses, then an end."""

    t: float = 0.0
    beam: float = 0.0
    dose: float = 0.0
    counter: int | None = 7
    readings: list[SourceReading] = field(default_factory=list)

    def at(self, state: DeviceState, term: TerminationStatus | None = None) -> SourceReading:
        return SourceReading(
            mono_ns=round(self.t * NS),
            utc=T0 + timedelta(seconds=self.t),
            state=state,
            dose_rate_gy_min=RATE if state is S.IRRADIATING else 0.0,
            dose_primary_gy=self.dose,
            dose_secondary_gy=self.dose,
            preset_gy=PRESET,
            beam_on_s=self.beam,
            kv=50.0,
            ua=40.0,
            interlocks=ALL_OK,
            planned_time_s=PLANNED_S,
            termination=term,
            simulated=True,
            selection=self.counter,
        )


steps = st.lists(
    st.tuples(
        st.sampled_from(["beam", "beam", "beam", "pause", "gap", "restart"]),
        st.floats(min_value=1.0, max_value=400.0),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=steps,
    end=st.sampled_from(list(TerminationStatus)),
    counter=st.sampled_from([7, None]),
)
def test_status_never_worse_than_the_consoles_and_dose_counted_once(
    plan: list[tuple[str, float]], end: TerminationStatus, counter: int | None
) -> None:
    """Readings every 10 s (the console's own timer exact); gaps hide stretches of it
    (with the beam going on or paused inside); restarts hand the open delivery to a new
    tracker from what the last sample recorded. The recorded status is never worse than
    the console's, and the records of the treatment hold its dose once. With a selection
    counter the treatment is one record; without one (the fallback), a restart before any
    dose may split it into records linked by ``continues``, the earlier closed UNKNOWN with
    no dose of their own (docs/audit-log.md)."""
    st_ = TrackerSettings(stale_after_s=30.0, rate_settle_s=5.0)
    c = Console(counter=counter)
    tracker = DeliveryTracker(st_)
    events: list[TrackerEvent] = []
    last_snap = None

    def feed(r: SourceReading) -> None:
        nonlocal last_snap
        events.extend(tracker.on_reading(r))
        last_snap = tracker.snapshot(r.mono_ns)

    for state in (S.STANDBY, S.PREPARATORY, S.READY):
        c.t += 1
        feed(c.at(state))
    paused = False
    for kind, secs in plan:
        if c.dose >= PRESET * 0.9:
            break
        if kind == "beam":
            n = max(round(secs / 10), 1)
            for _ in range(n):
                c.t += 10
                if not paused:
                    c.beam += 10
                    c.dose = min(c.dose + RATE / 6, PRESET * 0.9)
                feed(c.at(S.INTERRUPTED if paused else S.IRRADIATING))
        elif kind == "pause":
            if c.beam == 0:
                continue  # a console interrupts only a beam that is on
            paused = not paused
            c.t += 1
            feed(c.at(S.INTERRUPTED if paused else S.IRRADIATING))
        elif kind == "gap":
            c.t += 40
            events.extend(tracker.on_tick(round(c.t * NS), T0 + timedelta(seconds=c.t)))
            # unseen inside the gap: the beam runs part of it, or the pause toggles
            ran = min(secs, 200.0)
            c.t += ran
            if not paused:
                c.beam += ran / 2
                c.dose = min(c.dose + RATE / 60 * ran / 2, PRESET * 0.9)
        elif kind == "restart" and last_snap is not None and last_snap.termination is None:
            snap = last_snap
            rd = ResumedDelivery(
                delivery_id=snap.delivery_id,
                started_utc=snap.started_utc,
                phase=snap.phase,
                preset_gy=snap.preset_gy,
                primary_gy=snap.delivered_primary_gy,
                secondary_gy=snap.delivered_secondary_gy,
                beam_on_s=snap.beam_on_s,
                elapsed_s=snap.elapsed_s,
                selection=counter,
                simulated=True,
                unwatched_since_utc=T0 + timedelta(seconds=c.t),
                cause="daemon not running (crash stop)",
            )
            c.t += secs
            tracker = DeliveryTracker(st_)
            events.extend(tracker.resume(rd, round(c.t * NS), T0 + timedelta(seconds=c.t)))
    # the console resumes if paused, and ends the selection with its own status
    c.t += 10
    c.beam += 10
    feed(c.at(S.IRRADIATING))
    if end is TerminationStatus.NORMAL:
        c.t += 10
        c.beam += (PRESET - c.dose) / RATE * 60
        c.dose = PRESET
    c.t += 1
    feed(c.at(S.TERMINATED, end))

    ends = of(events, Terminated)
    starts = of(events, DeliveryStarted)
    if counter is not None:
        assert len(starts) == 1, "one treatment, one record (the counter never changed)"
    assert [e.delivery_id for e in ends] == [s.delivery_id for s in starts]
    for a, b in itertools.pairwise(zip(starts, ends, strict=True)):
        assert b[0].continues == a[1].delivery_id, "an explicit link, with the reason"
        assert b[0].continues_reason
        assert a[1].status is TerminationStatus.UNKNOWN
        assert a[1].summary.delivered_primary_gy == 0.0
    rec = ends[-1]
    contradicted = any(
        isinstance(e, AlarmRaised) and e.alarm.code is AlarmCode.CONTRADICTORY_INPUT for e in events
    )
    if not contradicted:
        assert _ORDER[rec.status] <= _ORDER[end], (rec.status, end, rec.reason)
    segs = rec.summary.segments
    assert segs[0].start_gy == 0.0
    assert all(b.start_gy == a.end_gy for a, b in itertools.pairwise(segs))
    assert rec.summary.delivered_primary_gy == pytest.approx(c.dose)
    assert sum(s.end_gy - s.start_gy for s in segs) == pytest.approx(c.dose)
    assert rec.summary.elapsed_s >= rec.summary.beam_on_s


def test_a_restart_into_a_new_selection_closes_the_old_and_starts_the_new_in_order() -> None:
    rd = resumed(selection=3)
    f, _ = restarted(rd)
    r = reading(f, S.IRRADIATING, beam_on=60.0, dose=0.8, selection=4)
    ev = f.tracker.on_reading(r)
    (end,) = of(ev, Terminated)
    (start,) = of(ev, DeliveryStarted)
    i, j = ev.index(end), ev.index(start)
    assert i < j
    assert all(getattr(e, "delivery_id", None) in (None, start.delivery_id) for e in ev[i + 1 :])
    assert all(getattr(e, "delivery_id", None) == start.delivery_id for e in ev[j:])
    assert start.continues is None
    snap = f.tracker.snapshot()
    assert snap is not None
    assert snap.delivery_id == start.delivery_id
    assert [s.kind for s in snap.segments] == ["unmonitored", "beam"]


def test_a_contradiction_right_after_a_gap_ends_when_it_is_seen() -> None:
    f = Feed()
    start_delivery(f)
    f.irradiate(100, step=10.0)
    f.tick(5.0)
    f.primary -= 1.0  # the dose count went down: contradictory
    ev = f.read(S.IRRADIATING, dt=20.0)
    (end,) = of(ev, Terminated)
    assert end.status is TerminationStatus.UNKNOWN
    assert "inside a monitoring gap" not in end.reason


def test_an_unsure_link_is_not_given_to_a_delivery_begun_after_the_console_was_seen_ended() -> None:
    """The link is for a record that starts on the reading that decided it: a console
    seen at an end first, then a new selection, is not "maybe the same treatment"."""
    rd = resumed(selection=None)
    f, _ = restarted(rd)
    dose = rd.primary_gy + 1.0
    f.events += f.tracker.on_reading(
        reading(f, S.TERMINATED, beam_on=dose / RATE * 60, dose=dose, selection=3)
    )
    f.events += f.tracker.on_reading(reading(f, S.STANDBY, beam_on=0.0, dose=0.0, selection=3))
    f.events += f.tracker.on_reading(reading(f, S.PREPARATORY, beam_on=0.0, dose=0.0, selection=4))
    (end,) = of(f.events, Terminated)
    assert end.delivery_id == rd.delivery_id
    (start,) = of(f.events, DeliveryStarted)
    assert start.continues is None, start.continues_reason
    snap = f.tracker.snapshot()
    assert snap is not None
    assert [s.kind for s in snap.segments] == [], snap.segments


def test_a_delivery_taken_over_and_continued_is_not_linked_to_an_unvouched_one() -> None:
    """Both after one crash: a delivery the log shows open (taken over) and one started in
    the unvouched tail (closed at start). The console still in the first: it continues,
    and no record is linked to the closed one."""
    rd = resumed()
    f, _ = restarted(rd)
    assert f.tracker.link_unvouched(
        f"{f.tracker.settings.delivery_id_prefix}-20261126T095900000000Z"
    )
    dose = rd.primary_gy + 1.0
    f.events += f.tracker.on_reading(
        reading(f, S.IRRADIATING, beam_on=dose / RATE * 60, dose=dose, selection=3)
    )
    assert of(f.events, DeliveryStarted) == []
    assert of(f.events, Terminated) == []


def test_time_spent_waiting_for_a_shared_line_pauses_staleness_no_more() -> None:
    # On a shared RS-485 line the device's exchange waited 2 s for another device's turn:
    # that is the line's time, not a missed turn of this device (drivers/transport/shared).
    f = Feed()
    start_delivery(f)
    last = f.mono
    now = last + round(4.0 * NS)
    assert f.tracker.on_tick(now, T0, paused_ns=round(2.0 * NS)) == [], "2 s own: not stale"
    assert f.tracker.stale_at_ns(paused_ns=round(2.0 * NS)) == last + round(5.0 * NS)
    # The same silence with only 0.5 s of waiting is 3.5 s of its own: stale (bound 3 s).
    ev = f.tracker.on_tick(now, T0, paused_ns=round(0.5 * NS))
    assert any(isinstance(e, AlarmRaised) and e.alarm.code is AlarmCode.STALE_DATA for e in ev)
