"""Alarms as a table of rules, evaluated in one loop.

Each :class:`Rule` is one row: a code, its severity, a condition (a pure function of what
the tracker knows after an input: its phase, the interlocks, the open delivery's numbers,
the reading), a hold time (the condition must hold continuously for that long, in the
tracker's time, before the alarm is raised) and when it clears. :data:`RULES` is the
table; :class:`AlarmBook` keeps the alarms standing and evaluates the table on each input.
docs/alarms.md lists the same rows for physicists, and a test checks the two against each
other in both directions.

Rules of the design:
- one alarm per key: ``code`` for most rules, ``code:interlock`` for the per-interlock
  rules; raising an alarm already standing with the same severity does nothing, with
  another severity re-raises it (the interlocks are HIGH with the beam on);
- a held condition is judged only on readings, never across a monitoring gap: a gap (time
  that is unknown) restarts every hold, so an alarm with a hold is raised only on readings
  that showed the condition for the whole hold;
- an alarm cleared "when false" clears on the first evaluation that finds the condition
  false (after ``clear_after_s`` of it, when set); one that judges the delivery itself
  stands after the delivery's end until the next selection (``WHEN_FALSE_WHILE_OPEN``);
- some alarms are raised by an event, not by a condition held (contradictory input, a
  fault the console reported, dose with the beam off, the stale-data watchdog): their rows
  have no condition, and the tracker raises them through :meth:`AlarmBook.raise_event`;
- the verification alarms (issue 18) are raised by the daemon's checks through the tracker
  and stand until the event that clears them or the delivery's end (``END_OF_DELIVERY``);
- every alarm still standing is cleared when the next delivery starts, and every hold
  restarts: nothing of one delivery carries over to the next.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from iortd.daemon.tracker.applicator import ApplicatorView
from iortd.daemon.tracker.dose import DeliveryRecord
from iortd.daemon.tracker.events import (
    NS,
    Alarm,
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    Phase,
    Severity,
    TrackerEvent,
)
from iortd.daemon.tracker.machine import ACTIVE
from iortd.daemon.tracker.settings import TrackerSettings
from iortd.kernel.types import DeviceState, Interlock, InterlockState, SourceReading

__all__ = ["RULES", "AlarmBook", "Clears", "Finding", "Rule", "Situation", "When"]


class When(enum.StrEnum):
    """On which inputs a rule is judged."""

    READING = "reading"  # every reading the tracker takes (believed or not)
    INTERLOCKS = "interlocks"  # every reading, and every change of the interlocks without one
    APPLICATOR = "applicator"  # every reading of the source and every input of the reader
    EVENT = "event"  # never by the loop: raised by the event the row names


class Clears(enum.StrEnum):
    WHEN_FALSE = "when_false"  # the condition is false (for clear_after_s, when set)
    WHEN_FALSE_WHILE_OPEN = "when_false_while_open"  # as above up to the delivery's end
    NEXT_READING = "next_reading"  # the next reading (the stale-data watchdog's alarm)
    NEXT_SELECTION = "next_selection"  # latched until the next delivery starts
    END_OF_DELIVERY = "end_of_delivery"  # the event that clears it, or the delivery's end


@dataclass(frozen=True, slots=True)
class Situation:
    """What the rules judge: the tracker's state after one input."""

    phase: Phase
    interlocks: Mapping[Interlock, InterlockState]
    delivery: DeliveryRecord | None
    reading: SourceReading | None  # the reading being taken; None on any other input
    settings: TrackerSettings
    mono_ns: int
    utc: datetime
    judging: bool  # the delivery is open, or ends on this reading
    # The applicator reader, when one is configured (its readings may be unknown).
    applicator: ApplicatorView | None = None


class Finding(NamedTuple):
    active: bool
    message: str  # used when the alarm is raised
    severity: Severity | None = None  # None: the rule's first severity


# A condition judges one subject (an interlock for the per-interlock rules, else None);
# None means "not judged now" (nothing raised, nothing cleared).
Condition = Callable[[Situation, Interlock | None], Finding | None]


