"""What the daemon writes to the audit log: tracker events and samples as entry data.

Pure functions, so the mapping is tested without a disk. Entry types are documented for
auditors in docs/audit-log.md; keep the two together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from iortd.daemon.sinks import ApplicatorSample, Sample
from iortd.daemon.tracker import (
    AlarmCleared,
    AlarmRaised,
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeviceGapEnded,
    DeviceGapStarted,
    Gap,
    InterlockChanged,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    PhaseChanged,
    Terminated,
    TrackerEvent,
    VerificationChecked,
)
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import ApplicatorIdentity, InterlockState

__all__ = [
    "EVENT_TYPES",
    "applicator_sample_entry",
    "event_entry",
    "num",
    "sample_entry",
    "summary_data",
]

EntrySpec = tuple[str, dict[str, Any], str | None]

EVENT_TYPES = (
    "delivery_started",
    "phase_changed",
    "interlock_changed",
    "alarm_raised",
    "alarm_cleared",
    "monitoring_gap_started",
    "monitoring_gap_ended",
    "delivery_terminated",
    "delivery_amended",
    # The applicator reader (issue 16): the monitor's own interlock, a gap of that device
    # only, a re-lock of the stand, and what the reader showed at beam-on.
    "monitor_interlock_changed",
    "device_gap_started",
    "device_gap_ended",
    "applicator_relocked",
    "applicator_at_beam_on",
    # Verification before beam-on (issue 18): one check of the console against the
    # prescription (daemon/verification.py has the data's shape).
    "verification",
)


def num(x: float | None) -> float | str | None:
    """A reading as recorded: finite numbers as numbers; NaN and infinities as text, so
    that what the device said is kept (JSON has no NaN) and never silently becomes null."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _ts(dt: datetime | None) -> str | None:
    return None if dt is None else utc_ts(dt)


def _applicator(a: ApplicatorIdentity | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"type": a.type, "diameter_mm": num(a.diameter_mm), "serial": a.serial}


def _gap(g: Gap) -> dict[str, Any]:
    return {
        "cause": g.cause,
        "start": _ts(g.start_utc),
        "end": _ts(g.end_utc),
        "duration_s": None
        if g.end_mono_ns is None
        else round((g.end_mono_ns - g.start_mono_ns) / 1e9, 6),
    }


def summary_data(s: DeliverySnapshot) -> dict[str, Any]:
    return {
        "phase": str(s.phase),
        "joined_in_progress": s.joined_in_progress,
        "preset_gy": num(s.preset_gy),
        "delivered_primary_gy": num(s.delivered_primary_gy),
        "delivered_secondary_gy": num(s.delivered_secondary_gy),
        "remaining_gy": num(s.remaining_gy),
        "expected_rate_gy_min": num(s.expected_rate_gy_min),
        "planned_time_s": num(s.planned_time_s),
        "backup_timer_limit_s": num(s.backup_timer_limit_s),
        "beam_on_s": num(s.beam_on_s),
        "elapsed_s": num(s.elapsed_s),
        "applicator": _applicator(s.applicator),
        "segments": [
            {
                "kind": seg.kind,
                "start_gy": num(seg.start_gy),
                "end_gy": num(seg.end_gy),
            }
            for seg in s.segments
        ],
        "interruptions": [
            {
                "cause": i.cause,
                "dose_at_start_gy": num(i.dose_at_start_gy),
                "duration_s": None if i.duration_s is None else round(i.duration_s, 6),
            }
            for i in s.interruptions
        ],
        "gaps": [_gap(g) for g in s.gaps],
        "termination": None if s.termination is None else str(s.termination),
        "termination_reason": s.termination_reason,
        "started": _ts(s.started_utc),
        "simulated": s.simulated,
    }


