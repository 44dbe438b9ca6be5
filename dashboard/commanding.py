"""Signed commands from the dashboard to a room's daemon, and the daemon's answer.

What the physicist's sign-off (dashboard/signoff.py) and the alarm acknowledgement
(dashboard/ack.py) share, in one place, so that both say the same truth the same way:

1. the body is signed with the key the session unlocked at login
   (:func:`iortd.users.signed_command`, valid ``ttl_s``); a body no daemon would accept is
   :attr:`Outcome.NOT_SIGNED` and nothing is sent;
2. the envelope is published to the room's ``cmd/KIND`` at QoS 1, never retained, over the
   dashboard's own MQTT connection (:attr:`Hub.publish`); none, or a publish that fails,
   is :attr:`Outcome.NOT_SENT`;
3. the answer is the room's daemon's own ``events`` notice (``daemon_notice``) whose
   structured ``command`` object names the command (daemon/answers.py): its kind and
   nonce (its handler's verdict: ``done``, ``refused`` or ``failed``), or the SHA-256 of
   the very bytes sent (the intake refused them before accepting them, docs/commands.md).
   Only those fields are matched, never the notice's words: a refusal's words may quote
   what anyone who can publish on a command topic chose (a field's name, a topic level).
   An intake refusal of these bytes as ``replayed``, ``retained`` or ``wrong_topic`` is
   not this command's verdict (this dashboard publishes once, unretained, on its kind's
   topic): it is someone's copy of the bytes, or the broker's redelivery, after the
   daemon heard them, and is ignored. Only a schema-valid notice of that room counts, and
   the wait is armed *before* the publish, so an answer cannot come too early to be heard.
   Up to ``wait_s``; none in time is :attr:`Outcome.NO_ANSWER`, which each desk says as
   **NOT recorded** (a daemon that is not running never gets the command: its MQTT session
   is clean, the broker queues nothing for it; one only slow may still act on it before it
   expires, and its notice then shows in the room's events).

The dashboard never says "recorded" unless the daemon said so: :class:`Answer` carries the
daemon's ``outcome`` (:attr:`Answer.verdict`; ``done`` is the only success) with its
severity and words, which the desks show but never decide from. What the notice says is
only ever read, never trusted beyond the room's own ``events`` topic (which the broker's
ACL lets only that room's daemon write).

Memory is bounded by the requests waiting (each removes its markers when it ends, also on
cancellation). Nothing of the key or the signature is logged; the log line names the kind,
the holder, the room and the nonce.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request

from iortd.dashboard.hub import Hub
from iortd.dashboard.sessions import Session
from iortd.dashboard.state import Accepted
from iortd.users import signed_command

__all__ = ["MAX_FORM_BYTES", "ROOM_KEY_RE", "Answer", "Commander", "Outcome", "read_form"]

log = structlog.get_logger("iort_dashboard.commanding")

MAX_FORM_BYTES: Final = 4096
# A room as the forms name it, ``site/room`` (each as the daemon's config allows it).
ROOM_KEY_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}/[a-z0-9][a-z0-9-]{0,62}")
BODY_TIMEOUT_S: Final = 10.0
# An intake refusal of a dashboard's bytes for these reasons is someone's copy (module doc).
NOT_OURS: Final = frozenset({"replayed", "retained", "wrong_topic"})


async def read_form(request: Request, allowed: frozenset[str]) -> dict[str, str] | None:
    """A command's form: form-encoded UTF-8, at most ``MAX_FORM_BYTES``, read within
    ``BODY_TIMEOUT_S``, only ``allowed`` fields, each once; None otherwise."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    return None
    except TimeoutError:  # a body that trickles in: not a form
        return None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
    if not set(fields) <= allowed or any(len(v) != 1 for v in fields.values()):
        return None
    return {k: v[0] for k, v in fields.items()}


class Outcome(enum.Enum):
    NOT_SIGNED = "not_signed"  # the body cannot be signed: nothing sent
    NOT_SENT = "not_sent"  # no broker connection, or the publish failed: nothing sent
    NO_ANSWER = "no_answer"  # sent; the daemon said nothing in time: NOT recorded
    ANSWERED = "answered"  # the daemon's notice naming this command

    def __repr__(self) -> str:
        return f"Outcome.{self.name}"


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    nonce: str | None = None
    severity: str = ""  # the notice's, when ANSWERED
    message: str = ""  # the notice's text when ANSWERED; why, when NOT_SIGNED or NOT_SENT
    broker: bool = True  # NOT_SENT: False when there was no broker connection at all
    verdict: str = ""  # ANSWERED: the notice's command.outcome (done, refused, failed)
    reason: str | None = None  # ANSWERED: the notice's command.reason (a fixed word)

    @property
    def done(self) -> bool:
        """The daemon answered that it carried the command out (recorded, in force)."""
        return self.outcome is Outcome.ANSWERED and self.verdict == "done"


