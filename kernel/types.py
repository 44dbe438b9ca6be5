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
    "ApplicatorIdentity",
    "ApplicatorReading",
    "Capability",
    "DeviceIdentity",
    "DeviceState",
    "Interlock",
    "InterlockState",
    "SourceReading",
    "TerminationStatus",
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


@dataclass(frozen=True, slots=True)
class ApplicatorReading:
    mono_ns: int
    utc: datetime
    applicator: ApplicatorIdentity | None  # None: no applicator attached / not recognised
    simulated: bool


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
