"""What the report says, computed from the record: :func:`build_doc`.

Everything comes from the DeliveryRecord (the verified log and nothing else): the
identification, the check against the prescription (report/rx.py), prescription against
delivery, the dose segments (the same rows as the
DICOM record's, dose_segments.py), interruptions and monitoring gaps, every state
transition, interlock event and alarm with who acknowledged it, and the integrity section
with what an auditor needs to re-verify. A log that is not intact, or entries no signature
vouches for, put a NOT VERIFIED stamp on the document.
"""

from __future__ import annotations

from typing import Any

from iortd.audit.dose_segments import segments_with_context
from iortd.audit.export import describe
from iortd.audit.record import DeliveryRecord
from iortd.audit.report.model import (
    Heading,
    KeyValues,
    Para,
    Plot,
    ReportDoc,
    Table,
    gy,
    number,
    parse_ts,
    pct,
    secs,
    when,
)
from iortd.audit.report.rx import rx_blocks
from iortd.audit.report.signoffs import signoff_blocks
from iortd.audit.report.stand import stand_blocks
from iortd.auditlog.keyring import Keyring
from iortd.kernel.version import __version__

__all__ = ["UNVOUCHED_HEAD", "build_doc"]

UNVOUCHED_HEAD = "NOT VERIFIED: UNVOUCHED entries (not covered by any signature as genuine):"


def _ack(rec: DeliveryRecord, e: dict[str, Any]) -> str:
    """Who acknowledged an alarm: the ``alarm_acknowledged`` entry naming its key and raised
    time (a signed ``ack`` command: printed name, holder id, UTC time, comment), or, in an
    older log, an operator_action naming its alarm key or code."""
    if e.get("type") != "alarm_raised":
        return ""
    d = e["data"]
    raised = parse_ts(d.get("at"))
    for a in rec.events:
        ad = a.get("data") or {}
        if (
            a.get("type") == "alarm_acknowledged"
            and ad.get("key") == d.get("key")
            and raised is not None
            and parse_ts(ad.get("raised_at")) == raised
        ):
            comment = ad.get("comment")
            said = f": {comment}" if isinstance(comment, str) and comment else ""
            return f"{ad.get('name')} ({ad.get('by')}), {when(a.get('ts'))}{said}"
    names = {str(d.get("key")), str(d.get("code"))}
    for a in rec.events:
        if a.get("type") == "operator_action" and int(a["seq"]) > int(e["seq"]):
            action = str(a["data"].get("action"))
            if any(n and n in action for n in names):
                return f"{a['data'].get('operator')} ({when(a.get('ts'))})"
    return "none recorded"


