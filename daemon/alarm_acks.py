"""The daemon's ``ack`` command and the room's alarms as retained state.

An operator or physicist acknowledges one raising of an alarm (its key and the
``raised_at`` the daemon published) with a signed ``ack`` command (docs/commands.md, "The
ack command"); the dashboard signs and publishes it on ``cmd/ack``. The intake
(daemon/commands.py) has checked the envelope, the signer's key and role (operator or
physicist) and recorded ``command_accepted`` (with this module's :func:`summary`: the
parsed body, so that a crash before the handler can be finished) before
:meth:`AlarmAcks.handle` runs. Here the body is judged against the alarm ledger
(daemon/alarm_ledger.py), and the first failure is the reason (a fixed word):
``malformed_body``, ``unknown_alarm`` (no such key raised at that time among the room's
current alarms: the open or last delivery and the one before), ``superseded`` (raised
again since with another severity), ``already_acknowledged``, ``wrong_delivery``.

Accepted: ``alarm_acknowledged`` (durable; under the alarm's delivery id) with ``key``,
``code``, ``severity``, ``raised_at``, ``delivery_id``, ``by`` (holder), ``name`` (the
printed name in the keyring), ``roles``, ``nonce`` and ``comment`` (or null); then the
ledger marks the raising acknowledged, the retained ``alarms`` topic is republished and an
``info`` notice goes on ``events``. Refused: ``ack_refused`` (``reason``, ``detail``,
``nonce``, ``by``) and an ``info`` notice. Both notices end with ``[nonce N]`` and carry
the answer's fields (daemon/answers.py: kind ``ack``, the nonce, ``done`` or ``refused``):
the dashboard that sent it waits for those, never the words (dashboard/commanding.py). An
acknowledgement changes nothing in the device (iortd is a passive monitor) and clears
nothing: a standing alarm stays standing, acknowledged (IEC 60601-1-8's acknowledged
state; docs/alarms.md).

The ledger sees the tracker's events through :class:`LedgerSink`, one of the daemon's
sinks (so after the record); on every change the ``on_change`` callbacks get the topic's
items (the MQTT sink's :meth:`~iortd.daemon.mqtt.sink.MqttSink.set_alarms`).

Crash-safety: the state is what the log says. :meth:`AlarmAcks.rebuild` reads the segments
back to the start of the delivery before the last one (at most :data:`REBUILD_MAX_DAYS`) at
start and replays the alarm entries through the ledger (so a restart forgets no
unacknowledged alarm); an ``ack`` command accepted with no outcome after it (a SIGKILL
between the record and the handler) is judged at start (:meth:`AlarmAcks.resume`) from
the body its ``command_accepted`` entry holds. A damaged line is skipped (``iort-audit
verify`` is the tool that reports it). Entries after the log's last seal
(``vouched_count``: recovery's, auditlog/recovery.py) are not believed: an unvouched
``alarm_acknowledged`` is skipped (the alarm stays unacknowledged; one journal warning with
the count) and an unvouched ``command_accepted`` is refused at start
(``interrupted_unvouched``), never acted on: either could have been written by someone with
write access to the log directory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.command import Command, recorded_command
from iortd.auditlog.keyring import Keyring
from iortd.auditlog.logdir import SEGMENT_RE, read_segment, segment_paths
from iortd.auditlog.writer import AuditLog
from iortd.daemon.alarm_ledger import Ack, AckRefused, AlarmLedger, Raising, parse_ack_body
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake, rebuild_or_off, resume_commands
from iortd.daemon.sinks import DeliverySnapshot, Sink, TrackerEvent

__all__ = ["KIND", "REBUILD_MAX_DAYS", "AlarmAcks", "LedgerSink", "install", "rebuild", "summary"]

log = structlog.get_logger("iortd.alarm_acks")

KIND: Final = "ack"
# How far back the log is read at start, at most, for the window's first delivery.
REBUILD_MAX_DAYS: Final = 31
_MARKS: Final = (
    b'"type":"alarm_',
    b'"type":"delivery_started"',
    b'"type":"daemon_start"',
    b'"type":"ack_refused"',
    b'"type":"command_failed"',
    b'"kind":"ack"',
)

UNVOUCHED: Final = (
    "accepted after the log's last seal (unvouched): not known to be a command this daemon "
    "accepted; send it again"
)

Items = list[dict[str, Any]]


def summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``command_accepted`` records of an ``ack``: the parsed body (an alarm key, a
    time, a delivery id, the comment), so that a crash before the handler can be finished;
    of a body that does not parse, its SHA-256 only."""
    try:
        req = parse_ack_body(body)
    except AckRefused:
        return {"body_sha256": _body_sha(body), "parsed": False}
    return {
        "parsed": True,
        "alarm_key": req.alarm_key,
        "raised_at": req.raised_at,
        "delivery_id": req.delivery_id,
        "comment": req.comment,
    }


