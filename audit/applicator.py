"""The applicator reader's side of one delivery (issue 16), as the auditors' outputs show it.

A pure function of a DeliveryRecord: the reader's identity at beam-on
(``applicator_at_beam_on``), the stand events (the monitor's own interlock, re-locks, the
reader's gaps, and the applicator alarms), the peaks (displacement from the stand's lock
and from beam-on, tilt) and the tolerances in force (the logged config's ``[tolerances]``).
A delivery without reader entries has no applicator side (``None``): its report, exports
and DICOM record are exactly what they were before the reader existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iortd.audit.record import DeliveryRecord

__all__ = [
    "APPLICATOR_ALARMS",
    "APPLICATOR_EVENT_TYPES",
    "ApplicatorSide",
    "applicator_side",
    "is_stand_event",
]

# Entries the daemon writes for the reader (docs/audit-log.md), besides its samples.
APPLICATOR_EVENT_TYPES = (
    "applicator_at_beam_on",
    "applicator_relocked",
    "monitor_interlock_changed",
    "device_gap_started",
    "device_gap_ended",
)
# Alarm codes of the applicator rules (docs/alarms.md).
APPLICATOR_ALARMS = frozenset(
    {"monitor_interlock", "applicator_mismatch", "applicator_displaced", "applicator_tilted"}
)


def is_stand_event(e: dict[str, Any]) -> bool:
    """An applicator/stand event: a reader entry, or a raise/clear of an applicator alarm."""
    kind = e.get("type")
    if kind in APPLICATOR_EVENT_TYPES:
        return True
    d = e.get("data")
    return (
        kind in ("alarm_raised", "alarm_cleared")
        and isinstance(d, dict)
        and d.get("code") in APPLICATOR_ALARMS
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _peak(values: list[Any]) -> float | None:
    nums = [x for x in (_num(v) for v in values) if x is not None]
    return max(nums) if nums else None


@dataclass(frozen=True, slots=True)
class ApplicatorSide:
    device: str | None  # the reader's configured name
    at_beam_on: dict[str, Any] | None  # the applicator_at_beam_on entry's data
    identity: dict[str, Any] | None  # type, diameter_mm, serial (the reader's, at beam-on)
    displacement_tolerance_mm: float | None
    tilt_tolerance_deg: float | None
    peak_from_lock_mm: float | None  # the daemon's peak_displacement_mm (never reset)
    peak_from_beam_on_mm: float | None
    peak_tilt_deg: float | None
    events: list[dict[str, Any]]  # stand events, whole entries, in seq order
    gaps: list[tuple[str | None, str | None, str]]  # the reader's gaps: start, end, cause
    samples: int


def applicator_side(rec: DeliveryRecord) -> ApplicatorSide | None:
    """The delivery's applicator side, or None when the log has no reader entry for it."""
    events = [e for e in rec.events if is_stand_event(e)]
    samples = [e["data"] for e in rec.applicator_samples]
    if not events and not samples:
        return None
    beam_on = next((e["data"] for e in events if e["type"] == "applicator_at_beam_on"), None)
    identity = beam_on.get("applicator") if beam_on else None
    if not isinstance(identity, dict):
        # No beam-on entry (joined late, reader down then): the first reading that had one.
        identity = next(
            (s["applicator"] for s in samples if isinstance(s.get("applicator"), dict)), None
        )
    device = next(
        (str(d["device"]) for d in [*(e["data"] for e in events), *samples] if d.get("device")),
        None,
    )
    gaps: dict[str, tuple[str | None, str | None, str]] = {}
    for e in events:
        d = e["data"]
        if e["type"] in ("device_gap_started", "device_gap_ended"):
            start = d.get("start")
            key = str(start)
            old = gaps.get(key)
            end = d.get("end") if isinstance(d.get("end"), str) else (old[1] if old else None)
            gaps[key] = (start if isinstance(start, str) else None, end, str(d.get("cause")))
    tol = rec.tolerances
    return ApplicatorSide(
        device=device,
        at_beam_on=beam_on,
        identity=identity,
        displacement_tolerance_mm=_num(tol.get("applicator_displacement_mm")),
        tilt_tolerance_deg=_num(tol.get("applicator_tilt_deg")),
        peak_from_lock_mm=_peak(
            [s.get("peak_displacement_mm") for s in samples]
            + [s.get("displacement_magnitude_mm") for s in samples]
        ),
        peak_from_beam_on_mm=_peak([s.get("displacement_from_beam_on_mm") for s in samples]),
        peak_tilt_deg=_peak([s.get("tilt_deg") for s in samples]),
        events=events,
        gaps=list(gaps.values()),
        samples=len(samples),
    )
