"""Machine-readable exports of one delivery: CSV (samples, events) and JSON.

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

from iortd.audit.record import DeliveryRecord, Interval

__all__ = [
    "EVENT_COLUMNS",
    "JSON_FORMAT",
    "SAMPLE_COLUMNS",
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
    if kind == "delivery_terminated":
        return f"terminated {d.get('status')}: {d.get('reason')}"
    if kind == "delivery_amended":
        return f"amended: {d.get('reason')}"
    return str(kind)


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
                fmt_value(d.get("operator")) if e.get("type") == "operator_action" else "",
                fmt_value(d),
                fmt_value(e.get("hash")),
            ]
        )
    return _csv(EVENT_COLUMNS, rows)


def _interval(i: Interval) -> dict[str, Any]:
    return {"kind": i.kind, "start": i.start, "end": i.end, "cause": i.cause}


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
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
