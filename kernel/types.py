"""Typed readings that every driver produces and the daemon consumes.

Names follow docs/domain.md (IEC vocabulary). Values are frozen dataclasses: a reading is a
fact observed at one instant and is never edited afterwards.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

__all__ = [
    "ApplicatorFault",
    "ApplicatorIdentity",
    "ApplicatorReading",
    "ApplicatorState",
    "Capability",
    "DeviceIdentity",
    "DeviceState",
    "Interlock",
    "InterlockState",
    "SourceReading",
    "TerminationStatus",
    "Tristate",
    "VerificationItem",
    "VerificationOutcome",
    "VerificationTrigger",
]


class DeviceState(enum.StrEnum):
    """Device states of an IORT source (IEC terms, as on the wire)."""

    OFF = "OFF"
    SELF_TEST = "SELF_TEST"
    STANDBY = "STANDBY"
    PREPARATORY = "PREPARATORY"
    READY = "READY"
    IRRADIATING = "IRRADIATING"
    INTERRUPTED = "INTERRUPTED"
    TERMINATED = "TERMINATED"
    FAULT = "FAULT"
    EMERGENCY_STOP = "EMERGENCY_STOP"
    # A driver that cannot map what the device said uses UNKNOWN; the tracker treats it as
    # contradictory input (FAULT), never as a normal state.
    UNKNOWN = "UNKNOWN"


class TerminationStatus(enum.StrEnum):
    """DICOM (3008,002A) Treatment Termination Status."""

    NORMAL = "NORMAL"
    OPERATOR = "OPERATOR"
    MACHINE = "MACHINE"
    UNKNOWN = "UNKNOWN"


class InterlockState(enum.StrEnum):
    OK = "ok"
    TRIPPED = "tripped"
    # Fail-safe: unknown counts as tripped everywhere it is evaluated.
    UNKNOWN = "unknown"

    @property
    def is_clear(self) -> bool:
        return self is InterlockState.OK


class Interlock(enum.StrEnum):
    """Interlocks an IORT source monitors (docs/domain.md, 'How delivery is controlled')."""

    DOOR = "door"
    EMERGENCY_STOP = "emergency_stop"
    APPLICATOR = "applicator"
    TUBE_VOLTAGE = "kv"
    TUBE_CURRENT = "ua"
    COOLING = "cooling"
    DOSE_CHANNELS = "dose_channels"
    DOSE_RATE = "dose_rate"
    BACKUP_TIMER = "backup_timer"
    COMMUNICATION = "communication"


class Capability(enum.StrEnum):
    """What a driver can do. The daemon is a passive monitor: it never uses BEAM_ABORT
    unless a site explicitly enables it."""

    READ_TELEMETRY = "read_telemetry"
    READ_INTERLOCKS = "read_interlocks"
    READ_APPLICATOR = "read_applicator"
    BEAM_ABORT = "beam_abort"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    manufacturer: str
    model: str
    serial: str
    firmware: str
    simulated: bool
    # Simulators only: the fault scenario the simulator plays (its name and a SHA-256
    # prefix of the file), so that the audit log names it. None for real equipment.
    scenario: str | None = None


@dataclass(frozen=True, slots=True)
class ApplicatorIdentity:
    type: str  # e.g. "spherical", "flat", "balloon"
    diameter_mm: float
    serial: str


class ApplicatorState(enum.StrEnum):
    """An applicator reader and stand's own state (APL-MB/1 input register 0)."""

    OFF = "OFF"
    SELF_TEST = "SELF_TEST"
    READY = "READY"
    FAULT = "FAULT"
    # A code the driver cannot map, or a reading that does not say (one that carries the
    # applicator's identity only): the device's state cannot be trusted.
    UNKNOWN = "UNKNOWN"


class ApplicatorFault(enum.StrEnum):
    """What failed, when an applicator reader and stand is in FAULT (APL-MB/1 input
    register 1)."""

    READER = "READER"
    POSITION = "POSITION"
    TILT = "TILT"
    BRAKE = "BRAKE"
    INTERNAL = "INTERNAL"
    UNKNOWN = "UNKNOWN"  # a code the map does not list: still a fault


class Tristate(enum.StrEnum):
    """A yes/no sensor that may not be able to tell. Fail safe: UNKNOWN counts as the
    unsafe answer (not seated, not locked, brakes released)."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


class VerificationOutcome(enum.StrEnum):
    """The outcome of the check of the console against the prescription before beam-on:
    DICOM's Treatment Verification Status (3008,002C), the same spelling."""

    VERIFIED = "VERIFIED"
    NOT_VERIFIED = "NOT_VERIFIED"
    VERIFIED_OVR = "VERIFIED_OVR"  # a physicist's signed override of the named mismatches


