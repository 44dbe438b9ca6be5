"""Machine-readable exports of one delivery: CSV (samples, events, applicator) and JSON.

Pure functions of a DeliveryRecord, returning bytes: the same log gives byte-identical
files (fixed column order, entries in seq order, numbers written as the log holds them,
canonical JSON). No field is unique to an export run: nothing is taken from the clock.
Formats and columns: docs/reports.md.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from iortd.audit.applicator import ApplicatorSide, applicator_side
from iortd.audit.record import DeliveryRecord, Interval
from iortd.audit.rxcheck import listed

__all__ = [
    "APPLICATOR_COLUMNS",
    "EVENT_COLUMNS",
    "JSON_FORMAT",
    "SAMPLE_COLUMNS",
    "applicator_csv",
    "describe",
    "events_csv",
    "fmt_value",
    "json_export",
    "samples_csv",
]

JSON_FORMAT = "iortd-delivery-export/1"

# (column, key in the sample's data); seq/ts/hash come from the envelope.
SAMPLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", ""),
    ("ts", ""),
    ("at", "at"),
    ("device", "device"),
    ("state", "state"),
    ("phase", "phase"),
    ("dose_rate_gy_min", "dose_rate_gy_min"),
    ("dose_primary_gy", "dose_primary_gy"),
    ("dose_secondary_gy", "dose_secondary_gy"),
    ("preset_gy", "preset_gy"),
    ("delivered_primary_gy", "delivered_primary_gy"),
    ("delivered_secondary_gy", "delivered_secondary_gy"),
    ("remaining_gy", "remaining_gy"),
    ("beam_on_s", "beam_on_s"),
    ("elapsed_s", "elapsed_s"),
    ("estimated_remaining_s", "estimated_remaining_s"),
    ("kv", "kv"),
    ("ua", "ua"),
    ("all_clear", "all_clear"),
    ("interlocks_not_ok", ""),
    ("simulated", "simulated"),
    ("hash", ""),
)

# The applicator reader's samples (issue 16): (column, key in the entry's data).
APPLICATOR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", ""),
    ("ts", ""),
    ("at", "at"),
    ("device", "device"),
    ("state", "state"),
    ("fault", "fault"),
    ("applicator_type", ""),
    ("applicator_diameter_mm", ""),
    ("applicator_serial", ""),
    ("seated", "seated"),
    ("source_locked", "source_locked"),
    ("brakes_engaged", "brakes_engaged"),
    ("uses_left", "uses_left"),
    ("seat_counter", "seat_counter"),
    ("lock_counter", "lock_counter"),
    ("displacement_x_mm", ""),
    ("displacement_y_mm", ""),
    ("displacement_z_mm", ""),
    ("displacement_magnitude_mm", "displacement_magnitude_mm"),
    ("tilt_deg", "tilt_deg"),
    ("displacement_from_beam_on_mm", "displacement_from_beam_on_mm"),
    ("peak_displacement_mm", "peak_displacement_mm"),
    ("monitor_interlocks_not_ok", ""),
    ("simulated", "simulated"),
    ("hash", ""),
)

EVENT_COLUMNS = ("seq", "ts", "at", "type", "description", "operator", "data", "hash")


def fmt_value(v: Any) -> str:
    """A value as CSV text: numbers as Python's shortest round-trip form (what the log's
    JSON holds), booleans as true/false, null as empty, anything else as canonical JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | str):
        return str(v) if not isinstance(v, float) else repr(v)
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


