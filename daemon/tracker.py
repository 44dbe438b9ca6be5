"""The delivery tracker: a pure state machine that turns readings into a delivery.

No I/O and no clock reads: time arrives with the readings (``mono_ns``, ``utc``) and with
``tick``. Feed it by hand in tests; the daemon feeds it from drivers.

Rules it enforces (docs/domain.md, "How delivery is controlled"):
- delivered dose never decreases; a console whose cumulative count goes down, reports an
  unknown state or non-finite values is contradictory input and drives the tracker to FAULT;
  a delivery closed from FAULT is never NORMAL;
- an interlock the console did not report, or that could not be read, is unknown, and unknown
  counts as tripped (``all_clear`` is true only when every interlock is ok);
- an interrupted-then-resumed delivery is a sequence of dose segments that tile the
  delivered dose with no gap and no double count; dose that rises while the beam is
  supposed to be off is kept (never lost) in a segment of its own, flagged, and alarmed;
- a monitoring gap (link lost, nothing heard from the device) makes every interlock
  unknown and is recorded with its start and end. Time inside it is unknown, not beam-on,
  and never a contradiction: beam-on is the console's timer, or the host's view between
  two consecutive readings; an end that fell inside a gap is bounded by it and says so;
- elapsed runs from the first beam as the console's timer places it, and is never shorter
  than beam-on (one time base on every display);
- an event carries the delivery id only while that delivery is open: the end entry is the
  last of its reading, and after it everything belongs to the room;
- after a restart, ``resume`` takes over the delivery the log shows open; the first
  believed reading decides whether the console is in the same selection (continue it),
  a new one (close it UNKNOWN), or cannot tell (close it and link the next record);
  ``link_unvouched`` names a delivery the start closed because its whole record was
  unvouched: a record started on the first believed reading links to it, with all the
  dose shown then as ``in_previous_record``. A link is only for a record that starts on
  the reading that decided it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)

__all__ = [
    "TRANSITIONS",
    "Alarm",
    "AlarmCleared",
    "AlarmCode",
    "AlarmRaised",
    "DeliveryAmended",
    "DeliverySnapshot",
    "DeliveryStarted",
    "DeliveryTracker",
    "Gap",
    "IllegalTransition",
    "InterlockChanged",
    "Interruption",
    "MonitoringGapEnded",
    "MonitoringGapStarted",
    "Phase",
    "PhaseChanged",
    "ResumedDelivery",
    "Segment",
    "Severity",
    "Terminated",
    "TrackerEvent",
    "TrackerSettings",
]

NS = 1_000_000_000


class Phase(enum.StrEnum):
    IDLE = "IDLE"
    PREPARATORY = "PREPARATORY"
    READY = "READY"
    IRRADIATING = "IRRADIATING"
    INTERRUPTED = "INTERRUPTED"
    TERMINATED = "TERMINATED"
    FAULT = "FAULT"


P = Phase
# The only moves the tracker makes. A selection dropped before beam-on (console back to
# STANDBY from PREPARATORY or READY) is closed as TERMINATED (OPERATOR) first, then IDLE.
# Joining a delivery already under way (the daemon started late, or restarted) is allowed
# from IDLE and recorded as such; anything else the console reports that is not in this
# table is contradictory and goes to FAULT.
TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset(
    {
        (P.IDLE, P.PREPARATORY),
        (P.IDLE, P.READY),
        (P.IDLE, P.IRRADIATING),
        (P.IDLE, P.INTERRUPTED),
        (P.PREPARATORY, P.READY),
        (P.PREPARATORY, P.TERMINATED),
        (P.READY, P.IRRADIATING),
        (P.READY, P.PREPARATORY),
        (P.READY, P.TERMINATED),
        (P.IRRADIATING, P.INTERRUPTED),
        (P.IRRADIATING, P.TERMINATED),
        (P.INTERRUPTED, P.IRRADIATING),
        (P.INTERRUPTED, P.TERMINATED),
        (P.TERMINATED, P.IDLE),
        (P.TERMINATED, P.PREPARATORY),
        (P.FAULT, P.IDLE),
        (P.FAULT, P.PREPARATORY),
    }
    | {(p, P.FAULT) for p in Phase if p is not P.FAULT}
)

_ACTIVE = frozenset({P.PREPARATORY, P.READY, P.IRRADIATING, P.INTERRUPTED})
_BEAM_PHASES = frozenset({P.IRRADIATING})


class IllegalTransition(Exception):
    def __init__(self, src: Phase, dst: Phase) -> None:
        super().__init__(f"illegal tracker transition {src} -> {dst}")
        self.src = src
        self.dst = dst


class Severity(enum.StrEnum):
    """Alarm priorities after IEC 60601-1-8."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class AlarmCode(enum.StrEnum):
    INTERLOCK_TRIPPED = "interlock_tripped"
    INTERLOCK_UNKNOWN = "interlock_unknown"
    DOSE_CHANNEL_DISAGREEMENT = "dose_channel_disagreement"
    DOSE_RATE_DEVIATION = "dose_rate_deviation"
    BACKUP_TIMER_EXCEEDED = "backup_timer_exceeded"
    OVERDOSE = "overdose"
    STALE_DATA = "stale_data"
    CONTRADICTORY_INPUT = "contradictory_input"
    DEVICE_FAULT = "device_fault"
    DOSE_WHILE_BEAM_OFF = "dose_while_beam_off"
    NO_EXPECTED_RATE = "no_expected_rate"


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """Tolerances in force (per-device settings; the daemon logs them)."""

    stale_after_s: float
    expected_rate_gy_min: float | None = None
    dose_channel_rel: float = 0.05
    dose_channel_abs_gy: float = 0.05
    dose_rate_rel: float = 0.10
    rate_settle_s: float = 10.0
    overdose_rel: float = 0.02
    stop_accuracy_rel: float = 0.01
    backup_timer_margin_rel: float = 0.10
    delivery_id_prefix: str = "D"


