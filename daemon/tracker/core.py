"""The delivery tracker itself: inputs in, events out, in order.

A thin coordinator that holds its parts rather than inheriting them: the phase machine that
follows the console through the state table and keeps the open delivery's record
(``DeliveryMachine``, follow.py, machine.py, dose.py), the alarm book (alarms.py), judged
once after every input, and the takeover after a restart (``Takeover``, restart.py). What
it keeps itself is what every input shares: time (the last reading, the last time the
device was heard), monitoring gaps, and the interlocks as last believed (the machine reads
them through a read-only view). What it does with a reading:
1. monotonic time went backwards: nothing in it is believed (interlocks unknown, FAULT);
2. an open monitoring gap ends; the stale-data alarm clears;
3. the interlocks are taken (only from a believed reading; communication is the host's
   own interlock, ok for a believed reading that arrived in time);
4. after a restart, the first believed reading decides the takeover and the link;
5. a reading that cannot be believed goes to FAULT; a believed one is followed;
6. the alarm table is judged once, and the events are put in order (``end_last``).

Applicator readers (issue 16, applicator.py) are inputs of their own: ``on_applicator``
and ``on_applicator_lost`` touch only that reader's watch, the monitor's applicator
interlock (``monitor_interlocks``, never the console's ``interlocks``) and the applicator
rows of the table; the source's record, gaps and interlocks never hear of them. The
monitor's interlock is derived again after every input of either device (the beam coming
on is the source's news), before the table is judged.

Verification before beam-on (issue 18) is decided outside the tracker (daemon/verifier.py)
and handed in through ``on_verification`` and ``on_no_prescription``, so that its event and
its alarms take the normal path (log first, MQTT, dashboard): the tracker keeps the
latest check of the open delivery for its snapshot, raises or clears
``prescription_not_verified`` and raises ``no_prescription``; both clear at the delivery's
end (``Clears.END_OF_DELIVERY``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

from iortd.daemon.tracker.alarms import AlarmBook, Situation, When
from iortd.daemon.tracker.applicator import ApplicatorView, ApplicatorWatch
from iortd.daemon.tracker.events import (
    NS,
    Alarm,
    AlarmCode,
    DeliverySnapshot,
    Gap,
    InterlockChanged,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    Phase,
    ResumedDelivery,
    Terminated,
    TrackerEvent,
    VerificationChecked,
    end_last,
)
from iortd.daemon.tracker.follow import DeliveryMachine
from iortd.daemon.tracker.restart import Takeover, is_own_id, resumed_record
from iortd.daemon.tracker.settings import TrackerSettings
from iortd.kernel.types import (
    ApplicatorIdentity,
    ApplicatorReading,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
)

__all__ = ["DeliveryTracker"]


def _finite_nonneg(*values: float | None) -> bool:
    return all(v is None or (math.isfinite(v) and v >= 0) for v in values)


def _lost() -> dict[Interlock, InterlockState]:
    """The interlocks in a gap: all unknown, and communication tripped."""
    lost = dict.fromkeys(Interlock, InterlockState.UNKNOWN)
    lost[Interlock.COMMUNICATION] = InterlockState.TRIPPED
    return lost


class DeliveryTracker:
    """Inputs in, events out: the coordinator of the parts it holds (the phase machine, the
    alarm book, the restart's takeover) and the keeper of time, gaps and interlocks."""

    def __init__(self, settings: TrackerSettings, applicators: tuple[str, ...] = ()) -> None:
        if not (settings.stale_after_s > 0):
            raise ValueError("stale_after_s must be > 0")
        if len(applicators) > 1:
            raise ValueError("at most one applicator reader per room")
        # The applicator reader (issue 16), and the applicator the console last reported.
        self._watch = ApplicatorWatch(applicators[0]) if applicators else None
        self._console_applicator: ApplicatorIdentity | None = None
        self.settings = settings
        # The interlocks as last believed: the tracker writes them, the machine reads them.
        self._interlocks: dict[Interlock, InterlockState] = dict.fromkeys(
            Interlock, InterlockState.UNKNOWN
        )
        self._alarms = AlarmBook()
        self._machine = DeliveryMachine(settings, self._alarms, MappingProxyType(self._interlocks))
        # After a restart: what is pending until a reading decides it.
        self._restart = Takeover()
        self._last_mono_ns: int | None = None
        self._last_utc: datetime | None = None
        self._gap: Gap | None = None
        # The last time the device was heard from (any reply, also one a driver has not
        # turned into a reading yet): staleness is about the device, not the driver.
        self._heard_mono_ns: int | None = None
        # The latest verification (daemon/verification.py): (delivery id, MQTT object).
        self._verification: tuple[str, Mapping[str, Any]] | None = None

    # ---- public view ------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._machine.phase

    @property
    def interlocks(self) -> Mapping[Interlock, InterlockState]:
        return MappingProxyType(self._interlocks)

    @property
    def all_clear(self) -> bool:
        return all(s is InterlockState.OK for s in self._interlocks.values())

    @property
    def monitor_interlocks(self) -> Mapping[Interlock, InterlockState]:
        """The interlocks the monitor derives itself (the applicator's, from its reader),
        apart from the console's own; empty without a reader."""
        w = self._watch
        return MappingProxyType({} if w is None else {Interlock.APPLICATOR: w.state})

    @property
    def applicator_view(self) -> ApplicatorView | None:
        """The applicator reader as the rules see it; None without one."""
        return None if self._watch is None else self._watch.view(self._console_applicator)

    @property
    def alarms(self) -> tuple[Alarm, ...]:
        return self._alarms.standing

    @property
    def in_gap(self) -> bool:
        return self._gap is not None

    def snapshot(self, now_mono_ns: int | None = None) -> DeliverySnapshot | None:
        now = now_mono_ns if now_mono_ns is not None else (self._last_mono_ns or 0)
        snap = self._machine.snapshot(now)
        v = self._verification
        if snap is not None and v is not None and v[0] == snap.delivery_id:
            return replace(snap, verification=v[1])
        return snap

    def stale_at_ns(self, paused_ns: int = 0) -> int | None:
        """When the data become stale if no reading comes (monotonic ns), or None when
        there is nothing to watch (no reading yet, or a gap already open). ``paused_ns``
        as for :meth:`on_tick`."""
        if self._last_mono_ns is None or self._gap is not None:
            return None
        return self._heard() + max(0, paused_ns) + round(self.settings.stale_after_s * NS)

    # ---- inputs -----------------------------------------------------------------------

    def on_reading(self, r: SourceReading) -> list[TrackerEvent]:
        """Take one reading from the source console; return what happened, in order."""
        out: list[TrackerEvent] = []
        m = self._machine
        m.start_input()
        if self._last_mono_ns is not None and r.mono_ns < self._last_mono_ns:
            # Monotonic time went backwards: the reading cannot be placed, so none of it is
            # believed: not its doses, and not its interlocks either, which become unknown
            # (fail-safe) rather than keeping the last ok. Events keep the last good time.
            mono, utc = self._last_mono_ns, self._last_utc or r.utc
            self._update_interlocks({}, mono, utc, out)
            m.to_fault(mono, utc, "reading timestamp went backwards", out)
            self._judge(When.INTERLOCKS, mono, utc, out)
            return end_last(out)
        prev_mono = self._last_mono_ns
        if self._gap is not None:
            gap = replace(self._gap, end_mono_ns=r.mono_ns, end_utc=r.utc)
            d = m.delivery
            # Only a gap that began inside the open delivery is one of its gaps.
            if d is not None and d.gaps and d.gaps[-1] is self._gap:
                d.gaps[-1] = gap
                m.gap_ended = gap
            self._gap = None
            out.append(MonitoringGapEnded(m.delivery_id(), gap))
            # Time across a gap is unknown, not beam-on: nothing is counted from the last
            # reading before it (the beam may have paused inside it).
            prev_mono = None
        self._alarms.clear(f"{AlarmCode.STALE_DATA}", r.mono_ns, r.utc, m.delivery_id(), out)
        self._last_mono_ns, self._last_utc = r.mono_ns, r.utc
        self._heard_mono_ns = max(self._heard_mono_ns or r.mono_ns, r.mono_ns)

        sane = _finite_nonneg(
            r.dose_rate_gy_min,
            r.dose_primary_gy,
            r.dose_secondary_gy,
            r.preset_gy,
            r.beam_on_s,
            r.kv,
            r.ua,
            r.planned_time_s,
        )
        trusted = sane and r.state is not DeviceState.UNKNOWN
        # Nothing in a rejected reading is believed, its interlocks included (fail-safe).
        reported: dict[Interlock, InterlockState] = dict(r.interlocks) if trusted else {}
        if trusted:
            # Communication is the host's own interlock, not the console's: a reading that
            # arrived in time and is believed is communication ok, whether or not the
            # driver says anything about it (wire protocols do not; a gap trips it).
            reported[Interlock.COMMUNICATION] = InterlockState.OK
        self._update_interlocks(reported, r.mono_ns, r.utc, out)
        if trusted:
            self._restart.decide(m, r, out)
            self._console_applicator = r.applicator
        if not sane:
            m.to_fault(r.mono_ns, r.utc, "non-finite or negative value in reading", out)
        elif r.state is DeviceState.UNKNOWN:
            m.to_fault(r.mono_ns, r.utc, "console reported an unknown state", out)
        else:
            m.follow(r, prev_mono, out)

        self._monitor(r.mono_ns, r.utc, out)
        self._judge(When.READING, r.mono_ns, r.utc, out, r)
        m.last_state = r.state
        for ev in list(out):
            if isinstance(ev, Terminated):  # the alarms that stand until the end
                self._alarms.clear_at_end(r.mono_ns, r.utc, ev.delivery_id, out)
        # A link is for a record that starts on the reading that decided it; a delivery
        # begun later is a new selection (the console was seen idle or at an end first).
        m.link = None
        return end_last(out)

    def on_applicator(self, device: str, r: ApplicatorReading) -> list[TrackerEvent]:
        """Take one reading of the applicator reader; return what happened, in order."""
        w = self._applicator(device)
        self._machine.start_input()  # a delivery that ended on the last input is over
        out: list[TrackerEvent] = []
        w.take(r, self._machine.delivery_id(), out)
        self._monitor(r.mono_ns, r.utc, out)
        self._judge(When.APPLICATOR, r.mono_ns, r.utc, out)
        return out

    def on_applicator_lost(
        self, device: str, now_mono_ns: int, now_utc: datetime, reason: str
    ) -> list[TrackerEvent]:
        """The reader is unreachable: its readings unknown, a gap of that device only,
        the monitor's applicator interlock unknown (fail safe); the source goes on."""
        w = self._applicator(device)
        self._machine.start_input()
        out = w.lose(reason, now_mono_ns, now_utc, self._machine.delivery_id())
        self._monitor(now_mono_ns, now_utc, out)
        self._judge(When.APPLICATOR, now_mono_ns, now_utc, out)
        return out

    def on_verification(
        self,
        entry: Mapping[str, Any],
        public: Mapping[str, Any],
        mono: int,
        utc: datetime,
        recorded: bool = False,
    ) -> list[TrackerEvent]:
        """A check of the console against the prescription was made (daemon/verification.py,
        the service decides when): the event that records and publishes it, and
        ``prescription_not_verified`` raised (NOT_VERIFIED) or cleared (a later VERIFIED or
        VERIFIED_OVR check of the same delivery). ``recorded``: a check already in the log
        (a delivery taken over after a restart): its alarm only, no event for it."""
        self._machine.start_input()
        did = str(entry["delivery_id"])
        self._verification = (did, public)
        d = self._machine.delivery
        sim = d is not None and d.simulated
        out: list[TrackerEvent] = (
            [] if recorded else [VerificationChecked(did, entry, public, mono, utc, sim)]
        )
        code = AlarmCode.PRESCRIPTION_NOT_VERIFIED
        if did != self._machine.delivery_id():
            return out  # a check of a delivery no longer open: recorded, nothing raised
        if entry["outcome"] == "NOT_VERIFIED":
            why = ", ".join(str(x) for x in entry["reasons"])
            msg = f"prescription NOT VERIFIED ({why}) [trigger {entry['trigger']}]"
            self._alarms.raise_event(code, msg, mono, utc, did, out)
        else:
            self._alarms.clear(f"{code}", mono, utc, did, out)
        return out

    def on_no_prescription(self, mono: int, utc: datetime) -> list[TrackerEvent]:
        """The beam came on with no prescription pending (verification on): HIGH, until
        the delivery's end."""
        self._machine.start_input()
        out: list[TrackerEvent] = []
        did = self._machine.delivery_id()
        msg = "beam on with no prescription pending: nothing was verified before beam-on"
        self._alarms.raise_event(AlarmCode.NO_PRESCRIPTION, msg, mono, utc, did, out)
        return out

    def on_device_heard(self, mono_ns: int) -> None:
        """The device answered (a reply a driver has not yet turned into a reading): the
        stale bound counts from its last reply, not from the driver's last reading."""
        self._heard_mono_ns = max(self._heard_mono_ns or mono_ns, mono_ns)

    def on_tick(
        self, now_mono_ns: int, now_utc: datetime, paused_ns: int = 0
    ) -> list[TrackerEvent]:
        """Time passes with no reading; detects stale data. ``paused_ns``: of the time
        since the device was last heard, how much it spent waiting for a line it shares
        with other devices (their turns, each wait bounded by the line: see
        drivers/transport/shared.py): staleness counts the device's own missed turns,
        not the line's."""
        out: list[TrackerEvent] = []
        self._machine.start_input()
        if self._last_mono_ns is None or self._gap is not None:
            return out
        silent = (now_mono_ns - self._heard()) / NS
        age = silent - max(0, paused_ns) / NS
        if age > self.settings.stale_after_s:
            bound = self.settings.stale_after_s
            line = f", {silent - age:.1f} s of it waiting for the shared line" if paused_ns else ""
            cause = f"nothing heard from the device for {silent:.1f} s{line} (bound {bound:.1f} s)"
            self._start_gap(cause, now_mono_ns, now_utc, out)
            self._alarms.raise_event(
                AlarmCode.STALE_DATA,
                f"readings stopped: device last heard {silent:.1f} s ago; interlocks unknown",
                now_mono_ns,
                now_utc,
                self._machine.delivery_id(),
                out,
            )
        return out

    def on_link_lost(self, now_mono_ns: int, now_utc: datetime, reason: str) -> list[TrackerEvent]:
        """The driver reports the device unreachable: fail safe at once."""
        out: list[TrackerEvent] = []
        self._machine.start_input()
        if self._gap is None:
            self._start_gap(f"link lost: {reason}", now_mono_ns, now_utc, out)
        elif self._interlocks[Interlock.COMMUNICATION] is not InterlockState.TRIPPED:
            # Already in a gap, but an unplaceable reading since made communication merely
            # unknown: a lost link is communication tripped, whatever came before.
            self._update_interlocks(_lost(), now_mono_ns, now_utc, out)
            self._judge(When.INTERLOCKS, now_mono_ns, now_utc, out)
        return out

    def resume(
        self, rd: ResumedDelivery, now_mono_ns: int, now_utc: datetime
    ) -> list[TrackerEvent]:
        """Take over a delivery the log shows open after a restart. It stays open, in a
        monitoring gap from the last vouched entry (``unwatched_since_utc``), until the
        first believed reading decides: the console still in the same selection continues
        it (the outage is a gap in it, dose given meanwhile an ``unmonitored`` segment);
        otherwise it is closed UNKNOWN, and linked to the next record when that one may
        be the same treatment. If the console never answers, it stays open (in a gap)."""
        if self._machine.delivery is not None or self._last_mono_ns is not None:
            raise ValueError("resume() comes before any reading")
        out: list[TrackerEvent] = []
        d = resumed_record(rd, now_mono_ns, now_utc)
        self._machine.take_over(d, rd.phase)
        if self._watch is not None:
            self._watch.taken_over(d.delivery_id)
        self._restart.resumed = rd
        self._last_mono_ns, self._last_utc = d.started_mono_ns, rd.unwatched_since_utc
        self._start_gap(rd.cause, now_mono_ns, now_utc, out)
        return out

    def link_unvouched(self, delivery_id: str) -> bool:
        """After a crash, the start closed ``delivery_id`` UNKNOWN because its whole record
        was written after the last seal (unvouched): nothing vouched says what it was, so
        it cannot be taken over. If the first believed reading finds the console in a
        delivery, the record that starts then may be the same treatment: it names the
        closed one in ``continues`` and says why. None of the unvouched entries' dose is
        taken: all the dose the console shows at joining is the closed record's
        (``in_previous_record``), since how much of it was watched is unknown. False (and
        no link) when the id is not in the form this daemon gives its deliveries."""
        if self._last_mono_ns is not None and self._restart.resumed is None:
            raise ValueError("link_unvouched() comes before any reading")
        if not is_own_id(self.settings.delivery_id_prefix, delivery_id):
            return False
        self._restart.unvouched = delivery_id
        return True

    # ---- internals --------------------------------------------------------------------

    def _applicator(self, device: str) -> ApplicatorWatch:
        if self._watch is None or self._watch.device != device:
            raise KeyError(f"{device!r} is not the applicator reader this tracker watches")
        return self._watch

    def _monitor(self, mono: int, utc: datetime, out: list[TrackerEvent]) -> None:
        """Derive the monitor's applicator interlock again; record a change."""
        w = self._watch
        if w is None:
            return
        m = self._machine
        did = m.delivery_id()
        w.note_input(mono)
        w.follow_delivery(did)
        beam = m.phase is Phase.IRRADIATING
        if beam:
            w.at_beam_on(did, mono, utc, out)
        new, cause = w.judge(self._console_applicator, beam)
        w.cause = cause
        if new is not w.state:
            old, w.state = w.state, new
            out.append(
                MonitorInterlockChanged(
                    w.device, Interlock.APPLICATOR, old, new, cause, mono, utc, did
                )
            )

    def _heard(self) -> int:
        last = self._last_mono_ns or 0
        return max(last, self._heard_mono_ns or last)

    def _judge(
        self,
        when: When,
        mono: int,
        utc: datetime,
        out: list[TrackerEvent],
        r: SourceReading | None = None,
    ) -> None:
        """The alarm table, judged once on this input. Conditions that judge the delivery
        itself are evaluated up to and including the reading that ends it, and then left
        standing (not cleared because it ended): they are cleared at the next selection."""
        m = self._machine
        view = self.applicator_view
        s = Situation(
            m.phase, self._interlocks, m.delivery, r, self.settings, mono, utc, m.judging, view
        )
        self._alarms.evaluate(s, when, m.delivery_id(), out)

    def _start_gap(self, cause: str, mono: int, utc: datetime, out: list[TrackerEvent]) -> None:
        start_mono = self._last_mono_ns if self._last_mono_ns is not None else mono
        start_utc = self._last_utc if self._last_utc is not None else utc
        self._gap = Gap(cause=cause, start_mono_ns=start_mono, start_utc=start_utc)
        d = self._machine.delivery
        self._machine.gap_beam_on_s = d.device_beam_on_s if d is not None else 0.0
        if d is not None and d.termination is None:
            d.gaps.append(self._gap)
        out.append(MonitoringGapStarted(self._machine.delivery_id(), self._gap))
        self._alarms.restart_holds()
        self._update_interlocks(_lost(), mono, utc, out)
        self._judge(When.INTERLOCKS, mono, utc, out)

    def _update_interlocks(
        self,
        reported: Mapping[Interlock, InterlockState],
        mono: int,
        utc: datetime,
        out: list[TrackerEvent],
    ) -> None:
        for il in Interlock:
            # A third-party driver may hand us anything; only a real state counts as known.
            raw: object = reported.get(il, InterlockState.UNKNOWN)
            new = raw if isinstance(raw, InterlockState) else InterlockState.UNKNOWN
            old = self._interlocks[il]
            if new is not old:
                self._interlocks[il] = new
                out.append(InterlockChanged(il, old, new, mono, utc, self._machine.delivery_id()))
