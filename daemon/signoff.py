"""The daemon's ``signoff`` command: a physicist's electronic sign-off of one ended delivery.

What is signed is auditlog/signoff.py's body (the delivery id, the meaning, a reason for
``approved_with_deviation``, the printed name, and the delivery's ``record``: its range in
the log, the SHA-256 of its entries' hashes and the covering signed checkpoint). The
intake (daemon/commands.py) has checked the envelope, the key and the role (physicist:
auditlog/command.py's role table) and recorded ``command_accepted`` (with :func:`summary`:
the delivery id, meaning and record; of a body that does not parse, its SHA-256 only)
before :meth:`Signoffs.handle` judges the body, in this order; the first failure is the
reason (a fixed word):

* ``malformed``: not a sign-off body (auditlog/signoff.py's strict parse);
* ``name_mismatch``: the body's printed name is not the keyring's for the signing key (the
  name shown on the report is the one the signer saw *and* the one enrolled);
* ``unknown_delivery``, ``not_ended`` (no ``delivery_terminated`` yet), ``not_covered``
  (no signed checkpoint after its last entry yet: the log has no signing key, or the
  checkpoint is moments away);
* ``record_mismatch``: the body's record is not what the log holds, recomputed now from the
  segments (the field that differs is named);
* ``duplicate``: the same holder signed the same delivery with the same meaning already.
  Several sign-offs of a delivery are allowed (reviewed, then approved; a second
  physicist): a later one never replaces an earlier one.
* ``interrupted``: an accepted sign-off whose handler a crash stopped (found at the next
  start). Its signed envelope was never on disk (``command_accepted`` keeps no signature),
  so it is refused rather than recorded without one; the physicist signs again.

Accepted: ``delivery_signed`` (durable) with ``delivery_id``, ``meaning``, ``reason``,
``by`` (holder), ``name`` (printed, from the keyring), ``roles``, ``signed_at`` (the
envelope's ``issued_at``: when the physicist signed), ``record``, ``nonce`` and
``envelope`` (the whole signed command, so anyone can check the signature offline:
``iort-audit verify --keyring``), then an ``info`` notice on ``events``, then each sink's
``signed`` callback (:attr:`Signoffs.on_signed`: the DICOM sender's ``when = "signoff"``).
Refused:
``signoff_refused`` (``reason``, ``detail``, ``nonce``, ``by``, ``delivery_id`` when the
body names one) and a ``critical`` notice. Both notices name the command's nonce and carry
the answer's fields (daemon/answers.py), so a sender (the dashboard) can tell its own
outcome from others' without reading words. Neither entry carries the
delivery id at the top level (auditlog/signoff.py: a sign-off never extends the range it
signs).

**What a signer needs** (:class:`RecordWatch`, a sink told after the record like any
other): after a delivery ends, at the next signed checkpoint (one is signed at every
delivery end), the delivery's record is computed from the log exactly as the judgement
computes it and handed to the MQTT sink, which adds it to the retained ``delivery`` payload
as ``delivery.record`` (docs/schemas/v1/delivery.schema.json). The dashboard, fed by MQTT
only, builds the body from it; a signer may as well compute it from the log
(:func:`~iortd.auditlog.signoff.delivery_record`). The record stays in the broker's retained
message until the next delivery; a restart does not compute it again (a crash between a
delivery's end and its covering checkpoint leaves that delivery without one).

The state is the log: each judgement reads the delivery's segments (newest first, back to
the one holding its own ``delivery_started`` entry, parsed to be sure: another delivery's
start or look-alike bytes in some entry's data do not stop it) in a worker thread;
nothing is kept in memory but the commands a crash left unhandled
(:meth:`Signoffs.rebuild`, then :meth:`Signoffs.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.command import Command
from iortd.auditlog.keyring import parse_utc
from iortd.auditlog.logdir import SEGMENT_RE, LogDamaged, read_segment, segment_paths
from iortd.auditlog.signoff import MEANING_TEXT, DeliveryRange, SignoffError, delivery_record
from iortd.auditlog.signoff import parse_body as parse_signoff
from iortd.auditlog.writer import AuditLog
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake, rebuild_or_off, resume_commands
from iortd.daemon.sinks import Sink
from iortd.daemon.tracker import DeliveryAmended, DeliverySnapshot, Terminated, TrackerEvent
from iortd.kernel.timefmt import utc_ts

__all__ = ["RecordWatch", "Signoffs", "install", "summary"]

log = structlog.get_logger("iortd.signoff")

KIND: Final = "signoff"
# Commands expire within 24 h: two days of segments hold every one a crash left unhandled.
REBUILD_WINDOW: Final = timedelta(days=2)
_REBUILD_MARKS: Final = (
    b'"kind":"signoff"',
    b'"type":"delivery_signed"',
    b'"type":"signoff_refused"',
    b'"type":"command_failed"',
)


def _body_sha(body: Mapping[str, Any]) -> str:
    try:
        return hashlib.sha256(canonical(dict(body))).hexdigest()
    except CanonicalError:
        return ""


def summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``command_accepted`` records of a sign-off: which delivery, meaning and record
    (the reason and the signature are in ``delivery_signed``); of a body that does not
    parse, its SHA-256 only (its keys could be anything)."""
    try:
        b = parse_signoff(body)
    except SignoffError:
        return {"body_sha256": _body_sha(body), "parsed": False}
    return {"delivery_id": b.delivery_id, "meaning": b.meaning, "record": b.record, "parsed": True}


