"""The applicator reader and stand beside the source (issue 16): what the tracker keeps of
one reader, and the monitor's own applicator interlock derived from it.

The reader (role ``applicator``, APL-MB/1 or the ``sim`` driver) reports the applicator's
identity, whether it is seated, the stand's brakes and lock, the tip's displacement since
the stand was locked and its tilt. An :class:`ApplicatorWatch` keeps, per reader:

- its last believed reading, or None while its readings are unknown (never read, its link
  lost: a monitoring gap of THAT device only, which never touches the source's record or
  its interlocks; a reading that cannot be placed in time or carries a non-finite value);
- a heartbeat watch: the same heartbeat on more than :data:`HEARTBEAT_FROZEN_POLLS`
  consecutive polls after the one that set it means the measurements are frozen, so the
  reader counts as stale (its readings unknown) until the heartbeat moves again;
- one position frame for the whole run: a re-lock (the lock counter changes) restarts the
  device's displacement at 0, so the tracker adds the last displacement before it to an
  offset; "displacement since beam-on" is then measured across re-locks, and a re-lock
  inside a delivery is an event (:class:`ApplicatorRelocked`) that never resets the
  delivery's peak (the largest displacement from a lock the reader showed in it);
- the reference at the delivery's first beam-on (:class:`ApplicatorAtBeamOn`); for a
  delivery taken over after a restart there is none in this run (the earlier run's record
  holds it): "since beam-on" is then unknown, and the peak counts from the restart.

The monitor's applicator interlock (``monitor_interlocks``, recorded as
``monitor_interlock_changed``, never as the console's ``interlock_changed``) is, in order:
UNKNOWN while the readings are unknown or the reader is not READY (TRIPPED when it reports
FAULT); TRIPPED when the applicator the reader sees is not the one the console reports;
TRIPPED with the beam on when the applicator is not seated or the brakes are not engaged
(an UNKNOWN sensor counts as the unsafe answer); OK otherwise. Movement beyond the
tolerances is an alarm (``applicator_displaced``, ``applicator_tilted``), not a trip: the
monitor cannot tell a drifting stand from a re-registered one, and the physicist decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime

from iortd.daemon.tracker.events import (
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeviceGapEnded,
    DeviceGapStarted,
    Gap,
    TrackerEvent,
)
from iortd.kernel.types import (
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    InterlockState,
    Tristate,
)

__all__ = ["HEARTBEAT_FROZEN_POLLS", "ApplicatorView", "ApplicatorWatch", "identity_mismatch"]

# More consecutive polls than this with the same heartbeat after the one that set it: the
# reader's values are frozen (APL-MB/1 refreshes at least every 100 ms; at the usual
# 10 Hz poll that is over half a second without a refresh).
HEARTBEAT_FROZEN_POLLS = 5
_DIAMETER_SLACK_MM = 0.05
Vec = tuple[float, float, float]
_ZERO: Vec = (0.0, 0.0, 0.0)


def _norm(v: Vec) -> float:
    return math.sqrt(sum(c * c for c in v))


def _named(serial: str) -> bool:
    return bool(serial) and serial != "-"


def identity_mismatch(
    console: ApplicatorIdentity | None, reader: ApplicatorIdentity | None
) -> str | None:
    """Why the applicator the console reports and the one the reader sees differ, or None
    (also when the console reports none: nothing to compare with). Serials are compared
    when both name one ("-" is a console that does not report it)."""
    if console is None:
        return None
    if reader is None:
        return f"the console reports {_show(console)}, the reader sees no applicator"
    same = (
        console.type == reader.type
        and abs(console.diameter_mm - reader.diameter_mm) <= _DIAMETER_SLACK_MM
        and (
            not (_named(console.serial) and _named(reader.serial))
            or console.serial == reader.serial
        )
    )
    if same:
        return None
    return f"the console reports {_show(console)}, the reader sees {_show(reader)}"


def _show(a: ApplicatorIdentity) -> str:
    return f"{a.type} {a.diameter_mm:g} mm (serial {a.serial})"


@dataclass(frozen=True, slots=True)
class ApplicatorView:
    """One reader as the rules and the sinks see it after an input."""

    device: str
    reading: ApplicatorReading | None  # None: its readings are unknown
    monitor_interlock: InterlockState
    cause: str  # why the monitor's interlock is what it is
    mismatch: str | None
    displacement_mm: float | None  # from the stand's lock, as the reader reports it
    displacement_from_beam_on_mm: float | None
    peak_displacement_mm: float | None  # the open delivery's, from a lock; never reset
    tilt_deg: float | None
    # Seconds since the tracker's first input while the reader has given no reading and
    # lost no link yet (its first reading still due); None once it has.
    awaiting_first_s: float | None = None


def _believable(r: ApplicatorReading) -> bool:
    nums = [*(r.displacement_mm or ()), r.displacement_magnitude_mm, r.tilt_deg]
    return all(x is None or math.isfinite(x) for x in nums)


class ApplicatorWatch:
    """What the tracker keeps of one reader (see the module's notes)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.reading: ApplicatorReading | None = None
        self.gap: Gap | None = None
        self.cause_unknown = "no reading from the reader yet"
        self.state = InterlockState.UNKNOWN
        self.cause = self.cause_unknown
        self._last_mono: int | None = None
        self._heartbeat: int | None = None
        self._repeats = 0
        self._lock: int | None = None
        self._offset: Vec = _ZERO  # the frame across re-locks
        self._last_vec: Vec | None = None
        self._delivery: str | None = None
        self._beam_on_ref: Vec | None = None
        self._ref_lost = False  # a delivery taken over after a restart: no reference here
        self._peak: float | None = None
        self._first_input: int | None = None  # the tracker's first input (mono ns)
        self._heard_of = False  # a reading or a lost link came: the start is over
        self.awaiting_first_s: float | None = None

    # ---- inputs -----------------------------------------------------------------------

    def take(self, r: ApplicatorReading, delivery_id: str | None, out: list[TrackerEvent]) -> None:
        """One reading. A reading that cannot be placed (time went backwards) or that
        carries a non-finite measurement makes the readings unknown until the next."""
        self.follow_delivery(delivery_id)
        self._heard_of = True
        if self.gap is not None:
            gap = replace(self.gap, end_mono_ns=r.mono_ns, end_utc=r.utc)
            out.append(DeviceGapEnded(self.device, delivery_id, gap))
            self.gap = None
        if self._last_mono is not None and r.mono_ns < self._last_mono:
            self._unknown("reading timestamp went backwards")
            return
        self._last_mono = r.mono_ns
        if not _believable(r):
            self._unknown("non-finite displacement or tilt in reading")
            return
        if r.heartbeat is not None and r.heartbeat == self._heartbeat:
            self._repeats += 1
        else:
            self._repeats = 0
        self._heartbeat = r.heartbeat
        if self._repeats > HEARTBEAT_FROZEN_POLLS:
            self._unknown(
                f"heartbeat {r.heartbeat} unchanged for {self._repeats} polls: values frozen"
            )
            return
        if r.lock_counter != self._lock and self._lock is not None and self._last_vec:
            # The stand locked again where it is: the device's displacement restarts at 0.
            o, v = self._offset, self._last_vec
            self._offset = (o[0] + v[0], o[1] + v[1], o[2] + v[2])
            if delivery_id is not None:
                before = None if self.reading is None else self.reading.displacement_magnitude_mm
                out.append(
                    ApplicatorRelocked(
                        self.device, delivery_id, self._lock, r.lock_counter, before,
                        r.mono_ns, r.utc,
                    )
                )  # fmt: skip
        self._lock = r.lock_counter
        self._last_vec = r.displacement_mm
        self.reading = r
        mag = self._magnitude(r)
        if delivery_id is not None and mag is not None:
            self._peak = mag if self._peak is None else max(self._peak, mag)

    def lose(
        self, reason: str, mono: int, utc: datetime, delivery_id: str | None
    ) -> list[TrackerEvent]:
        """The reader's link is lost: its readings unknown, a gap of this device only."""
        self._heard_of = True
        if self.gap is not None:
            return []
        start_mono = self._last_mono if self._last_mono is not None else mono
        start_utc = self.reading.utc if self.reading is not None else utc
        self.gap = Gap(cause=f"link lost: {reason}", start_mono_ns=start_mono, start_utc=start_utc)
        self._unknown(f"reader link lost: {reason}")
        return [DeviceGapStarted(self.device, delivery_id, self.gap)]

    def follow_delivery(self, delivery_id: str | None) -> None:
        """A new delivery: its peak and beam-on reference start afresh."""
        if delivery_id is not None and delivery_id != self._delivery:
            self._delivery = delivery_id
            self._beam_on_ref = None
            self._ref_lost = False
            self._peak = None if self.reading is None else self._magnitude(self.reading)

    def taken_over(self, delivery_id: str) -> None:
        """A delivery taken over after a restart: where the applicator was at its beam-on
        is in the earlier run's record, not here, so "since beam-on" stays unknown (never
        a new reference mid-delivery); its peak counts from the restart."""
        self.follow_delivery(delivery_id)
        self._ref_lost = True

    def at_beam_on(
        self, delivery_id: str | None, mono: int, utc: datetime, out: list[TrackerEvent]
    ) -> None:
        """The beam is on: the first time in this delivery, the reference is taken from
        the last believed reading of a READY reader with a position (none yet: from the
        next one)."""
        r = self.reading
        if self._beam_on_ref is not None or self._ref_lost or r is None or delivery_id is None:
            return
        if r.state is not ApplicatorState.READY or r.displacement_mm is None:
            return  # no position to refer to yet (a self-test, never locked): the next
        self._beam_on_ref = self._frame(r)
        out.append(
            ApplicatorAtBeamOn(
                self.device, delivery_id, r.applicator, self._magnitude(r), r.tilt_deg, mono, utc
            )
        )

    def note_input(self, mono: int) -> None:
        """Any input of the tracker: while the reader's first reading is still due, how
        long it has been due (the start's grace, judged by the rules)."""
        if self._first_input is None:
            self._first_input = mono
        if self._heard_of:
            self.awaiting_first_s = None
        else:
            self.awaiting_first_s = max(0, mono - self._first_input) / 1e9

    # ---- what the rules see ----------------------------------------------------------

    def judge(
        self, console: ApplicatorIdentity | None, beam_on: bool
    ) -> tuple[InterlockState, str]:
        r = self.reading
        if r is None:
            return InterlockState.UNKNOWN, self.cause_unknown
        if r.state is ApplicatorState.FAULT:
            fault = r.fault.value if r.fault is not None else "unspecified"
            return InterlockState.TRIPPED, f"the reader reports FAULT ({fault})"
        if r.state is not ApplicatorState.READY:
            return InterlockState.UNKNOWN, f"the reader's state is {r.state.value}"
        why = identity_mismatch(console, r.applicator)
        if why is not None:
            return InterlockState.TRIPPED, f"applicator identity mismatch: {why}"
        if beam_on and r.seated is not Tristate.YES:
            return InterlockState.TRIPPED, f"applicator seated: {r.seated.value} with the beam on"
        if beam_on and r.brakes_engaged is not Tristate.YES:
            return (
                InterlockState.TRIPPED,
                f"stand brakes engaged: {r.brakes_engaged.value} with the beam on",
            )
        return InterlockState.OK, "reader ok"

    def view(self, console: ApplicatorIdentity | None) -> ApplicatorView:
        r = self.reading
        since_beam_on = None
        if r is not None and self._beam_on_ref is not None and r.displacement_mm is not None:
            now, ref = self._frame(r), self._beam_on_ref
            since_beam_on = _norm((now[0] - ref[0], now[1] - ref[1], now[2] - ref[2]))
        return ApplicatorView(
            device=self.device,
            reading=r,
            monitor_interlock=self.state,
            cause=self.cause,
            mismatch=None if r is None else identity_mismatch(console, r.applicator),
            displacement_mm=None if r is None else self._magnitude(r),
            displacement_from_beam_on_mm=since_beam_on,
            peak_displacement_mm=self._peak,
            tilt_deg=None if r is None else r.tilt_deg,
            awaiting_first_s=self.awaiting_first_s,
        )

    # ---- internals --------------------------------------------------------------------

    def _unknown(self, why: str) -> None:
        self.reading = None
        self.cause_unknown = why

    def _frame(self, r: ApplicatorReading) -> Vec:
        d = r.displacement_mm or _ZERO
        o = self._offset
        return (o[0] + d[0], o[1] + d[1], o[2] + d[2])

    @staticmethod
    def _magnitude(r: ApplicatorReading) -> float | None:
        if r.displacement_mm is not None:
            return _norm(r.displacement_mm)
        return r.displacement_magnitude_mm
