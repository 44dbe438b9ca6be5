"""What a start records about the log it found, before anything else of the run.

Opening the log (auditlog/writer.py) recovers it and reports what it found
(:class:`~iortd.auditlog.writer.RecoveryReport`): a crash, entries no signature vouches for,
entries spilled by a stop on a failing disk, an accepted rollback, a wall clock behind the
log, deliveries left open. :func:`record_recovery` writes that as entries, before the run's
first seal, so that later seals and checkpoints (which cover the whole chain) never vouch
for what the previous run did not; :func:`resumable` reads the delivery the log shows open
(from vouched entries only) as the tracker takes it over; :func:`close_unresumable` closes
one that cannot be taken over (no sample of it), as interrupted by a monitoring gap
(docs/audit-log.md).
"""

from __future__ import annotations

import math
from datetime import datetime

import structlog

from iortd.auditlog.writer import AuditLog, RecoveryReport
from iortd.daemon.tracker import Phase, ResumedDelivery

__all__ = ["close_unresumable", "record_recovery", "resumable"]

log = structlog.get_logger("iortd")

_RESUMABLE = {
    p.value: p for p in (Phase.PREPARATORY, Phase.READY, Phase.IRRADIATING, Phase.INTERRUPTED)
}


def resumable(rec: RecoveryReport) -> ResumedDelivery | None:
    """The delivery the log shows open, as the tracker takes it over after a restart; None
    when there is none, or when its record is too thin to continue (no sample of it, or a
    sample this version cannot read): that one is closed UNKNOWN at start-up instead."""
    did, s, started = rec.open_delivery_id, rec.open_delivery_last_sample, rec.open_delivery_started
    if did is None or s is None or rec.last_ts is None:
        return None
    phase = _RESUMABLE.get(str(s.get("phase")))
    numbers = [s.get(k) for k in ("preset_gy", "delivered_primary_gy", "delivered_secondary_gy")]
    numbers += [s.get("beam_on_s"), s.get("elapsed_s")]
    if phase is None or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        for x in numbers
    ):
        return None
    selection = s.get("selection")
    preset, primary, secondary, beam_on, elapsed = (float(x) for x in numbers)  # type: ignore[arg-type]
    try:
        # Unvouched entries (written after the last seal before a crash) are not what the
        # daemon saw for certain: the gap starts at the last vouched entry.
        since = datetime.fromisoformat((rec.last_vouched_ts or rec.last_ts).replace("Z", "+00:00"))
        if rec.open_delivery_unwatched_since is not None:
            # A run in between took it over and never heard the console: the gap it
            # recorded is still open, and nobody has watched the delivery since its start.
            earlier = datetime.fromisoformat(
                rec.open_delivery_unwatched_since.replace("Z", "+00:00")
            )
            since = min(since, earlier)
        at = (started or {}).get("at") or s.get("at")
        started_utc = datetime.fromisoformat(str(at).replace("Z", "+00:00"))
    except ValueError:
        return None
    return ResumedDelivery(
        delivery_id=did,
        started_utc=started_utc,
        phase=phase,
        preset_gy=preset,
        primary_gy=primary,
        secondary_gy=secondary,
        beam_on_s=beam_on,
        elapsed_s=elapsed,
        selection=selection
        if isinstance(selection, int) and not isinstance(selection, bool)
        else None,
        simulated=bool(s.get("simulated")),
        unwatched_since_utc=since,
        cause=f"daemon not running ({rec.previous_stop} stop)"
        + (
            ""
            if rec.unvouched is None
            else f"; entries seq {rec.unvouched[0]}..{rec.unvouched[1]} after the last seal "
            "are unvouched"
        ),
    )