def _body_sha(body: Mapping[str, Any]) -> str:
    try:
        return hashlib.sha256(canonical(dict(body))).hexdigest()
    except CanonicalError:
        return ""


class AlarmAcks:
    """The ledger, its rebuild, and the ``ack`` command's handler."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        notice: Callable[[str, str], None],
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.ledger = AlarmLedger()
        self.keyring: Keyring | None = None  # set by install(): printed names of orphans
        self._audit = audit
        self._notice = notice
        self._now = now or (lambda: datetime.now(UTC))
        self._callbacks: list[Callable[[Items, int], None]] = []
        self._orphans: list[Command] = []
        self._unvouched_orphans: list[Command] = []  # accepted after the last seal: refused
        self._vouched: int | None = None  # see rebuild()
        self._skipped = 0
        self._lock = asyncio.Lock()  # resume() at start runs beside the intake's task
        self._published = -1
        self.rebuilt = False  # the ledger was rebuilt from the log: acknowledgements may be judged
        self.handled = False  # install() registered the handler (resume() then runs at start)

    # ---- the ledger's state out -----------------------------------------------------------

    def on_change(self, callback: Callable[[Items, int], None]) -> None:
        """Call ``callback(items, omitted)`` now and after each change of what is shown."""
        self._callbacks.append(callback)
        self._call(callback)

    def _changed(self) -> None:
        if self.ledger.version == self._published:
            return
        self._published = self.ledger.version
        for callback in list(self._callbacks):
            self._call(callback)

    def _call(self, callback: Callable[[Items, int], None]) -> None:
        try:
            callback(self.ledger.view(), self.ledger.omitted)
        except Exception:  # one listener's bug stays its own
            log.exception("alarms_callback_failed")

    def observe(self, events: Sequence[TrackerEvent]) -> None:
        """The tracker's events (from :class:`LedgerSink`, after the record)."""
        self.ledger.events(events)
        self._changed()

    # ---- the handler ----------------------------------------------------------------------

    async def handle(self, cmd: Command) -> None:
        """Judge an accepted ``ack`` command and record the outcome (durably)."""
        async with self._lock:
            await self._handle(cmd)

    async def _handle(self, cmd: Command, *, unvouched: bool = False) -> None:
        try:
            r = self._judge(cmd, unvouched=unvouched)
        except AckRefused as exc:
            refused = {
                "reason": exc.reason,
                "detail": exc.detail,
                "nonce": cmd.nonce,
                "by": cmd.signer,
            }
            await asyncio.shield(self._audit.append("ack_refused", refused, durable=True).committed)
            log.warning("ack_refused", reason=exc.reason, nonce=cmd.nonce)
            said = f"acknowledgement refused ({exc.reason}): {exc.detail} [nonce {cmd.nonce}]"
            self._notice(
                "info", answered(said, "refused", kind="ack", nonce=cmd.nonce, reason=exc.reason)
            )
            return
        name, roles = self._who(cmd)
        comment = cmd.body.get("comment")
        data: dict[str, Any] = {
            "key": r.key,
            "code": r.code,
            "severity": r.severity,
            "raised_at": r.raised_at,
            "delivery_id": r.delivery_id,
            "by": cmd.signer,
            "name": name,
            "roles": roles,
            "nonce": cmd.nonce,
            "comment": comment,
        }
        entry = self._audit.append(
            "alarm_acknowledged", data, delivery_id=r.delivery_id, durable=True
        )
        await asyncio.shield(entry.committed)
        self.ledger.acknowledged(r.key, r.raised_at, Ack(cmd.signer, name, entry.ts, comment))
        log.info("alarm_acknowledged", key=r.key, raised_at=r.raised_at, by=cmd.signer)
        said = (
            f"alarm {r.key} raised {r.raised_at} acknowledged by {name} ({cmd.signer}) "
            f"[nonce {cmd.nonce}]"
        )
        self._notice("info", answered(said, "done", kind="ack", nonce=cmd.nonce))
        self._changed()

    def _judge(self, cmd: Command, *, unvouched: bool) -> Raising:
        if unvouched:
            raise AckRefused("interrupted_unvouched", UNVOUCHED)
        return self.ledger.judge(parse_ack_body(cmd.body))

    def _who(self, cmd: Command) -> tuple[str, list[str]]:
        """The signer's printed name and roles (from the keyring for a resumed command)."""
        if cmd.signer_name:
            return cmd.signer_name, sorted(cmd.roles)
        if self.keyring is not None:
            for k in self.keyring.of(cmd.signer):
                if k.valid_at(cmd.issued_at):
                    return k.name, sorted(k.roles)
        return cmd.signer, sorted(cmd.roles)

    # ---- from the log, at start ----------------------------------------------------------

    def rebuild(self, directory: Path, vouched_count: int | None = None) -> int:
        """The ledger and the unhandled ``ack`` commands, from the log (blocking: run it in
        a thread at start). Returns the entries used.

        ``vouched_count``: entries from that seq on are vouched for by no seal (recovery's
        RecoveryReport.vouched_count). An ``alarm_acknowledged`` among them is not
        believed; a ``command_accepted`` among them is refused at start, never handled."""
        self._vouched, self._skipped = vouched_count, 0
        cutoff = (self._now() - timedelta(days=REBUILD_MAX_DAYS)).strftime("%Y%m%d")
        chunks: list[list[bytes]] = []
        starts = 0
        for path in reversed(segment_paths(directory)):
            lines = [x for x in read_segment(path).splitlines() if any(m in x for m in _MARKS)]
            chunks.append(lines)
            starts += sum(b'"type":"delivery_started"' in x for x in lines)
            m = SEGMENT_RE.match(path.name)
            if starts >= 2 or (m and m.group(2) < cutoff):
                break  # the window's first delivery starts in this segment (or too old)
        accepted: dict[str, Command] = {}
        used = 0
        for lines in reversed(chunks):  # oldest first
            for line in lines:
                used += self._replay(line, accepted)
        self.ledger.run_ended()  # the log ends here: what stands is carried
        self._orphans = list(accepted.values())
        if self._skipped:
            log.warning("alarm_acks_unvouched", entries=self._skipped)
        self.rebuilt = True
        return used

    def _replay(self, line: bytes, accepted: dict[str, Command]) -> int:
        try:
            e = orjson.loads(line)
            kind, d = e["type"], e["data"]
            unvouched = self._vouched is not None and int(e["seq"]) >= self._vouched
            if kind == "command_accepted" and d.get("kind") == KIND:
                if unvouched:  # refused at start (resume), never handled
                    self._unvouched_orphans.append(_orphan(d))
                    return 1
                accepted[str(d["nonce"])] = _orphan(d)
                return 1
            if kind == "alarm_acknowledged" and unvouched:  # not believed
                self._skipped += 1
                return 0
            if kind in ("alarm_acknowledged", "ack_refused", "command_failed"):
                accepted.pop(str(d.get("nonce")), None)
            return int(self.ledger.entry(e))
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0  # not ours to judge here: iort-audit verify reports a bad entry

    async def resume(self) -> None:
        """Handle the commands a crash left accepted but unhandled (judged now)."""
        orphans, self._orphans = self._orphans, []
        await resume_commands("ack", orphans, self.handle)
        unvouched, self._unvouched_orphans = self._unvouched_orphans, []
        await resume_commands("ack", unvouched, self._refuse_unvouched)

    async def _refuse_unvouched(self, cmd: Command) -> None:
        async with self._lock:
            await self._handle(cmd, unvouched=True)


