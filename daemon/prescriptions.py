"""The daemon's ``prescription`` command: a signed prescription reaches the room's record.

A physicist sends a prescription (plan/model.py) as a signed ``prescription`` command
(``iort-plan send``; docs/prescriptions.md, "Sending a prescription to the room"). The
intake (daemon/commands.py) has checked the envelope, the signer's key and role
(physicist) and recorded ``command_accepted`` (with this module's summary: the parsed
prescription's canonical fields and SHA-256, all pseudonymous; never the raw body) before
:meth:`Prescriptions.handle` runs. Here the body is judged as a prescription:

* it must parse with the plan model's strict parser (``unparseable`` otherwise; an unknown
  key's name is not recorded: it could be anything);
* not expired at receipt (``expired``), not approved in the future beyond the clock skew
  (``approved_in_future``);
* ``approved_by`` is the command's signer (``signer_not_approver``): the key that sends it is
  the approving physicist's;
* one pending prescription per room. The same bytes again (a new command, new nonce) are
  recorded as ``same`` and change nothing; a newer one (``approved_at`` later) for the same
  treatment ``replaces`` the pending one; an older one is refused (``older_than_pending``);
  one for another treatment replaces the pending one when no delivery is open, and is
  refused (``other_treatment_in_delivery``) while one is.

The outcome is one entry, ``prescription_received`` (``outcome`` new / same / replaces, the
prescription, its ``sha256``, the command's ``nonce`` and ``signer``, what it replaced) or
``prescription_refused`` (``reason``, ``detail``, ``nonce``, the body's SHA-256), and a
notice on ``events``. The check against the console before beam-on is not made here: this
module keeps the room's pending prescription, and tells the verifier (daemon/verifier.py,
``on_change``) when it changes; the verifier checks against ``latest``, the last one
received, also once expired (so that the check says ``expired``). Memory follows what was
appended: the pending prescription is set as soon as its entry is appended, before the
wait for the disk, so that a handler timed out or cancelled in that wait does not leave
memory behind the log.

Crash-safety: the state is what the log says. :meth:`Prescriptions.rebuild` reads the
entries of the last ``MAX_VALIDITY`` + a day at start: the last ``prescription_received``
is the pending prescription (dropped once expired), and an accepted ``prescription``
command with neither outcome after it (a SIGKILL between the record and the handler) is
handled at start (:meth:`Prescriptions.resume`), judged at that time, from the prescription
its ``command_accepted`` entry holds. The pending prescription's SHA-256 is computed from
the prescription the entry holds, never read from its ``sha256`` field. Entries after the
log's last seal (``vouched_count``: recovery's, auditlog/recovery.py) are not believed: an
unvouched ``prescription_received`` is skipped (one journal warning with the count) and an
unvouched ``command_accepted`` is refused at start (``interrupted_unvouched``), never acted
on: either could have been written by someone with write access to the log directory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.command import Command, Refused, recorded_command
from iortd.auditlog.logdir import recent_lines
from iortd.auditlog.writer import AuditLog
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake, rebuild_or_off, resume_commands
from iortd.daemon.tracker import DeliveryTracker
from iortd.kernel.timefmt import utc_ts
from iortd.plan.model import (
    MAX_VALIDITY,
    Prescription,
    PrescriptionError,
    parse_prescription,
    prescription_bytes,
    prescription_dict,
)

__all__ = ["Pending", "Prescriptions", "RxRefused", "install", "summary"]

log = structlog.get_logger("iortd.prescriptions")

KIND = "prescription"
# How far back the log is read at start: a prescription is valid at most MAX_VALIDITY.
REBUILD_WINDOW = MAX_VALIDITY + timedelta(days=1)
UNVOUCHED = (
    "accepted after the log's last seal (unvouched): not known to be a command this daemon "
    "accepted; send it again"
)


class RxRefused(Refused):
    """A prescription command judged and refused; ``reason`` is a fixed word."""


@dataclass(frozen=True, slots=True)
class Pending:
    """The room's pending prescription, as the log recorded it."""

    prescription: Prescription
    sha256: str  # of its canonical JSON bytes
    nonce: str  # of the command that brought it


def parse_body(body: Mapping[str, Any]) -> tuple[Prescription, str]:
    """The prescription a command's body holds, and the SHA-256 of its canonical bytes."""
    try:
        raw = canonical(dict(body))
    except CanonicalError:
        raise RxRefused("unparseable", "the body is not plain JSON") from None
    try:
        p = parse_prescription(raw)
    except PrescriptionError as exc:
        text = str(exc)
        if "unknown key" in text:  # the key's name could be anything: not recorded
            text = "an unknown key (a prescription holds no other data; its name is not recorded)"
        raise RxRefused("unparseable", text[:300]) from None
    return p, hashlib.sha256(prescription_bytes(p)).hexdigest()


def summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``command_accepted`` records of a prescription command: the parsed prescription
    (pseudonymous by construction) and its SHA-256, so that a crash before the handler
    can be finished at the next start; of a body that does not parse, its shape only."""
    try:
        p, sha = parse_body(body)
    except RxRefused:
        return {"body_sha256": _body_sha(body), "parsed": False}  # no keys: anything
    return {"prescription": prescription_dict(p), "sha256": sha, "parsed": True}


def _body_sha(body: Mapping[str, Any]) -> str:
    try:
        return hashlib.sha256(canonical(dict(body))).hexdigest()
    except CanonicalError:
        return ""


class Prescriptions:
    """The room's pending prescription; the ``prescription`` command's handler."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        notice: Callable[[str, str], None],
        delivery_open: Callable[[], bool],
        skew_s: float,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._audit = audit
        self._notice = notice
        self._delivery_open = delivery_open
        self._skew = timedelta(seconds=skew_s)
        self._now = now or (lambda: datetime.now(UTC))
        self._pending: Pending | None = None
        self._latest: Pending | None = None  # as _pending, kept once expired
        # Called once the pending prescription changed (the verifier, daemon/verifier.py).
        self.on_change: Callable[[], None] | None = None
        self._orphans: list[Command] = []  # accepted, not handled (a crash): see resume()
        self._unvouched_orphans: list[Command] = []  # accepted after the last seal: refused
        self._vouched: int | None = None  # see rebuild()
        self._skipped = 0
        # One judged and recorded at a time: resume() at start runs beside the intake's task.
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> Pending | None:
        """The pending prescription, None when there is none or it has expired."""
        p = self._pending
        if p is not None and p.prescription.expired(self._now()):
            return None
        return p

    @property
    def latest(self) -> Pending | None:
        """The last prescription received, also once it has expired: what the verifier
        checks the console against (an expired one fails ``expired``, which says more
        than ``no_prescription``)."""
        return self._latest

    # ---- the handler ----------------------------------------------------------------------

    async def handle(self, cmd: Command) -> None:
        """Judge an accepted ``prescription`` command and record the outcome (durably)."""
        async with self._lock:
            await self._handle(cmd)

    async def _handle(self, cmd: Command, *, unvouched: bool = False) -> None:
        try:
            entry = self._judge(cmd, unvouched=unvouched)
        except RxRefused as exc:
            data = {
                "nonce": cmd.nonce,
                "signer": cmd.signer,
                "reason": exc.reason,
                "detail": exc.detail,
                "body_sha256": _body_sha(cmd.body),
            }
            await asyncio.shield(
                self._audit.append("prescription_refused", data, durable=True).committed
            )
            log.warning("prescription_refused", reason=exc.reason, nonce=cmd.nonce)
            said = f"prescription refused ({exc.reason}): {exc.detail}"
            self._notice(
                "critical",
                answered(said, "refused", kind=cmd.kind, nonce=cmd.nonce, reason=exc.reason),
            )
            return
        appended = self._audit.append("prescription_received", entry, durable=True)
        # Memory follows what was appended, not what was fsync'd: if the wait below times
        # out or is cancelled, the entry is still in the log (the writer retries a failing
        # disk), and a pending prescription the log names must be the one judged next.
        p = parse_prescription(canonical(entry["prescription"]))
        self._pending = self._latest = Pending(p, entry["sha256"], cmd.nonce)
        if self.on_change is not None and entry["outcome"] != "same":
            self.on_change()  # the verifier: checked now when the console is READY
        await asyncio.shield(appended.committed)
        log.info(
            "prescription_received",
            outcome=entry["outcome"],
            sha256=entry["sha256"],
            nonce=cmd.nonce,
        )
        self._notice("info", answered(_said(entry, p), "done", kind=cmd.kind, nonce=cmd.nonce))

    def _judge(self, cmd: Command, *, unvouched: bool = False) -> dict[str, Any]:
        if unvouched:
            raise RxRefused("interrupted_unvouched", UNVOUCHED)
        p, sha = parse_body(cmd.body)
        now = self._now()
        if p.expired(now):
            raise RxRefused("expired", f"not valid after {utc_ts(p.not_after)}")
        if p.approved_at > now + self._skew:
            raise RxRefused(
                "approved_in_future",
                f"approved_at {utc_ts(p.approved_at)} is ahead of this daemon's clock",
            )
        if p.approved_by != cmd.signer:
            raise RxRefused(
                "signer_not_approver",
                f"approved by {p.approved_by} but signed by {cmd.signer}: the approving "
                "physicist's key must sign it",
            )
        old = self.pending
        outcome = "new"
        if old is not None:
            q = old.prescription
            if old.sha256 == sha:
                outcome = "same"
            elif q.treatment_id == p.treatment_id:
                if p.approved_at < q.approved_at:
                    raise RxRefused(
                        "older_than_pending",
                        f"approved {utc_ts(p.approved_at)}, before the pending one "
                        f"({utc_ts(q.approved_at)}, sha256 {old.sha256[:16]})",
                    )
                outcome = "replaces"
            elif self._delivery_open():
                raise RxRefused(
                    "other_treatment_in_delivery",
                    f"a delivery is open under treatment {q.treatment_id}; send it after "
                    "the delivery ends",
                )
            else:
                outcome = "replaces"
        return {
            "outcome": outcome,
            "sha256": sha,
            "prescription": prescription_dict(p),
            "nonce": cmd.nonce,
            "signer": cmd.signer,
            "replaces_sha256": old.sha256 if outcome == "replaces" and old else None,
        }

    # ---- from the log, at start ----------------------------------------------------------

    def rebuild(self, directory: Path, vouched_count: int | None = None) -> int:
        """The pending prescription and the unhandled commands, from the log (blocking: run
        it in a thread at start, before commands are taken). Returns the entries used.

        ``vouched_count``: entries from that seq on are vouched for by no seal (recovery's
        RecoveryReport.vouched_count). A ``prescription_received`` among them is not
        believed; a ``command_accepted`` among them is refused at start, never handled."""
        now = self._now()
        since = (now - REBUILD_WINDOW).strftime("%Y%m%d")
        accepted: dict[str, Command] = {}
        used = 0
        self._vouched, self._skipped = vouched_count, 0
        # Oldest first: the last outcome wins.
        for line in recent_lines(
            directory, since, b'"type":"prescription_', b'"kind":"prescription"'
        ):
            used += self._replay(line, accepted)
        self._orphans = list(accepted.values())
        if self._skipped:
            log.warning("prescriptions_unvouched", entries=self._skipped)
        if self._pending is not None and self._pending.prescription.expired(now):
            self._pending = None
        return used

    def _replay(self, line: bytes, accepted: dict[str, Command]) -> int:
        try:
            e = orjson.loads(line)
            kind, data = e["type"], e["data"]
            unvouched = self._vouched is not None and int(e["seq"]) >= self._vouched
            if kind == "command_accepted" and data.get("kind") == KIND:
                body = data["body"]
                if unvouched:  # refused at start (resume), never handled
                    rx = body.get("prescription") or {}
                    self._unvouched_orphans.append(recorded_command(KIND, data, rx))
                elif body.get("parsed"):
                    accepted[data["nonce"]] = recorded_command(KIND, data, body["prescription"])
                else:
                    accepted[data["nonce"]] = recorded_command(KIND, data, {})
            elif kind == "prescription_received":
                if unvouched:  # not what the daemon recorded for certain: not believed
                    self._skipped += 1
                    return 0
                accepted.pop(data["nonce"], None)
                p = parse_prescription(canonical(data["prescription"]))
                sha = hashlib.sha256(prescription_bytes(p)).hexdigest()  # not data["sha256"]
                self._pending = self._latest = Pending(p, sha, data["nonce"])
            elif kind in ("prescription_refused", "command_failed"):
                # Judged, or failed and never retried (daemon/commands.py): not an orphan.
                accepted.pop(data["nonce"], None)
            else:
                return 0
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0  # not ours to judge here: iort-audit verify reports a bad entry
        return 1

    async def resume(self) -> None:
        """Handle the commands a crash left accepted but unhandled (judged now)."""
        orphans, self._orphans = self._orphans, []
        await resume_commands("prescription", orphans, self.handle)
        unvouched, self._unvouched_orphans = self._unvouched_orphans, []
        await resume_commands("prescription", unvouched, self._refuse_unvouched)

    async def _refuse_unvouched(self, cmd: Command) -> None:
        async with self._lock:
            await self._handle(cmd, unvouched=True)