class _Said(NamedTuple):
    severity: str
    message: str
    outcome: str
    reason: str | None


class Commander:
    """Publishes signed commands and hears the daemons' answers (one per dashboard)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        # (room, "nonce", kind + nonce) or (room, "sha256", hex) -> the wait it ends
        self._waiting: dict[tuple[str, str, str], asyncio.Future[_Said]] = {}
        hub.listeners.append(self._heard)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _heard(self, acc: Accepted) -> None:
        """A room's ``events`` notice that answers a command being waited for."""
        try:
            self._answer(acc)
        except Exception:  # never the hub's problem: the wait then ends as "no answer"
            log.exception("command_answer_failed")

    def _answer(self, acc: Accepted) -> None:
        """Matched on the notice's ``command`` fields only, never on its words."""
        p = acc.payload
        if acc.name != "events" or p.get("kind") != "daemon_notice" or not self._waiting:
            return
        c = p.get("command")
        if not isinstance(c, dict) or not isinstance(c.get("outcome"), str):
            return  # not an answer to a command (or a daemon too old to say so)
        if isinstance(c.get("nonce"), str) and isinstance(c.get("kind"), str):
            marker = (acc.room.key, "nonce", f"{c['kind']} {c['nonce']}")
        elif isinstance(c.get("sha256"), str) and c.get("reason") not in NOT_OURS:
            marker = (acc.room.key, "sha256", c["sha256"])
        else:
            return
        fut = self._waiting.get(marker)
        if fut is not None and not fut.done():
            reason = c.get("reason")
            fut.set_result(
                _Said(
                    str(p.get("severity")),
                    str(p.get("message")),
                    c["outcome"],
                    reason if isinstance(reason, str) else None,
                )
            )

    async def send(
        self,
        kind: str,
        body: Mapping[str, Any],
        s: Session,
        key: str,
        *,
        ttl_s: float,
        wait_s: float,
        on_sent: Callable[[], None] | None = None,
    ) -> Answer:
        """Sign ``body`` as a ``kind`` command of the room ``key`` (``site/room``) with the
        session's key, publish it and wait for the daemon's word (module doc). ``on_sent``
        runs once the broker has it, before the wait."""
        if s.signer is None:
            return Answer(Outcome.NOT_SIGNED, message="this session holds no signing key")
        site, room = key.split("/", 1)
        try:
            env = signed_command(
                kind, body, signer=s.signer, holder=s.holder, site=site, room=room, ttl_s=ttl_s
            )
        except ValueError as exc:
            return Answer(Outcome.NOT_SIGNED, message=str(exc))
        raw = json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()
        sha = hashlib.sha256(raw).hexdigest()
        nonce = str(env["nonce"])
        markers = [(key, "nonce", f"{kind} {nonce}"), (key, "sha256", sha)]
        fut: asyncio.Future[_Said] = asyncio.get_running_loop().create_future()
        for m in markers:
            self._waiting[m] = fut
        try:
            publish = self._hub.publish
            if publish is None:
                return Answer(Outcome.NOT_SENT, nonce, message="no broker connection", broker=False)
            topic = f"{self._hub.rooms.prefix}/v1/{site}/{room}/cmd/{kind}"
            try:
                await publish(topic, raw)
            except Exception as exc:  # any failure to hand it to the broker: not sent
                log.warning(f"{kind}_not_sent", error=type(exc).__name__)
                return Answer(Outcome.NOT_SENT, nonce, message="the publish failed")
            if on_sent is not None:
                on_sent()
            log.info(f"{kind}_sent", holder=s.holder, room=key, nonce=nonce)
            try:
                async with asyncio.timeout(wait_s):
                    said = await fut
            except TimeoutError:
                return Answer(Outcome.NO_ANSWER, nonce)
        finally:
            for m in markers:
                self._waiting.pop(m, None)
        return Answer(
            Outcome.ANSWERED,
            nonce,
            said.severity,
            said.message,
            verdict=said.outcome,
            reason=said.reason,
        )
