"""Following the console: the phase machine, and the moves it makes through its state table.

``DeliveryMachine`` holds what the moves change (the phase, the open delivery, the ids it
issued, a pending restart link) and makes the moves: a new selection, a delivery joined in
progress, beam on and off, the console's own end (a NORMAL end is checked against the
tolerances first), a fault, and dose seen after the end. Every move is checked against
``TRANSITIONS``; what the console reports outside the table is contradictory and goes to
FAULT. ``DeliveryTracker`` (core.py) holds one, and owns the inputs: readings, ticks, a
lost link, gaps and the restart. The machine reads, never writes, the interlocks (a view
the tracker gives it: an interruption names the ones not clear) and raises the alarms that
its moves are (through the alarm book it is given); judging the alarm table is the
tracker's.

A delivery closed from FAULT is never NORMAL: MACHINE when the console itself reported the
fault or emergency stop, UNKNOWN when the input cannot be trusted. After a termination a
new selection is required before irradiating again (IEC): a console that is seen
irradiating again with its counters reset made a new selection between two readings, and
is followed, never missed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from iortd.daemon.tracker.alarms import AlarmBook
from iortd.daemon.tracker.dose import DeliveryRecord, first_beam
from iortd.daemon.tracker.events import (
    AlarmCode,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    Gap,
    Interruption,
    Phase,
    PhaseChanged,
    Terminated,
    TrackerEvent,
)
from iortd.daemon.tracker.machine import ACTIVE, TARGET_PHASE, TRANSITIONS, IllegalTransition
from iortd.daemon.tracker.settings import TrackerSettings
from iortd.kernel.types import (
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)

__all__ = ["DeliveryMachine"]

P = Phase


class DeliveryMachine:
    """The phase, the open delivery, and the moves that follow the console."""

    def __init__(
        self,
        settings: TrackerSettings,
        alarms: AlarmBook,
        interlocks: Mapping[Interlock, InterlockState],
    ) -> None:
        self.settings = settings
        self.phase = Phase.IDLE
        self.delivery: DeliveryRecord | None = None
        self._alarms = alarms
        self._interlocks = interlocks  # read only: the tracker keeps them
        self.last_state: DeviceState | None = None  # the console's, at the last reading
        # Set while one input is taken: the gap it ended, and the delivery it closed; and
        # the console's beam-on timer when the last gap started.
        self.gap_ended: Gap | None = None
        self.ending_id: str | None = None
        self.gap_beam_on_s = 0.0
        self._ids_issued: set[str] = set()
        # After a restart, when the tracker cannot be sure the console is in the selection
        # it took over: the link for the record that starts on that reading.
        self.link: tuple[str, str, float] | None = None  # (old id, why, its dose)

    def start_input(self) -> None:
        """A new input: no gap ended by it yet, and no delivery closed by it."""
        self.gap_ended = None
        self.ending_id = None

    def take_over(self, d: DeliveryRecord, phase: Phase) -> None:
        """After a restart: the delivery the log shows open, in the phase it was in."""
        self._ids_issued.add(d.delivery_id)
        self.delivery = d
        self.phase = phase

    @property
    def judging(self) -> bool:
        """The delivery is open, or ends on this input: conditions that judge the
        delivery itself are evaluated up to and including the reading that ends it."""
        d = self.delivery
        return d is not None and (d.termination is None or self.ending_id == d.delivery_id)

    def snapshot(self, now: int) -> DeliverySnapshot | None:
        d = self.delivery
        return None if d is None else self._snapshot(d, now)

    def delivery_id(self) -> str | None:
        """The delivery an event belongs to: the open one; after its end entry, only the
        alarms judged on the reading that ended it (put before the end, see end_last)."""
        d = self.delivery
        if d is None:
            return None
        return d.delivery_id if d.termination is None else self.ending_id

    def _raise(
        self, code: AlarmCode, message: str, mono: int, utc: datetime, out: list[TrackerEvent]
    ) -> None:
        self._alarms.raise_event(code, message, mono, utc, self.delivery_id(), out)

    def move(
        self, dst: Phase, cause: str, mono: int, utc: datetime, out: list[TrackerEvent]
    ) -> None:
        src = self.phase
        if src is dst:
            return
        if (src, dst) not in TRANSITIONS:
            raise IllegalTransition(src, dst)
        self.phase = dst
        out.append(PhaseChanged(self.delivery_id(), src, dst, cause, mono, utc))

    def _new_delivery(
        self, r: SourceReading, joined: bool, out: list[TrackerEvent]
    ) -> DeliveryRecord:
        base = f"{self.settings.delivery_id_prefix}-{r.utc:%Y%m%dT%H%M%S%fZ}"
        delivery_id, n = base, 1
        while delivery_id in self._ids_issued:
            n += 1
            delivery_id = f"{base}-{n}"
        self._ids_issued.add(delivery_id)
        d = DeliveryRecord(
            delivery_id=delivery_id,
            joined=joined,
            started_mono_ns=r.mono_ns,
            started_utc=r.utc,
            preset_gy=r.preset_gy,
            planned_time_s=r.planned_time_s,
            applicator=r.applicator,
            simulated=r.simulated,
        )
        # Alarms of the previous delivery do not carry over: they are cleared before the new
        # one starts, as the room's (nothing after an end entry names that delivery); the
        # conditions are re-evaluated for the new one.
        self._alarms.clear_all(r.mono_ns, r.utc, self.delivery_id(), out)
        self.delivery = d
        link, self.link = self.link, None
        out.append(
            DeliveryStarted(
                delivery_id,
                r.mono_ns,
                r.utc,
                r.preset_gy,
                joined,
                continues=None if link is None else link[0],
                continues_reason=None if link is None else link[1],
            )
        )
        carried = 0.0 if link is None else min(link[2], r.dose_primary_gy)
        if carried > 0:
            # The dose the earlier record already holds is not counted again here.
            d.add_dose_segment("in_previous_record", carried, r.mono_ns)
        return d

    # ---- following the console ----------------------------------------------------------

    def follow(self, r: SourceReading, prev_mono: int | None, out: list[TrackerEvent]) -> None:
        """Follow a believed reading (its state known, its numbers finite): the move its
        state asks for, and its numbers into the delivery. ``prev_mono`` is the reading
        before it, or None when beam-on since then is unknown (across a gap)."""
        target = TARGET_PHASE.get(r.state)
        if target is None:  # pragma: no cover - every DeviceState but UNKNOWN is mapped
            self.to_fault(r.mono_ns, r.utc, f"unmapped console state {r.state}", out)
            return
        d = self.delivery

        # A new selection: the console entered PREPARATORY from idle or after an end (IEC:
        # after a termination a new selection is required before irradiating again).
        if target is P.PREPARATORY and self.phase in (P.IDLE, P.TERMINATED, P.FAULT):
            d = self._new_delivery(r, joined=False, out=out)
            self.move(P.PREPARATORY, "plan selected", r.mono_ns, r.utc, out)
            self._take_values(d, r, prev_mono, out)
            return

        if (
            d is not None
            and self.phase in (P.TERMINATED, P.FAULT)
            and target in (P.READY, P.IRRADIATING, P.INTERRUPTED)
            and (
                r.dose_primary_gy < d.primary_gy
                or r.beam_on_s < d.device_beam_on_s
                or (d.first_beam_mono_ns is None and d.primary_gy == 0)
            )
        ):
            # The console cleared its counters (or had never started the last selection):
            # a new selection happened between two readings. Follow it, never miss it.
            self.move(P.IDLE, "console counters reset: a new selection", r.mono_ns, r.utc, out)

        if self.phase is P.IDLE and target in (P.READY, P.IRRADIATING, P.INTERRUPTED):
            self._join(r, target, prev_mono, out)
            return

        if d is None or self.phase in (P.IDLE, P.TERMINATED, P.FAULT):
            # Nothing active: watch for dose after the end, follow the console back to idle;
            # everything else waits for a new selection.
            if d is not None and self.phase is not P.IDLE:
                self._watch_after_close(d, r, out)
            if target is P.IDLE and self.phase is not P.IDLE:
                self.move(P.IDLE, f"console {r.state}", r.mono_ns, r.utc, out)
            elif target is P.FAULT and self.phase is not P.FAULT:
                self.to_fault(r.mono_ns, r.utc, f"console {r.state}", out, device=True)
            return

        if target is self.phase:
            self._take_values(d, r, prev_mono, out)
            return
        if (
            self.gap_ended is not None
            and self.phase in (P.PREPARATORY, P.READY)
            and target in (P.IRRADIATING, P.INTERRUPTED)
        ):
            # Steps the console took inside a monitoring gap are not a contradiction: the
            # beam came on (and for INTERRUPTED went off again) while nobody watched.
            if self.phase is P.PREPARATORY:
                self.move(P.READY, "ready inside a monitoring gap", r.mono_ns, r.utc, out)
            if target is P.INTERRUPTED:
                if d.first_beam_mono_ns is None:
                    d.first_beam_mono_ns = first_beam(r)
                d.open_segment("unmonitored", r.mono_ns)
                self.move(P.IRRADIATING, "beam on inside a monitoring gap", r.mono_ns, r.utc, out)
        cancel = target is P.IDLE and self.phase in (P.PREPARATORY, P.READY)
        if (
            (self.phase, target) not in TRANSITIONS
            and target not in (P.FAULT, P.TERMINATED)
            and not cancel
        ):
            self._take_values(d, r, prev_mono, out)
            self.to_fault(
                r.mono_ns, r.utc, f"console went {self.phase} -> {r.state} (not allowed)", out
            )
            return

        if target is P.IRRADIATING:
            # Beam on (or resumed): open the segment first, so dose in this reading is beam.
            if self.phase is P.INTERRUPTED and d.interruptions:
                d.interruptions[-1] = replace(d.interruptions[-1], end_mono_ns=r.mono_ns)
                cause = "resumed"
            else:
                cause = "beam on"
            if d.first_beam_mono_ns is None:
                d.first_beam_mono_ns = first_beam(r)
            d.open_segment("beam", r.mono_ns)
            self.move(P.IRRADIATING, cause, r.mono_ns, r.utc, out)
            self._take_values(d, r, prev_mono, out)
            return

        # Every other move: the dose in this reading still belongs to the phase we were in.
        if not self._take_values(d, r, prev_mono, out):
            return
        if target is P.FAULT:
            reason = "emergency_stop" if r.state is DeviceState.EMERGENCY_STOP else "device_fault"
            reason = r.termination_reason or reason
            self.to_fault(r.mono_ns, r.utc, f"console {r.state}: {reason}", out, device=True)
        elif target is P.TERMINATED:
            self._terminate_from_console(d, r, out)
        elif target is P.INTERRUPTED:
            tripped = [il.value for il, s in self._interlocks.items() if s is not InterlockState.OK]
            cause = "interlock " + ",".join(tripped) if tripped else "operator"
            d.close_segment(r.mono_ns)
            d.interruptions.append(Interruption(cause, r.mono_ns, d.primary_gy))
            self.move(P.INTERRUPTED, f"interrupted: {cause}", r.mono_ns, r.utc, out)
        elif target is P.IDLE:
            # The selection was dropped before any beam: close it as an operator end.
            why = "selection cancelled before beam-on"
            self.close(d, TerminationStatus.OPERATOR, why, r.mono_ns, r.utc, P.TERMINATED, out)
            self.move(P.IDLE, f"console {r.state}", r.mono_ns, r.utc, out)
        else:
            self.move(target, f"console {r.state}", r.mono_ns, r.utc, out)

    def _join(
        self, r: SourceReading, target: Phase, prev_mono: int | None, out: list[TrackerEvent]
    ) -> None:
        """A delivery first seen past PREPARATORY. Seen first at READY with nothing
        delivered, only the PREPARATORY moment fell between two polls; past beam-on, dose
        may have been given unobserved."""
        joined = target is not P.READY or r.dose_primary_gy > 0 or r.beam_on_s > 0
        d = self._new_delivery(r, joined=joined, out=out)
        if r.dose_primary_gy > d.primary_gy:
            # Dose given before monitoring began: recorded, but not as observed beam.
            d.add_dose_segment("unmonitored", r.dose_primary_gy, r.mono_ns)
        d.primary_gy, d.secondary_gy = r.dose_primary_gy, r.dose_secondary_gy
        why = "monitoring joined a delivery in progress" if joined else "plan selected"
        self.move(target, why, r.mono_ns, r.utc, out)
        if target is P.IRRADIATING:
            d.open_segment("beam", r.mono_ns)
            d.first_beam_mono_ns = first_beam(r)
        elif target is P.INTERRUPTED:
            d.first_beam_mono_ns = first_beam(r)
            d.interruptions.append(Interruption("unknown (joined)", r.mono_ns, d.primary_gy))
        self._take_values(d, r, prev_mono, out)

    def _watch_after_close(
        self, d: DeliveryRecord, r: SourceReading, out: list[TrackerEvent]
    ) -> None:
        """After an end the console keeps the selection's counts until a new selection; a
        count that still rises means radiation after termination: keep it and alarm. A
        count that drops is the console clearing its counters, not a contradiction."""
        if r.dose_primary_gy > d.primary_gy:
            self._beam_off_dose(d, r, out, "after the delivery ended")
        amended = d.after_close(r)
        if amended is not None:
            out.append(DeliveryAmended(d.delivery_id, amended, self._snapshot(d, r.mono_ns)))

    def _take_values(
        self, d: DeliveryRecord, r: SourceReading, prev_mono: int | None, out: list[TrackerEvent]
    ) -> bool:
        """Fold a reading's numbers into the delivery. False if they contradict it."""
        if r.dose_primary_gy < d.primary_gy or r.dose_secondary_gy < d.secondary_gy:
            self.to_fault(
                r.mono_ns,
                r.utc,
                f"cumulative dose decreased (primary {d.primary_gy:.4f} -> "
                f"{r.dose_primary_gy:.4f} Gy, secondary {d.secondary_gy:.4f} -> "
                f"{r.dose_secondary_gy:.4f} Gy)",
                out,
            )
            return False
        if self.phase in ACTIVE and r.preset_gy != d.preset_gy and d.first_beam_mono_ns is not None:
            why = f"preset changed during delivery ({d.preset_gy} -> {r.preset_gy} Gy)"
            self.to_fault(r.mono_ns, r.utc, why, out)
            return False
        if r.dose_primary_gy > d.primary_gy and self.phase is not P.IRRADIATING:
            self._beam_off_dose(d, r, out, f"while the console reported {r.state}")
        # Beam-on the host saw: between two consecutive readings both with the beam on.
        beam = P.IRRADIATING is self.phase and r.state is DeviceState.IRRADIATING
        seen = prev_mono is not None and beam and self.last_state is DeviceState.IRRADIATING
        d.take(r, r.mono_ns - prev_mono if seen and prev_mono is not None else 0)
        return True

    def _beam_off_dose(
        self, d: DeliveryRecord, r: SourceReading, out: list[TrackerEvent], when: str
    ) -> None:
        rise = d.add_beam_off_dose(r)
        msg = f"dose rose by {rise:.4f} Gy {when}"
        self._raise(AlarmCode.DOSE_WHILE_BEAM_OFF, msg, r.mono_ns, r.utc, out)

    def _terminate_from_console(
        self, d: DeliveryRecord, r: SourceReading, out: list[TrackerEvent]
    ) -> None:
        status = r.termination or TerminationStatus.UNKNOWN
        reason = r.termination_reason or status.value.lower()
        if status is TerminationStatus.NORMAL:
            doubt = d.normal_end_doubt(self.settings)
            if doubt is not None:
                self.to_fault(r.mono_ns, r.utc, doubt, out)
                return
        self.close(d, status, reason, r.mono_ns, r.utc, P.TERMINATED, out)

    def close(
        self,
        d: DeliveryRecord,
        status: TerminationStatus,
        reason: str,
        mono: int,
        utc: datetime,
        phase: Phase,
        out: list[TrackerEvent],
        *,
        seen_now: bool = False,
    ) -> None:
        """End delivery ``d`` and move to ``phase``. When the input that shows the end also
        ended a monitoring gap, the end fell inside it (unless ``seen_now``: it happened
        when seen) and is bounded by it."""
        end = mono
        g = self.gap_ended
        if g is not None and g.end_mono_ns == mono and not seen_now:
            end, more = d.end_in_gap(g, self.gap_beam_on_s, mono)
            reason += more
        d.close(status, reason, end)
        self.ending_id = d.delivery_id
        self.move(phase, f"terminated {status}: {reason}", mono, utc, out)
        out.append(Terminated(d.delivery_id, status, reason, self._snapshot(d, mono)))

    def to_fault(
        self, mono: int, utc: datetime, cause: str, out: list[TrackerEvent], *, device: bool = False
    ) -> None:
        """To FAULT, with its alarm: ``device`` when the console reported it, else the
        input contradicts itself; an open delivery is closed on the way."""
        code = AlarmCode.DEVICE_FAULT if device else AlarmCode.CONTRADICTORY_INPUT
        self._raise(code, cause, mono, utc, out)
        d = self.delivery
        if d is not None and self.phase in ACTIVE and d.termination is None:
            # A delivery closed from FAULT is never NORMAL: MACHINE when the console itself
            # reported the fault or emergency stop, UNKNOWN when we cannot trust the input.
            status = TerminationStatus.MACHINE if device else TerminationStatus.UNKNOWN
            # A contradiction ends the delivery when it is seen; a fault the console
            # reported may have happened inside a gap before it.
            self.close(d, status, cause, mono, utc, P.FAULT, out, seen_now=not device)
        elif self.phase is not P.FAULT:
            self.move(P.FAULT, cause, mono, utc, out)

    def _snapshot(self, d: DeliveryRecord, now: int) -> DeliverySnapshot:
        return d.snapshot(self.phase, self.settings, now)
