"""Start-up recovery: find the head of the chain after any stop, before the writer starts.

Runs in a worker thread (:func:`recover`), with the directory locked (logdir.py). Everything
is checked before anything is touched: a crash can only tear the end of the newest segment
(or leave it with no whole entry), so

* a torn tail (an incomplete or invalid last line, nothing valid after it) is copied to
  ``quarantine/`` and cut off; a newest segment with no whole entry at all is moved there
  whole; nothing is ever deleted;
* anything else (a bad entry with valid entries after it, a segment before the newest that
  is not whole) is damage, not a crash: LogDamaged, and the log is refused as it is;
* a log behind this daemon's own seal or checkpoint file is refused (vouch.py) unless the
  rollback is accepted;
* entries a failing stop left in the spill file are restored when they continue the chain
  exactly (spill.py), unvouched, and the spill is kept in quarantine either way;
* the delivery left open and its last sample are taken from vouched entries only
  (carryover.py).

The :class:`RecoveryReport` says all of it: how the previous run stopped, what was set
aside and where, which entries no signature vouches for, what was spilled and restored,
what rollback was accepted. The daemon records it in the log (a ``recovery`` entry, written
before the first seal of its run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from iortd.auditlog.canonical import ZERO_HASH, Scan, open_line, scan_chain
from iortd.auditlog.carryover import open_delivery, started_unvouched
from iortd.auditlog.logdir import (
    OpenSegment,
    check_segments,
    damaged,
    entry_seq,
    envelope_at,
    open_for_append,
    quarantine_dir,
    read_origin,
    read_segment,
    segment_paths,
    write_new,
)
from iortd.auditlog.marker import marker_origin
from iortd.auditlog.note import Verifier
from iortd.auditlog.spill import read_spill, spill_path
from iortd.auditlog.vouch import check_anchors_without_log, vouch
from iortd.kernel.durable import fsync_dir

__all__ = ["RecoveryReport", "recover"]

# Deliveries started in an unvouched tail that a start closes: a crash leaves at most one
# or two (one commit window); a forger's thousands must not make the start write for
# minutes (the newest are closed; the rest stay open, marked unvouched by every command).
UNVOUCHED_CLOSED_MAX = 16

log = structlog.get_logger("iortd.audit")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening the log found."""

    created: bool
    origin: str
    previous_stop: Literal["none", "clean", "crash"]
    last_seq: int
    last_hash: str
    last_ts: str | None
    tail_bytes: int = 0
    tail_kept_at: str | None = None
    segments_set_aside: tuple[str, ...] = ()
    open_delivery_id: str | None = None
    open_delivery_last_sample: Mapping[str, Any] | None = None
    # Entries 0 .. vouched_count-1 are covered by a seal or checkpoint that verifies with
    # this daemon's key; None without a key (an unsigned log vouches for nothing).
    vouched_count: int | None = None
    vouched_by: str = "none"  # "seal", "checkpoint file", "checkpoint entry", "none"
    anchor_problems: tuple[str, ...] = ()  # seal/checkpoint files that were not usable
    rollback: Mapping[str, Any] | None = None  # set when a rollback was accepted
    # Entries a stop could not write, found in the spill file: count, first_seq,
    # last_seq, restored (appended to the log, unvouched) and kept_at (quarantine copy).
    spilled: Mapping[str, Any] | None = None

    @property
    def unvouched(self) -> tuple[int, int] | None:
        """(first seq, last seq) of the entries no signature vouches for, if any."""
        if self.vouched_count is None or self.vouched_count > self.last_seq:
            return None
        return self.vouched_count, self.last_seq

    @property
    def unvouched_count(self) -> int:
        u = self.unvouched
        return 0 if u is None else u[1] - u[0] + 1

    open_delivery_started: Mapping[str, Any] | None = None  # its delivery_started data
    # The ts of the last vouched entry when some are unvouched: what the daemon saw for
    # certain ends there, so a monitoring gap after a crash starts there.
    last_vouched_ts: str | None = None
    # When a later run took the open delivery over and never heard the console: the start
    # of the gap it recorded (from vouched entries), earlier than any of its own entries.
    open_delivery_unwatched_since: str | None = None
    # Deliveries started in the unvouched range and not ended there: nothing vouched names
    # them, so they cannot be taken over; the start closes them (UNKNOWN, no dose taken).
    unvouched_open_deliveries: tuple[str, ...] = ()