@dataclass(frozen=True, slots=True)
class _Scan:
    found: DeliveryRange | None
    meanings: frozenset[str]  # what this holder signed the delivery as already


def _scan(directory: Path, delivery_id: str, holder: str) -> _Scan:
    """The delivery's range and the holder's earlier sign-offs of it (blocking). The
    segments back to the one holding its start are read; their entries are parsed one at
    a time (a 64 MiB segment holds some 10^5 of them: never all in memory at once)."""
    start = f'"delivery_id":"{delivery_id}","hash"'.encode()
    chunks: list[bytes] = []
    for path in reversed(segment_paths(directory)):
        raw = read_segment(path)
        chunks.append(raw)
        if _holds_start(raw, start, delivery_id):
            break  # the segment with its start: older ones hold none of it
    meanings: set[str] = set()
    found = delivery_record(_entries(chunks, delivery_id, holder, meanings), delivery_id)
    return _Scan(found, frozenset(meanings))


def _holds_start(raw: bytes, start: bytes, delivery_id: str) -> bool:
    """Whether ``raw`` holds the delivery's OWN ``delivery_started`` entry: not any entry of
    it beside another delivery's start (a delivery crosses a segment boundary, the next one
    starts after it), nor bytes like it inside another entry's data."""
    pos = raw.find(start)
    while pos >= 0:
        begin, end = raw.rfind(b"\n", 0, pos) + 1, raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end
        line = raw[begin:end]
        if b'"type":"delivery_started"' in line:
            with contextlib.suppress(orjson.JSONDecodeError):
                e = orjson.loads(line)
                if (
                    isinstance(e, dict)
                    and e.get("type") == "delivery_started"
                    and e.get("delivery_id") == delivery_id
                ):
                    return True
        pos = raw.find(start, end)
    return False


def _lines(raw: bytes) -> Iterator[bytes]:
    """One line at a time (never a list, nor a copy, of a whole segment's lines)."""
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end
        yield raw[pos:end]
        pos = end + 1


def _entries(
    chunks: list[bytes], delivery_id: str, holder: str, meanings: set[str]
) -> Iterator[dict[str, Any]]:
    """The entries of ``chunks`` (newest segment first) oldest first; the meanings of the
    holder's sign-offs of the delivery are added to ``meanings`` on the way."""
    while chunks:
        raw = chunks.pop()  # each segment's bytes are let go once read
        for line in _lines(raw):
            try:
                e = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn tail: iort-audit verify is the tool that reports it
            if not isinstance(e, dict):
                continue
            d = e.get("data")
            if (
                e.get("type") == "delivery_signed"
                and isinstance(d, dict)
                and d.get("delivery_id") == delivery_id
                and d.get("by") == holder
            ):
                meanings.add(str(d.get("meaning")))
            yield e


