"""The daemon's ``output_factor`` command: the day's QA output factor, signed by the physicist
who measured it, reaches the room's record and the independent time check.

The expected treatment time (plan/doserate.py) is the prescribed dose over the commissioned
dose rate *corrected by the day's output factor*; the factor is "entered and signed like a
prescription" (issue 18, item 2): a physicist measures the source's output in the morning
QA, writes the factor (``iort-plan factor``) and sends it as a signed ``output_factor``
command (``iort-plan send --kind output_factor``; docs/prescriptions.md, "The day's output
factor"). The intake (daemon/commands.py) has checked the envelope, the signer's key and
role (physicist) and recorded ``command_accepted`` (with this module's :func:`summary`: the
parsed factor and its SHA-256; of a body that does not parse, only the body's SHA-256)
before :meth:`OutputFactors.handle` runs. Here the body is judged, in this order, and the
first failure is the reason (a fixed word):

* ``unparseable``: not a factor to :func:`~iortd.plan.doserate.parse_output_factor` (the
  strict parser ``iort-plan check`` uses; 5 % from 1 is refused there; an unknown key's
  name is not recorded: it could be anything);
* ``signer_not_measurer``: ``measured_by`` is not the command's signer (the key that sends
  the factor is the measuring physicist's, as a prescription's is its approver's);
* ``measured_in_future``, ``too_old``: measured on a UTC day that has not begun at the
  daemon (beyond ``[commands] clock_skew_s``) or more than one day ago
  (:func:`~iortd.plan.doserate.factor_date_problem`, the sender's rule too).

Accepted: ``output_factor_received`` (durable) with the factor document's fields (``v``,
``output_factor``, ``measured_on``, ``measured_by``, ``machine``), its ``sha256`` (of the
canonical document, as the sender printed it), the command's ``nonce`` and ``signer``, and
``replaces_sha256`` (the same day's factor it replaces, or null), then an ``info`` notice on
``events``. Refused: ``output_factor_refused`` (``reason``, ``detail``, ``nonce``,
``signer``, ``body_sha256``) and a ``critical`` notice: the physicist's factor did not
arrive, so the time check has none for the day (the verifier says ``time_unchecked``).

**What the verifier uses** (issue 18, item 3; wired in the composition root, daemon/app.py):
:meth:`OutputFactors.for_day` (the latest factor accepted for a UTC day; a later one the
same day replaces it; yesterday's is not today's) and :meth:`OutputFactors.on_change` (a
zero-argument callable called after each accepted factor is on disk, so that a check made
while READY is made again). A callback that raises is logged and does not stop the others.

Crash-safety: the state is what the log says. :meth:`OutputFactors.rebuild` reads the
segments of the last :data:`REBUILD_WINDOW` at start: the ``output_factor_received``
entries give each day's factor, and an accepted ``output_factor`` command with no outcome
after it (a SIGKILL between the record and the handler) is judged at start
(:meth:`OutputFactors.resume`, so possibly ``too_old`` by then) from the factor its
``command_accepted`` entry holds. A factor is never taken from anything but a received
entry the strict parser reads back, its SHA-256 computed from the document (never read
from the entry); a damaged line is skipped (``iort-audit verify`` is the tool that reports
it). Entries after the log's last seal (``vouched_count``: recovery's,
auditlog/recovery.py) are not believed: an unvouched ``output_factor_received`` is skipped
(one journal warning with the count) and an unvouched ``command_accepted`` is refused at
start (``interrupted_unvouched``), never acted on: either could have been written by
someone with write access to the log directory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.command import Command, Refused, recorded_command
from iortd.auditlog.logdir import recent_lines
from iortd.auditlog.writer import AuditLog
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake, rebuild_or_off, resume_commands
from iortd.plan.doserate import (
    DoseRateError,
    OutputFactor,
    factor_date_problem,
    output_factor_bytes,
    parse_output_factor,
)

__all__ = ["FactorRefused", "OutputFactors", "Received", "install", "summary"]

log = structlog.get_logger("iortd.output_factor")

KIND: Final = "output_factor"
# A factor is taken for today or yesterday only; two days of segments hold every one that
# can still count (and the commands a crash left unhandled, which expire within 24 h).
REBUILD_WINDOW: Final = timedelta(days=2)
_FIELDS: Final = ("v", "output_factor", "measured_on", "measured_by", "machine")
UNVOUCHED: Final = (
    "accepted after the log's last seal (unvouched): not known to be a command this daemon "
    "accepted; send it again"
)


class FactorRefused(Refused):
    """An output factor command judged and refused; ``reason`` is a fixed word."""


@dataclass(frozen=True, slots=True)
class Received:
    """A day's factor, as the log recorded it."""

    factor: OutputFactor
    sha256: str  # of its canonical document
    nonce: str  # of the command that brought it


