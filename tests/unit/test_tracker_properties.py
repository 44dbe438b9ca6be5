"""Properties of the tracker over arbitrary input (hypothesis).

Whatever a console (or a broken driver) sends, in whatever order:
- the delivered dose of a delivery never decreases;
- an interlock that was reported unknown, or not reported, never counts as clear;
- the dose segments always tile the delivered dose (no gap, no double count);
- a delivery never ends NORMAL unless the console said NORMAL at or above the preset
  minus the stop accuracy, with no contradictory input on the way.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iortd.daemon.tracker import (
    AlarmCode,
    AlarmRaised,
    DeliveryStarted,
    DeliveryTracker,
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

T0 = datetime(2026, 11, 26, tzinfo=UTC)
NS = 1_000_000_000

interlock_maps = st.dictionaries(
    st.sampled_from(list(Interlock)),
    st.sampled_from(list(InterlockState)),
    max_size=len(Interlock),
)
# Mostly plausible numbers, sometimes hostile ones.
doses = st.one_of(
    st.floats(min_value=0, max_value=30, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -1.0, 0.0]),
)


@dataclass(frozen=True)
class Read:
    dt_s: float
    state: DeviceState
    primary: float
    secondary: float
    preset: float
    rate: float
    interlocks: dict[Interlock, InterlockState]
    termination: TerminationStatus | None


@dataclass(frozen=True)
class Tick:
    dt_s: float


@dataclass(frozen=True)
class LinkLost:
    dt_s: float


steps = st.one_of(
    st.builds(
        Read,
        dt_s=st.floats(min_value=-1, max_value=120, allow_nan=False),
        state=st.sampled_from(list(DeviceState)),
        primary=doses,
        secondary=doses,
        preset=st.sampled_from([20.0, 20.0, 20.0, 10.0]),
        rate=st.floats(min_value=0, max_value=3, allow_nan=False),
        interlocks=interlock_maps,
        termination=st.one_of(st.none(), st.sampled_from(list(TerminationStatus))),
    ),
    st.builds(Tick, dt_s=st.floats(min_value=0, max_value=30, allow_nan=False)),
    st.builds(LinkLost, dt_s=st.floats(min_value=0, max_value=30, allow_nan=False)),
)


def run(seq: list[Read | Tick | LinkLost]) -> None:
    t = DeliveryTracker(TrackerSettings(stale_after_s=5.0, rate_settle_s=5.0))
    now = 0.0
    delivered: dict[str, float] = {}
    contradicted: set[str] = set()
    for step in seq:
        now += step.dt_s
        mono, utc = round(now * NS), T0 + timedelta(seconds=now)
        events: list[TrackerEvent]
        if isinstance(step, Read):
            r = SourceReading(
                mono_ns=mono,
                utc=utc,
                state=step.state,
                dose_rate_gy_min=step.rate,
                dose_primary_gy=step.primary,
                dose_secondary_gy=step.secondary,
                preset_gy=step.preset,
                beam_on_s=max(now, 0.0),
                kv=50.0,
                ua=40.0,
                interlocks=step.interlocks,
                planned_time_s=1500.0,
                termination=step.termination,
            )
            events = t.on_reading(r)
            # Anything not reported as ok, or not reported at all, is not clear; except
            # communication, the host's own: ok when a reading is believed, else unknown.
            assert t.interlocks[Interlock.COMMUNICATION] is not InterlockState.TRIPPED
            for il in Interlock:
                if il is Interlock.COMMUNICATION:
                    continue
                if step.interlocks.get(il) is not InterlockState.OK:
                    assert t.interlocks[il] is not InterlockState.OK
                    assert not t.all_clear
        elif isinstance(step, Tick):
            events = t.on_tick(mono, utc)
        else:
            events = t.on_link_lost(mono, utc, "test")
            assert not t.all_clear
            assert t.interlocks[Interlock.COMMUNICATION] is InterlockState.TRIPPED

        assert t.all_clear == all(s is InterlockState.OK for s in t.interlocks.values())
        for ev in events:
            if isinstance(ev, DeliveryStarted):
                delivered[ev.delivery_id] = 0.0
            if (
                isinstance(ev, AlarmRaised)
                and ev.alarm.code is AlarmCode.CONTRADICTORY_INPUT
                and ev.delivery_id
            ):
                contradicted.add(ev.delivery_id)
            if isinstance(ev, Terminated) and ev.status is TerminationStatus.NORMAL:
                assert isinstance(step, Read)
                assert step.termination is TerminationStatus.NORMAL
                assert step.state is DeviceState.TERMINATED
                assert ev.delivery_id not in contradicted
                assert ev.summary.delivered_primary_gy >= ev.summary.preset_gy * (1 - 0.01)
                # ...and with the two dose channels in agreement at the end.
                p, sec = ev.summary.delivered_primary_gy, ev.summary.delivered_secondary_gy
                assert abs(p - sec) <= max(0.05, 0.05 * p) + 1e-12

        snap = t.snapshot()
        if snap is None:
            continue
        # Delivered dose never decreases within a delivery.
        assert snap.delivered_primary_gy >= delivered.get(snap.delivery_id, 0.0)
        delivered[snap.delivery_id] = snap.delivered_primary_gy
        assert math.isfinite(snap.delivered_primary_gy)
        # The segments tile the delivered dose exactly.
        if snap.segments:
            assert snap.segments[0].start_gy == 0.0
            for a, b in itertools.pairwise(snap.segments):
                assert b.start_gy == a.end_gy
            assert snap.segments[-1].end_gy == snap.delivered_primary_gy
        else:
            assert snap.delivered_primary_gy == 0.0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, max_size=40))
# Found by hypothesis: a link lost inside a gap after an unplaceable (backwards) reading
# left communication unknown instead of tripped.
@example(
    [
        Read(0.0, DeviceState.OFF, 0.0, 0.0, 20.0, 0.0, {}, None),
        LinkLost(0.0),
        Read(-1.0, DeviceState.OFF, 0.0, 0.0, 20.0, 0.0, {}, None),
        LinkLost(0.0),
    ]
)
def test_tracker_invariants_hold_for_any_input(seq: list[Read | Tick | LinkLost]) -> None:
    run(seq)


# Sequences that look like real deliveries (monotone doses, sane states) with faults mixed
# in, so that the properties are also exercised deep inside deliveries.
@st.composite
def plausible(draw: st.DrawFn) -> list[Read | Tick | LinkLost]:
    out: list[Read | Tick | LinkLost] = []
    dose = 0.0
    for state in draw(
        st.lists(
            st.sampled_from(
                [
                    DeviceState.PREPARATORY,
                    DeviceState.READY,
                    DeviceState.IRRADIATING,
                    DeviceState.IRRADIATING,
                    DeviceState.IRRADIATING,
                    DeviceState.INTERRUPTED,
                    DeviceState.TERMINATED,
                    DeviceState.STANDBY,
                    DeviceState.FAULT,
                ]
            ),
            min_size=1,
            max_size=60,
        )
    ):
        if state is DeviceState.PREPARATORY:
            dose = 0.0
        elif state is DeviceState.IRRADIATING:
            dose += draw(st.floats(min_value=0, max_value=2))
        elif draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
            dose += 0.01  # rare dose with the beam off
        out.append(
            Read(
                dt_s=draw(st.floats(min_value=0.1, max_value=20)),
                state=state,
                primary=dose,
                secondary=dose * draw(st.sampled_from([1.0, 1.0, 1.0, 0.8])),
                preset=20.0,
                rate=0.8,
                interlocks=draw(
                    st.one_of(st.just(dict.fromkeys(Interlock, InterlockState.OK)), interlock_maps)
                ),
                termination=draw(st.sampled_from([TerminationStatus.NORMAL, None])),
            )
        )
        if draw(st.integers(0, 15)) == 0:
            out.append(Tick(dt_s=10.0))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible())
def test_tracker_invariants_hold_inside_plausible_deliveries(
    seq: list[Read | Tick | LinkLost],
) -> None:
    run(seq)
