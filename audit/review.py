"""Reading a log for people: entries as lines, deliveries as summaries.

Works on the parsed entries; verification is verify.py's job (the command runs both).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.audit.rxcheck import RX_ENTRY_TYPES, PrescriptionCheck, listed, prescription_check
from iortd.auditlog.verify import iter_entries

__all__ = [
    "DeliveryRecord",
    "collect_deliveries",
    "format_entry",
    "format_summary",
    "load_entries",
]


def load_entries(files: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Entries one at a time (a log can be far larger than memory), up to the first line
    that is not a whole entry."""
    for _path, _n, raw in iter_entries(files):
        if not raw.endswith(b"\n"):
            return
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(entry, dict):
            yield entry


def _mmss(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "--:--"
    s = max(round(seconds), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _gy(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else str(x)


def format_entry(e: dict[str, Any]) -> str:
    d = e.get("data") or {}
    kind = e.get("type", "?")
    did = e.get("delivery_id") or "-"
    if kind == "sample":
        text = (
            f"{d.get('state')} dose {_gy(d.get('dose_primary_gy'))}/{_gy(d.get('preset_gy'))} Gy "
            f"(2nd {_gy(d.get('dose_secondary_gy'))}) rate {_gy(d.get('dose_rate_gy_min'))} Gy/min "
            f"beam-on {_mmss(d.get('beam_on_s'))} kV {d.get('kv')} uA {d.get('ua')}"
            + ("" if d.get("all_clear") else " INTERLOCKS NOT CLEAR")
            # Written while the room was idle (docs/operations.md): why, and for how many
            # readings it stands.
            + (f" [{d['kept']}, {d.get('unrecorded')} not recorded]" if "kept" in d else "")
        )
    elif kind == "checkpoint":
        text = f"count {d.get('count')} head {str(d.get('head'))[:16]}..."
    elif kind == "config_loaded":
        text = f"{d.get('file')} sha256 {str(d.get('sha256'))[:16]}..."
    elif kind == "delivery_terminated":
        s = d.get("summary") or d.get("last_sample") or {}
        text = (
            f"{d.get('status')} ({d.get('reason')}) delivered "
            f"{_gy(s.get('delivered_primary_gy'))} Gy"
        )
    else:
        # Scalars as k=v; lists and objects as compact JSON (cut short): nothing hidden.
        parts = []
        for k, v in sorted(d.items()):
            if k == "at":
                continue
            shown = str(v)
            if isinstance(v, dict | list):
                shown = orjson.dumps(v).decode()
                shown = shown if len(shown) <= 120 else shown[:117] + "..."
            parts.append(f"{k}={shown}")
        text = " ".join(parts)
    return f"{e.get('seq', '?'):>8} {e.get('ts', '?')} {kind:<24} {did:<32} {text}"


@dataclass
class DeliveryRecord:
    delivery_id: str
    started: str | None = None
    preset_gy: Any = None
    joined: bool = False
    status: str | None = None
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    last_sample: dict[str, Any] = field(default_factory=dict)
    last_sample_seq: int | None = None
    device: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    interlocks: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)  # operator_action (older logs)
    acks: list[dict[str, Any]] = field(default_factory=list)  # alarm_acknowledged
    amendments: list[str] = field(default_factory=list)
    last_seq: int | None = None
    last_hash: str | None = None
    covering_checkpoint: int | None = None  # seq of the first checkpoint after the end
    simulated: bool = False
    continues: str | None = None  # an earlier record of the same treatment (after a restart)
    # verification / prescription_used entries, and the phase changes (for the first
    # beam-on), whole: rxcheck.py judges which check governs
    rx_entries: list[dict[str, Any]] = field(default_factory=list)
    phase_entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prescription_check(self) -> PrescriptionCheck:
        return prescription_check(self.rx_entries, self.phase_entries)


def _reopened(rec: DeliveryRecord | None, unvouched_from: Any) -> None:
    """A start that took a delivery over (``daemon_start.open_delivery``) did not believe an
    end recorded before it: one in the unvouched tail of a crash (possibly forged; the
    daemon takes the delivery from vouched entries only). The outcome is what comes after;
    a last sample in that tail is not the dose so far (unknown until a later sample)."""
    if rec is None:
        return
    if rec.status is not None:
        rec.status, rec.reason, rec.summary = None, None, {}
    seq = rec.last_sample_seq
    if isinstance(unvouched_from, int) and seq is not None and seq >= unvouched_from:
        rec.last_sample, rec.last_sample_seq = {}, None


def collect_deliveries(entries: Iterable[dict[str, Any]]) -> list[DeliveryRecord]:
    out: dict[str, DeliveryRecord] = {}
    device: dict[str, Any] = {}
    awaiting_checkpoint: list[DeliveryRecord] = []
    unvouched_from: Any = None
    for e in entries:
        kind, d = e.get("type"), e.get("data") or {}
        if kind == "device_identified":
            device = d
        if kind == "checkpoint":
            for rec in awaiting_checkpoint:
                rec.covering_checkpoint = e.get("seq")
            awaiting_checkpoint = []
        if kind == "recovery":
            u = d.get("unvouched")
            unvouched_from = u.get("first_seq") if isinstance(u, dict) else None
        if kind == "daemon_start":
            _reopened(out.get(str(d.get("open_delivery"))), unvouched_from)
        did = e.get("delivery_id")
        if did is None and kind in RX_ENTRY_TYPES and isinstance(d, dict):
            # a check naming its delivery in its data only: of a delivery already seen,
            # never one of its own (it would list a delivery nothing else knows)
            did = d.get("delivery_id") if d.get("delivery_id") in out else None
        if not isinstance(did, str):
            continue
        rec = out.setdefault(did, DeliveryRecord(did, device=device))
        if kind in RX_ENTRY_TYPES:
            rec.rx_entries.append(e)
        rec.last_seq, rec.last_hash = e.get("seq"), e.get("hash")
        if kind == "delivery_started":
            rec.started = d.get("at") or e.get("ts")
            rec.preset_gy = d.get("preset_gy")
            rec.joined = bool(d.get("joined_in_progress"))
            rec.continues = d.get("continues")
        elif kind == "sample":
            rec.last_sample, rec.last_sample_seq = d, e.get("seq")
            rec.simulated = rec.simulated or bool(d.get("simulated"))
        elif kind == "phase_changed":
            rec.phases.append({**d, "seq": e.get("seq")})
            rec.phase_entries.append(e)
        elif kind == "interlock_changed":
            rec.interlocks.append({**d, "seq": e.get("seq")})
        elif kind in ("alarm_raised", "alarm_cleared"):
            rec.alarms.append({**d, "event": kind, "seq": e.get("seq")})
        elif kind in ("monitoring_gap_started", "monitoring_gap_ended", "monitoring_gap"):
            rec.gaps.append({**d, "event": kind})
        elif kind == "operator_action":
            rec.actions.append({**d, "ts": e.get("ts")})
        elif kind == "alarm_acknowledged":  # a signed ack command (daemon/alarm_acks.py)
            rec.acks.append({**d, "ts": e.get("ts")})
        elif kind == "delivery_amended":
            rec.summary = d.get("summary") or rec.summary
            rec.amendments.append(str(d.get("reason")))
        elif kind == "delivery_terminated":
            rec.status, rec.reason = d.get("status"), d.get("reason")
            rec.summary = d.get("summary") or {}
            if d.get("gap"):
                rec.gaps.append({**d["gap"], "event": "closing_gap"})
            if not rec.last_sample and d.get("last_sample"):
                rec.last_sample = d["last_sample"]
            awaiting_checkpoint.append(rec)
    return list(out.values())


def delivered(rec: DeliveryRecord) -> tuple[Any, Any]:
    s = rec.summary
    if s:
        return s.get("delivered_primary_gy"), s.get("delivered_secondary_gy")
    ls = rec.last_sample
    return (
        ls.get("delivered_primary_gy", ls.get("dose_primary_gy")),
        ls.get("delivered_secondary_gy", ls.get("dose_secondary_gy")),
    )


def one_line(rec: DeliveryRecord) -> str:
    p, _ = delivered(rec)
    s = rec.summary
    beam = s.get("beam_on_s", rec.last_sample.get("beam_on_s"))
    status = rec.status or "IN PROGRESS"
    interruptions = len(s.get("interruptions", []))
    gaps = len({str(g.get("start")) for g in rec.gaps})
    sim = " SIMULATED" if rec.simulated else ""
    return (
        f"{rec.delivery_id}  {rec.started or '?'}  {status:<8} {_gy(p)}/{_gy(rec.preset_gy)} Gy  "
        f"beam-on {_mmss(beam)}  interruptions {interruptions}  gaps {gaps}{sim}"
    )


def _verification(rec: DeliveryRecord) -> str:
    """The governing check against a prescription, in one line (rxcheck.py)."""
    pc = rec.prescription_check
    if pc.governing is None:
        return "NOT CHECKED against a prescription (no verification entry)"
    words = {"NOT_VERIFIED": "NOT VERIFIED", "VERIFIED_OVR": "VERIFIED WITH OVERRIDE"}
    d = pc.data
    reasons = ", ".join(str(r) for r in listed(d, "reasons"))
    return (
        f"{words.get(str(pc.outcome), pc.outcome)} (seq {pc.governing.get('seq')}, "
        f"{d.get('trigger')}{', only at/after beam-on' if pc.after_beam_on else ''})"
        + (f": {reasons}" if reasons else "")
        + (f"; prescription used (seq {pc.used[0].get('seq')})" if pc.used else "")
    )


def format_summary(rec: DeliveryRecord) -> str:
    s = rec.summary
    p, sec = delivered(rec)
    lines = [f"delivery {rec.delivery_id}" + ("  [SIMULATED]" if rec.simulated else "")]
    dev = rec.device
    if dev:
        lines.append(
            f"  device          {dev.get('manufacturer')} {dev.get('model')}, "
            f"s/n {dev.get('serial')}, firmware {dev.get('firmware')}"
        )
    app = s.get("applicator")
    if isinstance(app, dict):
        lines.append(
            f"  applicator      {app.get('type')} {app.get('diameter_mm')} mm, "
            f"s/n {app.get('serial')}"
        )
    lines += [
        f"  started         {rec.started}"
        + ("  (monitoring joined in progress)" if rec.joined else "")
        + (f"  (continues record {rec.continues})" if rec.continues else ""),
        f"  prescribed      {_gy(rec.preset_gy)} Gy",
        f"  verification    {_verification(rec)}",
        f"  delivered       primary {_gy(p)} Gy   secondary {_gy(sec)} Gy",
        f"  beam-on time    {_mmss(s.get('beam_on_s', rec.last_sample.get('beam_on_s')))}"
        f"   elapsed {_mmss(s.get('elapsed_s'))}   planned {_mmss(s.get('planned_time_s'))}"
        f"   backup-timer limit {_mmss(s.get('backup_timer_limit_s'))}",
    ]
    intr = s.get("interruptions", [])
    lines.append(f"  interruptions   {len(intr) or 'none'}")
    for i in intr:
        lines.append(
            f"    - {i.get('cause')} at {_gy(i.get('dose_at_start_gy'))} Gy, "
            f"lasted {_mmss(i.get('duration_s'))}"
        )
    lines.append(f"  monitoring gaps {len(rec.gaps) or 'none'}")
    for g in rec.gaps:
        lines.append(
            f"    - {g.get('event')}: {g.get('cause')} from {g.get('start')} to {g.get('end')}"
        )
    lines.append(f"  interlock events {len(rec.interlocks) or 'none'}")
    for il in rec.interlocks:
        lines.append(
            f"    - seq {il['seq']}: {il.get('interlock')} {il.get('from')} -> {il.get('to')}"
        )
    raised = [a for a in rec.alarms if a["event"] == "alarm_raised"]
    lines.append(f"  alarms          {len(raised) or 'none'}")
    for a in raised:
        lines.append(f"    - seq {a['seq']}: {str(a.get('severity')).upper()} {a.get('message')}")
    lines.append(
        f"  termination     {rec.status or 'IN PROGRESS'}"
        + (f" ({rec.reason})" if rec.reason else "")
    )
    for why in rec.amendments:
        lines.append(f"  amended         {why}")
    if rec.actions or rec.acks:
        lines.append("  acknowledged")
        for ack in rec.acks:
            said = f": {ack['comment']}" if ack.get("comment") else ""
            lines.append(
                f"    - {ack.get('ts')}: {ack.get('name')} ({ack.get('by')}) acknowledged "
                f"{ack.get('key')} raised {ack.get('raised_at')}{said}"
            )
        for act in rec.actions:
            lines.append(f"    - {act.get('ts')}: {act.get('operator')} {act.get('action')}")
    else:
        lines.append("  acknowledged    none recorded")
    cover = (
        f"covered by the checkpoint at seq {rec.covering_checkpoint}"
        if rec.covering_checkpoint is not None
        else "not yet covered by a checkpoint"
    )
    lines.append(f"  last entry      seq {rec.last_seq}, hash {rec.last_hash}; {cover}")
    return "\n".join(lines)