def _differs(want: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    for key in ("first_seq", "last_seq", "entries_sha256", "checkpoint"):
        if want.get(key) != got.get(key):
            return f"record.{key} is not what the log holds ({want.get(key)!r} there)"
    return "the record is not what the log holds"


class Signoffs:
    """The ``signoff`` command's handler."""

    def __init__(
        self,
        audit: AuditLog,
        directory: Path,
        *,
        notice: Callable[[str, str], None],
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._audit = audit
        self._directory = directory
        self._notice = notice
        self._now = now or (lambda: datetime.now(UTC))
        self._orphans: list[Command] = []
        # Told (delivery id, meaning) once delivery_signed is on disk: each sink's queue
        # (Sink.signed; the DICOM sender's ``when = "signoff"``). Puts only: never waits.
        self.on_signed: list[Callable[[str, str], Awaitable[None]]] = []
        self._lock = asyncio.Lock()  # one judged and recorded at a time (the duplicate rule)

    async def handle(self, cmd: Command) -> None:
        async with self._lock:
            try:
                data = await self._judge(cmd)
            except SignoffError as exc:
                await self._refuse(cmd, exc)
                return
            await asyncio.shield(
                self._audit.append("delivery_signed", data, durable=True).committed
            )
        log.info("delivery_signed", delivery=data["delivery_id"], by=cmd.signer, nonce=cmd.nonce)
        reason = "" if data["reason"] is None else f" (reason: {data['reason'][:120]})"
        said = (
            f"sign-off recorded: delivery {data['delivery_id']} "
            f"{MEANING_TEXT[data['meaning']]}{reason} by {data['name']} ({cmd.signer}) "
            f"[nonce {cmd.nonce}]"
        )
        self._notice("info", answered(said, "done", kind="signoff", nonce=cmd.nonce))
        for tell in self.on_signed:
            try:
                await tell(data["delivery_id"], data["meaning"])
            except Exception:  # a sink's queue failing must not fail the recorded sign-off
                log.exception("signoff_not_told", delivery=data["delivery_id"])

    async def _refuse(self, cmd: Command, exc: SignoffError) -> None:
        did = cmd.body.get("delivery_id")
        data = {
            "reason": exc.reason,
            "detail": exc.detail[:300],
            "nonce": cmd.nonce,
            "by": cmd.signer,
            "delivery_id": did if isinstance(did, str) and len(did) <= 128 else None,
        }
        await asyncio.shield(self._audit.append("signoff_refused", data, durable=True).committed)
        log.warning("signoff_refused", reason=exc.reason, nonce=cmd.nonce)
        said = f"sign-off NOT recorded ({exc.reason}): {exc.detail[:200]} [nonce {cmd.nonce}]"
        self._notice(
            "critical",
            answered(said, "refused", kind="signoff", nonce=cmd.nonce, reason=exc.reason),
        )

    async def _judge(self, cmd: Command) -> dict[str, Any]:
        if not cmd.envelope:
            raise SignoffError(
                "interrupted",
                "the daemon stopped before this sign-off was recorded; sign again",
            )
        body = parse_signoff(cmd.body)
        if body.name != cmd.signer_name:
            raise SignoffError(
                "name_mismatch",
                f"the body's name is not the keyring's for {cmd.signer} ({cmd.signer_name!r})",
            )
        scan = await asyncio.to_thread(_scan, self._directory, body.delivery_id, cmd.signer)
        got = scan.found
        if got is None:
            raise SignoffError("unknown_delivery", f"no delivery {body.delivery_id} in the log")
        if not got.ended:
            raise SignoffError("not_ended", f"delivery {body.delivery_id} has not ended")
        record = got.record()
        if record is None:
            raise SignoffError(
                "not_covered",
                f"no signed checkpoint covers delivery {body.delivery_id} yet (is "
                "log.signing_key_file set?)",
            )
        if record != body.record:
            raise SignoffError("record_mismatch", _differs(record, body.record))
        if body.meaning in scan.meanings:
            raise SignoffError(
                "duplicate",
                f"{cmd.signer} signed delivery {body.delivery_id} as {body.meaning} already",
            )
        return {
            "delivery_id": body.delivery_id,
            "meaning": body.meaning,
            "reason": body.reason,
            "by": cmd.signer,
            "name": cmd.signer_name,
            "roles": sorted(cmd.roles),
            "signed_at": utc_ts(cmd.issued_at),
            "utc_offset_min": body.utc_offset_min,
            "record": record,
            "nonce": cmd.nonce,
            "envelope": dict(cmd.envelope),
        }

    # ---- from the log, at start ------------------------------------------------------------

    def rebuild(self) -> int:
        """The sign-offs accepted but never judged (a crash), from the last two days of
        segments (blocking: run it in a thread at start). Returns how many."""
        cutoff = (self._now() - REBUILD_WINDOW).strftime("%Y%m%d")
        paths = []
        for path in reversed(segment_paths(self._directory)):
            paths.append(path)
            m = SEGMENT_RE.match(path.name)
            if m and m.group(2) < cutoff:
                break
        pending: dict[str, Command] = {}
        for path in reversed(paths):
            for line in read_segment(path).splitlines():
                if any(m in line for m in _REBUILD_MARKS):
                    _replay(line, pending)
        self._orphans = list(pending.values())
        return len(self._orphans)

    async def resume(self) -> None:
        """Refuse (``interrupted``) what a crash left accepted but unjudged."""
        orphans, self._orphans = self._orphans, []
        await resume_commands("signoff", orphans, self.handle)


def _replay(line: bytes, pending: dict[str, Command]) -> None:
    try:
        e = orjson.loads(line)
        kind, data = e["type"], e["data"]
        if kind == "command_accepted" and data.get("kind") == KIND:
            body = data["body"]
            did = body.get("delivery_id") if body.get("parsed") else None
            pending[data["nonce"]] = Command(
                kind=KIND,
                signer=str(data["signer"]),
                body={} if did is None else {"delivery_id": did},
                nonce=str(data["nonce"]),
                issued_at=parse_utc(data["issued_at"]),
                expires_at=parse_utc(data["expires_at"]),
                sha256=str(data["sha256"]),
            )
        elif kind in ("delivery_signed", "signoff_refused", "command_failed"):
            pending.pop(data["nonce"], None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # not ours to judge here: iort-audit verify reports a bad entry


class RecordWatch(Sink):
    """Publishes what a sign-off of each ended delivery signs, once a signed checkpoint
    covers it: to each of :attr:`targets` (the MQTT sink's ``delivery_record``)."""

    name = "signoff-record"

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._pending: str | None = None  # ended, its record not yet published
        self.targets: list[Callable[[str, Mapping[str, Any]], None]] = []

    def connect(self, sinks: Sequence[Any]) -> None:
        """Publish to every sink (inside its queue) that takes a ``delivery_record``."""
        inners = (getattr(s, "inner", s) for s in sinks)
        self.targets = [i.delivery_record for i in inners if hasattr(i, "delivery_record")]

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        for ev in events:
            if isinstance(ev, Terminated | DeliveryAmended):
                self._pending = ev.delivery_id

    async def checkpoint(self, note: str) -> None:
        did = self._pending
        if did is None or not self.targets:
            return
        try:
            scan = await asyncio.to_thread(_scan, self._directory, did, "")
        except (OSError, LogDamaged) as exc:
            log.warning("signoff_record_unread", delivery=did, error=str(exc))
            return  # tried again at the next checkpoint
        record = None if scan.found is None else scan.found.record()
        if record is None:
            return  # not covered yet: the next checkpoint
        self._pending = None
        for publish in self.targets:
            publish(did, record)


async def install(
    intake: CommandIntake, audit: AuditLog, directory: Path, notice: Callable[[str, str], None]
) -> Signoffs | None:
    """The ``signoff`` handler registered on ``intake``; None (the kind stays
    ``no_handler``, said loudly) when the log cannot be read back."""
    signoffs = Signoffs(audit, directory, notice=notice)
    found = await rebuild_or_off("signoffs", "sign-offs are", signoffs.rebuild, notice)
    if found is None:
        return None
    log.info("signoffs_rebuilt", unhandled=found)
    intake.register(KIND, signoffs.handle, summary)
    return signoffs