class VerificationItem(enum.StrEnum):
    """One item of that check; a failed item is a reason (docs/prescriptions.md)."""

    NO_PRESCRIPTION = "no_prescription"  # none pending for the room
    SIGNATURE = "signature"  # the approver's key is no longer enrolled / valid / a physicist
    EXPIRED = "expired"  # the prescription's not_after has passed
    ALREADY_DELIVERED = "already_delivered"  # a delivery was already given under it
    APPLICATOR = "applicator"  # the console's applicator is not the prescribed one
    APPLICATOR_READER = "applicator_reader"  # the reader's applicator is not the prescribed one
    DOSE = "dose"  # the console's preset vs the prescribed dose, beyond tolerance
    TIME = "time"  # the console's planned time vs the independent time, beyond tolerance
    TIME_UNCHECKED = "time_unchecked"  # no independent time (no table entry / output factor)


class VerificationTrigger(enum.StrEnum):
    """What made a check."""

    READY = "ready"  # the console became READY (a plan selected, before beam-on)
    BEAM_ON = "beam_on"  # the beam came on with no check made at READY
    PRESCRIPTION = "prescription"  # a prescription or output factor arrived while READY
    OVERRIDE = "override"  # a physicist's signed override
    JOINED = "joined"  # a delivery joined in progress (the daemon started late)


@dataclass(frozen=True, slots=True)
class ApplicatorReading:
    """One sample of an applicator reader and positioning stand (docs/protocols.md,
    APL-MB/1), or only the applicator's identity from a device that reports no more: every
    other field then keeps its default, which never reads as safe (state and flags
    UNKNOWN, measurements and counters None).

    ``displacement_mm`` is the tip's displacement (x, y, z) since the stand was last locked,
    ``displacement_magnitude_mm`` its length as the device computed it, ``tilt_deg`` the
    angle between the applicator's axis now and at that lock; each None when the device
    cannot say (never locked, a position or tilt fault). ``lock_counter`` changes at every
    lock (a re-lock moves the reference), ``seat_counter`` at every seating (a swap
    included), ``heartbeat`` at every refresh of the measurements (unchanged over several
    polls: the values are frozen). ``fault`` is None when none is reported. ``mono_ns`` and
    ``utc``: when the sample was taken, on the daemon's clock.
    """

    mono_ns: int
    utc: datetime
    applicator: ApplicatorIdentity | None  # None: no applicator attached / not recognised
    simulated: bool
    state: ApplicatorState = ApplicatorState.UNKNOWN
    fault: ApplicatorFault | None = None
    seated: Tristate = Tristate.UNKNOWN
    source_locked: Tristate = Tristate.UNKNOWN
    brakes_engaged: Tristate = Tristate.UNKNOWN
    uses_left: int | None = None
    seat_counter: int | None = None
    lock_counter: int | None = None
    heartbeat: int | None = None
    displacement_mm: tuple[float, float, float] | None = None
    displacement_magnitude_mm: float | None = None
    tilt_deg: float | None = None
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class SourceReading:
    """One sample of an X-ray source console.

    Doses are cumulative for the current selection (the primary dose monitor and the
    secondary channel keep their count through an interruption). ``beam_on_s`` is the
    device's own cumulative beam-on timer. ``mono_ns`` and ``utc`` are when the sample was
    taken, on the daemon's clock (a simulator's clock under a speed factor).
    """

    mono_ns: int
    utc: datetime
    state: DeviceState
    dose_rate_gy_min: float
    dose_primary_gy: float
    dose_secondary_gy: float
    preset_gy: float
    beam_on_s: float
    kv: float
    ua: float
    interlocks: Mapping[Interlock, InterlockState]
    # The console's calculated treatment time for the preset, when it reports one.
    planned_time_s: float | None = None
    termination: TerminationStatus | None = None
    termination_reason: str | None = None
    applicator: ApplicatorIdentity | None = None
    simulated: bool = False
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # The console's selection counter, when it reports one: a number that changes at every
    # new selection (plan loaded), so that the same selection is recognised across a
    # restart of the daemon. None: the console does not report one.
    selection: int | None = None

    def interlock(self, which: Interlock) -> InterlockState:
        """State of one interlock; an interlock the device did not report is unknown."""
        return self.interlocks.get(which, InterlockState.UNKNOWN)
