"""The verifier in the running daemon: when a check of the console against the prescription
is made, what it is checked with, the ``override`` command, and the state rebuilt from the
log at start. The judging itself is daemon/verification.py (pure).

**When** (:meth:`Verifier.follow`, called by the service after every source reading with
the tracker's events): the console becomes READY (a plan selected, before beam-on; also
READY again after going back to PREPARATORY), or is READY with no check for this delivery
yet, or with the console's preset, planned time or applicator changed since the last check
-> trigger ``ready``; a delivery joined in progress with no check for
it in the log -> ``joined``; the beam on with no check for the delivery -> ``beam_on``. A
prescription arriving while READY -> ``prescription`` (:meth:`Verifier.recheck`, from the
prescription handler's on-change callback). A physicist's override -> ``override``.

**What it writes** (the service appends it, log first; nothing here does I/O but the
rebuild's read): each check is a ``verification`` entry (through the tracker's
``on_verification``, so that the alarm, MQTT and the dashboard take the normal path); the
first beam-on of a delivery whose governing check (the last one before the beam came on)
named a prescription writes ``prescription_used`` (durable): from then on that prescription
is ``already_delivered`` for every later delivery, also after a restart.

**The override** (kind ``override``, physicist only, checked by the intake before this
runs): accepted only for the open delivery whose latest check is NOT_VERIFIED for the named
prescription, when ``items`` are all overridable and cover every failed item; it binds to
the actual values of that check and to the prescription it names: a check of another
prescription applies none of it. Otherwise ``override_refused`` with a fixed reason word.

**Restart**: :meth:`Verifier.rebuild` reads the entries of the last ``REBUILD_WINDOW``:
every ``prescription_used`` (the used set), and per delivery its latest check and the
overrides in force, so a delivery resumed across a restart is not checked ``joined`` again
and its alarm state follows its latest check. A check no seal vouches for (after a crash,
or written by someone else) is not believed: such a delivery, continued with the beam on,
is checked ``joined`` at its first reading. An override accepted (``command_accepted``)
but given no outcome (a crash before its handler ran) is refused ``interrupted`` once the
writer runs (:attr:`Verifier.resume`, from daemon/handlers.py): its signed body was never on
disk, so it is not judged after the fact; the physicist sends it again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
import structlog

from iortd.auditlog.command import Command, Refused
from iortd.auditlog.keyring import Keyring, parse_utc
from iortd.auditlog.logdir import recent_lines
from iortd.auditlog.writer import AuditLog
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake, rebuild_or_off, resume_commands
from iortd.daemon.config.model import VerificationConfig
from iortd.daemon.prescriptions import REBUILD_WINDOW, Pending, Prescriptions
from iortd.daemon.tracker import (
    DeliveryStarted,
    DeliveryTracker,
    Phase,
    PhaseChanged,
    TrackerEvent,
)
from iortd.daemon.verification import (
    OVERRIDABLE,
    Console,
    Inputs,
    Override,
    judge,
    public_object,
    signature_status,
)
from iortd.kernel.types import (
    ApplicatorIdentity,
    VerificationItem,
    VerificationOutcome,
    VerificationTrigger,
)
from iortd.plan.doserate import DoseRateTable, OutputFactor, read_doserate_table

__all__ = ["KIND", "OverrideRefused", "Verifier", "install", "parse_override"]

log = structlog.get_logger("iortd.verifier")

KIND = "override"
MAX_OVERRIDES_PER_DELIVERY: Final = 16
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
T = VerificationTrigger
FactorFor = Callable[[date], OutputFactor | None]
_BEAM: Final = frozenset({Phase.IRRADIATING, Phase.INTERRUPTED})


class OverrideRefused(Refused):
    """An override command judged and refused; ``reason`` is a fixed word."""


@dataclass(frozen=True, slots=True)
class OverrideBody:
    delivery_id: str
    prescription_sha256: str
    items: tuple[VerificationItem, ...]
    reason: str


def parse_override(body: Mapping[str, Any]) -> OverrideBody:
    """The override command's body, strictly (``malformed`` / ``not_overridable``)."""
    keys = {"delivery_id", "prescription_sha256", "items", "reason"}
    if set(body) != keys:
        raise OverrideRefused("malformed", f"the body must have exactly {', '.join(sorted(keys))}")
    did, sha = body["delivery_id"], body["prescription_sha256"]
    items, reason = body["items"], body["reason"]
    if not isinstance(did, str) or not _ID.fullmatch(did):
        raise OverrideRefused("malformed", "delivery_id: not a delivery id")
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise OverrideRefused("malformed", "prescription_sha256: must be 64 lower-case hex")
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= 8
        or not all(isinstance(x, str) for x in items)
        or len(set(items)) != len(items)
    ):
        raise OverrideRefused("malformed", "items: 1 to 8 unique item names")
    known = {i.value for i in VerificationItem}
    if not set(items) <= known:
        raise OverrideRefused("malformed", "items: an unknown item (its name is not recorded)")
    parsed = tuple(VerificationItem(x) for x in items)
    never = [i.value for i in parsed if i not in OVERRIDABLE]
    if never:
        raise OverrideRefused("not_overridable", f"never overridable: {', '.join(never)}")
    if (
        not isinstance(reason, str)
        or not 1 <= len(reason) <= 300
        or not reason.isprintable()
        or not reason.strip()
    ):
        raise OverrideRefused("malformed", "reason: 1-300 printable characters")
    return OverrideBody(did, sha, parsed, reason)