@dataclass(frozen=True, slots=True)
class Rule:
    code: AlarmCode
    severities: tuple[Severity, ...]  # the usual one first
    when: When
    condition: Condition | None  # None: raised by an event (``when`` is EVENT)
    clears: Clears
    hold_s: float = 0.0
    clear_after_s: float = 0.0
    per_interlock: bool = False
    settings: tuple[str, ...] = ()  # the TrackerSettings fields it judges by
    what: str = ""  # one line; docs/alarms.md says it for physicists
    subject: Interlock | None = None  # the one interlock a row that is not per-interlock judges

    def key(self, subject: Interlock | None) -> str:
        return f"{self.code}" if subject is None else f"{self.code}:{subject.value}"


# ---- conditions ---------------------------------------------------------------------------


def _interlock(want: InterlockState) -> Condition:
    def judge(s: Situation, il: Interlock | None) -> Finding | None:
        if il is None:  # pragma: no cover - per-interlock rules always get one
            return None
        state = s.interlocks[il]
        beam = s.phase is Phase.IRRADIATING
        # Beam on with an interlock not clear is the worst case: the console should have
        # stopped. Unknown is treated exactly like tripped (fail-safe).
        sev = Severity.HIGH if beam or il is Interlock.EMERGENCY_STOP else Severity.MEDIUM
        text = f"interlock {il.value} {state.value}" + (" with beam on" if beam else "")
        return Finding(state is want, text, sev)

    return judge


def _channels(s: Situation, _: Interlock | None) -> Finding | None:
    # Two independent dose channels must agree (25 Pa. Code §228.66).
    d = s.delivery
    if d is None:
        return None
    limit = d.channel_limit_gy(s.settings)
    return Finding(
        abs(d.primary_gy - d.secondary_gy) > limit,
        f"dose channels disagree: primary {d.primary_gy:.3f} Gy, secondary "
        f"{d.secondary_gy:.3f} Gy (limit {limit:.3f} Gy)",
    )


def _no_expected_rate(s: Situation, _: Interlock | None) -> Finding | None:
    d = s.delivery
    if d is None:
        return None
    return Finding(
        s.phase in ACTIVE and d.expected_rate(s.settings) is None,
        "no expected dose rate (plan or console): rate deviation and backup timer "
        "are not checked by the monitor",
    )


def _rate(s: Situation, _: Interlock | None) -> Finding | None:
    d = s.delivery
    if d is None:
        return None
    st = s.settings
    expected = d.expected_rate(st)
    seg = d.segments[-1] if d.segments else None
    settled = (
        s.phase is Phase.IRRADIATING
        and seg is not None
        and seg.end_mono_ns is None
        and (s.mono_ns - seg.start_mono_ns) / NS >= st.rate_settle_s
    )
    deviation = abs(d.dose_rate_gy_min - expected) / expected if expected and settled else 0.0
    return Finding(
        deviation > st.dose_rate_rel,
        f"dose rate {d.dose_rate_gy_min:.3f} Gy/min deviates {deviation:.1%} from "
        f"expected {expected or 0:.3f} Gy/min (limit {st.dose_rate_rel:.0%})",
    )


def _backup_timer(s: Situation, _: Interlock | None) -> Finding | None:
    d = s.delivery
    if d is None:
        return None
    beam_on = d.beam_on_s
    backup = d.backup_limit_s(s.settings)
    return Finding(
        backup is not None and beam_on > backup,
        f"beam-on time {beam_on:.1f} s beyond the backup-timer limit {backup or 0:.1f} s",
    )


def _overdose(s: Situation, _: Interlock | None) -> Finding | None:
    d = s.delivery
    if d is None:
        return None
    rel = s.settings.overdose_rel
    return Finding(
        d.primary_gy > d.preset_gy * (1 + rel),
        f"delivered {d.primary_gy:.3f} Gy exceeds preset {d.preset_gy} Gy by more than {rel:.1%}",
    )