def recover(
    directory: Path,
    origin: str,
    verifier: Verifier | None = None,
    accept_rollback: bool = False,
    spill_dir: Path | None = None,
) -> tuple[OpenSegment | None, RecoveryReport]:
    """Find the head of the chain after any stop. Everything is checked before anything
    is touched: a crash can only tear the end of the newest segment (or leave it with no
    whole entry); anything else is damage, and the log is refused as it is."""
    directory.mkdir(parents=True, exist_ok=True)
    segments = segment_paths(directory)
    check_segments(segments)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    new_log = RecoveryReport(
        created=True,
        origin=origin,
        previous_stop="none",
        last_seq=-1,
        last_hash=ZERO_HASH,
        last_ts=None,
    )
    if not segments:
        check_anchors_without_log(directory, verifier, accept_rollback)
        return None, new_log

    # The segment before the newest must be whole: only the newest is ever written to
    # when a crash can happen.
    prev_scan: Scan | None = None
    if len(segments) > 1:
        prev_data = read_segment(segments[-2])
        prev_scan = scan_chain(prev_data, None, None)
        if prev_scan.error is not None or prev_scan.intact != len(prev_data):
            line = prev_data[: prev_scan.intact].count(b"\n") + 1
            raise damaged(f"{segments[-2]}:{line}", prev_scan.error or "incomplete entry")

    last = segments[-1]
    data = read_segment(last)
    scan = scan_chain(
        data,
        None if prev_scan is None else prev_scan.last_hash,
        None if prev_scan is None else prev_scan.last_seq,
    )
    set_aside: list[str] = []
    if scan.entries == 0:
        if later_entry(data, -1):
            line = 1
            raise damaged(f"{last}:{line}", scan.error or "first entry does not link")
        # No whole entry at all (a power cut right after the segment was created, or
        # during its first write): set the file aside whole, never delete it.
        target = quarantine_dir(directory) / f"{last.name}.{stamp}.set-aside"
        last.replace(target)
        fsync_dir(directory)
        set_aside.append(str(target.relative_to(directory)))
        segments.pop()
        if prev_scan is None:
            check_anchors_without_log(directory, verifier, accept_rollback)
            return None, new_log
        last, data, scan = segments[-1], prev_data, prev_scan
    elif prev_scan is not None and scan.last_type is None:
        # The newest segment holds only checkpoints (the shutdown one rotated into it):
        # what kind of stop it was is said by the entry before them.
        scan.last_type = prev_scan.last_type

    if scan.error is not None and later_entry(data, scan.intact):
        # Whole, valid entries after a bad one are not what a crash leaves behind.
        line = data[: scan.intact].count(b"\n") + 1
        raise damaged(f"{last}:{line}", f"{scan.error}, but valid entries follow it")
    # The first segment names the origin; once retention has deleted it, the marker does.
    log_origin = read_origin(segments[0]) or marker_origin(directory) or origin
    # Checked before anything is touched: a log behind its own seal is refused as it is.
    vouched = vouch(
        directory, segments, log_origin, (scan.last_seq, scan.last_hash), verifier, accept_rollback
    )
    tail_bytes = len(data) - scan.intact
    kept_at = None
    if tail_bytes:
        target = quarantine_dir(directory) / f"{last.name}.tail-at-{scan.intact}.{stamp}.bin"
        target = write_new(target, data[scan.intact :])
        kept_at = str(target.relative_to(directory))
        with open(last, "r+b") as f:
            f.truncate(scan.intact)
            f.flush()
            os.fsync(f.fileno())
        log.warning("audit_log_tail_set_aside", bytes=tail_bytes, kept_at=kept_at, why=scan.error)

    previous_stop: Literal["clean", "crash"] = (
        "clean" if scan.last_type == "daemon_stop" else "crash"
    )
    spilled = None
    size = scan.intact
    if spill_dir is not None:
        spilled, size = restore_spill(directory, spill_dir, log_origin, last, scan, stamp)
    fd = open_for_append(last)
    date = last.name.split("-")[2].removesuffix(".jsonl")  # segment_paths matched the name
    segment = OpenSegment(last, fd, size, date)
    open_id, open_sample, open_started, open_gap = open_delivery(segments, vouched.count)
    report = RecoveryReport(
        created=False,
        origin=log_origin,
        previous_stop=previous_stop,
        last_seq=scan.last_seq,
        last_hash=scan.last_hash,
        last_ts=scan.last_ts,
        tail_bytes=tail_bytes,
        tail_kept_at=kept_at,
        segments_set_aside=tuple(set_aside),
        open_delivery_id=open_id,
        open_delivery_last_sample=open_sample,
        vouched_count=vouched.count,
        vouched_by=vouched.by,
        anchor_problems=tuple(vouched.problems),
        rollback=vouched.rollback,
        spilled=spilled,
        open_delivery_started=open_started,
        open_delivery_unwatched_since=open_gap,
        unvouched_open_deliveries=()
        if vouched.count is None
        else tuple(d for d in started_unvouched(segments, vouched.count) if d != open_id)[
            -UNVOUCHED_CLOSED_MAX:
        ],
    )
    if report.unvouched is not None and report.unvouched[0] > 0:
        env = envelope_at(segments, report.unvouched[0] - 1)
        report = replace(report, last_vouched_ts=None if env is None else env.ts)
    if report.unvouched is not None:
        first, last_u = report.unvouched
        log.warning(
            "audit_log_unvouched_entries",
            first_seq=first,
            last_seq=last_u,
            count=report.unvouched_count,
            vouched_by=vouched.by,
        )
    return segment, report