def _said(entry: Mapping[str, Any], p: Prescription) -> str:
    what = {"new": "received", "same": "received again (unchanged)", "replaces": "replaces"}
    head = f"prescription {what[entry['outcome']]}"
    if entry["outcome"] == "replaces":
        head += f" {str(entry['replaces_sha256'])[:16]}:"
    return (
        f"{head} treatment {p.treatment_id}, plan {p.plan_id}, fraction {p.fraction}/"
        f"{p.fractions}, {p.prescribed_dose_gy:g} Gy, applicator {p.applicator_code}, "
        f"approved by {p.approved_by} [sha256 {str(entry['sha256'])[:16]}]"
    )


async def install(
    intake: CommandIntake,
    audit: AuditLog,
    directory: Path,
    tracker: DeliveryTracker,
    notice: Callable[[str, str], None],
    vouched_count: int | None = None,
) -> Prescriptions | None:
    """The ``prescription`` handler registered on ``intake``, its state rebuilt from the
    log in ``directory``; None (and the kind stays ``no_handler``, said loudly) when the
    log cannot be read back: a prescription judged without the pending one could replace
    what it must not."""

    def delivery_open() -> bool:
        snap = tracker.snapshot()
        return snap is not None and snap.termination is None

    rx = Prescriptions(audit, notice=notice, delivery_open=delivery_open, skew_s=intake.skew_s)
    used = await rebuild_or_off(
        "prescriptions", "prescriptions are", lambda: rx.rebuild(directory, vouched_count), notice
    )
    if used is None:
        return None
    log.info("prescriptions_rebuilt", entries=used, pending=rx.pending is not None)
    intake.register(KIND, rx.handle, summary)
    return rx