def _kv(s: Situation, _: Interlock | None) -> Finding | None:
    r = s.reading
    if r is None:
        return None
    st = s.settings
    beam = s.phase is Phase.IRRADIATING and r.state is DeviceState.IRRADIATING
    return Finding(
        beam and abs(r.kv - st.nominal_kv) > st.kv_tolerance_kv,
        f"tube voltage {r.kv:.1f} kV outside {st.nominal_kv:g} ± {st.kv_tolerance_kv:g} kV "
        "with the beam on",
    )


def _beam(s: Situation) -> bool:
    return s.phase is Phase.IRRADIATING


def _mismatch(s: Situation, _: Interlock | None) -> Finding | None:
    v = s.applicator
    if v is None or v.reading is None:
        return None  # unknown readings: the monitor's interlock is unknown (its own row)
    return Finding(v.mismatch is not None, f"applicator identity mismatch: {v.mismatch}")


def _displaced(s: Situation, _: Interlock | None) -> Finding | None:
    v, tol = s.applicator, s.settings.applicator_displacement_mm
    if v is None or v.reading is None or tol is None:
        return None
    lock, since = v.displacement_mm, v.displacement_from_beam_on_mm
    known = [x for x in (lock, since) if x is not None]
    mag = max(known, default=0.0)

    def mm(x: float | None) -> str:
        return "unknown" if x is None else f"{x:.2f} mm"

    return Finding(
        _beam(s) and mag > tol,
        f"applicator displaced {mag:.2f} mm with the beam on (from the stand's lock "
        f"{mm(lock)}, from beam-on {mm(since)}; tolerance {tol:g} mm)",
    )


def _tilted(s: Situation, _: Interlock | None) -> Finding | None:
    v, tol = s.applicator, s.settings.applicator_tilt_deg
    if v is None or v.reading is None or tol is None or v.tilt_deg is None:
        return None
    return Finding(
        _beam(s) and abs(v.tilt_deg) > tol,
        f"applicator tilted {v.tilt_deg:.2f} deg from the stand's lock with the beam on "
        f"(tolerance {tol:g} deg)",
    )


def _monitor_interlock(s: Situation, _: Interlock | None) -> Finding | None:
    v = s.applicator
    if v is None:
        return None
    beam = _beam(s)
    grace = s.settings.applicator_first_reading_s
    if (
        not beam
        and v.reading is None
        and v.awaiting_first_s is not None
        and grace is not None
        and v.awaiting_first_s <= grace
    ):
        return None  # the reader's first reading is still due (bounded; never with beam on)
    return Finding(
        v.monitor_interlock is not InterlockState.OK and s.phase in ACTIVE,
        f"monitor's applicator interlock {v.monitor_interlock.value} ({v.device}): {v.cause}"
        + (" with beam on" if beam and "with the beam on" not in v.cause else ""),
        Severity.HIGH if beam else Severity.MEDIUM,
    )


# ---- the table ----------------------------------------------------------------------------

H, M, L = Severity.HIGH, Severity.MEDIUM, Severity.LOW
C = AlarmCode

