"""The daemon's ``replay`` command: a central consumer's gap repair, judged and recorded.

A consumer that tracks ``(room, session, topic, seq)`` (``iort-ingest``) and finds seqs
missing sends a signed ``cmd/replay`` whose body is ``{"topic": "telemetry" |
"applicator" | "events", "session": S, "first": A, "last": B}`` (inclusive). The intake
(daemon/commands.py) has checked the envelope, the signer's key and role (``replay``, a
replay-only key that can sign nothing else; or ``physicist``/``admin``) and recorded
``command_accepted`` with this module's :func:`summary` (the range: a topic name and
integers, nothing else) before :meth:`Replays.handle` runs. Then, in this order:

* the body (``malformed_body``, ``span_too_large``: daemon/mqtt/replay.py);
* the rate: at most ``[mqtt] replay_max_per_minute`` requests a minute
  (``rate_limited``), and not while a replay's queue is over its bound (``busy``);
* the session: not newer than the room's (``unknown_session``);
* served by the MQTT sink from what its outbox still holds (held for
  ``[mqtt] replay_retention_s``): those messages again with their original session and
  seq, ``historical: true``; each missing run declared on ``skip`` (``not_held``).

Recorded: ``replay_served`` (``nonce``, ``signer``, ``topic``, ``session``, ``first``,
``last``, ``judged_last``: the last seq looked at, ``served``, ``skipped``: seqs
declared, ``skipped_runs``) or ``replay_refused`` (``reason``, ``detail``, ``nonce``,
``signer``), durable, then an answer on ``events`` (daemon/answers.py). Nothing of a
delivery or a patient is in either: the range is the consumer's own bookkeeping.

Not resumed after a crash: a replay is idempotent, and the consumer, whose gap is still
open, asks again (an accepted request a crash left unhandled has no outcome entry; an
auditor reads it as not served).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from iortd.auditlog.canonical import canonical
from iortd.auditlog.command import Command
from iortd.auditlog.writer import AuditLog, AuditLogClosed
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake
from iortd.daemon.mqtt.replay import ReplayRefused, parse_range
from iortd.daemon.mqtt.sink import MqttSink

__all__ = ["KIND", "Replays", "install", "summary"]

log = structlog.get_logger("iortd.replay")

KIND = "replay"


def summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``command_accepted`` records of the body: the range when it is one, else only
    the body's hash (a malformed body's text is the sender's, never recorded)."""
    try:
        return parse_range(body).fields()
    except ReplayRefused:
        return {"body_sha256": hashlib.sha256(canonical(dict(body))).hexdigest()}


class Replays:
    def __init__(self, sink: MqttSink, audit: AuditLog, notice: Callable[[str, str], None]) -> None:
        self._sink, self._audit, self._notice = sink, audit, notice

    async def handle(self, cmd: Command) -> None:
        who: dict[str, Any] = {"nonce": cmd.nonce, "signer": cmd.signer}
        try:
            rng = parse_range(cmd.body)
            self._sink.replay.admit()
            served = await self._sink.serve_replay(rng)
        except ReplayRefused as exc:
            data = {"reason": exc.reason, "detail": exc.detail, **who}
            self._append("replay_refused", data)
            log.warning("replay_refused", reason=exc.reason, signer=cmd.signer)
            said = f"replay refused ({exc.reason}): {exc.detail} [nonce {cmd.nonce}]"
            self._notice(
                "info", answered(said, "refused", kind=KIND, nonce=cmd.nonce, reason=exc.reason)
            )
            return
        data = {
            **who,
            **rng.fields(),
            "judged_last": served.judged_last,
            "served": served.served,
            "skipped": served.skipped_seqs,
            "skipped_runs": len(served.skipped),
        }
        self._append("replay_served", data)
        log.info("replay_served", **data)
        said = (
            f"replay of {rng.topic} session {rng.session} seq {rng.first}..{rng.last}: "
            f"{served.served} sent again, {served.skipped_seqs} not held [nonce {cmd.nonce}]"
        )
        self._notice("info", answered(said, "done", kind=KIND, nonce=cmd.nonce))

    def _append(self, type_: str, data: Mapping[str, Any]) -> None:
        try:
            self._audit.append(type_, data, durable=True)
        except AuditLogClosed:
            log.warning("replay_not_recorded", type=type_)


def install(
    intake: CommandIntake,
    audit: AuditLog,
    sinks: Sequence[Any],
    notice: Callable[[str, str], None],
) -> Replays | None:
    """The ``replay`` handler on ``intake``, served by the MQTT sink among ``sinks``; None
    (the kind stays ``no_handler``) without one."""
    for s in sinks:
        inner = getattr(s, "inner", s)
        if isinstance(inner, MqttSink):
            replays = Replays(inner, audit, notice)
            intake.register(KIND, replays.handle, summary)
            return replays
    return None
