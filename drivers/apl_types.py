"""The applicator reader and stand's reading, as APL-MB/1 carries it (docs/protocols.md).

Defined here, beside the drivers, until the kernel's ``ApplicatorReading`` grows to carry
it (today that type has the applicator's identity only); then these move to
``iortd.kernel.types`` unchanged. :meth:`ApplicatorSample.reading` is the bridge to today's
type.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from iortd.kernel.types import ApplicatorIdentity, ApplicatorReading

__all__ = ["ApplicatorFault", "ApplicatorSample", "ApplicatorState", "Flag"]


class ApplicatorState(enum.StrEnum):
    """The reader/stand's own state (APL-MB/1 input register 0)."""

    OFF = "OFF"
    SELF_TEST = "SELF_TEST"
    READY = "READY"
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"  # a code the map does not list: the device cannot be trusted


class ApplicatorFault(enum.StrEnum):
    """What failed, when the state is FAULT (APL-MB/1 input register 1)."""

    READER = "READER"
    POSITION = "POSITION"
    TILT = "TILT"
    BRAKE = "BRAKE"
    INTERNAL = "INTERNAL"
    UNKNOWN = "UNKNOWN"  # a code the map does not list: still a fault


class Flag(enum.StrEnum):
    """A yes/no sensor that may not be able to tell. Fail safe: UNKNOWN counts as the
    unsafe answer (not seated, not locked, brakes released)."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ApplicatorSample:
    """One reading of an applicator reader and stand: everything APL-MB/1 carries.

    ``displacement_mm`` is the tip's displacement (x, y, z) since the stand was last locked,
    ``displacement_magnitude_mm`` its length as the device computed it, ``tilt_deg`` the
    angle between the applicator's axis now and at that lock; each None when the device
    cannot say (never locked, a position or tilt fault). ``lock_counter`` changes at every
    lock (a re-lock moves the reference), ``seat_counter`` at every seating (a swap
    included), ``heartbeat`` at every refresh of the measurements (unchanged over several
    polls: the values are frozen). ``mono_ns``/``utc``: when the sample was taken, on the
    daemon's clock.
    """

    mono_ns: int
    utc: datetime
    state: ApplicatorState
    fault: ApplicatorFault | None
    seated: Flag
    source_locked: Flag
    brakes_engaged: Flag
    applicator: ApplicatorIdentity | None
    uses_left: int | None
    seat_counter: int
    lock_counter: int
    displacement_mm: tuple[float, float, float] | None
    displacement_magnitude_mm: float | None
    tilt_deg: float | None
    heartbeat: int
    simulated: bool
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def reading(self) -> ApplicatorReading:
        """The part of the sample today's kernel type carries (the identity)."""
        return ApplicatorReading(
            mono_ns=self.mono_ns,
            utc=self.utc,
            applicator=self.applicator,
            simulated=self.simulated,
        )