RULES: tuple[Rule, ...] = (
    Rule(C.INTERLOCK_TRIPPED, (H, M), When.INTERLOCKS, _interlock(InterlockState.TRIPPED),
         Clears.WHEN_FALSE, per_interlock=True,
         what="the console reports the interlock tripped"),
    Rule(C.INTERLOCK_UNKNOWN, (H, M), When.INTERLOCKS, _interlock(InterlockState.UNKNOWN),
         Clears.WHEN_FALSE, per_interlock=True,
         what="the interlock is not reported or cannot be read (counts as tripped)"),
    Rule(C.DOSE_CHANNEL_DISAGREEMENT, (H,), When.READING, _channels,
         Clears.WHEN_FALSE_WHILE_OPEN, settings=("dose_channel_abs_gy", "dose_channel_rel"),
         what="the two dose channels differ by more than the limit"),
    Rule(C.NO_EXPECTED_RATE, (L,), When.READING, _no_expected_rate, Clears.WHEN_FALSE,
         what="a delivery is active and no expected dose rate is known"),
    Rule(C.DOSE_RATE_DEVIATION, (H,), When.READING, _rate, Clears.WHEN_FALSE,
         settings=("dose_rate_rel", "rate_settle_s"),
         what="the dose rate deviates from the expected rate once settled"),
    Rule(C.BACKUP_TIMER_EXCEEDED, (H,), When.READING, _backup_timer,
         Clears.WHEN_FALSE_WHILE_OPEN, settings=("backup_timer_margin_rel",),
         what="beam-on time passes the planned time plus the margin"),
    Rule(C.OVERDOSE, (H,), When.READING, _overdose, Clears.WHEN_FALSE,
         settings=("overdose_rel",), what="the primary dose exceeds the preset by the limit"),
    Rule(C.KV_OUT_OF_RANGE, (H,), When.READING, _kv, Clears.WHEN_FALSE, hold_s=2.0,
         settings=("nominal_kv", "kv_tolerance_kv"),
         what="the tube voltage stays outside the band around nominal with the beam on"),
    Rule(C.STALE_DATA, (H,), When.EVENT, None, Clears.NEXT_READING,
         settings=("stale_after_s",), what="nothing heard from the device for the bound"),
    Rule(C.CONTRADICTORY_INPUT, (H,), When.EVENT, None, Clears.NEXT_SELECTION,
         settings=("stop_accuracy_rel",), what="input the tracker cannot believe: to FAULT"),
    Rule(C.DEVICE_FAULT, (H,), When.EVENT, None, Clears.NEXT_SELECTION,
         what="the console reported FAULT or EMERGENCY_STOP"),
    Rule(C.DOSE_WHILE_BEAM_OFF, (H,), When.EVENT, None, Clears.NEXT_SELECTION,
         what="the dose count rose while the console reported the beam off"),
    Rule(C.MONITOR_INTERLOCK, (H, M), When.APPLICATOR, _monitor_interlock, Clears.WHEN_FALSE,
         subject=Interlock.APPLICATOR,
         what="the monitor's own applicator interlock (from the reader) is not ok in a delivery"),
    Rule(C.APPLICATOR_MISMATCH, (H,), When.APPLICATOR, _mismatch, Clears.WHEN_FALSE,
         what="the applicator the reader sees is not the one the console reports"),
    Rule(C.APPLICATOR_DISPLACED, (H,), When.APPLICATOR, _displaced, Clears.WHEN_FALSE,
         settings=("applicator_displacement_mm",),
         what="the applicator moved beyond the tolerance with the beam on"),
    Rule(C.APPLICATOR_TILTED, (H,), When.APPLICATOR, _tilted, Clears.WHEN_FALSE,
         settings=("applicator_tilt_deg",),
         what="the applicator tilted beyond the tolerance with the beam on"),
    Rule(C.PRESCRIPTION_NOT_VERIFIED, (H,), When.EVENT, None, Clears.END_OF_DELIVERY,
         what="a check of the console against the prescription found a mismatch"),
    Rule(C.NO_PRESCRIPTION, (H,), When.EVENT, None, Clears.END_OF_DELIVERY,
         what="the beam came on with no valid prescription pending (verification on)"),
)  # fmt: skip


def _order(rules: Sequence[Rule]) -> tuple[tuple[Rule, Interlock | None], ...]:
    """Rows in table order; a run of per-interlock rows is judged interlock by interlock
    (each interlock's rows together), so its alarms come out grouped by interlock."""
    out: list[tuple[Rule, Interlock | None]] = []
    i = 0
    while i < len(rules):
        j = i
        while j < len(rules) and rules[j].per_interlock:
            j += 1
        if j > i:
            out += [(r, il) for il in Interlock for r in rules[i:j]]
            i = j
        else:
            out.append((rules[i], rules[i].subject))
            i += 1
    return tuple(out)