def restore_spill(
    directory: Path, spill_dir: Path, origin: str, last: Path, scan: Scan, stamp: str
) -> tuple[dict[str, Any] | None, int]:
    """Entries a stop could not write: appended to the newest segment when they continue
    the chain exactly (``scan`` is updated to the new head), and the spill file moved to
    quarantine either way. Returns (what was found, the segment's size)."""
    source = spill_path(spill_dir, origin)
    size = scan.intact
    try:
        data = read_spill(spill_dir, origin)
    except OSError as exc:
        log.critical("audit_log_spill_unusable", path=str(source), error=str(exc))
        return {"unusable": str(exc)}, size
    if data is None:
        return None, size
    # Order matters for a crash during this restore: kept in quarantine, then appended
    # to the log, and only then removed. A crash before the removal finds the spill
    # again, its entries already in the log (said so, never appended twice); a crash
    # after it finds them in the log.
    target = quarantine_dir(directory) / f"{source.name}.{stamp}.spilled"
    target = write_new(target, data)
    seqs = [s for s in (entry_seq(raw) for raw in data.splitlines()) if s is not None]
    found: dict[str, Any] = {
        "count": len(seqs),
        "first_seq": min(seqs, default=None),
        "last_seq": max(seqs, default=None),
        "kept_at": str(target.relative_to(directory)),
        "restored": 0,
    }
    cont = scan_chain(data, scan.last_hash, scan.last_seq)
    if cont.entries:
        with open(last, "ab") as f:
            f.write(data[: cont.intact])
            f.flush()
            os.fsync(f.fileno())
        size += cont.intact
        found["restored"] = cont.entries
        scan.last_seq, scan.last_hash, scan.last_ts = cont.last_seq, cont.last_hash, cont.last_ts
    elif already_restored(data, last):
        found["restored"] = found["count"]
        found["already_in_log"] = True  # by a start that crashed before removing the spill
    source.unlink()
    log.warning("audit_log_spill_found", **found)
    return found, size


def already_restored(data: bytes, last: Path) -> bool:
    """Whether the spill's whole chain is already in the newest segment, unchanged."""
    whole = scan_chain(data, None, None)
    if whole.entries == 0 or whole.error is not None:
        return False
    env = envelope_at([last], whole.last_seq)
    return env is not None and env.hash == whole.last_hash


def later_entry(data: bytes, start: int) -> bool:
    """Whether a whole, self-consistent entry follows the line at ``start`` (with -1:
    anywhere in ``data``)."""
    if start >= 0:
        first_nl = data.find(b"\n", start)
        if first_nl < 0:
            return False
        rest = data[first_nl + 1 :]
    else:
        rest = data
    for raw in rest.split(b"\n"):
        try:
            env = open_line(raw)
        except ValueError:
            continue
        if env.hash == env.computed:
            return True
    return False