def _orphan(data: Mapping[str, Any]) -> Command:
    b = data["body"]
    body = (
        {k: b[k] for k in ("alarm_key", "raised_at", "delivery_id", "comment") if k in b}
        if b.get("parsed")
        else {"unparsed": True}  # judged again from nothing: refused as malformed_body
    )
    if body.get("comment") is None:
        body.pop("comment", None)
    return recorded_command(KIND, data, body)


class LedgerSink(Sink):
    """The tracker's events into the alarm ledger (after the record, like every sink)."""

    name = "alarms"

    def __init__(self, acks: AlarmAcks) -> None:
        self._acks = acks

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        self._acks.observe(events)


async def rebuild(
    acks: AlarmAcks,
    directory: Path,
    notice: Callable[[str, str], None],
    vouched_count: int | None = None,
) -> None:
    """The ledger rebuilt from the log in ``directory`` (at start, before any sink runs);
    when the log cannot be read back it starts empty (said loudly) and :func:`install`
    will not take acknowledgements: one judged without the ledger could acknowledge what
    it cannot see."""
    used = await rebuild_or_off(
        "alarm_ledger",
        "alarm acknowledgements are",
        lambda: acks.rebuild(directory, vouched_count),
        notice,
    )
    if used is None:
        return
    log.info("alarm_ledger_rebuilt", entries=used, shown=len(acks.ledger.shown()))


def install(intake: CommandIntake, acks: AlarmAcks) -> bool:
    """The ``ack`` handler registered on ``intake`` (not when the ledger was not rebuilt:
    the kind stays ``no_handler``)."""
    if not acks.rebuilt:
        return False
    acks.keyring = intake.keyring
    intake.register(KIND, acks.handle, summary)
    acks.handled = True
    return True