def event_entry(ev: TrackerEvent, current_delivery: str | None) -> EntrySpec:
    """One tracker event as (type, data, delivery_id)."""
    data: dict[str, Any]
    match ev:
        case DeliveryStarted():
            data = {
                "preset_gy": num(ev.preset_gy),
                "joined_in_progress": ev.joined_in_progress,
                "at": _ts(ev.utc),
            }
            if ev.continues is not None:
                # An explicit link to an earlier record of what may be the same treatment.
                data["continues"] = ev.continues
                data["continues_reason"] = ev.continues_reason
            return "delivery_started", data, ev.delivery_id
        case PhaseChanged():
            return (
                "phase_changed",
                {"from": str(ev.src), "to": str(ev.dst), "cause": ev.cause, "at": _ts(ev.utc)},
                ev.delivery_id,
            )
        case InterlockChanged():
            data = {
                "interlock": str(ev.interlock),
                "from": str(ev.old),
                "to": str(ev.new),
                "at": _ts(ev.utc),
            }
            # The tracker names the open delivery it happened in (None between deliveries,
            # and after an end entry); ``current_delivery`` is only a fallback for an event
            # built by hand without one while a delivery is open.
            return "interlock_changed", data, ev.delivery_id or current_delivery
        case AlarmRaised():
            a = ev.alarm
            data = {
                "code": str(a.code),
                "key": a.key,
                "severity": str(a.severity),
                "message": a.message,
                "at": _ts(a.raised_utc),
            }
            return "alarm_raised", data, ev.delivery_id
        case AlarmCleared():
            data = {"code": str(ev.alarm.code), "key": ev.alarm.key, "at": _ts(ev.utc)}
            return "alarm_cleared", data, ev.delivery_id
        case MonitoringGapStarted():
            return "monitoring_gap_started", _gap(ev.gap), ev.delivery_id
        case MonitoringGapEnded():
            return "monitoring_gap_ended", _gap(ev.gap), ev.delivery_id
        case Terminated():
            data = {
                "status": str(ev.status),
                "reason": ev.reason,
                "summary": summary_data(ev.summary),
            }
            return "delivery_terminated", data, ev.delivery_id
        case DeliveryAmended():
            data = {"reason": ev.reason, "summary": summary_data(ev.summary)}
            return "delivery_amended", data, ev.delivery_id
        case MonitorInterlockChanged():
            data = {
                "device": ev.device,
                "interlock": str(ev.interlock),
                "from": str(ev.old),
                "to": str(ev.new),
                "cause": ev.cause,
                "at": _ts(ev.utc),
            }
            return "monitor_interlock_changed", data, ev.delivery_id
        case DeviceGapStarted():
            data = {"device": ev.device, **_gap(ev.gap), "at": _ts(ev.gap.start_utc)}
            return "device_gap_started", data, ev.delivery_id
        case DeviceGapEnded():
            data = {"device": ev.device, **_gap(ev.gap), "at": _ts(ev.gap.end_utc)}
            return "device_gap_ended", data, ev.delivery_id
        case ApplicatorRelocked():
            data = {
                "device": ev.device,
                "from_counter": ev.old_counter,
                "to_counter": ev.new_counter,
                "displacement_before_mm": num(ev.displacement_before_mm),
                "at": _ts(ev.utc),
            }
            return "applicator_relocked", data, ev.delivery_id
        case ApplicatorAtBeamOn():
            data = {
                "device": ev.device,
                "applicator": _applicator(ev.applicator),
                "displacement_mm": num(ev.displacement_mm),
                "tilt_deg": num(ev.tilt_deg),
                "at": _ts(ev.utc),
            }
            return "applicator_at_beam_on", data, ev.delivery_id
        case VerificationChecked():
            return "verification", dict(ev.entry), ev.delivery_id
    raise TypeError(f"no audit entry for {type(ev).__name__}")  # pragma: no cover


def sample_entry(sample: Sample, *, ended_now: bool = False) -> EntrySpec:
    """A sample belongs to the delivery while it is open, and the sample that ends it
    (``ended_now``: it carries the final dose) belongs to it too."""
    r = sample.reading
    d = sample.delivery
    data: dict[str, Any] = {
        "device": sample.device,
        "at": _ts(r.utc),
        "device_mono_ns": r.mono_ns,
        "state": str(r.state),
        "dose_rate_gy_min": num(r.dose_rate_gy_min),
        "dose_primary_gy": num(r.dose_primary_gy),
        "dose_secondary_gy": num(r.dose_secondary_gy),
        "preset_gy": num(r.preset_gy),
        "beam_on_s": num(r.beam_on_s),
        "kv": num(r.kv),
        "ua": num(r.ua),
        "interlocks": {str(k): str(v) for k, v in sample.interlocks.items()},
        "all_clear": sample.all_clear,
        "simulated": r.simulated,
    }
    if r.selection is not None:  # the console's selection counter, when it reports one
        data["selection"] = r.selection
    if r.extra:  # further numbers a device's register map records (extra.<name>)
        data["extra"] = {k: num(v) for k, v in sorted(r.extra.items())}
    if d is not None:
        data["delivered_primary_gy"] = num(d.delivered_primary_gy)
        data["delivered_secondary_gy"] = num(d.delivered_secondary_gy)
        data["remaining_gy"] = num(d.remaining_gy)
        data["elapsed_s"] = num(d.elapsed_s)
        data["estimated_remaining_s"] = num(d.estimated_remaining_s)
        data["phase"] = str(d.phase)
    belongs = d is not None and (d.termination is None or ended_now)
    return "sample", data, (d.delivery_id if d is not None and belongs else None)


def applicator_sample_entry(
    sample: ApplicatorSample, monitor_interlocks: Mapping[Any, InterlockState]
) -> EntrySpec:
    """One reading of the applicator reader, with what the daemon derived from it and the
    monitor's interlocks after it; it belongs to the delivery open then."""
    r = sample.reading
    d = r.displacement_mm
    data: dict[str, Any] = {
        "device": sample.device,
        "at": _ts(r.utc),
        "device_mono_ns": r.mono_ns,
        "state": str(r.state),
        "fault": None if r.fault is None else str(r.fault),
        "applicator": _applicator(r.applicator),
        "seated": str(r.seated),
        "source_locked": str(r.source_locked),
        "brakes_engaged": str(r.brakes_engaged),
        "uses_left": r.uses_left,
        "seat_counter": r.seat_counter,
        "lock_counter": r.lock_counter,
        "heartbeat": r.heartbeat,
        "displacement_mm": None if d is None else [num(c) for c in d],
        "displacement_magnitude_mm": num(r.displacement_magnitude_mm),
        "tilt_deg": num(r.tilt_deg),
        "displacement_from_beam_on_mm": num(sample.displacement_from_beam_on_mm),
        "peak_displacement_mm": num(sample.peak_displacement_mm),
        "monitor_interlocks": {str(k): str(v) for k, v in monitor_interlocks.items()},
        "simulated": r.simulated,
    }
    if r.extra:
        data["extra"] = {k: num(v) for k, v in sorted(r.extra.items())}
    return "applicator_sample", data, sample.delivery_id


def plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A read-only config mapping as plain JSON-able data."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out[k] = plain(v)
        elif isinstance(v, tuple | list):
            out[k] = [plain(x) if isinstance(x, Mapping) else x for x in v]
        else:
            out[k] = v
    return out