def build_doc(
    rec: DeliveryRecord,
    *,
    pubkey_name: str | None = None,
    keyring: Keyring | None = None,
) -> ReportDoc:
    """The report's document; ``keyring`` (report --keyring) names and vouches for the
    physicists a check names."""
    v, s, plan, dev = rec.verification, rec.summary, rec.plan, rec.device
    status = rec.status or "IN PROGRESS (no termination in the log)"
    doc = ReportDoc(
        title="IORT delivery record",
        subtitle=f"Delivery {rec.delivery_id}",
        status_line=f"Termination: {status}" + (f" ({rec.reason})" if rec.reason else ""),
        created=rec.last_ts,
        simulated=rec.simulated,
    )
    if not v.intact:
        doc.stamp = str(v.problem_brief)
    elif v.unvouched:
        doc.stamp_head = UNVOUCHED_HEAD
        doc.stamp = f"{v.unvouched} of this delivery (written after the last seal before a crash)"
    b = doc.blocks
    if rec.simulated:
        b.append(
            Para(
                "SIMULATED: the data of this delivery came from a simulator, not from "
                "treatment equipment.",
                "warn",
            )
        )

    b.append(Heading("Identification"))
    app = s.get("applicator") if isinstance(s.get("applicator"), dict) else {}
    speed = rec.clock_speed
    b.append(
        KeyValues(
            [
                ("Treatment ID (pseudonymous)", str(plan.get("treatment_id", "—"))),
                ("Plan ID (pseudonymous)", str(plan.get("plan_id", "—"))),
                ("Fraction", str(plan.get("fraction", "—"))),
                ("Delivery ID", rec.delivery_id),
                ("Site / room", f"{rec.site.get('id', '—')} / {rec.site.get('room', '—')}"),
                (
                    "Device (source console)",
                    f"{dev.get('manufacturer', '—')} {dev.get('model', '')}, "
                    f"s/n {dev.get('serial', '—')}, firmware {dev.get('firmware', '—')}"
                    + (" [SIMULATED]" if dev.get("simulated") else ""),
                ),
                (
                    "Applicator",
                    f"{app.get('type', '—')} {app.get('diameter_mm', '—')} mm, "
                    f"s/n {app.get('serial', '—')}; plan applicator {plan.get('applicator') or '—'}"
                    if app
                    else f"not reported; plan applicator {plan.get('applicator') or '—'}",
                ),
                ("Software (iortd)", str(rec.software_version or "—")),
                ("Configuration", str(rec.config_file or "—")),
                ("Configuration SHA-256", str(rec.config_sha256 or "—")),
                ("Delivery started", when(rec.started)),
                (
                    "Time base",
                    "device clock, real time"
                    if speed in (None, 1.0)
                    else f"simulated time, compressed x{speed:g} (device times are simulated)",
                ),
            ]
            + [
                (
                    f"Device re-identified (seq {d.get('seq')})",
                    f"{d.get('manufacturer')} {d.get('model')}, s/n {d.get('serial')}",
                )
                for d in rec.devices_seen
            ]
        )
    )

    b.extend(rx_blocks(rec, keyring))  # the check against a prescription (report/rx.py)

    b.append(Heading("Prescription and delivery"))
    intervals = rec.intervals()
    n_intr = sum(1 for i in intervals if i.kind == "interruption")
    n_gaps = sum(1 for i in intervals if i.kind == "gap")
    b.append(
        Table(
            ["", "specified", "delivered", "difference"],
            [
                [
                    "Dose, primary channel",
                    gy(rec.preset_gy),
                    gy(rec.delivered_primary_gy),
                    pct(rec.delivered_primary_gy, rec.preset_gy),
                ],
                [
                    "Dose, secondary channel",
                    gy(rec.preset_gy),
                    gy(rec.delivered_secondary_gy),
                    pct(rec.delivered_secondary_gy, rec.preset_gy),
                ],
                [
                    "Treatment (beam-on) time",
                    secs(s.get("planned_time_s")),
                    secs(s.get("beam_on_s", rec._last("beam_on_s"))),
                    pct(s.get("beam_on_s"), s.get("planned_time_s")),
                ],
                [
                    "Backup-timer limit",
                    secs(s.get("backup_timer_limit_s")),
                    "",
                    "",
                ],
                ["Elapsed (first beam to end)", "", secs(s.get("elapsed_s")), ""],
                [
                    "Expected dose rate",
                    "—"
                    if number(s.get("expected_rate_gy_min")) is None
                    else f"{number(s.get('expected_rate_gy_min')):.3f} Gy/min",
                    "",
                    "",
                ],
            ],
            [0.34, 0.22, 0.22, 0.22],
        )
    )
    b.append(
        KeyValues(
            [
                ("Termination status (3008,002A)", rec.status or "— (delivery not terminated)"),
                ("Termination reason", str(rec.reason or "—")),
                ("Interruptions", str(n_intr) if n_intr else "none"),
                ("Monitoring gaps", str(n_gaps) if n_gaps else "none"),
                (
                    "Monitoring joined in progress",
                    "yes: dose before monitoring began is shown as unmonitored"
                    if rec.joined_in_progress
                    else "no",
                ),
            ]
            + (
                [("Continues record", f"{rec.continues}: {rec.continues_reason}")]
                if rec.continues
                else []
            )
            + [(f"Amendment {n}", str(a.get("reason"))) for n, a in enumerate(rec.amendments, 1)]
        )
    )

    b.append(Plot("Dose rate and accumulated dose against time"))
    b.append(
        Para(
            "Top: accumulated dose on both channels, the preset, and the expected dose "
            "(expected rate x the console's beam-on time, so it pauses while the beam is off). "
            "Bottom: dose rate reported by the console and the expected rate. Shaded: "
            "interruptions (amber) and monitoring gaps (red, hatched: no readings, so the "
            "lines are broken there).",
            "note",
        )
    )

    rows = segments_with_context(rec)
    if rows:
        b.append(Heading("Dose segments (interruption and resume tiling, DICOM PS3.3 C.8.8.21.2)"))
        b.append(
            Table(
                ["#", "kind", "from", "to", "dose", "beam-on", "ended by"],
                [
                    [
                        str(r.index + 1),
                        r.kind,
                        gy(r.start_gy, 4),
                        gy(r.end_gy, 4),
                        gy(r.end_gy - r.start_gy, 4),
                        f"{max(r.end_beam_on_s - r.start_beam_on_s, 0):.1f} s",
                        r.ended_by,
                    ]
                    for r in rows
                ],
                [0.04, 0.11, 0.13, 0.13, 0.13, 0.11, 0.35],
            )
        )
        total = sum(r.end_gy - r.start_gy for r in rows)
        b.append(
            Para(
                f"The segments tile the delivered dose with no gap and no overlap: their sum is "
                f"{total:.4f} Gy; the delivered primary dose is {gy(rec.delivered_primary_gy, 4)}.",
                "note",
            )
        )

    if intervals:
        b.append(Heading("Interruptions and monitoring gaps"))
        b.append(
            Table(
                ["kind", "from", "to", "cause"],
                [[i.kind, when(i.start), when(i.end), i.cause] for i in intervals],
                [0.14, 0.25, 0.25, 0.36],
            )
        )

    b.extend(stand_blocks(rec))  # only when the log has an applicator reader

    b.append(Heading("State transitions, interlock events and alarms"))
    # An entry without its own observation time (a termination, an amendment) happened
    # at the reading before it: shown with that reading's device time.
    device_time: dict[int, Any] = {}
    last_at: Any = rec.started
    for entry in rec.entries:
        last_at = entry["data"].get("at") or last_at
        device_time[int(entry["seq"])] = last_at
    b.append(
        Table(
            ["seq", "time", "event", "acknowledged by"],
            [
                [str(e["seq"]), when(device_time.get(int(e["seq"]))), describe(e), _ack(rec, e)]
                for e in rec.events
            ],
            [0.07, 0.25, 0.50, 0.18],
        )
    )
    if not any(e.get("type") in ("alarm_acknowledged", "operator_action") for e in rec.events):
        b.append(
            Para(
                "No alarm acknowledgements are recorded for this delivery: the log holds no "
                "alarm_acknowledged entry for it (an operator or physicist acknowledges an "
                "alarm with a signed ack command; acknowledging silences and clears nothing).",
                "note",
            )
        )

    b.append(Heading("Integrity"))
    cp = rec.checkpoint
    who = (
        f"--pubkey {pubkey_name}"
        if pubkey_name
        else "the key recorded in the log only (give --pubkey for assurance)"
    )
    b.append(
        KeyValues(
            [
                (
                    "Log verification",
                    f"NOT INTACT: {v.problem}"
                    if not v.intact
                    else f"chain INTACT, but entries {v.unvouched} of this delivery are "
                    "UNVOUCHED: not covered by any signature as genuine"
                    if v.unvouched
                    else f"INTACT: {v.entries} entries, {v.checkpoints} signed checkpoints "
                    "verified",
                ),
                ("Signatures checked against", who),
                ("Log origin", str(v.origin or "—")),
                ("Log files", ", ".join(v.files) or "—"),
                ("Log head", f"seq {v.head_seq}"),
                ("Log head hash", v.head_hash),
                ("This delivery's entries", f"seq {rec.first_seq} to {rec.last_seq}"),
                ("Last entry of the delivery", f"seq {rec.last_seq}, {when(rec.last_ts)}"),
                ("Last entry hash", str(rec.last_hash)),
                (
                    "Covering checkpoint",
                    f"seq {cp.seq}: covers entries 0..{cp.count - 1}, signed by "
                    f"{', '.join(cp.signers)} ({cp.reason or 'no reason'}, {cp.time or cp.ts})"
                    if cp
                    else "none yet: no signed checkpoint follows this delivery's last entry",
                ),
            ]
            + ([("Checkpoint head hash", cp.head_hash)] if cp else [])
        )
    )
    if cp:
        b.append(Para(cp.note.rstrip("\n"), "mono"))
    b.append(
        Para(
            "To re-verify: obtain the log directory and the daemon's public key, run "
            "'iort-audit verify LOGDIR --pubkey KEY.pub' (with --checkpoint for a copy kept "
            "off the host), and check that it reports the origin above, that entry "
            f"seq {rec.last_seq} has the hash above, and that the checkpoint at seq "
            f"{cp.seq if cp else '—'} verifies. The footer of every page carries the same "
            "figures.",
            "note",
        )
    )
    b.extend(signoff_blocks(rec))  # electronic sign-offs, or the paper box (report/signoffs.py)

    doc.footer = (
        f"Log {v.origin or '?'} | delivery entries seq {rec.first_seq}-{rec.last_seq} | "
        f"checkpoint seq {cp.seq if cp else 'none'}",
        f"last entry hash {rec.last_hash}",
        f"log head seq {v.head_seq} hash {v.head_hash}"
        if v.intact
        else f"log NOT INTACT: verified only up to seq {v.head_seq}, hash {v.head_hash}",
        f"re-verify: iort-audit verify LOGDIR --pubkey KEY.pub | iort-audit {__version__}",
    )
    return doc