def _document(f: OutputFactor) -> bytes:
    return output_factor_bytes(f.value, f.measured_on, f.measured_by, f.machine)


def parse_body(body: Mapping[str, Any]) -> tuple[OutputFactor, str]:
    """The factor a command's body holds, and the SHA-256 of its canonical document."""
    try:
        raw = canonical(dict(body))
    except CanonicalError:
        raise FactorRefused("unparseable", "the body is not plain JSON") from None
    try:
        f = parse_output_factor(raw)
    except DoseRateError as exc:
        text = str(exc)
        if "unknown key" in text:  # the key's name could be anything: not recorded
            text = "an unknown key (an output factor holds no other data; its name is not recorded)"
        raise FactorRefused("unparseable", text[:300]) from None
    return f, hashlib.sha256(_document(f)).hexdigest()


def summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``command_accepted`` records of an output factor command: the parsed factor and
    its SHA-256 (so that a crash before the handler can be finished at the next start); of
    a body that does not parse, its SHA-256 only (no keys: they could be anything)."""
    try:
        f, sha = parse_body(body)
    except FactorRefused:
        return {"body_sha256": _body_sha(body), "parsed": False}
    return {"factor": orjson.loads(_document(f)), "sha256": sha, "parsed": True}


def _body_sha(body: Mapping[str, Any]) -> str:
    try:
        return hashlib.sha256(canonical(dict(body))).hexdigest()
    except CanonicalError:
        return ""


class OutputFactors:
    """Each day's accepted output factor; the ``output_factor`` command's handler."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        notice: Callable[[str, str], None],
        skew_s: float,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._audit = audit
        self._notice = notice
        self._skew = timedelta(seconds=skew_s)
        self._now = now or (lambda: datetime.now(UTC))
        self._days: dict[date, Received] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._orphans: list[Command] = []  # accepted, not handled (a crash): see resume()
        self._orphan_sha: dict[str, str] = {}  # their bodies' SHA-256, as command_accepted says
        self._unvouched_orphans: list[Command] = []  # accepted after the last seal: refused
        self._vouched: int | None = None  # see rebuild()
        self._skipped = 0
        # One judged and recorded at a time: resume() at start runs beside the intake's task.
        self._lock = asyncio.Lock()

    # ---- what the verifier uses ------------------------------------------------------------

    def for_day(self, day: date) -> OutputFactor | None:
        """The latest factor accepted that was measured on ``day`` (UTC), or None."""
        got = self._days.get(day)
        return None if got is None else got.factor

    def received(self, day: date) -> Received | None:
        """The same, with the SHA-256 and nonce the log names it by."""
        return self._days.get(day)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each accepted factor is on disk."""
        self._callbacks.append(callback)

    # ---- the handler ----------------------------------------------------------------------

    async def handle(self, cmd: Command) -> None:
        """Judge an accepted ``output_factor`` command and record the outcome (durably)."""
        async with self._lock:
            await self._handle(cmd)

    async def _handle(self, cmd: Command, *, unvouched: bool = False) -> None:
        try:
            f, sha = self._judge(cmd, unvouched=unvouched)
        except FactorRefused as exc:
            data = {
                "nonce": cmd.nonce,
                "signer": cmd.signer,
                "reason": exc.reason,
                "detail": exc.detail,
                "body_sha256": self._orphan_sha.pop(cmd.nonce, None) or _body_sha(cmd.body),
            }
            await asyncio.shield(
                self._audit.append("output_factor_refused", data, durable=True).committed
            )
            log.warning("output_factor_refused", reason=exc.reason, nonce=cmd.nonce)
            said = f"output factor refused ({exc.reason}): {exc.detail}"
            self._notice(
                "critical",
                answered(said, "refused", kind=cmd.kind, nonce=cmd.nonce, reason=exc.reason),
            )
            return
        old = self._days.get(f.measured_on)
        entry = {
            **orjson.loads(_document(f)),
            "sha256": sha,
            "nonce": cmd.nonce,
            "signer": cmd.signer,
            "replaces_sha256": None if old is None else old.sha256,
        }
        await asyncio.shield(
            self._audit.append("output_factor_received", entry, durable=True).committed
        )
        self._keep(Received(f, sha, cmd.nonce))
        log.info("output_factor_received", sha256=sha, nonce=cmd.nonce, day=str(f.measured_on))
        head = "output factor" if old is None else f"output factor (replaces {old.sha256[:16]})"
        said = (
            f"{head} {f.value:.4f} measured {f.measured_on} by {f.measured_by} on "
            f"{f.machine[:80]} [sha256 {sha[:16]}]"
        )
        self._notice("info", answered(said, "done", kind=cmd.kind, nonce=cmd.nonce))
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:  # the factor is on the record; one listener's bug stays its own
                log.exception("output_factor_callback_failed")

    def _judge(self, cmd: Command, *, unvouched: bool = False) -> tuple[OutputFactor, str]:
        if unvouched:
            raise FactorRefused("interrupted_unvouched", UNVOUCHED)
        f, sha = parse_body(cmd.body)
        if f.measured_by != cmd.signer:
            raise FactorRefused(
                "signer_not_measurer",
                f"measured by {f.measured_by} but signed by {cmd.signer}: the key of the "
                "physicist who measured it must sign it",
            )
        problem = factor_date_problem(f.measured_on, self._now(), self._skew)
        if problem is not None:
            raise FactorRefused(*problem)
        return f, sha

    def _keep(self, got: Received) -> None:
        self._days[got.factor.measured_on] = got
        oldest = self._now().date() - REBUILD_WINDOW
        for day in [d for d in self._days if d < oldest]:
            del self._days[day]  # bounded: only days that can still count are kept

    # ---- from the log, at start ----------------------------------------------------------

    def rebuild(self, directory: Path, vouched_count: int | None = None) -> int:
        """Each day's factor and the unhandled commands, from the log (blocking: run it in a
        thread at start, before commands are taken). Returns the entries used.

        ``vouched_count``: entries from that seq on are vouched for by no seal (recovery's
        RecoveryReport.vouched_count). An ``output_factor_received`` among them is not
        believed; a ``command_accepted`` among them is refused at start, never handled."""
        since = (self._now() - REBUILD_WINDOW).strftime("%Y%m%d")
        accepted: dict[str, Command] = {}
        used = 0
        self._vouched, self._skipped = vouched_count, 0
        # Oldest first: the last one accepted for a day wins.
        for line in recent_lines(
            directory, since, b'"type":"output_factor_', b'"kind":"output_factor"'
        ):
            used += self._replay(line, accepted)
        self._orphans = list(accepted.values())
        if self._skipped:
            log.warning("output_factors_unvouched", entries=self._skipped)
        return used

    def _replay(self, line: bytes, accepted: dict[str, Command]) -> int:
        try:
            e = orjson.loads(line)
            kind, data = e["type"], e["data"]
            unvouched = self._vouched is not None and int(e["seq"]) >= self._vouched
            if kind == "command_accepted" and data.get("kind") == KIND:
                body = data["body"]
                if unvouched:  # refused at start (resume), never handled
                    self._unvouched_orphans.append(recorded_command(KIND, data, {}))
                    sha = body.get("sha256") or body.get("body_sha256")
                    self._orphan_sha[data["nonce"]] = str(sha or "")
                elif body["parsed"]:
                    accepted[data["nonce"]] = recorded_command(KIND, data, body["factor"])
                else:  # judged again from nothing: refused, under the body's own SHA-256
                    accepted[data["nonce"]] = recorded_command(KIND, data, {})
                    self._orphan_sha[data["nonce"]] = str(body["body_sha256"])
            elif kind == "output_factor_received":
                if unvouched:  # not what the daemon recorded for certain: not believed
                    self._skipped += 1
                    return 0
                accepted.pop(data["nonce"], None)
                f = parse_output_factor(canonical({k: data[k] for k in _FIELDS}))
                self._keep(Received(f, hashlib.sha256(_document(f)).hexdigest(), data["nonce"]))
            elif kind in ("output_factor_refused", "command_failed"):
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
        await resume_commands("output_factor", orphans, self.handle)
        unvouched, self._unvouched_orphans = self._unvouched_orphans, []
        await resume_commands("output_factor", unvouched, self._refuse_unvouched)

    async def _refuse_unvouched(self, cmd: Command) -> None:
        async with self._lock:
            await self._handle(cmd, unvouched=True)


async def install(
    intake: CommandIntake,
    audit: AuditLog,
    directory: Path,
    notice: Callable[[str, str], None],
    vouched_count: int | None = None,
) -> OutputFactors | None:
    """The ``output_factor`` handler registered on ``intake``, its state rebuilt from the
    log in ``directory``; None (and the kind stays ``no_handler``, said loudly) when the log
    cannot be read back: a factor judged without the day's could not say what it replaces."""
    factors = OutputFactors(audit, notice=notice, skew_s=intake.skew_s)
    used = await rebuild_or_off(
        "output_factors",
        "output factors are",
        lambda: factors.rebuild(directory, vouched_count),
        notice,
    )
    if used is None:
        return None
    log.info("output_factors_rebuilt", entries=used)
    intake.register(KIND, factors.handle, summary)
    return factors
