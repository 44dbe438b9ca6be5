"""Acknowledging an alarm from the dashboard (issue 19, item 3).

``POST /api/ack`` (form-encoded: ``room`` as ``site/room``, ``alarm_key``, ``raised_at``,
``delivery_id`` (empty: null, an alarm raised between deliveries), ``comment`` optional),
behind :meth:`Auth.action` with the ``ack`` row of the role table (operator or physicist;
same origin, CSRF token, live session). In this order, the first failure is the answer and
nothing is sent:

1. the form is whole, bounded and has only these fields; the values have the forms the
   daemon's ``ack`` body takes (docs/commands.md, "The ack command": a printable key of at
   most 80 characters, an RFC 3339 UTC time, a comment of at most 200 printable
   characters on one line);
2. the session holds its signing key (a viewer's never does: the role check refused it
   already);
3. the raising (key, ``raised_at``, delivery id) is in the room's **current retained
   ``alarms`` list** as this dashboard holds it, and nobody has acknowledged it (409 with
   who and when), and no acknowledgement of it from this dashboard is being waited for
   (409: a double click sends one command, not two);
4. the body is signed with the session's key and published on the room's ``cmd/ack``, and
   the daemon's own answer waited for, up to ``ANSWER_WAIT_S`` (dashboard/commanding.py,
   as the sign-off does). ``recorded`` is true only when the daemon's notice answered
   this command (its ``command`` fields: kind ``ack``, this nonce) with ``done``; its
   refusal is 422 with its words; no answer is 504, **NOT recorded**; no broker, 503,
   not sent.

**No password again.** An acknowledgement is not a signature of meaning (21 CFR 11.50
applies to the sign-off, dashboard/signoff.py): it says that a person saw the alarm. It is
still signed by the person's own key, unlocked at login with the password and held only
for the session, so the daemon records who acknowledged, by name, from the signature, not
from anything the page says.

The check against the retained list is this dashboard's view, for a clear answer before
anything is sent; the daemon judges the command against its own ledger and is the one
that decides (a raising acknowledged from another dashboard a moment ago comes back as its
``already_acknowledged``). Nothing of the comment is logged here (staff remarks go to the
audit log through the daemon, never to the dashboard's log).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from iortd.dashboard.commanding import ROOM_KEY_RE, Answer, Commander, Outcome, read_form
from iortd.dashboard.hub import Hub
from iortd.dashboard.sessions import Session

__all__ = ["ACK_TTL_S", "ANSWER_WAIT_S", "AckDesk"]

ACK_TTL_S: Final = 120.0  # an acknowledgement is for now
ANSWER_WAIT_S: Final = 10.0
MAX_KEY: Final = 80  # as the daemon's ack body (daemon/alarm_ledger.py)
MAX_COMMENT: Final = 200
MAX_DELIVERY_ID: Final = 64
_FIELDS: Final = frozenset({"room", "alarm_key", "raised_at", "delivery_id", "comment"})
_NEEDED: Final = frozenset({"room", "alarm_key", "raised_at", "delivery_id"})
_UTC_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def _json(status: int, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status)


def _printable(v: str, limit: int) -> bool:
    return 0 < len(v) <= limit and v.isprintable()


def _form_problem(form: dict[str, str]) -> str | None:
    if not ROOM_KEY_RE.fullmatch(form["room"]):
        return "room: site/room"
    if not _printable(form["alarm_key"], MAX_KEY):
        return f"alarm_key: the alarm's key as listed (1-{MAX_KEY} printable characters)"
    raised = form["raised_at"]
    try:
        ok = _UTC_RE.fullmatch(raised) is not None and datetime.fromisoformat(raised) is not None
    except ValueError:
        ok = False
    if not ok:
        return "raised_at: the raising's time as listed (RFC 3339 UTC with Z)"
    did = form["delivery_id"]
    if did and not _printable(did, MAX_DELIVERY_ID):
        return "delivery_id: the alarm's delivery id as listed, or empty for none"
    comment = form.get("comment", "")
    if comment and not _printable(comment, MAX_COMMENT):
        return f"comment: at most {MAX_COMMENT} printable characters on one line"
    return None


class AckDesk:
    """The ``/api/ack`` endpoint's state: the acknowledgements being waited for."""

    def __init__(
        self, hub: Hub, commander: Commander, *, answer_wait_s: float | None = None
    ) -> None:
        self._hub = hub
        self._commander = commander
        self._wait_s = ANSWER_WAIT_S if answer_wait_s is None else answer_wait_s
        self._pending: set[tuple[str, str, str]] = set()  # (room, key, raised_at) in flight

    def _listed(self, key: str, form: dict[str, str], did: str | None) -> Response | None:
        """None if the raising is in the room's current list and unacknowledged."""
        room = self._hub.rooms.rooms.get(key)
        held = None if room is None else room.retained.get("alarms")
        if held is None:
            return _json(
                409, {"error": "this dashboard holds no alarm list of that room: nothing sent"}
            )
        for a in held.payload.get("alarms", []):
            if (a.get("key"), a.get("raised_at"), a.get("delivery_id")) != (
                form["alarm_key"],
                form["raised_at"],
                did,
            ):
                continue
            by = a.get("acknowledged")
            if by is None:
                return None
            return _json(
                409,
                {
                    "error": f"already acknowledged by {by.get('name')} ({by.get('by')}) at "
                    f"{by.get('at')}: nothing sent"
                },
            )
        return _json(
            409,
            {
                "error": "that alarm is not in the room's current alarm list (cleared and "
                "acknowledged, or superseded since the page showed it): nothing sent"
            },
        )

    async def ack(self, request: Request, s: Session) -> Response:
        form = await read_form(request, _FIELDS)
        if form is None or not set(form) >= _NEEDED:
            return _json(
                400,
                {
                    "error": "expected a form with room, alarm_key, raised_at, delivery_id "
                    "and an optional comment"
                },
            )
        problem = _form_problem(form)
        if problem is not None:
            return _json(400, {"error": problem})
        if s.signer is None:
            return _json(403, {"error": "this session holds no signing key: log in again"})
        key = form["room"]
        did = form["delivery_id"] or None
        refused = self._listed(key, form, did)
        if refused is not None:
            return refused
        pending = (key, form["alarm_key"], form["raised_at"])
        if pending in self._pending:
            return _json(
                409, {"error": "an acknowledgement of this alarm is being sent: wait for it"}
            )
        body: dict[str, Any] = {
            "alarm_key": form["alarm_key"],
            "raised_at": form["raised_at"],
            "delivery_id": did,
        }
        if form.get("comment"):
            body["comment"] = form["comment"]
        self._pending.add(pending)
        try:
            said = await self._commander.send(
                "ack", body, s, key, ttl_s=ACK_TTL_S, wait_s=self._wait_s
            )
        finally:
            self._pending.discard(pending)
        return self._outcome(said)

    def _outcome(self, said: Answer) -> Response:
        if said.outcome is Outcome.NOT_SIGNED:
            return _json(400, {"recorded": False, "error": f"cannot be signed: {said.message}"})
        if said.outcome is Outcome.NOT_SENT:
            why = "no broker connection" if not said.broker else "the broker did not take it"
            return _json(503, {"recorded": False, "error": f"{why}: NOT sent, NOT recorded"})
        if said.outcome is Outcome.NO_ANSWER:
            return _json(
                504,
                {
                    "recorded": False,
                    "nonce": said.nonce,
                    "error": f"NOT recorded: no answer from the room's daemon within "
                    f"{self._wait_s:.0f} s. A daemon that is not running never gets it "
                    "(commands are not queued for it): acknowledge again once it runs. (If "
                    "the list shows it acknowledged meanwhile, the daemon recorded it.)",
                },
            )
        recorded = said.done  # the notice's command fields, never its words
        return _json(
            200 if recorded else 422,
            {"recorded": recorded, "nonce": said.nonce, "message": said.message},
        )