def _csv(header: Iterable[str], rows: Iterable[Iterable[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")  # RFC 4180
    w.writerow(list(header))
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _not_ok(interlocks: Any) -> str:
    if not isinstance(interlocks, Mapping):
        return ""
    return ";".join(f"{k}={v}" for k, v in sorted(interlocks.items()) if v != "ok")


def samples_csv(rec: DeliveryRecord) -> bytes:
    rows = []
    for e in rec.samples:
        d = e["data"]
        row = []
        for col, key in SAMPLE_COLUMNS:
            if col in ("seq", "ts", "hash"):
                row.append(fmt_value(e.get(col)))
            elif col == "interlocks_not_ok":
                row.append(_not_ok(d.get("interlocks")))
            else:
                row.append(fmt_value(d.get(key)))
        rows.append(row)
    return _csv((c for c, _ in SAMPLE_COLUMNS), rows)


def applicator_csv(rec: DeliveryRecord) -> bytes:
    """Every applicator_sample entry of the delivery, one row each (a delivery without a
    reader gives the header only)."""
    rows = []
    for e in rec.applicator_samples:
        d = e["data"]
        app = d.get("applicator") if isinstance(d.get("applicator"), Mapping) else {}
        disp = d.get("displacement_mm")
        xyz = list(disp) if isinstance(disp, list) and len(disp) == 3 else [None] * 3
        derived = {
            "seq": e.get("seq"),
            "ts": e.get("ts"),
            "hash": e.get("hash"),
            "applicator_type": app.get("type"),
            "applicator_diameter_mm": app.get("diameter_mm"),
            "applicator_serial": app.get("serial"),
            "displacement_x_mm": xyz[0],
            "displacement_y_mm": xyz[1],
            "displacement_z_mm": xyz[2],
        }
        row = []
        for col, key in APPLICATOR_COLUMNS:
            if col == "monitor_interlocks_not_ok":
                row.append(_not_ok(d.get("monitor_interlocks")))
            elif key:
                row.append(fmt_value(d.get(key)))
            else:
                row.append(fmt_value(derived.get(col)))
        rows.append(row)
    return _csv((c for c, _ in APPLICATOR_COLUMNS), rows)


def _app(a: Any) -> str:
    if not isinstance(a, Mapping):
        return "none"
    return f"{a.get('type')} {fmt_value(a.get('diameter_mm'))} mm s/n {a.get('serial')}"


def _mm(v: Any) -> str:
    return f"{v:.2f} mm" if isinstance(v, int | float) else "unknown"


def _describe_applicator(kind: Any, d: Mapping[str, Any]) -> str | None:
    """The applicator reader's own entries in words (None: not one of them)."""
    if kind == "applicator_at_beam_on":
        return (
            f"applicator at beam-on ({d.get('device')}): {_app(d.get('applicator'))}, "
            f"displacement {_mm(d.get('displacement_mm'))}, tilt {fmt_value(d.get('tilt_deg'))} deg"
        )
    if kind == "applicator_relocked":
        return (
            f"stand re-locked ({d.get('device')}): lock counter {d.get('from_counter')} -> "
            f"{d.get('to_counter')}, displacement before {_mm(d.get('displacement_before_mm'))} "
            "(the peak is not reset)"
        )
    if kind == "monitor_interlock_changed":
        return (
            f"monitor interlock {d.get('interlock')} ({d.get('device')}): {d.get('from')} -> "
            f"{d.get('to')}: {d.get('cause')}"
        )
    if kind in ("device_gap_started", "device_gap_ended"):
        what = "started" if kind == "device_gap_started" else "ended"
        dur = d.get("duration_s")
        lasted = f", {dur:.1f} s" if isinstance(dur, int | float) else ""
        return f"gap of {d.get('device')} only {what}: {d.get('cause')}{lasted}"
    return None


def describe(e: Mapping[str, Any]) -> str:
    """One event entry in words, for the report's table and the events CSV."""
    d: Mapping[str, Any] = e.get("data") or {}
    kind = e.get("type")
    if kind == "delivery_started":
        joined = (
            " (monitoring joined a delivery in progress)" if d.get("joined_in_progress") else ""
        )
        return f"delivery started, preset {fmt_value(d.get('preset_gy'))} Gy{joined}"
    if kind == "phase_changed":
        return f"{d.get('from')} -> {d.get('to')}: {d.get('cause')}"
    if kind == "interlock_changed":
        return f"interlock {d.get('interlock')}: {d.get('from')} -> {d.get('to')}"
    if kind == "alarm_raised":
        return f"alarm {str(d.get('severity')).upper()} raised: {d.get('message')}"
    if kind == "alarm_cleared":
        return f"alarm cleared: {d.get('key')}"
    if kind in ("monitoring_gap_started", "monitoring_gap_ended", "monitoring_gap"):
        what = {
            "monitoring_gap_started": "monitoring gap started",
            "monitoring_gap_ended": "monitoring gap ended",
            "monitoring_gap": "monitoring gap (found at start-up)",
        }[str(kind)]
        dur = d.get("duration_s")
        lasted = f", {dur:.1f} s" if isinstance(dur, int | float) else ""
        return f"{what}: {d.get('cause')}{lasted}"
    if kind == "operator_action":
        return f"{d.get('operator')}: {d.get('action')}"
    if kind == "alarm_acknowledged":
        return (
            f"alarm acknowledged: {d.get('key')} raised {d.get('raised_at')}, "
            f"by {d.get('name')} ({d.get('by')})"
        )
    if kind == "delivery_terminated":
        return f"terminated {d.get('status')}: {d.get('reason')}"
    if kind == "delivery_amended":
        return f"amended: {d.get('reason')}"
    if kind == "verification":
        failed = ", ".join(str(r) for r in listed(d, "reasons"))
        what = "overridden" if d.get("outcome") == "VERIFIED_OVR" else "failed"
        return f"verification {d.get('outcome')} ({d.get('trigger')})" + (
            f": {what} {failed}" if failed else ""
        )
    if kind == "prescription_used":
        return (
            f"prescription used: {d.get('treatment_id')} / {d.get('plan_id')} fraction "
            f"{d.get('fraction')} ({str(d.get('prescription_sha256'))[:16]}...)"
        )
    return _describe_applicator(kind, d) or str(kind)


def _who(e: Mapping[str, Any]) -> str:
    """The events CSV's ``operator``: who acknowledged (a signed ack's holder id) or acted."""
    d: Mapping[str, Any] = e.get("data") or {}
    if e.get("type") == "operator_action":
        return fmt_value(d.get("operator"))
    if e.get("type") == "alarm_acknowledged":
        return fmt_value(d.get("by"))
    return ""


def events_csv(rec: DeliveryRecord) -> bytes:
    rows = []
    for e in rec.events:
        d = e["data"]
        rows.append(
            [
                fmt_value(e.get("seq")),
                fmt_value(e.get("ts")),
                fmt_value(d.get("at")),
                fmt_value(e.get("type")),
                describe(e),
                _who(e),
                fmt_value(d),
                fmt_value(e.get("hash")),
            ]
        )
    return _csv(EVENT_COLUMNS, rows)


def _interval(i: Interval) -> dict[str, Any]:
    return {"kind": i.kind, "start": i.start, "end": i.end, "cause": i.cause}


def _applicator_block(side: ApplicatorSide) -> dict[str, Any]:
    return {
        "device": side.device,
        "identity_at_beam_on": side.identity,
        "at_beam_on": side.at_beam_on,
        "tolerances": {
            "applicator_displacement_mm": side.displacement_tolerance_mm,
            "applicator_tilt_deg": side.tilt_tolerance_deg,
        },
        "peak_displacement_from_lock_mm": side.peak_from_lock_mm,
        "peak_displacement_from_beam_on_mm": side.peak_from_beam_on_mm,
        "peak_tilt_deg": side.peak_tilt_deg,
        "events": [
            {"seq": e.get("seq"), "type": e.get("type"), "description": describe(e)}
            for e in side.events
        ],
        "reader_gaps": [{"start": s, "end": e, "cause": c} for s, e, c in side.gaps],
        "samples": side.samples,
    }


def json_export(rec: DeliveryRecord) -> bytes:
    """The whole delivery: what the log says about it, the context in force, the
    verification result, and every entry verbatim (each can be re-hashed: canonical JSON
    of the entry without ``hash``, docs/audit-log.md)."""
    v = rec.verification
    cp = rec.checkpoint
    doc = {
        "format": JSON_FORMAT,
        "delivery_id": rec.delivery_id,
        "verification": {
            "intact": v.intact,
            "problem": v.problem,
            "unvouched": v.unvouched,
            "origin": v.origin,
            "files": list(v.files),
            "entries": v.entries,
            "head_seq": v.head_seq,
            "head_hash": v.head_hash,
            "checkpoints_verified": v.checkpoints,
            "signed_through_seq": v.signed_through,
            "signatures_checked_against": v.key,
        },
        "context": {
            "software_version": rec.software_version,
            "clock_speed": rec.clock_speed,
            "config_file": rec.config_file,
            "config_sha256": rec.config_sha256,
            "plan": rec.plan,
            "site": rec.site,
            "tolerances": rec.tolerances,
            "device": rec.device,
            "devices_reidentified": rec.devices_seen,
        },
        "delivery": {
            "started": rec.started,
            "preset_gy": rec.preset_gy,
            "joined_in_progress": rec.joined_in_progress,
            "status": rec.status,
            "reason": rec.reason,
            "delivered_primary_gy": rec.delivered_primary_gy,
            "delivered_secondary_gy": rec.delivered_secondary_gy,
            "summary": rec.summary,
            "amendments": rec.amendments,
            "intervals": [_interval(i) for i in rec.intervals()],
            "simulated": rec.simulated,
        },
        "entry_range": {
            "first_seq": rec.first_seq,
            "first_ts": rec.first_ts,
            "last_seq": rec.last_seq,
            "last_ts": rec.last_ts,
            "last_hash": rec.last_hash,
        },
        "covering_checkpoint": None
        if cp is None
        else {
            "seq": cp.seq,
            "ts": cp.ts,
            "count": cp.count,
            "head_hash": cp.head_hash,
            "signers": list(cp.signers),
            "time": cp.time,
            "reason": cp.reason,
            "note": cp.note,
        },
        "entries": rec.entries,
    }
    pc = rec.prescription_check
    # Always present: null outcome = not checked (no verification entry; rxcheck.py).
    doc["prescription_verification"] = {
        "outcome": pc.outcome,
        "governing_seq": None if pc.governing is None else pc.governing.get("seq"),
        "checked_only_at_or_after_beam_on": pc.after_beam_on,
        "checks_seq": [e.get("seq") for e in pc.checks],
        "prescription_used_seq": pc.used[0].get("seq") if pc.used else None,
    }
    side = applicator_side(rec)
    if side is not None:  # only with a reader: a log without one exports as before
        doc["applicator"] = _applicator_block(side)
    if rec.signoffs:  # the physicists' delivery_signed entries, whole (envelopes included)
        doc["signoffs"] = rec.signoffs
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
