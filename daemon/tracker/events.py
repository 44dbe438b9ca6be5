"""The tracker's vocabulary: phases, alarms, dose segments, snapshots and events.

These are the types sinks consume (the audit log's entries, the MQTT payloads, the console
printer): plain frozen data, no behaviour beyond a derived property. The tracker makes the
events; the daemon makes a ``ResumedDelivery`` from the log for the tracker to take over.
An event carries the delivery id only while that delivery is open (see :func:`end_last`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from iortd.kernel.types import ApplicatorIdentity, Interlock, InterlockState, TerminationStatus

__all__ = [
    "NS",
    "Alarm",
    "AlarmCleared",
    "AlarmCode",
    "AlarmRaised",
    "ApplicatorAtBeamOn",
    "ApplicatorRelocked",
    "DeliveryAmended",
    "DeliverySnapshot",
    "DeliveryStarted",
    "DeviceGapEnded",
    "DeviceGapStarted",
    "Gap",
    "InterlockChanged",
    "Interruption",
    "MonitorInterlockChanged",
    "MonitoringGapEnded",
    "MonitoringGapStarted",
    "Phase",
    "PhaseChanged",
    "ResumedDelivery",
    "Segment",
    "Severity",
    "Terminated",
    "TrackerEvent",
    "VerificationChecked",
    "end_last",
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
    KV_OUT_OF_RANGE = "kv_out_of_range"
    # The applicator reader and stand (issue 16): the monitor's own checks.
    APPLICATOR_MISMATCH = "applicator_mismatch"
    APPLICATOR_DISPLACED = "applicator_displaced"
    APPLICATOR_TILTED = "applicator_tilted"
    MONITOR_INTERLOCK = "monitor_interlock"
    # Verification before beam-on (issue 18): the console against the room's prescription.
    PRESCRIPTION_NOT_VERIFIED = "prescription_not_verified"
    NO_PRESCRIPTION = "no_prescription"


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
    # The latest verification of this delivery (the MQTT object, daemon/verification.py);
    # None when no check has been made for it (or verification is off).
    verification: Mapping[str, Any] | None = None


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


@dataclass(frozen=True, slots=True)
class MonitorInterlockChanged:
    """An interlock the MONITOR derives (from the applicator reader and stand, and the
    console's view of the applicator), never the console's own: recorded apart from
    :class:`InterlockChanged`, as ``monitor_interlock_changed``. ``cause`` says why."""

    device: str  # the reader it is derived from
    interlock: Interlock
    old: InterlockState
    new: InterlockState
    cause: str
    mono_ns: int
    utc: datetime
    delivery_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceGapStarted:
    """A monitoring gap of one device other than the source (its readings unknown); the
    source's record, and its gaps, are not touched."""

    device: str
    delivery_id: str | None
    gap: Gap


@dataclass(frozen=True, slots=True)
class DeviceGapEnded:
    device: str
    delivery_id: str | None
    gap: Gap


@dataclass(frozen=True, slots=True)
class ApplicatorRelocked:
    """The stand was locked again (its lock counter changed) while a delivery was open:
    its displacement restarts from the new lock; the delivery's peak is kept."""

    device: str
    delivery_id: str | None
    old_counter: int | None
    new_counter: int | None
    displacement_before_mm: float | None  # the last magnitude from the old lock
    mono_ns: int
    utc: datetime


@dataclass(frozen=True, slots=True)
class ApplicatorAtBeamOn:
    """What the reader showed at the delivery's first beam-on: the applicator's identity
    and the displacement from the lock, the reference of "displacement since beam-on"."""

    device: str
    delivery_id: str | None
    applicator: ApplicatorIdentity | None
    displacement_mm: float | None
    tilt_deg: float | None
    mono_ns: int
    utc: datetime


@dataclass(frozen=True, slots=True)
class VerificationChecked:
    """One check of the console against the prescription (daemon/verification.py):
    ``entry`` is the ``verification`` entry's data, ``public`` the MQTT object."""

    delivery_id: str | None
    entry: Mapping[str, Any]
    public: Mapping[str, Any]
    mono_ns: int
    utc: datetime
    simulated: bool = False  # the console it checked is a simulator


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
    | MonitorInterlockChanged
    | DeviceGapStarted
    | DeviceGapEnded
    | ApplicatorRelocked
    | ApplicatorAtBeamOn
    | VerificationChecked
)


def end_last(out: list[TrackerEvent]) -> list[TrackerEvent]:
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
    j = next((k for k in range(i + 1, len(out)) if isinstance(out[k], DeliveryStarted)), len(out))
    window = out[i + 1 : j]
    ours = [
        isinstance(ev, AlarmRaised | AlarmCleared) and ev.delivery_id == end.delivery_id
        for ev in window
    ]
    alarms = [ev for ev, o in zip(window, ours, strict=True) if o]
    rest: list[TrackerEvent] = [
        replace(ev, delivery_id=None)
        if isinstance(
            ev,
            PhaseChanged | InterlockChanged | MonitorInterlockChanged | AlarmRaised | AlarmCleared,
        )
        and ev.delivery_id == end.delivery_id
        else ev
        for ev, o in zip(window, ours, strict=True)
        if not o
    ]
    return [*out[:i], *alarms, end, *rest, *out[j:]]