@dataclass(frozen=True, slots=True)
class Alarm:
    code: AlarmCode
    key: str  # identifies one alarm condition, e.g. "interlock_tripped:door"
    severity: Severity
    message: str
    raised_mono_ns: int
    raised_utc: datetime


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of delivered dose. ``kind`` is "beam" for irradiation the console reported,
    "beam_off" for dose that rose while the console said the beam was off (an anomaly)."""

    kind: str
    start_gy: float
    end_gy: float
    start_mono_ns: int
    end_mono_ns: int | None


@dataclass(frozen=True, slots=True)
class Interruption:
    cause: str
    start_mono_ns: int
    dose_at_start_gy: float
    end_mono_ns: int | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.end_mono_ns is None else (self.end_mono_ns - self.start_mono_ns) / NS


@dataclass(frozen=True, slots=True)
class Gap:
    """A monitoring gap: from the last good reading to the first one after it."""

    cause: str
    start_mono_ns: int
    start_utc: datetime
    end_mono_ns: int | None = None
    end_utc: datetime | None = None


@dataclass(frozen=True, slots=True)
class ResumedDelivery:
    """A delivery the audit log shows open when the daemon starts (it stopped or crashed
    during it): what its last recorded sample said, and since when nobody watched."""

    delivery_id: str
    started_utc: datetime
    phase: Phase  # the tracker's phase at the last sample
    preset_gy: float
    primary_gy: float
    secondary_gy: float
    beam_on_s: float
    elapsed_s: float
    selection: int | None  # the console's selection counter then (None: not reported)
    simulated: bool
    unwatched_since_utc: datetime  # the last vouched entry of the log
    cause: str  # why nobody watched (e.g. "daemon not running (crash stop)")


@dataclass(frozen=True, slots=True)
class DeliverySnapshot:
    delivery_id: str
    phase: Phase
    joined_in_progress: bool
    preset_gy: float
    delivered_primary_gy: float
    delivered_secondary_gy: float
    remaining_gy: float
    dose_rate_gy_min: float
    expected_rate_gy_min: float | None
    planned_time_s: float | None
    backup_timer_limit_s: float | None
    beam_on_s: float
    elapsed_s: float
    estimated_remaining_s: float | None
    applicator: ApplicatorIdentity | None
    segments: tuple[Segment, ...]
    interruptions: tuple[Interruption, ...]
    gaps: tuple[Gap, ...]
    termination: TerminationStatus | None
    termination_reason: str | None
    started_utc: datetime
    simulated: bool


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryStarted:
    delivery_id: str
    mono_ns: int
    utc: datetime
    preset_gy: float
    joined_in_progress: bool
    # An explicit link when this record may continue the treatment of an earlier one that
    # the daemon could not be sure of after a restart (closed UNKNOWN): its id and why.
    continues: str | None = None
    continues_reason: str | None = None


@dataclass(frozen=True, slots=True)
class PhaseChanged:
    delivery_id: str | None
    src: Phase
    dst: Phase
    cause: str
    mono_ns: int
    utc: datetime


@dataclass(frozen=True, slots=True)
class InterlockChanged:
    interlock: Interlock
    old: InterlockState
    new: InterlockState
    mono_ns: int
    utc: datetime
    # The open delivery the change happened in; None between deliveries (the room's).
    delivery_id: str | None = None


@dataclass(frozen=True, slots=True)
class AlarmRaised:
    delivery_id: str | None
    alarm: Alarm


@dataclass(frozen=True, slots=True)
class AlarmCleared:
    delivery_id: str | None
    alarm: Alarm
    mono_ns: int
    utc: datetime


@dataclass(frozen=True, slots=True)
class MonitoringGapStarted:
    delivery_id: str | None
    gap: Gap


@dataclass(frozen=True, slots=True)
class MonitoringGapEnded:
    delivery_id: str | None
    gap: Gap


@dataclass(frozen=True, slots=True)
class Terminated:
    delivery_id: str
    status: TerminationStatus
    reason: str
    summary: DeliverySnapshot


@dataclass(frozen=True, slots=True)
class DeliveryAmended:
    """A closed delivery's record corrected by what the console showed afterwards (its
    own end, or dose given after the monitor closed it). Appended, never rewritten: the
    termination status does not change."""

    delivery_id: str
    reason: str
    summary: DeliverySnapshot


TrackerEvent = (
    DeliveryStarted
    | PhaseChanged
    | InterlockChanged
    | AlarmRaised
    | AlarmCleared
    | MonitoringGapStarted
    | MonitoringGapEnded
    | Terminated
    | DeliveryAmended
)


# ---- the tracker --------------------------------------------------------------------------


@dataclass(slots=True)
class _Delivery:
    delivery_id: str
    joined: bool
    started_mono_ns: int
    started_utc: datetime
    preset_gy: float
    planned_time_s: float | None
    applicator: ApplicatorIdentity | None
    simulated: bool
    primary_gy: float = 0.0
    secondary_gy: float = 0.0
    dose_rate_gy_min: float = 0.0
    device_beam_on_s: float = 0.0
    observed_beam_on_ns: int = 0
    first_beam_mono_ns: int | None = None
    end_mono_ns: int | None = None
    segments: list[Segment] = field(default_factory=list)
    interruptions: list[Interruption] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    termination: TerminationStatus | None = None
    termination_reason: str | None = None
    dose_at_close_gy: float | None = None


def _first_beam(r: SourceReading) -> int:
    """When the beam first came on, on the host's clock: the console's own timer says it
    has been on ``beam_on_s`` by this reading, so it came on at least that long ago (the
    start fell between two polls). Elapsed time and beam-on time then share one time
    base, and elapsed is never shorter than beam-on."""
    return r.mono_ns - max(round(r.beam_on_s * NS), 0)


def _beam_on_s(d: _Delivery) -> float:
    """Beam-on time: the console's own timer, or what the host saw with the beam on
    between two consecutive readings when that is more (a console timer that lags). Time
    inside a monitoring gap is never counted: it is unknown, not beam-on."""
    return max(d.device_beam_on_s, d.observed_beam_on_ns / NS)


_IN_SELECTION = frozenset(
    {
        DeviceState.PREPARATORY,
        DeviceState.READY,
        DeviceState.IRRADIATING,
        DeviceState.INTERRUPTED,
        DeviceState.TERMINATED,
        DeviceState.FAULT,
        DeviceState.EMERGENCY_STOP,
    }
)


def _same_selection(rd: ResumedDelivery, r: SourceReading) -> tuple[str, str]:
    """Is the console still in the selection the record shows open? ("same" | "new" |
    "unsure", why). With a selection counter on both sides, the counter decides (with the
    preset and the counts); without one, the fallback is: same preset, and the dose and
    beam-on counts not reset, with some dose already recorded (before any dose a new
    selection of the same preset looks the same, so that is "unsure")."""
    if r.state not in _IN_SELECTION:
        return "new", f"the console left the selection meanwhile (now {r.state})"
    if r.preset_gy != rd.preset_gy:
        return "new", f"the console shows another preset ({rd.preset_gy} -> {r.preset_gy} Gy)"
    if r.dose_primary_gy < rd.primary_gy or r.beam_on_s < rd.beam_on_s:
        return "new", (
            f"the console's counters were reset (dose {rd.primary_gy:.4f} -> "
            f"{r.dose_primary_gy:.4f} Gy): a new selection"
        )
    if rd.selection is not None and r.selection is not None:
        if rd.selection != r.selection:
            return (
                "new",
                f"the console's selection counter changed ({rd.selection} -> {r.selection})",
            )
        return "same", "same selection counter"
    if rd.selection is not None or r.selection is not None:
        return "unsure", (
            "the selection counter is known on one side only (recorded "
            f"{rd.selection}, console {r.selection}): cannot be sure it is the same selection"
        )
    if rd.primary_gy > 0:
        return "same", "same preset, counts not reset (the console reports no selection counter)"
    return "unsure", (
        "no dose recorded yet and the console reports no selection counter: cannot be sure "
        "it is the same selection"
    )


# What follows the room in a delivery id this daemon makes (see _new_delivery): the start
# time to the microsecond, and a counter when two start within one.
_OWN_ID_SUFFIX = r"-[0-9]{8}T[0-9]{12}Z(?:-[1-9][0-9]{0,5})?"

# The console states from which a reading with no delivery open starts a record.
_STARTS_A_RECORD = frozenset(
    {DeviceState.PREPARATORY, DeviceState.READY, DeviceState.IRRADIATING, DeviceState.INTERRUPTED}
)


def _hms(t: datetime | None) -> str:
    return "?" if t is None else f"{t:%H:%M:%S.%f}"[:-3]


def _finite_nonneg(*values: float | None) -> bool:
    return all(v is None or (math.isfinite(v) and v >= 0) for v in values)


class DeliveryTracker:
    def __init__(self, settings: TrackerSettings) -> None:
        if not (settings.stale_after_s > 0):
            raise ValueError("stale_after_s must be > 0")
        self.settings = settings
        self.phase = Phase.IDLE
        self._delivery: _Delivery | None = None
        self._interlocks: dict[Interlock, InterlockState] = dict.fromkeys(
            Interlock, InterlockState.UNKNOWN
        )
        self._alarms: dict[str, Alarm] = {}
        self._last_mono_ns: int | None = None
        self._last_utc: datetime | None = None
        self._last_state: DeviceState | None = None
        self._gap: Gap | None = None
        # Beam state when the open gap started: which phase, and the console's timer.
        self._gap_phase: Phase = Phase.IDLE
        self._gap_beam_on_s = 0.0
        # Set while one reading is taken: the gap it ended, and the delivery it closed.
        self._gap_ended: Gap | None = None
        self._ending_id: str | None = None
        # The last time the device was heard from (any reply, also one a driver has not
        # turned into a reading yet): staleness is about the device, not the driver.
        self._heard_mono_ns: int | None = None
        self._ids_issued: set[str] = set()
        # After a restart: the delivery the log shows open, until a reading decides whether
        # the console is still in it; and, when it cannot be sure, the link for the next.
        self._resume: ResumedDelivery | None = None
        self._link: tuple[str, str, float] | None = None  # (old id, why, its dose)
        # After a crash: a delivery whose whole record was unvouched, closed UNKNOWN at
        # start, until a reading decides whether the next record may continue it.
        self._unvouched: str | None = None

    # ---- public view ------------------------------------------------------------------

    @property
    def interlocks(self) -> Mapping[Interlock, InterlockState]:
        return MappingProxyType(self._interlocks)

    @property
    def all_clear(self) -> bool:
        return all(s is InterlockState.OK for s in self._interlocks.values())

    @property
    def alarms(self) -> tuple[Alarm, ...]:
        return tuple(self._alarms.values())

    @property
    def in_gap(self) -> bool:
        return self._gap is not None

    def snapshot(self, now_mono_ns: int | None = None) -> DeliverySnapshot | None:
        d = self._delivery
        if d is None:
            return None
        now = now_mono_ns if now_mono_ns is not None else (self._last_mono_ns or 0)
        return self._snapshot(d, now)

    # ---- inputs -----------------------------------------------------------------------

    def on_reading(self, r: SourceReading) -> list[TrackerEvent]:
        """Take one reading from the source console; return what happened, in order."""
        out: list[TrackerEvent] = []
        self._gap_ended = None
        self._ending_id = None
        if self._last_mono_ns is not None and r.mono_ns < self._last_mono_ns:
            # Monotonic time went backwards: the reading cannot be placed, so none of it is
            # believed: not its doses, and not its interlocks either, which become unknown
            # (fail-safe) rather than keeping the last ok. Events keep the last good time.
            mono, utc = self._last_mono_ns, self._last_utc or r.utc
            self._update_interlocks({}, mono, utc, out)
            self._to_fault(mono, utc, "reading timestamp went backwards", out, None)
            self._interlock_alarms(mono, utc, out)
            return self._end_last(out)
        prev_mono = self._last_mono_ns
        if self._gap is not None:
            gap = replace(self._gap, end_mono_ns=r.mono_ns, end_utc=r.utc)
            d = self._delivery
            # Only a gap that began inside the open delivery is one of its gaps.
            if d is not None and d.gaps and d.gaps[-1] is self._gap:
                d.gaps[-1] = gap
                self._gap_ended = gap
            self._gap = None
            out.append(MonitoringGapEnded(self._delivery_id(), gap))
            # Time across a gap is unknown, not beam-on: nothing is counted from the last
            # reading before it (the beam may have paused inside it).
            prev_mono = None
        self._clear_alarm(f"{AlarmCode.STALE_DATA}", r.mono_ns, r.utc, out)
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
        if self._resume is not None and trusted:
            self._decide_resume(self._resume, r, out)
        if self._unvouched is not None and trusted:
            self._decide_unvouched_link(self._unvouched, r)
        if not sane:
            self._to_fault(r.mono_ns, r.utc, "non-finite or negative value in reading", out, r)
        elif r.state is DeviceState.UNKNOWN:
            self._to_fault(r.mono_ns, r.utc, "console reported an unknown state", out, r)
        else:
            self._follow_state(r, prev_mono, out)

        self._evaluate_alarms(r, out)
        self._last_state = r.state
        # A link is for a record that starts on the reading that decided it; a delivery
        # begun later is a new selection (the console was seen idle or at an end first).
        self._link = None
        return self._end_last(out)

    @staticmethod
    def _end_last(out: list[TrackerEvent]) -> list[TrackerEvent]:
        """After a delivery's end entry nothing names it: the alarms judged on the reading
        that ended it come before the end (they are about it), and a move back to idle in
        the same reading comes after it and belongs to the room."""
        ends = [i for i, ev in enumerate(out) if isinstance(ev, Terminated)]
        if not ends:
            return out
        i = ends[-1]
        end = out[i]
        # Up to the next delivery's start in the same reading (after a restart the old
        # one is closed and a new one may start at once): what follows that is the new
        # one's and stays as it is.
        j = next(
            (k for k in range(i + 1, len(out)) if isinstance(out[k], DeliveryStarted)), len(out)
        )
        window = out[i + 1 : j]
        ours = [
            isinstance(ev, AlarmRaised | AlarmCleared) and ev.delivery_id == end.delivery_id
            for ev in window
        ]
        alarms = [ev for ev, o in zip(window, ours, strict=True) if o]
        rest: list[TrackerEvent] = [
            replace(ev, delivery_id=None)
            if isinstance(ev, PhaseChanged | InterlockChanged | AlarmRaised | AlarmCleared)
            and ev.delivery_id == end.delivery_id
            else ev
            for ev, o in zip(window, ours, strict=True)
            if not o
        ]
        return [*out[:i], *alarms, end, *rest, *out[j:]]

    def stale_at_ns(self) -> int | None:
        """When the data become stale if no reading comes (monotonic ns), or None when
        there is nothing to watch (no reading yet, or a gap already open)."""
        if self._last_mono_ns is None or self._gap is not None:
            return None
        return self._heard() + round(self.settings.stale_after_s * NS)

    def _heard(self) -> int:
        last = self._last_mono_ns or 0
        return max(last, self._heard_mono_ns or last)

    def on_device_heard(self, mono_ns: int) -> None:
        """The device answered (a reply a driver has not yet turned into a reading): the
        stale bound counts from its last reply, not from the driver's last reading."""
        self._heard_mono_ns = max(self._heard_mono_ns or mono_ns, mono_ns)

    def on_tick(self, now_mono_ns: int, now_utc: datetime) -> list[TrackerEvent]:
        """Time passes with no reading; detects stale data."""
        out: list[TrackerEvent] = []
        self._ending_id = None
        if self._last_mono_ns is None or self._gap is not None:
            return out
        last = self._heard()
        if (now_mono_ns - last) / NS > self.settings.stale_after_s:
            age = (now_mono_ns - last) / NS
            self._start_gap(
                f"nothing heard from the device for {age:.1f} s "
                f"(bound {self.settings.stale_after_s:.1f} s)",
                now_mono_ns,
                now_utc,
                out,
            )
            self._raise_alarm(
                AlarmCode.STALE_DATA,
                f"{AlarmCode.STALE_DATA}",
                Severity.HIGH,
                f"readings stopped: device last heard {age:.1f} s ago; interlocks unknown",
                now_mono_ns,
                now_utc,
                out,
            )
        return out

    def on_link_lost(self, now_mono_ns: int, now_utc: datetime, reason: str) -> list[TrackerEvent]:
        """The driver reports the device unreachable: fail safe at once."""
        out: list[TrackerEvent] = []
        self._ending_id = None
        if self._gap is None:
            self._start_gap(f"link lost: {reason}", now_mono_ns, now_utc, out)
        elif self._interlocks[Interlock.COMMUNICATION] is not InterlockState.TRIPPED:
            # Already in a gap, but an unplaceable reading since made communication merely
            # unknown: a lost link is communication tripped, whatever came before.
            lost = dict.fromkeys(Interlock, InterlockState.UNKNOWN)
            lost[Interlock.COMMUNICATION] = InterlockState.TRIPPED
            self._update_interlocks(lost, now_mono_ns, now_utc, out)
            self._interlock_alarms(now_mono_ns, now_utc, out)
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
        if self._delivery is not None or self._last_mono_ns is not None:
            raise ValueError("resume() comes before any reading")
        out: list[TrackerEvent] = []
        ago_ns = max(round((now_utc - rd.unwatched_since_utc).total_seconds() * NS), 0)
        since = now_mono_ns - ago_ns
        d = _Delivery(
            delivery_id=rd.delivery_id,
            joined=False,
            started_mono_ns=since,
            started_utc=rd.started_utc,
            preset_gy=rd.preset_gy,
            planned_time_s=None,
            applicator=None,
            simulated=rd.simulated,
            primary_gy=rd.primary_gy,
            secondary_gy=rd.secondary_gy,
            device_beam_on_s=rd.beam_on_s,
        )
        if rd.primary_gy > 0:
            # What the earlier run recorded, as one stretch: its samples hold the detail.
            d.segments.append(Segment("before_restart", 0.0, rd.primary_gy, since, since))
        if rd.phase in (P.IRRADIATING, P.INTERRUPTED) or rd.primary_gy > 0:
            d.first_beam_mono_ns = since - round(rd.elapsed_s * NS)
        self._ids_issued.add(rd.delivery_id)
        self._delivery = d
        self.phase = rd.phase
        self._resume = rd
        self._last_mono_ns, self._last_utc = since, rd.unwatched_since_utc
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
        if self._last_mono_ns is not None and self._resume is None:
            raise ValueError("link_unvouched() comes before any reading")
        # The id comes from entries anyone who can write the log directory may have
        # written; it is repeated on the events topic and in reports only if it has the
        # form of this daemon's own ids for this room (never a name, never oversized).
        own = re.escape(self.settings.delivery_id_prefix) + _OWN_ID_SUFFIX
        if re.fullmatch(own, delivery_id, flags=re.ASCII) is None:
            return False
        self._unvouched = delivery_id
        return True

    def _decide_unvouched_link(self, delivery_id: str, r: SourceReading) -> None:
        self._unvouched = None
        d = self._delivery
        if self._link is not None or (d is not None and d.termination is None):
            return  # the delivery taken over continues, or its own link comes first
        if r.state not in _STARTS_A_RECORD:
            return  # idle or at an end: the next delivery is a new selection
        why = (
            f"the record of {delivery_id} was written after the last seal before a crash "
            f"(unvouched) and was closed UNKNOWN at start: nothing vouched says which "
            f"selection it was; the console was in a delivery at the first reading "
            f"({r.state}, {r.dose_primary_gy:.4f} Gy), which may be the same treatment. "
            "That dose is counted as the earlier record's (in_previous_record): how much of "
            "it was watched is unknown"
        )
        self._link = (delivery_id, why, math.inf)

    def _decide_resume(
        self, rd: ResumedDelivery, r: SourceReading, out: list[TrackerEvent]
    ) -> None:
        """The first believed reading after a restart: same selection or not."""
        self._resume = None
        d = self._delivery
        if d is None:  # pragma: no cover - resume() made it
            return
        verdict, why = _same_selection(rd, r)
        if verdict == "same":
            if r.dose_primary_gy > d.primary_gy:
                # Given while nobody watched: kept, never counted twice, never beam-off.
                d.segments.append(
                    Segment("unmonitored", d.primary_gy, r.dose_primary_gy, r.mono_ns, r.mono_ns)
                )
                d.primary_gy = r.dose_primary_gy
            d.secondary_gy = max(d.secondary_gy, r.dose_secondary_gy)
            d.planned_time_s = r.planned_time_s or d.planned_time_s
            d.applicator = r.applicator or d.applicator
            if self.phase is P.IRRADIATING and r.state is DeviceState.IRRADIATING:
                self._open_segment(d, "beam", r.mono_ns)
            elif self.phase is P.INTERRUPTED and not d.interruptions:
                d.interruptions.append(
                    Interruption("unknown (before the restart)", r.mono_ns, d.primary_gy)
                )
            return
        reason = f"not followed to its end: the daemon was not running; {why}"
        self._close(d, TerminationStatus.UNKNOWN, reason, r.mono_ns, r.utc, P.TERMINATED, out)
        self._move(P.IDLE, "the console's selection could not be continued", r.mono_ns, r.utc, out)
        if verdict == "unsure":
            self._link = (d.delivery_id, why, d.primary_gy)

    # ---- internals --------------------------------------------------------------------

    def _delivery_id(self) -> str | None:
        """The delivery an event belongs to: the open one; after its end entry, only the
        alarms judged on the reading that ended it (put before the end, see _end_last)."""
        d = self._delivery
        if d is None:
            return None
        return d.delivery_id if d.termination is None else self._ending_id

    def _start_gap(self, cause: str, mono: int, utc: datetime, out: list[TrackerEvent]) -> None:
        start_mono = self._last_mono_ns if self._last_mono_ns is not None else mono
        start_utc = self._last_utc if self._last_utc is not None else utc
        self._gap = Gap(cause=cause, start_mono_ns=start_mono, start_utc=start_utc)
        d = self._delivery
        self._gap_phase = self.phase
        self._gap_beam_on_s = d.device_beam_on_s if d is not None else 0.0
        if d is not None and d.termination is None:
            d.gaps.append(self._gap)
        out.append(MonitoringGapStarted(self._delivery_id(), self._gap))
        lost = dict.fromkeys(Interlock, InterlockState.UNKNOWN)
        lost[Interlock.COMMUNICATION] = InterlockState.TRIPPED
        self._update_interlocks(lost, mono, utc, out)
        self._interlock_alarms(mono, utc, out)

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
                out.append(InterlockChanged(il, old, new, mono, utc, self._delivery_id()))

    def _move(
        self, dst: Phase, cause: str, mono: int, utc: datetime, out: list[TrackerEvent]
    ) -> None:
        src = self.phase
        if src is dst:
            return
        if (src, dst) not in TRANSITIONS:
            raise IllegalTransition(src, dst)
        self.phase = dst
        out.append(PhaseChanged(self._delivery_id(), src, dst, cause, mono, utc))

    def _new_delivery(self, r: SourceReading, joined: bool, out: list[TrackerEvent]) -> _Delivery:
        base = f"{self.settings.delivery_id_prefix}-{r.utc:%Y%m%dT%H%M%S%fZ}"
        delivery_id, n = base, 1
        while delivery_id in self._ids_issued:
            n += 1
            delivery_id = f"{base}-{n}"
        self._ids_issued.add(delivery_id)
        d = _Delivery(
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
        for key in list(self._alarms):
            self._clear_alarm(key, r.mono_ns, r.utc, out)
        self._delivery = d
        link, self._link = self._link, None
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
            d.segments.append(Segment("in_previous_record", 0.0, carried, r.mono_ns, r.mono_ns))
            d.primary_gy = carried
        return d

    def _target_phase(self, state: DeviceState) -> Phase | None:
        return {
            DeviceState.OFF: P.IDLE,
            DeviceState.SELF_TEST: P.IDLE,
            DeviceState.STANDBY: P.IDLE,
            DeviceState.PREPARATORY: P.PREPARATORY,
            DeviceState.READY: P.READY,
            DeviceState.IRRADIATING: P.IRRADIATING,
            DeviceState.INTERRUPTED: P.INTERRUPTED,
            DeviceState.TERMINATED: P.TERMINATED,
            DeviceState.FAULT: P.FAULT,
            DeviceState.EMERGENCY_STOP: P.FAULT,
        }.get(state)

    def _follow_state(
        self, r: SourceReading, prev_mono: int | None, out: list[TrackerEvent]
    ) -> None:
        target = self._target_phase(r.state)
        if target is None:  # pragma: no cover - every DeviceState but UNKNOWN is mapped
            self._to_fault(r.mono_ns, r.utc, f"unmapped console state {r.state}", out, r)
            return
        d = self._delivery

        # A new selection: the console entered PREPARATORY from idle or after an end (IEC:
        # after a termination a new selection is required before irradiating again).
        if target is P.PREPARATORY and self.phase in (P.IDLE, P.TERMINATED, P.FAULT):
            d = self._new_delivery(r, joined=False, out=out)
            self._move(P.PREPARATORY, "plan selected", r.mono_ns, r.utc, out)
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
            self._move(P.IDLE, "console counters reset: a new selection", r.mono_ns, r.utc, out)

        if self.phase is P.IDLE and target in (P.READY, P.IRRADIATING, P.INTERRUPTED):
            # Seen first at READY with nothing delivered, only the PREPARATORY moment fell
            # between two polls; past beam-on, dose may have been given unobserved.
            joined = target is not P.READY or r.dose_primary_gy > 0 or r.beam_on_s > 0
            d = self._new_delivery(r, joined=joined, out=out)
            if r.dose_primary_gy > d.primary_gy:
                # Dose given before monitoring began: recorded, but not as observed beam.
                d.segments.append(
                    Segment("unmonitored", d.primary_gy, r.dose_primary_gy, r.mono_ns, r.mono_ns)
                )
            d.primary_gy, d.secondary_gy = r.dose_primary_gy, r.dose_secondary_gy
            why = "monitoring joined a delivery in progress" if joined else "plan selected"
            self._move(target, why, r.mono_ns, r.utc, out)
            if target is P.IRRADIATING:
                self._open_segment(d, "beam", r.mono_ns)
                d.first_beam_mono_ns = _first_beam(r)
            elif target is P.INTERRUPTED:
                d.first_beam_mono_ns = _first_beam(r)
                d.interruptions.append(Interruption("unknown (joined)", r.mono_ns, d.primary_gy))
            self._take_values(d, r, prev_mono, out)
            return

        if d is None or self.phase in (P.IDLE, P.TERMINATED, P.FAULT):
            # Nothing active: watch for dose after the end, follow the console back to idle;
            # everything else waits for a new selection.
            if d is not None and self.phase is not P.IDLE:
                self._watch_after_close(d, r, out)
            if target is P.IDLE and self.phase is not P.IDLE:
                self._move(P.IDLE, f"console {r.state}", r.mono_ns, r.utc, out)
            elif target is P.FAULT and self.phase is not P.FAULT:
                self._to_fault(r.mono_ns, r.utc, f"console {r.state}", out, r, device=True)
            return

        if target is self.phase:
            self._take_values(d, r, prev_mono, out)
            return
        if (
            self._gap_ended is not None
            and self.phase in (P.PREPARATORY, P.READY)
            and target in (P.IRRADIATING, P.INTERRUPTED)
        ):
            # Steps the console took inside a monitoring gap are not a contradiction: the
            # beam came on (and for INTERRUPTED went off again) while nobody watched.
            if self.phase is P.PREPARATORY:
                self._move(P.READY, "ready inside a monitoring gap", r.mono_ns, r.utc, out)
            if target is P.INTERRUPTED:
                if d.first_beam_mono_ns is None:
                    d.first_beam_mono_ns = _first_beam(r)
                self._open_segment(d, "unmonitored", r.mono_ns)
                self._move(P.IRRADIATING, "beam on inside a monitoring gap", r.mono_ns, r.utc, out)
        cancel = target is P.IDLE and self.phase in (P.PREPARATORY, P.READY)
        if (
            (self.phase, target) not in TRANSITIONS
            and target not in (P.FAULT, P.TERMINATED)
            and not cancel
        ):
            self._take_values(d, r, prev_mono, out)
            self._to_fault(
                r.mono_ns, r.utc, f"console went {self.phase} -> {r.state} (not allowed)", out, r
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
                d.first_beam_mono_ns = _first_beam(r)
            self._open_segment(d, "beam", r.mono_ns)
            self._move(P.IRRADIATING, cause, r.mono_ns, r.utc, out)
            self._take_values(d, r, prev_mono, out)
            return

        # Every other move: the dose in this reading still belongs to the phase we were in.
        if not self._take_values(d, r, prev_mono, out):
            return
        if target is P.FAULT:
            reason = "emergency_stop" if r.state is DeviceState.EMERGENCY_STOP else "device_fault"
            reason = r.termination_reason or reason
            self._to_fault(r.mono_ns, r.utc, f"console {r.state}: {reason}", out, r, device=True)
        elif target is P.TERMINATED:
            self._terminate_from_console(d, r, out)
        elif target is P.INTERRUPTED:
            cause = self._interruption_cause()
            self._close_segment(d, r.mono_ns)
            d.interruptions.append(Interruption(cause, r.mono_ns, d.primary_gy))
            self._move(P.INTERRUPTED, f"interrupted: {cause}", r.mono_ns, r.utc, out)
        elif target is P.IDLE:
            # The selection was dropped before any beam: close it as an operator end.
            self._close(
                d,
                TerminationStatus.OPERATOR,
                "selection cancelled before beam-on",
                r.mono_ns,
                r.utc,
                P.TERMINATED,
                out,
            )
            self._move(P.IDLE, f"console {r.state}", r.mono_ns, r.utc, out)
        else:
            self._move(target, f"console {r.state}", r.mono_ns, r.utc, out)

    def _watch_after_close(self, d: _Delivery, r: SourceReading, out: list[TrackerEvent]) -> None:
        """After an end the console keeps the selection's counts until a new selection; a
        count that still rises means radiation after termination: keep it and alarm. A
        count that drops is the console clearing its counters, not a contradiction."""
        if r.dose_primary_gy > d.primary_gy:
            self._add_beam_off_dose(d, r, out, "after the delivery ended")
        d.secondary_gy = max(d.secondary_gy, r.dose_secondary_gy)
        d.device_beam_on_s = max(d.device_beam_on_s, r.beam_on_s)
        d.dose_rate_gy_min = 0.0
        # When the console itself ends (or leaves) a selection the monitor had already
        # closed, and dose was given since, append a correction with the final figures.
        console_done = r.state in (
            DeviceState.TERMINATED,
            DeviceState.STANDBY,
            DeviceState.OFF,
            DeviceState.FAULT,
            DeviceState.EMERGENCY_STOP,
        )
        closed_at = d.dose_at_close_gy
        if console_done and closed_at is not None and d.primary_gy > closed_at:
            d.dose_at_close_gy = d.primary_gy
            out.append(
                DeliveryAmended(
                    d.delivery_id,
                    f"the console ended the selection after the monitor closed the delivery "
                    f"({d.termination}); {d.primary_gy - closed_at:.4f} Gy more was given "
                    f"after closing (console: {r.state}"
                    + (f" {r.termination}" if r.termination else "")
                    + ")",
                    self._snapshot(d, r.mono_ns),
                )
            )

    def _interruption_cause(self) -> str:
        tripped = [il.value for il, s in self._interlocks.items() if s is not InterlockState.OK]
        return "interlock " + ",".join(tripped) if tripped else "operator"

    def _open_segment(self, d: _Delivery, kind: str, mono: int) -> None:
        d.segments.append(Segment(kind, d.primary_gy, d.primary_gy, mono, None))

    def _close_segment(self, d: _Delivery, mono: int) -> None:
        if d.segments and d.segments[-1].end_mono_ns is None:
            d.segments[-1] = replace(d.segments[-1], end_gy=d.primary_gy, end_mono_ns=mono)

    def _take_values(
        self, d: _Delivery, r: SourceReading, prev_mono: int | None, out: list[TrackerEvent]
    ) -> bool:
        """Fold a reading's numbers into the delivery. False if they contradict it."""
        if r.dose_primary_gy < d.primary_gy or r.dose_secondary_gy < d.secondary_gy:
            self._to_fault(
                r.mono_ns,
                r.utc,
                f"cumulative dose decreased (primary {d.primary_gy:.4f} -> "
                f"{r.dose_primary_gy:.4f} Gy, secondary {d.secondary_gy:.4f} -> "
                f"{r.dose_secondary_gy:.4f} Gy)",
                out,
                r,
            )
            return False
        if (
            self.phase in _ACTIVE
            and r.preset_gy != d.preset_gy
            and d.first_beam_mono_ns is not None
        ):
            self._to_fault(
                r.mono_ns,
                r.utc,
                f"preset changed during delivery ({d.preset_gy} -> {r.preset_gy} Gy)",
                out,
                r,
            )
            return False
        if d.first_beam_mono_ns is None:
            d.preset_gy = r.preset_gy  # the selection may still be edited before beam-on
            d.planned_time_s = r.planned_time_s or d.planned_time_s
            d.applicator = r.applicator or d.applicator

        if r.dose_primary_gy > d.primary_gy and self.phase is not P.IRRADIATING:
            self._add_beam_off_dose(d, r, out, f"while the console reported {r.state}")
        d.primary_gy = r.dose_primary_gy
        d.secondary_gy = r.dose_secondary_gy
        if d.segments and d.segments[-1].end_mono_ns is None:
            d.segments[-1] = replace(d.segments[-1], end_gy=d.primary_gy)
        d.dose_rate_gy_min = r.dose_rate_gy_min if r.state is DeviceState.IRRADIATING else 0.0
        d.device_beam_on_s = max(d.device_beam_on_s, r.beam_on_s)
        if (
            prev_mono is not None
            and self.phase is P.IRRADIATING
            and self._last_state is DeviceState.IRRADIATING
            and r.state is DeviceState.IRRADIATING
        ):
            d.observed_beam_on_ns += r.mono_ns - prev_mono
        return True

    def _add_beam_off_dose(
        self, d: _Delivery, r: SourceReading, out: list[TrackerEvent], when: str
    ) -> None:
        # The console says the beam is off but its dose count moved. Keep the dose in a
        # segment of its own (merged while it keeps rising) so the tiling stays exact.
        rise = r.dose_primary_gy - d.primary_gy
        last = d.segments[-1] if d.segments else None
        if last is not None and last.kind == "beam_off" and last.end_gy == d.primary_gy:
            d.segments[-1] = replace(last, end_gy=r.dose_primary_gy, end_mono_ns=r.mono_ns)
        else:
            d.segments.append(
                Segment("beam_off", d.primary_gy, r.dose_primary_gy, r.mono_ns, r.mono_ns)
            )
        d.primary_gy = r.dose_primary_gy
        self._raise_alarm(
            AlarmCode.DOSE_WHILE_BEAM_OFF,
            f"{AlarmCode.DOSE_WHILE_BEAM_OFF}",
            Severity.HIGH,
            f"dose rose by {rise:.4f} Gy {when}",
            r.mono_ns,
            r.utc,
            out,
        )

    def _terminate_from_console(
        self, d: _Delivery, r: SourceReading, out: list[TrackerEvent]
    ) -> None:
        status = r.termination or TerminationStatus.UNKNOWN
        reason = r.termination_reason or status.value.lower()
        if status is TerminationStatus.NORMAL:
            floor = d.preset_gy * (1 - self.settings.stop_accuracy_rel)
            if d.primary_gy < floor:
                self._to_fault(
                    r.mono_ns,
                    r.utc,
                    f"console reported a normal end at {d.primary_gy:.4f} Gy, below "
                    f"{floor:.4f} Gy (preset {d.preset_gy} Gy - stop accuracy)",
                    out,
                    r,
                )
                return
            # The end-of-delivery tolerances are checked on the final values too: a
            # "normal" end with the channels apart or the backup timer overrun is not one.
            s = self.settings
            limit = max(s.dose_channel_abs_gy, s.dose_channel_rel * d.primary_gy)
            backup = self._backup_limit_s(d)
            beam_on = _beam_on_s(d)
            doubt = None
            if abs(d.primary_gy - d.secondary_gy) > limit:
                doubt = (
                    f"dose channels disagree at the end (primary {d.primary_gy:.4f} Gy, "
                    f"secondary {d.secondary_gy:.4f} Gy, limit {limit:.4f} Gy)"
                )
            elif backup is not None and beam_on > backup:
                doubt = f"beam-on {beam_on:.1f} s ran past the backup-timer limit {backup:.1f} s"
            if doubt is not None:
                self._to_fault(
                    r.mono_ns, r.utc, f"console reported a normal end but {doubt}", out, r
                )
                return
        self._close(d, status, reason, r.mono_ns, r.utc, P.TERMINATED, out)

    def _backup_limit_s(self, d: _Delivery) -> float | None:
        planned = self._planned_time_s(d)
        return planned * (1 + self.settings.backup_timer_margin_rel) if planned else None

    def _close(
        self,
        d: _Delivery,
        status: TerminationStatus,
        reason: str,
        mono: int,
        utc: datetime,
        phase: Phase,
        out: list[TrackerEvent],
        *,
        seen_now: bool = False,
    ) -> None:
        end = mono
        g = self._gap_ended
        if g is not None and g.end_mono_ns == mono and not seen_now:
            # The end fell inside a monitoring gap: it happened after the last reading
            # before the gap, and at least as much later as the console's beam-on timer
            # advanced across it; that earliest end bounds elapsed time, not the moment
            # the end was first seen.
            advance = max(d.device_beam_on_s - self._gap_beam_on_s, 0.0)
            end = min(g.start_mono_ns + round(advance * NS), mono)
            reason = (
                f"{reason}; the end fell inside a monitoring gap ({_hms(g.start_utc)} to "
                f"{_hms(g.end_utc)} UTC): its time is known only to within the gap"
            )
        self._close_segment(d, end)
        if d.interruptions and d.interruptions[-1].end_mono_ns is None:
            d.interruptions[-1] = replace(d.interruptions[-1], end_mono_ns=end)
        self._ending_id = d.delivery_id
        d.termination = status
        d.termination_reason = reason
        d.end_mono_ns = end
        d.dose_at_close_gy = d.primary_gy
        self._move(phase, f"terminated {status}: {reason}", mono, utc, out)
        out.append(Terminated(d.delivery_id, status, reason, self._snapshot(d, mono)))

    def _to_fault(
        self,
        mono: int,
        utc: datetime,
        cause: str,
        out: list[TrackerEvent],
        r: SourceReading | None,
        *,
        device: bool = False,
    ) -> None:
        code = AlarmCode.DEVICE_FAULT if device else AlarmCode.CONTRADICTORY_INPUT
        self._raise_alarm(code, f"{code}", Severity.HIGH, cause, mono, utc, out)
        d = self._delivery
        if d is not None and self.phase in _ACTIVE and d.termination is None:
            # A delivery closed from FAULT is never NORMAL: MACHINE when the console itself
            # reported the fault or emergency stop, UNKNOWN when we cannot trust the input.
            status = TerminationStatus.MACHINE if device else TerminationStatus.UNKNOWN
            # A contradiction ends the delivery when it is seen; a fault the console
            # reported may have happened inside a gap before it.
            self._close(d, status, cause, mono, utc, P.FAULT, out, seen_now=not device)
        elif self.phase is not P.FAULT:
            self._move(P.FAULT, cause, mono, utc, out)

    # ---- alarms -----------------------------------------------------------------------

    def _raise_alarm(
        self,
        code: AlarmCode,
        key: str,
        severity: Severity,
        message: str,
        mono: int,
        utc: datetime,
        out: list[TrackerEvent],
    ) -> None:
        current = self._alarms.get(key)
        if current is not None and current.severity is severity:
            return
        alarm = Alarm(code, key, severity, message, mono, utc)
        self._alarms[key] = alarm
        out.append(AlarmRaised(self._delivery_id(), alarm))

    def _clear_alarm(self, key: str, mono: int, utc: datetime, out: list[TrackerEvent]) -> None:
        alarm = self._alarms.pop(key, None)
        if alarm is not None:
            out.append(AlarmCleared(self._delivery_id(), alarm, mono, utc))

    def _set_alarm(
        self,
        active: bool,
        code: AlarmCode,
        key: str,
        severity: Severity,
        message: str,
        mono: int,
        utc: datetime,
        out: list[TrackerEvent],
        *,
        may_clear: bool = True,
    ) -> None:
        """Raise or clear by the condition; with ``may_clear`` False it only raises."""
        if active:
            self._raise_alarm(code, key, severity, message, mono, utc, out)
        elif may_clear:
            self._clear_alarm(key, mono, utc, out)

    def _interlock_alarms(self, mono: int, utc: datetime, out: list[TrackerEvent]) -> None:
        beam = self.phase is P.IRRADIATING
        for il, state in self._interlocks.items():
            for code, want in (
                (AlarmCode.INTERLOCK_TRIPPED, InterlockState.TRIPPED),
                (AlarmCode.INTERLOCK_UNKNOWN, InterlockState.UNKNOWN),
            ):
                # Beam on with an interlock not clear is the worst case: the console should
                # have stopped. Unknown is treated exactly like tripped (fail-safe).
                sev = Severity.HIGH if beam or il is Interlock.EMERGENCY_STOP else Severity.MEDIUM
                self._set_alarm(
                    state is want,
                    code,
                    f"{code}:{il.value}",
                    sev,
                    f"interlock {il.value} {state.value}" + (" with beam on" if beam else ""),
                    mono,
                    utc,
                    out,
                )

    def _expected_rate(self, d: _Delivery) -> float | None:
        if self.settings.expected_rate_gy_min is not None:
            return self.settings.expected_rate_gy_min
        if d.planned_time_s:
            return d.preset_gy / (d.planned_time_s / 60.0)
        return None

    def _planned_time_s(self, d: _Delivery) -> float | None:
        rate = self._expected_rate(d)
        return None if not rate else d.preset_gy / rate * 60.0

    def _evaluate_alarms(self, r: SourceReading, out: list[TrackerEvent]) -> None:
        mono, utc = r.mono_ns, r.utc
        self._interlock_alarms(mono, utc, out)
        d = self._delivery
        if d is None:
            return
        s = self.settings
        active = self.phase in _ACTIVE

        # Conditions that judge the delivery itself are evaluated up to and including the
        # reading that ends it, and then left standing (not cleared because it ended):
        # they are cleared at the next selection.
        judging = d.termination is None or self._ending_id == d.delivery_id

        # Two independent dose channels must agree (25 Pa. Code §228.66).
        diff = abs(d.primary_gy - d.secondary_gy)
        limit = max(s.dose_channel_abs_gy, s.dose_channel_rel * d.primary_gy)
        self._set_alarm(
            diff > limit,
            AlarmCode.DOSE_CHANNEL_DISAGREEMENT,
            f"{AlarmCode.DOSE_CHANNEL_DISAGREEMENT}",
            Severity.HIGH,
            f"dose channels disagree: primary {d.primary_gy:.3f} Gy, secondary "
            f"{d.secondary_gy:.3f} Gy (limit {limit:.3f} Gy)",
            mono,
            utc,
            out,
            may_clear=judging,
        )

        expected = self._expected_rate(d)
        self._set_alarm(
            active and expected is None,
            AlarmCode.NO_EXPECTED_RATE,
            f"{AlarmCode.NO_EXPECTED_RATE}",
            Severity.LOW,
            "no expected dose rate (plan or console): rate deviation and backup timer "
            "are not checked by the monitor",
            mono,
            utc,
            out,
        )
        seg = d.segments[-1] if d.segments else None
        settled = (
            self.phase is P.IRRADIATING
            and seg is not None
            and seg.end_mono_ns is None
            and (mono - seg.start_mono_ns) / NS >= s.rate_settle_s
        )
        deviation = abs(d.dose_rate_gy_min - expected) / expected if expected and settled else 0.0
        self._set_alarm(
            deviation > s.dose_rate_rel,
            AlarmCode.DOSE_RATE_DEVIATION,
            f"{AlarmCode.DOSE_RATE_DEVIATION}",
            Severity.HIGH,
            f"dose rate {d.dose_rate_gy_min:.3f} Gy/min deviates {deviation:.1%} from "
            f"expected {expected or 0:.3f} Gy/min (limit {s.dose_rate_rel:.0%})",
            mono,
            utc,
            out,
        )

        beam_on = _beam_on_s(d)
        backup = self._backup_limit_s(d)
        self._set_alarm(
            backup is not None and beam_on > backup,
            AlarmCode.BACKUP_TIMER_EXCEEDED,
            f"{AlarmCode.BACKUP_TIMER_EXCEEDED}",
            Severity.HIGH,
            f"beam-on time {beam_on:.1f} s beyond the backup-timer limit {backup or 0:.1f} s",
            mono,
            utc,
            out,
            may_clear=judging,
        )
        over = d.preset_gy * (1 + s.overdose_rel)
        self._set_alarm(
            d.primary_gy > over,
            AlarmCode.OVERDOSE,
            f"{AlarmCode.OVERDOSE}",
            Severity.HIGH,
            f"delivered {d.primary_gy:.3f} Gy exceeds preset {d.preset_gy} Gy by more than "
            f"{s.overdose_rel:.1%}",
            mono,
            utc,
            out,
        )

    def _snapshot(self, d: _Delivery, now: int) -> DeliverySnapshot:
        expected = self._expected_rate(d)
        planned = self._planned_time_s(d)
        remaining = max(d.preset_gy - d.primary_gy, 0.0)
        rate = d.dose_rate_gy_min if d.dose_rate_gy_min > 0 else (expected or 0.0)
        est = None
        if d.termination is not None:
            est = 0.0
        elif rate > 0:
            est = remaining / rate * 60.0
        end = d.end_mono_ns if d.end_mono_ns is not None else now
        elapsed = 0.0 if d.first_beam_mono_ns is None else max(end - d.first_beam_mono_ns, 0) / NS
        beam_on = _beam_on_s(d)
        # One time base: a console timer that runs a little fast cannot put beam-on ahead
        # of elapsed (elapsed includes every interruption, so it is never the shorter).
        elapsed = max(elapsed, beam_on)
        return DeliverySnapshot(
            delivery_id=d.delivery_id,
            phase=self.phase,
            joined_in_progress=d.joined,
            preset_gy=d.preset_gy,
            delivered_primary_gy=d.primary_gy,
            delivered_secondary_gy=d.secondary_gy,
            remaining_gy=remaining,
            dose_rate_gy_min=d.dose_rate_gy_min,
            expected_rate_gy_min=expected,
            planned_time_s=planned,
            backup_timer_limit_s=(
                planned * (1 + self.settings.backup_timer_margin_rel) if planned else None
            ),
            beam_on_s=beam_on,
            elapsed_s=elapsed,
            estimated_remaining_s=est,
            applicator=d.applicator,
            segments=tuple(d.segments),
            interruptions=tuple(d.interruptions),
            gaps=tuple(d.gaps),
            termination=d.termination,
            termination_reason=d.termination_reason,
            started_utc=d.started_utc,
            simulated=d.simulated,
        )