class AlarmBook:
    """The alarms standing, and the one loop that judges the table (``RULES`` unless a
    test gives its own)."""

    def __init__(self, rules: Sequence[Rule] = RULES) -> None:
        self._by_code = {r.code: r for r in rules}
        self._on: Mapping[When, tuple[tuple[Rule, Interlock | None], ...]] = {
            When.READING: _order([r for r in rules if r.when is not When.EVENT]),
            When.INTERLOCKS: _order([r for r in rules if r.when is When.INTERLOCKS]),
            When.APPLICATOR: _order([r for r in rules if r.when is When.APPLICATOR]),
        }
        self._standing: dict[str, Alarm] = {}
        self._true_since: dict[str, int] = {}  # key -> mono_ns the condition became true
        self._false_since: dict[str, int] = {}  # key -> mono_ns a standing one became false

    @property
    def standing(self) -> tuple[Alarm, ...]:
        return tuple(self._standing.values())

    def evaluate(
        self, s: Situation, when: When, delivery_id: str | None, out: list[TrackerEvent]
    ) -> None:
        """Judge every row that is judged on this kind of input, in table order."""
        for rule, subject in self._on[when]:
            f = None if rule.condition is None else rule.condition(s, subject)
            if f is None:
                continue
            key = rule.key(subject)
            if f.active:
                self._false_since.pop(key, None)
                since = self._true_since.setdefault(key, s.mono_ns)
                held = (s.mono_ns - since) / NS
                # (A tick may be stamped after the reading that follows it: without a hold
                # nothing is measured, so a negative "held" must not hold anything back.)
                if not rule.hold_s or held >= rule.hold_s:
                    text = f"{f.message} (for {held:.1f} s)" if rule.hold_s else f.message
                    sev = f.severity or rule.severities[0]
                    self._raise(rule.code, key, sev, text, s, delivery_id, out)
                continue
            self._true_since.pop(key, None)
            if rule.clears is Clears.WHEN_FALSE_WHILE_OPEN and not s.judging:
                continue  # judged the delivery: stands after its end until the next
            if rule.clear_after_s and key in self._standing:
                false = self._false_since.setdefault(key, s.mono_ns)
                if (s.mono_ns - false) / NS < rule.clear_after_s:
                    continue
            self._false_since.pop(key, None)
            self.clear(key, s.mono_ns, s.utc, delivery_id, out)

    def raise_event(
        self,
        code: AlarmCode,
        message: str,
        mono: int,
        utc: datetime,
        delivery_id: str | None,
        out: list[TrackerEvent],
    ) -> None:
        """Raise a row that an event raises (no condition, no hold)."""
        rule = self._by_code[code]
        alarm = Alarm(code, f"{code}", rule.severities[0], message, mono, utc)
        self._put(alarm, delivery_id, out)

    def clear(
        self, key: str, mono: int, utc: datetime, delivery_id: str | None, out: list[TrackerEvent]
    ) -> None:
        alarm = self._standing.pop(key, None)
        if alarm is not None:
            out.append(AlarmCleared(delivery_id, alarm, mono, utc))

    def clear_at_end(
        self, mono: int, utc: datetime, delivery_id: str | None, out: list[TrackerEvent]
    ) -> None:
        """A delivery ended: the alarms that stand until its end are cleared."""
        for key, alarm in list(self._standing.items()):
            rule = self._by_code.get(alarm.code)
            if rule is not None and rule.clears is Clears.END_OF_DELIVERY:
                self.clear(key, mono, utc, delivery_id, out)

    def clear_all(
        self, mono: int, utc: datetime, delivery_id: str | None, out: list[TrackerEvent]
    ) -> None:
        """A new delivery starts: nothing of the last one carries over, holds included."""
        for key in list(self._standing):
            self.clear(key, mono, utc, delivery_id, out)
        self.restart_holds()

    def restart_holds(self) -> None:
        """A monitoring gap: whether a condition held across it is unknown."""
        self._true_since.clear()
        self._false_since.clear()

    def _raise(
        self,
        code: AlarmCode,
        key: str,
        severity: Severity,
        message: str,
        s: Situation,
        delivery_id: str | None,
        out: list[TrackerEvent],
    ) -> None:
        alarm = Alarm(code, key, severity, message, s.mono_ns, s.utc)
        self._put(alarm, delivery_id, out)

    def _put(self, alarm: Alarm, delivery_id: str | None, out: list[TrackerEvent]) -> None:
        current = self._standing.get(alarm.key)
        if current is not None and current.severity is alarm.severity:
            return
        self._standing[alarm.key] = alarm
        out.append(AlarmRaised(delivery_id, alarm))