@dataclass
class _Delivery:
    latest: Mapping[str, Any] | None = None
    overrides: list[Override] = field(default_factory=list)
    console: Console | None = None  # what the latest check saw
    at: datetime | None = None  # when the latest check was recorded (from the log)
    used_written: bool = False
    # The latest check no seal vouches for (rebuilt): not believed as a check, but the
    # prescription it names counts as used once the beam has come on (the safe side).
    unvouched: Mapping[str, Any] | None = None


class Verifier:
    """The verifier's state and decisions; the service writes what it returns."""

    def __init__(
        self,
        *,
        keyring: Keyring | None,
        pending: Callable[[], Pending | None],  # the last received, also once expired
        table: DoseRateTable | None,
        table_sha256: str,
        factor_for: FactorFor,
        require_factor: bool,
        applicator_types: Mapping[str, str],
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.keyring = keyring
        self._pending = pending
        self._table, self._table_sha = table, table_sha256
        self._factor_for = factor_for
        self._require_factor = require_factor
        self._types = dict(applicator_types)
        self._now = now or (lambda: datetime.now(UTC))
        self.used: set[str] = set()  # prescriptions with a prescription_used entry
        self._vouched: int | None = None  # see rebuild()
        self._deliveries: dict[str, _Delivery] = {}
        # Overrides accepted but given no outcome (a crash), from the rebuild; refused
        # ``interrupted`` by ``resume`` (set by install) once the writer runs.
        self.orphans: dict[str, Command] = {}
        self.resume: Callable[[], Coroutine[Any, Any, None]] | None = None

    # ---- the check -----------------------------------------------------------------------

    def latest(self, delivery_id: str) -> Mapping[str, Any] | None:
        d = self._deliveries.get(delivery_id)
        return None if d is None else d.latest

    def taken_over(self, delivery_id: str, beam_on_s: float) -> dict[str, Any] | None:
        """At start, the delivery the log shows open (taken over, or closed if the console
        has moved on): its ``prescription_used`` if the beam had come on and the entry is
        missing (a crash between the beam-on and the entry)."""
        return self._used_entry(delivery_id) if beam_on_s > 0 else None

    def checked_at(self, delivery_id: str) -> datetime | None:
        """When the latest check was recorded, as the log says (after a rebuild)."""
        d = self._deliveries.get(delivery_id)
        return None if d is None else d.at

    def _of(self, delivery_id: str) -> _Delivery:
        d = self._deliveries.get(delivery_id)
        if d is None:
            if len(self._deliveries) > 64:  # bounded: only the recent deliveries matter
                self._deliveries.pop(next(iter(self._deliveries)))
            d = self._deliveries[delivery_id] = _Delivery()
        return d

    def check(
        self,
        trigger: VerificationTrigger,
        delivery_id: str,
        tracker: DeliveryTracker,
        extra: Sequence[Override] = (),
    ) -> dict[str, Any]:
        """One check of the console (the tracker's view) against the pending prescription:
        the ``verification`` entry's data; remembered as this delivery's latest."""
        now = self._now()
        pending = self._pending()
        d = self._of(delivery_id)
        console, reader, has_reader = _console(tracker)
        p = None if pending is None else pending.prescription
        inp = Inputs(
            prescription=p,
            sha256=None if pending is None else pending.sha256,
            now=now,
            signature=signature_status(self.keyring, p.approved_by, now) if p else (False, ""),
            already_delivered=pending is not None and pending.sha256 in self.used,
            console=console,
            reader_configured=has_reader,
            reader=reader,
            table=self._table,
            table_sha256=self._table_sha,
            factor=self._factor_for(now.date()),
            require_factor=self._require_factor,
            applicator_types=self._types,
            # Only the overrides given for the pending prescription (finding: one given
            # for A was applied to B once a check had named B).
            overrides=[
                o
                for o in (*d.overrides, *extra)
                if pending is not None and o.prescription_sha256 == pending.sha256
            ],
        )
        entry = judge(inp, trigger, delivery_id)
        d.latest, d.console, d.at = entry, console, now
        log.info(
            "verification_checked",
            delivery_id=delivery_id,
            trigger=trigger.value,
            outcome=entry["outcome"],
            reasons=entry["reasons"],
            prescription_sha256=entry["prescription_sha256"],
        )
        if extra and entry["outcome"] == "VERIFIED_OVR":
            d.overrides += extra
        return entry

    def follow(
        self, events: Sequence[TrackerEvent], tracker: DeliveryTracker
    ) -> tuple[list[dict[str, Any]], bool, dict[str, Any] | None]:
        """After a source reading: the checks to record (in order), whether the beam came
        on with no prescription pending, and the ``prescription_used`` entry to write."""
        checks: list[dict[str, Any]] = []
        no_rx = False
        used: dict[str, Any] | None = None
        snap = tracker.snapshot()
        did = snap.delivery_id if snap is not None and snap.termination is None else None
        for ev in events:
            if isinstance(ev, DeliveryStarted) and ev.joined_in_progress:
                if self.latest(ev.delivery_id) is None and ev.delivery_id == did:
                    checks.append(self.check(T.JOINED, ev.delivery_id, tracker))
            elif isinstance(ev, PhaseChanged) and ev.dst is Phase.IRRADIATING and did:
                if self.latest(did) is None:
                    checks.append(self.check(T.BEAM_ON, did, tracker))
                no_rx = no_rx or self._no_valid_prescription()
        if did is not None and self.latest(did) is None and tracker.phase in _BEAM:
            # A delivery taken over after a restart with no believed check in the log: it
            # continues with no new selection and no phase change, so it is joined.
            checks.append(self.check(T.JOINED, did, tracker))
        if did is not None and (
            tracker.phase is Phase.IRRADIATING or (snap is not None and snap.beam_on_s > 0)
        ):
            # Once per delivery; also for one taken over after a crash that came between
            # its beam-on and this entry (the beam had come on: its timer says so).
            used = self._used_entry(did)
        ready = any(isinstance(ev, PhaseChanged) and ev.dst is Phase.READY for ev in events)
        if did is not None and tracker.phase is Phase.READY:
            d = self._of(did)
            if ready or d.latest is None or d.console != _console(tracker)[0]:
                checks.append(self.check(T.READY, did, tracker))
        return checks, no_rx, used

    def _no_valid_prescription(self) -> bool:
        pending = self._pending()
        return pending is None or pending.prescription.expired(self._now())

    def _used_entry(self, delivery_id: str) -> dict[str, Any] | None:
        d = self._of(delivery_id)
        gov = d.latest or d.unvouched
        if d.used_written or gov is None or gov.get("prescription_sha256") is None:
            return None
        d.used_written = True
        rx = gov["prescription"]
        self.used.add(str(gov["prescription_sha256"]))
        return {
            "delivery_id": delivery_id,
            "prescription_sha256": gov["prescription_sha256"],
            "treatment_id": rx["treatment_id"],
            "plan_id": rx["plan_id"],
            "fraction": rx["fraction"],
        }

    def recheck(self, tracker: DeliveryTracker) -> dict[str, Any] | None:
        """A prescription arrived (or changed): checked now when the console is READY."""
        snap = tracker.snapshot()
        if snap is None or snap.termination is not None or tracker.phase is not Phase.READY:
            return None
        return self.check(T.PRESCRIPTION, snap.delivery_id, tracker)

    # ---- the override --------------------------------------------------------------------

    def override(self, cmd: Command, tracker: DeliveryTracker) -> dict[str, Any]:
        """The check an accepted override makes, or OverrideRefused."""
        body = parse_override(cmd.body)
        snap = tracker.snapshot()
        if snap is None or snap.termination is not None:
            raise OverrideRefused("no_open_delivery", "no delivery is open")
        if snap.delivery_id != body.delivery_id:
            raise OverrideRefused(
                "other_delivery", f"the open delivery is {snap.delivery_id}, not {body.delivery_id}"
            )
        d = self._of(snap.delivery_id)
        latest = d.latest
        if latest is None:
            raise OverrideRefused("not_checked", "no check made for this delivery yet")
        if latest["outcome"] != "NOT_VERIFIED":
            raise OverrideRefused("not_not_verified", f"the latest check is {latest['outcome']}")
        if latest["prescription_sha256"] != body.prescription_sha256:
            raise OverrideRefused(
                "stale_prescription", "the latest check is of another prescription"
            )
        if len(d.overrides) >= MAX_OVERRIDES_PER_DELIVERY:
            raise OverrideRefused("too_many", "too many overrides for this delivery")
        failed = {c["item"]: c for c in latest["checks"] if not c["ok"]}
        never = sorted(set(failed) - {i.value for i in OVERRIDABLE})
        if never:
            raise OverrideRefused("not_overridable", f"failed and never overridable: {never}")
        missing = sorted(set(failed) - {i.value for i in body.items})
        if missing:
            raise OverrideRefused("does_not_cover", f"failed and not overridden: {missing}")
        extra = [
            Override(
                i,
                body.reason,
                cmd.signer,
                cmd.nonce,
                failed[i.value]["actual"],
                body.prescription_sha256,
            )
            for i in body.items
            if i.value in failed
        ]
        return self.check(T.OVERRIDE, snap.delivery_id, tracker, extra)

    # ---- from the log, at start ----------------------------------------------------------

    def rebuild(self, directory: Path, vouched_count: int | None = None) -> int:
        """The used prescriptions and each recent delivery's latest check and overrides
        (blocking: run it in a thread at start). Returns the entries used.

        ``vouched_count``: entries from that seq on are vouched for by no seal (written
        after the last one before a crash, or by someone with write access to the log
        directory). A ``prescription_used`` among them still counts (the safe side: the
        prescription is not given twice); a ``verification`` among them is not believed
        (it could say VERIFIED where no check did): the delivery is checked again."""
        self._vouched = vouched_count
        since = (self._now() - REBUILD_WINDOW).strftime("%Y%m%d")
        used = 0
        for line in recent_lines(
            directory, since, b'"type":"verification"', b'"type":"prescription_used"',
            b'"kind":"override"', b'"type":"override_refused"', b'"type":"command_failed"',
        ):  # fmt: skip
            used += self._replay(line)
        return used

    def _orphan(self, kind: str, data: Mapping[str, Any]) -> None:
        """An accepted override is open until an entry names its nonce: its refusal, its
        handler's failure, or a check that applied it. A check an override made that is not
        VERIFIED_OVR names no nonce: it closes the oldest open one (the intake runs one
        handler at a time, in the order it accepted them). Never raises: an entry of
        another shape changes nothing here (nor what the rest of the rebuild takes of it)."""
        try:
            if kind == "command_accepted" and data.get("kind") == KIND:
                self.orphans[str(data["nonce"])] = Command(
                    kind=KIND, signer=str(data["signer"]), body={}, nonce=str(data["nonce"]),
                    issued_at=parse_utc(data["issued_at"]),
                    expires_at=parse_utc(data["expires_at"]), sha256=str(data["sha256"]),
                )  # fmt: skip
            elif kind in ("override_refused", "command_failed"):
                self.orphans.pop(str(data["nonce"]), None)
            elif kind == "verification" and self.orphans:
                named = [self.orphans.pop(str(o["nonce"]), None) for o in data["overrides"]]
                if data["trigger"] == T.OVERRIDE.value and not any(named) and self.orphans:
                    self.orphans.pop(next(iter(self.orphans)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return

    def _replay(self, line: bytes) -> int:
        try:
            e = orjson.loads(line)
            kind, data = e["type"], e["data"]
            self._orphan(kind, data)
            if kind in ("command_accepted", "override_refused", "command_failed"):
                return 0
            d = self._of(str(data["delivery_id"]))
            if kind == "prescription_used":
                self.used.add(str(data["prescription_sha256"]))
                d.used_written = True
            elif kind == "verification":
                if self._vouched is not None and int(e["seq"]) >= self._vouched:
                    rx = data["prescription"]
                    if rx is not None:  # what prescription_used takes from it
                        _ = (rx["treatment_id"], rx["plan_id"], rx["fraction"])
                        d.unvouched = {"prescription": rx, "prescription_sha256": str(
                            data["prescription_sha256"])}  # fmt: skip
                    return 0
                # Every field the verifier reads later is read now: an entry of another
                # shape is not taken (it must never fail a reading's processing later).
                at, console = parse_utc(e["ts"]), _console_of(data["console"])
                actual = {str(ch["item"]): ch["actual"] for ch in data["checks"]}
                if data["outcome"] not in {o.value for o in VerificationOutcome}:
                    return 0
                public_object(data, at)  # what the restart publishes of it
                rx = data["prescription"]
                if rx is not None:  # what prescription_used takes from it
                    _ = (rx["treatment_id"], rx["plan_id"], rx["fraction"])
                overrides = [
                    Override(
                        VerificationItem(o["item"]), str(o["reason"]), str(o["by"]),
                        str(o["nonce"]), actual.get(o["item"]),
                        str(data["prescription_sha256"]),
                    )
                    for o in data["overrides"]
                ]  # fmt: skip
                d.latest, d.at, d.console = data, at, console
                if data["outcome"] == "VERIFIED_OVR":
                    d.overrides = overrides
            else:
                return 0
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0  # iort-audit verify reports a bad entry
        return 1


def _console(tracker: DeliveryTracker) -> tuple[Console, Any, bool]:
    snap = tracker.snapshot()
    view = tracker.applicator_view
    console = Console(
        None if snap is None else snap.preset_gy,
        None if snap is None else snap.planned_time_s,
        None if snap is None else snap.applicator,
    )
    reader = None if view is None or view.reading is None else view.reading.applicator
    return console, reader, view is not None


def _console_of(c: Mapping[str, Any]) -> Console:
    a = c.get("applicator")
    app = None if a is None else ApplicatorIdentity(a["type"], a["diameter_mm"], a["serial"])
    return Console(c.get("preset_gy"), c.get("planned_time_s"), app)


class _Service(Protocol):
    """What the verifier needs of the running service (daemon/service.py)."""

    tracker: DeliveryTracker
    verifier: Verifier | None

    def record_check(self, entry: Mapping[str, Any]) -> asyncio.Future[None] | None: ...


async def install(
    config: VerificationConfig,
    intake: CommandIntake,
    audit: AuditLog,
    directory: Path,
    service: _Service,
    rx: Prescriptions,
    notice: Callable[[str, str], None],
    factor_for: FactorFor,
    vouched_count: int | None = None,
    on_factor_change: Callable[[Callable[[], None]], None] | None = None,
) -> Verifier | None:
    """The verifier, its state rebuilt from the log in ``directory``, wired to the service
    (``service.verifier``), the prescriptions and the output factors (``on_change``: a
    check again while READY) and the intake (the ``override`` handler); None when the log
    cannot be read back (said loudly)."""
    table, sha = None, ""
    if config.doserate_table is not None:
        table, sha = await asyncio.to_thread(read_doserate_table, config.doserate_table)
    v = Verifier(
        keyring=intake.keyring,
        pending=lambda: rx.latest,
        table=table,
        table_sha256=sha,
        factor_for=factor_for,
        require_factor=config.require_output_factor,
        applicator_types=config.applicator_types,
    )
    used = await rebuild_or_off(
        "verification",
        "verification before beam-on is",
        lambda: v.rebuild(directory, vouched_count),
        notice,
    )
    if used is None:
        return None
    log.info("verification_rebuilt", entries=used, used_prescriptions=len(v.used))

    def changed() -> None:
        try:
            entry = v.recheck(service.tracker)
        except Exception:  # the prescription is recorded; its check must not undo that
            log.exception("verification_failed")
            notice("critical", "verification failed on a new prescription (see the journal)")
            return
        if entry is not None:
            service.record_check(entry)

    async def handle(cmd: Command) -> None:
        try:
            entry = v.override(cmd, service.tracker)
        except OverrideRefused as exc:
            data = {"nonce": cmd.nonce, "signer": cmd.signer, "reason": exc.reason,
                    "detail": exc.detail}  # fmt: skip
            await asyncio.shield(audit.append("override_refused", data, durable=True).committed)
            log.warning("override_refused", reason=exc.reason, nonce=cmd.nonce)
            said = f"override refused ({exc.reason}): {exc.detail}"
            notice(
                "critical",
                answered(said, "refused", kind=cmd.kind, nonce=cmd.nonce, reason=exc.reason),
            )
            return
        durable = service.record_check(entry)
        said = f"override by {cmd.signer}: check {entry['outcome']} ({cmd.nonce})"
        notice("info", answered(said, "done", kind=cmd.kind, nonce=cmd.nonce))
        if durable is not None:
            await asyncio.shield(durable)  # a group commit's future: never cancelled here

    async def interrupted(cmd: Command) -> None:
        # Its signed body was never on disk (command_accepted keeps its hash only): refused,
        # not judged; the physicist sends it again if the mismatch still stands.
        detail = "the daemon stopped before this override was judged; send it again if needed"
        data = {"nonce": cmd.nonce, "signer": cmd.signer, "reason": "interrupted",
                "detail": detail}  # fmt: skip
        await asyncio.shield(audit.append("override_refused", data, durable=True).committed)
        log.warning("override_refused", reason="interrupted", nonce=cmd.nonce)
        said = f"override refused (interrupted): {detail} [nonce {cmd.nonce}]"
        notice(
            "critical",
            answered(said, "refused", kind=cmd.kind, nonce=cmd.nonce, reason="interrupted"),
        )

    async def resume() -> None:
        orphans, v.orphans = list(v.orphans.values()), {}
        await resume_commands(KIND, orphans, interrupted)

    v.resume = resume
    service.verifier = v
    rx.on_change = changed
    if on_factor_change is not None:  # the day's output factor arriving while READY
        on_factor_change(changed)
    intake.register(KIND, handle)
    return v