def record_recovery(audit: AuditLog, rec: RecoveryReport, now: str) -> None:
    """What opening the log found, as entries, before anything else of this run: a crash,
    entries no signature vouches for, an accepted rollback, a wall clock behind the log.

    The unvouched range is recorded before the first seal of this run: later seals and
    checkpoints cover the whole chain, and this entry is what says that part of it is
    not vouched for (docs/audit-log.md)."""
    if rec.last_ts is not None and now < rec.last_ts:
        # The wall clock is behind the log's last entry: a step backwards across runs
        # (how far is unknown: at least this much). Written first, so that the first
        # entry whose ts goes back is the one that says why.
        behind = (_parse_utc(rec.last_ts) - _parse_utc(now)).total_seconds()
        audit.append(
            "clock_step",
            {
                "step_s": -round(behind, 6),
                "expected_wall": rec.last_ts,
                "actual_wall": now,
                "across_restart": True,
            },
            durable=True,
        )
        log.warning("clock_behind_the_log", last_entry=rec.last_ts, now=now, behind_s=behind)

    unvouched = rec.unvouched
    if (
        rec.previous_stop == "crash"
        or unvouched is not None
        or rec.rollback is not None
        or rec.spilled is not None
    ):
        audit.append(
            "recovery",
            {
                "previous_stop": rec.previous_stop,
                "last_seq": rec.last_seq,
                "last_hash": rec.last_hash,
                "last_ts": rec.last_ts,
                "tail_bytes": rec.tail_bytes,
                "tail_kept_at": rec.tail_kept_at,
                "segments_set_aside": list(rec.segments_set_aside),
                "vouched_by": rec.vouched_by,
                # Entries the previous stop could not write (a full or read-only disk),
                # from its spill file: restored (unvouched) or kept in quarantine.
                "spilled": None if rec.spilled is None else dict(rec.spilled),
                "anchor_problems": list(rec.anchor_problems),
                "unvouched": None
                if unvouched is None
                else {
                    "count": rec.unvouched_count,
                    "first_seq": unvouched[0],
                    "last_seq": unvouched[1],
                    "why": "written after the last seal (or signed checkpoint) before the "
                    "previous run ended; not covered by any signature as genuine",
                },
            },
            durable=True,
        )
        if unvouched is not None:
            log.warning(
                "audit_log_unvouched_entries_recorded",
                first_seq=unvouched[0],
                last_seq=unvouched[1],
                count=rec.unvouched_count,
            )
    for did in rec.unvouched_open_deliveries:
        # Started after the last seal before a crash and not ended: nothing vouched names
        # it, so it is not taken over (its samples may be forged) and not left open for
        # ever either. Closed UNKNOWN, with no dose taken from it; the gap starts at the
        # last vouched entry. Its entries stay marked unvouched by every command.
        gap = {
            "cause": f"daemon not running ({rec.previous_stop} stop)",
            "start": rec.last_vouched_ts or rec.last_ts,
            "end": now,
        }
        audit.append("monitoring_gap", gap, delivery_id=did, durable=True)
        audit.append(
            "delivery_terminated",
            {
                "status": "UNKNOWN",
                "reason": "not followed to its end: its record was written after the last "
                "seal before a crash (unvouched), so it cannot be taken over",
                "gap": gap,
                "last_sample": {},
            },
            delivery_id=did,
            durable=True,
        )
        log.warning("unvouched_delivery_closed", delivery_id=did)
    if rec.rollback is not None:
        audit.append("log_rollback_accepted", dict(rec.rollback), durable=True)
        log.warning("audit_log_rollback_accepted", **dict(rec.rollback))


def _parse_utc(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def close_unresumable(audit: AuditLog, rec: RecoveryReport, now: str) -> None:
    """The previous run ended during a delivery that cannot be taken over (no sample of it
    was recorded): nobody watched from its last entry until now. Close that delivery as
    interrupted by a monitoring gap."""
    did = rec.open_delivery_id
    if did is None:
        return
    gap = {
        "cause": f"daemon not running ({rec.previous_stop} stop)",
        "start": min(
            filter(
                None,
                (rec.last_vouched_ts or rec.last_ts, rec.open_delivery_unwatched_since),
            )
        ),
        "end": now,
    }
    audit.append("monitoring_gap", gap, delivery_id=did, durable=True)
    audit.append(
        "delivery_terminated",
        {
            "status": "UNKNOWN",
            "reason": "interrupted by a monitoring gap",
            "gap": gap,
            "last_sample": dict(rec.open_delivery_last_sample or {}),
        },
        delivery_id=did,
        durable=True,
    )
